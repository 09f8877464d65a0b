"""Run a sweep on Ray: a Ray Tune grid whose trials each launch a Ray Train ``TorchTrainer``.

This is Ray's documented Train-in-Tune pattern (Ray >= 2.43, Ray Train V2): a Tune function
(:func:`_trial_driver`, 0 CPUs: it only drives) builds and fits one ``TorchTrainer`` per trial; every
Train worker runs the trial's Lightning fit with ``RayDDPStrategy`` (gloo), ``RayLightningEnvironment``
and ``prepare_trainer``, with the :class:`~dynatrack.PatternRecorder` on every worker writing the
trial's run directory. Tune runs the trials in parallel up to the cluster's CPUs
(``max_concurrent_trials`` = cluster CPUs // CPUs per trial); no scheduler of our own.

>>> from dynatrack.sweep.config import load_config
>>> result = run_sweep(load_config("configs/batch_sweep.yaml"))     # doctest: +SKIP
>>> result["failed"]                                                 # doctest: +SKIP
[]

The driver (this process) keeps ``sweep.json`` up to date from a Tune callback (running, finished,
failed with the error and the wall time). A failed trial does not stop the others; a re-run of the
same sweep skips finished trials and re-runs the rest (see :func:`dynatrack.sweep.manifest.prepare`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynatrack.sweep.config import SweepConfigError

log = logging.getLogger(__name__)


class SweepResourceError(SweepConfigError):
    """A trial needs more resources than the cluster has."""


# The Tune function only drives its TorchTrainer: no CPU of its own (Tune needs a non-empty request,
# so it asks for 1 MiB of Ray's memory resource), so a trial's CPUs are its Train workers' only.
DRIVER_RESOURCES = {"cpu": 0, "memory": 2**20}


def _train_worker(spec: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: the trial's Lightning fit under ``RayDDPStrategy``."""
    worker_start = time.time()
    import lightning.pytorch as pl
    import torch
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from dynatrack.sweep.trial import FailAt, build_fit, trainer_options, write_trial_file

    torch.set_num_threads(1)
    module, loader, recorder, tensors = build_fit(spec)
    callbacks: list[pl.Callback] = [recorder]
    if spec.get("fail_at") is not None:
        callbacks.insert(0, FailAt(spec["fail_at"]))
    trainer = pl.Trainer(devices="auto", strategy=RayDDPStrategy(process_group_backend="gloo"),
                         plugins=[RayLightningEnvironment()], callbacks=callbacks, **trainer_options(spec))
    trainer = prepare_trainer(trainer)
    start, fit_start = time.perf_counter(), time.time()
    trainer.fit(module, train_dataloaders=loader)
    if trainer.global_rank == 0:
        timeline = {"worker_start": worker_start, "fit_start": fit_start, "fit_end": time.time()}
        write_trial_file(spec, trainer, module, tensors, time.perf_counter() - start, timeline)


def _trial_driver(config: dict[str, Any], specs: Mapping[str, dict[str, Any]] | None = None) -> None:
    """The Tune function of one trial: build and fit its ``TorchTrainer`` (Ray's Train-in-Tune pattern)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    assert specs is not None
    spec = specs[config["trial_id"]]
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=spec,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=int(spec["world_size"]), use_gpu=False,
                                               resources_per_worker={"CPU": float(spec["cpus_per_worker"])}),
        run_config=ray.train.RunConfig(name=f"{spec['trial_id']}-{spec['stamp']}",
                                       storage_path=str(Path(spec["sweep_dir"], "ray", "train"))),
    )
    trainer.fit()


def error_summary(error: BaseException | str | None, limit: int = 400) -> str | None:
    """The last meaningful line of a trial's error (Ray wraps the worker's exception in tracebacks)."""
    if error is None:
        return None
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    picked = [ln for ln in lines if ("Error" in ln or "Exception" in ln) and not ln.startswith(("File ", "Traceback"))]
    text = (picked or lines or [type(error).__name__])[-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_resources(cpus_per_trial: float) -> int:
    """How many trials fit at once; a :class:`SweepResourceError` if not even one ever can."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    if cpus_per_trial > total:
        raise SweepResourceError(
            f"a trial needs {cpus_per_trial:g} CPUs (workers x ray.cpus_per_worker) but the Ray cluster has "
            f"{total:g}; lower workers or ray.cpus_per_worker, or use a larger cluster (--num-cpus for a local Ray)")
    return max(1, int(math.floor(total / cpus_per_trial + 1e-9)))


