"""PyTorch ``state_dict`` files written by ``torch.save`` (``.pt``, ``.pth``, ``.bin``).

Reading uses ``torch.load(weights_only=True)``: only tensors and plain containers are unpickled, and
a pickle that would construct anything else (and so could run code) is refused. Zip-format files
are memory-mapped, so reading copies no tensor data. torch.load trusts the sizes in the pickle, so
they are checked first against the bytes the file holds (zip members must be stored uncompressed,
as torch.save writes them), and each tensor against its storage: a stride-0 view of one value does
not convert into gigabytes. Quantized, sparse, nested and meta tensors are refused.

Layer ``L`` is written with the default names (``/`` in ``L`` becomes ``.``)::

    L.conv.weight  (O, I/g, kH, kW)     L.bn.weight   L.bn.running_mean   L.bn.num_batches_tracked
    L.conv.bias    (if the layer has one) L.bn.bias   L.bn.running_var

or, when the checkpoint came from a torch file, with the module names it had there. Reading accepts
any naming: a conv weight followed by a BatchNorm with the same channel count pairs, whatever the
module names. torch state_dicts store no eps or momentum; reading assumes torch's defaults
(eps 1e-5, momentum 0.1, i.e. 0.9 kept) unless overridden.

Sharded state_dicts (``pytorch_model.bin.index.json`` and its shards, see
:mod:`convbn.formats._sharded`) read as one: each shard with every check above, none unpickled
before its sizes are checked, and every tensor in exactly the shard the index names.
``write(..., max_shard_size=)`` writes them.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy as np

from convbn import layouts
from convbn._dtypes import numpy_to_torch, torch_to_numpy
from convbn.conventions import TORCH
from convbn.errors import ConvBNError
from convbn.formats._caps import FormatCaps
from convbn.formats._common import (
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
    zip_first_member,
)
from convbn.formats._io import atomic_output
from convbn.formats._pairing import Unit, pair_units, source_order
from convbn.formats._sharded import (
    INDEX_SUFFIX,
    Shards,
    find_index,
    shard_names,
    split,
    write_index,
)
from convbn.params import ConvBNParams

if TYPE_CHECKING:
    from convbn.checkpoint import Checkpoint, Layer

NAME = "torch"
#: read() and write() import torch; write() writes Checkpoint.others (every layer kind), not only
#: conv+BatchNorm pairs, and honours Checkpoint.fused (conv weight + bias, no BatchNorm).
CAPS = FormatCaps(
    suffixes=(".pt", ".pth", ".bin"),
    framework="torch", package=("torch", "torch"), writes_others=True, writes_fused=True,
    write_options=frozenset({"progress", "max_shard_size"}), shards="index_json", flatten_order="chw",
    var_update="unbiased",
    convention="torch", like_files=True,
)

__all__ = ["CAPS", "NAME", "layers_from_state_dict", "read", "sniff", "write"]

# The pickle of torch's legacy (non-zip) magic number 0x1950a86a20f9469cfc6c, protocol 2.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
#: Keys under which training scripts commonly nest the model's state_dict.
_NESTED = ("state_dict", "model_state_dict", "model", "module", "net")
_BN_FIELDS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_var"}


def sniff(path: Path) -> bool:
    """A ``torch.save`` zip (first member ``<name>/data.pkl``) or a legacy torch pickle, or a shard
    index (``pytorch_model.bin.index.json``, its directory or ``pytorch_model.bin``) of such files."""
    return _sniff_file(path) or find_index(path, _sniff_file, _INDEX_OF) is not None


#: What a shard index of this format is named after: pytorch_model.bin.index.json
_INDEX_OF = (".bin", ".pt", ".pth")


def _sniff_file(path: Path) -> bool:
    first = zip_first_member(path)
    if first is not None:
        return first.endswith("data.pkl") or first.endswith("/version") or first.endswith(".format_version")
    return head(path, len(_LEGACY_MAGIC)) == _LEGACY_MAGIC


def _load(path: Path) -> Any:
    """The unpickled object, after :func:`_check_storages` bounded what ``torch.load`` may read."""
    import torch

    is_zip = _check_storages(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        detail = str(exc).splitlines()
        hint = next((line.strip() for line in detail if "Unsupported global" in line or "GLOBAL" in line), "")
        raise ConvBNError(
            f"{path}: refused to unpickle: the file holds objects other than tensors and plain "
            "containers, and unpickling them could run code. Save model.state_dict() instead"
            + (f" ({hint})" if hint else "")
        ) from None
    except ConvBNError:
        raise
    except Exception as exc:  # anything torch's unpickler or _rebuild_tensor raises
        raise _corrupt(path, exc) from None


def _corrupt(path: Path, exc: BaseException) -> ConvBNError:
    first = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return ConvBNError(f"{path}: not a readable torch checkpoint (truncated or corrupted): {first}")


# -- bounding what torch.load reads ------------------------------------------------------------------
#
# torch.load trusts the pickle's storage sizes: with mmap it slices that many bytes from the record's
# offset (reading neighbouring members when the size lies), and the legacy format allocates them
# before reading. So a first pass runs the pickle through an unpickler that constructs nothing (every
# global becomes _Opaque) and checks each storage against the bytes the file holds for it.

#: Bytes per element of the storage classes torch.save names (newer dtypes use UntypedStorage).
_STORAGE_ITEMSIZE = {
    "UntypedStorage": 1, "ByteStorage": 1, "CharStorage": 1, "BoolStorage": 1, "QInt8Storage": 1,
    "QUInt8Storage": 1, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1, "ShortStorage": 2, "HalfStorage": 2,
    "BFloat16Storage": 2, "IntStorage": 4, "FloatStorage": 4, "QInt32Storage": 4, "LongStorage": 8,
    "DoubleStorage": 8, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
}  # fmt: skip


class _Opaque:
    """Stands in for every object the storage scan meets: it is built, filled and set, and ignored."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name, self.itemsize = name, _STORAGE_ITEMSIZE[name]


