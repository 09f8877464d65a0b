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
only the latest attempt's rows for such steps.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from dynatrack.analysis.partitions import partition_labels
from dynatrack.store.fs import RunLocation, StoreError
from dynatrack.store.manifest import read_manifest
from dynatrack.store.schema import (
    ANALYSIS,
    CHECKPOINTS,
    PROBE_DIR,
    TABLES,
    parse_checkpoint_name,
    parse_part_name,
    with_dictionary_strings,
)

RunError = StoreError


@dataclass(frozen=True)
class ShardFile:
    kind: str
    rank: int
    attempt: int
    seq: int
    path: str
    size: int


def open_run(run_dir: str | os.PathLike) -> "Run":
    """Open a run directory written by :class:`dynatrack.PatternRecorder`.

    Raises :class:`RunError` if it does not exist, is not a dynatrack run, or
    uses a newer schema version than this code reads.
    """
    return Run(RunLocation.from_run_dir(run_dir))


class Run:
    """A recorded run: manifest, shard files, tables and checkpoints."""

    def __init__(self, loc: RunLocation) -> None:
        self.loc = loc
        self.manifest: dict[str, Any] = read_manifest(loc)

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
        for info in self.loc.list_files(kind):
            parsed = parse_part_name(info.base_name)
            rank_dir = info.path.rsplit("/", 2)[-2]
            if parsed is None or not rank_dir.startswith("rank="):
                continue
            out.append(ShardFile(kind, int(rank_dir[5:]), parsed[0], parsed[1], info.path, info.size))
        return out

    @property
    def ranks(self) -> list[int]:
        return sorted({f.rank for kind in TABLES for f in self.files(kind)})

    def _cutoffs(self) -> dict[int, float]:
        """Per attempt, the first step that a later attempt recorded again."""
        attempts = sorted(self.manifest.get("attempts", [{"attempt": 0, "start_step": 0}]), key=lambda a: a["attempt"])
        cut: dict[int, float] = {}
        for i, a in enumerate(attempts):
            later = [b["start_step"] for b in attempts[i + 1 :]]
            cut[a["attempt"]] = min(later) if later else float("inf")
        return cut

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
        cutoffs = self._cutoffs()
        groups: dict[tuple[int, int], list[str]] = defaultdict(list)
        for f in files:
            groups[(f.attempt, f.rank)].append(f.path)
        parts = []
        for (attempt, rank), paths in sorted(groups.items()):
            expr = filter
            cut = cutoffs.get(attempt, float("inf"))
            if cut != float("inf"):
                keep = ds.field("step") < int(cut)
                expr = keep if expr is None else (expr & keep)
            dataset = ds.dataset(paths, schema=schema, format=fmt, filesystem=self.loc.fs)
            t = dataset.to_table(filter=expr, columns=columns)
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
            with self.loc.fs.open_input_file(f.path) as fh:
                md = pq.ParquetFile(fh).metadata
            idx = md.schema.to_arrow_schema().get_field_index(column)
            if idx < 0:
                return False
            for i in range(md.num_row_groups):
                st = md.row_group(i).column(idx).statistics
                if st is None or not st.has_min_max or st.null_count or st.min != value or st.max != value:
                    return False
        return True

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
            raise KeyError(f"layer {layer!r} was not recorded; recorded layers: {list(self.widths)}")
        t = self.patterns(step=step, layer=layer, split=split, source=source, columns=["sample_id", "bits"])
        return bits_matrix(t, self.widths[layer])

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

        with self.loc.fs.open_input_stream(self.checkpoint_path(step)) as f:
            data = f.read()
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def probe_inputs(self, split: str = "train") -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(sample_ids, labels or None, inputs float32[n, *input_shape])`` of a probe split."""
        import pyarrow.parquet as pq

        rel = f"{PROBE_DIR}/{split}.parquet"
        if not self.loc.exists(rel):
            raise RunError(f"run {self.path!r} stores no probe split {split!r}; splits: "
                           f"{sorted((self.manifest.get('probe') or {}).get('splits', {}))}")
        with self.loc.fs.open_input_file(self.loc.join(rel)) as f:
            t = pq.read_table(f)
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
        tables = {}
        for kind in TABLES:
            files = self.files(kind)
            rows = 0
            for f in files:
                with self.loc.fs.open_input_file(f.path) as fh:
                    import pyarrow.parquet as pq

                    rows += pq.ParquetFile(fh).metadata.num_rows
            tables[kind] = {"files": len(files), "rows": rows, "bytes": sum(f.size for f in files)}
        pattern_steps = self.recorded_steps("patterns")
        ckpts = self.checkpoint_steps()
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
            "tables": tables,
            "checkpoint_bytes": ckpt_bytes,
            "probe_bytes": sum(i.size for i in self.loc.list_files(PROBE_DIR)),
            "analysis_bytes": sum(i.size for i in self.loc.list_files(ANALYSIS)),
            "total_bytes": sum(i.size for i in self.loc.list_files("")),
        }


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
