"""Damaged, hostile or racing inputs: one clear error naming the file, never wrong rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from store_helpers import make_run, raw_rows, write_steps

from dynatrack.cli import main
from dynatrack.store import open_run
from dynatrack.store.fs import RunLocation, StoreError, temp_name
from dynatrack.store.reader import NotRecordedError
from dynatrack.store.writer import ShardWriter


def cli_error(capsys, *argv: str) -> str:  # noqa: ANN001
    """Run the CLI; it must exit 2 with exactly one line on stderr (no traceback)."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("doc, says", [
    ("[1, 2]", "expected a JSON object, got a list"),
    ('"run"', "expected a JSON object, got a str"),
    ('{"schema_version": 1, "run_id": "r"}', "lacks the keys ['world_size', 'layers']"),
    ('{"schema_version": 1, "run_id": "r", "world_size": 2, "layers": [{"name": "fc"}]}', "entry of 'layers'"),
    ('{"schema_version": 1, "run_id": "r", "world_size": "2", "layers": []}', "'world_size' must be a int"),
])
def test_a_manifest_of_the_wrong_shape_is_a_one_line_error(tmp_path, capsys, doc, says):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(doc)
    with pytest.raises(StoreError, match="manifest.json"):
        open_run(run_dir)
    line = cli_error(capsys, "inspect", str(run_dir))
    assert str(run_dir / "manifest.json") in line and says in line
    # analyze says the same before any Ray starts (no new local Ray session for a run it cannot read)
    before = _latest_ray_session()
    line = cli_error(capsys, "analyze", str(run_dir), "--num-cpus", "1", "--wandb", "disabled")
    assert str(run_dir / "manifest.json") in line and says in line
    assert _latest_ray_session() == before


def _latest_ray_session() -> str | None:
    latest = Path("/tmp/ray/session_latest")
    return str(latest.resolve()) if latest.exists() else None


def _first_shard(run_dir: Path, kind: str = "patterns") -> Path:
    return sorted((run_dir / kind / "rank=0").glob("part-*.parquet"))[0]


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage-middle"])
def test_a_damaged_shard_is_named_in_open_run_and_inspect(tmp_path, capsys, damage):
    loc = make_run(tmp_path, world=1)
    write_steps(loc, 0, range(40), rows_per_file=10_000)
    shard = _first_shard(Path(loc.path))
    data = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        shard.write_bytes(b"")
    else:  # footer intact, column data overwritten
        mid = len(data) // 3
        shard.write_bytes(data[:mid] + bytes(range(256)) * 8 + data[mid + 2048 :])
    with pytest.raises(StoreError, match=str(shard)):
        open_run(loc.path).patterns()
    if damage != "garbage-middle":  # inspect reads footers only
        assert str(shard) in cli_error(capsys, "inspect", loc.path)


