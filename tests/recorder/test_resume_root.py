"""Resume finds the recorder's state however ``root`` is spelled (relative, absolute, ``file://`` URI)."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import TinyNet, loader, trainer
from dynatrack import PatternRecorder, open_run, schedules
from dynatrack.recorder import RecorderError


def spell(kind: str, tmp_path) -> str:  # noqa: ANN001
    """``tmp_path/runs`` spelled as ``kind`` (the test runs with tmp_path as the working directory)."""
    return {"relative": "runs", "dotted": "./runs/", "absolute": str(tmp_path / "runs"),
            "file-uri": (tmp_path / "runs").as_uri()}[kind]


def fit(root: str, x, y, steps: int, run_name: str | None, ckpt_dir, ckpt_path=None) -> PatternRecorder:  # noqa: ANN001
    rec = PatternRecorder(root, run_name=run_name, probe=(x, y), schedule=schedules.every(2))
    torch.manual_seed(0)
    trainer(steps, [rec, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], enable_checkpointing=True).fit(
        TinyNet(), loader(x, y), ckpt_path=ckpt_path)
    return rec


def assert_one_continued_run(tmp_path, x) -> None:  # noqa: ANN001
    run_dirs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, f"the resume started a second run directory: {run_dirs}"
    run = open_run(run_dirs[0])
    assert [a["start_step"] for a in run.manifest["attempts"]] == [0, 10]
    probe = run.patterns(source="probe").to_pandas()
    # a naive expectation: every even step of 0..20 plus the final step, each sample once per layer
    assert sorted(probe.step.unique()) == list(range(0, 21, 2))
    per_key = probe.groupby(["step", "layer", "sample_id"]).size()
    assert (per_key == 1).all() and len(per_key) == 11 * 2 * len(x)


@pytest.mark.parametrize(("first", "then", "run_name"), [
    ("relative", "absolute", None),
    ("absolute", "file-uri", None),
    ("file-uri", "dotted", "res"),
    ("dotted", "relative", "res"),
])
def test_resume_with_root_spelled_another_way(tmp_path, monkeypatch, data, first, then, run_name):
    monkeypatch.chdir(tmp_path)
    x, y = data
    fit(spell(first, tmp_path), x, y, 10, run_name, tmp_path / "ckpt")
    fit(spell(then, tmp_path), x, y, 20, run_name, tmp_path / "ckpt2", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert_one_continued_run(tmp_path, x)


def test_checkpoint_keyed_by_the_root_as_spelled_still_resumes(tmp_path, monkeypatch, data):
    # checkpoints of earlier versions keep the root as it was spelled in the recorder's state key
    monkeypatch.chdir(tmp_path)
    x, y = data
    first = fit("runs", x, y, 10, None, tmp_path / "ckpt")
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    state = ckpt["callbacks"].pop(first.state_key)
    ckpt["callbacks"]["PatternRecorder[root=runs, run_name=None]"] = state
    torch.save(ckpt, tmp_path / "old.ckpt")
    fit(str(tmp_path / "runs"), x, y, 20, None, tmp_path / "ckpt2", ckpt_path=str(tmp_path / "old.ckpt"))
    assert_one_continued_run(tmp_path, x)


def test_a_checkpoint_of_another_recorder_is_named_in_the_error(tmp_path, data, caplog):
    x, y = data
    fit(str(tmp_path / "runs"), x, y, 6, "res", tmp_path / "ckpt")
    fit(str(tmp_path / "elsewhere"), x, y, 6, "res", tmp_path / "ckpt-other")
    with caplog.at_level(logging.WARNING), pytest.raises(RecorderError, match="holds no state of this recorder"):
        fit(str(tmp_path / "runs"), x, y, 12, "res", tmp_path / "ckpt2",
            ckpt_path=str(tmp_path / "ckpt-other" / "last.ckpt"))
    assert "elsewhere" in caplog.text
