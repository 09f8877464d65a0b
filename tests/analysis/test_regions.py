"""Tests for dynatrack.analysis.regions against independent references.

References used: hand-computed breakpoints and line arrangements, patterns read from the real
torch forward with hooks (not from the extracted layers), dense sampling of segments and
slices, the line-arrangement formula 1 + #lines + #intersections for one hidden layer, and
torch autograd gradients for boundary distances.
"""

from __future__ import annotations

import doctest
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynatrack.analysis import regions
from dynatrack.analysis.regions import (
    AffineLayer,
    UnsupportedModelError,
    activation_patterns,
    count_regions_1d,
    count_regions_2d,
    distance_to_boundary,
    grid_pattern_count,
    normalized_count,
    piecewise_linear_layers,
    slice_through,
)

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)


# --------------------------------------------------------------------------- helpers


def make_mlp(d_in: int, widths: list[int], seed: int, slope: float = 0.0, bias_std: float = 0.3) -> nn.Module:
    """A float64 MLP; biases large enough that boundaries wander through the slice."""
    gen = torch.Generator().manual_seed(seed)
    mods: list[nn.Module] = []
    prev = d_in
    for w in widths:
        lin = nn.Linear(prev, w).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(w, prev, generator=gen, dtype=torch.float64) * math.sqrt(2.0 / prev))
            lin.bias.copy_(torch.randn(w, generator=gen, dtype=torch.float64) * bias_std)
        mods += [lin, nn.LeakyReLU(slope) if slope else nn.ReLU()]
        prev = w
    mods.append(nn.Linear(prev, 3).double())
    return nn.Sequential(*mods)


