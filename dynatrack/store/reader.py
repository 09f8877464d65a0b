"""Typed, lazy access to a run directory.

>>> run = open_run("runs/<run_id>")                      # doctest: +SKIP
>>> ids, bits = run.pattern_bits(step=0, layer="net.1")  # doctest: +SKIP
>>> run.steps().to_pandas()                              # doctest: +SKIP

The directory is plain Parquet, readable without dynatrack, e.g. with DuckDB::

    SELECT step, layer, COUNT(DISTINCT bits)
    FROM read_parquet('runs/<run_id>/patterns/*/*.parquet', hive_partitioning = true)
    GROUP BY ALL;

A resumed run (see ``attempts`` in the manifest) may hold rows of an earlier
attempt at steps that the resumed attempt recorded again; this reader keeps
only the latest attempt's rows for such steps (the resumed writer moves the
others to ``superseded/`` when it closes, so the glob above agrees).

Steps that are not complete on every rank (a rank crashed before its rows were
committed, see :mod:`dynatrack.store.commits`) are left out of every table, with
one :class:`IncompleteStepsWarning` naming them; ``open_run(path,
include_incomplete=True)`` keeps them.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from dynatrack.analysis.partitions import partition_labels
from dynatrack.store.commits import complete_ranges, read_commits
from dynatrack.store.fs import RunLocation, StoreError, pa_errors
from dynatrack.store.manifest import read_manifest
from dynatrack.store.schema import (
    ANALYSIS,
    CHECKPOINTS,
    PROBE,
    PROBE_DIR,
    SUPERSEDED,
    TABLES,
    parse_checkpoint_name,
    parse_part_name,
    with_dictionary_strings,
)

RunError = StoreError


class IncompleteStepsWarning(UserWarning):
    """Some recorded steps are not on disk for every rank; readers leave them out."""


class NotRecordedError(StoreError, KeyError):
    """A step, split or layer that the run did not record (a ``KeyError`` too, for ``in``-style callers)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ShardFile:
    kind: str
    rank: int
    attempt: int
    seq: int
    path: str
    size: int


def open_run(run_dir: str | os.PathLike, *, include_incomplete: bool = False) -> "Run":
    """Open a run directory written by :class:`dynatrack.PatternRecorder`.

    Tables leave out the steps that are not complete on every rank (warning once,
    naming them) unless ``include_incomplete=True``. Raises :class:`RunError` if the
    directory does not exist, is not a dynatrack run, or uses a newer schema version
    than this code reads.
    """
    return Run(RunLocation.from_run_dir(run_dir), include_incomplete=include_incomplete)


