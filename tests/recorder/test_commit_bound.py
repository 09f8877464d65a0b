"""``PatternRecorder(commit_every_steps=, commit_every_seconds=)``: the crash bound, passed to the writer.

Each commit of the writer writes one shard per table and then the rank's commit record, so the
recorded steps in each ``patterns`` shard are the steps of one commit.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TinyNet, loader, make_data, trainer
from lightning.pytorch import Callback

from dynatrack import PatternRecorder, schedules
from dynatrack.recorder.callback import RecorderError


def _fit(tmp_path: Path, name: str, steps: int, callbacks: list | None = None, **rec_kw) -> str:  # noqa: ANN003
    x, y = make_data()
    rec = PatternRecorder(str(tmp_path / "runs"), run_name=name, probe=(x[:40], y[:40]), schedule=schedules.every(1),
                          submit_every=1, **rec_kw)
    trainer(steps, [rec, *(callbacks or [])]).fit(TinyNet(), loader(x, y))
    return rec.run_dir


def _steps_per_shard(run_dir: str) -> list[list[int]]:
    shards = sorted(Path(run_dir, "patterns", "rank=0").glob("*.parquet"))
    return [sorted(set(pq.read_table(p, columns=["step"]).column("step").to_pylist())) for p in shards]


def test_commit_every_steps_bounds_the_steps_per_commit(tmp_path):
    steps = 12
    bounded = _steps_per_shard(_fit(tmp_path, "bounded", steps, commit_every_steps=3))
    recorded = list(range(steps + 1))  # every step, and the final one after the last update
    assert sorted(s for shard in bounded for s in shard) == recorded  # each step in exactly one commit
    assert all(len(shard) <= 3 for shard in bounded), bounded
    assert len(bounded) >= math.ceil(len(recorded) / 3)
    # the default bound (64 steps) commits a 13-step fit once, at the end
    assert len(_steps_per_shard(_fit(tmp_path, "default", steps))) == 1
    record = json.loads(Path(tmp_path, "runs", "bounded", "commits", "rank=0", "attempt-000.json").read_text())
    assert record["through"] == steps and record["closed"] is True


class _Slow(Callback):
    def on_train_batch_end(self, *args) -> None:  # noqa: ANN002
        time.sleep(0.5)


def test_commit_every_seconds_commits_rows_that_waited(tmp_path):
    steps = 8
    shards = _steps_per_shard(_fit(tmp_path, "slow", steps, [_Slow()], commit_every_steps=1000,
                                   commit_every_seconds=0.2))
    assert sorted(s for shard in shards for s in shard) == list(range(steps + 1))
    # a step every 0.5 s and a 0.2 s bound: a commit at (nearly) every hand-off, never one at the end only
    assert all(len(shard) <= 3 for shard in shards), shards
    assert len(shards) >= math.ceil((steps + 1) / 3)


@pytest.mark.parametrize("kw", [{"commit_every_steps": 0}, {"commit_every_steps": 2.5}, {"commit_every_steps": True},
                                {"commit_every_seconds": 0}, {"commit_every_seconds": -1.0},
                                {"commit_every_seconds": float("inf")}, {"commit_every_seconds": "5"}])
def test_bad_commit_bounds_are_clear_errors(tmp_path, kw):
    name = next(iter(kw))
    with pytest.raises(RecorderError, match=name):
        PatternRecorder(str(tmp_path / "runs"), run_name="x", **kw)
