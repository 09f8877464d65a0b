"""``manifest.json``: what a run holds, written by rank 0 only.

Keys (schema version 1): ``schema_version``, ``run_id``, ``world_size``,
``layers`` (``[{name, width}]``), ``probe`` (``{size, splits: {name: size},
num_classes}``), ``model`` (``{class_path, init_args}``), ``seed``,
``versions``, ``schedules``, ``attempts`` (``[{attempt, start_step}]``, one per
fit; a resumed fit appends one) and ``created_at``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from dynatrack.store.fs import RunLocation, StoreError
from dynatrack.store.schema import MANIFEST, SCHEMA_VERSION


def versions() -> dict[str, str]:
    """Versions of the packages that shape what is recorded."""
    import importlib.metadata as md

    out = {}
    for name in ("dynatrack", "torch", "lightning", "pyarrow", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "unknown"
    return out


def read_manifest(loc: RunLocation) -> dict[str, Any]:
    """Load and check a run's manifest; a clear :class:`StoreError` otherwise."""
    if not loc.exists():
        raise StoreError(f"run directory {loc.uri!r} does not exist")
    if not loc.exists(MANIFEST):
        raise StoreError(
            f"{loc.uri!r} is not a dynatrack run: it has no {MANIFEST}. "
            "Pass the directory that PatternRecorder created (<root>/<run_id>)."
        )
    try:
        manifest = json.loads(loc.read_bytes(MANIFEST))
    except ValueError as exc:
        raise StoreError(f"{loc.uri}/{MANIFEST} is not valid JSON: {exc}") from exc
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise StoreError(f"{loc.uri}/{MANIFEST} has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"run {loc.uri!r} uses schema version {version}, newer than this dynatrack "
            f"(reads up to {SCHEMA_VERSION}); upgrade dynatrack to read it"
        )
    return manifest


def write_manifest(loc: RunLocation, manifest: dict[str, Any], *, overwrite: bool) -> None:
    """Write the manifest atomically (``overwrite`` only to append an attempt)."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if not loc.write_bytes_atomic(MANIFEST, data, overwrite=overwrite):
        raise StoreError(f"{loc.uri}/{MANIFEST} already exists; refusing to overwrite it")


def new_manifest(
    *,
    run_id: str,
    world_size: int,
    layers: list[dict[str, Any]],
    probe: dict[str, Any],
    model: dict[str, Any],
    seed: int | None,
    schedules: dict[str, str],
    start_step: int,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "world_size": world_size,
        "layers": layers,
        "probe": probe,
        "model": model,
        "seed": seed,
        "versions": versions(),
        "schedules": schedules,
        "attempts": [{"attempt": 0, "start_step": int(start_step)}],
        "created_at": time.time(),
    }


def check_compatible(existing: dict[str, Any], wanted: dict[str, Any], uri: str) -> None:
    """Refuse to mix runs: schema version, model, layers and probe must match."""
    problems = []
    if existing.get("schema_version") != wanted["schema_version"]:
        problems.append(
            f"schema version {existing.get('schema_version')} != {wanted['schema_version']}"
        )
    if existing.get("model", {}).get("class_path") != wanted["model"]["class_path"]:
        problems.append(
            f"model {existing.get('model', {}).get('class_path')} != {wanted['model']['class_path']}"
        )
    if existing.get("layers") != wanted["layers"]:
        problems.append(f"layers {existing.get('layers')} != {wanted['layers']}")
    if existing.get("probe") != wanted["probe"]:
        problems.append("probe set differs")
    if existing.get("world_size") != wanted["world_size"]:
        problems.append(f"world size {existing.get('world_size')} != {wanted['world_size']}")
    if problems:
        raise StoreError(
            f"run directory {uri!r} holds a different run ({'; '.join(problems)}); "
            "refusing to mix them. Choose another run_name or root."
        )
