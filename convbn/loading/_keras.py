""":func:`convbn.load_into` for Keras 3 and tf_keras (Keras 2) models: pairs from the layer
graph, else layer order.

Loaded only once the model is known to be a Keras layer, so importing Keras here is free. A
tf_keras model (transformers' TF models are ones) is walked the same way, with tf_keras's own
classes. Every pair is written by :func:`convbn.adapters.assign_keras`, which takes both Kerases;
each BatchNorm keeps its own moving-variance update (:func:`convbn.adapters.keras_var_update`:
biased in Keras 3, unbiased on tf_keras's default fused path).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import keras
import numpy as np

from convbn.adapters import assign_keras, check_keras_pair, from_keras, keras_var_update
from convbn.checkpoint import Layer, Norm
from convbn.errors import ConvBNError
from convbn.layouts import depthwise_from_tf, depthwise_to_tf
from convbn.loading import ModelPairs, Part, Staged, StagedPart, Target, flat_map, out_width, parts_as_layers
from convbn.loading.matching import INPUT, Flow, Graph, State
from convbn.params import ConvBNParams

__all__ = ["apply", "find_pairs", "read", "read_parts", "restore", "run", "snapshot"]


def _namespaces() -> list[Any]:
    """Keras 3, and tf_keras where it is imported (a tf_keras model cannot exist otherwise)."""
    spaces: list[Any] = [keras]
    return spaces + ([sys.modules["tf_keras"]] if "tf_keras" in sys.modules else [])


def _classes(*names: str) -> tuple[Any, ...]:
    """The layer classes of these names in each Keras that is loaded."""
    return tuple(getattr(ns.layers, name) for ns in _namespaces() for name in names)


def _classes_of(name: str) -> tuple[Any, ...]:
    return tuple(getattr(ns, name) for ns in _namespaces())


def _is_tf_keras(layer: Any) -> bool:
    tf_keras = sys.modules.get("tf_keras")
    return tf_keras is not None and isinstance(layer, tf_keras.layers.Layer)


def _children(layer: Any) -> list[Any]:
    if isinstance(layer, _classes_of("Model")):
        return list(layer.layers)  # graph order for functional models, tracking order otherwise
    return list(layer._flatten_layers(include_self=False, recursive=False))


def _layers(model: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every layer holding no sublayers, nested models and layers flattened, in the model's order
    (graph order for functional models), named by its path (``inner_model/conv``) where nested."""
    out: list[tuple[str, Any]] = []
    for layer in _children(model):
        name = f"{prefix}{layer.name}"
        if _children(layer):
            out += _layers(layer, f"{name}/")
        else:
            out.append((name, layer))
    return out


def _producer(layer: Any) -> tuple[Any, bool] | None:
    """The layer feeding ``layer`` in the graph, and whether ``layer`` is its only consumer; None
    when ``layer`` has no single graph input (subclassed models have no graph)."""
    nodes = getattr(layer, "_inbound_nodes", [])
    if len(nodes) != 1 or len(nodes[0].parent_nodes) != 1:
        return None
    node = nodes[0].parent_nodes[0]
    parent = node.layer if _is_tf_keras(layer) else node.operation
    return parent, len(getattr(parent, "_outbound_nodes", [])) == 1


def _kernel(conv: Any) -> Any:
    """The conv's kernel variable: tf_keras names a depthwise one ``depthwise_kernel``."""
    return conv.depthwise_kernel if _is_tf_keras(conv) and _depthwise(conv) else conv.kernel


def _depthwise(conv: Any) -> bool:
    return isinstance(conv, _classes("DepthwiseConv2D"))


def _is_conv(layer: Any) -> bool:
    """A Conv2D or DepthwiseConv2D; tf_keras's Conv2DTranspose subclasses its Conv2D but is none."""
    return isinstance(layer, _classes("Conv2D", "DepthwiseConv2D")) and not isinstance(layer, _classes("Conv2DTranspose"))


