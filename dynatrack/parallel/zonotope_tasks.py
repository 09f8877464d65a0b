"""Ray side of the ``zonotope`` (Matena & Raffel) and ``expressiveness`` (derived) analyzers.

:func:`plan` decides before Ray starts whether each analyzer applies (the zonotope view
needs a network with one hidden ReLU layer and enough probe samples; expressiveness needs
two probe samples) and skips, with the reason, what does not. :func:`zonotope_task` and
:func:`expressiveness_task` are plain functions that become one Ray task per step range;
:func:`finish` reports failed vertex checks loudly and writes the plots.

The weights come from :func:`load_chain`, the one place that loads a model here.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dynatrack.analysis import expressiveness as ex
from dynatrack.analysis import zonotope as zt
from dynatrack.store.reader import Run, RunError, open_run

log = logging.getLogger(__name__)

ANALYZERS = ("zonotope", "expressiveness")

ZONOTOPE = pa.schema([
    ("step", pa.int64()), ("layer", pa.string()), ("split", pa.string()), ("neuron", pa.int32()),
    ("n_samples", pa.int64()), ("n_active", pa.int64()), ("vertex_move", pa.int64()), ("n_visited", pa.int64()),
    ("is_vertex", pa.bool_()),
])
ZONOTOPE_FIXED = pa.schema([
    ("step", pa.int64()), ("layer", pa.string()), ("split", pa.string()), ("mode", pa.string()),
    ("n_samples", pa.int64()), ("n_outputs", pa.int64()), ("sse", pa.float64()), ("fixed_sse", pa.float64()),
    ("relaxed_sse", pa.float64()), ("max_violation", pa.float64()),
])
EXPRESSIVENESS = pa.schema([
    ("step", pa.int64()), ("layer", pa.string()), ("split", pa.string()), ("neuron", pa.int32()),
    ("score", pa.float64()), ("prune_rank", pa.int32()), ("loo_jaccard_sum", pa.float64()),
    ("jaccard_sum", pa.float64()), ("n_pairs", pa.int64()), ("expressiveness", pa.float64()),
])


def load_chain(run: Run, step: int, trust_model_code: bool = False) -> list[Any]:
    """The network at checkpoint ``step`` as affine maps + activations: the one model-loading call here."""
    from dynatrack.parallel.tasks import region_chain

    return region_chain(run, step, trust_model_code=trust_model_code)


@dataclass
class Plan:
    zonotope_steps: list[int] = field(default_factory=list)
    expressiveness_steps: list[int] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _sample_subset(n: int, k: int, seed: int) -> np.ndarray:
    """Positions (in sample-id order) of the probe subset: all when k >= n, else a seeded random k."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def zonotope_applies(run: Run, cfg: Any) -> str | None:
    """Why the zonotope view does not apply to this run (None when it does)."""
    hidden = [name for name in run.widths]
    if len(hidden) != 1:
        return (f"the zonotope view is for networks with one hidden layer; this run records {len(hidden)} "
                f"activation layers ({', '.join(hidden)}): deeper layers' patterns are not vertices of a zonotope "
                "of the inputs, and with patterns fixed a deeper network is not linear in its weights")
    ids, _, x = run.probe_inputs(cfg.split)
    d = int(np.prod(x.shape[1:])) if x.ndim > 1 else 1
    n = min(len(ids), cfg.zonotope_samples)
    if n < d + 2:
        return (f"the zonotope view needs at least d + 2 = {d + 2} probe samples of split {cfg.split!r} "
                f"(more than the {d + 1} homogenized input coordinates; with fewer every pattern is a vertex), "
                f"got {n} (zonotope_samples={cfg.zonotope_samples}, {len(ids)} stored)")
    ckpts = run.checkpoint_steps()
    if ckpts:
        layers = load_chain(run, ckpts[0], cfg.trust_model_code)
        if len(layers) != 2 or layers[0].negative_slope != 0.0:
            return ("the zonotope view needs a Linear -> ReLU -> Linear network; the stored chain has "
                    f"{len(layers)} affine map(s)" + ("" if len(layers) != 2 else " and a non-ReLU activation"))
    return None


