"""An S3 object store (a local moto server) frozen, then stopped, under a recording fit."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
from store_helpers import record

pytest.importorskip("moto", minversion="5.2.6")  # moto_server 5.2.1 fails multipart uploads

TRAIN, TEST = 1438, 359


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """A moto S3 server in its own process (``moto_server`` of moto >= 5.2.6: 5.2.1 fails pyarrow's multipart uploads)."""

    def __init__(self, log: Path) -> None:
        self.port = _free_port()
        exe = shutil.which("moto_server") or sys.executable
        args = [exe, "-p", str(self.port)] if exe != sys.executable else [exe, "-m", "moto.server", "-p", str(self.port)]
        self.proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        else:
            self.stop()
            pytest.skip("moto_server did not start")
        self.fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1",
                                    access_key="testing", secret_key="testing", allow_bucket_creation=True)
        self.fs.create_dir("bkt")

    @property
    def root(self) -> str:
        return f"s3://bkt/runs?endpoint_override=127.0.0.1:{self.port}&scheme=http&region=us-east-1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


def _fit(root: str, ckpt_dir: Path, steps: int, extra: list, resume: str | None = None) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dynatrack import PatternRecorder, schedules
    from dynatrack.models import DigitsDataModule, DigitsMLP

    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32)
    rec = PatternRecorder(root, run_name="s", probe=dm.probe(), schedule=schedules.every(2),
                          batch_schedule=schedules.every(3))
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[*extra, rec, ckpt], max_steps=steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(DigitsMLP(hidden=[20, 12], lr=1e-2), dm, ckpt_path=resume)


class Signal(pl.Callback):
    """At training step ``step`` send ``sig`` to the server; SIGCONT it ``resume_after`` seconds later."""

    def __init__(self, proc: subprocess.Popen, step: int, sig: int, resume_after: float | None = None) -> None:
        self.proc, self.step, self.sig, self.resume_after = proc, step, sig, resume_after
        self.timer: threading.Timer | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
        if trainer.global_step == self.step and self.proc.poll() is None:
            self.proc.send_signal(self.sig)
            if self.resume_after is not None:
                self.timer = threading.Timer(self.resume_after, self.proc.send_signal, (signal.SIGCONT,))
                self.timer.start()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_s3_frozen_mid_fit_then_resumed_loses_no_committed_row(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    from dynatrack import open_run

    moto = Moto(tmp_path / "moto.log")
    try:
        freeze = Signal(moto.proc, 10, signal.SIGSTOP, resume_after=20.0)
        try:
            _fit(moto.root, tmp_path / "ckpt", 30, [freeze])
            failed = False
        except Exception as exc:  # noqa: BLE001 - a frozen store may outlast the S3 client's retries
            failed = True
            assert "s3://bkt/runs/s" in str(exc) or "bkt/runs/s" in repr(exc.__cause__), exc
        assert freeze.timer is not None
        freeze.timer.join()  # the store is thawed
        uri = moto.root.replace("s3://bkt/runs?", "s3://bkt/runs/s?")
        run = open_run(uri, include_incomplete=True)
        commit = run.commit_status()[0][0]
        through = float("inf") if commit["closed"] else commit["through"]
        probe = run.patterns(source="probe").to_pandas()
        for step in range(0, int(min(through + 1, 31)), 2):  # every committed probe step is whole
            g = probe[probe.step == step]
            assert len(g) == 2 * (TRAIN + TEST), step
        if failed:
            last = max((tmp_path / "ckpt").glob("step=*.ckpt"), key=lambda p: int(p.stem[5:]))
            _fit(moto.root, tmp_path / "ckpt", 30, [], resume=str(last))
        checked = int((probe.step <= through).sum())
        run = open_run(uri)
        assert run.incomplete_steps() == {}
        probe = run.patterns(source="probe").to_pandas()
        assert (probe.groupby(["step", "layer", "split", "sample_id"]).size() == 1).all()
        assert sorted(probe.step.unique()) == list(range(0, 31, 2))
        # the documented glob over the object store reads the same rows
        cols = ["step", "layer", "split", "source", "sample_id", "bits"]
        t = ds.dataset("bkt/runs/s/patterns", filesystem=moto.fs, format="parquet", partitioning="hive").to_table(
            columns=cols)
        mine = run.patterns(columns=cols)
        assert sorted(zip(*[t.column(c).to_pylist() for c in cols])) == sorted(
            zip(*[mine.column(c).to_pylist() for c in cols]))
        record("s3_frozen", faults=1, fit_failed=failed, committed_through=through, rows_checked=checked + t.num_rows,
               rows_lost=0)
    finally:
        moto.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_s3_stopped_mid_fit_fails_the_fit_with_an_error_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    moto = Moto(tmp_path / "moto.log")
    try:
        stop = Signal(moto.proc, 6, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(Exception, match=r"bkt/runs/s"):
            _fit(moto.root, tmp_path / "ckpt", 400, [stop])
        took = time.monotonic() - t0
        assert took < 300
        record("s3_stopped", faults=1, seconds_to_error=round(took, 1))
    finally:
        moto.stop()
    assert os.path.isdir(tmp_path / "ckpt")
