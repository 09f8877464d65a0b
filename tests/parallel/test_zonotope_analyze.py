"""The zonotope and expressiveness analyzers on real recorded runs, through Ray, against direct recomputation."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import TinyNet, loader, make_data, trainer
from dynatrack import PatternRecorder, open_run, schedules
from dynatrack.parallel import AnalyzeConfig, analyze_run
from dynatrack.parallel import zonotope_tasks as zk
from dynatrack.parallel.analyze import skipped_analyzers, wandb_views

CFG = AnalyzeConfig(analyzers=("zonotope", "expressiveness"), zonotope_qp_samples=24)


@pytest.fixture(scope="module")
def shallow_run(tmp_path_factory) -> str:  # noqa: ANN001
    x, y = make_data(n=48, d_in=3, classes=3, seed=7)
    rec = PatternRecorder(str(tmp_path_factory.mktemp("runs")), run_name="shallow", probe=(x, y),
                          schedule=schedules.every(5))
    torch.manual_seed(1)
    trainer(16, [rec]).fit(TinyNet(d_in=3, hidden=(6,), d_out=3, lr=0.3), loader(x, y))
    return rec.run_dir


def _direct(run_dir: str) -> dict:
    """The task functions called in this process (what each Ray task runs), all steps in one range."""
    run = open_run(run_dir)
    plan = zk.plan(run, CFG)
    assert not plan.skipped
    res = {**zk.zonotope_task(run_dir, plan.zonotope_steps, CFG.to_dict()),
           **zk.expressiveness_task(run_dir, plan.expressiveness_steps, CFG.to_dict())}
    return zk.finish(run, res)


def test_zonotope_and_expressiveness_tasks_against_recomputation(shallow_run) -> None:  # noqa: ANN001
    res = _direct(shallow_run)
    run = open_run(shallow_run)
    layer = next(iter(run.widths))
    steps = run.recorded_steps("patterns")
    z = res["zonotope"].to_pylist()
    assert len(z) == 6 * len(steps) and all(r["is_vertex"] for r in z)
    pats = {s: np.unpackbits(run.pattern_bits(s, layer)[1], axis=1, count=6).astype(bool) for s in steps}
    for r in z:  # naive: Hamming to the previous recorded step, distinct patterns so far
        t = steps.index(r["step"])
        j = r["neuron"]
        want = None if t == 0 else int((pats[steps[t - 1]][:, j] != pats[r["step"]][:, j]).sum())
        assert r["vertex_move"] == want
        assert r["n_visited"] == len({pats[s][:, j].tobytes() for s in steps[: t + 1]})
        assert r["n_active"] == int(pats[r["step"]][:, j].sum())
    # the fixed-pattern optimum beside the network's own square loss, computed here by torch
    ids, labels, x = run.probe_inputs("train")
    order = np.argsort(ids)
    model = TinyNet(d_in=3, hidden=(6,), d_out=3).double()
    fixed = res["zonotope_fixed"].to_pylist()
    assert [r["step"] for r in fixed] == run.checkpoint_steps()
    for r in fixed:
        model.load_state_dict(run.checkpoint(r["step"]))
        with torch.no_grad():
            out = model(torch.as_tensor(x[order][:24], dtype=torch.float64)).numpy()
        sse = float(((out - np.eye(3)[labels[order][:24]]) ** 2).sum())
        assert r["sse"] == pytest.approx(sse, rel=1e-5)
        assert r["relaxed_sse"] - 1e-9 <= r["fixed_sse"] <= r["sse"] + 1e-9
        assert r["mode"] == "fixed_output" and r["n_samples"] == 24
    # expressiveness: the layer value against a naive pair loop at the last step
    e = res["expressiveness"].to_pandas()
    last = e[e.step == steps[-1]]
    a = pats[steps[-1]]
    n = len(a)
    jac = [1.0 if not (a[p] | a[q]).any() else (a[p] & a[q]).sum() / (a[p] | a[q]).sum()
           for p in range(n) for q in range(n) if p != q]
    assert last.expressiveness.iloc[0] == pytest.approx(1 - np.mean(jac))
    assert sorted(last.prune_rank) == list(range(6))
    assert last.sort_values("prune_rank").score.is_monotonic_increasing
    views, dims, _ = wandb_views(res)
    assert {"vertex_move_mean", "visited_mean", "lp_failures", "loss", "fixed_pattern_loss", "gap"} <= set(
        views["zonotope"].column_names)
    assert {"E", "neuron_min", "neuron_max"} <= set(views["expressiveness"].column_names)
    assert dims["zonotope"] == dims["expressiveness"] == ["layer", "split"]
    assert all(v == 0 for v in views["zonotope"].column("lp_failures").to_pylist())


def test_plan_skips_deeper_networks_and_small_probes_with_reasons(digits_run, shallow_run) -> None:  # noqa: ANN001
    deep = zk.plan(open_run(digits_run), CFG)
    assert "one hidden layer" in deep.skipped["zonotope"] and "2 activation layers" in deep.skipped["zonotope"]
    assert deep.expressiveness_steps == open_run(digits_run).recorded_steps("patterns")
    small = zk.plan(open_run(shallow_run), AnalyzeConfig(analyzers=("zonotope",), zonotope_samples=4))
    assert "at least d + 2 = 5 probe samples" in small.skipped["zonotope"] and not small.zonotope_steps
    with pytest.raises(ValueError, match="zonotope_samples must be >= 0"):
        AnalyzeConfig(analyzers=("zonotope",), zonotope_samples=-1)


@pytest.mark.slow
def test_through_ray_equals_the_tasks_and_skips_without_failing_others(shallow_run, digits_run, local_ray) -> None:  # noqa: ANN001
    direct = _direct(shallow_run)
    res = analyze_run(shallow_run, config=CFG, progress=False, tasks_per_cpu=2)
    for name in ("zonotope", "zonotope_fixed", "expressiveness"):
        assert res[name].equals(direct[name].sort_by([(c, "ascending") for c in ("step", "layer", "split", "neuron")
                                                      if c in direct[name].column_names])), name
        assert pq.read_table(f"{shallow_run}/analysis/{name}.parquet").equals(res[name])
    # a deeper network: zonotope skipped with its reason, expressiveness still runs
    deep = analyze_run(digits_run, config=CFG, progress=False)
    assert "one hidden layer" in skipped_analyzers(deep)["zonotope"] and deep["expressiveness"].num_rows > 0
