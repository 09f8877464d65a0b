"""Real Ray sweeps (Ray Tune grid of Ray Train fits, 2 CPU workers each) on tiny tasks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dynatrack import open_run
from dynatrack.sweep.config import validate_config
from dynatrack.sweep.data import build_net, make_task
from dynatrack.sweep.trial import fit_plain, trial_spec

from conftest import assert_signs


# each worker group starts fresh Ray Train worker processes (torch + Lightning imports): about 30 s on an idle
# 2-core machine (once per sweep, and again after a failed trial), minutes on a shared, overloaded one
pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]

TASK = {"name": "synthetic", "seed": 0, "n_train": 96, "n_test": 40}
FAIL = "bs16-s0-epochs"
GOOD = "bs32-s0-epochs"


def config(root: Path, **over):  # noqa: ANN003, ANN201
    cfg = {"name": "sw", "root": str(root), "task": dict(TASK), "model": {"hidden": [12, 7]},
           "batch_sizes": [16, 32], "workers": 2, "seeds": [0], "epochs": 2,
           "recorder": {"schedule": {"at": [0, 2]}}, "wandb": {"mode": "offline"}}
    cfg.update(over)
    return validate_config(cfg)


@pytest.fixture(scope="module")
def first_sweep(local_ray, tmp_path_factory):  # noqa: ANN001, ANN201
    """Two trials on the module's local Ray (2 CPUs); one raises at step 3 on every worker."""
    from dynatrack.parallel.sweep import run_sweep

    root = tmp_path_factory.mktemp("sweeps")
    cfg = config(root)
    result = run_sweep(cfg, fail_at={FAIL: 3})
    return cfg, result


@pytest.mark.slow
def test_a_failed_trial_is_reported_and_does_not_stop_the_other(first_sweep):
    cfg, result = first_sweep
    assert result["failed"] == [FAIL] and sorted(result["ran"]) == [FAIL, GOOD]
    manifest = json.loads(Path(result["sweep_dir"], "sweep.json").read_text())
    trials = {t["trial_id"]: t for t in manifest["trials"]}
    assert trials[FAIL]["status"] == "failed"
    assert "deliberate failure at step 3" in trials[FAIL]["error"]
    assert trials[GOOD]["status"] == "finished" and trials[GOOD]["error"] is None
    assert all(t["wall_time_s"] > 0 for t in trials.values())
    assert not Path(result["sweep_dir"], FAIL, "trial.json").exists()
    info = json.loads(Path(result["sweep_dir"], GOOD, "trial.json").read_text())
    assert info["final_step"] == trials[GOOD]["max_steps"] == 2 * (48 // 16)
    # the failed trial's workers had recorded step 0 and 2 before raising at step 3
    assert sorted(set(open_run(Path(result["sweep_dir"], FAIL)).steps().column("step").to_pylist())) == [0, 2]


@pytest.mark.slow
def test_ray_train_run_dir_passes_the_ddp_schema_checks_and_matches_a_plain_fit_at_step_0(first_sweep, tmp_path):
    cfg, result = first_sweep
    sweep = Path(result["sweep_dir"])
    run = open_run(sweep / GOOD)
    assert run.manifest["world_size"] == 2 and run.ranks == [0, 1] and run.manifest["run_id"] == GOOD
    train, test, meta = make_task(**TASK)
    sizes = {"train": len(train), "test": len(test)}
    probe = run.patterns(source="probe").to_pandas()
    assert sorted(probe.step.unique()) == [0, 2, 6]  # the schedule and the final step (record_final)
    for (_step, _layer, split), g in probe.groupby(["step", "layer", "split"]):
        by_rank = {r: set(x.sample_id) for r, x in g.groupby("rank")}
        assert set(by_rank) == {0, 1} and not (by_rank[0] & by_rank[1])
        assert by_rank[0] | by_rank[1] == set(range(sizes[split]))
    steps = run.steps().to_pandas()
    assert set(steps["rank"]) == {0, 1} and (steps.batch_size == 32).all()
    assert set(run.checkpoint_steps()) >= {0, 6}
    # step-0 weights are the shared init of seed 0 (build_net after manual_seed(0)), recomputed here
    torch.manual_seed(0)
    net = build_net({"hidden": [12, 7], "activation": "relu"}, meta)
    ck = run.checkpoint(step=0)
    for k, v in net.state_dict().items():
        assert torch.equal(ck[f"net.{k}"], v)
    # step-0 probe patterns: equal to a plain one-process Lightning fit of the same trial, and to the
    # signs of the pre-activations computed by hand from the initial weights
    plain_spec = trial_spec(cfg, next(t for t in result["trials"] if t["trial_id"] == GOOD), sweep)
    plain_spec.update(sweep_dir=str(tmp_path), max_steps=1)
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "seed=0.pt").write_bytes((sweep / "init" / "seed=0.pt").read_bytes())
    fit_plain(plain_spec)
    plain = open_run(tmp_path / GOOD)
    assert plain.widths == run.widths
    for i, layer in enumerate(run.widths):
        for split, ds in (("train", train), ("test", test)):
            ids_r, bits_r = run.pattern_bits(0, layer, split=split)
            ids_p, bits_p = plain.pattern_bits(0, layer, split=split)
            order_r, order_p = np.argsort(ids_r), np.argsort(ids_p)
            np.testing.assert_array_equal(ids_r[order_r], ids_p[order_p])
            np.testing.assert_array_equal(bits_r[order_r], bits_p[order_p])
            z = ds.tensors[0][torch.as_tensor(ids_r[order_r])]
            with torch.no_grad():
                for j in range(i):
                    z = torch.relu(net.body[2 * j](z))
                z = net.body[2 * i](z)
            assert_signs(bits_r[order_r], z)


