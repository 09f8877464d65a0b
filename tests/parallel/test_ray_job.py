"""A real Ray head node (`ray start --head`, token authentication on), the analysis submitted with `ray job submit`."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dynatrack.tracking import read_offline_run

REPO = Path(__file__).parents[2]
# the `ray` console script next to this interpreter (a fresh `python -m pip install` under pyenv
# creates no shim for it on PATH)
_BIN = Path(sys.executable).parent / "ray"
RAY = str(_BIN) if _BIN.exists() else (shutil.which("ray") or "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):  # noqa: ANN001, ANN201
    """A head node with token auth; the token lives in a private file, never in argv or logs."""
    tmp = tmp_path_factory.mktemp("ray-head")
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port, dash = free_port(), free_port()
    # every port explicit: Ray's fixed defaults (e.g. the dashboard agent's 52365) collide with any other
    # Ray on the machine, and the head then has "no available agent to submit job"
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                   f"--ray-client-server-port={free_port()}"]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats", *agent_ports],
        env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT)
    # ready = a trivial job runs end to end (the job agent can lag behind the dashboard's REST API)
    deadline = time.time() + 120
    while time.time() < deadline:
        check = subprocess.run([RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--",
                                sys.executable, "-c", "print('ready')"], env=env, capture_output=True, text=True,
                               timeout=120)
        if check.returncode == 0 and "ready" in check.stdout:
            break
        assert proc.poll() is None, (tmp / "head.log").read_text()[-3000:]
        time.sleep(2)
    else:
        proc.terminate()
        pytest.fail("ray head did not run a job: " + check.stdout[-2000:] + check.stderr[-3000:]
                    + (tmp / "head.log").read_text()[-1500:])
    yield {"env": env, "dashboard": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{port}", "token": token}
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.slow
def test_ray_job_submit_analyzes_the_run(head, digits_run, tmp_path):
    cfg = tmp_path / "analyze.yaml"
    cfg.write_text(
        "analysis:\n  analyzers: [patterns, regions]\n  n_slices: 1\n  n_segments: 2\n  boundary_samples: 8\n"
        "  steps: [0, 10, 20]\nwandb:\n  mode: offline\n  group: job-test\n")
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", head["dashboard"], "--working-dir", str(REPO),
         "--runtime-env-json", '{"excludes": ["runs", ".git", "wandb", "*.egg-info", ".pytest_cache", "__pycache__"]}', "--",
         sys.executable, "jobs/analyze.py", "--config", str(cfg), "--run", digits_run],
        env=head["env"], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out
    assert head["token"].read_text() not in out  # the token never shows up in logs
    patterns = pq.read_table(f"{digits_run}/analysis/patterns.parquet").to_pandas()
    assert sorted(patterns.step.unique()) == [0, 10, 20]
    # cross-check the job's counts with DuckDB over the same files
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.connect().execute(
        f"SELECT step, layer, split, COUNT(DISTINCT bits) FROM read_parquet('{digits_run}/patterns/*/*.parquet', "
        "hive_partitioning = true) WHERE source = 'probe' AND step IN (0, 10, 20) GROUP BY ALL").fetchall()
    got = {(r.step, r.layer, r.split): r.n_distinct for r in patterns.itertuples() if r.layer != "__network__"}
    assert got == {(s, l, p): n for s, l, p, n in rows}
    regions = pq.read_table(f"{digits_run}/analysis/regions.parquet").to_pandas()
    assert set(regions.kind) == {"1d", "2d"} and (regions["count"] > 0).all()
    # the W&B offline run, read back with `wandb leet inspect`, holds the Parquet values
    runs = sorted(Path(digits_run, "analysis", "wandb", "wandb").glob("offline-run-*"))
    assert runs
    logged = read_offline_run(runs[-1])
    history = {row["trainer/step"]: row for row in logged["history"]}
    for r in patterns.itertuples():
        layer = "network" if r.layer == "__network__" else r.layer
        assert history[r.step][f"patterns/{layer}/{r.split}/distinct"] == r.n_distinct
    r2 = regions[regions.kind == "2d"].groupby("step")["count"].mean()
    for step, value in r2.items():
        assert history[step]["regions/2d_mean"] == pytest.approx(value)


@pytest.mark.slow
def test_token_auth_is_enforced(head, tmp_path):
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    proc = subprocess.run([RAY, "job", "list", "--address", head["dashboard"]], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "token" in (proc.stdout + proc.stderr).lower()


@pytest.mark.slow
def test_cli_analyze_on_an_existing_cluster(head, digits_run):
    proc = subprocess.run(
        [sys.executable, "-m", "dynatrack.cli", "analyze", digits_run, "--address", head["gcs"],
         "--analyzers", "patterns", "--steps", "0,5", "--wandb", "disabled"],
        env=head["env"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "analysis of digits" in proc.stdout
    t = pq.read_table(f"{digits_run}/analysis/patterns.parquet")
    assert sorted(set(t.column("step").to_pylist())) == [0, 5]
