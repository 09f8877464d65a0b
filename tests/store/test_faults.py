"""Faults injected into real fits: ranks SIGKILLed mid-fit and in on_fit_end (2-rank DDP), a single process
SIGKILLed, a full disk. Each checks that no committed row is lost, that no step is silently incomplete, and that
the resumed run holds exactly one row per key, read alike by open_run, DuckDB, Polars and pyarrow.dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
from store_helpers import commit_doc, glob_rows, raw_rows, record, run_rows

from dynatrack import open_run
from dynatrack.store.reader import IncompleteStepsWarning

SCRIPT = Path(__file__).parent / "scripts" / "fault_fit.py"
TRAIN, TEST = 1438, 359  # digits probe splits (DigitsDataModule, seed 0)
LAYERS = ("net.body.1", "net.body.3")


def fit(tmp_path: Path, devices: int, steps: int, kill: dict | None, resume: str | None = None) -> int:
    cfg = {"root": str(tmp_path / "runs"), "name": "f", "devices": devices, "steps": steps,
           "ckpt_dir": str(tmp_path / "ckpt"), "ckpt_every": 5 if devices > 1 else 3, "kill": kill, "resume": resume}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), json.dumps(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        _, err = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        try:  # a rank whose peer died must not linger
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if kill is None:
        assert proc.returncode == 0, err[-3000:]
    return proc.returncode


def rows_everywhere(run_dir: Path) -> Counter:
    """Every pattern row on disk, in patterns/ or superseded/, with its rank and attempt (from the file name)."""
    out: Counter = Counter()
    for base in (run_dir / "patterns", run_dir / "superseded" / "patterns"):
        for path in base.glob("rank=*/part-*.parquet"):
            t = ds.dataset(str(path), format="parquet").to_table()
            tag = (path.parent.name, path.name.split("-")[1])
            out.update(repr((tag, r)) for r in t.to_pylist())
    return out


def committed_steps(run_dir: Path, world: int, attempt: int) -> dict[int, float]:
    """Per rank, the first step its commit record (read as plain JSON) does not vouch for."""
    out = {}
    for rank in range(world):
        path = run_dir / "commits" / f"rank={rank}" / f"attempt-{attempt:03d}.json"
        doc = json.loads(path.read_text()) if path.exists() else {"through": -1, "closed": False}
        out[rank] = float("inf") if doc["closed"] else doc["through"] + 1
    return out


def check_committed_rows_on_disk(run_dir: Path, world: int, attempt: int, first: int, last: int = 30) -> int:
    """Every step a rank committed has all of that rank's rows (probe: its share of both splits, every layer;
    one steps row). Returns the rows checked."""
    raw = raw_rows(run_dir)
    raw = raw.filter(pc.equal(raw.column("attempt"), attempt))
    steps_raw = raw_rows(run_dir, "steps")
    steps_raw = steps_raw.filter(pc.equal(steps_raw.column("attempt"), attempt))
    limit = committed_steps(run_dir, world, attempt)
    checked = 0
    probe = raw.filter(pc.equal(raw.column("source"), "probe")).to_pandas()
    share = {(r, s): set(g.sample_id) for (r, s), g in probe[probe.step == first].groupby(["rank", "split"])}
    for rank in range(world):
        mine = probe[probe["rank"] == rank]
        if limit[rank] == float("inf"):  # closed: every row it recorded is on disk; it recorded up to its last row
            limit[rank] = max(steps_raw.filter(pc.equal(steps_raw.column("rank"), rank)).column("step").to_pylist()) + 1
        for step in range(first, int(min(limit[rank], last))):
            if step % 2 == 0:
                for layer in LAYERS:
                    for split in ("train", "test"):
                        got = mine[(mine.step == step) & (mine.layer == layer) & (mine.split == split)]
                        assert sorted(got.sample_id) == sorted(share[(rank, split)]), (rank, step, layer, split)
                        checked += len(got)
        srows = steps_raw.filter(pc.equal(steps_raw.column("rank"), rank)).column("step").to_pylist()
        assert set(srows) >= {s for s in range(first, int(min(limit[rank], last))) if s % 2 == 0 or s % 3 == 0}
        checked += len(srows)
    # the ranks' shares cover each split once
    for split, n in (("train", TRAIN), ("test", TEST)):
        ids = [i for r in range(world) for i in share[(r, split)]]
        assert sorted(ids) == list(range(n))
    return checked


def check_no_silent_incomplete(run_dir: Path, world: int) -> dict[int, list[int]]:
    """open_run's default tables hold only steps every rank committed, and it warns naming the others."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = open_run(run_dir)
        kept = set(run.recorded_steps())
    incomplete = run.incomplete_steps()
    raw = raw_rows(run_dir)
    on_disk = set(raw.column("step").to_pylist())
    assert kept.isdisjoint(incomplete) and kept | set(incomplete) <= on_disk
    if incomplete:
        msgs = [str(w.message) for w in caught if issubclass(w.category, IncompleteStepsWarning)]
        assert len(msgs) == 1 and f"steps {min(incomplete)} " in msgs[0]
    merged = run.neurons(merged=True).to_pandas()  # the symptom: half the probe samples per step
    assert set(merged.n_samples) <= {TRAIN, TEST}
    return incomplete


