"""A real 2-process ``strategy="ddp"`` CPU (gloo) fit, launched from a standalone script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dynatrack import open_run
from dynatrack.models import load_digits_tensors

SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_fit.py"


def run_script(root: Path, name: str, devices: int, steps: int = 10) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(root), name, str(devices), str(steps)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_rank_ddp_shards_cover_the_probe_and_match_single_process(tmp_path):
    run_script(tmp_path, "ddp2", 2)
    run_script(tmp_path, "single", 1)
    ddp, single = open_run(tmp_path / "ddp2"), open_run(tmp_path / "single")
    # rank 0 opened the run right after fit() returned, while rank 1 was held back before closing:
    # it already saw every rank's shards
    seen = json.loads((tmp_path / "ddp2-seen-after-fit.json").read_text())
    assert seen == {"ranks": [0, 1], "pattern_rows": ddp.patterns().num_rows}
    assert ddp.manifest["world_size"] == 2 and ddp.ranks == [0, 1]
    train, test = load_digits_tensors(0)
    sizes = {"train": len(train), "test": len(test)}
    probe = ddp.patterns(source="probe").to_pandas()
    for (step, layer, split), g in probe.groupby(["step", "layer", "split"]):
        by_rank = {r: set(x.sample_id) for r, x in g.groupby("rank")}
        assert set(by_rank) == {0, 1}
        assert not (by_rank[0] & by_rank[1]), "a probe sample recorded on both ranks"
        assert by_rank[0] | by_rank[1] == set(range(sizes[split])), "union of ranks != probe set"
    # step 0: same seed, same initial weights -> identical patterns to the 1-process run
    for layer in ddp.widths:
        for split in ("train", "test"):
            ids_d, bits_d = ddp.pattern_bits(0, layer, split=split)
            ids_s, bits_s = single.pattern_bits(0, layer, split=split)
            np.testing.assert_array_equal(ids_d, ids_s)
            np.testing.assert_array_equal(bits_d, bits_s)
    # merged neuron counts over ranks equal the single-process counts at step 0
    nd = ddp.neurons(merged=True, step=0).to_pandas()
    ns = single.neurons(merged=True, step=0).to_pandas()
    np.testing.assert_array_equal(nd.active.to_numpy(), ns.active.to_numpy())
    np.testing.assert_array_equal(nd.n_samples.to_numpy(), ns.n_samples.to_numpy())
    assert list(nd.partition) == list(ns.partition)
    # each rank wrote its own steps rows; global batch size = 2 x 32
    steps = ddp.steps().to_pandas()
    assert set(steps["rank"]) == {0, 1} and (steps.batch_size == 64).all()
    # batch-source rows came from each rank's own batches
    batch = ddp.patterns(source="batch").to_pandas()
    assert set(batch["rank"]) == {0, 1} and sorted(batch.step.unique()) == [0, 4, 8]