def plan(run: Run, cfg: Any) -> Plan:
    """Steps per analyzer, or the reason it is skipped (logged as a warning)."""
    out = Plan()
    wanted = None if cfg.steps is None else sorted({int(s) for s in cfg.steps})
    for name in ANALYZERS:
        if name not in cfg.analyzers:
            continue
        try:
            reason = zonotope_applies(run, cfg) if name == "zonotope" else None
            if name == "expressiveness" and len(run.probe_inputs(cfg.split)[0]) < 2:
                reason = f"expressiveness compares pairs of samples: needs >= 2 probe samples of split {cfg.split!r}"
        except Exception as exc:  # a model that cannot be loaded here: this analyzer skips, others run
            reason = f"{type(exc).__name__}: {exc}"
        if reason is None:
            steps = run.recorded_steps("patterns", source="probe", split=cfg.split)
            if wanted is not None:
                missing = sorted(set(wanted) - set(steps))
                if missing:
                    raise RunError(f"steps {missing} have no probe patterns of split {cfg.split!r}; recorded: {steps}")
                steps = wanted
            if not steps:
                reason = f"no probe patterns of split {cfg.split!r} recorded"
        if reason is not None:
            log.warning("analyzer %s skipped for %s: %s", name, run.run_id, reason)
            out.skipped[name] = reason
        elif name == "zonotope":
            out.zonotope_steps = steps
        else:
            out.expressiveness_steps = steps
    return out


def _patterns(run: Run, step: int, layer: str, split: str, pos: np.ndarray) -> np.ndarray:
    """bool [samples, width] of the probe subset at ``step`` (rows in sample-id order)."""
    _, bits = run.pattern_bits(step, layer, split=split)
    return np.unpackbits(bits, axis=1, count=run.widths[layer]).astype(bool)[pos]


def zonotope_task(run_dir: str, steps: Sequence[int], config: dict[str, Any]) -> dict[str, pa.Table]:
    """Vertex moves, visited vertices and the LP check for ``steps``; the fixed-pattern problem where weights exist."""
    from dynatrack.parallel.tasks import AnalyzeConfig

    cfg = AnalyzeConfig.from_dict(config)
    run = open_run(run_dir)
    layer = next(iter(run.widths))
    ids, labels, x = run.probe_inputs(cfg.split)
    order = np.argsort(ids, kind="stable")
    x = x[order].reshape(len(ids), -1).astype(np.float64)
    pos = _sample_subset(len(ids), cfg.zonotope_samples, cfg.seed)
    xs = x[pos]
    recorded = run.recorded_steps("patterns", source="probe", split=cfg.split)
    history = [s for s in recorded if s <= max(steps)]
    pats = {s: _patterns(run, s, layer, cfg.split, pos).T for s in history}  # [neurons, samples]
    stack = np.stack([pats[s] for s in history])
    visited = zt.distinct_vertices(stack)
    rows: dict[str, list[Any]] = {k: [] for k in ZONOTOPE.names}
    failures = 0
    for step in steps:
        t = history.index(step)
        cur = pats[step]
        ok = zt.is_vertex(xs, cur)
        failures += int((~ok).sum())
        moves = zt.vertex_moves(pats[history[t - 1]], cur) if t else [None] * len(cur)
        for j in range(len(cur)):
            for k, v in (("step", step), ("layer", layer), ("split", cfg.split), ("neuron", j),
                         ("n_samples", len(pos)), ("n_active", int(cur[j].sum())),
                         ("vertex_move", None if moves[j] is None else int(moves[j])),
                         ("n_visited", int(visited[t, j])), ("is_vertex", bool(ok[j]))):
                rows[k].append(v)
    if failures:
        log.error("zonotope: %d recorded pattern(s) of %s are not vertices of the probe's zonotope: the "
                  "recorded bits were produced by no weights (a recording bug); see is_vertex in zonotope.parquet",
                  failures, run.run_id)
    fixed: dict[str, list[Any]] = {k: [] for k in ZONOTOPE_FIXED.names}
    ckpts = set(run.checkpoint_steps())
    qpos = pos[: cfg.zonotope_qp_samples]
    for step in [s for s in steps if s in ckpts]:
        hid, out = load_chain(run, step, cfg.trust_model_code)
        w = np.hstack([hid.weight, hid.bias[:, None]])
        a, c = np.asarray(out.weight, dtype=np.float64), np.asarray(out.bias, dtype=np.float64)
        xq = x[qpos]
        s = (zt.homogenize(xq) @ w.T > 0).T
        k_out = a.shape[0]
        if labels is None:
            raise RunError(f"the fixed-pattern problem needs probe labels as targets; split {cfg.split!r} has none")
        lab = labels[order][qpos]
        targets = lab[:, None].astype(np.float64) if k_out == 1 else np.eye(k_out)[lab]
        outw = np.sign(a) if k_out == 1 else a
        res = zt.fixed_pattern_optimum(xq, targets, s, outw)
        for k, v in (("step", step), ("layer", layer), ("split", cfg.split),
                     ("mode", "joint" if k_out == 1 else "fixed_output"), ("n_samples", len(qpos)),
                     ("n_outputs", k_out), ("sse", zt.network_square_loss(xq, targets, w, a, c) * len(qpos)),
                     ("fixed_sse", res.loss * len(qpos)),
                     ("relaxed_sse", zt.relaxed_optimum(xq, targets, s, outw) * len(qpos)),
                     ("max_violation", res.max_violation)):
            fixed[k].append(v)
    return {"zonotope": pa.table(rows, schema=ZONOTOPE), "zonotope_fixed": pa.table(fixed, schema=ZONOTOPE_FIXED)}


