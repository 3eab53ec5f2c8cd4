""":func:`convbn.load_into` for ``torch.nn.Module``: pairs from ``torch.fx``, else module order.

Loaded only once the model is known to be a torch module, so importing torch here is free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

from convbn.adapters import (
    assign_torch,
    check_torch_pair,
    from_torch,
    kept_from_torch,
    torch_padding_to_convbn,
)
from convbn.checkpoint import Layer, Norm
from convbn.errors import ConvBNError
from convbn.layouts import (
    conv_from_torch,
    conv_to_torch,
    dense_from_torch,
    dense_to_torch,
    transpose_from_torch,
    transpose_to_torch,
)
from convbn.loading import ModelPairs, Part, Staged, StagedPart, Target, flat_map, out_width, parts_as_layers
from convbn.loading.matching import INPUT, Flow, Graph, State
from convbn.params import ConvBNParams

__all__ = ["apply", "find_pairs", "read", "read_parts", "restore", "run", "snapshot"]

_BN = (nn.BatchNorm2d, nn.SyncBatchNorm)
#: Every BatchNorm a part can be: after a Linear (1d), standalone (2d), of any rank.
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _convbn_layer() -> type | None:
    """convbn's own ``ConvBN2d``, if its module was imported (no instance can exist otherwise)."""
    module = sys.modules.get("convbn.torch")
    return None if module is None else module.ConvBN2d  # type: ignore[no-any-return]


class _Tracer(torch.fx.Tracer):  # type: ignore[misc]
    """fx's tracer, keeping every Conv2d/BatchNorm (subclasses too) and ``ConvBN2d`` as one call."""

    def __init__(self, leaf: tuple[type, ...]) -> None:
        super().__init__()
        self._leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaf) or bool(super().is_leaf_module(m, qualname))


def _fx_pairs(
    model: nn.Module, modules: dict[str, nn.Module], layer: type | None, notes: list[str]
) -> tuple[list[tuple[str, str]], Any]:
    """(conv, bn) where the conv's only consumer, in every call, is the BatchNorm; and the fx graph."""
    leaf: tuple[type, ...] = (nn.Conv2d, *_BN, *((layer,) if layer is not None else ()))
    graph = _Tracer(leaf).trace(model)
    partner: dict[str, str | None] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target)
        module = modules.get(name)
        if layer is not None and isinstance(module, layer):
            conv, bn = f"{name}.conv", f"{name}.bn"
        elif isinstance(module, nn.Conv2d):
            conv, bn = name, None
            users = list(node.users)
            norms = [u for u in users if u.op == "call_module" and isinstance(modules.get(str(u.target)), _BN)]
            if len(users) == 1 and norms and norms[0].args and norms[0].args[0] is node:
                bn = str(norms[0].target)
            elif norms:
                notes.append(f"{name}: its output feeds more than its BatchNorm; not a pair")
        else:
            continue
        if conv in partner and partner[conv] != bn:
            if partner[conv] is not None:
                notes.append(f"{conv} is called more than once, not always before the same BatchNorm; not a pair")
            bn = None
        partner[conv] = bn
    pairs = [(conv, bn) for conv, bn in partner.items() if bn is not None]
    bns = [bn for _, bn in pairs]
    shared = {bn for bn in bns if bns.count(bn) > 1}
    for bn in sorted(shared):
        notes.append(f"{bn} follows more than one conv; not paired")
    return [(conv, bn) for conv, bn in pairs if bn not in shared], graph


def _data_flow(fx_graph: Any, modules: dict[str, nn.Module], pairs: list[tuple[str, str]], layer: type | None) -> Graph:
    """Which parametric modules feed which, through parameter-free operations, from the fx graph.

    A pair is one node named by its conv; every other module holding parameters is a node too.
    """
    unit = _units(modules, pairs, layer)
    producers: dict[str, set[str]] = {}
    tags: dict[Any, frozenset[str]] = {}
    inputs = 0

    def flow(value: Any) -> frozenset[str]:
        if isinstance(value, torch.fx.Node):
            return tags.get(value, frozenset())
        if isinstance(value, (list, tuple)):
            return frozenset().union(*map(flow, value)) if value else frozenset()
        if isinstance(value, dict):
            return flow(list(value.values()))
        return frozenset()

    for node in fx_graph.nodes:
        if node.op == "placeholder":
            tags[node] = frozenset({INPUT if inputs == 0 else f"{INPUT}{inputs}"})
            inputs += 1
            continue
        feeding = flow(list(node.args)) | flow(dict(node.kwargs))
        name = str(node.target) if node.op == "call_module" else None
        owner = unit.get(name) if name is not None else None
        if owner is None and name is not None and any(True for _ in modules[name].parameters()):
            owner = name
        if owner is None:
            tags[node] = feeding
            continue
        if feeding != {owner}:
            producers.setdefault(owner, set()).update(feeding - {owner})
        tags[node] = frozenset({owner})
    return Graph.of(producers, unit.values())


