"""Benchmark: distinct-pattern counts, dynatrack on warm Ray vs DuckDB, printed as one JSON object.

A synthetic run directory (schema v1, written with ``new_manifest`` /
``write_manifest`` and :class:`dynatrack.store.writer.ShardWriter`) of
``ranks x steps x layers x samples`` pattern rows (default 2 x 64 x 2 x 16,384 =
4,194,304 rows of 32-byte / 256-neuron patterns) is built once and cached
(``--data-dir``, default ``$TMPDIR/dynatrack-bench-patterns``). Patterns are
drawn with a skewed distribution from a pool whose size grows with the step, so
distinct counts range from about 1,000 to 23,000 per (step, layer) of 32,768 rows,
and patterns repeat across ranks (the count must merge the ranks).

Timed in one process, alternating order, ``--reps`` repetitions (medians reported):

* ``duckdb``: ``SELECT step, layer, COUNT(DISTINCT bits) FROM read_parquet(
  '<run>/patterns/*/*.parquet', hive_partitioning=true) GROUP BY step, layer``,
  default threads;
* ``dynatrack``: :func:`dynatrack.parallel.analyze.analyze_run` with only the
  pattern analyzer (no churn, no whole-network patterns) on a warm local Ray
  started here with ``ray.init(address="local", num_cpus=2)`` (which analyze_run
  reuses; "local" so that a ``ray start`` cluster on the machine is not joined); includes writing
  ``analysis/patterns.parquet`` (``progress=False`` so stdout stays one JSON object);
* ``pure``: :func:`dynatrack.parallel.tasks.pattern_stats` on the table already
  in memory, one thread (Arrow's pool set to 1 CPU), and
  :func:`dynatrack.analysis.patterns.distinct_counts` alone on the bits matrix;
* ``polars`` (reference, if installed): ``scan_parquet(...).group_by(step, layer)
  .agg(bits.n_unique())``.

Unless ``--no-proto``, also ``dynatrack_tasks_per_cpu_1`` (``analyze_run(...,
tasks_per_cpu=1)``) and ``proto_analyze*``: the changes the profile suggests,
prototyped in this file (see "prototypes") so they are measured beside the real code.

Besides wall time, each arm's CPU seconds (this process plus the Ray processes it
started, from ``/proc``) are reported (``median_cpu_s``, ``cpu_ratio``): on a shared
2-core machine the wall times move with the load of other processes, CPU seconds hardly.

Every arm's counts are compared with DuckDB's per (step, layer) (``counts_equal`` for
``analyze_run``, ``counts_equal_by_arm`` for all). Unless ``--no-profile``, the phases of
``analyze_run`` are timed separately (``profile``): the driver's step listing, the wait
on Ray, and, on one core in this process, each task's Parquet read, ``take``,
``distinct_counts`` and the rest of ``pattern_stats``.

Run::

    python jobs/bench_patterns.py               # ~1.5 minutes on 2 cores (+ ~5 s the first time, building the data)
    python jobs/bench_patterns.py --quick       # 1M rows, 3 repetitions
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from dynatrack.analysis import patterns as pat
from dynatrack.parallel import tasks as dt_tasks
from dynatrack.parallel.analyze import analyze_run, plan_step_ranges, write_analysis
from dynatrack.parallel.tasks import AnalyzeConfig, pattern_stats, pattern_task
from dynatrack.store.fs import RunLocation
from dynatrack.store.manifest import new_manifest, write_manifest
from dynatrack.store.reader import binary_rows, open_run
from dynatrack.store.schema import ANALYSIS, PATTERNS
from dynatrack.store.writer import ShardWriter

ANCHORS = {
    "source": "/work/shared/notes/anchors.md (4M rows x 32-byte patterns grouped by step, one Parquet file, 2 cores)",
    "polars_s": 0.43,
    "duckdb_s": 0.58,
    "pyarrow_group_by_s": 1.6,
    "numpy_unique_loop_s": 3.3,
}
PARAMS_FILE = ".bench-params.json"  # hidden: the reader lists only patterns/, steps/, neurons/


# --------------------------------------------------------------------------- data


def _params(args: argparse.Namespace) -> dict[str, Any]:
    return {"ranks": args.ranks, "steps": args.steps, "layers": args.layers, "samples": args.samples,
            "width": args.width, "pool": args.pool, "seed": args.seed, "version": 1}


def _run_id(p: dict[str, Any]) -> str:
    return f"bench-r{p['ranks']}-s{p['steps']}-l{p['layers']}-n{p['samples']}-w{p['width']}-p{p['pool']}-seed{p['seed']}"


def build_run(root: str, p: dict[str, Any]) -> tuple[str, bool]:
    """The cached synthetic run directory (built if missing); returns ``(run_dir, built_now)``."""
    run_id = _run_id(p)
    loc = RunLocation.create(root, run_id)
    marker = os.path.join(loc.path, PARAMS_FILE)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == p:
                return loc.path, False
    if os.path.exists(loc.path):  # a partial build of ours: start again
        shutil.rmtree(loc.path)
    nbytes = (p["width"] + 7) // 8
    layers = [f"net.{2 * i + 1}" for i in range(p["layers"])]
    n, ranks = p["samples"], p["ranks"]
    steps = [10 * k for k in range(p["steps"])]
    rng = np.random.default_rng(p["seed"])
    pool = rng.integers(0, 256, size=(p["pool"], nbytes), dtype=np.uint8)
    pool_pop = pat.popcount(pool)
    manifest = new_manifest(
        run_id=run_id, world_size=ranks, layers=[{"name": name, "width": p["width"]} for name in layers],
        probe={"size": n * ranks, "splits": {"train": n * ranks}, "num_classes": 10},
        model={"class_path": "dynatrack.models.MLP", "init_args": {}}, seed=p["seed"],
        schedules={"patterns": "every(10)"}, start_step=0,
    )
    loc.mkdir()
    write_manifest(loc, manifest, overwrite=False)
    offsets = pa.array(np.arange(0, (n * len(layers) + 1) * nbytes, nbytes, dtype=np.int32))
    for rank in range(ranks):
        writer = ShardWriter(loc, rank=rank, attempt=0)
        ids = np.arange(rank * n, (rank + 1) * n, dtype=np.int64)
        for k, step in enumerate(steps):
            # pool size grows with the step: few distinct patterns early, many late
            m = max(16, int(p["pool"] * (k + 1) / len(steps)))
            idx = []
            for li in range(len(layers)):
                u = rng.random(n)
                draw = (m * u * u).astype(np.int64)  # skewed: low indices are popular
                idx.append((draw + 7919 * k + 104729 * li) % p["pool"])
            idx = np.concatenate(idx)
            bits = pa.Array.from_buffers(pa.binary(), len(idx), [None, offsets.buffers()[1], pa.py_buffer(pool[idx].tobytes())])
            table = pa.table({
                "step": pa.array(np.full(len(idx), step, dtype=np.int64)),
                "layer": pa.array(np.repeat(layers, n)),
                "sample_id": pa.array(np.tile(ids, len(layers))),
                "split": pa.array(["train"] * len(idx)),
                "source": pa.array(["probe"] * len(idx)),
                "bits": bits,
                "n_active": pa.array(pool_pop[idx].astype(np.int32)),
            }, schema=PATTERNS)
            writer.submit(lambda table=table: {"patterns": table})
        writer.close()
    with open(marker, "w") as f:
        json.dump(p, f)
    return loc.path, True


# --------------------------------------------------------------------------- the contenders


def duckdb_counts(run_dir: str) -> dict[tuple[int, str], int]:
    import duckdb

    q = (f"SELECT step, layer, COUNT(DISTINCT bits) FROM read_parquet('{run_dir}/patterns/*/*.parquet', "
         "hive_partitioning=true) GROUP BY step, layer")
    with duckdb.connect() as con:
        return {(int(s), str(layer)): int(c) for s, layer, c in con.execute(q).fetchall()}


def polars_counts(run_dir: str) -> dict[tuple[int, str], int]:
    import polars as pl

    df = (pl.scan_parquet(f"{run_dir}/patterns/*/*.parquet", hive_partitioning=True)
          .group_by(["step", "layer"]).agg(pl.col("bits").n_unique().alias("n")).collect())
    return {(int(s), str(layer)): int(c) for s, layer, c in df.iter_rows()}


TASKS_PLANNED: list[int] = []  # pattern tasks that each analyze_run call planned (see _count_planned_tasks)


def _count_planned_tasks() -> None:
    """Record ``len(plan_step_ranges(...))`` of every ``analyze_run`` call (same result, only counted)."""
    from dynatrack.parallel import analyze as an

    plan = an.plan_step_ranges

    def counted(steps: Sequence[int], n_tasks: int) -> list[list[int]]:
        out = plan(steps, n_tasks)
        TASKS_PLANNED.append(len(out))
        return out

    an.plan_step_ranges = counted  # type: ignore[assignment]


def dynatrack_counts(run_dir: str, tasks_per_cpu: int = 2) -> dict[tuple[int, str], int]:
    cfg = AnalyzeConfig(analyzers=("patterns",), churn=False, network=False)
    TASKS_PLANNED.clear()
    out = _counts(analyze_run(run_dir, config=cfg, progress=False, tasks_per_cpu=tasks_per_cpu)["patterns"])
    PLANNED.setdefault(tasks_per_cpu, []).extend(TASKS_PLANNED)
    return out


PLANNED: dict[int, list[int]] = {}  # tasks_per_cpu -> tasks planned per timed call


class one_arrow_cpu:
    """Arrow's CPU pool at 1 thread inside the block (the pure-function reference)."""

    def __enter__(self) -> None:
        self.saved = pa.cpu_count()
        pa.set_cpu_count(1)

    def __exit__(self, *exc: Any) -> None:
        pa.set_cpu_count(self.saved)


