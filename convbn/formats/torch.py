"""PyTorch ``state_dict`` files written by ``torch.save`` (``.pt``, ``.pth``, ``.bin``).

Reading uses ``torch.load(weights_only=True)``: only tensors and plain containers are unpickled, and
a pickle that would construct anything else (and so could run code) is refused. Zip-format files
are memory-mapped, so reading copies no tensor data.

Layer ``L`` is written with the default names (``/`` in ``L`` becomes ``.``)::

    L.conv.weight  (O, I/g, kH, kW)     L.bn.weight   L.bn.running_mean   L.bn.num_batches_tracked
    L.conv.bias    (if the layer has one) L.bn.bias   L.bn.running_var

or, when the checkpoint came from a torch file, with the module names it had there. Reading accepts
any naming: a conv weight followed by a BatchNorm with the same channel count pairs, whatever the
module names. torch state_dicts store no eps or momentum; reading assumes torch's defaults
(eps 1e-5, momentum 0.1, i.e. 0.9 kept) unless overridden.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convbn.conventions import TORCH
from convbn.errors import ConvBNError
from convbn.formats._common import (
    Progress,
    build_layer,
    contiguous,
    head,
    not_written_note,
    origin_format,
    resolve_settings,
    tick,
    unstored_settings_note,
    zip_first_member,
)
from convbn.formats._io import atomic_output
from convbn.formats._pairing import Unit, pair_units

if TYPE_CHECKING:
    from convbn.convert import Checkpoint

NAME = "torch"
#: The framework read() and write() import (see convbn.formats.import_frameworks).
FRAMEWORK = "torch"
#: write() honours Checkpoint.fused (conv weight + bias, no BatchNorm).
WRITES_FUSED = True

__all__ = ["FRAMEWORK", "NAME", "layers_from_state_dict", "read", "sniff", "write"]

# The pickle of torch's legacy (non-zip) magic number 0x1950a86a20f9469cfc6c, protocol 2.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
#: Keys under which training scripts commonly nest the model's state_dict.
_NESTED = ("state_dict", "model_state_dict", "model", "module", "net")
_BN_FIELDS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_var"}


def sniff(path: Path) -> bool:
    """A ``torch.save`` zip (first member ``<name>/data.pkl``) or a legacy torch pickle."""
    first = zip_first_member(path)
    if first is not None:
        return first.endswith("data.pkl") or first.endswith("/version") or first.endswith(".format_version")
    return head(path, len(_LEGACY_MAGIC)) == _LEGACY_MAGIC


def _load(path: Path) -> Any:
    import pickle

    import torch

    is_zip = zip_first_member(path) is not None
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
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConvBNError(f"{path}: not a readable torch checkpoint (truncated or corrupted): {first}") from None


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


def _to_numpy(name: str, tensor: Any, notes: list[str]) -> np.ndarray:
    import torch

    t = tensor.detach()
    if t.dtype == torch.bfloat16:
        try:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)  # type: ignore[no-any-return]
        except ImportError:
            notes.append(f"{name}: bfloat16 read as float32 (install ml_dtypes to keep bfloat16)")
            return t.float().numpy()  # type: ignore[no-any-return]
    return t.numpy()  # type: ignore[no-any-return]


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
    obj = _load(path)
    state, dropped, notes = _state_dict(obj, path)
    arrays = {name: _to_numpy(name, tensor, notes) for name, tensor in state.items()}
    ckpt = layers_from_state_dict(arrays, source=path, pairs=pairs, eps=eps, momentum=momentum)
    ckpt.dropped += dropped
    ckpt.notes[:0] = notes
    return ckpt


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

    Also used for safetensors files written from a torch state_dict without convbn's metadata.
    """
    from convbn.convert import Checkpoint, LayerSource

    modules: dict[str, dict[str, str]] = {}  # module -> {leaf: full key}, in first-seen order
    for key in arrays:
        module, _, leaf = key.rpartition(".")
        modules.setdefault(module, {})[leaf] = key
    units: list[Unit] = []
    for module, leaves in modules.items():
        unit = _unit(module, leaves, arrays)
        if unit is not None:
            units.append(unit)
    found, unpaired = pair_units(units, explicit=pairs, source=str(source))
    ckpt = Checkpoint(format=fmt, convention=TORCH.name)
    ckpt.metadata["source_format"] = NAME
    used: set[str] = set()
    for pair in found:
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
            kernel=arrays[conv_keys["weight"]].transpose(2, 3, 1, 0),
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
        ckpt.unpaired[unit.name] = unit.kind
    ckpt.tensors = {key: value for key, value in arrays.items() if key not in used}
    if ckpt.layers:
        ckpt.notes.append(
            f"{fmt} files do not store stride, padding, dilation or groups: the layers keep "
            "ConvBNParams defaults (stride 1, 'SAME', groups 1); set them with dataclasses.replace"
        )
    return ckpt