class _StorageScanner(pickle.Unpickler):
    """An unpickler that records each storage's persistent id, and constructs nothing else."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.storages: dict[str, tuple[int, int]] = {}  # key -> (itemsize, numel)

    def find_class(self, module: str, name: str) -> Any:
        if module in ("torch", "torch.storage") and name in _STORAGE_ITEMSIZE:
            return _StorageType(name)
        return _Opaque

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
            raise ConvBNError(f"unsupported persistent object {str(pid)[:80]}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise ConvBNError(f"storage {key!r} has an unsupported type")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise ConvBNError(f"storage {key!r} has a malformed id {str(pid)[:80]}")
        entry = (storage_type.itemsize, numel)
        if self.storages.setdefault(key, entry) != entry:
            raise ConvBNError(f"storage {key!r} is declared twice with different types or sizes")
        if view is not None:
            ok = isinstance(view, tuple) and len(view) == 3 and all(type(v) is int and v >= 0 for v in view[1:])
            if not ok or view[1] + view[2] > numel:
                raise ConvBNError(f"storage {key!r} has a view {str(view)[:80]} outside its {numel} elements")
        return _Opaque()


#: Opcodes that store into or read from the unpickler's memo by index.
_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


def _check_storages(path: Path) -> bool:
    """Check every storage the pickle declares against the file's bytes; whether it is a zip."""
    try:
        if zip_first_member(path) is not None:
            records, data_pkl = _zip_records(path)
            scanner = _StorageScanner(_checked_lengths(io.BytesIO(data_pkl)))
            scanner.load()
            for key, (itemsize, numel) in scanner.storages.items():
                held = records.get(f"data/{key}")
                if held is None:
                    raise ConvBNError(f"storage {key!r} has no record data/{key} in the zip")
                if itemsize * numel > held:
                    raise ConvBNError(
                        f"storage {key!r} declares {itemsize * numel} bytes but its record data/{key} holds {held}"
                    )
            return True
        with open(path, "rb") as f:
            _check_legacy(f)
        return False
    except ConvBNError as exc:
        raise ConvBNError(f"{path}: not a readable torch checkpoint: {exc}") from None
    except Exception as exc:  # a corrupt pickle raises anything
        raise _corrupt(path, exc) from None


def _zip_records(path: Path) -> tuple[dict[str, int], bytes]:
    """The size of each member under the archive's folder, and ``data.pkl``; refuses compressed,
    encrypted, repeated or out-of-file members."""
    import struct
    import zipfile

    size = path.stat().st_size
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if not infos or "/" not in infos[0].filename:
            raise ConvBNError("the zip has no torch archive folder")
        folder = infos[0].filename.split("/", 1)[0] + "/"
        records: dict[str, int] = {}
        with open(path, "rb") as f:
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
                    raise ConvBNError(
                        f"zip member {info.filename!r} is compressed or encrypted; torch reads members in "
                        "place, so only uncompressed members can be read (re-save with torch.save)"
                    )
                f.seek(info.header_offset)
                local = f.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise ConvBNError(f"zip member {info.filename!r} has no local header")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                start = info.header_offset + 30 + name_len + extra_len
                if info.compress_size != info.file_size or start + info.file_size > size:
                    raise ConvBNError(f"zip member {info.filename!r} lies outside the file")
                if info.filename.startswith(folder):
                    name = info.filename[len(folder):]
                    if name in records:
                        raise ConvBNError(f"zip member {info.filename!r} appears twice")
                    records[name] = info.file_size
        if "data.pkl" not in records:
            raise ConvBNError(f"the zip has no {folder}data.pkl")
        return records, z.read(folder + "data.pkl")


