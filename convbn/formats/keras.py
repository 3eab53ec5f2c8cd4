"""Keras 3 weights: ``.weights.h5`` (``model.save_weights``) and ``.keras`` archives.

Both hold an HDF5 file laid out by layer, read here with h5py alone (no TensorFlow, no Keras)::

    layers/conv2d/vars/0                 kernel (kH, kW, I/g, O)     vars.attrs["name"]: layer name
    layers/conv2d/vars/1                 bias (if use_bias)
    layers/batch_normalization/vars/0-3  gamma, beta, moving_mean, moving_variance

Group names come from the layer class with a per-class counter (``conv2d``, ``conv2d_1``, ...); the
layer's own name is only the ``vars`` group's ``name`` attribute, and layers are keyed by it. A
``.keras`` archive adds ``config.json``: the model graph (which BatchNorm follows which conv), each
conv's strides/padding/dilation/groups and each BatchNorm's epsilon and momentum, all used here.
A ``.weights.h5`` records neither the graph nor the order between classes: convs and BatchNorms
are paired by naming (``x_conv``/``x_bn``, ``x``/``x_bn``), then by order within each class, and
Keras's defaults (eps 1e-3, momentum 0.99) are assumed.

Writing produces groups that a Keras 3 model whose Conv2D/BatchNormalization layers come in
checkpoint order loads with ``model.load_weights``: the k-th Conv2D reads ``conv2d_k``, the k-th
BatchNormalization ``batch_normalization_k``, whatever other layers lie between. A checkpoint read
from Keras and written as ``.weights.h5`` goes back to its original groups, with every other
tensor. A ``.keras`` archive gets a config of its own: one independent ``Input → Conv2D →
BatchNormalization`` branch per layer, with the layers' geometry, eps and momentum, so
``keras.saving.load_model`` rebuilds it and ``load_weights`` fills any model with these layers.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convbn.conventions import KERAS3
from convbn.errors import ConvBNError
from convbn.formats._common import (
    Progress,
    as_numpy,
    build_layer,
    contiguous,
    head,
    not_written_note,
    origin_format,
    resolve_settings,
    tick,
    unstored_settings_note,
)
from convbn.formats._io import atomic_output
from convbn.formats._pairing import Unit, natural_key, pair_units

if TYPE_CHECKING:
    from convbn.convert import Checkpoint

NAME = "keras"
#: write() honours Checkpoint.fused (conv weight + bias, no BatchNorm).
WRITES_FUSED = True

__all__ = ["NAME", "read", "sniff", "write"]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_KERAS_MEMBERS = ("metadata.json", "config.json", "model.weights.h5")
_CONV_GROUP = re.compile(r"conv2d(_\d+)?")
_BN_GROUP = re.compile(r"batch_normalization(_\d+)?")
_BN_FIELDS = ("gamma", "beta", "moving_mean", "moving_var")


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise ImportError("the keras format needs h5py: pip install h5py (or 'convbn[keras]')") from None
    return h5py


def sniff(path: Path) -> bool:
    """An HDF5 file, or a zip whose first member is one of a ``.keras`` archive's."""
    if head(path, 8) == _HDF5_MAGIC:
        return True
    from convbn.formats._common import zip_first_member

    return zip_first_member(path) in _KERAS_MEMBERS


# -- reading -----------------------------------------------------------------------------------------


class _Group:
    """A Keras layer's weights: its h5 group, its name and its variables in order."""

    def __init__(self, path: str, name: str, arrays: list[tuple[str, np.ndarray]]) -> None:
        self.path = path
        self.name = name
        self.arrays = arrays


def _walk(group: Any, prefix: str, h5py: Any) -> Iterator[tuple[str, Any]]:
    """``("vars", (path, vars_group))`` for layer groups, ``("dataset", (path, ds))`` otherwise."""
    for key in sorted(group.keys(), key=natural_key):
        item = group[key]
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(item, h5py.Group):
            if key == "vars":
                yield "vars", (prefix, item)
            else:
                yield from _walk(item, path, h5py)
        else:
            yield "dataset", (path, item)


