"""Benchmark: sweep overhead. A 4-trial sweep on a local Ray (Tune grid of Ray Train fits, 2 CPU
workers each) against the same four trials run back to back as plain Lightning fits in this process
(one process each: the trial's global batch, its number of updates, the same recorder and the same
initial weights), on the same machine in the same run. Prints one JSON object.

    nice -n 5 python jobs/bench_sweep.py [--num-cpus 2] [--task digits] [--epochs 2]

Where the sweep's extra time goes, per trial (from the driver's Tune callback and the rank-0
worker's own clock, ``trial.json`` ``timeline``):

- ``to_worker_s``: Tune trial start -> the Train worker function entered (the Tune function's actor,
  the Train controller, the placement group, two worker processes and the torch process group);
- ``setup_s``: worker function entered -> ``trainer.fit`` called (imports of torch/Lightning in the
  fresh worker process, the task, the model, the recorder);
- ``fit_s``: the Lightning fit itself (2 DDP workers);
- ``after_fit_s``: fit returned -> Tune saw the trial complete (trial.json, teardown of the worker
  group, the controller's polling).

``ray_fixed_per_trial_s`` = trial wall time - its fit time - (the plain trial's time outside its fit):
what Ray adds to a trial beyond the fit, net of the setup a plain fit has too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--task", default="digits", choices=["digits", "synthetic"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from dynatrack.parallel.sweep import run_sweep
    from dynatrack.sweep.config import validate_config
    from dynatrack.sweep.trial import fit_plain, init_path, trial_spec

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    cfg = validate_config({
        "name": "bench", "root": str(tmp / "ray"), "task": {"name": args.task, "seed": 0},
        "model": {"hidden": [64, 64]}, "batch_sizes": [32, 128], "workers": 2, "seeds": [0, 1],
        "epochs": args.epochs, "recorder": {"schedule": {"log_spaced": {"dense": 10}}},
        "wandb": {"mode": "disabled"}, "ray": {"num_cpus": args.num_cpus},
    })
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    result = run_sweep(cfg, num_cpus=args.num_cpus)
    sweep_total = time.perf_counter() - t0
    sweep_dir = Path(result["sweep_dir"])

    # the same four trials as plain one-process Lightning fits, back to back
    plain_dir = tmp / "plain"
    plain: dict[str, dict[str, float]] = {}
    t1 = time.perf_counter()
    for trial in result["trials"]:
        spec = trial_spec(cfg, trial, plain_dir)
        spec.update(per_worker_batch=trial["batch_size"], world_size=1)
        init = init_path(plain_dir, trial["seed"])
        init.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(init_path(sweep_dir, trial["seed"]), init)
        start = time.perf_counter()
        record = fit_plain(spec)
        total = time.perf_counter() - start
        plain[trial["trial_id"]] = {"total_s": total, "fit_s": record["fit_wall_time_s"],
                                    "outside_fit_s": total - record["fit_wall_time_s"],
                                    "final_step": record["final_step"]}
    plain_total = time.perf_counter() - t1

    trials = []
    for trial in result["trials"]:
        info = json.loads((sweep_dir / trial["trial_id"] / "trial.json").read_text())
        tl = info["timeline"]
        row = {
            "trial_id": trial["trial_id"], "max_steps": trial["max_steps"], "wall_s": trial["wall_time_s"],
            "to_worker_s": tl["worker_start"] - trial["started_at"],
            "setup_s": tl["fit_start"] - tl["worker_start"],
            "fit_s": info["fit_wall_time_s"],
            "after_fit_s": trial["ended_at"] - tl["fit_end"],
            "plain_total_s": plain[trial["trial_id"]]["total_s"], "plain_fit_s": plain[trial["trial_id"]]["fit_s"],
        }
        row["ray_fixed_s"] = row["wall_s"] - row["fit_s"] - plain[trial["trial_id"]]["outside_fit_s"]
        trials.append({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    # what one fresh Python process pays before it can run a trial (every Ray Train worker is one)
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t2 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import dynatrack.sweep.trial, ray.train.lightning"], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    fresh_import = {"wall_s": round(time.perf_counter() - t2, 3),
                    "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 3)}
    out = {
        "what": "4-trial sweep on a local Ray (Tune grid of Ray Train fits, 2 CPU workers each) vs the same 4 "
                "trials as plain one-process Lightning fits back to back, same recorder, same run",
        "cpus": os.cpu_count(), "num_cpus": args.num_cpus, "task": args.task,
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "sweep_total_s": round(sweep_total, 3), "plain_total_s": round(plain_total, 3),
        "ratio_sweep_over_plain": round(sweep_total / plain_total, 3),
        "sweep_phases_s": {k: round(v, 3) for k, v in result["timings"].items()},
        "concurrent_trials": "1 (2 CPUs / 2 CPUs per trial)" if args.num_cpus < 4 else f"{args.num_cpus // 2}",
        "ray_fixed_per_trial_s_median": round(statistics.median(t["ray_fixed_s"] for t in trials), 3),
        "ray_fixed_per_trial_s_max": round(max(t["ray_fixed_s"] for t in trials), 3),
        "target_fixed_per_trial_s": 5.0,
        "fresh_process_import_torch_lightning_dynatrack": fresh_import,
        "trials": trials,
        "failed": result["failed"],
    }
    out["met"] = out["ray_fixed_per_trial_s_median"] < 5.0
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if args.keep:
        sys.stderr.write(f"kept {tmp}\n")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
