"""``dynatrack compare``: the small- vs large-batch comparison of a finished sweep.

Per trial (one Ray task each, in parallel): final train/test loss and accuracy on the whole
task splits, the generalization gap, the number of updates, ‖w_T − w_0‖, the gradient noise
scale B_simple, the top Hessian eigenvalue, Keskar's ε-sharpness, and the activation-pattern
statistics over training (distinct patterns, churn, neuron partitions, normalized 2-D regions,
local complexity). Then per batch size over seeds (mean, std, n), Welch's test of the smallest
vs the largest batch, and the loss/accuracy along the line between the smallest- and
largest-batch solutions of one seed. The estimators are :mod:`dynatrack.analysis.generalization`.

>>> table = compare_sweep("runs/batch-digits")          # doctest: +SKIP

Writes ``<sweep>/compare.parquet`` (one row per trial), ``compare_by_batch.parquet``,
``compare_tests.parquet``, ``compare_steps.parquet``, ``compare_interpolation.parquet`` and
``<sweep>/plots/*.png``; an earlier result is moved to ``<sweep>/previous/`` first. Logs one
W&B run per trial (grouped by the sweep) and a comparison run (offline by default); a W&B
failure is a warning, the Parquet files are written before.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SWEEP_FORMAT = "dynatrack.sweep/1"
OUTPUTS = ("compare", "compare_by_batch", "compare_tests", "compare_steps", "compare_interpolation")

#: per-trial metrics aggregated over seeds and tested small vs large (columns of compare.parquet)
METRICS = (
    "train_loss", "train_acc", "test_loss", "test_acc", "gap_loss", "gap_acc", "updates", "weight_distance",
    "grad_sq", "trace_sigma", "b_simple", "hessian_top", "sharpness",
    "distinct_final", "distinct_test_final", "churn_total", "dead_final", "always_on_final",
    "class_selective_final", "mixed_final", "regions_2d_final", "regions_2d_normalized_final", "lc_final",
)
TRIAL_KEYS = ("trial_id", "batch_size", "per_worker_batch", "world_size", "lr", "seed", "budget", "max_steps")


class SweepError(ValueError):
    """A sweep directory that cannot be compared (missing, foreign, nothing finished)."""


@dataclass(frozen=True)
class CompareConfig:
    """The ``compare`` section of a sweep config (all optional)."""

    sharpness_eps: float = 1e-3  # Keskar's box radius ε (they use 1e-3 and 5e-4)
    sharpness_iters: int = 10  # L-BFGS-B iterations of the maximisation
    hessian_iters: int = 20  # power iterations (Hessian-vector products)
    interpolation_points: int = 25  # α points in [-1, 2]
    noise_scale_batches: int = 32  # two-batch measurements of |G_small|², |G_big|²
    noise_scale_ranks: int = 4  # B_big / B_small for a trial that ran on one worker
    weight_steps: int = 6  # at most this many checkpoints (always step 0 and the final one) get regions and LC
    lc_samples: int = 64  # training samples around which local complexity is counted
    lc_radius: float = 0.05
    lc_directions: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sharpness_iters", "hessian_iters", "interpolation_points", "noise_scale_batches",
                     "weight_steps", "lc_directions"):
            if int(getattr(self, name)) < 1:
                raise SweepError(f"compare.{name} must be >= 1, got {getattr(self, name)}")
        if self.noise_scale_ranks < 2:
            raise SweepError(f"compare.noise_scale_ranks must be >= 2, got {self.noise_scale_ranks}")
        if not self.sharpness_eps > 0 or not self.lc_radius > 0:
            raise SweepError("compare.sharpness_eps and compare.lc_radius must be positive")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "CompareConfig":
        known = [f.name for f in fields(cls)]
        bad = [k for k in (d or {}) if k not in known]
        if bad:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
                     for k in bad]
            raise SweepError(f"unknown compare settings {', '.join(hints)}; known: {', '.join(known)}")
        return cls(**{k: type(getattr(cls, k))(v) for k, v in (d or {}).items()})


# ----------------------------------------------------------------------------- reading the sweep


def read_sweep(sweep_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated ``sweep.json`` of a sweep directory, with ``path`` and each trial's ``finished``."""
    path = Path(sweep_dir)
    manifest = path / "sweep.json"
    if not manifest.is_file():
        raise SweepError(f"{path} is not a sweep directory (no sweep.json); run `dynatrack sweep` first")
    try:
        sweep = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise SweepError(f"{manifest} is not valid JSON ({exc})") from exc
    if sweep.get("format") != SWEEP_FORMAT:
        raise SweepError(f"{manifest} has format {sweep.get('format')!r}; this dynatrack reads {SWEEP_FORMAT!r}")
    config = sweep.get("config") or {}
    for key in ("task", "model"):
        if key not in config:
            raise SweepError(f"{manifest}: config has no {key!r} section")
    trials = sweep.get("trials") or []
    if not trials:
        raise SweepError(f"{manifest} lists no trials")
    for t in trials:
        missing = [k for k in TRIAL_KEYS if k not in t]
        if missing:
            raise SweepError(f"{manifest}: trial {t.get('trial_id')!r} lacks {missing}")
        t["finished"] = (path / t["trial_id"] / "trial.json").is_file()
    if not any(t["finished"] for t in trials):
        status = ", ".join(f"{t['trial_id']}: {t.get('status')}" for t in trials)
        raise SweepError(f"no finished trial in {path} ({status}); nothing to compare")
    sweep["path"] = str(path.resolve())
    return sweep


