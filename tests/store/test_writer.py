"""The background writer: atomic shards, no overwrite, numbering, failure surfacing."""

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dynatrack.store.fs import RunLocation, validate_run_name
from dynatrack.store.schema import STEPS, parse_part_name
from dynatrack.store.writer import ShardWriter, WriterError


def steps_table(steps):  # noqa: ANN001, ANN201
    n = len(steps)
    return pa.table({"step": steps, "epoch": [0] * n, "loss": [1.0] * n, "lr": [0.1] * n, "batch_size": [4] * n,
                     "grad_norm": [0.5] * n, "wall_time": [0.0] * n}, schema=STEPS)


def test_rows_split_into_files_and_read_back_in_order(tmp_path):
    loc = RunLocation.create(tmp_path, "w")
    w = ShardWriter(loc, rank=3, attempt=0, rows_per_file=10)
    for i in range(25):
        w.submit(lambda i=i: {"steps": steps_table([i])})
    w.close()
    files = loc.list_files("steps")
    assert [f.path.rsplit("/", 2)[-2] for f in files] == ["rank=3"] * 3
    got = pa.concat_tables([pq.read_table(f.path) for f in files]).column("step").to_pylist()
    assert got == list(range(25))
    assert [parse_part_name(f.base_name) for f in files] == [(0, 0), (0, 1), (0, 2)]
    # a second writer of the same attempt continues numbering, never reuses a name
    w2 = ShardWriter(loc, rank=3, attempt=0)
    w2.submit(lambda: {"steps": steps_table([99])})
    w2.close()
    assert parse_part_name(loc.list_files("steps")[-1].base_name) == (0, 3)


def test_no_temp_files_visible_and_files_atomic(tmp_path):
    loc = RunLocation.create(tmp_path, "w")
    w = ShardWriter(loc, rank=0, attempt=0, rows_per_file=1)
    for i in range(5):
        w.submit(lambda i=i: {"steps": steps_table([i])})
    w.flush()
    names = [p.name for p in (tmp_path / "w" / "steps" / "rank=0").iterdir()]
    assert all(n.startswith("part-") and n.endswith(".parquet") for n in names) and len(names) == 5
    w.close()


def test_failure_in_job_is_raised_in_producer(tmp_path):
    loc = RunLocation.create(tmp_path, "w")
    w = ShardWriter(loc, rank=0, attempt=0)

    def boom():  # noqa: ANN202
        raise OSError("disk full")

    w.submit(boom)
    with pytest.raises(WriterError, match="disk full"):
        w.flush()
    with pytest.raises(WriterError):
        w.submit(lambda: None)


def test_bounded_queue_applies_back_pressure(tmp_path):
    loc = RunLocation.create(tmp_path, "w")
    gate = threading.Event()
    w = ShardWriter(loc, rank=0, attempt=0, max_queue=2)
    w.submit(lambda: (gate.wait(), None)[1])
    w.submit(lambda: None)
    w.submit(lambda: None)  # queue now full (the first job is running)
    blocked = threading.Thread(target=w.submit, args=(lambda: None,))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive(), "a full queue must block the producer"
    gate.set()
    blocked.join(5)
    assert not blocked.is_alive()
    w.close()


def test_checkpoint_never_overwritten(tmp_path):
    import torch

    loc = RunLocation.create(tmp_path, "w")
    w = ShardWriter(loc, rank=0, attempt=0)
    w.save_checkpoint(5, {"a": torch.ones(2)})
    w.save_checkpoint(5, {"a": torch.zeros(2)})
    w.close()
    state = torch.load(tmp_path / "w" / "checkpoints" / "step=5.pt", weights_only=True)
    np.testing.assert_array_equal(state["a"].numpy(), [1, 1])


def test_run_name_validation_accepts_reasonable_names():
    for ok in ["run-1", "2026.11.28_a", "A"]:
        assert validate_run_name(ok) == ok


def test_patterns_table_from_chunks_equals_a_naive_build():
    from dynatrack.store.rows import PatternChunk, patterns_table

    rng = np.random.default_rng(0)
    chunks = [PatternChunk(s, layer, split, src, rng.integers(0, 100, n), rng.integers(0, 256, (n, b), dtype=np.uint8))
              for s, layer, split, src, n, b in [(0, "a", "train", "probe", 5, 2), (0, "b", "test", "probe", 3, 4),
                                                  (1, "a", "train", "batch", 0, 2), (2, "b", "train", "batch", 7, 4)]]
    # a batch-source chunk of several steps: one step per row
    chunks.append(PatternChunk(np.array([5, 5, 6, 7]), "a", "train", "batch", np.arange(4),
                               rng.integers(0, 256, (4, 2), dtype=np.uint8)))
    naive = [(int(c.step if np.isscalar(c.step) else c.step[k]), c.layer, int(i), c.split, c.source, bytes(row),
              sum(bin(x).count("1") for x in row))
             for c in chunks for k, (i, row) in enumerate(zip(c.sample_ids, c.bits))]
    for dictionary in (False, True):  # the writer's build keeps layer/split/source dictionary-encoded
        t = patterns_table(chunks, dictionary=dictionary)
        assert list(zip(*(t.column(k).to_pylist() for k in t.column_names))) == naive


def test_pattern_shards_read_back_with_the_schema_v1_types(tmp_path):
    # the writer hands Parquet dictionary-encoded strings and keeps no Arrow schema in the file:
    # pyarrow (no schema given) and DuckDB must still see plain strings, with the same values
    import duckdb

    from dynatrack.store.rows import PatternChunk
    from dynatrack.store.schema import PATTERNS

    loc = RunLocation.create(tmp_path, "w")
    w = ShardWriter(loc, rank=0, attempt=0)
    rng = np.random.default_rng(1)
    chunks = [PatternChunk(np.array([0, 0, 1]), "fc.1", "train", "batch", np.array([4, 5, 6]),
                           rng.integers(0, 256, (3, 2), dtype=np.uint8)),
              PatternChunk(2, "fc.3", "test", "probe", np.array([7]), rng.integers(0, 256, (1, 2), dtype=np.uint8))]
    w.submit(lambda: {"patterns": chunks})
    w.close()
    (f,) = loc.list_files("patterns")
    t = pq.read_table(f.path)
    assert t.schema.equals(PATTERNS, check_metadata=False)
    rows = duckdb.sql(f"SELECT step, layer, sample_id, split, source, typeof(layer) FROM '{f.path}' ORDER BY sample_id").fetchall()
    assert rows == [(0, "fc.1", 4, "train", "batch", "VARCHAR"), (0, "fc.1", 5, "train", "batch", "VARCHAR"),
                    (1, "fc.1", 6, "train", "batch", "VARCHAR"), (2, "fc.3", 7, "test", "probe", "VARCHAR")]
