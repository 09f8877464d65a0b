"""Local complexity: how many neurons' sign boundaries cross a small neighbourhood of each sample.

Humayun, Balestriero & Baraniuk, "Deep Networks Always Grok and Here is Why"
(ICML 2024). Around a sample x take the cross-polytope of radius r,

    V_r(x) = {x} ∪ {x + r·v_p, x − r·v_p : p = 1..P},   v_1..v_P orthonormal in R^d, P <= d,

and for a hidden layer l with pre-activations z_{l,j}

    LC_l(x, r) = #{j : sign(z_{l,j}(u)) is not the same for all u ∈ V_r(x)},
    LC(x, r)   = Σ_l LC_l(x, r)          (hidden layers only: the output layer is excluded).

The sign is the stored pattern bit ``z > 0``. For a layer whose pre-activation is
affine in x (the first hidden layer, or any layer of a one-hidden-layer net) a
neuron counts exactly when its hyperplane cuts the cross-polytope, so LC_l grows
with r for nested cross-polytopes that share directions; deeper layers are only
piecewise affine and need not be monotone. Here the directions are drawn once
(seeded) and shared by all samples and radii.

Results are counts (sums over samples, plus ``n_samples``) so that shards merge by
addition; the mean LC per sample is ``counts / n_samples``.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
>>> lc = local_complexity(net, torch.zeros(4, 2), radii=[0.1, 1.0], n_directions=2)
>>> lc.layers, lc.counts.shape, lc.per_sample.shape
(('1',), (1, 2), (4, 1, 2))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dynatrack.analysis.activations import RELU_FAMILY

__all__ = [
    "RELU_FAMILY",
    "LocalComplexity",
    "cross_polytope",
    "local_complexity",
    "local_complexity_merge",
    "orthonormal_directions",
    "preactivation_fn",
]


PreactivationFn = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


def preactivation_fn(model: nn.Module, layer_names: Sequence[str] | None = None) -> PreactivationFn:
    """Build ``x -> {layer_name: pre-activation [n, width]}`` from forward hooks on ``model``.

    Hooks record the *input* of each ReLU-family module (:data:`RELU_FAMILY`),
    flattened to ``[n, width]``; names are those of ``model.named_modules()``.
    ``layer_names`` selects modules by name (any module type; its input is
    recorded). The model runs under ``torch.no_grad()`` in its current mode
    (call ``model.eval()`` first if it has dropout or batch norm). Functional
    activations (``F.relu``) are invisible to hooks; a module called twice in
    one forward raises an error.

    >>> net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    >>> {k: tuple(v.shape) for k, v in preactivation_fn(net)(torch.zeros(4, 3)).items()}
    {'1': (4, 5)}
    """
    modules = dict(model.named_modules())
    if layer_names is None:
        names = [name for name, m in modules.items() if isinstance(m, RELU_FAMILY)]
        if not names:
            family = ", ".join(t.__name__ for t in RELU_FAMILY)
            raise ValueError(f"{type(model).__name__} has no ReLU-family modules ({family}); pass layer_names")
    else:
        names = list(layer_names)
        missing = [name for name in names if name not in modules]
        if missing:
            raise ValueError(f"layer_names {missing} are not modules of {type(model).__name__}")

    def fn(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}

        def hook(name: str) -> Callable[..., None]:
            def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                if name in out:
                    raise RuntimeError(f"module {name!r} ran twice in one forward; its pattern is ambiguous")
                z = inputs[0]
                out[name] = z.detach().reshape(z.shape[0], -1)

            return record

        handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in handles:
                h.remove()
        not_run = [name for name in names if name not in out]
        if not_run:
            raise RuntimeError(f"modules {not_run} did not run in the forward pass")
        return {name: out[name] for name in names}

    return fn


def orthonormal_directions(
    d: int, n_directions: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``P = n_directions`` random orthonormal rows ``[P, d]`` (QR of a seeded Gaussian matrix).

    >>> v = orthonormal_directions(5, 3, seed=1, dtype=torch.float64)
    >>> bool(torch.allclose(v @ v.T, torch.eye(3, dtype=torch.float64)))
    True
    """
    if not 1 <= n_directions <= d:
        raise ValueError(f"n_directions must be in 1..{d} (the input dimension), got {n_directions}")
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, n_directions, generator=g, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    q = q * signs  # the unique QR with a positive diagonal of r
    return q.T.contiguous().to(dtype)