def load_net_state(net: Any, state: Mapping[str, Any]) -> None:
    """Load a recorded checkpoint (a LightningModule's ``state_dict``, e.g. ``net.body.0.weight``)
    into the bare network of :func:`dynatrack.sweep.data.build_net` (``body.0.weight``)."""
    want = list(net.state_dict())
    if set(want) <= set(state):
        net.load_state_dict({k: state[k] for k in want})
        return
    for key in state:
        if key.endswith(want[0]):
            prefix = key[: len(key) - len(want[0])]
            if all(prefix + k in state for k in want):
                net.load_state_dict({k: state[prefix + k] for k in want})
                return
    raise SweepError(f"checkpoint keys {sorted(state)[:4]}... do not hold the network's {want[:4]}...")


# ----------------------------------------------------------------------------- per-trial work (Ray tasks)


def trial_task(sweep_dir: str, trial: dict[str, Any], config: dict[str, Any], data: dict[str, Any],
               cfg: dict[str, Any]) -> dict[str, Any]:
    """Every per-trial metric of one finished trial: ``{"row": {...}, "steps": pa.Table}``."""
    import torch

    from dynatrack.analysis import generalization as gen
    from dynatrack.store import open_run
    from dynatrack.sweep.data import build_net

    torch.set_num_threads(1)
    c = CompareConfig(**cfg)
    trial_dir = os.path.join(sweep_dir, trial["trial_id"])
    run = open_run(trial_dir)
    info = json.loads(Path(trial_dir, "trial.json").read_text())
    final = int(info["final_step"])
    ce = torch.nn.functional.cross_entropy
    xtr, ytr, xte, yte = data["train_x"], data["train_y"], data["test_x"], data["test_y"]
    net = build_net(config["model"], data["meta"])
    load_net_state(net, run.checkpoint(0))
    w0 = gen.flat_parameters(net)
    init_path = Path(sweep_dir, "init", f"seed={trial['seed']}.pt")
    same_init = None
    if init_path.is_file():
        init = torch.load(init_path, map_location="cpu", weights_only=True)
        same_init = all(torch.equal(init[k], v) for k, v in net.state_dict().items())
    load_net_state(net, run.checkpoint(final))
    net.eval()
    wt = gen.flat_parameters(net)
    row: dict[str, Any] = {k: trial[k] for k in TRIAL_KEYS}
    row.update(status="finished", error=None, final_step=final, same_init=same_init)
    row["train_loss"], row["train_acc"] = gen.loss_and_accuracy(net, ce, xtr, ytr)
    row["test_loss"], row["test_acc"] = gen.loss_and_accuracy(net, ce, xte, yte)
    row["gap_loss"] = row["test_loss"] - row["train_loss"]
    row["gap_acc"] = row["train_acc"] - row["test_acc"]
    row["updates"] = final
    row["weight_distance"] = gen.weight_distance(wt, w0)
    b_small = int(trial["per_worker_batch"])
    ranks = int(trial["world_size"]) if int(trial["world_size"]) > 1 else c.noise_scale_ranks
    small, big = gen.sample_grad_sq_norms(net, ce, xtr, ytr, b_small=b_small, n_small=ranks,
                                          n_measurements=c.noise_scale_batches, seed=c.seed)
    ns = gen.two_batch_noise_scale(small, big, b_small, b_small * ranks)
    row.update(grad_sq=ns.grad_sq, trace_sigma=ns.trace_sigma, b_simple=ns.b_simple,
               noise_b_small=ns.b_small, noise_b_big=ns.b_big)
    row["hessian_top"] = gen.top_hessian_eigenvalue(net, ce, xtr, ytr, iters=c.hessian_iters, seed=c.seed).eigenvalue
    sh = gen.epsilon_sharpness(net, ce, xtr, ytr, eps=c.sharpness_eps, maxiter=c.sharpness_iters)
    row["sharpness"] = sh.sharpness
    steps = _training_statistics(run, net, data, c, final)
    row.update(_final_pattern_stats(steps, final))
    return {"row": row, "steps": steps}


