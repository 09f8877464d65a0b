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

from dynatrack.store.schema import PATTERNS, STEPS

POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int32)


@dataclass(frozen=True)
class PatternChunk:
    """Rows of one (step, layer, split, source): sample ids and packed bits ``uint8[n, b]``."""

    step: int
    layer: str
    split: str
    source: str
    sample_ids: np.ndarray
    bits: np.ndarray

    def __len__(self) -> int:
        return len(self.sample_ids)


def _dict_column(values: list[str], counts: list[int]) -> pa.Array:
    labels = sorted(set(values))
    code = {v: i for i, v in enumerate(labels)}
    indices = np.repeat(np.array([code[v] for v in values], dtype=np.int32), counts)
    return pa.DictionaryArray.from_arrays(indices, pa.array(labels, pa.string())).cast(pa.string())


def patterns_table(chunks: list[PatternChunk]) -> pa.Table:
    """One ``patterns`` table (schema v1) from many chunks, without a per-row loop."""
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
    n_active = np.add.reduceat(POPCOUNT[data], offsets[:-1]).astype(np.int32) if n else np.zeros(0, np.int32)
    return pa.table(
        {
            "step": np.repeat(np.array([c.step for c in chunks], dtype=np.int64), counts),
            "layer": _dict_column([c.layer for c in chunks], counts),
            "sample_id": np.concatenate([np.asarray(c.sample_ids, dtype=np.int64) for c in chunks]) if chunks else np.zeros(0, np.int64),
            "split": _dict_column([c.split for c in chunks], counts),
            "source": _dict_column([c.source for c in chunks], counts),
            "bits": bits,
            "n_active": n_active,
        },
        schema=PATTERNS,
    )


def steps_table(rows: list[dict[str, Any]]) -> pa.Table:
    """One ``steps`` table from row dicts."""
    return pa.table({name: [r[name] for r in rows] for name in STEPS.names}, schema=STEPS)


def build(kind: str, items: list[Any]) -> pa.Table:
    """Concatenate the buffered items of one table: Arrow tables, chunks or row dicts."""
    tables = [i for i in items if isinstance(i, pa.Table)]
    chunks = [i for i in items if isinstance(i, PatternChunk)]
    rows = [i for i in items if isinstance(i, dict)]
    if chunks:
        tables.append(patterns_table(chunks))
    if rows:
        tables.append(steps_table(rows))
    out = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return out.sort_by("step") if len(tables) > 1 else out


def item_rows(item: Any) -> int:
    return item.num_rows if isinstance(item, pa.Table) else (len(item) if isinstance(item, PatternChunk) else 1)
