"""Commit records, incomplete steps, superseded rows and the documented glob (the real writer, no Lightning)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
from store_helpers import (
    IDS,
    add_attempt,
    bits_of,
    commit_doc,
    glob_rows,
    make_run,
    raw_rows,
    run_rows,
    write_steps,
)

from dynatrack.store import open_run
from dynatrack.store.commits import Commit, write_commit
from dynatrack.store.reader import IncompleteStepsWarning


def test_steps_not_committed_on_every_rank_are_left_out_and_named(tmp_path):
    loc = make_run(tmp_path)
    write_steps(loc, 0, range(6))  # rank 0 ended cleanly
    write_steps(loc, 1, range(5))  # rank 1 wrote steps 0..4 ...
    write_commit(loc, Commit(1, 0, 3, False))  # ... and died after writing step 4's shard, before committing it
    raw = raw_rows(loc.path)
    # independent reference: the rows on disk per step and rank
    on_disk = {(s, r) for s, r in zip(raw.column("step").to_pylist(), raw.column("rank").to_pylist())}
    assert {(4, 1), (5, 0)} <= on_disk and (5, 1) not in on_disk
    with pytest.warns(IncompleteStepsWarning, match=r"steps 4 \(not on rank 1\), 5 \(not on rank 1\)"):
        run = open_run(loc.path)
        assert run.recorded_steps() == [0, 1, 2, 3]
    assert sorted(set(run.steps().column("step").to_pylist())) == [0, 1, 2, 3]
    merged = run.neurons(merged=True).to_pandas()
    assert sorted(merged.step.unique()) == [0, 1, 2, 3]
    assert (merged.n_samples == 20).all(), "merged neuron counts must cover both ranks' probe samples"
    assert run.incomplete_steps() == {4: [1], 5: [1]}
    full = open_run(loc.path, include_incomplete=True)
    assert full.patterns().num_rows == raw.num_rows
    s = full.summary()
    assert s["incomplete_steps"] == [4, 5] and s["incomplete_by_rank"] == {0: [], 1: [4, 5]}
    assert s["commits"][1][0]["through"] == 3 and s["commits"][0][0]["closed"]


def test_inspect_shows_the_incomplete_steps_per_rank(tmp_path, capsys):
    import json

    from dynatrack.cli import main

    loc = make_run(tmp_path)
    write_steps(loc, 0, range(6))
    write_steps(loc, 1, range(5))
    write_commit(loc, Commit(1, 0, 3, False))
    assert main(["inspect", "--json", loc.path]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["incomplete_steps"] == [4, 5] and doc["incomplete_by_rank"] == {"0": [], "1": [4, 5]}
    assert doc["pattern_steps"] == [0, 1, 2, 3]
    assert main(["inspect", loc.path]) == 0
    out = capsys.readouterr()
    lines = [ln for ln in out.out.splitlines() if "through step 3" in ln]
    assert len(lines) == 1 and "4, 5" in lines[0] and "IncompleteStepsWarning" not in out.err


def test_a_rank_that_never_committed_makes_every_step_incomplete(tmp_path):
    loc = make_run(tmp_path)
    write_steps(loc, 0, range(3))
    with pytest.warns(IncompleteStepsWarning):
        run = open_run(loc.path)
        assert run.patterns().num_rows == 0
    assert run.incomplete_steps() == {0: [1], 1: [1], 2: [1]}


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {helpers!r})
    from store_helpers import make_run, step_job
    from dynatrack.store.writer import ShardWriter
    loc = make_run({root!r}, world=1)
    w = ShardWriter(loc, rank=0, attempt=0, max_buffer_steps={bound}, max_buffer_seconds=3600)
    for s in range({n}):
        w.submit(step_job(s, 0))
    time.sleep(2.0)  # the writer thread takes the jobs; no flush, no close
    print("ready", flush=True)
    time.sleep(600)
""")


def test_a_killed_writer_loses_at_most_the_bound_and_no_committed_row(tmp_path):
    bound, n = 4, 23
    code = CHILD.format(helpers=str(Path(__file__).parent), root=str(tmp_path), bound=bound, n=n)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    run_dir = tmp_path / "r"
    through = commit_doc(run_dir, 0)["through"]
    assert through >= n - 1 - bound - 1, f"a crash lost more than {bound} + 1 steps (committed through {through})"
    raw = raw_rows(run_dir)
    for step in range(through + 1):  # every committed row is on disk, exactly once
        got = raw.filter(pc.equal(raw.column("step"), step))
        assert sorted(got.column("sample_id").to_pylist()) == IDS.tolist(), step
        assert got.column("bits").to_pylist() == [bytes(b) for b in bits_of(step, 0, 0)]
    assert not list(run_dir.rglob("*.tmp"))
    # resume: a new attempt records the steps after the commit again; then exactly one row per key
    loc = open_run(run_dir).loc
    attempt = add_attempt(loc, through + 1)
    write_steps(loc, 0, range(through + 1, n), attempt=attempt)
    run = open_run(run_dir)
    t = run.patterns().to_pandas()
    assert (t.groupby(["step", "sample_id"]).size() == 1).all()
    assert sorted(t.step.unique()) == list(range(n))
    assert run.incomplete_steps() == {}
    rows = glob_rows(run_dir)
    assert rows["duckdb"] == rows["polars"] == rows["pyarrow"] == run_rows(run)


