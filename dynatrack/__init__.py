"""dynatrack: activation-pattern dynamics of ReLU networks, recorded from Lightning, analysed on Ray.

>>> from dynatrack import PatternRecorder, open_run, schedules   # doctest: +SKIP
"""

from dynatrack import schedules
from dynatrack.recorder import IndexedDataset, PatternRecorder, ProbeSplit
from dynatrack.store import open_run

__version__ = "0.1.0"
__all__ = ["IndexedDataset", "PatternRecorder", "ProbeSplit", "open_run", "schedules", "__version__"]
