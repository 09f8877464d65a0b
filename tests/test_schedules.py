"""Schedules against their plain-language definitions, as naive loops."""

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
