"""Schedules against their plain-language definitions, as naive loops."""
import math

import pytest

from dynatrack import schedules


def test_every_matches_modulo():
    s = schedules.every(7, start=3)
    assert [k for k in range(60) if s(k)] == [k for k in range(3, 60) if (k - 3) % 7 == 0]


def test_log_spaced_is_dense_early_sparse_late():
    s = schedules.log_spaced(dense=30, base=10)
    got = [k for k in range(5000) if s(k)]
    naive = list(range(30)) + list(range(30, 300, 10)) + list(range(300, 3000, 100)) + list(range(3000, 5000, 1000))
    assert got == naive


def test_at_union_never():
    s = schedules.union([schedules.at([2, 9]), schedules.every(5)])
    assert [k for k in range(12) if s(k)] == [0, 2, 5, 9, 10]
    assert not any(schedules.never()(k) for k in range(100))


@pytest.mark.parametrize("bad", [lambda: schedules.every(0), lambda: schedules.log_spaced(dense=0),
                                 lambda: schedules.at([-1]), lambda: schedules.log_spaced(base=1)])
def test_bad_schedules_raise(bad):
    with pytest.raises(ValueError):
        bad()


@pytest.mark.parametrize(
    "schedule",
    [schedules.every(7, start=3), schedules.every(1), schedules.log_spaced(), schedules.log_spaced(dense=5, base=10),
     schedules.log_spaced(dense=3, base=4), schedules.at([0, 17, 400]), schedules.never(),
     schedules.union([schedules.at([2, 9]), schedules.every(50, start=5)]), schedules.union([schedules.never()])],
)
def test_next_step_equals_a_brute_force_scan(schedule):
    horizon = 5000
    for step in range(0, 1200):
        expected = next((s for s in range(step, horizon) if schedule(s)), math.inf)
        assert schedules.next_step(schedule, step) == expected, (schedule, step)


def test_next_step_of_an_arbitrary_callable_is_unknown():
    assert schedules.next_step(lambda s: s % 3 == 0, 4) is None
    assert schedules.next_step(schedules.union([schedules.every(2), lambda s: False]), 4) is None
