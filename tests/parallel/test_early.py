"""``partitions`` and ``early_stage`` on real recorded runs, through Ray, against independent references."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import loader, make_data, trainer
from dynatrack import PatternRecorder, open_run, schedules
from dynatrack.models import DigitsMLP
from dynatrack.parallel import AnalyzeConfig, analyze_run
from dynatrack.parallel.analyze import analyze_and_report
from dynatrack.store.fs import StoreError
from dynatrack.tracking import read_offline_run

EARLY = ("early_stage", "partitions")
DDP_SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_fit.py"


def record(root: Path, name: str, *, act: str = "relu", hidden: tuple[int, ...] = (16,), labels: bool = True,
           steps: int = 8, n: int = 96, lr: float = 0.5) -> str:
    """Full-batch GD (batch = the whole training set = the probe's train split), patterns every step."""
    pl.seed_everything(0, verbose=False)
    x, y = make_data(n=n, d_in=5, classes=3)
    # a class the Ray workers can import (weight analyses rebuild it from the manifest)
    model = DigitsMLP(hidden=hidden, lr=lr, optimizer="sgd", activation=act, in_features=5, num_classes=3)
    rec = PatternRecorder(str(root), run_name=name, probe={"train": (x, y) if labels else x},
                          schedule=schedules.every(1))
    trainer(steps, [rec]).fit(model, loader(x, y, batch_size=n, shuffle=False))
    return rec.run_dir


@pytest.fixture(scope="module")
def gd_run(tmp_path_factory) -> str:  # noqa: ANN001
    return record(tmp_path_factory.mktemp("early"), "gd")


@pytest.fixture(scope="module")
def results(gd_run, local_ray):  # noqa: ANN001, ANN201
    return analyze_run(gd_run, config=AnalyzeConfig(analyzers=EARLY, loss="cross_entropy"), progress=False)


def masks(run, step, layer, split="train"):  # noqa: ANN001, ANN201
    ids, bits = run.pattern_bits(step, layer, split=split)
    return ids, np.unpackbits(bits, axis=1, count=run.widths[layer]).astype(bool)


def test_early_stage_bounds_stay_below_the_modules_autograd_gradient(gd_run, results):
    run = open_run(gd_run)
    t = results["early_stage"].to_pandas()
    assert t.step.tolist() == run.checkpoint_steps() == list(range(9))
    _, y, x = run.probe_inputs("train")
    for r in t.itertuples():
        model = DigitsMLP(hidden=(16,), in_features=5, num_classes=3).double()
        model.load_state_dict(run.checkpoint(r.step))
        loss = torch.nn.functional.cross_entropy(model(torch.as_tensor(x, dtype=torch.float64)), torch.as_tensor(y))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        full = float(sum((g ** 2).sum() for g in grads))
        assert r.loss == pytest.approx(float(loss), rel=1e-10)
        assert r.grad_norm_sq == pytest.approx(full, rel=1e-9)
        assert r.lb_mu <= r.lb_partition <= r.grad_hidden_sq * (1 + 1e-12)
        assert r.lb_total <= r.grad_norm_sq * (1 + 1e-12)
        # exact: the last two layers' weights (everything but the output bias)
        assert r.lb_total == pytest.approx(full - float((grads[-1] ** 2).sum()), rel=1e-9)
        assert r.pattern_source == "recorded" and r.pattern_mismatch == 0
        assert r.scope == "two-layer network (exact case)" and r.beta > 0
    # full-batch GD on the probe: the update is -η∇L up to float32
    assert (t.gd_residual.dropna() < 1e-4).all() and t.gd_residual.notna().sum() == 8
    assert t.lr.iloc[:-1].eq(0.5).all() and t.lr.isna().iloc[-1]  # the final weights have no steps row (null)
    s = results["early_stage_summary"].to_pylist()[0]
    assert s["chain_last_step"] == 8 and "stand in for the training set" in s["stand_in"]
    # the chain: pred_gd[t+1] = pred_gd[t] - η(1 - βη/2)||∇L(t)||², from the observed L(0)
    c = 0.5 * (1 - t.beta * 0.5 / 2)
    np.testing.assert_allclose(t.pred_gd.iloc[1:], t.loss.iloc[0] - np.cumsum((c * t.grad_norm_sq).iloc[:-1]), rtol=1e-12)
    v = results["early_stage_violations"].to_pandas()
    for r in v.itertuples():  # each violation really exceeds its bound and names a cause
        assert r.observed_next > r.bound_next and r.cause


def test_partition_sizes_transitions_stability_and_churn(gd_run, results):
    run = open_run(gd_run)
    sizes = results["partitions"].to_pandas()
    for (step, layer, split), g in sizes.groupby(["step", "layer", "split"]):
        assert g.n_neurons.sum() == run.widths[layer] == g.width.iloc[0]
    # the recorder's own labels, summed over ranks
    merged = run.neurons(merged=True).to_pandas()
    for (step, layer), g in merged.groupby(["step", "layer"]):
        got = sizes[(sizes.step == step) & (sizes.layer == layer)].set_index("partition").n_neurons
        want = g.partition.value_counts()
        assert got.sort_index().to_dict() == want.sort_index().to_dict()
    trans = results["partition_transitions"].to_pandas()
    for (step, ref, layer), g in trans.groupby(["step", "reference", "layer"]):
        ref_step = g.ref_step.iloc[0]
        assert ref_step == (0 if ref == "init" else step - 1)
        before = sizes[(sizes.step == ref_step) & (sizes.layer == layer)].set_index("partition").n_neurons
        assert g.groupby("from_partition").n_neurons.sum().to_dict() == before.to_dict()
    stab = results["partition_stability"].to_pandas()
    churn = results["partition_churn"].to_pandas()
    layer = "net.body.1"
    ids0, m0 = masks(run, 0, layer)
    for step in range(1, 9):
        ids, m = masks(run, step, layer)
        _, mp = masks(run, step - 1, layer)
        assert (ids == ids0).all()
        row = stab[(stab.step == step) & (stab.layer == layer)].iloc[0]
        assert row.n_unchanged_init == sum((m0[:, k] == m[:, k]).all() for k in range(m.shape[1]))
        assert row.set_change_previous_sum == int((m != mp).sum())
        c = churn[(churn.step == step) & (churn.layer == layer)].sort_values("sample_id")
        np.testing.assert_array_equal(c.churn_init.to_numpy(), (m != m0).sum(1))
        np.testing.assert_array_equal(c.churn_prev.to_numpy(), (m != mp).sum(1))
    assert pq.read_table(f"{gd_run}/analysis/partitions.parquet").equals(results["partitions"])
    assert Path(gd_run, "analysis/plots/partitions.png").stat().st_size > 1000
    assert Path(gd_run, "analysis/plots/early_stage.png").stat().st_size > 1000


def test_one_task_and_many_tasks_agree_and_wandb_keys(gd_run, results, tmp_path, local_ray):
    one = analyze_run(gd_run, config=AnalyzeConfig(analyzers=EARLY), tasks_per_cpu=1, progress=False)
    many = analyze_run(gd_run, config=AnalyzeConfig(analyzers=EARLY), tasks_per_cpu=4, progress=False)
    for name in ("partitions", "partition_transitions", "partition_stability", "partition_churn", "early_stage"):
        assert one[name].equals(many[name]), name
    analyze_and_report(gd_run, config=AnalyzeConfig(analyzers=EARLY), wandb_mode="offline",
                       wandb_dir=str(tmp_path / "wb"))
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    logged = read_offline_run(runs[0])
    keys = {k for row in logged["history"] for k in row}
    assert {"early_stage/loss", "early_stage/lb_mu", "early_stage/beta", "early_stage/pred_gd",
            "early_stage/grad_sq_over_loss", "partitions/net.body.1/train/unchanged_init_fraction"} <= keys
    assert any(k.startswith("partitions/net.body.1/train/") and k.rsplit("/", 1)[1] in
               ("mixed+", "mixed-", "mixed", "class_selective", "always_on", "dead") for k in keys)
    last = [row for row in logged["history"] if "early_stage/loss" in row][-1]
    assert last["early_stage/loss"] == pytest.approx(results["early_stage"].column("loss").to_pylist()[-1])


def test_analyzers_that_do_not_apply_skip_with_their_reason(tmp_path, local_ray, caplog):
    caplog.set_level(logging.WARNING, logger="dynatrack.parallel.early")
    leaky = record(tmp_path, "leaky", act="leaky_relu", steps=2)
    res = analyze_run(leaky, config=AnalyzeConfig(analyzers=EARLY), progress=False)
    assert "early_stage" not in res and res["partitions"].num_rows  # the other analyzer ran
    assert "early_stage skipped" in caplog.text and "ReLU last hidden layer" in caplog.text
    reasons = dict(zip(*(res["skipped"].column(c).to_pylist() for c in ("analyzer", "reason"))))
    assert "ReLU last hidden layer" in reasons["early_stage"]  # also in analysis/skipped.parquet
    with pytest.raises(StoreError, match="early_stage does not apply: .*ReLU last hidden layer"):
        analyze_run(leaky, config=AnalyzeConfig(analyzers=("early_stage",)), progress=False)  # nothing else to run

    caplog.clear()
    deep = record(tmp_path, "deep", hidden=(8, 6), steps=2)
    res = analyze_run(deep, config=AnalyzeConfig(analyzers=EARLY, early_min_samples=500), progress=False)
    assert "early_stage" not in res and "needs >= 500" in caplog.text and "holds 96 samples" in caplog.text
    caplog.clear()
    res = analyze_run(deep, config=AnalyzeConfig(analyzers=EARLY, steps=(0, 1, 50)), progress=False)
    assert "earlier layer(s) frozen as features" in res["early_stage"].column("scope")[0].as_py()
    assert res["early_stage"].column("step").to_pylist() == [0, 1]
    assert "steps [50] skipped: no checkpoint" in caplog.text

    caplog.clear()
    unlabeled = record(tmp_path, "unlabeled", labels=False, steps=2)
    res = analyze_run(unlabeled, config=AnalyzeConfig(analyzers=EARLY), progress=False)
    assert "early_stage" not in res and "has no labels" in caplog.text
    assert "class-based classes" in caplog.text
    assert set(res["partitions"].column("partition").to_pylist()) <= {"dead", "always_on", "partial"}


def run_ddp_script(root: Path, name: str, devices: int) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(DDP_SCRIPT), str(root), name, str(devices), "6"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.soak
def test_two_rank_ddp_recording_merges_to_the_one_process_result(tmp_path, local_ray):
    """A real 2-process DDP recording: merged over ranks, the analyzers give what one process gives."""
    run_ddp_script(tmp_path, "ddp2", 2)
    run_ddp_script(tmp_path, "single", 1)
    cfg = AnalyzeConfig(analyzers=EARLY, loss="cross_entropy", steps=(0, 5))
    ddp, single = (analyze_run(str(tmp_path / n), config=cfg, progress=False) for n in ("ddp2", "single"))
    # step 0: same seed, same weights, same probe -> identical results from 2 ranks' shards and from 1
    for name in ("partitions", "partition_stability", "partition_churn", "partition_transitions"):
        a, b = (r[name].filter(np.asarray(r[name].column("step").to_numpy()) == 0) for r in (ddp, single))
        assert a.num_rows and a.equals(b), name
    a0, b0 = (r["early_stage"].to_pylist()[0] for r in (ddp, single))
    for col in ("loss", "grad_norm_sq", "lb_total", "lb_partition", "mu", "beta"):
        assert a0[col] == pytest.approx(b0[col], rel=1e-12), col
    # step 5 (weights differ between the runs): the 2-rank merge equals one process recomputing the
    # patterns of the whole probe from the DDP run's checkpoints
    run = open_run(tmp_path / "ddp2")
    from dynatrack.models import DigitsMLP

    model = DigitsMLP(hidden=[20, 12])
    ids, _, x = run.probe_inputs("train")
    x = x[np.argsort(ids)]  # in sample-id order, as the churn rows are
    pats = {}
    for step in (0, 5):
        model.load_state_dict(run.checkpoint(step))
        acts = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: acts.__setitem__(n, (i[0] > 0).numpy()))
                 for n, m in model.named_modules() if isinstance(m, torch.nn.ReLU)]
        with torch.no_grad():
            model(torch.as_tensor(x))
        for h in hooks:
            h.remove()
        pats[step] = acts
    stab = ddp["partition_stability"].to_pandas()
    churn = ddp["partition_churn"].to_pandas()
    for layer in run.widths:
        m0, m5 = pats[0][layer], pats[5][layer]
        row = stab[(stab.step == 5) & (stab.layer == layer) & (stab.split == "train")].iloc[0]
        assert row.n_samples == len(x)
        assert row.n_unchanged_init == int(((m0 == m5).all(axis=0)).sum())
        assert row.set_change_init_sum == int((m0 != m5).sum())
        c = churn[(churn.step == 5) & (churn.layer == layer) & (churn.split == "train")].sort_values("sample_id")
        np.testing.assert_array_equal(c.churn_init.to_numpy(), (m0 != m5).sum(1))
