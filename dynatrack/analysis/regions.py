"""Linear regions of ReLU-family networks, counted exactly along a segment and in a 2-D slice.

Hanin & Rolnick, "Deep ReLU Networks Have Surprisingly Few Activation Patterns"
(NeurIPS 2019, arXiv 1906.00904). The *pattern* of an input x is the vector of signs
of all hidden pre-activations, ``z(x) > 0`` (also for LeakyReLU). The inputs sharing
a pattern form a convex polytope on which the network is affine: a *linear region*.
Their bound on the expected number of regions meeting a d-dimensional cube K is

    E[#regions ∩ K] / vol(K) <= (T·N)^d / d!        (N >= d, N hidden neurons),

independent of depth, so counts in a 2-D slice are compared with N^2 / 2!.

What is here (all pure functions, numpy / torch in, arrays out):

* :func:`piecewise_linear_layers` turns an ``nn.Module`` made of ``nn.Linear`` and
  ReLU-family activations, in any module structure, into a chain of :class:`AffineLayer`.
* :func:`count_regions_1d` counts regions exactly along a segment (breakpoints in t).
* :func:`slice_through` builds Hanin & Rolnick's plane through three inputs and
  :func:`count_regions_2d` counts the regions in it exactly by polygon clipping.
* :func:`normalized_count` divides a count by N^d / d!.
* :func:`distance_to_boundary` gives min_z |z(x)| / ||∇z(x)|| per input.

>>> import torch
>>> _ = torch.manual_seed(0)
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> layers = piecewise_linear_layers(net, 4)
>>> origin, u1, u2 = slice_through(*torch.randn(3, 4).numpy())[:3]
>>> regions = count_regions_2d(layers, origin, u1, u2)
>>> bool(regions.count <= 1 + 8 + 28)
True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "AffineLayer",
    "UnsupportedModelError",
    "piecewise_linear_layers",
    "hidden_layers",
    "pre_activations",
    "activation_patterns",
    "SegmentRegions",
    "count_regions_1d",
    "Slice",
    "slice_through",
    "SliceRegions",
    "count_regions_2d",
    "grid_pattern_count",
    "normalized_count",
    "BoundaryDistance",
    "distance_to_boundary",
]

SUPPORTED = (
    "supported: nn.Linear, nn.ReLU, nn.LeakyReLU and nn.PReLU with one parameter, called as a chain "
    "(each module's input is the previous module's output, in any nesting of Sequentials or custom "
    "modules); nn.Identity, nn.Flatten and nn.Dropout variants are no-ops in eval mode. Not supported: "
    "residual connections, functional ops between modules (F.relu, x + y, x * 2), convolutions, "
    "normalization layers, smooth activations (GELU, SiLU, Tanh, ...)"
)

_NO_OPS: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Flatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


class UnsupportedModelError(ValueError):
    """The model is not a chain of affine maps and ReLU-family activations."""


@dataclass(frozen=True, eq=False)
class AffineLayer:
    """One affine map ``z = W h + b`` followed by a ReLU-family activation (or none).

    ``negative_slope`` is 0.0 for ReLU, the slope for LeakyReLU / PReLU, and ``None`` for the
    output layer (no activation; its neurons are not hidden neurons). ``name`` is the
    activation module's name in ``model.named_modules()`` (the Linear's name for the output
    layer). Arrays are float64.

    >>> layer = AffineLayer(np.eye(2), np.zeros(2), 0.0, "act")
    >>> layer.is_hidden, layer.width
    (True, 2)
    """

    weight: np.ndarray
    bias: np.ndarray
    negative_slope: float | None
    name: str

    @property
    def is_hidden(self) -> bool:
        return self.negative_slope is not None

    @property
    def width(self) -> int:
        return int(self.weight.shape[0])


# --------------------------------------------------------------------------- extraction


def _leaf_modules(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    return {id(m): (name, m) for name, m in model.named_modules() if next(m.children(), None) is None}


def _activation_slope(module: nn.Module, name: str) -> float | None:
    """Negative slope of a ReLU-family module, ``None`` if ``module`` is not one."""
    if isinstance(module, nn.ReLU):
        return 0.0
    if isinstance(module, nn.LeakyReLU):
        return float(module.negative_slope)
    if isinstance(module, nn.PReLU):
        if module.weight.numel() != 1:
            raise UnsupportedModelError(
                f"module '{name}' (PReLU) has {module.weight.numel()} slopes; only num_parameters=1 is "
                f"supported. {SUPPORTED}"
            )
        return float(module.weight.detach().reshape(()).item())
    return None


def _describe(name: str, module: nn.Module) -> str:
    return f"'{name or '<root>'}' ({type(module).__name__})"


def piecewise_linear_layers(
    model: nn.Module,
    input_shape: int | Sequence[int],
    *,
    n_checks: int = 256,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    seed: int = 0,
) -> list[AffineLayer]:
    """Extract the chain of affine maps and ReLU-family activations that ``model`` computes.

    The real forward is traced once, in eval mode and without gradients, with hooks on every
    leaf module, on a random batch of shape ``(n_checks, *input_shape)``; this gives the order
    in which ``nn.Linear`` and activation modules run, whatever the module nesting.
    Consecutive Linears without an activation between them are composed into one affine map.
    The chain is then checked against ``model(x)`` on a fresh random batch
    (``|chain(x) - model(x)| <= atol + rtol·|model(x)|``). Inputs are flattened per sample,
    so ``input_shape=(1, 8, 8)`` with a leading ``nn.Flatten`` works.

    Raises :class:`UnsupportedModelError` naming the module (or the pair of modules between
    which something happens outside any module) when the model is not such a chain.
    Training/eval flags of all modules are restored afterwards.

    >>> net = nn.Sequential(nn.Linear(3, 5), nn.LeakyReLU(0.1), nn.Linear(5, 2))
    >>> [(layer.name, layer.width, layer.negative_slope) for layer in piecewise_linear_layers(net, 3)]
    [('1', 5, 0.1), ('2', 2, None)]
    """
    shape = (int(input_shape),) if isinstance(input_shape, (int, np.integer)) else tuple(input_shape)
    leaves = _leaf_modules(model)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    x_trace = torch.randn((n_checks, *shape), generator=gen).to(device=device, dtype=dtype)
    x_check = torch.randn((n_checks, *shape), generator=gen).to(device=device, dtype=dtype)

    calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor | None]] = []
    pending_inputs: dict[int, list[torch.Tensor]] = {}

    def pre_hook(module: nn.Module, args: tuple) -> None:
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        pending_inputs.setdefault(id(module), []).append(inp.detach().clone() if inp is not None else None)

    def post_hook(module: nn.Module, args: tuple, out: object) -> None:
        inp = pending_inputs[id(module)].pop()
        name = leaves[id(module)][0]
        if inp is None or not isinstance(out, torch.Tensor):
            raise UnsupportedModelError(
                f"module {_describe(name, module)} does not map one tensor to one tensor. {SUPPORTED}"
            )
        calls.append((name, module, inp, out.detach().clone()))

    modes = {id(m): m.training for m in model.modules()}
    handles = []
    for _, module in leaves.values():
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    try:
        model.eval()
        with torch.no_grad():
            out = model(x_trace)
    except UnsupportedModelError:
        raise
    except Exception as err:
        raise ValueError(
            f"model failed on a random input of shape {tuple(x_trace.shape)} (input_shape={shape}): {err}"
        ) from err
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            m.train(modes[id(m)])
    if not isinstance(out, torch.Tensor):
        raise UnsupportedModelError(f"model returns {type(out).__name__}, not a tensor. {SUPPORTED}")

    layers = _chain_from_calls(calls, x_trace, out)
    _verify_chain(model, layers, x_check, modes, atol=atol, rtol=rtol)
    n_hidden = sum(layer.width for layer in layers if layer.is_hidden)
    logger.debug("extracted %d affine layers, %d hidden neurons", len(layers), n_hidden)
    return layers


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return a2.shape == b2.shape and bool(torch.equal(a2, b2))


def _chain_from_calls(
    calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    out: torch.Tensor,
) -> list[AffineLayer]:
    layers: list[AffineLayer] = []
    w: np.ndarray | None = None
    b: np.ndarray | None = None
    last_linear = ""
    prev_name, prev_out = "<model input>", x
    for name, module, inp, outp in calls:
        if not _same_values(inp, prev_out):
            raise UnsupportedModelError(
                f"the input of module {_describe(name, module)} is not the output of '{prev_name}': the "
                f"forward changes the tensor outside any module between them (a residual connection, a "
                f"functional op such as F.relu or x * 2, or a module called on another tensor). {SUPPORTED}"
            )
        prev_name, prev_out = name, outp
        slope = _activation_slope(module, name)
        if isinstance(module, nn.Linear):
            wl = module.weight.detach().double().cpu().numpy()
            bl = (
                module.bias.detach().double().cpu().numpy()
                if module.bias is not None
                else np.zeros(wl.shape[0])
            )
            if w is None:
                w, b = wl, bl
            else:  # two affine maps in a row compose into one
                w, b = wl @ w, wl @ b + bl
            last_linear = name
        elif slope is not None:
            if w is None:
                raise UnsupportedModelError(
                    f"activation {_describe(name, module)} is not preceded by an nn.Linear; each "
                    f"activation must follow an affine map. {SUPPORTED}"
                )
            layers.append(AffineLayer(w, b, slope, name))
            w = b = None
        elif isinstance(module, _NO_OPS):
            continue
        else:
            raise UnsupportedModelError(f"module {_describe(name, module)} is not supported; {SUPPORTED}")
    if not _same_values(out, prev_out):
        raise UnsupportedModelError(
            f"the model's output is not the output of its last module '{prev_name}': the forward "
            f"changes the tensor outside any module (e.g. a residual add or a functional op). {SUPPORTED}"
        )
    if w is not None:
        layers.append(AffineLayer(w, b, None, last_linear))
    if not layers:
        raise UnsupportedModelError(f"the model runs no nn.Linear. {SUPPORTED}")
    return layers


def _chain_forward(layers: Sequence[AffineLayer], x: np.ndarray) -> np.ndarray:
    h = x
    for layer in layers:
        z = h @ layer.weight.T + layer.bias
        h = z if layer.negative_slope is None else np.where(z > 0, z, layer.negative_slope * z)
    return h


def _verify_chain(
    model: nn.Module,
    layers: list[AffineLayer],
    x: torch.Tensor,
    modes: dict[int, bool],
    *,
    atol: float,
    rtol: float,
) -> None:
    try:
        model.eval()
        with torch.no_grad():
            expected = model(x).double().cpu().numpy().reshape(x.shape[0], -1)
    finally:
        for m in model.modules():
            m.train(modes[id(m)])
    got = _chain_forward(layers, x.double().cpu().numpy().reshape(x.shape[0], -1))
    if got.shape != expected.shape or not np.allclose(got, expected, atol=atol, rtol=rtol):
        diff = np.abs(got - expected).max() if got.shape == expected.shape else float("nan")
        raise UnsupportedModelError(
            f"the traced chain of Linear/activation modules does not reproduce model(x) "
            f"(max |diff| = {diff:.3g}, shapes {got.shape} vs {expected.shape}); the forward does more "
            f"than its leaf modules show. {SUPPORTED}"
        )


# --------------------------------------------------------------------------- patterns


def hidden_layers(layers: Sequence[AffineLayer]) -> list[AffineLayer]:
    """The layers whose neurons are hidden neurons (those with an activation).

    >>> hidden_layers([AffineLayer(np.eye(2), np.zeros(2), 0.0, "a"),
    ...                AffineLayer(np.eye(2), np.zeros(2), None, "out")])[0].name
    'a'
    """
    hidden = [layer for layer in layers if layer.is_hidden]
    if not hidden:
        raise ValueError("layers: no hidden layer (every layer has negative_slope=None)")
    return hidden


def pre_activations(layers: Sequence[AffineLayer], x: np.ndarray) -> list[np.ndarray]:
    """Pre-activations ``[B, width]`` of every hidden layer for inputs ``x`` ``[B, d]``.

    >>> pre_activations([AffineLayer(np.array([[1.0, -1.0]]), np.zeros(1), 0.0, "a")],
    ...                 np.array([[2.0, 1.0]]))[0].tolist()
    [[1.0]]
    """
    h = np.asarray(x, dtype=np.float64)
    out = []
    for layer in hidden_layers(layers):
        z = h @ layer.weight.T + layer.bias
        out.append(z)
        h = np.where(z > 0, z, layer.negative_slope * z)
    return out


def activation_patterns(layers: Sequence[AffineLayer], x: np.ndarray) -> np.ndarray:
    """Hidden activation patterns ``pre_activation > 0``, bool ``[B, N]`` (layers concatenated).

    >>> activation_patterns([AffineLayer(np.eye(2), np.zeros(2), 0.0, "a")],
    ...                     np.array([[1.0, -1.0]])).tolist()
    [[True, False]]
    """
    return np.concatenate([z > 0 for z in pre_activations(layers, x)], axis=1)


def _as_layers(model_or_layers: nn.Module | Sequence[AffineLayer], input_dim: int) -> list[AffineLayer]:
    if isinstance(model_or_layers, nn.Module):
        return piecewise_linear_layers(model_or_layers, input_dim)
    layers = list(model_or_layers)
    hidden = hidden_layers(layers)
    if hidden[0].weight.shape[1] != input_dim:
        raise ValueError(
            f"input dimension {input_dim} does not match the first layer's {hidden[0].weight.shape[1]} inputs"
        )
    return layers


# --------------------------------------------------------------------------- 1-D


class SegmentRegions(NamedTuple):
    """Linear regions along the segment x(t) = a + t·(b - a), t in [0, 1].

    ``breakpoints`` (sorted, in (0, 1)) separate the ``count`` pieces; ``patterns[k]`` is the
    hidden pattern on piece k (bool ``[count, N]``).
    """

    count: int
    breakpoints: np.ndarray
    patterns: np.ndarray


def count_regions_1d(
    layers: nn.Module | Sequence[AffineLayer],
    a: np.ndarray,
    b: np.ndarray,
    *,
    tol: float = 1e-10,
) -> SegmentRegions:
    """Count linear regions exactly along the segment x(t) = a + t·(b - a), t in [0, 1].

    Hanin & Rolnick (NeurIPS 2019, arXiv 1906.00904): along a line (d = 1) the expected
    count per unit length is at most T·N, linear in the number N of hidden neurons.

    The segment is propagated layer by layer. Each piece [t0, t1] carries the affine map
    t ↦ h(t) = α + t·β of the layer's input; neuron j's pre-activation on it is
    z_j(t) = (W α + b)_j + t·(W β)_j, which changes sign at t* = -(Wα + b)_j / (Wβ)_j. Pieces
    are split at every such t* strictly inside them, the pattern of a piece is read at its
    midpoint, and the next layer's map is h' = m ⊙ z with m_j = 1 if z_j > 0 else the
    negative slope. Every breakpoint flips at least one neuron, and regions are convex, so
    the pieces are exactly the regions. Tolerance: crossings within ``tol`` (in t) of a
    piece's end or of each other are merged (regions shorter than ``tol``·|b - a| are lost).

    >>> layer = AffineLayer(np.array([[1.0], [1.0]]), np.array([-0.25, -0.75]), 0.0, "a")
    >>> r = count_regions_1d([layer], np.array([0.0]), np.array([1.0]))
    >>> r.count, r.breakpoints.tolist()
    (3, [0.25, 0.75])
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    layers = _as_layers(layers, a.size)
    bounds = np.array([0.0, 1.0])
    maps = np.stack([b - a, a], axis=1)[None]  # [P, n, 2]: h(t) = maps[..., 0]·t + maps[..., 1]
    patterns = np.zeros((1, 0), dtype=bool)
    for layer in hidden_layers(layers):
        z = np.einsum("mi,pik->pmk", layer.weight, maps)
        z[:, :, 1] += layer.bias
        with np.errstate(divide="ignore", invalid="ignore"):
            roots = -z[:, :, 1] / z[:, :, 0]
        inside = np.isfinite(roots) & (roots > bounds[:-1, None] + tol) & (roots < bounds[1:, None] - tol)
        cuts = np.sort(roots[inside])
        if cuts.size:
            cuts = cuts[np.concatenate([[True], np.diff(cuts) > tol])]
            new_bounds = np.sort(np.concatenate([bounds, cuts]))
        else:
            new_bounds = bounds
        mids = 0.5 * (new_bounds[:-1] + new_bounds[1:])
        parent = np.searchsorted(bounds, mids) - 1
        zp = z[parent]
        bits = zp[:, :, 0] * mids[:, None] + zp[:, :, 1] > 0
        patterns = np.concatenate([patterns[parent], bits], axis=1)
        maps = np.where(bits, 1.0, layer.negative_slope)[:, :, None] * zp
        bounds = new_bounds
    return SegmentRegions(int(bounds.size - 1), bounds[1:-1].copy(), patterns)


