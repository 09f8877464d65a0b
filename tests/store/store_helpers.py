"""Small run directories built with the real writer (no Lightning), and independent readers of them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from dynatrack.store.fs import RunLocation
from dynatrack.store.manifest import new_manifest, read_manifest, write_manifest
from dynatrack.store.rows import NeuronChunk, PatternChunk
from dynatrack.store.writer import ShardWriter

WIDTH = 12
IDS = np.arange(10, dtype=np.int64)


def make_run(root: Path, name: str = "r", world: int = 2) -> RunLocation:
    loc = RunLocation.create(root, name)
    loc.mkdir()
    write_manifest(loc, new_manifest(run_id=name, world_size=world, layers=[{"name": "fc", "width": WIDTH}],
                                     probe={"size": 10 * world, "splits": {"train": 10 * world}, "num_classes": 0},
                                     model={"class_path": "tests.Net", "init_args": {}}, seed=0, schedules={},
                                     start_step=0), overwrite=False)
    return loc


def add_attempt(loc: RunLocation, start_step: int) -> int:
    m = read_manifest(loc)
    attempt = max(a["attempt"] for a in m["attempts"]) + 1
    m["attempts"].append({"attempt": attempt, "start_step": start_step})
    write_manifest(loc, m, overwrite=True)
    return attempt


def bits_of(step: int, rank: int, attempt: int) -> np.ndarray:
    """Deterministic, distinct per (step, rank, attempt) pattern bytes for 10 samples."""
    rng = np.random.default_rng(step * 1000 + rank * 10 + attempt)
    return rng.integers(0, 256, size=(len(IDS), (WIDTH + 7) // 8), dtype=np.uint8)


def step_job(step: int, rank: int, attempt: int = 0):  # noqa: ANN201
    """A writer job with one recorded step: 10 probe patterns, 12 neuron rows, one ``steps`` row."""
    ids = IDS + 10 * rank

    def job() -> dict:
        bits = bits_of(step, rank, attempt)
        active = np.unpackbits(bits, axis=1, count=WIDTH).sum(axis=0).astype(np.int64)
        return {"patterns": PatternChunk(step, "fc", "train", "probe", ids, bits),
                "neurons": NeuronChunk(step, "fc", "train", None, active[:, None].astype(np.int32), len(ids), None),
                "steps": {"step": step, "epoch": 0, "loss": 1.0, "lr": 0.1, "batch_size": 8, "grad_norm": 1.0,
                          "wall_time": 0.0}}

    return job


def write_steps(loc: RunLocation, rank: int, steps, attempt: int = 0, close: bool = True, **kw) -> ShardWriter:  # noqa: ANN001
    w = ShardWriter(loc, rank=rank, attempt=attempt, **kw)
    for s in steps:
        w.submit(step_job(s, rank, attempt))
    if close:
        w.close()
    else:
        w.flush()
    return w


def raw_rows(run_dir: Path, kind: str = "patterns") -> pa.Table:
    """Every row of ``<kind>/rank=*/*.parquet`` read by pyarrow alone, with the rank and file attempt (no dynatrack)."""
    parts = []
    for path in sorted(Path(run_dir, kind).glob("rank=*/part-*.parquet")):
        t = ds.dataset(str(path), format="parquet").to_table()
        rank, attempt = int(path.parent.name[5:]), int(path.name.split("-")[1])
        parts.append(t.append_column("rank", pa.array([rank] * t.num_rows, pa.int32()))
                      .append_column("attempt", pa.array([attempt] * t.num_rows, pa.int32())))
    return pa.concat_tables(parts) if parts else pa.table({})


def commit_doc(run_dir: Path, rank: int, attempt: int = 0) -> dict:
    return json.loads(Path(run_dir, "commits", f"rank={rank}", f"attempt-{attempt:03d}.json").read_text())


def glob_rows(run_dir: Path) -> dict[str, list[tuple]]:
    """The documented glob ``patterns/*/*.parquet`` (hive partitioning) read by DuckDB, Polars and pyarrow.dataset,
    as sorted (step, layer, split, source, sample_id, bits) tuples."""
    import duckdb
    import polars as pl

    pattern = f"{run_dir}/patterns/*/*.parquet"
    cols = ["step", "layer", "split", "source", "sample_id", "bits"]
    out = {}
    con = duckdb.connect()
    out["duckdb"] = sorted(con.execute(
        f"SELECT {', '.join(cols)} FROM read_parquet('{pattern}', hive_partitioning = true)").fetchall())
    con.close()
    df = pl.scan_parquet(pattern, hive_partitioning=True).select(cols).collect()
    out["polars"] = sorted(df.iter_rows())
    t = ds.dataset(f"{run_dir}/patterns", format="parquet", partitioning="hive").to_table(columns=cols)
    out["pyarrow"] = sorted(zip(*[t.column(c).to_pylist() for c in cols]))
    return out


def run_rows(run) -> list[tuple]:  # noqa: ANN001
    t = run.patterns(columns=["step", "layer", "split", "source", "sample_id", "bits"])
    cols = ["step", "layer", "split", "source", "sample_id", "bits"]
    return sorted(zip(*[t.column(c).to_pylist() for c in cols]))


def record(name: str, **figures) -> None:  # noqa: ANN003
    """Append a fault test's figures (faults, rows checked, rows lost) to $DYNATRACK_FAULT_FIGURES, when set
    (how docs/reliability.md's table was filled)."""
    path = os.environ.get("DYNATRACK_FAULT_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")