def expressiveness_task(run_dir: str, steps: Sequence[int], config: dict[str, Any]) -> dict[str, pa.Table]:
    """Layer expressiveness and every neuron's leave-one-out score and prune rank for ``steps``."""
    from dynatrack.parallel.tasks import AnalyzeConfig

    cfg = AnalyzeConfig.from_dict(config)
    run = open_run(run_dir)
    n = len(run.probe_inputs(cfg.split)[0])
    pos = _sample_subset(n, cfg.expressiveness_samples, cfg.seed)
    rows: dict[str, list[Any]] = {k: [] for k in EXPRESSIVENESS.names}
    for step in steps:
        for layer, width in run.widths.items():
            r = ex.expressiveness(_patterns(run, step, layer, cfg.split, pos))
            rank = np.empty(width, dtype=np.int64)
            rank[ex.prune_ranking(r.neuron, width)] = np.arange(width)
            for k, v in (("step", [step] * width), ("layer", [layer] * width), ("split", [cfg.split] * width),
                         ("neuron", list(range(width))), ("score", r.neuron.tolist()), ("prune_rank", rank.tolist()),
                         ("loo_jaccard_sum", r.loo_jaccard_sum.tolist()), ("jaccard_sum", [r.jaccard_sum] * width),
                         ("n_pairs", [r.n_pairs] * width), ("expressiveness", [r.layer] * width)):
                rows[k].extend(v)
    return {"expressiveness": pa.table(rows, schema=EXPRESSIVENESS)}


def submit(run: Run, cfg: Any, p: Plan, n_tasks: int) -> list[Any]:
    """Ray tasks for the planned step ranges (inside a Ray session)."""
    import ray

    from dynatrack.parallel.analyze import plan_step_ranges

    refs = []
    for steps, fn in ((p.zonotope_steps, zonotope_task), (p.expressiveness_steps, expressiveness_task)):
        remote = ray.remote(num_cpus=1)(fn)
        refs += [remote.remote(run.path, chunk, cfg.to_dict()) for chunk in plan_step_ranges(steps, n_tasks)]
    return refs