def _training_statistics(run: Any, net: Any, data: dict[str, Any], c: CompareConfig, final: int) -> pa.Table:
    """Per recorded step and split: whole-network pattern counts and churn (the analysis engine's
    pattern task), neuron-partition sizes, and at some checkpoints the normalized 2-D region count
    and local complexity (train split)."""
    import torch

    from dynatrack.analysis import local_complexity as lcx
    from dynatrack.analysis import regions as reg
    from dynatrack.parallel.tasks import NETWORK, choose_triples, pattern_task

    rows: dict[tuple[int, str], dict[str, Any]] = {}
    recorded = run.recorded_steps("patterns", source="probe")
    if recorded:
        pt = pattern_task(run.path, recorded, None, churn=True, network=True)["patterns"]
        layers = set(pt.column("layer").to_pylist())
        net_layer = NETWORK if NETWORK in layers else (next(iter(layers)) if len(layers) == 1 else None)
        for r in pt.to_pylist():
            if r["layer"] != net_layer:
                continue
            rows.setdefault((r["step"], r["split"]), {}).update(
                n_samples=r["n_samples"], n_distinct=r["n_distinct"], churn_samples=r["churn_samples"],
                churn_changed=r["churn_changed"], churn_hamming_sum=r["churn_hamming_sum"], width=r["width"])
    neurons = run.neurons(merged=True)
    if neurons.num_rows:
        counts: dict[tuple[int, str, str], int] = {}
        for step, split, part in zip(*(neurons.column(k).to_pylist() for k in ("step", "split", "partition"))):
            counts[(step, split, part)] = counts.get((step, split, part), 0) + 1
        for (step, split, part), n in counts.items():
            rows.setdefault((step, split), {})[f"n_{part}"] = n
    ckpts = run.checkpoint_steps()
    if ckpts:
        pick = sorted({ckpts[int(round(i))] for i in np.linspace(0, len(ckpts) - 1, min(c.weight_steps, len(ckpts)))})
        if final in ckpts and final not in pick:
            pick[-1] = final
        x = data["train_x"]
        labels = data["train_y"].numpy()
        triple = choose_triples(labels, len(x), 1, c.seed)
        lc_x = x[: c.lc_samples]
        p = min(c.lc_directions, x.shape[1])
        for step in pick:
            load_net_state(net, run.checkpoint(step))
            net.eval()
            r = rows.setdefault((step, "train"), {})
            layers = reg.piecewise_linear_layers(net, [x.shape[1]])
            n_hidden = int(sum(layer.width for layer in reg.hidden_layers(layers)))
            if triple:
                a, b, cc = triple[0]
                xs = x.numpy().astype(np.float64)
                sl = reg.slice_through(xs[a], xs[b], xs[cc])
                count = reg.count_regions_2d(layers, sl.origin, sl.u1, sl.u2).count
                r.update(regions_2d=int(count), n_hidden=n_hidden,
                         regions_2d_normalized=float(reg.normalized_count(count, n_hidden, 2)))
            with torch.no_grad():
                lc = lcx.local_complexity(net, lc_x, [c.lc_radius], p, seed=c.seed)
            r.update(lc_sum=int(lc.counts.sum()), lc_samples=int(lc.n_samples))
        load_net_state(net, run.checkpoint(final))
    cols = ["n_samples", "n_distinct", "churn_samples", "churn_changed", "churn_hamming_sum", "width",
            "n_dead", "n_always_on", "n_class_selective", "n_mixed", "n_partial",
            "regions_2d", "n_hidden", "regions_2d_normalized", "lc_sum", "lc_samples"]
    keys = sorted(rows)
    out: dict[str, Any] = {"step": pa.array([k[0] for k in keys], pa.int64()),
                           "split": pa.array([k[1] for k in keys], pa.string())}
    for col in cols:
        typ = pa.float64() if col == "regions_2d_normalized" else pa.int64()
        default = None if col not in ("n_dead", "n_always_on", "n_class_selective", "n_mixed", "n_partial") else 0
        vals = [rows[k].get(col, default) for k in keys]
        if default == 0:  # partition sizes exist only where neurons were recorded
            vals = [v if any(p in rows[k] for p in ("n_dead", "n_always_on", "n_class_selective", "n_mixed",
                                                   "n_partial")) else None for k, v in zip(keys, vals)]
        out[col] = pa.array(vals, typ)
    return pa.table(out)