def cross_polytope(x: torch.Tensor, directions: torch.Tensor, radius: float) -> torch.Tensor:
    """Vertices ``x ± r·v_p`` of the cross-polytope around each sample: ``[n, 2P, *x.shape[1:]]``.

    Rows ``0..P-1`` are ``x + r·v_p``, rows ``P..2P-1`` are ``x − r·v_p``.

    >>> cross_polytope(torch.zeros(1, 2), torch.eye(2), 0.5)[0].tolist()
    [[0.5, 0.0], [0.0, 0.5], [-0.5, 0.0], [0.0, -0.5]]
    """
    flat = x.reshape(x.shape[0], 1, -1)
    step = radius * directions.reshape(1, directions.shape[0], -1).to(x)
    verts = torch.cat([flat + step, flat - step], dim=1)
    return verts.reshape(x.shape[0], 2 * directions.shape[0], *x.shape[1:])


@dataclass(frozen=True)
class LocalComplexity:
    """Local-complexity counts per (layer, radius); all entries are counts.

    ``counts[l, k] = Σ_x LC_l(x, radii[k])`` over the ``n_samples`` samples;
    ``per_sample[i, l, k] = LC_l(x_i, radii[k])``; ``widths[l]`` is the number of neurons of layer l.
    """

    layers: tuple[str, ...]
    radii: tuple[float, ...]
    widths: tuple[int, ...]
    n_samples: int
    counts: np.ndarray  # int64[n_layers, n_radii]
    per_sample: np.ndarray  # int64[n_samples, n_layers, n_radii]

    def total(self) -> np.ndarray:
        """``LC(x, r) = Σ_l LC_l(x, r)`` per sample: int64 ``[n_samples, n_radii]``."""
        return self.per_sample.sum(axis=1)

    def mean(self) -> np.ndarray:
        """Mean over samples of ``LC_l(x, r)``: float64 ``[n_layers, n_radii]`` (NaN if no samples)."""
        return self.counts / self.n_samples if self.n_samples else np.full(self.counts.shape, np.nan)


def local_complexity_merge(*parts: LocalComplexity) -> LocalComplexity:
    """Combine results over disjoint sample sets: counts and ``n_samples`` add, per-sample rows concatenate.

    >>> import torch
    >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    >>> a = local_complexity(net, torch.randn(3, 2), [0.5], 2)
    >>> local_complexity_merge(a, a).n_samples
    6
    """
    if not parts:
        raise ValueError("local_complexity_merge needs at least one result")
    first = parts[0]
    for p in parts[1:]:
        if (p.layers, p.radii, p.widths) != (first.layers, first.radii, first.widths):
            raise ValueError(
                f"cannot merge local complexity over layers/radii/widths {p.layers}/{p.radii}/{p.widths} "
                f"with {first.layers}/{first.radii}/{first.widths}"
            )
    return LocalComplexity(
        first.layers,
        first.radii,
        first.widths,
        sum(p.n_samples for p in parts),
        np.sum([p.counts for p in parts], axis=0, dtype=np.int64),
        np.concatenate([p.per_sample for p in parts], axis=0),
    )