def run_sweep(
    cfg: Mapping[str, Any],
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    fail_at: Mapping[str, int] | None = None,
    wandb_mode: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep of a validated config; returns a summary.

    Args:
        cfg: from :func:`dynatrack.sweep.config.load_config` / ``validate_config``.
        address: an existing Ray cluster (``"auto"``, ``host:port``); default ``cfg["ray"]["address"]``,
            else a local Ray started and stopped here (inside ``ray job submit``: the job's cluster).
        num_cpus: CPUs of a local Ray (default ``cfg["ray"]["num_cpus"]``, else all).
        fail_at: ``{trial_id: step}``: make those trials raise at that step on every worker (tests
            of failure reporting and resume; never read from a config file).
        wandb_mode: overrides ``cfg["wandb"]["mode"]``.

    Returns:
        ``{"sweep_dir", "trials" (the sweep.json entries), "ran", "skipped", "failed", "timings"}``.
    """
    from ray import tune

    from dynatrack.parallel.cluster import ray_session
    from dynatrack.sweep.manifest import prepare, write_sweep
    from dynatrack.sweep.trial import trial_spec

    from dynatrack.tracking import resolve_mode

    wandb_mode = resolve_mode(wandb_mode or cfg["wandb"]["mode"])  # online without credentials: an error now
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    path, manifest, todo = prepare(cfg)
    timings["prepare_s"] = time.perf_counter() - t0
    skipped = [t["trial_id"] for t in manifest["trials"] if t["trial_id"] not in todo]
    if skipped:
        log.info("skipping %d finished trials: %s", len(skipped), ", ".join(skipped))
    ray_cfg = cfg["ray"]
    cpus_per_trial = float(cfg["workers"]) * float(ray_cfg["cpus_per_worker"])
    address = address if address is not None else ray_cfg.get("address")
    num_cpus = num_cpus if num_cpus is not None else ray_cfg.get("num_cpus")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    by_id = {t["trial_id"]: t for t in manifest["trials"]}
    if todo:
        specs = {}
        for tid in todo:
            spec = trial_spec(cfg, by_id[tid], path)
            spec.update(cpus_per_worker=float(ray_cfg["cpus_per_worker"]), stamp=stamp,
                        fail_at=(fail_at or {}).get(tid))
            specs[tid] = spec
        t1 = time.perf_counter()
        with ray_session(address, num_cpus=num_cpus):
            timings["ray_start_s"] = time.perf_counter() - t1
            concurrent = check_resources(cpus_per_trial)
            callback = _make_callback_class()(path, manifest)
            # Tune adds a TensorBoard logger when tensorboardX is installed and warns when it is not:
            # dynatrack logs to W&B, so that advice is noise for a sweep
            logging.getLogger("ray.tune.utils.callback").addFilter(_NoTensorboardAdvice())
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(_trial_driver, specs=specs), DRIVER_RESOURCES),
                param_space={"trial_id": tune.grid_search(todo)},
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),
                run_config=tune.RunConfig(name=f"tune-{stamp}", storage_path=str(path / "ray"), verbose=0,
                                          callbacks=[callback]),
            )
            t2 = time.perf_counter()
            tune_output = io.StringIO()  # Tune prints an experiment banner whatever its verbosity
            with contextlib.redirect_stdout(tune_output):
                grid = tuner.fit()
            log.debug("Ray Tune output:\n%s", tune_output.getvalue())
            timings["tune_fit_s"] = time.perf_counter() - t2
            for result in grid:
                tid = result.config["trial_id"]
                if result.error is not None:
                    by_id[tid].update(status="failed", error=error_summary(result.error))
            t3 = time.perf_counter()
        timings["ray_stop_s"] = time.perf_counter() - t3
        for tid in todo:  # a trial whose fit returned without trial.json did not finish
            trial = by_id[tid]
            if trial["status"] == "finished" and not (path / tid / "trial.json").exists():
                trial.update(status="failed", error="the fit ended without writing trial.json")
            elif trial["status"] in ("pending", "running"):
                trial.update(status="failed", error=trial.get("error") or "the trial did not run to the end")
        write_sweep(path, manifest)
        t4 = time.perf_counter()
        _log_trials(cfg, path, [by_id[t] for t in todo if by_id[t]["status"] == "finished"], wandb_mode)
        timings["wandb_s"] = time.perf_counter() - t4
    timings["total_s"] = time.perf_counter() - t0
    failed = [t["trial_id"] for t in manifest["trials"] if t["status"] == "failed"]
    return {"sweep_dir": str(path), "trials": manifest["trials"], "ran": list(todo), "skipped": skipped,
            "failed": failed, "timings": timings}


def _log_trials(cfg: Mapping[str, Any], path: Path, trials: list[dict[str, Any]], mode: str) -> None:
    """One W&B run per finished trial (loss and lr against the step), grouped by the sweep id; a W&B
    failure is a warning."""
    if mode == "disabled" or not trials:
        return
    try:
        import pyarrow as pa
        import pyarrow.compute as pc

        from dynatrack.store import open_run
        from dynatrack.tracking import log_analysis
    except ImportError as exc:  # pragma: no cover - W&B extras missing
        log.warning("W&B logging skipped: %s", exc)
        return
    for trial in trials:
        try:
            steps = open_run(path / trial["trial_id"]).steps()
            # the global batch's loss is the mean of the ranks' losses (equal per-worker batches)
            agg = steps.group_by("step").aggregate([("loss", "mean"), ("lr", "max")]).sort_by("step")
            table = pa.table({"step": pc.cast(agg["step"], pa.int64()), "loss": agg["loss_mean"], "lr": agg["lr_max"]})
            keys = ("batch_size", "per_worker_batch", "lr", "world_size", "seed", "budget", "max_steps")
            log_analysis({"train": table}, dims={}, run_id=f"{cfg['name']}-{trial['trial_id']}",
                         wandb_id=f"{cfg['name']}-{trial['trial_id']}", group=cfg["name"],
                         project=cfg["wandb"]["project"], mode=mode, wandb_dir=path / "wandb",
                         config={**{k: trial[k] for k in keys}, "sweep_id": cfg["name"], "trial_id": trial["trial_id"]})
        except Exception as exc:  # noqa: BLE001 - W&B is a view; the run directories are the record
            log.warning("W&B logging of trial %s failed: %s", trial["trial_id"], exc)


def _make_callback_class() -> type:
    from ray import tune

    class ManifestCallback(tune.Callback):
        """Keeps ``sweep.json`` current from the driver: running, finished (with wall time), failed."""

        def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
            self.path, self.manifest = path, manifest
            self.by_id = {t["trial_id"]: t for t in manifest["trials"]}
            self.started: dict[str, float] = {}

        def _update(self, trial: Any, **changes: Any) -> None:
            from dynatrack.sweep.manifest import write_sweep

            tid = trial.config["trial_id"]
            if tid in self.started and changes.get("status") in ("finished", "failed"):
                now = time.time()
                changes.update(wall_time_s=round(now - self.started[tid], 3), ended_at=now)
            self.by_id[tid].update(changes)
            write_sweep(self.path, self.manifest)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started[trial.config["trial_id"]] = now = time.time()
            self._update(trial, status="running", error=None, started_at=now)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._update(trial, status="finished", error=None)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._update(trial, status="failed", error=None)  # the error text comes with the results

    return ManifestCallback


class _NoTensorboardAdvice(logging.Filter):
    """Drops Ray Tune's "install tensorboardX" warning (the sweep's trials log to W&B)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "TensorboardX logger cannot be instantiated" not in record.getMessage()
