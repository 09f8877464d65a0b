"""The sweep config (``configs/batch_sweep.yaml``): loaded with ``yaml.safe_load``, validated up front,
and expanded into the grid of trials.

Everything that can be checked before Ray starts is checked here, each with a one-line error naming
what is wrong and what to do: unknown keys (with the nearest valid key), batch sizes larger than the
training set or not divisible by the workers, budgets, learning-rate rules and schedules.

>>> cfg = validate_config({"name": "bs", "task": {"name": "synthetic", "n_train": 256, "n_test": 64},
...                        "batch_sizes": [16, 64], "workers": 2, "seeds": [0], "epochs": 2,
...                        "budget": ["epochs", "updates"]})
>>> [(t["trial_id"], t["max_steps"], t["per_worker_batch"]) for t in plan_trials(cfg)]
[('bs16-s0-epochs', 32, 8), ('bs64-s0-epochs', 8, 32), ('bs16-s0-updates', 32, 8), ('bs64-s0-updates', 32, 32)]
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynatrack import schedules as sch

BUDGETS = ("epochs", "updates")
LR_RULES = ("fixed", "linear")
OPTIMIZERS = ("sgd", "adam")
WANDB_MODES = ("offline", "online", "disabled", "auto")
SCHEDULE_KINDS = ("every", "log_spaced", "at", "never")

# Sections whose values do not change what a trial computes: a re-run may change them.
EXECUTION_SECTIONS = ("ray", "wandb", "compare")

DEFAULTS: dict[str, Any] = {
    "name": None,
    "root": "runs",
    "task": {"name": "digits", "seed": 0},
    "model": {"hidden": [64, 64], "activation": "relu"},
    "batch_sizes": None,
    "workers": 2,
    "seeds": [0],
    "budget": ["epochs"],
    "epochs": 10,
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "lr_rule": "fixed", "base_batch": None,
                  "warmup_steps": 0},
    "recorder": {"schedule": {"log_spaced": {"dense": 10}}, "batch_schedule": "never",
                 "checkpoint_schedule": None, "neuron_schedule": None, "probe_size": 2048,
                 "probe_batch_size": 1024},
    "compare": {"sharpness_eps": 1e-3, "hessian_iters": 20, "interpolation_points": 25, "noise_scale_batches": 32},
    "wandb": {"mode": "offline", "project": "dynatrack"},
    "ray": {"address": None, "num_cpus": None, "cpus_per_worker": 1, "trials_per_worker_group": None},
}
# Sections whose keys are checked against the defaults (task takes make_task's options besides name and seed).
_CLOSED_SECTIONS = ("model", "optimizer", "recorder", "compare", "wandb", "ray")


class SweepConfigError(ValueError):
    """A sweep config that cannot run as written."""


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a sweep config file (``yaml.safe_load``)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise SweepConfigError(f"sweep config {str(path)!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise SweepConfigError(f"{path}: not valid YAML ({exc})") from exc
    return validate_config(data, source=str(path))


def _unknown(keys: set[str], valid: list[str], where: str) -> SweepConfigError:
    parts = []
    for key in sorted(keys):
        near = difflib.get_close_matches(key, valid, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    return SweepConfigError(f"{where}: unknown key{'s' if len(keys) > 1 else ''} {', '.join(parts)}; "
                            f"valid keys are {', '.join(valid)}")


def _distinct_ints(values: Any, key: str, what: str, each: str, minimum: int) -> list[int]:
    """``values``, checked to be a non-empty list of distinct integers >= ``minimum``."""
    if not isinstance(values, list) or not values:
        raise SweepConfigError(f"{key} must be a non-empty list of {what}")
    for v in values:
        _int(v, each, minimum)
    if len(set(values)) != len(values):
        raise SweepConfigError(f"{key.split(': ')[-1]} lists a value twice: {values}")
    return values


def _int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SweepConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, what: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0) or value < 0:
        raise SweepConfigError(f"{what} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return float(value)


def _choice(value: Any, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SweepConfigError(f"{what} must be one of {', '.join(choices)}, got {value!r}{hint}")
    return value


def validate_config(data: Any, source: str = "sweep config") -> dict[str, Any]:
    """The config with defaults filled in, or a :class:`SweepConfigError` naming the first problem.

    Builds the task once (``make_task``) to check batch sizes against the training set.
    """
    from dynatrack.store.fs import StoreError, validate_run_name
    from dynatrack.sweep.data import TASKS, make_task

    if not isinstance(data, Mapping):
        raise SweepConfigError(f"{source}: expected a mapping of sweep settings, got {type(data).__name__}")
    unknown = set(data) - set(DEFAULTS)
    if unknown:
        raise _unknown(unknown, list(DEFAULTS), source)
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in data.items():
        if key in _CLOSED_SECTIONS or key == "task":
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise SweepConfigError(f"{source}: section {key!r} must be a mapping, got {value!r}")
            if key in _CLOSED_SECTIONS:
                bad = set(value) - set(DEFAULTS[key])
                if bad:
                    raise _unknown(bad, list(DEFAULTS[key]), f"{source}: section {key!r}")
            cfg[key].update(copy.deepcopy(dict(value)))
        else:
            cfg[key] = copy.deepcopy(value)

    if not isinstance(cfg["name"], str) or not cfg["name"]:
        raise SweepConfigError(f"{source}: 'name' (the sweep id) is required, e.g. name: batch-digits")
    try:
        validate_run_name(cfg["name"])
    except (StoreError, ValueError) as exc:
        raise SweepConfigError(f"{source}: name {cfg['name']!r} is not a valid sweep id: {exc}") from exc
    if not isinstance(cfg["root"], str) or not cfg["root"]:
        raise SweepConfigError(f"{source}: root must be a directory path, got {cfg['root']!r}")

    task = cfg["task"]
    _choice(task.get("name"), "task.name", TASKS)
    _int(task.get("seed", 0), "task.seed", 0)
    options = {k: v for k, v in task.items() if k not in ("name", "seed")}
    try:
        train, _test, meta = make_task(task["name"], seed=task.get("seed", 0), **options)
    except (TypeError, ValueError) as exc:
        raise SweepConfigError(f"{source}: task {task['name']!r}: {exc}") from exc
    n_train = len(train)

    model = cfg["model"]
    hidden = model["hidden"]
    if not isinstance(hidden, list) or not hidden or not all(isinstance(h, int) and not isinstance(h, bool)
                                                            and h > 0 for h in hidden):
        raise SweepConfigError(f"model.hidden must be a non-empty list of positive widths, got {hidden!r}")
    _choice(model["activation"], "model.activation", ("relu", "leaky_relu"))

    workers = _int(cfg["workers"], "workers", 1)
    sizes = _distinct_ints(cfg["batch_sizes"], f"{source}: batch_sizes", "global batch sizes, e.g. [16, 256]",
                           "every batch size", 1)
    too_big = [b for b in sizes if b > n_train]
    if too_big:
        raise SweepConfigError(
            f"batch sizes {too_big} are larger than the training set of task {task['name']!r} ({n_train} samples); "
            "use smaller batch sizes or a larger task")
    indivisible = [b for b in sizes if b % workers]
    if indivisible:
        raise SweepConfigError(
            f"batch sizes {indivisible} are not divisible by workers={workers} (the global batch is split evenly "
            "over the workers); use multiples of the worker count")
    cfg["batch_sizes"] = sorted(sizes)

    seeds = cfg["seeds"]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    cfg["seeds"] = _distinct_ints(seeds, "seeds", f"integers, got {cfg['seeds']!r}", "every seed", 0)

    budget = cfg["budget"]
    budget = [budget] if isinstance(budget, str) else budget
    if not isinstance(budget, list) or not budget:
        raise SweepConfigError(f"budget must be epochs, updates or [epochs, updates], got {cfg['budget']!r}")
    for b in budget:
        _choice(b, "budget", BUDGETS)
    cfg["budget"] = [b for b in BUDGETS if b in budget]
    _int(cfg["epochs"], "epochs", 1)

    opt = cfg["optimizer"]
    _choice(opt["name"], "optimizer.name", OPTIMIZERS)
    _number(opt["lr"], "optimizer.lr", positive=True)
    _number(opt["momentum"], "optimizer.momentum")
    _choice(opt["lr_rule"], "optimizer.lr_rule", LR_RULES)
    if opt["base_batch"] is None:
        opt["base_batch"] = cfg["batch_sizes"][0]
    _int(opt["base_batch"], "optimizer.base_batch", 1)
    _int(opt["warmup_steps"], "optimizer.warmup_steps", 0)

    rec = cfg["recorder"]
    for key in ("schedule", "batch_schedule", "checkpoint_schedule", "neuron_schedule"):
        if rec[key] is not None:
            build_schedule(rec[key], f"recorder.{key}")
    _int(rec["probe_size"], "recorder.probe_size", 1)
    _int(rec["probe_batch_size"], "recorder.probe_batch_size", 1)

    _choice(cfg["wandb"]["mode"], "wandb.mode", WANDB_MODES)
    if not isinstance(cfg["wandb"]["project"], str) or not cfg["wandb"]["project"]:
        raise SweepConfigError(f"wandb.project must be a name, got {cfg['wandb']['project']!r}")
    ray_cfg = cfg["ray"]
    if ray_cfg["num_cpus"] is not None:
        _int(ray_cfg["num_cpus"], "ray.num_cpus", 1)
    _number(ray_cfg["cpus_per_worker"], "ray.cpus_per_worker", positive=True)
    if ray_cfg["trials_per_worker_group"] is not None:
        _int(ray_cfg["trials_per_worker_group"], "ray.trials_per_worker_group", 1)
    cfg["meta"] = {"n_train": n_train, "n_test": len(_test), **meta}
    return cfg


def build_schedule(spec: Any, what: str = "schedule") -> sch.Schedule:
    """A schedule from its config form: ``never``, ``{every: 10}``, ``{at: [0, 5]}``,
    ``{log_spaced: {dense: 10, base: 10}}`` (``{log_spaced: null}`` for the defaults), or a list of
    those (their union).

    >>> build_schedule({"at": [0, 3]})(3), build_schedule("never")(0)
    (True, False)
    """
    if isinstance(spec, list):
        return sch.union([build_schedule(s, what) for s in spec])
    if spec == "never":
        return sch.never()
    if isinstance(spec, str):
        spec = {spec: None}
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise SweepConfigError(f"{what}: expected one of {', '.join(SCHEDULE_KINDS)} (e.g. {{every: 10}}), got {spec!r}")
    (kind, arg), = spec.items()
    _choice(kind, what, SCHEDULE_KINDS)
    try:
        if kind == "every":
            return sch.every(**arg) if isinstance(arg, Mapping) else sch.every(arg)
        if kind == "at":
            return sch.at([int(s) for s in arg])
        if kind == "log_spaced":
            return sch.log_spaced(**(arg or {}))
        return sch.never()
    except (TypeError, ValueError) as exc:
        raise SweepConfigError(f"{what}: {kind} {arg!r}: {exc}") from exc


def steps_per_epoch(batch_size: int, workers: int, n_train: int) -> int:
    """Optimizer updates in one pass: each of ``workers`` ranks takes ``ceil(n / workers)`` samples
    (Lightning's ``DistributedSampler``) in batches of ``batch_size / workers``, the last partial
    batch dropped."""
    return max(1, math.ceil(n_train / workers) // (batch_size // workers))


def trial_lr(cfg: Mapping[str, Any], batch_size: int) -> float:
    """The learning rate a trial uses: ``lr`` (fixed) or ``lr * B / base_batch`` (linear scaling)."""
    opt = cfg["optimizer"]
    if opt["lr_rule"] == "linear":
        return float(opt["lr"]) * batch_size / int(opt["base_batch"])
    return float(opt["lr"])


def trial_id(batch_size: int, seed: int, budget: str) -> str:
    return f"bs{batch_size}-s{seed}-{budget}"


def plan_trials(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One entry per (budget, batch size, seed), as stored in ``sweep.json`` (status ``pending``).

    Budget ``epochs``: ``epochs`` passes for every batch size. Budget ``updates``: every batch size
    gets the updates that the smallest batch size makes in ``epochs`` passes.
    """
    workers, n_train = int(cfg["workers"]), int(cfg["meta"]["n_train"])
    smallest = min(cfg["batch_sizes"])
    equal_updates = cfg["epochs"] * steps_per_epoch(smallest, workers, n_train)
    trials = []
    for budget in cfg["budget"]:
        for b in cfg["batch_sizes"]:
            for seed in cfg["seeds"]:
                steps = cfg["epochs"] * steps_per_epoch(b, workers, n_train) if budget == "epochs" else equal_updates
                trials.append({
                    "trial_id": trial_id(b, seed, budget), "batch_size": b, "per_worker_batch": b // workers,
                    "world_size": workers, "lr": trial_lr(cfg, b), "seed": seed, "budget": budget,
                    "max_steps": steps, "status": "pending", "error": None, "wall_time_s": None,
                })
    return trials


def identity(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config that decides what the trials compute (not how or where they run)."""
    return {k: v for k, v in cfg.items() if k not in EXECUTION_SECTIONS and k != "root"}