def _final_pattern_stats(steps: pa.Table, final: int) -> dict[str, Any]:
    def at(split: str, col: str, step: int | None = final) -> Any:
        for s, sp, v in zip(steps.column("step").to_pylist(), steps.column("split").to_pylist(),
                            steps.column(col).to_pylist()):
            if s == step and sp == split:
                return v
        return None

    train = [r for r in steps.to_pylist() if r["split"] == "train"]
    churn = [r["churn_hamming_sum"] / r["churn_samples"] for r in train if r["churn_samples"]]
    lc = at("train", "lc_sum")
    n_lc = at("train", "lc_samples")
    return {
        "distinct_final": at("train", "n_distinct"),
        "distinct_test_final": at("test", "n_distinct"),
        "churn_total": float(sum(churn)) if churn else None,
        "dead_final": at("train", "n_dead"),
        "always_on_final": at("train", "n_always_on"),
        "class_selective_final": at("train", "n_class_selective"),
        "mixed_final": at("train", "n_mixed"),
        "regions_2d_final": at("train", "regions_2d"),
        "regions_2d_normalized_final": at("train", "regions_2d_normalized"),
        "lc_final": lc / n_lc if lc is not None and n_lc else None,
    }


def interpolation_task(sweep_dir: str, small: dict[str, Any], large: dict[str, Any], config: dict[str, Any],
                       data: dict[str, Any], points: int) -> pa.Table:
    """Loss and accuracy (train and test) along w(α) = α·w_large + (1 − α)·w_small, α in [−1, 2]."""
    import torch

    from dynatrack.analysis import generalization as gen
    from dynatrack.store import open_run
    from dynatrack.sweep.data import build_net

    torch.set_num_threads(1)
    net = build_net(config["model"], data["meta"])
    ws = []
    for t in (small, large):
        run = open_run(os.path.join(sweep_dir, t["trial_id"]))
        info = json.loads(Path(run.path, "trial.json").read_text())
        load_net_state(net, run.checkpoint(int(info["final_step"])))
        ws.append(gen.flat_parameters(net))
    alphas = np.linspace(-1.0, 2.0, points)
    cols: dict[str, list[Any]] = {k: [] for k in ("budget", "seed", "small_trial", "large_trial", "small_batch",
                                                  "large_batch", "split", "alpha", "loss", "accuracy")}
    for split, (x, y) in (("train", (data["train_x"], data["train_y"])), ("test", (data["test_x"], data["test_y"]))):
        res = gen.interpolate(net, torch.nn.functional.cross_entropy, x, y, ws[0], ws[1], alphas)
        for a, lo, ac in zip(res.alpha, res.loss, res.accuracy):
            for k, v in (("budget", small["budget"]), ("seed", small["seed"]), ("small_trial", small["trial_id"]),
                         ("large_trial", large["trial_id"]), ("small_batch", small["batch_size"]),
                         ("large_batch", large["batch_size"]), ("split", split), ("alpha", float(a)),
                         ("loss", float(lo)), ("accuracy", float(ac))):
                cols[k].append(v)
    return pa.table(cols)


