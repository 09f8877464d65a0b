"""A piecewise-linear model as data: its traced chain of affine maps and activations, by state_dict key.

:func:`dynatrack.analysis.regions.piecewise_linear_layers` turns an ``nn.Module`` into the
chain of affine maps and ReLU-family activations that it computes,

    h_0 = flatten(x),   z_i = W_i h_{i-1} + b_i,   h_i = σ_i(z_i),   σ(z) = max(z, 0) or max(z, a·z),

(Hanin & Rolnick, NeurIPS 2019: the network is affine on each region of constant sign
pattern of z). Here the same chain is written down as plain, JSON-able data, naming for
each step the ``state_dict`` keys of its weights and biases (several consecutive
``nn.Linear`` compose into one step), the activation kind and slope (PReLU: the key of its
slope) and the activation module's name, so that a run directory can be analyzed with the
parameters of any checkpoint and without the model's code:

* :func:`describe_chain` (at record time, with the model): the steps, checked against
  the model itself;
* :func:`chain_layers` (at analysis time, with a checkpoint's ``state_dict``): the
  :class:`~dynatrack.analysis.regions.AffineLayer` list the region counters take;
* :class:`ChainModule`: the chain as a module, computing in the checkpoint's dtype with
  the same ``F.linear``/activation kernels as the model, with :meth:`ChainModule.preactivations`.

Pure functions: no file I/O (the store writes the JSON).

>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
>>> steps = describe_chain(net, 3)
>>> [(s["name"], s["activation"], [l["weight"] for l in s["linears"]]) for s in steps]
[('1', 'relu', ['0.weight']), ('2', None, ['2.weight'])]
>>> [layer.width for layer in chain_layers(steps, net.state_dict())]
[4, 2]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dynatrack.analysis.regions import AffineLayer, UnsupportedModelError, piecewise_linear_layers

__all__ = ["ChainModule", "chain_layers", "describe_chain", "preactivation_names"]

_PREFIX = "m."  # the model's name inside the wrapper that runs ``forward(model, x)``


class _Call(nn.Module):
    """``forward(x) = fn(m, x)``: trace the model as the recorder runs it (its ``probe_forward``)."""

    def __init__(self, m: nn.Module, fn: Callable[[nn.Module, torch.Tensor], Any]) -> None:
        super().__init__()
        self.m = m
        self._fn = fn

    def forward(self, x: torch.Tensor) -> Any:
        return self._fn(self.m, x)


def describe_chain(
    model: nn.Module,
    input_shape: int | Sequence[int],
    *,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> list[dict[str, Any]]:
    """The chain that ``model`` computes, as JSON-able steps naming ``model.state_dict()`` keys.

    Each step is ``{"name", "linears": [{"module", "weight", "bias"}], "activation",
    "negative_slope", "slope_key"}``: ``activation`` is ``"relu"``, ``"leaky_relu"``,
    ``"prelu"`` or ``None`` (the output step), ``name`` the activation module's name (the
    last Linear's for the output step), ``bias`` ``None`` for a Linear without one,
    ``slope_key`` the PReLU's weight key. ``forward(model, x)`` is how the model is
    called (default ``model(x)``).

    Raises :class:`~dynatrack.analysis.regions.UnsupportedModelError` with the reason when
    the model is not such a chain (convolutions, GELU, residual connections, ...).
    The steps are checked: :func:`chain_layers` on ``model.state_dict()`` must give the
    very maps that :func:`~dynatrack.analysis.regions.piecewise_linear_layers` traced.
    """
    wrapper = _Call(model, forward or (lambda m, x: m(x)))
    param = next(model.parameters(), None)
    # a bf16/fp16 forward differs from the float64 chain by its rounding (~1e-2), a structural
    # mismatch (a residual add, a functional op) by O(1)
    low = param is not None and param.dtype in (torch.bfloat16, torch.float16)
    tol = {"atol": 3e-2, "rtol": 3e-2} if low else {}
    traced = piecewise_linear_layers(wrapper, input_shape, **tol)  # raises with the reason
    order: list[tuple[str, nn.Module]] = []
    leaves = {id(m): (n, m) for n, m in wrapper.named_modules() if next(m.children(), None) is None}
    handles = [m.register_forward_hook(lambda mod, a, o: order.append(leaves[id(mod)])) for _, m in leaves.values()]
    shape = (int(input_shape),) if isinstance(input_shape, (int, np.integer)) else tuple(input_shape)
    x = torch.zeros((2, *shape), dtype=param.dtype if param is not None else torch.float32,
                    device=param.device if param is not None else "cpu")
    modes = {id(m): m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            wrapper(x)
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            m.train(modes[id(m)])
    steps: list[dict[str, Any]] = []
    linears: list[dict[str, Any]] = []
    for name, module in order:
        name = name[len(_PREFIX):]
        if isinstance(module, nn.Linear):
            linears.append({"module": name, "weight": f"{name}.weight",
                            "bias": f"{name}.bias" if module.bias is not None else None})
        elif isinstance(module, (nn.ReLU, nn.LeakyReLU, nn.PReLU)):
            kind = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu"}[type(module)]
            steps.append({"name": name, "linears": linears, "activation": kind,
                          "negative_slope": float(module.negative_slope) if kind == "leaky_relu" else 0.0,
                          "slope_key": f"{name}.weight" if kind == "prelu" else None})
            linears = []
    if linears:
        steps.append({"name": linears[-1]["module"], "linears": linears, "activation": None,
                      "negative_slope": None, "slope_key": None})
    try:
        rebuilt = chain_layers(steps, model.state_dict())
    except KeyError as exc:
        raise UnsupportedModelError(f"the traced chain names a parameter that is not in the state_dict: {exc}") from exc
    same = len(rebuilt) == len(traced) and all(
        a.name == b.name[len(_PREFIX):] and a.negative_slope == b.negative_slope and np.array_equal(a.weight, b.weight)
        and np.array_equal(a.bias, b.bias) for a, b in zip(rebuilt, traced))
    if not same:
        raise UnsupportedModelError("the traced chain cannot be rebuilt from the model's state_dict keys")
    return steps


def _tensor(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise KeyError(f"state_dict has no {key!r} (the model description names it)")
    return state_dict[key].detach()


def _slope(step: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> float | None:
    if step["activation"] is None:
        return None
    if step["activation"] == "prelu":
        w = _tensor(state_dict, step["slope_key"])
        if w.numel() != 1:
            raise UnsupportedModelError(f"PReLU {step['name']!r} has {w.numel()} slopes; only one is supported")
        return float(w.reshape(()).item())
    return float(step["negative_slope"])


def chain_layers(steps: Sequence[Mapping[str, Any]], state_dict: Mapping[str, torch.Tensor]) -> list[AffineLayer]:
    """The float64 :class:`AffineLayer` chain of ``steps`` with the parameters of ``state_dict``.

    Consecutive Linears of a step compose as ``W = W_2 W_1``, ``b = W_2 b_1 + b_2``, in the
    order :func:`~dynatrack.analysis.regions.piecewise_linear_layers` composes them, so the
    result equals what it extracts from the model holding ``state_dict``.
    Raises ``KeyError`` naming a key that ``state_dict`` lacks.
    """
    layers = []
    for step in steps:
        w = b = None
        for lin in step["linears"]:
            wl = _tensor(state_dict, lin["weight"]).double().cpu().numpy()
            bl = (_tensor(state_dict, lin["bias"]).double().cpu().numpy() if lin["bias"] is not None
                  else np.zeros(wl.shape[0]))
            w, b = (wl, bl) if w is None else (wl @ w, wl @ b + bl)
        if w is None:
            raise UnsupportedModelError(f"step {step['name']!r} of the chain has no affine map")
        layers.append(AffineLayer(w, b, _slope(step, state_dict), step["name"]))
    return layers


def preactivation_names(steps: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the hidden steps' pre-activations; an activation run k > 1 times gives ``name@0..k-1``.

    >>> preactivation_names([{"name": "a", "activation": "relu"}, {"name": "a", "activation": "relu"},
    ...                      {"name": "out", "activation": None}])
    ['a@0', 'a@1']
    """
    hidden = [s["name"] for s in steps if s["activation"] is not None]
    out, seen = [], {}
    for name in hidden:
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(f"{name}@{k}" if hidden.count(name) > 1 else name)
    return out