# --------------------------------------------------------------------------- 2-D


class Slice(NamedTuple):
    """A plane x(s, t) = origin + s·u1 + t·u2, (s, t) in [-1, 1]^2; ``radius`` = R."""

    origin: np.ndarray
    u1: np.ndarray
    u2: np.ndarray
    radius: float


def slice_through(x0: np.ndarray, x1: np.ndarray, x2: np.ndarray, scale: float = 1.25) -> Slice:
    """Hanin & Rolnick's 2-D slice through three inputs (NeurIPS 2019, arXiv 1906.00904).

    With a = x1 - x0, b = x2 - x0, the circumcentre of the triangle in the plane the three
    points span is c = x0 + α a + β b where

        [a·a  a·b] [α]   1 [a·a]
        [a·b  b·b] [β] = - [b·b],
                         2

    R = |c - x0|, and u1 ⟂ u2 is an orthonormal basis of span(a, b) (Gram–Schmidt from a)
    scaled to |u1| = |u2| = scale·R. The three points sit at distance 1/scale from the centre
    in (s, t) coordinates, inside the square [-1, 1]^2.

    >>> sl = slice_through(np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([-1.0, 0, 0]))
    >>> sl.origin.tolist(), sl.radius, float(np.linalg.norm(sl.u1))
    ([0.0, 0.0, 0.0], 1.0, 1.25)
    """
    x0, x1, x2 = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (x0, x1, x2))
    if not (x0.shape == x1.shape == x2.shape):
        raise ValueError(f"x0, x1, x2 must have the same shape, got {x0.shape}, {x1.shape}, {x2.shape}")
    a, b = x1 - x0, x2 - x0
    gram = np.array([[a @ a, a @ b], [a @ b, b @ b]])
    if abs(np.linalg.det(gram)) <= 1e-12 * max(gram[0, 0] * gram[1, 1], 1e-300):
        raise ValueError("slice_through: the three points are (nearly) collinear or coincide")
    alpha, beta = np.linalg.solve(gram, 0.5 * np.array([a @ a, b @ b]))
    centre = x0 + alpha * a + beta * b
    radius = float(np.linalg.norm(centre - x0))
    e1 = a / np.linalg.norm(a)
    e2 = b - (b @ e1) * e1
    e2 /= np.linalg.norm(e2)
    return Slice(centre, scale * radius * e1, scale * radius * e2, radius)


