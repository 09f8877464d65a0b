"""dynatrack.analysis.local_complexity against hand counts and a naive per-vertex loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dynatrack.analysis.local_complexity import (
    local_complexity,
    local_complexity_merge,
    orthonormal_directions,
    preactivation_fn,
)


def _hand_net() -> nn.Sequential:
    """2-D inputs, 4 hidden neurons with known lines z_j = 0:
    n0: x1 = 0.3,  n1: x2 = -0.05,  n2: x1 + x2 = 2,  n3: x2 = x1 + 0.15.
    """
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 1.0]]))
        net[0].bias.copy_(torch.tensor([-0.3, 0.05, -2.0, -0.15]))
    return net


def test_hand_counted_diamond() -> None:
    # Axis directions: the cross-polytope is the diamond |u1 - x1| + |u2 - x2| <= r, and a line
    # a·u + b = 0 cuts it iff |a·x + b| < r·max(|a1|, |a2|).
    #   x = (0, 0):   n0 needs r > 0.3, n1 r > 0.05, n2 r > 2,   n3 r > 0.15
    #   x = (1, 0.9): n0 needs r > 0.7, n1 r > 0.95, n2 r > 0.1, n3 r > 0.25
    x = torch.tensor([[0.0, 0.0], [1.0, 0.9]], dtype=torch.float64)
    radii = [0.04, 0.2, 0.5, 0.8, 1.0]
    lc = local_complexity(_hand_net(), x, radii, 2, directions=torch.eye(2, dtype=torch.float64))
    assert lc.layers == ("1",) and lc.widths == (4,) and lc.n_samples == 2
    assert lc.per_sample[:, 0, :].tolist() == [[0, 2, 3, 3, 3], [0, 1, 2, 3, 4]]
    assert lc.counts.tolist() == [[0, 3, 5, 6, 7]]
    assert lc.total().tolist() == [[0, 2, 3, 3, 3], [0, 1, 2, 3, 4]]


def test_hand_counted_square() -> None:
    # Diagonal directions (1, ±1)/√2: the cross-polytope around 0 is the square |u1|, |u2| <= r/√2.
    # At r = 0.4 (half side 0.283): n0 (x1 = 0.3) stays outside, n1 and n3 cut it -> 2;
    # the diamond of the same radius reaches x1 = 0.4 and also cuts n0 -> 3.
    s = 1 / math.sqrt(2)
    diag = torch.tensor([[s, s], [s, -s]], dtype=torch.float64)
    x = torch.zeros(1, 2, dtype=torch.float64)
    square = local_complexity(_hand_net(), x, [0.4], 2, directions=diag)
    diamond = local_complexity(_hand_net(), x, [0.4], 2, directions=torch.eye(2, dtype=torch.float64))
    assert square.counts.tolist() == [[2]]
    assert diamond.counts.tolist() == [[3]]
    # one direction only (the u1 axis): a segment of half-length r; at r = 0.4 only n0 and n3 cross it
    segment = local_complexity(_hand_net(), x, [0.4], 1, directions=torch.tensor([[1.0, 0.0]]).double())
    assert segment.counts.tolist() == [[2]]


def _random_mlp(d: int, widths: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    acts = [nn.ReLU(), nn.LeakyReLU(0.1), nn.GELU(), nn.ReLU()]
    layers: list[nn.Module] = []
    w = d
    for k, h in enumerate(widths):
        layers += [nn.Linear(w, h), acts[k % len(acts)]]
        w = h
    layers.append(nn.Linear(w, 3))
    return nn.Sequential(*layers).double()


def _naive_lc(net: nn.Sequential, x: torch.Tensor, directions: torch.Tensor, radii: list[float]) -> np.ndarray:
    """Per-vertex loop: run each vertex through the layers by hand, compare signs with the centre."""
    linears = [m for m in net if isinstance(m, nn.Linear)][:-1]
    acts = [m for m in net if not isinstance(m, nn.Linear)]

    def signs(u: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], u
        for lin, act in zip(linears, acts):
            z = h @ lin.weight.T + lin.bias
            out.append(z > 0)
            h = act(z)
        return out

    result = np.zeros((x.shape[0], len(linears), len(radii)), dtype=np.int64)
    with torch.no_grad():
        for i in range(x.shape[0]):
            centre = signs(x[i])
            for k, r in enumerate(radii):
                crossed = [torch.zeros_like(c) for c in centre]
                for v in directions:
                    for sgn in (1.0, -1.0):
                        for li, s in enumerate(signs(x[i] + sgn * r * v)):
                            crossed[li] |= s != centre[li]
                for li, c in enumerate(crossed):
                    result[i, li, k] = int(c.sum())
    return result


def test_random_mlp_matches_naive_loop() -> None:
    d, widths, radii, p = 6, [9, 7, 11], [0.05, 0.3, 1.5], 4
    net = _random_mlp(d, widths, seed=0)
    x = torch.randn(13, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    directions = orthonormal_directions(d, p, seed=3, dtype=torch.float64)
    expected = _naive_lc(net, x, directions, radii)
    # tiny max_rows: many forward passes, each sample's vertex set split across them
    lc = local_complexity(net, x, radii, p, seed=3, max_rows=10)
    assert lc.layers == ("1", "3", "5") and lc.widths == tuple(widths)
    assert np.array_equal(lc.per_sample, expected)
    assert np.array_equal(lc.counts, expected.sum(0))
    assert expected[:, :, -1].sum() > expected[:, :, 0].sum() > 0  # the test exercises crossings
    # the same through an explicit pre-activation function and a layer subset
    sub = local_complexity(preactivation_fn(net), x, radii, p, layers=["3"], seed=3)
    assert np.array_equal(sub.per_sample[:, 0], expected[:, 1])


def test_nested_cross_polytopes_are_monotone() -> None:
    # one hidden layer: pre-activations are affine, so a hyperplane that cuts the small
    # cross-polytope also cuts every larger one with the same directions
    net = _random_mlp(5, [40], seed=2)
    x = torch.randn(30, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    radii = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    lc = local_complexity(net, x, radii, 3, seed=5)
    steps = np.diff(lc.per_sample, axis=2)
    assert (steps >= 0).all()
    assert lc.per_sample[:, 0, -1].sum() > lc.per_sample[:, 0, 0].sum()


def test_merge_over_sample_shards() -> None:
    net = _random_mlp(4, [8, 8], seed=1)
    x = torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    whole = local_complexity(net, x, [0.2, 0.8], 2)
    parts = [local_complexity(net, x[a:b], [0.2, 0.8], 2) for a, b in [(0, 7), (7, 8), (8, 20)]]
    merged = local_complexity_merge(*parts)
    assert merged.n_samples == 20
    assert np.array_equal(merged.counts, whole.counts)
    assert np.array_equal(merged.per_sample, whole.per_sample)
    assert np.allclose(merged.mean(), whole.counts / 20)


def test_preactivation_fn_records_activation_inputs() -> None:
    net = _random_mlp(3, [5, 4], seed=4)
    x = torch.randn(7, 3, dtype=torch.float64)
    pre = preactivation_fn(net)(x)
    assert list(pre) == ["1", "3"]
    z1 = net[0](x)
    assert torch.allclose(pre["1"], z1)
    assert torch.allclose(pre["3"], net[2](net[1](z1)))
    with pytest.raises(ValueError, match="not modules"):
        preactivation_fn(net, ["nope"])
    with pytest.raises(ValueError, match="no ReLU-family"):
        preactivation_fn(nn.Linear(3, 2))


def test_bad_arguments() -> None:
    net = _random_mlp(3, [5], seed=0)
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="n_directions"):
        local_complexity(net, x, [0.1], 4)
    with pytest.raises(ValueError, match="radii"):
        local_complexity(net, x, [0.0], 2)
    with pytest.raises(ValueError, match="layers"):
        local_complexity(net, x, [0.1], 2, layers=["7"])
    v = orthonormal_directions(10, 10, seed=0, dtype=torch.float64)
    assert torch.allclose(v @ v.T, torch.eye(10, dtype=torch.float64))