def tree_cpu_seconds() -> float | None:
    """User + system CPU seconds of this process and its live descendants (Ray's GCS,
    raylet and workers started by ``ray.init`` here), from ``/proc``; ``None`` elsewhere.

    Unlike wall time this barely moves when other processes compete for the cores.
    """
    if not os.path.isdir("/proc/self"):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parent[int(d)], cpu[int(d)] = int(fields[1]), int(fields[11]) + int(fields[12])
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / tick


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _med(xs: Sequence[float]) -> float:
    return round(statistics.median(xs), 4)


# --------------------------------------------------------------------------- prototypes
#
# What the profile suggests, written here (not in dynatrack/) so that it can be measured
# beside the real code in the same process. ``proto_analyze`` is ``analyze_run`` (patterns
# only, no churn, no whole-network patterns) with three changes:
#   1. the driver lists the recorded probe steps once, reading ``step`` with ``source``
#      dictionary-encoded (``analyze_run`` lists them twice, decoding ``source`` strings);
#   2. each task reads with a step *range* filter (row groups inside the range skip the
#      filter kernel; ``isin`` copies every row), string columns dictionary-encoded, and
#      without ``sample_id`` (only churn and whole-network patterns need it);
#   3. ``pattern_stats`` uses the dictionary codes as read, drops rows of unwanted steps
#      inside the range, and runs one ``distinct_counts`` per byte width over all layers of
#      that width (group = layer x step x split): no ``take`` copy of the bits per layer;
#   4. tasks are planned from ``ray.cluster_resources()`` (``analyze_run`` uses
#      ``available_resources()``, which on a warm Ray often lacks "CPU" for a moment).
# ``proto_analyze(skip_source_filter=True)`` adds: 5. leave out ``source == "probe"`` when the
# row-group statistics prove every row is a probe row (see ``Run.only_value``).


