"""Run a sweep on Ray: Ray Train worker groups, launched by a Ray Tune grid, that serve the trials.

Every trial is a Lightning fit run by Ray Train (Ray Train V2): each Train worker runs the trial's fit
with ``RayDDPStrategy`` (gloo), ``RayLightningEnvironment`` and ``prepare_trainer``, and the
:class:`~dynatrack.PatternRecorder` on every worker writes the trial's run directory.

What is *not* one-per-trial is the worker group. Ray Train V2 starts a controller and fresh worker
processes for every ``TorchTrainer.fit()``, and a fresh process pays about 8 s of CPU importing torch,
Lightning and Ray Train before it can fit anything (about 30 s of fixed cost per trial on 2 cores,
measured: ``jobs/bench_sweep.py``). So the sweep starts one ``TorchTrainer`` per *lane*, as many lanes
as trials fit on the cluster at once (cluster CPUs // CPUs per trial, ``max_concurrent_trials``), and
each lane's workers take trials one after another from a shared queue (:class:`_TrialQueue`, a Ray
actor): rank 0 takes the next trial id, broadcasts it over the worker group's gloo process group, and
every rank runs that trial's Lightning fit in the same processes. Lanes are the grid of a Ray Tune
run (``tune.Tuner`` over lane indices; a lane's Tune function, 0 CPUs, only drives its ``TorchTrainer``).

A trial that raises ends its worker group (Ray Train tears down every rank, so no rank is left waiting
in a collective); the lane records that trial as failed and starts a fresh ``TorchTrainer`` for the
trials still queued. ``ray.trials_per_worker_group`` (default: unlimited) caps how many trials one
worker group serves; ``1`` gives every trial fresh worker processes (Ray's plain Train-in-Tune shape).

>>> from dynatrack.sweep.config import load_config
>>> result = run_sweep(load_config("configs/batch_sweep.yaml"))     # doctest: +SKIP
>>> result["failed"]                                                 # doctest: +SKIP
[]

The driver (this process) keeps ``sweep.json`` up to date from the queue's events (running, finished,
failed with the error and the wall time). A failed trial does not stop the others; a re-run of the
same sweep skips finished trials and re-runs the rest (see :func:`dynatrack.sweep.manifest.prepare`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynatrack.sweep.config import SweepConfigError

log = logging.getLogger(__name__)


class SweepResourceError(SweepConfigError):
    """A trial needs more resources than the cluster has."""


# A lane's Tune function only drives its TorchTrainer: no CPU of its own (Tune needs a non-empty request,
# so it asks for 1 MiB of Ray's memory resource), so a lane's CPUs are its Train workers' only.
DRIVER_RESOURCES = {"cpu": 0, "memory": 2**20}


class _TrialQueue:
    """The trials still to run, and what happened to the ones taken (a Ray actor, 0 CPUs).

    ``take(lane)`` hands out the next trial id (``None`` when none is left) and remembers it as the
    lane's current trial; ``finished`` / ``failed`` close it. Every change is an event
    ``(unix_time, trial_id, status, error)`` that the driver reads with ``events(since)``.
    """

    def __init__(self, trial_ids: list[str]) -> None:
        self.todo = deque(trial_ids)
        self.current: dict[int, str] = {}
        self.log: list[tuple[float, str, str, str | None]] = []

    def take(self, lane: int) -> str | None:
        if not self.todo:
            return None
        tid = self.current[lane] = self.todo.popleft()
        self.log.append((time.time(), tid, "running", None))
        return tid

    def finished(self, lane: int, trial_id: str) -> None:
        if self.current.get(lane) == trial_id:
            del self.current[lane]
        self.log.append((time.time(), trial_id, "finished", None))

    def failed(self, lane: int, error: str | None) -> str | None:
        """Close the lane's current trial as failed; returns its id (``None``: the lane had none)."""
        tid = self.current.pop(lane, None)
        if tid is not None:
            self.log.append((time.time(), tid, "failed", error))
        return tid

    def remaining(self) -> int:
        return len(self.todo)

    def events(self, since: int = 0) -> list[tuple[float, str, str, str | None]]:
        return self.log[since:]


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a lane: take trials from the queue and run each one's Lightning fit."""
    group_start = time.time()
    import lightning.pytorch as pl
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from dynatrack.sweep.trial import FailAt, build_fit, trainer_options, write_trial_file

    torch.set_num_threads(1)
    queue, lane, specs = config["queue"], int(config["lane"]), config["specs"]
    limit = config.get("max_trials")
    rank = ray.train.get_context().get_world_rank()
    served = 0
    while limit is None or served < limit:
        box = [ray.get(queue.take.remote(lane)) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)  # every rank runs the trial rank 0 took
        if box[0] is None:
            return
        spec = specs[box[0]]
        taken = time.time()
        module, loader, recorder, tensors = build_fit(spec)
        callbacks: list[pl.Callback] = [recorder]
        if spec.get("fail_at") is not None:
            callbacks.insert(0, FailAt(spec["fail_at"]))
        trainer = pl.Trainer(devices="auto", strategy=RayDDPStrategy(process_group_backend="gloo"),
                             plugins=[RayLightningEnvironment()], callbacks=callbacks, **trainer_options(spec))
        trainer = prepare_trainer(trainer)
        start, fit_start = time.perf_counter(), time.time()
        trainer.fit(module, train_dataloaders=loader)
        if rank == 0:
            timeline = {"lane": lane, "group_start": group_start, "trials_before_in_group": served, "worker_start": taken,
                        "fit_start": fit_start, "fit_end": time.time()}
            write_trial_file(spec, trainer, module, tensors, time.perf_counter() - start, timeline)
            ray.get(queue.finished.remote(lane, spec["trial_id"]))
        served += 1