def _hwio_shape(conv: Any) -> tuple[int, int, int, int]:
    """The kernel's shape as convbn holds it: a depthwise (kH, kW, C, m) is the grouped (kH, kW, 1, C*m)."""
    kh, kw, c, m = (int(d) for d in _kernel(conv).shape)
    return (kh, kw, 1, c * m) if _depthwise(conv) else (kh, kw, c, m)


def _geometry(conv: Any) -> dict[str, Any]:
    c = int(_kernel(conv).shape[2])
    depthwise = _depthwise(conv)
    return {
        "stride": tuple(conv.strides),
        "padding": str(conv.padding).upper(),
        "dilation": tuple(conv.dilation_rate),
        "groups": c if depthwise else int(conv.groups),
    }


def find_pairs(model: Any, example: np.ndarray | None = None) -> ModelPairs:
    """The model's Conv2D -> BatchNormalization pairs, in graph order."""
    if not model.built:
        raise ConvBNError(
            "the Keras model must be built so that its layers have weights: call it once or "
            f"model.build(input_shape). Received: model {model.name!r} unbuilt"
        )
    layers = _layers(model) if _children(model) else [(model.name, model)]
    name_of = {id(layer): name for name, layer in layers}
    notes: list[str] = []
    pairs: list[tuple[str, str, Any, Any]] = []
    kinds: set[str] = set()
    previous: tuple[str, Any] | None = None
    bns = _classes("BatchNormalization")
    for name, layer in layers:
        if isinstance(layer, bns):
            producer = _producer(layer)
            if producer is not None:
                parent, only = producer
                if _is_conv(parent) and id(parent) in name_of:
                    if only:
                        pairs.append((name_of[id(parent)], name, parent, layer))
                        kinds.add("layer graph")
                    else:
                        notes.append(f"{name_of[id(parent)]}: its output feeds more than {name}; not a pair")
            elif previous is not None and _is_conv(previous[1]) and not _producer(previous[1]):
                pairs.append((previous[0], name, previous[1], layer))
                kinds.add("layer order")
        previous = (name, layer)
    pairs.sort(key=lambda p: [n for n, _ in layers].index(p[0]))
    targets: list[Target] = []
    used: set[int] = set()
    for conv_name, bn_name, conv, bn in pairs:
        try:
            check_keras_pair(conv, bn, tf_keras=True)
        except (ConvBNError, TypeError) as exc:
            notes.append(f"{conv_name} + {bn_name} left as they are: {exc}")
            continue
        targets.append(Target(
            name=conv_name,
            bn_name=bn_name,
            kernel_shape=_hwio_shape(conv),
            bias=bool(conv.use_bias),
            gamma=bool(bn.scale),
            beta=bool(bn.center),
            eps=float(bn.epsilon),
            momentum=float(bn.momentum),
            geometry=_geometry(conv),
            handle=(conv, bn),
        ))
        used.update((id(conv), id(bn)))
    parts = [p for name, layer in layers if id(layer) not in used and (p := _part(name, layer)) is not None]
    _link_norms(parts, layers)
    for part in parts:
        if part.kind == "dense":
            part.flat = _flat_sides(part.handle)
    used.update(id(p.handle) for p in parts)
    untouched = [name for name, layer in layers if id(layer) not in used and layer.weights]
    pairing = " and ".join(sorted(kinds, reverse=True)) or "layer graph"
    graph = _data_flow(model, layers, targets)
    if graph is None:
        graph = _traced_flow(model, layers, targets, example, notes)
    paired = {t.bn_name for t in targets}
    order = [name for name, layer in layers if id(layer) in used and name not in paired]
    return ModelPairs(targets, pairing, notes, untouched, graph, parts, order)


