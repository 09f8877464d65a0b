"""Per-rank commit records: which recorded steps are entirely on disk.

Each rank's writer keeps one small JSON file per attempt,
``commits/rank=<r>/attempt-<a>.json``, replaced atomically after the shards it
vouches for are durable (written, fsynced and renamed)::

    {"rank": 1, "attempt": 0, "through": 41, "closed": false, "rows": {"patterns": 9120, ...}}

``through``: every row this rank recorded in this attempt for a step ``<= through``
is in a shard under ``<kind>/rank=<r>/``. ``closed``: the attempt ended on this rank
(``fit`` returned or raised) with every recorded row on disk. A row is *committed*
(acknowledged) when its rank's record covers its step; a crash never loses a committed row.

A step is *complete* when every rank ``0 .. world_size - 1`` has committed it in
the attempt that owns it (the latest attempt whose ``start_step`` is ``<= step``).
Because ``through`` only grows, the complete steps of an attempt form one range:

>>> attempts = [{"attempt": 0, "start_step": 0}, {"attempt": 1, "start_step": 6}]
>>> records = {(0, 0): Commit(0, 0, 9, False), (1, 0): Commit(1, 0, 4, False), (0, 1): Commit(0, 1, -1, True),
...            (1, 1): Commit(1, 1, 11, False)}
>>> [(r.attempt, r.start, r.stop, r.cut) for r in complete_ranges(attempts, records, world_size=2)]
[(0, 0, 5, 6), (1, 6, 12, inf)]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from dynatrack.store.fs import RunLocation, StoreError

COMMITS = "commits"


def commit_name(rank: int, attempt: int) -> str:
    return f"{COMMITS}/rank={int(rank)}/attempt-{int(attempt):03d}.json"


@dataclass(frozen=True)
class Commit:
    """One rank's record for one attempt."""

    rank: int
    attempt: int
    through: int
    closed: bool
    rows: dict[str, int] | None = None

    def covers(self) -> float:
        """The first step this record does not vouch for (``inf`` once closed)."""
        return math.inf if self.closed else self.through + 1


@dataclass(frozen=True)
class StepRange:
    """Steps ``[start, stop)`` of ``attempt`` are complete on every rank; ``[stop, cut)`` are not."""

    attempt: int
    start: int
    stop: float
    cut: float


def write_commit(loc: RunLocation, commit: Commit) -> None:
    data = json.dumps({"rank": commit.rank, "attempt": commit.attempt, "through": commit.through,
                       "closed": commit.closed, "rows": commit.rows or {}}, sort_keys=True).encode()
    loc.write_bytes_atomic(commit_name(commit.rank, commit.attempt), data, overwrite=True)


def read_commits(loc: RunLocation) -> dict[tuple[int, int], Commit]:
    """Every commit record of the run, keyed by ``(rank, attempt)``; a clear error for a damaged one."""
    out = {}
    for info in loc.list_files(COMMITS):
        rank_dir, name = info.path.rsplit("/", 2)[-2:]
        if not (rank_dir.startswith("rank=") and name.startswith("attempt-") and name.endswith(".json")):
            continue
        try:
            doc = json.loads(loc.fs.open_input_stream(info.path).read())
            commit = Commit(int(doc["rank"]), int(doc["attempt"]), int(doc["through"]), bool(doc["closed"]),
                            {str(k): int(v) for k, v in (doc.get("rows") or {}).items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(f"commit record {info.path} is damaged ({exc!r}); it says which steps are "
                             "complete. Restore it, or delete it to treat that rank's steps as incomplete") from exc
        out[(commit.rank, commit.attempt)] = commit
    return out


def complete_ranges(
    attempts: list[dict[str, Any]], records: dict[tuple[int, int], Commit] | None, *, world_size: int
) -> list[StepRange]:
    """Per attempt, the steps it owns (``[start, cut)``) and the complete part of them (``[start, stop)``).

    ``records=None`` (a run written before commit records) reads every step as complete.
    """
    ordered = sorted(attempts or [{"attempt": 0, "start_step": 0}], key=lambda a: a["attempt"])
    out = []
    for i, a in enumerate(ordered):
        later = [b["start_step"] for b in ordered[i + 1 :]]
        cut = min(later) if later else math.inf
        if records is None:
            stop: float = cut
        else:
            covers = [records[(r, a["attempt"])].covers() if (r, a["attempt"]) in records else a["start_step"]
                      for r in range(world_size)]
            stop = min([cut, *covers])
        out.append(StepRange(a["attempt"], int(a["start_step"]), max(stop, a["start_step"]), cut))
    return out
