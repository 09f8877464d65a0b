"""Early-stage loss bounds from the neuron partition (Wang & Ma, NeurIPS 2022).

Wang & Ma, "Early Stage Convergence and Global Convergence of Training Mildly
Parameterized Neural Networks" (NeurIPS 2022, arXiv 2206.02139) show that GD/SGD
decrease the loss substantially and fast in the early stage, through gradient lower
bounds built from the neurons' activation patterns. Their exact theorem was not
available to this project: every bound below is **derived** (project notes,
section 3) and each step is an inequality that holds for any weights.

Model. A two-layer net f(x) = A σ(B x̃) + a₀ (x̃ = [x; 1]: the hidden bias is the last
column of B; A is ``[C, m]``) is the exact case. For a deeper chain of affine maps and
ReLU-family activations the same formulas are applied to the **last hidden layer,
with the earlier layers frozen as features**: x̃ = [φ(x); 1], φ the output of the layers
before it. Only parameters of the last two layers enter the lower bounds, so they
stay below the full gradient norm over *all* parameters.

Loss. L = (1/n) Σ_i ℓ(f(x_i), y_i), with ``cross_entropy`` (ℓ = logsumexp(f) - f_y,
C ≥ 2) or ``mse`` as torch's ``mse_loss`` (ℓ = (1/C)||f - t||², t = one-hot(y) for
C ≥ 2, t = y for C = 1). g_i = ∂ℓ/∂f(x_i), so ∂L/∂f(x_i) = g_i / n.

Activated sets (the partition). I_k = {i : b_k·x̃_i > 0}, read from the recorded
patterns M[i, k] = 1[i ∈ I_k]; h_ik = M_ik (b_k·x̃_i).

Derived gradient lower bounds (each ≤ ||∇L||², the squared norm over all parameters):

* output layer (notes: Σ_k (∂L/∂a_k)²):
  ∂L/∂A_ck = (1/n) Σ_{i∈I_k} g_ic (b_k·x̃_i);   ``grad_out_sq`` = ||∂L/∂A||².
* hidden layer, exact from the patterns:
  ∂L/∂b_k = (1/n) Σ_{i∈I_k} (A_:k·g_i) x̃_i;   ``grad_hidden_sq`` = Σ_k ||∂L/∂b_k||².
* partition constant (PL-type): with G_I = [x̃_i·x̃_j]_{i,j∈I} and λ_k = λ_min(G_{I_k}),
  ||∂L/∂b_k||² ≥ (λ_k/n²) Σ_{i∈I_k} (A_:k·g_i)², and regrouping by sample,
  Σ_k ||∂L/∂b_k||² ≥ (1/n²) Σ_i g_iᵀ M_i g_i ≥ (1/n²) Σ_i μ_i ||g_i||² ≥ (μ_t/n²) ||g||²,
  M_i = Σ_{k: i∈I_k} λ_k A_:k A_:kᵀ, μ_i = λ_min(M_i) (for cross-entropy on the subspace
  1⟂, where g_i lies), μ_t = min_i μ_i. For C = 1 this is the notes'
  μ_t = min_i Σ_{k: i∈I_k} a_k² λ_min(G_{I_k}). ``lb_partition`` = (1/n²) Σ_i μ_i ||g_i||²,
  ``lb_mu`` = μ_t ||g||² / n². For ``mse`` ||g||² = (4n/C)·L, so ``lb_mu`` = (4 μ_t / (nC))·L
  (the notes' (2 μ_t / n)·L for L = (1/2n) Σ r² differs only by that convention).
  λ_min(G_I) = 0 once |I| exceeds the feature dimension: the bound is informative only
  while activated sets are small or the data near-orthogonal, and is reported as
  vacuous (μ_t = 0) rather than hidden.

Derived early-stage trajectory (descent lemma; β = smoothness along the path, estimated
by power iteration on Hessian-vector products: ReLU nets are not globally smooth, so β is
an estimate). For an update Δ_t = θ(t+1) - θ(t):

* general (any optimizer): L(t+1) ≤ L(t) + ∇L(t)·Δ_t + (β/2)||Δ_t||²;
* full-batch GD with step η (Δ_t = -η∇L(t)): L(t+1) ≤ L(t) - η(1 - βη/2)||∇L(t)||²
  ≤ L(t) - η(1 - βη/2)·lb for any lower bound lb, **only when ηβ < 2** (the coefficient
  must be positive to replace ||∇L||² by a lower bound), i.e.
  L(t+1)/L(t) ≤ 1 - η(1 - βη/2)·lb_mu/L(t); for ηβ ≥ 2 this form is undefined (null).

Chaining the one-step bounds over consecutive recorded steps gives the predicted
upper-bound trajectories of :func:`chain_bounds`; each violation is reported with its
cause (:func:`violation_causes`).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(6, 8)); B = rng.normal(size=(12, 9)); A = rng.normal(size=(1, 12))
>>> view = TwoLayerView(features=np.hstack([x, np.ones((6, 1))]), hidden=B, out=A, out_bias=np.zeros(1), exact=True)
>>> b = gradient_bounds(view, view.features @ B.T > 0, rng.normal(size=6), "mse")
>>> bool(b.lb_mu <= b.lb_partition <= b.grad_hidden_sq)
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

Loss = Literal["cross_entropy", "mse"]
LOSSES: tuple[str, ...] = ("cross_entropy", "mse")


class NotApplicableError(ValueError):
    """The early-stage bounds do not apply to this network, loss or probe (message says why)."""


# --------------------------------------------------------------------------- the loss


def loss_and_derivative(f: np.ndarray, y: np.ndarray, loss: Loss) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample loss ℓ_i ``[n]`` and its derivative g_i = ∂ℓ_i/∂f_i ``[n, C]`` (float64).

    ``cross_entropy``: ℓ_i = logsumexp(f_i) - f_i[y_i], g_i = softmax(f_i) - e_{y_i}.
    ``mse`` (torch ``mse_loss``, mean over all entries): ℓ_i = (1/C)||f_i - t_i||², g_i = (2/C)(f_i - t_i).

    >>> l, g = loss_and_derivative(np.array([[0.0, 0.0]]), np.array([1]), "cross_entropy")
    >>> round(float(l[0]), 4), g.tolist()
    (0.6931, [[0.5, -0.5]])
    """
    f = np.asarray(f, dtype=np.float64)
    f = f.reshape(len(f), -1)
    n, c = f.shape
    if loss == "cross_entropy":
        if c < 2:
            raise NotApplicableError("loss 'cross_entropy' needs >= 2 outputs; this network has 1 (use loss: mse)")
        yi = np.asarray(y, dtype=np.int64)
        shift = f - f.max(axis=1, keepdims=True)
        lse = np.log(np.exp(shift).sum(axis=1))
        ell = lse - shift[np.arange(n), yi]
        g = np.exp(shift - lse[:, None])
        g[np.arange(n), yi] -= 1.0
        return ell, g
    if loss == "mse":
        t = _targets(y, n, c)
        r = f - t
        return (r ** 2).mean(axis=1), (2.0 / c) * r
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def _targets(y: np.ndarray, n: int, c: int) -> np.ndarray:
    if c == 1:
        return np.asarray(y, dtype=np.float64).reshape(n, 1)
    t = np.zeros((n, c))
    t[np.arange(n), np.asarray(y, dtype=np.int64)] = 1.0
    return t


