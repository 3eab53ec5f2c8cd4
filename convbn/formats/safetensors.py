"""safetensors files: convbn's neutral format, HWIO, with provenance in ``__metadata__``.

Layer ``L`` is stored as ``L/kernel`` (HWIO), ``L/bias``, ``L/gamma``, ``L/beta``,
``L/moving_mean``, ``L/moving_var`` (absent fields are not stored) and extras such as
``L/num_batches_tracked``. Every other tensor keeps its source name and layout. ``__metadata__``
(string → string, as safetensors requires) holds:

- ``convbn``: the layout version (``"1"``);
- ``convbn.source_format`` and ``convbn.convention``: where the data came from and its BatchNorm
  convention preset;
- ``convbn.layers``: a JSON list, one object per layer in order, with its tensor names, ``eps``,
  ``momentum`` (fraction kept), ``var_update``, the pairing ``reason``, the source's names,
  ``stride``/``padding``/``dilation``/``groups``, and ``geometry``: whether the source file stated
  them (else they are the defaults the reader assumed, or what was set after reading);
- ``convbn.dropped``, ``convbn.unpaired``, ``convbn.notes``, ``convbn.fused``.

So a later conversion from this file loses nothing. A safetensors file without ``convbn``
metadata (e.g. ``safetensors.torch.save_file(model.state_dict())``) is read as a torch state_dict.

Reading and writing are done here with NumPy (no framework, and not the ``safetensors`` package):
reading memory-maps the file, writing streams one tensor at a time, so neither holds a second
copy of the checkpoint.

Sharded checkpoints (``model.safetensors.index.json`` and the shards it names, see
:mod:`convbn.formats._sharded`) read as one file: named by the index, its directory or
``model.safetensors``, each shard memory-mapped and checked as a single file is, and against the
index (every tensor in exactly the shard the index names). ``write(..., max_shard_size=)`` writes
them.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convbn import conventions
from convbn._dtypes import ml_dtype
from convbn.errors import ConvBNError
from convbn.formats._caps import FormatCaps
from convbn.formats._common import Progress, as_numpy, build_layer, contiguous, head, origin_format, tick
from convbn.formats._io import atomic_output
from convbn.formats._pairing import natural_key
from convbn.formats._sharded import (
    INDEX_SUFFIX,
    Shards,
    find_index,
    shard_names,
    split,
    write_index,
)
from convbn.params import ARRAY_FIELDS

if TYPE_CHECKING:
    from convbn.checkpoint import Checkpoint

NAME = "safetensors"
#: write() honours Checkpoint.fused (conv weight + bias, no BatchNorm) and writes Checkpoint.others
#: (every layer kind), not only conv+BatchNorm pairs. Each layer's moving-variance update and the
#: source's flatten order are stored, not assumed.
CAPS = FormatCaps(
    suffixes=(".safetensors",),
    writes_others=True, writes_fused=True, write_options=frozenset({"progress", "max_shard_size"}),
    shards="index_json", records_kinds=True,
)
LAYOUT_VERSION = "1"

__all__ = ["CAPS", "NAME", "read", "sniff", "write"]

_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "F16": "float16",
    "BF16": "bfloat16",
    "U32": "uint32",
    "I32": "int32",
    "F32": "float32",
    "U64": "uint64",
    "I64": "int64",
    "F64": "float64",
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def sniff(path: Path) -> bool:
    """An 8-byte little-endian header length followed by a JSON object, or a shard index
    (``model.safetensors.index.json``, its directory or ``model.safetensors``) of such files."""
    return _sniff_file(path) or find_index(path, _sniff_file, _INDEX_OF) is not None


#: What a shard index of this format is named after: model.safetensors.index.json
_INDEX_OF = (".safetensors",)


def _sniff_file(path: Path) -> bool:
    data = head(path, 9)
    if len(data) < 9 or data[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 2 <= n <= _MAX_HEADER


def _numpy_dtype(code: str, name: str, path: Path) -> np.dtype:
    if code not in _DTYPES:
        raise ConvBNError(f"{path}: tensor {name!r} has dtype {code!r}, which convbn does not read (known: {sorted(_DTYPES)})")
    if code == "BF16":
        return ml_dtype("bfloat16", f"{path}: tensor {name!r}")
    return np.dtype(_DTYPES[code])


def _load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor as a read-only view of the memory-mapped file, and the metadata.

    The header is checked before any tensor is viewed: every key once, each entry a dtype, a shape
    of ints and two offsets spanning exactly its bytes, no two tensors overlapping, all inside the
    file, and ``__metadata__`` string to string.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConvBNError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise ConvBNError(f"{path}: truncated or corrupted safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, _DuplicateKeyError) as exc:
            raise ConvBNError(f"{path}: corrupted safetensors header: {exc}") from None
        except RecursionError:
            raise ConvBNError(f"{path}: corrupted safetensors header: nested too deeply") from None
    if not isinstance(header, dict):
        raise ConvBNError(f"{path}: corrupted safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ConvBNError(f"{path}: corrupted safetensors header: __metadata__ must map strings to strings")
    data_size = size - 8 - n
    entries = sorted(((_entry(path, name, entry), name) for name, entry in header.items()), key=lambda e: e[0][2:])
    previous = ("", 0)
    for (_, _, begin, end), name in entries:
        if end > data_size:
            raise ConvBNError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end} of the data, "
                f"which has {data_size}"
            )
        if begin < previous[1]:
            raise ConvBNError(
                f"{path}: tensors {previous[0]!r} and {name!r} overlap (data_offsets up to {previous[1]} "
                f"and from {begin}); each tensor must have bytes of its own"
            )
        if end > begin:
            previous = (name, end)
    # Plain ndarray views of the map (each keeps it open): np.memmap's own slices cost 10 us each.
    data = (
        np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_size,)).view(np.ndarray)
        if data_size else np.zeros(0, np.uint8)
    )
    tensors = {name: data[begin:end].view(dtype).reshape(shape) for (dtype, shape, begin, end), name in entries}
    return tensors, metadata


def _load_shards(index: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every shard's tensors (each memory-mapped as :func:`_load` does) checked against the index,
    and the ``__metadata__`` they share."""
    shards = Shards.read(index)
    tensors: dict[str, np.ndarray] = {}
    seen: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    for i, shard in enumerate(shards.files):
        with shards.reading():
            held, shard_metadata = _load(shard)
        shards.check(shard, list(held), seen)
        if i == 0:
            metadata = shard_metadata
        elif shard_metadata != metadata:
            raise ConvBNError(
                f"{index}: shard {shard.name} has other __metadata__ than {shards.files[0].name}; the shards "
                "of one checkpoint share it"
            )
        tensors.update(held)
    return tensors, metadata


