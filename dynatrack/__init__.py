"""dynatrack: activation-pattern dynamics of ReLU networks, recorded from Lightning, analysed on Ray.

>>> from dynatrack import PatternRecorder, open_run, schedules   # doctest: +SKIP

Names are imported lazily, so Ray workers that only read a run directory do
not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PatternRecorder": "dynatrack.recorder",
    "IndexedDataset": "dynatrack.recorder",
    "ProbeSplit": "dynatrack.recorder",
    "open_run": "dynatrack.store",
    "schedules": "dynatrack.schedules",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dynatrack' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith(name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
