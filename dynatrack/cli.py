"""``dynatrack demo | fit | analyze | sweep | compare | inspect``.

Every command's default root is ``./runs``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from typing import Any

from dynatrack.report import print_summary  # noqa: F401  (cli.print_summary stays importable)

log = logging.getLogger("dynatrack")


def cmd_inspect(args: argparse.Namespace) -> int:
    from dynatrack.store import open_run
    from dynatrack.store.reader import IncompleteStepsWarning

    with warnings.catch_warnings():  # the summary lists the incomplete steps per rank itself
        warnings.simplefilter("ignore", IncompleteStepsWarning)
        summary = open_run(args.run_dir).summary()
    if args.json:
        json.dump(summary, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print_summary(summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.single:
        from dynatrack.sweep.demo import run_sweep_demo

        return run_sweep_demo(root=args.root, name=args.run_name, num_cpus=args.num_cpus)
    from dynatrack.demo import run_demo

    return run_demo(root=args.root, steps=args.steps, devices=args.devices, run_name=args.run_name,
                    analyze=not args.no_analyze, seed=args.seed)


def load_analyze_config(path: str | None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(AnalyzeConfig, ray options, wandb options)`` from a YAML file (``yaml.safe_load``)."""
    import yaml

    from dynatrack.parallel.tasks import AnalyzeConfig

    if path is None:
        return AnalyzeConfig(), {}, {}
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with keys analysis, ray, wandb")
    unknown = set(data) - {"analysis", "ray", "wandb"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}; expected analysis, ray, wandb")
    analysis = {k: v for k, v in (data.get("analysis") or {}).items() if v is not None or k != "steps"}
    return AnalyzeConfig.from_dict(analysis), dict(data.get("ray") or {}), dict(data.get("wandb") or {})


