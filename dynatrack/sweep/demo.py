"""``dynatrack demo``: a small batch-size study on digits, end to end on a local Ray.

Two global batch sizes x two seeds, every trial a recorded 2-worker Ray Train fit (equal epochs),
then the comparison (``dynatrack.sweep.compare.compare_sweep``: metrics, pattern statistics, plots,
W&B offline). The single recorded DDP run of earlier versions is ``dynatrack demo --single``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


def demo_config(root: str, name: str) -> dict[str, Any]:
    """The demo sweep's config (validated): digits, MLP 64-64, batch sizes 16 and 256, seeds 0 and 1."""
    from dynatrack.sweep.config import validate_config

    return validate_config({
        "name": name, "root": root, "task": {"name": "digits", "seed": 0},
        "model": {"hidden": [64, 64], "activation": "relu"},
        "batch_sizes": [16, 256], "workers": 2, "seeds": [0, 1], "budget": ["epochs"], "epochs": 3,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "lr_rule": "fixed"},
        "recorder": {"schedule": {"log_spaced": {"dense": 10}}},
        "wandb": {"mode": "offline", "project": "dynatrack"},
    }, source="demo")


def run_sweep_demo(*, root: str = "runs", name: str | None = None, num_cpus: int | None = 2,
                   compare: bool = True) -> int:
    """Run the demo sweep, print its summary, then compare it (when the compare engine is installed)."""
    from rich.console import Console

    from dynatrack.cli import print_sweep
    from dynatrack.parallel.sweep import run_sweep

    console = Console()
    cfg = demo_config(root, name or time.strftime("demo-%Y%m%d-%H%M%S"))
    start = time.perf_counter()
    result = run_sweep(cfg, num_cpus=num_cpus)
    print_sweep(result)
    console.print(f"sweep: {time.perf_counter() - start:.1f} s including Ray start")
    if not compare:
        return 1 if result["failed"] else 0
    try:
        from dynatrack.sweep.compare import compare_sweep
    except ImportError:
        console.print("[yellow]the comparison step (dynatrack.sweep.compare) is not part of this install; "
                      f"run `dynatrack compare {result['sweep_dir']}` once it is[/yellow]")
        return 1 if result["failed"] else 0
    compare_sweep(result["sweep_dir"], num_cpus=num_cpus, wandb_mode="offline", project="dynatrack")
    console.print(f"demo: {time.perf_counter() - start:.1f} s in all")
    return 1 if result["failed"] else 0