def check_resumed(run_dir: Path, steps: int) -> int:
    """Exactly one row per key, nothing incomplete, and the documented glob reads what open_run reads."""
    run = open_run(run_dir)
    assert run.incomplete_steps() == {}
    probe = run.patterns(source="probe").to_pandas()
    assert (probe.groupby(["step", "layer", "split", "sample_id"]).size() == 1).all()
    expected = sorted(set(range(0, steps + 1, 2)) | {steps})
    assert sorted(probe.step.unique()) == expected
    for (_, _, split), g in probe.groupby(["step", "layer", "split"]):
        assert sorted(g.sample_id) == list(range(TRAIN if split == "train" else TEST))
    batch = run.patterns(source="batch").to_pandas()
    assert sorted(batch.step.unique()) == list(range(0, steps, 3))
    assert (batch.groupby(["step", "layer", "rank", "sample_id"]).size() == 1).all()
    st = run.steps().to_pandas()
    assert (st.groupby(["step", "rank"]).size() == 1).all()
    rows = glob_rows(run_dir)
    mine = run_rows(run)
    assert rows["duckdb"] == rows["polars"] == rows["pyarrow"] == mine
    return len(mine)


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.soak
def test_ddp_rank_killed_mid_fit_then_in_on_fit_end_then_resumed(tmp_path):
    run_dir = tmp_path / "runs" / "f"
    # 1. rank 1 SIGKILLed at step 23 (last checkpoint: step 20); rank 0 fails on the dead peer
    assert fit(tmp_path, 2, 30, {"rank": 1, "step": 23}) != 0
    limit = committed_steps(run_dir, 2, 0)
    assert limit[1] <= 23
    checked = check_committed_rows_on_disk(run_dir, 2, 0, first=0)
    incomplete = check_no_silent_incomplete(run_dir, 2)
    assert incomplete and all(s >= limit[1] for s in incomplete)
    before = rows_everywhere(run_dir)
    # 2. resumed from step 20; rank 1 SIGKILLed in on_fit_end (its final rows never reach the writer)
    assert fit(tmp_path, 2, 30, {"rank": 1, "hook": "fit_end"}, resume=str(tmp_path / "ckpt" / "step=20.ckpt")) != 0
    assert [a["start_step"] for a in open_run(run_dir, include_incomplete=True).manifest["attempts"]] == [0, 20]
    assert commit_doc(run_dir, 0, 1)["closed"] and not commit_doc(run_dir, 1, 1)["closed"]
    checked += check_committed_rows_on_disk(run_dir, 2, 1, first=20)
    incomplete = check_no_silent_incomplete(run_dir, 2)
    assert 30 in incomplete and incomplete[30] == [1]  # the final step, recorded in on_train_end, lost on rank 1
    after = rows_everywhere(run_dir)
    assert not (before - after), "a row of the first attempt was deleted"
    before = after
    # 3. resumed from step 25 to the end: complete, one row per key, glob == open_run
    fit(tmp_path, 2, 30, None, resume=str(tmp_path / "ckpt" / "step=25.ckpt"))
    checked += check_resumed(run_dir, 30)
    lost = sum((before - rows_everywhere(run_dir)).values())
    assert lost == 0
    record("ddp_kill_mid_fit_and_fit_end", faults=2, rows_checked=checked, rows_lost=lost)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_single_process_killed_then_resumed_reads_alike_everywhere(tmp_path):
    run_dir = tmp_path / "runs" / "f"
    assert fit(tmp_path, 1, 30, {"rank": 0, "step": 23}) == -signal.SIGKILL
    limit = committed_steps(run_dir, 1, 0)
    assert 21 <= limit[0] <= 23  # committed at the step-21 checkpoint: at most the steps since are lost
    checked = check_committed_rows_on_disk(run_dir, 1, 0, first=0)
    check_no_silent_incomplete(run_dir, 1)
    before = rows_everywhere(run_dir)
    # resumed from an earlier checkpoint: the committed rows of steps 18.. are superseded, moved, not deleted
    fit(tmp_path, 1, 30, None, resume=str(tmp_path / "ckpt" / "step=18.ckpt"))
    checked += check_resumed(run_dir, 30)
    lost = sum((before - rows_everywhere(run_dir)).values())
    assert lost == 0 and list((run_dir / "superseded" / "patterns").glob("rank=0/*.parquet"))
    record("single_process_kill", faults=1, rows_checked=checked, rows_lost=lost)