@dataclass(frozen=True, eq=False)
class SliceRegions:
    """Linear regions in the square (s, t) in [-1, 1]^2 of a 2-D slice.

    Region k is the convex polygon ``vertices[offsets[k]:offsets[k + 1]]`` (counter-clockwise,
    in (s, t) coordinates), with hidden pattern ``patterns[k]`` (bool ``[count, N]``) and an
    interior point ``points[k]`` (the mean of its vertices).
    """

    count: int
    patterns: np.ndarray
    points: np.ndarray
    vertices: np.ndarray
    offsets: np.ndarray

    def polygons(self) -> list[np.ndarray]:
        """Vertices of each region, one ``[k, 2]`` array per region."""
        return np.split(self.vertices, self.offsets[1:-1])

    def areas(self) -> np.ndarray:
        """Area of each region in (s, t) units (the square has area 4), by the shoelace formula."""
        v, nxt = self.vertices, _next_index(self.offsets)
        cross = v[:, 0] * v[nxt, 1] - v[nxt, 0] * v[:, 1]
        return 0.5 * np.add.reduceat(cross, self.offsets[:-1])


def _next_index(offsets: np.ndarray) -> np.ndarray:
    """Index of the next vertex of the same polygon (wrapping around) for a ragged vertex list."""
    nxt = np.arange(1, offsets[-1] + 1)
    nxt[offsets[1:] - 1] = offsets[:-1]
    return nxt