def torch_loss(f: torch.Tensor, y: torch.Tensor, loss: Loss) -> torch.Tensor:
    """The same loss as :func:`loss_and_derivative`, as a torch scalar (mean over samples)."""
    import torch

    f = f.reshape(len(f), -1)
    if loss == "cross_entropy":
        return torch.nn.functional.cross_entropy(f, y.long())
    t = torch.as_tensor(_targets(y.cpu().numpy(), len(f), f.shape[1]), dtype=f.dtype)
    return torch.nn.functional.mse_loss(f, t)


# --------------------------------------------------------------------------- the two-layer view


@dataclass(frozen=True)
class TwoLayerView:
    """The last hidden layer and the output layer, earlier layers frozen as features.

    ``features`` x̃ ``[n, D+1]`` (last column 1, for the hidden bias), ``hidden`` B
    ``[m, D+1]`` (bias last), ``out`` A ``[C, m]``, ``out_bias`` a₀ ``[C]``; ``exact`` when
    the network has no earlier layer (the two-layer case).
    """

    features: np.ndarray
    hidden: np.ndarray
    out: np.ndarray
    out_bias: np.ndarray
    exact: bool

    def pre_activations(self) -> np.ndarray:
        return self.features @ self.hidden.T


@dataclass(frozen=True)
class Layer:
    """One affine map ``z = W h + b`` and its activation slope (``None`` for the output layer).

    Same fields as :class:`dynatrack.analysis.regions.AffineLayer`, which can be passed instead.
    """

    weight: np.ndarray
    bias: np.ndarray
    negative_slope: float | None
    name: str = ""


