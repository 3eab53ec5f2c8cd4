"""Flax variables: msgpack files of ``flax.serialization`` (``to_bytes`` / ``msgpack_serialize``)
and Orbax checkpoint directories.

Layer ``L`` is written as::

    params/L/conv/kernel  (kH, kW, I/g, O)    params/L/bn/scale    batch_stats/L/bn/mean
    params/L/conv/bias    (if it has one)     params/L/bn/bias     batch_stats/L/bn/var

(``/`` in ``L`` nests), or, when the checkpoint came from a flax file, at the paths it had there,
so ``flax.serialization.from_bytes(variables, data)`` restores it into the same model. Reading
understands any module names: a ``kernel`` of rank 4 is a conv, a module with
``batch_stats/.../{mean,var}`` a BatchNorm, and they pair by convbn's ``L/conv`` + ``L/bn``
template, linen's default names (``Conv_0`` + ``BatchNorm_0``), or order. A module of rank-4
``kernel`` is a transposed conv when named ``ConvTranspose_<n>`` (linen's default) or listed in
convbn's record (below); its kernel is read as flax's default ``transpose_kernel=False`` stores it,
``(kh, kw, in, out)`` spatially flipped (:func:`convbn.layouts.transpose_from_flax`), and written so.
Under another name it reads as a conv, with a note: the file names no layer class. A training state's
``opt_state`` and ``step`` are dropped (listed in ``Checkpoint.dropped``). Flax files store no eps or
momentum; reading assumes flax's defaults (eps 1e-5, momentum 0.99) unless overridden.

The msgpack encoding is flax's own (arrays as extension type 1 holding ``(shape, dtype name,
bytes)``, arrays over 1 GiB chunked), implemented here with ``msgpack`` alone: reading and writing
import neither flax nor JAX, and stream one tensor at a time. Reading refuses maps and lists nested
deeper than :data:`MAX_DEPTH` (100) and any array whose shape and dtype do not match its bytes.

Files convbn writes from another format carry a record of what the tree cannot say: in a msgpack
file a top-level ``convbn`` map of strings (``flax.serialization.from_bytes`` ignores keys its
target lacks), in an Orbax directory the checkpoint's custom metadata (which ``restore`` ignores):
``conv_transpose``, a JSON list of the ConvTranspose kernel modules, and ``layer_names: torch``
where modules are named after torch modules.

Orbax checkpoints (Flax's recommended format; :mod:`convbn.formats._orbax`) hold the same tree and
read into the same Checkpoint, a train state's ``opt_state`` and ``step`` dropped alike. Writing
picks the container from the name: ``*.msgpack`` is a msgpack file, any other name an Orbax
directory, as ``ocp.StandardCheckpointer().save(path, variables)`` writes it (what
``restore(path)`` reads back, and what Flax users now keep), so ``convbn convert model.pt ckpt
--to flax`` gives Orbax and ``convbn convert model.pt model.msgpack`` msgpack. Orbax needs
``orbax-checkpoint`` (``convbn[orbax]``); msgpack does not.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy as np

from convbn import layouts
from convbn._dtypes import ml_dtype
from convbn.conventions import FLAX
from convbn.errors import ConvBNError
from convbn.formats import _orbax
from convbn.formats._caps import FormatCaps
from convbn.formats._common import (
    LAYER_NAMES,
    Progress,
    add_other,
    as_numpy,
    build_layer,
    build_norm,
    build_other,
    contiguous,
    head,
    listing,
    mark_flatten_undecided,
    not_written_note,
    origin_format,
    resolve_settings,
    tick,
    torch_named,
    unstored_settings_note,
)
from convbn.formats._io import atomic_output
from convbn.formats._pairing import Unit, pair_units, source_order
from convbn.params import ConvBNParams

if TYPE_CHECKING:
    from convbn.checkpoint import Checkpoint, Layer

NAME = "flax"
#: write() honours Checkpoint.fused (conv weight + bias, no BatchNorm) and writes Checkpoint.others
#: (every layer kind; a grouped transposed conv it names as not written).
CAPS = FormatCaps(
    suffixes=(".msgpack",),
    package=("msgpack", "jax"), writes_others=True, writes_fused=True, write_options=frozenset({"progress"}),
    flatten_order="hwc", var_update="biased",
    convention="flax", directories=True, like_files=True, records_kinds=True,
)

__all__ = ["CAPS", "NAME", "read", "sniff", "write", "writes_directory"]

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_SCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
_MAX_CHUNK = 2**30  # flax's limit: msgpack objects stay below 2**31 bytes
_DROP = ("opt_state", "step")


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError:
        raise ImportError("the flax format needs msgpack: pip install msgpack (or 'convbn[jax]')") from None
    return msgpack


def sniff(path: Path) -> bool:
    """A msgpack map whose first key is a string (``.msgpack`` files from flax), or an Orbax
    checkpoint directory (see :mod:`convbn.formats._orbax`)."""
    return _orbax.is_checkpoint(path) or _sniff_msgpack(path)


def _sniff_msgpack(path: Path) -> bool:
    data = head(path, 2)
    if len(data) < 2:
        return False
    is_map = 0x81 <= data[0] <= 0x8F or data[0] in (0xDE, 0xDF)
    if not is_map:
        return False
    if data[0] in (0xDE, 0xDF):
        data = head(path, 6)[5:6] if data[0] == 0xDF else head(path, 4)[3:4]
        if not data:
            return False
        key = data[0]
    else:
        key = data[1]
    return 0xA0 <= key <= 0xBF or key in (0xD9, 0xDA, 0xDB)


# -- decoding ----------------------------------------------------------------------------------------


#: The dtypes flax writes for arrays (``np.dtype(...).name``); anything else in a file is refused.
_DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
     "float64", "bfloat16", "complex64", "complex128"]
)
#: How deeply maps and lists may nest. Flax variable trees are a few levels deep (collection,
#: modules, leaf); the bound keeps every walk over the tree far from Python's recursion limit.
MAX_DEPTH = 100


def _dtype(name: bytes | str, path: Path) -> np.dtype:
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    if text not in _DTYPES:
        raise ValueError(f"an array has dtype {text[:40]!r}, which convbn does not read (known: {sorted(_DTYPES)})")
    if text == "bfloat16":
        # msgpack decodes an array before the key it sits under, so the file is all there is to name.
        return ml_dtype(text, f"{path}: an array")
    return np.dtype(text)


def _array(shape: Any, dtype: np.dtype, buffer: Any) -> np.ndarray:
    """A view of ``buffer`` as ``shape``, once the shape's size matches the bytes there are."""
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"an array's shape must be a list of ints >= 0. Received: {str(shape)[:80]}")
    if not isinstance(buffer, bytes):
        raise ValueError(f"an array's data must be bytes. Received: {type(buffer).__name__}")
    if math.prod(shape) * dtype.itemsize != len(buffer):
        raise ValueError(
            f"an array of shape {list(shape)} {dtype} needs {math.prod(shape) * dtype.itemsize} bytes; "
            f"the file holds {len(buffer)} for it"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _ext_hook(code: int, data: bytes, path: Path) -> Any:
    msgpack = _msgpack()
    if code in (_EXT_NDARRAY, _EXT_SCALAR):
        shape, dtype, buffer = msgpack.unpackb(data, raw=True)
        array = _array(shape, _dtype(dtype, path), buffer)
        return array if code == _EXT_NDARRAY else array[()]
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    return msgpack.ExtType(code, data)


def _check_depth(tree: Any) -> None:
    """Refuse maps and lists nested deeper than MAX_DEPTH (walked without recursion)."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= MAX_DEPTH:
                    raise ValueError(f"maps and lists nest deeper than {MAX_DEPTH} levels")
                stack.append((child, depth + 1))


def _unchunk(tree: Any, where: str = "") -> Any:
    """Flax's chunked arrays (over 1 GiB) joined again; ``where`` names the node in errors."""
    if not isinstance(tree, dict):
        return tree
    if tree.get(_CHUNKED) is not True:
        return {k: _unchunk(v, f"{where}/{k}") for k, v in tree.items()}
    shape: Any = tree.get("shape")
    chunks: Any = tree.get("chunks")
    dims: list[Any] = [shape.get(str(i)) for i in range(len(shape))] if isinstance(shape, dict) else [None]
    parts: list[Any] = [chunks.get(str(i)) for i in range(len(chunks))] if isinstance(chunks, dict) else []
    if not (
        parts
        and all(type(d) is int and d >= 0 for d in dims)
        and all(isinstance(p, np.ndarray) and p.ndim == 1 and p.dtype == parts[0].dtype for p in parts)
    ):
        raise ValueError(
            f"the chunked array at {where or '/'!r} must have a shape {{'0': int, ...}} and chunks "
            "{'0': 1-D array, ...} of one dtype"
        )
    if sum(p.size for p in parts) != math.prod(dims):
        raise ValueError(
            f"the chunked array at {where!r} has shape {dims} but its chunks hold {sum(p.size for p in parts)} values"
        )
    return np.concatenate(parts).reshape(dims)


def _load(path: Path) -> dict[str, Any]:
    msgpack = _msgpack()
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(
                f, ext_hook=functools.partial(_ext_hook, path=path), raw=False, strict_map_key=False,
                max_buffer_size=max(size, 1 << 20),
            )
            tree = unpacker.unpack()
            try:
                unpacker.unpack()
            except msgpack.OutOfData:
                pass
            else:
                raise ConvBNError(f"{path}: corrupted flax msgpack file: data after the variables tree")
        if not isinstance(tree, dict):
            raise ConvBNError(f"{path}: a flax checkpoint must hold a dict of variables. Received: {type(tree).__name__}")
        _check_depth(tree)
        return _unchunk(tree)  # type: ignore[no-any-return]
    except msgpack.OutOfData:
        raise ConvBNError(f"{path}: truncated flax msgpack file") from None
    except ConvBNError:
        raise
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise ConvBNError(f"{path}: corrupted flax msgpack file: {str(exc) or type(exc).__name__}") from None


def _leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            yield from _leaves(value, path)
        else:
            yield path, value


def read(
    path: Path,
    *,
    pairs: Mapping[str, str] | None = None,
    eps: float | None = None,
    momentum: float | None = None,
    use_ema: bool = False,
) -> Checkpoint:
    """Read a flax msgpack file or Orbax checkpoint; see the module docstring."""
    if use_ema:
        raise ConvBNError(f"{path}: use_ema applies to slim checkpoints with moving-average shadows, not flax files")
    if path.is_dir():
        tree, metadata = _orbax.load(path)
        record = metadata.get(_RECORD)
        if isinstance(record, Mapping):  # an Orbax directory keeps convbn's record beside the tree
            tree = {**tree, _RECORD: record}
    else:
        tree = _load(path)
    return _from_tree(tree, path, pairs=pairs, eps=eps, momentum=momentum)


def _transposed_modules(record: Mapping[str, str], path: Path) -> set[str] | None:
    """The kernel modules (``params/...``) convbn's record names as ConvTranspose; None when the
    record predates the entry (kinds then come from names)."""
    text = record.get(_TRANSPOSED)
    if text is None:
        return None
    try:
        names = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: a list nested past Python's recursion limit
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConvBNError(
            f"{path}: the {_RECORD!r} entry's {_TRANSPOSED!r} must be a JSON list of module paths. "
            f"Received: {text[:80]!r}"
        )
    return set(names)


def _from_tree(
    tree: Mapping[str, Any], path: Path, *, pairs: Mapping[str, str] | None, eps: float | None, momentum: float | None
) -> Checkpoint:
    """The layers of a Flax variables tree (from either container), paired; everything else kept."""
    from convbn.checkpoint import Checkpoint, LayerSource

    ckpt = Checkpoint(format=NAME, convention=FLAX.name)
    ckpt.metadata["source_format"] = NAME
    record = tree.get(_RECORD) if isinstance(tree, Mapping) else None
    transposed: set[str] | None = None  # from convbn's record; None: the file does not say
    if isinstance(record, Mapping) and all(isinstance(v, str) for v in record.values()):
        if record.get(LAYER_NAMES) == "torch":
            ckpt.metadata[LAYER_NAMES] = "torch"
        transposed = _transposed_modules(record, path)
        tree = {k: v for k, v in tree.items() if k != _RECORD}
    params_root: tuple[str, ...]
    stats_root: tuple[str, ...]
    if "params" in tree and isinstance(tree["params"], Mapping):
        params_root, stats_root = ("params",), ("batch_stats",)
    else:
        params_root, stats_root = (), ("batch_stats",)
    arrays: dict[str, Any] = {}
    for leaf_path, value in _leaves(tree):
        name = "/".join(leaf_path)
        if leaf_path[0] in _DROP and params_root:
            ckpt.dropped.append(name)
        elif isinstance(value, np.ndarray):
            arrays[name] = value
        else:
            ckpt.dropped.append(name)
            ckpt.notes.append(f"dropped {name}: not an array ({type(value).__name__})")

    # Modules in first-seen order: params/<M>/<leaf> and batch_stats/<M>/<leaf>.
    modules: dict[str, dict[str, str]] = {}
    for name in arrays:
        parts = tuple(name.split("/"))
        for root in (params_root, stats_root):
            if parts[: len(root)] == root and len(parts) > len(root) + 1 and (root or parts[0] != "batch_stats"):
                module = "/".join(parts[len(root) : -1])
                modules.setdefault(module, {})[f"{'stats' if root == stats_root else 'params'}:{parts[-1]}"] = name
                break
    units: list[Unit] = []
    affine_only: list[str] = []
    undecided: list[str] = []  # 4-D kernels under names of their own, read as Conv
    for module, leaves in modules.items():
        kernel = leaves.get("params:kernel")
        vectors = {name: arrays[name].shape for leaf, name in leaves.items() if leaf != "params:kernel"}
        if kernel is not None and arrays[kernel].ndim in (2, 4) and set(leaves) <= {"params:kernel", "params:bias"}:
            kind: Literal["conv", "conv_transpose", "dense"] = "conv" if arrays[kernel].ndim == 4 else "dense"
            leaf = module.rsplit("/", 1)[-1]
            if kind == "conv" and (
                kernel.rsplit("/", 1)[0] in transposed if transposed is not None else _LINEN_TRANSPOSE.fullmatch(leaf)
            ):
                kind = "conv_transpose"
            elif kind == "conv" and transposed is None and not _LINEN_CONV.fullmatch(leaf):
                undecided.append(module)
            # A flax ConvTranspose kernel is (kh, kw, in, out) with transpose_kernel=False: out is last too.
            units.append(Unit(module, kind, int(arrays[kernel].shape[-1]), payload=leaves, vectors=vectors,
                              kernel=kernel))
        elif leaves and set(leaves) <= {"params:scale", "params:bias"} and all(
            arrays[n].ndim == 1 for n in leaves.values()
        ):
            if re.fullmatch(r"LayerNorm_\d+", module.rsplit("/", 1)[-1]):
                width = int(next(iter(arrays[n] for n in leaves.values())).shape[0])
                units.append(Unit(module, "other", width, payload=leaves, vectors=vectors))
            else:
                affine_only.append(module)
        elif {"stats:mean", "stats:var"} <= set(leaves) and set(leaves) <= {
            "stats:mean", "stats:var", "params:scale", "params:bias",
        }:
            mean = arrays[leaves["stats:mean"]].shape
            units.append(Unit(module, "bn", int(mean[0]) if len(mean) == 1 else 0, payload=leaves, vectors=vectors))
    found, unpaired = pair_units(units, explicit=pairs, source=str(path))
    used: set[str] = set()
    for entry in source_order(units, found, unpaired):
        ckpt.order.append(entry.name)
        if entry.pair is None:
            layer = _other(path, entry.unit, entry.bn, arrays, eps=eps, momentum=momentum, notes=ckpt.notes)
            add_other(ckpt, path, entry.name, layer)
            used.update(layer.tensors.values())
            continue
        pair = entry.pair
        conv, bn = pair.conv.payload, pair.bn.payload
        conv_names = {"kernel": conv["params:kernel"]}
        if "params:bias" in conv:
            conv_names["bias"] = conv["params:bias"]
        bn_names = {"moving_mean": bn["stats:mean"], "moving_var": bn["stats:var"]}
        if "params:scale" in bn:
            bn_names["gamma"] = bn["params:scale"]
        if "params:bias" in bn:
            bn_names["beta"] = bn["params:bias"]
        layer_eps, layer_momentum = resolve_settings(FLAX, NAME, eps=eps, momentum=momentum, notes=ckpt.notes)
        ckpt.layers[pair.key] = build_layer(
            path,
            pair.key,
            {**conv_names, **bn_names},
            **{field: arrays[key] for field, key in {**conv_names, **bn_names}.items()},
            eps=layer_eps,
            momentum=layer_momentum,
            var_update=FLAX.var_update,
        )
        ckpt.sources[pair.key] = LayerSource(
            conv=conv_names, bn=bn_names, reason=pair.reason, conv_name=pair.conv.name, bn_name=pair.bn.name
        )
        used.update(conv_names.values())
        used.update(bn_names.values())
    for unit in unpaired:
        if unit.kind in ("conv", "bn"):
            ckpt.unpaired[unit.name] = unit.kind
    ckpt.tensors = {k: v for k, v in arrays.items() if k not in used}
    mark_flatten_undecided(ckpt, "hwc")
    if affine_only:
        ckpt.notes.append(
            f"kept by name: {len(affine_only)} module(s) of scale and bias only ({', '.join(affine_only[:5])}): a "
            "LayerNorm or a GroupNorm (whose groups the file does not store); only linen's LayerNorm_<n> "
            "names say which"
        )
    if ckpt.layers:
        ckpt.notes.append(
            "flax files do not store stride, padding, dilation or groups: the layers keep ConvBNParams "
            "defaults (stride 1, 'SAME', groups 1); set them with dataclasses.replace"
        )
    deconvs = [name for name, layer in ckpt.others.items() if layer.kind == "conv_transpose"]
    if deconvs:
        ckpt.notes.append(
            f"read {len(deconvs)} ConvTranspose layer(s) ({', '.join(deconvs[:5])}) with kernels as flax's default "
            "transpose_kernel=False stores them ((kh, kw, in, out), spatially flipped) and no stored stride or "
            "padding (Layer defaults: stride 1, 'VALID')"
        )
    if undecided:
        shown = listing(undecided)
        ckpt.notes.append(
            f"read {len(undecided)} module(s) with a 4-D kernel as Conv ({shown}): a flax file names no layer "
            "class, and only linen's default names (Conv_<n>, ConvTranspose_<n>) or convbn's record say which; "
            "a ConvTranspose under a name of its own would read as a Conv too"
        )
    return ckpt


#: A top-level entry convbn's writer adds to a msgpack file (``flax.serialization.from_bytes``
#: ignores keys its target lacks): ``{"layer_names": "torch"}`` where the modules are named after
#: torch modules (``.`` nests), so torch -> flax -> torch comes back under the source's names.
_RECORD = "convbn"
#: The record's entry listing, as a JSON list, the kernel modules (``params/...``) that are
#: ConvTranspose layers: a flax file names no layer class, so reading would take them for Conv.
_TRANSPOSED = "conv_transpose"
#: linen's default module names, which say the class.
_LINEN_CONV = re.compile(r"Conv_\d+")
_LINEN_TRANSPOSE = re.compile(r"ConvTranspose_\d+")
#: flax.linen.LayerNorm's default epsilon.
_LAYER_NORM_EPS = 1e-6


def _other(
    path: Path, unit: Unit, bn: Unit | None, arrays: Mapping[str, np.ndarray], *,
    eps: float | None, momentum: float | None, notes: list[str],
) -> Layer:
    """A layer that is not a conv+BatchNorm pair: a conv or dense layer (with the BatchNorm after
    it), a standalone BatchNorm, or a LayerNorm."""
    tensors: dict[str, str] = {}
    norm = None
    norm_unit = unit if unit.kind in ("bn", "other") else bn
    if norm_unit is not None:
        leaves = norm_unit.payload
        fields = {"params:scale": "gamma", "params:bias": "beta", "stats:mean": "moving_mean", "stats:var": "moving_var"}
        names = {fields[leaf]: name for leaf, name in leaves.items() if leaf in fields}
        if unit.kind == "other":
            settings: dict[str, Any] = {"eps": eps if eps is not None else _LAYER_NORM_EPS}
            kind = "layer_norm"
        else:
            layer_eps, layer_momentum = resolve_settings(FLAX, NAME, eps=eps, momentum=momentum, notes=notes)
            settings = {"eps": layer_eps, "momentum": layer_momentum, "var_update": FLAX.var_update}
            kind = "batch_norm"
        norm = build_norm(path, norm_unit.name, names, kind, **{f: arrays[n] for f, n in names.items()}, **settings)
        tensors.update(names)
    if unit.kind in ("bn", "other"):
        assert norm is not None
        return build_other(path, unit.name, tensors, kind=norm.kind, norm=norm)
    own = {"kernel": unit.payload["params:kernel"]}
    if "params:bias" in unit.payload:
        own["bias"] = unit.payload["params:bias"]
    kernel = arrays[own["kernel"]]
    if unit.kind == "conv_transpose":
        kernel = np.ascontiguousarray(layouts.transpose_from_flax(kernel))
    return build_other(
        path, unit.name, {**own, **tensors}, kind=unit.kind, kernel=kernel,
        bias=arrays[own["bias"]] if "bias" in own else None, norm=norm, norm_name=bn.name if bn else "",
    )


# -- encoding ----------------------------------------------------------------------------------------


def _set(tree: dict[str, Any], path: str, value: Any, where: Path) -> None:
    parts = path.split("/")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConvBNError(f"{where}: the path {path!r} runs through the tensor {part!r}")
        node = child
    if parts[-1] in node:
        raise ConvBNError(f"{where}: the path {path!r} is used twice")
    node[parts[-1]] = value


def _ext_header(n: int, code: int) -> bytes:
    if n in (1, 2, 4, 8, 16):
        return bytes([{1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}[n], code])
    if n < 1 << 8:
        return bytes([0xC7, n, code])
    if n < 1 << 16:
        return b"\xc8" + n.to_bytes(2, "big") + bytes([code])
    return b"\xc9" + n.to_bytes(4, "big") + bytes([code])


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return bytes([0xC4, n])
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _pack_array(f: BinaryIO, array: np.ndarray, msgpack: Any) -> None:
    """Flax's ndarray extension, written without building it in memory."""
    a = contiguous(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    body = b"\x93" + msgpack.packb(list(a.shape)) + msgpack.packb(a.dtype.name) + _bin_header(a.nbytes)
    f.write(_ext_header(len(body) + a.nbytes, _EXT_NDARRAY))
    f.write(body)
    f.write(a.reshape(-1).view(np.uint8).data)


def _pack(f: BinaryIO, tree: Mapping[str, Any], msgpack: Any, progress: Any) -> None:
    packer = msgpack.Packer(use_bin_type=True)
    f.write(packer.pack_map_header(len(tree)))
    for key, value in tree.items():
        f.write(packer.pack(key))
        if isinstance(value, Mapping):
            _pack(f, value, msgpack, progress)
            continue
        if isinstance(value, (bool, int, float, str)):
            f.write(packer.pack(value))
            continue
        array = as_numpy(value)
        if array.nbytes > _MAX_CHUNK:
            flat = contiguous(array).reshape(-1)
            step = max(1, _MAX_CHUNK // array.dtype.itemsize)
            chunks = {str(i): flat[s : s + step] for i, s in enumerate(range(0, flat.size, step))}
            _pack(f, {_CHUNKED: True, "shape": {str(i): d for i, d in enumerate(array.shape)}, "chunks": chunks},
                  msgpack, None)
        else:
            _pack_array(f, array, msgpack)
        if progress is not None:
            progress(id(value))


def _other_tree(name: str, layer: Layer, *, exact: bool) -> dict[str, Any]:
    """A layer that is not a conv+BatchNorm pair as flax variables: at its source paths when
    ``exact`` (a flax source), else under ``params/<name>`` (a torch module path nests at ``.``)
    and, for the BatchNorm after it, ``layer.norm_name`` (else ``<name>_bn``)."""
    names = dict(layer.tensors) if exact else {}

    def nest(module: str) -> str:
        return module.replace(".", "/")  # a torch module path nests; Orbax keys hold no dots

    module = nest(name)
    norm_module = nest(layer.norm_name) if layer.norm_name else module if layer.kernel is None else f"{module}_bn"
    out: dict[str, Any] = {}
    if layer.kernel is not None:
        kernel = as_numpy(layer.kernel)
        if layer.kind == "conv_transpose":
            kernel = np.ascontiguousarray(layouts.transpose_to_flax(kernel))  # transpose_kernel=False
        out[names.get("kernel", f"params/{module}/kernel")] = kernel
        if layer.bias is not None:
            out[names.get("bias", f"params/{module}/bias")] = as_numpy(layer.bias)
    norm = layer.norm
    if norm is not None:
        ref = next(v for v in (norm.moving_mean, norm.gamma, norm.beta) if v is not None)
        n, dtype = int(np.shape(ref)[0]), np.asarray(ref).dtype
        if norm.gamma is not None or norm.beta is not None or not exact:
            out[names.get("gamma", f"params/{norm_module}/scale")] = norm.gamma if norm.gamma is not None else np.ones(n, dtype)
            out[names.get("beta", f"params/{norm_module}/bias")] = norm.beta if norm.beta is not None else np.zeros(n, dtype)
        if norm.kind == "batch_norm":
            out[names.get("moving_mean", f"batch_stats/{norm_module}/mean")] = norm.moving_mean
            out[names.get("moving_var", f"batch_stats/{norm_module}/var")] = norm.moving_var
    return out


def writes_directory(path: Path) -> bool:
    """Whether writing at ``path`` makes an Orbax directory (any name but ``*.msgpack``)."""
    return path.suffix.lower() != ".msgpack"


def _numpy_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``tree`` with every array as NumPy (Orbax saves NumPy and JAX arrays, not torch tensors)."""
    return {
        k: _numpy_tree(v) if isinstance(v, Mapping) else v if isinstance(v, (bool, int, float, str)) else as_numpy(v)
        for k, v in tree.items()
    }


def write(ckpt: Checkpoint, path: Path, *, progress: Progress | None = None) -> None:
    """Write ``ckpt`` as flax variables: a msgpack file when ``path`` ends in ``.msgpack``, else an
    Orbax checkpoint directory; see the module docstring."""
    same_format = origin_format(ckpt) == NAME
    # torch module names only where the file can say so (an Orbax directory keeps convbn's template).
    named = torch_named(ckpt) and not same_format and not writes_directory(path)
    ordered = ckpt.in_feature_order("hwc")  # flax flattens NHWC maps: a dense layer's features in that order
    ckpt.others, ckpt.notes[:] = ordered.others, ordered.notes
    tree: dict[str, Any] = {}
    last_array: dict[int, str] = {}
    unwritten: list[str] = []
    transposed: dict[str, str] = {}  # layer -> the kernel's module path
    for layer, item in ckpt.in_order():
        if not isinstance(item, ConvBNParams):
            if item.kind == "conv_transpose" and item.groups > 1:
                unwritten.append(layer)
                continue
            for name, value in _other_tree(layer, item, exact=same_format).items():
                _set(tree, name, value, path)
                last_array[id(value)] = layer
                if item.kind == "conv_transpose" and value is not None and np.ndim(value) == 4:
                    transposed[layer] = name.rsplit("/", 1)[0]
            continue
        params = item
        source = ckpt.sources.get(layer)
        names: dict[str, str]
        if named and source is not None and source.conv_name and source.bn_name:
            conv_module = "params/" + source.conv_name.replace(".", "/")
            bn_module = source.bn_name.replace(".", "/")
            names = {
                "kernel": f"{conv_module}/kernel", "bias": f"{conv_module}/bias",
                "gamma": f"params/{bn_module}/scale", "beta": f"params/{bn_module}/bias",
                "moving_mean": f"batch_stats/{bn_module}/mean", "moving_var": f"batch_stats/{bn_module}/var",
            }
            affine = True
        elif same_format and source is not None and "kernel" in source.conv and "moving_mean" in source.bn:
            conv_module = source.conv["kernel"].rsplit("/", 1)[0]
            stats_module = source.bn["moving_mean"].rsplit("/", 1)[0]
            affine_name = source.bn.get("gamma") or source.bn.get("beta")
            bn_params = (
                affine_name.rsplit("/", 1)[0]
                if affine_name
                else "params" + stats_module[len("batch_stats"):]
            )
            names = {
                "kernel": f"{conv_module}/kernel",
                "bias": f"{conv_module}/bias",
                "gamma": f"{bn_params}/scale",
                "beta": f"{bn_params}/bias",
                "moving_mean": f"{stats_module}/mean",
                "moving_var": f"{stats_module}/var",
            }
            affine = "gamma" in source.bn or "beta" in source.bn
        else:
            names = {
                "kernel": f"params/{layer}/conv/kernel",
                "bias": f"params/{layer}/conv/bias",
                "gamma": f"params/{layer}/bn/scale",
                "beta": f"params/{layer}/bn/bias",
                "moving_mean": f"batch_stats/{layer}/bn/mean",
                "moving_var": f"batch_stats/{layer}/bn/var",
            }
            affine = True
        n = params.out_channels
        dtype = np.asarray(params.moving_mean).dtype
        fields: dict[str, Any] = {"kernel": params.kernel, "bias": params.bias}
        if not ckpt.fused:
            if affine or params.gamma is not None or params.beta is not None:
                fields["gamma"] = params.gamma if params.gamma is not None else np.ones(n, dtype)
                fields["beta"] = params.beta if params.beta is not None else np.zeros(n, dtype)
            fields["moving_mean"] = params.moving_mean
            fields["moving_var"] = params.moving_var
        written = None
        for field, value in fields.items():
            if value is not None:
                _set(tree, names[field], value, path)
                written = value
        last_array[id(written)] = layer
    if ckpt.tensors:
        if same_format:
            for key, value in ckpt.tensors.items():
                _set(tree, key, value, path)
        else:
            ckpt.notes.append(not_written_note(ckpt))
    if unwritten:
        ckpt.notes.append(
            f"not written: {len(unwritten)} grouped transposed conv(s) ({', '.join(unwritten[:5])}): flax's "
            "ConvTranspose has no feature groups"
        )
    if transposed:
        _transposed_note(ckpt, transposed)
    if not ckpt.fused:
        unstored_settings_note(ckpt, NAME, FLAX)
    record: dict[str, str] = {}
    if named:
        record[LAYER_NAMES] = "torch"
    if transposed or not same_format:
        # Which 4-D kernels are ConvTranspose: without it, reading takes names of their own for Conv.
        record[_TRANSPOSED] = json.dumps(sorted(set(transposed.values())))

    if writes_directory(path):
        if path.exists():
            raise ConvBNError(
                f"{path} exists; an Orbax checkpoint is written as a new directory, never into or over "
                "an existing one (as Orbax itself refuses): remove it or name another"
            )
        with atomic_output(path) as tmp:
            # Orbax saves arrays only; the record goes in its custom metadata, which restore() ignores.
            _orbax.save(_numpy_tree(tree), tmp, custom_metadata={_RECORD: record} if record else None)
        for layer in ckpt.layers:  # Orbax writes the tree at once
            tick(progress, layer)
        return
    msgpack = _msgpack()

    def on_array(array_id: int) -> None:
        layer = last_array.get(array_id)
        if layer is not None:
            tick(progress, layer)

    if record:
        tree[_RECORD] = record  # flax.serialization.from_bytes ignores keys its target lacks
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        _pack(f, tree, msgpack, on_array if progress is not None else None)


def transpose_padding(layer: Layer) -> str:
    """The ``padding=`` of the ``flax.linen.ConvTranspose`` (``transpose_kernel=False``) that keeps
    the outputs a transposed conv of ``layer``'s geometry keeps (:mod:`convbn.conv_transpose`):
    ``'SAME'`` for SAME (flax's equals TF's crop), else per-side pads of the stride-dilated input,
    ``(k_eff - 1 - top, k_eff - 1 - bottom + output_padding)`` per dim.

    Example:
        >>> from convbn.checkpoint import Layer
        >>> transpose_padding(Layer("conv_transpose", kernel=np.zeros((5, 5, 3, 8)), padding=((2, 2), (2, 2)),
        ...                         output_padding=(1, 1)))
        '((2, 3), (2, 3))'
    """
    if layer.padding == "SAME":
        return "'SAME'"
    pads = []
    for dim in range(2):
        k_eff = (int(np.shape(layer.kernel)[dim]) - 1) * layer.dilation[dim] + 1
        top, bottom = (0, 0) if layer.padding == "VALID" else layer.padding[dim]
        pads.append((k_eff - 1 - top, k_eff - 1 - bottom + layer.output_padding[dim]))
    return str(tuple(pads))


def _transposed_note(ckpt: Checkpoint, transposed: Mapping[str, str]) -> None:
    """What to build the ConvTranspose layers with: flax files store no geometry."""
    by_geometry: dict[str, list[str]] = {}
    unknown = []
    for name in transposed:
        layer = ckpt.others[name]
        if not layer.geometry:
            unknown.append(name)
            continue
        strides = tuple(layer.stride)
        dilation = "" if layer.dilation == (1, 1) else f", kernel_dilation={tuple(layer.dilation)}"
        key = f"strides={strides}, padding={transpose_padding(layer)}{dilation}"
        by_geometry.setdefault(key, []).append(name)
    parts = [f"{key} for {', '.join(names[:5])}" for key, names in by_geometry.items()]
    if unknown:
        parts.append(f"the stride and padding of the model for {', '.join(unknown[:5])} (the source does not state them)")
    ckpt.notes.append(
        f"wrote {len(transposed)} transposed conv(s) as flax ConvTranspose kernels for transpose_kernel=False "
        f"((kh, kw, in, out), spatially flipped); flax files store no geometry: build them with {'; '.join(parts)}"
    )
