"""``model/``: what the weight analyses need to know of the model, stored as data, never as code.

Written once by rank 0 when a run is created (:func:`write_model_description`), read by
the analyzers on any machine or Ray worker without the user's code:

``model/description.json``
    ``{"format": 1, "input_shape", "layers", "chain", "program"}``.
    ``chain`` is ``{"status": "ok", "steps": [...]}`` for a model that is a chain of
    ``nn.Linear`` and ReLU / LeakyReLU / PReLU modules (see :mod:`dynatrack.analysis.chain`:
    per step the ``state_dict`` keys of its weights and biases, the activation kind and
    slope, the activation module's name), else ``{"status": "unsupported", "reason"}``.
    ``program`` is ``{"status": "ok", "outputs", "state", "constants"}`` when
    ``torch.export`` could export the model (``state``: the program's parameter and buffer
    names -> checkpoint keys), else ``{"status": "failed", "reason"}``.
    Submodules compiled with ``torch.compile`` are described through their original
    module (never compiled here), under the names the user wrote: the recorder's layer
    names and checkpoint keys have no ``_orig_mod`` either.
``model/program.json``
    The exported graph of ``x -> (model output, pre-activation of each recorded layer)``
    (``torch.export`` serialization, the graph only: no weights, no pickle, metadata such
    as stack traces removed). Its parameters are those of each checkpoint.
``model/constants.pt``
    Tensor constants of the program (non-persistent buffers, lifted tensors), if any;
    read with ``torch.load(weights_only=True)``.

Why not ``torch.export.save``/``load``: in torch 2.13, ``torch.export.load`` reads weights
and constants with ``torch.load(weights_only=False)`` and ``pickle.loads`` (see
``torch/export/pt2_archive/_package.py``: ``_load_state_dict``, ``_load_constants``;
its docstring: "uses pickle under the hood ... Never load data from an untrusted
source"), and the graph deserializer hands shape expressions to ``sympy.sympify``
(``eval``) and pastes ``guards_code`` into generated Python. So only the graph JSON is
stored, and :func:`program_module` checks it before deserializing: every operator is a
``torch.ops.aten`` op (or one of a few ``operator`` functions), every shape expression a
plain symbol or integer, every name an identifier, guards and metadata are dropped, and
weights come from the checkpoint (``weights_only=True``). Nothing named in the run
directory is imported.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dynatrack.store.fs import RunLocation, StoreError

log = logging.getLogger(__name__)

MODEL_DIR = "model"
DESCRIPTION = f"{MODEL_DIR}/description.json"
PROGRAM = f"{MODEL_DIR}/program.json"
CONSTANTS = f"{MODEL_DIR}/constants.pt"
FORMAT = 1
_PREFIX = "m."  # the model inside the exported wrapper


class ModelDescriptionError(StoreError):
    """The stored model description is missing, malformed or refused as unsafe."""


# -- record time -----------------------------------------------------------------------------------


class _Tap(nn.Module):
    """``x -> (forward(m, x), *pre-activations)``: the input of each recorded module, flattened per sample."""

    def __init__(self, m: nn.Module, layers: Sequence[str], forward: Callable[[nn.Module, torch.Tensor], Any]) -> None:
        super().__init__()
        self.m = m
        self._fn = forward
        self._layers = list(layers)

    def forward(self, x: torch.Tensor) -> tuple[Any, ...]:
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in self._modules_of(self._layers)}
        modules = dict(self.m.named_modules())
        handles = [modules[n].register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0])) for n in seen]
        try:
            out = self._fn(self.m, x)
        finally:
            for h in handles:
                h.remove()
        pre = []
        for layer in self._layers:
            name, _, k = layer.partition("@")
            z = seen[name][int(k) if k else 0]
            pre.append(z.reshape(z.shape[0], -1))
        return (out, *pre)

    @staticmethod
    def _modules_of(layers: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(layer.partition("@")[0] for layer in layers))


def describe_model(
    module: nn.Module,
    *,
    layers: Sequence[str],
    input_shape: Sequence[int],
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """``(description, {relative path: bytes})`` for ``module`` as the recorder runs it.

    ``layers`` are the recorded layer names (``name@k`` for the k-th call of a module),
    ``forward(module, x)`` the recorder's probe forward (default ``module(x)``). The model
    runs in eval mode (restored afterwards), on its own device and dtype. Never raises for
    a model it cannot describe: the reason goes into the description.
    """
    from dynatrack.analysis.chain import describe_chain
    from dynatrack.analysis.regions import UnsupportedModelError

    forward = forward or (lambda m, x: m(x))
    desc: dict[str, Any] = {"format": FORMAT, "input_shape": [int(s) for s in input_shape], "layers": list(layers)}
    files: dict[str, bytes] = {}
    with _uncompiled(module) as actual:
        try:
            steps = describe_chain(module, list(input_shape), forward=forward)
            desc["chain"] = {"status": "ok", "steps": [_rename_step(step, actual) for step in steps]}
        except (UnsupportedModelError, ValueError, RuntimeError) as exc:
            desc["chain"] = {"status": "unsupported", "reason": _one_line(exc)}
        try:
            program, files = _export(module, layers, input_shape, forward, actual)
            desc["program"] = {"status": "ok", **program}
        except Exception as exc:  # noqa: BLE001 - any export failure is recorded, never fatal to the fit
            desc["program"] = {"status": "failed",
                               "reason": f"torch.export failed: {type(exc).__name__}: {_one_line(exc)}"}
            files = {}
    return desc, files


@contextlib.contextmanager
def _uncompiled(module: nn.Module) -> Iterator[Callable[[str], str]]:
    """Swap each ``torch.compile``d submodule for its original module while describing.

    Yields ``actual(name)``: a module or parameter name of the swapped view -> its name in the
    run (the checkpoints' keys): the same, as the recorder writes names without the
    ``_orig_mod`` of compiled submodules (``net.1``, ``net.0.weight``).
    """
    compiled = [(name, m) for name, m in module.named_modules()
                if name and isinstance(getattr(m, "_orig_mod", None), nn.Module)]
    swapped: list[tuple[str, nn.Module, str, nn.Module]] = []  # (path, parent, attribute, compiled module)
    for name, m in compiled:
        if any(name.startswith(p + ".") for p, _, _, _ in swapped):
            continue  # inside a module already swapped
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        parent._modules[child] = m._orig_mod
        swapped.append((name, parent, child, m))

    def actual(name: str) -> str:
        return name

    try:
        yield actual
    finally:
        for _, parent, child, m in swapped:
            parent._modules[child] = m


def _rename_step(step: dict[str, Any], actual: Callable[[str], str]) -> dict[str, Any]:
    linears = [{k: (actual(v) if isinstance(v, str) else v) for k, v in lin.items()} for lin in step["linears"]]
    return {**step, "name": actual(step["name"]), "linears": linears,
            "slope_key": actual(step["slope_key"]) if step["slope_key"] else None}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()).replace("'m.", "'").replace("'m'", "'<model>'")
    return text if len(text) <= 600 else text[:597] + "..."


def _export(
    module: nn.Module, layers: Sequence[str], input_shape: Sequence[int], forward: Callable[[nn.Module, torch.Tensor], Any],
    actual: Callable[[str], str],
) -> tuple[dict[str, Any], dict[str, bytes]]:
    from torch._export.serde.serialize import serialize

    param = next(module.parameters(), None)
    x = torch.zeros((2, *input_shape), dtype=param.dtype if param is not None and param.is_floating_point()
                    else torch.float32, device=param.device if param is not None else "cpu")
    tap = _Tap(module, [layer.replace("._orig_mod", "") for layer in layers], forward)
    modes = {id(m): m.training for m in module.modules()}
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    noise = io.StringIO()
    try:
        module.eval()
        # a failed export prints its partial graph to stderr and logs warnings: the reason is kept instead
        torch_log.setLevel(logging.ERROR)
        with contextlib.redirect_stderr(noise):
            batch = torch.export.Dim("batch", min=1)
            ep = torch.export.export(tap, (x,), dynamic_shapes=({0: batch},), strict=False)
    finally:
        torch_log.setLevel(level)
        for m in module.modules():
            m.train(modes[id(m)])
        if noise.getvalue():
            log.debug("torch.export printed:\n%s", noise.getvalue())
    constants = {}
    for k, v in ep.constants.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"the program holds a non-tensor constant {k!r} ({type(v).__name__})")
        constants[k] = v.detach().cpu()
    graph = json.loads(serialize(ep).exported_program)
    graph["guards_code"] = []
    for node in graph["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}  # stack traces (user paths), module types: not needed to run
    graph["graph_module"]["metadata"] = {}
    _check_graph(graph)  # what analysis will demand; fail at record time, with the reason
    files = {PROGRAM: json.dumps(graph).encode()}
    if constants:
        buf = io.BytesIO()
        torch.save(constants, buf)
        files[CONSTANTS] = buf.getvalue()
    state = {k: actual(k[len(_PREFIX):]) for k in ep.state_dict}
    return {"outputs": ["output", *layers], "state": state, "constants": sorted(constants)}, files


def write_model_description(
    loc: RunLocation,
    module: nn.Module,
    *,
    layers: Sequence[str],
    input_shape: Sequence[int],
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> dict[str, Any] | None:
    """Describe ``module`` and write ``model/`` under ``loc`` (rank 0, at run creation).

    Never raises: a model that can be neither traced as a chain nor exported gets a
    description saying why, with one warning; a failure to write is a warning too
    (the fit goes on; analysis then needs ``--trust-model-code``). Returns the description.
    """
    try:
        desc, files = describe_model(module, layers=layers, input_shape=input_shape, forward=forward)
        loc.mkdir(MODEL_DIR)
        for rel, data in files.items():
            loc.write_bytes_atomic(rel, data, overwrite=True)
        loc.write_bytes_atomic(DESCRIPTION, json.dumps(desc, indent=1, sort_keys=True).encode(), overwrite=True)
    except Exception as exc:  # noqa: BLE001 - a description failure never kills training
        log.warning("could not store the model description of %s (%s: %s); weight analyses of this run will "
                    "need --trust-model-code", loc.uri, type(exc).__name__, exc)
        return None
    if desc["chain"]["status"] != "ok" and desc["program"]["status"] != "ok":
        log.warning("the model of %s can be neither traced as a Linear/ReLU chain (%s) nor exported (%s); weight "
                    "analyses of this run will need --trust-model-code", loc.uri, desc["chain"]["reason"],
                    desc["program"]["reason"])
    elif desc["program"]["status"] != "ok":
        log.warning("model of %s: %s; stored the Linear/ReLU chain only", loc.uri, desc["program"]["reason"])
    return desc


# -- analysis time ---------------------------------------------------------------------------------


def read_model_description(loc: RunLocation) -> dict[str, Any] | None:
    """The stored description, or ``None`` for a run recorded before dynatrack stored one."""
    if not loc.exists(DESCRIPTION):
        return None
    try:
        desc = json.loads(loc.read_bytes(DESCRIPTION))
    except ValueError as exc:
        raise ModelDescriptionError(f"{loc.join(DESCRIPTION)} is not valid JSON: {exc}") from exc
    if not isinstance(desc, dict) or not isinstance(desc.get("chain"), dict) or not isinstance(desc.get("program"), dict):
        raise ModelDescriptionError(f"{loc.join(DESCRIPTION)} is not a model description (needs chain and program)")
    if desc.get("format") != FORMAT:
        raise ModelDescriptionError(f"{loc.join(DESCRIPTION)} has format {desc.get('format')!r}; this dynatrack "
                                    f"reads format {FORMAT}")
    return desc


_ATEN = re.compile(r"^torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")
_ATEN_DENY = ("file", "save", "load", "pickle", "print", "_local_scalar", "set_", "storage")
_OPERATOR = {f"_operator.{n}" for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "neg", "mod", "pow")}
_SYMBOL = re.compile(r"^(Symbol\('[a-z][0-9]+', positive=True, integer=True\)|[a-z][0-9]+|-?[0-9]+)$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_graph(graph: Any, where: str = "program") -> None:
    """Refuse a program graph outside the safe subset (see the module docstring), naming what was found."""
    if not isinstance(graph, dict) or not isinstance(graph.get("graph_module"), dict):
        raise ModelDescriptionError(f"{where}: not a serialized torch.export program")
    if graph.get("guards_code"):
        raise ModelDescriptionError(f"{where}: holds guard code; refusing it")
    for key in graph.get("range_constraints") or {}:
        if not _SYMBOL.match(str(key)):
            raise ModelDescriptionError(f"{where}: range constraint on {key!r} is not a plain symbol")

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "metadata" and v:
                    raise ModelDescriptionError(f"{where}: a node carries metadata; refusing it")
                if k == "target" and isinstance(v, str):
                    op = v.split(".")[3] if v.count(".") >= 4 else ""
                    if not ((_ATEN.match(v) and not any(d in op for d in _ATEN_DENY)) or v in _OPERATOR):
                        raise ModelDescriptionError(f"{where}: operator {v!r} is not an allowed ATen op")
                elif k == "expr_str" and not (isinstance(v, str) and _SYMBOL.match(v)):
                    raise ModelDescriptionError(f"{where}: shape expression {v!r} is not a plain symbol")
                elif k == "name" and isinstance(v, str) and not _IDENT.match(v):
                    raise ModelDescriptionError(f"{where}: name {v!r} is not an identifier")
                elif k in ("as_custom_obj", "as_custom_objs", "as_graph"):
                    raise ModelDescriptionError(f"{where}: holds a {k[3:]} (custom objects and subgraphs are refused)")
                elif isinstance(v, str) and ("\n" in v or "\r" in v):
                    raise ModelDescriptionError(f"{where}: field {k!r} holds a line break")
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(graph)


def _to_cpu(o: Any) -> None:
    if isinstance(o, dict):
        for k, v in o.items():
            if k in ("device", "as_device") and isinstance(v, dict) and "type" in v:
                v["type"], v["index"] = "cpu", None
            else:
                _to_cpu(v)
    elif isinstance(o, list):
        for v in o:
            _to_cpu(v)


class ProgramModule(nn.Module):
    """A stored program with a checkpoint's parameters: ``forward(x)`` is the model's output.

    :meth:`preactivations` returns ``{recorded layer: pre-activation [n, width]}``.
    """

    def __init__(self, gm: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.gm = gm
        self.names = list(layers)
        first = next((p for p in gm.parameters() if p.is_floating_point()), None)
        self._dtype = first.dtype if first is not None else None  # inputs in the weights' dtype (bf16 runs)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self._dtype) if self._dtype is not None and x.is_floating_point() else x

    def train(self, mode: bool = True) -> "ProgramModule":
        # the program was exported in eval mode; an exported module refuses train()/eval()
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> Any:
        return self.gm(self._cast(x))[0]

    def preactivations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = self.gm(self._cast(x))
        return dict(zip(self.names, out[1:]))


def program_module(loc: RunLocation, desc: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> ProgramModule:
    """The stored program (checked, see the module docstring) with the parameters of ``state_dict``.

    Raises :class:`ModelDescriptionError` for a missing, malformed or refused program, or a
    ``state_dict`` that lacks a key the program needs (naming it).
    """
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    program = desc.get("program") or {}
    if program.get("status") != "ok":
        raise ModelDescriptionError(f"{loc.uri}: no stored program ({program.get('reason', 'not recorded')})")
    try:
        graph = json.loads(loc.read_bytes(PROGRAM))
    except (ValueError, OSError) as exc:
        raise ModelDescriptionError(f"{loc.join(PROGRAM)} cannot be read: {exc}") from exc
    _check_graph(graph, loc.join(PROGRAM))
    _to_cpu(graph)  # analysis runs on CPU whatever the device the model was recorded on
    names = program.get("state") or {}
    missing = [k for k in names.values() if k not in state_dict]
    if missing:
        raise ModelDescriptionError(f"the checkpoint lacks {missing[:5]} that the stored program of {loc.uri} needs")
    specs = graph["graph_module"].get("signature", {}).get("input_specs", [])
    params = {spec["parameter"].get("parameter_name") for spec in specs if isinstance(spec, dict) and "parameter" in spec}
    weights = {}
    for name, key in names.items():
        v = state_dict[key].detach().cpu()
        weights[name] = nn.Parameter(v, requires_grad=False) if name in params else v
    constants: dict[str, torch.Tensor] = {}
    if program.get("constants"):
        constants = torch.load(io.BytesIO(loc.read_bytes(CONSTANTS)), map_location="cpu", weights_only=True)
        if not isinstance(constants, dict) or not all(isinstance(v, torch.Tensor) for v in constants.values()):
            raise ModelDescriptionError(f"{loc.join(CONSTANTS)} does not hold a dict of tensors")
    try:
        ep = deserialize(SerializedArtifact(json.dumps(graph).encode(), weights, constants, b""))
        gm = ep.module()
    except Exception as exc:  # noqa: BLE001 - torch's own errors, named with the file
        raise ModelDescriptionError(f"{loc.join(PROGRAM)} cannot be loaded by this torch "
                                    f"({type(exc).__name__}: {_one_line(exc)})") from exc
    outputs = program.get("outputs") or ["output"]
    return ProgramModule(gm, outputs[1:])
