"""Row chunks buffered by the writer and turned into Arrow tables once per shard.

Building an Arrow table costs tens of microseconds of Python whatever its size;
doing it per recorded step on the writer thread would hold the GIL against the
training step. The recorder therefore hands over plain numpy chunks, and the
writer builds one table per shard here, vectorised.

>>> import numpy as np
>>> chunk = PatternChunk(3, "fc.1", "train", "batch", np.array([7, 9]), np.array([[1], [255]], np.uint8))
>>> patterns_table([chunk]).column("n_active").to_pylist()
[1, 8]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from dynatrack.analysis.patterns import popcount
from dynatrack.store.schema import NEURONS, PATTERNS, STEPS, with_dictionary_strings


@dataclass(frozen=True)
class PatternChunk:
    """Rows of one (layer, split, source): sample ids and packed bits ``uint8[n, b]``.

    ``step`` is one step for all rows, or an int64 array with each row's step (the
    batch source hands over several steps of a layer as one chunk).
    """

    step: int | np.ndarray
    layer: str
    split: str
    source: str
    sample_ids: np.ndarray
    bits: np.ndarray

    def __len__(self) -> int:
        return len(self.sample_ids)


def _dict_column(values: list[str], counts: list[int], dictionary: bool = False) -> pa.Array:
    labels = sorted(set(values))
    code = {v: i for i, v in enumerate(labels)}
    indices = np.repeat(np.array([code[v] for v in values], dtype=np.int32), counts)
    out = pa.DictionaryArray.from_arrays(indices, pa.array(labels, pa.string()))
    return out if dictionary else out.cast(pa.string())


def _step_column(chunks: list[Any], counts: list[int]) -> np.ndarray:
    if all(isinstance(c.step, (int, np.integer)) for c in chunks):
        return np.repeat(np.array([c.step for c in chunks], dtype=np.int64), counts)
    return np.concatenate([
        np.full(n, c.step, np.int64) if isinstance(c.step, (int, np.integer)) else np.asarray(c.step, np.int64)
        for c, n in zip(chunks, counts)
    ])


def patterns_table(chunks: list[PatternChunk], *, dictionary: bool = False) -> pa.Table:
    """One ``patterns`` table (schema v1) from many chunks, without a per-row loop.

    ``dictionary=True`` leaves the string columns (layer, split, source) dictionary-encoded,
    as the writer hands them to Parquet (which stores strings so anyway): casting a
    shard's million rows to plain strings first costs more than writing them.
    """
    counts = [len(c) for c in chunks]
    widths = np.repeat(np.array([c.bits.shape[1] for c in chunks], dtype=np.int64), counts)
    offsets = np.zeros(len(widths) + 1, dtype=np.int64)
    np.cumsum(widths, out=offsets[1:])
    data = np.concatenate([np.ascontiguousarray(c.bits).reshape(-1) for c in chunks]) if chunks else np.zeros(0, np.uint8)
    n = int(sum(counts))
    if offsets[-1] < 2**31:
        bits = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)])
    else:
        bits = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)]).cast(pa.binary())
    # per chunk: one np.add.reduceat over a shard's million short rows cost 0.34 s per 576k rows
    n_active = np.concatenate([popcount(c.bits) for c in chunks]) if n else np.zeros(0, np.int32)
    return pa.table(
        {
            "step": _step_column(chunks, counts),
            "layer": _dict_column([c.layer for c in chunks], counts, dictionary),
            "sample_id": np.concatenate([np.asarray(c.sample_ids, dtype=np.int64) for c in chunks]) if chunks else np.zeros(0, np.int64),
            "split": _dict_column([c.split for c in chunks], counts, dictionary),
            "source": _dict_column([c.source for c in chunks], counts, dictionary),
            "bits": bits,
            "n_active": n_active,
        },
        schema=with_dictionary_strings(PATTERNS) if dictionary else PATTERNS,
    )


@dataclass(frozen=True)
class NeuronChunk:
    """Neuron counts of one (step, layer, split) on this rank.

    ``by_class`` is int ``[width, C]`` (``C = 0`` without labels, then ``active`` is given);
    ``active`` may be ``None`` with labels: the sum over classes, computed when the
    table is built (on the writer thread). ``out_sign`` int8 ``[width]`` or ``None``.
    """

    step: int
    layer: str
    split: str
    active: np.ndarray | None
    by_class: np.ndarray
    n_samples: int
    out_sign: np.ndarray | None

    def __len__(self) -> int:
        return len(self.by_class)


def neurons_table(chunks: list[NeuronChunk]) -> pa.Table:
    """One ``neurons`` table (schema v1) from many chunks; partition labels computed once, vectorised."""
    from dynatrack.analysis.partitions import partition_labels

    counts = [len(c) for c in chunks]
    active = np.concatenate([np.asarray(c.active, np.int64) if c.active is not None
                             else c.by_class.sum(axis=1, dtype=np.int64) for c in chunks])
    n = np.repeat(np.array([c.n_samples for c in chunks], np.int64), counts)
    # a split without labels has ``C = 0`` (empty lists, ``partial`` labels) beside labelled splits
    ks = [c.by_class.shape[1] for c in chunks]
    n_classes = {k for k in ks if k}
    if len(n_classes) > 1:
        raise ValueError(f"neuron chunks disagree on the number of classes: {sorted(n_classes)}")
    lengths = np.repeat(np.array(ks, np.int32), counts)
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    by_class = np.concatenate([np.asarray(c.by_class, np.int32).reshape(-1) for c in chunks])
    labelled = lengths > 0
    labels = np.empty(len(active), dtype=object)
    labels[~labelled] = partition_labels(active[~labelled], n[~labelled], None)
    if n_classes:
        labels[labelled] = partition_labels(active[labelled], n[labelled], by_class.reshape(-1, n_classes.pop()))
    label_names = sorted(set(labels.tolist()))
    code = {v: i for i, v in enumerate(label_names)}
    partition = pa.DictionaryArray.from_arrays(
        np.fromiter((code[v] for v in labels), np.int32, count=len(labels)), pa.array(label_names, pa.string())
    ).cast(pa.string())
    signs = [c.out_sign if c.out_sign is not None else np.zeros(len(c), np.int8) for c in chunks]
    sign_valid = np.repeat(np.array([c.out_sign is not None for c in chunks]), counts)
    out_sign = pa.array(np.concatenate(signs).astype(np.int8), pa.int8(), mask=~sign_valid)
    return pa.table(
        {
            "step": np.repeat(np.array([c.step for c in chunks], np.int64), counts),
            "layer": _dict_column([c.layer for c in chunks], counts),
            "split": _dict_column([c.split for c in chunks], counts),
            "neuron": np.concatenate([np.arange(len(c), dtype=np.int32) for c in chunks]),
            "active": active,
            "n_samples": n,
            "active_by_class": pa.ListArray.from_arrays(offsets, pa.array(by_class, pa.int32())),
            "partition": partition,
            "out_sign": out_sign,
        },
        schema=NEURONS,
    )


def steps_table(rows: list[dict[str, Any]]) -> pa.Table:
    """One ``steps`` table from row dicts."""
    return pa.table({name: [r[name] for r in rows] for name in STEPS.names}, schema=STEPS)


def build(kind: str, items: list[Any]) -> pa.Table:
    """Concatenate the buffered items of one table: Arrow tables, chunks or row dicts.

    Pattern chunks alone give a table whose string columns are dictionary-encoded
    (see :func:`patterns_table`); the writer stores them as Parquet strings either way.
    """
    tables = [i for i in items if isinstance(i, pa.Table)]
    chunks = [i for i in items if isinstance(i, PatternChunk)]
    neuron_chunks = [i for i in items if isinstance(i, NeuronChunk)]
    rows = [i for i in items if isinstance(i, dict)]
    if chunks and len(chunks) == len(items):
        return patterns_table(chunks, dictionary=True)
    if chunks:
        tables.append(patterns_table(chunks))
    if neuron_chunks:
        tables.append(neurons_table(neuron_chunks))
    if rows:
        tables.append(steps_table(rows))
    out = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return out.sort_by("step") if len(tables) > 1 else out


def item_rows(item: Any) -> int:
    if isinstance(item, pa.Table):
        return item.num_rows
    return len(item) if isinstance(item, (PatternChunk, NeuronChunk)) else 1
