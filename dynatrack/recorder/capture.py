"""Finding ReLU-family layers and capturing their sign patterns with forward hooks.

The pattern of a neuron is the sign of the pre-activation, i.e. of the
activation module's *input*: ``x > 0``. That is exact for ReLU, LeakyReLU,
PReLU, ReLU6, RReLU and ELU-style units, and is the "gate" sign for GELU,
SiLU, Mish and friends. Activations applied functionally (``F.relu(x)`` in a
``forward``) have no module and cannot be hooked: use ``nn.ReLU`` modules.

A module applied several times in one forward (one ``nn.ReLU`` shared by
several layers) is recorded once per call, as ``<name>@0``, ``<name>@1``, ...

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 1))
>>> [name for name, _ in select_layers(net, None)]
['1']
>>> pack_bits(torch.tensor([[True, False, True, False, False, False, False, False, True]])).tolist()
[[160, 128]]
"""

from __future__ import annotations

import fnmatch
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dynatrack.analysis.activations import RELU_FAMILY



class LayerSelectionError(ValueError):
    """No layer to record, or a requested layer name that matches nothing."""


def select_layers(model: nn.Module, layers: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """The modules to hook, in ``named_modules()`` order.

    ``layers=None`` takes every ReLU-family module (by type). Otherwise each entry
    is a module name or a glob pattern (``"encoder.*.act"``) over
    ``named_modules()``; every entry must match at least one module.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    candidates = [n for n, m in named if isinstance(m, RELU_FAMILY)]
    if layers is None:
        if not candidates:
            types = sorted({type(m).__name__ for _, m in named})
            raise LayerSelectionError(
                f"{type(model).__name__} has no ReLU-family module to record (module types: {types}). "
                "Use nn.ReLU/nn.LeakyReLU/nn.GELU/... modules instead of functional activations, "
                "or name the modules whose input sign to record with layers=[...]."
            )
        return [(n, m) for n, m in named if isinstance(m, RELU_FAMILY)]
    if isinstance(layers, str):
        layers = [layers]
    chosen: dict[str, nn.Module] = {}
    for pattern in layers:
        hits = [(n, m) for n, m in named if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise LayerSelectionError(
                f"layers=[{pattern!r}] matches no module of {type(model).__name__}. "
                f"ReLU-family modules: {candidates or 'none'}; all modules: {[n for n, _ in named][:50]}"
            )
        chosen.update(hits)
    return [(n, m) for n, m in named if n in chosen]


_GATHER = 0x8040201008040201 - 2**64  # as a signed int64


def pack_bits(active: torch.Tensor) -> torch.Tensor:
    """Pack a bool ``[n, w]`` tensor to uint8 ``[n, ceil(w/8)]`` on its device.

    Bit order as ``numpy.packbits(..., bitorder="big")``: neuron j is bit
    ``7 - j % 8`` of byte ``j // 8``. Each group of 8 bytes (0/1) is read as one
    little-endian int64 and multiplied by 0x8040201008040201, which gathers the
    eight bits into the top byte: one multiply and one shift per output byte.
    """
    n, w = active.shape
    x = active.view(torch.uint8) if active.dtype == torch.bool else (active != 0).view(torch.uint8)
    pad = (-w) % 8
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    if sys.byteorder != "little":  # the gather trick reads bytes little-endian
        shifts = torch.arange(7, -1, -1, device=x.device, dtype=torch.uint8)
        return (x.view(n, -1, 8) << shifts).sum(dim=-1, dtype=torch.uint8)
    v = x.contiguous().view(torch.int64)
    return ((v * _GATHER) >> 56).bitwise_and_(0xFF).to(torch.uint8)


#: modules whose output is zero exactly where the input is not positive: their output gives the bits
_OUTPUT_SIGN = (nn.ReLU, nn.ReLU6)


def active_mask(module: nn.Module, x: torch.Tensor, output: Any) -> torch.Tensor:
    """``relu(x) != 0`` as bool ``[n, w]``: the pattern bit of each neuron (``x > 0``; a NaN counts as active).

    Written as a cast instead of a comparison because torch's CPU comparison kernels
    cost about five times a cast (17 us against 3.3 us for a 128 x 256 float32). For
    ``nn.ReLU``/``nn.ReLU6`` the module's own output is used, so this is one cast.
    """
    if type(module) in _OUTPUT_SIGN and isinstance(output, torch.Tensor) and output.shape == x.shape:
        active = output.bool()  # a bool result has no autograd history: no detach needed
    else:
        active = torch.relu(x.detach()).bool()
    return active if active.dim() == 2 else active.reshape(active.shape[0], -1)


def materialize(masks: list[torch.Tensor]) -> np.ndarray:
    """Packed bits ``uint8[n, ceil(w/8)]`` of CPU bool masks ``[n_i, w]`` (the CPU hooks' items), in order.

    One ``numpy.packbits`` over the concatenated masks, on the writer thread (numpy, not
    ``torch.cat``: a torch op here could start an intra-op thread team beside the training's).
    """
    rows = masks[0].numpy() if len(masks) == 1 else np.concatenate([m.numpy() for m in masks])
    return np.packbits(rows, axis=1, bitorder="big")


class Capture:
    """Forward hooks that turn each selected module's input into packed sign bits.

    Hooks are attached only while recording (:meth:`attach` / :meth:`detach`),
    so steps that are not recorded pay nothing. Per call of a hooked module the
    hook stores the packed bits, and, when ``labels`` are set, accumulates per
    class activation counts (for neuron partitions) on the device.
    """

    def __init__(self, modules: list[tuple[str, nn.Module]], calls: dict[str, int] | None = None) -> None:
        self.modules = modules
        self.calls = calls or {name: 1 for name, _ in modules}
        self._handles: list[Any] = []
        self._seen: dict[str, int] = defaultdict(int)
        self.bits: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.counts: dict[str, torch.Tensor] = {}
        self.keep_bits = True
        self.enabled = False  # hooks stay attached across recorded steps; this gates them
        self.pack_on_device = True  # False on CPU: keep bool masks, the writer thread packs them
        self.onehot: torch.Tensor | None = None  # [C, n] float, or [1, n] ones without labels

    @property
    def names(self) -> list[str]:
        """Recorded layer names, in forward order (``name@k`` for shared modules)."""
        out = []
        for name, _ in self.modules:
            k = self.calls.get(name, 1)
            out.extend([name] if k == 1 else [f"{name}@{i}" for i in range(k)])
        return out

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def start_forward(self, *, keep_bits: bool = True, onehot: torch.Tensor | None = None) -> None:
        """Reset the per-forward call counter; set what the next forward should collect."""
        self._seen.clear()
        self.keep_bits = keep_bits
        self.onehot = onehot

    def reset(self) -> None:
        self.bits.clear()
        self.counts.clear()

    def start_batch(self) -> None:
        """Record the patterns of the next (training) forward: attach the hooks and enable them."""
        self.bits = defaultdict(list)
        self.counts.clear()
        self._seen.clear()
        self.keep_bits = True
        self.onehot = None
        if not self._handles:
            self.attach()
        self.enabled = True

    def take(self) -> dict[str, list[Any]]:
        """Stop recording and hand over the collected items per layer (the capture starts empty again)."""
        self.enabled = False
        bits, self.bits = self.bits, defaultdict(list)
        return bits

    def _hook(self, name: str) -> Callable[..., None]:
        single = self.calls.get(name, 1) == 1

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.enabled:
                return
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            if single:
                key = name
            else:
                k = self._seen[name]
                self._seen[name] = k + 1
                key = f"{name}@{k}"
            active = active_mask(module, x, output)
            if self.keep_bits:
                self.bits[key].append(pack_bits(active) if self.pack_on_device else active)
            if self.onehot is not None:
                c = self.onehot @ active.to(self.onehot.dtype)
                prev = self.counts.get(key)
                self.counts[key] = c if prev is None else prev + c

        return hook


def trace_layers(
    model: nn.Module, modules: list[tuple[str, nn.Module]], forward: Callable[[torch.Tensor], Any], x: torch.Tensor
) -> tuple[dict[str, int], dict[str, int]]:
    """Run one forward on ``x`` to learn each module's call count and each layer's width."""
    counter: dict[str, int] = defaultdict(int)
    widths: dict[str, int] = {}

    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if args and isinstance(args[0], torch.Tensor):
                widths[f"{name}@{counter[name]}"] = int(args[0][0].numel())
                counter[name] += 1

        return hook

    handles = [m.register_forward_hook(make(name)) for name, m in modules]
    try:
        with torch.no_grad():
            forward(x)
    finally:
        for h in handles:
            h.remove()
    calls = {name: counter.get(name, 0) for name, _ in modules}
    out_widths: dict[str, int] = {}
    for name, k in calls.items():
        for i in range(k):
            out_widths[name if k == 1 else f"{name}@{i}"] = widths[f"{name}@{i}"]
    return calls, out_widths
