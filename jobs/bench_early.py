"""Benchmark the ``partitions`` and ``early_stage`` analyzers: time per recorded step, 1 Ray task vs 2.

    nice -n 10 python jobs/bench_early.py [--run runs/<run_id>] [--repeat 3]

Without ``--run`` it records a demo-sized run first, the single-process equivalent of
``dynatrack demo --no-analyze --steps 100`` (digits MLP 64-64x3-10, probe = train 1,438 +
test 359 samples, log-spaced probe steps, checkpoints at probe and batch steps). For each
analyzer it times ``analyze_run`` on a warm local Ray with 1 CPU (one task) and with 2 CPUs
(two tasks, ``tasks_per_cpu=1``), and the task function called in this process on the same
steps (no Ray): every recorded step for ``partitions``, the first ``--early-steps`` (8)
checkpointed steps for ``early_stage``. Medians of ``--repeat`` timings; prints one JSON object.
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


def start_ray(cpus: int) -> None:
    import ray

    for attempt in range(3):  # a loaded machine can time out Ray's start: try again
        try:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR, configure_logging=False)
            return
        except Exception:  # noqa: BLE001 - retried, then raised
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(5)


def time_analyze(run_dir: str, configs: dict[str, object], cpus: int, repeat: int) -> dict[str, list[float]]:
    """``analyze_run`` wall times per analyzer on a warm local Ray of ``cpus`` CPUs (one task per CPU)."""
    import ray

    from dynatrack.parallel import analyze_run

    start_ray(cpus)
    try:
        out: dict[str, list[float]] = {}
        for name, cfg in configs.items():
            analyze_run(run_dir, config=cfg, tasks_per_cpu=1, progress=False)  # warm the workers
            out[name] = []
            for _ in range(repeat):
                start = time.perf_counter()
                analyze_run(run_dir, config=cfg, tasks_per_cpu=1, progress=False)
                out[name].append(time.perf_counter() - start)
        return out
    finally:
        ray.shutdown()


def time_in_process(run_dir: str, cfg: object, repeat: int) -> tuple[list[float], int]:
    """The analyzer's task function on all its steps, in this process (no Ray)."""
    from dynatrack import open_run
    from dynatrack.parallel import early

    run = open_run(run_dir)
    p = early.plan(run, cfg)
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        if p.partition_steps:
            early.partition_task(run.path, p.partition_steps, None, p.partition_steps[0])
        else:
            early.early_task(run.path, p.early_steps, {"loss": cfg.loss, "split": cfg.split,  # type: ignore[attr-defined]
                                                       "beta_iters": cfg.beta_iters, "seed": cfg.seed,  # type: ignore[attr-defined]
                                                       "early_lr": None})
        out.append(time.perf_counter() - start)
    return out, len(p.partition_steps or p.early_steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="an existing run directory (default: record a demo-sized run)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=None, help="also write the JSON object to this file")
    parser.add_argument("--early-steps", type=int, default=8, help="checkpointed steps early_stage analyzes")
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
        from dynatrack import open_run
        from dynatrack.parallel import AnalyzeConfig

        ckpts = open_run(run_dir).checkpoint_steps()
        configs = {"partitions": AnalyzeConfig(analyzers=("partitions",)),
                   # the first --early-steps checkpointed steps (the early stage; per-step cost is what is measured)
                   "early_stage": AnalyzeConfig(analyzers=("early_stage",), steps=tuple(ckpts[: args.early_steps]))}
        local = {name: time_in_process(run_dir, cfg, args.repeat) for name, cfg in configs.items()}
        one = time_analyze(run_dir, configs, 1, args.repeat)
        two = time_analyze(run_dir, configs, 2, args.repeat)
        for name in configs:
            times, n = local[name]
            m_local, m_one, m_two = (statistics.median(v) for v in (times, one[name], two[name]))
            result[name] = {
                "recorded_steps": n,
                "in_process_s_per_step": round(m_local / n, 4),
                "ray_1_task_s_per_step": round(m_one / n, 4),
                "ray_2_tasks_s_per_step": round(m_two / n, 4),
                "speedup_2_vs_1": round(m_one / m_two, 2),
                "wall_s": {"in_process": [round(v, 2) for v in times], "ray_1_task": [round(v, 2) for v in one[name]],
                           "ray_2_tasks": [round(v, 2) for v in two[name]]},
            }
    text = json.dumps(result, indent=1)
    sys.stdout.write(text + "\n")
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
