"""Ray side of the ``partitions`` and ``early_stage`` analyzers (Wang & Ma, NeurIPS 2022).

:func:`plan` checks, before Ray starts, whether each analyzer applies to the run
and returns the step ranges to submit; an analyzer that does not apply is skipped
with its reason (logged as a warning) and the others run. :func:`partition_task`
and :func:`early_task` are plain functions that become Ray tasks (one per step
range); :func:`finish` chains the per-step early-stage bounds (which need every
step's values), writes the plots and adds the summary tables.

The training split of the stored probe set (``run.probe_inputs(split)``) stands in
for the training set: losses, gradients, β and the bounds are those of the probe loss.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from dynatrack.analysis import early_stage as es
from dynatrack.analysis import partition_dynamics as pd_
from dynatrack.store.reader import Run, RunError, binary_rows, open_run
from dynatrack.store.schema import ANALYSIS

log = logging.getLogger(__name__)

ANALYZERS = ("partitions", "early_stage")
INIT, PREVIOUS = "init", "previous"


# -- the one place that loads a model at a checkpoint --------------------------------------------


class ChainLoader:
    """The recorded network at a checkpoint, as a chain of affine maps and activations.

    Read from the run's stored model description (:func:`dynatrack.parallel.tasks.region_chain`;
    the class the manifest names is imported only with ``trust_model_code``); every weight
    analysis of this module goes through here.
    """

    def __init__(self, run: Run, *, trust_model_code: bool = False) -> None:
        self.run = run
        self.trust_model_code = trust_model_code

    def __call__(self, step: int) -> list[Any]:
        from dynatrack.parallel.tasks import region_chain

        return region_chain(self.run, step, trust_model_code=self.trust_model_code)


# -- planning (before Ray) ------------------------------------------------------------------------


@dataclass
class Plan:
    """What :func:`plan` decided: steps per analyzer, reasons for what is skipped, notes."""

    partition_steps: list[int] = field(default_factory=list)
    early_steps: list[int] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)


def plan(run: Run, cfg: Any) -> Plan:
    """Decide what runs; skip (with the reason, as a warning) what does not apply."""
    out = Plan()
    wanted = None if cfg.steps is None else sorted({int(s) for s in cfg.steps})
    if "partitions" in cfg.analyzers:
        try:
            out.partition_steps = _plan_partitions(run, wanted, out)
        except (es.NotApplicableError, RunError) as exc:
            out.skipped["partitions"] = str(exc)
    if "early_stage" in cfg.analyzers:
        try:
            out.early_steps = _plan_early(run, cfg, wanted, out)
        except (es.NotApplicableError, RunError) as exc:
            out.skipped["early_stage"] = str(exc)
    for name, reason in out.skipped.items():
        log.warning("%s skipped: %s", name, reason)
    for name, notes in out.notes.items():
        for note in notes:
            log.warning("%s: %s", name, note)
    return out


def _keep_steps(name: str, available: list[int], wanted: list[int] | None, what: str, out: Plan) -> list[int]:
    if wanted is None:
        return available
    missing = sorted(set(wanted) - set(available))
    if missing:
        out.notes.setdefault(name, []).append(f"steps {missing} skipped: no {what} (available: {available})")
    return [s for s in wanted if s in set(available)]


def _plan_partitions(run: Run, wanted: list[int] | None, out: Plan) -> list[int]:
    steps = run.recorded_steps("neurons")
    if not steps:
        raise es.NotApplicableError("the run has no neuron counts (record them with the recorder's neuron_schedule)")
    first = run.neurons(merged=True, step=steps[0])
    n = first.group_by("split").aggregate([("n_samples", "max")]).to_pylist()
    small = {r["split"]: r["n_samples_max"] for r in n if r["n_samples_max"] < 2}
    if small:
        raise es.NotApplicableError(f"probe too small: partitions need >= 2 probe samples per split, got {small}")
    abc = first.column("active_by_class").combine_chunks()
    if not len(abc) or abc[0].as_py() in (None, []):
        out.notes.setdefault("partitions", []).append(
            "the probe has no labels: the class-based classes (class_selective, mixed) are not computed; "
            "neurons active on some but not all samples are labeled 'partial'")
    return _keep_steps("partitions", steps, wanted, "neuron counts", out)


def _plan_early(run: Run, cfg: Any, wanted: list[int] | None, out: Plan) -> list[int]:
    if cfg.loss not in es.LOSSES:
        raise ValueError(f"loss must be one of {list(es.LOSSES)}, got {cfg.loss!r}")
    ids, labels, x = run.probe_inputs(cfg.split)
    if labels is None:
        raise es.NotApplicableError(f"the probe split {cfg.split!r} has no labels: the loss needs targets")
    if len(ids) < cfg.early_min_samples:
        raise es.NotApplicableError(
            f"probe too small: the {cfg.split!r} probe split stands in for the training set and holds {len(ids)} "
            f"samples; early_stage needs >= {cfg.early_min_samples} (record a larger probe or lower "
            "early_min_samples)")
    steps = _keep_steps("early_stage", run.checkpoint_steps(), wanted, "checkpoint", out)
    if not steps:
        raise es.NotApplicableError(f"no checkpoint at the requested steps (checkpointed: {run.checkpoint_steps()})")
    try:
        layers = ChainLoader(run, trust_model_code=cfg.trust_model_code)(steps[0])
    except ValueError as exc:  # UnsupportedModelError, a class that cannot be rebuilt
        raise es.NotApplicableError(f"the network is not a chain of Linear and ReLU layers: {exc}") from exc
    es.check_applies(layers)
    n_out = layers[-1].weight.shape[0]
    if cfg.loss == "cross_entropy":
        if n_out < 2:
            raise es.NotApplicableError("loss 'cross_entropy' needs >= 2 outputs; this network has 1 (use loss: mse)")
        if labels.min() < 0 or labels.max() >= n_out:
            raise es.NotApplicableError(f"labels {labels.min()}..{labels.max()} are not classes of {n_out} outputs")
    out.notes.setdefault("early_stage", []).append(
        f"{_scope(layers)}; the probe split {cfg.split!r} ({len(ids)} samples) stands in for the training set")
    return steps


def _scope(layers: Sequence[Any]) -> str:
    if len(layers) == 2:
        return "two-layer network (exact case)"
    return (f"last hidden layer '{layers[-2].name}' with the {len(layers) - 2} earlier layer(s) frozen as features "
            "(deeper network)")


# -- partitions --------------------------------------------------------------------------------------


def partition_task(run_dir: str, steps: Sequence[int], prev_step: int | None, init_step: int) -> dict[str, pa.Table]:
    """Class sizes, transitions (vs. previous recorded step and vs. ``init_step``), set stability
    and per-sample churn for ``steps``, from the neurons table (summed over ranks) and the
    probe patterns (all ranks; set changes are added rank by rank)."""
    run = open_run(run_dir)
    need = sorted(set(steps) | {init_step} | ({prev_step} if prev_step is not None else set()))
    classes = {s: _classes(run, s) for s in need}
    masks = _masks(run, need)
    widths = run.widths
    sizes: dict[str, list[Any]] = {k: [] for k in PARTITION_SIZES.names}
    trans: dict[str, list[Any]] = {k: [] for k in PARTITION_TRANSITIONS.names}
    stab: dict[str, list[Any]] = {k: [] for k in PARTITION_STABILITY.names}
    churn: dict[str, list[Any]] = {k: [] for k in PARTITION_CHURN.names}
    order = sorted(need)
    for step in sorted(steps):
        i = order.index(step)
        prev = prev_step if i == 0 else order[i - 1]
        prev = prev if prev is not None and prev < step else None
        for (layer, split), cls in sorted(classes[step].items()):
            for c, k in sorted(pd_.class_sizes(cls).items()):
                _add(sizes, step=step, layer=layer, split=split, partition=c, n_neurons=k, width=len(cls))
            for ref_name, ref in ((PREVIOUS, prev), (INIT, init_step)):
                if ref is None or (layer, split) not in classes[ref]:
                    continue
                for (a, b), k in sorted(pd_.transition_counts(classes[ref][(layer, split)], cls).items()):
                    _add(trans, step=step, layer=layer, split=split, reference=ref_name, ref_step=ref,
                         from_partition=a, to_partition=b, n_neurons=k)
        for (layer, split), per_rank in sorted(masks.get(step, {}).items()):
            width = widths[layer]
            row: dict[str, Any] = dict(step=step, layer=layer, split=split, width=width)
            churn_ref: dict[str, dict[int, int]] = {}
            for ref_name, ref in ((INIT, init_step), (PREVIOUS, prev)):
                ref_ranks = masks.get(ref, {}).get((layer, split)) if ref is not None else None
                if ref_ranks is None:
                    row.update({f"n_unchanged_{ref_name}": None, f"set_change_{ref_name}_sum": None})
                    continue
                state = pd_.SetChangeState(width)
                cmap: dict[int, int] = {}
                for rank, (ids, now) in per_rank.items():  # one update per rank's shard: counts add
                    rids, rmask = ref_ranks.get(rank, (np.zeros(0, np.int64), np.zeros((0, width), bool)))
                    common, ia, ib = np.intersect1d(rids, ids, assume_unique=True, return_indices=True)
                    state = pd_.set_change_merge(state, pd_.set_change_update(pd_.SetChangeState(width),
                                                                              rmask[ia], now[ib]))
                    cmap.update(zip(common.tolist(), pd_.sample_churn(rmask[ia], now[ib]).tolist()))
                n_unch, total = pd_.set_change_compute(state)
                row.update({f"n_unchanged_{ref_name}": n_unch, f"set_change_{ref_name}_sum": total})
                row["n_samples"] = state.n_samples
                churn_ref[ref_name] = cmap
            row.setdefault("n_samples", sum(len(ids) for ids, _ in per_rank.values()))
            _add(stab, **row)
            all_ids = np.sort(np.concatenate([ids for ids, _ in per_rank.values()])).tolist()
            churn["step"] += [step] * len(all_ids)
            churn["layer"] += [layer] * len(all_ids)
            churn["split"] += [split] * len(all_ids)
            churn["sample_id"] += all_ids
            for ref_name, col in ((PREVIOUS, "churn_prev"), (INIT, "churn_init")):
                cmap = churn_ref.get(ref_name, {})
                churn[col] += [cmap.get(i) for i in all_ids]
    return {
        "partitions": pa.table(sizes, schema=PARTITION_SIZES),
        "partition_transitions": pa.table(trans, schema=PARTITION_TRANSITIONS),
        "partition_stability": pa.table(stab, schema=PARTITION_STABILITY),
        "partition_churn": pa.table(churn, schema=PARTITION_CHURN),
    }


def _classes(run: Run, step: int) -> dict[tuple[str, str], np.ndarray]:
    t = run.neurons(merged=True, step=step)
    out: dict[tuple[str, str], np.ndarray] = {}
    if not t.num_rows:
        return out
    layer, split = t.column("layer").to_pylist(), t.column("split").to_pylist()
    labels = np.asarray(t.column("partition").to_pylist(), dtype=object)
    signs = t.column("out_sign").to_pylist()
    keys = list(zip(layer, split))
    for key in dict.fromkeys(keys):
        sel = [i for i, k in enumerate(keys) if k == key]  # rows are sorted by neuron within (layer, split)
        s = [signs[i] for i in sel]
        out[key] = pd_.partition_classes(labels[sel], None if all(v is None for v in s) else np.array(s, dtype=object))
    return out


def _masks(run: Run, steps: Sequence[int]) -> dict[int, dict[tuple[str, str], dict[int, tuple[np.ndarray, np.ndarray]]]]:
    """step -> (layer, split) -> rank -> (sorted sample ids, bool patterns [n, width])."""
    expr = ds.field("step").isin(list(steps)) & (ds.field("source") == "probe")
    t = run.table("patterns", filter=expr, columns=["step", "layer", "split", "sample_id", "bits"])
    out: dict[int, dict[tuple[str, str], dict[int, tuple[np.ndarray, np.ndarray]]]] = {}
    if not t.num_rows:
        return out
    layer_col = t.column("layer").combine_chunks().dictionary_encode()
    split_col = t.column("split").combine_chunks().dictionary_encode()
    codes = [np.unique(t.column("step").to_numpy(), return_inverse=True),
             (np.asarray(layer_col.dictionary.to_pylist(), dtype=object), layer_col.indices.to_numpy()),
             (np.asarray(split_col.dictionary.to_pylist(), dtype=object), split_col.indices.to_numpy()),
             np.unique(t.column("rank").to_numpy(), return_inverse=True)]
    key = np.zeros(t.num_rows, dtype=np.int64)
    for values, idx in codes:  # one integer per (step, layer, split, rank)
        key = key * len(values) + idx
    ids_all = t.column("sample_id").to_numpy()
    order = np.lexsort((ids_all, key))  # by group, then by sample id
    bounds = np.flatnonzero(np.diff(key[order])) + 1
    bits_col = t.column("bits")
    for sel in np.split(order, bounds):
        k = int(key[sel[0]])
        parts = []
        for values, _ in reversed(codes):
            k, r = divmod(k, len(values))
            parts.append(values[r])
        rank, split, layer, step = parts
        width = run.widths[str(layer)]
        bits = binary_rows(bits_col.take(pa.array(sel)), (width + 7) // 8)
        mask = np.unpackbits(bits, axis=1, count=width).astype(bool)
        out.setdefault(int(step), {}).setdefault((str(layer), str(split)), {})[int(rank)] = (ids_all[sel], mask)
    return out


def _add(rows: dict[str, list[Any]], **values: Any) -> None:
    for k in rows:
        rows[k].append(values.get(k))


PARTITION_SIZES = pa.schema([
    ("step", pa.int64()), ("layer", pa.string()), ("split", pa.string()), ("partition", pa.string()),
    ("n_neurons", pa.int64()), ("width", pa.int64()),
])
PARTITION_TRANSITIONS = pa.schema([
    ("step", pa.int64()), ("layer", pa.string()), ("split", pa.string()), ("reference", pa.string()),
    ("ref_step", pa.int64()), ("from_partition", pa.string()), ("to_partition", pa.string()), ("n_neurons", pa.int64()),
])
PARTITION_STABILITY = pa.schema([
    ("step", pa.int64()), ("layer", pa.string()), ("split", pa.string()), ("width", pa.int64()),
    ("n_samples", pa.int64()), ("n_unchanged_init", pa.int64()), ("set_change_init_sum", pa.int64()),
    ("n_unchanged_previous", pa.int64()), ("set_change_previous_sum", pa.int64()),
])
PARTITION_CHURN = pa.schema([
    ("step", pa.int64()), ("layer", pa.string()), ("split", pa.string()), ("sample_id", pa.int64()),
    ("churn_prev", pa.int64()), ("churn_init", pa.int64()),
])


# -- early stage --------------------------------------------------------------------------------------


def early_task(run_dir: str, steps: Sequence[int], config: dict[str, Any]) -> dict[str, pa.Table]:
    """Per checkpointed step: probe loss, autograd ||∇L||², the pattern-based lower bounds, μ_t,
    β, and the update to the next step (if checkpointed): ∇L·Δ, ||Δ||², kink, GD residual."""
    import torch

    from dynatrack.analysis.regions import activation_patterns

    torch.set_num_threads(1)
    run = open_run(run_dir)
    loss = config["loss"]
    ids, labels, x = run.probe_inputs(config["split"])
    x = x.reshape(len(x), -1).astype(np.float64)
    load = ChainLoader(run, trust_model_code=bool(config.get("trust_model_code", False)))
    ckpts = set(run.checkpoint_steps())
    lrs = _step_means(run, "lr")
    rows: dict[str, list[Any]] = {k: [] for k in EARLY_STAGE.names}
    cache: dict[int, Any] = {}

    def chain(step: int) -> Any:
        if step not in cache:
            cache.clear() if len(cache) > 2 else None
            layers = load(step)
            cache[step] = (layers, activation_patterns(layers, x))
        return cache[step]

    for step in sorted(steps):
        layers, _ = chain(step)
        view = es.last_hidden_view(layers, x)
        z = view.pre_activations()
        mask, source, mismatch = _recorded_mask(run, step, layers[-2].name, config["split"], ids)
        if mask is None:
            mask, source, mismatch = z > 0, "recomputed", 0
        else:
            mismatch = int((mask != (z > 0)).sum())
            if mismatch:  # float32 recording vs. this float64 forward disagree on a sign near 0: use the
                mask, source = z > 0, "recomputed"  # float64 one, the pattern autograd's gradient has
        b = es.gradient_bounds(view, mask, labels, loss)
        full_loss, grad = es.full_gradient(layers, x, labels, loss)
        beta = es.hessian_top_eigenvalue(layers, x, labels, loss, iters=config["beta_iters"], seed=config["seed"])
        lr = config["early_lr"] if config.get("early_lr") is not None else lrs.get(step, float("nan"))
        g_dot = delta_sq = resid = None
        kink = None
        if step + 1 in ckpts:
            nxt, pat_next = chain(step + 1)
            _, pat_now = chain(step)
            delta = es.flat_parameters(nxt) - es.flat_parameters(layers)
            g_dot, delta_sq = float(grad @ delta), float(delta @ delta)
            gd = -lr * grad
            resid = float(np.linalg.norm(delta - gd) / max(np.linalg.norm(gd), 1e-300)) if np.isfinite(lr) else None
            kink = bool((pat_now != pat_next).any())
        _add(rows, step=step, split=config["split"], loss_fn=loss, n_samples=len(ids), loss=full_loss,
             grad_norm_sq=float(grad @ grad), grad_out_sq=b.grad_out_sq, grad_hidden_sq=b.grad_hidden_sq,
             lb_total=b.lb_total, lb_partition=b.lb_partition, lb_mu=b.lb_mu, mu=b.mu, n_vacuous=b.n_vacuous,
             beta=beta, lr=lr if np.isfinite(lr) else None, g_dot_delta=g_dot, delta_sq=delta_sq, gd_residual=resid, kink=kink,
             pattern_source=source, pattern_mismatch=mismatch, scope=_scope(layers))
    return {"early_stage": pa.table(rows, schema=EARLY_STAGE)}


def _recorded_mask(run: Run, step: int, layer: str, split: str, ids: np.ndarray) -> tuple[np.ndarray | None, str, int]:
    """The recorded probe patterns of ``layer`` at ``step`` in the probe file's sample order (all ranks)."""
    if layer not in run.widths:
        return None, "recomputed", 0
    got_ids, bits = run.pattern_bits(step, layer, split=split)
    if len(got_ids) != len(ids) or not np.array_equal(np.sort(got_ids), np.sort(ids)):
        return None, "recomputed", 0
    pos = np.searchsorted(got_ids, ids)
    return np.unpackbits(bits[pos], axis=1, count=run.widths[layer]).astype(bool), "recorded", 0