def _order_pairs(model: nn.Module, layer: type | None) -> list[tuple[str, str]]:
    """(conv, bn) where the BatchNorm is the next leaf module registered after the conv."""
    pairs: list[tuple[str, str]] = []
    previous: tuple[str, nn.Module] | None = None
    skip = None
    for name, module in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        if layer is not None and isinstance(module, layer):
            pairs.append((f"{name}.conv", f"{name}.bn"))
            skip, previous = f"{name}.", None
            continue
        if not isinstance(module, (nn.Conv2d, *_BN)) and any(True for _ in module.children()):
            continue  # a container: its children come next
        if previous is not None and isinstance(previous[1], nn.Conv2d) and isinstance(module, _BN):
            if module.num_features == previous[1].out_channels:
                pairs.append((previous[0], name))
        previous = (name, module)
    return pairs


def _units(modules: dict[str, nn.Module], pairs: list[tuple[str, str]], layer: type | None) -> dict[str, str]:
    """Module name -> the graph node it belongs to: a pair's conv and BatchNorm (and a ``ConvBN2d``) the conv's."""
    unit: dict[str, str] = {}
    for conv, bn in pairs:
        unit[conv] = unit[bn] = conv
        if conv.endswith(".conv") and layer is not None and isinstance(modules.get(conv[: -len(".conv")]), layer):
            unit[conv[: -len(".conv")]] = conv
    return unit


def _eager_flow(
    model: nn.Module, modules: dict[str, nn.Module], pairs: list[tuple[str, str]], layer: type | None,
    example: np.ndarray | None, notes: list[str],
) -> Graph | None:
    """The data flow of a model ``torch.fx`` cannot trace, from one eval forward on the example (or a
    ``(1, C, 32, 32)`` input for the first conv's ``C``) under a ``TorchFunctionMode``: an operation
    reading a module's parameter or buffer and data computed from the input belongs to that module."""
    unit = _units(modules, pairs, layer)
    owner: dict[int, str] = {}
    for name, module in modules.items():
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            owner[id(t)] = unit.get(name, name)
    if example is not None:
        x = np.moveaxis(example, -1, 1) if example.ndim == 4 else example
    else:
        convs = [m for m in modules.values() if isinstance(m, nn.Conv2d)]
        if not convs:
            return None
        x = np.zeros((1, convs[0].in_channels, 32, 32), np.float32)
    recorder = Flow()
    states: dict[int, State] = {}
    alive: list[torch.Tensor] = []  # keeps every tensor seen alive, so that no id is reused

    def state(t: torch.Tensor) -> State:
        return Flow.parameter(owner[id(t)]) if id(t) in owner else states.get(id(t), Flow.NOTHING)

    class Recording(torch.overrides.TorchFunctionMode):  # type: ignore[misc]
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            result = func(*args, **(kwargs or {}))
            out = recorder.step(state(t) for t in _tensors([list(args), dict(kwargs or {})]))
            for t in _tensors(result):
                if id(t) not in owner:
                    states[id(t)] = out
                    alive.append(t)
            return result

    parameter = next(iter(model.parameters()), None)
    tensor = torch.as_tensor(np.ascontiguousarray(x))
    if parameter is not None:
        tensor = tensor.to(dtype=parameter.dtype, device=parameter.device)
    states[id(tensor)] = Flow.INPUT
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), Recording():
            model(tensor)
    except Exception as exc:  # running user code raises anything
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        notes.append(f"the model could not run to trace its data flow ({type(exc).__name__}: {first[:160]}): no graph")
        return None
    finally:
        for m, training in was:
            m.training = training
    notes.append("its data flow was traced from one forward pass" + ("" if example is not None else
                 " on a (1, C, 32, 32) input (example_input= sets it)"))
    return recorder.graph(conv for conv, _ in pairs)


