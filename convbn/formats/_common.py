"""Helpers shared by the format modules: sniffing, building layers with errors that name the file,
conventions and their defaults, and arrays as NumPy without copies."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convbn.conventions import Convention
from convbn.errors import ConvBNError
from convbn.params import ConvBNParams

if TYPE_CHECKING:
    from convbn.checkpoint import Checkpoint, Layer, Norm
    from convbn.layouts import FlatOrder

__all__ = [
    "LAYER_NAMES",
    "Progress",
    "add_other",
    "as_numpy",
    "build_layer",
    "build_norm",
    "build_other",
    "check_variance",
    "contiguous",
    "head",
    "mark_flatten_undecided",
    "not_written_note",
    "origin_format",
    "others_as_tensors",
    "resolve_settings",
    "tick",
    "torch_named",
    "unstored_settings_note",
    "zip_first_member",
]

#: Called with each layer's name as a writer finishes it.
Progress = Callable[[str], None]


def head(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of ``path``, or ``b""`` when it is not a readable file."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def zip_first_member(path: Path) -> str | None:
    """The name of a zip's first member, from its local header (works on truncated files too)."""
    data = head(path, 30 + 1024)
    if len(data) < 30 or data[:4] != b"PK\x03\x04":
        return None
    (name_len,) = struct.unpack("<H", data[26:28])
    return data[30 : 30 + name_len].decode("utf-8", "replace")


def as_numpy(value: Any) -> np.ndarray:
    """``value`` as a NumPy array, without a copy where the framework allows."""
    if isinstance(value, np.ndarray):
        return value
    from convbn.backends.numpy import to_numpy

    return to_numpy(value)


def contiguous(value: Any) -> np.ndarray:
    """``value`` as a C-contiguous NumPy array; no copy when it is one (0-d arrays stay 0-d,
    unlike ``np.ascontiguousarray``)."""
    array = as_numpy(value)
    return array if array.flags.c_contiguous else array.copy(order="C")


def origin_format(ckpt: Checkpoint) -> str:
    """The format whose names and layouts ``ckpt.sources`` and ``ckpt.tensors`` use.

    That is the format read, except for convbn safetensors files, which record the original one.
    """
    return ckpt.metadata.get("source_format") or ckpt.format


#: ``Checkpoint.metadata`` key whose value ``"torch"`` says the layers' own names (LayerSource
#: conv_name/bn_name, ``others`` keys, Layer.norm_name) are torch module paths, with ``/`` for ``.``
#: where the format nests: set by readers of files a writer stored torch names in, so a round trip
#: torch -> keras/flax -> torch comes back under the source's names.
LAYER_NAMES = "layer_names"


def torch_named(ckpt: Checkpoint) -> bool:
    """Whether the layers of ``ckpt`` are named after torch modules (read from torch, or from a
    file written from torch that recorded it)."""
    return origin_format(ckpt) == "torch" or ckpt.metadata.get(LAYER_NAMES) == "torch"


def resolve_settings(
    convention: Convention,
    fmt: str,
    *,
    eps: float | None,
    momentum: float | None,
    stored_eps: float | None = None,
    stored_momentum: float | None = None,
    notes: list[str],
) -> tuple[float, float]:
    """eps and momentum (fraction kept) for a layer: the override, else the file's, else the default.

    Appends to ``notes`` what was assumed or overridden, once per distinct message.
    """
    if eps is not None:
        out_eps = float(eps)
        _note(notes, f"eps overridden: {out_eps:g}")
    elif stored_eps is not None:
        out_eps = float(stored_eps)
    else:
        out_eps = convention.eps
        _note(
            notes,
            f"{fmt} files do not store BatchNorm eps: assumed the {convention.name} default "
            f"{convention.eps:g} (override with eps= / --eps)",
        )
    if momentum is not None:
        out_momentum = float(momentum)
        _note(notes, f"momentum overridden: {out_momentum:g} (fraction kept)")
    elif stored_momentum is not None:
        out_momentum = float(stored_momentum)
    else:
        out_momentum = convention.momentum
        native = convention.native_momentum
        spelled = "" if convention.native_momentum_is_kept else f", spelled momentum={native:g} there"
        _note(
            notes,
            f"{fmt} files do not store BatchNorm momentum: assumed the {convention.name} default "
            f"{convention.momentum:g} kept{spelled} (override with momentum= / --momentum, as the "
            "fraction kept)",
        )
    return out_eps, out_momentum


def _note(notes: list[str], line: str) -> None:
    if line not in notes:
        notes.append(line)


