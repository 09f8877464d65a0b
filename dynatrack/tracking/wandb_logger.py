"""Log analyzer results to Weights & Biases, and read offline runs back.

W&B lives only in this module, and ``wandb`` is imported inside the functions
that need it (it is heavy). The Parquet results under ``<run>/analysis/`` are the
record of truth; W&B is a view of them, so a W&B failure is reported as a
warning and never loses or blocks results.

One analyzed training run is one W&B run. Analyzer tables follow one convention:
an int64 ``step`` column (optimizer updates), zero or more *dimension* columns
(``layer``, ``split``, ``radius``, ...), and numeric metric columns. Each
(analyzer, dimension values, metric) becomes one series keyed
``"<analyzer>/<dim value>/.../<metric>"`` against the x-axis ``trainer/step``.

Each analysis is a W&B run of its own: id ``<run id>-<UTC time>`` (see `analysis_run_id`),
display name = the training run's id, the same ``group``, and ``previous_analysis`` in its config
naming the W&B run of the analysis before it (found in the same ``wandb_dir``). A re-analysis
therefore never appends a second history whose ``trainer/step`` restarts at 0 to one run, offline
or online; in the W&B UI, filter or group by display name to compare analyses of one training run.

Example (offline, no account needed)::

    >>> import pyarrow as pa
    >>> patterns = pa.table({"step": [0, 10], "layer": ["fc1", "fc1"], "distinct": [5, 9]})
    >>> res = log_analysis({"patterns": patterns}, dims={"patterns": ["layer"]},
    ...                    run_id="digits-mlp-s0", group="digits", wandb_dir="/tmp/wb")
    >>> read_offline_run(res.run_dir)["history"][-1]["patterns/fc1/distinct"]
    9
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

logger = logging.getLogger(__name__)

Mode = Literal["offline", "online", "disabled", "auto"]
ResolvedMode = Literal["offline", "online", "disabled"]
OnError = Literal["warn", "raise"]

STEP_KEY = "trainer/step"
"""The x-axis of every analyzer series: the training step (number of optimizer updates)."""

INIT_TIMEOUT = 30.0
"""Seconds W&B may take to start a run (its own default, 90 s, is long for an unreachable server)."""

TABLES_PREFIX = "tables"
PLOTS_PREFIX = "plots"
_RESERVED_ANALYZERS = frozenset({"trainer", TABLES_PREFIX, PLOTS_PREFIX})
_MODES = ("offline", "online", "disabled", "auto")
_ID_ALLOWED = re.compile(r"[^A-Za-z0-9_.-]")
_ID_MAX_LEN = 64
_STAMP = "%Y%m%dT%H%M%S"
_RUN_FOLDER = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class TrackingError(RuntimeError):
    """W&B is misconfigured for the requested mode, or (with ``on_error="raise"``) W&B failed."""


@dataclass(frozen=True)
class WandbResult:
    """Where an analysis run went.

    Attributes:
        run_id: the W&B run id of this analysis, ``<sanitised run id>-<UTC time>``.
        run_dir: the local run folder, ``<wandb_dir>/wandb/offline-run-<time>-<id>`` offline or
            ``.../run-<time>-<id>`` online; it holds ``run-<id>.wandb`` (see `read_offline_run`).
        mode: ``"offline"`` or ``"online"``, after resolving ``"auto"``.
        url: the run's page on the W&B server (online only).
        previous: the W&B run id of the previous analysis of the same training run, if one
            was found in the same ``wandb_dir``.
        entity: the W&B entity (online only).
        keys: every history key logged (series, tables, images).
    """

    run_id: str
    run_dir: Path
    mode: Literal["offline", "online"]
    url: str | None = None
    previous: str | None = None
    entity: str | None = None
    keys: tuple[str, ...] = ()


def wandb_run_id(run_id: str, max_len: int = _ID_MAX_LEN) -> str:
    """Map a dynatrack run id onto W&B's run-id rules, deterministically.

    Characters other than letters, digits, ``_``, ``.`` and ``-`` become ``-``. When
    anything had to change (or the id is long), a short hash of the original is
    appended so that distinct run ids never share a W&B run.

    >>> wandb_run_id("digits-mlp-s0")
    'digits-mlp-s0'
    >>> wandb_run_id("exp/run:1")
    'exp-run-1-1619fcb0'
    """
    if not run_id or not run_id.strip():
        raise ValueError("run_id must be a non-empty string")
    clean = _ID_ALLOWED.sub("-", run_id.strip())
    if clean == run_id and len(clean) <= max_len:
        return clean
    digest = hashlib.sha1(run_id.encode()).hexdigest()[:8]
    return f"{clean[: max_len - 9]}-{digest}"


def analysis_run_id(run_id: str, wandb_dir: str | os.PathLike[str] | None = None,
                    *, now: float | None = None) -> tuple[str, str | None]:
    """``(W&B run id for a new analysis of run_id, W&B run id of the previous one or None)``.

    The new id is ``wandb_run_id(run_id)`` (at most 47 characters) + ``-`` + the UTC time
    (``20261207T013000``), with ``-2``, ``-3``, ... if that id already has a folder. Earlier
    analyses are the ``offline-run-*`` / ``run-*`` folders under ``<wandb_dir>/wandb`` whose id is
    the base id, alone (dynatrack < 0.2) or followed by such a suffix; the latest is returned.

    >>> analysis_run_id("digits-mlp-s0", "/nonexistent", now=0)
    ('digits-mlp-s0-19700101T000000', None)
    """
    base = wandb_run_id(run_id, max_len=_ID_MAX_LEN - 17)
    folders = []
    root = Path(wandb_dir) / "wandb" if wandb_dir is not None else None
    if root is not None and root.is_dir():
        for child in root.iterdir():
            m = _RUN_FOLDER.match(child.name)
            if m and (m.group(2) == base or re.fullmatch(re.escape(base) + r"-\d{8}T\d{6}(-\d+)?", m.group(2))):
                folders.append((m.group(1), m.group(2)))
    taken = {rid for _, rid in folders}
    stamp = time.strftime(_STAMP, time.gmtime(time.time() if now is None else now))
    wb_id, k = f"{base}-{stamp}", 2
    while wb_id in taken:
        wb_id, k = f"{base}-{stamp}-{k}", k + 1
    previous = max(folders)[1] if folders else None
    return wb_id, previous


def resolve_mode(mode: Mode) -> ResolvedMode:
    """Decide the W&B mode to run in, raising before any work if it cannot be honoured.

    ``"auto"``: W&B's own ``WANDB_MODE=offline|disabled`` wins when set; otherwise
    ``"online"`` when W&B finds credentials (``WANDB_API_KEY``, an identity-token file,
    a ``.netrc`` entry or ``wandb login``), else ``"offline"``. ``"online"`` without
    credentials raises `TrackingError`. Credentials are looked up, never verified with
    the server (no network) and never printed.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if mode in ("offline", "disabled"):
        return mode
    if mode == "auto":
        env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if env_mode in ("offline", "dryrun", "disabled"):
            return "disabled" if env_mode == "disabled" else "offline"
    problem = _credentials_problem()
    if problem is None:
        return "online"
    if mode == "auto":
        logger.info("W&B not configured (%s); logging offline", problem)
        return "offline"
    raise TrackingError(
        f"W&B mode='online' was requested but {problem}. Run `wandb login` (or set "
        "WANDB_API_KEY) first, or use mode='offline' and `wandb sync` the run later."
    )


