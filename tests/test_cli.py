"""The console script: fit from the YAML config, inspect a run (real subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dynatrack import open_run

REPO = Path(__file__).parents[1]


def dynatrack(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "dynatrack.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow
def test_fit_from_config_then_inspect(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    config["trainer"].update(devices=1, strategy="auto", max_steps=12, default_root_dir=str(tmp_path / "lightning"))
    config["trainer"]["callbacks"][0]["init_args"].update(root=str(tmp_path / "runs"), run_name="cfg")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    proc = dynatrack("fit", "--config", str(tmp_path / "cfg.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = open_run(tmp_path / "runs" / "cfg")
    assert run.recorded_steps("patterns", source="probe") == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12]
    assert run.manifest["model"]["class_path"] == "dynatrack.models.DigitsMLP"
    assert run.manifest["model"]["init_args"]["hidden"] == [64, 64, 64]
    assert not (tmp_path / "config.yaml").exists()

    proc = dynatrack("inspect", str(tmp_path / "runs" / "cfg"), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    rows = run.patterns().num_rows
    assert summary["tables"]["patterns"]["rows"] == rows == 12 * 3 * 1797 + 1 * 3 * 64  # probe + batch at 0
    assert summary["layers"] == [{"name": f"net.body.{i}", "width": 64} for i in (1, 3, 5)]
    on_disk = sum(p.stat().st_size for p in (tmp_path / "runs" / "cfg").rglob("*") if p.is_file())
    assert summary["total_bytes"] == on_disk

    text = dynatrack("inspect", str(tmp_path / "runs" / "cfg"), cwd=tmp_path).stdout
    assert "net.body.5" in text and "patterns" in text and "12 steps" not in text


def test_inspect_bad_run_dir_is_a_clear_error(tmp_path):
    proc = dynatrack("inspect", str(tmp_path / "missing"), cwd=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
