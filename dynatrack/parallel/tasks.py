"""The work of one Ray task: read a step range of a run, call the pure analyzers.

These are plain functions (no Ray here); :mod:`dynatrack.parallel.analyze`
turns them into Ray tasks. Each reads what it needs from the run directory
itself, so only the run path and a step list travel to the worker, and loads
each checkpoint once.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from dynatrack.analysis import patterns as pat
from dynatrack.store.reader import Run, RunError, binary_rows, open_run

NETWORK = "__network__"  # the layer name of whole-network (concatenated) patterns


@dataclass(frozen=True)
class AnalyzeConfig:
    """What to compute. Every field can be set from ``configs/analyze.yaml``."""

    analyzers: tuple[str, ...] = ("patterns", "regions", "local_complexity")
    split: str = "train"  # probe split for regions / local complexity
    steps: tuple[int, ...] | None = None  # default: every recorded (patterns) or checkpointed (weights) step
    n_slices: int = 2  # 2-D slices through three probe samples (first samples of classes 0, 1, 2, ...)
    n_segments: int = 8  # 1-D segments between pairs of probe samples
    boundary_samples: int = 128  # probe samples whose distance to the nearest boundary is computed
    lc_samples: int = 128  # probe samples around which local complexity is counted
    lc_radii: tuple[float, ...] = (0.01, 0.05, 0.2)
    lc_directions: int = 8
    churn: bool = True  # pattern churn and per-neuron flips (needs the previous step's rows too)
    network: bool = True  # whole-network patterns (all recorded layers concatenated)
    seed: int = 0
    # import manifest.model.class_path where the run stores no usable model description:
    # runs code named in the run directory, so only for a run directory you trust
    trust_model_code: bool = False
    # early_stage (dynatrack/parallel/early.py): the loss the run was trained with, on the probe split
    loss: str = "cross_entropy"  # cross_entropy | mse (torch mse_loss; one-hot targets when >1 output)
    beta_iters: int = 30  # power-iteration steps for the smoothness estimate β
    early_lr: float | None = None  # step size η of the bounds; default: the steps table's lr
    early_min_samples: int = 32  # smallest probe split that may stand in for the training set
    early_loss_ratio: float = 0.5  # the early stage ends at the first step with L(t) <= ratio * L(0)
    zonotope_samples: int = 256  # zonotope (dynatrack/parallel/zonotope_tasks.py): probe subset of the vertex LP checks
    zonotope_qp_samples: int = 64  # ... of the fixed-pattern problem (a dense QP: keep samples x neurons small)
    expressiveness_samples: int = 512  # expressiveness: probe subset (memory grows with its square)

    def __post_init__(self) -> None:
        unknown = set(self.analyzers) - set(ANALYZERS)
        if unknown:
            raise ValueError(f"unknown analyzers {sorted(unknown)}; choose from {list(ANALYZERS)}")
        for name in ("n_slices", "n_segments", "boundary_samples", "lc_samples", "lc_directions", "zonotope_samples",
                     "zonotope_qp_samples", "expressiveness_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.loss not in ("cross_entropy", "mse"):
            raise ValueError(f"loss must be cross_entropy or mse, got {self.loss!r}")
        if any(not r > 0 for r in self.lc_radii):
            raise ValueError(f"lc_radii must be positive, got {self.lc_radii}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AnalyzeConfig":
        known = {f for f in cls.__dataclass_fields__}
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown analysis settings {sorted(bad)}; known: {sorted(known)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ANALYZERS = ("patterns", "regions", "local_complexity", "early_stage", "partitions", "zonotope", "expressiveness")


# -- patterns ---------------------------------------------------------------------------


def pattern_task(
    run_dir: str, steps: Sequence[int], prev_step: int | None, churn: bool = True, network: bool = True
) -> dict[str, pa.Table]:
    """Distinct counts and churn for ``steps`` (plus churn against ``prev_step`` for the first).

    Reads all ranks' probe rows of those steps (row groups pruned on ``step``).
    Returns tables ``patterns`` (per step, layer, split: counts) and
    ``pattern_flips`` (per step, layer, split, neuron: flips since the previous recorded step).
    """
    run = open_run(run_dir)
    prev_step = prev_step if churn else None
    wanted = sorted(set(steps) | ({prev_step} if prev_step is not None else set()))
    # A step range, not isin: row groups whose statistics lie inside it skip the filter
    # kernel (isin filters and copies every row); pattern_stats drops the rows of
    # unwanted steps inside the range. sample_id only for churn / whole-network patterns.
    expr = (ds.field("step") >= wanted[0]) & (ds.field("step") <= wanted[-1])
    if not run.only_value("patterns", "source", "probe"):
        expr = (ds.field("source") == "probe") & expr
    t = run.table(
        "patterns",
        filter=expr,
        columns=["step", "layer", "split", *(["sample_id"] if churn or network else []), "bits"],
        dictionary_strings=True,
        with_rank=False,
    )
    return pattern_stats(t, run.widths, steps, prev_step, churn=churn, network=network)


def pattern_stats(
    t: pa.Table, widths: dict[str, int], steps: Sequence[int], prev_step: int | None, *, churn: bool = True,
    network: bool = True,
) -> dict[str, pa.Table]:
    """The pattern analyzer on an in-memory table of probe rows (see :func:`pattern_task`)."""
    steps = sorted(int(s) for s in steps)
    all_steps = sorted(set(steps) | ({prev_step} if prev_step is not None else set()))
    step_col = t.column("step").to_numpy()
    keep = np.isin(step_col, np.asarray(all_steps, dtype=np.int64))
    if not keep.all():  # rows of other steps inside the range that pattern_task read
        t = t.filter(pa.array(keep))
        step_col = step_col[keep]
    # dictionary_encode() returns a DictionaryArray (as read with dictionary_strings=True) unchanged
    layer_col = t.column("layer").combine_chunks().dictionary_encode()
    split_col = t.column("split").combine_chunks().dictionary_encode()
    layer_names = layer_col.dictionary.to_pylist()
    split_names = split_col.dictionary.to_pylist()
    layer_codes = layer_col.indices.to_numpy()
    split_codes = split_col.indices.to_numpy()
    ids_col = t.column("sample_id").to_numpy() if "sample_id" in t.column_names else None
    bits_col = t.column("bits")
    step_codes = np.searchsorted(np.asarray(all_steps, dtype=np.int64), step_col)

    rows: dict[str, list[Any]] = {k: [] for k in (
        "step", "layer", "split", "n_samples", "n_distinct", "n_shared",
        "churn_samples", "churn_changed", "churn_hamming_sum", "width")}
    flips: dict[str, list[Any]] = {k: [] for k in ("step", "layer", "split", "neuron", "flips")}
    # per (layer, split, step): sorted (ids, bits), kept for churn and the whole-network patterns
    per: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]] = {}
    ordered_layers = [name for name in widths if name in layer_names]
    need_rows = churn or (network and len(ordered_layers) > 1)
    if not need_rows:
        # counts only: one distinct_counts per byte width over all its layers, group =
        # (layer, step, split); no per-layer copy of the bits when all layers share a width
        _counts_by_width(rows, t, widths, layer_names, layer_codes, step_codes * len(split_names) + split_codes,
                         all_steps, steps, split_names)
        ordered_layers = []
    for layer in ordered_layers:
        li = layer_names.index(layer)
        width = widths[layer]
        sel = np.flatnonzero(layer_codes == li)
        if not len(sel):
            continue
        bits = binary_rows(bits_col.take(pa.array(sel)), (width + 7) // 8)
        group = step_codes[sel] * len(split_names) + split_codes[sel]
        counts = pat.distinct_counts(bits, group)
        for g, n, nd, ns in zip(counts.group, counts.n_samples, counts.n_distinct, counts.n_shared):
            step = all_steps[int(g) // len(split_names)]
            split = split_names[int(g) % len(split_names)]
            if step in steps:
                _add_count_row(rows, step, layer, split, n, nd, ns, width)
        if not need_rows:
            continue  # nothing else needs the per-group rows
        order = np.lexsort((ids_col[sel], group))
        g_sorted = group[order]
        bounds = np.flatnonzero(np.diff(g_sorted)) + 1
        for chunk in np.split(order, bounds):
            if not len(chunk):
                continue
            g = int(group[chunk[0]])
            key = (layer, split_names[g % len(split_names)], all_steps[g // len(split_names)])
            per[key] = (ids_col[sel][chunk], bits[chunk])
    # whole network: layers concatenated per sample
    if network and len(ordered_layers) > 1:
        for split in split_names:
            for step in all_steps:
                parts = [per.get((layer, split, step)) for layer in ordered_layers]
                if any(p is None for p in parts):
                    continue
                ids, bits, width = pat.concat_layers(parts, [widths[name] for name in ordered_layers])  # type: ignore[arg-type]
                per[(NETWORK, split, step)] = (ids, bits)
                if step in steps:
                    c = pat.distinct_counts(bits)
                    _add_count_row(rows, step, NETWORK, split, c.n_samples[0], c.n_distinct[0], c.n_shared[0], width)
    # churn between consecutive recorded steps
    all_widths = {**widths, NETWORK: sum(widths[name] for name in ordered_layers)}
    for (layer, split, step), (ids, bits) in list(per.items()) if churn else []:
        if step not in steps:
            continue
        i = all_steps.index(step)
        before = per.get((layer, split, all_steps[i - 1])) if i > 0 else None
        k = _row_index(rows, step, layer, split)
        if before is None:
            continue
        common, (ia, ib) = pat.align(before[0], ids)
        state = pat.churn_update(pat.churn_init(all_widths[layer]), before[1][ia], bits[ib])
        rows["churn_samples"][k] = state.n_samples
        rows["churn_changed"][k] = state.n_changed
        rows["churn_hamming_sum"][k] = state.hamming_sum
        if layer != NETWORK:
            w = all_widths[layer]
            flips["step"].extend([step] * w)
            flips["layer"].extend([layer] * w)
            flips["split"].extend([split] * w)
            flips["neuron"].extend(range(w))
            flips["flips"].extend(state.flips.tolist())
    counts_table = pa.table(rows, schema=PATTERN_COUNTS)
    flips_table = pa.table(flips, schema=PATTERN_FLIPS)
    return {"patterns": counts_table, "pattern_flips": flips_table}


def _counts_by_width(
    rows: dict[str, list[Any]], t: pa.Table, widths: dict[str, int], layer_names: list[str], layer_codes: np.ndarray,
    step_split: np.ndarray, all_steps: list[int], steps: list[int], split_names: list[str],
) -> None:
    n_ss = len(all_steps) * len(split_names)
    by_bytes: dict[int, list[int]] = {}
    for li, name in enumerate(layer_names):
        if name in widths:
            by_bytes.setdefault((widths[name] + 7) // 8, []).append(li)
    bits_col = t.column("bits")
    for nbytes, lis in by_bytes.items():
        if len(lis) == len(layer_names):  # every row has this width: the bits as stored, no gather
            sel, bits = None, binary_rows(bits_col, nbytes)
        else:
            sel = np.flatnonzero(np.isin(layer_codes, lis))
            bits = binary_rows(bits_col.take(pa.array(sel)), nbytes)
        group = layer_codes.astype(np.int64) * n_ss + step_split
        counts = pat.distinct_counts(bits, group if sel is None else group[sel])
        for g, n, nd, ns in zip(counts.group.tolist(), counts.n_samples.tolist(), counts.n_distinct.tolist(),
                                counts.n_shared.tolist()):
            li, rest = divmod(g, n_ss)
            step, split = all_steps[rest // len(split_names)], split_names[rest % len(split_names)]
            if step in steps:
                _add_count_row(rows, step, layer_names[li], split, n, nd, ns, widths[layer_names[li]])


def _add_count_row(rows: dict[str, list[Any]], step: int, layer: str, split: str, n: int, nd: int, ns: int, width: int) -> None:
    for k, v in (("step", step), ("layer", layer), ("split", split), ("n_samples", int(n)),
                 ("n_distinct", int(nd)), ("n_shared", int(ns)), ("churn_samples", None),
                 ("churn_changed", None), ("churn_hamming_sum", None), ("width", int(width))):
        rows[k].append(v)


def _row_index(rows: dict[str, list[Any]], step: int, layer: str, split: str) -> int:
    for i, (s, l, p) in enumerate(zip(rows["step"], rows["layer"], rows["split"])):
        if s == step and l == layer and p == split:
            return i
    raise KeyError((step, layer, split))


PATTERN_COUNTS = pa.schema([
    ("step", pa.int64()), ("layer", pa.string()), ("split", pa.string()),
    ("n_samples", pa.int64()), ("n_distinct", pa.int64()), ("n_shared", pa.int64()),
    ("churn_samples", pa.int64()), ("churn_changed", pa.int64()), ("churn_hamming_sum", pa.int64()),
    ("width", pa.int64()),
])
PATTERN_FLIPS = pa.schema([
    ("step", pa.int64()), ("layer", pa.string()), ("split", pa.string()), ("neuron", pa.int32()), ("flips", pa.int64()),
])


# -- weights: regions and local complexity ----------------------------------------------------


class ModelUnavailableError(RunError):
    """Weight analyses cannot get the model: no stored description and no ``trust_model_code``."""


def _import_model(run: Run) -> Any:
    """Import ``manifest.model.class_path`` and call it with ``init_args`` (only under ``trust_model_code``)."""
    spec = run.manifest.get("model") or {}
    path = spec.get("class_path", "") if isinstance(spec, dict) else ""
    module_name, _, cls_name = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise RunError(
            f"--trust-model-code: the model class {path!r} named in {run.path}/manifest.json cannot be imported here "
            f"({exc}); run the analysis where that class is importable (e.g. ray job submit --working-dir .)"
        ) from exc
    try:
        return cls(**{k: v for k, v in (spec.get("init_args") or {}).items() if not k.startswith("_")})
    except TypeError as exc:
        raise RunError(f"cannot rebuild {path} with init_args {spec.get('init_args')}: {exc}; "
                       "call self.save_hyperparameters() in the LightningModule's __init__") from exc


def _description(run: Run) -> dict[str, Any] | None:
    from dynatrack.store.model_desc import read_model_description

    return read_model_description(run.loc)


def _no_model_error(run: Run, what: str) -> ModelUnavailableError:
    path = (run.manifest.get("model") or {}).get("class_path") if isinstance(run.manifest.get("model"), dict) else None
    return ModelUnavailableError(
        f"{what} need the model, but run {run.path!r} stores no model description (model/description.json: "
        "recorded by an older dynatrack, or its writing failed). Either re-record the run with this dynatrack, "
        f"or pass --trust-model-code (Python: trust_model_code=True) to import and call {path!r} as named in its "
        "manifest.json (only for a run directory you trust: that runs its code), or leave them out with "
        "--analyzers patterns"
    )


def load_model(run: Run, step: int, *, trust_model_code: bool = False) -> Any:
    """The recorded model with the weights of checkpoint ``step``, in eval mode, as an ``nn.Module``.

    What weight analyzers call to get a model (the one entry point; nothing named in the
    run directory is imported unless ``trust_model_code``):

    1. the stored Linear/ReLU chain (:class:`dynatrack.analysis.chain.ChainModule`), when
       the model is such a chain and the chain covers every recorded layer;
    2. else the stored ``torch.export`` program (:class:`dynatrack.store.model_desc.ProgramModule`);
    3. else, only with ``trust_model_code=True``, ``manifest.model.class_path(**init_args)``.

    ``model(x)`` gives the model's output for inputs shaped like the probe's;
    ``preactivations(model, layers)(x)`` gives ``{recorded layer: z [n, width]}`` for any of
    the three (the stored ones compute them, the imported class gets hooks).
    Raises :class:`ModelUnavailableError` (saying what to do) when none of these is available,
    :class:`~dynatrack.store.model_desc.ModelDescriptionError` for a stored program it refuses.

    >>> model = load_model(open_run("runs/<run_id>"), 100)      # doctest: +SKIP
    >>> logits, z = model(x), preactivations(model, ["net.1"])(x)   # doctest: +SKIP
    """
    from dynatrack.analysis.chain import ChainModule

    desc = _description(run)
    state = None
    if desc is not None:
        chain, program = desc["chain"], desc["program"]
        recorded = [layer["name"] for layer in run.layers]
        state = run.checkpoint(step)
        if chain.get("status") == "ok":
            module = ChainModule(chain["steps"], state)
            if set(recorded) <= set(module.names) or program.get("status") != "ok":
                return module.eval()
        if program.get("status") == "ok":
            from dynatrack.store.model_desc import program_module

            return program_module(run.loc, desc, state).eval()
    if not trust_model_code:
        if desc is None:
            raise _no_model_error(run, "weight analyses")
        raise ModelUnavailableError(
            f"run {run.path!r} stores no usable model: not a Linear/ReLU chain ({desc['chain'].get('reason')}) and not "
            f"exported ({desc['program'].get('reason')}); pass --trust-model-code to import the class its manifest names "
            "(only for a run directory you trust)")
    model = _import_model(run)
    model.load_state_dict(state if state is not None else run.checkpoint(step))
    return model.eval()


def preactivations(model: Any, layers: Sequence[str] | None = None) -> Any:
    """``x -> {layer: pre-activation [n, width]}`` for a module from :func:`load_model`."""
    from dynatrack.analysis import local_complexity as lcx

    if hasattr(model, "preactivations"):
        fn = model.preactivations
        return fn if layers is None else (lambda x: {k: v for k, v in fn(x).items() if k in set(layers)})
    return lcx.preactivation_fn(model, [name for name in layers or [] if "@" not in name] or None)


def region_chain(run: Run, step: int, *, trust_model_code: bool = False) -> list[Any]:
    """The chain of affine maps and activations at checkpoint ``step`` (``regions.AffineLayer`` list).

    From the stored chain description; with ``trust_model_code`` and no description, traced
    from the imported class. Raises :class:`~dynatrack.analysis.regions.UnsupportedModelError`
    with the reason when the model is not such a chain (the regions analyzer then skips).
    """
    from dynatrack.analysis import regions as reg
    from dynatrack.analysis.chain import chain_layers

    desc = _description(run)
    if desc is not None:
        chain = desc["chain"]
        if chain.get("status") != "ok":
            raise reg.UnsupportedModelError(chain.get("reason") or "the model is not a Linear/ReLU chain")
        try:
            return chain_layers(chain["steps"], run.checkpoint(step))
        except KeyError as exc:
            raise RunError(f"checkpoint step={step} of {run.path!r} does not fit the stored chain: {exc}") from exc
    if not trust_model_code:
        raise _no_model_error(run, "region analyses")
    model = _import_model(run)
    model.load_state_dict(run.checkpoint(step))
    return reg.piecewise_linear_layers(model.eval(), _input_shape(run))


def _input_shape(run: Run) -> list[int]:
    desc_shape = (run.manifest.get("probe") or {}).get("input_shape")
    return list(desc_shape) if desc_shape else [1]


# What each analyzer needs of the model: "chain" (the affine/activation chain: exact region
# geometry) or "model" (any forward with pre-activations). An analyzer listed here is skipped
# with the reason when its need cannot be met; add new weight analyzers here.
MODEL_NEEDS: dict[str, str] = {"regions": "chain", "local_complexity": "model"}


def weight_analyzers_support(run: Run, analyzers: Sequence[str], step: int, *, trust_model_code: bool = False) -> dict[str, str]:
    """``{analyzer: reason}`` for each analyzer of :data:`MODEL_NEEDS` in ``analyzers`` that cannot run on this model.

    Called before Ray starts (loads the checkpoint of ``step`` once per need). Raises
    :class:`ModelUnavailableError` (what to do) when the run has no description and
    ``trust_model_code`` is off.
    """
    from dynatrack.analysis import regions as reg
    from dynatrack.store.model_desc import ModelDescriptionError

    wanted = [a for a in analyzers if a in MODEL_NEEDS]
    if not wanted:
        return {}
    if _description(run) is None and not trust_model_code:
        raise _no_model_error(run, f"the analyzers {wanted}")
    reasons: dict[str, str | None] = {}
    if any(MODEL_NEEDS[a] == "chain" for a in wanted):
        try:
            region_chain(run, step, trust_model_code=trust_model_code)
            reasons["chain"] = None
        except reg.UnsupportedModelError as exc:
            reasons["chain"] = f"the model is not a chain of Linear and ReLU-family modules: {exc}"
    if any(MODEL_NEEDS[a] == "model" for a in wanted):
        try:
            load_model(run, step, trust_model_code=trust_model_code)
            reasons["model"] = None
        except (ModelUnavailableError, reg.UnsupportedModelError) as exc:
            reasons["model"] = str(exc)
        except ModelDescriptionError as exc:
            reasons["model"] = f"the stored model is refused: {exc}"
    return {a: reasons[MODEL_NEEDS[a]] for a in wanted if reasons[MODEL_NEEDS[a]]}  # type: ignore[misc]


def _probe_points(run: Run, split: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    ids, labels, x = run.probe_inputs(split)
    return ids, labels, x.reshape(len(x), -1).astype(np.float64)


def choose_triples(labels: np.ndarray | None, n: int, count: int, seed: int) -> list[tuple[int, int, int]]:
    """Hanin & Rolnick's slices: three samples of classes (0, 1, 2), then (3, 4, 5), ...; random without labels."""
    rng = np.random.default_rng(seed)
    out: list[tuple[int, int, int]] = []
    if labels is not None:
        classes = sorted(set(labels.tolist()))
        firsts = {c: np.flatnonzero(labels == c) for c in classes}
        k = 0
        while len(out) < count and len(classes) >= 3:
            trio = [classes[(k + j) % len(classes)] for j in range(3)]
            rep = k // len(classes)
            if any(rep >= len(firsts[c]) for c in trio):
                break
            out.append(tuple(int(firsts[c][rep]) for c in trio))  # type: ignore[arg-type]
            k += 3
    while len(out) < count and n >= 3:
        out.append(tuple(int(i) for i in rng.choice(n, 3, replace=False)))  # type: ignore[arg-type]
    return out


