"""`dynatrack compare` on a real sweep directory (plain Lightning fits + PatternRecorder), on a local Ray.

Every figure is checked against an independent reference: a hand-written numpy forward of the
checkpoint files, DuckDB over the Parquet files, scipy on the values DuckDB reads back.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats

from dynatrack.sweep.compare import METRICS, compare_sweep
from dynatrack.sweep.data import make_task
from dynatrack.sweep.plain import run_plain_sweep

duckdb = pytest.importorskip("duckdb")
pytestmark = pytest.mark.slow  # one plain sweep + two comparisons on a local Ray (~40 s of CPU)

CONFIG = {
    "name": "cmp-test",
    "task": {"name": "synthetic", "seed": 0, "n_train": 256, "n_test": 256},
    "model": {"hidden": [12, 10], "activation": "relu"},
    "batch_sizes": [8, 64],
    "seeds": [0, 1],
    "budget": ["epochs"],
    "epochs": 2,
    "optimizer": {"name": "sgd", "lr": 0.1},
    "recorder": {"schedule": {"log_spaced": {"dense": 4}}},
    "compare": {"hessian_iters": 10, "noise_scale_batches": 8, "interpolation_points": 25, "weight_steps": 3,
                "lc_samples": 16},
}
FAILED = {"trial_id": "bs64-s2-epochs", "batch_size": 64, "per_worker_batch": 64, "world_size": 1, "lr": 0.1,
          "seed": 2, "budget": "epochs", "max_steps": 8, "status": "failed", "error": "RuntimeError: boom",
          "wall_time_s": 0.1}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, local_ray):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("sweeps")
    path = run_plain_sweep(CONFIG, root)
    manifest = json.loads((path / "sweep.json").read_text())
    manifest["trials"].append(FAILED)  # a trial that failed: in the manifest, no trial.json
    (path / "sweep.json").write_text(json.dumps(manifest))
    table = compare_sweep(path, wandb_mode="offline", progress=False)
    return {"path": path, "table": table, "manifest": manifest}


def scalar(query: str) -> object:
    return duckdb.connect().execute(query).fetchone()[0]


def rows(sweep) -> list[dict]:  # noqa: ANN001
    return sweep["table"].to_pylist()


def hand_forward(state: dict, x: np.ndarray) -> np.ndarray:
    """Linear -> ReLU -> Linear -> ReLU -> head, by hand from the checkpoint's tensors."""
    w = {k.split("net.", 1)[-1]: v.double().numpy() for k, v in state.items()}
    h = np.maximum(x @ w["body.0.weight"].T + w["body.0.bias"], 0)
    h = np.maximum(h @ w["body.2.weight"].T + w["body.2.bias"], 0)
    return h @ w["head.weight"].T + w["head.bias"]