def _geometry(conv: nn.Conv2d) -> dict[str, Any]:
    return {
        "stride": tuple(conv.stride),
        "padding": torch_padding_to_convbn(conv.padding),
        "dilation": tuple(conv.dilation),
        "groups": int(conv.groups),
    }


def find_pairs(model: nn.Module, example: np.ndarray | None = None) -> ModelPairs:
    """The model's Conv2d -> BatchNorm2d pairs, in forward order (or registration order)."""
    modules = dict(model.named_modules())
    layer = _convbn_layer()
    notes: list[str] = []
    graph: Graph | None = None
    fx_graph: Any = None
    try:
        pairs, fx_graph = _fx_pairs(model, modules, layer, notes)
        pairing = "torch.fx"
        graph = _data_flow(fx_graph, modules, pairs, layer)
    except Exception as exc:  # fx raises many types: TraceError, TypeError, NotImplementedError...
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        notes = [
            f"torch.fx could not trace the model ({type(exc).__name__}: {first[:160]}); paired each "
            "Conv2d with the BatchNorm registered right after it (module order)"
        ]
        pairs = _order_pairs(model, layer)
        pairing = "module order"
        graph = _eager_flow(model, modules, pairs, layer, example, notes)
    targets: list[Target] = []
    used: set[str] = set()
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        try:
            check_torch_pair(conv, bn)
        except (ConvBNError, TypeError) as exc:
            notes.append(f"{conv_name} + {bn_name} left as they are: {exc}")
            continue
        o, i, kh, kw = (int(d) for d in conv.weight.shape)
        owner: Any = modules.get(conv_name.rsplit(".", 1)[0]) if "." in conv_name else None
        geometry = _geometry(conv)
        if layer is not None and isinstance(owner, layer):
            # ConvBN2d pads itself (TF's SAME at any stride); its inner conv's padding may be 0.
            geometry["padding"] = getattr(owner, "padding")  # noqa: B009
        targets.append(Target(
            name=conv_name,
            bn_name=bn_name,
            kernel_shape=(kh, kw, i, o),
            bias=conv.bias is not None,
            gamma=bn.weight is not None,
            beta=bn.bias is not None,
            eps=float(bn.eps),
            momentum=None if bn.momentum is None else kept_from_torch(bn.momentum, bn_name),
            geometry=geometry,
            handle=(conv, bn),
        ))
        used.update((conv_name, bn_name))
    parts = [p for name, module in modules.items() if name not in used and (p := _part(name, module)) is not None]
    _link_norms(parts, modules, fx_graph if pairing == "torch.fx" else None)
    dense = [p for p in parts if p.kind == "dense"]
    if pairing == "torch.fx" and dense:
        # Shapes need a forward pass: only run it when a checkpoint leaves a flatten to the graph.
        done: list[bool] = []

        def resolve() -> None:
            if not done:
                done.append(True)
                _flat_sides(model, fx_graph, parts, modules, example, notes)

        for part in dense:
            part.options["resolve_flat"] = resolve
    used.update(p.name for p in parts)
    untouched = [
        name or "(root)"
        for name, module in modules.items()
        if name not in used
        and (any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)))
        and not (layer is not None and isinstance(module, layer))
    ]
    paired = {t.bn_name for t in targets}
    order = [name for name in modules if name in used and name not in paired]
    return ModelPairs(targets, pairing, notes, untouched, graph, parts, order)


def _part(name: str, module: nn.Module) -> Part | None:
    """``module`` as a layer load_into fills outside the pairs; None for another kind."""
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Conv2d):
        o, i, kh, kw = (int(d) for d in module.weight.shape)
        return Part(name, "conv", (kh, kw, i, o), bias, groups=int(module.groups), order="chw", handle=module)
    if isinstance(module, nn.ConvTranspose2d):
        i, o, kh, kw = (int(d) for d in module.weight.shape)
        return Part(name, "conv_transpose", (kh, kw, o, i), bias, groups=int(module.groups), order="chw",
                    handle=module)
    if isinstance(module, nn.Linear):
        o, i = (int(d) for d in module.weight.shape)
        return Part(name, "dense", (i, o), bias, order="chw", handle=module)
    gamma = getattr(module, "weight", None) is not None
    if isinstance(module, _NORMS) and module.running_mean is not None:
        return Part(name, "batch_norm", (int(module.num_features),), bias, gamma, eps=float(module.eps),
                    order="chw", handle=module)
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and (gamma or bias):
        return Part(name, "layer_norm", (int(module.normalized_shape[0]),), bias, gamma, eps=float(module.eps),
                    order="chw", handle=module)
    if isinstance(module, nn.GroupNorm) and (gamma or bias):
        return Part(name, "group_norm", (int(module.num_channels),), bias, gamma, groups=int(module.num_groups),
                    eps=float(module.eps), order="chw", handle=module)
    return None


