"""PNG plots of a run and its analyses: tables and arrays in, PNG files out.

Pure plotting with matplotlib's Agg backend (no display, no W&B, no reading of run
directories): every function takes Arrow tables or numpy arrays and writes one PNG to
``path`` (a filesystem path or a binary file object), then closes its figure.
:mod:`dynatrack.tracking.dashboard` calls them for ``runs/<run_id>/plots/`` and the W&B run.

>>> import pyarrow as pa, io
>>> buf = io.BytesIO()
>>> plot_training(pa.table({"step": [0, 1, 2], "loss": [2.3, 1.9, 1.5],
...                         "lr": [1e-3] * 3, "grad_norm": [4.0, 3.1, 2.2]}), buf)
>>> buf.getvalue()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True

Figures:

* :func:`plot_training`: loss, learning rate and gradient norm against the training step.
* :func:`plot_patterns`: distinct activation patterns per layer (and the whole network).
* :func:`plot_regions`: exact region counts (mean over segments / slices) and N^d/d!-normalized counts.
* :func:`plot_local_complexity`: mean local complexity per layer, one line per radius.
* :func:`plot_partitions`: neuron-partition class sizes per layer, stacked over training.
* :func:`plot_slices`: the linear regions of one 2-D input slice at several steps, each region a
  filled polygon in a colour derived from its activation pattern (Hanin & Rolnick 2019, Fig. 1).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import IO, Any

import numpy as np
import pyarrow as pa

PathLike = str | os.PathLike[str] | IO[bytes]

DPI = 110


def _figure(n_panels: int, *, width: float = 4.2, height: float = 3.2, ncols: int | None = None) -> tuple[Any, list[Any]]:
    # matplotlib.figure.Figure with the Agg canvas: no pyplot state, no GUI backend, thread-safe enough
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = ncols or min(n_panels, 3)
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig: Any, path: PathLike) -> None:
    fig.savefig(path, format="png")


def _col(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False))


def _groups(table: pa.Table, keys: Sequence[str]) -> list[tuple[tuple[Any, ...], np.ndarray]]:
    """Row indices per distinct value combination of ``keys``, sorted by the key values."""
    cols = [table.column(k).to_pylist() for k in keys]
    out: dict[tuple[Any, ...], list[int]] = {}
    for i, key in enumerate(zip(*cols)):
        out.setdefault(key, []).append(i)
    return [(k, np.asarray(v)) for k, v in sorted(out.items(), key=lambda kv: tuple(map(str, kv[0])))]


def _step_axis(ax: Any, steps: np.ndarray) -> None:
    ax.set_xlabel("training step")
    if steps.size and steps.min() >= 0 and steps.max() > 50 * max(1, np.min(steps[steps > 0], initial=steps.max())):
        ax.set_xscale("symlog", linthresh=1)
    if steps.size:
        ax.set_xlim(float(steps.min()), float(steps.max()) if steps.max() > steps.min() else float(steps.min()) + 1)
    ax.grid(alpha=0.3)


def plot_training(steps: pa.Table, path: PathLike) -> None:
    """Loss, learning rate and gradient norm against the step.

    ``steps``: columns ``step``, ``loss``, ``lr``, ``grad_norm`` (one row per step; nulls skipped).
    """
    metrics = [m for m in ("loss", "lr", "grad_norm") if m in steps.column_names]
    if not metrics:
        raise ValueError(f"plot_training: no loss/lr/grad_norm column in {steps.column_names}")
    fig, axes = _figure(len(metrics))
    step = _col(steps, "step")
    labels = {"loss": "training loss (batch)", "lr": "learning rate", "grad_norm": "gradient norm (L2)"}
    for ax, m in zip(axes, metrics):
        y = np.asarray(steps.column(m).to_numpy(zero_copy_only=False), dtype=float)
        order = np.argsort(step)
        ax.plot(step[order], y[order], marker=".", ms=3)
        ax.set_ylabel(labels[m])
        ax.set_title(labels[m])
        _step_axis(ax, step)
    _save(fig, path)


def plot_patterns(patterns: pa.Table, path: PathLike, *, metric: str = "distinct") -> None:
    """Distinct patterns per layer against the step, one panel per split.

    ``patterns``: columns ``step``, ``layer``, ``split`` and ``metric``.
    """
    splits = sorted(set(patterns.column("split").to_pylist()))
    fig, axes = _figure(len(splits))
    for ax, split in zip(axes, splits):
        for (layer, sp), idx in _groups(patterns, ["layer", "split"]):
            if sp != split:
                continue
            step, y = _col(patterns, "step")[idx], _col(patterns, metric)[idx].astype(float)
            order = np.argsort(step)
            ax.plot(step[order], y[order], marker=".", ms=3, label=str(layer),
                    lw=2.2 if layer == "network" else 1.2)
        ax.set_title(f"distinct activation patterns ({split} probe)")
        ax.set_ylabel("distinct patterns")
        _step_axis(ax, _col(patterns, "step"))
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_regions(regions: pa.Table, path: PathLike) -> None:
    """Exact linear-region counts against the step.

    ``regions``: the ``analysis/regions.parquet`` table (``step``, ``kind``, ``count``,
    ``normalized``); one line per kind (``1d`` segments, ``2d`` slices), the mean over items
    with the min–max band. Left: counts; right: counts / (N^d / d!).
    """
    fig, axes = _figure(2)
    for (kind,), idx in _groups(regions, ["kind"]):
        step = _col(regions, "step")[idx]
        for ax, col in zip(axes, ("count", "normalized")):
            y = _col(regions, col)[idx].astype(float)
            steps = np.unique(step)
            mean = np.array([y[step == s].mean() for s in steps])
            lo = np.array([y[step == s].min() for s in steps])
            hi = np.array([y[step == s].max() for s in steps])
            ax.plot(steps, mean, marker=".", label=f"{kind} (mean)")
            ax.fill_between(steps, lo, hi, alpha=0.2)
    axes[0].set_title("linear regions (exact count)")
    axes[0].set_ylabel("regions per segment / slice")
    if all(_col(regions, "count") > 0):
        axes[0].set_yscale("log")  # segments count tens, slices thousands
    axes[1].set_title("regions / (N^d / d!)")
    axes[1].set_ylabel("normalized count")
    for ax in axes:
        _step_axis(ax, _col(regions, "step"))
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_local_complexity(lc: pa.Table, path: PathLike) -> None:
    """Mean local complexity (crossing neurons per sample) per layer, one line per radius.

    ``lc``: the ``analysis/local_complexity.parquet`` table (``step``, ``layer``, ``radius``,
    ``lc_sum``, ``n_samples``); the mean is ``lc_sum / n_samples``.
    """
    layers = sorted(set(lc.column("layer").to_pylist()))
    fig, axes = _figure(len(layers))
    for ax, layer in zip(axes, layers):
        for (ly, radius), idx in _groups(lc, ["layer", "radius"]):
            if ly != layer:
                continue
            step = _col(lc, "step")[idx]
            mean = _col(lc, "lc_sum")[idx] / np.maximum(_col(lc, "n_samples")[idx], 1)
            order = np.argsort(step)
            ax.plot(step[order], mean[order], marker=".", ms=3, label=f"r = {radius:g}")
        ax.set_title(f"local complexity, {layer}")
        ax.set_ylabel("neurons crossing the neighbourhood")
        _step_axis(ax, _col(lc, "step"))
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_partitions(counts: pa.Table, path: PathLike) -> None:
    """Neuron-partition class sizes per layer, stacked against the step.

    ``counts``: columns ``step``, ``layer``, ``partition``, ``neurons`` (one split's rows).
    """
    layers = sorted(set(counts.column("layer").to_pylist()))
    labels = sorted(set(counts.column("partition").to_pylist()))
    fig, axes = _figure(len(layers))
    for ax, layer in zip(axes, layers):
        idx = np.flatnonzero(np.asarray(counts.column("layer").to_pylist(), dtype=object) == layer)
        step = _col(counts, "step")[idx]
        part = np.asarray(counts.column("partition").to_pylist(), dtype=object)[idx]
        n = _col(counts, "neurons")[idx]
        steps = np.unique(step)
        stack = np.zeros((len(labels), steps.size))
        for li, label in enumerate(labels):
            for si, s in enumerate(steps):
                stack[li, si] = n[(step == s) & (part == label)].sum()
        ax.stackplot(steps, stack, labels=labels, alpha=0.85, step="post")
        splits = sorted(set(counts.column("split").to_pylist())) if "split" in counts.column_names else []
        ax.set_title(f"neuron partitions, {layer}" + (f" ({', '.join(splits)} probe)" if splits else ""))
        ax.set_ylabel("neurons")
        _step_axis(ax, steps)
        ax.legend(fontsize=7, loc="upper right")
    _save(fig, path)


def pattern_colors(patterns: np.ndarray) -> np.ndarray:
    """One RGB colour per region, ``float[count, 3]``, derived from its activation pattern.

    The same pattern gets the same colour in every panel and at every step (a BLAKE2 hash
    of the packed bits); colours of distinct patterns in one call are made distinct (a
    re-hash, in sorted pattern order, on the rare 24-bit collision), and none is near white.

    >>> c = pattern_colors(np.array([[True, False], [False, True], [True, False]]))
    >>> bool((c[0] == c[2]).all()), bool((c[0] != c[1]).any())
    (True, True)
    """
    patterns = np.asarray(patterns, dtype=bool)
    packed = np.packbits(patterns, axis=1)
    seen: dict[tuple[int, int, int], bytes] = {}
    colour: dict[bytes, np.ndarray] = {}
    for key in sorted({row.tobytes() for row in packed}):  # sorted: the result does not depend on row order
        salt = 0
        while True:
            h = hashlib.blake2b(key + salt.to_bytes(4, "little"), digest_size=3).digest()
            rgb = tuple(40 + b * 180 // 255 for b in h)  # channels in [40, 220]: never white or black
            owner = seen.get(rgb)  # type: ignore[arg-type]
            if owner is None or owner == key:
                seen[rgb] = key  # type: ignore[index]
                break
            salt += 1
        colour[key] = np.asarray(rgb) / 255.0
    return np.array([colour[row.tobytes()] for row in packed]).reshape(len(packed), 3)


def draw_slice(ax: Any, vertices: Sequence[np.ndarray], patterns: np.ndarray, *,
               points: np.ndarray | None = None, edges: bool = True) -> Any:
    """Fill each region polygon (``[k, 2]`` vertices in the slice's (s, t) coordinates).

    Returns the ``PolyCollection`` drawn (one polygon and one face colour per region).
    ``points`` (``[m, 2]``) marks the probe samples the slice passes through.
    """
    from matplotlib.collections import PolyCollection

    coll = PolyCollection(list(vertices), facecolors=pattern_colors(patterns),
                          edgecolors="k" if edges else "none", linewidths=0.15 if edges else 0.0,
                          antialiased=edges)
    ax.add_collection(coll)
    if points is not None:
        ax.scatter(points[:, 0], points[:, 1], marker="*", s=60, c="w", edgecolors="k", linewidths=0.6, zorder=3)
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    ax.set_aspect("equal")
    return coll


def plot_slices(panels: Sequence[dict[str, Any]], path: PathLike, *, edges: bool = True) -> list[int]:
    """The linear regions of a 2-D input slice at several steps (Hanin & Rolnick 2019, Fig. 1).

    Each panel dict holds ``step``, ``polygons`` (list of ``[k, 2]`` vertex arrays, as
    :meth:`dynatrack.analysis.regions.SliceRegions.polygons` returns), ``patterns``
    (bool ``[count, N]``) and optionally ``points`` (the three probe samples in (s, t)).
    The square is [-1, 1]^2 in the slice's coordinates: half-side 1.25 R around the
    circumcentre of the three samples (R their circumradius).

    Returns the number of distinct face colours drawn per panel (equal to the number of
    regions: colours follow patterns, and a region's pattern is unique in its slice).
    """
    if not panels:
        raise ValueError("plot_slices: no panels")
    fig, axes = _figure(len(panels), width=3.4, height=3.8, ncols=min(len(panels), 4))
    drawn = []
    for ax, panel in zip(axes, panels):
        coll = draw_slice(ax, panel["polygons"], panel["patterns"], points=panel.get("points"), edges=edges)
        faces = np.round(coll.get_facecolors()[:, :3] * 255).astype(int)
        drawn.append(len({tuple(c) for c in faces}))
        ax.set_title(f"step {panel['step']}: {len(panel['polygons'])} regions", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path)
    return drawn