def _rewrite(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


def test_a_shard_missing_a_column_or_with_a_wrong_type_is_named(tmp_path, capsys):
    loc = make_run(tmp_path, world=1)
    write_steps(loc, 0, range(3))
    shard = _first_shard(Path(loc.path))
    t = pq.read_table(shard)
    _rewrite(shard, t.drop_columns(["n_active"]))
    with pytest.raises(StoreError, match=rf"{shard}.*lacks the column 'n_active'"):
        open_run(loc.path).patterns()
    assert "lacks the column 'n_active'" in cli_error(capsys, "inspect", loc.path)
    _rewrite(shard, t.set_column(t.schema.get_field_index("sample_id"), "sample_id",
                                 t.column("sample_id").cast(pa.string())))
    with pytest.raises(StoreError, match=rf"{shard}: column 'sample_id' is string"):
        open_run(loc.path).patterns()


def test_a_symlink_loop_under_patterns_is_refused_not_followed(tmp_path, capsys):
    loc = make_run(tmp_path, world=1)
    write_steps(loc, 0, range(3))
    rows = open_run(loc.path).patterns().num_rows
    link = Path(loc.path, "patterns", "rank=0", "loop")
    link.symlink_to("..")
    with pytest.raises(StoreError, match=rf"{link} is a symbolic link"):
        open_run(loc.path).patterns()
    assert str(link) in cli_error(capsys, "inspect", loc.path)
    link.unlink()
    assert open_run(loc.path).patterns().num_rows == rows == 30


def test_a_corrupt_checkpoint_is_named(tmp_path, capsys):
    loc = make_run(tmp_path, world=1)
    w = ShardWriter(loc, rank=0, attempt=0)
    w.save_checkpoint(0, {"w": torch.ones(3)})
    w.close()
    ckpt = Path(loc.path, "checkpoints", "step=0.pt")
    assert open_run(loc.path).checkpoint(0)["w"].tolist() == [1.0, 1.0, 1.0]
    ckpt.write_bytes(ckpt.read_bytes()[:40])
    with pytest.raises(StoreError, match=rf"checkpoint {ckpt}"):
        open_run(loc.path).checkpoint(0)
    assert str(ckpt) in cli_error(capsys, "inspect", loc.path)


def test_pattern_bits_of_something_not_recorded_says_what_exists(tmp_path):
    loc = make_run(tmp_path, world=1)
    write_steps(loc, 0, [0, 2, 4])
    run = open_run(loc.path)
    assert run.pattern_bits(2, "fc")[0].tolist() == list(range(10))
    with pytest.raises(NotRecordedError, match=r"at step 3; recorded steps: \[0, 2, 4\]"):
        run.pattern_bits(3, "fc")
    with pytest.raises(NotRecordedError, match=r"no split 'test'.*splits: \['train'\]"):
        run.pattern_bits(2, "fc", split="test")
    with pytest.raises(NotRecordedError, match=r"layer 'fc2' was not recorded.*\['fc'\]"):
        run.pattern_bits(2, "fc2")
    with pytest.raises(ValueError):  # the CLI's clear-error path catches ValueError
        run.pattern_bits(2, "fc", source="batch")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_of_dead_processes_on_this_host_are_removed_at_the_next_open(tmp_path):
    loc = make_run(tmp_path, world=1)
    host = temp_name("x").split(".")[2]
    rank_dir = Path(loc.path, "patterns", "rank=0")
    rank_dir.mkdir(parents=True)
    dead, alive = _dead_pid(), os.getppid()
    stale = rank_dir / f".part-000-000000.parquet.{host}.{dead}.0123abcd.tmp"
    live = rank_dir / f".part-000-000001.parquet.{host}.{alive}.0123abcd.tmp"
    other_host = rank_dir / f".part-000-000002.parquet.otherhost.{dead}.0123abcd.tmp"
    not_ours = rank_dir / ".notes.tmp"
    for p in (stale, live, other_host, not_ours):
        p.write_bytes(b"x")
    root_test = tmp_path / f".dynatrack-write-test-{host}.{dead}.0123abcd"
    root_test.write_bytes(b"ok")
    write_steps(loc, 0, range(2))
    assert not stale.exists() and live.exists() and other_host.exists() and not_ours.exists()
    RunLocation.create(tmp_path, "another").check_writable()
    assert not root_test.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dynatrack-write-test-")]


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    loc = make_run(tmp_path, world=1)
    with pytest.raises(TypeError):  # fails after the temporary file was opened
        loc.write_bytes_atomic("probe/train.parquet", 12345)  # type: ignore[arg-type]
    assert list(Path(loc.path, "probe").iterdir()) == []


def test_racing_creations_of_one_file_have_exactly_one_winner(tmp_path):
    loc = RunLocation.create(tmp_path, "race")
    loc.mkdir()
    for round_ in range(30):
        rel = f"probe/train-{round_}.parquet"
        barrier = threading.Barrier(6)
        results: dict[int, bool] = {}

        def create(i: int) -> None:
            barrier.wait()
            results[i] = loc.write_bytes_atomic(rel, f"fit {i}".encode() * 1000)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, ok in results.items() if ok]
        assert len(winners) == 1, f"round {round_}: {winners} all believe they created {rel}"
        assert loc.read_bytes(rel) == f"fit {winners[0]}".encode() * 1000


def test_commit_records_are_plain_json_outside_the_table_globs(tmp_path):
    loc = make_run(tmp_path, world=1)
    write_steps(loc, 0, range(3))
    doc = json.loads(Path(loc.path, "commits", "rank=0", "attempt-000.json").read_text())
    assert doc == {"rank": 0, "attempt": 0, "through": 2, "closed": True,
                   "rows": {"patterns": 30, "neurons": 36, "steps": 3}}
    assert raw_rows(loc.path).num_rows == 30


def test_links_outside_the_tables_are_skipped_not_followed(tmp_path, capsys):
    loc = make_run(tmp_path, world=1)
    write_steps(loc, 0, range(3))
    before = open_run(loc.path).summary()["total_bytes"]
    wandb = Path(loc.path, "analysis", "wandb")
    wandb.mkdir(parents=True)
    (wandb / "latest-run").symlink_to("..")  # as W&B makes them: a loop back to the run directory
    assert main(["inspect", "--json", loc.path]) == 0
    assert json.loads(capsys.readouterr().out)["total_bytes"] == before


def test_a_damaged_commit_record_is_named(tmp_path, capsys):
    loc = make_run(tmp_path, world=1)
    write_steps(loc, 0, range(2))
    record = Path(loc.path, "commits", "rank=0", "attempt-000.json")
    record.write_text('{"rank": 0, "attempt": 0')
    with pytest.raises(StoreError, match=rf"commit record {record} is damaged"):
        open_run(loc.path)
    assert str(record) in cli_error(capsys, "inspect", loc.path)