_RESHAPES = {"flatten", "view", "reshape"}
#: Operations that reorder a map's axes: a flatten after one (or a reshape before one) is in no known order.
_REORDERS = {"permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "t"}
#: Reductions over the spatial axes: a Linear after one reads a vector.
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "adaptive_avg_pool2d", "adaptive_max_pool2d"}


def _name(node: Any) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")


def _reordered(node: Any, side: str) -> bool:
    """Whether an axis reorder comes right before (``side="in"``) or after a reshape node."""
    near = [a for a in node.args if isinstance(a, torch.fx.Node)][:1] if side == "in" else list(node.users)
    return any(n.op in ("call_method", "call_function") and _name(n) in _REORDERS | {"contiguous"} and (
        _name(n) != "contiguous" or _reordered(n, side)) for n in near)


def _is_reshape(node: Any, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), (nn.Flatten, nn.Unflatten))
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and target in _RESHAPES


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(int(d) for d in meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _flat_sides(model: nn.Module, fx_graph: Any, parts: list[Part], modules: dict[str, nn.Module],
                example: np.ndarray | None, notes: list[str]) -> None:
    """Set each dense part's :attr:`Part.flat` from the fx graph, its shapes propagated on the example
    (or, for a first layer called that is a Linear, a ``(1, in_features)`` input; a conv, ``(1, C, 32,
    32)``): a Linear reads a flattened map where
    a flatten/view/reshape of a rank-4 tensor (through shape-keeping operations) feeds it, and
    feeds one where its output is viewed as a rank-4 tensor."""
    from torch.fx.passes.shape_prop import ShapeProp

    if example is not None:
        x = np.moveaxis(example, -1, 1) if example.ndim == 4 else example
    else:  # the first layer called sizes the input: a Linear (1, in), a conv (1, C, 32, 32)
        called = (modules.get(str(n.target)) for n in fx_graph.nodes if n.op == "call_module")
        first = next((m for m in called if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))), None)
        if first is None:
            return
        x = np.zeros((1, int(first.in_features)) if isinstance(first, nn.Linear)
                     else (1, int(first.in_channels), 32, 32), np.float32)
    parameter = next(iter(model.parameters()), None)
    tensor = torch.as_tensor(np.ascontiguousarray(x))
    if parameter is not None:
        tensor = tensor.to(dtype=parameter.dtype, device=parameter.device)
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints a traceback
            ShapeProp(torch.fx.GraphModule(model, fx_graph)).propagate(tensor)
    except Exception as exc:  # running user code raises anything
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        notes.append(f"the model's shapes could not be propagated ({type(exc).__name__}: {first_line[:120]}): "
                     "whether a Linear reads a flattened feature map is left to the checkpoint (example_input= "
                     "gives the input)")
        return
    finally:
        for m, training in was:
            m.training = training
    calls: dict[str, list[Any]] = {}
    for node in fx_graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    for part in parts:
        nodes = calls.get(part.name, [])
        if part.kind != "dense" or len(nodes) != 1:
            continue
        part.flat = {}
        for side in ("in", "out"):
            node = nodes[0]
            for _ in range(64):
                near = [a for a in node.args if isinstance(a, torch.fx.Node)][:1] if side == "in" else list(node.users)
                if side == "out" and len(near) == 1 and near[0].op == "output":
                    part.flat[side] = None
                if len(near) != 1 or near[0].op in ("placeholder", "output"):
                    break
                node = near[0]
                before = _shape(next((a for a in node.args if isinstance(a, torch.fx.Node)), None))
                after = _shape(node)
                if before is None or after is None:
                    break
                if node.op in ("call_method", "call_function") and _name(node) in _REDUCTIONS and (
                        side == "in" and len(after) == 2):
                    part.flat[side] = None
                    break
                if _is_reshape(node, modules):
                    shape = before if side == "in" else after
                    decided, found = flat_map(shape, "chw")
                    if decided and not _reordered(node, side):  # after a reorder: in no order convbn knows
                        part.flat[side] = found
                    break
                owner = modules.get(str(node.target)) if node.op == "call_module" else None
                if isinstance(owner, nn.Linear):
                    part.flat[side] = None
                    break
                if before != after or (owner is not None and any(True for _ in owner.parameters())):
                    break