def _step_means(run: Run, column: str) -> dict[int, float]:
    t = run.steps()
    if not t.num_rows:
        return {}
    g = t.group_by("step").aggregate([(column, "mean")])
    return dict(zip(g.column("step").to_pylist(), g.column(f"{column}_mean").to_pylist()))


EARLY_STAGE = pa.schema([
    ("step", pa.int64()), ("split", pa.string()), ("loss_fn", pa.string()), ("n_samples", pa.int64()),
    ("loss", pa.float64()), ("grad_norm_sq", pa.float64()), ("grad_out_sq", pa.float64()),
    ("grad_hidden_sq", pa.float64()), ("lb_total", pa.float64()), ("lb_partition", pa.float64()),
    ("lb_mu", pa.float64()), ("mu", pa.float64()), ("n_vacuous", pa.int64()), ("beta", pa.float64()),
    ("lr", pa.float64()), ("g_dot_delta", pa.float64()), ("delta_sq", pa.float64()), ("gd_residual", pa.float64()),
    ("kink", pa.bool_()), ("pattern_source", pa.string()), ("pattern_mismatch", pa.int64()), ("scope", pa.string()),
])
CHAIN_COLUMNS = ("batch_loss", "pred_gd", "pred_mu", "pred_step", "ratio_pred_mu", "ratio_observed")
VIOLATIONS = pa.schema([
    ("step", pa.int64()), ("bound", pa.string()), ("observed_next", pa.float64()), ("bound_next", pa.float64()),
    ("cause", pa.string()),
])


