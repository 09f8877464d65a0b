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
    named = [(user_name(n), m) for n, m in model.named_modules() if n and not is_compiled(m)]
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


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is the wrapper ``torch.compile(module)`` returns (an ``OptimizedModule``)."""
    compiled = getattr(getattr(torch, "_dynamo", None), "OptimizedModule", None)
    return compiled is not None and isinstance(module, compiled)


def user_name(name: str) -> str:
    """A module name as the user wrote it: without the ``_orig_mod`` of ``torch.compile`` wrappers.

    >>> user_name("net._orig_mod.1"), user_name("_orig_mod.fc.weight")
    ('net.1', 'fc.weight')
    """
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def eager(hook: Callable[..., None]) -> Callable[..., None]:
    """``hook``, run eagerly when called from ``torch.compile``'d code (a graph break there)."""
    return torch.compiler.disable(hook, recursive=True)


def hook_wrapper(compiled: bool) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """:func:`eager` for hooks on ``torch.compile``'d models, else the hook as it is."""
    return eager if compiled else (lambda hook: hook)


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


_SPREAD = np.uint64(0x8040201008040201)


def concat_masks(masks: list[Any]) -> tuple[np.ndarray, bool]:
    """CPU bool masks ``[n_i, ...]`` as one bool ``[sum n_i, w]`` array, and whether it is a fresh copy.

    Masks with more than two dimensions (a conv layer's ``[n, c, h, w]``) are flattened
    per sample. ``numpy.concatenate`` copies without holding the GIL.
    """
    arrays = [m.numpy() if isinstance(m, torch.Tensor) else m for m in masks]
    arrays = [a if a.ndim == 2 else a.reshape(a.shape[0], -1) for a in arrays]
    if len(arrays) > 1:
        return np.concatenate(arrays), True
    return np.ascontiguousarray(arrays[0]), False


def pack_rows(rows: np.ndarray, owned: bool = False) -> np.ndarray:
    """Packed bits ``uint8[n, ceil(w/8)]`` of a bool ``[n, w]`` array; ``owned=True`` lets it reuse ``rows``' memory.

    On the writer thread it should leave the GIL to the training thread as long as it
    can: ``numpy.packbits`` holds the GIL for its whole run, a ufunc only between calls.
    When the width is a multiple of 8, each 8 bools (bytes 0/1) are read as one uint64
    and multiplied by 0x8040201008040201, which gathers the eight bits into the top byte
    (as :func:`pack_bits` does on a device): a multiply, a shift and a cast, all without
    the GIL. Same bit order as ``numpy.packbits(..., bitorder="big")``. (numpy, not torch:
    a torch op here could start an intra-op thread team beside the training's.)
    """
    if rows.dtype != np.bool_ or rows.shape[1] % 8 or sys.byteorder != "little" or not rows.flags.c_contiguous:
        return np.packbits(rows, axis=1, bitorder="big")
    words = rows.view(np.uint64)
    gathered = np.multiply(words, _SPREAD, out=words if owned else None)
    np.right_shift(gathered, np.uint64(56), out=gathered)
    return gathered.astype(np.uint8)


def materialize(masks: list[Any]) -> np.ndarray:
    """Packed bits ``uint8[n, ceil(w/8)]`` of CPU bool masks ``[n_i, ...]`` (the CPU hooks' items), in order."""
    rows, owned = concat_masks(masks)
    return pack_rows(rows, owned)