def _lane_driver(config: dict[str, Any], specs: Mapping[str, dict[str, Any]] | None = None,
                 queue: Any = None, max_trials: int | None = None) -> None:
    """The Tune function of one lane: fit ``TorchTrainer``s that serve queued trials until none is left.

    A failed fit fails the lane's current trial (its error kept) and the lane goes on with a fresh
    worker group; a failure with no trial taken (the worker group itself cannot start) ends the lane.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    assert specs is not None and queue is not None
    lane = int(config["lane"])
    some = next(iter(specs.values()))
    group = 0
    while ray.get(queue.remaining.remote()) > 0:
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"queue": queue, "lane": lane, "specs": specs, "max_trials": max_trials},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=int(some["world_size"]), use_gpu=False,
                                                   resources_per_worker={"CPU": float(some["cpus_per_worker"])}),
            run_config=ray.train.RunConfig(name=f"lane{lane}-{group}-{some['stamp']}",
                                           storage_path=str(Path(some["sweep_dir"], "ray", "train"))),
        )
        group += 1
        try:
            trainer.fit()
        except Exception as exc:  # noqa: BLE001 - the trial's error goes to the manifest; the lane goes on
            if ray.get(queue.failed.remote(lane, error_summary(exc))) is None:
                raise


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
    import ray
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
        with ray_session(address, num_cpus=num_cpus, dashboard=True):
            timings["ray_start_s"] = time.perf_counter() - t1
            lanes = min(check_resources(cpus_per_trial), len(todo))
            timings["lanes"] = lanes
            queue = ray.remote(num_cpus=0)(_TrialQueue).remote(list(todo))
            callback = _make_callback_class()(path, manifest, queue)
            # Tune adds a TensorBoard logger when tensorboardX is installed and warns when it is not:
            # dynatrack logs to W&B, so that advice is noise for a sweep
            logging.getLogger("ray.tune.utils.callback").addFilter(_NoTensorboardAdvice())
            driver = tune.with_parameters(_lane_driver, specs=specs, queue=queue,
                                          max_trials=ray_cfg.get("trials_per_worker_group"))
            tuner = tune.Tuner(
                tune.with_resources(driver, DRIVER_RESOURCES),
                param_space={"lane": tune.grid_search(list(range(lanes)))},
                tune_config=tune.TuneConfig(max_concurrent_trials=lanes),
                run_config=tune.RunConfig(name=f"tune-{stamp}", storage_path=str(path / "ray"), verbose=0,
                                          callbacks=[callback]),
            )
            t2 = time.perf_counter()
            timings["tune_started_at"] = time.time()
            tune_output = io.StringIO()  # Tune prints an experiment banner whatever its verbosity
            with contextlib.redirect_stdout(tune_output):
                grid = tuner.fit()
            log.debug("Ray Tune output:\n%s", tune_output.getvalue())
            timings["tune_fit_s"] = time.perf_counter() - t2
            timings["tune_ended_at"] = time.time()
            callback.sync()
            lane_errors = [error_summary(r.error) for r in grid if r.error is not None]
            t3 = time.perf_counter()
        timings["ray_stop_s"] = time.perf_counter() - t3
        for tid in todo:  # a trial whose fit returned without trial.json did not finish
            trial = by_id[tid]
            if trial["status"] == "finished" and not (path / tid / "trial.json").exists():
                trial.update(status="failed", error="the fit ended without writing trial.json")
            elif trial["status"] in ("pending", "running"):  # e.g. left behind by a lane that failed
                trial.update(status="failed", error=(lane_errors[:1] or [trial.get("error")])[0]
                             or "the trial did not run to the end")
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
                         project=cfg["wandb"]["project"], mode=mode, wandb_dir=path / "wandb", job_type="trial",
                         config={**{k: trial[k] for k in keys}, "sweep_id": cfg["name"], "trial_id": trial["trial_id"]})
        except Exception as exc:  # noqa: BLE001 - W&B is a view; the run directories are the record
            log.warning("W&B logging of trial %s failed: %s", trial["trial_id"], exc)


def _make_callback_class() -> type:
    from ray import tune

    class ManifestCallback(tune.Callback):
        """Keeps ``sweep.json`` current from the driver: the trial queue's events (running, finished with
        its wall time, failed with its error), read at every step of Tune's loop."""

        def __init__(self, path: Path, manifest: dict[str, Any], queue: Any) -> None:
            self.path, self.manifest, self.queue = path, manifest, queue
            self.by_id = {t["trial_id"]: t for t in manifest["trials"]}
            self.seen = 0
            self.next_poll = 0.0
            self.pending: Any = None  # an events() request in flight

        def _apply(self, events: list[tuple[float, str, str, str | None]]) -> None:
            from dynatrack.sweep.manifest import write_sweep

            if not events:
                return
            self.seen += len(events)
            for when, tid, status, error in events:
                trial = self.by_id[tid]
                if status == "running":
                    trial.update(status="running", error=None, started_at=when)
                else:
                    trial.update(status=status, error=error, ended_at=when,
                                 wall_time_s=round(when - trial.get("started_at", when), 3))
            write_sweep(self.path, self.manifest)

        def sync(self) -> None:
            """Apply every event the queue holds to ``sweep.json`` (waits for the queue)."""
            import ray

            if self.pending is not None:
                self._apply(ray.get(self.pending))
                self.pending = None
            self._apply(ray.get(self.queue.events.remote(self.seen)))

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            """Tune's loop must not wait on the queue (its workers may hold every CPU): ask, and
            apply the answer at a later step once it is there; at most one ask every 0.5 s."""
            import ray

            if self.pending is not None:
                ready, _ = ray.wait([self.pending], timeout=0)
                if ready:
                    self._apply(ray.get(self.pending))
                    self.pending = None
            elif time.monotonic() >= self.next_poll:
                self.next_poll = time.monotonic() + 0.5
                self.pending = self.queue.events.remote(self.seen)

    return ManifestCallback


class _NoTensorboardAdvice(logging.Filter):
    """Drops Ray Tune's "install tensorboardX" warning (the sweep's trials log to W&B)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "TensorboardX logger cannot be instantiated" not in record.getMessage()