# ----------------------------------------------------------------------------- aggregation


def by_batch(table: pa.Table, metrics: Sequence[str] = METRICS) -> pa.Table:
    """Mean, std (ddof 1) and n over seeds per (budget, batch_size, metric), finished trials only."""
    from dynatrack.analysis.generalization import seed_summary

    rows = _finished(table)
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["batch_size"]), []).append(r)
    out: dict[str, list[Any]] = {k: [] for k in ("budget", "batch_size", "metric", "mean", "std", "n")}
    for (budget, bs), rs in sorted(groups.items()):
        for m in metrics:
            s = seed_summary([_num(r.get(m)) for r in rs])
            for k, v in (("budget", budget), ("batch_size", bs), ("metric", m), ("mean", s.mean), ("std", s.std),
                         ("n", s.n)):
                out[k].append(v)
    return pa.table(out, schema=pa.schema([("budget", pa.string()), ("batch_size", pa.int64()), ("metric", pa.string()),
                                           ("mean", pa.float64()), ("std", pa.float64()), ("n", pa.int64())]))


def small_vs_large(table: pa.Table, metrics: Sequence[str] = METRICS) -> pa.Table:
    """Welch's t-test of the smallest vs the largest batch size per budget and metric (over seeds)."""
    from dynatrack.analysis.generalization import seed_summary, welch_test

    rows = _finished(table)
    out: dict[str, list[Any]] = {k: [] for k in ("budget", "metric", "small_batch", "large_batch", "mean_small",
                                                 "mean_large", "diff", "t", "df", "p", "n_small", "n_large")}
    for budget in sorted({r["budget"] for r in rows}):
        rs = [r for r in rows if r["budget"] == budget]
        sizes = sorted({r["batch_size"] for r in rs})
        if len(sizes) < 2:
            continue
        lo, hi = sizes[0], sizes[-1]
        for m in metrics:
            a = [_num(r.get(m)) for r in rs if r["batch_size"] == lo]
            b = [_num(r.get(m)) for r in rs if r["batch_size"] == hi]
            sa, sb = seed_summary(a), seed_summary(b)
            test = welch_test(b, a)  # large minus small
            for k, v in (("budget", budget), ("metric", m), ("small_batch", lo), ("large_batch", hi),
                         ("mean_small", sa.mean), ("mean_large", sb.mean), ("diff", sb.mean - sa.mean),
                         ("t", test.t), ("df", test.df), ("p", test.p), ("n_small", sa.n), ("n_large", sb.n)):
                out[k].append(v)
    return pa.table(out, schema=pa.schema([
        ("budget", pa.string()), ("metric", pa.string()), ("small_batch", pa.int64()), ("large_batch", pa.int64()),
        ("mean_small", pa.float64()), ("mean_large", pa.float64()), ("diff", pa.float64()), ("t", pa.float64()),
        ("df", pa.float64()), ("p", pa.float64()), ("n_small", pa.int64()), ("n_large", pa.int64())]))