def finish_early(run: Run, table: pa.Table, *, early_loss_ratio: float = 0.5) -> dict[str, pa.Table]:
    """Chain the one-step bounds over the steps, list violations with causes, summarize."""
    t = table.sort_by("step")
    col = {c: np.asarray(t.column(c).to_numpy(zero_copy_only=False), dtype=np.float64)
           for c in ("loss", "grad_norm_sq", "lb_mu", "lr", "beta", "g_dot_delta", "delta_sq", "gd_residual")}
    steps = t.column("step").to_numpy()
    kink = [bool(v) if v is not None else False for v in t.column("kink").to_pylist()]
    ch = es.chain_bounds(steps, col["loss"], col["grad_norm_sq"], col["lb_mu"], col["lr"], col["beta"],
                         col["g_dot_delta"], col["delta_sq"])
    batch = _step_means(run, "loss")
    out = t.append_column("batch_loss", pa.array([batch.get(int(s)) for s in steps], pa.float64()))
    for name in CHAIN_COLUMNS[1:]:
        out = out.append_column(name, pa.array(getattr(ch, name), pa.float64(), from_pandas=True))  # nan -> null
    viol: dict[str, list[Any]] = {k: [] for k in VIOLATIONS.names}
    for i in range(len(steps) - 1):
        if steps[i + 1] != steps[i] + 1:
            continue
        L, Ln = col["loss"][i], col["loss"][i + 1]
        c = es.descent_coefficient(col["lr"][i], col["beta"][i])
        one_step = {"gd": L - c * col["grad_norm_sq"][i], "mu": L * ch.ratio_pred_mu[i],  # mu: nan when ηβ >= 2
                    "step": L + col["g_dot_delta"][i] + 0.5 * col["beta"][i] * col["delta_sq"][i]}
        for kind, bound in one_step.items():
            if np.isfinite(bound) and Ln > bound + 1e-9 * max(abs(L), 1e-12):
                cause = es.violation_causes(eta=col["lr"][i], beta_t=col["beta"][i], beta_next=col["beta"][i + 1],
                                            kink=kink[i], gd_residual=col["gd_residual"][i], kind=kind)
                _add(viol, step=int(steps[i]), bound=kind, observed_next=float(Ln), bound_next=float(bound), cause=cause)
    mu = col["lb_mu"]
    chain_last = int(steps[np.flatnonzero(np.isfinite(ch.pred_gd))[-1]]) if len(steps) else None
    first = lambda cond: int(steps[np.flatnonzero(cond)[0]]) if np.any(cond) else None  # noqa: E731
    n_viol = {k: sum(1 for b in viol["bound"] if b == k) for k in ("gd", "mu", "step")}
    summary = pa.table({
        "split": [t.column("split")[0].as_py() if len(t) else None],
        "loss_fn": [t.column("loss_fn")[0].as_py() if len(t) else None],
        "scope": [t.column("scope")[0].as_py() if len(t) else None],
        "stand_in": [f"the probe split's {int(t.column('n_samples')[0].as_py()) if len(t) else 0} samples stand in "
                     "for the training set"],
        "first_step": [int(steps[0]) if len(steps) else None],
        "chain_last_step": [chain_last],
        "early_end_ratio": [float(early_loss_ratio)],
        "early_end_step": [es.early_stage_end(steps, col["loss"], early_loss_ratio)],
        "mu_vacuous_step": [first(~(mu > 0))],
        "step_size_vacuous_step": [first(col["lr"] * col["beta"] >= 2)],
        **{f"violations_{k}": [v] for k, v in n_viol.items()},
    })
    return {"early_stage": out, "early_stage_violations": pa.table(viol, schema=VIOLATIONS),
            "early_stage_summary": summary}


