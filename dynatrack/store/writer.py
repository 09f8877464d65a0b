"""The background writer: one thread per rank, fed through a bounded queue.

The training thread only enqueues *jobs*: callables that run on the writer
thread and return Arrow tables (decoding bits, building rows) or save a
checkpoint. The writer buffers rows per table and writes a shard
``<kind>/rank=<r>/part-<attempt>-<seq>.parquet`` (zstd) when a buffer holds
``max_buffer_steps`` recorded steps, ``rows_per_file`` rows or rows older than
``max_buffer_seconds``, and on :meth:`ShardWriter.flush`. Files appear atomically
(temp name, fsync, link/rename). After each write of all buffers the writer
replaces its commit record (:mod:`dynatrack.store.commits`), which tells readers
up to which step this rank's rows are all on disk; at :meth:`ShardWriter.close` it
marks the attempt closed and moves the rows of earlier attempts that this one
superseded out of the table directories (into ``superseded/``, never deleted).
A failure on the writer thread is kept and re-raised in the training process by
:meth:`ShardWriter.raise_if_failed`.

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
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dynatrack.store.commits import Commit, complete_ranges, write_commit
from dynatrack.store.fs import RunLocation, StoreError, temp_name
from dynatrack.store.rows import NeuronChunk, PatternChunk, build, item_rows
from dynatrack.store.schema import CHECKPOINTS, SUPERSEDED, TABLES, checkpoint_name, parse_part_name, part_name

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
        rows_per_file: write the buffers once a table buffers this many rows.
        max_buffer_steps: write the buffers (and commit) once they hold rows of this
            many distinct recorded steps: with the recorder's ``submit_every`` it bounds
            the recorded steps a crash can cost (see docs/reliability.md).
        max_buffer_seconds: also write buffered rows older than this (checked after
            each job and at least every second while idle).
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
        max_buffer_steps: int = 64,
        max_buffer_seconds: float = 60.0,
        row_group_rows: int = 131_072,
    ) -> None:
        if max_buffer_steps < 1 or max_buffer_seconds <= 0 or rows_per_file < 1:
            raise ValueError("max_buffer_steps and rows_per_file must be >= 1 and max_buffer_seconds > 0, got "
                             f"{max_buffer_steps}, {rows_per_file}, {max_buffer_seconds}")
        self.loc = loc
        self.rank = rank
        self.attempt = attempt
        self.rows_per_file = rows_per_file
        self.max_buffer_steps = max_buffer_steps
        self.max_buffer_seconds = max_buffer_seconds
        self.row_group_rows = row_group_rows
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._buffers: dict[str, list[Any]] = {k: [] for k in TABLES}
        self._buffered_rows: dict[str, int] = {k: 0 for k in TABLES}
        self._buffer_since: dict[str, float | None] = {k: None for k in TABLES}
        self._buffer_steps: set[int] = set()
        loc.remove_stale_temp_files()
        self._commit = self._previous_commit()
        self._max_step = self._commit.through  # the largest step in any row handed over
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
                    self._write_all(through=self._max_step, closed=True)
                    try:
                        self._supersede_earlier_attempts()
                    except (OSError, pa.ArrowException, StoreError, WriterError) as exc:
                        # every row is committed: only the glob's view waits for the next close
                        log.warning("superseded rows of earlier attempts left in place (open_run still drops "
                                    "them; the next resumed fit moves them): %r", exc)
                    return
                result = job()
                if isinstance(result, tuple) and result and result[0] == _FLUSH:
                    self._write_all(through=self._max_step)
                    result[1].set()
                    continue
                for kind, items in (result or {}).items():
                    for item in items if isinstance(items, list) else [items]:
                        self._append(kind, item)
                if len(self._buffer_steps) >= self.max_buffer_steps or any(
                        n >= self.rows_per_file for n in self._buffered_rows.values()):
                    self._write_all()
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
        steps = _item_steps(item)
        self._buffer_steps.update(steps)
        self._max_step = max(self._max_step, *steps)
        if self._buffer_since[kind] is None:
            self._buffer_since[kind] = time.monotonic()

    def _write_old_buffers(self) -> None:
        now = time.monotonic()
        if any(since is not None and now - since >= self.max_buffer_seconds for since in self._buffer_since.values()):
            self._write_all()

    def _write_all(self, *, through: int | None = None, closed: bool = False) -> None:
        """Write every buffer, then commit.

        Without ``through`` (a write forced by a bound, mid-stream) the last step handed
        over may still get rows, so the commit covers the steps before it; a flush (a
        checkpoint: between steps) and the close cover everything handed over.
        """
        for kind in TABLES:
            self._write(kind)
        self._buffer_steps = set()
        through = self._max_step - 1 if through is None else through
        through = max(through, self._commit.through)
        if closed or through != self._commit.through or self._commit.rows != self._rows_written():
            self._commit = Commit(self.rank, self.attempt, through, closed, self._rows_written())
            write_commit(self.loc, self._commit)

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
        self._write_parquet(table, target)
        self.files_written.append(target)
        self._rows[kind] = self._rows.get(kind, 0) + table.num_rows
        self._buffers[kind] = []
        self._buffered_rows[kind] = 0
        self._buffer_since[kind] = None
        del table
        _release_memory()

    def _write_parquet(self, table: pa.Table, target: str, *, overwrite: bool = False) -> None:
        """``table`` as a Parquet file at ``target``, atomically (a removed temporary file on failure)."""
        parent, name = target.rsplit("/", 1)
        tmp = f"{parent}/{temp_name(name)}"
        try:
            with self.loc.fs.open_output_stream(tmp) as sink:
                # store_schema=False: the Arrow schema is not kept in the file, so a dictionary-encoded
                # column handed over by rows.build reads back as the plain string of schema v1
                pq.write_table(table, sink, compression="zstd", row_group_size=self.row_group_rows,
                               store_schema=False, **_encoding(table.schema))
            if not self.loc.publish(tmp, target, overwrite=overwrite):
                raise WriterError(f"shard {target} already exists; refusing to overwrite it")
        finally:
            self.loc._discard(tmp)

    def _rows_written(self) -> dict[str, int]:
        return {k: v for k, v in self._rows.items() if v}

    def _previous_commit(self) -> Commit:
        """This rank's record of this attempt if one exists (a writer reopened), else an empty one."""
        from dynatrack.store.commits import read_commits

        self._rows: dict[str, int] = {}
        try:
            old = read_commits(self.loc).get((self.rank, self.attempt))
        except StoreError:
            old = None
        if old is None:
            return Commit(self.rank, self.attempt, -1, False, {})
        self._rows = dict(old.rows or {})
        return Commit(self.rank, self.attempt, old.through, False, dict(self._rows))

    def _supersede_earlier_attempts(self) -> None:
        """Move this rank's rows of earlier attempts at steps a later attempt owns into ``superseded/``.

        Runs once this attempt's rows are committed (at close). Per shard: its superseded rows
        are written to ``superseded/<kind>/rank=<r>/<shard>.from-<step>.parquet`` (replaced if
        present: same rows), then the shard is atomically replaced by its remaining rows (or
        removed when none remain). A crash in between leaves the rows in both places; readers
        drop them from the shard by attempt either way, and the next close finishes the move.
        """
        from dynatrack.store.manifest import read_manifest

        try:
            attempts = read_manifest(self.loc).get("attempts") or []
        except StoreError as exc:
            log.warning("superseded rows left in place: %s", exc)
            return
        cuts = {r.attempt: r.cut for r in complete_ranges(attempts, None, world_size=1)}
        for kind in TABLES:
            for info in self.loc.list_files(f"{kind}/rank={self.rank}", recursive=False):
                parsed = parse_part_name(info.base_name)
                if parsed is None or parsed[0] >= self.attempt or cuts.get(parsed[0], np.inf) == np.inf:
                    continue
                cut = int(cuts[parsed[0]])
                with self.loc.fs.open_input_file(info.path) as fh:
                    pf = pq.ParquetFile(fh)
                    if _max_step(pf) < cut:
                        continue
                    table = pf.read()
                late = pc.greater_equal(table.column("step"), cut)
                moved, kept = table.filter(late), table.filter(pc.invert(late))
                if moved.num_rows == 0:
                    continue
                stem = info.base_name[: -len(".parquet")]
                dest = self.loc.join(SUPERSEDED, kind, f"rank={self.rank}", f"{stem}.from-{cut}.parquet")
                self.loc.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
                self._write_parquet(moved, dest, overwrite=True)
                if kept.num_rows:
                    self._write_parquet(kept, info.path, overwrite=True)
                else:
                    self.loc.fs.delete_file(info.path)
                log.info("moved %d superseded rows of %s to %s", moved.num_rows, info.path, dest)

    def _next_seq(self) -> int:
        """Continue numbering after the shards of this attempt already on disk."""
        seqs = [-1]
        for kind in TABLES:
            for info in self.loc.list_files(f"{kind}/rank={self.rank}", recursive=False):
                parsed = parse_part_name(info.base_name)
                if parsed is not None and parsed[0] == self.attempt:
                    seqs.append(parsed[1])
        return max(seqs) + 1


def _item_steps(item: Any) -> set[int]:
    """The distinct steps of a buffered item (a table, a chunk or a ``steps`` row dict)."""
    if isinstance(item, (PatternChunk, NeuronChunk)):
        step = item.step
        return {int(step)} if isinstance(step, (int, np.integer)) else {int(s) for s in np.unique(step)}
    if isinstance(item, pa.Table):
        return {int(s) for s in pc.unique(item.column("step")).to_pylist()}
    return {int(item["step"])}


def _max_step(pf: pq.ParquetFile) -> float:
    """The largest ``step`` in a Parquet file, from its statistics (``inf`` when unknown)."""
    md = pf.metadata
    idx = md.schema.to_arrow_schema().get_field_index("step")
    best = -np.inf
    for i in range(md.num_row_groups):
        st = md.row_group(i).column(idx).statistics
        if st is None or not st.has_min_max:
            return np.inf
        best = max(best, st.max)
    return best


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
