"""PNG plots of a sweep comparison (matplotlib, Agg backend): a view of the Parquet tables.

- ``metrics_vs_batch.png``: each metric vs the global batch size (log axis), mean ± std over
  seeds as error bars, one line per budget;
- ``patterns_vs_step.png``: pattern statistics over training (train probe split), one line per
  batch size (mean over seeds), one row of panels per budget;
- ``interpolation.png``: loss and accuracy along w(α) = α·w_large + (1 − α)·w_small.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa

PANELS = (("test_acc", "test accuracy"), ("gap_acc", "gap (train − test acc)"), ("gap_loss", "gap (test − train loss)"),
          ("sharpness", "ε-sharpness (%)"), ("hessian_top", "top Hessian eigenvalue"), ("b_simple", "B_simple"),
          ("weight_distance", "‖w_T − w_0‖"), ("distinct_final", "distinct patterns (train, final)"),
          ("churn_total", "pattern churn (flips / sample)"))
STEP_PANELS = (("distinct", "distinct patterns (train)"), ("churn", "churn (mean Hamming / sample)"),
               ("dead", "dead neurons"), ("regions", "2-D regions / (N²/2)"), ("lc", "local complexity"))


def write_plots(tables: Mapping[str, pa.Table], out_dir: Path) -> dict[str, Path]:
    """Write the three PNGs into ``out_dir``; return ``{name: path}``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"metrics_vs_batch": _metrics(tables["compare_by_batch"], out_dir / "metrics_vs_batch.png"),
             "patterns_vs_step": _patterns(tables["compare_steps"], out_dir / "patterns_vs_step.png")}
    if tables["compare_interpolation"].num_rows:
        paths["interpolation"] = _interpolation(tables["compare_interpolation"], out_dir / "interpolation.png")
    return paths


def _metrics(agg: pa.Table, path: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = agg.to_pylist()
    fig, axes = plt.subplots(3, 3, figsize=(13, 10), constrained_layout=True)
    for ax, (metric, label) in zip(axes.flat, PANELS):
        for budget in sorted({r["budget"] for r in rows}):
            rs = sorted((r for r in rows if r["budget"] == budget and r["metric"] == metric),
                        key=lambda r: r["batch_size"])
            x = [r["batch_size"] for r in rs]
            y = np.array([np.nan if r["mean"] is None else r["mean"] for r in rs], dtype=float)
            e = np.array([0.0 if r["std"] is None or np.isnan(r["std"]) else r["std"] for r in rs], dtype=float)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=f"budget: {budget}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch size")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle("small vs large batch: mean ± std over seeds")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _patterns(steps: pa.Table, path: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = [r for r in steps.to_pylist() if r["split"] == "train"] if steps.num_rows else []
    budgets = sorted({r["budget"] for r in rows}) or ["-"]
    fig, axes = plt.subplots(len(budgets), len(STEP_PANELS), figsize=(4 * len(STEP_PANELS), 3.4 * len(budgets)),
                             squeeze=False, constrained_layout=True)
    for bi, budget in enumerate(budgets):
        for pi, (key, label) in enumerate(STEP_PANELS):
            ax = axes[bi, pi]
            for bs in sorted({r["batch_size"] for r in rows if r["budget"] == budget}):
                per_step: dict[int, list[float]] = {}
                for r in rows:
                    if r["budget"] == budget and r["batch_size"] == bs:
                        v = _step_value(r, key)
                        if v is not None:
                            per_step.setdefault(r["step"], []).append(v)
                if per_step:
                    s = sorted(per_step)
                    ax.plot(s, [np.mean(per_step[k]) for k in s], marker=".", label=f"batch {bs}")
            ax.set_xscale("symlog", linthresh=10)
            ax.set_xlabel("step (updates)")
            ax.set_title(f"{label}\nbudget: {budget}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[bi, 0].legend(fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _step_value(r: dict, key: str) -> float | None:
    if key == "distinct":
        return r["n_distinct"]
    if key == "churn":
        return r["churn_hamming_sum"] / r["churn_samples"] if r["churn_samples"] else None
    if key == "dead":
        return r["n_dead"]
    if key == "regions":
        return r["regions_2d_normalized"]
    if key == "lc":
        return r["lc_sum"] / r["lc_samples"] if r["lc_samples"] else None
    raise KeyError(key)


def _interpolation(t: pa.Table, path: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = t.to_pylist()
    budgets = sorted({r["budget"] for r in rows})
    fig, axes = plt.subplots(len(budgets), 2, figsize=(10, 3.6 * len(budgets)), squeeze=False, constrained_layout=True)
    for bi, budget in enumerate(budgets):
        rs = [r for r in rows if r["budget"] == budget]
        for ci, metric in enumerate(("loss", "accuracy")):
            ax = axes[bi, ci]
            for split, style in (("train", "-"), ("test", "--")):
                pts = sorted((r["alpha"], r[metric]) for r in rs if r["split"] == split)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=".", label=split)
            ax.axvline(0.0, color="grey", lw=0.8)
            ax.axvline(1.0, color="grey", lw=0.8)
            if metric == "loss":
                ax.set_yscale("log")
            r0 = rs[0]
            ax.set_xlabel(f"α  (0: batch {r0['small_batch']}, 1: batch {r0['large_batch']}; seed {r0['seed']})")
            ax.set_title(f"{metric} along α·w_large + (1 − α)·w_small, budget: {budget}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