class ProbeMasks:
    """One probe chunk's bool masks of every recorded layer, layer after layer in one buffer (CPU probe steps).

    Layer ``l`` (``width`` neurons, padded to ``wpad``, a multiple of 8) is a contiguous
    ``bool[rows, wpad]`` block of :attr:`flat`. The CPU probe forward's hooks write each
    call's mask straight into its block (contiguous rows: the cheapest copy), so after
    the forward one ``numpy.packbits`` of the whole buffer packs every layer, each
    layer's packed rows a contiguous block of the result (padding bits stay zero), and
    each layer's rows are whole uint64 words for the count (:func:`_class_counts`). The
    buffer holds one chunk's rows and is reused chunk after chunk, probe step after probe
    step (each chunk is decoded right after its forward).

    ``layers`` lists ``(layer, col, width)``: ``col`` is the layer's first column when the
    blocks stand side by side (a multiple of 8), its block starts at ``col * rows``.

    >>> cap = ProbeMasks({0: [("a", 3)], 1: [("b", 9)]}, rows=2)
    >>> cap.layers, cap.total, tuple(cap.flat.shape), tuple(cap.block(1).shape)
    ([('a', 0, 3), ('b', 8, 9)], 24, (48,), (2, 16))
    """

    def __init__(self, slots: dict[int, list[tuple[str, int]]], rows: int) -> None:
        self.rows = rows
        self.layers: list[tuple[str, int, int]] = []  # (layer, first column, width), in forward order
        self._slots: dict[int, list[int]] = {}  # slot -> index into layers, per call in a forward
        total = 0
        for i, calls in slots.items():
            self._slots[i] = []
            for name, width in calls:
                self._slots[i].append(len(self.layers))
                self.layers.append((name, total, width))
                total += -(-width // 8) * 8
        self.total = total
        self.flat = torch.zeros(rows * total, dtype=torch.bool)
        self._blocks = [self.block(li) for li in range(len(self.layers))]
        self._views: dict[tuple[int, int, torch.Size], torch.Tensor] = {}

    def block(self, li: int) -> torch.Tensor:
        """Layer ``li``'s block, ``bool[rows, wpad]`` (a view of :attr:`flat`)."""
        _, col, width = self.layers[li]
        wpad = -(-width // 8) * 8
        return self.flat[col * self.rows : (col + wpad) * self.rows].view(self.rows, wpad)

    def view(self, i: int, j: int, like: torch.Tensor) -> torch.Tensor:
        """The block for call ``j`` of slot ``i`` in one chunk's forward, shaped like ``like``.

        Views are kept by ``(i, j, shape)``: a probe forward asks for the same ones every time.
        """
        key = (i, j, like.shape)
        out = self._views.get(key)
        if out is None:
            out = self._views[key] = self._view(i, j, like)
        return out

    def _view(self, i: int, j: int, like: torch.Tensor) -> torch.Tensor:
        per_call = self._slots[i]
        if j >= len(per_call):
            raise ValueError(
                f"recorded module #{i} was called more than {len(per_call)} times in one probe forward (as traced "
                "at setup); the recorded layers must have the same widths and calls in every probe forward"
            )
        li = per_call[j]
        width = self.layers[li][2]
        n = like.shape[0]
        if n > self.rows or like.numel() != n * width:
            raise ValueError(
                f"a probe forward gave a mask of shape {tuple(like.shape)} for call {j} of recorded module #{i}, "
                f"expected {width} values per sample and at most {self.rows} samples (as traced at setup); "
                "the recorded layers must have the same widths and calls in every probe forward"
            )
        return self._blocks[li][:n, :width].view(like.shape)


class Capture:
    """Forward hooks that turn each selected module's input sign into pattern bits.

    Two sets of hooks, each attached only while it records, so steps that are not
    recorded pay nothing:

    * batch hooks (:meth:`start_batch` / :meth:`take` / :meth:`detach_batch`): one lean
      closure per module that appends one mask per call to its slot (on CPU a bool
      tensor, packed later; on accelerators bits packed on the device). They record
      the training forward, and on CPU the probe forwards too;
    * probe hooks (:meth:`attach` / :meth:`detach_probe`), around the probe forwards on
      accelerators: per call they keep the packed bits and/or accumulate per-class
      activation counts on the device (:meth:`start_forward`).
    """

    def __init__(self, modules: list[tuple[str, nn.Module]], calls: dict[str, int] | None = None, *,
                 compiled: bool = False) -> None:
        self.modules = modules
        # torch.compile'd models: the hooks run eagerly (a graph break at each recorded module, on
        # recorded steps only: torch.compile then keeps a graph with the hooks and one without)
        self._wrap = hook_wrapper(compiled)
        self.calls = calls or {name: 1 for name, _ in modules}
        self._handles: list[Any] = []
        self._seen: dict[str, int] = defaultdict(int)
        self.bits: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.counts: dict[str, torch.Tensor] = {}
        self.keep_bits = True
        self.enabled = False  # hooks stay attached across recorded steps; this gates them
        self.pack_on_device = True  # False on CPU: keep bool masks, the writer thread packs them
        self.onehot: torch.Tensor | None = None  # [C, n] float, or [1, n] ones without labels
        # probe forwards on CPU: the masks go to one split's buffer, kept across probe steps
        self.reuse: ProbeMasks | None = None
        # the training batch's hooks: one lean hook per module, appending to its slot
        self._batch_handles: list[Any] = []
        self._slots: list[list[torch.Tensor]] = [[] for _ in modules]

    @property
    def names(self) -> list[str]:
        """Recorded layer names, in forward order (``name@k`` for shared modules)."""
        out = []
        for name, _ in self.modules:
            k = self.calls.get(name, 1)
            out.extend([name] if k == 1 else [f"{name}@{i}" for i in range(k)])
        return out

    def attach(self) -> None:
        """Attach the probe hooks (per call: bits and/or per-class counts, see :meth:`start_forward`)."""
        if not self._handles:
            self._handles = [m.register_forward_hook(self._wrap(self._hook(name))) for name, m in self.modules]

    def detach_probe(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def detach(self) -> None:
        """Remove every hook (the probe hooks and the batch hooks)."""
        self.detach_probe()
        self.detach_batch()

    def start_forward(self, *, keep_bits: bool = True, onehot: torch.Tensor | None = None) -> None:
        """Reset the per-forward call counter; set what the next forward should collect."""
        self._seen.clear()
        self.keep_bits = keep_bits
        self.onehot = onehot

    def reset(self) -> None:
        self.bits.clear()
        self.counts.clear()

    @property
    def batch_attached(self) -> bool:
        return bool(self._batch_handles)

    def start_batch(self) -> None:
        """Record the patterns of the next (training) forward: attach the batch hooks and enable them.

        The batch hooks stay attached across consecutive recorded steps (attaching costs
        more than the hooks); :meth:`take` disables them, :meth:`detach_batch` removes them.
        """
        if not self._batch_handles:
            self._batch_handles = [m.register_forward_hook(self._wrap(self._batch_hook(i, m)))
                                   for i, (_, m) in enumerate(self.modules)]
        for slot in self._slots:
            if slot:
                slot.clear()  # left over from a step that failed before take()
        self.enabled = True

    def detach_batch(self) -> None:
        for h in self._batch_handles:
            h.remove()
        self._batch_handles = []
        self.enabled = False

    def take(self) -> dict[str, list[torch.Tensor]]:
        """Stop recording and hand over the batch forward's masks (or packed bits) per layer.

        A module called ``k > 1`` times per forward gives ``name@0`` ... ``name@{k-1}``
        (over several forwards, call ``j`` goes to ``name@{j % k}``); a module not called
        at all is absent.
        """
        self.enabled = False
        out: dict[str, list[torch.Tensor]] = {}
        slots = self._slots
        for i, (name, _) in enumerate(self.modules):
            items = slots[i]
            if not items:
                continue
            slots[i] = []
            k = self.calls.get(name, 1)
            if k == 1:
                out[name] = items
            else:  # calls in forward order, forward after forward (probe chunks)
                for j, item in enumerate(items):
                    out.setdefault(f"{name}@{j % k}", []).append(item)
        return out

    def probe_masks(self, widths: dict[str, int], rows: int) -> ProbeMasks:
        """A :class:`ProbeMasks` buffer for probe chunks of at most ``rows`` samples (taken after each chunk)."""
        slots = {}
        for i, (name, _) in enumerate(self.modules):
            k = self.calls.get(name, 1)
            layers = [name] if k == 1 else [f"{name}@{j}" for j in range(k)]
            slots[i] = [(layer, widths[layer]) for layer in layers]
        return ProbeMasks(slots, rows)

    def _batch_hook(self, i: int, module: nn.Module) -> Callable[..., None]:
        """The training forward's hook for module ``i``: as little Python as possible.

        It appends the module's mask (CPU: a bool tensor, one cast; accelerators: bits
        packed on the device) to slot ``i``. All checks that do not depend on the step
        (module type, device) are made here, once.
        """
        cap, slots = self, self._slots
        if type(module) in _OUTPUT_SIGN:  # ReLU / ReLU6: the module's output is zero exactly where x <= 0
            if self.pack_on_device:

                def hook(m: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
                    if cap.enabled:
                        slots[i].append(pack_bits(output.bool().reshape(output.shape[0], -1)))

            else:

                def hook(m: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
                    if cap.enabled:
                        if cap.reuse is None:
                            slots[i].append(output.bool())
                        else:  # probe forward: into the split's buffer (no fresh pages; one pass packs all layers)
                            slots[i].append(cap.reuse.view(i, len(slots[i]), output).copy_(output))

            return hook

        on_device = self.pack_on_device

        def gate_hook(m: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if cap.enabled and args and isinstance(args[0], torch.Tensor):
                active = active_mask(m, args[0], output)
                if on_device:
                    active = pack_bits(active)
                elif cap.reuse is not None:
                    active = cap.reuse.view(i, len(slots[i]), active).copy_(active)
                slots[i].append(active)

        return gate_hook

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
    model: nn.Module, modules: list[tuple[str, nn.Module]], forward: Callable[[torch.Tensor], Any], x: torch.Tensor,
    *, compiled: bool = False,
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

    wrap = hook_wrapper(compiled)
    handles = [m.register_forward_hook(wrap(make(name))) for name, m in modules]
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
