"""Run the analyzers over a run directory on Ray, write Parquet, log to W&B.

>>> tables = analyze_run("runs/<run_id>")                       # doctest: +SKIP
>>> tables = analyze_run("runs/<run_id>", address="auto")       # an existing cluster  # doctest: +SKIP

One Ray task per step range: pattern tasks read all ranks' rows of their steps
(plus the step before, for churn); weight tasks load each checkpoint once.
Results of disjoint step ranges are concatenated (every stored column is a
count or a per-row value), written to ``<run>/analysis/<name>.parquet`` and
then, separately, logged to W&B: a W&B failure never loses the Parquet results.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynatrack.parallel import early, zonotope_tasks
from dynatrack.parallel.cluster import ray_session
from dynatrack.parallel.tasks import NETWORK, AnalyzeConfig, pattern_task, weight_analyzers_support, weights_task
from dynatrack.store.fs import RunLocation
from dynatrack.store.reader import Run, RunError, open_run
from dynatrack.store.schema import ANALYSIS

log = logging.getLogger(__name__)

TASK_RETRIES = 3
"""Ray retries of an analysis task whose worker process died (killed, OOM, node lost); the tasks only
read the run directory and return tables, so a retry computes the same result. An exception raised by
the task itself is not retried (it would fail again)."""


def plan_step_ranges(steps: Sequence[int], n_tasks: int) -> list[list[int]]:
    """Split sorted ``steps`` into at most ``n_tasks`` contiguous, near-equal ranges."""
    steps = sorted(steps)
    if not steps:
        return []
    n_tasks = max(1, min(n_tasks, len(steps)))
    return [list(part) for part in np.array_split(np.asarray(steps), n_tasks) if len(part)]


def write_analysis(run: Run, name: str, table: pa.Table) -> str:
    """Write ``analysis/<name>.parquet`` atomically; an earlier result is moved, never lost.

    The previous file goes to ``analysis/previous/<name>-<unix time>.parquet``.
    """
    loc: RunLocation = run.loc
    rel = f"{ANALYSIS}/{name}.parquet"
    if loc.exists(rel):
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = f"{ANALYSIS}/previous/{name}-{stamp}.parquet"
        k = 1
        while loc.exists(target):
            target = f"{ANALYSIS}/previous/{name}-{stamp}-{k}.parquet"
            k += 1
        loc.mkdir(f"{ANALYSIS}/previous")
        loc.fs.move(loc.join(rel), loc.join(target))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    loc.write_bytes_atomic(rel, buf.getvalue())
    return loc.join(rel)


def analyze_run(
    run_dir: str,
    *,
    config: AnalyzeConfig | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    tasks_per_cpu: int = 2,
    progress: bool = True,
) -> dict[str, pa.Table]:
    """Compute the configured analyzers for one run on Ray and write their Parquet files.

    Args:
        run_dir: the run directory (``<root>/<run_id>``).
        config: what to compute (:class:`~dynatrack.parallel.tasks.AnalyzeConfig`).
        address: ``None`` for a local Ray started and stopped here (``num_cpus``
            respected), or an existing cluster (``"auto"``, ``host:port``).
        tasks_per_cpu: step ranges per available CPU (load balance vs. overhead).

    Returns the result tables by name (also written to ``<run>/analysis/``), with
    ``"skipped"``: one row ``(analyzer, reason)`` per analyzer that does not apply to the
    model (regions on a CNN); the others run. Weight analyses rebuild the model from the
    run's stored description (``model/``); ``config.trust_model_code`` allows importing the
    class the manifest names where none is usable.
    Checks the run, the requested steps, the checkpoints and the model before starting Ray.
    """
    cfg = config or AnalyzeConfig()
    run = open_run(run_dir)
    recorded = run.recorded_steps("patterns", source="probe") if "patterns" in cfg.analyzers else []
    early_plan = early.plan(run, cfg)  # partitions, early_stage: skipped with a reason when they do not apply
    zono_plan = zonotope_tasks.plan(run, cfg)  # zonotope, expressiveness: likewise
    # a skipped analyzer is reported with its reason below, not as "nothing to analyze"
    pattern_steps, weight_steps = _steps_to_analyze(run, cfg, recorded, bool(
        early_plan.partition_steps or early_plan.early_steps or early_plan.skipped
        or zono_plan.zonotope_steps or zono_plan.expressiveness_steps or zono_plan.skipped))
    weight_kinds = [a for a in cfg.analyzers if a in ("regions", "local_complexity")]
    skipped: dict[str, str] = {**early_plan.skipped, **zono_plan.skipped}  # each plan logged its own
    if weight_kinds and weight_steps:
        # before Ray: a run without a model description fails here, saying what to do; an
        # analyzer that does not apply to this model (regions on a CNN) is skipped with its reason
        weight_skipped = weight_analyzers_support(run, weight_kinds, weight_steps[0], trust_model_code=cfg.trust_model_code)
        for name, reason in weight_skipped.items():
            log.warning("analyzer %s skipped for %s: %s", name, run.run_id, reason)
        skipped.update(weight_skipped)
        weight_kinds = [a for a in weight_kinds if a not in weight_skipped]
        if weight_kinds:
            run.probe_inputs(cfg.split)  # and on a run without the stored probe split
    if set(cfg.analyzers) <= set(skipped):
        # nothing asked for applies: say why, rather than write an empty analysis
        raise RunError("; ".join(f"{k} does not apply: {v}" for k, v in skipped.items()))
    parts = _run_tasks(run, cfg, address, num_cpus, tasks_per_cpu, progress, recorded, pattern_steps,
                       weight_kinds if weight_steps else [], weight_steps, early_plan, zono_plan)
    results = zonotope_tasks.finish(run, early.finish(run, cfg, _concat(parts)))
    results[SKIPPED] = pa.table({"analyzer": list(skipped), "reason": list(skipped.values())}, schema=SKIPPED_SCHEMA)
    for name, table in results.items():
        write_analysis(run, name, table)
    return results


def _run_tasks(
    run: Run, cfg: AnalyzeConfig, address: str | None, num_cpus: int | None, tasks_per_cpu: int, progress: bool,
    recorded: list[int], pattern_steps: list[int], weight_kinds: list[str], weight_steps: list[int],
    early_plan: early.Plan, zono_plan: zonotope_tasks.Plan | None = None,
) -> list[dict[str, pa.Table]]:
    if not ("patterns" in cfg.analyzers and pattern_steps) and not weight_kinds and not (
            early_plan.partition_steps or early_plan.early_steps) and not (
            zono_plan and (zono_plan.zonotope_steps or zono_plan.expressiveness_steps)):
        return []  # nothing left to compute: no Ray to start
    with ray_session(address, num_cpus=num_cpus):
        import ray

        # cluster_resources: available_resources() often lacks "CPU" right after earlier tasks
        # finished (a warm Ray), which planned tasks for a single CPU
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n_tasks = cpus * tasks_per_cpu
        pattern_fn = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(pattern_task)
        weights_fn = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(weights_task)
        refs: list[Any] = []
        if "patterns" in cfg.analyzers:
            all_steps = recorded
            for chunk in plan_step_ranges(pattern_steps, n_tasks):
                i = all_steps.index(chunk[0])
                prev = all_steps[i - 1] if i > 0 else None
                refs.append(pattern_fn.remote(run.path, chunk, prev, cfg.churn, cfg.network))
        if weight_kinds:
            cfg_dict = cfg.to_dict()
            for chunk in plan_step_ranges(weight_steps, n_tasks):
                refs.append(weights_fn.remote(run.path, chunk, cfg_dict, weight_kinds))
        refs += early.submit(run, cfg, early_plan, n_tasks)
        refs += zonotope_tasks.submit(run, cfg, zono_plan, n_tasks) if zono_plan else []
        return _gather(refs, progress)


SKIPPED = "skipped"  # results[SKIPPED]: one row per analyzer that did not apply to the model, with the reason
SKIPPED_SCHEMA = pa.schema([("analyzer", pa.string()), ("reason", pa.string())])


def skipped_analyzers(results: dict[str, pa.Table]) -> dict[str, str]:
    """``{analyzer: reason}`` of the analyzers that were skipped (``results["skipped"]``)."""
    t = results.get(SKIPPED)
    return {} if t is None else dict(zip(t.column("analyzer").to_pylist(), t.column("reason").to_pylist()))


def _steps_to_analyze(run: Run, cfg: AnalyzeConfig, recorded: list[int], others: bool = False) -> tuple[list[int], list[int]]:
    pattern_steps = list(recorded) if "patterns" in cfg.analyzers else []
    ckpt_steps = run.checkpoint_steps()
    weight_steps = ckpt_steps if any(a in cfg.analyzers for a in ("regions", "local_complexity")) else []
    if cfg.steps is not None:
        wanted = sorted(set(int(s) for s in cfg.steps))
        if "patterns" in cfg.analyzers:
            missing = sorted(set(wanted) - set(pattern_steps))
            if missing:
                raise RunError(f"steps {missing} have no probe patterns in {run.path!r}; recorded: {pattern_steps}")
            pattern_steps = wanted
        if weight_steps:
            missing = sorted(set(wanted) - set(ckpt_steps))
            if missing:
                raise RunError(
                    f"run {run.path!r} has no checkpoint for steps {missing} (checkpointed: {ckpt_steps}); "
                    "region and local-complexity analyses need the weights of every requested step"
                )
            weight_steps = wanted
    if not pattern_steps and not weight_steps and not others:
        raise RunError(f"run {run.path!r} has nothing to analyze for {list(cfg.analyzers)} "
                       "(no probe patterns and no checkpoints)")
    return pattern_steps, weight_steps


def _gather(refs: list[Any], progress: bool, console: Any = None, label: str = "analysis tasks") -> list[Any]:
    """Wait for all tasks (``ray.wait``, not ``ray.get`` in a loop), showing ``label`` done/total.

    On a terminal the bar updates live; elsewhere (a log file, CI) its final state is one line.
    """
    import ray

    if not refs:
        return []
    pending = list(refs)
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)
        bar.start()
        task = bar.add_task(label, total=len(refs))
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            if bar is not None:
                bar.update(task, advance=len(ready))
        values = ray.get(refs)
    finally:
        if bar is not None:
            bar.stop()
    return list(values)


def _concat(parts: list[dict[str, pa.Table]]) -> dict[str, pa.Table]:
    names: dict[str, list[pa.Table]] = {}
    for part in parts:
        for name, table in part.items():
            names.setdefault(name, []).append(table)
    out = {}
    for name, tables in names.items():
        t = pa.concat_tables(tables)
        sort = [(c, "ascending") for c in ("step", "layer", "split", "kind", "item", "neuron", "radius", "sample_id")
                if c in t.column_names]
        out[name] = t.sort_by(sort)
    return out


# -- what goes to W&B ---------------------------------------------------------------------------------


def wandb_views(results: dict[str, pa.Table]) -> tuple[dict[str, pa.Table], dict[str, list[str]], dict[str, pa.Table]]:
    """Step-indexed series (ratios taken here, at the end) and per-layer summary tables."""
    views: dict[str, pa.Table] = {}
    dims: dict[str, list[str]] = {}
    summaries: dict[str, pa.Table] = {}
    if "patterns" in results:
        t = results["patterns"]
        n = pc.cast(t.column("n_samples"), pa.float64())
        cn = pc.cast(t.column("churn_samples"), pa.float64())
        layer = pc.if_else(pc.equal(t.column("layer"), NETWORK), "network", t.column("layer"))
        views["patterns"] = pa.table({
            "step": t.column("step"), "layer": layer, "split": t.column("split"),
            "distinct": t.column("n_distinct"),
            "distinct_fraction": pc.divide(pc.cast(t.column("n_distinct"), pa.float64()), n),
            "shared_fraction": pc.divide(pc.cast(t.column("n_shared"), pa.float64()), n),
            "churn_hamming_mean": pc.divide(pc.cast(t.column("churn_hamming_sum"), pa.float64()), cn),
            "churn_changed_fraction": pc.divide(pc.cast(t.column("churn_changed"), pa.float64()), cn),
        })
        dims["patterns"] = ["layer", "split"]
        last = pc.max(t.column("step")).as_py()
        final = t.filter(pc.equal(t.column("step"), last))
        summaries["patterns_final"] = final.select(["layer", "split", "n_samples", "n_distinct", "n_shared", "width"])
    if "regions" in results and results["regions"].num_rows:
        t = results["regions"]
        g = t.group_by(["step", "kind"]).aggregate([("count", "mean"), ("normalized", "mean")])
        rows: dict[str, dict[int, float]] = {}
        for step, kind, c, nrm in zip(*(g.column(k).to_pylist() for k in ("step", "kind", "count_mean", "normalized_mean"))):
            rows.setdefault(f"{kind}_mean", {})[step] = c
            rows.setdefault(f"{kind}_normalized", {})[step] = nrm
        steps = sorted({s for v in rows.values() for s in v})
        views["regions"] = pa.table({"step": steps, **{k: [v.get(s) for s in steps] for k, v in rows.items()}})
        dims["regions"] = []
    if "boundary_distance" in results and results["boundary_distance"].num_rows:
        t = results["boundary_distance"]
        g = t.group_by(["step"]).aggregate([("distance", "mean"), ("distance", "approximate_median")])
        views["boundary"] = pa.table({"step": g.column("step"), "distance_mean": g.column("distance_mean"),
                                      "distance_median": g.column("distance_approximate_median")})
        dims["boundary"] = []
    if "local_complexity" in results and results["local_complexity"].num_rows:
        t = results["local_complexity"]
        views["local_complexity"] = pa.table({
            "step": t.column("step"), "layer": t.column("layer"),
            "radius": pc.binary_join_element_wise("r=", pc.cast(t.column("radius"), pa.string()), ""),
            "mean": pc.divide(pc.cast(t.column("lc_sum"), pa.float64()), pc.cast(t.column("n_samples"), pa.float64())),
        })
        dims["local_complexity"] = ["layer", "radius"]
    early.wandb_views(results, views, dims)
    zonotope_tasks.wandb_views(results, views, dims)
    return views, dims, summaries


def log_results(
    run: Run,
    results: dict[str, pa.Table],
    *,
    mode: str = "offline",
    project: str = "dynatrack",
    group: str | None = None,
    wandb_dir: str | None = None,
    config: dict[str, Any] | None = None,
    init_timeout: float | None = None,
) -> Any:
    """Write the plots (``<run>/plots/*.png``) and the workspace spec, then log the result tables,
    the training curves, the partition sizes and the plots to W&B (warning on failure; the
    Parquet files are already written)."""
    from dynatrack.tracking import history_rows, log_analysis
    from dynatrack.tracking.dashboard import plot_tables, run_views, write_plots, write_workspace
    from dynatrack.tracking.wandb_logger import INIT_TIMEOUT, PLOTS_PREFIX, TABLES_PREFIX, resolve_mode

    views, dims, summaries = wandb_views(results)
    skipped = {f"{SKIPPED}/{name}": reason for name, reason in skipped_analyzers(results).items()}
    train_views, train_dims, partitions = run_views(run)
    views, dims = {**train_views, **views}, {**train_dims, **dims}
    cfg = config or {}
    images = write_plots(run, plot_tables(run, results, views, partitions, split=cfg.get("split", "train"),
                                          seed=cfg.get("seed", 0),
                                          trust_model_code=bool(cfg.get("trust_model_code", False))))
    if not views and not images and not skipped:
        return None
    res = log_analysis(views, dims=dims, run_id=run.run_id, project=project, group=group, mode=mode,  # type: ignore[arg-type]
                       wandb_dir=wandb_dir, config={"run_dir": run.path, **cfg},
                       summary_tables=summaries, images=images, summary=skipped,
                       init_timeout=INIT_TIMEOUT if init_timeout is None else init_timeout)
    keys = list(res.keys) if res is not None else [
        *(k for _, row in history_rows(views, dims) for k in row),
        *(f"{TABLES_PREFIX}/{k}" for k in summaries), *(f"{PLOTS_PREFIX}/{k}" for k in images)]
    write_workspace(run, keys, project=project, mode=resolve_mode(mode),  # type: ignore[arg-type]
                    entity=res.entity if res is not None else None)
    return res


def summary_rows(results: dict[str, pa.Table]) -> list[dict[str, Any]]:
    """A short per-step summary: whole-network distinct patterns, regions, local complexity."""
    by_step: dict[int, dict[str, Any]] = {}
    views, _, _ = wandb_views(results)
    if "patterns" in views:
        t = views["patterns"].filter(pc.equal(views["patterns"].column("layer"), "network"))
        for step, split, d, churn in zip(*(t.column(c).to_pylist() for c in ("step", "split", "distinct", "churn_hamming_mean"))):
            by_step.setdefault(step, {})[f"distinct ({split})"] = d
            if split == "train":
                by_step[step]["churn"] = None if churn is None or (isinstance(churn, float) and math.isnan(churn)) else round(churn, 2)
    if "regions" in views:
        t = views["regions"]
        for col in ("1d_mean", "2d_mean", "2d_normalized"):
            if col in t.column_names:
                for step, v in zip(t.column("step").to_pylist(), t.column(col).to_pylist()):
                    by_step.setdefault(step, {})[col.replace("_", " ")] = None if v is None else round(v, 3)
    if "local_complexity" in results:
        t = results["local_complexity"]
        g = t.group_by(["step", "radius"]).aggregate([("lc_sum", "sum"), ("n_samples", "max")])
        rmax = pc.max(g.column("radius")).as_py()
        for step, r, s, n in zip(*(g.column(c).to_pylist() for c in ("step", "radius", "lc_sum_sum", "n_samples_max"))):
            if r == rmax:
                by_step.setdefault(step, {})[f"LC r={r:g}"] = round(s / n, 2) if n else None
    early.summary_rows(results, by_step)
    return [{"step": s, **v} for s, v in sorted(by_step.items())]


#: Column legend of the printed summary table.
SUMMARY_LEGEND = (
    "step: training step (optimizer updates); distinct (split): distinct whole-network activation patterns "
    "among that split's probe samples; churn: mean Hamming distance of a train sample's pattern to the "
    "previous recorded step; 1d mean / 2d mean: exact linear regions per segment / per 2-D slice (mean over "
    "items); 2d norm: 2d mean / (N^2/2!), N hidden neurons; LC r=...: mean local complexity (neurons crossing "
    "the neighbourhood of radius r) at the largest radius, summed over layers"
)


def print_summary_table(results: dict[str, pa.Table], max_rows: int = 14, console: Any = None) -> None:
    """Print :func:`summary_rows` as a table; with more than ``max_rows`` steps, evenly spaced
    steps (always the first and last) and a title saying how many of how many are shown."""
    from rich.console import Console
    from rich.table import Table

    rows = summary_rows(results)
    total = len(rows)
    if len(rows) > max_rows:
        keep = sorted(set(np.linspace(0, len(rows) - 1, max_rows).round().astype(int).tolist()))
        rows = [rows[i] for i in keep]
    rename = {"2d normalized": "2d norm"}
    cols = ["step"] + sorted({k for r in rows for k in r if k != "step"})
    subset = f", {len(rows)} of {total} steps" if len(rows) < total else ""
    table = Table(title=f"analysis summary (whole network{subset})")
    for c in cols:
        table.add_column(rename.get(c, c), justify="right", overflow="fold")
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in cols))
    console = console or Console()
    console.print(table)
    console.print(SUMMARY_LEGEND, style="dim")


def analyze_and_report(
    run_dir: str,
    *,
    config: AnalyzeConfig | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    wandb_mode: str = "offline",
    project: str = "dynatrack",
    group: str | None = None,
    wandb_dir: str | None = None,
    wandb_init_timeout: float | None = None,
) -> dict[str, pa.Table]:
    """:func:`analyze_run`, then W&B logging and a printed summary (what the CLI and the demo do).

    The Parquet results are written before W&B is contacted; a W&B failure (an unreachable server
    online gives up after ``wandb_init_timeout`` seconds, default 30) is one warning and the results
    are returned as usual.
    """
    from rich.console import Console

    from dynatrack.tracking import resolve_mode

    resolve_mode(wandb_mode)  # "online" without credentials fails here, before any work  # type: ignore[arg-type]
    start = time.perf_counter()
    results = analyze_run(run_dir, config=config, address=address, num_cpus=num_cpus)
    elapsed = time.perf_counter() - start
    run = open_run(run_dir)
    print_summary_table(results)
    console = Console()
    console.print(f"analysis of {run.run_id} in {elapsed:.1f} s -> {run.loc.join(ANALYSIS)}/ "
                  f"({', '.join(sorted(n for n, t in results.items() if n != SKIPPED))})")
    for name, reason in skipped_analyzers(results).items():
        console.print(f"skipped {name}: {reason}", markup=False)
    res = log_results(run, results, mode=wandb_mode, project=project, group=group,
                      wandb_dir=wandb_dir or run.loc.join(ANALYSIS, "wandb") if _is_local(run) else wandb_dir,
                      config=(config or AnalyzeConfig()).to_dict(), init_timeout=wandb_init_timeout)
    if run.loc.exists("plots"):
        console.print(f"plots: {run.loc.join('plots')}/")
    if res is not None:
        console.print(f"W&B ({res.mode}): {res.run_dir}")
    return results


def _is_local(run: Run) -> bool:
    import pyarrow.fs as pafs

    return isinstance(run.loc.fs, pafs.LocalFileSystem)