def check_applies(layers: Sequence[Layer]) -> None:
    """Raise :class:`NotApplicableError` unless the chain ends ``ReLU hidden layer -> affine output``."""
    if len(layers) < 2 or layers[-1].negative_slope is not None:
        raise NotApplicableError(
            "early-stage bounds need a network ending in a hidden ReLU layer followed by an affine output "
            f"layer; this chain has {len(layers)} affine map(s)"
            + ("" if not layers or layers[-1].negative_slope is None else " and ends in an activation"))
    if layers[-2].negative_slope != 0.0:
        raise NotApplicableError(
            f"early-stage bounds need a ReLU last hidden layer; '{layers[-2].name}' has negative slope "
            f"{layers[-2].negative_slope} (LeakyReLU/PReLU: the activated-set formulas do not hold)")


def last_hidden_view(layers: Sequence[Layer], x: np.ndarray) -> TwoLayerView:
    """Split a chain into frozen features and the last two layers (see module docstring)."""
    check_applies(layers)
    h = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    for layer in layers[:-2]:
        z = h @ np.asarray(layer.weight, dtype=np.float64).T + layer.bias
        h = np.where(z > 0, z, layer.negative_slope * z)
    hid, out = layers[-2], layers[-1]
    feats = np.hstack([h, np.ones((len(h), 1))])
    b = np.hstack([np.asarray(hid.weight, dtype=np.float64), np.asarray(hid.bias, dtype=np.float64)[:, None]])
    return TwoLayerView(feats, b, np.asarray(out.weight, dtype=np.float64), np.asarray(out.bias, dtype=np.float64),
                        exact=len(layers) == 2)


# --------------------------------------------------------------------------- gradient lower bounds


@dataclass(frozen=True)
class GradientBounds:
    """Pattern-based gradient quantities at one step (see module docstring for the formulas)."""

    loss: float  # L = (1/n) Σ ℓ_i on the given samples, with the patterns' h
    grad_out_sq: float  # ||∂L/∂A||²
    grad_hidden_sq: float  # ||∂L/∂(B, bias)||², exact from the patterns
    lb_partition: float  # (1/n²) Σ_i μ_i ||g_i||²
    lb_mu: float  # μ_t ||g||² / n²
    mu: float  # μ_t = min_i μ_i
    n_vacuous: int  # samples with μ_i = 0
    g_sq: float  # ||g||² = Σ_i ||g_i||²
    n: int
    grad_out: np.ndarray  # ∂L/∂A [C, m]

    @property
    def lb_total(self) -> float:
        """grad_out_sq + grad_hidden_sq: the exact gradient norm² of the last two layers' weights."""
        return self.grad_out_sq + self.grad_hidden_sq


