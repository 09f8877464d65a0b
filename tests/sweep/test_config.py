"""Sweep config validation and the sweep directory's bad-input paths (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynatrack.sweep.config import SweepConfigError, load_config, plan_trials, steps_per_epoch, validate_config
from dynatrack.sweep.data import build_net, make_task
from dynatrack.sweep.manifest import prepare, read_sweep

TASK = {"name": "synthetic", "seed": 0, "n_train": 100, "n_test": 40}


def base(**over):  # noqa: ANN003, ANN201
    cfg = {"name": "t", "task": dict(TASK), "model": {"hidden": [6]}, "batch_sizes": [10, 20], "workers": 2,
           "seeds": [0, 1], "epochs": 3}
    cfg.update(over)
    return cfg


def test_unknown_keys_name_the_nearest_valid_key():
    with pytest.raises(SweepConfigError, match=r"'batch_size' \(did you mean 'batch_sizes'\?\)"):
        validate_config({**base(), "batch_size": [4]})
    with pytest.raises(SweepConfigError, match=r"section 'optimizer'.*'lr_rul' \(did you mean 'lr_rule'\?\)"):
        validate_config(base(optimizer={"lr_rul": "linear"}))
    with pytest.raises(SweepConfigError, match=r"budget must be one of epochs, updates, got 'epoch' \(did you mean 'epochs'"):
        validate_config(base(budget="epoch"))


def test_batch_sizes_larger_than_the_data_or_not_divisible_are_named():
    with pytest.raises(SweepConfigError, match=r"batch sizes \[128, 256\] are larger than the training set .*100 samples"):
        validate_config(base(batch_sizes=[16, 128, 256]))
    with pytest.raises(SweepConfigError, match=r"batch sizes \[15, 21\] are not divisible by workers=2"):
        validate_config(base(batch_sizes=[10, 15, 21]))


def test_plan_counts_updates_like_a_distributed_loader_by_hand():
    cfg = validate_config(base(budget=["updates", "epochs"], optimizer={"lr": 0.1, "lr_rule": "linear"}))
    trials = {t["trial_id"]: t for t in plan_trials(cfg)}
    assert len(trials) == 2 * 2 * 2
    # each of 2 ranks takes ceil(100 / 2) = 50 samples; per-worker batches 5 and 10, last partial dropped
    assert trials["bs10-s0-epochs"]["max_steps"] == 3 * (50 // 5) == 30
    assert trials["bs20-s1-epochs"]["max_steps"] == 3 * (50 // 10) == 15
    assert trials["bs20-s1-updates"]["max_steps"] == 30  # the smallest batch's updates
    # linear scaling from base_batch = the smallest batch size
    assert trials["bs20-s0-epochs"]["lr"] == pytest.approx(0.1 * 20 / 10)
    assert trials["bs10-s0-epochs"]["per_worker_batch"] == 5
    # the count of a real DistributedSampler split, by brute force
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    ds = TensorDataset(torch.arange(100))
    for b in (10, 20):
        n = len(DataLoader(ds, batch_size=b // 2, drop_last=True,
                           sampler=DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True)))
        assert steps_per_epoch(b, 2, 100) == n


def test_a_directory_holding_a_different_sweep_is_refused(tmp_path):
    cfg = validate_config(base(root=str(tmp_path)))
    path, manifest, todo = prepare(cfg)
    assert len(todo) == 4 and read_sweep(path)["config"]["name"] == "t"
    # the shared initial weights: build_net after torch.manual_seed(seed), recomputed here
    _, _, meta = make_task(**{**TASK})
    torch.manual_seed(1)
    ref = build_net({"hidden": [6], "activation": "relu"}, meta).state_dict()
    got = torch.load(path / "init" / "seed=1.pt", weights_only=True)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(SweepConfigError, match=r"holds a different sweep \(its sweep.json differs in epochs\)"):
        prepare(validate_config(base(root=str(tmp_path), epochs=4)))
    # execution-only settings may change between runs of the same sweep
    prepare(validate_config(base(root=str(tmp_path), wandb={"mode": "disabled"}, ray={"num_cpus": 1})))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(SweepConfigError, match="exists and is not a sweep directory"):
        prepare(validate_config(base(root=str(tmp_path), name="other")))
    assert (tmp_path / "other" / "notes.txt").read_text() == "x"


def test_unfinished_trial_directories_are_moved_aside_not_deleted(tmp_path):
    cfg = validate_config(base(root=str(tmp_path), seeds=[0], batch_sizes=[10]))
    path, manifest, _ = prepare(cfg)
    (path / "bs10-s0-epochs").mkdir()
    (path / "bs10-s0-epochs" / "partial.txt").write_text("rows")
    _, manifest, todo = prepare(cfg)
    assert todo == ["bs10-s0-epochs"]
    moved = list((path / "failed").glob("bs10-s0-epochs-*"))
    assert len(moved) == 1 and (moved[0] / "partial.txt").read_text() == "rows"
    assert not (path / "bs10-s0-epochs").exists()


def test_cli_reports_bad_input_in_one_line_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**base(root=str(tmp_path)), "seeds": [0], "workrs": 2}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run([sys.executable, "-m", "dynatrack.cli", "sweep", "--config", str(bad)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"dynatrack sweep: error: {bad}: unknown key 'workrs' (did you mean 'workers'?); valid keys are "
        "name, root, task, model, batch_sizes, workers, seeds, budget, epochs, optimizer, recorder, compare, "
        "wandb, ray"]
    with pytest.raises(SweepConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_config_is_valid():
    cfg = load_config(Path(__file__).parents[2] / "configs" / "batch_sweep.yaml")
    assert len(plan_trials(cfg)) == len(cfg["batch_sizes"]) * len(cfg["seeds"]) * len(cfg["budget"])


def test_wandb_online_without_credentials_is_refused_before_anything_runs(tmp_path, monkeypatch):
    from dynatrack.parallel.sweep import run_sweep
    from dynatrack.tracking import TrackingError

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    for name in ("WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    cfg = validate_config(base(root=str(tmp_path / "runs"), wandb={"mode": "online"}))
    with pytest.raises(TrackingError, match="online"):
        run_sweep(cfg)
    assert not (tmp_path / "runs").exists()
