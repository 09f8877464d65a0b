"""Host-side decoding of recorded masks: packing, per-class counts, record layouts.

The :class:`~dynatrack.recorder.callback.PatternRecorder` callback is the Lightning glue;
this module turns what its hooks captured into the store's row chunks
(:class:`~dynatrack.store.rows.PatternChunk`, :class:`~dynatrack.store.rows.NeuronChunk`):

- :class:`_ProbeDecoder` packs and counts a CPU probe split chunk by chunk right after
  each chunk's forward (with the compiled ``_pack`` kernel when it is built, else numpy);
- :func:`_count_plan` / :func:`_class_counts` count active neurons per class (SWAR sums);
- :func:`_to_host` / :func:`_split_layout` move a step's tensors to the host in one copy
  and cut them back into arrays; :func:`_decode_probe` and :func:`_decode_batches` turn
  them into row chunks (probe steps and batch-source steps).

>>> plan = _count_plan(np.array([0, 0, 1]), 2, 3)
>>> _class_counts(np.array([[1, 0], [1, 1], [0, 1]], np.uint8), None, 2, plan=plan).tolist()
[[2, 1], [0, 1]]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from dynatrack.recorder.capture import ProbeMasks, concat_masks, materialize
from dynatrack.store.rows import NeuronChunk, PatternChunk

try:  # the compiled pack-and-count kernel (optional: built at install when a C compiler is there)
    from dynatrack.recorder import _pack as _pack_kernel
except ImportError:  # pragma: no cover - depends on the install
    _pack_kernel = None


def _as_bytes(piece: torch.Tensor) -> torch.Tensor:
    """A piece's raw bytes (its dtype is fixed by the layout item: ids int64, counts int32, ...)."""
    return piece.contiguous().view(torch.uint8).reshape(-1)


def _to_host(pieces: list[torch.Tensor]) -> tuple[Any, Any]:
    """The step's tensors, on the host, for the writer thread.

    On an accelerator they are concatenated as bytes and copied to the host once,
    non-blocking into pinned memory; the returned event is synchronized by the writer
    thread before it reads them. On CPU they already are on the host: they are handed
    over as they are and the writer thread converts them (no work on the training thread).
    """
    if not pieces:
        return np.zeros(0, np.uint8), None
    for p in pieces:
        if p.device.type != "cpu":
            break
    else:
        return pieces, None
    flat = torch.cat([_as_bytes(p) for p in pieces])
    host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=flat.device.type == "cuda")
    host.copy_(flat, non_blocking=True)
    event = None
    if flat.device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
    return host.numpy(), event


def _split_layout(host: Any, event: Any, layout: list[tuple[str, str, str, int, int]]) -> list[tuple[tuple[str, str, str, int, int], np.ndarray]]:
    """Cut the host bytes of a step back into one array per layout item (writer thread)."""
    if not layout:
        return []
    if event is not None:
        event.synchronize()
    # One copy into memory owned by the writer thread: the step's torch host buffers are freed at
    # once instead of living (in the training thread's malloc arena) until the shard is written,
    # which fragments the heap and inflates RSS far beyond the rows kept.
    if isinstance(host, list):
        host = np.concatenate([_as_bytes(p).numpy() for p in host]) if host else np.zeros(0, np.uint8)
    else:
        host = np.array(host, copy=True)
    out, offset = [], 0
    itemsize = {"bits": 1, "nbits": 1, "counts": 4, "out_sign": 1, "ids": 1, "scalars": 1}
    for item in layout:
        what, _, _, rows, cols = item
        n = rows * cols * itemsize[what]
        raw = host[offset : offset + n]
        offset += n
        if what == "counts":
            arr = raw.view(np.int32).reshape(rows, cols)
        elif what == "out_sign":
            arr = raw.view(np.int8).reshape(rows, cols)
        else:
            arr = raw.reshape(rows, cols)
        out.append((item, arr))
    return out


