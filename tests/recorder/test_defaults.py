"""Defaults cost nothing a user did not ask for: weights follow the probe schedule, not the batch schedule."""

from __future__ import annotations

import torch

from conftest import TinyNet, loader, trainer
from dynatrack import PatternRecorder, open_run, schedules


def test_default_checkpoints_follow_the_probe_schedule_not_the_batch_schedule(tmp_path, data):
    x, y = data
    torch.manual_seed(0)
    rec = PatternRecorder(str(tmp_path / "runs"), probe=(x, y), schedule=schedules.every(4, start=1),
                          batch_schedule=schedules.every(1))
    trainer(10, [rec]).fit(TinyNet(), loader(x, y))
    run = open_run(rec.run_dir)
    assert run.recorded_steps("patterns", source="batch") == list(range(10))
    # by hand: step 0, the probe steps 1, 5, 9, and the final weights after 10 updates
    assert run.checkpoint_steps() == [0, 1, 5, 9, 10]
    assert sorted(run.steps().to_pandas().step) == [0, 1, 5, 9]


def test_batch_source_alone_saves_only_the_first_and_last_weights(tmp_path, data):
    x, y = data
    rec = PatternRecorder(str(tmp_path / "runs"), batch_schedule=schedules.every(1))
    trainer(6, [rec]).fit(TinyNet(), loader(x, y))
    run = open_run(rec.run_dir)
    assert run.recorded_steps("patterns", source="batch") == list(range(6))
    assert run.checkpoint_steps() == [0, 6]


def test_dense_weights_when_asked_for(tmp_path, data):
    x, y = data
    rec = PatternRecorder(str(tmp_path / "runs"), batch_schedule=schedules.every(2),
                          checkpoint_schedule=schedules.every(2))
    trainer(6, [rec]).fit(TinyNet(), loader(x, y))
    assert open_run(rec.run_dir).checkpoint_steps() == [0, 2, 4, 6]