def log_analysis(
    results: Mapping[str, pa.Table],
    *,
    dims: Mapping[str, Sequence[str]],
    run_id: str,
    project: str = "dynatrack",
    group: str | None = None,
    mode: Mode = "offline",
    wandb_dir: str | os.PathLike[str] | None = None,
    config: Mapping[str, Any] | None = None,
    summary_tables: Mapping[str, pa.Table] | None = None,
    images: Mapping[str, str | os.PathLike[str]] | None = None,
    summary: Mapping[str, Any] | None = None,
    rank: int = 0,
    on_error: OnError = "warn",
    init_timeout: float = INIT_TIMEOUT,
    wandb_id: str | None = None,
    job_type: str = "analysis",
) -> WandbResult | None:
    """Log analyzer result tables of one training run as one W&B run (``job_type``: W&B's run type,
    ``"analysis"``; a sweep's per-trial runs say ``"trial"``).

    Every series is keyed ``"/".join([analyzer, *dimension values in dims order, metric])``
    (``patterns/fc1/train/distinct``, ``regions/2d_normalized``) and plotted against
    ``trainer/step``: one ``run.log`` per training step, steps in increasing order, all
    analyzers' values for that step together, never ``step=`` (W&B drops logs whose
    internal step goes backwards). Each of ``summary_tables`` becomes a
    ``wandb.Table`` under ``tables/<name>`` and each of ``images`` (PNG files) a
    ``wandb.Image`` under ``plots/<name>``, both logged with the last step. The run summary
    holds each series' final value and ``trainer/final_step``.

    Every call is a new W&B run (`analysis_run_id`: ``<run id>-<UTC time>``, display name
    ``run_id``, config ``previous_analysis`` = the previous analysis' W&B run id found in
    ``wandb_dir``), so no run's history restarts at step 0.

    Args:
        results: analyzer name -> table (``step``, dimension columns, numeric metrics).
        dims: analyzer name -> its dimension columns, in key order; missing means none.
        run_id: the training run's id; also the W&B display name.
        project: W&B project.
        group: W&B group, the experiment name.
        mode: see `resolve_mode`; ``"disabled"`` does nothing and returns None.
        wandb_dir: parent of the ``wandb/`` folder W&B writes (created if missing);
            None lets W&B choose (``WANDB_DIR`` or the working directory).
        config: recorded as the run's config.
        summary_tables: name -> small table (per-layer summaries), logged as wandb.Tables.
        images: name -> PNG file, logged as wandb.Images under ``plots/<name>``.
        summary: extra run-summary entries (e.g. ``skipped/<analyzer>`` = reason).
        rank: the process's global rank. Only rank 0 logs; any other rank returns None
            at once, without checking credentials or touching disk.
        on_error: what a W&B failure (import, init, disk, network, ...) does:
            ``"warn"`` (default) logs a warning and returns None, ``"raise"`` raises
            `TrackingError` from it.
        init_timeout: seconds W&B may take to start the run (``wandb.Settings(init_timeout=)``;
            W&B's own default is 90). An unreachable server online fails after about this long,
            with one warning. ``WANDB_INIT_TIMEOUT``, when set, wins.
        wandb_id: a fixed W&B run id instead of a new one per call, for a run logged once
            and resumed by id later (a sweep's trial run, which the comparison adds to).

    Returns:
        Where the run went, or None (other rank, disabled, or a W&B failure with
        ``on_error="warn"``).

    Raises:
        TrackingError: ``mode="online"`` without W&B credentials, before any work.
        ValueError: a malformed results table or argument, before any W&B work.
    """
    if rank != 0:
        logger.debug("rank %d: W&B logging happens on rank 0 only", rank)
        return None
    if on_error not in ("warn", "raise"):
        raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
    if not isinstance(init_timeout, (int, float)) or not init_timeout > 0:
        raise ValueError(f"init_timeout must be a number of seconds > 0, got {init_timeout!r}")
    resolved = resolve_mode(mode)
    if resolved == "disabled":
        return None
    rows = history_rows(results, dims)
    tables = _check_summary_tables(summary_tables or {})
    pictures = _check_images(images or {})
    if wandb_id is not None:
        wb_id, previous = wandb_id, None
    else:
        wb_id, previous = analysis_run_id(run_id, wandb_dir if wandb_dir is not None else _default_wandb_dir())
    config = dict(config or {})
    if previous is not None:
        config.setdefault("previous_analysis", previous)
    try:
        return _log_to_wandb(
            rows,
            tables,
            pictures,
            previous=previous,
            wb_id=wb_id,
            name=run_id,
            project=project,
            group=group,
            mode=resolved,
            wandb_dir=None if wandb_dir is None else Path(wandb_dir),
            config=config,
            summary=dict(summary or {}),
            init_timeout=init_timeout,
            job_type=job_type,
        )
    except Exception as exc:  # noqa: BLE001 - any W&B failure must not lose the run's results
        detail = " ".join(str(exc).split())  # one line: W&B's errors span several
        message = (
            f"W&B logging of run {run_id!r} failed ({type(exc).__name__}: {detail}); the analysis "
            "results on disk are unaffected, re-run the logging to retry."
        )
        if on_error == "raise":
            raise TrackingError(message) from exc
        logger.warning(message)
        return None


