"""Keras weights: Keras 3 ``.weights.h5`` and ``.keras`` archives, Keras 2 / tf_keras ``.h5``.

All hold an HDF5 file laid out by layer, read here with h5py alone (no TensorFlow, no Keras).
Keras 3 (``model.save_weights("x.weights.h5")``, and inside a ``.keras``)::

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

Keras 2 (tf_keras ``model.save_weights("x.h5")``; keras.applications' weight files)::

    attrs["layer_names"]                         every layer, in the model's order (``model.layers``)
    conv2d/                                      attrs["weight_names"]: ["conv2d/kernel:0", ...]
    conv2d/conv2d/kernel:0                       a dataset at ``layer/weight_name``
    depthwise_conv2d/.../depthwise_kernel:0      (kH, kW, C, m): read as the grouped (kH, kW, 1, C*m)

A whole-model file (``model.save("m.h5")``) keeps the same under ``model_weights`` and adds the
``model_config`` attribute: JSON, read as data for the graph, geometry, eps, momentum and
``fused``; no layer's code (a Lambda's marshalled bytecode) is ever run, and the optimizer's
weights are dropped and listed. The weight names give each layer's kind and fields, so a layer
without gamma (``scale=False``) needs no config; a layer holding several scopes' weights (a nested
model, transformers' TF models) gives one layer per scope. Without a config (and for a nested
model's layers, which the top-level graph does not describe), convs pair by naming, then with a
BatchNorm right after them in layer order. A Keras 2 BatchNorm trains on its default fused path,
which updates the moving variance with the unbiased batch variance (``conventions.KERAS2_FUSED``;
``fused=False`` in the config: biased). SeparableConv2D, Conv2DTranspose and Dense weights stay
other tensors.

Reading stays inside the file and within what it holds (each a one-line ConvBNError naming the
file and the HDF5 object otherwise): external links, external raw storage and virtual datasets are
refused, as are soft links and a second hard link to one object (loops, cycles); a dataset must
store the bytes it declares (a compressed one at most 1032x, deflate's own limit, and all of them
together at most the file's size) and hold numbers; config.json is read at most 64 MiB far and
the settings it gives are type-checked. Text attributes (``layer_names``, ``weight_names``,
``name``) keep their strings in the file's global heap collections, which libhdf5 parses without
bounds: an object of zero bytes that is not the last spins it forever, and one past the collection's
end reads past it. So before the first one is read, every collection in the file (found by its
``GCOL`` signature) must be tiled by its objects (:func:`_heap_problem`).

Writing produces groups that a Keras 3 model whose Conv2D/BatchNormalization layers come in
checkpoint order loads with ``model.load_weights``: the k-th Conv2D reads ``conv2d_k``, the k-th
BatchNormalization ``batch_normalization_k``, whatever other layers lie between. A checkpoint read
from Keras and written as ``.weights.h5`` goes back to its original groups, with every other
tensor. A ``.keras`` archive gets a config of its own: one independent ``Input → Conv2D →
BatchNormalization`` branch per layer, with the layers' geometry, eps and momentum, so
``keras.saving.load_model`` rebuilds it and ``load_weights`` fills any model with these layers.

Any other ``*.h5`` (or ``*.hdf5``) gets the Keras 2 layout, which tf_keras's
``model.load_weights("x.h5")`` reads (by layer order, or ``by_name=True``) and Keras 3's too (its
legacy-h5 loading, by order). Each layer is a conv layer named after the checkpoint's layer
(``layer1.0.conv1`` -> ``layer1_0_conv1``) followed by its BatchNormalization ``<conv>_bn``, so a
tf_keras model whose convs and BatchNorms come in checkpoint order (and no other layers with
weights) loads it by order, and one named so loads it by name. A depthwise conv (``groups ==
in_channels``) is written as tf_keras's DepthwiseConv2D (``depthwise_kernel``, as keras.applications
builds MobileNets), any other as Conv2D. A checkpoint read from a Keras 2 file goes back to its
own layers and weight names, every other tensor included. eps and momentum are not stored (load
into BatchNorms built with them, as the report says).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import lzma
import os
import re
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from convbn._dtypes import keras_float_name, ml_dtype
from convbn.conventions import KERAS2_FUSED, KERAS3
from convbn.errors import ConvBNError
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
    mark_flatten_undecided,
    not_written_note,
    origin_format,
    others_as_tensors,
    resolve_settings,
    tick,
    torch_named,
    unstored_settings_note,
)
from convbn.formats._io import atomic_output
from convbn.formats._pairing import Unit, natural_key, pair_units, source_order
from convbn.params import ConvBNParams

if TYPE_CHECKING:
    from convbn.checkpoint import Checkpoint, Layer, Norm

NAME = "keras"
#: write() honours Checkpoint.fused (conv weight + bias, no BatchNorm) and writes Checkpoint.others
#: (every layer kind) to Keras 3 files; the Keras 2 layout keeps writing pairs only, and names the
#: rest as not written. The file's name decides the moving-variance update (target_var_update).
CAPS = FormatCaps(
    suffixes=(".keras", ".h5", ".hdf5"),
    package=("h5py", "keras"), writes_others=True, writes_fused=True, write_options=frozenset({"progress"}),
    flatten_order="hwc", var_update="by_path",
    convention="keras3", like_files=True, records_kinds=True,
)

__all__ = ["CAPS", "NAME", "read", "sniff", "target_var_update", "write"]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: Opens the HDF5 file's bytes again (the file, or the archive's member), to check them raw.
_Opener = Callable[[], AbstractContextManager[IO[bytes]]]
_KERAS_MEMBERS = ("metadata.json", "config.json", "model.weights.h5")
_CONV_GROUP = re.compile(r"conv2d(_\d+)?")
_BN_GROUP = re.compile(r"batch_normalization(_\d+)?")
_BN_FIELDS = ("gamma", "beta", "moving_mean", "moving_var")
#: Keras 2 files: the root attribute listing the layers, the group a whole-model file keeps them
#: in, and that file's model config attribute.
_LAYER_NAMES, _LEGACY_MODEL, _LEGACY_CONFIG = "layer_names", "model_weights", "model_config"
#: Checkpoint.metadata key of a Keras 2 file's ``[[layer, [weight names]], ...]`` (JSON), so that
#: writing it back as .h5 gives every layer its weights in the order load_weights expects.
_LEGACY_ORDER = "keras2_layers"
#: A Keras 2 weight's role (its name's last part) -> the ConvBNParams field.
_LEGACY_FIELDS = {"kernel": "kernel", "depthwise_kernel": "kernel", "bias": "bias", "gamma": "gamma",
                  "beta": "beta", "moving_mean": "moving_mean", "moving_variance": "moving_var"}
_CONV_CLASSES = ("Conv2D", "DepthwiseConv2D")
#: Layers a BatchNorm after them in the config's graph belongs to (a Dense + BatchNorm1d-like pair,
#: DCGAN's deconv + BatchNorm), as convbn's own record and the weights-only order pair them.
_PRODUCER_CLASSES = (*_CONV_CLASSES, "Conv2DTranspose", "Dense")
#: The Keras 3 class a ``layers/<group>`` name is the snake case of (Keras names groups after the
#: class, with a per-class counter).
_GROUP_CLASSES = {
    "depthwise_conv2d": "DepthwiseConv2D", "conv2d_transpose": "Conv2DTranspose", "dense": "Dense",
    "layer_normalization": "LayerNormalization", "group_normalization": "GroupNormalization",
}
#: Names that write() gives the Keras 2 layout (what Keras's load_weights reads as legacy h5).
_LEGACY_SUFFIXES = (".h5", ".hdf5")
#: What one HDF5 attribute may hold in an object header; tf_keras splits longer name lists.
_HEADER_LIMIT = 64512
#: config.json is read at most this far: a real model's config is a few MB, and a zip bomb must
#: not become gigabytes of JSON in memory.
_CONFIG_LIMIT = 64 << 20
#: How far a compressed dataset or archive member may expand: deflate's own ceiling is ~1032:1.
_MAX_EXPANSION = 1032
#: What h5py raises for a corrupt or truncated file, by the layer it fails in.
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


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
    """A Keras layer's weights: its h5 group, its name and its variables in order.

    ``roles`` are the Keras 2 weight names' last parts (``kernel``, ``depthwise_kernel``, ``gamma``,
    ...), one per array; Keras 3 files name their variables by position only (None). ``top`` says
    whether the layer is one of the model's own, which its config entry describes.
    """

    def __init__(self, path: str, name: str, arrays: list[tuple[str, np.ndarray]], *,
                 roles: list[str] | None = None, top: bool | None = None) -> None:
        self.path = path
        self.name = name
        self.arrays = arrays
        self.roles = roles
        self.top = path.count("/") == 1 if top is None else top


@dataclasses.dataclass
class _Contents:
    """What an HDF5 weights file holds: layer groups, other datasets, what was dropped, the model
    config if the file has one, and for a Keras 2 file its layers' weight names in file order."""

    groups: list[_Group]
    loose: dict[str, np.ndarray]
    dropped: list[str]
    config: dict[str, Any] | None = None
    legacy: list[list[Any]] | None = None
    recorded: dict[str, Any] | None = None


