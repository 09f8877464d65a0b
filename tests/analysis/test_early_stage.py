"""Early-stage bounds against autograd, a dense Hessian and the notes' formula written naively."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dynatrack.analysis import early_stage as es


def make_net(d: int, widths: list[int], c: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    w = d
    for h in widths:
        layers += [nn.Linear(w, h), nn.ReLU()]
        w = h
    layers.append(nn.Linear(w, c))
    return nn.Sequential(*layers).double()


def chain_of(net: nn.Sequential) -> list[es.Layer]:
    lin = [m for m in net if isinstance(m, nn.Linear)]
    return [es.Layer(m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy(),
                     None if i == len(lin) - 1 else 0.0, str(i)) for i, m in enumerate(lin)]


def torch_reference(net: nn.Sequential, x: np.ndarray, y: np.ndarray, loss: str) -> tuple[float, list[torch.Tensor]]:
    """Loss and per-parameter gradients of the real nn.Module (torch's own loss functions)."""
    net.zero_grad()
    out = net(torch.as_tensor(x))
    if loss == "cross_entropy":
        val = nn.functional.cross_entropy(out, torch.as_tensor(y))
    else:
        t = torch.as_tensor(y, dtype=torch.float64).reshape(-1, 1) if out.shape[1] == 1 else \
            nn.functional.one_hot(torch.as_tensor(y), out.shape[1]).double()
        val = nn.functional.mse_loss(out, t)
    val.backward()
    return float(val.detach()), [p.grad.clone() for p in net.parameters()]


def hidden_mask(net: nn.Sequential, x: np.ndarray) -> np.ndarray:
    """The last hidden layer's pattern from the module's forward (pre-activation > 0)."""
    h = torch.as_tensor(x)
    mods = list(net)
    for m in mods[:-2]:
        h = m(h)
    return (h > 0).numpy()  # h is the last Linear-before-ReLU output: mods[-2] is that ReLU


def data(n: int, d: int, c: int, loss: str, seed: int, orthogonal: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if orthogonal:  # near-orthogonal: d > n, unit-norm random directions
        x = rng.normal(size=(n, d)) / np.sqrt(d)
    else:
        x = rng.normal(size=(n, d))
    y = rng.integers(0, max(c, 2), n) if loss == "cross_entropy" or c > 1 else rng.normal(size=n)
    return x, y


CASES = [(loss, c, widths, orth, seed)
         for loss, cs in (("cross_entropy", (2, 4)), ("mse", (1, 3)))
         for c in cs
         for widths in ([24], [6, 16])
         for orth in (True, False)
         for seed in range(3)]


@pytest.mark.parametrize("loss,c,widths,orth,seed", CASES)
def test_every_lower_bound_is_below_the_autograd_gradient_norm(loss, c, widths, orth, seed):
    n, d = (12, 40) if orth else (30, 5)
    x, y = data(n, d, c, loss, seed, orth)
    net = make_net(d, widths, c, seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    mus = []
    for _ in range(4):  # every checked step of a short GD run
        chain = chain_of(net)
        view = es.last_hidden_view(chain, x)
        b = es.gradient_bounds(view, hidden_mask(net, x), y, loss)
        val, grads = torch_reference(net, x, y, loss)
        full = float(sum((g ** 2).sum() for g in grads))
        assert b.loss == pytest.approx(val, rel=1e-12)
        assert 0 <= b.lb_mu <= b.lb_partition * (1 + 1e-12) + 1e-300
        assert b.lb_partition <= b.grad_hidden_sq * (1 + 1e-12)
        assert b.lb_total <= full * (1 + 1e-12)
        # the pattern-based gradients are exactly the last two layers' autograd gradients
        hid_w, hid_b, out_w = grads[-4], grads[-3], grads[-2]
        np.testing.assert_allclose(b.grad_out, out_w.numpy(), rtol=1e-10, atol=1e-14)
        assert b.grad_hidden_sq == pytest.approx(float((hid_w ** 2).sum() + (hid_b ** 2).sum()), rel=1e-10)
        _, full_chain = es.full_gradient(chain, x, y, loss)
        assert float(full_chain @ full_chain) == pytest.approx(full, rel=1e-10)
        mus.append(b.mu)
        opt.step()
    if orth and len(widths) == 1:
        assert max(mus) > 0, "near-orthogonal two-layer data should give a non-vacuous partition constant"


def test_mu_equals_the_notes_formula_written_as_a_loop():
    """C = 1: μ_t = min_i Σ_{k: i∈I_k} a_k² λ_min(G_{I_k}), G over x̃ = [x; 1]."""
    n, d, m = 10, 30, 40
    x, y = data(n, d, 1, "mse", 7, True)
    net = make_net(d, [m], 1, 7)
    view = es.last_hidden_view(chain_of(net), x)
    mask = hidden_mask(net, x)
    b = es.gradient_bounds(view, mask, y, "mse")
    xt = np.hstack([x, np.ones((n, 1))])
    a = net[2].weight.detach().numpy()[0]
    per_sample = []
    for i in range(n):
        total = 0.0
        for k in range(m):
            if mask[i, k]:
                idx = [j for j in range(n) if mask[j, k]]
                gram = np.array([[xt[p] @ xt[q] for q in idx] for p in idx])
                total += a[k] ** 2 * np.linalg.eigvalsh(gram)[0]
        per_sample.append(total)
    assert b.mu == pytest.approx(min(per_sample), rel=1e-8)
    assert b.mu > 0
    # mse: ||g||² = (4n/C) L, so lb_mu = 4 μ L / n
    assert b.lb_mu == pytest.approx(4 * b.mu * b.loss / n, rel=1e-10)


@pytest.mark.parametrize("loss,c", [("cross_entropy", 3), ("mse", 2)])
def test_beta_equals_the_top_eigenvalue_of_the_dense_hessian(loss, c):
    n, d = 8, 3
    x, y = data(n, d, c, loss, 3, False)
    net = make_net(d, [4], c, 3)
    chain = chain_of(net)
    shapes = [p.shape for p in net.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    xt = torch.as_tensor(x)

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        ps, i = [], 0
        for s in shapes:
            k = int(np.prod(s))
            ps.append(flat[i:i + k].reshape(s))
            i += k
        out = torch.relu(xt @ ps[0].T + ps[1]) @ ps[2].T + ps[3]
        if loss == "cross_entropy":
            return nn.functional.cross_entropy(out, torch.as_tensor(y))
        return nn.functional.mse_loss(out, nn.functional.one_hot(torch.as_tensor(y), c).double())

    dense = torch.autograd.functional.hessian(loss_of, flat0).numpy()
    top = np.abs(np.linalg.eigvalsh(dense)).max()
    beta = es.hessian_top_eigenvalue(chain, x, y, loss, iters=5000, tol=1e-13)
    assert beta == pytest.approx(top, rel=1e-6)
    assert es.hessian_top_eigenvalue(chain, x, y, loss, iters=30) <= top * (1 + 1e-9)  # a lower estimate


def test_chained_bounds_and_violation_causes():
    steps = np.array([0, 1, 2, 5])
    loss = np.array([1.0, 0.9, 0.85, 0.5])
    ch = es.chain_bounds(steps, loss, grad_sq=np.array([1.0, 0.5, 0.2, 0.1]), lb_mu=np.array([0.5, 0.2, 0.1, 0.0]),
                         eta=np.full(4, 0.1), beta=np.full(4, 2.0), g_dot_delta=np.array([-0.1, -0.05, -0.02, 0.0]),
                         delta_sq=np.array([0.01, 0.0025, 0.0004, 0.0]))
    c = 0.1 * (1 - 2.0 * 0.1 / 2)  # η(1 - βη/2) = 0.09
    np.testing.assert_allclose(ch.pred_gd[:3], [1.0, 1 - c, 1 - c - c * 0.5])
    np.testing.assert_allclose(ch.pred_mu[:3], [1.0, 1 - c * 0.5, (1 - c * 0.5) * (1 - c * 0.2 / 0.9)])
    np.testing.assert_allclose(ch.pred_step[:3], [1.0, 1 - 0.1 + 0.01, 1 - 0.1 + 0.01 - 0.05 + 0.0025])
    assert np.isnan(ch.pred_gd[3])  # a gap ends the chain
    # ηβ >= 2: the descent lemma still bounds (an increase), but a lower bound cannot replace ||∇L||²
    big = es.chain_bounds(steps[:3], loss[:3], np.ones(3), np.full(3, 0.5), np.full(3, 1.0), np.full(3, 2.5),
                          np.zeros(3), np.zeros(3))
    assert np.isnan(big.ratio_pred_mu).all() and np.isnan(big.pred_mu[1:]).all()
    np.testing.assert_allclose(big.pred_gd, [1.0, 1.25, 1.5])
    assert es.early_stage_end(steps, loss, 0.5) == 5 and es.early_stage_end(steps, loss, 0.1) is None
    why = es.violation_causes(eta=1.0, beta_t=3.0, beta_next=4.0, kink=True, gd_residual=0.5, kind="gd")
    assert "kink" in why and "2/β" in why and "not full-batch GD" in why and "β underestimated" in why
    assert es.violation_causes(eta=0.1, beta_t=1.0, beta_next=1.0, kink=False, gd_residual=0.0, kind="step") == \
        "β underestimated"


def test_networks_it_does_not_apply_to_are_refused_with_the_reason():
    leaky = [es.Layer(np.eye(2), np.zeros(2), 0.1, "act"), es.Layer(np.eye(2), np.zeros(2), None, "out")]
    with pytest.raises(es.NotApplicableError, match="ReLU last hidden layer"):
        es.last_hidden_view(leaky, np.zeros((3, 2)))
    with pytest.raises(es.NotApplicableError, match="hidden ReLU layer followed by an affine output"):
        es.last_hidden_view([es.Layer(np.eye(2), np.zeros(2), None, "out")], np.zeros((3, 2)))
    with pytest.raises(es.NotApplicableError, match=">= 2 outputs"):
        es.loss_and_derivative(np.zeros((3, 1)), np.zeros(3), "cross_entropy")
