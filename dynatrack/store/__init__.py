"""All file I/O of dynatrack: Parquet shards, weights checkpoints, the manifest, commit records."""

from dynatrack.store.fs import RunLocation, StoreError, resolve_root, validate_run_name
from dynatrack.store.reader import IncompleteStepsWarning, NotRecordedError, Run, RunError, open_run
from dynatrack.store.schema import SCHEMA_VERSION

__all__ = ["IncompleteStepsWarning", "NotRecordedError", "Run", "RunError", "RunLocation", "SCHEMA_VERSION",
           "StoreError", "open_run", "resolve_root", "validate_run_name"]