class _Reader:
    """Walks an HDF5 file and reads its datasets without ever leaving it.

    HDF5 can point outside the file in three ways: external links, datasets with external raw
    storage, and virtual datasets; a hostile file uses them to copy another file (``/etc/passwd``)
    into the checkpoint, so all three are refused before any data is read. Soft links are refused
    too (Keras never writes them, and they make loops and dangling names), and every object must be
    reached by one hard link only (a second one makes cycles, or reads the same bytes many times).
    A dataset may materialize only bytes the file stores: without a filter, its storage must cover
    its size (an unwritten dataset would expand to its fill value); with one (gzip), at most
    ``_MAX_EXPANSION`` times its storage; and all datasets' storage together must fit in the file.
    """

    def __init__(self, source: Path, h5py: Any, size: int, raw: _Opener) -> None:
        self.source = source
        self.h5py = h5py
        self.size = size
        self.left = size  # bytes of the file not yet claimed by a dataset's storage
        self.seen: set[int] = set()
        self.raw = raw  # the HDF5 file's bytes, for the global heaps' check
        self.heaps_checked = False

    def fail(self, where: str, problem: str) -> ConvBNError:
        return ConvBNError(f"{self.source}: {problem}. Received: HDF5 object {where!r}")

    def walk(self, group: Any, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
        """``("vars", path, group)`` for layer groups, ``("dataset", path, ds)`` for other datasets."""
        h5py = self.h5py
        for key in sorted(group.keys(), key=natural_key):
            path = f"{prefix}/{key}" if prefix else key
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise self.fail(path, f"a Keras weights file must hold its data itself; this is an external link "
                                      f"to {link.filename!r}:{link.path!r}")
            if not isinstance(link, h5py.HardLink):
                target = getattr(link, "path", None)
                raise self.fail(path, f"a Keras weights file has no links between its objects; this is a soft link "
                                      f"to {target!r}" if target is not None else "an HDF5 link of an unknown kind")
            item = group[key]
            address = h5py.h5o.get_info(item.id).addr
            if address in self.seen:
                raise self.fail(path, "every HDF5 object must be reached by one link; this is a second link to an "
                                      "object already read (a cycle?)")
            self.seen.add(address)
            if isinstance(item, h5py.Group):
                if key == "vars":
                    yield "vars", prefix, item
                else:
                    yield from self.walk(item, path)
            elif isinstance(item, h5py.Dataset):
                yield "dataset", path, item
            else:
                raise self.fail(path, f"a Keras weights file holds groups and datasets; this is a {type(item).__name__}")

    def read(self, ds: Any, where: str) -> np.ndarray:
        """The dataset's values, once its layout, dtype and size are checked (see the class)."""
        h5d = self.h5py.h5d
        plist = ds.id.get_create_plist()
        layout = plist.get_layout()
        if layout == getattr(h5d, "VIRTUAL", -1):
            raise self.fail(where, "a Keras dataset must keep its data in the file; this is a virtual dataset "
                                   "(its data lies in other files)")
        if plist.get_external_count():
            raise self.fail(where, "a Keras dataset must keep its data in the file; this one uses external "
                                   "storage in another file")
        if layout not in (h5d.COMPACT, h5d.CONTIGUOUS, h5d.CHUNKED):
            raise self.fail(where, f"a Keras dataset has a compact, contiguous or chunked layout; this one has layout {layout}")
        dtype = ds.dtype
        if dtype.kind not in "biufcV" or dtype.fields is not None or dtype.subdtype is not None:
            raise self.fail(where, f"a Keras dataset must hold numbers; this one has dtype {dtype}")
        if ds.shape is None:
            raise self.fail(where, "a Keras dataset must have a shape; this one has an empty (null) dataspace")
        nbytes = int(np.prod(ds.shape, dtype=object)) * dtype.itemsize
        stored = ds.id.get_storage_size()
        filtered = layout == h5d.CHUNKED and plist.get_nfilters() > 0
        if nbytes > stored * (_MAX_EXPANSION if filtered else 1) or stored > self.left:
            raise self.fail(
                where,
                f"a dataset may hold only data the file stores; this one declares {nbytes} bytes "
                f"(shape {tuple(ds.shape)}, {dtype}) and stores {stored}"
                + (f" compressed (at most {_MAX_EXPANSION}x expansion)" if filtered else "")
                + (f", more than the {self.left} bytes of the file left" if stored > self.left else ""),
            )
        self.left -= stored
        value = np.asarray(ds[()])
        if dtype.kind == "V":
            # Keras 3 stores bfloat16 as 2-byte opaque data marked dtype='bfloat16' (saving_lib's
            # H5Entry); an opaque dataset without that mark holds no numbers Keras would read.
            marked = ds.attrs.get("dtype")
            if isinstance(marked, bytes):
                marked = marked.decode("utf-8", "replace")
            if marked != "bfloat16" or dtype.itemsize != 2:
                raise self.fail(where, f"a Keras dataset must hold numbers; this one has opaque dtype {dtype} "
                                       f"marked dtype={marked!r} (Keras marks only 2-byte bfloat16 data)")
            value = value.view(ml_dtype("bfloat16", f"{self.source}: dataset {where!r}"))
        return value

    def layer_name(self, item: Any, where: str) -> str:
        """The layer's name (the ``vars`` group's ``name`` attribute), else its group's."""
        if "name" not in item.attrs:
            return where.rsplit("/", 1)[-1]
        value = _attribute(self, item, "name", f"{where}/vars")
        if isinstance(value, bytes):
            try:
                value = value.decode()
            except UnicodeDecodeError:
                raise self.fail(f"{where}/vars", f"a layer name must be UTF-8 text, not {value!r}") from None
        if not isinstance(value, str):
            raise self.fail(f"{where}/vars", f"a layer name must be text, not {type(value).__name__}")
        return value


def _read_h5(f: Any, path: Path, h5py: Any, size: int, raw: _Opener) -> _Contents:
    reader = _Reader(path, h5py, size, raw)
    where = "/"
    try:
        if "layers" not in f:
            if _LAYER_NAMES in f.attrs or f"{_LAYER_NAMES}0" in f.attrs or _LEGACY_MODEL in f:
                return _read_legacy(f, reader)
            keys = sorted(f.keys())[:5]
            raise ConvBNError(
                f"{path}: not a Keras weights file: it has neither Keras 3's 'layers' group nor Keras 2's "
                f"'layer_names' attribute (top level: {keys})"
            )
        groups: list[_Group] = []
        loose: dict[str, np.ndarray] = {}
        dropped: list[str] = []
        for kind, where, item in reader.walk(f):
            if where.split("/")[0] == "optimizer":
                if kind == "vars":
                    dropped += [f"{where}/vars/{k}" for k in sorted(item.keys(), key=natural_key)]
                else:
                    dropped.append(where)
                continue
            if kind == "dataset":
                loose[where] = reader.read(item, where)
                continue
            arrays = [(name, reader.read(ds, name)) for _, name, ds in reader.walk(item, f"{where}/vars")]
            if arrays:
                groups.append(_Group(where, reader.layer_name(item, where), arrays))
        where = "/"
        recorded = _recorded(_attribute(reader, f, _RECORD, "/"), path) if _RECORD in f.attrs else None
    except ConvBNError:
        raise
    except (*_H5_ERRORS, UnicodeDecodeError, RecursionError) as exc:
        raise ConvBNError(f"{path}: truncated or corrupted Keras weights under {where!r}: {_first_line(exc)}") from None
    return _Contents(groups, loose, dropped, recorded=recorded)


#: The root attribute in which convbn's writer records what a .weights.h5 does not: each layer's
#: kind and the BatchNorm after it, in model order, and whether the names are torch module paths.
#: JSON ``{"layer_names": "torch" (optional), "layers": [[name, kind, norm name or ""], ...]}``.
#: Keras ignores it.
_RECORD = "convbn"


def _recorded(value: Any, path: Path) -> dict[str, Any]:
    """The ``convbn`` attribute parsed and type-checked (see ``_RECORD``)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        data = json.loads(value) if isinstance(value, str) else None
    except (ValueError, RecursionError):
        data = None
    layers = data.get("layers") if isinstance(data, dict) else None
    ok = isinstance(layers, list) and all(
        isinstance(e, list) and len(e) == 3 and all(isinstance(v, str) for v in e) for e in layers
    ) and isinstance(data, dict) and isinstance(data.get("layer_names", ""), str)
    if not ok:
        raise ConvBNError(f"{path}: the root attribute {_RECORD!r} must be convbn's JSON record of the layers. "
                          f"Received: {_shown(value)}")
    assert isinstance(data, dict)
    return data


def _read_legacy(f: Any, reader: _Reader) -> _Contents:
    """A Keras 2 file: the layers ``layer_names`` lists, each with the datasets its ``weight_names``
    lists (at ``layer/weight_name``); a whole-model file keeps them under ``model_weights`` and
    its ``model_config`` (JSON, read as data: no layer's code is ever run) beside them.

    Every object is walked first (links, cycles and external data refused as for Keras 3); the
    names in the attributes are then looked up among what the walk found, so an attribute cannot
    lead anywhere else. Datasets no layer lists are kept as other tensors; everything outside
    ``model_weights`` (the optimizer's state) is dropped and listed.
    """
    whole = _LAYER_NAMES not in f.attrs and f"{_LAYER_NAMES}0" not in f.attrs
    prefix = f"{_LEGACY_MODEL}/" if whole else ""
    datasets: dict[str, tuple[str, Any]] = {}  # name within the weights -> (HDF5 path, dataset)
    dropped: list[str] = []
    for kind, where, item in reader.walk(f):
        if kind == "vars":
            raise reader.fail(f"{where}/vars", "a Keras 2 file names its weights in 'weight_names'; a 'vars' "
                                               "group is Keras 3's layout, and the two do not mix")
        if where.startswith(prefix):
            datasets[where[len(prefix):]] = (where, item)
        else:
            dropped.append(where)
    root = f[_LEGACY_MODEL] if whole else f
    config = _parse_config(_attribute(reader, f, _LEGACY_CONFIG, "/"), reader.source, _LEGACY_CONFIG) \
        if _LEGACY_CONFIG in f.attrs else None
    groups: list[_Group] = []
    order: list[list[Any]] = []
    layers = _names(reader, root, _LAYER_NAMES, prefix or "/")
    if layers is None:
        raise reader.fail(_LEGACY_MODEL, "a Keras 2 model file lists its layers in model_weights' "
                                         "'layer_names' attribute; this one has none")
    for layer in layers:
        if layer not in root or not isinstance(root[layer], reader.h5py.Group):
            raise reader.fail(prefix or "/", f"layer_names lists layer {layer!r}, which the file has no group for")
        weights = _names(reader, root[layer], "weight_names", f"{prefix}{layer}") or []
        arrays: dict[str, list[tuple[str, np.ndarray]]] = {}
        for weight in weights:
            name = f"{layer}/{weight}"
            if name not in datasets:
                raise reader.fail(f"{prefix}{layer}", f"weight_names lists {weight!r}, which the file has no "
                                                      f"dataset for at {prefix}{name!r}")
            where, ds = datasets.pop(name)
            scope = weight.rsplit("/", 1)[0] if "/" in weight else layer
            arrays.setdefault(scope, []).append((name, reader.read(ds, where)))
        if weights:
            order.append([layer, weights])
        for scope, items in arrays.items():
            # One scope is the layer itself; several are a nested model's layers, named by their scope.
            own = len(arrays) == 1
            roles = [n.rsplit("/", 1)[-1].split(":", 1)[0] for n, _ in items]
            groups.append(_Group(layer if own else f"{layer}/{scope}", layer if own else scope, items,
                                 roles=roles, top=own))
    loose = {name: reader.read(ds, where) for name, (where, ds) in datasets.items()}
    return _Contents(groups, loose, dropped, config, order)


def _attribute(reader: _Reader, obj: Any, key: str, where: str) -> Any:
    """An HDF5 attribute's value, once it is known to hold at most what the file does: its own
    storage (in the object's header) within the file, and for text, the global heaps sound."""
    try:
        attr = obj.attrs.get_id(key)
        try:
            stored = attr.get_storage_size()
        except RuntimeError:  # h5py takes libhdf5's size 0 (an empty attribute) for a failure
            stored = 0
        if stored > reader.size:
            raise reader.fail(where, f"attribute {key!r} declares {stored} bytes of storage, more than the "
                                     f"{reader.size} bytes of the file")
        kind, h5t = attr.get_type(), reader.h5py.h5t
        in_heap = kind.get_class() == h5t.VLEN or (kind.get_class() == h5t.STRING and kind.is_variable_str())
        if in_heap and not reader.heaps_checked:
            with reader.raw() as stream:
                problem = _heap_problem(stream, reader.size)
            if problem:
                raise reader.fail(where, f"attribute {key!r} keeps its text in the file's global heap, and {problem}")
            reader.heaps_checked = True
        return obj.attrs[key]
    except ConvBNError:
        raise
    except (OSError, TypeError, ValueError, KeyError) as exc:
        raise reader.fail(where, f"attribute {key!r} is unreadable: {_first_line(exc)}") from None


#: A global heap collection's signature and version (HDF5 writes version 1 only).
_GCOL = b"GCOL\x01"


def _heap_problem(stream: IO[bytes], size: int) -> str | None:
    """What is wrong with the first unsound global heap collection in the file, or None.

    A collection is ``GCOL``, version, 3 reserved bytes, its size (8 bytes, as in every file
    h5py writes), then objects of ``index (2), refs (2), reserved (4), size (8)`` and their bytes
    padded to 8; index 0 is the free space, whose size includes its header. libhdf5 walks them
    to the collection's end, so each must advance and stay inside it, which is checked here the
    same way. Collections are found by their signature, read 1 MiB at a time.
    """
    starts: list[int] = []
    tail, offset = b"", 0
    while chunk := stream.read(1 << 20):
        data = tail + chunk
        base = offset - len(tail)
        at = data.find(_GCOL)
        while at >= 0:
            starts.append(base + at)
            at = data.find(_GCOL, at + 1)
        tail, offset = data[-(len(_GCOL) - 1):], offset + len(chunk)
    for start in starts:
        stream.seek(start)
        header = stream.read(16)
        length = struct.unpack_from("<Q", header, 8)[0] if len(header) == 16 else 0
        if not 16 <= length <= size - start:
            return f"the global heap collection at byte {start} declares {length} bytes, outside the file's {size}"
        heap = header + stream.read(length - 16)
        at = 16
        while at + 16 <= length:
            index, _, nbytes = struct.unpack_from("<HH4xQ", heap, at)
            step = 16 + -(-nbytes // 8) * 8 if index else nbytes
            if step == 0 or step > length - at:
                return (f"the global heap collection at byte {start} is corrupt: its object {index} at byte "
                        f"{start + at} declares {nbytes} bytes, which "
                        + ("never advance past it" if step == 0 else f"run past the collection's {length}"))
            at += step
    return None


def _names(reader: _Reader, obj: Any, key: str, where: str) -> list[str] | None:
    """A Keras 2 list of names (``layer_names``, ``weight_names``), None when absent; tf_keras splits
    one longer than an HDF5 header holds (64 KiB) into ``key0``, ``key1``, ..., joined here."""
    if key in obj.attrs:
        chunks = [_attribute(reader, obj, key, where)]
    elif f"{key}0" in obj.attrs:
        chunks = [_attribute(reader, obj, f"{key}{i}", where)
                  for i in itertools.takewhile(lambda i: f"{key}{i}" in obj.attrs, itertools.count())]
    else:
        return None
    names: list[str] = []
    for chunk in chunks:
        array = np.asarray(chunk)
        if array.size == 0:  # tf_keras writes a layer without weights as an empty float array
            continue
        if array.ndim != 1 or array.dtype.kind not in "SUO":
            raise reader.fail(where, f"attribute {key!r} must be a list of names. Received: {_shown(chunk)}")
        for item in array.tolist():
            try:
                name = item.decode() if isinstance(item, bytes) else item
                if isinstance(name, str):
                    name.encode()  # h5py gives undecodable text as lone surrogates, which do not encode
            except UnicodeError:
                raise reader.fail(where, f"attribute {key!r} must hold UTF-8 names, not {item!r}") from None
            if not isinstance(name, str) or not name:
                raise reader.fail(where, f"attribute {key!r} must hold names. Received: {_shown(item)}")
            names.append(name)
    return names


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def _config_json(zf: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    """config.json, read at most ``_CONFIG_LIMIT`` bytes far: a zip bomb stays a small read."""
    info = zf.getinfo("config.json")
    with zf.open(info) as member:
        data = member.read(_CONFIG_LIMIT + 1) if info.file_size <= _CONFIG_LIMIT else b""
    if info.file_size > _CONFIG_LIMIT or len(data) > _CONFIG_LIMIT:
        raise ConvBNError(
            f"{path}: config.json must be at most {_CONFIG_LIMIT >> 20} MiB (a model config is far smaller). "
            f"Received: {max(info.file_size, len(data))} bytes or more"
        )
    return _parse_config(data, path, "config.json")


def _parse_config(data: Any, path: Path, what: str) -> dict[str, Any]:
    """A model config (config.json, or a Keras 2 file's model_config attribute) as a JSON object."""
    if isinstance(data, np.ndarray) and data.shape == ():
        data = data.item()
    if not isinstance(data, bytes | str):
        raise ConvBNError(f"{path}: {what} must be JSON text. Received: {_shown(data)}")
    if len(data) > _CONFIG_LIMIT:
        raise ConvBNError(f"{path}: {what} must be at most {_CONFIG_LIMIT >> 20} MiB (a model config is far "
                          f"smaller). Received: {len(data)} bytes")
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ConvBNError(f"{path}: {what} must be JSON (UTF-8): {_first_line(exc)}") from None
    if not isinstance(config, dict):
        raise ConvBNError(f"{path}: {what} must hold a JSON object (the model). Received: {type(config).__name__}")
    return config


def _open(path: Path) -> _Contents:
    h5py = _h5py()
    config = None
    try:
        if head(path, 8) == _HDF5_MAGIC:
            with h5py.File(path, "r") as f:
                return _read_h5(f, path, h5py, path.stat().st_size, lambda: open(path, "rb"))
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if "model.weights.h5" not in names:
                raise ConvBNError(f"{path}: a .keras archive must hold model.weights.h5. Received: members {names[:6]}")
            if "config.json" in names:
                config = _config_json(zf, path)
            info = zf.getinfo("model.weights.h5")
            if info.compress_type != zipfile.ZIP_STORED and info.file_size > info.compress_size * _MAX_EXPANSION:
                raise ConvBNError(
                    f"{path}: model.weights.h5 claims {info.file_size} bytes from {info.compress_size} compressed, "
                    f"more than deflate's {_MAX_EXPANSION}x: a zip bomb or a corrupt archive"
                )
            with zf.open(info) as member, h5py.File(member, "r") as f:
                contents = _read_h5(f, path, h5py, info.file_size, lambda: zf.open(info))
                if contents.legacy is not None:
                    raise ConvBNError(f"{path}: a .keras archive holds Keras 3 weights; its model.weights.h5 "
                                      "has Keras 2's layout")
                return dataclasses.replace(contents, config=config)
    except ConvBNError:
        raise
    except (*_H5_ERRORS, zipfile.BadZipFile, EOFError, NotImplementedError, zlib.error, lzma.LZMAError) as exc:
        raise ConvBNError(f"{path}: not a readable Keras weights file (truncated or corrupted): {_first_line(exc)}") from None


def _layer_configs(
    config: Mapping[str, Any] | None, path: Path
) -> tuple[dict[str, dict[str, Any]], dict[str, str] | None, list[str]]:
    """Top-level layers by name (class and config), the conv→BN pairs of the graph, and the order."""
    if not config:
        return {}, None, []
    body = config.get("config") or {}
    entries = body.get("layers") if isinstance(body, Mapping) else None
    if not isinstance(entries, list):
        return {}, None, []
    layers: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for i, entry in enumerate(entries):
        inner = entry.get("config") or {} if isinstance(entry, Mapping) else None
        name = (entry.get("name") or inner.get("name")) if isinstance(inner, Mapping) else None
        if not isinstance(inner, Mapping) or not isinstance(name, str | None):
            raise ConvBNError(
                f"{path}: config.json's layers must be objects with a text name and an object config. "
                f"Received: layers[{i}]={_shown(entry)}"
            )
        if name:
            layers[name] = {**entry, "config": inner}
            order.append(name)
    graph: dict[str, str] = {}
    if config.get("class_name") == "Sequential":
        chain = [n for n in order if layers[n].get("class_name") != "InputLayer"]
        for a, b in itertools.pairwise(chain):
            if layers[a].get("class_name") in _PRODUCER_CLASSES and layers[b].get("class_name") == "BatchNormalization":
                graph[a] = b
    else:
        for name in order:
            if layers[name].get("class_name") != "BatchNormalization":
                continue
            producer = _producer(layers[name].get("inbound_nodes"))
            if producer in layers and layers[producer].get("class_name") in _PRODUCER_CLASSES:
                graph[producer] = name
    return layers, graph, order


def _shown(value: Any) -> str:
    """``repr(value)``, cut short enough for a one-line message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(path: Path, layer: str, cfg: Mapping[str, Any], key: str) -> float | None:
    """A BatchNorm setting from config.json: absent, or a finite number (a string is no epsilon)."""
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise ConvBNError(f"{path}: config.json's BatchNormalization {key} must be a finite number. "
                          f"Received: layer {layer!r}, {key}={_shown(value)}")
    return float(value)


def _conv_geometry(path: Path, layer: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """stride, padding, dilation and groups of a Conv2D from config.json, type-checked."""

    def bad(key: str, what: str) -> ConvBNError:
        return ConvBNError(f"{path}: config.json's Conv2D {key} must be {what}. "
                           f"Received: layer {layer!r}, {key}={_shown(cfg.get(key))}")

    def ints(key: str) -> tuple[int, ...]:
        value = cfg.get(key, [1, 1])
        if not isinstance(value, list) or len(value) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) for v in value
        ):
            raise bad(key, "a list of 2 integers")
        return tuple(value)

    padding, groups = cfg.get("padding", "valid"), cfg.get("groups", 1)
    if not isinstance(padding, str):
        raise bad("padding", "'same' or 'valid'")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise bad("groups", "an integer")
    return {"stride": ints("strides"), "padding": padding.upper(), "dilation": ints("dilation_rate"), "groups": groups}


def _producer(nodes: Any) -> str | None:
    """The layer feeding a single-input layer, from Keras 3 or Keras 2 style ``inbound_nodes``."""
    if not isinstance(nodes, list) or len(nodes) != 1:
        return None
    node = nodes[0]
    if isinstance(node, Mapping):
        args = node.get("args") or []
        inner = args[0].get("config") if isinstance(args, list) and len(args) == 1 and isinstance(args[0], Mapping) else None
        if isinstance(inner, Mapping):
            history = inner.get("keras_history")
            if isinstance(history, list) and history:
                return str(history[0])
    elif isinstance(node, list) and len(node) == 1 and isinstance(node[0], list) and node[0]:
        return str(node[0][0])
    return None


def _unit(group: _Group, entry: Mapping[str, Any] | None, notes: list[str]) -> Unit | None:
    """The group as a conv or BatchNorm unit, payload ``(fields, cfg, geometry)``; None when it is
    neither (a dense layer, a transposed or separable conv, a layer of unexpected variables)."""
    if group.roles is not None:
        return _legacy_unit(group, entry)
    base = group.path.rsplit("/", 1)[-1]
    cls = entry.get("class_name") if entry else ("Conv2D" if _CONV_GROUP.fullmatch(base) else
                                                  "BatchNormalization" if _BN_GROUP.fullmatch(base) else
                                                  _GROUP_CLASSES.get(re.sub(r"_\d+$", "", base)))
    cfg = (entry or {}).get("config") or {}
    shapes = [a.shape for _, a in group.arrays]
    if cls in ("Conv2D", "DepthwiseConv2D", "Conv2DTranspose", "Dense"):
        rank = 2 if cls == "Dense" else 4
        if not shapes or len(shapes[0]) != rank or len(shapes) > 2:
            return None
        fields = dict(zip(("kernel", "bias"), group.arrays, strict=False))
        if cls == "Dense":
            return Unit(group.name, "dense", int(shapes[0][1]), payload=(fields, cfg, {}))
        if cls == "Conv2DTranspose":
            return Unit(group.name, "conv_transpose", int(shapes[0][2]), payload=(fields, cfg, {}))
        return _conv_unit(group, fields, cfg, depthwise=cls == "DepthwiseConv2D")
    if cls in ("LayerNormalization", "GroupNormalization"):
        names = [f for f, on in zip(("gamma", "beta"), (cfg.get("scale", True), cfg.get("center", True)), strict=True)
                 if on]
        groups = cfg.get("groups")
        if len(names) != len(shapes) or any(len(s) != 1 or s != shapes[0] for s in shapes) or (
            cls == "GroupNormalization" and (isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0)
        ):
            if cls == "GroupNormalization":
                notes.append(f"{group.name}: a GroupNormalization's number of groups is only in the model config; "
                             "its tensors are kept by name. Read the .keras file instead")
            return None
        kind = "layer_norm" if cls == "LayerNormalization" else "group_norm"
        return Unit(group.name, "other", int(shapes[0][0]) if shapes else 0,
                    payload=(dict(zip(names, group.arrays, strict=True)), cfg, {"kind": kind}))
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
        if len(names) != len(shapes):
            return None
        return _bn_unit(group, dict(zip(names, group.arrays, strict=True)), cfg)
    return None


def _legacy_unit(group: _Group, entry: Mapping[str, Any] | None) -> Unit | None:
    """A Keras 2 layer names its weights (``kernel:0``, ``moving_variance:0``), so its kind and
    fields follow from them; the config, where there is one, must agree on the class."""
    assert group.roles is not None
    roles = group.roles
    if len(set(roles)) != len(roles) or not set(roles) <= set(_LEGACY_FIELDS):
        return None
    fields = {_LEGACY_FIELDS[r]: item for r, item in zip(roles, group.arrays, strict=True)}
    cls = entry.get("class_name") if entry else None
    cfg = (entry or {}).get("config") or {}
    conv = "kernel" in fields and len(fields["kernel"][1].shape) == 4 and set(fields) <= {"kernel", "bias"}
    if conv and cls in (None, *_CONV_CLASSES):
        # Without a config, Conv2DTranspose's (kH, kW, out, in) kernel looks like a conv's: only
        # its default name tells them apart.
        if cls is None and re.search(r"(^|/)conv2d_transpose(_\d+)?$", group.name):
            return None
        depthwise = "depthwise_kernel" in roles
        if depthwise != (cls == "DepthwiseConv2D") and cls is not None:
            return None
        return _conv_unit(group, fields, cfg, depthwise=depthwise)
    if {"moving_mean", "moving_var"} <= set(fields) and cls in (None, "BatchNormalization"):
        return _bn_unit(group, fields, cfg)
    dense = "kernel" in fields and fields["kernel"][1].ndim == 2 and set(fields) <= {"kernel", "bias"}
    if dense and cls in (None, "Dense"):
        return Unit(group.name, "dense", int(fields["kernel"][1].shape[1]), payload=(fields, cfg, {}))
    return None


def _conv_unit(group: _Group, fields: dict[str, tuple[str, np.ndarray]], cfg: Mapping[str, Any], *,
               depthwise: bool = False) -> Unit:
    """A conv unit; a depthwise ``(kH, kW, C, m)`` kernel becomes the grouped HWIO ``(kH, kW, 1, C*m)``
    (output channel ``c*m + j`` in both) with ``groups=C``."""
    name, kernel = fields["kernel"]
    geometry: dict[str, Any] = {}
    if depthwise:
        kh, kw, c, m = kernel.shape
        fields = {**fields, "kernel": (name, kernel.reshape(kh, kw, 1, c * m))}
        geometry["groups"] = int(c)
    out = fields["kernel"][1].shape[3]
    return Unit(group.name, "conv", int(out), payload=(fields, cfg, geometry),
                family="DepthwiseConv2D" if depthwise else "Conv2D")


def _bn_unit(group: _Group, fields: dict[str, tuple[str, np.ndarray]], cfg: Mapping[str, Any]) -> Unit | None:
    shapes = [a.shape for _, a in fields.values()]
    if any(len(s) != 1 or s != shapes[0] for s in shapes):
        return None
    return Unit(group.name, "bn", int(shapes[0][0]), payload=(fields, cfg, {}))


def read(
    path: Path,
    *,
    pairs: Mapping[str, str] | None = None,
    eps: float | None = None,
    momentum: float | None = None,
    use_ema: bool = False,
) -> Checkpoint:
    """Read Keras 3 ``.weights.h5`` or ``.keras``, or a Keras 2 ``.h5``; see the module docstring."""
    from convbn.checkpoint import Checkpoint, LayerSource

    if use_ema:
        raise ConvBNError(f"{path}: use_ema applies to slim checkpoints with moving-average shadows, not Keras files")
    contents = _open(path)
    groups, legacy = contents.groups, contents.legacy is not None
    convention = KERAS2_FUSED if legacy else KERAS3
    ckpt = Checkpoint(format=NAME, convention=convention.name, dropped=contents.dropped)
    ckpt.metadata["source_format"] = NAME
    if contents.legacy is not None:
        ckpt.metadata[_LEGACY_ORDER] = json.dumps(contents.legacy)
    configs, graph, order = _layer_configs(contents.config, path)
    if contents.recorded is not None:
        if graph is None:  # convbn's own record: which BatchNorm follows which layer, in model order
            graph = {name: norm for name, _kind, norm in contents.recorded["layers"] if norm}
            order = [n for name, _kind, norm in contents.recorded["layers"] for n in (name, norm) if n]
        if contents.recorded.get("layer_names") == "torch":
            ckpt.metadata[LAYER_NAMES] = "torch"
    # Top-level layers match their config entry by name; nested models' layers have none.
    top = {g.name: g for g in groups if g.top}
    rank = {name: i for i, name in enumerate(order)}
    if rank and not legacy:  # a Keras 2 file's layers already come in the model's order, nested ones too
        groups.sort(key=lambda g: (rank.get(g.name, len(rank)), natural_key(g.path)))
    names = [g.name for g in groups]
    duplicated = {n for n in names if names.count(n) > 1}
    units = []
    nested: set[int] = set()  # units of layers the config's graph does not describe
    for group in groups:
        if group.name in duplicated:
            group.name = group.path
        entry = configs.get(group.name) if top.get(group.name) is group else None
        unit = _unit(group, entry, ckpt.notes)
        if unit is not None:
            units.append(unit)
            if entry is None:
                nested.add(id(unit))
    with_graph = graph is not None
    found, unpaired = pair_units(
        units,
        explicit=pairs,
        graph=graph,
        naming=not with_graph,
        # A Keras 2 file lists its layers in the model's order; a Keras 3 one only within each class.
        order=None if with_graph else "adjacent" if legacy else "by_kind",
        source=str(path),
    )
    if with_graph and legacy and any(id(u) in nested for u in unpaired):
        # A nested model's layers (its weights listed in its own layer order) pair as in a file
        # without a config; the top-level graph still decides for the model's own layers.
        more, rest = pair_units([u for u in unpaired if id(u) in nested], source=str(path))
        position = {id(u): i for i, u in enumerate(units)}
        found = sorted(found + more, key=lambda p: position[id(p.conv)])
        unpaired = [u for u in unpaired if id(u) not in nested or u in rest]
    if legacy and not with_graph:
        _refuse_ambiguous_order(found, unpaired, units, path)
    if found and not with_graph and legacy and any(p.reason == "order" for p in found):
        ckpt.notes.append(
            "Keras 2 weights files do not record which BatchNorm follows which conv: paired each conv "
            "with a BatchNormalization of the same width right after it in layer order (check with "
            "'convbn inspect'; pass pairs / --pair, or read the whole-model .h5, to be explicit)"
        )
    elif found and not with_graph and any(p.reason == "order" for p in found):
        ckpt.notes.append(
            ".weights.h5 files do not record which BatchNorm follows which conv: paired the k-th conv of "
            "each width with the k-th BatchNormalization of that width (check with 'convbn inspect'; pass "
            "pairs / --pair, or read the .keras file, to be explicit)"
        )
    used: set[str] = set()
    for item in source_order(units, found, unpaired):
        ckpt.order.append(item.name)
        if item.pair is None:
            layer = _other_layer(path, item.unit, item.bn, convention, legacy, eps=eps, momentum=momentum,
                                 notes=ckpt.notes)
            add_other(ckpt, path, item.name, layer)
            used.update(layer.tensors.values())
            continue
        pair = item.pair
        conv_fields, conv_cfg, kernel_geometry = pair.conv.payload
        bn_fields, bn_cfg, _ = pair.bn.payload
        layer_eps, layer_momentum = resolve_settings(
            convention, NAME if bn_cfg else "Keras 2 .h5 weights" if legacy else "Keras .weights.h5",
            eps=eps, momentum=momentum, stored_eps=_number(path, pair.bn.name, bn_cfg, "epsilon"),
            stored_momentum=_number(path, pair.bn.name, bn_cfg, "momentum"), notes=ckpt.notes,
        )
        geometry = {**(_conv_geometry(path, pair.conv.name, conv_cfg) if conv_cfg else {}), **kernel_geometry}
        tensor_names = {f: name for f, (name, _) in {**conv_fields, **bn_fields}.items()}
        ckpt.layers[pair.key] = build_layer(
            path,
            pair.key,
            tensor_names,
            **{f: a for f, (_, a) in {**conv_fields, **bn_fields}.items()},
            eps=layer_eps,
            momentum=layer_momentum,
            var_update=_var_update(path, pair.bn.name, bn_cfg) if legacy else KERAS3.var_update,
            **geometry,
        )
        ckpt.sources[pair.key] = LayerSource(
            conv={f: n for f, (n, _) in conv_fields.items()},
            bn={f: n for f, (n, _) in bn_fields.items()},
            reason=pair.reason,
            conv_name=pair.conv.name,
            bn_name=pair.bn.name,
            geometry=bool(conv_cfg),
            settings=bool(bn_cfg),
        )
        used.update(tensor_names.values())
    if found and not any(s.geometry for s in ckpt.sources.values()):
        ckpt.notes.append(
            f"{'Keras 2 .h5 weights' if legacy else '.weights.h5'} files do not store stride, padding, "
            "dilation or groups: the layers keep ConvBNParams defaults (stride 1, 'SAME', groups 1, "
            "a depthwise kernel's groups excepted); set them with dataclasses.replace"
        )
    for unit in unpaired:
        if unit.kind in ("conv", "bn"):
            ckpt.unpaired[unit.name] = unit.kind
    for group in groups:
        for name, array in group.arrays:
            if name not in used:
                ckpt.tensors[name] = array
    ckpt.tensors.update(contents.loose)
    mark_flatten_undecided(ckpt, "hwc")
    return ckpt


def _other_layer(
    path: Path, unit: Unit, bn: Unit | None, convention: Any, legacy: bool, *,
    eps: float | None, momentum: float | None, notes: list[str],
) -> Layer:
    """A layer that is not a conv+BatchNorm pair: a conv, transposed conv or dense layer (with the
    BatchNorm after it), a standalone BatchNorm, or a LayerNorm/GroupNorm."""
    fields, cfg, extra = unit.payload
    tensors = {f: n for f, (n, _) in fields.items()}
    norm_unit = unit if unit.kind in ("bn", "other") else bn
    norm = None
    if norm_unit is not None:
        norm_fields, norm_cfg, norm_extra = norm_unit.payload
        kind = norm_extra.get("kind", "batch_norm")
        where = NAME if norm_cfg else "Keras 2 .h5 weights" if legacy else "Keras .weights.h5"
        if kind == "batch_norm":
            layer_eps, layer_momentum = resolve_settings(
                convention, where, eps=eps, momentum=momentum,
                stored_eps=_number(path, norm_unit.name, norm_cfg, "epsilon"),
                stored_momentum=_number(path, norm_unit.name, norm_cfg, "momentum"), notes=notes,
            )
            settings: dict[str, Any] = {"eps": layer_eps, "momentum": layer_momentum,
                                        "var_update": _var_update(path, norm_unit.name, norm_cfg) if legacy
                                        else KERAS3.var_update}
        else:
            stored = _number(path, norm_unit.name, norm_cfg, "epsilon")
            settings = {"eps": eps if eps is not None else stored if stored is not None else 1e-3}
            if kind == "group_norm":
                settings["groups"] = norm_cfg["groups"]
        names = {f: n for f, (n, _) in norm_fields.items()}
        norm = build_norm(path, norm_unit.name, names, kind, **{f: a for f, (_, a) in norm_fields.items()}, **settings)
        tensors.update(names)
    if unit.kind in ("bn", "other"):
        return build_other(path, unit.name, tensors, kind=norm.kind if norm else "batch_norm", norm=norm)
    geometry: dict[str, Any] = {}
    if cfg and unit.kind != "dense":
        geometry.update(_conv_geometry(path, unit.name, cfg), geometry=True)
    if unit.kind != "dense":
        geometry.update(extra)  # a depthwise kernel's groups
    return build_other(
        path, unit.name, tensors, kind=unit.kind, kernel=fields["kernel"][1],
        bias=fields["bias"][1] if "bias" in fields else None, norm=norm, norm_name=bn.name if bn else "", **geometry,
    )


def _refuse_ambiguous_order(found: list[Any], unpaired: list[Any], units: list[Any], path: Path) -> None:
    """Refuse a Keras 2 order pairing that another conv could claim as well.

    tf_keras lists a functional model's layers by depth, so parallel branches come as ``conv2d,
    conv2d_1, batch_normalization, batch_normalization_1``: the BatchNorm right after ``conv2d_1``
    is ``conv2d``'s. When an unpaired conv of the same width stands before a BatchNorm paired by
    order, the file cannot tell which owns it, and guessing would load a wrong model.
    """
    position = {id(u): i for i, u in enumerate(units)}
    loose = [u for u in unpaired if u.kind == "conv"]
    for pair in found:
        if pair.reason != "order":
            continue
        rivals = [c.name for c in loose if c.channels == pair.conv.channels and position[id(c)] < position[id(pair.bn)]]
        if rivals:
            raise ConvBNError(
                f"a Keras 2 weights file does not say which conv BatchNormalization {pair.bn.name!r} follows: "
                f"{pair.conv.name!r} before it in layer order, or the unpaired {rivals[-1]!r} of the same width "
                "(tf_keras lists parallel branches' layers by depth); pass pairs / --pair, e.g. "
                f"--pair {rivals[-1]}={pair.bn.name}, or read the whole-model .h5, whose config says. "
                f"Received: file={path}"
            )


def _var_update(path: Path, layer: str, cfg: Mapping[str, Any]) -> str:
    """A Keras 2 BatchNormalization's moving-variance update: unbiased on its default fused path
    (``fused`` None or True, measured in SEMANTICS.md), biased with ``fused=False``."""
    fused = cfg.get("fused")
    if fused is not None and not isinstance(fused, bool):
        raise ConvBNError(f"{path}: model_config's BatchNormalization fused must be true, false or null. "
                          f"Received: layer {layer!r}, fused={_shown(fused)}")
    return "biased" if fused is False else KERAS2_FUSED.var_update


# -- writing -----------------------------------------------------------------------------------------


def _keras_name(name: str, taken: set[str], *, keep_dots: bool = False) -> str:
    """A valid, unused Keras layer name (Keras forbids '/'); ``keep_dots`` keeps a torch module
    path's dots, which Keras allows, so the name reads back as the module's."""
    base = re.sub(r"[^A-Za-z0-9_.]" if keep_dots else r"[^A-Za-z0-9_]", "_", name) or "layer"
    candidate, i = base, 1
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    taken.add(candidate)
    return candidate


#: The Layer fields a Keras group holds as variables (others, e.g. num_batches_tracked, it does not).
_LAYER_FIELDS = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_var")
#: The Keras 3 layer class (and its weights group's name) of each layer kind.
_KIND_GROUPS = {
    "conv": "conv2d", "conv_transpose": "conv2d_transpose", "dense": "dense", "batch_norm": "batch_normalization",
    "layer_norm": "layer_normalization", "group_norm": "group_normalization",
}


def _norm_arrays(norm: Norm) -> list[np.ndarray]:
    """A norm's Keras variables: gamma and beta (ones and zeros where the source has none, as a
    Keras norm always holds them), then a BatchNorm's moving statistics."""
    ref = next(v for v in (norm.moving_mean, norm.gamma, norm.beta) if v is not None)
    n, dtype = int(np.shape(ref)[0]), np.asarray(ref).dtype
    arrays = [norm.gamma if norm.gamma is not None else np.ones(n, dtype),
              norm.beta if norm.beta is not None else np.zeros(n, dtype)]
    if norm.kind == "batch_norm":
        arrays += [norm.moving_mean, norm.moving_var]
    return [as_numpy(a) for a in arrays]


def _other_groups(
    key: str, name: str, norm_name: str, layer: Layer, counters: dict[str, int]
) -> list[tuple[str, str, list[np.ndarray], str | None]]:
    """The Keras 3 groups of a layer that is not a conv+BatchNorm pair, named by class and counter."""
    if layer.kernel is None:
        assert layer.norm is not None
        return [(_numbered(_KIND_GROUPS[layer.kind], counters), name, _norm_arrays(layer.norm), key)]
    arrays = [as_numpy(layer.kernel)]
    if layer.bias is not None:
        arrays.append(as_numpy(layer.bias))
    groups = [(_numbered(_KIND_GROUPS[layer.kind], counters), name, arrays, None if layer.norm else key)]
    if layer.norm is not None:
        groups.append((_numbered("batch_normalization", counters), norm_name, _norm_arrays(layer.norm), key))
    return groups


def _same_groups(key: str, layer: Layer) -> list[tuple[str, str, list[np.ndarray], str | None]]:
    """A layer read from a Keras 3 file, back in its own groups (its tensor names say where)."""
    norm = layer.norm
    values = {"kernel": layer.kernel, "bias": layer.bias}
    if norm is not None:
        values.update(gamma=norm.gamma, beta=norm.beta, moving_mean=norm.moving_mean, moving_var=norm.moving_var)
    groups: dict[str, list[tuple[int, np.ndarray]]] = {}
    for field in _LAYER_FIELDS:
        tensor, value = layer.tensors.get(field), values.get(field)
        if tensor is not None and value is not None:
            group, _, index = tensor.rpartition("/vars/")
            array = as_numpy(value)
            if field == "kernel" and layer.kind == "conv":
                array = _as_group_kernel(group, array, layer.groups)
            groups.setdefault(group, []).append((int(index), array))
    own = layer.tensors.get("kernel", "").rpartition("/vars/")[0]
    out: list[tuple[str, str, list[np.ndarray], str | None]] = []
    for i, (group, items) in enumerate(groups.items()):
        name = key if group == own or layer.kernel is None else layer.norm_name
        out.append((group, name, [a for _, a in sorted(items, key=lambda t: t[0])], key if i == len(groups) - 1 else None))
    return out


def _as_group_kernel(group: str, kernel: np.ndarray, groups: int) -> np.ndarray:
    """A grouped HWIO kernel as the Keras 3 group ``group`` holds it: a ``depthwise_conv2d`` group's
    DepthwiseConv2D keeps ``(kH, kW, C, m)``, the layout the reader turned into ``(kH, kW, 1, C*m)``."""
    base = group.rsplit("/", 1)[-1]
    if groups > 1 and kernel.ndim == 4 and kernel.shape[2] == 1 and _GROUP_CLASSES.get(
        re.sub(r"_\d+$", "", base)
    ) == "DepthwiseConv2D":
        kh, kw, _, out = kernel.shape
        return kernel.reshape(kh, kw, groups, out // groups)
    return kernel


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
        if path.suffix in _LEGACY_SUFFIXES:
            others_as_tensors(ckpt)  # the Keras 2 layout is written for conv+BatchNorm pairs only
            _write_legacy(ckpt, path, h5py, progress)
            return
        raise ConvBNError(
            "a Keras weights file must be named *.weights.h5 or *.keras (Keras 3), or *.h5 (Keras 2 / "
            f"tf_keras; what model.load_weights requires). Received: {path.name!r}"
        )
    same_format = origin_format(ckpt) == NAME and not archive and all(
        "kernel" in s.conv and "/vars/" in s.conv["kernel"] for s in ckpt.sources.values()
    ) and set(ckpt.sources) >= set(ckpt.layers) and all(
        "/vars/" in t for o in ckpt.others.values() for f, t in o.tensors.items() if f in _LAYER_FIELDS
    )
    named = torch_named(ckpt)
    ordered = ckpt.in_feature_order("hwc")  # Keras flattens NHWC maps: a dense layer's features in that order
    ckpt.others, ckpt.notes[:] = ordered.others, ordered.notes
    taken: set[str] = set()
    counters: dict[str, int] = {}
    # (group path, layer name, arrays, layer key or None), in writing order
    plan: list[tuple[str, str, list[np.ndarray], str | None]] = []
    branches: list[tuple[str, str | None, Any]] = []
    record: list[list[str]] = []
    for layer, item in ckpt.in_order():
        if not isinstance(item, ConvBNParams):
            if same_format:
                plan += _same_groups(layer, item)
                record.append([layer, item.kind, item.norm_name if item.kernel is not None else ""])
            else:
                own = _keras_name(layer, taken, keep_dots=named)
                norm = _keras_name(item.norm_name or f"{own}_bn", taken, keep_dots=named) if (
                    item.kernel is not None and item.norm is not None) else ""
                plan += _other_groups(layer, own, norm, item, counters)
                branches.append((own, norm or None, item))
                record.append([own, item.kind, norm])
            continue
        params = item
        source = ckpt.sources.get(layer)
        conv_arrays = [as_numpy(params.kernel)] + ([as_numpy(params.bias)] if params.bias is not None else [])
        if same_format and source is not None:
            conv_group = source.conv["kernel"].rsplit("/vars/", 1)[0]
            conv_arrays[0] = _as_group_kernel(conv_group, conv_arrays[0], params.groups)
            conv_name = source.conv_name
            bn_group = source.bn.get("moving_mean", "").rsplit("/vars/", 1)[0]
            bn_name = source.bn_name
            keep_absent = True
        else:
            if named and source is not None and source.conv_name and source.bn_name:
                conv_name = _keras_name(source.conv_name, taken, keep_dots=True)
                bn_name = _keras_name(source.bn_name, taken, keep_dots=True)
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
        record.append([conv_name, "conv", "" if ckpt.fused else bn_name])
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

    recorded = {"layers": record, **({"layer_names": "torch"} if named else {})}

    def write_h5(target: Path) -> None:
        with h5py.File(target, "w") as f:
            f.attrs[_RECORD] = json.dumps(recorded)
            for group_path, layer_name, arrays, layer in plan:
                vars_group = f.require_group(f"{group_path}/vars")
                vars_group.attrs["name"] = layer_name
                for i, array in enumerate(arrays):
                    _dataset(vars_group, str(i), array)
                if layer is not None:
                    tick(progress, layer)
            for name, array in loose.items():
                if name in f:
                    raise ConvBNError(f"{path}: tensor name {name!r} is used twice (a layer and another tensor)")
                _dataset(f, name, array)

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


def target_var_update(path: Path) -> str:
    """The moving-variance update of the BatchNorms that load what :func:`write` puts at ``path``:
    Keras 2's fused one (unbiased) for the Keras 2 layout (``*.h5``), Keras 3's (biased) otherwise."""
    legacy = Path(path).suffix in _LEGACY_SUFFIXES and not Path(path).name.endswith(".weights.h5")
    return KERAS2_FUSED.var_update if legacy else KERAS3.var_update


def _dataset(group: Any, name: str, array: Any) -> None:
    """One Keras 3 dataset; bfloat16 marked dtype='bfloat16' as Keras marks it, which its loader needs."""
    ds = group.create_dataset(name, data=contiguous(array))
    if ds.dtype.name == "bfloat16" or (ds.dtype.kind == "V" and np.asarray(array).dtype.name == "bfloat16"):
        ds.attrs["dtype"] = "bfloat16"


def _write_legacy(ckpt: Checkpoint, path: Path, h5py: Any, progress: Progress | None) -> None:
    """Write the Keras 2 layout (see the module docstring) that tf_keras's and Keras 3's
    ``load_weights("x.h5")`` read, by layer order or ``by_name=True``."""
    recorded = _recorded_layers(ckpt)
    values: dict[str, np.ndarray] = {}  # tensor name -> array, for a Keras 2 source written back
    done: dict[str, str] = {}  # the last tensor of each layer -> the layer, for progress
    layers: list[tuple[str, list[tuple[str, np.ndarray]]]] = []
    if recorded and not ckpt.fused:
        for key, params in ckpt.layers.items():
            source = ckpt.sources.get(key)
            if source is None:
                break
            fields = {"kernel": params.kernel, "bias": params.bias, "gamma": params.gamma, "beta": params.beta,
                      "moving_mean": params.moving_mean, "moving_var": params.moving_var}
            named = {**source.conv, **source.bn}
            if any(fields.get(f) is None for f in named):
                break  # a field the file had was removed (a folded bias): write a fresh layout
            for field, name in named.items():
                array = as_numpy(fields[field])
                if name.endswith("/depthwise_kernel:0"):
                    kh, kw, _, out = array.shape
                    array = array.reshape(kh, kw, params.groups, out // params.groups)
                values[name] = array
            done[source.bn["moving_var"]] = key
        else:  # every layer kept its source's names: the file's own layers, in its order
            values.update({name: as_numpy(v) for name, v in ckpt.tensors.items()})
            for layer, names in recorded:
                layers.append((layer, [(w, values.pop(f"{layer}/{w}")) for w in names if f"{layer}/{w}" in values]))
    if not layers:
        values, done = {}, {}
        taken: set[str] = set()
        for key, params in ckpt.layers.items():
            conv = _keras_name(key, taken)
            kernel = as_numpy(params.kernel)
            role = "kernel"
            if params.groups > 1 and params.groups == params.in_channels:
                # A depthwise conv is tf_keras's DepthwiseConv2D, as keras.applications builds it.
                kh, kw, _, out = kernel.shape
                kernel, role = kernel.reshape(kh, kw, params.groups, out // params.groups), "depthwise_kernel"
            weights = [(f"{conv}/{role}:0", kernel)]
            if params.bias is not None:
                weights.append((f"{conv}/bias:0", as_numpy(params.bias)))
            layers.append((conv, weights))
            if not ckpt.fused:
                bn = _keras_name(f"{conv}_bn", taken)
                roles = ("gamma", "beta", "moving_mean", "moving_variance")
                layers.append((bn, [(f"{bn}/{r}:0", a) for r, a in zip(roles, _bn_arrays(params, False), strict=True)]))
            done[f"{layers[-1][0]}/{layers[-1][1][-1][0]}"] = key
        if ckpt.tensors:
            ckpt.notes.append(not_written_note(ckpt))
    if not ckpt.fused:
        unstored_settings_note(ckpt, "Keras 2 .h5 weights", KERAS2_FUSED)
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        _legacy_names(f, _LAYER_NAMES, [layer for layer, _ in layers])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2"  # not "1", whose kernels Keras would convert
        where = "/"
        try:
            for layer, weights in layers:
                where = layer
                group = f.create_group(layer)
                _legacy_names(group, "weight_names", [w for w, _ in weights])
                for weight, array in weights:
                    where = f"{layer}/{weight}"
                    group.create_dataset(weight, data=contiguous(array))
                    if where in done:
                        tick(progress, done[where])
            for where, array in values.items():  # tensors of no recorded layer: kept, as datasets only
                if where in f:
                    raise ConvBNError(f"{path}: tensor name {where!r} is used twice (a layer and another tensor)")
                f.create_dataset(where, data=contiguous(array))
        except ConvBNError:
            raise
        except (ValueError, TypeError, KeyError) as exc:  # a name HDF5 cannot hold, or one used twice
            raise ConvBNError(f"{path}: cannot write {where!r} in the Keras 2 layout: {_first_line(exc)}") from None


def _recorded_layers(ckpt: Checkpoint) -> list[tuple[str, list[str]]] | None:
    """The source's own Keras 2 layers and weight names (see ``_LEGACY_ORDER``), or None where
    there are none; metadata that lost its shape (it travels through safetensors files) is noted."""
    text = ckpt.metadata.get(_LEGACY_ORDER) if origin_format(ckpt) == NAME else None
    if text is None:
        return None
    try:
        entries = json.loads(text)
    except (ValueError, RecursionError):
        entries = None
    if isinstance(entries, list) and all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], list)
        and all(isinstance(w, str) for w in e[1]) for e in entries
    ):
        return [(layer, weights) for layer, weights in entries]
    ckpt.notes.append(f"the checkpoint's {_LEGACY_ORDER} metadata is not a list of layers and weight names: "
                      "wrote the layers under new names")
    return None


def _legacy_names(obj: Any, key: str, names: list[str]) -> None:
    """Store a list of names as tf_keras does: UTF-8 bytes, split into ``key0``, ``key1``, ... when
    it would not fit in the 64 KiB an HDF5 object header holds."""
    data = np.array([n.encode() for n in names], dtype=f"S{max((len(n.encode()) for n in names), default=1)}")
    chunks = max(1, -(-data.nbytes // _HEADER_LIMIT))
    if chunks == 1:
        obj.attrs[key] = data
        return
    for i, chunk in enumerate(np.array_split(data, chunks)):
        obj.attrs[f"{key}{i}"] = chunk


def _dtype_policy(params: Any) -> str:
    return keras_float_name(np.asarray(params.kernel).dtype)


def _model_config(branches: list[tuple[str, str | None, Any]]) -> dict[str, Any]:
    """A Functional model of independent ``Input -> Conv2D -> BatchNormalization`` branches, and
    ``Input -> layer [-> BatchNormalization]`` for each other layer, in checkpoint order (the order
    Keras numbers the weight groups in)."""
    layers: list[dict[str, Any]] = []
    inputs, outputs = [], []
    taken = {name for conv, bn, _ in branches for name in (conv, bn) if name}
    for conv, bn, p in branches:
        if not isinstance(p, ConvBNParams):
            first, end = _other_config(conv, bn or "", p, taken)
            layers += first
            inputs.append([first[0]["name"], 0, 0])
            outputs.append([end, 0, 0])
            continue
        if bn is None:  # a fused layer: padded to two layers as every branch is (see _other_config)
            bn = _keras_name(f"{conv}_identity", taken)
            identity = True
        else:
            identity = False
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
        if identity:
            layers.append(_identity(bn, conv, cout, dtype, 4))
            last = bn
        else:
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


def _other_config(own: str, norm: str, layer: Layer, taken: set[str]) -> tuple[list[dict[str, Any]], str]:
    """The config entries of one other layer's branch (its input first), and its last layer's name."""
    ref = layer.kernel if layer.kernel is not None else next(
        v for v in (layer.norm.moving_mean, layer.norm.gamma, layer.norm.beta) if v is not None  # type: ignore[union-attr]
    )
    dtype = keras_float_name(np.asarray(ref).dtype)
    spatial = [None, None] if layer.kind in ("conv", "conv_transpose", "group_norm") else []
    if layer.kernel is None:
        cin = cout = layer.out_features
    else:
        shape = np.shape(layer.kernel)
        cin = int(shape[0] if layer.kind == "dense" else shape[3] if layer.kind == "conv_transpose" else shape[2] * layer.groups)
        cout = layer.out_features
    source = _keras_name(f"input_{own}", taken)
    entries: list[dict[str, Any]] = [{
        "module": "keras.layers", "class_name": "InputLayer", "registered_name": None, "name": source,
        "config": {"batch_shape": [None, *spatial, cin], "dtype": dtype, "sparse": False, "name": source},
        "inbound_nodes": [],
    }]
    # Keras lists a Functional model's layers by depth, and numbers its weight groups in that order:
    # every branch is two layers deep (an Identity after a lone conv or dense layer, before a norm),
    # so the k-th layer of each class is the k-th of that class in the checkpoint.
    if layer.kernel is None:
        padding = _keras_name(f"{own}_identity", taken)
        entries.append(_identity(padding, source, cin, dtype, len(spatial) + 2))
        source = padding
    config: dict[str, Any] = {"name": own, "trainable": True, "dtype": dtype}
    n = layer.norm
    if layer.kind == "dense":
        cls = "Dense"
        config.update(units=cout, activation="linear", use_bias=layer.bias is not None)
    elif layer.kind in ("conv", "conv_transpose"):
        cls = "Conv2D" if layer.kind == "conv" else "Conv2DTranspose"
        config.update(filters=cout, kernel_size=list(np.shape(layer.kernel)[:2]), strides=list(layer.stride),
                      padding=layer.padding.lower() if isinstance(layer.padding, str) else "valid",
                      data_format="channels_last", dilation_rate=list(layer.dilation), activation="linear",
                      use_bias=layer.bias is not None, **({"groups": layer.groups} if layer.kind == "conv" else {}))
    else:
        assert n is not None
        cls = {"batch_norm": "BatchNormalization", "layer_norm": "LayerNormalization",
               "group_norm": "GroupNormalization"}[layer.kind]
        config.update(axis=-1, epsilon=n.eps if n.eps is not None else 1e-3, center=True, scale=True)
        if n.kind == "batch_norm":
            config["momentum"] = n.momentum if n.momentum is not None else KERAS3.momentum
        if n.kind == "group_norm":
            config["groups"] = n.groups
    entries.append({"module": "keras.layers", "class_name": cls, "registered_name": None, "name": own,
                    "config": config, "build_config": {"input_shape": [None, *spatial, cin]},
                    "inbound_nodes": [_node(source, cin, dtype, len(spatial) + 2)]})
    last = own
    if layer.kernel is not None and n is None:
        last = _keras_name(f"{own}_identity", taken)
        entries.append(_identity(last, own, cout, dtype, len(spatial) + 2))
    if layer.kernel is not None and n is not None:
        entries.append({
            "module": "keras.layers", "class_name": "BatchNormalization", "registered_name": None, "name": norm,
            "config": {"name": norm, "trainable": True, "dtype": dtype, "axis": -1,
                       "momentum": n.momentum if n.momentum is not None else KERAS3.momentum,
                       "epsilon": n.eps if n.eps is not None else KERAS3.eps, "center": True, "scale": True},
            "build_config": {"input_shape": [None, *spatial, cout]},
            "inbound_nodes": [_node(own, cout, dtype, len(spatial) + 2)],
        })
        last = norm
    return entries, last


def _identity(name: str, producer: str, channels: int, dtype: str, rank: int) -> dict[str, Any]:
    return {"module": "keras.layers", "class_name": "Identity", "registered_name": None, "name": name,
            "config": {"name": name, "trainable": True, "dtype": dtype},
            "inbound_nodes": [_node(producer, channels, dtype, rank)]}


def _node(producer: str, channels: int, dtype: str, rank: int = 4) -> dict[str, Any]:
    return {
        "args": [{
            "class_name": "__keras_tensor__",
            "config": {"shape": [*([None] * (rank - 1)), channels], "dtype": dtype, "keras_history": [producer, 0, 0]},
        }],
        "kwargs": {},
    }
