"""The data-flow graph a checkpoint file records, for :func:`convbn.load_into`'s matcher.

A ``.keras`` archive holds the model's config (``config.json``), whose ``inbound_nodes`` say which
layer feeds which: with it, a Keras file's layers align with a model's by structure as a live
source's do, and a bottleneck's ``conv3`` and shortcut are told apart against it. Other files
(torch state dicts, ``.weights.h5``, msgpack, safetensors) record no graph: :func:`file_graph`
returns None, and the matcher uses names and an unambiguous order only.

The config is read as JSON data, never deserialized into Keras objects; nothing here imports a
framework.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convbn.loading.matching import INPUT, Graph

if TYPE_CHECKING:
    from convbn.checkpoint import Checkpoint

__all__ = ["file_graph"]

#: Keras layer classes that hold weights; any other layer passes data through for the graph.
_WEIGHTED = frozenset({
    "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose", "Conv3DTranspose",
    "Dense", "EinsumDense", "Embedding", "BatchNormalization", "LayerNormalization", "GroupNormalization",
    "PReLU",
})


def _producers(value: Any) -> Iterator[str]:
    """Layer names an ``inbound_nodes`` entry reads: Keras 3's ``keras_history``, Keras 2's
    ``[name, node, tensor, kwargs]`` lists."""
    if isinstance(value, Mapping):
        history = value.get("config", {}).get("keras_history") if isinstance(value.get("config"), Mapping) else None
        if isinstance(history, list) and history and isinstance(history[0], str):
            yield history[0]
            return
        for v in value.values():
            yield from _producers(v)
    elif isinstance(value, list):
        if len(value) >= 3 and isinstance(value[0], str) and all(isinstance(v, int) for v in value[1:3]):
            yield value[0]
            return
        for v in value:
            yield from _producers(v)


def file_graph(path: Path, ckpt: Checkpoint) -> Graph | None:
    """The data flow among ``ckpt``'s layers that the file at ``path`` records, or None.

    Nodes are named as ``ckpt``'s layers (a pair by its conv's key, its BatchNorm folded into it);
    other weighted layers are nodes of kind ``"other"``.
    """
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    body = config.get("config") if isinstance(config, Mapping) else None
    layers = body.get("layers") if isinstance(body, Mapping) else None
    if not isinstance(layers, list):
        return None
    unit: dict[str, str] = {}
    for key in ckpt.layers:
        unit[key] = key
        source = ckpt.sources.get(key)
        if source is not None and source.conv_name:
            unit[source.conv_name] = key
        if source is not None and source.bn_name:
            unit[source.bn_name] = key
    entries: dict[str, Mapping[str, Any]] = {}
    for entry in layers:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("config"), Mapping):
            return None
        if entry.get("class_name") in ("Functional", "Sequential", "Model"):
            return None  # a nested model: its inner graph is not followed
        name = entry.get("name", entry["config"].get("name"))
        if not isinstance(name, str):
            return None
        entries[name] = entry
    producers: dict[str, set[str]] = {}
    tags: dict[str, frozenset[str]] = {}

    def flow(name: str, depth: int = 0) -> frozenset[str]:
        if name in tags:
            return tags[name]
        entry = entries.get(name)
        if entry is None or depth > len(entries):
            raise LookupError(name)
        if entry.get("class_name") == "InputLayer":
            tags[name] = frozenset({INPUT})
            return tags[name]
        feeding = frozenset().union(*(flow(p, depth + 1) for p in _producers(entry.get("inbound_nodes", []))))
        owner = unit.get(name) or (name if entry.get("class_name") in _WEIGHTED else None)
        if owner is not None:
            if feeding != {owner}:
                producers.setdefault(owner, set()).update(feeding - {owner})
            feeding = frozenset({owner})
        tags[name] = feeding
        return feeding

    try:
        for name in entries:
            flow(name)
    except (LookupError, RecursionError):
        return None
    if not set(ckpt.layers) <= set(producers):
        return None  # a layer the config does not place: no graph rather than a partial one
    return Graph.of(producers, ckpt.layers)
