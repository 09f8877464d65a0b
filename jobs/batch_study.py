"""The README's small- vs large-batch reproduction: compare finished sweeps and print the table.

Given finished sweep directories (from ``dynatrack sweep`` or this script), compare each one
(unless ``compare.parquet`` is already there) and print one Markdown table per sweep and budget:
mean ± std over seeds for the smallest and the largest batch, Welch's p-value of the difference.

    python jobs/batch_study.py --sweep runs/batch-digits --sweep runs/batch-synthetic
    python jobs/batch_study.py --build --root runs --seeds 0 1 2     # run both study sweeps first
    ray job submit --working-dir . -- python jobs/batch_study.py --sweep $PWD/runs/batch-digits

``--build`` runs the two study sweeps (digits and the synthetic teacher task; MLP 64-64; batch 16 vs
512; budgets ``epochs`` and ``updates``; SGD lr 0.05, fixed) with the sweep engine (``--engine ray``, the
default: ``dynatrack.parallel.sweep.run_sweep``, Ray Train fits of ``--workers`` workers in a Tune grid) or
as plain Lightning fits in this process (``--engine plain``: :func:`dynatrack.sweep.plain.run_plain_sweep`,
one worker per trial). Finished trials are skipped on a re-run. ``--json`` prints the tests as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

ROWS = (
    ("updates", "updates", "{:.0f}"),
    ("train_acc", "train accuracy", "{:.4f}"),
    ("test_acc", "test accuracy", "{:.4f}"),
    ("gap_acc", "gap (train − test acc)", "{:.4f}"),
    ("gap_loss", "gap (test − train loss)", "{:.3f}"),
    ("sharpness", "ε-sharpness φ (%, ε = 1e-3)", "{:.3g}"),
    ("hessian_top", "top Hessian eigenvalue", "{:.3g}"),
    ("b_simple", "noise scale B_simple", "{:.3g}"),
    ("weight_distance", "‖w_T − w_0‖", "{:.3g}"),
    ("distinct_final", "distinct patterns (train, final)", "{:.0f}"),
    ("churn_total", "pattern churn (flips / sample, total)", "{:.3g}"),
    ("dead_final", "dead neurons (final)", "{:.3g}"),
    ("regions_2d_normalized_final", "2-D regions / (N²/2) (final)", "{:.3g}"),
    ("lc_final", "local complexity (final, r = 0.05)", "{:.3g}"),
)


def study_config(task: str, seeds: list[int], epochs: int, workers: int = 1) -> dict[str, Any]:
    task_cfg = {"name": task, "seed": 0}
    return {
        "name": f"batch-{task}", "task": task_cfg, "model": {"hidden": [64, 64], "activation": "relu"},
        "workers": workers,
        "batch_sizes": [16, 512], "seeds": seeds, "budget": ["epochs", "updates"], "epochs": epochs,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "lr_rule": "fixed", "base_batch": 16},
        "recorder": {"schedule": {"log_spaced": {"dense": 10}}},
    }


def markdown(sweep_dir: Path) -> str:
    tests = pq.read_table(sweep_dir / "compare_tests.parquet").to_pylist()
    agg = {(r["budget"], r["batch_size"], r["metric"]): r
           for r in pq.read_table(sweep_dir / "compare_by_batch.parquet").to_pylist()}
    out = []
    for budget in sorted({t["budget"] for t in tests}):
        by_metric = {t["metric"]: t for t in tests if t["budget"] == budget}
        any_t = next(iter(by_metric.values()))
        lo, hi = any_t["small_batch"], any_t["large_batch"]
        n = agg[(budget, lo, "test_acc")]["n"], agg[(budget, hi, "test_acc")]["n"]
        out.append(f"\n**{sweep_dir.name}, budget = {budget}** (mean ± std over seeds, n = {n[0]} / {n[1]})\n")
        out.append(f"| metric | batch {lo} | batch {hi} | p (Welch) |")
        out.append("|---|---:|---:|---:|")
        for m, label, fmt in ROWS:
            a, b, t = agg.get((budget, lo, m)), agg.get((budget, hi, m)), by_metric.get(m)
            if a is None or b is None:
                continue
            p = t["p"] if t else None
            ptxt = "–" if p is None or math.isnan(p) else f"{p:.2g}"
            out.append(f"| {label} | {_pm(a, fmt)} | {_pm(b, fmt)} | {ptxt} |")
    return "\n".join(out)


def _pm(r: dict[str, Any], fmt: str) -> str:
    if r["mean"] is None or math.isnan(r["mean"]):
        return "–"
    s = fmt.format(r["mean"])
    return s if r["std"] is None or math.isnan(r["std"]) else f"{s} ± {fmt.format(r['std'])}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="append", default=[], help="a finished sweep directory (repeatable)")
    parser.add_argument("--build", action="store_true", help="build the digits and synthetic study sweeps first")
    parser.add_argument("--root", default="runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--engine", default="ray", choices=["ray", "plain"],
                        help="--build with the Ray sweep engine (default) or plain Lightning fits in this process")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers per trial (--engine ray)")
    parser.add_argument("--recompare", action="store_true", help="compare again even if compare.parquet exists")
    parser.add_argument("--address", default=None)
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled", "auto"])
    parser.add_argument("--json", action="store_true", help="print the tests as JSON lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from dynatrack.sweep.compare import compare_sweep

    torch.set_num_threads(1)
    sweeps = [Path(s) for s in args.sweep]
    timings: dict[str, float] = {}
    if args.build:
        for task in ("digits", "synthetic"):
            start = time.perf_counter()
            if args.engine == "plain":
                from dynatrack.sweep.plain import run_plain_sweep

                sweeps.append(run_plain_sweep(study_config(task, args.seeds, args.epochs), args.root))
            else:
                from dynatrack.parallel.sweep import run_sweep
                from dynatrack.sweep.config import validate_config

                cfg = validate_config({**study_config(task, args.seeds, args.epochs, args.workers),
                                       "root": args.root}, source="batch_study")
                result = run_sweep(cfg, address=args.address, num_cpus=args.num_cpus, wandb_mode=args.wandb)
                sweeps.append(Path(result["sweep_dir"]))
            timings[f"build {task}"] = time.perf_counter() - start
    if not sweeps:
        parser.error("give --sweep DIR (repeatable) or --build")
    for sweep in sweeps:
        if args.recompare or not (sweep / "compare.parquet").exists():
            start = time.perf_counter()
            compare_sweep(sweep, address=args.address, num_cpus=args.num_cpus, wandb_mode=args.wandb)
            timings[f"compare {sweep.name}"] = time.perf_counter() - start
    for sweep in sweeps:
        if args.json:
            for t in pq.read_table(sweep / "compare_tests.parquet").to_pylist():
                sys.stdout.write(json.dumps({"sweep": sweep.name, **t}) + "\n")
        else:
            sys.stdout.write(markdown(sweep) + "\n")
    if timings:
        sys.stdout.write("\n" + ", ".join(f"{k}: {v:.0f} s" for k, v in timings.items()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
