"""What a TF1 ``.meta`` graph (a MetaGraphDef beside a checkpoint) says about its variables, read
without TensorFlow: the slim reader's graph half.

:func:`load_graph` gives, per kernel variable, the op it feeds (``Conv2D`` /
``DepthwiseConv2dNative``: a conv, with its stride, padding and dilation; ``Conv2DBackpropInput``: a
transposed conv; ``MatMul``: a dense layer), the BatchNorm scope that consumes that op's output, each
fused BatchNorm's epsilon and which BatchNorms are not fused, the variables' graph order, and for a
dense layer the feature map its input is a flattening of and the one its output is reshaped into
(from the ``Reshape`` ops and the ``_output_shapes`` the Saver records); "undecided" where the graph
does not say. A ``.meta`` that belongs to another checkpoint (a variable of another shape) is ignored
with a note; one that does not decode is refused naming the file.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convbn.checkpoint import FeatureMap
from convbn.errors import ConvBNError
from convbn.formats import _tfproto
from convbn.layouts import FlatOrder

__all__ = ["Graph", "declared_shapes", "first_line", "load_graph", "meta_path", "read_meta", "shape_conflict"]

# Ops a conv's output or a variable's value passes through unchanged for pairing purposes.
_VALUE_OPS = frozenset({"Identity", "ReadVariableOp", "Enter", "Switch", "RefSwitch", "RefEnter", "Cast"})
_FLOW_OPS = frozenset(
    {"Identity", "IdentityN", "BiasAdd", "Reshape", "Switch", "Merge", "Enter", "Cast", "RefSwitch",
     "BatchToSpaceND"}
)
_CONV_OPS = frozenset({"Conv2D", "DepthwiseConv2dNative"})
# Ops whose filter or weight input (input 1) makes a variable a transposed-conv or dense kernel.
_LAYER_OPS = {"Conv2DBackpropInput": "conv_transpose", "MatMul": "dense"}
# Ops a flattened vector passes through unchanged in layout (activations, dropout, casts): a dense
# layer's input is traced back through them to the Reshape that flattened it, if any.
_ELEMENTWISE_OPS = frozenset(
    {"Identity", "Relu", "Relu6", "LeakyRelu", "Elu", "Selu", "Sigmoid", "Tanh", "Softplus", "Mul", "RealDiv",
     "Maximum", "Minimum", "Add", "AddV2", "Sub", "BiasAdd", "Cast", "Floor", "Neg", "StopGradient"}
)
_FUSED_BN_OPS = frozenset({"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"})
_VARIABLE_OPS = frozenset({"VariableV2", "VarHandleOp", "Variable"})


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@dataclasses.dataclass
class Graph:
    """What a ``.meta`` MetaGraphDef says about the checkpoint's variables."""

    order: dict[str, int]
    geometry: dict[str, dict[str, Any]]  # kernel variable -> stride/padding/dilation of its first conv op
    not_conv: set[str]  # rank-4 variables the graph uses, but not as a conv's filter
    bn_of: dict[str, str]  # kernel variable -> the BatchNorm scope consuming the conv's output
    bn_eps: dict[str, float]  # BatchNorm scope -> epsilon of its fused op
    bn_unfused: set[str]  # BatchNorm scopes whose ops include no fused op
    # kernel variable -> "conv_transpose" or "dense" (the op it feeds); Conv2D kernels are in geometry
    kinds: dict[str, str] = dataclasses.field(default_factory=dict)
    # dense kernel -> the map its input is a flattening of (None: a vector), or "undecided"
    flat_in: dict[str, FeatureMap | str | None] = dataclasses.field(default_factory=dict)
    # dense kernel -> the map its output is reshaped into (None: it is not), or "undecided"
    flat_out: dict[str, FeatureMap | str | None] = dataclasses.field(default_factory=dict)


def meta_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".meta")


def read_meta(meta: Path) -> Any:
    """The MetaGraphDef in ``meta``; raises ValueError naming why it cannot be read."""
    try:
        proto = _tfproto.parse_meta_graph(meta.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"not a readable MetaGraphDef ({first_line(exc)})") from None
    return proto