def _unit(module: str, leaves: dict[str, str], arrays: Mapping[str, np.ndarray]) -> Unit | None:
    """A conv (4-D ``weight``, optional 1-D ``bias``) or a BatchNorm (running statistics)."""
    shape = {leaf: np.shape(arrays[key]) for leaf, key in leaves.items()}
    if set(leaves) <= {"weight", "bias"} and len(shape.get("weight", ())) == 4:
        # A bias of the wrong length is reported when the layer is built, naming both tensors.
        return Unit(module, "conv", int(shape["weight"][0]), payload=dict(leaves))
    if {"running_mean", "running_var"} <= set(leaves) and set(leaves) <= {*_BN_FIELDS, "num_batches_tracked"}:
        n = shape["running_mean"]
        if len(n) != 1:
            return None
        return Unit(module, "bn", int(n[0]), payload=dict(leaves))
    return None


def _tensor(array: Any) -> Any:
    import torch

    a = contiguous(array)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    with warnings.catch_warnings():
        # Arrays read from msgpack/h5 may be read-only; torch.save only reads them.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def write(ckpt: Checkpoint, path: Path, *, progress: Progress | None = None) -> None:
    """Write ``ckpt`` as a torch state_dict with ``torch.save``; see the module docstring."""
    import torch

    same_format = origin_format(ckpt) == NAME
    state: dict[str, Any] = {}
    for layer, params in ckpt.layers.items():
        source = ckpt.sources.get(layer)
        if same_format and source is not None and source.conv_name and source.bn_name:
            conv, bn = source.conv_name, source.bn_name
            affine = "gamma" in source.bn or "beta" in source.bn
        else:
            base = layer.replace("/", ".")
            conv, bn = f"{base}.conv", f"{base}.bn"
            affine = True
        prefix = f"{conv}." if conv else ""
        state[f"{prefix}weight"] = _tensor(np.asarray(params.kernel).transpose(3, 2, 0, 1))
        if params.bias is not None:
            state[f"{prefix}bias"] = _tensor(params.bias)
        if not ckpt.fused:
            prefix = f"{bn}." if bn else ""
            dtype = np.asarray(params.moving_mean).dtype
            n = params.out_channels
            if affine or params.gamma is not None or params.beta is not None:
                state[f"{prefix}weight"] = _tensor(params.gamma if params.gamma is not None else np.ones(n, dtype))
                state[f"{prefix}bias"] = _tensor(params.beta if params.beta is not None else np.zeros(n, dtype))
            state[f"{prefix}running_mean"] = _tensor(params.moving_mean)
            state[f"{prefix}running_var"] = _tensor(params.moving_var)
            tracked = ckpt.extras.get(layer, {}).get("num_batches_tracked")
            state[f"{prefix}num_batches_tracked"] = (
                _tensor(np.asarray(tracked)) if tracked is not None else torch.tensor(0, dtype=torch.int64)
            )
        tick(progress, layer)
    if ckpt.tensors:
        if same_format:
            for key, value in ckpt.tensors.items():
                if key in state:
                    raise ConvBNError(f"{path}: tensor name {key!r} is used twice (a layer and another tensor)")
                state[key] = _tensor(value)
        else:
            ckpt.notes.append(not_written_note(ckpt))
    if not ckpt.fused:
        unstored_settings_note(ckpt, NAME, TORCH)
    with atomic_output(path) as tmp:
        torch.save(state, tmp)

