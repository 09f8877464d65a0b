"""``PatternRecorder``: the Lightning callback that records activation patterns.

>>> rec = PatternRecorder("runs", probe=probe_x, schedule=schedules.log_spaced())  # doctest: +SKIP
>>> L.Trainer(callbacks=[rec]).fit(model, datamodule)                               # doctest: +SKIP
>>> open_run(rec.run_dir).pattern_bits(step=0, layer="net.1")                       # doctest: +SKIP

Step semantics: ``step`` is the number of optimizer updates applied to the
weights that produced a row (``trainer.global_step`` when the batch starts),
so step 0 is the initialization. Probe patterns, neuron counts and the weights
checkpoint of step ``s`` are taken before the training batch of step ``s``;
the ``batch`` source records that batch's own forward; the ``steps`` row of
step ``s`` holds that batch's loss, gradient norm and learning rate. With
``record_final=True`` the weights after the last update are recorded too.

Hot path: on a recorded step on an accelerator the hooks pack sign bits on the
device and the step's tensors are copied to the host once (non-blocking into
pinned memory); on CPU the hooks keep one bool mask per layer (a cast, not a
comparison: several times cheaper on CPU). Batch-source masks are packed on the
writer thread (GIL-free ufuncs, one call per layer and hand-off); probe masks go
to one buffer per split, every layer after the other, kept across probe steps, and are
packed and counted right after each probe chunk's forward by the compiled kernel
(``_pack``: one pass per layer; for a one-chunk split on its own native thread, which
never takes the GIL), or by numpy on the training thread without it (numpy work on
the writer thread would make the training thread wait for the GIL at every call).
Records go to the background
writer ``submit_every`` steps (or ``submit_bytes``) at a time; Arrow and all file
I/O happen there. Steps before the next one at which any schedule can fire
(:func:`dynatrack.schedules.next_step`) cost one comparison.

The host-side decoding (packing, per-class counts, record layouts) lives in
:mod:`dynatrack.recorder.decode`; this module is the Lightning glue.
"""

from __future__ import annotations

import logging
import math
import posixpath
import secrets
import time
import urllib.parse
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from dynatrack import schedules as sch
from dynatrack.recorder.capture import (
    Capture,
    LayerSelectionError,
    is_compiled,
    select_layers,
    trace_layers,
    user_name,
)
from dynatrack.recorder.data import IndexedDataset, default_sample_ids
from dynatrack.recorder.decode import (
    _decode_batches,
    _decode_probe,
    _device_record,
    _ProbeDecoder,
    _to_host,
    _when_done,
)
from dynatrack.recorder.probe import Probe, ProbeError, ProbeSplit
from dynatrack.store.fs import RunLocation, StoreError, validate_run_name
from dynatrack.store.manifest import (
    check_compatible,
    new_manifest,
    read_manifest,
    write_manifest,
)
from dynatrack.store.model_desc import write_model_description
from dynatrack.store.schema import MANIFEST, PROBE, PROBE_DIR
from dynatrack.store.writer import ShardWriter, WriterError

log = logging.getLogger(__name__)


class RecorderError(ValueError):
    """The recorder cannot run as configured."""


