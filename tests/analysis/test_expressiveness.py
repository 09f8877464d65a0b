"""dynatrack.analysis.expressiveness against naive pairwise loops and hand values."""

from __future__ import annotations

import numpy as np
import pytest

from dynatrack.analysis.expressiveness import expressiveness, jaccard_sum, prune_ranking


def _naive_layer(a: np.ndarray) -> float:
    """1 - mean over ordered pairs p != q of |a_p & a_q| / |a_p | a_q| (1 when both empty), by loops."""
    n = len(a)
    total = 0.0
    for p in range(n):
        for q in range(n):
            if p != q:
                union = int((a[p] | a[q]).sum())
                total += 1.0 if union == 0 else int((a[p] & a[q]).sum()) / union
    return 1.0 - total / (n * (n - 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_leave_one_out_in_one_pass_equals_naive_recomputation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.random((23, 9)) < rng.uniform(0.1, 0.6, size=9)  # neurons of different densities
    a[:, 2] = False  # dead
    a[:, 5] = True  # always on
    a[3] = False  # a sample with an empty pattern (0/0 pairs)
    a[4] = False
    r = expressiveness(a)
    assert r.layer == pytest.approx(_naive_layer(a), abs=1e-12)
    assert r.jaccard_sum == pytest.approx(jaccard_sum(a), abs=1e-9)
    for j in range(a.shape[1]):
        without = np.delete(a, j, axis=1)
        assert r.neuron[j] == pytest.approx(r.layer - _naive_layer(without), abs=1e-12), j
        assert r.loo_jaccard_sum[j] == pytest.approx(jaccard_sum(without), abs=1e-9)
    assert r.n_pairs == 23 * 22


def test_dead_and_always_on_neurons_score_as_defined() -> None:
    # samples {0,1} {0,2} {0} {0,1,2} plus a dead neuron 3; neuron 0 always on
    a = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=bool)
    r = expressiveness(a)
    assert r.neuron[3] == 0.0  # dead: no intersection or union changes
    # by hand, unordered pairs: J = 1/3, 1/2, 2/3, 1/2, 2/3, 1/3 -> mean 1/2 -> E = 1/2
    assert r.layer == pytest.approx(0.5)
    # without neuron 0: {1} {2} {} {1,2}: J = 0, 0, 1/2, 0, 1/2, 0 (the pair {1},{} has J = 0) -> mean 1/6
    assert r.neuron[0] == pytest.approx(0.5 - (1 - 1 / 6))
    assert r.neuron[0] < 0  # always on: it makes samples look alike
    assert prune_ranking(r.neuron, 1).tolist() == [0]
    rng = np.random.default_rng(1)
    for _ in range(20):  # always-on never scores above 0, dead always exactly 0
        b = rng.random((12, 6)) < 0.4
        b[:, 0], b[:, 1] = True, False
        s = expressiveness(b).neuron
        assert s[0] <= 1e-15 and s[1] == 0.0


def test_prune_ranking_and_bad_input() -> None:
    assert prune_ranking(np.array([0.3, -0.1, 0.0, 0.3]), 3).tolist() == [1, 2, 0]
    assert prune_ranking(np.array([0.3]), 0).tolist() == []
    with pytest.raises(ValueError, match="cannot prune 5 neurons from a layer of 4"):
        prune_ranking(np.zeros(4), 5)
    with pytest.raises(ValueError, match="needs >= 2 probe samples"):
        expressiveness(np.ones((1, 4), dtype=bool))
