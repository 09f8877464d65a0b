"""dynatrack.analysis.zonotope against brute force: convex hulls, active-set enumeration, Gordan's alternative."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from scipy.spatial import ConvexHull

from conftest import TinyNet, loader, make_data, trainer
from dynatrack import PatternRecorder, open_run, schedules
from dynatrack.analysis import zonotope as zt


def _infeasible_by_gordan(x: np.ndarray, s: np.ndarray) -> bool:
    """Gordan's alternative, by NNLS: no w with g_i·w > 0 for all i iff some y >= 0, Σy = 1, has Σ y_i g_i = 0."""
    g = np.where(s, 1.0, -1.0)[:, None] * zt.homogenize(x)
    mat = np.vstack([g.T, np.ones((1, len(g)))])
    rhs = np.zeros(len(mat))
    rhs[-1] = 1.0
    _, resid = nnls(mat, rhs)
    return resid < 1e-9


@pytest.fixture(scope="module")
def shallow_run(tmp_path_factory) -> str:  # noqa: ANN001
    """A real recorded one-hidden-layer run (3 -> 9 -> 3); its probe holds sample 0 twice."""
    x, y = make_data(n=64, d_in=3, classes=3, seed=3)
    probe_x, probe_y = torch.cat([x, x[:1]]), torch.cat([y, y[:1]])
    rec = PatternRecorder(str(tmp_path_factory.mktemp("runs")), run_name="shallow", probe=(probe_x, probe_y),
                          schedule=schedules.every(4))
    torch.manual_seed(0)
    trainer(16, [rec]).fit(TinyNet(d_in=3, hidden=(9,), d_out=3, lr=0.2), loader(x, y))
    return rec.run_dir


def test_every_recorded_pattern_is_a_vertex_and_a_corrupted_one_is_not(shallow_run) -> None:  # noqa: ANN001
    run = open_run(shallow_run)
    layer = next(iter(run.widths))
    ids, _, x = run.probe_inputs("train")
    order = np.argsort(ids)
    x = x[order].reshape(len(x), -1)
    dup = len(x) - 1  # the copy of sample 0
    np.testing.assert_array_equal(x[dup], x[0])
    checked = 0
    for step in run.recorded_steps("patterns"):
        got_ids, bits = run.pattern_bits(step, layer)
        np.testing.assert_array_equal(got_ids, ids[order])
        pats = np.unpackbits(bits, axis=1, count=run.widths[layer]).astype(bool).T  # [neurons, samples]
        assert zt.is_vertex(x, pats).all()
        checked += len(pats)
        bad = pats.copy()
        bad[:, dup] = ~bad[:, 0]  # the two copies of one input disagree: no weights can do that
        assert not zt.is_vertex(x, bad).any()
    assert checked == 9 * len(run.recorded_steps("patterns")) and checked >= 36
    # every single-bit flip of one recorded pattern: the LP agrees with Gordan's alternative (NNLS)
    pat = pats[int(np.argmax([0 < p.sum() < len(p) for p in pats]))]
    flips = np.repeat(pat[None], len(pat), axis=0)
    flips[np.arange(len(pat)), np.arange(len(pat))] ^= True
    lp = zt.is_vertex(x, flips)
    assert lp.tolist() == [not _infeasible_by_gordan(x, f) for f in flips]
    assert 0 < lp.sum() < len(lp)  # both kinds occur


