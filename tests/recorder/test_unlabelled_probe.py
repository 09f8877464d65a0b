"""Probe splits without labels (a plain tensor) record patterns and neuron rows labelled without classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import TinyNet, loader, make_data, trainer
from dynatrack import PatternRecorder, open_run, schedules


def naive_rows(state: dict, x: torch.Tensor, labels: torch.Tensor | None, n_classes: int) -> dict:
    """Per layer: (active[m], by_class[m, C] or None, partition[m]) by a plain loop over neurons."""
    h = x
    out = {}
    for lin, act in (("net.0", "net.1"), ("net.2", "net.3")):
        z = F.linear(h, state[f"{lin}.weight"], state[f"{lin}.bias"])
        on = (z > 0).numpy()
        h = torch.relu(z)
        n = len(x)
        active, by_class, part = [], [], []
        for j in range(on.shape[1]):
            a = int(on[:, j].sum())
            active.append(a)
            per = None if labels is None else [int(on[labels.numpy() == c, j].sum()) for c in range(n_classes)]
            by_class.append(per)
            if a == 0:
                part.append("dead")
            elif a == n:
                part.append("always_on")
            elif per is None:
                part.append("partial")
            else:
                part.append("class_selective" if sum(v > 0 for v in per) == 1 else "mixed")
        out[act] = (active, by_class, part)
    return out


def check_neurons(run, probe: dict, n_classes: int, merged: bool = False) -> set:  # noqa: ANN001
    seen_parts = set()
    t = run.neurons(merged=merged).to_pandas()
    steps = sorted(t.step.unique())
    assert steps == run.recorded_steps("patterns", source="probe") and len(steps) >= 3
    for step in steps:
        state = run.checkpoint(int(step))
        for split, (x, y) in probe.items():
            want = naive_rows(state, x, y, n_classes)
            for layer, (active, by_class, part) in want.items():
                g = t[(t.step == step) & (t.layer == layer) & (t.split == split)].sort_values("neuron")
                assert g.active.tolist() == active
                assert (g.n_samples == len(x)).all()
                assert g.partition.tolist() == part
                got = [list(v) for v in g.active_by_class]
                assert got == ([[]] * len(active) if y is None else by_class)
                seen_parts |= set(part)
    return seen_parts


def fit(tmp_path, probe, steps: int = 8, **kw) -> str:  # noqa: ANN001
    x, y = make_data()
    rec = PatternRecorder(str(tmp_path / "runs"), probe=probe, schedule=schedules.every(3), **kw)
    torch.manual_seed(0)
    trainer(steps, [rec]).fit(TinyNet(), loader(x, y))
    return rec.run_dir


def test_a_plain_tensor_probe_records_patterns_and_partial_neurons(tmp_path):
    x, _ = make_data(64, seed=3)
    run = open_run(fit(tmp_path, x))
    ids, bits = run.pattern_bits(0, "net.1")
    assert sorted(ids.tolist()) == list(range(64)) and bits.shape == (64, 2)
    parts = check_neurons(run, {"train": (x, None)}, 0)
    assert "partial" in parts  # the label that needs a probe without labels
    assert run.manifest["probe"]["num_classes"] == 0


@pytest.mark.parametrize("path", ["host", "device"])
def test_labelled_and_unlabelled_splits_side_by_side(tmp_path, path):
    x, y = make_data(60, seed=4)
    extra, _ = make_data(30, seed=5)
    probe = {"train": (x, y), "extra": extra}
    run = open_run(fit(tmp_path, probe, neuron_counts="writer" if path == "host" else "device"))
    parts = check_neurons(run, {"train": (x, y), "extra": (extra, None)}, 3)
    assert "partial" in parts and parts & {"mixed", "class_selective"}
    merged_parts = check_neurons(run, {"train": (x, y), "extra": (extra, None)}, 3, merged=True)
    assert merged_parts == parts
    assert run.manifest["probe"]["num_classes"] == 3


@pytest.mark.slow
def test_two_ranks_merge_unlabelled_and_labelled_counts(tmp_path):
    # ddp_fork: real gloo processes in-process (ddp would re-execute pytest); each rank counts its shard
    x, y = make_data(60, seed=4)
    extra, _ = make_data(31, seed=5)
    rec = PatternRecorder(str(tmp_path / "runs"), run_name="two", probe={"train": (x, y), "extra": extra},
                          schedule=schedules.every(3))
    torch.manual_seed(0)
    trainer(7, [rec], devices=2, strategy="ddp_fork").fit(TinyNet(), loader(*make_data()))
    run = open_run(tmp_path / "runs" / "two")
    assert run.ranks == [0, 1]
    per_rank = run.neurons().to_pandas()
    assert set(per_rank[per_rank.split == "extra"].n_samples) == {15, 16}
    check_neurons(run, {"train": (x, y), "extra": (extra, None)}, 3, merged=True)