def _checked_lengths(f: io.BytesIO) -> io.BytesIO:
    """``f``, back where it was after checking that the pickle there holds every byte its opcodes
    declare: the C unpickler allocates a BINBYTES' declared length before reading it."""
    start = f.tell()
    _scan_pickle(f)
    f.seek(start)
    return f


def _scan_pickle(f: io.BytesIO) -> None:
    """Walk one pickle's opcodes without building anything: ``pickletools`` checks every declared
    length against the bytes there, and a memo index is bounded by the opcodes before it (a
    pickler numbers its memo entries in order, and the C unpickler grows its memo table to the
    largest index it is given, so one lying index is gigabytes)."""
    import pickletools

    for count, (op, arg, _) in enumerate(pickletools.genops(f)):
        if op.name in _MEMO_OPS and isinstance(arg, int) and arg > count:
            raise ConvBNError(f"pickle memo index {arg} at opcode {count} is beyond any the pickle can hold")


def _check_legacy(f: BinaryIO) -> None:
    """The legacy format: magic, protocol and system pickles, the object pickle, the storage keys,
    then each storage as an 8-byte element count and its bytes, every one inside the file."""
    import os
    import struct

    if f.read(len(_LEGACY_MAGIC)) != _LEGACY_MAGIC:
        raise ConvBNError("not a torch.save file (no zip, no legacy magic number)")
    head = _legacy_pickles(f)  # their declared lengths checked
    for _ in range(3):  # magic number, protocol version, system info
        _StorageScanner(head).load()
    objects = _StorageScanner(head)
    objects.load()
    keys = _StorageScanner(head).load()
    if not isinstance(keys, list) or sorted(keys, key=str) != sorted(objects.storages, key=str):
        raise ConvBNError("the storage list does not match the storages the tensors use")
    end = os.fstat(f.fileno()).st_size
    f.seek(head.tell())
    for key in keys:
        itemsize, numel = objects.storages[key]
        raw = f.read(8)
        if len(raw) < 8 or struct.unpack("<q", raw)[0] != numel or f.tell() + numel * itemsize > end:
            raise ConvBNError(f"storage {key!r} of {numel * itemsize} bytes is not in the file")
        f.seek(numel * itemsize, os.SEEK_CUR)


def _legacy_pickles(f: BinaryIO) -> io.BytesIO:
    """The start of the file that holds its five pickles, in memory (the storages' bytes follow),
    each checked as :func:`_checked_lengths` does: read 1 MiB, then four times more until the
    pickles end inside it or the file does."""
    import os

    size, n = os.fstat(f.fileno()).st_size, 1 << 20
    while True:
        f.seek(0)
        head = io.BytesIO(f.read(min(n, size)))
        try:
            for _ in range(5):
                _scan_pickle(head)
        except ConvBNError:
            raise
        except Exception:  # a pickle runs past what was read, or the file is corrupt
            if n >= size:
                raise
            n *= 4
            continue
        head.seek(0)
        return head


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _state_dict(obj: Any, path: Path) -> tuple[dict[str, Any], list[str], list[str]]:
    """The tensors of a state_dict (possibly nested under a usual key), what was dropped, notes."""
    notes: list[str] = []
    if not isinstance(obj, Mapping):
        raise ConvBNError(
            f"{path}: a torch checkpoint must hold a state_dict (a dict of tensors). "
            f"Received: a {type(obj).__name__}"
        )
    dropped: list[str] = []
    if not any(_is_tensor(v) for v in obj.values()):
        nested = [k for k in _NESTED if isinstance(obj.get(k), Mapping) and any(_is_tensor(v) for v in obj[k].values())]
        if nested:
            key = nested[0]
            notes.append(f"read the state_dict nested under {key!r}")
            dropped += [str(k) for k in obj if k != key]
            obj = obj[key]
    state: dict[str, Any] = {}
    for key, value in obj.items():
        if _is_tensor(value):
            state[str(key)] = value
        else:
            dropped.append(str(key))
    if not state:
        raise ConvBNError(f"{path}: a torch checkpoint must hold a state_dict with tensors; found none")
    return state, dropped, notes