def declared_shapes(proto: Any) -> dict[str, tuple[int, ...] | None]:
    """Variable name -> the shape its graph node declares (-1 for an unknown dimension; None for
    an unknown rank)."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    for node in proto.graph_def.node:
        if node.op in _VARIABLE_OPS and "shape" in node.attr:
            shape = node.attr["shape"].shape
            shapes[node.name] = None if shape.unknown_rank else tuple(int(d.size) for d in shape.dim)
    return shapes


def shape_conflict(
    declared: Mapping[str, tuple[int, ...] | None], shapes: Iterable[tuple[str, tuple[int, ...]]]
) -> str | None:
    """The first variable whose graph shape contradicts ``shapes`` (name, shape), described."""
    for name, shape in shapes:
        graph_shape = declared.get(name)
        if graph_shape is None:
            continue
        if len(graph_shape) != len(shape) or any(g >= 0 and g != d for g, d in zip(graph_shape, shape, strict=False)):
            return f"its variable {name!r} has shape {list(graph_shape)}, the checkpoint's {list(shape)}"
    return None


def load_graph(
    prefix: Path, variables: Mapping[str, Any], bn_scopes: Iterable[str], notes: list[str]
) -> Graph | None:
    meta = meta_path(prefix)
    if not meta.is_file():
        return None
    try:
        proto = read_meta(meta)
    except ValueError as exc:
        notes.append(f"ignored {meta}: {exc}")
        return None
    nodes = {n.name: n for n in proto.graph_def.node}
    if not any(name in nodes for name in variables):
        notes.append(f"ignored {meta}: it describes none of the checkpoint's variables")
        return None
    # A .meta left from another checkpoint at this prefix must not lend it its order, pairs,
    # geometry or eps.
    declared = declared_shapes(proto)  # in graph order: the first variable declared is reported
    conflict = shape_conflict(declared, ((name, variables[name].shape) for name in declared if name in variables))
    if conflict is not None:
        notes.append(f"ignored {meta}: it belongs to another checkpoint: {conflict}")
        return None
    functions = {f.signature.name: f for f in proto.graph_def.library.function}
    try:
        return _analyse_graph(list(proto.graph_def.node), nodes, functions, variables, set(bn_scopes))
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, RecursionError) as exc:
        raise ConvBNError(
            f"a .meta graph next to the checkpoint must be well-formed (remove it to read the checkpoint "
            f"without it): {first_line(exc)}. Received: file={meta}"
        ) from None


def _analyse_graph(
    node_list: list[Any],
    nodes: dict[str, Any],
    functions: Mapping[str, Any],
    variables: Mapping[str, Any],
    bn_scopes: set[str],
) -> Graph:
    def data_inputs(node: Any) -> list[str]:
        return [i.split(":")[0].lstrip("^") for i in node.input if not i.startswith("^")]

    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    for node in node_list:
        for src in data_inputs(node):
            consumers[src].append(node)

    order: dict[str, int] = {}
    for node in node_list:
        if node.name in variables and node.name not in order and node.op in _VARIABLE_OPS:
            order[node.name] = len(order)

    var_cache: dict[str, str | None] = {}

    def variable_of(name: str, depth: int = 0) -> str | None:
        """The variable whose value ``name``'s output is (through reads and identities)."""
        if name in var_cache:
            return var_cache[name]
        node = nodes.get(name)
        result: str | None = None
        if node is not None:
            if node.op in _VARIABLE_OPS:
                result = name
            elif node.op in _VALUE_OPS and depth < 8:
                inputs = data_inputs(node)
                result = variable_of(inputs[0], depth + 1) if inputs else None
        var_cache[name] = result
        return result

    suffixed = re.compile(r"(.*)_\d+")

    def bn_scope_of(node: Any) -> str | None:
        """The BatchNorm scope ``node`` belongs to: it reads its variables, or lives in its name scope."""
        for src in data_inputs(node):
            var = variable_of(src)
            if var is not None and var.rpartition("/")[0] in bn_scopes:
                return var.rpartition("/")[0]
        parts = node.name.split("/")[:-1]
        weak = None
        for i in range(len(parts), 0, -1):
            scope = "/".join(parts[:i])
            if scope in bn_scopes:
                return scope
            match = suffixed.fullmatch(parts[i - 1])  # a reused scope, e.g. 'd_bn1_1' for 'd_bn1'
            if weak is None and match:
                alt = "/".join([*parts[: i - 1], match.group(1)])
                if alt in bn_scopes:
                    weak = alt
        return weak

    conv_op: dict[str, dict[str, Any]] = {}
    not_conv: set[str] = set()
    bn_of: dict[str, str] = {}
    kinds: dict[str, str] = {}
    flat_in: dict[str, FeatureMap | str | None] = {}
    flat_out: dict[str, FeatureMap | str | None] = {}
    claimed: collections.Counter[str] = collections.Counter()
    for node in node_list:
        kind = "conv" if node.op in _CONV_OPS else _LAYER_OPS.get(node.op)
        if kind is None or node.name.split("/")[0].startswith("gradients"):
            continue
        if kind == "dense" and (node.attr["transpose_a"].b or node.attr["transpose_b"].b):
            continue  # an (out, in) weight: not a dense kernel in the neutral layout
        inputs = data_inputs(node)
        kernel = variable_of(inputs[1]) if len(inputs) > 1 else None
        if kernel is None or kernel in conv_op or kernel in kinds:
            continue
        try:
            if kind == "dense":
                kinds[kernel] = kind
                rows = variables[kernel].shape[0] if kernel in variables else -1
                cols = variables[kernel].shape[-1] if kernel in variables else -1
                flat_in[kernel] = _flattened_input(inputs[0], nodes, data_inputs, rows)
                flat_out[kernel] = _reshaped_output(node, consumers, nodes, cols)
            else:
                conv_op[kernel] = _geometry(node, nodes)
                if kind == "conv_transpose":
                    kinds[kernel] = kind
        except (ValueError, TypeError, IndexError) as exc:
            raise ValueError(f"node {node.name!r}: {first_line(exc)}") from None
        found: set[str] = set()
        stack, seen = [node.name], {node.name}
        while stack:
            for consumer in consumers.get(stack.pop(), ()):
                if consumer.name in seen or consumer.name.split("/")[0].startswith("gradients"):
                    continue
                seen.add(consumer.name)
                scope = bn_scope_of(consumer)
                if scope is not None:
                    found.add(scope)
                elif (consumer.op in _FLOW_OPS and not (kind == "dense" and consumer.op == "Reshape")) or (
                    consumer.op in ("Add", "AddV2") and consumer.name.startswith(kernel.rpartition("/")[0] + "/")
                ):
                    # A Reshape after a dense layer makes a feature map of its output: a BatchNorm
                    # there normalizes channels, not the dense layer's features.
                    stack.append(consumer.name)
        if len(found) == 1:
            bn_of[kernel] = found.pop()
            claimed[bn_of[kernel]] += 1
    for name, var in variables.items():
        if len(var.shape) == 4 and name in nodes and (name not in conv_op or name in kinds):
            not_conv.add(name)
    # A BatchNorm that several convs feed is no conv+BN pair.
    bn_of = {k: s for k, s in bn_of.items() if claimed[s] == 1}

    bn_eps: dict[str, float] = {}
    bn_ops: dict[str, set[str]] = collections.defaultdict(set)
    for node in node_list:
        if node.name.split("/")[0].startswith("gradients"):
            continue
        scope = bn_scope_of(node)
        if scope is None:
            continue
        # A BatchNorm under a tensor-valued is_training is a cond: with control flow v2 its ops
        # live in the branch functions of an If node.
        inner = [node]
        if node.op in ("If", "StatelessIf"):
            for branch in ("then_branch", "else_branch"):
                function = functions.get(node.attr[branch].func.name)
                inner.extend(function.node_def if function is not None else ())
        for op in inner:
            bn_ops[scope].add(op.op)
            if op.op in _FUSED_BN_OPS and scope not in bn_eps:
                # Stored as float32: the shortest decimal that rounds to it (1e-05, not 9.99e-06).
                bn_eps[scope] = float(str(np.float32(op.attr["epsilon"].f)))
    unfused = {s for s, ops in bn_ops.items() if ops and not ops & _FUSED_BN_OPS and "Rsqrt" in ops}
    return Graph(order, conv_op, not_conv, bn_of, bn_eps, unfused, kinds, flat_in, flat_out)