def _finished(table: pa.Table) -> list[dict[str, Any]]:
    return [r for r in table.to_pylist() if r["status"] == "finished"]


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


# ----------------------------------------------------------------------------- the whole comparison


def compare_sweep(
    sweep_dir: str | os.PathLike[str],
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    wandb_mode: str = "offline",
    project: str = "dynatrack",
    progress: bool = True,
) -> pa.Table:
    """Compare the trials of a sweep directory; return the per-trial table (``compare.parquet``).

    Args:
        sweep_dir: ``<root>/<sweep_id>`` written by ``dynatrack sweep``.
        address: ``None`` for a local Ray started and stopped here (``num_cpus`` CPUs), or an
            existing cluster (``"auto"``, ``host:port``); inside ``ray job submit`` the job's Ray.
        wandb_mode: ``offline`` (default; under ``<sweep>/wandb/``), ``online``, ``auto``, ``disabled``.
        project: the W&B project; the group is the sweep id.

    Everything is checked before Ray starts (sweep directory, settings, W&B credentials for online).
    """
    from dynatrack.parallel.cluster import ray_session
    from dynatrack.sweep.data import make_task
    from dynatrack.tracking import resolve_mode

    sweep = read_sweep(sweep_dir)
    path = sweep["path"]
    config = sweep["config"]
    cfg = CompareConfig.from_dict(config.get("compare"))
    resolved = resolve_mode(wandb_mode)  # type: ignore[arg-type]
    task = dict(config["task"])
    train, test, meta = make_task(task.pop("name"), task.pop("seed", 0), **task)
    data = {"train_x": train.tensors[0], "train_y": train.tensors[1], "test_x": test.tensors[0],
            "test_y": test.tensors[1], "meta": dict(meta)}
    trials = sweep["trials"]
    done = [t for t in trials if t["finished"]]
    pairs = _interpolation_pairs(done)
    plain_trials = [{k: t[k] for k in TRIAL_KEYS} for t in done]
    start = time.perf_counter()
    with ray_session(address, num_cpus=num_cpus):
        import ray

        data_ref = ray.put(data)  # once, shared by every task
        trial_fn = ray.remote(num_cpus=1)(trial_task)
        interp_fn = ray.remote(num_cpus=1)(interpolation_task)
        refs = [trial_fn.remote(path, t, config, data_ref, asdict(cfg)) for t in plain_trials]
        refs += [interp_fn.remote(path, s, b, config, data_ref, cfg.interpolation_points) for s, b in pairs]
        values = _gather(refs, progress)
    results, interp = values[: len(done)], values[len(done):]
    elapsed = time.perf_counter() - start
    table = _compare_table(trials, [r["row"] for r in results])
    steps = _steps_table(done, [r["steps"] for r in results])
    tables = {
        "compare": table,
        "compare_by_batch": by_batch(table),
        "compare_tests": small_vs_large(table),
        "compare_steps": steps,
        "compare_interpolation": pa.concat_tables(interp) if interp else interpolation_task_schema().empty_table(),
    }
    _move_previous(Path(path))
    for name, t in tables.items():
        _write_parquet(Path(path, f"{name}.parquet"), t)
    plots = {}
    try:
        from dynatrack.sweep.plots import write_plots

        plots = write_plots(tables, Path(path, "plots"))
    except Exception as exc:  # noqa: BLE001 - plots are a view; the Parquet results are written
        log.warning("plots of %s failed (%s: %s); the Parquet results are written", path, type(exc).__name__, exc)
    print_compare_table(tables, sweep["sweep_id"], elapsed)
    if resolved != "disabled":
        from dynatrack.tracking.sweep_logging import log_sweep

        log_sweep(sweep["sweep_id"], Path(path), trials, tables, plots, project=project, mode=resolved,
                  wandb_dir=Path(path, "wandb"))
    return table


