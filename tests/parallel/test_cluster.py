"""Ray token handling against real Ray: a private token file for a local Ray, and an authentication
failure reported as such, within seconds, by a real `ray start --head` with token auth."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dynatrack.parallel.cluster import ensure_private_token, write_token

_BIN = Path(sys.executable).parent / "ray"
RAY = str(_BIN) if _BIN.exists() else (shutil.which("ray") or "ray")
REPO = Path(__file__).parents[2]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    return env


def test_write_token_is_owner_only_and_never_replaces(tmp_path):
    old = os.umask(0)  # even with a permissive umask
    try:
        path = tmp_path / "ray" / "auth_token"
        assert write_token(path)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert not write_token(path) and path.read_text() == token


def test_an_existing_readable_token_file_is_named_not_changed(tmp_path, monkeypatch, caplog):
    path = tmp_path / "tok"
    path.write_text("s3cret-token")
    path.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    with caplog.at_level(logging.WARNING, logger="dynatrack.parallel.cluster"):
        assert ensure_private_token() == str(path)
    assert _mode(path) == 0o644 and path.read_text() == "s3cret-token"
    assert any(str(path) in r.getMessage() and "chmod 600" in r.getMessage() for r in caplog.records)
    assert "s3cret-token" not in caplog.text
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ensure_private_token() is None


@pytest.mark.slow
def test_local_ray_started_by_dynatrack_leaves_a_private_token(tmp_path):
    """Ray's own generator writes ~/.ray/auth_token with the umask (0644 here): world-readable."""
    home = tmp_path / "home"
    home.mkdir()
    code = ("from dynatrack.parallel.cluster import ray_session\n"
            "import ray\n"
            "with ray_session(num_cpus=1):\n"
            "    assert ray.get(ray.remote(lambda: 7).remote()) == 7\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_clean_env(home), capture_output=True, text=True,
                          timeout=180, preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr[-3000:]
    token = home / ".ray" / "auth_token"
    assert token.is_file() and _mode(token) == 0o600
    assert token.read_text() not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def head(digits_run):  # noqa: ANN001, ANN201
    """A GCS-only head node (no dashboard) with token auth and a private token file."""
    tmp = Path(tempfile.mkdtemp(prefix="dtr-"))  # short: Ray's socket paths have a length limit
    token = tmp / "auth_token"
    write_token(token)
    ports = []
    for _ in range(6):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    env = {**_clean_env(tmp), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={ports[0]}", "--include-dashboard=false", "--num-cpus=1",
         f"--temp-dir={tmp}/t", "--disable-usage-stats", f"--dashboard-agent-listen-port={ports[1]}",
         f"--dashboard-agent-grpc-port={ports[2]}", f"--runtime-env-agent-port={ports[3]}",
         f"--metrics-export-port={ports[4]}", f"--ray-client-server-port={ports[5]}"],
        env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{ports[0]}"
    deadline = time.time() + 90
    while time.time() < deadline and "Ray runtime started" not in (tmp / "head.log").read_text():
        assert proc.poll() is None, (tmp / "head.log").read_text()[-3000:]
        time.sleep(0.5)
    yield {"address": address, "env": env, "token": token, "home": tmp}
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)


def _analyze(run_dir: str, address: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dynatrack.cli", "analyze", run_dir, "--address", address,
                           "--analyzers", "patterns", "--steps", "0", "--wandb", "disabled"],
                          env=env, capture_output=True, text=True, timeout=180)
    return proc, time.perf_counter() - start


_CONNECT = """
import json, sys, time
from dynatrack.parallel.cluster import ClusterAuthError, ray_session
import ray  # imported before the clock starts: only the connection attempt is timed
start = time.perf_counter()
try:
    with ray_session(sys.argv[1]):
        error = None
except ClusterAuthError as exc:
    error = str(exc)
print(json.dumps({"error": error, "seconds": time.perf_counter() - start}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["wrong token", "no token", "auth mode not set"])
def test_a_rejected_token_is_an_authentication_failure_within_seconds(head, tmp_path, case):
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    if case == "wrong token":
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    elif case == "auth mode not set":
        env.pop("RAY_AUTH_MODE")
    proc = subprocess.run([sys.executable, "-c", _CONNECT, head["address"]], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] and out["error"].startswith("authentication failure"), out
    assert head["address"] in out["error"]
    assert out["seconds"] < 10, f"took {out['seconds']:.1f} s (Ray alone retries for about 20 s)"
    assert head["token"].read_text() not in proc.stdout + proc.stderr
    if case == "wrong token":
        assert env["RAY_AUTH_TOKEN"] not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_cli_names_the_authentication_failure(head, digits_run, tmp_path):
    env = {k: v for k, v in head["env"].items() if k != "RAY_AUTH_TOKEN_PATH"}
    env.update(HOME=str(tmp_path), RAY_AUTH_TOKEN=secrets.token_hex(32))
    proc, _ = _analyze(digits_run, head["address"], env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("dynatrack analyze: error: authentication failure")
    assert "Traceback" not in proc.stderr and env["RAY_AUTH_TOKEN"] not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_right_token_connects(head, digits_run):
    proc, _ = _analyze(digits_run, head["address"], head["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "analysis of digits" in proc.stdout


def test_a_sweeps_local_ray_points_every_worker_at_its_own_state_api(tmp_path):
    """Ray Train's placement-group cleaner asks the state API from a worker process; that process must
    reach this session's dashboard, whatever /tmp/ray/ray_current_cluster says. Checked from a real task:
    the variable it sees is this session's dashboard, and the state API there knows a live actor."""
    import ray

    from dynatrack.parallel.cluster import API_SERVER_ENV, ray_session

    before = os.environ.get(API_SERVER_ENV)
    with ray_session(num_cpus=1, dashboard=True):
        assert os.environ.get(API_SERVER_ENV) == before  # this process gets its own value back
        url = "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]

        @ray.remote(num_cpus=0)
        class Alive:
            def ping(self) -> int:
                return 1

        @ray.remote(num_cpus=0)
        def ask(actor_id: str) -> tuple[str | None, str]:
            from ray.util.state import get_actor

            return os.environ.get(API_SERVER_ENV), get_actor(actor_id, timeout=10).state

        actor = Alive.remote()
        ray.get(actor.ping.remote())
        seen, state = ray.get(ask.remote(actor._actor_id.hex()), timeout=60)
    assert seen == url and url.startswith("http://127.0.0.1:")
    assert state == "ALIVE"