class Run:
    """A recorded run: manifest, shard files, tables and checkpoints."""

    def __init__(self, loc: RunLocation, *, include_incomplete: bool = False) -> None:
        self.loc = loc
        self.manifest: dict[str, Any] = read_manifest(loc)
        self.include_incomplete = include_incomplete
        self._commits = read_commits(loc) if self.manifest.get("commit_records") else None
        self._ranges = {r.attempt: r for r in complete_ranges(
            self.manifest.get("attempts") or [], self._commits, world_size=int(self.manifest["world_size"]))}
        self._incomplete: dict[int, list[int]] | None = None
        self._warned = False
        self._checked: set[tuple[str, int]] = set()

    # -- metadata ------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    @property
    def path(self) -> str:
        return self.loc.uri

    @property
    def layers(self) -> list[dict[str, Any]]:
        """``[{name, width}]`` in forward order."""
        return list(self.manifest["layers"])

    @property
    def widths(self) -> dict[str, int]:
        return {layer["name"]: int(layer["width"]) for layer in self.manifest["layers"]}

    def files(self, kind: str) -> list[ShardFile]:
        """The shard files of one table (``patterns``, ``steps`` or ``neurons``)."""
        if kind not in TABLES:
            raise ValueError(f"unknown table {kind!r}; expected one of {sorted(TABLES)}")
        out = []
        for info in self.loc.list_files(kind, refuse_links=True):
            parsed = parse_part_name(info.base_name)
            rank_dir = info.path.rsplit("/", 2)[-2]
            # exactly <kind>/rank=<r>/part-*.parquet, as the documented glob <kind>/*/*.parquet reads
            if parsed is None or not rank_dir.startswith("rank=") or not rank_dir[5:].isdigit() or (
                    info.path != self.loc.join(kind, rank_dir, info.base_name)):
                continue
            out.append(ShardFile(kind, int(rank_dir[5:]), parsed[0], parsed[1], info.path, info.size))
        return out

    @property
    def ranks(self) -> list[int]:
        return sorted({f.rank for kind in TABLES for f in self.files(kind)})

    def _keep(self, attempt: int, complete: bool) -> ds.Expression | None:
        """The rows of ``attempt`` a reader keeps: its own steps (``< cut``), complete ones only unless asked.

        ``False`` for an attempt the manifest does not list (a fit that died before
        writing its manifest entry: nothing it wrote is committed).
        """
        r = self._ranges.get(attempt)
        if r is None:
            return None if not complete else ds.scalar(False)
        stop = r.stop if complete else r.cut
        return None if stop == math.inf else ds.field("step") < int(stop)

    def incomplete_steps(self) -> dict[int, list[int]]:
        """``{step: [ranks that have not committed it]}`` for steps with rows on disk that are not
        complete on every rank (empty for a run that ended cleanly, or written before commit records)."""
        if self._incomplete is not None:
            return self._incomplete
        out: dict[int, list[int]] = {}
        world = int(self.manifest["world_size"])
        for attempt, r in self._ranges.items():
            if r.stop >= r.cut:
                continue
            steps: set[int] = set()
            for kind in TABLES:
                files = [f for f in self.files(kind) if f.attempt == attempt]
                if not files:
                    continue
                expr = ds.field("step") >= int(r.stop)
                if r.cut != math.inf:
                    expr = expr & (ds.field("step") < int(r.cut))
                t = self._read(kind, files, TABLES[kind], "parquet", expr, ["step"])
                steps.update(int(v) for v in pc.unique(t.column("step")).to_pylist())
            for step in steps:
                out[step] = [rank for rank in range(world) if self._covers(rank, attempt) <= step]
        unknown = {f.attempt for kind in TABLES for f in self.files(kind)} - set(self._ranges)
        for attempt in unknown:
            for kind in TABLES:
                files = [f for f in self.files(kind) if f.attempt == attempt]
                if files:
                    t = self._read(kind, files, TABLES[kind], "parquet", None, ["step"])
                    for v in pc.unique(t.column("step")).to_pylist():
                        out.setdefault(int(v), list(range(world)))
        self._incomplete = dict(sorted(out.items()))
        return self._incomplete

    def _covers(self, rank: int, attempt: int) -> float:
        if self._commits is None:
            return math.inf
        c = self._commits.get((rank, attempt))
        return c.covers() if c is not None else self._ranges[attempt].start

    def commit_status(self) -> dict[int, dict[int, dict[str, Any]]]:
        """``{rank: {attempt: {through, closed, rows}}}`` from the commit records (empty for older runs)."""
        out: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
        for (rank, attempt), c in sorted((self._commits or {}).items()):
            out[rank][attempt] = {"through": c.through, "closed": c.closed, "rows": dict(c.rows or {})}
        return dict(out)

    def _warn_incomplete(self) -> None:
        if self.include_incomplete or self._warned:
            return
        self._warned = True
        missing = self.incomplete_steps()
        if missing:
            shown = ", ".join(f"{s} (not on rank {','.join(map(str, r))})" for s, r in list(missing.items())[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            warnings.warn(
                f"run {self.run_id}: steps {shown}{more} are not complete on every rank (a rank stopped before "
                "committing them); they are left out. open_run(..., include_incomplete=True) shows them, "
                "resuming the fit records them again.", IncompleteStepsWarning, stacklevel=3)

    # -- reading shards, checked -----------------------------------------------
    def _fragments(self, kind: str, files: list[ShardFile], fmt: Any) -> list[Any]:
        """Parquet fragments of ``files`` whose schema was checked against the schema of ``kind``."""
        fmt_obj = ds.ParquetFileFormat() if fmt == "parquet" else fmt
        frags = []
        for f in files:
            frag = fmt_obj.make_fragment(f.path, filesystem=self.loc.fs)
            if (f.path, f.size) not in self._checked:
                try:
                    physical = frag.physical_schema
                except pa_errors() as exc:
                    raise StoreError(f"shard {f.path} is not a readable Parquet file ({_first_line(exc)}); "
                                     "it is truncated, empty or corrupt. Move it out of the run directory "
                                     "to read the rest (its steps then read as incomplete)") from exc
                check_shard_schema(kind, f.path, physical)
                self._checked.add((f.path, f.size))
            frags.append(frag)
        return frags

    def _read(self, kind: str, files: list[ShardFile], schema: pa.Schema, fmt: Any,
              expr: ds.Expression | None, columns: list[str] | None) -> pa.Table:
        fmt_obj = ds.ParquetFileFormat() if fmt == "parquet" else fmt
        frags = self._fragments(kind, files, fmt_obj)
        dataset = ds.FileSystemDataset(frags, schema, fmt_obj, self.loc.fs)
        try:
            return dataset.to_table(filter=expr, columns=columns)
        except pa_errors() as exc:
            for f, frag in zip(files, frags):
                try:
                    frag.to_table(schema=schema, columns=columns)
                except pa_errors() as inner:
                    raise StoreError(f"shard {f.path} cannot be read ({_first_line(inner)}); it is corrupt. "
                                     "Move it out of the run directory to read the rest") from inner
            raise StoreError(f"cannot read the {kind} shards of {self.path}: {_first_line(exc)}") from exc

    # -- tables ----------------------------------------------------------------
    def table(
        self,
        kind: str,
        *,
        filter: ds.Expression | None = None,
        columns: list[str] | None = None,
        dictionary_strings: bool = False,
        with_rank: bool = True,
    ) -> pa.Table:
        """One table over all ranks, with a ``rank`` column, superseded rows dropped.

        ``dictionary_strings=True`` returns the string columns (layer, split, source, ...)
        dictionary-encoded as Parquet stores them: no per-row string decoding, and filters
        on them compare dictionary codes.
        """
        files = self.files(kind)
        schema = TABLES[kind]
        fmt: Any = "parquet"
        if dictionary_strings:
            strings = [f.name for f in schema if pa.types.is_string(f.type)]
            schema = with_dictionary_strings(schema)
            fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=strings))
        self._warn_incomplete()
        groups: dict[tuple[int, int], list[ShardFile]] = defaultdict(list)
        for f in files:
            groups[(f.attempt, f.rank)].append(f)
        parts = []
        for (attempt, rank), group in sorted(groups.items()):
            expr = filter
            keep = self._keep(attempt, complete=not self.include_incomplete)
            if keep is not None:
                expr = keep if expr is None else (expr & keep)
            t = self._read(kind, group, schema, fmt, expr, columns)
            parts.append(t.append_column("rank", pa.array(np.full(t.num_rows, rank, dtype=np.int32))) if with_rank else t)
        if not parts:
            cols = [schema.field(c) for c in (columns or schema.names)]
            return pa.schema([*cols, *([pa.field("rank", pa.int32())] if with_rank else [])]).empty_table()
        return pa.concat_tables(parts)

    def only_value(self, kind: str, column: str, value: Any) -> bool:
        """True when the Parquet statistics prove that every row of ``kind`` holds ``value`` in
        ``column`` (min = max = value and no nulls in every row group), so a filter
        ``column == value`` selects everything and can be left out: evaluating it means
        reading and comparing the column, about a fifth of the cost of reading the patterns.
        Reads only the shard footers.
        """
        import pyarrow.parquet as pq

        files = self.files(kind)
        if not files:
            return False
        for f in files:
            md = self._footer(f.path)
            idx = md.schema.to_arrow_schema().get_field_index(column)
            if idx < 0:
                return False
            for i in range(md.num_row_groups):
                st = md.row_group(i).column(idx).statistics
                if st is None or not st.has_min_max or st.null_count or st.min != value or st.max != value:
                    return False
        return True

    def _footer(self, path: str) -> Any:
        """The Parquet metadata of a shard, or a :class:`StoreError` naming it."""
        import pyarrow.parquet as pq

        try:
            with self.loc.fs.open_input_file(path) as fh:
                return pq.ParquetFile(fh).metadata
        except pa_errors() as exc:
            raise StoreError(f"shard {path} is not a readable Parquet file ({_first_line(exc)}); it is truncated, "
                             "empty or corrupt. Move it out of the run directory to read the rest") from exc

    def patterns(
        self,
        *,
        step: int | None = None,
        layer: str | None = None,
        split: str | None = None,
        source: str | None = None,
        columns: list[str] | None = None,
    ) -> pa.Table:
        """Pattern rows, filtered on any of ``step``, ``layer``, ``split``, ``source``."""
        expr = None
        for name, value in (("step", step), ("layer", layer), ("split", split), ("source", source)):
            if value is not None:
                e = ds.field(name) == value
                expr = e if expr is None else expr & e
        return self.table("patterns", filter=expr, columns=columns)

    def pattern_bits(
        self, step: int, layer: str, *, split: str | None = "train", source: str = "probe"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(sample_ids int64[n], bits uint8[n, ceil(width/8)])`` sorted by sample id.

        Unpack with ``numpy.unpackbits(bits, axis=1, count=width)``.
        """
        if layer not in self.widths:
            raise NotRecordedError(f"layer {layer!r} was not recorded in run {self.run_id}; recorded layers: "
                                   f"{list(self.widths)}")
        t = self.patterns(step=step, layer=layer, split=split, source=source, columns=["sample_id", "bits"])
        if t.num_rows == 0:
            self._explain_missing(step, layer, split, source)
        return bits_matrix(t, self.widths[layer])

    def _explain_missing(self, step: int, layer: str, split: str | None, source: str) -> None:
        """Raise :class:`NotRecordedError` saying which of step, split, source has no rows, and what exists."""
        have = self.table("patterns", filter=ds.field("layer") == layer, columns=["step", "split", "source"],
                          with_rank=False)
        sources = sorted(set(have.column("source").to_pylist()))
        if source not in sources:
            raise NotRecordedError(f"run {self.run_id} has no {source!r} patterns; sources recorded: {sources}")
        have = have.filter(pc.equal(have.column("source"), source))
        splits = sorted(set(have.column("split").to_pylist()))
        if split is not None and split not in splits:
            raise NotRecordedError(f"run {self.run_id} has no split {split!r} in its {source} patterns; "
                                   f"splits: {splits}")
        steps = sorted(set(have.column("step").to_pylist()))
        hint = " (incomplete on some rank: open_run(..., include_incomplete=True))" if step in self.incomplete_steps() else ""
        raise NotRecordedError(f"run {self.run_id} has no {source} patterns of layer {layer!r} at step {step}"
                               f"{hint}; recorded steps: {_short(steps)}")

    def steps(self) -> pa.Table:
        """The ``steps`` table (one row per recorded step per rank)."""
        return self.table("steps")

    def neurons(self, *, merged: bool = False, step: int | None = None) -> pa.Table:
        """The ``neurons`` table; ``merged=True`` sums counts over ranks and relabels.

        Merged labels come from :func:`dynatrack.analysis.partitions.partition_labels`
        on the whole-probe counts (per-rank labels only see that rank's samples).
        """
        expr = None if step is None else ds.field("step") == step
        t = self.table("neurons", filter=expr)
        if not merged or t.num_rows == 0:
            return t
        keys = ["step", "layer", "split", "neuron"]
        grouped = t.group_by(keys).aggregate([("active", "sum"), ("n_samples", "sum"), ("out_sign", "max")])
        # active_by_class: sum lists element-wise via numpy, in the grouped order. A split
        # without labels has empty lists (its neurons are labelled without classes).
        abc = t.column("active_by_class").combine_chunks()
        lengths = abc.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        n_classes = int(lengths.max()) if len(lengths) else 0
        flat = np.zeros((len(abc), n_classes), dtype=np.int64)
        values = np.asarray(abc.flatten().to_numpy(zero_copy_only=False), dtype=np.int64)
        row_of = np.repeat(np.arange(len(abc)), lengths)
        flat[row_of, np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)] = values
        key_cols = [t.column(k).to_numpy(zero_copy_only=False) for k in keys]
        index = {k: i for i, k in enumerate(zip(*[grouped.column(k).to_pylist() for k in keys]))}
        rows = np.fromiter((index[k] for k in zip(*[c.tolist() for c in key_cols])), dtype=np.int64, count=t.num_rows)
        sums = np.zeros((grouped.num_rows, n_classes), dtype=np.int64)
        np.add.at(sums, rows, flat)
        has_classes = np.zeros(grouped.num_rows, dtype=bool)
        has_classes[rows[lengths > 0]] = True
        active = grouped.column("active_sum").to_numpy()
        n = grouped.column("n_samples_sum").to_numpy()
        labels = np.empty(grouped.num_rows, dtype=object)
        labels[~has_classes] = partition_labels(active[~has_classes], n[~has_classes], None)
        labels[has_classes] = partition_labels(active[has_classes], n[has_classes], sums[has_classes])
        by_class = [row.tolist() if has else [] for row, has in zip(sums, has_classes)]
        return pa.table(
            {
                **{k: grouped.column(k) for k in keys},
                "active": active,
                "n_samples": n,
                "active_by_class": pa.array(by_class, type=pa.list_(pa.int32())),
                "partition": pa.array(labels.tolist(), type=pa.string()),
                "out_sign": grouped.column("out_sign_max").cast(pa.int8()),
            }
        ).sort_by([(k, "ascending") for k in keys])

    def recorded_steps(self, kind: str = "patterns", **filters: Any) -> list[int]:
        """Sorted distinct steps present in a table."""
        if kind == "patterns":
            expr = None
            for name, value in filters.items():
                if value is not None and not self.only_value(kind, name, value):
                    e = ds.field(name) == value
                    expr = e if expr is None else expr & e
            t = self.table(kind, filter=expr, columns=["step"], dictionary_strings=True, with_rank=False)
        else:
            t = self.table(kind, columns=["step"], with_rank=False)
        if not t.num_rows:
            return []
        return sorted(int(v) for v in pc.unique(t.column("step")).to_pylist())

    # -- checkpoints and analysis --------------------------------------------
    def _checkpoint_files(self) -> dict[int, dict[int, str]]:
        out: dict[int, dict[int, str]] = defaultdict(dict)
        for info in self.loc.list_files(CHECKPOINTS, recursive=False):
            parsed = parse_checkpoint_name(info.base_name)
            if parsed is not None:
                out[parsed[0]][parsed[1]] = info.path
        return out

    def checkpoint_steps(self) -> list[int]:
        """Steps with saved weights."""
        return sorted(self._checkpoint_files())

    def checkpoint_path(self, step: int) -> str:
        """The checkpoint file of ``step``, preferring the attempt whose rows are kept."""
        files = self._checkpoint_files().get(int(step))
        if not files:
            raise RunError(
                f"run {self.path!r} has no checkpoint for step {step}; checkpointed steps: "
                f"{self.checkpoint_steps()}. Record with a checkpoint schedule that includes it."
            )
        attempts = self.manifest.get("attempts", [{"attempt": 0, "start_step": 0}])
        owner = max((a["attempt"] for a in attempts if a["start_step"] <= step), default=0)
        candidates = [a for a in files if a <= owner]
        return files[max(candidates)] if candidates else files[min(files)]

    def checkpoint(self, step: int) -> dict[str, Any]:
        """The weights at ``step`` (``torch.load(..., weights_only=True)``)."""
        import torch

        path = self.checkpoint_path(step)
        with self.loc.fs.open_input_stream(path) as f:
            data = f.read()
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
            raise StoreError(f"checkpoint {path} cannot be loaded ({_first_line(exc)}); it is truncated or "
                             "corrupt. Move it out of checkpoints/ (that step then has no weights)") from exc

    def probe_inputs(self, split: str = "train") -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(sample_ids, labels or None, inputs float32[n, *input_shape])`` of a probe split."""
        import pyarrow.parquet as pq

        rel = f"{PROBE_DIR}/{split}.parquet"
        if not self.loc.exists(rel):
            raise RunError(f"run {self.path!r} stores no probe split {split!r}; splits: "
                           f"{sorted((self.manifest.get('probe') or {}).get('splits', {}))}")
        try:
            with self.loc.fs.open_input_file(self.loc.join(rel)) as f:
                t = pq.read_table(f)
            check_shard_schema("probe", self.loc.join(rel), t.schema)
        except pa_errors() as exc:
            raise StoreError(f"probe file {self.loc.join(rel)} cannot be read ({_first_line(exc)}); it is "
                             "truncated or corrupt") from exc
        ids = t.column("sample_id").to_numpy()
        labels = t.column("label")
        lab = None if labels.null_count == len(labels) else labels.to_numpy(zero_copy_only=False).astype(np.int64)
        flat = t.column("input").combine_chunks().flatten().to_numpy().astype(np.float32)
        shape = (self.manifest.get("probe") or {}).get("input_shape") or [flat.size // max(len(ids), 1)]
        return ids, lab, flat.reshape(len(ids), *shape)

    def analysis_path(self, analyzer: str) -> str:
        return self.loc.join(ANALYSIS, f"{analyzer}.parquet")

    # -- inspect -----------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What the run holds: layers, steps, ranks, rows and bytes per table."""
        import zipfile

        tables = {}
        for kind in TABLES:
            files = self.files(kind)
            rows = 0
            for f in files:
                rows += self._footer(f.path).num_rows
                self._fragments(kind, [f], "parquet")  # schema checked, a clear error otherwise
            tables[kind] = {"files": len(files), "rows": rows, "bytes": sum(f.size for f in files)}
        pattern_steps = self.recorded_steps("patterns")
        ckpts = self.checkpoint_steps()
        for by_attempt in self._checkpoint_files().values():
            for path in by_attempt.values():
                with self.loc.fs.open_input_file(path) as fh:
                    ok = zipfile.is_zipfile(fh)
                if not ok:
                    raise StoreError(f"checkpoint {path} is not a torch.save file (truncated, empty or corrupt); "
                                     "move it out of checkpoints/")
        incomplete = self.incomplete_steps()
        world = int(self.manifest["world_size"])
        ckpt_bytes = sum(i.size for i in self.loc.list_files(CHECKPOINTS, recursive=False))
        return {
            "run_id": self.run_id,
            "path": self.path,
            "schema_version": self.manifest["schema_version"],
            "world_size": self.manifest.get("world_size"),
            "ranks": self.ranks,
            "layers": self.layers,
            "probe": self.manifest.get("probe"),
            "pattern_steps": pattern_steps,
            "checkpoint_steps": ckpts,
            "attempts": self.manifest.get("attempts"),
            "incomplete_steps": sorted(incomplete),
            "incomplete_by_rank": {r: [s for s, ranks in incomplete.items() if r in ranks] for r in range(world)},
            "commits": self.commit_status(),
            "superseded_bytes": sum(i.size for i in self.loc.list_files(SUPERSEDED)),
            "tables": tables,
            "checkpoint_bytes": ckpt_bytes,
            "probe_bytes": sum(i.size for i in self.loc.list_files(PROBE_DIR)),
            "analysis_bytes": sum(i.size for i in self.loc.list_files(ANALYSIS)),
            "total_bytes": sum(i.size for i in self.loc.list_files("")),
        }


def _normal(t: pa.DataType) -> pa.DataType:
    """A Parquet-read type in the form the schema declares it (dictionary, large and list-field names aside)."""
    if pa.types.is_dictionary(t):
        return _normal(t.value_type)
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_binary(t):
        return pa.binary()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_normal(t.value_type))
    return t


def check_shard_schema(kind: str, path: str, physical: pa.Schema) -> None:
    """Raise a :class:`StoreError` naming ``path`` if a column of the ``kind`` schema is missing or mistyped.

    >>> check_shard_schema("steps", "x.parquet", TABLES["steps"].remove(0))
    Traceback (most recent call last):
    ...
    dynatrack.store.fs.StoreError: shard x.parquet lacks the column 'step' of the steps table (int64); it was not written by dynatrack or is damaged
    """
    expected = PROBE if kind == "probe" else TABLES[kind]
    for field in expected:
        i = physical.get_field_index(field.name)
        if i < 0:
            raise StoreError(f"shard {path} lacks the column {field.name!r} of the {kind} table ({field.type}); "
                             "it was not written by dynatrack or is damaged")
        got = _normal(physical.field(i).type)
        if not got.equals(_normal(field.type)):
            raise StoreError(f"shard {path}: column {field.name!r} is {physical.field(i).type}, the {kind} table "
                             f"stores {field.type}; it was not written by dynatrack or is damaged")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _short(steps: list[int], limit: int = 12) -> str:
    return str(steps) if len(steps) <= limit else f"[{', '.join(map(str, steps[:limit]))}, ...] ({len(steps)} steps)"


def binary_rows(col: pa.ChunkedArray | pa.Array, nbytes: int) -> np.ndarray:
    """A ``binary`` column of fixed-size rows as a uint8 ``[n, nbytes]`` view (no copy when contiguous)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, nbytes), dtype=np.uint8)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    # the writer stores every row of a layer at ceil(width / 8) bytes; the total length is
    # checked (an O(1) guard against a wrong width), not each row
    if offsets[-1] - offsets[0] != nbytes * len(arr):
        raise RunError(f"pattern rows do not hold {nbytes} bytes each (expected layer width)")
    data = np.frombuffer(bufs[2], dtype=np.uint8)
    return data[offsets[0] : offsets[0] + nbytes * len(arr)].reshape(len(arr), nbytes)


def bits_matrix(table: pa.Table, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Turn ``sample_id``/``bits`` columns into numpy arrays sorted by sample id."""
    ids = table.column("sample_id").to_numpy().astype(np.int64, copy=False)
    bits = binary_rows(table.column("bits"), (width + 7) // 8)
    order = np.argsort(ids, kind="stable")
    return ids[order], bits[order]
