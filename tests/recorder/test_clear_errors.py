"""Bad probes and writer failures: one clear error or warning, at setup where possible."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from conftest import TinyNet, loader, make_data, trainer
from dynatrack import PatternRecorder, open_run, schedules
from dynatrack.recorder.probe import ProbeError, ProbeSplit
MAX_CLASSES = 2**16
from dynatrack.store.writer import WriterError


def test_a_huge_label_is_refused_before_anything_is_allocated(tmp_path):
    x, y = make_data(8)
    y[3] = 10**14  # as a label column of ids would be: today a raw allocator error asking for 844 TB
    with pytest.raises(ProbeError, match=r"probe label 100000000000000 is too large.*Remap the labels"):
        PatternRecorder(str(tmp_path), probe=(x, y))
    y[3] = MAX_CLASSES - 1  # the largest label still accepted
    assert ProbeSplit(x, y).labels.max() == MAX_CLASSES - 1


def fit(tmp_path, probe, steps: int = 6, **kw):  # noqa: ANN001, ANN201
    x, y = make_data()
    rec = PatternRecorder(str(tmp_path / "runs"), probe=probe, schedule=schedules.every(2), **kw)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(steps, [rec]).fit(TinyNet(), loader(x, y))
    return rec, [w for w in caught if "probe" in str(w.message)]


def test_labels_beyond_the_model_outputs_warn_at_setup(tmp_path):
    x, y = make_data(30)
    y[7] = 5  # TinyNet has 3 outputs
    rec, caught = fit(tmp_path / "a", (x, y))
    assert len(caught) == 1
    assert "label 5, but the model has 3 outputs" in str(caught[0].message)
    assert open_run(rec.run_dir).manifest["probe"]["num_classes"] == 6  # recorded all the same
    _, none = fit(tmp_path / "b", make_data(30))
    assert none == []


def test_nan_probe_rows_warn_once_and_read_as_active(tmp_path):
    x, y = make_data(30)
    x[[4, 9]] = float("nan")
    x[12, 2] = float("nan")
    rec, caught = fit(tmp_path, (x, y), steps=8)  # probe steps 0, 2, 4, 6, 8: one warning
    assert len(caught) == 1
    assert "3 sample(s) with NaN inputs (sample ids [4, 9, 12])" in str(caught[0].message)
    run = open_run(rec.run_dir)
    for step in (0, 8):
        for layer, width in run.widths.items():
            ids, bits = run.pattern_bits(step, layer)
            on = np.unpackbits(bits, axis=1, count=width).astype(bool)
            nan_rows = np.isin(ids, [4, 9, 12])
            assert on[nan_rows].all(), "NaN rows are not all active as the warning says"
            assert not on[~nan_rows].all()


class BlockPatterns(Callback):
    """Put a file where the run's ``patterns`` directory goes: every shard write of that table fails."""

    def __init__(self, rec: PatternRecorder) -> None:
        self.rec = rec

    def on_train_start(self, trainer, pl_module):  # noqa: ANN001
        Path(self.rec.run_dir, "patterns").write_bytes(b"")


def test_a_writer_failure_is_reported_once(tmp_path, caplog):
    x, y = make_data()
    rec = PatternRecorder(str(tmp_path / "runs"), probe=(x, y), schedule=schedules.every(1), rows_per_file=1,
                          submit_every=1)
    with caplog.at_level(logging.DEBUG, logger="dynatrack"), pytest.raises(WriterError, match="Not a directory") as info:
        trainer(30, [rec, BlockPatterns(rec)]).fit(TinyNet(), loader(x, y))
    assert "Not a directory" in str(info.value)
    reports = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert reports == [], [r.getMessage() for r in reports]


class SkipsSecondReLU(TinyNet):
    """At the steps in ``skip_at`` the forward bypasses ``net.3`` (its hook cannot run)."""

    skip = False

    def forward(self, x):  # noqa: ANN001, ANN201
        if not self.skip:
            return self.net(x)
        return self.net[4](self.net[2](self.net[1](self.net[0](x))))


class SkipAt(Callback):
    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        pl_module.skip = trainer.global_step in self.steps


def test_a_layer_missing_from_a_recorded_training_forward_is_warned_about_once(tmp_path, data):
    x, y = data
    rec = PatternRecorder(str(tmp_path / "runs"), batch_schedule=schedules.every(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(6, [SkipAt({2, 4}), rec]).fit(SkipsSecondReLU(), loader(x, y))
    mine = [w for w in caught if "did not run in the training forward" in str(w.message)]
    assert len(mine) == 1 and "['net.3']" in str(mine[0].message) and "step 2" in str(mine[0].message)
    t = open_run(rec.run_dir).patterns(source="batch").to_pandas()
    steps_of = {layer: sorted(g.step.unique()) for layer, g in t.groupby("layer")}
    assert steps_of == {"net.1": [0, 1, 2, 3, 4, 5], "net.3": [0, 1, 3, 5]}


def test_labels_whose_class_counts_would_not_fit_are_refused_at_setup(tmp_path):
    # 65,536 classes x 40,000 neurons x 4 bytes = 9.8 GiB of counts per split: refused before training
    x, y = make_data(8)
    y[0] = MAX_CLASSES - 1
    model = TinyNet(hidden=(40_000,))
    rec = PatternRecorder(str(tmp_path / "runs"), probe=(x, y))
    with pytest.raises(ProbeError, match=r"labels go up to 65535: .* 9\.8 GiB .*65,536 classes x 40,000"):
        trainer(2, [rec]).fit(model, loader(x, y))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
