"""jobs/gpu_check.py: without CUDA it says so and exits 0; with --device cpu the same code path runs
(recorded fits in their own processes, every bit against a float64 recomputation, the overhead
pairs), and its comparison catches a bit flipped in a shard on disk."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "jobs" / "gpu_check.py"


def _check(*args: str, env_extra: dict[str, str] | None = None, timeout: float = 280) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_cuda_it_says_so_and_exits_0():
    proc = _check(env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["cuda"] is False and out["ok"] is True
    assert "no CUDA device" in out["message"] and "--device cpu" in out["message"]


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-check")
    proc = _check("--device", "cpu", "--steps", "8", "--pairs", "2", "--overhead-steps", "4", "--root", str(root))
    return proc, root


@pytest.mark.slow
def test_cpu_mode_compares_every_recorded_bit(cpu_check):
    proc, root = cpu_check
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["ok"] is True and out["cuda"] is False and len(out["fits"]) == 1
    fit = out["fits"][0]
    assert fit["mismatches"] == 0 and fit["neuron_count_mismatches"] == 0
    # every recorded bit was looked at: rows x width over the Parquet shards, counted by DuckDB
    duckdb = pytest.importorskip("duckdb")
    run = root / "check-cpu-1"
    widths = {layer["name"]: layer["width"] for layer in json.loads((run / "manifest.json").read_text())["layers"]}
    rows = duckdb.connect().execute(
        f"SELECT layer, source, COUNT(*) FROM read_parquet('{run}/patterns/*/*.parquet', hive_partitioning=true) "
        "GROUP BY ALL").fetchall()
    assert {s for _, s, _ in rows} == {"probe", "batch"}
    assert fit["rows_compared"] == sum(n for _, _, n in rows)
    assert fit["bits_compared"] + fit["near_zero"] == sum(n * widths[layer] for layer, _, n in rows)
    assert fit["near_zero"] < 1e-3 * fit["bits_compared"]
    # the overhead figures are the medians of the interleaved fits they list
    o = out["overhead"]
    assert len(o["plain_s"]) == len(o["recorder_s"]) == 2
    assert o["ratio_of_medians"] == pytest.approx(np.median(o["recorder_s"]) / np.median(o["plain_s"]), rel=1e-2)  # of rounded times
    assert o["median_paired_ratio"] == pytest.approx(
        np.median(np.asarray(o["recorder_s"]) / np.asarray(o["plain_s"])), rel=1e-2)


@pytest.mark.slow
def test_a_flipped_bit_on_disk_is_a_mismatch(cpu_check):
    _, root = cpu_check
    run = root / "check-cpu-1"
    gpu_check = _module()
    shard = sorted((run / "patterns" / "rank=0").glob("*.parquet"))[0]
    t = pq.read_table(shard)
    bits = t.column("bits").to_pylist()
    row = next(i for i, s in enumerate(t.column("source").to_pylist()) if s == "probe")
    flipped = bytearray(bits[row])
    flipped[0] ^= 0x80  # neuron 0
    bits[row] = bytes(flipped)
    pq.write_table(t.set_column(t.schema.get_field_index("bits"), "bits", pa.array(bits, pa.binary())), shard)
    stats = gpu_check.compare_run(str(run), 1e-4)
    # one bit, unless that neuron's pre-activation is within the tolerance of zero
    assert stats["mismatches"] == 1
    first = stats["first_mismatch"]
    assert (first["step"], first["layer"], first["sample_id"], first["neuron"]) == (
        t.column("step")[row].as_py(), t.column("layer")[row].as_py(), t.column("sample_id")[row].as_py(), 0)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.soak
def test_cpu_ddp_fit_is_checked_too():
    """Two gloo ranks (NCCL's place on the CPU): rows of both ranks, neuron counts summed over ranks."""
    proc = _check("--device", "cpu", "--ddp-devices", "2", "--steps", "6", "--pairs", "0", timeout=560)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    ddp = out["fits"][1]
    assert ddp["devices"] == 2 and ddp["backend"] == "gloo"
    assert ddp["mismatches"] == 0 and ddp["bits_compared"] > 0 and ddp["neuron_counts_compared"] > 0
    assert "overhead" not in out