def _arrays(state: Mapping[str, Any], path: Path) -> dict[str, np.ndarray]:
    """The state_dict's tensors as NumPy views, each bounded by the storage bytes the file holds.

    torch.save keeps views as they are, so a 1-element storage expanded with stride 0 reads back as
    a tensor of any size without using memory; converting it would write all of it. A tensor must
    fit in its storage, and distinct tensors sharing one storage together too (a tensor saved twice,
    as tied weights are, counts once).
    """
    used: dict[int, int] = {}  # storage address -> bytes taken by distinct views
    views: set[tuple[Any, ...]] = set()
    arrays = {}
    for name, tensor in state.items():
        t = tensor.detach()
        kind = _unsupported_kind(t)
        if kind:
            raise ConvBNError(
                f"{path}: tensor {name!r} is {kind}: an unsupported tensor kind (convbn reads dense CPU "
                "tensors; convert it to one before saving)"
            )
        storage = t.untyped_storage()
        held = storage.nbytes() - t.storage_offset() * t.element_size()
        need = t.numel() * t.element_size()
        view = (storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if need and view not in views:
            views.add(view)
            used[view[0]] = used.get(view[0], 0) + need
            if need > held or used[view[0]] > storage.nbytes():
                raise ConvBNError(
                    f"{path}: tensor {name!r} of shape {list(t.shape)} and strides {list(t.stride())} takes "
                    f"{need} bytes, more than the {storage.nbytes()}-byte storage it reads holds "
                    f"{'for it' if need > held else 'beside the other tensors sharing it'}"
                )
        arrays[name] = _to_numpy(name, t.resolve_conj().resolve_neg(), path)
    return arrays


def _unsupported_kind(t: Any) -> str:
    """What makes ``t`` other than a dense CPU tensor with data, or ``""``."""
    import torch

    if t.is_quantized:
        return f"quantized ({t.dtype})"
    if t.layout != torch.strided:
        return f"sparse ({t.layout})"
    if t.is_nested:
        return "a nested tensor"
    if t.is_meta:
        return "a meta tensor (it has no data)"
    if t.device.type != "cpu":
        return f"a tensor on {t.device}"
    return ""


def _to_numpy(name: str, t: Any, path: Path) -> np.ndarray:
    try:
        return torch_to_numpy(t, f"{path}: tensor {name!r}")
    except (TypeError, RuntimeError):
        raise ConvBNError(f"{path}: tensor {name!r} has dtype {t.dtype}, an unsupported tensor kind") from None


def read(
    path: Path,
    *,
    pairs: Mapping[str, str] | None = None,
    eps: float | None = None,
    momentum: float | None = None,
    use_ema: bool = False,
) -> Checkpoint:
    """Read a ``torch.save`` state_dict; see the module docstring."""
    if use_ema:
        raise ConvBNError(f"{path}: use_ema applies to slim checkpoints with moving-average shadows, not torch files")
    index = find_index(path, _sniff_file, _INDEX_OF)
    if index is None:
        state, dropped, notes = _state_dict(_load(path), path)
        arrays = _arrays(state, path)
    else:
        arrays, dropped, notes = _load_shards(index)
    ckpt = layers_from_state_dict(arrays, source=index or path, pairs=pairs, eps=eps, momentum=momentum)
    ckpt.dropped += dropped
    ckpt.notes[:0] = notes
    return ckpt


def _load_shards(index: Path) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """Every shard read as a single file is (each with its own checks before unpickling, under
    ``weights_only``, memory-mapped), its tensors checked against the index, in shard order."""
    shards = Shards.read(index)
    arrays: dict[str, np.ndarray] = {}
    dropped: list[str] = []
    notes: list[str] = []
    seen: dict[str, Path] = {}
    for shard in shards.files:
        with shards.reading():
            state, shard_dropped, shard_notes = _state_dict(_load(shard), shard)
            shards.check(shard, list(state), seen)
            arrays.update(_arrays(state, shard))
        dropped += shard_dropped
        notes += [note for note in shard_notes if note not in notes]
    return arrays, dropped, notes


def layers_from_state_dict(
    arrays: Mapping[str, np.ndarray],
    *,
    source: Path | str,
    pairs: Mapping[str, str] | None = None,
    eps: float | None = None,
    momentum: float | None = None,
    fmt: str = NAME,
) -> Checkpoint:
    """A Checkpoint from state_dict-style NumPy arrays (torch names, OIHW kernels).

    Every module becomes a layer of the vocabulary: a 4-D ``weight`` (and ``bias``) a conv, a 2-D one
    a dense layer, running statistics a BatchNorm; a conv or dense layer followed by a BatchNorm of
    its width takes it (conv pairs are ``layers``, the rest ``others``). A module of ``weight`` and
    ``bias`` vectors alone is a LayerNorm or a GroupNorm, which a state_dict cannot tell apart: its
    tensors stay in ``tensors`` by name, as does anything else. Also used for safetensors files
    written from a torch state_dict without convbn's metadata.
    """
    from convbn.checkpoint import Checkpoint, LayerSource

    modules: dict[str, dict[str, str]] = {}  # module -> {leaf: full key}, in first-seen order
    for key in arrays:
        module, _, leaf = key.rpartition(".")
        modules.setdefault(module, {})[leaf] = key
    units: list[Unit] = []
    affine_only: list[str] = []
    listed: list[Unit | None] = []  # one per module, in state_dict order
    for module, leaves in modules.items():
        unit = _unit(module, leaves, arrays)
        listed.append(unit)
        if unit is not None:
            units.append(unit)
        elif set(leaves) == {"weight", "bias"} and all(np.ndim(arrays[k]) == 1 for k in leaves.values()):
            affine_only.append(module)
    _transposed_by_batch_norm(listed, arrays)
    found, unpaired = pair_units(units, explicit=pairs, source=str(source))
    ckpt = Checkpoint(format=fmt, convention=TORCH.name)
    ckpt.metadata["source_format"] = NAME
    used: set[str] = set()
    for entry in source_order(units, found, unpaired):
        if entry.name in ckpt.layers:
            raise ConvBNError(f"{source}: two layers would both be named {entry.name!r}; pass pairs / --pair")
        ckpt.order.append(entry.name)
        if entry.pair is None:
            layer = _other(source, entry.unit, entry.bn, arrays, eps=eps, momentum=momentum, fmt=fmt, notes=ckpt.notes)
            add_other(ckpt, source, entry.name, layer)
            used.update(layer.tensors.values())
            continue
        pair = entry.pair
        conv_keys: dict[str, str] = pair.conv.payload
        bn_keys: dict[str, str] = pair.bn.payload
        layer_eps, layer_momentum = resolve_settings(TORCH, fmt, eps=eps, momentum=momentum, notes=ckpt.notes)
        conv_names = {"kernel": conv_keys["weight"]}
        if "bias" in conv_keys:
            conv_names["bias"] = conv_keys["bias"]
        bn_names = {_BN_FIELDS[leaf]: key for leaf, key in bn_keys.items() if leaf in _BN_FIELDS}
        fields = {field: arrays[key] for field, key in bn_names.items()}
        params = build_layer(
            source,
            pair.key,
            {**conv_names, **bn_names},
            kernel=layouts.conv_from_torch(arrays[conv_keys["weight"]]),
            bias=arrays[conv_keys["bias"]] if "bias" in conv_keys else None,
            eps=layer_eps,
            momentum=layer_momentum,
            var_update=TORCH.var_update,
            **fields,
        )
        if "num_batches_tracked" in bn_keys:
            bn_names["num_batches_tracked"] = bn_keys["num_batches_tracked"]
            ckpt.extras[pair.key] = {"num_batches_tracked": arrays[bn_keys["num_batches_tracked"]]}
        ckpt.layers[pair.key] = params
        ckpt.sources[pair.key] = LayerSource(
            conv=conv_names, bn=bn_names, reason=pair.reason, conv_name=pair.conv.name, bn_name=pair.bn.name
        )
        used.update(conv_names.values())
        used.update(bn_names.values())
    for unit in unpaired:
        if unit.kind in ("conv", "bn"):
            ckpt.unpaired[unit.name] = unit.kind
    ckpt.tensors = {key: value for key, value in arrays.items() if key not in used}
    _mark_kind_undecided(ckpt, arrays, fmt)
    if ckpt.layers or any(o.kind == "conv" for o in ckpt.others.values()):
        ckpt.notes.append(
            f"{fmt} files do not store stride, padding, dilation or groups: the layers keep "
            "ConvBNParams defaults (stride 1, 'SAME', groups 1); set them with dataclasses.replace"
        )
    mark_flatten_undecided(ckpt, "chw")
    if affine_only:
        shown = listing(affine_only)
        ckpt.notes.append(
            f"kept by name: {len(affine_only)} module(s) of weight and bias vectors only ({shown}): a torch "
            "state_dict cannot tell a LayerNorm from a GroupNorm (or another affine layer); they are "
            "written back under these names to torch and safetensors only"
        )
    return ckpt


def _transposed_by_batch_norm(listed: list[Unit | None], arrays: Mapping[str, np.ndarray]) -> None:
    """Read a bias-free 4-D weight ``W`` as a ConvTranspose2d's ``(in, out, kh, kw)`` when the
    modules around it chain only that way: the next module is a BatchNorm of ``F = W.shape[1] !=
    W.shape[0]`` features, and the one after it a 4-D weight ``V`` with ``V.shape[0] == F !=
    V.shape[1]`` (what a transposed conv reading those ``F`` channels has).

    Why this cannot misread a net of plain convs: there a BatchNorm normalizes the output of the
    layer listed before it (post-activation: ``conv -> bn``, so ``F == W.shape[0]``) or the input of
    the one listed after it (pre-activation ResNets, DenseNets: ``bn -> conv``, so ``F ==
    V.shape[1]``); both are excluded. The BatchNorm of a pre-activation block listed after the
    block's shortcut conv (timm's ``downsample`` before ``norm1``), or a DenseNet layer's ``norm1``
    after the previous layer's ``conv2``, has ``W.shape[1]`` features but feeds the next conv, and
    stays a standalone BatchNorm. A transposed conv this does not reach (no BatchNorm after it, or
    one followed by a conv that reads it) stays a conv, and :func:`_mark_kind_undecided` says so.
    """
    for i, unit in enumerate(listed[:-2]):
        bn, nxt = listed[i + 1], listed[i + 2]
        if unit is None or unit.kind != "conv" or "bias" in unit.payload or bn is None or bn.kind != "bn":
            continue
        if nxt is None or nxt.kind not in ("conv", "conv_transpose"):
            continue
        w, v = np.shape(arrays[unit.payload["weight"]]), np.shape(arrays[nxt.payload["weight"]])
        if bn.channels == w[1] != w[0] and v[0] == bn.channels != v[1]:
            unit.kind, unit.channels = "conv_transpose", int(w[1])


def _mark_kind_undecided(ckpt: Checkpoint, arrays: Mapping[str, np.ndarray], fmt: str) -> None:
    """List in ``ckpt.kind_undecided`` every layer read as a conv that a ConvTranspose2d would
    store the same way: groups 1 and neither a bias of ``weight.shape[0] != weight.shape[1]``
    values nor a BatchNorm of that width after it says Conv2d. Where the file holds transposed
    convs too, say so in the notes (elsewhere every conv would be listed, and none is in doubt)."""
    undecided: list[str] = []
    for name, item in ckpt.in_order():
        if isinstance(item, ConvBNParams):
            source = ckpt.sources.get(name)
            weight = np.shape(arrays[source.conv["kernel"]]) if source else (0, 0)
            square = weight[0] == weight[1]
        elif item.kind == "conv" and item.groups == 1:
            weight = np.shape(arrays[item.tensors["kernel"]])
            square = weight[0] == weight[1]
            if not square and item.bias is None and item.norm is None:
                undecided.append(name)
                continue
        else:
            continue
        if square:
            undecided.append(name)
    ckpt.kind_undecided = undecided
    transposed = [n for n, o in ckpt.others.items() if o.kind == "conv_transpose"]
    if undecided and transposed:
        ckpt.notes.append(
            f"read as convs: {len(undecided)} kernel(s) whose {fmt} file cannot tell a Conv2d from a "
            f"ConvTranspose2d ({listing(undecided)}): no bias or BatchNorm of one width only after them, or "
            f"as many inputs as outputs; the file has transposed convs ({listing(transposed)}). State "
            "which they are: convbn convert --kind LAYER=conv_transpose or LAYER=conv (Checkpoint.with_kinds)"
        )


def _other(
    source: Path | str,
    unit: Unit,
    bn: Unit | None,
    arrays: Mapping[str, np.ndarray],
    *,
    eps: float | None,
    momentum: float | None,
    fmt: str,
    notes: list[str],
) -> Layer:
    """The layer of a conv or dense unit (with the BatchNorm after it), or of a standalone BatchNorm."""
    norm_unit = bn if unit.kind != "bn" else unit
    norm = None
    tensors: dict[str, str] = {}
    extras: dict[str, Any] = {}
    if norm_unit is not None:
        keys: dict[str, str] = norm_unit.payload
        names = {_BN_FIELDS[leaf]: key for leaf, key in keys.items() if leaf in _BN_FIELDS}
        layer_eps, layer_momentum = resolve_settings(TORCH, fmt, eps=eps, momentum=momentum, notes=notes)
        values: dict[str, Any] = {f: arrays[k] for f, k in names.items()}
        norm = build_norm(source, norm_unit.name, names, eps=layer_eps, momentum=layer_momentum,
                          var_update=TORCH.var_update, **values)
        tensors.update(names)
        if "num_batches_tracked" in keys:
            extras["num_batches_tracked"] = arrays[keys["num_batches_tracked"]]
            tensors["num_batches_tracked"] = keys["num_batches_tracked"]
    if unit.kind == "bn":
        layer: Layer = build_other(source, unit.name, tensors, kind="batch_norm", norm=norm, extras=extras)
    else:
        keys = unit.payload
        weight = arrays[keys["weight"]]
        kernel = (layouts.conv_from_torch(weight) if unit.kind == "conv" else layouts.transpose_from_torch(weight)
                  if unit.kind == "conv_transpose" else layouts.dense_from_torch(weight))
        own = {"kernel": keys["weight"], **({"bias": keys["bias"]} if "bias" in keys else {})}
        layer = build_other(
            source, unit.name, {**own, **tensors}, kind=unit.kind, kernel=kernel,
            bias=arrays[keys["bias"]] if "bias" in keys else None, norm=norm, extras=extras,
            norm_name=bn.name if bn is not None else "",
        )
    return layer


def _unit(module: str, leaves: dict[str, str], arrays: Mapping[str, np.ndarray]) -> Unit | None:
    """A conv (4-D ``weight``, optional ``bias``), a dense layer (2-D ``weight``) or a BatchNorm
    (running statistics, optional affine parameters); pair_units checks that their per-channel
    tensors agree."""
    shape = {leaf: tuple(np.shape(arrays[key])) for leaf, key in leaves.items()}
    if set(leaves) <= {"weight", "bias"} and len(shape.get("weight", ())) in (2, 4):
        vectors = {leaves["bias"]: shape["bias"]} if "bias" in leaves else {}
        kind: Literal["conv", "conv_transpose", "dense"] = "conv" if len(shape["weight"]) == 4 else "dense"
        out = int(shape["weight"][0])
        if kind == "conv" and len(shape.get("bias", ())) == 1 and shape["bias"][0] == shape["weight"][1] != out:
            # A Conv2d's bias has weight.shape[0] values; one of weight.shape[1] is a ConvTranspose2d's
            # (in, out, kh, kw) weight (with groups 1). Without a bias the two cannot be told apart.
            kind, out = "conv_transpose", int(shape["weight"][1])
        return Unit(module, kind, out, payload=dict(leaves), vectors=vectors, kernel=leaves["weight"])
    if {"running_mean", "running_var"} <= set(leaves) and set(leaves) <= {*_BN_FIELDS, "num_batches_tracked"}:
        vectors = {key: shape[leaf] for leaf, key in leaves.items() if leaf in _BN_FIELDS}
        n = shape["running_mean"]
        return Unit(module, "bn", int(n[0]) if len(n) == 1 else 0, payload=dict(leaves), vectors=vectors)
    return None


def _other_state(name: str, layer: Layer, *, exact: bool) -> dict[str, Any]:
    """A layer that is not a conv+BatchNorm pair as state_dict entries: under its source tensor
    names when ``exact`` (a torch source), else under the module ``name`` (``/`` as ``.``) and, for
    the BatchNorm after it, ``layer.norm_name`` (else ``<name>.bn``)."""
    names = dict(layer.tensors) if exact else {}
    module = name.replace("/", ".")
    norm_module = (layer.norm_name or (module if layer.kernel is None else f"{module}.bn")).replace("/", ".")

    def key(field: str, owner: str, leaf: str) -> str:
        return names.get(field) or (f"{owner}.{leaf}" if owner else leaf)

    state: dict[str, Any] = {}
    if layer.kernel is not None:
        kernel = np.asarray(layer.kernel)
        if layer.kind == "dense":
            state[key("kernel", module, "weight")] = layouts.dense_to_torch(kernel)
        elif layer.kind == "conv_transpose":
            state[key("kernel", module, "weight")] = layouts.transpose_to_torch(kernel)
        else:
            state[key("kernel", module, "weight")] = layouts.conv_to_torch(kernel)
        if layer.bias is not None:
            state[key("bias", module, "bias")] = layer.bias
    norm = layer.norm
    if norm is not None:
        ref = next(v for v in (norm.moving_mean, norm.gamma, norm.beta) if v is not None)
        n, dtype = int(np.shape(ref)[0]), np.asarray(ref).dtype
        if norm.gamma is not None or norm.beta is not None:
            state[key("gamma", norm_module, "weight")] = norm.gamma if norm.gamma is not None else np.ones(n, dtype)
            state[key("beta", norm_module, "bias")] = norm.beta if norm.beta is not None else np.zeros(n, dtype)
        if norm.kind == "batch_norm":
            state[key("moving_mean", norm_module, "running_mean")] = norm.moving_mean
            state[key("moving_var", norm_module, "running_var")] = norm.moving_var
            tracked = layer.extras.get("num_batches_tracked")
            state[key("num_batches_tracked", norm_module, "num_batches_tracked")] = (
                tracked if tracked is not None else np.asarray(0, np.int64)
            )
    return state


def _tensor(array: Any) -> Any:
    """``array`` as a contiguous CPU tensor. A permuted view (an HWIO kernel as OIHW, a dense
    kernel transposed) is made contiguous by torch, whose strided copy runs on its intra-op threads
    and is about twice as fast as NumPy's on a 2-core machine (``benchmarks/checkpoint_conversion.py``)."""
    a = as_numpy(array)
    with warnings.catch_warnings():
        # Arrays read from msgpack/h5 may be read-only; torch.save only reads them.
        warnings.simplefilter("ignore", UserWarning)
        if not a.flags.c_contiguous and not all(s > 0 and s % a.itemsize == 0 for s in a.strides):
            a = contiguous(a)  # strides torch.from_numpy refuses (negative: a flipped kernel)
        return numpy_to_torch(a).contiguous()  # no copy when already contiguous


def write(
    ckpt: Checkpoint, path: Path, *, progress: Progress | None = None, max_shard_size: int | None = None
) -> None:
    """Write ``ckpt`` as a torch state_dict with ``torch.save``; see the module docstring.

    With ``max_shard_size`` (bytes, as :func:`convbn.convert.save_checkpoint` parses it), a
    state_dict larger than that is written as ``<stem>-00001-of-0000N.bin`` shards (each a ``torch.save`` of part of
    it) and ``<name>.index.json``, as transformers' ``save_pretrained`` does; one that fits stays
    one file at ``path``, unless ``path`` names the index itself.
    """
    import torch

    same_format = origin_format(ckpt) == NAME
    named = same_format or torch_named(ckpt)
    ordered = ckpt.in_feature_order("chw")  # torch flattens NCHW maps: a dense layer's features in that order
    ckpt.others, ckpt.notes[:] = ordered.others, ordered.notes
    state: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if key in state:
            raise ConvBNError(f"{path}: tensor name {key!r} is used twice (two layers)")
        state[key] = value

    for layer, item in ckpt.in_order():
        if not isinstance(item, ConvBNParams):
            for key, value in _other_state(layer, item, exact=same_format).items():
                put(key, value)
            tick(progress, layer)
            continue
        params = item
        source = ckpt.sources.get(layer)
        if named and source is not None and source.conv_name and source.bn_name:
            conv, bn = source.conv_name.replace("/", "."), source.bn_name.replace("/", ".")
            affine = "gamma" in source.bn or "beta" in source.bn or not same_format
        else:
            base = layer.replace("/", ".")
            conv, bn = f"{base}.conv", f"{base}.bn"
            affine = True
        prefix = f"{conv}." if conv else ""
        put(f"{prefix}weight", layouts.conv_to_torch(np.asarray(params.kernel)))
        if params.bias is not None:
            put(f"{prefix}bias", params.bias)
        if not ckpt.fused:
            prefix = f"{bn}." if bn else ""
            dtype = np.asarray(params.moving_mean).dtype
            n = params.out_channels
            if affine or params.gamma is not None or params.beta is not None:
                put(f"{prefix}weight", params.gamma if params.gamma is not None else np.ones(n, dtype))
                put(f"{prefix}bias", params.beta if params.beta is not None else np.zeros(n, dtype))
            put(f"{prefix}running_mean", params.moving_mean)
            put(f"{prefix}running_var", params.moving_var)
            tracked = ckpt.extras.get(layer, {}).get("num_batches_tracked")
            put(f"{prefix}num_batches_tracked", tracked if tracked is not None else np.asarray(0, np.int64))
        tick(progress, layer)
    if ckpt.tensors:
        if same_format:
            for key, value in ckpt.tensors.items():
                if key in state:
                    raise ConvBNError(f"{path}: tensor name {key!r} is used twice (a layer and another tensor)")
                state[key] = value
        else:
            ckpt.notes.append(not_written_note(ckpt))
    if not ckpt.fused:
        unstored_settings_note(ckpt, NAME, TORCH)
    with atomic_output(path) as tmp:
        groups = [list(state)]
        if max_shard_size is not None:
            groups = split([(key, np.asarray(a).nbytes) for key, a in state.items()], max_shard_size)
        if len(groups) == 1 and not path.name.endswith(INDEX_SUFFIX):
            torch.save({key: _tensor(a) for key, a in state.items()}, tmp)
            return
        # Tensors are made per shard: a kernel's OIHW copy exists only while its shard is written.
        files, index_name = shard_names(path, len(groups))
        for file, group in zip(files, groups, strict=True):
            torch.save({key: _tensor(state[key]) for key in group}, tmp.parent / file)
        weight_map = {key: file for file, group in zip(files, groups, strict=True) for key in group}
        write_index(tmp.parent, index_name, weight_map, sum(np.asarray(a).nbytes for a in state.values()))

