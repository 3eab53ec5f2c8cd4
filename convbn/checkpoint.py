"""The data types of convbn's checkpoint half: what every format reads into and writes from.

A :class:`Checkpoint` is a model's layers in source order, in the neutral layout of
:mod:`convbn.layouts` (HWIO conv kernels, ``(in, out)`` dense kernels, NHWC feature order):

- conv+BatchNorm pairs as :class:`~convbn.params.ConvBNParams` (:attr:`Checkpoint.layers`), the
  layers convbn runs and folds;
- every other layer as a :class:`Layer` of one :data:`LayerKind` (:attr:`Checkpoint.others`): a conv
  without BatchNorm, a transposed conv or a dense layer (each optionally followed by a BatchNorm,
  :attr:`Layer.norm`), or a standalone BatchNorm, LayerNorm or GroupNorm;
- tensors of no known role, by source name in the source's layout (:attr:`Checkpoint.tensors`),
  kept so that nothing is lost silently.

This module sits at the bottom: formats, conversion, loading and the CLI import it, and it imports
nothing of convbn but the params and error types.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from convbn.errors import ConvBNError
from convbn.layouts import FlatOrder, flat_columns, flat_rows
from convbn.params import ConvBNParams

__all__ = [
    "LAYER_KINDS",
    "NORM_KINDS",
    "Checkpoint",
    "FeatureMap",
    "FlattenSpec",
    "Layer",
    "LayerKind",
    "LayerSource",
    "Norm",
    "NormKind",
    "parse_flatten",
]

#: What a :class:`Layer` is.
LayerKind = Literal["conv", "conv_transpose", "dense", "batch_norm", "layer_norm", "group_norm"]
LAYER_KINDS: tuple[str, ...] = ("conv", "conv_transpose", "dense", "batch_norm", "layer_norm", "group_norm")
NormKind = Literal["batch_norm", "layer_norm", "group_norm"]
NORM_KINDS: tuple[str, ...] = ("batch_norm", "layer_norm", "group_norm")


@dataclasses.dataclass(frozen=True)
class Norm:
    """A normalization layer's tensors and settings.

    Attributes:
        kind: ``"batch_norm"`` (of any rank: after a conv, after a dense, or standalone),
            ``"layer_norm"`` or ``"group_norm"``.
        gamma: the scale, or None where the layer has none (``scale=False``, ``affine=False``).
        beta: the offset, or None.
        moving_mean: BatchNorm's moving mean; None for the other kinds.
        moving_var: BatchNorm's moving variance; None for the other kinds.
        eps: the epsilon, where the source states it.
        momentum: BatchNorm's momentum as the kept fraction (TF's convention), where stated.
        var_update: ``"biased"`` or ``"unbiased"``, how the moving variance was estimated, if known.
        groups: GroupNorm's number of groups.
    """

    kind: NormKind
    gamma: Any = None
    beta: Any = None
    moving_mean: Any = None
    moving_var: Any = None
    eps: float | None = None
    momentum: float | None = None
    var_update: str | None = None
    groups: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in NORM_KINDS:
            raise ConvBNError(f"a norm's kind is one of {', '.join(NORM_KINDS)}. Received: kind={self.kind!r}")
        stats = self.moving_mean is not None, self.moving_var is not None
        if self.kind == "batch_norm" and stats != (True, True):
            raise ConvBNError("a BatchNorm needs both moving_mean and moving_var")
        if self.kind != "batch_norm" and any(stats):
            raise ConvBNError(f"a {self.kind} has no moving statistics")
        if self.kind == "group_norm" and (self.groups is None or self.groups <= 0):
            raise ConvBNError(f"a group_norm needs a positive number of groups. Received: groups={self.groups!r}")


@dataclasses.dataclass(frozen=True)
class FeatureMap:
    """The feature map a dense layer's input (or output) is a flattening of.

    Attributes:
        height: the map's height.
        width: the map's width.
        channels: its channels.
        order: the order the dense kernel's features are in as stored: ``"hwc"`` (NHWC flatten, the
            neutral order) or ``"chw"`` (NCHW).
    """

    height: int
    width: int
    channels: int
    order: FlatOrder = "hwc"

    @property
    def size(self) -> int:
        return self.height * self.width * self.channels


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer that is not a conv+BatchNorm pair, in the neutral layout.

    Attributes:
        kind: what the layer is (:data:`LayerKind`).
        kernel: conv ``(kh, kw, in/groups, out)``; transposed conv ``(kh, kw, out/groups, in)``; dense
            ``(in, out)``; None for norms.
        bias: ``(out,)`` or None.
        norm: for a norm kind, the layer itself; for a conv, transposed conv or dense layer, the
            BatchNorm that directly follows it, or None.
        stride, padding, dilation, groups, output_padding: conv geometry as the source states it
            (``padding`` as in :class:`~convbn.params.ConvBNParams`: ``"SAME"``, ``"VALID"`` or
            per-side pads). ``geometry`` says whether it came from the file.
        geometry: whether the geometry fields came from the source (else defaults).
        flat_in: for a dense layer reading a flattened feature map, that map and the order of the
            kernel's input rows; None when its input is a vector (after pooling) or unknown.
        flat_out: for a dense layer whose output is reshaped into a map, that map and the order of
            the kernel's output columns.
        flat_undecided: the sides (``("in", order)``, ``("out", order)``) of a dense layer for which
            the source could not say whether, or into what map, they are flattened, each with the
            order its features would be stored in if they were (the source framework's). Moving the
            layer to the other order is refused (:meth:`as_order`) until the map is stated
            (:meth:`Checkpoint.with_flatten`, ``convbn convert --flatten``); never guessed.
        tensors: field (``kernel``, ``bias``, ``gamma``, ``beta``, ``moving_mean``, ``moving_var``)
            -> tensor name in the source.
        extras: source tensors that belong to the layer but have no field (torch's
            ``num_batches_tracked``), kept for writers of the same format.
        norm_name: the following BatchNorm's own name in the source (its module path, scope or
            layer name), so a writer can name it as the source did; empty when unknown.
    """

    kind: LayerKind
    kernel: Any = None
    bias: Any = None
    norm: Norm | None = None
    stride: tuple[int, int] = (1, 1)
    padding: Any = "VALID"
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    output_padding: tuple[int, int] = (0, 0)
    geometry: bool = False
    flat_in: FeatureMap | None = None
    flat_out: FeatureMap | None = None
    flat_undecided: tuple[tuple[str, FlatOrder], ...] = ()
    tensors: dict[str, str] = dataclasses.field(default_factory=dict)
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    norm_name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ConvBNError(f"a layer's kind is one of {', '.join(LAYER_KINDS)}. Received: kind={self.kind!r}")
        if self.kind in NORM_KINDS:
            if self.norm is None or self.norm.kind != self.kind or self.kernel is not None:
                raise ConvBNError(f"a {self.kind} layer carries its Norm of the same kind and no kernel")
            return
        if self.kernel is None:
            raise ConvBNError(f"a {self.kind} layer needs a kernel")
        rank = 2 if self.kind == "dense" else 4
        shape: tuple[int, ...] = tuple(getattr(self.kernel, "shape", ()))
        if len(shape) != rank:
            raise ConvBNError(f"a {self.kind} kernel must have {rank} dimensions. Received: shape {tuple(shape)}")
        if self.norm is not None and self.norm.kind != "batch_norm":
            raise ConvBNError(f"only a BatchNorm is carried after a {self.kind}. Received: {self.norm.kind}")
        if (self.flat_in or self.flat_out or self.flat_undecided) and self.kind != "dense":
            raise ConvBNError(f"only a dense layer reads or writes a flattened map. Received: a {self.kind}")
        if self.flat_in is not None and self.flat_in.size != shape[0]:
            raise ConvBNError(
                f"a dense layer with {shape[0]} inputs cannot read a flattened "
                f"{self.flat_in.height}x{self.flat_in.width}x{self.flat_in.channels} map"
            )
        if self.flat_out is not None and self.flat_out.size != shape[1]:
            raise ConvBNError(
                f"a dense layer with {shape[1]} outputs cannot be reshaped into a "
                f"{self.flat_out.height}x{self.flat_out.width}x{self.flat_out.channels} map"
            )

    def as_order(self, target: FlatOrder, name: str = "") -> Layer:
        """The layer with its flattened features in ``target`` order (``"hwc"`` for NHWC frameworks,
        ``"chw"`` for NCHW ones): a dense layer's input rows (:attr:`flat_in`), output columns, bias
        and following BatchNorm (:attr:`flat_out`) permuted with :func:`convbn.layouts.flat_rows` /
        :func:`~convbn.layouts.flat_columns`. Other kinds, and layers already in ``target`` order,
        come back unchanged.

        Raises:
            ConvBNError: for a side in :attr:`flat_undecided` stored in the other order, naming the
                layer (``name``) and how to state its map.
        """
        if self.kind != "dense":
            return self
        undecided = [side for side, order in self.flat_undecided if order != target]
        if undecided:
            label = f"dense layer {name!r}" if name else "a dense layer"
            raise ConvBNError(
                f"{label}: whether its {' and '.join(undecided)}put features are a flattened feature map, and of "
                f"what height x width x channels, is unknown, so they cannot be put in {target!r} order; state it: "
                f"convbn convert --flatten {name or 'LAYER'}=HxWxC (its input), {name or 'LAYER'}=out:HxWxC, or "
                f"{name or 'LAYER'}=none (neither side is a map); in Python Checkpoint.with_flatten"
            )
        kernel, bias, norm = self.kernel, self.bias, self.norm
        flat_in, flat_out = self.flat_in, self.flat_out
        if flat_in is not None and flat_in.order != target:
            kernel = flat_rows(np.asarray(kernel), flat_in.height, flat_in.width, flat_in.channels, flat_in.order, target)
            flat_in = dataclasses.replace(flat_in, order=target)
        if flat_out is not None and flat_out.order != target:
            m = flat_out

            def columns(array: Any) -> Any:
                if array is None:
                    return None
                return flat_columns(np.asarray(array), m.height, m.width, m.channels, m.order, target)

            kernel, bias = columns(kernel), columns(bias)
            if norm is not None:
                norm = dataclasses.replace(
                    norm, gamma=columns(norm.gamma), beta=columns(norm.beta),
                    moving_mean=columns(norm.moving_mean), moving_var=columns(norm.moving_var),
                )
            flat_out = dataclasses.replace(flat_out, order=target)
        if flat_in is self.flat_in and flat_out is self.flat_out:
            return self
        return dataclasses.replace(self, kernel=kernel, bias=bias, norm=norm, flat_in=flat_in, flat_out=flat_out)

    @property
    def out_features(self) -> int:
        """The number of output channels or features."""
        if self.kernel is None:
            assert self.norm is not None
            ref = self.norm.gamma if self.norm.gamma is not None else self.norm.beta
            return 0 if ref is None else int(ref.shape[-1])
        shape = self.kernel.shape
        if self.kind == "conv_transpose":
            return int(shape[2]) * self.groups
        return int(shape[-1])