def _writer(bn: Any, parts: dict[str, Part], calls: dict[str, list[Any]]) -> str | None:
    """The conv or dense part whose output, and nothing else, a BatchNorm call reads, through
    crops (``y[:, :, :h, :w]``, which keep a per-channel bias per channel): a call of the part's
    module, or, for a module whose own forward fx traced through (a ``ConvTranspose2d`` subclass
    cropping its output), the one operation that reads the part's weight."""
    node = bn.args[0] if bn.args else None
    while isinstance(node, torch.fx.Node) and len(node.users) == 1 and node.op == "call_function" and (
            getattr(node.target, "__name__", "") == "getitem"):
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or len(node.users) != 1:
        return None
    kinds = ("conv", "conv_transpose", "dense")
    if node.op == "call_module":
        name = str(node.target)
        return name if name in parts and parts[name].kind in kinds and len(calls[name]) == 1 else None
    weights = [a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
    owners = {str(a.target).rpartition(".")[0] for a in weights if str(a.target).endswith(".weight")}
    if node.op != "call_function" or len(owners) != 1:
        return None
    (name,) = owners
    return name if name in parts and parts[name].kind in kinds and name not in calls and all(
        len(a.users) == 1 for a in weights) else None


def _link_norms(parts: list[Part], modules: dict[str, nn.Module], fx_graph: Any) -> None:
    """Set :attr:`Part.norm` where a BatchNorm part directly reads a conv's or dense part's output and
    nothing else does (in the fx graph; without one, the BatchNorm registered right after it)."""
    by_name = {p.name: p for p in parts}
    norms = {p.name for p in parts if p.kind == "batch_norm"}
    links: dict[str, str] = {}
    if fx_graph is not None:
        calls: dict[str, list[Any]] = {}
        for node in fx_graph.nodes:
            if node.op == "call_module":
                calls.setdefault(str(node.target), []).append(node)
        for bn in norms:
            if len(calls.get(bn, [])) == 1 and (name := _writer(calls[bn][0], by_name, calls)) is not None:
                links[name] = bn
    else:
        leaves = [n for n, m in modules.items() if not any(True for _ in m.children())]
        for a, b in itertools.pairwise(leaves):
            if a in by_name and b in norms and by_name[a].kind != "batch_norm":
                links[a] = b
    for name, bn in links.items():
        if by_name[bn].shape[0] == out_width(by_name[name]):
            by_name[name].norm = bn


def read(model: Any, found: ModelPairs) -> list[ConvBNParams]:
    """Each pair's values, as a live source model holds them."""
    out = []
    for t in found.targets:
        conv, bn = t.handle
        out.append(dataclasses.replace(from_torch(conv, bn), **(t.geometry or {})))
    return out


def _numpy(t: Any) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy().copy()


def _read_part(part: Part) -> Layer | Norm:
    m = part.handle
    if part.kind == "conv":
        return Layer("conv", conv_from_torch(m.weight.detach().cpu().numpy().copy()), _numpy(m.bias), stride=tuple(m.stride),
                     padding=torch_padding_to_convbn(m.padding), dilation=tuple(m.dilation), groups=int(m.groups),
                     geometry=True)
    if part.kind == "conv_transpose":
        return Layer("conv_transpose", transpose_from_torch(m.weight.detach().cpu().numpy().copy()), _numpy(m.bias), groups=int(m.groups))
    if part.kind == "dense":
        return Layer("dense", dense_from_torch(m.weight.detach().cpu().numpy().copy()), _numpy(m.bias))
    if part.kind == "batch_norm":
        return Norm("batch_norm", _numpy(m.weight), _numpy(m.bias), _numpy(m.running_mean), _numpy(m.running_var),
                    eps=float(m.eps), momentum=None if m.momentum is None else kept_from_torch(m.momentum, part.name),
                    var_update="unbiased")
    return Norm(part.kind, _numpy(m.weight), _numpy(m.bias), eps=float(m.eps),  # type: ignore[arg-type]
                groups=part.groups)


def read_parts(model: Any, found: ModelPairs) -> dict[str, Layer]:
    """Every other layer's values, as a live source model holds them (neutral layout)."""
    return parts_as_layers(found, _read_part)


def run(model: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    """The model's eval output on NHWC ``x`` (given as NCHW), every output NHWC where rank 4."""
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            parameter = next(iter(model.parameters()), None)
            tensor = torch.as_tensor(np.ascontiguousarray(np.moveaxis(x, -1, 1) if x.ndim == 4 else x))
            if parameter is not None:
                tensor = tensor.to(dtype=parameter.dtype, device=parameter.device)
            y = model(tensor)
    finally:
        for m, training in was:
            m.training = training
    return [np.moveaxis(a, 1, -1) if a.ndim == 4 else a for a in (v.detach().cpu().float().numpy() for v in _tensors(y))]


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a model's output (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def snapshot(model: nn.Module) -> Any:
    """Every tensor and BatchNorm setting :func:`apply` may change, copied, for :func:`restore`."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [(m, m.eps, getattr(m, "momentum", None)) for m in model.modules()
                   if isinstance(m, (*_NORMS, nn.LayerNorm, nn.GroupNorm))]


def restore(model: nn.Module, saved: Any) -> None:
    state, settings = saved
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(state[k])
    for m, eps, momentum in settings:
        m.eps = eps
        if isinstance(m, _NORMS):
            m.momentum = momentum


def apply(model: nn.Module, staged: list[Staged | StagedPart]) -> None:
    """Write every staged pair with ``assign_torch`` and every other layer in torch's layout;
    restore the whole model if any write fails."""
    saved = snapshot(model)
    try:
        for s in staged:
            if isinstance(s, StagedPart):
                _write_part(s)
                continue
            conv, bn = s.target.handle
            momentum = bn.momentum
            # The conv's own geometry (checked by matching already) and torch's variance update, so
            # that assign_torch's checks hold for ConvBN2d's inner modules as for plain ones.
            assign_torch(conv, bn, dataclasses.replace(s.params, **_geometry(conv), var_update="unbiased"))
            bn.momentum = momentum  # the model's, exactly (None stays None)
            tracked = s.extras.get("num_batches_tracked")
            if tracked is not None and bn.num_batches_tracked is not None:
                with torch.no_grad():
                    bn.num_batches_tracked.copy_(torch.as_tensor(tracked))
    except BaseException:
        restore(model, saved)
        raise


def _put(tensor: torch.Tensor | None, value: Any, where: str) -> None:
    """Copy ``value`` into ``tensor`` (same shape), in the tensor's dtype and device."""
    if tensor is None or value is None:
        return
    array = np.asarray(value)
    if tuple(array.shape) != tuple(tensor.shape):
        raise ConvBNError(f"{where} must keep its shape {tuple(tensor.shape)}. Received: shape {array.shape}")
    with torch.no_grad():
        tensor.copy_(torch.as_tensor(array.copy()).to(dtype=tensor.dtype, device=tensor.device))


def _write_part(s: StagedPart) -> None:
    m, name, kind = s.part.handle, s.part.name, s.part.kind
    if kind in ("conv", "conv_transpose", "dense"):
        to_torch = {"conv": conv_to_torch, "conv_transpose": transpose_to_torch, "dense": dense_to_torch}[kind]
        _put(m.weight, to_torch(np.asarray(s.kernel)), f"{name}.weight")
        _put(m.bias, s.bias, f"{name}.bias")
        return
    norm = s.norm
    assert norm is not None
    n = s.part.shape[0]
    _put(m.weight, np.ones(n) if norm.gamma is None else norm.gamma, f"{name}.weight")
    _put(m.bias, np.zeros(n) if norm.beta is None else norm.beta, f"{name}.bias")
    if kind == "batch_norm":
        _put(m.running_mean, norm.moving_mean, f"{name}.running_mean")
        _put(m.running_var, norm.moving_var, f"{name}.running_var")
        tracked = s.extras.get("num_batches_tracked")
        if tracked is not None:
            _put(m.num_batches_tracked, np.asarray(tracked).reshape(()), f"{name}.num_batches_tracked")
    if s.eps is not None:
        m.eps = s.eps