def _output_shape(name: str, nodes: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The shape the graph records for tensor ``name`` (``node:i``) in ``_output_shapes`` (what
    ``Saver`` exports); None when it records none or an unknown rank; -1 for an unknown dimension."""
    node_name, _, index = name.lstrip("^").partition(":")
    node = nodes.get(node_name)
    if node is None:
        return None
    shapes = node.attr["_output_shapes"].list.shape
    i = int(index) if index.isdigit() else 0
    if i >= len(shapes) or shapes[i].unknown_rank:
        return None
    return tuple(int(d.size) for d in shapes[i].dim)


def _map_order(name: str, nodes: Mapping[str, Any], data_inputs: Any) -> FlatOrder:
    """``"chw"`` when the nearest op upstream of ``name`` that states a data_format states NCHW."""
    seen = 0
    node = nodes.get(name.split(":")[0])
    while node is not None and seen < 32:
        fmt = node.attr["data_format"].s
        if fmt:
            return "chw" if fmt == b"NCHW" else "hwc"
        inputs = data_inputs(node)
        node = nodes.get(inputs[0]) if inputs else None
        seen += 1
    return "hwc"


def _as_map(shape: tuple[int, ...] | None, order: FlatOrder, features: int) -> FeatureMap | str:
    """A 4-D feature map shape (batch first, in ``order``) as the FeatureMap of ``features`` flattened
    features; "undecided" when the shape is unknown or does not account for them."""
    if shape is None or len(shape) != 4 or min(shape[1:]) <= 0:
        return "undecided"
    h, w, c = shape[1:] if order == "hwc" else (shape[2], shape[3], shape[1])
    if h * w * c != features:
        return "undecided"
    return FeatureMap(h, w, c, order)


def _flattened_input(name: str, nodes: Mapping[str, Any], data_inputs: Any, rows: int) -> FeatureMap | str | None:
    """The map a MatMul's input ``name`` is a flattening of: traced back through elementwise ops to a
    Reshape of a 4-D tensor. None when it reaches anything else (the input is a vector)."""
    node = nodes.get(name.split(":")[0])
    for _ in range(32):
        if node is None:
            return None
        if node.op == "Reshape":
            inputs = data_inputs(node)
            shape = _output_shape(node.input[0], nodes) if inputs else None
            if shape is not None and len(shape) == 2:
                return None  # a reshape of a vector: still a vector
            return _as_map(shape, _map_order(inputs[0], nodes, data_inputs) if inputs else "hwc", rows)
        if node.op not in _ELEMENTWISE_OPS:
            return None
        inputs = data_inputs(node)
        node = nodes.get(inputs[0]) if inputs else None
    return "undecided"


def _reshaped_output(
    matmul: Any, consumers: Mapping[str, list[Any]], nodes: Mapping[str, Any], cols: int
) -> FeatureMap | str | None:
    """The map a MatMul's output is reshaped into, through its bias add and elementwise ops; None
    when it reaches no Reshape."""
    stack, seen = [matmul.name], {matmul.name}
    found: list[FeatureMap | str] = []
    while stack:
        for consumer in consumers.get(stack.pop(), ()):
            if consumer.name in seen or consumer.name.split("/")[0].startswith("gradients"):
                continue
            seen.add(consumer.name)
            if consumer.op == "Reshape":
                shape = _output_shape(consumer.name, nodes)
                if shape is not None and len(shape) == 2:
                    continue
                order: FlatOrder = "hwc"
                if any(c.attr["data_format"].s == b"NCHW" for c in consumers.get(consumer.name, ())):
                    order = "chw"
                found.append(_as_map(shape, order, cols))
            elif consumer.op in _ELEMENTWISE_OPS and len(seen) < 64:
                stack.append(consumer.name)
    if not found:
        return None
    return found[0] if all(f == found[0] for f in found) else "undecided"


def _geometry(node: Any, nodes: Mapping[str, Any]) -> dict[str, Any]:
    """stride, padding and dilation of a Conv2D / DepthwiseConv2dNative node.

    An atrous conv that TF built as SpaceToBatchND -> Conv2D(VALID) -> BatchToSpaceND gets its
    dilation from the block shape and its padding from the space-to-batch paddings.
    """

    def ints(key: str, count: int, default: int) -> list[int]:
        values = list(node.attr[key].list.i) or [default] * count
        if len(values) != count:
            raise ValueError(f"{key} must have {count} values. Received: {values[:8]}")
        return values

    fmt = node.attr["data_format"].s.decode("ascii", "replace") or "NHWC"
    if fmt not in ("NHWC", "NCHW"):
        raise ValueError(f"data_format must be 'NHWC' or 'NCHW'. Received: {fmt!r}")
    h, w = (1, 2) if fmt == "NHWC" else (2, 3)
    strides, dilations = ints("strides", 4, 1), ints("dilations", 4, 1)
    padding: Any = node.attr["padding"].s.decode("ascii", "replace") or "SAME"
    if padding == "EXPLICIT":
        p = ints("explicit_paddings", 8, 0)
        padding = ((p[2 * h], p[2 * h + 1]), (p[2 * w], p[2 * w + 1]))
    geometry = {"stride": (strides[h], strides[w]), "dilation": (dilations[h], dilations[w]), "padding": padding}

    def const(name: str) -> np.ndarray | None:
        """A small Const's value (a block shape or paddings: at most 8 values, so a declared
        shape of 2**40 is not expanded into memory)."""
        source = nodes.get(name.split(":")[0])
        if source is None or source.op != "Const":
            return None
        tensor = source.attr["value"].tensor
        dims = [d.size for d in tensor.tensor_shape.dim]
        if len(dims) > 2 or any(d < 0 for d in dims) or math.prod(dims) > 8:
            return None
        return _tfproto.tensor_value(tensor, max_elements=8)

    s2b = nodes.get(node.input[0].split(":")[0]) if node.input else None
    if s2b is None or s2b.op != "SpaceToBatchND" or len(s2b.input) < 3:
        return geometry
    block = const(s2b.input[1])
    if block is None or block.shape != (2,):
        return geometry
    geometry["dilation"] = (int(block[0]), int(block[1]))
    base = const(s2b.name.rpartition("/")[0] + "/required_space_to_batch_paddings/base_paddings")
    if base is None:
        return {k: v for k, v in geometry.items() if k != "padding"}
    pads = tuple((int(a), int(b)) for a, b in base)
    geometry["padding"] = "VALID" if not any(a or b for a, b in pads) else pads
    return geometry
