"""Benchmark: ``PatternRecorder`` overhead on the training step, printed as one JSON object.

The overhead of a configuration is the ratio of step times with and without the
recorder, measured *interleaved* in one process so machine noise hits every arm:
one ``lightning.Trainer.fit`` per configuration, whose steps alternate in short
segments between the arms (without recorder; with recorder; with recorder and
its default weights checkpointing). Each recorder sits behind a :class:`Gate`
callback that forwards its per-batch hooks only during its own segments, so its
writer thread lives through the whole fit as in a real run. The first callback
stamps ``time.perf_counter()`` at ``on_train_batch_start``; a step's time is the
difference between consecutive stamps, so the recorder's hooks on both sides of
the step are included. The first few steps of each segment are dropped. A
batch-source segment spans two of the recorder's hand-offs to its writer thread
(``submit_every`` steps each), so the writer's work on a segment's records
overlaps that segment's steps rather than the next arm's (whose first steps are
dropped anyway).

Configurations (the issue's targets in brackets):

* ``a``: digits MLP 64-256-256-256-10, batch 128, ``batch`` source every step (<= 1.03x);
* ``b``: MLP 784-512-512-512-10, synthetic data, batch 256, ``batch`` source every step (<= 1.03x);
* ``c``: digits MLP as ``a``, ``probe`` source with 1,024 samples, ``schedule=every(10)``,
  neurons at the same steps (recorder overhead <= probe forward cost + 2%). The
  probe work lands on one step in ten, so for ``c`` the headline ratio is over
  10-step windows (one probe step each). The probe forward's cost is measured by a
  fourth arm, ``probe_forward``: a callback that runs only the plain probe forwards
  (no_grad, eval, same chunks, at the same steps), the hand-written alternative; the
  headline is ``ratio(with) - (ratio(probe_forward) - 1)``. (The probe forward timed
  back to back outside the steps, warm, is reported too, as ``probe_forward_isolated``.)
  A second estimate, ``by_step_position``, takes the median step time at each position
  of the windows (0: the probe step) per arm and sums them: a burst of machine noise in
  one step of a window then moves it as little as it moves a median step time. A third,
  ``paired_by_cycle``, compares the three arms within each cycle (their segments are
  adjacent in time) and takes the median over the cycles, so a slow drift of the
  machine's speed cancels.

Also: process RSS (``VmRSS``, and the peak ``VmHWM``) along one long run of ``a``
inside a single Trainer (1k ... 10k recorded steps), to show memory does not
grow with the number of steps.

Run::

    python jobs/bench_recorder.py              # ~4 minutes on 2 cores
    python jobs/bench_recorder.py --repeat 3   # ~10 minutes: median of 3 fits per configuration
    python jobs/bench_recorder.py --quick      # ~1 minute smoke version
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning
import lightning.pytorch as pl
import numpy as np
import pyarrow
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from dynatrack import schedules
from dynatrack.models import MLP, load_digits_tensors
from dynatrack.recorder import PatternRecorder

log = logging.getLogger("bench_recorder")

ANCHORS = {
    "cockpit_cheapest_economy": 1.51,
    "wandb_watch_log_all_log_freq_1": 3.49,
    "hand_written_hooks_bitpack": 1.07,
    "hand_written_hooks_bitpack_sync_parquet": 1.22,
}
TARGET_BATCH_RATIO = 1.03
TARGET_PROBE_EXCESS = 0.02


# -- model and data -------------------------------------------------------------------


class BenchModule(pl.LightningModule):
    """A plain MLP classifier: cross-entropy, Adam; no ``self.log`` (keeps the baseline lean)."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int) -> None:
        super().__init__()
        self.net = MLP(in_features, list(hidden), out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class WholeBatches(Dataset):
    """Index with a list of indices, get ``(x[idx], y[idx], idx)``: one batch per fetch, no per-sample collate."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = torch.as_tensor(idx, dtype=torch.int64)
        return self.x[i], self.y[i], i


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, seed: int) -> DataLoader:
    """Shuffled whole batches, ``steps`` of them in one epoch (no epoch boundary inside a fit)."""
    ds = WholeBatches(x, y)
    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(ds, replacement=False, num_samples=steps * batch_size, generator=g)
    return DataLoader(ds, sampler=BatchSampler(sampler, batch_size, drop_last=True), batch_size=None)


def batch_ids(batch: Sequence[torch.Tensor]) -> torch.Tensor:
    return batch[-1]


@dataclass
class Config:
    key: str
    title: str
    in_features: int
    hidden: tuple[int, ...]
    batch_size: int
    data: str  # "digits" or "synthetic"
    source: str  # "batch" or "probe"
    probe_size: int = 0
    period: int = 1  # recorded every `period` steps
    arms: tuple[str, ...] = ("without", "with", "with_default_checkpointing")  # + "probe_forward" for probe configs
    x: torch.Tensor | None = field(default=None, repr=False)
    y: torch.Tensor | None = field(default=None, repr=False)

    @property
    def shape(self) -> str:
        return "-".join(str(v) for v in (self.in_features, *self.hidden, 10))

    def load(self) -> None:
        if self.data == "digits":
            train, _ = load_digits_tensors(seed=0)
            self.x, self.y = train.tensors  # type: ignore[assignment]
        else:
            g = torch.Generator().manual_seed(0)
            self.x = torch.rand(8192, self.in_features, generator=g)
            self.y = torch.randint(0, 10, (8192,), generator=g)

    def recorder(self, root: str, *, checkpoints: bool) -> PatternRecorder:
        ckpt = {} if checkpoints else {"checkpoint_schedule": schedules.never()}
        common = dict(run_name=f"bench-{uuid.uuid4().hex[:8]}", record_final=False, **ckpt)
        if self.source == "batch":
            return PatternRecorder(
                root, probe=None, batch_schedule=schedules.every(self.period), sample_ids=batch_ids, **common
            )
        assert self.x is not None and self.y is not None
        probe = (self.x[: self.probe_size], self.y[: self.probe_size])
        return PatternRecorder(root, probe=probe, schedule=schedules.every(self.period), **common)


# -- measurement ----------------------------------------------------------------------


class StepStamps(pl.Callback):
    """``perf_counter`` at every batch start, and at a few steps the process RSS."""

    def __init__(self, rss_at: Sequence[int] = ()) -> None:
        self.starts: list[float] = []
        self.rss_at = set(rss_at)
        self.rss: dict[int, dict[str, int]] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.starts.append(time.perf_counter())
        if trainer.global_step in self.rss_at:
            arrow_kib = pyarrow.total_allocated_bytes() // 1024
            self.rss[trainer.global_step] = {**memory_kib(), "arrow_allocated_kib": arrow_kib}


def memory_kib() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of this process in KiB (psutil if installed)."""
    try:
        import psutil

        info = psutil.Process().memory_info()
        peak = getattr(info, "peak_wset", None)
        out = {"rss_kib": info.rss // 1024}
    except ImportError:
        out, peak = {}, None
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "VmRSS" and "rss_kib" not in out:
                out["rss_kib"] = int(value.split()[0])
            elif key == "VmHWM":
                out["peak_rss_kib"] = int(value.split()[0])
    if peak is not None:
        out["peak_rss_kib"] = peak // 1024
    return out


def trainer(steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )


class Gate(pl.Callback):
    """Forward every Lightning callback hook to ``inner``; the per-batch hooks only while ``open``.

    Lets one ``Trainer`` alternate short segments of steps with and without a
    recorder: a closed gate means the recorder does not see the step at all.
    """

    BATCH_HOOKS = frozenset({
        "on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
        "on_before_optimizer_step", "on_before_zero_grad",
    })

    def __init__(self, inner: pl.Callback) -> None:
        self.inner = inner
        self.open = False
        # hooks the inner callback does not override are Lightning's no-ops: not forwarded, so the
        # "with" arm pays only the recorder's own hooks, not this harness's forwarding
        self.overridden = frozenset(
            name for name in dir(pl.Callback)
            if name.startswith("on_") and getattr(type(inner), name, None) is not getattr(pl.Callback, name)
        )

    @property
    def state_key(self) -> str:
        return self.inner.state_key

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


def _forwarder(name: str) -> Any:
    def hook(self: Gate, *args: Any, **kwargs: Any) -> Any:
        if (self.open or name not in Gate.BATCH_HOOKS) and (name in self.overridden or not name.startswith("on_")):
            return getattr(self.inner, name)(*args, **kwargs)
        return None

    hook.__name__ = name
    return hook


for _name in dir(pl.Callback):
    if (_name.startswith("on_") or _name in ("setup", "teardown")) and callable(getattr(pl.Callback, _name)):
        setattr(Gate, _name, _forwarder(_name))


@dataclass
class Segment:
    arm: str
    start: int  # first global step
    length: int
    cycle: int  # 0 is the warm-up cycle, not measured


class Interleaver(pl.Callback):
    """First in the callback list: stamps every batch start and opens the gate of the step's arm.

    At the first step of each ``without`` segment (a step that is dropped as
    settling) it can also time the plain probe forward, so that timing is
    interleaved with the steps too. Once ``budget_s`` has passed (and at least two
    measured cycles are complete) it stops the fit at the next cycle boundary
    (``trainer.should_stop``).
    """

    def __init__(
        self, segments: list[Segment], gates: dict[str, Gate], probe_timer: Any = None, budget_s: float = math.inf
    ) -> None:
        self.arm_of = [seg.arm for seg in segments for _ in range(seg.length)]
        self.first = {seg.start for seg in segments}
        self.cycle_starts: dict[int, int] = {}  # first step of each cycle -> cycle
        for seg in segments:
            if seg.cycle not in self.cycle_starts.values():
                self.cycle_starts[seg.start] = seg.cycle
        self.budget_s = budget_s
        self.min_cycles = 2  # measured cycles completed before the budget may stop the fit
        self.stopped_at_cycle: int | None = None
        self.gates = gates
        self.probe_timer = probe_timer
        self.probe_s: list[float] = []
        self.starts: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.starts.append(time.perf_counter())
        step = trainer.global_step
        over_budget = self.starts[-1] - self.starts[0] > self.budget_s
        if step in self.cycle_starts and self.cycle_starts[step] > self.min_cycles and over_budget:
            # out of time: stop after this step (its segment is incomplete and not measured)
            self.stopped_at_cycle = self.cycle_starts[step]
            self.arm_of = self.arm_of[:step]
            trainer.should_stop = True
        arm = self.arm_of[step] if step < len(self.arm_of) else "without"
        for name, gate in self.gates.items():
            gate.open = name == arm
        if self.probe_timer is not None and arm == "without" and step in self.first:
            self.probe_s += self.probe_timer(pl_module)


def plan_segments(arms: Sequence[str], cycles: int, length: int, ckpt_every: int, seed: int) -> list[Segment]:
    """``cycles`` cycles of one segment per arm in shuffled order, after one warm-up cycle (cycle 0).

    The default-checkpointing arm joins only every ``ckpt_every``-th cycle (it writes a lot).
    """
    rng = random.Random(seed)
    out: list[Segment] = []
    for cycle in range(cycles + 1):
        these = [a for a in arms if a != "with_default_checkpointing" or (ckpt_every and cycle % ckpt_every == 0)]
        rng.shuffle(these)
        for arm in these:
            out.append(Segment(arm, len(out) * length, length, cycle))
    return out


def probe_forward_s(x: torch.Tensor, model: nn.Module, chunk: int = 1024, repeats: int = 3) -> list[float]:
    """Times of the plain probe forward over ``x`` (eval, no_grad, chunks of ``chunk``)."""
    was = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for _ in range(repeats):
                t0 = time.perf_counter()
                for i in range(0, len(x), chunk):
                    model(x[i : i + chunk])
                out.append(time.perf_counter() - t0)
    finally:
        model.train(was)
    return out


class ProbeForward(pl.Callback):
    """The hand-written alternative to the probe source: at every ``period``-th step, the plain
    probe forward (eval mode, ``torch.no_grad``, chunks of ``chunk``), mode restored; nothing kept.

    As the ``probe_forward`` arm it measures, inside the fit and at the same steps, what
    the probe forward passes themselves cost the training (including their effect on the
    caches and allocator of the steps around them).
    """

    def __init__(self, x: torch.Tensor, period: int, chunk: int = 1024) -> None:
        self.x, self.period, self.chunk = x, period, chunk

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.period == 0:
            was = pl_module.training
            pl_module.eval()
            try:
                with torch.no_grad():
                    for i in range(0, len(self.x), self.chunk):
                        pl_module(self.x[i : i + self.chunk])
            finally:
                pl_module.train(was)


def _kept_segments(starts: list[float], segments: list[Segment], arm: str) -> list[Segment]:
    """The measured segments of ``arm``: not the warm-up cycle, and complete (the fit may stop on its budget)."""
    out = []
    for seg in segments:
        if seg.arm != arm or seg.cycle == 0:
            continue
        if seg.start + seg.length >= len(starts):
            break  # the fit stopped early (time budget): incomplete segments are not measured
        out.append(seg)
    return out


def _window_starts(seg: Segment, settle: int, period: int) -> list[int]:
    """Offsets in ``seg`` of the ``period``-step windows that start at a recorded step, after ``settle``."""
    return [k for k in range(settle, seg.length - period + 1) if (seg.start + k) % period == 0]


def _window_means(starts: list[float], seg: Segment, settle: int, period: int) -> list[float]:
    """Mean step time of each ``period``-step window of ``seg`` that starts at a recorded step, after ``settle``."""
    return [(starts[seg.start + k + period] - starts[seg.start + k]) / period for k in _window_starts(seg, settle, period)]


def segment_samples(
    starts: list[float], segments: list[Segment], arm: str, *, settle: int, period: int
) -> list[list[float]]:
    """Per segment of ``arm`` (warm-up cycle excluded): kept step times, or ``period``-step window means.

    Step ``i`` takes ``starts[i + 1] - starts[i]``; the first ``settle`` steps of a
    segment are dropped (the previous arm's writer may still be draining). With
    ``period > 1`` the samples are means over windows that start at a recorded step.
    """
    out = []
    for seg in _kept_segments(starts, segments, arm):
        if period == 1:
            out.append([starts[i + 1] - starts[i] for i in range(seg.start + settle, seg.start + seg.length)])
        else:
            out.append(_window_means(starts, seg, settle, period))
    return [x for x in out if x]


def position_medians(
    starts: list[float], segments: list[Segment], arm: str, *, settle: int, period: int
) -> list[float]:
    """Median step time at each position ``k = 0 .. period-1`` of the kept windows of ``arm``.

    Position 0 is the recorded step. Their sum estimates a window's time with a median per
    step position, so a burst of machine noise in one step of a window moves it as little
    as it moves a batch configuration's median step time.
    """
    by_pos: list[list[float]] = [[] for _ in range(period)]
    for seg in _kept_segments(starts, segments, arm):
        for k in _window_starts(seg, settle, period):
            for j in range(period):
                i = seg.start + k + j
                by_pos[j].append(starts[i + 1] - starts[i])
    return [statistics.median(v) if v else math.nan for v in by_pos]


PAIRED_HOW = ("per measured cycle with a segment of each of with, probe_forward and without: d = (median window(with) "
              "- median window(probe_forward)) / median window(without); ratio_minus_probe_cost_paired = 1 + median(d)")


def paired_by_cycle(
    starts: list[float], segments: list[Segment], *, settle: int, period: int
) -> dict[str, Any]:
    """Probe excess per cycle, from the three arms' segments of that cycle (adjacent in time).

    See :data:`PAIRED_HOW`. Reported: ``1 + median(d)`` over the cycles, and the quartiles
    of ``d``. A drift of the machine's speed over seconds or minutes moves all three
    segments of a cycle alike, so it cancels in ``d``, where the pooled medians of the
    headline only average it out.
    """
    by_cycle: dict[int, dict[str, float]] = {}
    for arm in ("with", "probe_forward", "without"):
        for seg in _kept_segments(starts, segments, arm):
            windows = _window_means(starts, seg, settle, period)
            if windows:
                by_cycle.setdefault(seg.cycle, {})[arm] = statistics.median(windows)
    d = [(c["with"] - c["probe_forward"]) / c["without"] for c in by_cycle.values() if len(c) == 3]
    if not d:
        return {"n_cycles": 0}
    q1, q2, q3 = (float(v) for v in np.percentile(d, [25, 50, 75]))
    return {"n_cycles": len(d), "ratio_minus_probe_cost_paired": round(1 + q2, 4),
            "excess_quartiles": [round(q1, 4), round(q2, 4), round(q3, 4)]}


def ratio_ci95(arm: list[list[float]], base: list[list[float]], seed: int, n: int = 400) -> list[float]:
    """95% bootstrap interval of median(arm) / median(base), resampling whole segments."""
    rng = np.random.default_rng(seed)
    a = [np.asarray(x) for x in arm]
    b = [np.asarray(x) for x in base]
    ratios = []
    for _ in range(n):
        ra = np.concatenate([a[i] for i in rng.integers(0, len(a), len(a))])
        rb = np.concatenate([b[i] for i in rng.integers(0, len(b), len(b))])
        ratios.append(np.median(ra) / np.median(rb))
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def measure(cfg: Config, plan: "Plan", seed: int, arms: Sequence[str] | None = None) -> dict[str, Any]:
    """One ``Trainer.fit`` of ``cfg`` whose steps alternate between the arms in short segments."""
    assert cfg.x is not None and cfg.y is not None
    arms = list(arms or cfg.arms)
    if cfg.source == "probe" and "probe_forward" not in arms:
        arms.append("probe_forward")
    torch.manual_seed(seed)
    model = BenchModule(cfg.in_features, cfg.hidden, 10)
    segments = plan_segments(arms, plan.cycles, plan.segment, plan.ckpt_every, seed)
    roots = {arm: tempfile.mkdtemp(prefix="dynatrack-bench-") for arm in arms if arm in ("with", "with_default_checkpointing")}
    gates = {
        arm: Gate(cfg.recorder(root, checkpoints=arm == "with_default_checkpointing")) for arm, root in roots.items()
    }
    probe_x = cfg.x[: cfg.probe_size] if cfg.source == "probe" else None
    if probe_x is not None:
        gates["probe_forward"] = Gate(ProbeForward(probe_x, cfg.period))
    timer = (lambda module: probe_forward_s(probe_x, module)) if probe_x is not None else None
    driver = Interleaver(segments, gates, timer, budget_s=plan.budget_s)
    steps = sum(seg.length for seg in segments) + 1
    try:
        t0 = time.perf_counter()
        trainer(steps, [driver, *gates.values()]).fit(model, loader(cfg.x, cfg.y, cfg.batch_size, steps, seed))
        wall = time.perf_counter() - t0
    finally:
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)
    period, settle = cfg.period, plan.settle
    per_arm = {arm: segment_samples(driver.starts, segments, arm, settle=settle, period=period) for arm in arms}
    base = per_arm["without"]
    flat_base = [t for seg in base for t in seg]
    med_base = statistics.median(flat_base)
    out: dict[str, Any] = {
        "title": cfg.title,
        "model": cfg.shape,
        "batch_size": cfg.batch_size,
        "data": cfg.data,
        "source": cfg.source,
        "schedule": f"every({period})",
        "torch_threads": torch.get_num_threads(),
        "segment_steps": plan.segment,
        "recorder_submit_every": gates["with"].inner.submit_every,
        "settle_steps_dropped_per_segment": settle,
        "cycles_planned": plan.cycles,
        "stopped_by_time_budget": driver.stopped_at_cycle is not None,
        "sample": "step time" if period == 1
        else f"mean step time over a {period}-step window that starts at a recorded step",
        "fit_wall_s": round(wall, 1),
        "state_dict_mib_per_checkpoint": round(
            sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 2**20, 2
        ),
    }
    for arm in arms:
        segs = per_arm[arm]
        flat = [t for seg in segs for t in seg]
        if not flat:
            if arm in ("without", "with", "probe_forward"):
                raise RuntimeError(f"config {cfg.key}: no measured segment of arm {arm!r}; raise the plan's cycles or budget")
            out[arm] = {"n_samples": 0, "note": "no measured segment within the time budget"}
            continue
        summary: dict[str, Any] = {
            "median_step_ms": round(statistics.median(flat) * 1e3, 4),
            "mean_step_ms": round(statistics.fmean(flat) * 1e3, 4),
            "p90_step_ms": round(float(np.percentile(flat, 90)) * 1e3, 4),
            "n_samples": len(flat),
            "n_segments": len(segs),
        }
        if arm != "without":
            summary.update(
                ratio_median=round(statistics.median(flat) / med_base, 4),
                ratio_mean=round(statistics.fmean(flat) / statistics.fmean(flat_base), 4),
                ratio_median_ci95=ratio_ci95(segs, base, seed),
                overhead_us_per_step_median=round((statistics.median(flat) - med_base) * 1e6, 1),
            )
        out[arm] = summary
    with_ = out["with"]
    if cfg.source == "batch":
        out["target_ratio_median"] = TARGET_BATCH_RATIO
        out["pass"] = with_["ratio_median"] <= TARGET_BATCH_RATIO
    else:
        probe_ms = statistics.median(driver.probe_s) * 1e3
        frac = probe_ms / period / out["without"]["median_step_ms"]
        in_fit = out["probe_forward"]["ratio_median"] - 1
        out["probe_forward"]["how"] = (
            "arm: a callback running only the plain probe forwards (eval, no_grad, chunks of 1024) at "
            "the same steps; its ratio - 1 is the probe cost the headline subtracts")
        out["probe_forward_isolated"] = {
            "samples": cfg.probe_size,
            "chunk": 1024,
            "how": "plain forward, eval mode, torch.no_grad, timed 3x back to back at each without segment "
            "(warm caches: a lower bound of the cost inside training)",
            "median_ms": round(probe_ms, 4),
            "amortized_per_step_ms": round(probe_ms / period, 4),
            "fraction_of_step": round(frac, 4),
            "n_timings": len(driver.probe_s),
        }
        out["probe_cost_fraction"] = round(in_fit, 4)
        out["ratio_minus_probe_cost"] = round(with_["ratio_median"] - in_fit, 4)
        out["ratio_minus_isolated_probe_cost"] = round(with_["ratio_median"] - frac, 4)
        pos = {arm: position_medians(driver.starts, segments, arm, settle=settle, period=period)
               for arm in ("without", "with", "probe_forward")}
        sums = {arm: sum(v) for arm, v in pos.items()}
        out["by_step_position"] = {
            "how": f"median step time (ms) at each position of the {period}-step windows (0: the recorded step); "
            "ratio_minus_probe_cost_by_position = (sum(with) - sum(probe_forward)) / sum(without) + 1",
            **{arm: [round(t * 1e3, 3) for t in v] for arm, v in pos.items()},
            "ratio_minus_probe_cost_by_position": round(1 + (sums["with"] - sums["probe_forward"]) / sums["without"], 4),
        }
        out["paired_by_cycle"] = {
            "how": PAIRED_HOW,
            **paired_by_cycle(driver.starts, segments, settle=settle, period=period),
        }
        out["target"] = f"ratio_minus_probe_cost <= {1 + TARGET_PROBE_EXCESS}"
        out["pass"] = out["ratio_minus_probe_cost"] <= 1 + TARGET_PROBE_EXCESS
    return out


def rss_run(cfg: Config, points: Sequence[int], seed: int) -> dict[str, Any]:
    """One long ``Trainer.fit`` of ``cfg`` with the recorder (no checkpoints); RSS at ``points``."""
    assert cfg.x is not None and cfg.y is not None
    torch.manual_seed(seed)
    model = BenchModule(cfg.in_features, cfg.hidden, 10)
    steps = max(points) + 1
    stamps = StepStamps(rss_at=[0, *points])
    root = tempfile.mkdtemp(prefix="dynatrack-bench-")
    rec = cfg.recorder(root, checkpoints=False)
    gc.collect()
    before = memory_kib()
    try:
        t0 = time.perf_counter()
        trainer(steps, [stamps, rec]).fit(model, loader(cfg.x, cfg.y, cfg.batch_size, steps, seed))
        wall = time.perf_counter() - t0
        after = memory_kib()
        files = sum(len(fs) for _, _, fs in os.walk(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    t = stamps.starts
    step_s = [t[i + 1] - t[i] for i in range(10, len(t) - 1)]
    rss = {str(k): v["rss_kib"] for k, v in sorted(stamps.rss.items())}
    arrow = {str(k): v["arrow_allocated_kib"] for k, v in sorted(stamps.rss.items())}
    rows_per_step = cfg.batch_size * len(cfg.hidden)
    first_shard_step = math.ceil(rec.rows_per_file / rows_per_step)
    pts = sorted(points)
    out: dict[str, Any] = {
        "config": cfg.key,
        "recorded_steps": steps,
        "rows_written": steps * rows_per_step,
        "rows_per_file": rec.rows_per_file,
        "first_shard_written_near_step": first_shard_step,
        "files_in_run_dir": files,
        "rss_kib_before_fit": before["rss_kib"],
        "rss_kib_at_step": rss,
        "arrow_allocated_kib_at_step": arrow,
        "arrow_memory_pool": pyarrow.default_memory_pool().backend_name,
        "rss_kib_after_fit": after["rss_kib"],
        "peak_rss_kib": after.get("peak_rss_kib"),
        "peak_minus_before_fit_kib": after.get("peak_rss_kib", 0) - before["rss_kib"],
        f"rss_growth_kib_{pts[0]}_to_{pts[-1]}": stamps.rss[pts[-1]]["rss_kib"] - stamps.rss[pts[0]]["rss_kib"],
        "median_step_ms_with_recorder": round(statistics.median(step_s) * 1e3, 4),
        "wall_s": round(wall, 2),
    }
    # Growth is expected until the writer's first shard (its buffer fills); after it, RSS must stay flat.
    after_shard = [p for p in pts if p >= first_shard_step]
    if len(after_shard) >= 2:
        lo, hi = stamps.rss[after_shard[0]]["rss_kib"], stamps.rss[after_shard[-1]]["rss_kib"]
        out[f"rss_growth_kib_{after_shard[0]}_to_{after_shard[-1]}"] = hi - lo
        out["flat_after_first_shard"] = hi <= 1.05 * lo
    else:
        out["flat_after_first_shard"] = None  # too few steps to tell (quick mode)
    return out


# -- main -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    cycles: int  # measured cycles (one segment per arm each), after one warm-up cycle
    segment: int  # steps per segment
    settle: int = 3  # steps dropped at the start of every segment
    ckpt_every: int = 3  # the default-checkpointing arm joins every k-th cycle (0: never)
    budget_s: float = 60.0  # stop at the next cycle boundary after this many seconds


PLANS: dict[str, dict[str, Plan]] = {
    # batch-source segments span two of the recorder's hand-offs (submit_every=32), so the writer
    # thread's work for a segment's steps runs inside that segment, not in the next arm's
    "full": {"a": Plan(100, 64), "b": Plan(16, 64), "c": Plan(120, 40, settle=10, budget_s=90)},
    "quick": {"a": Plan(8, 64, budget_s=8), "b": Plan(3, 64, ckpt_every=2, budget_s=8), "c": Plan(8, 40, settle=10, budget_s=6)},
}
PLANS_DEFAULT_THREADS: dict[str, dict[str, Plan]] = {
    "full": {"a": Plan(30, 64, ckpt_every=0, budget_s=30), "b": Plan(8, 64, ckpt_every=0, budget_s=30)},
    "quick": {"a": Plan(4, 64, ckpt_every=0, budget_s=4), "b": Plan(2, 64, ckpt_every=0, budget_s=4)},
}
RSS_POINTS = {"full": [1000, 2500, 5000, 7500, 10000], "quick": [300, 1500]}


def configs() -> list[Config]:
    return [
        Config("a", "digits MLP, batch source every step", 64, (256, 256, 256), 128, "digits", "batch"),
        Config("b", "MLP 784-512x3 on synthetic data, batch source every step", 784, (512, 512, 512), 256,
               "synthetic", "batch"),
        Config("c", "digits MLP, probe source (1,024 samples) every 10 steps", 64, (256, 256, 256), 128, "digits",
               "probe", probe_size=1024, period=10),
    ]


def run_plans(
    cfgs: list[Config], plans: dict[str, Plan], seed: int, arms: Sequence[str] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cfg in cfgs:
        if cfg.key in plans:
            log.info("config %s, %d torch threads: %s", cfg.key, torch.get_num_threads(), plans[cfg.key])
            out[cfg.key] = measure(cfg, plans[cfg.key], seed, arms)
    return out


def median_of_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration, the repeat with the median headline ratio, plus every repeat's ratio.

    The headline is ``with.ratio_median`` for the batch-source configurations and
    ``ratio_minus_probe_cost`` for the probe one; ``pass`` is decided on the median repeat.
    """
    if len(runs) == 1:
        return runs[0]
    out: dict[str, Any] = {}
    for key in runs[0]:
        def headline(r: dict[str, Any]) -> float:
            return r["ratio_minus_probe_cost"] if "ratio_minus_probe_cost" in r else r["with"]["ratio_median"]

        ordered = sorted((run[key] for run in runs), key=headline)
        middle = dict(ordered[(len(ordered) - 1) // 2])  # lower median for an even count
        middle["repeats"] = {"headline_ratios": [headline(r) for r in ordered], "n": len(ordered),
                             "reported": "the repeat with the median headline ratio"}
        if "paired_by_cycle" in ordered[0]:  # the probe configuration's other estimates, same order
            middle["repeats"]["by_step_position_ratios"] = [
                r["by_step_position"]["ratio_minus_probe_cost_by_position"] for r in ordered]
            middle["repeats"]["paired_by_cycle_ratios"] = [
                r["paired_by_cycle"].get("ratio_minus_probe_cost_paired") for r in ordered]
        out[key] = middle
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke version with fewer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="abc", help="configurations to run, e.g. 'a' or 'ac'")
    parser.add_argument("--no-rss", action="store_true", help="skip the long RSS run")
    parser.add_argument("--no-default-threads", action="store_true", help="skip the runs with torch's default threads")
    parser.add_argument("--rss-only", action="store_true", help="only the RSS run, in this process (used internally)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure each configuration this many times (fresh fit and seed each); the headline "
                        "is the median over the repeats (a noisy shared machine moves single runs by several %%)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    mode = "quick" if args.quick else "full"
    if args.rss_only:
        torch.set_num_threads(1)
        a = next(c for c in configs() if c.key == "a")
        a.load()
        rss = {"torch_threads": 1, **rss_run(a, RSS_POINTS[mode], args.seed)}
        print(json.dumps(rss))
        return rss
    default_threads = torch.get_num_threads()
    cfgs = [c for c in configs() if c.key in args.only]
    for c in cfgs:
        c.load()
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "dynatrack PatternRecorder overhead",
        "mode": mode,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "pyarrow": pyarrow.__version__,
            "cpu_cores": os.cpu_count(),
            "torch_default_threads": default_threads,
            "platform": platform.platform(),
            "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        },
        "method": (
            "one Trainer.fit per configuration whose steps alternate between arms in short segments "
            "(one segment per arm per cycle, order shuffled per cycle; the first cycle is warm-up); each "
            "recorder arm is a PatternRecorder behind a gate callback that forwards its per-batch hooks "
            "only during that arm's segments (its writer thread lives for the whole fit, as in a real run). "
            "Step time = difference of consecutive on_train_batch_start stamps taken by the first "
            "callback, so the recorder's hooks on both sides of the step count; the first settle steps of "
            "each segment are dropped. ratio_median = median(with) / median(without); ratio_mean = "
            "mean(with) / mean(without); ratio_median_ci95 = segment bootstrap. Whole batches per "
            "DataLoader fetch (BatchSampler, no per-sample collate), Adam, no self.log. Each recorder "
            "writes to a fresh temp root (removed afterwards), record_final=False, "
            "checkpoint_schedule=never() except in the with_default_checkpointing arm (the recorder "
            "default: a state_dict at every recorded step)"
        ),
        "anchors_ratio": ANCHORS,
        "targets": {
            "a_b_ratio_median_max": TARGET_BATCH_RATIO,
            "c_ratio_minus_probe_cost_max": 1 + TARGET_PROBE_EXCESS,
            "rss": "no growth with recorded steps beyond the writer's bounded buffer",
        },
    }

    torch.set_num_threads(1)
    result["threads_1"] = {
        "torch_threads": 1,
        "note": "headline numbers: 1 intra-op thread, so the writer thread has the second core "
        "(as a data loader would)",
        **median_of_repeats([run_plans(cfgs, PLANS[mode], args.seed + r) for r in range(max(args.repeat, 1))]),
    }
    if not args.no_default_threads:
        torch.set_num_threads(default_threads)
        result["threads_default"] = {
            "torch_threads": default_threads,
            "note": "torch's default intra-op threads (one per core); the writer thread competes with them",
            **run_plans(cfgs, PLANS_DEFAULT_THREADS[mode], args.seed, arms=("without", "with")),
        }
        torch.set_num_threads(1)
    if not args.no_rss:
        log.info("RSS run: config a, %d recorded steps in one Trainer, in a fresh process", max(RSS_POINTS[mode]))
        cmd = [sys.executable, os.path.abspath(__file__), "--rss-only", "--seed", str(args.seed)]
        proc = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the RSS run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        result["rss"] = json.loads(proc.stdout)

    passes = {f"{k}_threads_1": v["pass"] for k, v in result["threads_1"].items() if isinstance(v, dict)}
    if "rss" in result and result["rss"]["flat_after_first_shard"] is not None:
        passes["rss_flat_after_first_shard"] = result["rss"]["flat_after_first_shard"]
    result["pass"] = {**passes, "all": all(passes.values())}
    result["environment"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
