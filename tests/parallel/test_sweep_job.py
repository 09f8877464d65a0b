"""``ray job submit`` of a two-trial sweep against a real head node (token auth on)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynatrack import open_run
from dynatrack.sweep.data import make_task

from test_ray_job import RAY, REPO, head  # noqa: F401 - the module-scoped head node fixture


# each trial starts fresh Ray Train worker processes (torch + Lightning imports): about 10 s a trial on an idle
# 2-core machine, minutes on a shared, overloaded one
pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]


@pytest.mark.slow
def test_ray_job_submit_runs_a_two_trial_sweep(head, tmp_path):  # noqa: F811
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        f"name: job-sweep\nroot: {tmp_path / 'runs'}\n"
        "task: {name: synthetic, seed: 3, n_train: 64, n_test: 32}\nmodel: {hidden: [8]}\n"
        "batch_sizes: [8, 16]\nworkers: 2\nseeds: [1]\nepochs: 1\n"
        "recorder: {schedule: {at: [0]}}\nwandb: {mode: disabled}\n")
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", head["dashboard"], "--working-dir", str(REPO),
         "--runtime-env-json", '{"excludes": ["runs", ".git", "wandb", "*.egg-info", ".pytest_cache", "__pycache__"]}',
         "--", sys.executable, "jobs/sweep.py", "--config", str(cfg)],
        env=head["env"], capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out
    assert head["token"].read_text() not in out
    sweep = tmp_path / "runs" / "job-sweep"
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert {t["trial_id"]: t["status"] for t in manifest["trials"]} == {
        "bs8-s1-epochs": "finished", "bs16-s1-epochs": "finished"}
    train, test, _ = make_task("synthetic", seed=3, n_train=64, n_test=32)
    for t in manifest["trials"]:
        run = open_run(sweep / t["trial_id"])
        assert run.manifest["world_size"] == 2 and run.ranks == [0, 1]
        # one epoch: each rank takes 32 samples in batches of B / 2
        assert t["max_steps"] == 32 // (t["batch_size"] // 2)
        assert max(run.checkpoint_steps()) == t["max_steps"] and 0 in run.checkpoint_steps()
        ids = run.patterns(source="probe", step=0).column("sample_id").to_pylist()
        assert len(ids) == (len(train) + len(test)) * len(run.widths)
        info = json.loads((sweep / t["trial_id"] / "trial.json").read_text())
        assert info["final_step"] == t["max_steps"] and info["world_size"] == 2
    # the same sweep again through the CLI against the same cluster: every trial is kept, nothing re-runs
    env = {**head["env"], "PYTHONPATH": str(REPO)}
    again = subprocess.run([sys.executable, "-m", "dynatrack.cli", "sweep", "--config", str(cfg), "--address",
                            head["gcs"]], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2/2 trials finished (0 run now, 2 kept from before)" in " ".join(again.stdout.split())
    assert json.loads((sweep / "sweep.json").read_text())["trials"] == manifest["trials"]
