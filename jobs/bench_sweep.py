"""Benchmark: sweep overhead. A 4-trial sweep on a local Ray (Ray Train worker groups of 2 CPU workers,
one per lane, launched by a Tune grid, taking trials from a queue) against the same four trials run back
to back as plain Lightning fits in this process (one process each: the trial's global batch, its number
of updates, the same recorder and the same initial weights), on the same machine in the same run.
Prints one JSON object.

    python jobs/bench_sweep.py [--num-cpus 2] [--task digits] [--epochs 2] [--workers 2] [--trials-per-group N]
        [--no-fresh] > jobs/bench_sweep.json
    python jobs/bench_sweep.py --workers 1 --epochs 3000 --no-fresh > jobs/bench_sweep_side_by_side.json

The second form is the issue's "more cores than one trial uses" case on a 2-core machine: trials of
one worker each, two lanes side by side, trials long enough (3000 epochs) for that to pay off.

Then, in the same run, the same sweep again with ``ray.trials_per_worker_group: 1`` (fresh Ray Train
workers for every trial, Ray's plain Train-in-Tune shape): the ablation of the worker-group reuse
(``fresh_workers_per_trial``; ``--no-fresh`` skips it).

Where the sweep's extra time goes (``trial.json`` ``timeline``: the rank-0 worker's own clock; the
trial queue's events: ``started_at`` / ``ended_at`` in ``sweep.json``; ``run_sweep``'s timings):

- ``ray_start_s``: ``ray.init`` of the local Ray (once per sweep);
- ``worker_start_s`` (per worker group, once per lane unless ``--trials-per-group`` caps it): the
  lane's previous trial ended (or Tune started) -> its next trial taken: the Tune function's actor,
  the Train controller, the placement group, the fresh worker processes importing torch, Lightning,
  Ray Train and dynatrack, and the gloo process group;
- per trial: ``to_fit_s`` (taken -> ``trainer.fit`` called: the task, model and recorder, as a plain
  fit builds them too) and ``after_fit_s`` (fit returned -> the queue sees it finished: trial.json);
  ``ray_fixed_s`` = trial wall time (taken -> finished) - the plain trial's total time: what running
  under Ray adds to a trial once its worker group is up (2-worker DDP vs one process included);
- ``teardown_s``: the last trial finished -> Tune returned (the worker groups shut down), and
  ``ray_stop_s``.

``fixed_incl_worker_start_s``: a trial's ``ray_fixed_s`` plus the worker-group start it waited for
(if it was its group's first trial): what that trial paid for running under Ray. Its median over
the trials is the figure held to the target (``met``: under 5 s); its mean is the worker-group start
amortised over this sweep's trials (with 4 trials on one lane, a quarter of one start each).
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


def _sweep_config(tmp: Path, name: str, args: argparse.Namespace, trials_per_group: int | None) -> dict:
    from dynatrack.sweep.config import validate_config

    return validate_config({
        "name": name, "root": str(tmp / "ray"), "task": {"name": args.task, "seed": 0},
        "model": {"hidden": [64, 64]}, "batch_sizes": [32, 128], "workers": args.workers, "seeds": [0, 1],
        "epochs": args.epochs, "recorder": {"schedule": {"log_spaced": {"dense": 10}}},
        "wandb": {"mode": "disabled"},
        "ray": {"num_cpus": args.num_cpus, "trials_per_worker_group": trials_per_group},
    })


def _breakdown(result: dict, total: float, plain: dict[str, dict[str, float]], plain_total: float) -> dict:
    """Where one sweep's time went (see the module docstring)."""
    sweep_dir = Path(result["sweep_dir"])
    rows = []
    for trial in sorted(result["trials"], key=lambda t: t["started_at"]):
        info = json.loads((sweep_dir / trial["trial_id"] / "trial.json").read_text())
        tl = info["timeline"]
        row = {
            "trial_id": trial["trial_id"], "max_steps": trial["max_steps"], "wall_s": trial["wall_time_s"],
            "trials_before_in_group": tl["trials_before_in_group"],
            "to_fit_s": tl["fit_start"] - tl["worker_start"],
            "fit_s": info["fit_wall_time_s"],
            "after_fit_s": trial["ended_at"] - tl["fit_end"],
            "plain_total_s": plain[trial["trial_id"]]["total_s"], "plain_fit_s": plain[trial["trial_id"]]["fit_s"],
        }
        row["ray_fixed_s"] = row["wall_s"] - plain[trial["trial_id"]]["total_s"]
        rows.append((trial, tl, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
    # a worker group starts when Tune starts (first groups) or when its lane's previous group ended
    timings = result["timings"]
    groups, previous_end = [], {}  # per lane: when its previous trial ended
    for trial, tl, row in rows:
        row["lane"] = tl["lane"]
        row["worker_start_s"] = 0.0
        if tl["trials_before_in_group"] == 0:
            groups.append(round(trial["started_at"] - previous_end.get(tl["lane"], timings["tune_started_at"]), 3))
            row["worker_start_s"] = groups[-1]
        row["fixed_incl_worker_start_s"] = round(row["ray_fixed_s"] + row["worker_start_s"], 3)
        previous_end[tl["lane"]] = trial["ended_at"]
    last_end = max(t["ended_at"] for t, _, _ in rows)
    trials = [row for _, _, row in rows]
    out = {
        "sweep_total_s": round(total, 3),
        "ratio_sweep_over_plain": round(total / plain_total, 3),
        "sweep_phases_s": {k: round(v, 3) for k, v in timings.items() if not k.endswith("_at")},
        "lanes": timings["lanes"],
        "ray_start_s": round(timings["ray_start_s"], 3),
        "worker_group_starts_s": groups,
        "teardown_s": round(timings["tune_ended_at"] - last_end, 3),
        "ray_stop_s": round(timings["ray_stop_s"], 3),
        "sweep_minus_plain_per_trial_s": round((total - plain_total) / len(trials), 3),
        "ray_fixed_per_trial_s_median": round(statistics.median(t["ray_fixed_s"] for t in trials), 3),
        "ray_fixed_per_trial_s_max": round(max(t["ray_fixed_s"] for t in trials), 3),
        "fixed_incl_worker_start_s_median": round(statistics.median(t["fixed_incl_worker_start_s"] for t in trials), 3),
        "fixed_incl_worker_start_s_mean": round(statistics.mean(t["fixed_incl_worker_start_s"] for t in trials), 3),
        "trials": trials,
        "failed": result["failed"],
    }
    out["met"] = out["fixed_incl_worker_start_s_median"] < 5.0
    out["faster_than_plain"] = total < plain_total
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--task", default="digits", choices=["digits", "synthetic"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2,
                        help="Ray Train workers per trial (1 on 2 CPUs: two trials side by side)")
    parser.add_argument("--trials-per-group", type=int, default=None,
                        help="ray.trials_per_worker_group of the sweep (default: unlimited)")
    parser.add_argument("--no-fresh", action="store_true",
                        help="skip the second sweep with fresh workers for every trial (trials_per_worker_group 1)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from dynatrack.parallel.sweep import run_sweep
    from dynatrack.sweep.trial import fit_plain, init_path, trial_spec

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    cfg = _sweep_config(tmp, "bench", args, args.trials_per_group)
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
        plain[trial["trial_id"]] = {"total_s": total, "fit_s": record["fit_wall_time_s"]}
    plain_total = time.perf_counter() - t1
    fresh = None
    if not args.no_fresh:  # the same sweep with fresh Ray Train workers for every trial (Ray's plain shape)
        t3 = time.perf_counter()
        fresh_result = run_sweep(_sweep_config(tmp, "bench-fresh", args, 1), num_cpus=args.num_cpus)
        fresh = _breakdown(fresh_result, time.perf_counter() - t3, plain, plain_total)

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
        "what": "4-trial sweep on a local Ray (Ray Train worker groups of `workers` CPU workers, one per lane, serving "
                "queued trials) vs the same 4 trials as plain one-process Lightning fits back to back, same "
                "recorder, same run; then the same sweep with fresh workers for every trial",
        "date": time.strftime("%Y-%m-%d"),
        "trials_per_worker_group": args.trials_per_group,
        "cpus": os.cpu_count(), "num_cpus": args.num_cpus, "task": args.task, "workers": args.workers,
        "epochs": args.epochs,
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "plain_total_s": round(plain_total, 3),
        **_breakdown(result, sweep_total, plain, plain_total),
        "target_fixed_per_trial_s": 5.0,
        "fresh_process_import_torch_lightning_dynatrack": fresh_import,
        "fresh_workers_per_trial": fresh,
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if args.keep:
        sys.stderr.write(f"kept {tmp}\n")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
