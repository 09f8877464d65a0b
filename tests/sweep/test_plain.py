"""The plain (no Ray) sweep builder's plan and its refusal to mix two sweeps in one directory."""

from __future__ import annotations

import json

import pytest

from dynatrack.sweep.plain import run_plain_sweep, trial_plan


def test_budgets_and_linear_lr_by_hand():
    cfg = {"batch_sizes": [64, 16], "seeds": [0, 1], "budget": ["epochs", "updates"], "epochs": 3,
           "optimizer": {"lr": 0.1, "lr_rule": "linear", "base_batch": 16}}
    plan = {t["trial_id"]: t for t in trial_plan(cfg, n_train=200)}
    assert len(plan) == 2 * 2 * 2
    assert plan["bs16-s0-epochs"]["max_steps"] == 3 * (200 // 16) == 36
    assert plan["bs64-s1-epochs"]["max_steps"] == 3 * (200 // 64) == 9
    assert plan["bs64-s0-updates"]["max_steps"] == plan["bs16-s0-updates"]["max_steps"] == 36
    assert plan["bs64-s0-epochs"]["lr"] == pytest.approx(0.1 * 64 / 16)
    assert {t["per_worker_batch"] == t["batch_size"] and t["world_size"] == 1 for t in plan.values()} == {True}
    with pytest.raises(ValueError, match=r"batch sizes \[512\] exceed the 200 training samples"):
        trial_plan({**cfg, "batch_sizes": [16, 512]}, n_train=200)


def test_a_directory_of_another_sweep_is_refused(tmp_path):
    cfg = {"name": "s", "task": {"name": "synthetic", "seed": 0, "n_train": 64, "n_test": 64},
           "model": {"hidden": [4]}, "batch_sizes": [8], "seeds": [0], "epochs": 1}
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({"format": "dynatrack.sweep/1", "config": {"name": "s"}}))
    with pytest.raises(ValueError, match="holds a different sweep"):
        run_plain_sweep(cfg, tmp_path)
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["config"] == {"name": "s"}  # left as it was