def finish(run: Run, results: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Report failed vertex checks loudly and write ``analysis/plots/{zonotope,expressiveness}.png``."""
    from dynatrack.parallel.early import write_plot

    if "zonotope" in results:
        bad = results["zonotope"].filter(pc.invert(results["zonotope"].column("is_vertex")))
        if bad.num_rows:
            log.error("zonotope: %d recorded pattern(s) of run %s fail the vertex LP check (steps %s): a recording bug",
                      bad.num_rows, run.run_id, sorted(set(bad.column("step").to_pylist())))
    try:
        for name in ANALYZERS:
            if name in results and results[name].num_rows:
                write_plot(run, name, plot(name, results))
    except Exception as exc:  # a plot never loses the results
        log.warning("plots not written: %s", exc)
    return results


def plot(name: str, results: dict[str, pa.Table]) -> bytes:
    """PNG: zonotope — mean vertex move and loss gap over steps; expressiveness — E per layer over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    if name == "zonotope":
        t = results["zonotope"].group_by("step").aggregate([("vertex_move", "mean"), ("n_visited", "mean")]).sort_by("step")
        axes[0].plot(t.column("step"), t.column("vertex_move_mean"), marker="o", label="vertex move (Hamming)")
        axes[0].plot(t.column("step"), t.column("n_visited_mean"), marker="s", label="vertices visited")
        axes[0].set_title("per neuron, mean")
        f = results.get("zonotope_fixed")
        if f is not None and f.num_rows:
            f = f.sort_by("step")
            n = np.asarray(f.column("n_samples").to_numpy(), dtype=float)
            axes[1].plot(f.column("step"), f.column("sse").to_numpy() / n, marker="o", label="network")
            axes[1].plot(f.column("step"), f.column("fixed_sse").to_numpy() / n, marker="s", label="fixed-pattern optimum")
            axes[1].set_title("square loss on the probe subset")
    else:
        t = results["expressiveness"]
        g = t.group_by(["step", "layer"]).aggregate([("expressiveness", "max"), ("score", "min")]).sort_by("step")
        for layer in sorted(set(g.column("layer").to_pylist())):
            s = g.filter(pc.equal(g.column("layer"), layer))
            axes[0].plot(s.column("step"), s.column("expressiveness_max"), marker="o", label=layer)
            axes[1].plot(s.column("step"), s.column("score_min"), marker="o", label=layer)
        axes[0].set_title("layer expressiveness E")
        axes[1].set_title("least expressive neuron's score")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def wandb_views(results: dict[str, pa.Table], views: dict[str, pa.Table], dims: dict[str, list[str]]) -> None:
    """``zonotope/<layer>/<split>/...`` and ``expressiveness/<layer>/<split>/...`` series (ratios taken here)."""
    if "zonotope" in results and results["zonotope"].num_rows:
        t = results["zonotope"]
        t = t.append_column("bad", pc.cast(pc.invert(t.column("is_vertex")), pa.int64()))
        g = t.group_by(["step", "layer", "split"]).aggregate([("vertex_move", "mean"), ("n_visited", "mean"), ("bad", "sum")])
        view = pa.table({
            "step": g.column("step"), "layer": g.column("layer"), "split": g.column("split"),
            "vertex_move_mean": g.column("vertex_move_mean"), "visited_mean": g.column("n_visited_mean"),
            "lp_failures": g.column("bad_sum"),
        })
        f = results.get("zonotope_fixed")
        if f is not None and f.num_rows:  # the loss gap at checkpointed steps (null elsewhere)
            n = pc.cast(f.column("n_samples"), pa.float64())
            view = view.join(pa.table({
                "step": f.column("step"), "layer": f.column("layer"), "split": f.column("split"),
                "loss": pc.divide(f.column("sse"), n), "fixed_pattern_loss": pc.divide(f.column("fixed_sse"), n),
                "gap": pc.divide(pc.subtract(f.column("sse"), f.column("fixed_sse")), n),
            }), keys=["step", "layer", "split"], join_type="left outer").sort_by("step")
        views["zonotope"] = view
        dims["zonotope"] = ["layer", "split"]
    if "expressiveness" in results and results["expressiveness"].num_rows:
        t = results["expressiveness"]
        g = t.group_by(["step", "layer", "split"]).aggregate([("expressiveness", "max"), ("score", "min"), ("score", "max")])
        views["expressiveness"] = pa.table({
            "step": g.column("step"), "layer": g.column("layer"), "split": g.column("split"),
            "E": g.column("expressiveness_max"),
            "neuron_min": g.column("score_min"), "neuron_max": g.column("score_max"),
        })
        dims["expressiveness"] = ["layer", "split"]