class PatternRecorder(Callback):
    """Record activation patterns and neuron partitions of ReLU-family layers.

    Args:
        root: where runs live (local path or ``pyarrow.fs`` URI); the run directory
            is ``<root>/<run_id>``.
        run_name: the run id; letters, digits, ``.``, ``_``, ``-``. Default: a
            fresh ``<timestamp>-<random>`` id shared by all DDP ranks. An existing
            run directory is refused unless the fit resumes from a checkpoint of it.
        layers: module names or glob patterns to hook; default every ReLU-family module.
        probe: the probe set (see :class:`~dynatrack.recorder.probe.Probe`): a tensor,
            ``(inputs, labels)``, ``(dataset, indices)``, or a dict of splits; or the
            string ``"datamodule"`` to take ``trainer.datamodule.probe()`` at setup
            (handy from a YAML config).
        probe_indices: with a dataset or tensor ``probe``, the indices to use.
        schedule: steps at which probe patterns are recorded (default ``log_spaced()``).
        batch_schedule: steps at which the training batch's own patterns are recorded
            (default: never). Needs sample ids in the batch (see :mod:`dynatrack.recorder.data`).
        neuron_schedule: steps at which neuron partition counts are recorded
            (default: ``schedule``).
        checkpoint_schedule: steps whose weights are saved to ``checkpoints/step=<s>.pt``
            (default: the probe schedule's steps and step 0; not the batch schedule's: pass
            ``checkpoint_schedule=batch_schedule`` for weights at every batch-recorded step).
        steps_schedule: steps with a row in the ``steps`` table (default: the union of
            the probe, neuron and checkpoint schedules).
        record_final: also record probe patterns, neurons and weights after the last update.
        probe_batch_size: probe chunk size (bounds memory of the probe forward).
        probe_forward: how to run the model on a probe chunk (default ``module(x)``).
        sample_ids: ``callable(batch) -> LongTensor`` for the batch source, when the
            batch is neither a dict with ``"sample_id"`` nor comes from :class:`IndexedDataset`.
        seed: stored in the manifest (default: ``torch.initial_seed()``).
        max_queue: bound of the writer queue in jobs (back-pressure when full); with
            ``submit_every``/``submit_bytes`` it bounds the recorded steps in flight (their
            bool masks, on CPU).
        rows_per_file: rows buffered per shard file.
        submit_every: recorded steps handed to the writer thread at once (batch-source
            steps, and on CPU probe steps, whose bits and counts are computed on the
            training thread); fewer, larger hand-offs cost the training thread less.
        submit_bytes: also hand over as soon as the waiting masks and bits reach this
            many bytes (bounds memory for wide layers, e.g. conv feature maps).
        commit_every_steps: the writer writes its buffered rows and commits them (see
            ``docs/reliability.md``) once they hold this many recorded steps; with
            ``submit_every`` it bounds what a crash costs: at most
            ``submit_every + commit_every_steps + 1`` recorded steps while the writer keeps up.
        commit_every_seconds: also commit rows that have waited this long (a slow fit
            recording rarely still commits on time).
        neuron_counts: where per-class neuron counts are computed: ``"device"`` (a one-hot
            matmul next to the model), ``"writer"`` (on the host from the bits: on an
            accelerator by the writer thread from the packed bits; on CPU from the bool
            masks right after the probe forward), or ``"auto"`` (device on accelerators,
            host on CPU).
    """

    def __init__(
        self,
        root: str = "runs",
        *,
        run_name: str | None = None,
        layers: Sequence[str] | None = None,
        probe: Any = None,
        probe_indices: Sequence[int] | None = None,
        schedule: sch.Schedule | None = None,
        batch_schedule: sch.Schedule | None = None,
        neuron_schedule: sch.Schedule | None = None,
        checkpoint_schedule: sch.Schedule | None = None,
        steps_schedule: sch.Schedule | None = None,
        record_final: bool = True,
        probe_batch_size: int = 1024,
        probe_forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
        sample_ids: Callable[[Any], torch.Tensor] | None = None,
        seed: int | None = None,
        max_queue: int = 4,
        rows_per_file: int = 1_000_000,
        submit_every: int = 32,
        submit_bytes: int = 16 * 2**20,
        commit_every_steps: int = 64,
        commit_every_seconds: float = 60.0,
        neuron_counts: Literal["auto", "device", "writer"] = "auto",
    ) -> None:
        super().__init__()
        if run_name is not None:
            validate_run_name(run_name)
        for label, s in (("schedule", schedule), ("batch_schedule", batch_schedule),
                         ("neuron_schedule", neuron_schedule), ("checkpoint_schedule", checkpoint_schedule),
                         ("steps_schedule", steps_schedule)):
            if s is not None and not callable(s):
                raise RecorderError(f"{label} must be a callable step -> bool (see dynatrack.schedules), got {s!r}")
        if submit_every < 1 or submit_bytes < 1 or max_queue < 1 or rows_per_file < 1:
            raise RecorderError(
                "submit_every, submit_bytes, max_queue and rows_per_file must be >= 1, got "
                f"{submit_every}, {submit_bytes}, {max_queue}, {rows_per_file}")
        if isinstance(commit_every_steps, bool) or not isinstance(commit_every_steps, int) or commit_every_steps < 1:
            raise RecorderError(f"commit_every_steps must be an integer >= 1, got {commit_every_steps!r}")
        if (isinstance(commit_every_seconds, bool) or not isinstance(commit_every_seconds, (int, float))
                or not 0 < commit_every_seconds < float("inf")):
            raise RecorderError(f"commit_every_seconds must be a number of seconds > 0, got {commit_every_seconds!r}")
        self.commit_every_steps = commit_every_steps
        self.commit_every_seconds = float(commit_every_seconds)
        if neuron_counts not in ("auto", "device", "writer"):
            raise RecorderError(f"neuron_counts must be 'auto', 'device' or 'writer', got {neuron_counts!r}")
        self.neuron_counts = neuron_counts
        if probe_batch_size < 1:
            raise RecorderError(f"probe_batch_size must be >= 1, got {probe_batch_size}")
        if sample_ids is not None and not callable(sample_ids):
            raise RecorderError("sample_ids must be a callable batch -> LongTensor")
        self.root = str(root)
        self.run_name = run_name
        self.layer_names = list(layers) if layers is not None else None
        if isinstance(probe, str) and probe != "datamodule":
            raise RecorderError(f"probe={probe!r}: the only string accepted is 'datamodule'")
        self._probe_from_datamodule = probe == "datamodule"
        self.probe = Probe.build(None if self._probe_from_datamodule else probe, probe_indices)
        has_probe = bool(self.probe.splits) or self._probe_from_datamodule
        self.schedule: sch.Schedule = schedule if schedule is not None else sch.log_spaced()
        if not has_probe:
            self.schedule = sch.never()
        self.batch_schedule: sch.Schedule = batch_schedule if batch_schedule is not None else sch.never()
        self.neuron_schedule: sch.Schedule = neuron_schedule if neuron_schedule is not None else self.schedule
        if not has_probe:
            self.neuron_schedule = sch.never()
        # weights where the probe is recorded (and step 0, and the final step with record_final), not at
        # batch-source steps: a state_dict per batch-recorded step costs more than the patterns
        self.checkpoint_schedule: sch.Schedule = (
            checkpoint_schedule if checkpoint_schedule is not None else sch.union([self.schedule, sch.at([0])])
        )
        # steps rows (loss, lr, gradient norm) go with the steps whose weights are probed or saved;
        # the batch source alone does not add them (the gradient norm costs a pass over all grads)
        self.steps_schedule: sch.Schedule = steps_schedule if steps_schedule is not None else sch.union(
            [self.schedule, self.neuron_schedule, self.checkpoint_schedule]
        )
        self.record_final = record_final
        self.probe_batch_size = probe_batch_size
        self.probe_forward = probe_forward or (lambda module, x: module(x))
        self.sample_ids_fn = sample_ids
        self.seed = seed
        self.max_queue = max_queue
        self.rows_per_file = rows_per_file
        self.submit_every = submit_every
        self.submit_bytes = submit_bytes
        self._pending_bytes = 0  # host bytes of the batch records waiting for the next hand-off
        self._pending: list[Callable[[], dict[str, Any]]] = []  # probe-step records
        self._pending_batches: list[tuple[Any, ...]] = []  # batch-step records: _decode_batches arguments
        # set up in setup()/on_fit_start()
        self.run_id: str | None = None
        self.attempt = 0
        self._loc: RunLocation | None = None
        self._writer: ShardWriter | None = None
        self._capture: Capture | None = None
        self._widths: dict[str, int] = {}
        self._shard: dict[str, ProbeSplit] = {}
        self._onehots: dict[str, list[torch.Tensor]] = {}
        self._out_weight: nn.Parameter | None = None
        self._last_step: dict[str, int] = {}
        self._restored: dict[str, Any] | None = None
        self._batch_active = False
        self._step_of_batch = 0
        self._indexed: bool | None = None
        self._counts_on_device = False
        self._on_accelerator = False
        self._eval_mode: _EvalMode | None = None
        self._probe_decoders: dict[str, _ProbeDecoder] = {}  # CPU probe steps: per split, kept for the run
        self._probe_meta: tuple[Any, ...] = ({}, {}, 0, None, {})
        self._grad_norm: Any = None  # accelerators: a tensor on the device; CPU: a float
        # the lr the optimizer applies in this step's update, read before it runs: Lightning steps a
        # per-step lr scheduler before on_train_batch_end, so reading it there gives the next step's
        self._step_lr: float | None = None
        self._want_steps = False  # the current step has a ``steps`` row (decided at batch start)
        self._steps_live = self._weights_live = True  # some schedule may fire (set at train start)
        self._next_due: float = 0
        self._one_micro_batch = True
        self._params: list[nn.Parameter] = []
        self._world = 1
        self._rank = 0
        self._warned: set[str] = set()  # layers already warned about (see _warn_missing)

    # -- public ---------------------------------------------------------------
    @property
    def run_dir(self) -> str:
        """The run directory (``<root>/<run_id>``), known once training started."""
        if self._loc is None:
            raise RecorderError("run_dir is known once trainer.fit() has started training")
        return self._loc.uri

    @property
    def state_key(self) -> str:
        """The key of this recorder's state in a Lightning checkpoint.

        ``root`` is normalized (:func:`_root_key`), so ``runs``, ``./runs/``, ``/abs/runs`` and
        ``file:///abs/runs`` name the same recorder and a resume finds its state however it is spelled.
        """
        return _state_key(_root_key(self.root), self.run_name)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "attempt": self.attempt, "last_step": dict(self._last_step)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the root was normalized keep it as it was spelled: find
        # this recorder's state under any spelling of the same root (Lightning then finds none
        # under state_key and does not call load_state_dict).
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        mine = [k for k in states if isinstance(k, str) and _same_recorder(k, self.root, self.run_name)]
        if len(mine) == 1:
            self.load_state_dict(dict(states[mine[0]]))
            return
        others = [k for k in states if isinstance(k, str) and k.startswith("PatternRecorder[")]
        if others:
            log.warning(
                "the checkpoint holds the state of %s but not of this recorder (%s): a recorder with another "
                "root or run_name wrote it; this fit records %s",
                ", ".join(others), self.state_key,
                "a new run" if self.run_name is None else f"into run_name={self.run_name!r}")

    # -- Lightning hooks ---------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._validate(trainer, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not on_fit_start: Lightning restores loop progress (global_step) and, for
        # some strategies, callback state only after on_fit_start.
        self._open_run(trainer, pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._before_step(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._want_steps:
            self._grad_norm = _grad_norm(self._params) if self._on_accelerator else _grad_norm_cpu(self._params)
            self._step_lr = _optimizer_lr(optimizer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._after_step(trainer, pl_module, outputs, batch)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Rows up to the checkpointed step must be on disk before the checkpoint
        # claims them, or a crash-and-resume would miss steps.
        if self._writer is not None:
            self._submit_pending()
            self._writer.flush()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.record_final and self._writer is not None:
            self._record_weights_step(trainer, pl_module, trainer.global_step, final=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        try:
            self._close(raise_errors=True)
        finally:
            # every rank's shards are on disk when fit() returns on any rank, so rank 0 can
            # open_run() right after fit (a rank whose close failed still joins, then raises)
            if trainer.world_size > 1:
                trainer.strategy.barrier("dynatrack-run-closed")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close(raise_errors=False, raised=exception)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close(raise_errors=False)

    # -- setup -------------------------------------------------------------
    def _validate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Everything that can be checked before training: fail here, not at step 5,000."""
        modules = select_layers(pl_module, self.layer_names)
        compiled = _compiled_parts(pl_module)
        if compiled:
            _guard_hooks(compiled)
        if self._probe_from_datamodule:
            dm = trainer.datamodule
            if dm is None or not callable(getattr(dm, "probe", None)):
                raise ProbeError(
                    "probe='datamodule' needs a LightningDataModule with a probe() method returning the probe "
                    f"splits; got {type(dm).__name__ if dm is not None else 'no datamodule'}"
                )
            self.probe = Probe.build(dm.probe())
        self._world, self._rank = trainer.world_size, trainer.global_rank
        root_loc = RunLocation.create(self.root, self.run_name or "probe-check")
        root_loc.check_writable()
        if self.probe.splits:
            split, first = next(iter(self.probe.splits.items()))
            x = first.inputs[: min(2, len(first))]
            device = _module_device(pl_module)
            eval_mode = _EvalMode(pl_module)
            was_training = eval_mode.enter()
            outputs: list[Any] = []
            try:
                calls, widths = trace_layers(
                    pl_module, modules, lambda t: outputs.append(self.probe_forward(pl_module, t)), x.to(device),
                    compiled=bool(compiled),
                )
            except Exception as exc:
                if compiled and type(exc).__module__.startswith("torch._dynamo"):
                    raise RecorderError(
                        f"torch.compile could not run the recorder's forward hooks in {', '.join(compiled)} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). The hooks run "
                        "eagerly, a graph break at each recorded module on recorded steps: compile without "
                        "fullgraph=True, or record this model uncompiled"
                    ) from exc
                raise ProbeError(
                    f"the probe split {split!r} (inputs of shape {tuple(first.inputs.shape)}, "
                    f"dtype {first.inputs.dtype}) does not fit {type(pl_module).__name__}: {exc}. "
                    "Pass probe inputs shaped like one training batch's inputs, or probe_forward=..."
                ) from exc
            finally:
                eval_mode.exit(was_training)
            for other, s in self.probe.splits.items():
                if tuple(s.inputs.shape[1:]) != tuple(first.inputs.shape[1:]):
                    raise ProbeError(
                        f"probe split {other!r} has sample shape {tuple(s.inputs.shape[1:])}, "
                        f"but split {split!r} has {tuple(first.inputs.shape[1:])}"
                    )
            silent = [n for n, k in calls.items() if k == 0]
            if silent and compiled:
                raise LayerSelectionError(
                    f"the forward hooks of layers {silent} did not run in the probe forward of the torch.compile'd "
                    f"{', '.join(compiled)}: it was compiled and called before the recorder's setup. Call "
                    "torch._dynamo.reset() before trainer.fit(), or compile the model without calling it first"
                )
            if silent:
                raise LayerSelectionError(
                    f"layers {silent} were never called in a forward pass of the probe; "
                    "remove them from layers=... or check the model's forward"
                )
            self._capture = Capture(modules, calls, compiled=bool(compiled))
            self._widths = widths
            _check_class_counts(self.probe, widths)
            if self._rank == 0:
                _warn_about_probe(self.probe, outputs[0] if outputs else None)
        else:
            if sch.is_never(self.batch_schedule):
                raise RecorderError(
                    "nothing to record: pass probe=... (a fixed probe set) and/or batch_schedule=... "
                    "(the training batch's own patterns)"
                )
            self._capture = Capture(modules, None, compiled=bool(compiled))
            self._widths = {}
        self._out_weight = _scalar_output_weight(pl_module, modules, self._widths)

    def _open_run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Agree on a run id across ranks, create or reopen the run directory."""
        self._world, self._rank = trainer.world_size, trainer.global_rank
        self._warned = set()
        self._steps_live = not sch.is_never(self.steps_schedule)
        self._next_due = 0  # the next step whose schedules must be checked (see _next_firing)
        self._one_micro_batch = _accumulation(trainer) == 1
        self._params = list(pl_module.parameters())  # for the gradient norm (walking the modules per row costs)
        self._weights_live = not all(
            sch.is_never(s) for s in (self.schedule, self.neuron_schedule, self.checkpoint_schedule))
        self._indexed = None
        self._counts_on_device = (
            self.neuron_counts == "device" or (self.neuron_counts == "auto" and pl_module.device.type != "cpu")
        )
        self._on_accelerator = pl_module.device.type != "cpu"
        if self._capture is not None:
            # On CPU the hooks keep bool masks (one cast per layer), packed on the host; on
            # accelerators the bits are packed on the device before the host copy.
            self._capture.pack_on_device = self._on_accelerator
        restored = self._restored or {}
        run_id = restored.get("run_id") or self.run_name or _new_run_id()
        run_id = trainer.strategy.broadcast(run_id, src=0)
        self.run_id = run_id
        self._loc = RunLocation.create(self.root, run_id)
        self._last_step = {k: int(v) for k, v in (restored.get("last_step") or {}).items()}
        decision: dict[str, Any] = {"error": None, "attempt": 0}
        if self._rank == 0:
            try:
                decision["attempt"] = self._create_or_resume(trainer, pl_module, bool(restored))
            except (StoreError, RecorderError) as exc:
                decision["error"] = str(exc)
        decision = trainer.strategy.broadcast(decision, src=0)
        if decision["error"]:
            raise RecorderError(decision["error"])
        self.attempt = int(decision["attempt"])
        self._shard = self.probe.shard(self._rank, self._world)
        self._eval_mode = _EvalMode(pl_module)
        # what the writer needs to decode a probe step, fixed for the fit (not rebuilt per step)
        self._probe_meta = (
            {name: s.sample_ids.numpy() for name, s in self._shard.items()},
            {name: (s.labels.numpy() if s.labels is not None else None) for name, s in self._shard.items()},
            # per split: a split without labels has no class counts (its neurons are labelled ``partial``)
            {name: (self.probe.num_classes if s.labels is not None else 0) for name, s in self._shard.items()},
            list(self._widths)[-1] if self._widths else None,
            dict(self._widths),
        )
        device = pl_module.device
        c = self.probe.num_classes
        self._onehots = {}
        for name, split in self._shard.items():
            # as Lightning converts the training batches (e.g. to bf16 under precision="bf16-true")
            split.inputs = trainer.precision_plugin.convert_input(split.inputs.to(device))
            if c and split.labels is not None:
                onehot = torch.nn.functional.one_hot(split.labels, c).T.to(device=device, dtype=torch.float32)
            else:
                onehot = torch.ones(1, len(split), device=device)
            self._onehots[name] = [onehot[:, i : i + self.probe_batch_size] for i in range(0, len(split), self.probe_batch_size)]
        self._writer = ShardWriter(
            self._loc, rank=self._rank, attempt=self.attempt, max_queue=self.max_queue, rows_per_file=self.rows_per_file,
            max_buffer_steps=self.commit_every_steps, max_buffer_seconds=self.commit_every_seconds,
        )

    def _create_or_resume(self, trainer: Trainer, pl_module: LightningModule, resuming: bool) -> int:
        loc = self._loc
        assert loc is not None
        wanted = new_manifest(
            run_id=loc.run_id,
            world_size=self._world,
            layers=[{"name": n, "width": w} for n, w in self._widths.items()],
            probe=self.probe.describe(),
            model=_model_spec(pl_module),
            seed=self.seed if self.seed is not None else int(torch.initial_seed() % 2**63),
            schedules={k: sch.describe(v) for k, v in self._schedules().items()},
            start_step=trainer.global_step,
        )
        if loc.exists(MANIFEST):
            existing = read_manifest(loc)
            check_compatible(existing, wanted, loc.uri)
            if not resuming:
                ckpt = getattr(trainer, "ckpt_path", None)
                if ckpt:
                    raise RecorderError(
                        f"run directory {loc.uri!r} already exists and the checkpoint {ckpt!r} holds no state of "
                        f"this recorder ({self.state_key}): it was not written by a fit recording this run. "
                        "Pass a checkpoint of the fit that recorded it, or choose another run_name"
                    )
                raise RecorderError(
                    f"run directory {loc.uri!r} already exists. Choose another run_name, or resume it by "
                    "passing ckpt_path=<a Lightning checkpoint of that run> to trainer.fit()"
                )
            attempt = max(a["attempt"] for a in existing.get("attempts", [{"attempt": 0}])) + 1
            existing.setdefault("attempts", []).append({"attempt": attempt, "start_step": int(trainer.global_step)})
            write_manifest(loc, existing, overwrite=True)
            return attempt
        if loc.exists() and loc.list_files(""):
            raise RecorderError(f"{loc.uri!r} exists and is not an empty dynatrack run; refusing to write into it")
        loc.mkdir()
        self._write_probe(loc)
        write_manifest(loc, wanted, overwrite=False)
        # what weight analyses need of the model, as data (chain / exported graph); never raises
        write_model_description(loc, pl_module, layers=list(self._widths),
                                input_shape=wanted["probe"].get("input_shape") or [], forward=self.probe_forward)
        return 0

    def _write_probe(self, loc: RunLocation) -> None:
        """Store the probe set once (rank 0, at run creation; not on the hot path)."""
        import io

        import pyarrow.parquet as pq

        for name, split in self.probe.splits.items():
            n = len(split)
            flat = split.inputs.detach().to("cpu", torch.float32).reshape(n, -1).numpy()
            table = pa.table(
                {
                    "sample_id": split.sample_ids.numpy(),  # type: ignore[union-attr]
                    "label": pa.array(split.labels.numpy() if split.labels is not None else [None] * n, pa.int64()),
                    "input": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1]).cast(
                        pa.list_(pa.float32())
                    ),
                },
                schema=PROBE,
            )
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            if not loc.write_bytes_atomic(f"{PROBE_DIR}/{name}.parquet", buf.getvalue()):  # atomic no-replace
                raise StoreError(f"{loc.uri}/{PROBE_DIR}/{name}.parquet already exists: another fit is creating "
                                 "this run at the same time. Choose another run_name")

    def _schedules(self) -> dict[str, sch.Schedule]:
        return {"probe": self.schedule, "batch": self.batch_schedule, "neurons": self.neuron_schedule,
                "checkpoint": self.checkpoint_schedule, "steps": self.steps_schedule}

    # -- recording -----------------------------------------------------------
    def _due(self, kind: str, step: int, schedule: sch.Schedule) -> bool:
        return schedule(step) and self._last_step.get(kind, -1) < step

    def _before_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._writer is None:
            return
        self._writer.raise_if_failed()
        step = self._step_of_batch = trainer.global_step
        if step < self._next_due:  # no schedule fires before _next_due: nothing to check (most steps)
            self._want_steps = False
            return
        # schedules known to record nothing are not even called
        self._want_steps = self._steps_live and self._due("steps", step, self.steps_schedule)
        if self._weights_live:
            self._record_weights_step(trainer, pl_module, step, final=False)
        cap = self._capture
        if self._due("batch", step, self.batch_schedule):
            cap.start_batch()  # attaches the hooks unless the previous step was recorded too
            self._batch_active = True
        elif cap.batch_attached:
            cap.detach_batch()  # unrecorded steps run without hooks
        # the next step can skip this path unless it must detach the batch hooks or is another
        # micro-batch of this step (gradient accumulation)
        after = step + 1 if self._one_micro_batch and not cap.batch_attached else step
        self._next_due = self._next_firing(after)

    def _next_firing(self, step: int) -> float:
        """The first step ``>= step`` at which a live schedule may fire (``step`` if one is an opaque callable).

        Called with the current step under gradient accumulation, so every micro-batch of a
        recorded step takes the full path (the ``steps`` row is written at the one whose
        optimizer ran), and after a batch-recorded step (the next one detaches the hooks).
        """
        live = [self.batch_schedule]
        if self._steps_live:
            live.append(self.steps_schedule)
        if self._weights_live:
            live += [self.schedule, self.neuron_schedule, self.checkpoint_schedule]
        nexts = [sch.next_step(s, step) for s in live]
        return step if any(n is None for n in nexts) else min(nexts)  # type: ignore[type-var]

    def _record_weights_step(self, trainer: Trainer, pl_module: LightningModule, step: int, *, final: bool) -> None:
        """Probe patterns, neuron counts and the weights checkpoint of ``step``."""
        probe = self._due("probe", step, self.schedule) or (final and self._last_step.get("probe", -1) < step and bool(self._shard))
        neurons = self._due("neurons", step, self.neuron_schedule) or (final and self._last_step.get("neurons", -1) < step and bool(self._shard))
        ckpt = self._due("checkpoint", step, self.checkpoint_schedule) or (final and self._last_step.get("checkpoint", -1) < step)
        if probe or neurons:
            self._record_probe(pl_module, step, patterns=probe, neurons=neurons)
        if probe:
            self._last_step["probe"] = step
        if neurons:
            self._last_step["neurons"] = step
        if ckpt:
            if self._rank == 0:
                assert self._writer is not None
                self._submit_pending()
                self._writer.save_checkpoint(step, _host_state_dict(pl_module))
            self._last_step["checkpoint"] = step

    def _record_probe(self, pl_module: LightningModule, step: int, *, patterns: bool, neurons: bool) -> None:
        cap = self._capture
        assert cap is not None and self._writer is not None and self._eval_mode is not None
        was_training = self._eval_mode.enter()
        pieces: list[torch.Tensor] = []
        layout: list[tuple[str, str, str, int, int]] = []  # (what, split, layer, rows, cols)
        # Neuron counts: on an accelerator a one-hot matmul on the device; on CPU they are
        # summed from the bool masks right after the forward (neuron_counts="auto").
        counts_on_device = self._counts_on_device
        # CPU: the lean batch hooks write each layer's mask into the split's ProbeMasks buffer
        masks_path = not (counts_on_device or self._on_accelerator)
        what = "bits" if patterns else "nbits"
        deferred: list[tuple[tuple[str, str, str], list[Any]]] = []  # CPU bool masks (probe hooks)
        decoded_items: list[tuple[str, str, str, np.ndarray]] = []  # the CPU path: bits and counts, decoded per chunk
        in_flight: list[Any] = []  # the CPU path: the kernel's calls still running on its background thread
        ids, labels, n_classes, last_layer, widths = self._probe_meta
        was_attached = cap.batch_attached
        bs = self.probe_batch_size
        try:
            if masks_path:
                cap.start_batch()
            else:
                cap.detach_batch()  # the training forward's hooks must not see the probe (re-attached after)
                cap.attach()
                cap.enabled = True
            with torch.no_grad():
                for split_name, split in self._shard.items():
                    if masks_path:
                        dec = self._probe_decoders.get(split_name)
                        if dec is None:  # its buffer holds one chunk's rows, reused chunk after chunk
                            buf = cap.probe_masks(self._widths, min(bs, len(split)))
                            dec = self._probe_decoders[split_name] = _ProbeDecoder(
                                split_name, buf, len(split), labels[split_name], n_classes[split_name])
                        cap.reuse = dec.buf
                        dec.begin(bits=patterns, counts=neurons)
                        for k, i in enumerate(range(0, len(split), bs)):
                            self.probe_forward(pl_module, split.inputs[i : i + bs])
                            taken = cap.take()
                            cap.enabled = True
                            for layer in self._widths:
                                if len(taken.get(layer, ())) != 1:
                                    raise RecorderError(
                                        f"layer {layer} was called {len(taken.get(layer, ()))} times in the probe "
                                        f"forward of rows {i}-{min(i + bs, len(split)) - 1} of split {split_name!r} at "
                                        f"step {step} (once per forward at setup); the recorded layers must run once "
                                        "in every forward")
                            # decode the chunk now, while its masks are still in this core's cache
                            dec.add(k, i, min(bs, len(split) - i))
                        decoded_items += dec.items()
                        if dec.pending is not None:
                            in_flight.append(dec.pending)
                        continue
                    chunks = self._onehots[split_name]
                    keep_bits = patterns or (neurons and not counts_on_device)
                    cap.reset()
                    for i, onehot in enumerate(chunks):
                        cap.start_forward(keep_bits=keep_bits, onehot=onehot if neurons and counts_on_device else None)
                        self.probe_forward(pl_module, split.inputs[i * bs : (i + 1) * bs])
                    for layer in self._widths:
                        if keep_bits:
                            items = cap.bits[layer]
                            if items[0].dtype == torch.bool:
                                deferred.append(((what, split_name, layer), list(items)))
                            else:
                                bits = torch.cat(items) if len(items) > 1 else items[0]
                                pieces.append(bits)
                                layout.append((what, split_name, layer, bits.shape[0], bits.shape[1]))
                        if neurons and counts_on_device:
                            counts = cap.counts[layer].round().to(torch.int32)
                            pieces.append(counts)
                            layout.append(("counts", split_name, layer, counts.shape[0], counts.shape[1]))
        finally:
            cap.enabled = False
            cap.reuse = None
            if masks_path:
                if not was_attached:
                    cap.detach_batch()
            else:
                cap.detach_probe()
                cap.reset()
                cap.start_forward(keep_bits=True, onehot=None)
            self._eval_mode.exit(was_training)
        if neurons and self._out_weight is not None:
            sign = torch.sign(self._out_weight.detach()[0]).to(torch.int8)
            pieces.append(sign.reshape(1, -1))
            layout.append(("out_sign", "", "", 1, sign.numel()))
        host, event = _to_host(pieces) if pieces else (None, None)
        from_bits = neurons and not counts_on_device
        if not self._on_accelerator:
            # CPU: packed and counted chunk by chunk right after each chunk's forward (by the
            # compiled kernel: for a one-chunk split on its own thread, which never takes the
            # GIL). Numpy work on the writer thread would hand the GIL back and forth with this
            # thread at every call: the training step after the probe measured 0.5 ms slower.
            decoded = _decode_probe(host, event, layout, step, ids, n_classes, last_layer,
                                    labels=labels if from_bits else None, widths=widths, deferred=deferred,
                                    decoded=decoded_items)
            self._pending.append(_when_done(in_flight, decoded))
            # what waits is now small (packed bits, counts): it joins the regular hand-offs
            self._pending_bytes += sum(c.bits.nbytes for c in decoded.get("patterns", ()))
            self._submit_if_due()
            return
        self._pending.append(
            lambda: _decode_probe(host, event, layout, step, ids, n_classes, last_layer,
                                  labels=labels if from_bits else None, widths=widths, deferred=deferred))
        self._submit_pending()

    def _after_step(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any) -> None:
        """Keep the step's batch masks and ``steps`` row as a pending record (training thread: keep it lean).

        On CPU the record holds the tensors as they are (ids, bool masks, the loss and
        gradient norm); the writer thread converts them. On an accelerator they are
        copied to the host once, non-blocking (:func:`_to_host`).
        """
        want_steps, batch_bits = self._want_steps, self._batch_active
        if not (want_steps or batch_bits) or self._writer is None:
            return
        step = self._step_of_batch
        ids = bits = None
        if batch_bits:
            self._batch_active = False
            ids = self._batch_ids(trainer, batch)
            bits = self._capture.take()  # type: ignore[union-attr]
            if len(bits) != len(self._capture.names):  # type: ignore[union-attr]
                self._warn_missing(step, bits)
            n = ids.shape[0]
            for layer, chunks in bits.items():
                self._pending_bytes += chunks[0].nbytes
                if len(chunks) != 1 or chunks[0].shape[0] != n:
                    raise RecorderError(
                        f"layer {layer} saw {sum(c.shape[0] for c in chunks)} samples in the training forward "
                        f"but the batch has {n} sample ids; check sample_ids=... (or gradient accumulation "
                        "or a second forward inside training_step)"
                    )
            self._last_step["batch"] = step
        scalars = meta = None
        if want_steps and self._grad_norm is None and trainer.global_step == step:
            # gradient accumulation: the optimizer of this step has not run yet; the row is
            # written at the micro-batch whose optimizer step ran (its gradient norm is known)
            want_steps = _accumulation(trainer) == 1
        if want_steps:
            self._want_steps = False
            loss = _loss_of(outputs).detach()
            gn, self._grad_norm = self._grad_norm, None
            lr, self._step_lr = self._step_lr, None
            if self._on_accelerator:  # one tensor, for the single host copy
                gn = gn.float() if gn is not None else torch.tensor(float("nan"), device=loss.device)
                scalars = torch.stack([loss.float().reshape(()), gn.reshape(()).to(loss.device)])
            else:  # CPU: the writer thread reads them
                scalars = (loss, gn)
            self._last_step["steps"] = step
            meta = {
                "step": step,
                "epoch": trainer.current_epoch,
                "lr": lr if lr is not None else _lr(trainer),
                "batch_size": (ids.numel() if ids is not None else _batch_len(batch)) * self._world * _accumulation(trainer),
                "wall_time": time.time(),
            }
        if ids is None and meta is None:
            return
        if self._on_accelerator:
            self._pending_batches.append(_device_record(step, ids, bits, scalars, meta))
        else:
            self._pending_batches.append((step, ids, bits, scalars, meta))
        self._submit_if_due()

    def _warn_missing(self, step: int, bits: Mapping[str, Any]) -> None:
        """Warn (once per layer and fit) about recorded layers whose hooks did not run in a training forward."""
        missing = [name for name in self._capture.names if name not in bits and name not in self._warned]  # type: ignore[union-attr]
        if missing:
            self._warned.update(missing)
            warnings.warn(
                f"layers {missing} did not run in the training forward of step {step}: the batch source has no "
                "rows of them at that step (and at later steps where they do not run)", UserWarning, stacklevel=2)

    def _submit_if_due(self) -> None:
        """Hand the pending records over once ``submit_every`` of them or ``submit_bytes`` wait."""
        if len(self._pending_batches) + len(self._pending) >= self.submit_every or (
            self._pending_bytes >= self.submit_bytes
        ):
            self._submit_pending()

    def _submit_pending(self) -> None:
        """Hand the recorded steps kept since the last hand-off to the writer as one job.

        Per-step records are handed over every ``submit_every`` steps (and at probe
        steps, checkpoints and the end), so the writer thread wakes rarely and holds
        the GIL in few, larger slices.
        """
        if not (self._pending or self._pending_batches) or self._writer is None:
            return
        jobs, self._pending = self._pending, []
        batches, self._pending_batches = self._pending_batches, []
        self._pending_bytes = 0

        def run_all() -> dict[str, list[Any]]:
            merged: dict[str, list[Any]] = {}
            results = [_decode_batches(batches)] if batches else []
            results += [job() for job in jobs]
            for result in results:
                for kind, items in result.items():
                    merged.setdefault(kind, []).extend(items if isinstance(items, list) else [items])
            return merged

        self._writer.submit(run_all)

    def _indexed_loader(self, trainer: Trainer) -> bool:
        """Whether the training batches come from an :class:`IndexedDataset` (looked up once per fit)."""
        if self._indexed is None:
            self._indexed = isinstance(getattr(trainer.train_dataloader, "dataset", None), IndexedDataset)
        return self._indexed

    def _batch_ids(self, trainer: Trainer, batch: Any) -> torch.Tensor:
        if self.sample_ids_fn is not None:
            ids = self.sample_ids_fn(batch)
        elif isinstance(batch, Mapping):
            ids = default_sample_ids(batch)
        elif self._indexed_loader(trainer):
            ids = default_sample_ids(batch)
        else:
            ids = None
        if ids is None:
            raise RecorderError(
                "the batch source needs each sample's id: wrap the training dataset in "
                "dynatrack.IndexedDataset (batches then end with the index tensor), use dict batches with "
                "a 'sample_id' tensor, or pass sample_ids=callable(batch) -> LongTensor"
            )
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        if ids.dim() != 1:
            ids = ids.reshape(-1)
        return ids if ids.dtype == torch.int64 else ids.to(torch.int64)

    def _close(self, *, raise_errors: bool, raised: BaseException | None = None) -> None:
        """Stop the writer; ``raised``: the exception that ends the fit (a writer failure is reported once)."""
        if self._capture is not None:
            self._capture.detach()
        if self._writer is None:
            return
        try:
            self._submit_pending()
        except Exception:
            if raise_errors:
                raise
        writer, self._writer = self._writer, None
        try:
            writer.close()
        except Exception as exc:
            if raise_errors:
                raise
            if isinstance(raised, WriterError) and exc.__cause__ is not None and exc.__cause__ is raised.__cause__:
                return  # the fit already ends with this failure
            log.exception("dynatrack writer failed while closing the run")


# -- helpers -----------------------------------------------------------------------


def _root_key(root: str) -> str:
    """``root`` normalized for comparison: local paths absolute and resolved, URIs without trailing slashes.

    >>> _root_key("s3://bucket//runs/") == _root_key("s3://bucket/runs")
    True
    """
    text = str(root)
    if "://" in text:
        parts = urllib.parse.urlsplit(text)
        if parts.scheme.lower() != "file":
            path = posixpath.normpath("/" + parts.path.lstrip("/"))
            return f"{parts.scheme.lower()}://{parts.netloc}{path.rstrip('/')}"
        text = urllib.parse.unquote(parts.path)
    return str(Path(text).expanduser().resolve())


def _state_key(root_key: str, run_name: str | None) -> str:
    return f"PatternRecorder[root={root_key}, run_name={run_name}]"


def _same_recorder(key: str, root: str, run_name: str | None) -> bool:
    """Whether checkpoint state ``key`` (``PatternRecorder[root=..., run_name=...]``) names this root and run name."""
    prefix, suffix = "PatternRecorder[root=", f", run_name={run_name}]"
    if not (key.startswith(prefix) and key.endswith(suffix)):
        return False
    return _root_key(key[len(prefix) : -len(suffix)]) == _root_key(root)


#: The most memory the per-class neuron counts of one probe split may take (int32 ``[classes, neurons]``).
MAX_COUNTS_BYTES = 2**31


def _check_class_counts(probe: Probe, widths: Mapping[str, int]) -> None:
    """Refuse, at setup, labels so large that the per-class counts of the recorded layers would not fit."""
    c = probe.num_classes
    neurons = sum(-(-w // 8) * 8 for w in widths.values())
    if c * neurons * 4 > MAX_COUNTS_BYTES:
        raise ProbeError(
            f"probe labels go up to {c - 1}: the per-class neuron counts would take {c * neurons * 4 / 2**30:.1f} GiB "
            f"per probe split ({c:,} classes x {neurons:,} recorded neurons, at most {MAX_COUNTS_BYTES // 2**30} GiB). "
            "Remap the labels to 0..K-1 (labels = torch.unique(labels, return_inverse=True)[1]), record fewer "
            "layers, or pass the probe without labels")


def _warn_about_probe(probe: Probe, output: Any) -> None:
    """Warn once, at setup, about probe samples whose records would mislead.

    NaN inputs give NaN pre-activations, which the recorder reads as active; labels
    beyond the model's outputs (a classifier's logits) are classes the model cannot predict.
    """
    for name, split in probe.splits.items():
        if split.inputs.is_floating_point() or split.inputs.is_complex():
            bad = torch.isnan(split.inputs.reshape(len(split), -1)).any(dim=1)
            if bool(bad.any()):
                ids = split.sample_ids[bad].tolist()  # type: ignore[index]
                warnings.warn(
                    f"probe split {name!r} has {len(ids)} sample(s) with NaN inputs (sample ids "
                    f"{ids[:5]}{' ...' if len(ids) > 5 else ''}): their pre-activations are NaN and their neurons "
                    "read as active. Drop or fix those samples", UserWarning, stacklevel=2)
    n_out = output.shape[-1] if isinstance(output, torch.Tensor) and output.dim() >= 2 else None
    if n_out and n_out > 1 and probe.num_classes > n_out:
        worst = max((int(s.labels.max()), name) for name, s in probe.splits.items() if s.labels is not None)
        warnings.warn(
            f"probe split {worst[1]!r} has label {worst[0]}, but the model has {n_out} outputs per sample "
            f"(classes 0..{n_out - 1}): the per-class counts include classes the model cannot predict. "
            "Check the probe labels", UserWarning, stacklevel=2)


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class _EvalMode:
    """Switch a model to eval mode for the probe and back, restoring every submodule's own flag.

    When no module overrides ``nn.Module.train`` (the usual case), the flags are set
    directly, as ``train()`` would set them, without its recursion: a probe step pays
    for this on the training thread.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.modules = list(module.modules())
        self.plain = all(type(m).train is nn.Module.train for m in self.modules)

    def enter(self) -> list[bool]:
        flags = [m.training for m in self.modules]
        if self.plain:
            for m in self.modules:
                m.__dict__["training"] = False
        else:
            self.module.eval()
        return flags

    def exit(self, flags: list[bool]) -> None:
        if self.plain:
            for m, training in zip(self.modules, flags):
                m.__dict__["training"] = training
        else:
            for m, training in zip(self.modules, flags):
                m.training = training


def _accumulation(trainer: Trainer) -> int:
    """Micro-batches per optimizer step (``accumulate_grad_batches``)."""
    return int(getattr(trainer, "accumulate_grad_batches", 1) or 1)


def _grad_norms(params: list[nn.Parameter]) -> list[torch.Tensor] | None:
    """The 2-norm of each gradient of ``params`` (``None`` without any), before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]


def _grad_norm(params: list[nn.Parameter]) -> torch.Tensor | None:
    """The 2-norm of all gradients of ``params`` as one tensor on their device (accelerators)."""
    norms = _grad_norms(params)
    if norms is None:
        return None
    if any(n.dtype != torch.float32 for n in norms):
        norms = [n.float() for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))


def _grad_norm_cpu(params: list[nn.Parameter]) -> float | None:
    """The 2-norm of all gradients of ``params`` (CPU), combined in Python floats (float64).

    Between training steps every torch dispatch pays for cold caches: this is about
    15 us cheaper than ``vector_norm(stack(norms))``. (Left to the writer thread, the
    torch calls hand the GIL back and forth with this thread.)
    """
    norms = _grad_norms(params)
    return None if norms is None else math.sqrt(sum(float(n) ** 2 for n in norms))


def _loss_of(outputs: Any) -> torch.Tensor:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss
    return torch.tensor(float("nan"))


def _optimizer_lr(optimizer: Any) -> float | None:
    try:
        return float(optimizer.param_groups[0]["lr"])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


def _lr(trainer: Trainer) -> float:
    """The first optimizer's lr now (NaN without one): for steps whose optimizer step did not run."""
    lr = _optimizer_lr(trainer.optimizers[0]) if trainer.optimizers else None
    return math.nan if lr is None else lr


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for item in batch:
            n = _batch_len(item)
            if n:
                return n
    return 0


def _model_spec(module: LightningModule) -> dict[str, Any]:
    """``{class_path, init_args}``: enough to rebuild the model for weight analyses."""
    cls = type(module)
    init_args: dict[str, Any] = {}
    for k, v in dict(getattr(module, "hparams", {}) or {}).items():
        if k.startswith("_"):  # LightningCLI's _class_path / _instantiator
            continue
        if isinstance(v, (int, float, str, bool)) or v is None:
            init_args[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(i, (int, float, str, bool)) for i in v):
            init_args[k] = list(v)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def _scalar_output_weight(
    module: nn.Module, hooked: list[tuple[str, nn.Module]], widths: dict[str, int]
) -> nn.Parameter | None:
    """The outgoing weight ``a`` of the last hidden layer when the model output is scalar.

    Found as the last ``nn.Linear`` in ``named_modules()`` order, when it has one
    output and takes exactly the last recorded layer's width as input.
    """
    if not widths:
        return None
    linears = [m for _, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    last = linears[-1]
    if last.out_features == 1 and last.in_features == list(widths.values())[-1]:
        return last.weight
    return None


def _host_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights on the host, keyed as in the uncompiled model (no ``_orig_mod`` of ``torch.compile``)."""
    return {user_name(k): v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _compiled_parts(module: nn.Module) -> list[str]:
    """What of ``module`` runs under ``torch.compile``: its compiled submodules, or the whole module."""
    parts = [user_name(n) for n, m in module.named_modules() if n and is_compiled(m)]
    if getattr(module, "_compiler_ctx", None):  # Lightning's unwrapped trainer.fit(torch.compile(model))
        parts.insert(0, type(module).__name__)
    return parts


def _guard_hooks(compiled: list[str]) -> None:
    """Make ``torch.compile`` check the forward hooks the recorder adds and removes between steps.

    By default (``torch._dynamo.config.skip_nnmodule_hook_guards``) compiled code ignores
    hooks added after it was compiled: the batch source would record step 0 only. With the
    guards, compiled code keeps one graph with the recorder's hooks (run eagerly: a graph
    break at each recorded module, on recorded steps) and one without.
    """
    import torch._dynamo

    if torch._dynamo.config.skip_nnmodule_hook_guards:
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        # graphs compiled so far (a forward called before fit) do not check hooks: compiled again
        torch._dynamo.reset()
        log.info("dynatrack: %s run under torch.compile; set torch._dynamo.config.skip_nnmodule_hook_guards = False "
                 "and reset torch.compile's caches so that the recorder's forward hooks run on every recorded step",
                 ", ".join(compiled))