def _proto_table(run: Any, kind: str, filter: Any, columns: list[str]) -> pa.Table:
    """The prototype's read: ``Run.table`` with dictionary strings and no rank column (adopted there)."""
    return run.table(kind, filter=filter, columns=columns, dictionary_strings=True, with_rank=False)


def proto_recorded_steps(run: Any, source_filter: bool = True) -> list[int]:
    import pyarrow.compute as pc

    t = _proto_table(run, "patterns", ds.field("source") == "probe" if source_filter else None, ["step"])
    return sorted(pc.unique(t.column("step")).to_pylist()) if t.num_rows else []


def proto_pattern_stats(t: pa.Table, widths: dict[str, int], steps: Sequence[int]) -> pa.Table:
    """Counts only (``churn=False, network=False``) of ``pattern_stats``, see the notes above."""
    steps = sorted(int(s) for s in steps)
    step_col = t.column("step").to_numpy()
    keep = np.isin(step_col, np.asarray(steps, dtype=np.int64))
    if not keep.all():
        t, step_col = t.filter(pa.array(keep)), step_col[keep]
    layer_col = t.column("layer").combine_chunks().dictionary_encode()  # a no-op on dictionary input
    split_col = t.column("split").combine_chunks().dictionary_encode()
    layer_names, split_names = layer_col.dictionary.to_pylist(), split_col.dictionary.to_pylist()
    n_steps, n_splits = len(steps), len(split_names)
    group = (layer_col.indices.to_numpy().astype(np.int64) * n_steps
             + np.searchsorted(np.asarray(steps, dtype=np.int64), step_col)) * n_splits + split_col.indices.to_numpy()
    by_bytes: dict[int, list[int]] = {}
    for li, name in enumerate(layer_names):
        if name in widths:
            by_bytes.setdefault((widths[name] + 7) // 8, []).append(li)
    bits_col = t.column("bits")
    rows: dict[str, list[Any]] = {k: [] for k in dt_tasks.PATTERN_COUNTS.names}
    for nbytes, layer_ids in by_bytes.items():
        if len(layer_ids) == len(layer_names):
            sel, bits = None, binary_rows(bits_col, nbytes)  # every row: no gather
        else:
            sel = np.flatnonzero(np.isin(layer_col.indices.to_numpy(), layer_ids))
            bits = binary_rows(bits_col.take(pa.array(sel)), nbytes)  # layers of other widths too
        c = pat.distinct_counts(bits, group if sel is None else group[sel])
        for g, n, nd, ns in zip(c.group.tolist(), c.n_samples.tolist(), c.n_distinct.tolist(), c.n_shared.tolist()):
            li, rest = divmod(g, n_steps * n_splits)
            layer = layer_names[li]
            for k, v in (("step", steps[rest // n_splits]), ("layer", layer), ("split", split_names[rest % n_splits]),
                         ("n_samples", n), ("n_distinct", nd), ("n_shared", ns), ("churn_samples", None),
                         ("churn_changed", None), ("churn_hamming_sum", None), ("width", widths[layer])):
                rows[k].append(v)
    return pa.table(rows, schema=dt_tasks.PATTERN_COUNTS)


def proto_pattern_task(run_dir: str, steps: Sequence[int], source_filter: bool = True) -> dict[str, pa.Table]:
    run = open_run(run_dir)
    lo, hi = min(steps), max(steps)
    expr = (ds.field("step") >= lo) & (ds.field("step") <= hi)
    t = _proto_table(run, "patterns", (ds.field("source") == "probe") & expr if source_filter else expr,
                     ["step", "layer", "split", "bits"])
    return {"patterns": proto_pattern_stats(t, run.widths, steps)}


def proto_analyze(run_dir: str, tasks_per_cpu: int = 2, skip_source_filter: bool = False) -> dict[str, pa.Table]:
    """See "prototypes"; ``skip_source_filter``: leave out ``source == "probe"`` (driver and
    tasks) when the row-group statistics prove that every row is a probe row."""
    import ray

    from dynatrack.parallel.analyze import _concat

    run = open_run(run_dir)
    source_filter = not (skip_source_filter and run.only_value("patterns", "source", "probe"))
    steps = proto_recorded_steps(run, source_filter)
    # cluster_resources, not available_resources: right after earlier tasks finish the latter
    # often lacks "CPU" for a moment, and analyze_run then plans tasks for 1 CPU
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    fn = ray.remote(num_cpus=1)(proto_pattern_task)
    parts = ray.get([fn.remote(run.path, chunk, source_filter) for chunk in plan_step_ranges(steps, cpus * tasks_per_cpu)])
    results = _concat(parts)
    for name, table in results.items():
        write_analysis(run, name, table)
    return results


def _counts(t: pa.Table) -> dict[tuple[int, str], int]:
    return {(int(s), str(layer)): int(c) for s, layer, c in
            zip(*(t.column(k).to_pylist() for k in ("step", "layer", "n_distinct")))}


# --------------------------------------------------------------------------- profile


def _cprofile(fn: Callable[[], Any]) -> tuple[float, dict[str, float]]:
    """Wall time of ``fn()`` and the cumulative seconds (and, as ``<name>#calls``, the call
    counts) of each function under it."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    wall = time.perf_counter() - t0
    cum: dict[str, float] = {}
    for (filename, _line, func), (_cc, nc, _tt, ct, _callers) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        name = f"{os.path.basename(filename)}:{func}"
        cum[name] = cum.get(name, 0.0) + ct
        cum[f"{name}#calls"] = cum.get(f"{name}#calls", 0.0) + nc
    return wall, cum


def _pick(cum: dict[str, float], *names: str) -> float:
    return sum(v for k, v in cum.items() if k in names)


def profile(run_dir: str, reps: int) -> dict[str, Any]:
    """Where ``analyze_run``'s time goes (medians over ``reps``, seconds).

    * ``driver``: ``analyze_run`` under cProfile in this process; ``ray_wait`` is the
      time the driver waits on the tasks (``_gather``).
    * ``tasks_1core``: the same ``pattern_task`` calls run here one after the other on
      one core (Arrow pool at 1 thread), under cProfile: ``read`` is ``Run.table``,
      ``take`` the per-layer gather of the bits, ``distinct_counts`` the pure kernel,
      ``stats_other`` the rest of ``pattern_stats`` (column conversions, codes, rows).
    * ``ray_overhead_est``: ``ray_wait - tasks_total / num_cpus`` (scheduling, worker
      start-up of the Arrow pool, returns; also contention for the 2 cores).
    * ``proto_tasks_1core``: the prototype task (see "prototypes") the same way.
    """
    import ray

    cfg = AnalyzeConfig(analyzers=("patterns",), churn=False, network=False)
    run = open_run(run_dir)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    steps = run.recorded_steps("patterns", source="probe")
    chunks = plan_step_ranges(steps, cpus * 2)
    noop = ray.remote(num_cpus=1)(_noop_fn)
    res: dict[str, list[float]] = {}

    def add(name: str, v: float) -> None:
        res.setdefault(name, []).append(v)

    for _ in range(reps):
        wall, cum = _cprofile(lambda: analyze_run(run_dir, config=cfg, progress=False))
        add("driver.total", wall)
        add("driver.list_steps", _pick(cum, "reader.py:recorded_steps"))
        add("driver.list_steps_calls", _pick(cum, "reader.py:recorded_steps#calls"))
        add("driver.ray_wait", _pick(cum, "analyze.py:_gather"))
        add("driver.concat_sort", _pick(cum, "analyze.py:_concat"))
        add("driver.write_analysis", _pick(cum, "analyze.py:write_analysis"))
        add("driver.other", wall - _pick(cum, "reader.py:recorded_steps", "analyze.py:_gather", "analyze.py:_concat",
                                           "analyze.py:write_analysis"))
        with one_arrow_cpu():
            wall, cum = _cprofile(lambda: [pattern_task(run_dir, c, None, False, False) for c in chunks])
            read, stats = _pick(cum, "reader.py:table"), _pick(cum, "tasks.py:pattern_stats")
            dc, take = _pick(cum, "patterns.py:distinct_counts"), _pick(cum, "compute.py:take")
            add("tasks_1core.total", wall)
            add("tasks_1core.read", read)
            add("tasks_1core.take", take)
            add("tasks_1core.distinct_counts", dc)
            add("tasks_1core.stats_other", stats - dc - take)
            add("tasks_1core.other", wall - read - stats)
            add("ray_overhead_est", res["driver.ray_wait"][-1] - wall / cpus)
            wall, cum = _cprofile(lambda: [proto_pattern_task(run_dir, c) for c in chunks])
            read, stats = _pick(cum, "bench_patterns.py:_proto_table"), _pick(cum, "bench_patterns.py:proto_pattern_stats")
            dc = _pick(cum, "patterns.py:distinct_counts")
            add("proto_tasks_1core.total", wall)
            add("proto_tasks_1core.read", read)
            add("proto_tasks_1core.distinct_counts", dc)
            add("proto_tasks_1core.stats_other", stats - dc)
        add("proto_driver.list_steps", _timed(lambda: proto_recorded_steps(open_run(run_dir)))[0])
        add("ray_noop_tasks_wall", _timed(lambda: ray.get([noop.remote() for _ in chunks]))[0])
    files = run.files("patterns")
    out: dict[str, Any] = {}
    for name, values in res.items():
        head, _, tail = name.partition(".")
        if tail:
            out.setdefault(head, {})[tail] = _med(values)
        else:
            out[name] = _med(values)
    meta = pq.ParquetFile(files[0].path).metadata
    out["layout"] = {"n_tasks": len(chunks), "rows_per_task": n_rows_of(run) // len(chunks), "files": len(files),
                     "row_groups_per_file": meta.num_row_groups, "bytes_on_disk": sum(f.size for f in files),
                     "bits_encodings": list(meta.row_group(0).column(5).encodings)}
    return out


def n_rows_of(run: Any) -> int:
    return sum(pq.ParquetFile(f.path).metadata.num_rows for f in run.files("patterns"))


def _noop_fn() -> int:
    return 0


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "dynatrack-bench-patterns"))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16384, help="probe samples per rank")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--pool", type=int, default=65536, help="distinct patterns to draw from (max)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--no-polars", action="store_true", help="skip the Polars reference arm")
    parser.add_argument("--no-proto", action="store_true", help="skip the prototype and tasks_per_cpu=1 arms")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1M rows, 3 repetitions")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.reps = 16, 3
    logging.getLogger("ray").setLevel(logging.ERROR)

    import ray

    p = _params(args)
    t0 = time.perf_counter()
    run_dir, built = build_run(args.data_dir, p)
    build_s = time.perf_counter() - t0
    shutil.rmtree(os.path.join(run_dir, ANALYSIS), ignore_errors=True)  # earlier results of this benchmark
    n_rows = p["ranks"] * p["steps"] * p["layers"] * p["samples"]

    t0 = time.perf_counter()
    # address="local": a fresh local Ray even when another `ray start` cluster runs on this machine
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, configure_logging=False)
    ray_init_s = time.perf_counter() - t0
    load_before = os.getloadavg()
    _count_planned_tasks()
    try:
        run = open_run(run_dir)
        arms: dict[str, Callable[[], Any]] = {"duckdb": lambda: duckdb_counts(run_dir),
                                               "dynatrack": lambda: dynatrack_counts(run_dir)}
        if not args.no_polars:
            try:
                import polars  # noqa: F401

                arms["polars"] = lambda: polars_counts(run_dir)
            except ImportError:
                pass
        # the pure functions on data already in memory (read once, untimed), one core
        table = run.table("patterns", filter=ds.field("source") == "probe",
                          columns=["step", "layer", "split", "sample_id", "bits"])
        steps = run.recorded_steps("patterns", source="probe")
        widths = run.widths
        layer_np = table.column("layer").to_numpy(zero_copy_only=False)
        step_np = table.column("step").to_numpy()
        bits_by_layer = {}
        for layer in widths:
            sel = np.flatnonzero(layer_np == layer)
            bits = binary_rows(table.column("bits").take(pa.array(sel)), (widths[layer] + 7) // 8)
            bits_by_layer[layer] = (np.ascontiguousarray(bits), step_np[sel])

        def pure() -> dict[tuple[int, str], int]:
            with one_arrow_cpu():
                return _counts(pattern_stats(table, widths, steps, None, churn=False, network=False)["patterns"])

        def distinct_only() -> dict[tuple[int, str], int]:
            out = {}
            for layer, (bits, group) in bits_by_layer.items():
                c = pat.distinct_counts(bits, group)
                out.update({(int(g), layer): int(nd) for g, nd in zip(c.group, c.n_distinct)})
            return out

        arms["pure_pattern_stats_1core"] = pure
        arms["pure_distinct_counts_1core"] = distinct_only
        if not args.no_proto:
            arms["dynatrack_tasks_per_cpu_1"] = lambda: dynatrack_counts(run_dir, tasks_per_cpu=1)
            arms["proto_analyze"] = lambda: _counts(proto_analyze(run_dir)["patterns"])
            arms["proto_analyze_skip_source_filter"] = lambda: _counts(
                proto_analyze(run_dir, skip_source_filter=True)["patterns"])

        results: dict[str, Any] = {name: fn() for name, fn in arms.items()}  # warm-up (Ray workers, caches)
        times: dict[str, list[float]] = {name: [] for name in arms}
        cpu: dict[str, list[float]] = {name: [] for name in arms}
        names = list(arms)
        for rep in range(args.reps):
            for name in (names if rep % 2 == 0 else names[::-1]):
                c0 = tree_cpu_seconds()
                dt, results[name] = _timed(arms[name])
                c1 = tree_cpu_seconds()
                times[name].append(dt)
                if c0 is not None and c1 is not None:
                    cpu[name].append(c1 - c0)
        load_after = os.getloadavg()

        duck = results["duckdb"]
        med = {name: _med(v) for name, v in times.items()}
        ratio = med["dynatrack"] / med["duckdb"]
        distinct = sorted(duck.values())
        out: dict[str, Any] = {
            "benchmark": "distinct patterns per (step, layer): dynatrack analyze_run on warm Ray vs DuckDB",
            "rows": n_rows,
            "groups": len(duck),
            "bytes_per_pattern": (p["width"] + 7) // 8,
            "distinct_per_group": {"min": distinct[0], "median": int(np.median(distinct)), "max": distinct[-1]},
            "params": p,
            "run_dir": run_dir,
            "data_built_now": built,
            "data_build_s": round(build_s, 2),
            "ray_init_s": round(ray_init_s, 2),
            "reps": args.reps,
            "median_s": med,
            "all_s": {name: [round(x, 4) for x in v] for name, v in times.items()},
            "median_cpu_s": {name: _med(v) for name, v in cpu.items() if v},
            "cpu_ratio": round(statistics.median(cpu["dynatrack"]) / statistics.median(cpu["duckdb"]), 3)
            if cpu["dynatrack"] and cpu["duckdb"] else None,
            "ratio": round(ratio, 3),
            "target_ratio": 1.0,
            "meets_target": ratio <= 1.0,
            "counts_equal": results["dynatrack"] == duck,
            "dynatrack_tasks_planned": {f"tasks_per_cpu={k}": v for k, v in PLANNED.items()},
            "counts_equal_by_arm": {name: results[name] == duck for name in names if name != "duckdb"},
            "ratios_vs_duckdb": {name: round(med[name] / med["duckdb"], 3) for name in names if name != "duckdb"},
            "anchors": ANCHORS,
            "dynatrack_vs_anchor_duckdb": round(med["dynatrack"] / ANCHORS["duckdb_s"], 3),
            "dynatrack_vs_anchor_polars": round(med["dynatrack"] / ANCHORS["polars_s"], 3),
            "duckdb_vs_anchor_duckdb": round(med["duckdb"] / ANCHORS["duckdb_s"], 3),
            "machine": {"cpus": os.cpu_count(), "ray_num_cpus": args.num_cpus, "python": platform.python_version(),
                        "pyarrow": pa.__version__, "numpy": np.__version__, "ray": ray.__version__,
                        "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)]},
        }
        if not args.no_profile:
            out["profile"] = profile(run_dir, 3)
    finally:
        ray.shutdown()
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
