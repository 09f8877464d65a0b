"""The run-directory schema (version 1), declared once.

Writer (:mod:`dynatrack.store.writer`), reader (:mod:`dynatrack.store.reader`)
and tests import these objects; nothing else spells out a column.

>>> from dynatrack.store.schema import PATTERNS, SCHEMA_VERSION
>>> SCHEMA_VERSION, PATTERNS.field("bits").type
(1, DataType(binary))
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

#: One row per (step, layer, sample). ``bits`` is
#: ``numpy.packbits(pre_activation > 0, bitorder="big")``: neuron j is bit
#: ``7 - j % 8`` of byte ``j // 8``; ``n_active`` is its popcount.
PATTERNS = pa.schema(
    [
        ("step", pa.int64()),
        ("layer", pa.string()),
        ("sample_id", pa.int64()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("bits", pa.binary()),
        ("n_active", pa.int32()),
    ]
)

#: One row per recorded step per rank. ``loss`` is this rank's batch loss,
#: ``batch_size`` the global batch (per-rank batch x world size).
STEPS = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.int64()),
        ("loss", pa.float64()),
        ("lr", pa.float64()),
        ("batch_size", pa.int64()),
        ("grad_norm", pa.float64()),
        ("wall_time", pa.float64()),
    ]
)

#: One row per (step, layer, split, neuron) per rank, counted over this rank's
#: probe samples. Counts only: sum ``active``, ``n_samples`` and
#: ``active_by_class`` over ranks for whole-probe figures. ``partition`` is the
#: label of :func:`dynatrack.analysis.partitions.partition_labels` on this
#: rank's counts; :meth:`Run.neurons(merged=True)` recomputes it from the sums.
#: ``out_sign`` is the sign of the neuron's outgoing weight for the last hidden
#: layer of a scalar-output model, else null.
NEURONS = pa.schema(
    [
        ("step", pa.int64()),
        ("layer", pa.string()),
        ("split", pa.string()),
        ("neuron", pa.int32()),
        ("active", pa.int64()),
        ("n_samples", pa.int64()),
        ("active_by_class", pa.list_(pa.int32())),
        ("partition", pa.string()),
        ("out_sign", pa.int8()),
    ]
)

#: The probe set itself, one file per split (``probe/<split>.parquet``), written
#: once by rank 0 so weight analyses (regions, local complexity) can run from the
#: run directory alone. ``input`` is the flattened sample; the manifest's
#: ``probe.input_shape`` restores its shape.
PROBE = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("label", pa.int64()),
        ("input", pa.list_(pa.float32())),
    ]
)

TABLES: dict[str, pa.Schema] = {"patterns": PATTERNS, "steps": STEPS, "neurons": NEURONS}


def with_dictionary_strings(schema: pa.Schema) -> pa.Schema:
    """``schema`` with its string columns as ``dictionary<int32, string>`` (as Parquet stores them).

    >>> with_dictionary_strings(STEPS) == STEPS, with_dictionary_strings(PATTERNS).field("layer").type
    (True, DictionaryType(dictionary<values=string, indices=int32, ordered=0>))
    """
    return pa.schema([pa.field(f.name, pa.dictionary(pa.int32(), f.type)) if pa.types.is_string(f.type) else f
                      for f in schema])


SOURCES = ("probe", "batch")

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
ANALYSIS = "analysis"
PROBE_DIR = "probe"
#: rows of an earlier attempt that a resumed attempt recorded again, moved out of the
#: table directories (so ``<kind>/*/*.parquet`` globs match :func:`open_run`), kept here
SUPERSEDED = "superseded"


def checkpoint_name(step: int, attempt: int | None = None) -> str:
    """File name of the weights checkpoint of ``step``: ``step=<s>.pt``.

    A resumed attempt that records a step whose checkpoint an earlier attempt
    already wrote keeps that file and writes ``step=<s>-a<attempt>.pt``.
    """
    return f"step={int(step)}.pt" if not attempt else f"step={int(step)}-a{int(attempt)}.pt"


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """``(step, attempt)`` of a checkpoint file name (attempt 0 for ``step=<s>.pt``)."""
    if not (name.startswith("step=") and name.endswith(".pt")):
        return None
    core = name[5:-3]
    step, _, attempt = core.partition("-a")
    if not step.isdigit() or (attempt and not attempt.isdigit()):
        return None
    return int(step), int(attempt or 0)


def part_name(attempt: int, seq: int) -> str:
    """Shard file name: ``part-<attempt>-<seq>.parquet``.

    ``attempt`` counts resumes of the run (0 for the first fit); a reader drops
    rows of an attempt at steps that a later attempt recorded again.
    """
    return f"part-{int(attempt):03d}-{int(seq):06d}.parquet"


def parse_part_name(name: str) -> tuple[int, int] | None:
    """Inverse of :func:`part_name`; ``None`` for anything else."""
    if not (name.startswith("part-") and name.endswith(".parquet")):
        return None
    core = name[len("part-") : -len(".parquet")]
    parts = core.split("-")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])