def _inprocess_fit(root: Path, ckpt_dir: Path, steps: int, resume: str | None = None) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dynatrack import PatternRecorder, schedules
    from dynatrack.models import DigitsDataModule, DigitsMLP

    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32)
    rec = PatternRecorder(str(root), run_name="f", probe=dm.probe(), schedule=schedules.every(2),
                          batch_schedule=schedules.every(3),
                          checkpoint_schedule=schedules.union([schedules.every(2), schedules.every(3)]))
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[rec, ckpt], max_steps=steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(DigitsMLP(hidden=[20, 12], lr=1e-2), dm, ckpt_path=resume)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_full_disk_stops_the_fit_cleanly_and_the_run_resumes_complete(tmp_path):
    """A 256 KiB tmpfs (mounted as root) fills mid-fit: the fit fails with ENOSPC, no temporary file is left,
    every committed step is whole; after the filesystem grows, the resumed fit completes the run."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        with pytest.raises(Exception, match=r"No space left on device|Errno 28"):
            _inprocess_fit(mnt / "runs", tmp_path / "ckpt", 60)
        run_dir = mnt / "runs" / "f"
        assert not [p for p in mnt.rglob("*") if p.name.endswith(".tmp")], "a temporary file outlived its write"
        limit = committed_steps(run_dir, 1, 0)[0]
        assert 0 < limit < 60
        checked = check_committed_rows_on_disk(run_dir, 1, 0, first=0, last=60)
        check_no_silent_incomplete(run_dir, 1)
        before = rows_everywhere(run_dir)
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        last = max((tmp_path / "ckpt").glob("step=*.ckpt"), key=lambda p: int(p.stem[5:]))
        _inprocess_fit(mnt / "runs", tmp_path / "ckpt", 60, resume=str(last))
        checked += check_resumed(run_dir, 60)
        lost = sum((before - rows_everywhere(run_dir)).values())
        assert lost == 0
        record("disk_full_tmpfs", faults=1, rows_checked=checked, rows_lost=lost, committed_before_full=int(limit))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
