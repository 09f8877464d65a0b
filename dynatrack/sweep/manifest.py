"""The sweep directory on disk: ``sweep.json`` (written by the sweep driver only, atomically), the
shared initial weights ``init/seed=<s>.pt``, and a clean resume (unfinished trial directories moved
aside to ``failed/<trial>-<time>/``, never deleted or mixed).

Layout (README, "The sweep directory")::

    <root>/<sweep_id>/
      sweep.json            {"format": "dynatrack.sweep/1", "sweep_id", "config", "trials": [...], "versions"}
      init/seed=<s>.pt      build_net(model, meta).state_dict() after torch.manual_seed(s)
      <trial_id>/           a dynatrack run directory (+ trial.json once the trial finished)
      failed/<trial_id>-<time>/   unfinished attempts, moved aside by a re-run
      ray/                  Ray Tune / Ray Train bookkeeping
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dynatrack.sweep.config import SweepConfigError, identity, plan_trials
from dynatrack.sweep.trial import TRIAL_FILE, init_path, initial_state

log = logging.getLogger(__name__)

FORMAT = "dynatrack.sweep/1"
SWEEP_FILE = "sweep.json"
FAILED_DIR = "failed"


def sweep_dir(cfg: Mapping[str, Any]) -> Path:
    return Path(cfg["root"], cfg["name"]).resolve()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("dynatrack", "torch", "lightning", "ray"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out


def read_sweep(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``sweep.json`` of a sweep directory."""
    file = Path(path, SWEEP_FILE)
    if not file.exists():
        raise FileNotFoundError(f"{str(path)!r} is not a sweep directory (no {SWEEP_FILE})")
    data = json.loads(file.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{file}: unknown format {data.get('format')!r}, expected {FORMAT!r}")
    return data


def write_sweep(path: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Write ``sweep.json`` atomically (temporary file + rename)."""
    file = Path(path, SWEEP_FILE)
    tmp = file.with_name(f".{SWEEP_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(file)


def is_finished(path: str | os.PathLike[str], trial: Mapping[str, Any]) -> bool:
    return trial.get("status") == "finished" and Path(path, trial["trial_id"], TRIAL_FILE).exists()


def prepare(cfg: Mapping[str, Any]) -> tuple[Path, dict[str, Any], list[str]]:
    """Create or reopen the sweep directory: ``(path, manifest, ids of the trials to run)``.

    A directory holding a different sweep (another config identity) is refused. Finished trials
    (``status: finished`` and ``trial.json``) are kept; every other trial directory is moved to
    ``failed/<trial>-<time>/`` and the trial runs again. The shared initial weights are written once.
    """
    path = sweep_dir(cfg)
    planned = plan_trials(cfg)
    config = dict(cfg)
    if (path / SWEEP_FILE).exists():
        manifest = read_sweep(path)
        if identity(manifest["config"]) != identity(json.loads(json.dumps(config))):
            old, new = identity(manifest["config"]), identity(json.loads(json.dumps(config)))
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise SweepConfigError(
                f"{path} holds a different sweep (its sweep.json differs in {', '.join(diff)}); "
                "use another name or root, or restore the config it was run with")
        previous = {t["trial_id"]: t for t in manifest["trials"]}
    else:
        if path.exists() and any(path.iterdir()):
            raise SweepConfigError(f"{path} exists and is not a sweep directory (no {SWEEP_FILE}); "
                                   "choose another name or root")
        previous = {}
    path.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    todo = []
    trials = []
    for trial in planned:
        old = previous.get(trial["trial_id"])
        if old is not None and is_finished(path, old):
            trials.append(old)
            continue
        run_dir = path / trial["trial_id"]
        if run_dir.exists():
            target = path / FAILED_DIR / f"{trial['trial_id']}-{stamp}"
            n = 1
            while target.exists():
                target = path / FAILED_DIR / f"{trial['trial_id']}-{stamp}-{n}"
                n += 1
            target.parent.mkdir(exist_ok=True)
            shutil.move(str(run_dir), str(target))
            log.warning("trial %s did not finish earlier; its directory moved to %s", trial["trial_id"], target)
        trials.append(trial)
        todo.append(trial["trial_id"])
    for seed in cfg["seeds"]:
        file = init_path(path, seed)
        if not file.exists():
            file.parent.mkdir(exist_ok=True)
            tmp = file.with_suffix(".pt.tmp")
            torch.save(initial_state(cfg["model"], cfg["meta"], seed), tmp)
            tmp.replace(file)
    manifest = {"format": FORMAT, "sweep_id": cfg["name"], "config": config, "trials": trials,
                "versions": _versions()}
    write_sweep(path, manifest)
    return path, manifest, todo
