"""All file I/O of dynatrack: Parquet shards, weights checkpoints, the manifest."""

from dynatrack.store.fs import RunLocation, resolve_root, validate_run_name
from dynatrack.store.reader import Run, RunError, open_run
from dynatrack.store.schema import SCHEMA_VERSION

__all__ = ["Run", "RunError", "RunLocation", "SCHEMA_VERSION", "open_run", "resolve_root", "validate_run_name"]