def weights_task(run_dir: str, steps: Sequence[int], config: dict[str, Any], which: Sequence[str]) -> dict[str, pa.Table]:
    """Regions and/or local complexity for checkpointed ``steps`` (each checkpoint loaded once)."""
    import torch

    from dynatrack.analysis import local_complexity as lcx
    from dynatrack.analysis import regions as reg

    torch.set_num_threads(1)
    cfg = AnalyzeConfig.from_dict(config)
    run = open_run(run_dir)
    ids, labels, x = _probe_points(run, cfg.split)
    input_shape = (run.manifest.get("probe") or {}).get("input_shape") or [x.shape[1]]
    triples = choose_triples(labels, len(x), cfg.n_slices, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    pairs = [tuple(rng.choice(len(x), 2, replace=False)) for _ in range(cfg.n_segments)] if len(x) >= 2 else []
    b_idx = np.arange(min(cfg.boundary_samples, len(x)))
    lc_idx = np.arange(min(cfg.lc_samples, len(x)))
    region_rows: dict[str, list[Any]] = {k: [] for k in REGIONS.names}
    dist_rows: dict[str, list[Any]] = {k: [] for k in BOUNDARY.names}
    lc_rows: dict[str, list[Any]] = {k: [] for k in LOCAL_COMPLEXITY.names}
    trust = cfg.trust_model_code
    recorded = [layer["name"] for layer in run.layers]
    for step in steps:
        if "regions" in which:
            layers = region_chain(run, step, trust_model_code=trust)
            n_hidden = int(sum(layer.width for layer in reg.hidden_layers(layers)))
            for k, (i, j) in enumerate(pairs):
                c = reg.count_regions_1d(layers, x[i], x[j]).count
                _append(region_rows, step=step, kind="1d", item=k, samples=[int(ids[i]), int(ids[j])],
                        count=int(c), n_hidden=n_hidden, normalized=float(reg.normalized_count(c, n_hidden, 1)))
            for k, (a, b, c3) in enumerate(triples):
                sl = reg.slice_through(x[a], x[b], x[c3])
                c = reg.count_regions_2d(layers, sl.origin, sl.u1, sl.u2).count
                _append(region_rows, step=step, kind="2d", item=k, samples=[int(ids[a]), int(ids[b]), int(ids[c3])],
                        count=int(c), n_hidden=n_hidden, normalized=float(reg.normalized_count(c, n_hidden, 2)))
            if len(b_idx):
                bd = reg.distance_to_boundary(layers, x[b_idx])
                dist_rows["step"].extend([step] * len(b_idx))
                dist_rows["split"].extend([cfg.split] * len(b_idx))
                dist_rows["sample_id"].extend(ids[b_idx].tolist())
                dist_rows["distance"].extend(np.asarray(bd.distance, dtype=np.float64).tolist())
        if "local_complexity" in which and len(lc_idx) and cfg.lc_directions:
            xs = torch.as_tensor(x[lc_idx].reshape(len(lc_idx), *input_shape), dtype=torch.float32)
            p = min(cfg.lc_directions, x.shape[1])
            model = load_model(run, step, trust_model_code=trust)
            with torch.no_grad():
                res = lcx.local_complexity(preactivations(model, recorded), xs, cfg.lc_radii, p, seed=cfg.seed)
            for li, layer in enumerate(res.layers):
                for ri, r in enumerate(res.radii):
                    _append(lc_rows, step=step, layer=layer, split=cfg.split, radius=float(r),
                            lc_sum=int(res.counts[li, ri]), n_samples=int(res.n_samples), width=int(res.widths[li]))
    out = {}
    if "regions" in which:
        out["regions"] = pa.table(region_rows, schema=REGIONS)
        out["boundary_distance"] = pa.table(dist_rows, schema=BOUNDARY)
    if "local_complexity" in which:
        out["local_complexity"] = pa.table(lc_rows, schema=LOCAL_COMPLEXITY)
    return out


def _append(rows: dict[str, list[Any]], **values: Any) -> None:
    for k, v in values.items():
        rows[k].append(v)


REGIONS = pa.schema([
    ("step", pa.int64()), ("kind", pa.string()), ("item", pa.int32()), ("samples", pa.list_(pa.int64())),
    ("count", pa.int64()), ("n_hidden", pa.int64()), ("normalized", pa.float64()),
])
BOUNDARY = pa.schema([("step", pa.int64()), ("split", pa.string()), ("sample_id", pa.int64()), ("distance", pa.float64())])
LOCAL_COMPLEXITY = pa.schema([
    ("step", pa.int64()), ("layer", pa.string()), ("split", pa.string()), ("radius", pa.float64()),
    ("lc_sum", pa.int64()), ("n_samples", pa.int64()), ("width", pa.int64()),
])
