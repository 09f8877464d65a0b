"""``manifest.json``: what a run holds, written by rank 0 only.

Keys (schema version 1): ``schema_version``, ``run_id``, ``world_size``,
``layers`` (``[{name, width}]``), ``probe`` (``{size, splits: {name: size},
num_classes}``), ``model`` (``{class_path, init_args}``), ``seed``,
``versions``, ``schedules``, ``attempts`` (``[{attempt, start_step}]``, one per
fit; a resumed fit appends one), ``created_at`` and ``commit_records`` (``1``: every
rank writes ``commits/rank=<r>/attempt-<a>.json`` records, see
:mod:`dynatrack.store.commits`; runs without the key predate them and are read as
complete).
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
    check_manifest(manifest, f"{loc.uri}/{MANIFEST}")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise StoreError(f"{loc.uri}/{MANIFEST} has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"run {loc.uri!r} uses schema version {version}, newer than this dynatrack "
            f"(reads up to {SCHEMA_VERSION}); upgrade dynatrack to read it"
        )
    return manifest


_REQUIRED = {"schema_version": int, "run_id": str, "world_size": int, "layers": list}


def check_manifest(manifest: Any, where: str) -> None:
    """Raise a one-line :class:`StoreError` naming ``where`` unless ``manifest`` has the shape readers rely on.

    >>> check_manifest([1], "m.json")
    Traceback (most recent call last):
    ...
    dynatrack.store.fs.StoreError: m.json is not a dynatrack manifest: expected a JSON object, got a list
    """
    if not isinstance(manifest, dict):
        raise StoreError(f"{where} is not a dynatrack manifest: expected a JSON object, got a {type(manifest).__name__}")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise StoreError(f"{where} is not a dynatrack manifest: it lacks the keys {missing}")
    for key, typ in _REQUIRED.items():
        if not isinstance(manifest[key], typ) or isinstance(manifest[key], bool):
            raise StoreError(f"{where}: {key!r} must be a {typ.__name__}, got {manifest[key]!r}")
    if manifest["world_size"] < 1:
        raise StoreError(f"{where}: world_size must be >= 1, got {manifest['world_size']}")
    for layer in manifest["layers"]:
        if not (isinstance(layer, dict) and isinstance(layer.get("name"), str) and isinstance(layer.get("width"), int)):
            raise StoreError(f"{where}: every entry of 'layers' must be {{name: str, width: int}}, got {layer!r}")
    attempts = manifest.get("attempts", [])
    if not isinstance(attempts, list) or not all(
        isinstance(a, dict) and isinstance(a.get("attempt"), int) and isinstance(a.get("start_step"), int) for a in attempts
    ):
        raise StoreError(f"{where}: 'attempts' must be a list of {{attempt: int, start_step: int}}, got {attempts!r}")
    for key in ("probe", "model"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise StoreError(f"{where}: {key!r} must be a JSON object, got {manifest[key]!r}")


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
        "commit_records": 1,
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