def history_rows(
    results: Mapping[str, pa.Table], dims: Mapping[str, Sequence[str]]
) -> list[tuple[int, dict[str, Any]]]:
    """Turn analyzer tables into ``(step, {series key: value})`` pairs, steps ascending.

    Null metric values are left out. Raises ValueError naming the analyzer and column
    when a table breaks the convention, or when two rows map to the same key and step.

    >>> import pyarrow as pa
    >>> t = pa.table({"step": [5, 0], "layer": ["fc1", "fc1"], "distinct": [7, 3]})
    >>> history_rows({"patterns": t}, {"patterns": ["layer"]})
    [(0, {'patterns/fc1/distinct': 3}), (5, {'patterns/fc1/distinct': 7})]
    """
    by_step: dict[int, dict[str, Any]] = {}
    for analyzer, table in results.items():
        analyzer_dims = list(dims.get(analyzer, ()))
        metrics = _metric_columns(analyzer, table, analyzer_dims)
        columns = {name: table.column(name).to_pylist() for name in ("step", *analyzer_dims, *metrics)}
        for i, step in enumerate(columns["step"]):
            if step is None:
                raise ValueError(f"analyzer {analyzer!r}: column 'step' has a null in row {i}")
            dim_values = [columns[d][i] for d in analyzer_dims]
            for dim, value in zip(analyzer_dims, dim_values):
                if value is None:
                    raise ValueError(f"analyzer {analyzer!r}: dimension {dim!r} has a null in row {i}")
            prefix = "/".join([analyzer, *map(str, dim_values)])
            row = by_step.setdefault(step, {})
            for metric in metrics:
                value = columns[metric][i]
                if value is None:
                    continue
                key = f"{prefix}/{metric}"
                if key in row:
                    raise ValueError(
                        f"analyzer {analyzer!r}: more than one row gives {key!r} at step {step}; "
                        f"are dims[{analyzer!r}] = {analyzer_dims} all the dimension columns?"
                    )
                row[key] = value
    return sorted(by_step.items())


