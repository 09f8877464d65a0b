"""W&B dashboards for dynatrack analyses: offline by default, online when configured, rank zero only.

``wandb`` itself is imported lazily, inside the functions that talk to it.
"""

from dynatrack.tracking.wandb_logger import (
    STEP_KEY,
    TrackingError,
    WandbResult,
    analysis_run_id,
    history_rows,
    log_analysis,
    read_offline_run,
    resolve_mode,
    wandb_run_id,
)

__all__ = [
    "STEP_KEY",
    "TrackingError",
    "WandbResult",
    "analysis_run_id",
    "history_rows",
    "log_analysis",
    "read_offline_run",
    "resolve_mode",
    "wandb_run_id",
]
