"""Benchmark the ``partitions`` and ``early_stage`` analyzers: time per recorded step, 1 Ray task vs 2.

    nice -n 10 python jobs/bench_early.py [--run runs/<run_id>] [--repeat 3]

Without ``--run`` it records a demo-sized run first, the single-process equivalent of
``dynatrack demo --no-analyze --steps 100`` (digits MLP 64-64x3-10, probe = train 1,438 +
test 359 samples, log-spaced probe steps, checkpoints at probe and batch steps). For each
analyzer it times ``analyze_run`` on a warm local Ray with 1 CPU (one task) and with 2 CPUs
(two tasks, ``tasks_per_cpu=1``), and the task function called in this process on all steps
(no Ray). Medians of ``--repeat`` timings; prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed


def time_analyze(run_dir: str, analyzer: str, cpus: int, repeat: int) -> list[float]:
    import ray

    from dynatrack.parallel import AnalyzeConfig, analyze_run

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, configure_logging=False)
    try:
        cfg = AnalyzeConfig(analyzers=(analyzer,))
        analyze_run(run_dir, config=cfg, tasks_per_cpu=1, progress=False)  # warm the workers
        out = []
        for _ in range(repeat):
            start = time.perf_counter()
            analyze_run(run_dir, config=cfg, tasks_per_cpu=1, progress=False)
            out.append(time.perf_counter() - start)
        return out
    finally:
        ray.shutdown()


def time_in_process(run_dir: str, analyzer: str, repeat: int) -> tuple[list[float], int]:
    from dynatrack import open_run
    from dynatrack.parallel import AnalyzeConfig, early

    run = open_run(run_dir)
    cfg = AnalyzeConfig(analyzers=(analyzer,))
    p = early.plan(run, cfg)
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        if analyzer == "partitions":
            early.partition_task(run.path, p.partition_steps, None, p.partition_steps[0])
            n = len(p.partition_steps)
        else:
            early.early_task(run.path, p.early_steps, {"loss": cfg.loss, "split": cfg.split, "beta_iters": cfg.beta_iters,
                                                       "seed": cfg.seed, "early_lr": None})
            n = len(p.early_steps)
        out.append(time.perf_counter() - start)
    return out, n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="an existing run directory (default: record a demo-sized run)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run
        if run_dir is None:
            from dynatrack.demo import run_demo

            with contextlib.redirect_stdout(sys.stderr):  # the demo's run summary; stdout is the JSON
                run_demo(root=tmp, steps=args.steps, devices=1, run_name="bench", analyze=False)
            run_dir = str(Path(tmp) / "bench")
        result: dict[str, object] = {"run": "demo-sized (1 process)" if args.run is None else run_dir,
                                     "repeat": args.repeat}
        for analyzer in ("partitions", "early_stage"):
            local, n = time_in_process(run_dir, analyzer, args.repeat)
            one = time_analyze(run_dir, analyzer, 1, args.repeat)
            two = time_analyze(run_dir, analyzer, 2, args.repeat)
            m_local, m_one, m_two = (statistics.median(v) for v in (local, one, two))
            result[analyzer] = {
                "recorded_steps": n,
                "in_process_s_per_step": round(m_local / n, 4),
                "ray_1_task_s_per_step": round(m_one / n, 4),
                "ray_2_tasks_s_per_step": round(m_two / n, 4),
                "speedup_2_vs_1": round(m_one / m_two, 2),
                "wall_s": {"in_process": [round(v, 2) for v in local], "ray_1_task": [round(v, 2) for v in one],
                           "ray_2_tasks": [round(v, 2) for v in two]},
            }
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