def _split_pieces(
    verts: np.ndarray,
    offsets: np.ndarray,
    coef: np.ndarray,
    active: np.ndarray,
    tol: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split every active convex piece that the line coef·(s, t, 1) = 0 crosses, in one pass.

    Returns new vertices, new offsets, ``source`` (old piece of each new piece), ``side``
    (+1 / -1 for the positive / negative half of a split piece, 0 for a piece kept whole) and
    ``on`` (per old piece: the neuron's sign on it when it is kept whole).
    """
    counts = np.diff(offsets)
    n_pieces = counts.size
    owner = np.repeat(np.arange(n_pieces), counts)
    c = coef[owner]
    f = c[:, 0] * verts[:, 0] + c[:, 1] * verts[:, 1] + c[:, 2]
    thr = tol * np.hypot(coef[:, 0], coef[:, 1])[owner]
    sgn = (f > thr).astype(np.int8) - (f < -thr).astype(np.int8)
    starts = offsets[:-1]
    has_pos = np.logical_or.reduceat(sgn > 0, starts)
    has_neg = np.logical_or.reduceat(sgn < 0, starts)
    on = has_pos | (~has_neg & (np.add.reduceat(f, starts) > 0))
    cut = has_pos & has_neg & active
    if not cut.any():
        return verts, offsets, np.arange(n_pieces), np.zeros(n_pieces, np.int8), on
    cut_v = cut[owner]
    nxt = _next_index(offsets)
    cross = cut_v & (sgn.astype(np.int16) * sgn[nxt] < 0)
    q = np.zeros_like(verts)
    ci = np.flatnonzero(cross)
    lam = f[ci] / (f[ci] - f[nxt[ci]])
    q[ci] = verts[ci] + lam[:, None] * (verts[nxt[ci]] - verts[ci])
    # Each vertex of a split polygon emits up to two slots in order: itself, then the crossing
    # point on its outgoing edge. Filtering the slots keeps the cyclic order of both halves.
    slots = np.stack([verts[cut_v], q[cut_v]], axis=1).reshape(-1, 2)
    slot_owner = np.repeat(owner[cut_v], 2)
    sc, xc = sgn[cut_v], cross[cut_v]
    pos_keep = np.stack([sc >= 0, xc], axis=1).reshape(-1)
    neg_keep = np.stack([sc <= 0, xc], axis=1).reshape(-1)
    kept = np.flatnonzero(~cut)
    split = np.flatnonzero(cut)
    new_verts = np.concatenate([verts[~cut_v], slots[pos_keep], slots[neg_keep]])
    new_counts = np.concatenate(
        [
            counts[kept],
            np.bincount(slot_owner[pos_keep], minlength=n_pieces)[split],
            np.bincount(slot_owner[neg_keep], minlength=n_pieces)[split],
        ]
    )
    new_offsets = np.concatenate([[0], np.cumsum(new_counts)])
    source = np.concatenate([kept, split, split])
    side = np.concatenate(
        [np.zeros(kept.size, np.int8), np.ones(split.size, np.int8), -np.ones(split.size, np.int8)]
    )
    return new_verts, new_offsets, source, side, on


def _split_by_layer(
    verts: np.ndarray, offsets: np.ndarray, z: np.ndarray, tol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut each polygon by the zero lines of one layer's neurons (z: ``[P, m, 3]`` affine in (s, t, 1)).

    Returns new vertices, offsets, the parent polygon of each piece and the layer's pattern bits.
    """
    counts = np.diff(offsets)
    n_poly = z.shape[0]
    owner = np.repeat(np.arange(n_poly), counts)
    zv = z[owner]  # [V, m, 3]
    f = zv[:, :, 0] * verts[:, :1] + zv[:, :, 1] * verts[:, 1:] + zv[:, :, 2]
    thr = tol * np.hypot(z[:, :, 0], z[:, :, 1])[owner]
    starts = offsets[:-1]
    has_pos = np.logical_or.reduceat(f > thr, starts, axis=0)
    has_neg = np.logical_or.reduceat(f < -thr, starts, axis=0)
    bits = has_pos | (~has_neg & (np.add.reduceat(f, starts, axis=0) > 0))
    cutting = has_pos & has_neg  # [P, m]
    parent = np.arange(n_poly)
    for j in np.flatnonzero(cutting.any(axis=0)):
        active = cutting[parent, j]
        verts, offsets, source, side, on = _split_pieces(verts, offsets, z[parent, j], active, tol)
        whole_active = (side == 0) & active[source]
        parent, bits = parent[source], bits[source]
        bits[whole_active, j] = on[source[whole_active]]
        bits[side > 0, j] = True
        bits[side < 0, j] = False
    return verts, offsets, parent, bits


def count_regions_2d(
    layers: nn.Module | Sequence[AffineLayer],
    origin: np.ndarray,
    u1: np.ndarray,
    u2: np.ndarray,
    *,
    tol: float = 1e-9,
) -> SliceRegions:
    """Count linear regions exactly in the slice x(s, t) = origin + s·u1 + t·u2, (s, t) in [-1, 1]^2.

    Hanin & Rolnick (NeurIPS 2019, arXiv 1906.00904) bound the expected count in a 2-D
    region K by vol(K)·(T·N)^2 / 2!, N the number of hidden neurons, whatever the depth;
    see :func:`normalized_count`. The count is exact, by their polygon clipping: start from
    the square; each polygon carries the affine map (s, t) ↦ h = G·(s, t, 1) of the current
    layer's input; the layer's pre-activations on it are z = W G + (0, 0, b), affine in (s, t).
    A neuron whose z has both signs on the polygon's vertices cuts it in two along
    z_j(s, t) = 0; a neuron non-positive on all vertices is off there. After all of a layer's
    cuts each piece gets G' = m ⊙ z, m_j = 1 if z_j > 0 else the negative slope. Regions are
    convex and every cut flips a neuron, so pieces == regions == distinct patterns.

    Tolerance: a vertex counts as on a neuron's line when its distance to the line, in (s, t)
    units, is at most ``tol`` (|z_j| <= tol·|∇_(s,t) z_j|); such vertices go to both halves, so
    near-degenerate cuts (a line through a vertex, a polygon thinner than ``tol``) never
    create pieces of zero width. Regions thinner than ``tol`` can be lost.

    All neurons of a layer are evaluated on all vertices at once; only neurons that cut some
    polygon are looped over, each splitting every polygon it crosses in one vectorized pass.

    >>> lines = AffineLayer(np.array([[1.0, 0.0], [0.0, 1.0]]), np.zeros(2), 0.0, "a")
    >>> r = count_regions_2d([lines], np.zeros(2), np.array([1.0, 0]), np.array([0, 1.0]))
    >>> r.count, sorted(map(tuple, r.patterns.tolist()))[0], float(r.areas().sum())
    (4, (False, False), 4.0)
    """
    origin, u1, u2 = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (origin, u1, u2))
    if not (origin.shape == u1.shape == u2.shape):
        raise ValueError(f"origin, u1, u2 must have the same shape, got {origin.shape}, {u1.shape}, {u2.shape}")
    layers = _as_layers(layers, origin.size)
    verts = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    offsets = np.array([0, 4])
    maps = np.stack([u1, u2, origin], axis=1)[None]  # [P, n, 3]
    patterns = np.zeros((1, 0), dtype=bool)
    for layer in hidden_layers(layers):
        z = np.einsum("mi,pik->pmk", layer.weight, maps)
        z[:, :, 2] += layer.bias
        verts, offsets, parent, bits = _split_by_layer(verts, offsets, z, tol)
        patterns = np.concatenate([patterns[parent], bits], axis=1)
        maps = np.where(bits, 1.0, layer.negative_slope)[:, :, None] * z[parent]
        logger.debug("layer %s: %d regions", layer.name, parent.size)
    counts = np.diff(offsets)
    points = np.add.reduceat(verts, offsets[:-1], axis=0) / counts[:, None]
    return SliceRegions(int(counts.size), patterns, points, verts, offsets)


def grid_pattern_count(
    layers: nn.Module | Sequence[AffineLayer],
    origin: np.ndarray,
    u1: np.ndarray,
    u2: np.ndarray,
    resolution: int,
    *,
    chunk: int = 1 << 16,
) -> int:
    """Distinct hidden patterns on a ``resolution`` x ``resolution`` grid of the slice: a LOWER bound.

    This is the sampling estimate Hanin & Rolnick (NeurIPS 2019, arXiv 1906.00904) warn only
    bounds the count from below; :func:`count_regions_2d` is exact. The grid is evaluated in
    torch, float64, with the first layer folded into the plane (z1 = s·W u1 + t·W u2 + W c + b).

    >>> lines = AffineLayer(np.array([[1.0, 0.0], [0.0, 1.0]]), np.full(2, 0.1), 0.0, "a")
    >>> grid_pattern_count([lines], np.zeros(2), np.array([1.0, 0]), np.array([0, 1.0]), 8)
    4
    """
    origin, u1, u2 = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (origin, u1, u2))
    hidden = hidden_layers(_as_layers(layers, origin.size))
    first = hidden[0]
    w1 = torch.from_numpy(np.stack([first.weight @ u1, first.weight @ u2], axis=1))
    b1 = torch.from_numpy(first.weight @ origin + first.bias)
    rest = [
        (torch.from_numpy(layer.weight), torch.from_numpy(layer.bias), layer.negative_slope) for layer in hidden[1:]
    ]
    axis = torch.linspace(-1.0, 1.0, resolution, dtype=torch.float64)
    seen: set[bytes] = set()
    n_points = resolution * resolution
    with torch.no_grad():
        for lo in range(0, n_points, chunk):
            idx = torch.arange(lo, min(lo + chunk, n_points))
            st = torch.stack([axis[idx // resolution], axis[idx % resolution]], dim=1)
            z = torch.addmm(b1, st, w1.T)
            bits = [z > 0]
            h = torch.where(z > 0, z, first.negative_slope * z)
            for w, b, slope in rest:
                z = torch.addmm(b, h, w.T)
                bits.append(z > 0)
                h = torch.where(z > 0, z, slope * z)
            packed = np.packbits(torch.cat(bits, dim=1).numpy(), axis=1)
            rows = np.unique(np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))))
            seen.update(r.tobytes() for r in rows)
    return len(seen)


