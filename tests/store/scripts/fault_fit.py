"""A tiny digits fit that a fault test kills (SIGKILL) at a chosen point; Lightning's ``ddp`` re-executes it per rank.

python tests/store/scripts/fault_fit.py '{"root": ..., "name": ..., "devices": 2, "steps": 30,
    "ckpt_dir": ..., "ckpt_every": 5, "kill": {"rank": 1, "step": 23} | {"rank": 1, "hook": "fit_end"} | null,
    "resume": "<a .ckpt>" | null}'
"""

import json
import os
import signal
import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dynatrack import PatternRecorder, schedules
from dynatrack.models import DigitsDataModule, DigitsMLP

warnings.filterwarnings("ignore")


class Kill(pl.Callback):
    """SIGKILL this process on ``rank``: at the start of training step ``step``, or in ``on_fit_end``
    (placed before the recorder, so the recorder's own on_fit_end never runs)."""

    def __init__(self, rank: int, step: int | None = None, hook: str | None = None) -> None:
        self.rank, self.step, self.hook = rank, step, hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_fit_end(self, trainer, pl_module):  # noqa: ANN001, ANN201
        if trainer.global_rank == self.rank and self.hook == "fit_end":
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32)
    model = DigitsMLP(hidden=[20, 12], lr=1e-2)
    callbacks: list[pl.Callback] = [Kill(**cfg["kill"])] if cfg.get("kill") else []
    callbacks.append(PatternRecorder(cfg["root"], run_name=cfg["name"], probe=dm.probe(), schedule=schedules.every(2),
                                     batch_schedule=schedules.every(3)))
    callbacks.append(ModelCheckpoint(dirpath=cfg["ckpt_dir"], every_n_train_steps=cfg.get("ckpt_every", 5),
                                     save_top_k=-1, filename="{step}"))
    devices = int(cfg.get("devices", 1))
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         callbacks=callbacks, max_steps=cfg["steps"], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, dm, ckpt_path=cfg.get("resume"))
