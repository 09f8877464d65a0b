"""Small- vs large-batch generalization: noise scale, sharpness, interpolation, seed statistics.

Pure functions (torch / numpy / scipy; no I/O, no Ray). A *loss closure* is a model plus a
data set ``(x, y)`` and a loss function; parameters travel as one flat float vector (the
order of ``model.parameters()``), so a point of weight space is just an array.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
>>> x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
>>> est = two_batch_noise_scale([0.9, 1.1], [0.5, 0.5], b_small=4, b_big=16)
>>> round(est.trace_sigma, 3), round(est.grad_sq, 3)
(2.667, 0.333)
>>> lam = top_hessian_eigenvalue(net, nn.functional.cross_entropy, x, y, iters=50).eigenvalue
>>> phi = epsilon_sharpness(net, nn.functional.cross_entropy, x, y, eps=1e-3).sharpness
>>> lam > 0 and phi >= 0
True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- flat parameters


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` as one detached float64 vector (``model.parameters()`` order)."""
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in model.parameters()])


def _unflatten(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    i = 0
    for name, p in model.named_parameters():
        n = p.numel()
        out[name] = flat[i : i + n].reshape(p.shape).to(p.dtype)
        i += n
    if i != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, the model {i} parameters")
    return out


def loss_at(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The loss of ``model`` with its parameters replaced by ``flat`` (differentiable in ``flat``)."""
    from torch.func import functional_call

    return loss_fn(functional_call(model, _unflatten(model, flat), (x,)), y)


def loss_and_accuracy(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, flat: torch.Tensor | None = None,
    *, chunk: int = 8192,
) -> tuple[float, float]:
    """Mean loss and accuracy (argmax of the logits) over ``(x, y)``, at ``flat`` or the model's own weights."""
    from torch.func import functional_call

    params = None if flat is None else _unflatten(model, flat)
    total, correct = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(x), chunk):
            xb, yb = x[lo : lo + chunk], y[lo : lo + chunk]
            out = model(xb) if params is None else functional_call(model, params, (xb,))
            total += float(loss_fn(out, yb)) * len(xb)
            correct += int((out.argmax(1) == yb).sum())
    return total / len(x), correct / len(x)


def weight_distance(w_t: torch.Tensor | np.ndarray, w_0: torch.Tensor | np.ndarray) -> float:
    """Euclidean distance ‖w_T − w_0‖₂ between two flat weight vectors.

    Hoffer, Hubara & Soudry 2017 ("Train longer, generalize better"): the distance from the
    initialization grows like log(number of updates); a large batch with the same epochs makes
    fewer updates and ends closer to w_0.

    >>> weight_distance(np.array([3.0, 4.0]), np.zeros(2))
    5.0
    """
    a = np.asarray(w_t, dtype=np.float64).reshape(-1)
    b = np.asarray(w_0, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"weight vectors differ in size: {a.size} vs {b.size}")
    return float(np.linalg.norm(a - b))


# ----------------------------------------------------------------------------- gradient noise scale


class NoiseScale(NamedTuple):
    """Two-batch estimates: ``grad_sq`` ≈ |G|², ``trace_sigma`` ≈ tr Σ, ``b_simple`` = tr Σ / |G|²,
    from ``n`` measurements at batch sizes ``b_small`` < ``b_big``."""

    grad_sq: float
    trace_sigma: float
    b_simple: float
    b_small: int
    b_big: int
    n: int


def two_batch_noise_scale(
    sq_small: Sequence[float] | np.ndarray, sq_big: Sequence[float] | np.ndarray, b_small: int, b_big: int
) -> NoiseScale:
    """The gradient noise scale B_simple by the two-batch estimator.

    McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training"
    (arXiv 1812.06162), appendix A (the estimator of gpt-neox's ``gradient_noise_scale.py``).
    With G_B the mean gradient of a batch of B i.i.d. samples, E|G_B|² = |G|² + tr Σ / B, so
    from squared norms at B_small < B_big (under DDP: the per-rank gradient before the
    all-reduce and the global one)

        |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
        tr Σ  ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)
        B_simple = tr Σ / |G|²,

    each of |G_small|², |G_big|² averaged over the measurements *before* the two unbiased
    estimates are formed, and numerator and denominator averaged separately before dividing
    (the ratio of means, not the mean of ratios, which is biased and unstable). Σ is the
    per-sample gradient covariance (population normalization, 1/N over the data set).

    ``b_simple`` is NaN when the |G|² estimate is not positive (noise dominates: a batch
    far below B_simple cannot resolve |G|).
    """
    s = np.asarray(sq_small, dtype=np.float64).reshape(-1)
    b = np.asarray(sq_big, dtype=np.float64).reshape(-1)
    if not len(s) or not len(b):
        raise ValueError("two_batch_noise_scale needs at least one measurement at each batch size")
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    ms, mb = float(s.mean()), float(b.mean())
    grad_sq = (b_big * mb - b_small * ms) / (b_big - b_small)
    trace = (ms - mb) / (1.0 / b_small - 1.0 / b_big)
    b_simple = trace / grad_sq if grad_sq > 0 else math.nan
    return NoiseScale(grad_sq, trace, b_simple, int(b_small), int(b_big), int(min(len(s), len(b))))


def batch_grad_sq_norm(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> float:
    """|∇_w L_B(w)|² for the mean loss L_B over the batch ``(x, y)`` (plain autograd)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model(x), y), params)
    return float(sum((g.double() ** 2).sum() for g in grads))


def sample_grad_sq_norms(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, *, b_small: int, n_small: int,
    n_measurements: int, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Measurements for :func:`two_batch_noise_scale`, the way DDP sees them.

    Each measurement draws one "global" batch of ``B_big = n_small·b_small`` samples with
    replacement (i.i.d., so E|G_B|² = |G|² + tr Σ/B holds exactly), splits it into
    ``n_small`` "per-rank" batches of ``b_small``, and records the mean of their squared
    gradient norms (|G_small|²) and the squared norm of the whole batch's gradient (|G_big|²,
    the all-reduced gradient). Returns ``(sq_small[n_measurements], sq_big[n_measurements])``.
    """
    if b_small < 1 or n_small < 2 or n_measurements < 1:
        raise ValueError(f"need b_small >= 1, n_small >= 2, n_measurements >= 1; got {b_small}, {n_small}, {n_measurements}")
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    small, big = np.empty(n_measurements), np.empty(n_measurements)
    for m in range(n_measurements):
        idx = torch.randint(0, len(x), (n_small * b_small,), generator=g)
        per = []
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for k in range(n_small):
            sl = idx[k * b_small : (k + 1) * b_small]
            grads = torch.autograd.grad(loss_fn(model(x[sl]), y[sl]), params)
            per.append(float(sum((gr.double() ** 2).sum() for gr in grads)))
            for t, gr in zip(total, grads):
                t += gr.double() / n_small  # the all-reduce average of equal-size per-rank means
        small[m] = float(np.mean(per))
        big[m] = float(sum((t**2).sum() for t in total))
    return small, big


# ----------------------------------------------------------------------------- curvature


class TopEigen(NamedTuple):
    """Rayleigh quotient ``eigenvalue`` of the unit ``vector`` after ``iters`` power iterations."""

    eigenvalue: float
    vector: torch.Tensor
    iters: int


def hessian_vector_product(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor,
) -> torch.Tensor:
    """H v for the Hessian H of the mean loss over ``(x, y)`` w.r.t. the flat parameters (double backward)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    flat_g = torch.cat([g.reshape(-1) for g in grads])
    dot = (flat_g * v.to(flat_g.dtype)).sum()
    hv = torch.autograd.grad(dot, params)
    return torch.cat([h.reshape(-1) for h in hv]).to(torch.float64)


def top_hessian_eigenvalue(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, *, iters: int = 20, tol: float = 1e-6,
    seed: int = 0,
) -> TopEigen:
    """The dominant eigenvalue of the loss Hessian by power iteration on Hessian-vector products.

    Keskar et al., ICLR 2017 ("On Large-Batch Training for Deep Learning: Generalization Gap and
    Sharp Minima") use the top Hessian eigenvalue as the usual cheaper proxy of sharpness.
    v_{k+1} = H v_k / ‖H v_k‖ from a random unit v_0; λ = v_kᵀ H v_k (Rayleigh quotient).
    H v = ∇_w (∇_w L(w) · v) by double backward, so H is never formed. Power iteration finds
    the eigenvalue of largest *magnitude* (at a minimum the largest positive one); it stops
    after ``iters`` products or when λ changes by less than ``tol``·|λ|.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    n = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    v /= v.norm()
    lam = 0.0
    k = 0
    for k in range(1, iters + 1):
        hv = hessian_vector_product(model, loss_fn, x, y, v)
        new = float(v @ hv)
        norm = hv.norm()
        if norm == 0:
            return TopEigen(0.0, v, k)
        v = hv / norm
        if k > 1 and abs(new - lam) <= tol * abs(new):
            lam = new
            break
        lam = new
    return TopEigen(lam, v, k)


class Sharpness(NamedTuple):
    """Keskar's ε-sharpness ``sharpness`` (percent), the base loss L(w), the largest loss found
    in the box, the number of loss evaluations."""

    sharpness: float
    loss: float
    max_loss: float
    evaluations: int


def epsilon_sharpness(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, *, eps: float = 1e-3, maxiter: int = 10,
    flat: torch.Tensor | None = None,
) -> Sharpness:
    """Keskar's ε-sharpness of the minimum at the model's weights (or ``flat``).

    Keskar, Mudigere, Nocedal, Smelyanskiy & Tang, ICLR 2017, metric 2.1 (full space, A = I):

        φ_{w,ε} = (max_{y ∈ C_ε} L(w + y) − L(w)) / (1 + L(w)) × 100,
        C_ε = {y : |y_i| <= ε(|w_i| + 1)},

    the maximisation done as in their code by SciPy's L-BFGS-B (``fmin_l_bfgs_b`` with the box
    as bounds, about 10 iterations) on −L(w + y) from y = 0. The maximum over *every* point the
    optimizer evaluated is kept (L-BFGS-B's last iterate need not be its best), so φ >= 0.
    """
    from scipy.optimize import minimize

    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    w = flat_parameters(model) if flat is None else flat.detach().to(torch.float64)
    bound = eps * (w.abs() + 1.0)
    base = float(loss_at(model, loss_fn, x, y, w.to(torch.float32)).detach())
    best = [base]
    count = [0]

    def neg_loss(yv: np.ndarray) -> tuple[float, np.ndarray]:
        point = (w + torch.from_numpy(yv)).to(torch.float32).requires_grad_(True)
        loss = loss_at(model, loss_fn, x, y, point)
        (grad,) = torch.autograd.grad(loss, point)
        value = float(loss.detach())
        count[0] += 1
        best[0] = max(best[0], value)
        return -value, -grad.detach().to(torch.float64).numpy()

    b = bound.numpy()
    minimize(neg_loss, np.zeros_like(b), jac=True, method="L-BFGS-B", bounds=list(zip(-b, b)),
             options={"maxiter": maxiter})
    return Sharpness((best[0] - base) / (1.0 + base) * 100.0, base, best[0], count[0])


# ----------------------------------------------------------------------------- interpolation


class Interpolation(NamedTuple):
    """Loss and accuracy at w(α) = α·w_large + (1 − α)·w_small for each ``alpha``."""

    alpha: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray


def interpolate(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, w_small: torch.Tensor, w_large: torch.Tensor,
    alphas: Sequence[float] | np.ndarray | None = None,
) -> Interpolation:
    """Loss and accuracy along the line through the small- and large-batch solutions.

    Keskar et al., ICLR 2017 (their figure 3, after Goodfellow et al. 2015): evaluate
    w(α) = α·w_LB + (1 − α)·w_SB for α in [−1, 2] (25 points by default); α = 0 is the
    small-batch and α = 1 the large-batch solution. A sharp large-batch minimum shows as a
    steep rise of the loss around α = 1 and a flat one around α = 0.
    """
    a = np.linspace(-1.0, 2.0, 25) if alphas is None else np.asarray(alphas, dtype=np.float64)
    ws, wl = w_small.detach().to(torch.float64), w_large.detach().to(torch.float64)
    if ws.shape != wl.shape:
        raise ValueError(f"the two solutions differ in size: {ws.numel()} vs {wl.numel()}")
    loss, acc = np.empty(len(a)), np.empty(len(a))
    for i, alpha in enumerate(a):
        loss[i], acc[i] = loss_and_accuracy(model, loss_fn, x, y, alpha * wl + (1.0 - alpha) * ws)
    return Interpolation(a, loss, acc)


# ----------------------------------------------------------------------------- over seeds


class SeedSummary(NamedTuple):
    """Mean, sample standard deviation (ddof = 1; NaN for n < 2) and count of the finite values."""

    mean: float
    std: float
    n: int


def seed_summary(values: Sequence[float] | np.ndarray) -> SeedSummary:
    """Mean ± std over seeds, ignoring NaN (a metric a trial could not compute).

    >>> seed_summary([1.0, 2.0, 3.0, float("nan")])
    SeedSummary(mean=2.0, std=1.0, n=3)
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if not len(v):
        return SeedSummary(math.nan, math.nan, 0)
    return SeedSummary(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, int(len(v)))


class WelchTest(NamedTuple):
    """Welch's t statistic, its two-sided p-value and the Welch–Satterthwaite degrees of freedom."""

    t: float
    p: float
    df: float


def welch_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> WelchTest:
    """Welch's unequal-variance t-test of mean(a) − mean(b) (two-sided), NaN ignored.

    t = (ā − b̄) / sqrt(s_a²/n_a + s_b²/n_b), df by Welch–Satterthwaite; the p-value is
    ``scipy.stats.ttest_ind(a, b, equal_var=False)``'s. NaN when a side has fewer than two
    values or both variances are 0 (the test is then undefined, not "significant").
    """
    from scipy import stats

    x = np.asarray(a, dtype=np.float64).reshape(-1)
    z = np.asarray(b, dtype=np.float64).reshape(-1)
    x, z = x[np.isfinite(x)], z[np.isfinite(z)]
    if len(x) < 2 or len(z) < 2:
        return WelchTest(math.nan, math.nan, math.nan)
    vx, vz = x.var(ddof=1) / len(x), z.var(ddof=1) / len(z)
    if vx + vz == 0:
        return WelchTest(math.nan, math.nan, math.nan)
    with warnings.catch_warnings():  # "precision loss" for nearly equal values: the NaN/p speaks for itself
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(x, z, equal_var=False)
    df = (vx + vz) ** 2 / (vx**2 / (len(x) - 1) + vz**2 / (len(z) - 1))
    return WelchTest(float(res.statistic), float(res.pvalue), float(df))
