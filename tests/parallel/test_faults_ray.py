"""Fault test: a Ray worker SIGKILLed in the middle of an analysis task.

The worker's death is real: a local Ray (2 CPUs), the worker process that runs a
``pattern_task`` is killed with SIGKILL by pid while the task runs. To catch it
deterministically in the middle of its task, the TEST installs a fault hook on the Ray
runtime env (``worker_process_setup_hook``, with the hook's folder passed as an env var
of the runtime env): in every worker it wraps ``dynatrack.parallel.tasks.pattern_task``
so that, once armed, the first call anywhere in the cluster writes its pid and waits;
every call (the retry included) then runs the real task. The library has no hook.

Checked: the killed task ran again in another worker (Ray's task retries,
``dynatrack.parallel.analyze.TASK_RETRIES``), the analysis returned, and every Parquet
table it wrote equals the one of an undisturbed analysis of the same run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dynatrack.parallel import AnalyzeConfig, analyze_run

ENV = "DYNATRACK_TEST_FAULT_DIR"  # read by the hook below only (set by this test on the runtime env)
CFG = AnalyzeConfig(analyzers=("patterns", "regions", "local_complexity"), n_slices=1, n_segments=3,
                    boundary_samples=16, lc_samples=16, lc_radii=(0.05, 0.3), lc_directions=4)


def pause_first_pattern_task() -> None:
    """Ray worker setup hook: wrap ``pattern_task`` with a pause point for the test (runs in each worker)."""
    import dynatrack.parallel.tasks as tasks

    real = tasks.pattern_task
    folder = Path(os.environ[ENV])

    def pattern_task(run_dir, steps, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        with open(folder / "calls.jsonl", "a") as fh:  # one short O_APPEND write per call
            fh.write(json.dumps({"pid": os.getpid(), "steps": [int(s) for s in steps]}) + "\n")
        if (folder / "armed").exists():
            try:
                fd = os.open(folder / "paused.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                fd = None  # another call paused already (this may be its retry): run normally
            if fd is not None:
                os.write(fd, json.dumps({"pid": os.getpid(), "steps": [int(s) for s in steps]}).encode())
                os.close(fd)
                time.sleep(120)  # the test kills this process; if it does not, the test fails below
        return real(run_dir, steps, *args, **kwargs)

    pattern_task.__wrapped__ = real  # type: ignore[attr-defined]
    tasks.pattern_task = pattern_task


def recorded_files(run_dir: str) -> dict[str, str]:
    """``{path: sha256}`` of every file of the run outside ``analysis/`` and ``plots/`` (the analysis'
    outputs): what an analysis must not change."""
    import hashlib

    root = Path(run_dir)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in ("analysis", "plots")}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_when_paused(folder: Path, killed: dict, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    marker = folder / "paused.json"
    while time.monotonic() < deadline:
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):  # not there yet, or being written
            time.sleep(0.05)
            continue
        killed["pid"], killed["steps"] = info["pid"], info["steps"]
        # the pid must be a live Ray worker busy with pattern_task (Ray sets the process title)
        killed["cmdline"] = _cmdline(info["pid"])
        os.kill(info["pid"], signal.SIGKILL)
        return


@pytest.mark.slow
def test_a_worker_killed_mid_task_is_retried_and_the_result_is_identical(digits_run, tmp_path):
    ray = pytest.importorskip("ray")
    run_dir = str(shutil.copytree(digits_run, tmp_path / "digits"))  # the shared run's analysis/ stays as it is
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook travels by value
    recorded = recorded_files(run_dir)
    folder = tmp_path / "fault"
    folder.mkdir()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=False,
             runtime_env={"worker_process_setup_hook": pause_first_pattern_task, "env_vars": {ENV: str(folder)}})
    try:
        t0 = time.monotonic()
        undisturbed = analyze_run(run_dir, config=CFG, progress=False)
        t_undisturbed = time.monotonic() - t0
        before = {name: pq.read_table(f"{run_dir}/analysis/{name}.parquet") for name in undisturbed}
        calls_before = len((folder / "calls.jsonl").read_text().splitlines())

        (folder / "armed").touch()
        killed: dict = {}
        killer = threading.Thread(target=_kill_when_paused, args=(folder, killed), daemon=True)
        killer.start()
        start = time.monotonic()
        disturbed = analyze_run(run_dir, config=CFG, progress=False)
        elapsed = time.monotonic() - start
        killer.join(5)
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    # the fault happened where intended: a Ray worker running pattern_task, killed mid-task
    assert "pid" in killed, "no pattern_task paused: the fault was not injected"
    assert "pattern_task" in killed["cmdline"], killed["cmdline"]
    assert elapsed < 60, f"the analysis took {elapsed:.1f} s after the kill: the task was not retried promptly"
    # the killed task ran again, in another process; every other task ran once
    calls = [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()[calls_before:]]
    again = [c for c in calls if c["steps"] == killed["steps"]]
    assert [c["pid"] for c in again][0] == killed["pid"]
    assert len(again) == 2 and again[1]["pid"] != killed["pid"], calls
    chunks = [tuple(c["steps"]) for c in calls]
    assert len(chunks) == len(set(chunks)) + 1
    # the result: identical tables, in memory and in the Parquet files written
    assert set(disturbed) == set(undisturbed)
    for name, table in disturbed.items():
        assert table.num_rows == undisturbed[name].num_rows
        assert table.equals(undisturbed[name]), name
        assert pq.read_table(f"{run_dir}/analysis/{name}.parquet").equals(before[name]), name
    assert disturbed["patterns"].num_rows > 0
    sys.stderr.write(f"worker {killed['pid']} killed in pattern_task{killed['steps']}; tasks: {len(chunks)} + 1 retry; "
                     f"rows compared: {sum(t.num_rows for t in disturbed.values())} in {len(disturbed)} tables; "
                     f"analysis {t_undisturbed:.1f} s undisturbed, {elapsed:.1f} s with the kill\n")
    assert recorded_files(run_dir) == recorded and len(recorded) > 5  # the recorded run: not a byte changed
    # the undisturbed result is kept, never overwritten (moved to analysis/previous/)
    assert len(list(Path(run_dir, "analysis", "previous").glob("patterns-*.parquet"))) >= 1