@dataclasses.dataclass
class LayerSource:
    """Where one layer came from: the source tensor names and why the conv and BatchNorm paired.

    ``reason`` is one of ``"explicit"`` (``pairs=``/``--pair``), ``"graph"`` (the file states the
    pairs: a ``.meta`` graph, a ``.keras`` config, convbn's safetensors metadata), ``"naming"`` (a
    naming convention) or ``"order"`` (a conv followed by a BatchNorm with matching channels).

    Attributes:
        conv: ConvBNParams field (``kernel``, ``bias``) → tensor name in the source.
        bn: field (``gamma``, ``beta``, ``moving_mean``, ``moving_var``, extras such as
            ``num_batches_tracked``) → tensor name in the source.
        reason: why the two paired.
        conv_name: the conv's own name (module path, variable scope or layer name).
        bn_name: the BatchNorm's own name.
        geometry: whether stride/padding/dilation/groups came from the file (else defaults).
        settings: whether eps came from the file, with momentum where the format stores it (a TF
            ``.meta`` graph states eps only); else the convention's defaults.

    Names are those of the original format (:attr:`Checkpoint.metadata` ``["source_format"]``),
    which differs from the file read only for convbn safetensors files.
    """

    conv: dict[str, str]
    bn: dict[str, str]
    reason: str
    conv_name: str = ""
    bn_name: str = ""
    geometry: bool = False
    settings: bool = False


