"""Every bad input is a clear error, raised before training starts, and nothing written is lost."""

from __future__ import annotations

import json
import os

import pytest
import torch
from lightning.pytorch import Callback

from conftest import TinyNet, loader, trainer
from dynatrack import PatternRecorder, open_run, schedules
from dynatrack.store.writer import WriterError


class CountSteps(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args):  # noqa: ANN002
        self.batches += 1


def fit_expect(tmp_path, data, model, match: str, exc=ValueError, **rec_kw):  # noqa: ANN001
    x, y = data
    counter = CountSteps()
    rec_kw.setdefault("probe", (x, y))
    rec = PatternRecorder(str(tmp_path / "runs"), run_name=rec_kw.pop("run_name", "bad"), **rec_kw)
    with pytest.raises(exc, match=match):
        trainer(3, [rec, counter]).fit(model, loader(x, y))
    assert counter.batches == 0, "the error must come before the first training step"


class NoReLU(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def test_model_without_hookable_layers(tmp_path, data):
    fit_expect(tmp_path, data, NoReLU(), match="no ReLU-family module.*Tanh")


def test_unknown_layer_name_lists_candidates(tmp_path, data):
    fit_expect(tmp_path, data, TinyNet(), match=r"matches no module.*'net.1', 'net.3'", layers=["net.7"])


def test_glob_layer_names(tmp_path, data):
    x, y = data
    rec = PatternRecorder(str(tmp_path / "runs"), run_name="glob", probe=(x, y), layers=["net.[13]"],
                          schedule=schedules.at([0]))
    trainer(1, [rec]).fit(TinyNet(), loader(x, y))
    assert list(open_run(rec.run_dir).widths) == ["net.1", "net.3"]


def test_probe_shape_mismatch(tmp_path, data):
    fit_expect(tmp_path, data, TinyNet(), match=r"probe split 'train'.*shape \(8, 7\).*does not fit",
               probe=torch.randn(8, 7))


def test_probe_labels_must_be_class_indices():
    with pytest.raises(ValueError, match="integer tensor of class indices"):
        PatternRecorder("runs", probe=(torch.randn(4, 5), torch.randn(4)))
    with pytest.raises(ValueError, match="4 inputs but 3 labels"):
        PatternRecorder("runs", probe=(torch.randn(4, 5), torch.arange(3)))


@pytest.mark.parametrize("name", ["a/b", "../evil", "..", "x/../../y", "", ".hidden", "a\\b"])
def test_run_names_with_path_separators_are_refused(name):
    with pytest.raises(ValueError, match="invalid run name"):
        PatternRecorder("runs", run_name=name, probe=torch.randn(2, 5))


def test_unwritable_root_fails_at_setup(tmp_path, data):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    x, y = data
    counter = CountSteps()
    rec = PatternRecorder(str(blocker / "runs"), run_name="r", probe=(x, y))
    with pytest.raises(ValueError, match="cannot write to the run root"):
        trainer(3, [rec, counter]).fit(TinyNet(), loader(x, y))
    assert counter.batches == 0


def test_nothing_to_record_is_an_error(tmp_path, data):
    fit_expect(tmp_path, data, TinyNet(), match="nothing to record", probe=None)


def test_existing_run_with_other_model_or_schema_is_refused_and_kept(tmp_path, data):
    x, y = data
    rec = PatternRecorder(str(tmp_path / "runs"), run_name="same", probe=(x, y), schedule=schedules.at([0]))
    trainer(2, [rec]).fit(TinyNet(), loader(x, y))
    run_dir = tmp_path / "runs" / "same"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    # a different model into the same run directory
    rec2 = PatternRecorder(str(tmp_path / "runs"), run_name="same", probe=(x, y))
    with pytest.raises(ValueError, match="holds a different run.*layers"):
        trainer(2, [rec2]).fit(TinyNet(hidden=(4, 4)), loader(x, y))
    # the same model again without resuming: refused too
    rec3 = PatternRecorder(str(tmp_path / "runs"), run_name="same", probe=(x, y))
    with pytest.raises(ValueError, match="already exists"):
        trainer(2, [rec3]).fit(TinyNet(), loader(x, y))
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before
    # a newer schema version is refused by the reader with a clear message
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="schema version 99, newer"):
        open_run(run_dir)
    rec4 = PatternRecorder(str(tmp_path / "runs"), run_name="same", probe=(x, y))
    with pytest.raises(ValueError, match="schema version 99"):
        trainer(2, [rec4]).fit(TinyNet(), loader(x, y))


def test_open_run_on_missing_or_foreign_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        open_run(tmp_path / "nope")
    (tmp_path / "foreign").mkdir()
    with pytest.raises(ValueError, match="not a dynatrack run"):
        open_run(tmp_path / "foreign")


def test_writer_failure_surfaces_at_the_next_step(tmp_path, data):
    x, y = data
    steps_started: list[int] = []

    class Sabotage(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            steps_started.append(trainer.global_step)
            if trainer.global_step == 3:
                # the patterns directory becomes a file: the next shard write fails for real.
                # (moved away atomically, nothing written is deleted; retried if the writer
                # re-creates the directory in between)
                d = os.path.join(rec.run_dir, "patterns")
                for attempt in range(20):
                    try:
                        if os.path.isdir(d):
                            os.rename(d, os.path.join(str(tmp_path), f"moved-{attempt}"))
                        with open(d, "x"):
                            break
                    except OSError:
                        continue

    rec = PatternRecorder(str(tmp_path / "runs"), run_name="w", probe=(x, y), schedule=schedules.every(1),
                          rows_per_file=1)
    with pytest.raises(WriterError, match="background writer failed"):
        trainer(300, [Sabotage(), rec]).fit(TinyNet(), loader(x, y))
    # the error surfaced as soon as the writer thread hit it (a few steps later: it writes
    # asynchronously), not silently at the end of training
    assert max(steps_started) < 60