def read_offline_run(run_dir: str | os.PathLike[str], *, timeout: float = 120.0) -> dict[str, Any]:
    """Read back what a W&B run folder recorded, via ``wandb leet inspect --json``.

    ``run_dir`` may be a run folder (``offline-run-*`` or ``run-*``), its ``.wandb``
    file, or a ``wandb/`` folder (its latest run). Returns a dict with

    - ``run_id``, ``run`` (the run record: project, group, job_type, resume, ...),
    - ``history``: the logged rows in order, each a ``{key: value}`` dict,
    - ``summary`` and ``config``: their final values, as W&B computes them,
    - ``metrics``: the ``define_metric`` records (``name``/``glob_name``, ``step_metric``),
    - ``records``: every record, as printed.

    Non-finite floats come back as floats: W&B prints them as "NaN"/"Infinity"/"-Infinity".

    >>> run = read_offline_run("wandb/latest-run")  # doctest: +SKIP
    >>> [row["trainer/step"] for row in run["history"]]  # doctest: +SKIP
    """
    lines = _leet_inspect(run_dir, "--json", timeout=timeout).splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    final = json.loads(_leet_inspect(run_dir, "--summary", "--json", timeout=timeout))
    run = next((r["run"] for r in records if r.get("type") == "run"), {})
    return {
        "run_id": run.get("run_id") or final.get("run_id"),
        "run": run,
        "history": [
            _decode_non_finite(r["history"].get("item", {})) for r in records if r.get("type") == "history"
        ],
        "summary": _decode_non_finite(final.get("summary", {})),
        "config": final.get("config", {}),
        "metrics": [r["metric"] for r in records if r.get("type") == "metric"],
        "records": records,
    }


