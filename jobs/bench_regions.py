"""Benchmark: exact 2-D linear-region counting vs a dense-grid sampler, on one CPU thread.

Model: MLP 64-32-32-32-10 on scikit-learn's bundled digits (inputs scaled to [0, 1]),
He-normal weights, biases N(0, 1e-6) (variance, as in Hanin & Rolnick, NeurIPS 2019). Slices
go through one digit each of classes 0, 1, 2 (:func:`dynatrack.analysis.regions.slice_through`).

For each slice the exact count (:func:`count_regions_2d`) is timed. On the grid slices the
grid resolution is doubled from ``--start-resolution`` until the grid's distinct-pattern count
reaches the exact count or ``--cap``; the ratio is grid seconds (at that resolution) / exact
seconds. Prints one JSON object on stdout; progress goes to the log (stderr).

    python jobs/bench_regions.py --slices 5 --grid-slices 1 --cap 4096
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time

import numpy as np
import torch
from torch import nn

from dynatrack.analysis.regions import (
    count_regions_2d,
    grid_pattern_count,
    normalized_count,
    piecewise_linear_layers,
    slice_through,
)

logger = logging.getLogger("bench_regions")


def he_normal_mlp(d_in: int, widths: list[int], d_out: int, bias_std: float, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    prev = d_in
    for w in [*widths, d_out]:
        lin = nn.Linear(prev, w)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.normal_(lin.bias, std=bias_std)
        mods += [lin, nn.ReLU()]
        prev = w
    return nn.Sequential(*mods[:-1])


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--slices", type=int, default=5, help="slices timed for the exact count")
    parser.add_argument("--grid-slices", type=int, default=1, help="slices also run through the grid search")
    parser.add_argument("--start-resolution", type=int, default=32)
    parser.add_argument("--cap", type=int, default=4096, help="largest grid resolution tried")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the exact count per slice")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)

    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    widths = [args.width] * args.depth
    model = he_normal_mlp(64, widths, 10, bias_std=1e-3, seed=args.seed)
    layers = piecewise_linear_layers(model, 64)
    n_hidden = sum(widths)
    rng = np.random.default_rng(args.seed)
    picks = [rng.choice(np.flatnonzero(y == c), size=args.slices, replace=False) for c in (0, 1, 2)]

    count_regions_2d(layers, *slice_through(x[0], x[1], x[2])[:3])  # warm-up
    per_slice = []
    for i in range(args.slices):
        sl = slice_through(*(x[p[i]] for p in picks))
        times = []
        for _ in range(args.repeats):
            result, dt = timed(count_regions_2d, layers, sl.origin, sl.u1, sl.u2)
            times.append(dt)
        record = {"samples": [int(p[i]) for p in picks], "count": result.count, "seconds": min(times)}
        logger.info("slice %d: %d regions in %.3f s", i, result.count, record["seconds"])
        if i < args.grid_slices:
            record["grid"] = grid_search(layers, sl, result.count, record["seconds"], args.start_resolution, args.cap)
        per_slice.append(record)

    seconds = [r["seconds"] for r in per_slice]
    counts = [r["count"] for r in per_slice]
    grids = [r["grid"] for r in per_slice if "grid" in r]
    report = {
        "benchmark": "exact 2-D region count vs dense grid",
        "model": f"MLP 64-{'-'.join(map(str, widths))}-10, He-normal weights, biases N(0, 1e-6)",
        "data": "sklearn digits, 64-dim, scaled to [0, 1]; slices through classes 0, 1, 2",
        "threads": torch.get_num_threads(),
        "n_hidden": n_hidden,
        "counts": counts,
        "normalized_counts": [round(normalized_count(c, n_hidden, 2), 4) for c in counts],
        "seconds_per_slice": [round(s, 4) for s in seconds],
        "seconds_per_slice_median": round(statistics.median(seconds), 4),
        "grid": grids,
        "ratio_grid_over_exact_median": round(statistics.median(g["ratio"] for g in grids), 1) if grids else None,
        "targets": {
            "under_2s_per_slice": statistics.median(seconds) < 2.0,
            "at_least_10x_faster_than_grid": all(g["ratio"] >= 10 for g in grids),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }
    print(json.dumps(report))
    return report


def grid_search(layers, sl, exact: int, exact_seconds: float, start: int, cap: int) -> dict:
    """Double the grid resolution until the grid's distinct-pattern count reaches ``exact`` or ``cap``."""
    res, history = start, []
    total = 0.0
    while True:
        found, dt = timed(grid_pattern_count, layers, sl.origin, sl.u1, sl.u2, res)
        total += dt
        history.append({"resolution": res, "count": found, "seconds": round(dt, 3)})
        logger.info("grid %d x %d: %d of %d regions in %.2f s", res, res, found, exact, dt)
        if found >= exact or res * 2 > cap:
            break
        res *= 2
    return {
        "exact_count": exact,
        "resolution": res,
        "grid_count": found,
        "reached_exact": found >= exact,
        "grid_seconds": round(dt, 3),
        "grid_seconds_doubling_total": round(total, 3),
        "exact_seconds": round(exact_seconds, 4),
        "ratio": round(dt / exact_seconds, 1),
        "note": None if found >= exact else f"cap {cap} reached: the ratio is a lower bound",
        "history": history,
    }


if __name__ == "__main__":
    main()