def unstored_settings_note(ckpt: Checkpoint, fmt: str, convention: Convention) -> None:
    """Tell the user which eps/momentum to build target layers with when ``fmt`` stores neither."""
    settings = sorted({(p.eps, p.momentum) for p in ckpt.layers.values()})
    differing = [(e, m) for e, m in settings if (e, m) != (convention.eps, convention.momentum)]
    if not differing:
        return
    spelled = ", ".join(
        f"eps={e:g}, momentum={convention.momentum_to_native(m):g}" for e, m in differing
    )
    _note(
        ckpt.notes,
        f"{fmt} files store no BatchNorm eps/momentum, and these layers differ from the "
        f"{convention.name} defaults: build the target BatchNorm layers with {spelled}",
    )


def build_layer(source: os.PathLike[str] | str, name: str, tensors: Mapping[str, str], **fields: Any) -> ConvBNParams:
    """ConvBNParams for layer ``name``; a shape or setting error, or a moving variance that is
    negative or not finite, names the file and the tensor (``tensors``: field → name in the file)."""
    try:
        params = ConvBNParams(**fields)
    except ConvBNError as exc:
        listed = ", ".join(f"{field}={tensor!r}" for field, tensor in tensors.items())
        raise ConvBNError(f"{source}: layer {name!r} ({listed}): {exc}") from None
    check_variance(source, name, params, tensors.get("moving_var", f"{name} moving variance"))
    return params


def build_norm(
    source: os.PathLike[str] | str, name: str, tensors: Mapping[str, str], kind: str = "batch_norm", **fields: Any
) -> Norm:
    """A :class:`~convbn.checkpoint.Norm` for the norm layer ``name``; an error names the file and the
    tensors (``tensors``: field → name in the file), as :func:`build_layer`'s do. A BatchNorm's
    tensors must agree on its width, and its moving variance be finite and >= 0."""
    from convbn.checkpoint import Norm

    listed = ", ".join(f"{field}={tensor!r}" for field, tensor in tensors.items())
    arrays = {f: v for f, v in fields.items() if f in ("gamma", "beta", "moving_mean", "moving_var") and v is not None}
    shapes = {tuple(np.shape(v)) for v in arrays.values()}
    if len(shapes) > 1 or any(len(s) != 1 for s in shapes):
        raise ConvBNError(
            f"{source}: norm {name!r} ({listed}): its tensors must be vectors of one length. "
            f"Received: shapes {sorted(shapes)}"
        )
    try:
        norm = Norm(kind, **fields)  # type: ignore[arg-type]
    except ConvBNError as exc:
        raise ConvBNError(f"{source}: norm {name!r} ({listed}): {exc}") from None
    if norm.moving_var is not None:
        _check_finite_variance(source, f"norm {name!r}", norm.moving_var, tensors.get("moving_var", name))
    return norm


def add_other(ckpt: Checkpoint, source: os.PathLike[str] | str, name: str, layer: Layer) -> None:
    """Put ``layer`` in ``ckpt.others`` as ``name``, refusing a name another layer has."""
    if name in ckpt.others or name in ckpt.layers:
        raise ConvBNError(f"{source}: two layers are both named {name!r}")
    ckpt.others[name] = layer


def build_other(source: os.PathLike[str] | str, name: str, tensors: Mapping[str, str], **fields: Any) -> Layer:
    """A :class:`~convbn.checkpoint.Layer` (not a conv+BatchNorm pair) for layer ``name``; an error
    names the file and the tensors. A bias must have one value per output."""
    from convbn.checkpoint import Layer

    listed = ", ".join(f"{field}={tensor!r}" for field, tensor in tensors.items())
    try:
        layer = Layer(tensors=dict(tensors), **fields)
    except ConvBNError as exc:
        raise ConvBNError(f"{source}: layer {name!r} ({listed}): {exc}") from None
    outputs = layer.out_features
    if layer.bias is not None and tuple(np.shape(layer.bias)) != (outputs,):
        raise ConvBNError(
            f"{source}: layer {name!r} ({listed}): the bias must have one value per output ({outputs}). "
            f"Received: shape {list(np.shape(layer.bias))}"
        )
    if layer.norm is not None and layer.kernel is not None and layer.norm.moving_mean is not None:
        width = int(np.shape(layer.norm.moving_mean)[0])
        if width != outputs:
            raise ConvBNError(
                f"{source}: layer {name!r} ({listed}): the BatchNorm after it must have one value per output "
                f"({outputs}). Received: {width}"
            )
    return layer


