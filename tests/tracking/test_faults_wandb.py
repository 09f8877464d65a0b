"""Fault tests: W&B unreachable in online mode, for an analysis and for a training run.

The server is really unreachable: ``WANDB_BASE_URL`` points at a local port nobody listens on
(connection refused), with a dummy API key of the right length set only in the child's env.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dynatrack.parallel.tasks import NETWORK

INIT_TIMEOUT = 8  # seconds, set in the test's analyze.yaml; W&B's own default is 90
DUMMY_KEY = "dummy0" + "k" * 34  # 40 characters, like a real key; never a real one


def recorded_files(run_dir: str) -> dict[str, str]:
    """``{path: sha256}`` of every file of the run outside ``analysis/`` and ``plots/`` (the analysis'
    outputs): what an analysis must not change."""
    import hashlib

    root = Path(run_dir)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in ("analysis", "plots")}


def _closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_BASE_URL=f"http://127.0.0.1:{_closed_port()}", WANDB_API_KEY=DUMMY_KEY, WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]))
    return env


@pytest.mark.slow
def test_analysis_with_wandb_unreachable_keeps_results_warns_once_and_exits_0(digits_run, tmp_path):
    import shutil

    duckdb = pytest.importorskip("duckdb")
    run_dir = str(shutil.copytree(digits_run, tmp_path / "digits"))
    recorded = recorded_files(run_dir)
    config = tmp_path / "analyze.yaml"
    config.write_text(textwrap.dedent(f"""\
        analysis: {{analyzers: [patterns]}}
        ray: {{num_cpus: 2}}
        wandb: {{mode: online, init_timeout: {INIT_TIMEOUT}}}
        """))
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "dynatrack.cli", "analyze", run_dir, "--config", str(config)],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    end = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out  # the analysis succeeded: exit 0, W&B's failure is a warning
    assert "Traceback" not in out
    warnings = [line for line in proc.stderr.splitlines() if "W&B" in line and "failed" in line]
    assert len(warnings) == 1, proc.stderr
    sys.stderr.write(f"analyze with W&B unreachable: {end - start:.1f} s; warning: {warnings[0]}\n")
    assert warnings[0].startswith("WARNING dynatrack.tracking") and "results on disk are unaffected" in warnings[0]
    assert DUMMY_KEY not in out and DUMMY_KEY[6:16] not in out  # no secret in the logs
    # the results were written before W&B was tried, and are right (DuckDB over the same shards)
    result = Path(run_dir, "analysis", "patterns.parquet")
    written = result.stat().st_mtime
    assert start < written < end
    wandb_seconds = end - written
    sys.stderr.write(f"results written {written - start:.1f} s after the start, W&B gave up {wandb_seconds:.1f} s later\n")
    assert wandb_seconds < INIT_TIMEOUT + 20, f"W&B held the command {wandb_seconds:.1f} s after the results"
    got = {(r["step"], r["layer"], r["split"]): r["n_distinct"] for r in pq.read_table(result).to_pylist()
           if r["layer"] != NETWORK}
    rows = duckdb.connect().execute(
        f"SELECT step, layer, split, COUNT(DISTINCT bits) FROM read_parquet('{run_dir}/patterns/*/*.parquet', "
        "hive_partitioning = true) WHERE source = 'probe' GROUP BY ALL").fetchall()
    assert recorded_files(run_dir) == recorded  # the recorded run: not a byte changed
    assert got == {(s, l, p): n for s, l, p, n in rows} and len(got) >= 8


FIT = """
import sys, warnings
warnings.filterwarnings("ignore")
import lightning.pytorch as pl, torch
from dynatrack import PatternRecorder, open_run, schedules
from dynatrack.models import DigitsDataModule, DigitsMLP
torch.set_num_threads(1)
pl.seed_everything(0, verbose=False)
dm = DigitsDataModule(batch_size=64)
rec = PatternRecorder(sys.argv[1], run_name="nowandb", probe=dm.probe(), schedule=schedules.every(2))
pl.Trainer(accelerator="cpu", devices=1, max_steps=10, callbacks=[rec], logger=False, enable_checkpointing=False,
           enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(DigitsMLP(hidden=[16]), dm)
print("wandb imported:", "wandb" in sys.modules)
print("steps:", open_run(rec.run_dir).recorded_steps("patterns", source="probe"))
"""


@pytest.mark.slow
def test_training_never_touches_wandb_even_online_and_unreachable(tmp_path):
    # the recorder and the store do not use W&B at all: a fit with W&B configured online against a
    # dead server records every step and never imports wandb
    env = _env(tmp_path)
    env["WANDB_MODE"] = "online"
    proc = subprocess.run([sys.executable, "-c", FIT, str(tmp_path / "runs")], env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "wandb imported: False" in proc.stdout
    assert "steps: [0, 2, 4, 6, 8, 10]" in proc.stdout


def test_init_timeout_must_be_positive():
    import pyarrow as pa

    from dynatrack.tracking import log_analysis

    for bad in (0, -1.0, "30"):
        with pytest.raises(ValueError, match="init_timeout"):
            log_analysis({"p": pa.table({"step": [0], "v": [1]})}, dims={}, run_id="r", mode="offline",
                         init_timeout=bad)