def gram_min_eigenvalues(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """λ_k = λ_min(G_{I_k}), G_I = [x̃_i·x̃_j]_{i,j∈I}, for every neuron k (``nan`` when I_k = ∅).

    Exactly 0 when |I_k| > D (rank); otherwise the smallest eigenvalue of the |I_k| x |I_k|
    Gram matrix, lowered by a rounding margin (8·|I|·ε·λ_max) so it is never overestimated.
    """
    feats = np.asarray(features, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    d = feats.shape[1]
    out = np.full(mask.shape[1], np.nan)
    for k in range(mask.shape[1]):
        idx = np.flatnonzero(mask[:, k])
        if not len(idx):
            continue
        if len(idx) > d:
            out[k] = 0.0
            continue
        sub = feats[idx]
        ev = np.linalg.eigvalsh(sub @ sub.T)
        margin = 8 * len(idx) * np.finfo(np.float64).eps * max(ev[-1], 0.0)
        out[k] = max(ev[0] - margin, 0.0)
    return out


def sample_mu(lam: np.ndarray, mask: np.ndarray, out: np.ndarray, loss: Loss) -> np.ndarray:
    """μ_i = λ_min(Σ_{k: i∈I_k} λ_k A_:k A_:kᵀ) per sample (cross-entropy: on 1⟂), rounding-safe."""
    mask = np.asarray(mask, dtype=bool)
    lam0 = np.where(np.isnan(lam), 0.0, lam)
    c = out.shape[0]
    w = mask * lam0[None, :]  # [n, m]
    m_i = np.einsum("nk,ck,dk->ncd", w, out, out)
    if loss == "cross_entropy" and c > 1:
        q = _basis_orthogonal_to_ones(c)  # orthonormal basis of 1⟂
        m_i = np.einsum("ca,ncd,db->nab", q, m_i, q)
    ev = np.linalg.eigvalsh(m_i)
    margin = 8 * m_i.shape[1] * np.finfo(np.float64).eps * np.maximum(ev[:, -1], 0.0)
    return np.maximum(ev[:, 0] - margin, 0.0)


def _basis_orthogonal_to_ones(c: int) -> np.ndarray:
    """Orthonormal ``[c, c-1]`` basis of {v : Σ v = 0} (Helmert rows)."""
    q = np.zeros((c, c - 1))
    for j in range(1, c):
        q[:j, j - 1] = 1.0
        q[j, j - 1] = -float(j)
        q[:, j - 1] /= math.sqrt(j * (j + 1))
    return q


def gradient_bounds(view: TwoLayerView, mask: np.ndarray, y: np.ndarray, loss: Loss) -> GradientBounds:
    """The derived pattern-based bounds at one step (formulas in the module docstring).

    Args:
        view: the last two layers and the features (:func:`last_hidden_view`).
        mask: bool ``[n, m]``, the recorded patterns of the last hidden layer (i ∈ I_k).
        y: labels (cross-entropy, or one-hot mse targets) or scalar targets (mse, C = 1).
        loss: ``"cross_entropy"`` or ``"mse"``.
    """
    mask = np.asarray(mask, dtype=bool)
    n = len(mask)
    if n == 0:
        raise NotApplicableError("no probe samples: the bounds need at least one")
    z = view.pre_activations()
    h = np.where(mask, z, 0.0)
    f = h @ view.out.T + view.out_bias
    ell, g = loss_and_derivative(f, y, loss)
    grad_out = g.T @ h / n  # [C, m]
    s = (g @ view.out) * mask  # [n, m]: (A_:k · g_i) for i ∈ I_k
    grad_hidden = s.T @ view.features / n  # [m, D+1]
    lam = gram_min_eigenvalues(view.features, mask)
    mu_i = sample_mu(lam, mask, view.out, loss)
    g_sq_i = (g ** 2).sum(axis=1)
    mu = float(mu_i.min())
    return GradientBounds(
        loss=float(ell.mean()),
        grad_out_sq=float((grad_out ** 2).sum()),
        grad_hidden_sq=float((grad_hidden ** 2).sum()),
        lb_partition=float((mu_i * g_sq_i).sum() / n ** 2),
        lb_mu=float(mu * g_sq_i.sum() / n ** 2),
        mu=mu,
        n_vacuous=int((mu_i <= 0).sum()),
        g_sq=float(g_sq_i.sum()),
        n=n,
        grad_out=grad_out,
    )


# --------------------------------------------------------------------------- autograd references


def chain_parameters(layers: Sequence[Layer]) -> list[torch.Tensor]:
    """The chain's weights and biases as float64 leaf tensors (requires_grad), in order."""
    import torch

    out = []
    for layer in layers:
        out.append(torch.tensor(np.asarray(layer.weight, dtype=np.float64), requires_grad=True))
        out.append(torch.tensor(np.asarray(layer.bias, dtype=np.float64), requires_grad=True))
    return out


def chain_loss(params: Sequence[torch.Tensor], slopes: Sequence[float | None], x: torch.Tensor, y: torch.Tensor,
               loss: Loss) -> torch.Tensor:
    """L(θ) of the chain ``params`` (W₁, b₁, W₂, b₂, ...) on ``(x, y)``, differentiable."""
    import torch

    h = x
    for i, slope in enumerate(slopes):
        z = h @ params[2 * i].T + params[2 * i + 1]
        h = z if slope is None else torch.nn.functional.leaky_relu(z, slope) if slope else torch.relu(z)
    return torch_loss(h, y, loss)


def full_gradient(layers: Sequence[Layer], x: np.ndarray, y: np.ndarray, loss: Loss) -> tuple[float, np.ndarray]:
    """``(L, ∇L)`` by autograd over **all** parameters of the chain (flat float64 vector)."""
    import torch

    params = chain_parameters(layers)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(len(x), -1))
    val = chain_loss(params, [layer.negative_slope for layer in layers], xt, torch.as_tensor(y), loss)
    grads = torch.autograd.grad(val, params)
    return float(val.detach()), torch.cat([g.reshape(-1) for g in grads]).numpy()


def flat_parameters(layers: Sequence[Layer]) -> np.ndarray:
    """The chain's parameters as one flat vector, in :func:`chain_parameters` order."""
    return np.concatenate([np.concatenate([np.asarray(l.weight, dtype=np.float64).reshape(-1),
                                           np.asarray(l.bias, dtype=np.float64).reshape(-1)]) for l in layers])


def hessian_top_eigenvalue(
    layers: Sequence[Layer], x: np.ndarray, y: np.ndarray, loss: Loss, *, iters: int = 30, tol: float = 1e-4,
    seed: int = 0,
) -> float:
    """β ≈ |λ|_max(∇²L) by power iteration on Hessian-vector products (double backward).

    Power iteration returns a Rayleigh quotient, a *lower* estimate of the spectral norm
    (it can underestimate β; a violated descent bound names that cause). The Hessian is
    that of the piecewise-smooth loss at θ (ReLU second derivatives are zero a.e.).
    """
    import torch

    params = chain_parameters(layers)
    slopes = [layer.negative_slope for layer in layers]
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(len(x), -1))
    yt = torch.as_tensor(y)
    val = chain_loss(params, slopes, xt, yt, loss)
    grads = torch.autograd.grad(val, params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    norm = torch.sqrt(sum((t ** 2).sum() for t in v))
    v = [t / norm for t in v]
    beta = 0.0
    for _ in range(max(1, iters)):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        rayleigh = float(sum((a * b).sum() for a, b in zip(hv, v)))
        norm = torch.sqrt(sum((t ** 2).sum() for t in hv))
        if float(norm) == 0.0:
            return 0.0
        v = [t / norm for t in hv]
        done = abs(abs(rayleigh) - beta) <= tol * max(abs(rayleigh), 1e-300)
        beta = abs(rayleigh)
        if done:
            break
    return float(max(beta, float(norm)))


# --------------------------------------------------------------------------- the trajectory


def descent_coefficient(eta: float, beta: float) -> float:
    """c = η(1 - βη/2): the GD descent lemma gives L(t+1) ≤ L(t) - c·||∇L(t)||²."""
    return float(eta * (1.0 - beta * eta / 2.0))


@dataclass(frozen=True)
class Chain:
    """Predicted upper-bound trajectories over consecutive steps (arrays aligned with ``steps``)."""

    steps: np.ndarray
    pred_gd: np.ndarray  # L(s0) - Σ c_t ||∇L(t)||² (full-batch GD form)
    pred_mu: np.ndarray  # L(s0) Π (1 - c_t lb_mu(t)/L(t)); nan from the first step with ηβ >= 2
    pred_step: np.ndarray  # L(s0) + Σ (∇L·Δ + β/2 ||Δ||²) (any update)
    ratio_pred_mu: np.ndarray  # 1 - c_t lb_mu(t)/L(t): predicted L(t+1)/L(t) (at t; nan at the last)
    ratio_observed: np.ndarray  # observed L(t+1)/L(t)


def chain_bounds(
    steps: np.ndarray, loss: np.ndarray, grad_sq: np.ndarray, lb_mu: np.ndarray, eta: np.ndarray, beta: np.ndarray,
    g_dot_delta: np.ndarray, delta_sq: np.ndarray,
) -> Chain:
    """Chain the one-step bounds from ``steps[0]`` over consecutive steps (``steps[i+1] = steps[i] + 1``).

    Values at index i > 0 bound L(steps[i]) given the observed L(steps[0]); after a gap in
    the steps the chain stops (nan). ``g_dot_delta``/``delta_sq`` at i describe the update
    from steps[i] to steps[i]+1.
    """
    steps = np.asarray(steps, dtype=np.int64)
    k = len(steps)
    pred_gd, pred_mu, pred_step = (np.full(k, np.nan) for _ in range(3))
    ratio_mu, ratio_obs = np.full(k, np.nan), np.full(k, np.nan)
    if k == 0:
        return Chain(steps, pred_gd, pred_mu, pred_step, ratio_mu, ratio_obs)
    pred_gd[0] = pred_mu[0] = pred_step[0] = loss[0]
    for i in range(k):
        c = descent_coefficient(float(eta[i]), float(beta[i]))
        # a lower bound may replace ||∇L||² only while c > 0 (ηβ < 2); otherwise the μ form says nothing
        ratio_mu[i] = 1.0 - c * lb_mu[i] / loss[i] if loss[i] > 0 and c > 0 else np.nan
        if i + 1 < k and steps[i + 1] == steps[i] + 1:
            ratio_obs[i] = loss[i + 1] / loss[i] if loss[i] > 0 else np.nan
            pred_gd[i + 1] = pred_gd[i] - c * grad_sq[i]
            pred_mu[i + 1] = pred_mu[i] * ratio_mu[i]  # nan from the first step with ηβ >= 2 on
            pred_step[i + 1] = pred_step[i] + g_dot_delta[i] + 0.5 * beta[i] * delta_sq[i]
        elif i + 1 < k:
            break
    return Chain(steps, pred_gd, pred_mu, pred_step, ratio_mu, ratio_obs)


def violation_causes(*, eta: float, beta_t: float, beta_next: float, kink: bool, gd_residual: float,
                     kind: str) -> str:
    """Why an observed L(t+1) exceeds a one-step bound (``kind``: ``gd``, ``mu`` or ``step``).

    * ``non-smooth kink crossed``: the probe patterns changed between t and t+1, so the
      segment crossed a region boundary where the loss is not twice differentiable;
    * ``step size above 2/β``: ηβ ≥ 2 (GD forms only: the bound allows no decrease);
    * ``update is not full-batch GD on the probe``: GD forms only, when
      ||Δ + η∇L|| / ||η∇L|| = ``gd_residual`` > 1e-4 (SGD, Adam, or a probe ≠ training set;
      1e-4 leaves room for float32 training against this float64 analysis);
    * ``β underestimated``: otherwise (the curvature along the segment exceeded the
      estimate; noted with β(t+1) when it grew).
    """
    causes = []
    if kink:
        causes.append("non-smooth kink crossed")
    if kind in ("gd", "mu"):
        if eta * beta_t >= 2:
            causes.append(f"step size above 2/β (ηβ = {eta * beta_t:.3g})")
        if not gd_residual <= 1e-4:
            causes.append(f"update is not full-batch GD on the probe (residual {gd_residual:.3g})")
    if not causes or (np.isfinite(beta_next) and beta_next > beta_t):
        grown = f" (β(t+1) = {beta_next:.4g} > β(t) = {beta_t:.4g})" if np.isfinite(beta_next) and beta_next > beta_t else ""
        causes.append("β underestimated" + grown)
    return "; ".join(causes)


def early_stage_end(steps: np.ndarray, loss: np.ndarray, ratio: float = 0.5) -> int | None:
    """The first step with L(t) ≤ ratio·L(steps[0]) (derived definition of the early stage's end)."""
    loss = np.asarray(loss, dtype=np.float64)
    if not len(loss):
        return None
    hit = np.flatnonzero(loss <= ratio * loss[0])
    return int(steps[hit[0]]) if len(hit) else None
