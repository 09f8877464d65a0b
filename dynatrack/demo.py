"""``dynatrack demo``: the embedded default run, end to end on CPU.

Trains :class:`~dynatrack.models.DigitsMLP` on scikit-learn's bundled digits
with ``devices`` CPU DDP processes (gloo), records probe patterns of the train
and test splits on a log schedule (plus the training batch's own patterns every
25 steps) under ``<root>/<run_id>``, and prints a summary of the run directory.
"""

from __future__ import annotations

import logging
import time
import warnings

log = logging.getLogger(__name__)


def run_demo(
    *,
    root: str = "runs",
    steps: int = 400,
    devices: int = 2,
    run_name: str | None = None,
    analyze: bool = True,
    seed: int = 0,
) -> int:
    import lightning.pytorch as pl
    import torch

    from dynatrack import PatternRecorder, open_run, schedules
    from dynatrack.models import DigitsDataModule, DigitsMLP
    from dynatrack.report import print_summary

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=seed)
    model = DigitsMLP(hidden=[64, 64, 64], lr=1e-3)
    recorder = PatternRecorder(
        root,
        run_name=run_name,
        probe=dm.probe(),
        schedule=schedules.log_spaced(dense=10),
        batch_schedule=schedules.every(25),
        seed=seed,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=steps,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=5,
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    if trainer.global_rank != 0:
        return 0
    elapsed = time.perf_counter() - start
    run = open_run(recorder.run_dir)
    print_summary(run.summary())
    from rich.console import Console

    acc = trainer.callback_metrics.get("val/acc")
    Console().print(
        f"trained {steps} steps on {devices} CPU rank(s) in {elapsed:.1f} s"
        + (f", test accuracy {float(acc):.3f}" if acc is not None else "")
    )
    if analyze:
        try:
            from dynatrack.parallel.analyze import analyze_and_report
        except ImportError:
            return 0
        analyze_and_report(run.path)
    return 0