def _last_axis(layer: Any) -> bool:
    """Whether a norm layer normalizes over the last axis only (the channels of NHWC, a dense output)."""
    axis = layer.axis
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    try:
        rank: int | None = len(layer.input.shape)
    except (AttributeError, ValueError, RuntimeError):  # never called, or called on several inputs
        rank = None
    return len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def _part(name: str, layer: Any) -> Part | None:
    """``layer`` as a layer load_into fills outside the pairs; None for another kind."""
    bias = bool(getattr(layer, "use_bias", False))
    if _is_conv(layer):
        return Part(name, "conv", _hwio_shape(layer), bias, groups=_geometry(layer)["groups"], handle=layer)
    if isinstance(layer, _classes("Conv2DTranspose")):
        return Part(name, "conv_transpose", tuple(int(d) for d in layer.kernel.shape), bias,
                    groups=int(getattr(layer, "groups", 1)), handle=layer)
    if isinstance(layer, _classes("Dense")) and len(layer.kernel.shape) == 2:
        return Part(name, "dense", tuple(int(d) for d in layer.kernel.shape), bias, handle=layer)
    norms = (("batch_norm", "BatchNormalization"), ("layer_norm", "LayerNormalization"),
             ("group_norm", "GroupNormalization"))
    for kind, cls in norms:
        if isinstance(layer, _classes(cls)) and layer.weights and _last_axis(layer) and not getattr(
                layer, "rms_scaling", False):
            width = int(layer.weights[0].shape[-1])
            return Part(name, kind, (width,), bool(layer.center), bool(layer.scale), eps=float(layer.epsilon),
                        groups=int(layer.groups) if kind == "group_norm" else None, handle=layer)
    return None


def _neighbours(layer: Any, side: str) -> list[Any] | None:
    """The layers feeding (``side="in"``) or reading (``"out"``) ``layer`` in the graph; None without one."""
    nodes = getattr(layer, "_inbound_nodes" if side == "in" else "_outbound_nodes", None)
    if nodes is None or (side == "in" and not nodes):
        return None
    if side == "in":
        return [p.layer if _is_tf_keras(layer) else p.operation for node in nodes for p in node.parent_nodes]
    return [n.layer if _is_tf_keras(layer) else n.operation for n in nodes]


def _shape(layer: Any, side: str) -> tuple[Any, ...] | None:
    try:
        return tuple((layer.input if side == "in" else layer.output).shape)
    except (AttributeError, ValueError, RuntimeError):  # never called, or called more than once
        return None


def _flat_sides(dense: Any) -> dict[str, tuple[int, int, int] | None]:
    """What the layer graph says of a Dense layer's input and output (:attr:`Part.flat`): the
    ``(height, width, channels)`` map a ``Flatten``/``Reshape`` turned into its input, or reshapes its
    output into; None for a vector. Layers that keep the shape (activations, dropout) are passed
    through; a side reached through anything else is left undecided."""
    out: dict[str, tuple[int, int, int] | None] = {}
    if not getattr(dense, "_inbound_nodes", None):
        return out  # called eagerly (a subclassed model): no graph says anything
    reshapes = _classes("Flatten", "Reshape")
    vectors = _classes("Dense", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "InputLayer")
    for side in ("in", "out"):
        layer = dense
        for _ in range(64):
            near = _neighbours(layer, side)
            if near == [] and side == "out":
                out[side] = None  # a model output: nothing reshapes it
            if near is None or len(near) != 1:
                break
            layer = near[0]
            if isinstance(layer, vectors):
                shape = _shape(layer, "out" if side == "in" else "in")
                if shape is not None and len(shape) == 2:
                    out[side] = None
                break
            before, after = _shape(layer, "in"), _shape(layer, "out")
            if before is None or after is None:
                break
            if isinstance(layer, reshapes):
                decided, found = flat_map(before if side == "in" else after, "hwc")
                if decided:
                    out[side] = found
                break
            if before != after or layer.weights:
                break
    return out


