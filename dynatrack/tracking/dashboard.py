"""What the dashboard of an analysis shows besides the analyzer series: training curves, neuron
partitions, PNG plots (also under ``runs/<run_id>/plots/``) and the workspace layout.

It reads the run directory through :mod:`dynatrack.store`, draws with :mod:`dynatrack.plots`
(pure) and hands everything to :func:`dynatrack.tracking.log_analysis`.

>>> views, dims, counts = run_views(open_run("runs/<run_id>"))   # doctest: +SKIP
>>> sorted(views)                                                # doctest: +SKIP
['partitions', 'train']
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dynatrack.store.reader import Run

log = logging.getLogger(__name__)

PLOTS = "plots"
WORKSPACE_FILE = "wandb_workspace.json"
#: Steps shown in the 2-D slice figure (first, last and evenly spaced positions between).
SLICE_PANELS = 4


# -- series ---------------------------------------------------------------------------------


def train_view(steps: pa.Table) -> pa.Table:
    """Per step: ``loss`` (mean of the ranks' batch losses), ``lr`` and ``grad_norm`` (rank mean).

    With DDP the gradients are all-reduced before the norm is taken, so every rank's
    ``grad_norm`` is the same; ``lr`` is the same on every rank too.

    >>> t = pa.table({"step": [0, 0, 5], "loss": [1.0, 3.0, 0.5], "lr": [0.1, 0.1, 0.1],
    ...               "grad_norm": [2.0, 2.0, 1.0]})
    >>> train_view(t).to_pydict()["loss"]
    [2.0, 0.5]
    """
    metrics = [m for m in ("loss", "lr", "grad_norm") if m in steps.column_names]
    g = steps.select(["step", *metrics]).group_by("step").aggregate([(m, "mean") for m in metrics])
    g = g.sort_by("step")
    return pa.table({"step": g.column("step"), **{m: g.column(f"{m}_mean") for m in metrics}})


def partition_counts(neurons: pa.Table) -> pa.Table:
    """Neurons per partition label: ``step, layer, split, partition, neurons`` (counts).

    ``neurons`` is ``Run.neurons(merged=True)`` (labels of the whole-probe counts).
    """
    g = neurons.group_by(["step", "layer", "split", "partition"]).aggregate([("neuron", "count")])
    g = g.rename_columns(["step", "layer", "split", "partition", "neurons"])
    return g.sort_by([("step", "ascending"), ("layer", "ascending"), ("split", "ascending"),
                      ("partition", "ascending")])


def partition_view(counts: pa.Table) -> pa.Table:
    """Wide form of :func:`partition_counts`: ``step, layer, split`` and one count column per label.

    A label that some step of a (layer, split) has gets 0 at that (layer, split)'s other
    steps, so its line drops to zero instead of stopping.
    """
    rows: dict[tuple[int, str, str], dict[str, int]] = {}
    labels: dict[tuple[str, str], set[str]] = {}
    for step, layer, split, part, n in zip(*(counts.column(c).to_pylist()
                                             for c in ("step", "layer", "split", "partition", "neurons"))):
        rows.setdefault((step, layer, split), {})[part] = n
        labels.setdefault((layer, split), set()).add(part)
    all_labels = sorted({x for v in labels.values() for x in v})
    keys = sorted(rows)
    cols: dict[str, list[Any]] = {"step": [k[0] for k in keys], "layer": [k[1] for k in keys],
                                  "split": [k[2] for k in keys]}
    for label in all_labels:
        cols[label] = [rows[k].get(label, 0 if label in labels[(k[1], k[2])] else None) for k in keys]
    schema = pa.schema([("step", pa.int64()), ("layer", pa.string()), ("split", pa.string()),
                        *[(label, pa.int64()) for label in all_labels]])
    return pa.table(cols, schema=schema)


def run_views(run: Run) -> tuple[dict[str, pa.Table], dict[str, list[str]], pa.Table | None]:
    """The training-run series for W&B: ``train`` (from ``steps``) and ``partitions`` (from ``neurons``),
    their dimension columns, and the long :func:`partition_counts` table (None without neuron rows).

    Keys: ``train/loss``, ``train/lr``, ``train/grad_norm``,
    ``partitions/<layer>/<split>/<label>`` (neurons with that label).
    """
    views: dict[str, pa.Table] = {}
    dims: dict[str, list[str]] = {}
    counts = None
    steps = run.steps()
    if steps.num_rows:
        views["train"] = train_view(steps)
        dims["train"] = []
    neurons = run.neurons(merged=True)
    if neurons.num_rows:
        counts = partition_counts(neurons)
        views["partitions"] = partition_view(counts)
        dims["partitions"] = ["layer", "split"]
    return views, dims, counts


# -- the 2-D slice figure --------------------------------------------------------------------


def slice_steps(steps: Sequence[int], n: int = SLICE_PANELS) -> list[int]:
    """Up to ``n`` of ``steps``: the first, the last and evenly spaced positions between.

    >>> slice_steps([0, 1, 2, 3, 5, 10, 20, 50, 100], 4)
    [0, 3, 10, 100]
    """
    steps = sorted(set(int(s) for s in steps))
    if len(steps) <= n:
        return steps
    idx = np.unique(np.round(np.linspace(0, len(steps) - 1, n)).astype(int))
    return [steps[i] for i in idx]


def slice_panels(run: Run, steps: Sequence[int], *, split: str = "train", seed: int = 0,
                 trust_model_code: bool = False) -> list[dict[str, Any]]:
    """The exact linear regions of the first analysis slice (``regions.parquet`` item 0 of kind 2d)
    at each of ``steps``: ``[{step, polygons, patterns, points, count}]`` for :func:`plots.plot_slices`.

    The slice is the one the regions analyzer counts as item 0 (``choose_triples``: the first
    probe samples of classes 0, 1, 2), through the same model chain
    (:func:`~dynatrack.parallel.tasks.region_chain`: the stored description, never an import
    unless ``trust_model_code``), so each panel's polygon count equals that row's ``count``.
    """
    from dynatrack.analysis import regions as reg
    from dynatrack.parallel.tasks import choose_triples, region_chain

    ids, labels, x = run.probe_inputs(split)
    x = x.reshape(len(x), -1).astype(np.float64)
    triples = choose_triples(labels, len(x), 1, seed)
    if not triples:
        raise ValueError(f"probe split {split!r} has fewer than 3 samples: no 2-D slice")
    a, b, c = triples[0]
    sl = reg.slice_through(x[a], x[b], x[c])
    basis = np.stack([sl.u1, sl.u2])
    points = (x[[a, b, c]] - sl.origin) @ basis.T / (basis**2).sum(axis=1)
    panels = []
    for step in steps:
        layers = region_chain(run, step, trust_model_code=trust_model_code)
        r = reg.count_regions_2d(layers, sl.origin, sl.u1, sl.u2)
        panels.append({"step": int(step), "polygons": r.polygons(), "patterns": r.patterns,
                       "points": points, "count": r.count})
    return panels


# -- PNG files --------------------------------------------------------------------------------


def plot_tables(run: Run, results: Mapping[str, pa.Table], views: Mapping[str, pa.Table],
                partitions: pa.Table | None = None, *, split: str = "train", seed: int = 0,
                trust_model_code: bool = False) -> dict[str, Callable[[io.BytesIO], Any]]:
    """name -> a function drawing that plot into a file object, for the plots this run has data for.

    ``views``: the W&B views (``train``, ``patterns``); ``partitions``: :func:`partition_counts`;
    ``split``/``seed``: the analysis' probe split and seed (the slice is its first 2-D slice).
    """
    from dynatrack import plots

    out: dict[str, Callable[[io.BytesIO], Any]] = {}
    if "train" in views and views["train"].num_rows:
        out["training"] = lambda f: plots.plot_training(views["train"], f)
    if "patterns" in views and views["patterns"].num_rows:
        out["patterns"] = lambda f: plots.plot_patterns(views["patterns"], f)
    if partitions is not None and partitions.num_rows:
        counts = partitions
        splits = sorted(set(counts.column("split").to_pylist()))
        one = counts.filter(pc.equal(counts.column("split"), split if split in splits else splits[0]))
        out["partitions"] = lambda f: plots.plot_partitions(one, f)
    if "regions" in results and results["regions"].num_rows:
        out["regions"] = lambda f: plots.plot_regions(results["regions"], f)
        r2 = results["regions"].filter(pc.equal(results["regions"].column("kind"), "2d"))
        if r2.num_rows:
            steps = slice_steps(r2.column("step").to_pylist())
            out["slices"] = lambda f: plots.plot_slices(
                slice_panels(run, steps, split=split, seed=seed, trust_model_code=trust_model_code), f)
    if "local_complexity" in results and results["local_complexity"].num_rows:
        out["local_complexity"] = lambda f: plots.plot_local_complexity(results["local_complexity"], f)
    return out


def write_plots(run: Run, drawers: Mapping[str, Callable[[io.BytesIO], Any]],
                local_dir: str | Path | None = None) -> dict[str, Path]:
    """Draw each plot into ``<run>/plots/<name>.png``; return name -> a local PNG path (for W&B).

    An earlier plot of the same name moves to ``plots/previous/<name>-<time>.png`` (nothing is
    overwritten). A plot that fails is skipped with a warning naming it and why; the others are
    written. For a run on a remote filesystem, the local copies go to ``local_dir``.
    """
    local = _local_run_dir(run)
    out: dict[str, Path] = {}
    for name, draw in drawers.items():
        buf = io.BytesIO()
        try:
            draw(buf)
        except Exception as exc:  # noqa: BLE001 - one plot never costs the others or the analysis
            log.warning("plot %r of run %s skipped: %s: %s", name, run.run_id, type(exc).__name__, exc)
            continue
        rel = f"{PLOTS}/{name}.png"
        if run.loc.exists(rel):
            _keep_previous(run, name)
        run.loc.write_bytes_atomic(rel, buf.getvalue(), overwrite=True)
        if local is not None:
            out[name] = local / PLOTS / f"{name}.png"
        elif local_dir is not None:
            Path(local_dir).mkdir(parents=True, exist_ok=True)
            out[name] = Path(local_dir) / f"{name}.png"
            out[name].write_bytes(buf.getvalue())
    return out


def _keep_previous(run: Run, name: str) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target, k = f"{PLOTS}/previous/{name}-{stamp}.png", 1
    while run.loc.exists(target):
        target, k = f"{PLOTS}/previous/{name}-{stamp}-{k}.png", k + 1
    run.loc.mkdir(f"{PLOTS}/previous")
    run.loc.fs.move(run.loc.join(PLOTS, f"{name}.png"), run.loc.join(target))


def _local_run_dir(run: Run) -> Path | None:
    import pyarrow.fs as pafs

    return Path(run.loc.path) if isinstance(run.loc.fs, pafs.LocalFileSystem) else None


# -- workspace ----------------------------------------------------------------------------------


def write_workspace(run: Run, keys: Sequence[str], *, project: str, mode: str,
                    entity: str | None = None) -> dict[str, Any]:
    """Write the workspace spec to ``<run>/analysis/wandb_workspace.json``; online with
    ``wandb-workspaces`` installed, also save it to W&B (a warning if that fails)."""
    from dynatrack.store.schema import ANALYSIS
    from dynatrack.tracking.workspace import save_workspace, workspace_spec

    spec = workspace_spec(keys, project=project, name=f"dynatrack {run.run_id}", entity=entity)
    run.loc.write_bytes_atomic(f"{ANALYSIS}/{WORKSPACE_FILE}", (json.dumps(spec, indent=2) + "\n").encode(),
                               overwrite=True)
    if mode == "online" and entity:
        try:
            import wandb_workspaces  # noqa: F401
        except ImportError:
            log.info("wandb-workspaces is not installed: the workspace layout is only in %s "
                     "(pip install 'dynatrack[workspace]')", run.loc.join(ANALYSIS, WORKSPACE_FILE))
            return spec
        try:
            url = save_workspace(spec, entity=entity, project=project)
            log.info("W&B workspace saved: %s", url)
        except Exception as exc:  # noqa: BLE001 - the spec on disk is the record
            log.warning("saving the W&B workspace failed (%s: %s); the layout is in %s",
                        type(exc).__name__, exc, run.loc.join(ANALYSIS, WORKSPACE_FILE))
    return spec
