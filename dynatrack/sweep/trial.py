"""One trial of a sweep as plain Lightning pieces: the module, the training loader, the recorder and
the ``Trainer`` options. Ray Train runs them on every worker (:mod:`dynatrack.parallel.sweep`); a plain
one-process fit of the same trial (tests, the benchmark's baseline) uses :func:`fit_plain`.

A *trial spec* is the ``sweep.json`` trial entry plus the sweep settings a worker needs (plain
data, so it travels to Ray workers as it is)::

    spec = trial_spec(cfg, trial, sweep_dir)      # see dynatrack.sweep.config.plan_trials

The trial's run directory is ``<sweep_dir>/<trial_id>`` (run name = trial id). Its checkpoints are
``SweepMLP`` state dicts: the network's parameters under ``net.`` (``net.body.0.weight``, ...,
``net.head.bias``), i.e. ``build_net(model, meta)``'s keys with the prefix ``net.``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

TRIAL_FILE = "trial.json"
INIT_DIR = "init"


def init_path(sweep_dir: str | os.PathLike[str], seed: int) -> Path:
    """``<sweep_dir>/init/seed=<s>.pt``: the initial weights every trial of ``seed`` starts from."""
    return Path(sweep_dir, INIT_DIR, f"seed={seed}.pt")


def initial_state(model: Mapping[str, Any], meta: Mapping[str, int], seed: int) -> dict[str, torch.Tensor]:
    """``build_net(model, meta)``'s state dict after ``torch.manual_seed(seed)`` (the shared init)."""
    from dynatrack.sweep.data import build_net

    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in build_net(model, meta).state_dict().items()}


class SweepMLP(pl.LightningModule):
    """The sweep's classifier: ``build_net`` MLP, cross-entropy, SGD or Adam, optional linear warm-up.

    Built from primitives only (``save_hyperparameters``), so ``dynatrack analyze`` can rebuild it
    from a trial's manifest.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: list[int],
        activation: str = "relu",
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        from dynatrack.sweep.data import build_net

        self.save_hyperparameters()
        self.net = build_net({"hidden": list(hidden), "activation": activation},
                             {"in_features": in_features, "num_classes": num_classes})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum)
        if hp.warmup_steps <= 0:
            return opt
        warm = int(hp.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trial_spec(cfg: Mapping[str, Any], trial: Mapping[str, Any], sweep_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What a worker needs to run ``trial`` (plain data)."""
    return {
        **{k: trial[k] for k in ("trial_id", "batch_size", "per_worker_batch", "world_size", "lr", "seed",
                                 "budget", "max_steps")},
        "sweep_id": cfg["name"],
        "sweep_dir": str(Path(sweep_dir).resolve()),
        "task": dict(cfg["task"]),
        "model": dict(cfg["model"]),
        "optimizer": {k: cfg["optimizer"][k] for k in ("name", "momentum", "warmup_steps")},
        "recorder": dict(cfg["recorder"]),
    }


def build_fit(spec: Mapping[str, Any]) -> tuple[SweepMLP, DataLoader, Any, dict[str, torch.Tensor]]:
    """``(module, train loader, recorder, probe tensors)`` for one trial, the module holding the shared
    initial weights of its seed. Seeds Lightning with the trial's seed (data order)."""
    from dynatrack import IndexedDataset, PatternRecorder
    from dynatrack.recorder.probe import ProbeSplit
    from dynatrack.sweep.config import build_schedule
    from dynatrack.sweep.data import make_task

    pl.seed_everything(int(spec["seed"]), verbose=False)
    task = dict(spec["task"])
    name, data_seed = task.pop("name"), int(task.pop("seed", 0))
    train, test, meta = make_task(name, seed=data_seed, **task)
    module = SweepMLP(meta["in_features"], meta["num_classes"], list(spec["model"]["hidden"]),
                      spec["model"].get("activation", "relu"), spec["optimizer"]["name"], float(spec["lr"]),
                      float(spec["optimizer"]["momentum"]), int(spec["optimizer"]["warmup_steps"]))
    state = torch.load(init_path(spec["sweep_dir"], spec["seed"]), map_location="cpu", weights_only=True)
    module.net.load_state_dict(state)
    loader = DataLoader(IndexedDataset(train), batch_size=int(spec["per_worker_batch"]), shuffle=True, drop_last=True)

    rec_cfg = spec["recorder"]
    probe = {}
    for split, ds in (("train", train), ("test", test)):
        x, y = ds.tensors
        n = len(x)
        if n > rec_cfg["probe_size"]:  # a fixed subset, the same for every trial of the sweep
            g = torch.Generator().manual_seed(data_seed)
            idx = torch.randperm(n, generator=g)[: rec_cfg["probe_size"]].sort().values
        else:
            idx = torch.arange(n)
        probe[split] = ProbeSplit(x[idx], y[idx], idx)
    schedule = build_schedule(rec_cfg["schedule"])
    batch_schedule = build_schedule(rec_cfg["batch_schedule"])
    from dynatrack import schedules as sch

    ckpt = rec_cfg["checkpoint_schedule"]
    # step 0 is always saved (the comparison measures from it); the final step by record_final
    checkpoint_schedule = sch.union([sch.at([0]), build_schedule(ckpt) if ckpt is not None
                                     else sch.union([schedule, batch_schedule])])
    neuron = rec_cfg["neuron_schedule"]
    recorder = PatternRecorder(
        spec["sweep_dir"],
        run_name=spec["trial_id"],
        probe=probe,
        schedule=schedule,
        batch_schedule=batch_schedule,
        checkpoint_schedule=checkpoint_schedule,
        neuron_schedule=build_schedule(neuron) if neuron is not None else None,
        record_final=True,
        probe_batch_size=int(rec_cfg["probe_batch_size"]),
        seed=int(spec["seed"]),
    )
    return module, loader, recorder, {"train": train.tensors, "test": test.tensors}