# -- dispatch, W&B views and plots (called from dynatrack.parallel.analyze) ---------------------------


def submit(run: Run, cfg: Any, p: Plan, n_tasks: int) -> list[Any]:
    """Ray tasks for the planned step ranges (inside a Ray session)."""
    import ray

    from dynatrack.parallel.analyze import TASK_RETRIES, plan_step_ranges

    refs = []
    if p.partition_steps:
        fn = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(partition_task)
        for chunk in plan_step_ranges(p.partition_steps, n_tasks):
            i = p.partition_steps.index(chunk[0])
            refs.append(fn.remote(run.path, chunk, p.partition_steps[i - 1] if i else None, p.partition_steps[0]))
    if p.early_steps:
        fn = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(early_task)
        conf = {"loss": cfg.loss, "split": cfg.split, "beta_iters": cfg.beta_iters, "seed": cfg.seed,
                "early_lr": cfg.early_lr, "trust_model_code": cfg.trust_model_code}
        for chunk in plan_step_ranges(p.early_steps, n_tasks):
            refs.append(fn.remote(run.path, chunk, conf))
    return refs


def finish(run: Run, cfg: Any, results: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Chained bounds and summaries of ``early_stage``, and the PNG plots (``analysis/plots/``)."""
    if "early_stage" in results:
        results.update(finish_early(run, results["early_stage"], early_loss_ratio=cfg.early_loss_ratio))
    try:
        if "partitions" in results:
            write_plot(run, "partitions", plot_partitions(results["partitions"]))
        if "early_stage" in results:
            write_plot(run, "early_stage", plot_early(results["early_stage"]))
    except Exception as exc:  # a plot never loses the results
        log.warning("plots not written: %s", exc)
    return results


def wandb_views(results: dict[str, pa.Table], views: dict[str, pa.Table], dims: dict[str, list[str]]) -> None:
    """Add ``partitions/<layer>/<split>/<metric>`` and ``early_stage/<metric>`` series (ratios taken here)."""
    if "partitions" in results and results["partitions"].num_rows:
        t = results["partitions"]
        classes = sorted(set(t.column("partition").to_pylist()))
        keys = sorted(set(zip(*(t.column(c).to_pylist() for c in ("step", "layer", "split")))))
        index = {k: i for i, k in enumerate(keys)}
        cols = {c: [0] * len(keys) for c in classes}
        for s, layer, split, c, n in zip(*(t.column(c).to_pylist() for c in ("step", "layer", "split", "partition", "n_neurons"))):
            cols[c][index[(s, layer, split)]] = n
        extra: dict[str, list[Any]] = {"unchanged_init_fraction": [None] * len(keys), "churn_init_mean": [None] * len(keys),
                                       "churn_prev_mean": [None] * len(keys)}
        st = results.get("partition_stability")
        if st is not None:
            for r in st.to_pylist():
                i = index.get((r["step"], r["layer"], r["split"]))
                if i is None:
                    continue
                if r["n_unchanged_init"] is not None and r["width"]:
                    extra["unchanged_init_fraction"][i] = r["n_unchanged_init"] / r["width"]
                if r["n_samples"]:
                    for ref, key in (("init", "churn_init_mean"), ("previous", "churn_prev_mean")):
                        if r[f"set_change_{ref}_sum"] is not None:
                            extra[key][i] = r[f"set_change_{ref}_sum"] / r["n_samples"]
        views["partitions"] = pa.table({"step": [k[0] for k in keys], "layer": [k[1] for k in keys],
                                        "split": [k[2] for k in keys], **cols, **extra})
        dims["partitions"] = ["layer", "split"]
    if "early_stage" in results and results["early_stage"].num_rows:
        t = results["early_stage"]
        keep = ["step", "loss", "grad_norm_sq", "grad_out_sq", "grad_hidden_sq", "lb_partition", "lb_mu", "mu", "beta",
                *[c for c in CHAIN_COLUMNS if c in t.column_names]]
        v = t.select(keep)
        v = v.append_column("grad_sq_over_loss", pc.divide(t.column("grad_norm_sq"), t.column("loss")))
        views["early_stage"] = v
        dims["early_stage"] = []


def summary_rows(results: dict[str, pa.Table], by_step: dict[int, dict[str, Any]]) -> None:
    """Per-step columns of the printed summary: probe loss, ||∇L||², μ_t, β (early_stage)."""
    if "early_stage" in results:
        for r in results["early_stage"].to_pylist():
            row = by_step.setdefault(r["step"], {})
            row.update({"loss": round(r["loss"], 4), "|∇L|²": float(f"{r['grad_norm_sq']:.3g}"),
                        "μ_t": float(f"{r['mu']:.3g}"), "β": float(f"{r['beta']:.3g}")})


def write_plot(run: Run, name: str, png: bytes) -> str:
    """``analysis/plots/<name>.png``; an earlier plot is moved to ``analysis/previous/``, never lost."""
    rel = f"{ANALYSIS}/plots/{name}.png"
    loc = run.loc
    if loc.exists(rel):
        loc.mkdir(f"{ANALYSIS}/previous")
        loc.fs.move(loc.join(rel), loc.join(f"{ANALYSIS}/previous/{name}-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**6}.png"))
    loc.mkdir(f"{ANALYSIS}/plots")
    loc.write_bytes_atomic(rel, png)
    return loc.join(rel)


def plot_partitions(t: pa.Table, split: str = "train") -> bytes:
    """Class sizes over steps, one panel per layer (the ``split`` probe split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = t.filter(pc.equal(t.column("split"), split)) if split in t.column("split").to_pylist() else t
    layers = list(dict.fromkeys(t.column("layer").to_pylist()))
    fig, axes = plt.subplots(1, max(1, len(layers)), figsize=(4.2 * max(1, len(layers)), 3.4), squeeze=False)
    rows = t.to_pylist()
    color = {c: f"C{i % 10}" for i, c in enumerate(sorted({r["partition"] for r in rows}))}  # same in every panel
    for ax, layer in zip(axes[0], layers):
        sub = [r for r in rows if r["layer"] == layer]
        steps = sorted({r["step"] for r in sub})
        for c in color:
            by = {r["step"]: r["n_neurons"] for r in sub if r["partition"] == c}
            ax.plot([max(s, 0.5) for s in steps], [by.get(s, 0) for s in steps], marker=".", label=c, color=color[c])
        ax.set_xscale("log")
        ax.set_title(layer)
        ax.set_xlabel("step (0 drawn at 0.5)")
        ax.set_ylabel("neurons")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def plot_early(t: pa.Table) -> bytes:
    """Observed probe loss vs. the predicted upper bounds; ||∇L||² vs. its lower bounds; μ_t and β."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = {c: np.asarray(t.column(c).to_numpy(zero_copy_only=False), dtype=np.float64) for c in
         ("step", "loss", "pred_gd", "pred_mu", "pred_step", "batch_loss", "grad_norm_sq", "lb_total", "lb_partition",
          "lb_mu", "mu", "beta") if c in t.column_names}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    s = d["step"]
    ax = axes[0]
    ax.plot(s, d["loss"], "k-o", ms=3, label="observed probe loss")
    for c, style in (("pred_gd", "--"), ("pred_mu", ":"), ("pred_step", "-.")):
        if c in d:
            ax.plot(s, d[c], style, label=c)
    if "batch_loss" in d:
        ax.plot(s, d["batch_loss"], ".", color="grey", label="batch loss (steps table)")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(fontsize=7), ax.set_title("loss vs. predicted upper bounds")
    ax = axes[1]
    for c in ("grad_norm_sq", "lb_total", "lb_partition", "lb_mu"):
        ax.semilogy(s, np.where(d[c] > 0, d[c], np.nan), label=c)
    ax.set_xlabel("step"), ax.legend(fontsize=7), ax.set_title("||∇L||² and its lower bounds")
    ax = axes[2]
    ax.plot(s, d["mu"], label="μ_t")
    ax2 = ax.twinx()
    ax2.plot(s, d["beta"], "r", label="β")
    ax.set_xlabel("step"), ax.set_ylabel("μ_t"), ax2.set_ylabel("β", color="r"), ax.set_title("μ_t (0 = vacuous bound) and β")
    fig.tight_layout()
    return _png(fig)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
