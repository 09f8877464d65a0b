"""What the demo, `dynatrack fit` and the analysis print (real subprocesses, real Ray): progress,
the run directory and summary, no promotional tips, no doubled log lines, labelled tables."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

REPO = Path(__file__).parents[1]
PROMOTIONS = ("💡", "litlogger", "litmodels", "View project at", "View run at", "Tip:")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "dynatrack.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=400, env=env)


def _doubled(text: str) -> list[str]:
    """Log-like lines (not table rows or bars) printed more than once."""
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.strip().startswith(("│", "┃", "┏", "┡", "└", "━", "─", "training steps"))]
    return [ln for ln, n in Counter(lines).items() if n > 1]


@pytest.mark.slow
def test_demo_prints_progress_summary_and_run_directory_and_no_tips(tmp_path):
    proc = _run("demo", "--single", "--steps", "20", "--devices", "2", "--root", str(tmp_path / "runs"), "--run-name", "d",
                "--no-analyze", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for promo in PROMOTIONS:
        assert promo not in out, f"{promo!r} printed"
    assert not _doubled(proc.stderr), _doubled(proc.stderr)
    assert "training steps" in proc.stdout and "20/20" in proc.stdout
    assert "pattern steps:" in proc.stdout and "trained 20 steps on 2 CPU rank(s)" in proc.stdout
    assert f"run directory: {tmp_path / 'runs' / 'd'}" in proc.stdout
    assert proc.stdout.count("run directory:") == 1, "rank 0 only"


@pytest.mark.slow
def test_fit_prints_the_run_directory_and_the_demo_summary(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    config["trainer"].update(devices=1, strategy="auto", max_steps=6, default_root_dir=str(tmp_path / "lightning"))
    config["trainer"]["callbacks"][0]["init_args"].update(root=str(tmp_path / "runs"), run_name="cfg")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    proc = _run("fit", "--config", str(tmp_path / "cfg.yaml"), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"run directory: {tmp_path / 'runs' / 'cfg'}" in proc.stdout
    assert "pattern steps:" in proc.stdout and "trained 6 steps on 1 CPU rank(s)" in proc.stdout
    for promo in PROMOTIONS:
        assert promo not in out, f"{promo!r} printed"
    assert not _doubled(proc.stderr), _doubled(proc.stderr)


def test_analysis_progress_shows_tasks_done_of_total(local_ray):
    from rich.console import Console

    from dynatrack.parallel.analyze import _gather

    ray = local_ray
    square = ray.remote(lambda i: {"t": pa.table({"step": [i]})})
    buf = io.StringIO()
    parts = _gather([square.remote(i) for i in range(5)], True, console=Console(file=buf, width=100))
    assert sorted(p["t"].column("step")[0].as_py() for p in parts) == list(range(5))
    assert "analysis tasks" in buf.getvalue() and "5/5" in buf.getvalue()


def test_summary_table_says_which_steps_it_shows_and_labels_every_column():
    from rich.console import Console

    from dynatrack.parallel.analyze import SUMMARY_LEGEND, print_summary_table
    from dynatrack.parallel.tasks import NETWORK

    steps = list(range(20))
    n = len(steps)
    patterns = pa.table({
        "step": steps, "layer": [NETWORK] * n, "split": ["train"] * n, "n_samples": [100] * n,
        "n_distinct": [50 + s for s in steps], "n_shared": [10] * n, "width": [32] * n,
        "churn_samples": [100] * n, "churn_hamming_sum": [300] * n, "churn_changed": [40] * n,
    })
    buf = io.StringIO()
    print_summary_table({"patterns": patterns}, max_rows=14, console=Console(file=buf, width=200))
    text = " ".join(buf.getvalue().split())
    assert "(whole network, 14 of 20 steps)" in text
    assert "distinct (train)" in text and "churn" in text and "step" in text
    assert SUMMARY_LEGEND in text
    assert "69" in text and "50" in text, "first and last steps are shown"