def trainer_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Trainer`` options of a trial (besides strategy, devices and callbacks)."""
    return dict(accelerator="cpu", max_steps=int(spec["max_steps"]), max_epochs=-1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                limit_val_batches=0, num_sanity_val_steps=0)


class FailAt(pl.Callback):
    """Raise at a given step on every rank: a deliberately failing trial (tests of failure and resume)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"deliberate failure at step {trainer.global_step} (fail_at)")


@torch.no_grad()
def evaluate(module: nn.Module, tensors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``module`` on each split (sums over all samples)."""
    out = {}
    was = module.training
    module.eval()
    for split, (x, y) in tensors.items():
        logits = module(x)
        out[f"{split}_loss"] = float(nn.functional.cross_entropy(logits, y, reduction="sum")) / len(y)
        out[f"{split}_acc"] = float((logits.argmax(1) == y).sum()) / len(y)
    module.train(was)
    return out


def write_trial_file(spec: Mapping[str, Any], trainer: pl.Trainer, module: nn.Module,
                     tensors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], wall_time_s: float,
                     timeline: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Write ``<run_dir>/trial.json`` (rank 0, after a successful fit): its presence marks the trial finished.

    ``timeline``: Unix times of this process's milestones (``worker_start``: the trial taken up,
    ``fit_start``, ``fit_end``; on the Ray engine also ``lane``, ``group_start``: the worker group's
    start, and ``trials_before_in_group``), for the overhead breakdown of ``jobs/bench_sweep.py``.
    """
    metrics = evaluate(module, tensors)
    record = {
        "trial_id": spec["trial_id"],
        "final_step": int(trainer.global_step),
        "initial_state": "checkpoints/step=0.pt",
        "final_state": f"checkpoints/step={int(trainer.global_step)}.pt",
        "batch_size": spec["batch_size"], "per_worker_batch": spec["per_worker_batch"],
        "world_size": int(trainer.world_size), "lr": spec["lr"], "seed": spec["seed"], "budget": spec["budget"],
        "final_metrics": {k: (v if math.isfinite(v) else None) for k, v in metrics.items()},
        "fit_wall_time_s": wall_time_s,
        "timeline": dict(timeline or {}),
    }
    path = Path(spec["sweep_dir"], spec["trial_id"], TRIAL_FILE)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return record


def fit_plain(spec: Mapping[str, Any], *, devices: int = 1, strategy: Any = "auto",
              callbacks: list[pl.Callback] | None = None) -> dict[str, Any]:
    """Fit one trial as a plain Lightning fit in this process (no Ray): the reference the Ray Train fit
    is checked against, and the benchmark's baseline. Returns the trial record."""
    import time

    torch.set_num_threads(1)
    worker_start = time.time()
    module, loader, recorder, tensors = build_fit(spec)
    trainer = pl.Trainer(devices=devices, strategy=strategy, callbacks=[*(callbacks or []), recorder],
                         **trainer_options(spec))
    start, fit_start = time.perf_counter(), time.time()
    trainer.fit(module, train_dataloaders=loader)
    timeline = {"worker_start": worker_start, "fit_start": fit_start, "fit_end": time.time()}
    return write_trial_file(spec, trainer, module, tensors, time.perf_counter() - start, timeline)
