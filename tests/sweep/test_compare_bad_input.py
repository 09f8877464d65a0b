"""Bad sweep directories: a one-line error before Ray starts (no Ray, no training here)."""

from __future__ import annotations

import json

import pytest

from dynatrack.sweep.compare import SweepError, compare_sweep

CONFIG = {"name": "bad", "task": {"name": "synthetic", "seed": 0, "n_train": 64, "n_test": 64},
          "model": {"hidden": [8]}}
FAILED = {"trial_id": "bs64-s2-epochs", "batch_size": 64, "per_worker_batch": 64, "world_size": 1, "lr": 0.1,
          "seed": 2, "budget": "epochs", "max_steps": 8, "status": "failed", "error": "RuntimeError: boom"}


def test_bad_sweep_directories_are_clear_errors(tmp_path, capsys):
    from dynatrack.cli import main

    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "no sweep.json" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "sweep.json").write_text(json.dumps({"format": "something/2"}))
    with pytest.raises(SweepError, match="format"):
        compare_sweep(other)
    bad = tmp_path / "bad"
    bad.mkdir()
    trial = {**FAILED, "status": "finished"}
    (bad / trial["trial_id"]).mkdir()
    (bad / trial["trial_id"] / "trial.json").write_text("{}")
    (bad / "sweep.json").write_text(json.dumps({"format": "dynatrack.sweep/1", "sweep_id": "bad", "trials": [trial],
                                                "config": {**CONFIG, "compare": {"sharpnes_eps": 1e-3}}}))
    with pytest.raises(SweepError, match="did you mean 'sharpness_eps'"):
        compare_sweep(bad)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "sweep.json").write_text(json.dumps({"format": "dynatrack.sweep/1", "sweep_id": "n", "trials": [FAILED],
                                                    "config": CONFIG}))
    with pytest.raises(SweepError, match="no finished trial"):
        compare_sweep(nothing)