def _log_to_wandb(
    rows: list[tuple[int, dict[str, Any]]],
    tables: Mapping[str, pa.Table],
    images: Mapping[str, Path],
    *,
    previous: str | None,
    wb_id: str,
    name: str,
    project: str,
    group: str | None,
    mode: Literal["offline", "online"],
    wandb_dir: Path | None,
    config: dict[str, Any],
    summary: dict[str, Any] | None = None,
    init_timeout: float = INIT_TIMEOUT,
    job_type: str = "analysis",
) -> WandbResult:
    import wandb

    if wandb_dir is not None:
        # W&B silently falls back to the system temp folder when `dir` is unusable;
        # a run written somewhere unexpected counts as a failure here.
        wandb_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(wandb_dir, os.W_OK):
            raise PermissionError(f"W&B directory {str(wandb_dir)!r} is not writable")

    run = wandb.init(
        project=project,
        id=wb_id,
        name=name,
        group=group,
        job_type=job_type,
        resume="never",
        reinit="create_new",  # never finish a run the caller (e.g. a Lightning WandbLogger) holds
        mode=mode,
        dir=None if wandb_dir is None else str(wandb_dir),
        settings=wandb.Settings(silent=True, console="off", disable_git=True, **_init_timeout(init_timeout)),
    )
    exit_code = 1
    try:
        if config:
            run.config.update(config, allow_val_change=True)
        run.define_metric(STEP_KEY)
        analyzers = sorted({key.split("/", 1)[0] for _, values in rows for key in values})
        for analyzer in analyzers:
            run.define_metric(f"{analyzer}/*", step_metric=STEP_KEY)
        payloads: list[dict[str, Any]] = [{STEP_KEY: step, **values} for step, values in rows]
        last: dict[str, Any] = {}
        if tables:
            run.define_metric(f"{TABLES_PREFIX}/*", step_metric=STEP_KEY)
            last.update({f"{TABLES_PREFIX}/{key}": _to_wandb_table(t) for key, t in tables.items()})
        if images:
            run.define_metric(f"{PLOTS_PREFIX}/*", step_metric=STEP_KEY)
            last.update({f"{PLOTS_PREFIX}/{key}": wandb.Image(str(p), caption=key) for key, p in images.items()})
        if last:
            if payloads:
                payloads[-1].update(last)
            else:
                payloads.append(last)
        keys = sorted({k for payload in payloads for k in payload})
        for payload in payloads:
            run.log(payload)
        final: dict[str, Any] = {}
        for _, values in rows:
            final.update(values)
        if rows:
            final["trainer/final_step"] = rows[-1][0]
        run.summary.update({**final, **(summary or {})})
        result = WandbResult(
            run_id=run.id,
            run_dir=Path(run.settings.sync_dir),
            mode=mode,
            url=run.url if mode == "online" else None,
            previous=previous,
            entity=run.entity if mode == "online" else None,
            keys=tuple(keys),
        )
        exit_code = 0
        return result
    finally:
        run.finish(exit_code=exit_code)


def _init_timeout(seconds: float) -> dict[str, float]:
    """``init_timeout`` for ``wandb.Settings``, unless the user set W&B's own ``WANDB_INIT_TIMEOUT``."""
    if os.environ.get("WANDB_INIT_TIMEOUT"):
        return {}
    return {"init_timeout": float(seconds)}


