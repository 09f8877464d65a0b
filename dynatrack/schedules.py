"""Recording schedules as values.

A schedule is any ``Callable[[int], bool]`` that says whether a training step is
recorded. ``step`` is the number of optimizer updates applied so far (0 is the
initialization). The constructors here return small frozen objects that are
callable, comparable and printable, so they can be stored in a manifest.

>>> from dynatrack import schedules
>>> s = schedules.log_spaced()
>>> [k for k in range(200) if s(k)][:12]
[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
>>> schedules.every(10)(30), schedules.at([0, 7])(7)
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

Schedule = Callable[[int], bool]

__all__ = ["Schedule", "every", "log_spaced", "at", "never", "union", "describe", "next_step"]


@dataclass(frozen=True)
class every:
    """Record every ``k``-th step, starting at ``start`` (default 0).

    >>> [s for s in range(10) if every(3)(s)]
    [0, 3, 6, 9]
    """

    k: int
    start: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"every(k): k must be a positive integer, got {self.k!r}")
        if self.start < 0:
            raise ValueError(f"every(k, start): start must be >= 0, got {self.start!r}")

    def __call__(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.k == 0


@dataclass(frozen=True)
class log_spaced:
    """Dense early, sparse late: the schedule of the local-complexity papers.

    Every step below ``dense`` is recorded; then every ``10`` steps below
    ``10 * dense``, every ``100`` below ``100 * dense`` and so on (``base``
    sets the factor). The defaults (every step < 30, every 10 < 300, every 100
    < 3,000, ...) are close to the log schedule of Humayun et al., ICML 2024.

    >>> s = log_spaced(dense=5, base=10)
    >>> [k for k in range(120) if s(k)]
    [0, 1, 2, 3, 4, 10, 20, 30, 40, 100]
    """

    dense: int = 30
    base: int = 10

    def __post_init__(self) -> None:
        if self.dense < 1 or self.base < 2:
            raise ValueError(
                f"log_spaced(dense={self.dense}, base={self.base}): need dense >= 1 and base >= 2"
            )

    def __call__(self, step: int) -> bool:
        if step < 0:
            return False
        stride, limit = 1, self.dense
        while step >= limit:
            stride *= self.base
            limit *= self.base
        return step % stride == 0


@dataclass(frozen=True)
class at:
    """Record exactly the listed steps.

    >>> at([0, 5, 50])(5), at([0, 5, 50])(6)
    (True, False)
    """

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        values = frozenset(int(s) for s in steps)
        if any(s < 0 for s in values):
            raise ValueError(f"at(steps): steps must be >= 0, got {sorted(values)}")
        object.__setattr__(self, "steps", values)

    def __call__(self, step: int) -> bool:
        return step in self.steps

    def __repr__(self) -> str:
        return f"at({sorted(self.steps)})"


@dataclass(frozen=True)
class never:
    """Record nothing (e.g. to switch off the ``batch`` source or checkpoints)."""

    def __call__(self, step: int) -> bool:
        return False


@dataclass(frozen=True)
class union:
    """Record a step when any of the given schedules does.

    >>> union([at([3]), every(5)])(3)
    True
    """

    parts: tuple[Schedule, ...]

    def __init__(self, parts: Sequence[Schedule]) -> None:
        object.__setattr__(self, "parts", tuple(parts))

    def __call__(self, step: int) -> bool:
        for p in self.parts:
            if p(step):
                return True
        return False


def is_never(schedule: Schedule) -> bool:
    """True for :class:`never` and for a :class:`union` of nevers (a schedule known to record nothing).

    >>> is_never(union([never(), never()])), is_never(every(3))
    (True, False)
    """
    if isinstance(schedule, never):
        return True
    return isinstance(schedule, union) and all(is_never(p) for p in schedule.parts)


def next_step(schedule: Schedule, step: int) -> float | None:
    """The first step ``>= step`` that ``schedule`` records: ``math.inf`` if none, ``None`` if unknown.

    Known for the schedules of this module; ``None`` for any other callable (the
    recorder then calls it at every step). The recorder skips its per-step checks
    until the earliest next step of its schedules.

    >>> next_step(every(10), 11), next_step(log_spaced(dense=5), 5), next_step(at([3]), 4), next_step(lambda s: True, 0)
    (20, 10, inf, None)
    """
    step = max(int(step), 0)
    if isinstance(schedule, never):
        return math.inf
    if isinstance(schedule, every):
        if step <= schedule.start:
            return schedule.start
        return schedule.start + -(-(step - schedule.start) // schedule.k) * schedule.k
    if isinstance(schedule, at):
        later = [s for s in schedule.steps if s >= step]
        return min(later) if later else math.inf
    if isinstance(schedule, log_spaced):
        while True:
            stride, limit = 1, schedule.dense
            while step >= limit:
                stride *= schedule.base
                limit *= schedule.base
            candidate = -(-step // stride) * stride
            if candidate < limit:
                return candidate
            step = limit  # past this stride's range: the next range starts at limit
    if isinstance(schedule, union):
        nexts = [next_step(p, step) for p in schedule.parts]
        return None if any(n is None for n in nexts) else min(nexts, default=math.inf)  # type: ignore[type-var]
    return None


def describe(schedule: Schedule) -> str:
    """A short, stable text for a schedule (stored in the manifest)."""
    return repr(schedule) if isinstance(schedule, (every, log_spaced, at, never, union)) else (
        getattr(schedule, "__qualname__", None) or type(schedule).__name__
    )