def ce_acc(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    m = logits.max(1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    return float((lse - logits[np.arange(len(y)), y]).mean()), float((logits.argmax(1) == y).mean())


def test_gap_and_weight_distance_from_the_checkpoint_files(sweep):
    train, test, _ = make_task("synthetic", 0, n_train=256, n_test=256)
    finished = [r for r in rows(sweep) if r["status"] == "finished"]
    assert len(finished) == 4
    for r in finished:
        trial = sweep["path"] / r["trial_id"]
        # the number of updates: the last recorded step (record_final), read by DuckDB
        last = scalar(f"SELECT max(step) FROM read_parquet('{trial}/patterns/*/*.parquet')")
        assert r["updates"] == r["final_step"] == last == r["max_steps"]
        final = torch.load(trial / "checkpoints" / f"step={last}.pt", weights_only=True)
        init = torch.load(trial / "checkpoints" / "step=0.pt", weights_only=True)
        tr = ce_acc(hand_forward(final, train.tensors[0].double().numpy()), train.tensors[1].numpy())
        te = ce_acc(hand_forward(final, test.tensors[0].double().numpy()), test.tensors[1].numpy())
        assert r["train_loss"] == pytest.approx(tr[0], abs=1e-5)
        assert r["test_loss"] == pytest.approx(te[0], abs=1e-5)
        assert (r["train_acc"], r["test_acc"]) == (tr[1], te[1])
        assert r["gap_loss"] == pytest.approx(te[0] - tr[0], abs=2e-5)
        assert r["gap_acc"] == pytest.approx(tr[1] - te[1])
        dist = math.sqrt(sum(float(((final[k].double() - init[k].double()) ** 2).sum()) for k in final))
        assert r["weight_distance"] == pytest.approx(dist, rel=1e-6)
        assert r["same_init"] is True  # step 0 of every trial is init/seed=<s>.pt
        assert (r["noise_b_small"], r["noise_b_big"]) == (r["batch_size"], 4 * r["batch_size"])
        for m in ("grad_sq", "trace_sigma", "hessian_top", "sharpness"):
            assert r[m] is not None and math.isfinite(r[m])
        assert r["sharpness"] >= 0 and r["trace_sigma"] > 0


def test_final_distinct_patterns_equal_duckdb_over_the_concatenated_layers(sweep):
    for r in rows(sweep):
        if r["status"] != "finished":
            continue
        trial = sweep["path"] / r["trial_id"]
        for split, col in (("train", "distinct_final"), ("test", "distinct_test_final")):
            n = scalar(
                f"SELECT COUNT(DISTINCT key) FROM (SELECT sample_id, string_agg(hex(bits), '|' ORDER BY layer) AS key "
                f"FROM read_parquet('{trial}/patterns/*/*.parquet') WHERE step = {r['final_step']} AND "
                f"split = '{split}' AND source = 'probe' GROUP BY sample_id)")
            assert r[col] == n
        # partition sizes at the final step: every recorded neuron has one label
        widths = sum(layer["width"] for layer in json.loads((trial / "manifest.json").read_text())["layers"])
        parts = [r[c] for c in ("dead_final", "always_on_final", "class_selective_final", "mixed_final")]
        assert sum(parts) == widths


def test_aggregation_and_p_values_equal_duckdb_and_scipy(sweep):
    path = sweep["path"]
    agg = {(a["budget"], a["batch_size"], a["metric"]): a
           for a in pq.read_table(path / "compare_by_batch.parquet").to_pylist()}
    tests = {(t["budget"], t["metric"]): t for t in pq.read_table(path / "compare_tests.parquet").to_pylist()}
    con = duckdb.connect()
    for m in METRICS:
        got = con.execute(
            f"SELECT budget, batch_size, avg({m}), stddev_samp({m}), count({m}) FROM read_parquet('{path}/compare.parquet') "
            "WHERE status = 'finished' GROUP BY ALL").fetchall()
        for budget, bs, mean, std, n in got:
            a = agg[(budget, bs, m)]
            assert a["n"] == n == 2
            assert a["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-15)
            assert a["std"] == pytest.approx(std, rel=1e-9, abs=1e-12)
        small = [v for (v,) in con.execute(f"SELECT {m} FROM read_parquet('{path}/compare.parquet') "
                                           "WHERE status = 'finished' AND batch_size = 8").fetchall()]
        large = [v for (v,) in con.execute(f"SELECT {m} FROM read_parquet('{path}/compare.parquet') "
                                           "WHERE status = 'finished' AND batch_size = 64").fetchall()]
        t = tests[("epochs", m)]
        assert (t["small_batch"], t["large_batch"], t["n_small"], t["n_large"]) == (8, 64, 2, 2)
        if np.var(small, ddof=1) + np.var(large, ddof=1) == 0:
            assert t["p"] is None or math.isnan(t["p"])
        else:
            ref = stats.ttest_ind(large, small, equal_var=False)
            assert t["p"] == pytest.approx(ref.pvalue, rel=1e-9)
            assert t["diff"] == pytest.approx(np.mean(large) - np.mean(small))


def test_failed_trial_is_reported_and_left_out(sweep):
    failed = [r for r in rows(sweep) if r["trial_id"] == FAILED["trial_id"]]
    assert len(failed) == 1
    assert failed[0]["status"] == "failed" and failed[0]["error"] == "RuntimeError: boom"
    assert all(failed[0][m] is None for m in METRICS)


def test_interpolation_endpoints_are_the_two_solutions(sweep):
    t = pq.read_table(sweep["path"] / "compare_interpolation.parquet").to_pylist()
    by_id = {r["trial_id"]: r for r in rows(sweep)}
    assert {r["seed"] for r in t} == {0} and len(t) == 2 * 25
    for split in ("train", "test"):
        pts = {round(r["alpha"], 9): r for r in t if r["split"] == split}
        assert min(pts) == -1.0 and max(pts) == 2.0
        for alpha, trial in ((0.0, pts[0.0]["small_trial"]), (1.0, pts[1.0]["large_trial"])):
            assert pts[alpha]["loss"] == pytest.approx(by_id[trial][f"{split}_loss"], rel=1e-5)
            assert pts[alpha]["accuracy"] == pytest.approx(by_id[trial][f"{split}_acc"])
    assert by_id[t[0]["small_trial"]]["batch_size"] == 8 and by_id[t[0]["large_trial"]]["batch_size"] == 64


def test_plots_are_pngs(sweep):
    import matplotlib.image

    for name in ("metrics_vs_batch", "patterns_vs_step", "interpolation"):
        p = sweep["path"] / "plots" / f"{name}.png"
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0.01  # not a blank canvas


def test_wandb_offline_runs_hold_config_group_history_and_p_values(sweep):
    from dynatrack import open_run
    from dynatrack.tracking import read_offline_run, wandb_run_id

    dirs = glob.glob(str(sweep["path"] / "wandb" / "wandb" / "offline-run-*"))

    def run_dir(name: str) -> str:
        (d,) = [d for d in dirs if d.endswith("-" + wandb_run_id(name))]
        return d

    trial = next(t for t in sweep["manifest"]["trials"] if t["trial_id"] == "bs8-s1-epochs")
    got = read_offline_run(run_dir(f"cmp-test-{trial['trial_id']}"))
    assert got["run"]["run_group"] == "cmp-test" and got["run"]["job_type"] == "trial"
    config = {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in got["config"].items()}
    for k in ("batch_size", "per_worker_batch", "lr", "world_size", "seed", "budget"):
        assert config[k] == trial[k], k
    steps = open_run(sweep["path"] / trial["trial_id"]).steps().to_pylist()
    history = {h["trainer/step"]: h for h in got["history"] if "train/loss" in h}
    assert sorted(history) == sorted(r["step"] for r in steps)
    for r in steps:
        assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"])
        assert history[r["step"]]["train/lr"] == pytest.approx(r["lr"])
    row = next(r for r in rows(sweep) if r["trial_id"] == trial["trial_id"])
    assert got["summary"]["compare/test_acc"] == pytest.approx(row["test_acc"])
    # no W&B run for the failed trial
    assert not [d for d in dirs if d.endswith("-" + wandb_run_id(f"cmp-test-{FAILED['trial_id']}"))]

    comp = read_offline_run(run_dir("cmp-test-compare"))
    assert comp["run"]["run_group"] == "cmp-test" and comp["run"]["job_type"] == "compare"
    tests = pq.read_table(sweep["path"] / "compare_tests.parquet").to_pylist()
    p_values = {f"p/{t['budget']}/{t['metric']}": t["p"] for t in tests if t["p"] is not None and math.isfinite(t["p"])}
    assert p_values and all(comp["summary"][k] == pytest.approx(v) for k, v in p_values.items())
    logged = comp["history"][-1]
    for name in ("metrics_vs_batch", "patterns_vs_step", "interpolation"):
        assert logged[f"plots/{name}._type"] == "image-file"
    n_rows = {"compare": 5, "by_batch": 2 * len(METRICS), "tests": len(METRICS), "interpolation": 50}
    for name, n in n_rows.items():
        assert logged[f"tables/{name}._type"] == "table-file" and logged[f"tables/{name}.nrows"] == n


def test_rerun_through_the_cli_moves_the_earlier_result(sweep):
    from dynatrack.cli import main
    from dynatrack.tracking import read_offline_run, wandb_run_id

    path = sweep["path"]
    before = pq.read_table(path / "compare.parquet")
    png = (path / "plots" / "interpolation.png").read_bytes()
    assert main(["compare", str(path), "--wandb", "offline"]) == 0
    (prev,) = glob.glob(str(path / "previous" / "compare-*.parquet"))
    assert pq.read_table(prev).equals(before)
    (old_plots,) = glob.glob(str(path / "previous" / "plots-*"))
    assert Path(old_plots, "interpolation.png").read_bytes() == png
    # every estimator is seeded: the same sweep gives the same table
    assert pq.read_table(path / "compare.parquet").equals(before)
    # the trial's W&B run existed: the re-comparison adds summary values to it, not a second history
    wb_id = wandb_run_id("cmp-test-bs64-s0-epochs")
    first, second = sorted(glob.glob(str(path / "wandb" / "wandb" / f"offline-run-*-{wb_id}")))
    again = read_offline_run(second)
    assert not [h for h in again["history"] if "train/loss" in h]
    assert again["summary"]["compare/test_acc"] == pytest.approx(
        next(r["test_acc"] for r in before.to_pylist() if r["trial_id"] == "bs64-s0-epochs"))


def test_a_wandb_failure_is_a_warning_and_the_parquet_files_are_written(sweep, caplog):
    path = sweep["path"]
    shutil.move(str(path / "wandb"), str(path / "wandb-kept"))
    (path / "wandb").write_text("not a directory")  # W&B cannot create its folder here
    try:
        with caplog.at_level(logging.WARNING, logger="dynatrack"):
            table = compare_sweep(path, wandb_mode="offline", progress=False)
    finally:
        (path / "wandb").unlink()
        shutil.move(str(path / "wandb-kept"), str(path / "wandb"))
    failures = [r for r in caplog.records if "W&B logging" in r.getMessage()]
    assert len(failures) == 5  # four trials and the comparison, each a warning
    assert pq.read_table(path / "compare.parquet").equals(table)
    assert len(glob.glob(str(path / "previous" / "compare-*.parquet"))) == 2