def _metric_columns(analyzer: str, table: pa.Table, analyzer_dims: list[str]) -> list[str]:
    if not analyzer or "/" in analyzer or analyzer in _RESERVED_ANALYZERS:
        raise ValueError(
            f"analyzer name {analyzer!r} must be non-empty, without '/', and not one of "
            f"{sorted(_RESERVED_ANALYZERS)}"
        )
    if not isinstance(table, pa.Table):
        raise ValueError(f"analyzer {analyzer!r}: expected a pyarrow.Table, got {type(table).__name__}")
    schema = table.schema
    if "step" not in schema.names or not pa.types.is_integer(schema.field("step").type):
        raise ValueError(f"analyzer {analyzer!r}: needs an integer 'step' column, has {schema.names}")
    for dim in analyzer_dims:
        if dim not in schema.names:
            raise ValueError(f"analyzer {analyzer!r}: dimension column {dim!r} not in {schema.names}")
        if dim == "step":
            raise ValueError(f"analyzer {analyzer!r}: 'step' cannot be a dimension")
    metrics = []
    for field in schema:
        if field.name == "step" or field.name in analyzer_dims or pa.types.is_null(field.type):
            continue
        kind = field.type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise ValueError(
                f"analyzer {analyzer!r}: column {field.name!r} ({kind}) is not numeric; "
                f"add it to dims[{analyzer!r}] if it is a dimension"
            )
        metrics.append(field.name)
    return metrics


def _check_summary_tables(tables: Mapping[str, pa.Table]) -> dict[str, pa.Table]:
    for key, table in tables.items():
        if not key or not isinstance(table, pa.Table):
            raise ValueError(f"summary_tables[{key!r}] must be a pyarrow.Table under a non-empty name")
    return dict(tables)


def _check_images(images: Mapping[str, str | os.PathLike[str]]) -> dict[str, Path]:
    out = {}
    for key, path in images.items():
        if not key or "/" in key:
            raise ValueError(f"images[{key!r}]: the name must be non-empty, without '/'")
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"images[{key!r}]: {str(p)!r} is not a file")
        out[key] = p
    return out


def _default_wandb_dir() -> str:
    """Where W&B puts its ``wandb/`` folder when ``dir`` is not given."""
    return os.environ.get("WANDB_DIR") or os.getcwd()


def _to_wandb_table(table: pa.Table) -> Any:
    import wandb

    columns = [table.column(name).to_pylist() for name in table.column_names]
    return wandb.Table(columns=list(table.column_names), data=[list(row) for row in zip(*columns)])


def _credentials_problem() -> str | None:
    """None when W&B has credentials for its configured host, else why not. No network."""
    try:
        import wandb
    except ImportError as exc:
        return f"wandb cannot be imported ({exc})"
    from wandb.errors import AuthenticationError

    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth  # wandb >= 0.2x: the lookup `wandb.login()` uses

        lookup = wbauth.authenticate_session
        host = wandb_setup.singleton().settings.base_url
    except (ImportError, AttributeError):
        # Public fallback; note it answers False while WANDB_MODE=offline.
        return None if wandb.login(prompt=False, verify=False) else "no W&B API key is configured"
    try:
        auth = lookup(host=host, source="dynatrack", prompt=False, verify=False, update_session=False)
    except AuthenticationError as exc:
        return f"the W&B credentials are invalid ({exc})"
    return None if auth is not None else f"no W&B API key is configured for {host}"


def _leet_inspect(run_dir: str | os.PathLike[str], *flags: str, timeout: float) -> str:
    command = [sys.executable, "-m", "wandb", "leet", "inspect", *flags, os.fspath(run_dir)]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
    )
    if proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        raise TrackingError(f"`wandb leet inspect` could not read {os.fspath(run_dir)!r}: {detail}")
    return proc.stdout


def _decode_non_finite(item: dict[str, Any]) -> dict[str, Any]:
    return {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in item.items()}