def _decode_probe(
    host: np.ndarray,
    event: Any,
    layout: list[tuple[str, str, str, int, int]],
    step: int,
    ids: dict[str, np.ndarray],
    n_classes: Mapping[str, int],
    last_layer: str | None,
    *,
    labels: dict[str, np.ndarray | None] | None = None,
    widths: dict[str, int] | None = None,
    deferred: list[tuple[tuple[str, str, str], list[Any]]] | None = None,
    decoded: list[tuple[str, str, str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Decode a probe step into pattern chunks and the neuron table.

    On CPU this runs on the training thread right after the probe forward (everything is
    on the host already); on accelerators on the writer thread, after the host copy.

    With ``labels`` (CPU runs, or ``neuron_counts="writer"``) the per-class counts are
    computed here from packed bits, or arrive ``decoded`` (CPU: :class:`_ProbeDecoder`), or
    otherwise they arrive as ``counts`` items computed on the device. ``deferred`` holds
    the bool masks of the probe hooks (CPU with ``neuron_counts="device"``): only packed.
    ``n_classes`` maps each split to its number of classes (0 for a split without labels:
    its counts are one row of totals and its ``active_by_class`` lists are empty).
    """
    count_here = labels is not None and widths is not None
    items: list[tuple[str, str, str, np.ndarray]] = []  # ("bits" | "counts", split, layer, array)
    out_sign = None
    for (what, split, layer, _, _), arr in _split_layout(host, event, layout):
        if what == "out_sign":
            out_sign = arr[0]
            continue
        if what in ("bits", "nbits") and count_here:
            unpacked = np.unpackbits(arr, axis=1, count=widths[layer])  # type: ignore[index]
            items.append(("counts", split, layer, _class_counts(unpacked, labels[split], n_classes[split])))  # type: ignore[index]
        if what in ("bits", "counts"):
            items.append((what, split, layer, arr))
    # CPU bool masks of the probe hooks (neuron_counts="device" on CPU: the counts came with them)
    items += [("bits", split, layer, np.packbits(concat_masks(masks)[0], axis=1, bitorder="big"))
              for (_, split, layer), masks in deferred or []]
    items += decoded or []
    patterns: list[PatternChunk] = []
    neurons = []
    for what, split, layer, arr in items:
        if what == "bits":
            patterns.append(PatternChunk(step, layer, split, "probe", ids[split], arr))
            continue
        by_class = arr.T  # [width, C or 1] int32 (a view; the shard build copies)
        sign = out_sign if (out_sign is not None and layer == last_layer) else None
        k = n_classes[split]
        neurons.append(NeuronChunk(  # with classes, ``active`` is summed on the writer thread
            step, layer, split, None if k else by_class[:, 0],
            by_class if k else np.zeros((by_class.shape[0], 0), np.int32), len(ids[split]),
            None if sign is None else np.array(sign, np.int8)))
    out: dict[str, Any] = {}
    if patterns:
        out["patterns"] = patterns
    if neurons:
        out["neurons"] = neurons
    return out


class _ProbeDecoder:
    """Bits and per-class counts of every layer of one probe split, decoded chunk by chunk.

    The CPU probe forward's hooks write each chunk's masks into the split's
    :class:`ProbeMasks` (one chunk's rows, layer after layer); :meth:`add` packs and
    counts them right after that chunk's forward. With the compiled kernel
    (``dynatrack.recorder._pack``, built at install when a C compiler is there) one call
    per layer reads each word of masks once, packs it and adds it to its class's counters.
    Without it (or with labels not sorted by class) numpy does it: one ``numpy.packbits``
    of the whole buffer packs every layer (each layer's packed rows are a contiguous block
    of the result, handed over without a copy when the split is one chunk) and one
    :func:`_class_counts` per layer counts it. Either way the class blocks of each chunk
    are planned once from the split's labels (:func:`_count_plan`), and a probe step's
    output arrays are two allocations: on the training thread, between training steps,
    every call pays for cold caches. For a split that is one chunk the kernel's calls run
    on its native thread (:meth:`add`), which never takes the GIL: the buffer is not
    needed again before the next probe step (:meth:`begin` waits), and whoever reads the
    arrays waits first (:func:`_when_done`).
    Kept for the run, one per split; :meth:`begin` starts a probe step.
    """

    def __init__(self, split: str, buf: ProbeMasks, n: int, labels: np.ndarray | None, n_classes: int) -> None:
        self.split, self.buf, self.n, self.rows = split, buf, n, buf.rows
        self.flat = buf.flat.numpy()
        # (layer, first column, width, padded width, its block bool[rows, wpad])
        self.layers = [(layer, col, width, -(-width // 8) * 8, buf.block(li).numpy())
                       for li, (layer, col, width) in enumerate(buf.layers)]
        self.n_classes = n_classes if labels is not None and n_classes else 0
        chunk = buf.rows
        self.plans = [_count_plan(labels[r0 : r0 + chunk] if self.n_classes else None, self.n_classes, min(chunk, n - r0))
                      for r0 in range(0, n, chunk)]
        self.one_chunk = n <= chunk
        # the compiled kernel needs each chunk's rows sorted by class (probe shards are)
        self.kernel = _pack_kernel if all(p.order is None for p in self.plans) else None
        self.counts_shapes = [(max(self.n_classes, 1), wpad) for *_, wpad, _ in self.layers]
        self.bits_shapes = [(n, wpad // 8) for *_, wpad, _ in self.layers]
        self.counts: list[Any] | None = None  # per layer: [C, wpad] counts of this step
        self.bits: list[Any] | None = None  # per layer: [n, wpad // 8] packed rows of this step
        self.pending: Any = None  # the kernel's calls of this step on its background thread

    def begin(self, *, bits: bool, counts: bool) -> None:
        """Start a probe step: fresh output arrays (the previous step's went to the writer)."""
        self.wait()  # the background calls of the previous step still read the buffer
        self.counts = self.bits = None
        if self.kernel is None and self.one_chunk:  # numpy's own results are kept as they are
            self.counts = [None] * len(self.layers) if counts else None
            self.bits = [None] * len(self.layers) if bits else None
            return
        if counts:  # int32 sums (the kernel zeroes them at the first chunk)
            self.counts = _arrays(self.counts_shapes, np.int32, zero=self.kernel is None)
        if bits:
            self.bits = _arrays(self.bits_shapes, np.uint8, zero=False)

    def add(self, k: int, r0: int, n: int) -> None:
        """Decode chunk ``k``: rows ``r0 .. r0 + n`` of the split, held in the buffer's first ``n`` rows."""
        if self.kernel is not None:  # one pass per layer: each word of masks read once, packed and counted
            plan = self.plans[k]
            calls = [(block[:n], n, wpad, plan.block_start, plan.block_class,
                      None if self.bits is None else self.bits[li][r0 : r0 + n],
                      None if self.counts is None else self.counts[li], k == 0)
                     for li, (_, _, _, wpad, block) in enumerate(self.layers)]
            if self.one_chunk:  # the buffer is not needed again before the next probe step: on another core
                self.pending = self.kernel.submit(calls)
            else:
                for call in calls:
                    self.kernel.pack_count(*call)
            return
        if self.bits is not None:
            rows = self.rows
            packed = np.packbits(self.flat, bitorder="big") if n == rows else None  # every layer at once
            for li, (_, col, _, wpad, block) in enumerate(self.layers):
                if packed is not None:
                    mine = packed[col * rows // 8 : (col + wpad) * rows // 8].reshape(rows, wpad // 8)
                else:  # a last, shorter chunk
                    mine = np.packbits(block[:n], axis=1, bitorder="big")
                if self.one_chunk:
                    self.bits[li] = mine  # a view of this step's own array: no copy
                else:
                    self.bits[li][r0 : r0 + n] = mine
        if self.counts is not None:
            for li, (*_, block) in enumerate(self.layers):
                self.counts[li] = _class_counts(block[:n], None, self.n_classes, out=self.counts[li], plan=self.plans[k])

    def wait(self) -> None:
        """Block until the kernel's background calls of this step are done (they usually are)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

    def items(self) -> list[tuple[str, str, str, np.ndarray]]:
        """``("counts" | "bits", split, layer, array)`` per layer: this step's arrays (the buffer is reused).

        With the kernel's background calls the arrays are filled once :attr:`pending` is done:
        whoever reads them calls its ``wait()`` first (the writer thread, :func:`_when_done`).
        """
        out: list[tuple[str, str, str, np.ndarray]] = []
        if self.counts is not None:
            out += [("counts", self.split, layer, counts[:, :w]) for (layer, _, w, _, _), counts in zip(self.layers, self.counts)]
        if self.bits is not None:
            out += [("bits", self.split, layer, bits) for (layer, *_), bits in zip(self.layers, self.bits)]
        self.counts = self.bits = None
        return out


def _when_done(in_flight: list[Any], decoded: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """A writer job that hands over ``decoded`` once the kernel's background calls filling it are done."""

    def job() -> dict[str, Any]:
        for pending in in_flight:
            pending.wait()
        return decoded

    return job


def _arrays(shapes: list[tuple[int, int]], dtype: Any, *, zero: bool) -> list[np.ndarray]:
    """Arrays of ``shapes``, each a contiguous part of one fresh allocation."""
    flat = (np.zeros if zero else np.empty)(sum(r * c for r, c in shapes), dtype)
    out, at = [], 0
    for r, c in shapes:
        out.append(flat[at : at + r * c].reshape(r, c))
        at += r * c
    return out


class _CountPlan(NamedTuple):
    """How :func:`_class_counts` walks rows with given labels (see :func:`_count_plan`)."""

    order: np.ndarray | None  # rows in label order (None: already sorted)
    n_classes: int  # 1 without labels (one row of totals)
    ends: list[int]  # end row of each class, in label order
    block_start: np.ndarray  # int64: blocks of at most 255 rows of one class, tiling the rows (as the kernel takes them)
    block_class: np.ndarray  # int64
    unique: bool  # one block per class at most
    lanes_are_counts: bool  # sorted, and exactly one block per class: block c's byte lanes are class c's counts


def _count_plan(labels: np.ndarray | None, n_classes: int, n: int) -> _CountPlan:
    """The class blocks of ``n`` rows with ``labels`` (``None`` or ``n_classes == 0``: no classes)."""
    order = None
    if not (n_classes and labels is not None):
        labels, n_classes = np.zeros(n, np.int64), 1
    elif n > 1 and bool((labels[1:] < labels[:-1]).any()):
        order = np.argsort(labels, kind="stable")
        labels = labels[order]
    ends = np.cumsum(np.bincount(labels, minlength=n_classes)).tolist()
    block_start: list[int] = []
    block_class: list[int] = []
    start = 0
    for c, end in enumerate(ends):
        for b in range(start, end, 255):
            block_start.append(b)
            block_class.append(c)
        start = end
    unique = len(set(block_class)) == len(block_class)
    return _CountPlan(order, n_classes, ends, np.array(block_start, np.int64), np.array(block_class, np.int64), unique,
                      order is None and unique and len(block_class) == n_classes)


def _class_counts(
    rows: np.ndarray, labels: np.ndarray | None, n_classes: int, out: np.ndarray | None = None,
    plan: _CountPlan | None = None,
) -> np.ndarray:
    """``counts[c, j]`` = rows of class c with neuron j active, from 0/1 rows ``[n, w]`` (bool or uint8).

    One row of totals without labels. With ``out`` (int32 ``[C, w]``) the counts are
    added to it and it is returned; ``plan`` (:func:`_count_plan` of the labels) stands
    for ``labels``. Each class is a contiguous block of rows once sorted by label (the
    probe shards are, :meth:`Probe.shard`). When ``w`` is a multiple of 8 the rows are
    read as uint64 words, 8 neurons each, and each block of up to 255 rows is summed
    word-wise (SWAR, one ``numpy.add.reduceat`` for all blocks): each byte lane holds one
    neuron's count, with no carry between lanes since no count exceeds 255. Without
    ``out``, when every class is one block, the lanes are returned as they are (uint8).
    No BLAS call (a matmul would wake numpy's BLAS threads on the cores the training
    step needs).
    """
    u8 = rows.view(np.uint8)
    n, w = u8.shape
    if plan is None:
        plan = _count_plan(labels, n_classes, n)
    if plan.order is not None:
        u8 = u8[plan.order]
    swar = n > 0 and w % 8 == 0 and sys.byteorder == "little" and u8.flags.c_contiguous
    if swar and out is None and plan.lanes_are_counts:
        return np.add.reduceat(u8.view(np.uint64), plan.block_start, axis=0).view(np.uint8)
    counts = np.zeros((plan.n_classes, w), dtype=np.int32) if out is None else out
    if n == 0:
        return counts
    if not swar:
        start = 0
        for c, end in enumerate(plan.ends):
            if end > start:
                counts[c] += np.add.reduce(u8[start:end], axis=0, dtype=np.int32)
            start = end
        return counts
    sums = np.add.reduceat(u8.view(np.uint64), plan.block_start, axis=0)  # [blocks, w // 8]
    lanes = sums.view(np.uint8)  # [blocks, w]: byte k of word q is neuron 8q + k
    if plan.unique:
        counts[plan.block_class] += lanes
    else:
        np.add.at(counts, plan.block_class, lanes)
    return counts


class _HostRecord(NamedTuple):
    """A batch step's record on an accelerator: its tensors after one non-blocking host copy."""

    step: int
    host: Any
    event: Any
    layout: list[tuple[str, str, str, int, int]]
    meta: dict[str, Any] | None


def _device_record(
    step: int, ids: torch.Tensor | None, bits: dict[str, list[torch.Tensor]] | None, scalars: torch.Tensor | None,
    meta: dict[str, Any] | None,
) -> _HostRecord:
    """Concatenate a batch step's device tensors (ids, packed bits, loss and gradient norm) into one host copy."""
    pieces: list[torch.Tensor] = []
    layout: list[tuple[str, str, str, int, int]] = []
    if ids is not None and bits is not None:
        pieces.append(ids)
        layout.append(("ids", "train", "", 1, ids.shape[0] * 8))
        for layer, chunks in bits.items():
            packed = chunks[0]
            pieces.append(packed)
            layout.append(("bits", "train", layer, packed.shape[0], packed.shape[1]))
    if scalars is not None:
        pieces.append(scalars)
        layout.append(("scalars", "", "", 1, 8))
    host, event = _to_host(pieces)
    return _HostRecord(step, host, event, layout, meta)


def _decode_batches(records: list[tuple[Any, ...]]) -> dict[str, list[Any]]:
    """Writer-thread side of the batch-source steps of one hand-off.

    Each record is a CPU record ``(step, ids, bits, scalars, meta)`` (``bits`` maps a
    layer to its bool masks, ``scalars`` is ``(loss, grad_norm or None)``: a tensor and a float)
    or a :class:`_HostRecord` (accelerators). Per layer, the rows of all the hand-off's
    steps become one :class:`PatternChunk` (a ``step`` per row): one packing call and a
    handful of Python objects per layer and hand-off, whatever the number of steps.
    """
    steps: list[dict[str, Any]] = []
    by_layer: dict[str, list[tuple[int, np.ndarray, Any]]] = {}  # layer -> (step, ids, masks or packed bits)
    for record in records:
        if isinstance(record, _HostRecord):
            step, host, event, layout, meta = record
            parts = _split_layout(host, event, layout)
            ids = next((arr.reshape(-1).view(np.int64) for (what, *_), arr in parts if what == "ids"), None)
            for (what, _, layer, _, _), arr in parts:
                if what == "bits":  # packed on the device
                    by_layer.setdefault(layer, []).append((step, ids, arr))  # type: ignore[arg-type]
            scalars = next((arr.reshape(-1).view(np.float32) for (what, *_), arr in parts if what == "scalars"), None)
        else:
            step, ids_t, bits, scalars_t, meta = record
            if bits is not None:
                ids = ids_t.numpy()
                for layer, masks in bits.items():
                    by_layer.setdefault(layer, []).append((step, ids, masks))
            scalars = None
            if scalars_t is not None:
                loss_t, gn = scalars_t
                scalars = (float(loss_t), math.nan if gn is None else float(gn))
        if meta is not None and scalars is not None:
            steps.append({**meta, "loss": float(scalars[0]), "grad_norm": float(scalars[1])})
    patterns: list[PatternChunk] = []
    for layer, entries in by_layer.items():
        if isinstance(entries[0][2], np.ndarray):
            bits = np.concatenate([e[2] for e in entries]) if len(entries) > 1 else entries[0][2]
        else:
            bits = materialize([m for e in entries for m in e[2]])
        ids = np.concatenate([e[1] for e in entries]) if len(entries) > 1 else entries[0][1]
        step_of_row = np.repeat(np.array([e[0] for e in entries], np.int64), [len(e[1]) for e in entries])
        patterns.append(PatternChunk(step_of_row, layer, "train", "batch", ids, bits))
    out: dict[str, list[Any]] = {}
    if patterns:
        out["patterns"] = patterns
    if steps:
        out["steps"] = steps
    return out