@dataclasses.dataclass
class Checkpoint:
    """Conv+BatchNorm layers and the rest of a checkpoint.

    Attributes:
        layers: conv+BatchNorm pairs in source order, keyed by the conv's own name in the source
            (``L`` for convbn's own ``L.conv``/``L.bn`` templates).
        tensors: every other tensor, by its source name, in the source's layout (dense layers,
            lone convs, unpaired BatchNorms, embeddings).
        dropped: names deliberately left out (optimizer slots, ``global_step``), never silently.
        format: the source format name.
        convention: name of the :mod:`convbn.conventions` preset the source follows, if known.
        sources: per layer, the source tensor names and the pairing reason.
        notes: human-readable report lines (defaults assumed, overrides applied, folds done).
        metadata: free-form provenance carried to formats that can store it (safetensors);
            ``"source_format"`` names the format the names in ``sources``/``tensors`` belong to.
        extras: per layer, source tensors that belong to the pair but have no ConvBNParams field
            (torch's ``num_batches_tracked``).
        unpaired: convs and BatchNorms left unpaired (name → ``"conv"`` or ``"bn"``); their tensors
            are in ``tensors``.
        fused: True when each layer's BatchNorm was folded into its conv
            (:func:`convbn.convert.fuse_checkpoint`); writers then write conv weight and bias only.
        others: every layer that is not a conv+BatchNorm pair, as a :class:`Layer` in the neutral
            layout, keyed by its own name in the source (dense, lone or transposed convs, standalone
            norms). Their tensors are no longer in ``tensors``.
        order: the names of ``layers`` and ``others`` in source order; empty means ``layers`` then
            ``others``. :meth:`in_order` walks it.
        kind_undecided: the names of layers (in ``layers`` or ``others``) read as convs whose file
            cannot tell a conv from a transposed conv (a torch ``weight`` of ``(O, I, kh, kw)`` is a
            Conv2d's ``(out, in)`` or a ConvTranspose2d's ``(in, out)``, and the neutral kernel is the
            same array either way). :meth:`with_kinds` (``convbn convert --kind``) states them;
            writing to a format that records the kind is refused while the checkpoint also holds
            transposed convs (:func:`convbn.convert.check_kinds`).
    """

    layers: dict[str, ConvBNParams] = dataclasses.field(default_factory=dict)
    tensors: dict[str, Any] = dataclasses.field(default_factory=dict)
    dropped: list[str] = dataclasses.field(default_factory=list)
    format: str = ""
    convention: str | None = None
    sources: dict[str, LayerSource] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    extras: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    unpaired: dict[str, str] = dataclasses.field(default_factory=dict)
    fused: bool = False
    others: dict[str, Layer] = dataclasses.field(default_factory=dict)
    order: list[str] = dataclasses.field(default_factory=list)
    kind_undecided: list[str] = dataclasses.field(default_factory=list)

    def in_order(self) -> list[tuple[str, ConvBNParams | Layer]]:
        """Every layer, pairs and others, in source order.

        Names in :attr:`order` that are in neither mapping are skipped; layers it does not list
        follow, pairs first.
        """
        seen: set[str] = set()
        out: list[tuple[str, ConvBNParams | Layer]] = []
        for name in [*self.order, *self.layers, *self.others]:
            if name in seen:
                continue
            item: ConvBNParams | Layer | None = self.layers.get(name)
            if item is None:
                item = self.others.get(name)
            if item is not None:
                seen.add(name)
                out.append((name, item))
        return out

    def in_feature_order(self, target: FlatOrder) -> Checkpoint:
        """A copy whose dense layers have their flattened features in ``target`` order
        (:meth:`Layer.as_order`), with a note naming each layer permuted; what a writer of an NHWC
        (``"hwc"``) or NCHW (``"chw"``) framework writes from.

        Raises:
            ConvBNError: naming every dense layer whose flatten is undecided and would need moving.
        """
        out = self.copy()
        refused: list[str] = []
        for name, layer in self.others.items():
            try:
                moved = layer.as_order(target, name)
            except ConvBNError as exc:
                refused.append(name)
                first = exc
                continue
            if moved is not layer:
                out.others[name] = moved
                sides = [s for s, m in (("input rows", layer.flat_in), ("output columns", layer.flat_out))
                         if m is not None and m.order != target]
                m = layer.flat_in if layer.flat_in is not None and layer.flat_in.order != target else layer.flat_out
                assert m is not None
                out.notes.append(
                    f"permuted the {' and '.join(sides)} of dense layer {name!r} from {m.order!r} to {target!r} "
                    f"order (a flattened {m.height}x{m.width}x{m.channels} map)"
                )
        if len(refused) > 1:
            raise ConvBNError(
                f"{len(refused)} dense layers have an undecided flatten ({', '.join(map(repr, refused))}): "
                f"{str(first).partition(': ')[2]}"
            )
        if refused:
            raise first
        return out

    def with_flatten(self, spec: Mapping[str, FlattenSpec]) -> Checkpoint:
        """A copy with the flattened maps of the named dense layers stated (``convbn convert
        --flatten``): ``{layer: FlattenSpec}``, as :func:`parse_flatten` gives it. What the source
        said about those sides is replaced, with a note; the features' stored order is the source's
        (its undecided order, else ``"chw"`` for a torch source and ``"hwc"`` otherwise).

        Raises:
            ConvBNError: for a name that is no dense layer of the checkpoint, or a map whose size is
                not the layer's.
        """
        out = self.copy()
        default: FlatOrder = "chw" if self.metadata.get("source_format", self.format) == "torch" else "hwc"
        dense = [n for n, layer in self.others.items() if layer.kind == "dense"]
        for name, item in spec.items():
            layer = out.others.get(name)
            if layer is None or layer.kind != "dense":
                raise ConvBNError(
                    f"--flatten must name a dense layer of the checkpoint; it has {dense[:8]}. Received: {name!r}"
                )
            stored = dict(layer.flat_undecided)
            fields: dict[str, Any] = {}
            for side in item.sides:
                old = layer.flat_in if side == "in" else layer.flat_out
                order = stored.get(side) or (old.order if old is not None else default)
                shape = item.map_in if side == "in" else item.map_out
                fields[f"flat_{side}"] = None if shape is None else FeatureMap(*shape, order=order)
            fields["flat_undecided"] = tuple((s, o) for s, o in layer.flat_undecided if s not in item.sides)
            try:
                out.others[name] = dataclasses.replace(layer, **fields)
            except ConvBNError as exc:
                raise ConvBNError(f"--flatten {name}: {exc}") from None
            out.notes.append(f"flatten of dense layer {name!r} given explicitly: {item.text}")
        return out

    def copy(self) -> Checkpoint:
        """A copy with new containers; arrays and params (immutable) are shared, not copied."""
        return dataclasses.replace(
            self,
            layers=dict(self.layers),
            tensors=dict(self.tensors),
            dropped=list(self.dropped),
            sources=dict(self.sources),
            notes=list(self.notes),
            metadata=dict(self.metadata),
            extras={k: dict(v) for k, v in self.extras.items()},
            unpaired=dict(self.unpaired),
            others=dict(self.others),
            order=list(self.order),
            kind_undecided=list(self.kind_undecided),
        )

    def with_kinds(self, spec: Mapping[str, str]) -> Checkpoint:
        """A copy with the kinds of the named layers stated (``convbn convert --kind LAYER=KIND``):
        ``{layer: "conv" | "conv_transpose"}`` for layers in :attr:`kind_undecided`.

        A layer stated ``"conv_transpose"`` keeps its kernel array (the neutral layouts of the two
        kinds are the same axes of a torch weight) and its transposed reading decides the rest: a
        conv+BatchNorm pair becomes a transposed conv carrying that BatchNorm (its kernel must be
        square, as the BatchNorm's width is then both readings' output); a lone conv takes the
        standalone BatchNorm that directly follows it in :attr:`order` when that BatchNorm has the
        transposed conv's output width. ``"conv"`` keeps the layer and removes it from
        :attr:`kind_undecided`. Each is noted.

        Raises:
            ConvBNError: a name that is not undecided, a kind other than the two, or a layer whose
                tensors cannot be a transposed conv's (a bias or a BatchNorm of the conv's width).
        """
        out = self.copy()
        for name, kind in spec.items():
            if name not in self.kind_undecided or not (name in self.layers or name in self.others):
                undecided = [n for n in self.kind_undecided if n in self.layers or n in self.others]
                raise ConvBNError(
                    f"--kind must name a layer whose kind the file could not decide; this checkpoint has "
                    f"{undecided[:8] or 'none'}. Received: {name!r}"
                )
            if kind not in ("conv", "conv_transpose"):
                raise ConvBNError(f"--kind takes LAYER=conv or LAYER=conv_transpose. Received: {name}={kind}")
            out.kind_undecided.remove(name)
            if kind == "conv":
                out.notes.append(f"kind of layer {name!r} given explicitly: conv")
                continue
            taken = out._as_transpose(name)
            out.notes.append(
                f"kind of layer {name!r} given explicitly: conv_transpose"
                + (f", with the BatchNorm {taken!r} after it" if taken else "")
            )
        return out

    def _as_transpose(self, name: str) -> str:
        """Re-read layer ``name`` (a conv, in place) as a transposed conv; the name of a standalone
        BatchNorm it took, else ``""``."""
        def refuse(why: str) -> ConvBNError:
            return ConvBNError(f"layer {name!r} cannot be a transposed conv: {why}")

        taken = ""
        params = self.layers.pop(name, None)
        if params is not None:
            cin, cout = np.shape(params.kernel)[2:]
            if cin != cout or params.groups != 1:
                raise refuse(f"the BatchNorm after it has {cout} values, a transposed conv of its kernel gives {cin}")
            source = self.sources.pop(name, None)
            norm = Norm("batch_norm", params.gamma, params.beta, params.moving_mean, params.moving_var,
                        eps=params.eps, momentum=params.momentum, var_update=params.var_update)
            layer = Layer("conv_transpose", kernel=params.kernel, bias=params.bias, norm=norm,
                          tensors={**(source.conv if source else {}), **(source.bn if source else {})},
                          extras=self.extras.pop(name, {}), norm_name=source.bn_name if source else "",
                          stride=params.stride, padding=params.padding, dilation=params.dilation,
                          geometry=bool(source and source.geometry))
        else:
            conv = self.others[name]
            if conv.kind != "conv" or conv.groups != 1:
                raise refuse(f"it is a {conv.kind} with groups={conv.groups}")
            _, _, out_width, in_width = np.shape(conv.kernel)
            if conv.bias is not None and out_width != in_width:
                raise refuse(f"its bias has {in_width} values, a transposed conv of its kernel gives {out_width}")
            if conv.norm is not None and out_width != in_width:
                raise refuse(f"the BatchNorm after it has {in_width} values, a transposed conv gives {out_width}")
            fields: dict[str, Any] = {}
            order = self.order or [*self.layers, *self.others]
            after = order[order.index(name) + 1] if name in order and order.index(name) + 1 < len(order) else ""
            bn = self.others.get(after)
            if conv.norm is None and bn is not None and bn.kind == "batch_norm" and bn.out_features == out_width:
                assert bn.norm is not None
                taken = after
                del self.others[after]
                fields = {"norm": bn.norm, "tensors": {**conv.tensors, **bn.tensors},
                          "extras": {**conv.extras, **bn.extras}, "norm_name": after}
            layer = dataclasses.replace(conv, kind="conv_transpose", **fields)
        self.others[name] = layer
        # others in source order: verification matches them by position
        order = [n for n in (self.order or [*self.layers, *self.others]) if n != taken]
        self.order = order
        self.others = {n: self.others[n] for n in [*order, *self.others] if n in self.others}
        return taken




