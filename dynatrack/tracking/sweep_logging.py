"""W&B views of a sweep comparison: one run per trial grouped by the sweep, plus a comparison run.

Per trial: W&B run id ``wandb_run_id(f"{sweep_id}-{trial_id}")`` (``resume="allow"``: a
re-comparison updates it), name = the same, ``group`` = sweep id, ``job_type="trial"``, config
keys ``batch_size``, ``per_worker_batch``, ``lr``, ``world_size``, ``seed``, ``budget`` (plus
``max_steps``, ``sweep_id``); its history is the trial's ``steps`` table (``train/loss``, mean over
ranks, and ``train/lr`` against ``trainer/step``); its summary the row of ``compare.parquet``
under ``compare/<metric>``. When ``dynatrack sweep`` already logged the trial's run (a run folder
with its id under ``<sweep>/wandb/``), only the summary values are added to it.

The comparison run (id ``<sweep_id>-compare``, ``job_type="compare"``) holds the tables
(``tables/compare``, ``tables/by_batch``, ``tables/tests``, ``tables/interpolation``), the plots as
``plots/<name>`` images and the p-values as summary keys ``p/<budget>/<metric>``.

A W&B failure is a warning: the Parquet results are written before any of this runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from dynatrack.tracking.wandb_logger import STEP_KEY, WandbResult, _to_wandb_table, wandb_run_id

logger = logging.getLogger(__name__)

CONFIG_KEYS = ("batch_size", "per_worker_batch", "lr", "world_size", "seed", "budget", "max_steps")


def trial_history(steps: pa.Table) -> list[dict[str, Any]]:
    """``[{trainer/step, train/loss, train/lr}]`` from a run's steps table, loss averaged over ranks."""
    by_step: dict[int, list[tuple[float | None, float | None]]] = {}
    for s, loss, lr in zip(*(steps.column(c).to_pylist() for c in ("step", "loss", "lr"))):
        by_step.setdefault(int(s), []).append((loss, lr))
    rows = []
    for s in sorted(by_step):
        losses = [v[0] for v in by_step[s] if v[0] is not None and math.isfinite(v[0])]
        lrs = [v[1] for v in by_step[s] if v[1] is not None]
        row: dict[str, Any] = {STEP_KEY: s}
        if losses:
            row["train/loss"] = sum(losses) / len(losses)
        if lrs:
            row["train/lr"] = max(lrs)
        rows.append(row)
    return rows


def log_sweep(
    sweep_id: str,
    sweep_dir: Path,
    trials: Sequence[Mapping[str, Any]],
    tables: Mapping[str, pa.Table],
    plots: Mapping[str, Path],
    *,
    project: str = "dynatrack",
    mode: str = "offline",
    wandb_dir: Path | None = None,
) -> dict[str, WandbResult]:
    """Log every finished trial and the comparison; returns ``{trial_id or "compare": result}``.

    A failure of one run is logged as a warning and skipped; the others still go.
    """
    from dynatrack.store import open_run

    rows = {r["trial_id"]: r for r in tables["compare"].to_pylist()}
    out: dict[str, WandbResult] = {}
    for t in trials:
        if not t.get("finished"):
            continue
        tid = t["trial_id"]
        try:
            # the sweep driver may have logged this trial's run already (history, config): then only
            # the comparison's summary values are added to it (same id, resume="allow")
            logged = _has_local_run(wandb_dir, wandb_run_id(f"{sweep_id}-{tid}"))
            history = [] if logged else trial_history(open_run(sweep_dir / tid).steps())
            summary = {f"compare/{k}": v for k, v in rows.get(tid, {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
            config = {**{k: t[k] for k in CONFIG_KEYS if k in t}, "sweep_id": sweep_id, "trial_id": tid}
            name = f"{sweep_id}-{tid}"
            out[tid] = _log_run(name, name, sweep_id, "trial", config, history, summary, {}, {},
                                project=project, mode=mode, wandb_dir=wandb_dir)
        except Exception as exc:  # noqa: BLE001 - W&B is a view; compare.parquet is the record
            logger.warning("W&B logging of trial %s failed (%s: %s); compare.parquet is unaffected",
                           tid, type(exc).__name__, exc)
    try:
        named = {"compare": tables["compare"], "by_batch": tables["compare_by_batch"],
                 "tests": tables["compare_tests"], "interpolation": tables["compare_interpolation"]}
        p_values = {f"p/{r['budget']}/{r['metric']}": r["p"] for r in tables["compare_tests"].to_pylist()
                    if r["p"] is not None and math.isfinite(r["p"])}
        out["compare"] = _log_run(f"{sweep_id}-compare", f"{sweep_id}-compare", sweep_id, "compare",
                                  {"sweep_id": sweep_id, "sweep_dir": str(sweep_dir)}, [], p_values,
                                  {k: v for k, v in named.items() if v.num_rows}, dict(plots),
                                  project=project, mode=mode, wandb_dir=wandb_dir)
    except Exception as exc:  # noqa: BLE001
        logger.warning("W&B logging of the comparison of %s failed (%s: %s); the Parquet files are unaffected",
                       sweep_id, type(exc).__name__, exc)
    return out


def _has_local_run(wandb_dir: Path | None, wb_id: str) -> bool:
    if wandb_dir is None or not (wandb_dir / "wandb").is_dir():
        return False
    return any(p.is_dir() and p.name.endswith(f"-{wb_id}") and p.name.split("-", 1)[0] in ("offline", "run")
               for p in (wandb_dir / "wandb").iterdir())


def _log_run(
    run_id: str, name: str, group: str, job_type: str, config: Mapping[str, Any], history: list[dict[str, Any]],
    summary: Mapping[str, Any], tables: Mapping[str, pa.Table], images: Mapping[str, Path], *, project: str,
    mode: str, wandb_dir: Path | None,
) -> WandbResult:
    import wandb

    if wandb_dir is not None:
        wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, id=wandb_run_id(run_id), name=name, group=group, job_type=job_type,
                     resume="allow", reinit="create_new", mode=mode,  # type: ignore[arg-type]
                     dir=None if wandb_dir is None else str(wandb_dir), config=dict(config),
                     settings=wandb.Settings(silent=True, console="off", disable_git=True))
    exit_code = 1
    try:
        if history:
            run.define_metric(STEP_KEY)
            run.define_metric("train/*", step_metric=STEP_KEY)
            for row in history:
                run.log(row)
        extra: dict[str, Any] = {f"tables/{k}": _to_wandb_table(t) for k, t in tables.items()}
        extra.update({f"plots/{k}": wandb.Image(str(p)) for k, p in images.items()})
        if extra:
            run.log(extra)
        if summary:
            run.summary.update(dict(summary))
        exit_code = 0
        return WandbResult(run_id=run.id, run_dir=Path(run.settings.sync_dir), mode=mode,  # type: ignore[arg-type]
                           url=run.url if mode == "online" else None)
    finally:
        run.finish(exit_code=exit_code)