def interpolation_task_schema() -> pa.Schema:
    return pa.schema([("budget", pa.string()), ("seed", pa.int64()), ("small_trial", pa.string()),
                      ("large_trial", pa.string()), ("small_batch", pa.int64()), ("large_batch", pa.int64()),
                      ("split", pa.string()), ("alpha", pa.float64()), ("loss", pa.float64()),
                      ("accuracy", pa.float64())])


def _interpolation_pairs(done: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Per budget, the smallest- and largest-batch trials of the first seed that has both."""
    pairs = []
    for budget in sorted({t["budget"] for t in done}):
        rs = [t for t in done if t["budget"] == budget]
        sizes = sorted({t["batch_size"] for t in rs})
        if len(sizes) < 2:
            continue
        for seed in sorted({t["seed"] for t in rs}):
            s = [t for t in rs if t["seed"] == seed and t["batch_size"] == sizes[0]]
            b = [t for t in rs if t["seed"] == seed and t["batch_size"] == sizes[-1]]
            if s and b:
                pairs.append(({k: s[0][k] for k in TRIAL_KEYS}, {k: b[0][k] for k in TRIAL_KEYS}))
                break
    return pairs


def _gather(refs: list[Any], progress: bool) -> list[Any]:
    """Wait for all tasks with ``ray.wait`` (progress bar), then one ``ray.get``: the analysis engine's."""
    from dynatrack.parallel.analyze import _gather as gather

    return gather(refs, progress, label="comparing trials")


_TYPES = {"trial_id": pa.string(), "batch_size": pa.int64(), "per_worker_batch": pa.int64(), "world_size": pa.int64(),
          "lr": pa.float64(), "seed": pa.int64(), "budget": pa.string(), "max_steps": pa.int64(),
          "status": pa.string(), "error": pa.string(), "final_step": pa.int64(), "same_init": pa.bool_(),
          "updates": pa.int64(), "noise_b_small": pa.int64(), "noise_b_big": pa.int64(),
          "distinct_final": pa.int64(), "distinct_test_final": pa.int64(), "dead_final": pa.int64(),
          "always_on_final": pa.int64(), "class_selective_final": pa.int64(), "mixed_final": pa.int64(),
          "regions_2d_final": pa.int64()}
COLUMNS = (*TRIAL_KEYS, "status", "error", "final_step", "same_init", *METRICS, "noise_b_small", "noise_b_big")


def _compare_table(trials: list[dict[str, Any]], rows: list[dict[str, Any]]) -> pa.Table:
    by_id = {r["trial_id"]: r for r in rows}
    out = []
    for t in trials:
        r = by_id.get(t["trial_id"])
        if r is None:  # failed, pending or still running: a row with its status and no metrics
            r = {k: t.get(k) for k in TRIAL_KEYS}
            r.update(status=t.get("status") if t.get("status") != "finished" else "incomplete", error=t.get("error"))
        out.append(r)
    return pa.table({c: pa.array([_clean(r.get(c)) for r in out], _TYPES.get(c, pa.float64())) for c in COLUMNS})


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def _steps_table(done: list[dict[str, Any]], parts: list[pa.Table]) -> pa.Table:
    tables = []
    for t, part in zip(done, parts):
        n = part.num_rows
        keys = {"trial_id": pa.array([t["trial_id"]] * n, pa.string()),
                "batch_size": pa.array([t["batch_size"]] * n, pa.int64()),
                "seed": pa.array([t["seed"]] * n, pa.int64()), "budget": pa.array([t["budget"]] * n, pa.string())}
        tables.append(pa.table({**keys, **{c: part.column(c) for c in part.column_names}}))
    return pa.concat_tables(tables) if tables else pa.table({})


def _move_previous(path: Path) -> None:
    """Move an earlier comparison (Parquet files, plots) to ``<sweep>/previous/`` (never overwritten)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for name in OUTPUTS:
        src = path / f"{name}.parquet"
        if src.exists():
            src.rename(_free_name(path / "previous", f"{name}-{stamp}", ".parquet"))
    plots = path / "plots"
    if plots.exists():
        shutil.move(str(plots), str(_free_name(path / "previous", f"plots-{stamp}", "")))


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/<stem><suffix>``, or ``<stem>-<k><suffix>`` for the first k free (``folder`` created)."""
    folder.mkdir(exist_ok=True)
    dst, k = folder / f"{stem}{suffix}", 1
    while dst.exists():
        dst, k = folder / f"{stem}-{k}{suffix}", k + 1
    return dst


def _write_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- terminal table

SHOWN = (("updates", "updates", "{:.0f}"), ("train_acc", "train acc", "{:.4f}"), ("test_acc", "test acc", "{:.4f}"),
         ("gap_acc", "gap (acc)", "{:.4f}"), ("gap_loss", "gap (loss)", "{:.3f}"),
         ("sharpness", "ε-sharpness", "{:.3g}"), ("hessian_top", "λ_max", "{:.3g}"),
         ("b_simple", "B_simple", "{:.3g}"), ("weight_distance", "‖w_T−w_0‖", "{:.3g}"),
         ("distinct_final", "distinct", "{:.0f}"), ("churn_total", "churn", "{:.3g}"),
         ("regions_2d_normalized_final", "regions·2/N²", "{:.3g}"))


def print_compare_table(tables: Mapping[str, pa.Table], sweep_id: str, elapsed: float | None = None) -> None:
    """One rich table per budget: a row per metric, mean ± std over seeds per batch size, Welch's p."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    agg = {(r["budget"], r["batch_size"], r["metric"]): r for r in tables["compare_by_batch"].to_pylist()}
    tests = {(r["budget"], r["metric"]): r for r in tables["compare_tests"].to_pylist()}
    for budget in sorted({k[0] for k in agg}):
        sizes = sorted({k[1] for k in agg if k[0] == budget})
        t = Table(title=f"sweep {sweep_id}, budget = {budget}: mean ± std over seeds (n = "
                        f"{', '.join(str(agg[(budget, bs, 'test_acc')]['n']) for bs in sizes)})")
        t.add_column("metric")
        for bs in sizes:
            t.add_column(f"batch {bs}", justify="right")
        t.add_column(f"p ({sizes[0]} vs {sizes[-1]})", justify="right")
        for m, label, fmt in SHOWN:
            cells = [_pm(agg[(budget, bs, m)]["mean"], agg[(budget, bs, m)]["std"], fmt) for bs in sizes]
            t.add_row(label, *cells, _p(tests.get((budget, m), {}).get("p")))
        console.print(t)
    failed = [r for r in tables["compare"].to_pylist() if r["status"] != "finished"]
    for r in failed:
        console.print(f"[yellow]trial {r['trial_id']}: {r['status']}[/yellow] {r['error'] or ''}")
    if elapsed is not None:
        console.print(f"compared {tables['compare'].num_rows - len(failed)} trials in {elapsed:.1f} s")


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    s = fmt.format(mean)
    return s if std is None or math.isnan(std) else f"{s} ± {fmt.format(std)}"


def _p(p: float | None) -> str:
    return "–" if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.3g}"
