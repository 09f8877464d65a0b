"""Partition dynamics against naive loops over neurons and samples."""

from __future__ import annotations

import numpy as np

from dynatrack.analysis import partition_dynamics as pdyn
from dynatrack.analysis.partitions import LABELS


def test_sizes_sum_to_width_and_transition_rows_sum_to_earlier_sizes():
    rng = np.random.default_rng(0)
    for width in (1, 7, 64):
        before = rng.choice(LABELS[:4], width).astype(object)
        after = rng.choice(LABELS[:4], width).astype(object)
        sizes_before = pdyn.class_sizes(before)
        assert sum(sizes_before.values()) == width
        t = pdyn.transition_counts(before, after)
        for c, size in sizes_before.items():
            assert sum(v for (a, _), v in t.items() if a == c) == size
        for c, size in pdyn.class_sizes(after).items():
            assert sum(v for (_, b), v in t.items() if b == c) == size
        # naive: the pair of every neuron
        for (a, b), v in t.items():
            assert v == sum(1 for k in range(width) if before[k] == a and after[k] == b)


def test_set_changes_merge_by_addition_and_match_a_naive_set_comparison():
    rng = np.random.default_rng(1)
    n, width = 50, 20
    ref = rng.random((n, width)) < 0.5
    now = ref.copy()
    flip = rng.random((n, width)) < 0.03
    now[flip] = ~now[flip]
    whole = pdyn.set_change_update(pdyn.SetChangeState(width), ref, now)
    shards = [slice(0, 17), slice(17, 31), slice(31, n)]  # three "ranks"
    merged = pdyn.SetChangeState(width)
    for s in shards:
        merged = pdyn.set_change_merge(merged, pdyn.set_change_update(pdyn.SetChangeState(width), ref[s], now[s]))
    assert merged.n_samples == whole.n_samples == n
    np.testing.assert_array_equal(merged.changed, whole.changed)
    n_unchanged, total = pdyn.set_change_compute(merged)
    sets_ref = [set(np.flatnonzero(ref[:, k])) for k in range(width)]
    sets_now = [set(np.flatnonzero(now[:, k])) for k in range(width)]
    assert n_unchanged == sum(1 for a, b in zip(sets_ref, sets_now) if a == b)
    assert total == sum(len(a ^ b) for a, b in zip(sets_ref, sets_now))
    churn = pdyn.sample_churn(ref, now)
    for i in range(n):
        assert churn[i] == len(set(np.flatnonzero(ref[i])) ^ set(np.flatnonzero(now[i])))
