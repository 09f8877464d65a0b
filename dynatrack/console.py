"""What ``dynatrack demo`` and ``dynatrack fit`` print: the fit report (the run summary of
:mod:`dynatrack.report`, one line on the fit, the run directory), training progress, and quiet
third-party output (Lightning's promotional tips dropped, no doubled log lines).

>>> quiet_third_party()                    # idempotent; keeps Lightning's other messages
>>> print_fit_report(trainer, recorder, elapsed=12.3)   # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

#: The loggers Lightning's ``rank_zero_info`` tips go through.
_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                "pytorch_lightning.utilities.rank_zero")


class _DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing [litlogger|litmodels]" records, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("💡 Tip") or ("pypi.org/project/lit" in message and "Tip" in message))


def quiet_third_party(*, lightning_info: bool = True) -> None:
    """Drop Lightning's promotional tips; with ``lightning_info=False`` also its INFO lines
    (devices found, the DDP banner), keeping its warnings and errors."""
    for name in _TIP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    if not lightning_info:
        for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)


def setup_logging(verbose: bool = False) -> None:
    """dynatrack's own log lines on stderr, once: a handler on the ``dynatrack`` logger only.

    The root logger is left alone: a handler there printed every Lightning message a second
    time (Lightning has its own handler on the ``lightning`` logger, which also propagates).
    """
    logger = logging.getLogger("dynatrack")
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not any(getattr(h, "_dynatrack", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._dynatrack = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def fit_metrics(trainer: Any) -> dict[str, float]:
    """The trainer's scalar ``callback_metrics`` (what ``self.log`` produced), as floats."""
    out = {}
    for key, value in getattr(trainer, "callback_metrics", {}).items():
        try:
            if getattr(value, "numel", lambda: 1)() == 1:
                out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def print_fit_report(trainer: Any, recorder: Any, *, elapsed: float) -> None:
    """On global rank 0: the run summary, one line on the fit, and the run directory.

    ``recorder``: the fit's :class:`~dynatrack.PatternRecorder` (None: no run directory).
    """
    from rich.console import Console

    if trainer.global_rank != 0:
        return
    console = Console()
    if recorder is not None and getattr(recorder, "run_dir", None):
        from dynatrack.report import print_summary
        from dynatrack.store import open_run

        print_summary(open_run(recorder.run_dir).summary())
    metrics = fit_metrics(trainer)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if not k.endswith("_step"))
    accel = type(trainer.accelerator).__name__.replace("Accelerator", "") or "CPU"
    console.print(f"trained {trainer.global_step} steps on {trainer.world_size} {accel} rank(s) in {elapsed:.1f} s"
                  + (f"; {shown}" if shown else ""))
    if recorder is not None and getattr(recorder, "run_dir", None):
        console.print(f"run directory: {recorder.run_dir}")


def find_recorder(trainer: Any) -> Any:
    """The trainer's PatternRecorder callback, or None."""
    from dynatrack import PatternRecorder

    return next((cb for cb in trainer.callbacks if isinstance(cb, PatternRecorder)), None)


def step_progress() -> Any:
    """A Lightning callback showing training steps done/total (``max_steps``) with rich, on rank 0.

    Lightning's own bars count batches per epoch ("Epoch 5/-2" for a ``max_steps`` fit);
    this one counts optimizer steps. On a terminal it updates live; elsewhere its final
    state is one line.
    """
    import lightning.pytorch as pl

    class StepProgress(pl.Callback):
        def __init__(self) -> None:
            self._bar: Any = None
            self._task: Any = None

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.global_rank != 0:
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            self._bar = Progress(TextColumn("training steps"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[loss]}"))
            self._task = self._bar.add_task("train", total=total, completed=trainer.global_step, loss="")
            self._bar.start()

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                               batch: Any, batch_idx: int) -> None:
            if self._bar is not None:
                loss = trainer.callback_metrics.get("train/loss", trainer.callback_metrics.get("loss"))
                self._bar.update(self._task, completed=trainer.global_step,
                                 loss="" if loss is None else f"loss {float(loss):.4f}")

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.teardown(trainer, pl_module, "fit")

        def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            if self._bar is not None:
                self._bar.stop()
                self._bar = None

    return StepProgress()