def others_as_tensors(ckpt: Checkpoint) -> None:
    """For a writer that writes conv+BatchNorm pairs only: every other layer's arrays back in
    ``tensors`` under their source names (neutral layout, which is the TF one), so the writer
    writes them where the target is the source's format and names them as not written otherwise."""
    for name, layer in ckpt.others.items():
        norm = layer.norm
        values = {
            "kernel": layer.kernel, "bias": layer.bias, **layer.extras,
            **({} if norm is None else {
                "gamma": norm.gamma, "beta": norm.beta, "moving_mean": norm.moving_mean, "moving_var": norm.moving_var,
            }),
        }
        names = layer.tensors or {f: f"{name}/{f}" for f in values}  # a layer built in code has no source names
        for field, tensor in names.items():
            if values.get(field) is not None:
                ckpt.tensors[tensor] = values[field]
        ckpt.order = [n for n in ckpt.order if n != name]
    ckpt.others = {}


def mark_flatten_undecided(ckpt: Checkpoint, order: FlatOrder) -> None:
    """Mark the sides of dense layers that may be a flattened feature map as undecided
    (:attr:`Layer.flat_undecided`, stored in ``order``, the source framework's), where the file
    does not say: a dense layer reads a vector when its input width is the output width of the layer
    before it (a classifier after global pooling), and feeds one when its output width is the next
    layer's input; a side whose width is a multiple of its neighbour's may be a flattened map, and
    moving it between NCHW and NHWC formats is refused until it is stated."""
    import dataclasses

    from convbn.checkpoint import Layer

    items = ckpt.in_order()
    for i, (name, item) in enumerate(items):
        if not isinstance(item, Layer) or item.kind != "dense":
            continue
        n_in, n_out = (int(d) for d in np.shape(item.kernel))
        sides = []
        before = _width(items[i - 1][1], "out") if i > 0 else None
        after = _width(items[i + 1][1], "in") if i + 1 < len(items) else None
        if item.flat_in is None and before and before != n_in and n_in % before == 0:
            sides.append(("in", order))
        elif item.flat_in is None and i == 0 and any(
            (w := _width(other, "out")) and w != n_in and n_in % w == 0
            for _, other in items[1:] if isinstance(other, ConvBNParams) or other.kind in ("conv", "conv_transpose")
        ):
            # Listed first, with convs after it: a module registered before the layers that feed it
            # (self.fc defined before self.features) may read their flattened map all the same.
            sides.append(("in", order))
        if item.flat_out is None and after and after != n_out and n_out % after == 0:
            sides.append(("out", order))
        known = dict(item.flat_undecided)
        sides = [(s, o) for s, o in sides if s not in known]
        if sides:
            ckpt.others[name] = dataclasses.replace(item, flat_undecided=(*item.flat_undecided, *sides))


def _width(item: ConvBNParams | Layer, side: str) -> int | None:
    """A layer's output (or input) width, where its tensors say."""
    if isinstance(item, ConvBNParams):
        return item.out_channels if side == "out" else item.in_channels
    if item.kernel is None or side == "out":
        return item.out_features
    shape = np.shape(item.kernel)
    if item.kind == "dense":
        return int(shape[0])
    if item.kind == "conv_transpose":
        return int(shape[3])
    return int(shape[2]) * item.groups


def check_variance(source: os.PathLike[str] | str, layer: str, params: ConvBNParams, tensor: str) -> None:
    """A moving variance must be finite and >= 0: a NaN or negative one poisons every output."""
    _check_finite_variance(source, f"layer {layer!r}", params.moving_var, tensor)


def _check_finite_variance(source: os.PathLike[str] | str, owner: str, moving_var: Any, tensor: str) -> None:
    var = np.asarray(moving_var)
    bad = ~np.isfinite(var) | (var < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ConvBNError(
            f"{source}: a moving variance must be finite and >= 0. Received: {tensor}[{i}]="
            f"{float(var[i])!r} ({owner}, {int(bad.sum())} bad value(s))"
        )


def tick(progress: Progress | None, name: str) -> None:
    if progress is not None:
        progress(name)


def listing(names: Sequence[str], limit: int = 5) -> str:
    """``"a, b, c, d, e, ... (3 more)"``: the first ``limit`` names for a report line."""
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def not_written_note(ckpt: Checkpoint) -> str:
    """The report line for other tensors a cross-format write leaves out."""
    names = list(ckpt.tensors)
    shown = listing(names)
    return (
        f"not written: {len(names)} other tensor(s) of the {origin_format(ckpt)} source ({shown}); "
        "tensors of no known layer kind convert only to the same format (safetensors keeps every tensor)"
    )