def local_complexity(
    model_or_fn: nn.Module | PreactivationFn,
    x: torch.Tensor,
    radii: Sequence[float],
    n_directions: int,
    layers: Sequence[str] | None = None,
    *,
    directions: torch.Tensor | None = None,
    seed: int = 0,
    max_rows: int = 8192,
) -> LocalComplexity:
    """Local complexity ``LC_l(x, r)`` (Humayun et al., ICML 2024; see the module docstring).

    Args:
        model_or_fn: a torch module (wrapped with :func:`preactivation_fn`, hooks on
            ReLU-family modules) or a function ``x -> {layer: pre-activation [n, width]}``.
            Only hidden layers belong here: the output layer is excluded by construction.
        x: samples ``[n, *input_shape]``; ``d = prod(input_shape)``.
        radii: cross-polytope radii r (all > 0), evaluated with the same directions.
        n_directions: P, the number of orthonormal directions (1 <= P <= d).
        layers: subset of the function's layers to count (default: all it returns).
        directions: explicit orthonormal rows ``[P, d]`` instead of seeded random ones.
        seed: seed of the random directions.
        max_rows: at most this many inputs (vertices and centres) per forward pass
            (at least one sample's 1 + 2·P·len(radii) vertices go in one pass).

    Returns :class:`LocalComplexity` with per-(layer, radius) sums and per-sample values.

    >>> net = nn.Sequential(nn.Linear(1, 1), nn.ReLU())
    >>> with torch.no_grad(): _ = net[0].weight.fill_(1.0), net[0].bias.fill_(-0.5)
    >>> local_complexity(net, torch.tensor([[0.0]]), [0.25, 1.0], 1).counts.tolist()  # boundary at x = 0.5
    [[0, 1]]
    """
    fn = preactivation_fn(model_or_fn) if isinstance(model_or_fn, nn.Module) else model_or_fn
    radii = tuple(float(r) for r in radii)
    if not radii or any(not r > 0 for r in radii):
        raise ValueError(f"radii must be a non-empty sequence of positive numbers, got {radii}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch [n, *input_shape], got shape {tuple(x.shape)}")
    n, d = x.shape[0], int(np.prod(x.shape[1:]))
    if directions is None:
        directions = orthonormal_directions(d, n_directions, seed=seed, dtype=x.dtype)
    elif tuple(directions.shape) != (n_directions, d):
        raise ValueError(f"directions must have shape ({n_directions}, {d}), got {tuple(directions.shape)}")
    directions = directions.to(device=x.device, dtype=x.dtype)

    per_vertex_set = 1 + 2 * n_directions * len(radii)  # centre + all radii's vertices of one sample
    chunk = max(1, max_rows // per_vertex_set)
    names: tuple[str, ...] | None = tuple(layers) if layers is not None else None
    widths: tuple[int, ...] = ()
    per_sample: list[np.ndarray] = []
    for start in range(0, n, chunk):
        xb = x[start : start + chunk]
        nb = xb.shape[0]
        verts = [cross_polytope(xb, directions, r) for r in radii]  # each [nb, 2P, ...]
        inputs = torch.cat([xb.unsqueeze(1), *verts], dim=1)  # [nb, 1 + 2PR, ...]
        pre = _evaluate(fn, inputs.reshape(nb * per_vertex_set, *x.shape[1:]), max_rows)
        if names is None:
            names = tuple(pre)
        missing = [name for name in names if name not in pre]
        if missing:
            raise ValueError(f"layers {missing} not returned by the pre-activation function (has {list(pre)})")
        block = np.empty((nb, len(names), len(radii)), dtype=np.int64)
        widths = tuple(int(pre[name].shape[1]) for name in names)
        for li, name in enumerate(names):
            pos = (pre[name] > 0).reshape(nb, per_vertex_set, -1)
            centre = pos[:, :1]
            for k in range(len(radii)):
                v = pos[:, 1 + 2 * n_directions * k : 1 + 2 * n_directions * (k + 1)]
                # a neuron is crossed when some vertex (or the centre) differs in sign from the centre
                crossed = (v != centre).any(dim=1)
                block[:, li, k] = crossed.sum(dim=1).cpu().numpy()
        per_sample.append(block)
    values = np.concatenate(per_sample, axis=0)
    assert names is not None
    return LocalComplexity(names, radii, widths, n, values.sum(axis=0), values)


def _evaluate(fn: PreactivationFn, inputs: torch.Tensor, max_rows: int) -> dict[str, torch.Tensor]:
    """Run ``fn`` on ``inputs`` in slices of ``max_rows`` and concatenate each layer's ``[rows, width]``."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, inputs.shape[0], max_rows):
        out = fn(inputs[start : start + max_rows])
        for name, z in out.items():
            parts.setdefault(name, []).append(z.reshape(z.shape[0], -1))
    return {name: torch.cat(zs) for name, zs in parts.items()}