class _DuplicateKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names no key twice (json.loads would keep the last one silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        names = [k for k, _ in pairs]
        twice = next(k for i, k in enumerate(names) if k in names[:i])
        raise _DuplicateKeyError(f"key {twice!r} appears twice")
    return out


def _entry(path: Path, name: str, entry: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """A header entry's dtype, shape and data offsets, checked against each other."""
    ok = (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and isinstance(entry.get("shape"), list)
        and all(_is_count(d) for d in entry["shape"])
        and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2
        and all(_is_count(o) for o in entry["data_offsets"])
    )
    if not ok:
        raise ConvBNError(
            f"{path}: corrupted safetensors header entry for tensor {name!r}: it must be "
            f'{{"dtype": str, "shape": [int >= 0, ...], "data_offsets": [begin, end]}}. '
            f"Received: {_preview(entry)}"
        )
    dtype = _numpy_dtype(entry["dtype"], name, path)
    shape = tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise ConvBNError(
            f"{path}: tensor {name!r} must span {nbytes} bytes for shape {list(shape)} "
            f"{entry['dtype']}. Received: data_offsets={[begin, end]}"
        )
    return dtype, shape, begin, end


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _preview(value: Any) -> str:
    """A short repr of parsed JSON (a deep one cannot be repr'd whole)."""
    try:
        return json.dumps(value)[:120]
    except (TypeError, ValueError, RecursionError):
        return type(value).__name__


def read(
    path: Path,
    *,
    pairs: Mapping[str, str] | None = None,
    eps: float | None = None,
    momentum: float | None = None,
    use_ema: bool = False,
) -> Checkpoint:
    """Read a safetensors file; see the module docstring."""
    if use_ema:
        raise ConvBNError(f"{path}: use_ema applies to slim checkpoints with moving-average shadows, not safetensors files")
    index = find_index(path, _sniff_file, _INDEX_OF)
    tensors, metadata = _load(path) if index is None else _load_shards(index)
    if metadata.get("convbn") is None:
        from convbn.formats.torch import layers_from_state_dict

        # safetensors stores tensors sorted by dtype and name, not in the model's order: natural sort
        # of the names restores module order (features.2 before features.10).
        ordered = {k: tensors[k] for k in sorted(tensors, key=natural_key)}
        ckpt = layers_from_state_dict(ordered, source=path, pairs=pairs, eps=eps, momentum=momentum, fmt=NAME)
        ckpt.notes.insert(0, "no convbn metadata: read as a torch state_dict (torch names, OIHW kernels)")
        return ckpt
    if pairs:
        raise ConvBNError(f"{path}: a convbn safetensors file records its pairs; explicit pairs do not apply")
    return _read_neutral(path, tensors, metadata, eps=eps, momentum=momentum)


def _json(metadata: Mapping[str, str], key: str, default: Any, path: Path) -> Any:
    """``metadata[key]`` parsed, of the same JSON type as ``default`` (a list of strings, a dict of
    strings, or for ``convbn.layers`` a list of objects)."""
    if key not in metadata:
        return default
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError:
        raise ConvBNError(f"{path}: corrupted convbn metadata {key!r}: not JSON") from None
    except RecursionError:
        raise ConvBNError(f"{path}: corrupted convbn metadata {key!r}: nested too deeply") from None
    items = value.values() if isinstance(value, dict) else value
    item = dict if key in ("convbn.layers", "convbn.others") else str
    if type(value) is not type(default) or not all(isinstance(v, item) for v in items):
        raise ConvBNError(
            f"{path}: corrupted convbn metadata {key!r}: it must be a JSON "
            f"{type(default).__name__} of {'objects' if item is dict else 'strings'}. Received: {_preview(value)}"
        )
    return value


def _layer_field(path: Path, layer: str, entry: Mapping[str, Any], key: str, kinds: tuple[type, ...], default: Any) -> Any:
    """``entry[key]`` when it is one of ``kinds`` (a dict must map strings to strings)."""
    value = entry.get(key, default)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if ok and isinstance(value, dict):
        ok = all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if not ok:
        raise ConvBNError(
            f"{path}: corrupted convbn metadata: layer {layer!r} has {key}={_preview(value)}; it must be "
            f"{' or '.join(k.__name__ for k in kinds)}"
        )
    return value


def _read_neutral(
    path: Path, tensors: dict[str, np.ndarray], metadata: Mapping[str, str], *, eps: float | None, momentum: float | None
) -> Checkpoint:
    from convbn.checkpoint import Checkpoint, LayerSource

    if metadata["convbn"] != LAYOUT_VERSION:
        raise ConvBNError(f"{path}: convbn layout version {metadata['convbn']!r} is not supported (this convbn reads {LAYOUT_VERSION!r})")
    ckpt = Checkpoint(format=NAME, convention=metadata.get("convbn.convention") or None)
    ckpt.metadata["source_format"] = metadata.get("convbn.source_format", NAME)
    for key, value in metadata.items():
        if key.startswith("convbn.meta."):
            ckpt.metadata.setdefault(key[len("convbn.meta."):], value)
    ckpt.fused = metadata.get("convbn.fused") == "true"
    ckpt.dropped = _json(metadata, "convbn.dropped", [], path)
    ckpt.unpaired = _json(metadata, "convbn.unpaired", {}, path)
    ckpt.notes = _json(metadata, "convbn.notes", [], path)
    used: set[str] = set()
    for entry in _json(metadata, "convbn.layers", [], path):
        name = _layer_field(path, "?", entry, "name", (str,), None)
        if name in ckpt.layers:
            raise ConvBNError(f"{path}: corrupted convbn metadata: layer {name!r} is listed twice")
        names = {f: _layer_field(path, name, entry, f, (str,), "") for f in ARRAY_FIELDS}
        names = {f: t for f, t in names.items() if t}
        extras = _layer_field(path, name, entry, "extras", (dict,), {})
        missing = [t for t in (*names.values(), *extras.values()) if t not in tensors]
        if missing:
            raise ConvBNError(f"{path}: layer {name!r} names tensors that are not in the file: {missing}")
        if eps is not None:
            ckpt.notes.append(f"eps overridden: {eps:g}")
        if momentum is not None:
            ckpt.notes.append(f"momentum overridden: {momentum:g} (fraction kept)")
        number = (int, float)
        settings = {
            "eps": float(eps if eps is not None else _layer_field(path, name, entry, "eps", number, conventions.KERAS3.eps)),
            "momentum": float(
                momentum if momentum is not None
                else _layer_field(path, name, entry, "momentum", number, conventions.KERAS3.momentum)
            ),
            "var_update": _layer_field(path, name, entry, "var_update", (str,), "unbiased"),
        }
        for key in ("stride", "padding", "dilation", "groups"):
            if key in entry:
                settings[key] = _layer_field(path, name, entry, key, (int, str, list), None)
        try:
            ckpt.layers[name] = build_layer(path, name, names, **{f: tensors[t] for f, t in names.items()}, **settings)
        except ConvBNError:
            raise
        except (TypeError, ValueError) as exc:  # geometry of a JSON shape ConvBNParams does not expect
            raise ConvBNError(f"{path}: corrupted convbn metadata: layer {name!r}: {exc}") from None
        if extras:
            ckpt.extras[name] = {k: tensors[t] for k, t in extras.items()}
        ckpt.sources[name] = LayerSource(
            conv=_layer_field(path, name, entry, "source_conv", (dict,), {}),
            bn=_layer_field(path, name, entry, "source_bn", (dict,), {}),
            reason=_layer_field(path, name, entry, "reason", (str,), "graph"),
            conv_name=_layer_field(path, name, entry, "conv_name", (str,), ""),
            bn_name=_layer_field(path, name, entry, "bn_name", (str,), ""),
            geometry=_layer_field(path, name, entry, "geometry", (bool,), False),
            settings=True,
        )
        used.update(names.values())
        used.update(extras.values())
    for entry in _json(metadata, "convbn.others", [], path):
        name = _layer_field(path, "?", entry, "name", (str,), None)
        if name in ckpt.layers or name in ckpt.others:
            raise ConvBNError(f"{path}: corrupted convbn metadata: layer {name!r} is listed twice")
        try:
            layer, other_names = _read_other(path, name, entry, tensors)
        except ConvBNError:
            raise
        except (TypeError, ValueError) as exc:  # geometry of a JSON shape the layer does not expect
            raise ConvBNError(f"{path}: corrupted convbn metadata: layer {name!r}: {exc}") from None
        ckpt.others[name] = layer
        used.update(other_names)
    order = _json(metadata, "convbn.order", [], path)
    known = {*ckpt.layers, *ckpt.others}
    ckpt.order = [n for n in order if n in known]
    ckpt.notes = list(dict.fromkeys(ckpt.notes))
    ckpt.tensors = {k: v for k, v in tensors.items() if k not in used}
    return ckpt


#: A layer's array fields and its BatchNorm's, as ``convbn.others`` names their tensors.
_OTHER_FIELDS = ("kernel", "bias")
_NORM_FIELDS = ("gamma", "beta", "moving_mean", "moving_var")


def _read_other(path: Path, name: str, entry: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[Any, list[str]]:
    """One ``convbn.others`` entry as a Layer, and the names of the tensors it uses."""
    from convbn.formats._common import build_norm, build_other

    stored = _layer_field(path, name, entry, "tensors", (dict,), {})
    extras = _layer_field(path, name, entry, "extras", (dict,), {})
    missing = [t for t in (*stored.values(), *extras.values()) if t not in tensors]
    if missing:
        raise ConvBNError(f"{path}: layer {name!r} names tensors that are not in the file: {missing}")
    unknown = sorted(set(stored) - {*_OTHER_FIELDS, *_NORM_FIELDS})
    if unknown:
        raise ConvBNError(f"{path}: corrupted convbn metadata: layer {name!r} names unknown fields {unknown}")
    kind = _layer_field(path, name, entry, "kind", (str,), None)
    norm = None
    norm_entry = entry.get("norm")
    if norm_entry is not None and not isinstance(norm_entry, dict):
        raise ConvBNError(f"{path}: corrupted convbn metadata: layer {name!r} has norm={_preview(norm_entry)}; "
                          "it must be an object")
    if norm_entry is not None:
        settings: dict[str, Any] = {}
        for key, kinds in (("eps", (int, float)), ("momentum", (int, float)), ("var_update", (str,)), ("groups", (int,))):
            value = norm_entry.get(key)
            if value is not None:
                settings[key] = _layer_field(path, name, norm_entry, key, kinds, None)
        norm_kind = _layer_field(path, name, norm_entry, "kind", (str,), "batch_norm")
        norm = build_norm(path, name, {f: stored[f] for f in _NORM_FIELDS if f in stored}, norm_kind,
                          **{f: tensors[stored[f]] for f in _NORM_FIELDS if f in stored}, **settings)
    fields: dict[str, Any] = {f: tensors[stored[f]] for f in _OTHER_FIELDS if f in stored}
    for key in ("stride", "dilation", "output_padding"):
        if key in entry:
            value = _layer_field(path, name, entry, key, (list,), None)
            if len(value) != 2 or not all(type(v) is int for v in value):
                raise ConvBNError(f"{path}: corrupted convbn metadata: layer {name!r} has {key}={_preview(value)}; "
                                  "it must be a list of 2 integers")
            fields[key] = tuple(value)
    if "groups" in entry:
        fields["groups"] = _layer_field(path, name, entry, "groups", (int,), 1)
    if "padding" in entry:
        padding = _layer_field(path, name, entry, "padding", (str, list), "VALID")
        fields["padding"] = padding if isinstance(padding, str) else [tuple(p) for p in padding]
    for key in ("flat_in", "flat_out"):
        value = entry.get(key)
        if value is not None:
            fields[key] = _feature_map(path, name, key, value)
    undecided = entry.get("flat_undecided", [])
    if not isinstance(undecided, list) or not all(
        isinstance(u, list) and len(u) == 2 and u[0] in ("in", "out") and u[1] in ("hwc", "chw") for u in undecided
    ):
        raise ConvBNError(f"{path}: corrupted convbn metadata: layer {name!r} has flat_undecided={_preview(undecided)}; "
                          "it must be a list of [side, order] pairs")
    if undecided:
        fields["flat_undecided"] = tuple((side, order) for side, order in undecided)
    source_names = _layer_field(path, name, entry, "source_tensors", (dict,), {})
    layer = build_other(
        path, name, source_names, kind=kind, norm=norm,
        norm_name=_layer_field(path, name, entry, "norm_name", (str,), ""),
        geometry=_layer_field(path, name, entry, "geometry", (bool,), False),
        extras={k: tensors[t] for k, t in extras.items()}, **fields,
    )
    return layer, [*stored.values(), *extras.values()]


def _feature_map(path: Path, name: str, key: str, value: Any) -> Any:
    from convbn.checkpoint import FeatureMap

    fields = value if isinstance(value, dict) else {}
    height, width, channels = (fields.get(k, 0) for k in ("height", "width", "channels"))
    order = fields.get("order", "hwc")
    sizes = (height, width, channels)
    if not isinstance(value, dict) or not all(type(v) is int and v > 0 for v in sizes) or order not in ("hwc", "chw"):
        raise ConvBNError(f"{path}: corrupted convbn metadata: layer {name!r} has {key}={_preview(value)}; it must "
                          "give a positive height, width and channels and an order 'hwc' or 'chw'")
    return FeatureMap(int(height), int(width), int(channels), order=order)


def write(
    ckpt: Checkpoint, path: Path, *, progress: Progress | None = None, max_shard_size: int | None = None
) -> None:
    """Write ``ckpt`` as a convbn safetensors file; see the module docstring.

    With ``max_shard_size`` (bytes, as :func:`convbn.convert.save_checkpoint` parses it), a
    checkpoint larger than that is written as ``<stem>-00001-of-0000N.safetensors`` shards, each with the same
    ``__metadata__``, and ``<name>.index.json``, as transformers' ``save_pretrained`` does; one that
    fits stays one file at ``path``, unless ``path`` names the index itself.
    """
    entries: list[tuple[str, np.ndarray]] = []
    layers = []
    for layer, params in ckpt.layers.items():
        entry: dict[str, Any] = {"name": layer}
        for field in ARRAY_FIELDS:
            value = getattr(params, field)
            if value is not None:
                entry[field] = f"{layer}/{field}"
                entries.append((entry[field], as_numpy(value)))
        extras = ckpt.extras.get(layer, {})
        if extras:
            entry["extras"] = {k: f"{layer}/{k}" for k in extras}
            entries += [(f"{layer}/{k}", as_numpy(v)) for k, v in extras.items()]
        entry.update(eps=params.eps, momentum=params.momentum, var_update=params.var_update)
        source = ckpt.sources.get(layer)
        if source is not None:
            entry.update(
                reason=source.reason,
                conv_name=source.conv_name,
                bn_name=source.bn_name,
                source_conv=source.conv,
                source_bn=source.bn,
                geometry=source.geometry,
            )
        # Always stored: the kernel's shape cannot tell a depthwise or grouped conv from a dense one,
        # and geometry set after reading (dataclasses.replace) must survive. ``geometry`` above says
        # whether the original file stated it.
        entry.update(stride=list(params.stride), dilation=list(params.dilation), groups=params.groups)
        entry["padding"] = params.padding if isinstance(params.padding, str) else [list(p) for p in params.padding]
        layers.append(entry)
    others = []
    last_of_other: dict[str, str] = {}  # each other layer's last tensor -> the layer, for progress
    for layer_name, other in ckpt.others.items():
        others.append(_other_entry(layer_name, other, entries))
        last_of_other[entries[-1][0]] = layer_name
    layer_names = {name for name, _ in entries}
    if len(layer_names) != len(entries):
        twice = next(n for i, (n, _) in enumerate(entries) if n in {m for m, _ in entries[:i]})
        raise ConvBNError(f"{path}: tensor name {twice!r} is used twice (two layers)")
    for key, value in ckpt.tensors.items():
        if key in layer_names:
            raise ConvBNError(f"{path}: tensor name {key!r} is used twice (a layer field and another tensor)")
        entries.append((key, as_numpy(value)))
    metadata = {
        "convbn": LAYOUT_VERSION,
        "convbn.source_format": origin_format(ckpt),
        "convbn.convention": ckpt.convention or "",
        "convbn.layers": json.dumps(layers),
        "convbn.others": json.dumps(others),
        "convbn.order": json.dumps([name for name, _ in ckpt.in_order()]),
        "convbn.dropped": json.dumps(ckpt.dropped),
        "convbn.unpaired": json.dumps(ckpt.unpaired),
        "convbn.notes": json.dumps(ckpt.notes),
        "convbn.fused": "true" if ckpt.fused else "false",
    }
    for key, value in ckpt.metadata.items():
        if key != "source_format":
            metadata[f"convbn.meta.{key}"] = str(value)
    for name, array in entries:
        if array.dtype.name not in _CODES:
            raise ConvBNError(f"{path}: tensor {name!r} has dtype {array.dtype}, which safetensors cannot store")
    layer_of = {f"{layer}/kernel": layer for layer in ckpt.layers}
    layer_of.update(last_of_other)

    def on_tensor(name: str) -> None:
        if name in layer_of:
            tick(progress, layer_of[name])

    with atomic_output(path) as tmp:
        groups = [[name for name, _ in entries]]
        if max_shard_size is not None:
            groups = split([(name, array.nbytes) for name, array in entries], max_shard_size)
        if len(groups) == 1 and not path.name.endswith(INDEX_SUFFIX):
            _write_file(tmp, entries, metadata, on_tensor)
            return
        arrays = dict(entries)
        files, index_name = shard_names(path, len(groups))
        for file, group in zip(files, groups, strict=True):
            _write_file(tmp.parent / file, [(name, arrays[name]) for name in group], metadata, on_tensor)
        weight_map = {name: file for file, group in zip(files, groups, strict=True) for name in group}
        write_index(tmp.parent, index_name, weight_map, sum(a.nbytes for _, a in entries))


def _other_entry(name: str, layer: Any, entries: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
    """The ``convbn.others`` entry of a layer that is not a conv+BatchNorm pair; its arrays are
    appended to ``entries`` as ``<name>/<field>``."""
    stored: dict[str, str] = {}
    norm = layer.norm
    values = {"kernel": layer.kernel, "bias": layer.bias}
    if norm is not None:
        values.update(gamma=norm.gamma, beta=norm.beta, moving_mean=norm.moving_mean, moving_var=norm.moving_var)
    for field, value in values.items():
        if value is not None:
            stored[field] = f"{name}/{field}"
            entries.append((stored[field], as_numpy(value)))
    entry: dict[str, Any] = {"name": name, "kind": layer.kind, "tensors": stored}
    if layer.extras:
        entry["extras"] = {k: f"{name}/{k}" for k in layer.extras}
        entries += [(f"{name}/{k}", as_numpy(v)) for k, v in layer.extras.items()]
    if norm is not None:
        settings = {"kind": norm.kind, "eps": norm.eps, "momentum": norm.momentum,
                    "var_update": norm.var_update, "groups": norm.groups}
        entry["norm"] = {k: v for k, v in settings.items() if v is not None}
    if layer.kernel is not None and layer.kind != "dense":
        entry.update(stride=list(layer.stride), dilation=list(layer.dilation), groups=layer.groups,
                     output_padding=list(layer.output_padding))
        entry["padding"] = layer.padding if isinstance(layer.padding, str) else [list(p) for p in layer.padding]
    for key in ("flat_in", "flat_out"):
        fmap = getattr(layer, key)
        if fmap is not None:
            entry[key] = {"height": fmap.height, "width": fmap.width, "channels": fmap.channels, "order": fmap.order}
    if layer.flat_undecided:
        entry["flat_undecided"] = [list(side) for side in layer.flat_undecided]
    entry.update(norm_name=layer.norm_name, geometry=layer.geometry, source_tensors=dict(layer.tensors))
    return entry


def _write_file(
    path: Path, entries: list[tuple[str, np.ndarray]], metadata: Mapping[str, str], on_tensor: Progress
) -> None:
    """One safetensors file of ``entries``, streamed a tensor at a time."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, array in entries:
        header[name] = {"dtype": _CODES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, array in entries:
            a = contiguous(array)
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            f.write(a.reshape(-1).view(np.uint8).data)
            on_tensor(name)
