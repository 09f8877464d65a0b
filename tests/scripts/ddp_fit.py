"""Standalone fit for the DDP tests (Lightning's ``ddp`` re-executes this script per rank).

python tests/scripts/ddp_fit.py ROOT RUN_NAME DEVICES STEPS
"""

import json
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from dynatrack import PatternRecorder, open_run, schedules
from dynatrack.models import DigitsDataModule, DigitsMLP

warnings.filterwarnings("ignore")

class SlowRankOneClose(pl.Callback):
    """Rank 1 reaches the recorder's on_fit_end late: rank 0 must still see its shards after fit."""

    def on_fit_end(self, trainer, pl_module):  # noqa: ANN001, ANN201
        if trainer.global_rank == 1:
            time.sleep(1.5)


if __name__ == "__main__":
    root, run_name, devices, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32)
    model = DigitsMLP(hidden=[20, 12], lr=1e-2)
    rec = PatternRecorder(root, run_name=run_name, probe=dm.probe(), schedule=schedules.at([0, 5]),
                          batch_schedule=schedules.every(4))
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", callbacks=[SlowRankOneClose(), rec],
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, dm)
    if trainer.global_rank == 0:  # what a script sees right after fit returns
        run = open_run(rec.run_dir)
        Path(root, f"{run_name}-seen-after-fit.json").write_text(
            json.dumps({"ranks": run.ranks, "pattern_rows": run.patterns().num_rows}))
