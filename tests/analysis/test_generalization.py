"""The batch-size estimators against exact values: per-sample gradients, dense Hessians, brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from dynatrack.analysis import generalization as gen

CE = nn.functional.cross_entropy


def tiny(seed: int = 0, d_in: int = 3, hidden: int = 5, d_out: int = 3, n: int = 6) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out)).double()
    x = torch.randn(n, d_in, dtype=torch.float64)
    y = torch.randint(0, d_out, (n,))
    return net, x, y


def per_sample_grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(CE(net(x[i : i + 1]), y[i : i + 1]), list(net.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
    return np.stack(rows)


def exact_g2_trace(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    g = per_sample_grads(net, x, y)
    mean = g.mean(0)
    return float(mean @ mean), float(((g - mean) ** 2).sum(1).mean())  # |G|^2, tr(Sigma) (1/N)


def test_exact_expectations_recover_g2_and_trace():
    net, x, y = tiny()
    g2, tr = exact_g2_trace(net, x, y)
    # E|G_B|^2 for B i.i.d. draws, by enumerating every ordered batch (with replacement) and
    # differentiating the batch loss itself: no per-sample algebra on this side
    expect = {}
    for b in (1, 2, 3):
        norms = [gen.batch_grad_sq_norm(net, CE, x[list(idx)], y[list(idx)])
                 for idx in itertools.product(range(len(x)), repeat=b)]
        expect[b] = float(np.mean(norms))
        assert expect[b] == pytest.approx(g2 + tr / b, rel=1e-9)
    est = gen.two_batch_noise_scale([expect[1]], [expect[3]], b_small=1, b_big=3)
    assert est.grad_sq == pytest.approx(g2, rel=1e-8)
    assert est.trace_sigma == pytest.approx(tr, rel=1e-8)
    assert est.b_simple == pytest.approx(tr / g2, rel=1e-8)


@pytest.mark.slow
def test_sampled_measurements_converge_to_the_exact_noise_scale():
    net, x, y = tiny(seed=1, n=10)
    g2, tr = exact_g2_trace(net, x, y)
    small, big = gen.sample_grad_sq_norms(net, CE, x, y, b_small=2, n_small=4, n_measurements=3000, seed=3)
    # each side's mean is unbiased: E|G_2|^2 = |G|^2 + tr/2, E|G_8|^2 = |G|^2 + tr/8
    for values, b in ((small, 2), (big, 8)):
        se = values.std(ddof=1) / math.sqrt(len(values))
        assert abs(values.mean() - (g2 + tr / b)) < 4 * se
    est = gen.two_batch_noise_scale(small, big, b_small=2, b_big=8)
    assert est.trace_sigma == pytest.approx(tr, rel=0.1)
    assert est.b_simple == pytest.approx(tr / g2, rel=0.25)
    # ratio of means, not mean of ratios
    per_pair = [gen.two_batch_noise_scale([s], [b], 2, 8).b_simple for s, b in zip(small[:50], big[:50])]
    assert est.b_simple != pytest.approx(np.nanmean(per_pair), rel=1e-6)


def test_noise_scale_rejects_bad_batch_sizes():
    with pytest.raises(ValueError, match="b_small"):
        gen.two_batch_noise_scale([1.0], [0.5], b_small=8, b_big=8)
    with pytest.raises(ValueError, match="at least one"):
        gen.two_batch_noise_scale([], [0.5], b_small=2, b_big=8)


def test_top_eigenvalue_equals_dense_eigendecomposition():
    net, x, y = tiny(seed=2, n=20)
    w = gen.flat_parameters(net)
    dense = torch.autograd.functional.hessian(lambda f: gen.loss_at(net, CE, x, y, f), w)
    eig, vecs = torch.linalg.eigh(dense)
    k = int(eig.abs().argmax())
    top = gen.top_hessian_eigenvalue(net, CE, x, y, iters=2000, tol=1e-13, seed=0)
    assert top.eigenvalue == pytest.approx(float(eig[k]), rel=1e-5)
    assert abs(float(top.vector @ vecs[:, k])) == pytest.approx(1.0, abs=1e-4)
    # one Hessian-vector product equals the dense product
    v = torch.randn(len(w), dtype=torch.float64)
    np.testing.assert_allclose(gen.hessian_vector_product(net, CE, x, y, v).numpy(), (dense @ v).numpy(),
                               rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("eps", [1e-3, 5e-2])
def test_sharpness_is_never_below_random_points_in_the_box(eps):
    net, x, y = tiny(seed=4, n=40, hidden=8)
    net = net.float()
    x = x.float()
    # a few SGD steps so the point is not the initialization
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        CE(net(x), y).backward()
        opt.step()
    res = gen.epsilon_sharpness(net, CE, x, y, eps=eps, maxiter=10)
    w = gen.flat_parameters(net)
    box = eps * (w.abs() + 1.0)
    with torch.no_grad():
        base = float(CE(net(x), y))
    assert res.loss == pytest.approx(base, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    best = base
    for k in range(500):
        u = torch.rand(len(w), generator=g, dtype=torch.float64) * 2 - 1
        if k % 2:
            u = u.sign()  # corners of the box too
        with torch.no_grad():
            best = max(best, float(gen.loss_at(net, CE, x, y, (w + u * box).float())))
    phi_random = (best - base) / (1 + base) * 100
    assert res.sharpness >= phi_random
    assert res.sharpness == pytest.approx((res.max_loss - base) / (1 + base) * 100)


def test_interpolation_endpoints_are_the_two_solutions():
    net_a, x, y = tiny(seed=5, n=30)
    net_b, _, _ = tiny(seed=6, n=30)
    wa, wb = gen.flat_parameters(net_a), gen.flat_parameters(net_b)
    res = gen.interpolate(net_a, CE, x, y, wa, wb, alphas=[-1.0, 0.0, 0.5, 1.0, 2.0])
    with torch.no_grad():
        for net, i in ((net_a, 1), (net_b, 3)):
            out = net(x)
            assert res.loss[i] == pytest.approx(float(CE(out, y)), rel=1e-9)
            assert res.accuracy[i] == pytest.approx(float((out.argmax(1) == y).double().mean()))
    # the midpoint is the loss of the averaged weights, loaded into a fresh copy
    mid = tiny(seed=7, n=30)[0]
    with torch.no_grad():
        for p, a, b in zip(mid.parameters(), net_a.parameters(), net_b.parameters()):
            p.copy_((a + b) / 2)
        assert res.loss[2] == pytest.approx(float(CE(mid(x), y)), rel=1e-9)


def test_weight_distance_and_seed_statistics_by_hand():
    assert gen.weight_distance(np.array([1.0, 2.0, 2.0]), np.zeros(3)) == 3.0
    s = gen.seed_summary([2.0, 4.0, 9.0])
    assert (s.mean, s.n) == (5.0, 3)
    assert s.std == pytest.approx(math.sqrt(((2 - 5) ** 2 + (4 - 5) ** 2 + (9 - 5) ** 2) / 2))
    assert math.isnan(gen.seed_summary([1.0]).std)
    a, b = [0.91, 0.93, 0.92, 0.95], [0.88, 0.86, 0.90]
    res = gen.welch_test(a, b)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    assert res.t == pytest.approx(t)
    assert res.df == pytest.approx(df)
    assert res.p == pytest.approx(2 * stats.t.sf(abs(t), df))
    assert math.isnan(gen.welch_test([1.0], [2.0, 3.0]).p)
