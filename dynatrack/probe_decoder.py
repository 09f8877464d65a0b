"""Decoding CPU probe masks (bits and per-class neuron counts), and the helper process that does it.

On a CPU probe step the recorder's hooks write every layer's bool mask into one
buffer per probe split (:class:`dynatrack.recorder.capture.ProbeMasks`). Turning
those masks into packed bits and per-class counts takes a few hundred microseconds;
on the training thread that time adds to the step, and on the writer thread the
numpy calls hand the GIL back and forth with the training thread (which measured
worse). So by default the buffer lives in shared memory and a small helper
process, started once per rank, decodes it on another core: the training thread
only writes one short request line. The writer thread reads the reply (a blocking
read, without the GIL) and turns it into rows. If the helper cannot start, or dies,
the masks are decoded in the recorder's process instead; no row is lost.

This module imports numpy only, so the helper starts fast
(``python -m dynatrack.probe_decoder`` runs :func:`serve` on stdin/stdout).

Protocol (one JSON line per request, from the recorder):

* ``{"op": "open", "id": k, "path": ..., "rows": n, "cols": w, "labels": [...] | null, "classes": C}``:
  map buffer ``k`` (a file of ``n * w`` bytes, bool) and unlink the file; no reply (a
  failure is reported at the buffer's first decode);
* ``{"op": "decode", "id": k, "count": bool, "bits": bool}``: reply one JSON line
  ``{"ok": true, "counts": [C, w] | null, "bits": [n, w / 8] | null}`` followed by the
  raw bytes of the int32 counts and of the uint8 packed bits, in that order;
  ``{"ok": false, "error": ...}`` on failure.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any

import numpy as np


def class_counts(rows: np.ndarray, labels: np.ndarray | None, n_classes: int) -> np.ndarray:
    """``counts[c, j]`` = rows of class c with neuron j active, from 0/1 rows ``[n, w]`` (bool or uint8).

    One row of totals without labels. The probe shards are ordered by label
    (:meth:`~dynatrack.recorder.probe.Probe.shard`), so each class is a contiguous
    block of rows (other orders are sorted first). When ``w`` is a multiple of 8 the
    rows are read as uint64 words, 8 neurons each, and a block of up to 255 rows is
    summed word-wise (SWAR): each byte lane holds one neuron's count, with no carry
    between lanes since no count exceeds 255. No BLAS call (a matmul would wake
    numpy's BLAS threads on the cores the training step needs).

    >>> class_counts(np.array([[1, 0], [1, 1], [0, 1]], bool), np.array([0, 0, 1]), 2).tolist()
    [[2, 1], [0, 1]]
    """
    u8 = rows.view(np.uint8)
    n, w = u8.shape
    if not (n_classes and labels is not None):
        labels, n_classes = np.zeros(n, np.int64), 1
    elif n > 1 and bool((labels[1:] < labels[:-1]).any()):
        order = np.argsort(labels, kind="stable")
        u8, labels = u8[order], labels[order]
    ends = np.cumsum(np.bincount(labels, minlength=n_classes)).tolist()
    counts = np.zeros((n_classes, w), dtype=np.int32)
    if n == 0:
        return counts
    if w % 8 or sys.byteorder != "little" or not u8.flags.c_contiguous:
        start = 0
        for c, end in enumerate(ends):
            if end > start:
                np.add.reduce(u8[start:end], axis=0, dtype=np.int32, out=counts[c])
            start = end
        return counts
    block_start: list[int] = []
    block_end: list[int] = []
    block_class: list[int] = []
    start = 0
    for c, end in enumerate(ends):
        for b in range(start, end, 255):
            block_start.append(b)
            block_end.append(min(b + 255, end))
            block_class.append(c)
        start = end
    words = u8.view(np.uint64)
    sums = np.empty((len(block_start), words.shape[1]), dtype=np.uint64)
    for i, (b0, b1) in enumerate(zip(block_start, block_end)):
        np.add.reduce(words[b0:b1], axis=0, out=sums[i])  # faster than one reduceat over axis 0
    lanes = sums.view(np.uint8)  # [blocks, w]: byte k of word q is neuron 8q + k
    if len(set(block_class)) == len(block_class):
        counts[block_class] = lanes
    else:
        np.add.at(counts, block_class, lanes)
    return counts


def decode_rows(
    rows: np.ndarray, labels: np.ndarray | None, n_classes: int, *, count: bool, bits: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-class counts ``int32[C or 1, w]`` and packed bits ``uint8[n, ceil(w/8)]`` of bool rows ``[n, w]``."""
    counts = class_counts(rows, labels, n_classes) if count else None
    packed = np.packbits(rows, axis=1, bitorder="big") if bits else None
    return counts, packed


def _reply(out: IO[bytes], header: dict[str, Any], *arrays: np.ndarray | None) -> None:
    out.write(json.dumps(header).encode() + b"\n")
    for a in arrays:
        if a is not None:
            out.write(np.ascontiguousarray(a).data)
    out.flush()


def serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """Answer requests until ``inp`` closes (the recorder's process closed the pipe, or exited)."""
    buffers: dict[int, tuple[np.ndarray, np.ndarray | None, int]] = {}
    failed: dict[int, str] = {}
    while True:
        line = inp.readline()
        if not line:
            return
        try:
            msg = json.loads(line)
            if msg["op"] == "open":  # no reply: an error is reported at this buffer's first decode
                try:
                    rows = np.memmap(msg["path"], dtype=np.bool_, mode="r", shape=(msg["rows"], msg["cols"]))
                    labels = None if msg["labels"] is None else np.asarray(msg["labels"], dtype=np.int64)
                    buffers[int(msg["id"])] = (rows, labels, int(msg["classes"]))
                    os.unlink(msg["path"])  # both processes have it mapped: nothing is left if either dies
                except Exception as exc:
                    failed[int(msg["id"])] = f"{type(exc).__name__}: {exc}"
            elif msg["op"] == "decode":
                if int(msg["id"]) in failed:
                    raise RuntimeError(f"mask buffer {msg['id']} could not be mapped: {failed[int(msg['id'])]}")
                rows, labels, n_classes = buffers[int(msg["id"])]
                counts, packed = decode_rows(np.asarray(rows), labels, n_classes, count=msg["count"], bits=msg["bits"])
                _reply(out, {"ok": True, "counts": None if counts is None else list(counts.shape),
                             "bits": None if packed is None else list(packed.shape)}, counts, packed)
            else:
                raise ValueError(f"unknown request {msg.get('op')!r}")
        except Exception as exc:  # reported to the recorder, which decodes in its own process instead
            _reply(out, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