@pytest.mark.slow
def test_each_finished_trial_is_one_offline_wandb_run_grouped_by_the_sweep(first_sweep):
    duckdb = pytest.importorskip("duckdb")
    from dynatrack.tracking import read_offline_run

    _cfg, result = first_sweep
    sweep = Path(result["sweep_dir"])
    runs = sorted((sweep / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # the failed trial is not logged
    logged = read_offline_run(runs[0])
    history = {row["trainer/step"]: row for row in logged["history"]}
    rows = duckdb.connect().execute(
        f"SELECT step, AVG(loss), MAX(lr) FROM read_parquet('{sweep / GOOD}/steps/*/*.parquet', "
        "hive_partitioning = true) GROUP BY step ORDER BY step").fetchall()
    assert sorted(history) == [r[0] for r in rows]
    for step, loss, lr in rows:
        assert history[step]["train/loss"] == pytest.approx(loss)
        assert history[step]["train/lr"] == pytest.approx(lr)
    assert logged["run"]["run_group"] == "sw" and logged["run"]["run_id"] == f"sw-{GOOD}"
    assert logged["run"]["job_type"] == "trial"
    config = logged["config"]
    assert {k: config[k] for k in ("batch_size", "per_worker_batch", "world_size", "seed", "budget")} == {
        "batch_size": 32, "per_worker_batch": 16, "world_size": 2, "seed": 0, "budget": "epochs"}
    assert config["lr"] == pytest.approx(0.05)


@pytest.mark.slow
def test_trial_resources_the_cluster_can_never_satisfy_fail_within_seconds(local_ray, tmp_path):
    from dynatrack.parallel.sweep import SweepResourceError, run_sweep

    cfg = config(tmp_path, workers=4, batch_sizes=[16])
    start = time.perf_counter()
    with pytest.raises(SweepResourceError, match=r"a trial needs 4 CPUs .* the Ray cluster has 2"):
        run_sweep(cfg)
    assert time.perf_counter() - start < 10


@pytest.mark.slow
def test_a_rerun_skips_finished_trials_and_resumes_the_failed_one(first_sweep):
    from dynatrack.parallel.sweep import run_sweep

    cfg, result = first_sweep
    sweep = Path(result["sweep_dir"])
    good_before = (sweep / GOOD / "trial.json").stat().st_mtime_ns
    again = run_sweep(cfg, wandb_mode="disabled")
    assert again["skipped"] == [GOOD] and again["ran"] == [FAIL] and again["failed"] == []
    assert (sweep / GOOD / "trial.json").stat().st_mtime_ns == good_before
    moved = list((sweep / "failed").glob(f"{FAIL}-*"))
    assert len(moved) == 1 and not (moved[0] / "trial.json").exists()
    # the earlier attempt's rows were moved aside whole, the new run directory starts fresh
    assert sorted(set(open_run(moved[0]).steps().column("step").to_pylist())) == [0, 2]
    run = open_run(sweep / FAIL)
    assert len(run.manifest.get("attempts", [{}])) == 1
    info = json.loads((sweep / FAIL / "trial.json").read_text())
    assert info["final_step"] == 2 * (48 // 8)
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert {t["trial_id"]: t["status"] for t in manifest["trials"]} == {FAIL: "finished", GOOD: "finished"}


@pytest.mark.slow
def test_a_trial_run_after_another_in_the_same_worker_group_equals_it_on_fresh_workers(local_ray, tmp_path):
    """Worker processes are reused across trials: nothing of one trial may leak into the next. bs32 runs
    second in one worker group; the same trial on fresh workers (trials_per_worker_group: 1) must give
    bit-identical checkpoints and probe patterns at every recorded step."""
    from dynatrack.parallel.sweep import run_sweep

    shared = run_sweep(config(tmp_path / "shared", wandb={"mode": "disabled"}))
    fresh = run_sweep(config(tmp_path / "fresh", batch_sizes=[32], wandb={"mode": "disabled"},
                             ray={"trials_per_worker_group": 1}))
    assert shared["failed"] == [] == fresh["failed"] and shared["timings"]["lanes"] == 1
    a, b = Path(shared["sweep_dir"], GOOD), Path(fresh["sweep_dir"], GOOD)
    first = json.loads(Path(shared["sweep_dir"], "bs16-s0-epochs", "trial.json").read_text())["timeline"]
    reused = json.loads((a / "trial.json").read_text())["timeline"]
    assert (first["trials_before_in_group"], reused["trials_before_in_group"]) == (0, 1)
    assert reused["group_start"] == first["group_start"]  # the same worker processes
    assert json.loads((b / "trial.json").read_text())["timeline"]["trials_before_in_group"] == 0
    run_a, run_b = open_run(a), open_run(b)
    steps = run_a.checkpoint_steps()
    assert steps == run_b.checkpoint_steps() and set(steps) >= {0, 6}
    for step in steps:
        ck_a, ck_b = run_a.checkpoint(step=step), run_b.checkpoint(step=step)
        assert ck_a.keys() == ck_b.keys()
        for k in ck_a:
            assert torch.equal(ck_a[k], ck_b[k]), (step, k)
    assert not torch.equal(run_a.checkpoint(step=0)["net.head.weight"], run_a.checkpoint(step=6)["net.head.weight"])
    for step in (0, 2, 6):
        for layer in run_a.widths:
            ids_a, bits_a = run_a.pattern_bits(step, layer, split="train")
            ids_b, bits_b = run_b.pattern_bits(step, layer, split="train")
            np.testing.assert_array_equal(ids_a[np.argsort(ids_a)], ids_b[np.argsort(ids_b)])
            np.testing.assert_array_equal(bits_a[np.argsort(ids_a)], bits_b[np.argsort(ids_b)])


@pytest.mark.slow
def test_two_lanes_side_by_side_run_every_trial_exactly_once(local_ray, tmp_path):
    """One-worker trials on 2 CPUs: two lanes take trials from one queue at the same time. Every trial
    runs once (one attempt, one trial.json) and each run starts from its seed's init. (Which lane takes
    which trial is up to timing: a lane whose workers start late may find the queue empty.)"""
    from dynatrack.parallel.sweep import run_sweep

    result = run_sweep(config(tmp_path, workers=1, seeds=[0, 1], wandb={"mode": "disabled"}))
    assert result["failed"] == [] and result["timings"]["lanes"] == 2
    sweep = Path(result["sweep_dir"])
    ids = sorted(t["trial_id"] for t in result["trials"])
    assert ids == ["bs16-s0-epochs", "bs16-s1-epochs", "bs32-s0-epochs", "bs32-s1-epochs"]
    lanes = set()
    for tid in ids:
        info = json.loads((sweep / tid / "trial.json").read_text())
        lanes.add(info["timeline"]["lane"])
        run = open_run(sweep / tid)
        assert run.manifest["world_size"] == 1 and len(run.manifest.get("attempts", [{}])) == 1
        assert info["final_step"] == next(t["max_steps"] for t in result["trials"] if t["trial_id"] == tid)
        init = torch.load(sweep / "init" / f"seed={info['seed']}.pt", weights_only=True)
        for k, v in init.items():
            assert torch.equal(run.checkpoint(step=0)[f"net.{k}"], v)
    assert lanes and lanes <= {0, 1}
    assert not (sweep / "failed").exists()
