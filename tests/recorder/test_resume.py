"""Resuming from a Lightning checkpoint into the same run directory: no duplicate, no missing step, nothing overwritten."""

from __future__ import annotations

import hashlib

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import TinyNet, assert_signs, loader, trainer
from dynatrack import PatternRecorder, open_run, schedules


def snapshot(run_dir) -> dict[str, str]:  # noqa: ANN001
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in run_dir.rglob("*") if p.is_file() and p.name != "manifest.json"}


def assert_first_attempt_kept(before: dict[str, str], run_dir) -> None:  # noqa: ANN001
    """Nothing of the first attempt lost: other files unchanged; each shard's rows still on disk, in the shard or,
    for rows the resumed attempt recorded again, moved to superseded/ (so the documented glob matches open_run)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    after = snapshot(run_dir)
    for rel, digest in before.items():
        if after.get(rel) == digest:
            continue
        kind, rank_dir, name = rel.split("/")
        assert name.startswith("part-") and kind in ("patterns", "steps", "neurons"), f"{rel} changed or vanished"
        old = before_rows[rel]
        parts = [pq.read_table(run_dir / rel)] if (run_dir / rel).exists() else []
        parts += [pq.read_table(p) for p in (run_dir / "superseded" / kind / rank_dir).glob(name[:-8] + ".from-*.parquet")]
        new = pa.concat_tables(parts).select(old.column_names)
        assert sorted(map(repr, new.to_pylist())) == sorted(map(repr, old.to_pylist())), f"rows of {rel} lost"


before_rows: dict = {}


def snapshot_rows(run_dir) -> dict[str, str]:  # noqa: ANN001
    import pyarrow.parquet as pq

    out = snapshot(run_dir)
    before_rows.clear()
    for rel in out:
        if rel.endswith(".parquet") and rel.split("/")[0] in ("patterns", "steps", "neurons"):
            before_rows[rel] = pq.read_table(run_dir / rel)
    return out


def recorder(root, x, y) -> PatternRecorder:  # noqa: ANN001
    return PatternRecorder(str(root), run_name="res", probe=(x, y), schedule=schedules.every(2),
                           batch_schedule=schedules.every(3))


def assert_no_duplicates_no_gaps(run, max_step: int) -> None:  # noqa: ANN001
    t = run.patterns(source="probe").to_pandas()
    counts = t.groupby(["step", "layer", "sample_id"]).size()
    assert (counts == 1).all(), "duplicate probe rows"
    expected = sorted(set(range(0, max_step + 1, 2)) | {max_step})
    assert sorted(t.step.unique()) == expected
    b = run.patterns(source="batch").to_pandas()
    assert sorted(b.step.unique()) == list(range(0, max_step, 3))
    assert (b.groupby(["step", "layer", "sample_id"]).size() == 1).all()
    s = run.steps().to_pandas()
    assert (s.groupby("step").size() == 1).all()
    assert sorted(s.step) == list(range(0, max_step, 2))  # the probe schedule's (checkpoints follow it)


def test_clean_resume_continues_the_run(tmp_path, data):
    x, y = data
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    torch.manual_seed(0)
    trainer(10, [recorder(tmp_path / "runs", x, y), ckpt], enable_checkpointing=True).fit(TinyNet(), loader(x, y))
    run_dir = tmp_path / "runs" / "res"
    before = snapshot_rows(run_dir)
    trainer(20, [recorder(tmp_path / "runs", x, y), ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
            enable_checkpointing=True).fit(TinyNet(), loader(x, y), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert_first_attempt_kept(before, run_dir)
    run = open_run(run_dir)
    assert [a["start_step"] for a in run.manifest["attempts"]] == [0, 10]
    assert_no_duplicates_no_gaps(run, 20)


class Crash(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def test_resume_after_a_crash_drops_the_superseded_rows(tmp_path, data):
    x, y = data
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(30, [recorder(tmp_path / "runs", x, y), ckpt, Crash(9)], enable_checkpointing=True).fit(
            TinyNet(), loader(x, y))
    run_dir = tmp_path / "runs" / "res"
    before = snapshot_rows(run_dir)
    crashed = open_run(run_dir)
    assert 8 in crashed.recorded_steps()  # recorded after the step-6 checkpoint, flushed at the crash
    ckpt_file = sorted((tmp_path / "ckpt").glob("*step=6*.ckpt"))[0]
    trainer(14, [recorder(tmp_path / "runs", x, y)]).fit(TinyNet(), loader(x, y), ckpt_path=str(ckpt_file))
    assert_first_attempt_kept(before, run_dir)
    run = open_run(run_dir)
    assert [a["start_step"] for a in run.manifest["attempts"]] == [0, 6]
    assert_no_duplicates_no_gaps(run, 14)
    # the rows kept for step 8 are the resumed attempt's: they match its checkpoint
    state = run.checkpoint(8)
    z = x @ state["net.0.weight"].T + state["net.0.bias"]
    _, bits = run.pattern_bits(8, "net.1")
    assert_signs(bits, z)


def test_state_dict_describes_the_run_on_disk(tmp_path, data):
    x, y = data
    rec = recorder(tmp_path / "runs", x, y)
    trainer(7, [rec]).fit(TinyNet(), loader(x, y))
    state = rec.state_dict()
    assert set(state) == {"run_id", "attempt", "last_step"}
    run = open_run(rec.run_dir)
    assert state["run_id"] == run.run_id == run.manifest["run_id"]
    assert state["last_step"]["probe"] == max(run.recorded_steps("patterns", source="probe"))
    assert state["last_step"]["batch"] == max(run.recorded_steps("patterns", source="batch"))