# --------------------------------------------------------------------------- normalisation, distance


def normalized_count(count: float | np.ndarray, n_hidden: int, d: int = 2) -> float | np.ndarray:
    """Region count divided by Hanin & Rolnick's scale N^d / d!.

    Hanin & Rolnick (NeurIPS 2019, arXiv 1906.00904): E[#regions ∩ K] / vol(K) <= (T·N)^d / d!
    for N >= d hidden neurons, so  normalized = count / (N^d / d!)  is roughly constant across
    depths at fixed N. For d = 2, N = 96: N^2 / 2! = 4608.

    >>> normalized_count(4608, 96, 2)
    1.0
    """
    if n_hidden < 1 or d < 1:
        raise ValueError(f"normalized_count: need n_hidden >= 1 and d >= 1, got n_hidden={n_hidden}, d={d}")
    return count / (n_hidden**d / math.factorial(d))


class BoundaryDistance(NamedTuple):
    """Per input: Euclidean distance to the nearest region boundary and the hidden neuron
    (index into the concatenated hidden layers) whose zero set it is; ``inf`` / -1 if no neuron
    has a non-zero gradient there."""

    distance: np.ndarray
    neuron: np.ndarray


def distance_to_boundary(
    layers: nn.Module | Sequence[AffineLayer],
    x: np.ndarray,
    *,
    max_elements: int = 1 << 24,
) -> BoundaryDistance:
    """Distance from each input to the boundary of its linear region.

    Hanin & Rolnick (NeurIPS 2019, arXiv 1906.00904):  dist(x) = min_z |z(x)| / ||∇_x z(x)||
    over hidden neurons z, skipping neurons with ∇_x z(x) = 0; it scales like 1/N.
    Inside its region every pre-activation is affine, and the region is the intersection of the
    half-spaces {sign z_lin = sign z(x)}, so this is the exact distance to the region's boundary.
    Gradients are propagated analytically: ∇z^(1) = W1, ∇z^(l+1) = W_(l+1) diag(m^(l)) ∇z^(l),
    m_j = 1 if z_j > 0 else the negative slope. Batches are chunked so that no Jacobian has more
    than ``max_elements`` entries.

    >>> layer = AffineLayer(np.array([[3.0, 4.0]]), np.array([-5.0]), 0.0, "a")
    >>> distance_to_boundary([layer], np.array([[0.0, 0.0]])).distance.tolist()
    [1.0]
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must be [batch, input_dim], got shape {x.shape}")
    hidden = hidden_layers(_as_layers(layers, x.shape[1]))
    widest = max(layer.width for layer in hidden)
    step = max(1, max_elements // (widest * x.shape[1]))
    dist = np.full(x.shape[0], np.inf)
    neuron = np.full(x.shape[0], -1, dtype=np.int64)
    for lo in range(0, x.shape[0], step):
        xb = x[lo : lo + step]
        h, jac = xb, None
        best = np.full(xb.shape[0], np.inf)
        arg = np.full(xb.shape[0], -1, dtype=np.int64)
        first_index = 0
        for layer in hidden:
            z = h @ layer.weight.T + layer.bias
            jz = layer.weight[None] if jac is None else np.einsum("mi,bid->bmd", layer.weight, jac)
            norm = np.linalg.norm(jz, axis=2)
            with np.errstate(divide="ignore", invalid="ignore"):
                d = np.where(norm > 0, np.abs(z) / norm, np.inf)
            d = np.broadcast_to(d, z.shape)
            j = np.argmin(d, axis=1)
            dj = d[np.arange(d.shape[0]), j]
            better = dj < best
            best[better], arg[better] = dj[better], first_index + j[better]
            mult = np.where(z > 0, 1.0, layer.negative_slope)
            h = mult * z
            jac = mult[:, :, None] * jz
            first_index += layer.width
        dist[lo : lo + step], neuron[lo : lo + step] = best, arg
    return BoundaryDistance(dist, neuron)
