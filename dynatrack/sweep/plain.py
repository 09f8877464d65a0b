"""A batch-size sweep as plain Lightning fits in one process, one after the other (no Ray).

The reference builder of sweep directories (the layout of ``dynatrack sweep``, see
the README): the comparison's tests build their sweeps with it, and
``jobs/batch_study.py`` uses it where Ray Train is not wanted. Each trial is an ordinary
Lightning fit on one CPU process (``world_size = 1``, so ``per_worker_batch = batch_size``)
with the :class:`~dynatrack.PatternRecorder`; every trial of seed ``s`` starts from
``init/seed=<s>.pt``. A finished trial (its ``trial.json`` exists) is skipped on a re-run.

>>> cfg = {"name": "tiny", "task": {"name": "synthetic", "seed": 0, "n_train": 64, "n_test": 64},
...        "model": {"hidden": [8]}, "batch_sizes": [8, 32], "seeds": [0], "budget": ["epochs"],
...        "epochs": 1, "optimizer": {"lr": 0.1}}
>>> sweep_dir = run_plain_sweep(cfg, "/tmp/dynatrack-doctest-sweeps")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

SWEEP_FORMAT = "dynatrack.sweep/1"

DEFAULTS: dict[str, Any] = {
    "name": "batch-sweep",
    "root": "runs",
    "task": {"name": "digits", "seed": 0},
    "model": {"hidden": [64, 64], "activation": "relu"},
    "batch_sizes": [16, 256],
    "workers": 1,
    "seeds": [0, 1],
    "budget": ["epochs"],
    "epochs": 10,
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "lr_rule": "fixed", "base_batch": 16,
                  "warmup_steps": 0},
    "recorder": {"schedule": {"log_spaced": {"dense": 10}}},
    "compare": {},
    "wandb": {"mode": "offline", "project": "dynatrack"},
}


def trial_plan(config: Mapping[str, Any], n_train: int) -> list[dict[str, Any]]:
    """The trials of a sweep config: batch size x seed x budget, with lr and ``max_steps``.

    ``epochs``: ``epochs`` passes for every batch size (``epochs·⌊n_train/B⌋`` updates);
    ``updates``: every batch size gets the updates of the smallest batch's ``epochs``.
    ``lr_rule: linear`` scales the lr by ``B / base_batch`` (Goyal et al. 2017).
    """
    opt = {**DEFAULTS["optimizer"], **(config.get("optimizer") or {})}
    sizes = sorted(int(b) for b in config["batch_sizes"])
    too_big = [b for b in sizes if b > n_train]
    if too_big:
        raise ValueError(f"batch sizes {too_big} exceed the {n_train} training samples")
    budgets = config.get("budget", ["epochs"])
    budgets = [budgets] if isinstance(budgets, str) else list(budgets)
    epochs = int(config.get("epochs", DEFAULTS["epochs"]))
    trials = []
    for budget in budgets:
        if budget not in ("epochs", "updates"):
            raise ValueError(f"budget {budget!r}: expected 'epochs' or 'updates'")
        for b in sizes:
            steps = epochs * (n_train // b) if budget == "epochs" else epochs * (n_train // sizes[0])
            lr = float(opt["lr"]) * (b / float(opt["base_batch"]) if opt.get("lr_rule") == "linear" else 1.0)
            for seed in config.get("seeds", [0]):
                trials.append({"trial_id": f"bs{b}-s{seed}-{budget}", "batch_size": b, "per_worker_batch": b,
                               "world_size": 1, "lr": lr, "seed": int(seed), "budget": budget,
                               "max_steps": int(steps), "status": "pending", "error": None, "wall_time_s": None})
    return trials


def _schedule(spec: Mapping[str, Any] | None) -> Any:
    from dynatrack import schedules

    if not spec:
        return schedules.log_spaced(dense=10)
    (kind, args), = spec.items()
    if kind == "at":
        return schedules.at(args)
    return getattr(schedules, kind)(**(args or {}))


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


class _Trial:
    """The LightningModule of one trial: cross-entropy, SGD, optional linear warm-up."""

    @staticmethod
    def build(net: nn.Module, lr: float, momentum: float, warmup_steps: int) -> Any:
        import lightning.pytorch as pl

        class TrialModule(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net(x)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                return nn.functional.cross_entropy(self(batch[0]), batch[1])

            def configure_optimizers(self) -> Any:
                opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum)
                if warmup_steps <= 0:
                    return opt
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps))
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        return TrialModule()


def run_plain_sweep(config: Mapping[str, Any], root: str | os.PathLike[str] | None = None) -> Path:
    """Run every trial of ``config`` as a plain Lightning fit; return the sweep directory.

    ``config`` takes the keys of ``configs/batch_sweep.yaml`` (``name``, ``task``, ``model``,
    ``batch_sizes``, ``seeds``, ``budget``, ``epochs``, ``optimizer``, ``recorder.schedule``,
    ``compare``); ``workers`` must be 1 here. A failing trial is marked ``failed`` with its
    error and the others go on.
    """
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from dynatrack import PatternRecorder
    from dynatrack.sweep.data import build_net, make_task

    cfg = copy.deepcopy({**DEFAULTS, **dict(config)})
    if int(cfg.get("workers", 1)) != 1:
        raise ValueError("the plain sweep runs one process per trial: set workers: 1 (dynatrack sweep runs more)")
    sweep_dir = Path(root if root is not None else cfg["root"]) / cfg["name"]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    task = dict(cfg["task"])
    train, test, meta = make_task(task.pop("name"), task.pop("seed", 0), **task)
    trials = trial_plan(cfg, len(train))
    manifest_path = sweep_dir / "sweep.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("config") != json.loads(json.dumps(cfg, default=str)):
            raise ValueError(f"{sweep_dir} holds a different sweep; choose another name or root")
        done = {t["trial_id"]: t for t in old.get("trials", []) if t.get("status") == "finished"}
        trials = [done.get(t["trial_id"], t) for t in trials]
    manifest = {"format": SWEEP_FORMAT, "sweep_id": cfg["name"], "config": cfg, "trials": trials,
                "versions": {"torch": torch.__version__, "lightning": pl.__version__}}
    _write_json_atomic(manifest_path, manifest)
    (sweep_dir / "init").mkdir(exist_ok=True)
    for seed in cfg["seeds"]:
        init = sweep_dir / "init" / f"seed={seed}.pt"
        if not init.exists():
            torch.manual_seed(int(seed))
            torch.save(build_net(cfg["model"], meta).state_dict(), init)
    opt = {**DEFAULTS["optimizer"], **(cfg.get("optimizer") or {})}
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    for trial in trials:
        if trial["status"] == "finished" and (sweep_dir / trial["trial_id"] / "trial.json").exists():
            continue
        trial.update(status="running", error=None)
        _write_json_atomic(manifest_path, manifest)
        start = time.perf_counter()
        try:
            net = build_net(cfg["model"], meta)
            net.load_state_dict(torch.load(sweep_dir / "init" / f"seed={trial['seed']}.pt", weights_only=True))
            pl.seed_everything(trial["seed"], verbose=False)
            module = _Trial.build(net, trial["lr"], float(opt.get("momentum", 0.0)), int(opt.get("warmup_steps", 0)))
            g = torch.Generator().manual_seed(trial["seed"])
            loader = DataLoader(train, batch_size=trial["per_worker_batch"], shuffle=True, drop_last=True, generator=g)
            rec = PatternRecorder(str(sweep_dir), run_name=trial["trial_id"],
                                  probe={"train": tuple(train.tensors), "test": tuple(test.tensors)},
                                  schedule=_schedule((cfg.get("recorder") or {}).get("schedule")), seed=trial["seed"])
            trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=trial["max_steps"], callbacks=[rec],
                                 logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False)
            trainer.fit(module, loader)
            _write_json_atomic(Path(rec.run_dir) / "trial.json", {
                "trial_id": trial["trial_id"], "final_step": int(trainer.global_step),
                "initial_state": "checkpoints/step=0.pt"})
            trial.update(status="finished", wall_time_s=time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - a failed trial is reported, the others go on
            log.warning("trial %s failed: %s", trial["trial_id"], exc)
            trial.update(status="failed", error=f"{type(exc).__name__}: {exc}", wall_time_s=time.perf_counter() - start)
        _write_json_atomic(manifest_path, manifest)
    return sweep_dir