def _link_norms(parts: list[Part], layers: list[tuple[str, Any]]) -> None:
    """Set :attr:`Part.norm` where a BatchNormalization part reads a conv's or dense part's output
    directly and is its only consumer (the layer graph; without one, the layer listed right after it)."""
    by_id = {id(p.handle): p for p in parts}
    previous: Any = None
    for _, layer in layers:
        part = by_id.get(id(layer))
        if part is not None and part.kind == "batch_norm":
            producer = _producer(layer)
            parent = producer[0] if producer is not None and producer[1] else None
            if producer is None and previous is not None and _producer(previous) is None:
                parent = previous
            before = by_id.get(id(parent))
            if before is not None and before.kind in ("conv", "conv_transpose", "dense") and (
                    out_width(before) == part.shape[0]):
                before.norm = part.name
        previous = layer


def _parents(layer: Any) -> list[Any] | None:
    """The layers feeding ``layer`` in the graph, over all its calls; None without graph nodes."""
    nodes = getattr(layer, "_inbound_nodes", None)
    if not nodes:
        return None
    return [p.layer if _is_tf_keras(layer) else p.operation for node in nodes for p in node.parent_nodes]


def _data_flow(model: Any, layers: list[tuple[str, Any]], targets: list[Target]) -> Graph | None:
    """Which weighted layers feed which, through weightless ones, from a functional model's graph;
    None for a subclassed model or one with nested models (their inner graphs are not followed)."""
    if any(name != layer.name for name, layer in layers) or not layers:
        return None
    inputs = _classes("InputLayer")
    unit = {id(bn): t.name for t in targets for bn in t.handle[1:]}
    unit.update({id(t.handle[0]): t.name for t in targets})
    producers: dict[str, set[str]] = {}
    tags: dict[int, frozenset[str]] = {}

    def flow(layer: Any, depth: int = 0) -> frozenset[str]:
        if id(layer) in tags:
            return tags[id(layer)]
        if isinstance(layer, inputs):
            tags[id(layer)] = frozenset({INPUT})
            return tags[id(layer)]
        parents = _parents(layer)
        if parents is None or depth > 10_000:
            raise LookupError(layer.name)
        feeding = frozenset().union(*(flow(p, depth + 1) for p in parents)) if parents else frozenset()
        owner = unit.get(id(layer)) or (layer.name if layer.weights else None)
        if owner is not None:
            if feeding != {owner}:
                producers.setdefault(owner, set()).update(feeding - {owner})
            feeding = frozenset({owner})
        tags[id(layer)] = feeding
        return feeding

    try:
        for _, layer in layers:
            flow(layer)
    except (LookupError, RecursionError):
        return None
    return Graph.of(producers, (t.name for t in targets))


def _input_spec(model: Any, example: np.ndarray | None) -> tuple[Any, str | None]:
    """The input to trace the model with (the example's shape, else the one Keras saved at the first
    call), and the keyword it goes under for a model called with a dict (transformers' TF models)."""
    import tensorflow as tf

    spec = model._get_save_spec() if hasattr(model, "_get_save_spec") else None  # Keras's first-call record
    key = None
    if isinstance(spec, dict) and len(spec) == 1:
        key, spec = next(iter(spec.items()))
    elif isinstance(spec, (list, tuple)) and len(spec) == 1:
        spec = spec[0]
    if example is not None:
        return tf.TensorSpec((None, *example.shape[1:]), tf.float32), key
    return (spec if isinstance(spec, tf.TensorSpec) else None), key