def _read_h5(f: Any, path: Path, h5py: Any) -> tuple[list[_Group], dict[str, np.ndarray], list[str]]:
    if "layers" not in f:
        keys = sorted(f.keys())[:5]
        raise ConvBNError(
            f"{path}: not a Keras 3 weights file: it has no 'layers' group (top level: {keys}); "
            "Keras 2 .h5 files are not supported, re-save them with Keras 3"
        )
    groups: list[_Group] = []
    loose: dict[str, np.ndarray] = {}
    dropped: list[str] = []
    for kind, (where, item) in _walk(f, "", h5py):
        if where.split("/")[0] == "optimizer":
            if kind == "vars":
                dropped += [f"{where}/vars/{k}" for k in sorted(item.keys(), key=natural_key)]
            else:
                dropped.append(where)
            continue
        try:
            if kind == "dataset":
                loose[where] = item[()]
                continue
            names = sorted(item.keys(), key=natural_key)
            arrays = [(f"{where}/vars/{k}", item[k][()]) for k in names if isinstance(item[k], h5py.Dataset)]
        except (OSError, KeyError, ValueError) as exc:
            raise ConvBNError(f"{path}: truncated or corrupted Keras weights under {where!r}: {exc}") from None
        if arrays:
            layer_name = item.attrs.get("name", where.rsplit("/", 1)[-1])
            if isinstance(layer_name, bytes):
                layer_name = layer_name.decode()
            groups.append(_Group(where, str(layer_name), arrays))
    return groups, loose, dropped