def test_resume_moves_superseded_rows_out_of_the_glob_and_deletes_none(tmp_path):
    loc = make_run(tmp_path, world=2)
    for rank in (0, 1):
        write_steps(loc, rank, range(10), rows_per_file=25)  # several shards per rank, steps straddling them
    everything_before = sorted(map(repr, raw_rows(loc.path).to_pylist()))
    attempt = add_attempt(loc, 6)
    for rank in (0, 1):
        write_steps(loc, rank, range(6, 12), attempt=attempt)
    run = open_run(loc.path)
    t = run.patterns().to_pandas()
    assert (t.groupby(["step", "sample_id"]).size() == 1).all() and sorted(t.step.unique()) == list(range(12))
    # the kept rows of steps 6.. are the resumed attempt's
    for step in (6, 9, 11):
        ids, bits = run.pattern_bits(step, "fc")
        np.testing.assert_array_equal(bits[:10], bits_of(step, 0, attempt))
    rows = glob_rows(loc.path)
    assert rows["duckdb"] == rows["polars"] == rows["pyarrow"] == run_rows(run)
    # DuckDB as the README writes it: the same distinct-pattern counts as open_run
    import duckdb

    sql = duckdb.sql(f"SELECT step, COUNT(*), COUNT(DISTINCT bits) FROM read_parquet('{loc.path}/patterns/*/*.parquet', "
                     "hive_partitioning = true) GROUP BY step ORDER BY step").fetchall()
    ref = t.groupby("step").agg(n=("bits", "size"), d=("bits", "nunique")).reset_index()
    assert sql == [tuple(map(int, r)) for r in ref[["step", "n", "d"]].values]
    # nothing deleted: every row of the first attempt is in patterns/ or superseded/
    sup = ds.dataset(str(Path(loc.path, "superseded", "patterns")), format="parquet", partitioning="hive")
    assert sup.count_rows() == 2 * 4 * len(IDS)  # steps 6..9 of attempt 0 on both ranks
    first = [r for r in raw_rows(loc.path).to_pylist() if r["attempt"] == 0]
    moved = sup.to_table().to_pylist()
    for r in moved:
        r["rank"] = int(r["rank"])
        r["attempt"] = 0
    assert sorted(map(repr, first + moved)) == everything_before


def test_a_crash_in_the_middle_of_the_move_is_read_the_same_and_finished_later(tmp_path):
    loc = make_run(tmp_path, world=1)
    write_steps(loc, 0, range(8))
    shard = sorted(Path(loc.path, "patterns", "rank=0").glob("*.parquet"))[0]
    original = shard.read_bytes()
    attempt = add_attempt(loc, 4)
    write_steps(loc, 0, range(4, 8), attempt=attempt)
    expected = run_rows(open_run(loc.path))
    # the state a crash between "superseded copy written" and "shard replaced" leaves
    shard.write_bytes(original)
    assert run_rows(open_run(loc.path)) == expected
    assert len(glob_rows(loc.path)["duckdb"]) > len(expected)
    # the next attempt's close finishes the move; the superseded copy is not duplicated
    attempt = add_attempt(loc, 8)
    write_steps(loc, 0, range(8, 9), attempt=attempt)
    run = open_run(loc.path)
    rows = glob_rows(loc.path)
    assert rows["duckdb"] == rows["polars"] == rows["pyarrow"] == run_rows(run)
    assert ds.dataset(str(Path(loc.path, "superseded", "patterns")), format="parquet").count_rows() == 4 * len(IDS)


def test_writer_commits_after_its_bound_of_steps(tmp_path):
    loc = make_run(tmp_path, world=1)
    w = write_steps(loc, 0, range(9), close=False, max_buffer_steps=3)
    assert commit_doc(loc.path, 0)["through"] == 8 and not commit_doc(loc.path, 0)["closed"]  # flush covers all
    w.close()
    assert commit_doc(loc.path, 0)["closed"]
    files = sorted(Path(loc.path, "patterns", "rank=0").glob("*.parquet"))
    assert len(files) >= 3, "max_buffer_steps=3 writes a shard at least every 3 recorded steps"
    shutil.rmtree(Path(loc.path, "commits"))
    with pytest.warns(IncompleteStepsWarning):  # a run without records: nothing is vouched for
        assert open_run(loc.path).patterns().num_rows == 0