def cmd_analyze(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dynatrack.parallel.analyze import analyze_and_report

    cfg, ray_opts, wandb_opts = load_analyze_config(args.config)
    if args.analyzers:
        cfg = replace(cfg, analyzers=tuple(args.analyzers.split(",")))
        cfg.__post_init__()
    if args.steps:
        cfg = replace(cfg, steps=tuple(int(s) for s in args.steps.split(",")))
    if args.trust_model_code:
        cfg = replace(cfg, trust_model_code=True)
    analyze_and_report(
        args.run_dir,
        config=cfg,
        address=args.address if args.address is not None else ray_opts.get("address"),
        num_cpus=args.num_cpus if args.num_cpus is not None else ray_opts.get("num_cpus"),
        wandb_mode=args.wandb or wandb_opts.get("mode", "offline"),
        project=args.project or wandb_opts.get("project", "dynatrack"),
        group=args.group or wandb_opts.get("group"),
        wandb_init_timeout=wandb_opts.get("init_timeout"),
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from dynatrack.sweep.compare import compare_sweep

    compare_sweep(args.sweep_dir, address=args.address, num_cpus=args.num_cpus, wandb_mode=args.wandb,
                  project=args.project)
    return 0


def cmd_fit(argv: list[str]) -> int:
    import time

    from lightning.pytorch.cli import LightningCLI

    from dynatrack.console import find_recorder, print_fit_report, quiet_third_party, setup_logging

    setup_logging()
    quiet_third_party()
    start = time.perf_counter()
    # No SaveConfigCallback: it would write config.yaml into the working directory; the
    # run's manifest records the model class and init args instead.
    cli = LightningCLI(args=["fit", *argv], save_config_callback=None, auto_configure_optimizers=False)
    if "--help" in argv or "-h" in argv or "--print_config" in " ".join(argv):
        return 0
    # rank 0 only: the run summary and directory, as the demo prints them
    print_fit_report(cli.trainer, find_recorder(cli.trainer), elapsed=time.perf_counter() - start)
    return 0


def print_sweep(result: dict[str, Any]) -> None:
    """The sweep summary: one row per trial (status, steps, wall time, final accuracies, error)."""
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {Path(result['sweep_dir']).name}")
    for col in ("trial", "batch", "seed", "budget", "lr", "steps", "status", "wall s", "train acc", "test acc", "error"):
        table.add_column(col, justify="left" if col in ("trial", "budget", "status", "error") else "right")
    for t in result["trials"]:
        metrics: dict[str, Any] = {}
        info = Path(result["sweep_dir"], t["trial_id"], "trial.json")
        if t["status"] == "finished" and info.exists():
            metrics = json.loads(info.read_text()).get("final_metrics") or {}
        acc = lambda k: "" if metrics.get(k) is None else f"{metrics[k]:.3f}"  # noqa: E731
        status = t["status"] + (" (kept)" if t["trial_id"] in result["skipped"] else "")
        table.add_row(t["trial_id"], str(t["batch_size"]), str(t["seed"]), t["budget"], f"{t['lr']:g}",
                      str(t["max_steps"]), status, "" if t["wall_time_s"] is None else f"{t['wall_time_s']:.1f}",
                      acc("train_acc"), acc("test_acc"), t["error"] or "")
    # not a terminal (a job log, a pipe): wide enough that trial ids and errors are not cut
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table)
    n = len(result["trials"])
    console.print(f"{n - len(result['failed'])}/{n} trials finished ({len(result['ran'])} run now, "
                  f"{len(result['skipped'])} kept from before); sweep directory {result['sweep_dir']}")
    if result["failed"]:
        console.print(f"[red]failed: {', '.join(result['failed'])}[/red]; re-run the same command to retry them")


def cmd_sweep(args: argparse.Namespace) -> int:
    from dynatrack.parallel.sweep import run_sweep
    from dynatrack.sweep.config import load_config

    cfg = load_config(args.config)
    if args.root is not None:
        cfg["root"] = args.root
    result = run_sweep(cfg, address=args.address, num_cpus=args.num_cpus, wandb_mode=args.wandb)
    print_sweep(result)
    return 1 if result["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynatrack", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="a small batch-size study on digits (sweep + compare); --single: one recorded "
                                     "DDP run")
    p.add_argument("--root", default="runs", help="runs root (default ./runs)")
    p.add_argument("--run-name", default=None, help="run id, or the sweep id (default: a fresh timestamped id)")
    p.add_argument("--steps", type=int, default=400, help="--single: optimizer steps (default 400)")
    p.add_argument("--devices", type=int, default=2, help="--single: CPU DDP processes (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-analyze", action="store_true", help="--single: only record, skip the analyzers")
    p.add_argument("--single", action="store_true",
                   help="the single recorded DDP run (the default demo is a small batch-size sweep + compare)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the sweep demo's local Ray (default 2)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fit", help="LightningCLI fit, e.g. dynatrack fit --config configs/digits.yaml",
                       add_help=False)
    p.set_defaults(func=None)

    p = sub.add_parser("analyze", help="pattern counts, exact linear regions, local complexity on Ray; W&B")
    p.add_argument("run_dir")
    p.add_argument("--config", default=None, help="YAML with analysis/ray/wandb sections (configs/analyze.yaml)")
    p.add_argument("--address", default=None, help="Ray cluster ('auto', host:port); default: a local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--analyzers", default=None, help="comma list of patterns,regions,local_complexity,early_stage,partitions")
    p.add_argument("--steps", default=None, help="comma list of steps (default: all recorded)")
    p.add_argument("--wandb", default=None, choices=["offline", "online", "disabled", "auto"],
                   help="W&B mode (default offline)")
    p.add_argument("--project", default=None, help="W&B project (default dynatrack)")
    p.add_argument("--group", default=None, help="W&B group (experiment name)")
    p.add_argument("--trust-model-code", action="store_true",
                   help="where the run stores no usable model description, import and call the model class its "
                        "manifest names (runs code from the run directory: only for runs you trust)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("sweep", help="a Ray Tune grid of recorded Ray Train fits over batch sizes and seeds")
    p.add_argument("--config", required=True, help="sweep YAML (configs/batch_sweep.yaml)")
    p.add_argument("--address", default=None, help="Ray cluster ('auto', host:port); default: a local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--root", default=None, help="override the config's root")
    p.add_argument("--wandb", default=None, choices=["offline", "online", "disabled", "auto"],
                   help="W&B mode of the per-trial runs (default: the config's, offline)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="small- vs large-batch comparison of a sweep: table, plots, W&B group")
    p.add_argument("sweep_dir", help="the sweep directory, runs/<sweep_id>")
    p.add_argument("--address", default=None, help="Ray cluster ('auto', host:port); default: a local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled", "auto"],
                   help="W&B mode (default offline, under <sweep>/wandb/)")
    p.add_argument("--project", default="dynatrack", help="W&B project (default dynatrack)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("inspect", help="print what a run directory holds")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fit":
        return cmd_fit(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from dynatrack.console import setup_logging

    setup_logging(args.verbose)
    warnings.filterwarnings("ignore", module="lightning")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as exc:
        # Clear errors (bad run dir, bad input) without a traceback; --verbose shows it.
        if args.verbose:
            raise
        sys.stderr.write(f"dynatrack {args.command}: error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
