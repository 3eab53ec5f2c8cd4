""":func:`convbn.load_into` for Keras 3 models: pairs from the layer graph, else layer order.

Loaded only once the model is known to be a Keras layer, so importing Keras here is free.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np

from convbn.adapters import _check_keras_pair, _keras_hwio_shape, assign_keras
from convbn.errors import ConvBNError
from convbn.loading import ModelPairs, Staged, Target

__all__ = ["apply", "find_pairs"]

_CONV = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


def _children(layer: Any) -> list[Any]:
    if isinstance(layer, keras.Model):
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
    parent = nodes[0].parent_nodes[0].operation
    return parent, len(getattr(parent, "_outbound_nodes", [])) == 1


def _geometry(conv: Any) -> dict[str, Any]:
    c = int(conv.kernel.shape[2])
    depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
    return {
        "stride": tuple(conv.strides),
        "padding": str(conv.padding).upper(),
        "dilation": tuple(conv.dilation_rate),
        "groups": c if depthwise else int(conv.groups),
    }


def find_pairs(model: Any) -> ModelPairs:
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
    for name, layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            producer = _producer(layer)
            if producer is not None:
                parent, only = producer
                if isinstance(parent, _CONV) and id(parent) in name_of:
                    if only:
                        pairs.append((name_of[id(parent)], name, parent, layer))
                        kinds.add("layer graph")
                    else:
                        notes.append(f"{name_of[id(parent)]}: its output feeds more than {name}; not a pair")
            elif previous is not None and isinstance(previous[1], _CONV) and not _producer(previous[1]):
                pairs.append((previous[0], name, previous[1], layer))
                kinds.add("layer order")
        previous = (name, layer)
    pairs.sort(key=lambda p: [n for n, _ in layers].index(p[0]))
    targets: list[Target] = []
    used: set[int] = set()
    for conv_name, bn_name, conv, bn in pairs:
        try:
            _check_keras_pair(conv, bn)
        except (ConvBNError, TypeError) as exc:
            notes.append(f"{conv_name} + {bn_name} left as they are: {exc}")
            continue
        targets.append(Target(
            name=conv_name,
            bn_name=bn_name,
            kernel_shape=_keras_hwio_shape(conv),
            bias=bool(conv.use_bias),
            gamma=bool(bn.scale),
            beta=bool(bn.center),
            eps=float(bn.epsilon),
            momentum=float(bn.momentum),
            geometry=_geometry(conv),
            handle=(conv, bn),
        ))
        used.update((id(conv), id(bn)))
    untouched = [name for name, layer in layers if id(layer) not in used and layer.weights]
    pairing = " and ".join(sorted(kinds, reverse=True)) or "layer graph"
    return ModelPairs(targets, pairing, notes, untouched)


def apply(model: Any, staged: list[Staged]) -> None:
    """Write every staged pair with ``assign_keras``; restore all of them if any write fails."""
    saved = []
    for s in staged:
        conv, bn = s.target.handle
        variables = [*conv.weights, *bn.weights]
        saved.append((bn, [(v, np.array(keras.ops.convert_to_numpy(v.value), copy=True)) for v in variables],
                      bn.epsilon, bn.momentum))
    try:
        for s in staged:
            conv, bn = s.target.handle
            assign_keras(conv, bn, dataclasses.replace(s.params, **_geometry(conv), var_update="biased"))
    except BaseException:
        for bn, variables, eps, momentum in saved:
            for variable, value in variables:
                variable.assign(value)
            bn.epsilon, bn.momentum = eps, momentum
        raise
    if any(bn.epsilon != eps for bn, _, eps, _ in saved):
        # eps is read when a step function is traced: drop the model's compiled ones.
        for attribute in ("predict_function", "test_function", "train_function"):
            if getattr(model, attribute, None) is not None:
                setattr(model, attribute, None)