def torch_patterns(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Sign bits of the inputs of every ReLU-family module, in call order, from the real forward."""
    bits: list[torch.Tensor] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args: bits.append(args[0].detach() > 0))
        for m in model.modules()
        if isinstance(m, ACTIVATIONS)
    ]
    try:
        with torch.no_grad():
            model.eval()
            model(x)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(bits, dim=1).numpy()


def torch_pre_activations(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    pres: list[torch.Tensor] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args: pres.append(args[0]))
        for m in model.modules()
        if isinstance(m, ACTIVATIONS)
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return pres


def distinct(patterns: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.packbits(patterns, axis=1)}


def slice_points(sl: regions.Slice, st: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(sl.origin + st[:, :1] * sl.u1 + st[:, 1:] * sl.u2)


def random_slice(d_in: int, seed: int) -> regions.Slice:
    rng = np.random.default_rng(seed)
    return slice_through(*rng.normal(size=(3, d_in)))


def grid(res: int) -> np.ndarray:
    axis = np.linspace(-1.0, 1.0, res)
    s, t = np.meshgrid(axis, axis, indexing="ij")
    return np.stack([s.ravel(), t.ravel()], axis=1)


def check_regions_against_grid(model: nn.Module, sl: regions.Slice, res: int) -> tuple[int, int]:
    """Exact regions vs the torch forward on a res x res grid; returns (exact count, grid count)."""
    r = count_regions_2d(piecewise_linear_layers(model, sl.origin.size), *sl[:3])
    # the partition tiles the square, and its regions carry distinct patterns
    areas = r.areas()
    assert np.all(areas > 0)
    assert areas.sum() == pytest.approx(4.0, abs=1e-9)
    assert len(distinct(r.patterns)) == r.count
    # each region's interior point really has the region's pattern
    np.testing.assert_array_equal(torch_patterns(model, slice_points(sl, r.points)), r.patterns)
    # every grid point lies in the polygon that carries its true pattern
    st = grid(res)
    grid_bits = torch_patterns(model, slice_points(sl, st))
    index = {row.tobytes(): k for k, row in enumerate(np.packbits(r.patterns, axis=1))}
    keys = [row.tobytes() for row in np.packbits(grid_bits, axis=1)]
    missing = [k for k in keys if k not in index]
    assert not missing, f"{len(missing)} grid points have a pattern the exact count does not know"
    owner = np.array([index[k] for k in keys])
    polys = r.polygons()
    for k in np.unique(owner):
        pts = st[owner == k]
        v = polys[k]
        e = np.roll(v, -1, axis=0) - v
        crosses = e[None, :, 0] * (pts[:, None, 1] - v[None, :, 1]) - e[None, :, 1] * (pts[:, None, 0] - v[None, :, 0])
        assert crosses.min() >= -1e-7, f"grid point outside the polygon of its pattern (region {k})"
    n_grid = len(set(keys))
    assert r.count >= n_grid
    # grid points plus the interior points see every region
    assert len(set(keys) | distinct(torch_patterns(model, slice_points(sl, r.points)))) == r.count
    return r.count, n_grid


# --------------------------------------------------------------------------- extraction


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int, act: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.drop = nn.Dropout(0.5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.fc(x)))


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.body = nn.ModuleDict(
            {"first": Block(6, 7, nn.ReLU(inplace=True)), "second": nn.Sequential(Block(7, 5, nn.LeakyReLU(0.2)))}
        )
        self.proj = nn.Linear(5, 4)  # two Linears in a row compose into one output map
        self.head = nn.Sequential(nn.Identity(), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body["first"](self.flat(x))
        h = self.body["second"](h)
        return self.head(self.proj(h))


def test_nested_custom_module_is_extracted_in_call_order():
    torch.manual_seed(0)
    model = Nested().double()
    model.train()
    layers = piecewise_linear_layers(model, (2, 3))
    assert [(layer.name, layer.width, layer.negative_slope) for layer in layers] == [
        ("body.first.act", 7, 0.0),
        ("body.second.0.act", 5, 0.2),
        ("head.1", 2, None),
    ]
    assert model.training and model.body["first"].drop.training  # modes restored
    x = torch.randn(500, 2, 3, dtype=torch.float64)
    np.testing.assert_array_equal(activation_patterns(layers, x.reshape(500, -1).numpy()), torch_patterns(model, x))
    with torch.no_grad():
        model.eval()
        expected = model(x).numpy()
    np.testing.assert_allclose(regions._chain_forward(layers, x.reshape(500, -1).numpy()), expected, atol=1e-10)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)) + x)


class FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class ResidualAtEnd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc1(x)) + x


@pytest.mark.parametrize(
    ("model", "input_shape", "named"),
    [
        (Residual(), 4, "fc2"),
        (FunctionalRelu(), 4, "fc2"),
        (ResidualAtEnd(), 4, "output"),
        (nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)), (1, 4), "Conv1d"),
        (nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)), 4, "GELU"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)), 4, "BatchNorm1d"),
        (nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), 4, "not preceded by an nn.Linear"),
    ],
    ids=["residual", "functional-relu", "residual-at-end", "conv", "gelu", "batchnorm", "leading-relu"],
)
def test_unsupported_models_raise_with_clear_message(model: nn.Module, input_shape, named: str):
    with pytest.raises(UnsupportedModelError, match="supported") as info:
        piecewise_linear_layers(model, input_shape)
    assert named in str(info.value)
    assert isinstance(info.value, ValueError)


def test_wrong_input_shape_and_multi_slope_prelu_raise():
    with pytest.raises(ValueError, match=r"input_shape=\(5,\)"):
        piecewise_linear_layers(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), 5)
    with pytest.raises(UnsupportedModelError, match="PReLU"):
        piecewise_linear_layers(nn.Sequential(nn.Linear(4, 3), nn.PReLU(3), nn.Linear(3, 2)), 4)
    prelu = nn.Sequential(nn.Linear(4, 3), nn.PReLU(init=0.3), nn.Linear(3, 2))
    assert piecewise_linear_layers(prelu, 4)[0].negative_slope == pytest.approx(0.3)


# --------------------------------------------------------------------------- 1-D


def test_1d_hand_computed_relu_and_leaky():
    # layer 1: h = relu(x) on x in [-1, 1] (t = 0.5); layer 2: relu(h - 0.5) flips at x = 0.5 (t = 0.75)
    relu = [
        AffineLayer(np.array([[1.0]]), np.array([0.0]), 0.0, "a1"),
        AffineLayer(np.array([[1.0]]), np.array([-0.5]), 0.0, "a2"),
    ]
    r = count_regions_1d(relu, np.array([-1.0]), np.array([1.0]))
    assert r.count == 3
    np.testing.assert_allclose(r.breakpoints, [0.5, 0.75])
    assert r.patterns.tolist() == [[False, False], [True, False], [True, True]]
    # leaky slope 0.1: h = 0.1 x for x < 0, so h + 0.05 = 0 at x = -0.5 (t = 0.25)
    leaky = [
        AffineLayer(np.array([[1.0]]), np.array([0.0]), 0.1, "a1"),
        AffineLayer(np.array([[1.0]]), np.array([0.05]), 0.0, "a2"),
    ]
    r = count_regions_1d(leaky, np.array([-1.0]), np.array([1.0]))
    assert r.count == 3
    np.testing.assert_allclose(r.breakpoints, [0.25, 0.5])
    # an output layer does not add regions
    r = count_regions_1d(relu + [AffineLayer(np.array([[1.0]]), np.array([-0.1]), None, "out")], [-1.0], [1.0])
    assert r.count == 3


@pytest.mark.parametrize(
    ("widths", "slope", "seed"),
    [([6], 0.0, 0), ([5, 5], 0.0, 1), ([4, 6, 4], 0.0, 2), ([6, 6], 0.1, 3), ([8, 8, 8], 0.0, 4)],
)
def test_1d_matches_dense_sampling(widths: list[int], slope: float, seed: int):
    model = make_mlp(3, widths, seed, slope)
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=3) * 2, rng.normal(size=3) * 2
    r = count_regions_1d(piecewise_linear_layers(model, 3), a, b)
    n = 200_000
    t = np.linspace(0.0, 1.0, n)
    bits = torch_patterns(model, torch.from_numpy(a + t[:, None] * (b - a)))
    changes = np.flatnonzero(np.any(bits[1:] != bits[:-1], axis=1))
    assert r.count >= 1 + changes.size
    # every sampled change is next to an exact breakpoint
    for c in changes:
        assert np.any((r.breakpoints >= t[c] - 1e-12) & (r.breakpoints <= t[c + 1] + 1e-12))
    # every sample has the pattern of the exact piece that contains it
    piece = np.searchsorted(r.breakpoints, t)
    clear = np.min(np.abs(t[:, None] - r.breakpoints[None, :]), axis=1, initial=np.inf) > 1e-9
    np.testing.assert_array_equal(bits[clear], r.patterns[piece[clear]])
    # pieces longer than the sampling step are all seen, so here the counts agree
    lengths = np.diff(np.concatenate([[0.0], r.breakpoints, [1.0]]))
    if lengths.min() > 2.0 / n:
        assert r.count == 1 + changes.size
    assert r.count > 1


# --------------------------------------------------------------------------- 2-D


def test_2d_lines_in_general_position():
    # n lines tangent to the circle of radius 0.3 at angles spread over less than pi/2: no two
    # parallel, no three concurrent, every intersection within 0.3 / cos(pi/4) < 1 of the centre
    n = 9
    angles = np.linspace(0.05, math.pi / 2 - 0.05, n)
    weight = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    layers = [AffineLayer(weight, np.full(n, -0.3), 0.0, "act"), AffineLayer(np.ones((1, n)), np.zeros(1), None, "out")]
    r = count_regions_2d(layers, np.zeros(2), np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert r.count == 1 + n + math.comb(n, 2)
    assert r.areas().sum() == pytest.approx(4.0)
    # the same arrangement in a 5-D input space, seen through an embedded plane
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))
    w5 = weight @ q[:, :2].T
    r5 = count_regions_2d([AffineLayer(w5, np.full(n, -0.3), 0.0, "act")], np.zeros(5), q[:, 0], q[:, 1])
    assert r5.count == r.count


@pytest.mark.parametrize("seed", range(4))
def test_2d_one_hidden_layer_matches_arrangement_formula(seed: int):
    model = make_mlp(5, [12], seed, bias_std=0.5)
    sl = random_slice(5, seed)
    layers = piecewise_linear_layers(model, 5)
    # independent exact count: lines a s + b t + c = 0 in the square; regions = 1 + #lines + #crossings
    w, b = layers[0].weight, layers[0].bias
    coef = np.stack([w @ sl.u1, w @ sl.u2, w @ sl.origin + b], axis=1)
    corners = np.array([[-1, -1, 1], [1, -1, 1], [1, 1, 1], [-1, 1, 1]], dtype=float)
    vals = corners @ coef.T
    crossing = (vals.max(axis=0) > 0) & (vals.min(axis=0) < 0)
    points = 0
    for i, j in itertools.combinations(np.flatnonzero(crossing), 2):
        st = np.linalg.solve(coef[[i, j], :2], -coef[[i, j], 2])
        points += bool(np.all(np.abs(st) < 1))
    assert count_regions_2d(layers, *sl[:3]).count == 1 + crossing.sum() + points


@pytest.mark.parametrize(
    ("widths", "slope", "seed"),
    [([5], 0.0, 0), ([4, 4], 0.0, 1), ([5, 4], 0.2, 2), ([3, 4, 3], 0.0, 3)],
)
def test_2d_matches_fine_grid_on_tiny_nets(widths: list[int], slope: float, seed: int):
    model = make_mlp(4, widths, seed, slope, bias_std=0.5)
    exact, on_grid = check_regions_against_grid(model, random_slice(4, seed), res=500)
    assert exact == on_grid  # regions of tiny nets are wide enough for a 500 x 500 grid


@pytest.mark.parametrize(
    ("widths", "slope", "seed"),
    [([16, 16, 16], 0.0, 10), ([12, 12, 12, 12], 0.0, 11), ([16, 16, 16], 0.05, 12), ([24, 24], 0.0, 13)],
)
def test_2d_never_below_grid_on_deeper_nets(widths: list[int], slope: float, seed: int):
    model = make_mlp(6, widths, seed, slope)
    exact, on_grid = check_regions_against_grid(model, random_slice(6, seed), res=300)
    assert exact >= on_grid > 1


def test_2d_accepts_module_and_grid_is_a_lower_bound():
    model = make_mlp(6, [10, 10], 5)
    sl = random_slice(6, 5)
    from_module = count_regions_2d(model, *sl[:3])
    from_layers = count_regions_2d(piecewise_linear_layers(model, 6), *sl[:3])
    assert from_module.count == from_layers.count
    lower = [grid_pattern_count(model, *sl[:3], res) for res in (16, 64, 256)]
    assert lower == sorted(lower) and lower[-1] <= from_module.count
    expected = len(distinct(torch_patterns(model, slice_points(sl, grid(64)))))
    assert lower[1] == expected


def test_slice_through_geometry():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7))
    sl = slice_through(*x, scale=1.25)
    dists = np.linalg.norm(x - sl.origin, axis=1)
    np.testing.assert_allclose(dists, sl.radius)
    np.testing.assert_allclose(np.linalg.norm([sl.u1, sl.u2], axis=1), 1.25 * sl.radius)
    assert abs(sl.u1 @ sl.u2) < 1e-9 * sl.radius**2
    # the points lie in the plane, at radius 1 / 1.25 in (s, t) coordinates
    basis = np.stack([sl.u1, sl.u2], axis=1)
    st, *_ = np.linalg.lstsq(basis, (x - sl.origin).T, rcond=None)
    np.testing.assert_allclose(basis @ st, (x - sl.origin).T, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(st, axis=0), 0.8)
    with pytest.raises(ValueError, match="collinear"):
        slice_through(x[0], 2 * x[0], 3 * x[0])


def test_normalized_count():
    assert normalized_count(4608, 96, 2) == pytest.approx(1.0)
    assert normalized_count(10, 5, 1) == pytest.approx(2.0)
    assert normalized_count(np.array([2, 4]), 2, 2).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="n_hidden"):
        normalized_count(1, 0, 2)


# --------------------------------------------------------------------------- distance


@pytest.mark.parametrize(("widths", "slope"), [([10, 10], 0.0), ([8, 8, 8], 0.1)])
def test_distance_to_boundary(widths: list[int], slope: float):
    model = make_mlp(5, widths, 7, slope)
    layers = piecewise_linear_layers(model, 5)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5))
    result = distance_to_boundary(layers, x)
    dist = result.distance
    assert np.all(np.isfinite(dist)) and np.all(dist > 0)

    # autograd reference: min over neurons of |z| / ||grad z||
    xt = torch.from_numpy(x).requires_grad_(True)
    z = torch.cat(torch_pre_activations(model, xt), dim=1)
    grads = torch.stack([torch.autograd.grad(z[:, j].sum(), xt, retain_graph=True)[0] for j in range(z.shape[1])], 1)
    norms = grads.norm(dim=2)
    ref = torch.where(norms > 0, z.abs() / norms, torch.inf).min(dim=1).values.detach().numpy()
    np.testing.assert_allclose(dist, ref, rtol=1e-9)

    base = torch_patterns(model, torch.from_numpy(x))
    for trial in range(10):
        # slightly less than the distance, in any direction, stays in the region
        v = rng.normal(size=x.shape)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        inside = torch_patterns(model, torch.from_numpy(x + 0.999 * dist[:, None] * v))
        np.testing.assert_array_equal(inside, base)
    # the nearest neuron's zero is at that distance: step onto it along its gradient
    zi = z.detach().numpy()[np.arange(40), result.neuron]
    gi = grads.numpy()[np.arange(40), result.neuron]
    step = -(zi / np.linalg.norm(gi, axis=1))[:, None] * gi / np.linalg.norm(gi, axis=1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(step, axis=1), dist, rtol=1e-9)
    z_on = torch.cat(torch_pre_activations(model, torch.from_numpy(x + step)), dim=1).detach().numpy()
    assert np.max(np.abs(z_on[np.arange(40), result.neuron])) < 1e-9
    beyond = torch_patterns(model, torch.from_numpy(x + 1.001 * step))
    assert np.all(beyond[np.arange(40), result.neuron] != base[np.arange(40), result.neuron])


def test_distance_skips_zero_gradients():
    # the second-layer neuron sees only a dead first-layer neuron: zero gradient, skipped
    layers = [
        AffineLayer(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([-10.0, 0.0]), 0.0, "a1"),
        AffineLayer(np.array([[1.0, 0.0]]), np.array([0.5]), 0.0, "a2"),
    ]
    result = distance_to_boundary(layers, np.array([[0.0, 2.0]]))
    assert result.distance.tolist() == [2.0] and result.neuron.tolist() == [1]


def test_docstring_examples_run():
    failures, _ = doctest.testmod(regions, optionflags=doctest.ELLIPSIS)
    assert failures == 0