def _traced_flow(
    model: Any, layers: list[tuple[str, Any]], targets: list[Target], example: np.ndarray | None, notes: list[str]
) -> Graph | None:
    """The data flow of a model without a layer graph (a subclassed one), from the TensorFlow graph of
    its call: an operation reading a layer's variable and data computed from the input belongs to that
    layer. None where the model does not trace (another Keras backend, no known input)."""
    if not _is_tf_keras(model) and keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    spec, key = _input_spec(model, example)
    if spec is None:
        notes.append("the model has no layer graph and no recorded input to trace it with: example_input= gives one")
        return None
    unit = {id(layer): t.name for t in targets for layer in t.handle}
    owner_of: dict[int, str] = {}
    for name, layer in layers:
        for w in layer.weights:
            variable = w if _is_tf_keras(layer) else w.value
            owner_of[id(variable.handle)] = unit.get(id(layer), name)
    try:
        call = (lambda x: model(x, training=False)) if key is None else (lambda x: model({key: x}, training=False))
        concrete = tf.function(call).get_concrete_function(spec)
    except Exception as exc:  # tracing user code raises anything
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        notes.append(f"the model's call could not be traced ({type(exc).__name__}: {first[:160]}): no graph")
        return None
    graph = concrete.graph
    recorder = Flow()
    states: dict[str, State] = {}
    for external, internal in graph.captures:
        owner = owner_of.get(id(external))
        if owner is not None:
            states[internal.name] = Flow.parameter(owner)
    for tensor in graph.inputs[: len(graph.inputs) - len(graph.captures)]:
        states[tensor.name] = Flow.INPUT
    for op in graph.get_operations():
        out = recorder.step(states.get(t.name, Flow.NOTHING) for t in op.inputs)
        for t in op.outputs:
            states.setdefault(t.name, out)
    notes.append("its data flow was traced from the TensorFlow graph of its call (a subclassed model has no layer "
                 "graph, and a nested one's does not reach into the inner models)")
    return recorder.graph(t.name for t in targets)


def read(model: Any, found: ModelPairs) -> list[ConvBNParams]:
    """Each pair's values, as a live source model (Keras 3 or tf_keras) holds them."""
    out = []
    for t in found.targets:
        conv, bn = t.handle
        if not _is_tf_keras(conv):
            out.append(dataclasses.replace(from_keras(conv, bn), **(t.geometry or {})))
            continue
        kernel = np.array(_kernel(conv).numpy())
        out.append(ConvBNParams(
            kernel=depthwise_from_tf(kernel) if _depthwise(conv) else kernel,
            bias=np.array(conv.bias.numpy()) if conv.use_bias else None,
            gamma=np.array(bn.gamma.numpy()) if bn.scale else None,
            beta=np.array(bn.beta.numpy()) if bn.center else None,
            moving_mean=np.array(bn.moving_mean.numpy()), moving_var=np.array(bn.moving_variance.numpy()),
            eps=float(bn.epsilon), momentum=float(bn.momentum), var_update=keras_var_update(bn),
            **(t.geometry or {}),
        ))
    return out


def run(model: Any, x: np.ndarray) -> list[np.ndarray]:
    """The model's eval output (``training=False``) on NHWC ``x``, every output as NumPy."""
    y = model(x, training=False)
    if _is_tf_keras(model):
        import tensorflow as tf

        return [np.asarray(v.numpy(), np.float32) for v in tf.nest.flatten(y)]
    return [np.asarray(keras.ops.convert_to_numpy(v), np.float32) for v in keras.tree.flatten(y)]


def snapshot(model: Any) -> Any:
    """Every weight and BatchNorm setting :func:`apply` may change, copied, for :func:`restore`."""
    norms = _classes("BatchNormalization", "LayerNormalization", "GroupNormalization")
    bns = [layer for _, layer in _layers(model) if isinstance(layer, norms)]
    return [np.array(w, copy=True) for w in model.get_weights()], [
        (b, b.epsilon, getattr(b, "momentum", None)) for b in bns]


def restore(model: Any, saved: Any) -> None:
    weights, settings = saved
    model.set_weights(weights)
    for bn, eps, momentum in settings:
        bn.epsilon = eps
        if momentum is not None:
            bn.momentum = momentum


def _numpy(layer: Any, variable: Any) -> np.ndarray:
    # A tf_keras weight is a tf.Variable, whose .value is a method.
    return np.array(variable.numpy() if _is_tf_keras(layer) else keras.ops.convert_to_numpy(variable.value))