@pytest.mark.parametrize(("n", "seed"), [(5, 0), (6, 1), (7, 2)])
def test_vertex_count_equals_convex_hull_of_subset_sums(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    xt = zt.homogenize(x)
    subsets = np.array(list(itertools.product([False, True], repeat=n)))
    sums = subsets.astype(float) @ xt  # the zonotope Σ_i [0, x~_i] is the hull of all subset sums
    hull = set(ConvexHull(sums).vertices.tolist())
    lp = zt.is_vertex(x, subsets)
    assert set(np.flatnonzero(lp).tolist()) == hull
    assert len(hull) <= zt.vertex_count_bound(n, 2) == 2 * sum(math.comb(n - 1, k) for k in range(3))
    assert len(hull) == zt.vertex_count_bound(n, 2)  # points in general position reach the bound


def _tiny_problem(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.linspace(-1.5, 1.5, 7)[:, None] + 0.01 * rng.normal(size=(7, 1))
    w = np.array([[1.0, 0.2], [-1.0, 0.3]])  # neuron 0 active on the right, neuron 1 on the left
    a = np.array([[1.0, -1.0]])
    y = np.abs(x[:, 0]) ** 1.5 + 0.3 * rng.normal(size=7)
    s = (zt.homogenize(x) @ w.T > 0).T
    return x, y, s, w, a


def _brute_force_qp(x: np.ndarray, y: np.ndarray, s: np.ndarray, a: np.ndarray) -> float:
    """min over active sets: equality-constrained least squares (null space + lstsq), kept when feasible."""
    xt = zt.homogenize(x)
    n, p = xt.shape
    m = len(s)
    e = np.hstack([np.hstack([a[0, j] * s[j][:, None] * xt for j in range(m)]), np.ones((n, 1))])
    g = np.zeros((n * m, m * p + 1))
    for j in range(m):
        g[j * n:(j + 1) * n, j * p:(j + 1) * p] = np.where(s[j], 1.0, -1.0)[:, None] * xt
    assert np.linalg.matrix_rank(e) == e.shape[1]  # strictly convex: the minimizer on each face is unique
    best = np.inf
    for k in range(e.shape[1] + 1):
        for active in itertools.combinations(range(len(g)), k):
            if active:
                _, sv, vt = np.linalg.svd(g[list(active)])
                null = vt[int((sv > 1e-10).sum()):].T
            else:
                null = np.eye(e.shape[1])
            if null.shape[1] == 0:
                z = np.zeros(e.shape[1])
            else:
                coef, *_ = np.linalg.lstsq(e @ null, y, rcond=None)
                z = null @ coef
            if (g @ z >= -1e-9).all():
                best = min(best, float(((e @ z - y) ** 2).mean()))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_pattern_optimum_equals_active_set_enumeration(seed: int) -> None:
    x, y, s, _, a = _tiny_problem(seed)
    got = zt.fixed_pattern_optimum(x, y, s, a)
    assert got.loss == pytest.approx(_brute_force_qp(x, y, s, a), rel=1e-7, abs=1e-10)
    assert got.max_violation < 1e-9
    assert zt.relaxed_optimum(x, y, s, a) <= got.loss + 1e-12


def test_fixed_pattern_optimum_is_below_every_network_with_those_patterns() -> None:
    torch.manual_seed(0)
    x, _ = make_data(n=40, d_in=2, seed=5)
    y = torch.sin(2 * x[:, 0]) + x[:, 1] ** 2
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    xd, yd = x.double(), y.double()
    for _ in range(200):  # a trained network
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(xd).squeeze(1), yd)
        loss.backward()
        opt.step()
    w = torch.cat([net[0].weight, net[0].bias[:, None]], 1).detach().numpy()
    a = net[2].weight.detach().numpy()
    c = net[2].bias.detach().numpy()
    s = (zt.homogenize(x.numpy()) @ w.T > 0).T
    xn, yn = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    trained = zt.network_square_loss(xn, yn, w, a, c)
    assert trained == pytest.approx(loss.item(), rel=1e-3)  # the same loss, computed by torch
    opt_joint = zt.fixed_pattern_optimum(xn, yn, s, np.sign(a)).loss
    opt_fixed_a = zt.fixed_pattern_optimum(xn, yn, s, a).loss
    assert opt_joint <= opt_fixed_a + 1e-9 <= trained + 2e-9
    # random networks with exactly these patterns and output signs
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        w2 = w * rng.uniform(0.3, 3.0, size=(len(w), 1)) + rng.normal(scale=0.005, size=w.shape) * np.abs(w).mean()
        if not ((zt.homogenize(xn) @ w2.T > 0).T == s).all():
            continue
        a2 = a * rng.uniform(0.2, 3.0, size=a.shape)
        assert zt.network_square_loss(xn, yn, w2, a2, rng.normal(size=1)) >= opt_joint - 1e-9
        assert zt.network_square_loss(xn, yn, w2, a, c + rng.normal(size=1)) >= opt_fixed_a - 1e-9
        checked += 1
    assert checked > 30


def test_vertex_moves_and_distinct_vertices_against_loops() -> None:
    rng = np.random.default_rng(0)
    hist = rng.random((6, 4, 10)) < 0.5
    hist[3] = hist[1]  # a return to an earlier vertex is not a new one
    moves = [zt.vertex_moves(hist[t - 1], hist[t]) for t in range(1, 6)]
    for t in range(1, 6):
        assert moves[t - 1].tolist() == [sum(hist[t - 1, j, i] != hist[t, j, i] for i in range(10)) for j in range(4)]
    got = zt.distinct_vertices(hist)
    for t in range(6):
        for j in range(4):
            assert got[t, j] == len({tuple(hist[u, j]) for u in range(t + 1)})
    with pytest.raises(ValueError, match="shapes differ"):
        zt.vertex_moves(hist[0], hist[0, :, :5])


def test_greedy_search_never_worsens_and_moves_between_neighbouring_vertices() -> None:
    x, y, s, _, a = _tiny_problem(4)
    res = zt.greedy_vertex_search(x, y, s, a, max_moves=3)
    assert all(b < h for h, b in zip(res.history, res.history[1:]))
    assert res.loss == pytest.approx(zt.fixed_pattern_optimum(x, y, res.patterns, a).loss)
    assert zt.is_vertex(x, res.patterns).all()
    assert int((res.patterns != s).sum()) <= res.moves  # one bit per move