@dataclasses.dataclass(frozen=True)
class FlattenSpec:
    """What ``--flatten LAYER=...`` states about one dense layer's sides.

    Attributes:
        sides: the sides stated, ``"in"`` and/or ``"out"``.
        map_in: ``(height, width, channels)`` of the map its input is a flattening of; None for a vector.
        map_out: the same for the map its output is reshaped into.
        text: the spec as given, for the report.
    """

    sides: tuple[str, ...]
    map_in: tuple[int, int, int] | None = None
    map_out: tuple[int, int, int] | None = None
    text: str = ""


_MAP = re.compile(r"(\d+)x(\d+)x(\d+)")


def parse_flatten(items: list[str] | tuple[str, ...] | None) -> dict[str, FlattenSpec]:
    """``--flatten`` items as :meth:`Checkpoint.with_flatten` takes them.

    Each item is ``LAYER=HxWxC`` (the dense layer's input is a flattened H x W x C map),
    ``LAYER=in:HxWxC``, ``LAYER=out:HxWxC`` (its output is reshaped into one) or ``LAYER=none``
    (neither side is a map); items for the same layer combine.

    Example:
        >>> parse_flatten(["d_h4_lin=2x2x32"])["d_h4_lin"].map_in
        (2, 2, 32)

    Raises:
        ConvBNError: for an item of another form, naming it.
    """
    specs: dict[str, FlattenSpec] = {}
    for item in items or ():
        name, eq, value = str(item).rpartition("=")
        side, colon, shape = value.partition(":")
        if not colon:
            side, shape = "in", value
        match = _MAP.fullmatch(shape)
        if not eq or not name or side not in ("in", "out") or (shape != "none" and not match) or (
            shape == "none" and colon
        ) or (match and 0 in tuple(int(g) for g in match.groups())):
            raise ConvBNError(
                "--flatten takes LAYER=HxWxC, LAYER=in:HxWxC, LAYER=out:HxWxC or LAYER=none, with positive "
                f"sizes. Received: {item!r}"
            )
        old = specs.get(name, FlattenSpec(()))
        dims = tuple(int(g) for g in match.groups()) if match else None
        if shape == "none":
            new = FlattenSpec(("in", "out"), None, None, item)
        elif side == "in":
            new = FlattenSpec(tuple(dict.fromkeys((*old.sides, "in"))), dims, old.map_out, item)  # type: ignore[arg-type]
        else:
            new = FlattenSpec(tuple(dict.fromkeys((*old.sides, "out"))), old.map_in, dims, item)  # type: ignore[arg-type]
        if old.text:
            new = dataclasses.replace(new, text=f"{old.text}, {item}")
        specs[name] = new
    return specs