def _read_part(part: Part) -> Layer | Norm:
    m = part.handle

    def get(attribute: str, present: bool = True) -> np.ndarray | None:
        return _numpy(m, getattr(m, attribute)) if present else None

    if part.kind == "conv":
        kernel = _numpy(m, _kernel(m))
        return Layer("conv", depthwise_from_tf(kernel) if _depthwise(m) else kernel, get("bias", m.use_bias),
                     **_geometry(m), geometry=True)
    if part.kind in ("conv_transpose", "dense"):
        return Layer(part.kind, get("kernel"), get("bias", m.use_bias),  # type: ignore[arg-type]
                     groups=part.groups or 1)
    if part.kind == "batch_norm":
        return Norm("batch_norm", get("gamma", m.scale), get("beta", m.center), get("moving_mean"),
                    get("moving_variance"), eps=float(m.epsilon), momentum=float(m.momentum),
                    var_update=keras_var_update(m))
    return Norm(part.kind, get("gamma", m.scale), get("beta", m.center), eps=float(m.epsilon),  # type: ignore[arg-type]
                groups=part.groups)


def read_parts(model: Any, found: ModelPairs) -> dict[str, Layer]:
    """Every other layer's values, as a live source model holds them (neutral layout)."""
    return parts_as_layers(found, _read_part)


def _put(layer: Any, variable: Any, value: Any, where: str) -> None:
    array = np.asarray(value)
    if tuple(array.shape) != tuple(int(d) for d in variable.shape):
        raise ConvBNError(f"{where} must keep its shape {tuple(variable.shape)}. Received: shape {array.shape}")
    dtype = variable.dtype if _is_tf_keras(layer) else keras.backend.standardize_dtype(variable.dtype)
    variable.assign(array.astype(getattr(dtype, "as_numpy_dtype", dtype)))


def _write_part(s: StagedPart) -> None:
    m, name, kind = s.part.handle, s.part.name, s.part.kind
    if kind in ("conv", "conv_transpose", "dense"):
        kernel = np.asarray(s.kernel)
        if kind == "conv" and _depthwise(m):
            kernel = depthwise_to_tf(kernel, int(_kernel(m).shape[2]))
        _put(m, _kernel(m) if kind == "conv" else m.kernel, kernel, f"{name}/kernel")
        if m.use_bias:
            _put(m, m.bias, s.bias, f"{name}/bias")
        return
    norm = s.norm
    assert norm is not None
    n = s.part.shape[0]
    if m.scale:
        _put(m, m.gamma, np.ones(n) if norm.gamma is None else norm.gamma, f"{name}/gamma")
    if m.center:
        _put(m, m.beta, np.zeros(n) if norm.beta is None else norm.beta, f"{name}/beta")
    if kind == "batch_norm":
        _put(m, m.moving_mean, norm.moving_mean, f"{name}/moving_mean")
        _put(m, m.moving_variance, norm.moving_var, f"{name}/moving_variance")
    if s.eps is not None:
        m.epsilon = s.eps


def apply(model: Any, staged: list[Staged | StagedPart]) -> None:
    """Write every staged pair with ``assign_keras`` and every other layer in Keras's layout; restore
    the whole model if any write fails."""
    saved = snapshot(model)
    try:
        for s in staged:
            if isinstance(s, StagedPart):
                _write_part(s)
                continue
            conv, bn = s.target.handle
            assign_keras(conv, bn, dataclasses.replace(s.params, **_geometry(conv), var_update=keras_var_update(bn)))
    except BaseException:
        restore(model, saved)
        raise
    if any(layer.epsilon != eps for layer, eps, _ in saved[1]):
        # eps is read when a step function is traced: drop the model's compiled ones.
        for attribute in ("predict_function", "test_function", "train_function"):
            if getattr(model, attribute, None) is not None:
                setattr(model, attribute, None)