class ChainModule(nn.Module):
    """The chain as a module: ``forward(x)`` is the model's output, flattened per sample.

    Computes in the checkpoint's dtype with ``F.linear`` per Linear (not the composed
    float64 map), so pre-activations match the model's own forward.
    :meth:`preactivations` returns ``{layer: z [n, width]}`` under the names of
    :func:`preactivation_names`.
    """

    def __init__(self, steps: Sequence[Mapping[str, Any]], state_dict: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.steps = [dict(s) for s in steps]
        self.names = preactivation_names(self.steps)
        self._params = [
            [(_tensor(state_dict, lin["weight"]), None if lin["bias"] is None else _tensor(state_dict, lin["bias"]))
             for lin in step["linears"]]
            for step in self.steps
        ]
        self._slopes = [None if s["activation"] == "prelu" else s["negative_slope"] for s in self.steps]
        self._prelu = [_tensor(state_dict, s["slope_key"]) if s["activation"] == "prelu" else None for s in self.steps]

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = x.reshape(x.shape[0], -1).to(self._params[0][0][0].dtype)  # inputs in the weights' dtype (bf16 runs)
        pre: list[torch.Tensor] = []
        for step, params, slope, prelu in zip(self.steps, self._params, self._slopes, self._prelu):
            for w, b in params:
                h = F.linear(h, w, b)
            kind = step["activation"]
            if kind is None:
                continue
            pre.append(h)
            if kind == "relu":
                h = F.relu(h)
            elif kind == "leaky_relu":
                h = F.leaky_relu(h, slope)
            else:
                h = F.prelu(h, prelu)
        return h, pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)[0]

    def preactivations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return dict(zip(self.names, self._run(x)[1]))
