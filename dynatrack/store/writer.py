"""The background writer: one thread per rank, fed through a bounded queue.

The training thread only enqueues *jobs*: callables that run on the writer
thread and return Arrow tables (decoding bits, building rows) or save a
checkpoint. The writer buffers rows per table and writes a shard
``<kind>/rank=<r>/part-<attempt>-<seq>.parquet`` (zstd) when a buffer is large
or old enough, and on :meth:`ShardWriter.flush`. Files appear atomically (temp
name + rename). A failure on the writer thread is kept and re-raised in the
training process by :meth:`ShardWriter.raise_if_failed`.

>>> import tempfile, pyarrow as pa
>>> from dynatrack.store.fs import RunLocation
>>> from dynatrack.store.schema import STEPS
>>> loc = RunLocation.create(tempfile.mkdtemp(), "w")
>>> w = ShardWriter(loc, rank=0, attempt=0)
>>> row = {"step": [0], "epoch": [0], "loss": [1.0], "lr": [0.1], "batch_size": [8],
...        "grad_norm": [2.0], "wall_time": [0.0]}
>>> w.submit(lambda: {"steps": pa.table(row, schema=STEPS)})
>>> w.close(); [i.base_name for i in loc.list_files("steps")]
['part-000-000000.parquet']
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import logging
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dynatrack.store.fs import RunLocation
from dynatrack.store.rows import build, item_rows
from dynatrack.store.schema import CHECKPOINTS, TABLES, checkpoint_name, parse_part_name, part_name

log = logging.getLogger(__name__)

Job = Callable[[], Mapping[str, Any] | None]
_STOP = object()
_FLUSH = "flush"


class WriterError(RuntimeError):
    """The background writer failed; rows after the failure were not written."""


class ShardWriter:
    """Per-rank background Parquet writer (see module docstring).

    Args:
        loc: the run directory.
        rank: this process's rank; shards go to ``<kind>/rank=<rank>/``.
        attempt: resume counter, part of every shard name.
        max_queue: bound of the job queue; a full queue blocks the producer
            (back-pressure) instead of growing memory without limit.
        rows_per_file: write a shard once a table buffers this many rows.
        max_buffer_seconds: also write buffered rows older than this, so a crash
            loses at most this much recorded history.
        row_group_rows: Parquet row-group size.
    """

    def __init__(
        self,
        loc: RunLocation,
        *,
        rank: int,
        attempt: int,
        max_queue: int = 16,
        rows_per_file: int = 1_000_000,
        max_buffer_seconds: float = 120.0,
        row_group_rows: int = 131_072,
    ) -> None:
        self.loc = loc
        self.rank = rank
        self.attempt = attempt
        self.rows_per_file = rows_per_file
        self.max_buffer_seconds = max_buffer_seconds
        self.row_group_rows = row_group_rows
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._buffers: dict[str, list[Any]] = {k: [] for k in TABLES}
        self._buffered_rows: dict[str, int] = {k: 0 for k in TABLES}
        self._buffer_since: dict[str, float | None] = {k: None for k in TABLES}
        self._seq = self._next_seq()
        self._error: BaseException | None = None
        self._closed = False
        self.files_written: list[str] = []
        self._thread = threading.Thread(target=self._run, name=f"dynatrack-writer-r{rank}", daemon=True)
        self._thread.start()

    # -- producer side (training thread) ---------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job`` for the writer thread; raises if the writer has failed."""
        self.raise_if_failed()
        if self._closed:
            raise WriterError("the writer is closed")
        while True:
            try:
                self._queue.put(job, timeout=1.0)
                return
            except queue.Full:
                self.raise_if_failed()

    def save_checkpoint(self, step: int, state_dict: Mapping[str, Any]) -> None:
        """Queue ``state_dict`` (already copied to host memory) as ``checkpoints/step=<step>.pt``.

        An existing checkpoint of the same step is kept, never replaced; a resumed
        attempt writes its own ``step=<s>-a<attempt>.pt`` beside it.
        """

        def job() -> None:
            import torch

            buf = io.BytesIO()
            torch.save(dict(state_dict), buf)
            data = buf.getvalue()
            rel = f"{CHECKPOINTS}/{checkpoint_name(step)}"
            if self.loc.write_bytes_atomic(rel, data):
                return
            if self.attempt and self.loc.write_bytes_atomic(f"{CHECKPOINTS}/{checkpoint_name(step, self.attempt)}", data):
                return
            log.debug("checkpoint of step %s exists; kept", step)

        self.submit(job)

    def flush(self) -> None:
        """Block until every queued job ran and all buffered rows are on disk."""
        if self._closed:
            self.raise_if_failed()
            return
        done = threading.Event()
        self.submit(lambda: (_FLUSH, done))  # type: ignore[return-value]
        while not done.wait(0.5):
            if self._error is not None or not self._thread.is_alive():
                break
        self.raise_if_failed()

    def close(self) -> None:
        """Flush and stop the thread; re-raises a writer failure."""
        if self._closed:
            self.raise_if_failed()
            return
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._closed = True
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise WriterError(
                f"dynatrack's background writer failed on rank {self.rank} while writing "
                f"{self.loc.uri!r}: {self._error!r}"
            ) from self._error

    # -- consumer side (writer thread) -----------------------------------
    def _run(self) -> None:
        try:
            while True:
                try:
                    job = self._queue.get(timeout=1.0)
                except queue.Empty:
                    self._write_old_buffers()
                    continue
                if job is _STOP:
                    self._write_all()
                    return
                result = job()
                if isinstance(result, tuple) and result and result[0] == _FLUSH:
                    self._write_all()
                    result[1].set()
                    continue
                for kind, items in (result or {}).items():
                    for item in items if isinstance(items, list) else [items]:
                        self._append(kind, item)
                self._write_old_buffers()
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised in the training thread
            # reported once: re-raised on the training thread (raise_if_failed), not logged here too
            log.debug("dynatrack writer thread failed: %r", exc)
            self._error = exc

    def _append(self, kind: str, item: Any) -> None:
        """Buffer an Arrow table, a :class:`PatternChunk` or a row dict; built into a table per shard."""
        n = item_rows(item)
        if n == 0:
            return
        if isinstance(item, pa.Table) and item.schema != TABLES[kind]:
            item = item.cast(TABLES[kind])
        self._buffers[kind].append(item)
        self._buffered_rows[kind] += n
        if self._buffer_since[kind] is None:
            self._buffer_since[kind] = time.monotonic()
        if self._buffered_rows[kind] >= self.rows_per_file:
            self._write(kind)

    def _write_old_buffers(self) -> None:
        now = time.monotonic()
        for kind, since in self._buffer_since.items():
            if since is not None and now - since >= self.max_buffer_seconds:
                self._write(kind)

    def _write_all(self) -> None:
        for kind in TABLES:
            self._write(kind)

    def _write(self, kind: str) -> None:
        if not self._buffers[kind]:
            return
        table = build(kind, self._buffers[kind])
        rel_dir = f"{kind}/rank={self.rank}"
        name = part_name(self.attempt, self._seq)
        self._seq += 1
        fs = self.loc.fs
        fs.create_dir(self.loc.join(rel_dir), recursive=True)
        target = self.loc.join(rel_dir, name)
        if fs.get_file_info(target).type != pafs.FileType.NotFound:
            raise WriterError(f"shard {target} already exists; refusing to overwrite it")
        tmp = self.loc.join(rel_dir, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        with fs.open_output_stream(tmp) as sink:
            # store_schema=False: the Arrow schema is not kept in the file, so a dictionary-encoded
            # column handed over by rows.build reads back as the plain string of schema v1
            pq.write_table(table, sink, compression="zstd", row_group_size=self.row_group_rows,
                           store_schema=False, **_encoding(table.schema))
        fs.move(tmp, target)
        self.files_written.append(target)
        self._buffers[kind] = []
        self._buffered_rows[kind] = 0
        self._buffer_since[kind] = None
        del table
        _release_memory()

    def _next_seq(self) -> int:
        """Continue numbering after the shards of this attempt already on disk."""
        seqs = [-1]
        for kind in TABLES:
            for info in self.loc.list_files(f"{kind}/rank={self.rank}", recursive=False):
                parsed = parse_part_name(info.base_name)
                if parsed is not None and parsed[0] == self.attempt:
                    seqs.append(parsed[1])
        return max(seqs) + 1


def _release_memory() -> None:
    """Hand the memory freed after a shard back to the OS (Arrow's pool, and glibc's heap on Linux).

    A shard's buffers and table are freed at once; the allocators would otherwise keep the
    pages for reuse, so RSS kept growing over the first shards. Once per shard; the glibc
    call runs without the GIL (ctypes).
    """
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only (musl has none): AttributeError below
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def _encoding(schema: pa.Schema) -> dict[str, Any]:
    """Parquet options per table: min/max statistics for every column but the packed bits.

    Statistics on ``bits`` cost about 15% of the write time and help no reader (no one
    filters on a pattern's byte order); those on step, layer, split, ... prune row groups.
    """
    binary = {f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)}
    return {"write_statistics": [n for n in schema.names if n not in binary]}
