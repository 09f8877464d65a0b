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

    from dynatrack import PatternRecorder, schedules
    from dynatrack.console import print_fit_report, quiet_third_party, step_progress
    from dynatrack.models import DigitsDataModule, DigitsMLP

    quiet_third_party(lightning_info=False)  # no tips, no device/DDP banners: the report below says it
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
        callbacks=[recorder, step_progress()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,  # step_progress(): optimizer steps done/total, rank 0
        enable_model_summary=False,
        check_val_every_n_epoch=5,
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    if trainer.global_rank != 0:
        return 0
    print_fit_report(trainer, recorder, elapsed=time.perf_counter() - start)
    if analyze:
        from dynatrack.parallel.analyze import analyze_and_report

        analyze_and_report(recorder.run_dir)
    return 0