def _open(path: Path) -> tuple[list[_Group], dict[str, np.ndarray], list[str], dict[str, Any] | None]:
    h5py = _h5py()
    config = None
    try:
        if head(path, 8) == _HDF5_MAGIC:
            with h5py.File(path, "r") as f:
                return (*_read_h5(f, path, h5py), None)
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if "model.weights.h5" not in names:
                raise ConvBNError(f"{path}: a .keras archive must hold model.weights.h5. Received members: {names[:6]}")
            if "config.json" in names:
                config = json.loads(zf.read("config.json"))
            with zf.open("model.weights.h5") as member, h5py.File(member, "r") as f:
                return (*_read_h5(f, path, h5py), config)
    except (OSError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConvBNError(f"{path}: not a readable Keras weights file (truncated or corrupted): {first}") from None


def _layer_configs(config: Mapping[str, Any] | None) -> tuple[dict[str, dict[str, Any]], dict[str, str] | None, list[str]]:
    """Top-level layers by name (class and config), the conv→BN pairs of the graph, and the order."""
    if not config:
        return {}, None, []
    body = config.get("config") or {}
    entries = body.get("layers") if isinstance(body, Mapping) else None
    if not isinstance(entries, list):
        return {}, None, []
    layers: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for entry in entries:
        name = entry.get("name") or (entry.get("config") or {}).get("name")
        if name:
            layers[str(name)] = entry
            order.append(str(name))
    graph: dict[str, str] = {}
    if config.get("class_name") == "Sequential":
        chain = [n for n in order if layers[n].get("class_name") != "InputLayer"]
        for a, b in itertools.pairwise(chain):
            if layers[a].get("class_name") == "Conv2D" and layers[b].get("class_name") == "BatchNormalization":
                graph[a] = b
    else:
        for name in order:
            if layers[name].get("class_name") != "BatchNormalization":
                continue
            producer = _producer(layers[name].get("inbound_nodes"))
            if producer in layers and layers[producer].get("class_name") == "Conv2D":
                graph[producer] = name
    return layers, graph, order


def _producer(nodes: Any) -> str | None:
    """The layer feeding a single-input layer, from Keras 3 or Keras 2 style ``inbound_nodes``."""
    if not isinstance(nodes, list) or len(nodes) != 1:
        return None
    node = nodes[0]
    if isinstance(node, Mapping):
        args = node.get("args") or []
        if len(args) == 1 and isinstance(args[0], Mapping):
            history = (args[0].get("config") or {}).get("keras_history")
            if isinstance(history, list) and history:
                return str(history[0])
    elif isinstance(node, list) and len(node) == 1 and isinstance(node[0], list) and node[0]:
        return str(node[0][0])
    return None


def _unit(group: _Group, entry: Mapping[str, Any] | None, notes: list[str]) -> Unit | None:
    base = group.path.rsplit("/", 1)[-1]
    cls = entry.get("class_name") if entry else ("Conv2D" if _CONV_GROUP.fullmatch(base) else
                                                  "BatchNormalization" if _BN_GROUP.fullmatch(base) else None)
    cfg = (entry or {}).get("config") or {}
    shapes = [a.shape for _, a in group.arrays]
    if cls == "Conv2D":
        if not shapes or len(shapes[0]) != 4 or len(shapes) > 2:
            return None
        out = shapes[0][3]
        fields = dict(zip(("kernel", "bias"), group.arrays, strict=False))
        return Unit(group.name, "conv", int(out), payload=(group, fields, cfg))
    if cls == "BatchNormalization":
        if entry:
            names = [f for f, on in zip(_BN_FIELDS, (cfg.get("scale", True), cfg.get("center", True), True, True),
                                        strict=True) if on]
        elif len(shapes) == 4:
            names = list(_BN_FIELDS)
        elif len(shapes) == 2:
            names = ["moving_mean", "moving_var"]
        else:
            notes.append(
                f"{group.name}: a BatchNormalization with {len(shapes)} variables is ambiguous without "
                "the model config (scale or center off?); left unpaired. Read the .keras file instead"
            )
            return None
        if len(names) != len(shapes) or any(len(s) != 1 or s != shapes[0] for s in shapes):
            return None
        return Unit(group.name, "bn", int(shapes[0][0]), payload=(group, dict(zip(names, group.arrays, strict=True)), cfg))
    return None


def read(
    path: Path,
    *,
    pairs: Mapping[str, str] | None = None,
    eps: float | None = None,
    momentum: float | None = None,
    use_ema: bool = False,
) -> Checkpoint:
    """Read Keras 3 ``.weights.h5`` or ``.keras``; see the module docstring."""
    from convbn.convert import Checkpoint, LayerSource

    if use_ema:
        raise ConvBNError(f"{path}: use_ema applies to slim checkpoints with moving-average shadows, not Keras files")
    groups, loose, dropped, config = _open(path)
    ckpt = Checkpoint(format=NAME, convention=KERAS3.name, dropped=dropped)
    ckpt.metadata["source_format"] = NAME
    configs, graph, order = _layer_configs(config)
    # Top-level layers match their config entry by name; nested models' layers have none.
    top = {g.name: g for g in groups if g.path.count("/") == 1}
    rank = {name: i for i, name in enumerate(order)}
    if rank:
        groups.sort(key=lambda g: (rank.get(g.name, len(rank)), natural_key(g.path)))
    names = [g.name for g in groups]
    duplicated = {n for n in names if names.count(n) > 1}
    units = []
    for group in groups:
        if group.name in duplicated:
            group.name = group.path
        entry = configs.get(group.name) if top.get(group.name) is group else None
        unit = _unit(group, entry, ckpt.notes)
        if unit is not None:
            units.append(unit)
    with_graph = graph is not None
    found, unpaired = pair_units(
        units,
        explicit=pairs,
        graph=graph,
        naming=not with_graph,
        order=None if with_graph else "by_kind",
        source=str(path),
    )
    if found and not with_graph and any(p.reason == "order" for p in found):
        ckpt.notes.append(
            ".weights.h5 files do not record which BatchNorm follows which conv: paired the k-th Conv2D "
            "with the next BatchNormalization of the same width (check with 'convbn inspect'; pass "
            "pairs / --pair, or read the .keras file, to be explicit)"
        )
    used: set[str] = set()
    for pair in found:
        _, conv_fields, conv_cfg = pair.conv.payload
        _, bn_fields, bn_cfg = pair.bn.payload
        layer_eps, layer_momentum = resolve_settings(
            KERAS3, "Keras .weights.h5" if not bn_cfg else NAME, eps=eps, momentum=momentum,
            stored_eps=bn_cfg.get("epsilon"), stored_momentum=bn_cfg.get("momentum"), notes=ckpt.notes,
        )
        geometry: dict[str, Any] = {}
        if conv_cfg:
            geometry = {
                "stride": tuple(conv_cfg.get("strides", (1, 1))),
                "padding": str(conv_cfg.get("padding", "valid")).upper(),
                "dilation": tuple(conv_cfg.get("dilation_rate", (1, 1))),
                "groups": int(conv_cfg.get("groups", 1)),
            }
        tensor_names = {f: name for f, (name, _) in {**conv_fields, **bn_fields}.items()}
        ckpt.layers[pair.key] = build_layer(
            path,
            pair.key,
            tensor_names,
            **{f: a for f, (_, a) in {**conv_fields, **bn_fields}.items()},
            eps=layer_eps,
            momentum=layer_momentum,
            var_update=KERAS3.var_update,
            **geometry,
        )
        ckpt.sources[pair.key] = LayerSource(
            conv={f: n for f, (n, _) in conv_fields.items()},
            bn={f: n for f, (n, _) in bn_fields.items()},
            reason=pair.reason,
            conv_name=pair.conv.name,
            bn_name=pair.bn.name,
            geometry=bool(geometry),
            settings=bool(bn_cfg),
        )
        used.update(tensor_names.values())
    if found and not any(s.geometry for s in ckpt.sources.values()):
        ckpt.notes.append(
            ".weights.h5 files do not store stride, padding, dilation or groups: the layers keep "
            "ConvBNParams defaults (stride 1, 'SAME', groups 1); set them with dataclasses.replace"
        )
    for unit in unpaired:
        ckpt.unpaired[unit.name] = unit.kind
    for group in groups:
        for name, array in group.arrays:
            if name not in used:
                ckpt.tensors[name] = array
    ckpt.tensors.update(loose)
    return ckpt


# -- writing -----------------------------------------------------------------------------------------


def _keras_name(name: str, taken: set[str]) -> str:
    """A valid, unused Keras layer name (Keras forbids '/')."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", name) or "layer"
    candidate, i = base, 1
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    taken.add(candidate)
    return candidate


def _numbered(base: str, counters: dict[str, int]) -> str:
    k = counters.get(base, 0)
    counters[base] = k + 1
    return f"layers/{base}" + (f"_{k}" if k else "")


def _bn_arrays(params: Any, keep_absent: bool) -> list[np.ndarray]:
    n = params.out_channels
    dtype = np.asarray(params.moving_mean).dtype
    gamma, beta = params.gamma, params.beta
    if not keep_absent:
        gamma = gamma if gamma is not None else np.ones(n, dtype)
        beta = beta if beta is not None else np.zeros(n, dtype)
    return [as_numpy(a) for a in (gamma, beta, params.moving_mean, params.moving_var) if a is not None]


def write(ckpt: Checkpoint, path: Path, *, progress: Progress | None = None) -> None:
    """Write ``ckpt`` as Keras 3 ``.weights.h5`` or ``.keras``; see the module docstring."""
    h5py = _h5py()
    archive = path.name.endswith(".keras")
    if not archive and not path.name.endswith(".weights.h5"):
        raise ConvBNError(
            "a Keras 3 weights file must be named *.weights.h5 or *.keras (model.load_weights "
            f"requires it). Received: {path.name!r}"
        )
    same_format = origin_format(ckpt) == NAME and not archive and all(
        "kernel" in s.conv and "/vars/" in s.conv["kernel"] for s in ckpt.sources.values()
    ) and set(ckpt.sources) >= set(ckpt.layers)
    taken: set[str] = set()
    counters: dict[str, int] = {}
    # (group path, layer name, arrays, layer key or None), in writing order
    plan: list[tuple[str, str, list[np.ndarray], str | None]] = []
    branches: list[tuple[str, str | None, Any]] = []
    for layer, params in ckpt.layers.items():
        source = ckpt.sources.get(layer)
        conv_arrays = [as_numpy(params.kernel)] + ([as_numpy(params.bias)] if params.bias is not None else [])
        if same_format and source is not None:
            conv_group = source.conv["kernel"].rsplit("/vars/", 1)[0]
            conv_name = source.conv_name
            bn_group = source.bn.get("moving_mean", "").rsplit("/vars/", 1)[0]
            bn_name = source.bn_name
            keep_absent = True
        else:
            conv_name = _keras_name(layer, taken)
            bn_name = _keras_name(f"{conv_name}_bn", taken)
            conv_group = _numbered("conv2d", counters)
            bn_group = _numbered("batch_normalization", counters)
            keep_absent = False
        plan.append((conv_group, conv_name, conv_arrays, None if not ckpt.fused else layer))
        if not ckpt.fused:
            plan.append((bn_group, bn_name, _bn_arrays(params, keep_absent), layer))
        branches.append((conv_name, None if ckpt.fused else bn_name, params))
        if params.padding not in ("SAME", "VALID") and archive:
            ckpt.notes.append(
                f"{layer}: padding {params.padding} is not 'same' or 'valid', which Keras Conv2D cannot "
                "express; the config says 'valid': add a ZeroPadding2D in front"
            )
    loose: dict[str, np.ndarray] = {}
    if ckpt.tensors:
        if same_format:
            loose = {k: as_numpy(v) for k, v in ckpt.tensors.items()}
        else:
            ckpt.notes.append(not_written_note(ckpt))
    if not archive and not ckpt.fused:
        unstored_settings_note(ckpt, "Keras .weights.h5", KERAS3)

    def write_h5(target: Path) -> None:
        with h5py.File(target, "w") as f:
            for group_path, layer_name, arrays, layer in plan:
                vars_group = f.require_group(f"{group_path}/vars")
                vars_group.attrs["name"] = layer_name
                for i, array in enumerate(arrays):
                    vars_group.create_dataset(str(i), data=contiguous(array))
                if layer is not None:
                    tick(progress, layer)
            for name, array in loose.items():
                if name in f:
                    raise ConvBNError(f"{path}: tensor name {name!r} is used twice (a layer and another tensor)")
                f.create_dataset(name, data=contiguous(array))

    with atomic_output(path) as tmp:
        if not archive:
            write_h5(tmp)
            return
        fd, weights = tempfile.mkstemp(suffix=".h5", dir=tmp.parent)
        os.close(fd)
        try:
            write_h5(Path(weights))
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                zf.writestr("metadata.json", json.dumps({"keras_version": "3", "convbn": "1"}))
                zf.writestr("config.json", json.dumps(_model_config(branches)))
                zf.write(weights, "model.weights.h5")
        finally:
            os.unlink(weights)


def _dtype_policy(params: Any) -> str:
    name = np.asarray(params.kernel).dtype.name
    return name if name in ("float16", "bfloat16", "float32", "float64") else "float32"


def _model_config(branches: list[tuple[str, str | None, Any]]) -> dict[str, Any]:
    """A Functional model of independent ``Input -> Conv2D -> BatchNormalization`` branches."""
    layers: list[dict[str, Any]] = []
    inputs, outputs = [], []
    taken = {name for conv, bn, _ in branches for name in (conv, bn) if name}
    for conv, bn, p in branches:
        dtype = _dtype_policy(p)
        cin, cout = p.in_channels, p.out_channels
        source = _keras_name(f"input_{conv}", taken)
        layers.append({
            "module": "keras.layers", "class_name": "InputLayer", "registered_name": None, "name": source,
            "config": {"batch_shape": [None, None, None, cin], "dtype": dtype, "sparse": False, "name": source},
            "inbound_nodes": [],
        })
        padding = p.padding.lower() if isinstance(p.padding, str) else "valid"
        layers.append({
            "module": "keras.layers", "class_name": "Conv2D", "registered_name": None, "name": conv,
            "config": {
                "name": conv, "trainable": True, "dtype": dtype, "filters": cout,
                "kernel_size": list(p.kernel_size), "strides": list(p.stride), "padding": padding,
                "data_format": "channels_last", "dilation_rate": list(p.dilation), "groups": p.groups,
                "activation": "linear", "use_bias": p.bias is not None,
            },
            "build_config": {"input_shape": [None, None, None, cin]},
            "inbound_nodes": [_node(source, cin, dtype)],
        })
        last = conv
        if bn is not None:
            layers.append({
                "module": "keras.layers", "class_name": "BatchNormalization", "registered_name": None, "name": bn,
                "config": {
                    "name": bn, "trainable": True, "dtype": dtype, "axis": -1, "momentum": p.momentum,
                    "epsilon": p.eps, "center": True, "scale": True,
                },
                "build_config": {"input_shape": [None, None, None, cout]},
                "inbound_nodes": [_node(conv, cout, dtype)],
            })
            last = bn
        inputs.append([source, 0, 0])
        outputs.append([last, 0, 0])
    return {
        "module": "keras.src.models.functional",
        "class_name": "Functional",
        "registered_name": "Functional",
        "config": {"name": "convbn", "trainable": True, "layers": layers, "input_layers": inputs,
                   "output_layers": outputs},
    }


def _node(producer: str, channels: int, dtype: str) -> dict[str, Any]:
    return {
        "args": [{
            "class_name": "__keras_tensor__",
            "config": {"shape": [None, None, None, channels], "dtype": dtype, "keras_history": [producer, 0, 0]},
        }],
        "kwargs": {},
    }
