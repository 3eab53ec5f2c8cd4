"""Load any checkpoint into an existing model built from a framework's ordinary layers.

:func:`load_into` finds the model's Conv -> BatchNorm pairs (torch: ``torch.fx`` tracing, else
module order; Keras: the layer graph, else layer order; Flax: variable-tree order) and every other
layer (:class:`Part`: conv, transposed conv, dense, BatchNorm, LayerNorm, GroupNorm), matches them
to the checkpoint's (or a live source model's) pairs and other layers with
:mod:`convbn.loading.matching` (kinds agree; names, the graphs' structure, order only where a graph
fixes it; ambiguity refused, ``mapping=`` decides), folds a bias the model's layer lacks into the
BatchNorm after it, puts a dense layer's flattened features in the model's order (as the
checkpoint or the model's graph says; undecided, refused), translates every convention, and
writes everything at once, or nothing. It returns a
:class:`LoadReport`; with ``strict=True`` anything unmatched raises :class:`LoadError` carrying the
report before a single weight changes.

:func:`conform_checkpoint` applies the same matcher to a checkpoint and a state file of the user's
model (``convbn convert SRC DST --like MODEL_STATE``), so the output has the model's names.

This package imports no framework at import time: the framework's module (``_torch``, ``_keras``,
``_flax``) is loaded once the model's kind is known, and only if that framework is already imported
(the model could not exist otherwise).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from convbn.errors import ConvBNError
from convbn.folding import loses
from convbn.loading.graphs import file_graph
from convbn.loading.matching import Graph, Layer, Matching, match
from convbn.params import ConvBNParams

if TYPE_CHECKING:
    from convbn.checkpoint import Checkpoint, Norm
    from convbn.checkpoint import Layer as CheckpointLayer
    from convbn.layouts import FlatOrder

__all__ = [
    "LoadError",
    "LoadReport",
    "Mismatch",
    "conform_checkpoint",
    "load_into",
]

EpsPolicy = Literal["model", "checkpoint"]
FoldOption = Literal["beta", "moving_mean"] | None | bool


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """A checkpoint layer at a model pair's place that does not fit it; never loaded.

    Attributes:
        model: the model pair (its conv's name).
        checkpoint: the checkpoint layer.
        reason: what differs, e.g. ``"kernel (HWIO) (3, 3, 16, 64) in the checkpoint, (3, 3, 16, 32)
            in the model"``.
    """

    model: str
    checkpoint: str
    reason: str


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_into` (or :func:`conform_checkpoint`) matched, loaded and left out.

    Model layers are named by their conv (torch module path, Keras layer name, Flax module path
    such as ``block/Conv_0``); checkpoint layers by their key in :attr:`Checkpoint.layers`.

    Attributes:
        matched: model layer -> checkpoint layer, for every pair loaded (or, when the load raised,
            that would have been).
        missing: model layers no checkpoint layer matched; left as they were.
        unexpected: checkpoint layers no model layer took.
        mismatched: checkpoint layers at a model layer's place that do not fit it (kernel shape,
            or a gamma/beta the model's BatchNorm lacks); never loaded.
        folded: model layer -> ``"beta"`` or ``"moving_mean"``, where the checkpoint's conv bias
            was folded into the BatchNorm because the model's conv has none.
        notes: everything else worth knowing: how pairs were found, eps that differ, layers
            matched out of order, tensors set to zero.
        pairing: how the model's pairs were found: ``"torch.fx"``, ``"module order"``,
            ``"layer graph"``, ``"layer order"``, ``"tree order"``, ``"tree names"`` (a Flax tree
            whose key order was lost), or ``"checkpoint"`` (:func:`conform_checkpoint`).
        pairs: model layer -> its BatchNorm's name.
        unused: checkpoint tensors of no known layer (:attr:`Checkpoint.tensors`: an embedding, a
            tensor no reader classified); listed, never loaded, and they do not make ``strict``
            fail. (:func:`conform_checkpoint` matches pairs only and lists the other layers' tensors
            here too.)
        untouched: the model's layers with parameters of a kind ``load_into`` does not fill (an
            embedding, a PReLU, a custom layer), left as they were; ``strict`` refuses them.
        variables: for a Flax variable tree, the new tree (trees are immutable); None otherwise
            (torch and Keras models are changed in place).
        loaded: whether the model (or the new tree) holds the checkpoint's values; False when
            the load raised.
        ambiguous: model layers and checkpoint layers of one shape that neither names, graphs nor an
            unambiguous order tell apart, each described; never loaded (``mapping=`` decides them).
        how: model layer -> what matched it: ``"mapping"``, ``"name"``, ``"structure"`` (the graphs),
            ``"order"`` (a rank the model's graph fixes) or ``"shape"`` (the only one of its shape).
        output_error: with ``example_input=``, max|y - y_source| / max|y_source| of the two models'
            eval outputs after loading; None otherwise.
        parts: model layer -> its kind, for every model layer outside the pairs that ``load_into``
            fills (conv, conv_transpose, dense, batch_norm, layer_norm, group_norm); they are
            matched, missing or unexpected as pairs are.
        permuted: dense model layer -> the sides (``"in"``, ``"out"``, ``"in+out"``) whose flattened
            feature-map order was changed to the model's (NCHW for torch, NHWC otherwise).
        undecided: dense layers whose flatten order neither the checkpoint nor the model decides,
            each described; never loaded (``convbn convert --flatten`` or
            :meth:`Checkpoint.with_flatten` states it).
    """

    matched: dict[str, str] = dataclasses.field(default_factory=dict)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[Mismatch] = dataclasses.field(default_factory=list)
    folded: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    pairing: str = ""
    pairs: dict[str, str] = dataclasses.field(default_factory=dict)
    unused: list[str] = dataclasses.field(default_factory=list)
    untouched: list[str] = dataclasses.field(default_factory=list)
    variables: Any = None
    loaded: bool = False
    ambiguous: list[str] = dataclasses.field(default_factory=list)
    how: dict[str, str] = dataclasses.field(default_factory=dict)
    output_error: float | None = None
    parts: dict[str, str] = dataclasses.field(default_factory=dict)
    permuted: dict[str, str] = dataclasses.field(default_factory=dict)
    undecided: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every model layer with parameters and every checkpoint layer matched,
        unambiguously, and fitted."""
        return not (self.missing or self.unexpected or self.mismatched or self.ambiguous or self.undecided
                    or self.untouched)

    def summary(self) -> str:
        """The report as text: counts, then each list that is not empty, then the notes."""
        lines = [
            f"{len(self.matched)} matched, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} mismatched, {len(self.ambiguous)} ambiguous; {len(self.folded)} conv bias(es) "
            f"folded (model pairs found by {self.pairing or 'n/a'})"
        ]
        lines += [f"ambiguous: {a}" for a in self.ambiguous]
        lines += [f"undecided flatten: {u}" for u in self.undecided]
        if self.missing:
            lines.append(f"missing (model layers without a checkpoint layer): {_listed(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected (checkpoint layers without a model layer): {_listed(self.unexpected)}")
        for m in self.mismatched:
            lines.append(f"mismatched: model {m.model!r} <- checkpoint {m.checkpoint!r}: {m.reason}")
        if self.folded:
            lines.append("folded: " + ", ".join(f"{k} (into {v})" for k, v in self.folded.items()))
        if self.permuted:
            lines.append("flattened features put in the model's order: "
                         + ", ".join(f"{k} ({v})" for k, v in self.permuted.items()))
        if self.unused:
            lines.append(f"not loaded (checkpoint tensors of no known layer): {_listed(self.unused)}")
        if self.untouched:
            lines.append(f"untouched (model layers of a kind load_into does not fill): {_listed(self.untouched)}")
        if self.output_error is not None:
            lines.append(f"output error on the example input: {self.output_error:.3g} (max|y - y_source| / max|y_source|)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


class LoadError(ConvBNError):
    """:func:`load_into` or :func:`conform_checkpoint` with ``strict=True`` found something
    unmatched; nothing was changed. ``report`` holds the :class:`LoadReport`."""

    def __init__(self, message: str, report: LoadReport) -> None:
        super().__init__(message)
        self.report = report


def _listed(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# -- the model side ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """One Conv -> BatchNorm pair of the model (or of a ``--like`` state file).

    Settings that are None are unknown (a Flax tree records no eps or geometry) and taken from the
    checkpoint.
    """

    name: str
    bn_name: str
    kernel_shape: tuple[int, ...]
    bias: bool
    gamma: bool
    beta: bool
    eps: float | None = None
    momentum: float | None = None
    geometry: dict[str, Any] | None = None
    handle: Any = None


@dataclasses.dataclass
class Part:
    """One model layer outside the Conv -> BatchNorm pairs, in the neutral layout.

    Attributes:
        name: its name in the model (torch module path, Keras layer name, Flax module path).
        kind: a :data:`convbn.checkpoint.LayerKind`: ``conv`` (grouped and depthwise too),
            ``conv_transpose``, ``dense``, ``batch_norm``, ``layer_norm`` or ``group_norm``.
        shape: the neutral kernel shape (HWIO; ``(kh, kw, out/groups, in)`` transposed; ``(in, out)``
            dense), or ``(features,)`` for a norm.
        bias: whether the layer has a bias (a norm: its beta).
        gamma: whether a norm has a scale.
        groups: a conv's or GroupNorm's groups; None where the model does not say (a Flax tree).
        eps: a norm's epsilon; None where unknown (a Flax tree).
        norm: the BatchNorm part that directly reads this conv's or dense layer's output (and
            nothing else reads it), where the model says so; a checkpoint bias folds into it.
        order: the framework's flatten order (``"chw"`` for torch, ``"hwc"`` otherwise).
        flat: for a dense layer, what the model's graph says of its sides: ``flat["in"]`` is the
            feature map its input is a flattening of (``(height, width, channels)``), or None where
            its input is a vector (after pooling); ``flat["out"]`` the map its output is reshaped
            into, or None. A side the graph does not decide is absent.
        handle: the framework's own objects.
        options: settings the framework's writer needs (Flax ``ConvTranspose``'s ``transpose_kernel``).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    bias: bool = False
    gamma: bool = False
    groups: int | None = None
    eps: float | None = None
    norm: str = ""
    order: FlatOrder = "hwc"
    flat: dict[str, tuple[int, int, int] | None] = dataclasses.field(default_factory=dict)
    handle: Any = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ModelPairs:
    """What a framework module found in the model: its pairs, and every other layer (``parts``)."""

    targets: list[Target]
    pairing: str
    notes: list[str] = dataclasses.field(default_factory=list)
    untouched: list[str] = dataclasses.field(default_factory=list)
    graph: Graph | None = None
    parts: list[Part] = dataclasses.field(default_factory=list)
    order: list[str] = dataclasses.field(default_factory=list)


# -- matching ----------------------------------------------------------------------------------------


def match_layers(
    targets: Sequence[Target],
    ckpt: Checkpoint,
    order: Sequence[str],
    *,
    graph: Graph | None = None,
    source_graph: Graph | None = None,
    mapping: Mapping[str, str] | None = None,
    parts: Sequence[Part] | None = None,
) -> Matching:
    """Match model pairs to the checkpoint's layers ``order`` (their keys, in checkpoint order).

    :func:`convbn.loading.matching.match` decides: ``mapping``, then names that correspond, then the
    structure of both graphs (``graph``, the model's; ``source_graph``, the checkpoint's, where it
    has one), then order only where a graph fixes it; anything else of one shape is ambiguous, never
    guessed. Indices in the result are into ``targets`` then ``parts``, and into ``order`` then
    :func:`source_parts` (the checkpoint's other layers, matched only when ``parts`` is given).
    """
    model = [Layer(t.name, "conv_bn", tuple(int(d) for d in t.kernel_shape)) for t in targets]
    model += [Layer(p.name, p.kind, p.shape) for p in parts or ()]
    source = []
    for key in order:
        conv_name = ckpt.sources[key].conv_name if key in ckpt.sources else ""
        aliases = frozenset({conv_name} - {"", key})
        source.append(Layer(key, "conv_bn", tuple(int(d) for d in np.shape(ckpt.layers[key].kernel)), aliases))
    if parts is not None:
        source += [Layer(a.name, a.kind, a.shape) for a in source_parts(ckpt)]
    return match(model, source, model_graph=graph, source_graph=source_graph, mapping=mapping)


@dataclasses.dataclass(frozen=True)
class SourcePart:
    """One matchable piece of a checkpoint's other layer: its kernel layer, or the BatchNorm after it."""

    name: str
    key: str
    kind: str
    shape: tuple[int, ...]
    is_norm: bool


def source_parts(ckpt: Checkpoint) -> list[SourcePart]:
    """The checkpoint's other layers (:attr:`Checkpoint.others`) as matchable pieces, in source order:
    a conv or dense layer, then the BatchNorm it carries (named by its own source name, else
    ``KEY:norm``), or a standalone norm."""
    out: list[SourcePart] = []
    for key, layer in (item for item in ckpt.in_order() if item[0] in ckpt.others):
        assert not isinstance(layer, ConvBNParams)
        if layer.kernel is not None:
            out.append(SourcePart(key, key, layer.kind, tuple(int(d) for d in np.shape(layer.kernel)), False))
        if layer.norm is not None:
            name = key if layer.kernel is None else (layer.norm_name or f"{key}:norm")
            out.append(SourcePart(name, key, layer.norm.kind, (_features(layer.norm),), True))
    return out


def _features(norm: Norm) -> int:
    ref = next((a for a in (norm.gamma, norm.beta, norm.moving_mean) if a is not None), None)
    return 0 if ref is None else int(np.shape(ref)[-1])


def checkpoint_order(ckpt: Checkpoint, notes: list[str]) -> list[str]:
    """The checkpoint's layer keys in model order.

    A Flax tree that went through a JAX transformation (``jax.jit``, ``tree_map``) before it was
    saved has its keys sorted as strings, which puts ``Conv_10`` before ``Conv_2``; such a file's
    layers are put in natural order, which is Flax's creation order for its default names.
    """
    from convbn.formats._common import origin_format
    from convbn.formats._pairing import natural_key

    keys = list(ckpt.layers)
    if origin_format(ckpt) == "flax" and keys == sorted(keys):
        natural = sorted(keys, key=natural_key)
        if natural != keys:
            notes.append(
                "the flax file's keys are sorted as strings (as after jax.jit), which loses the "
                "modules' order: its layers were taken in natural order (Conv_2 before Conv_10)"
            )
            return natural
    return keys


# -- staging: the values each model pair receives ----------------------------------------------------


def _fold_target(fold_bias: Any) -> str | None:
    if fold_bias is None or fold_bias is False:
        return None
    if fold_bias is True:
        return "beta"
    if fold_bias in ("beta", "moving_mean"):
        return str(fold_bias)
    raise ConvBNError(
        f"fold_bias must be 'beta', 'moving_mean', or None/False to refuse folding. Received: fold_bias={fold_bias!r}"
    )


def _check_eps_policy(eps: Any) -> None:
    if eps not in ("model", "checkpoint"):
        raise ConvBNError(f"eps must be 'model' or 'checkpoint'. Received: eps={eps!r}")


@dataclasses.dataclass
class Staged:
    """A model pair and the params it receives, with the checkpoint layer they come from."""

    target: Target
    layer: str
    params: ConvBNParams
    extras: dict[str, Any]


def stage(
    targets: Sequence[Target],
    ckpt: Checkpoint,
    order: Sequence[str],
    report: LoadReport,
    *,
    fold_bias: str | None,
    eps: str,
    graph: Graph | None = None,
    source_graph: Graph | None = None,
    mapping: Mapping[str, str] | None = None,
    parts: Sequence[Part] | None = None,
) -> list[Staged | StagedPart]:
    """Match, then compute every value each matched pair (and, given ``parts``, each matched other
    layer: :func:`stage_parts`) receives; fills ``report``.

    Nothing is written here: frameworks apply the result only once all of it is known.
    """
    from convbn.folding import fit

    matching = match_layers(targets, ckpt, order, graph=graph, source_graph=source_graph, mapping=mapping,
                            parts=parts)
    pieces = source_parts(ckpt) if parts is not None else []
    model_names = [t.name for t in targets] + [p.name for p in parts or ()]
    model_shapes = [tuple(t.kernel_shape) for t in targets] + [p.shape for p in parts or ()]
    source_names = list(order) + [a.name for a in pieces]
    source_shapes = [tuple(np.shape(ckpt.layers[k].kernel)) for k in order] + [a.shape for a in pieces]
    report.notes += matching.notes
    report.ambiguous += [a.describe() for a in matching.ambiguous]
    report.how.update({model_names[i]: how for i, how in matching.how.items()})
    for i, j in matching.mismatched:
        report.mismatched.append(Mismatch(
            model_names[i], source_names[j],
            f"{_what(j, len(order), pieces)} {source_shapes[j]} in the checkpoint, {model_shapes[i]} in the model",
        ))
    report.missing += [model_names[i] for i in matching.missing]
    report.unexpected += [source_names[j] for j in matching.unexpected]
    matched_parts = [(parts[i - len(targets)], pieces[j - len(order)])  # type: ignore[index]
                     for i, j in matching.matched if i >= len(targets)]

    staged: list[Staged | StagedPart] = []
    eps_differs: list[str] = []
    unknown_eps: set[float] = set()
    zero_bias: list[str] = []
    for i, j in matching.matched:
        if i >= len(targets):
            continue
        target, layer = targets[i], order[j]
        params = ckpt.layers[layer]
        source = ckpt.sources.get(layer)
        if source is not None and source.geometry and target.geometry:
            groups = target.geometry.get("groups")
            if groups is not None and groups != params.groups:
                report.mismatched.append(Mismatch(
                    target.name, layer, f"groups {params.groups} in the checkpoint, {groups} in the model"
                ))
                continue
        # eps first: a bias folded into beta must be folded with the eps the model will run with.
        if target.eps is None:
            unknown_eps.add(params.eps)
            new_eps = params.eps
        else:
            if target.eps != params.eps:
                stated = "stored in the file" if source is not None and source.settings else "assumed: the file stores none"
                eps_differs.append(f"{target.name} (model {target.eps:g}, checkpoint {params.eps:g}, {stated})")
            new_eps = params.eps if eps == "checkpoint" else target.eps
        params = dataclasses.replace(params, eps=new_eps)
        fitted = fit(params, bias=target.bias, gamma=target.gamma, beta=target.beta, fold=fold_bias)  # type: ignore[arg-type]
        if fitted.bias == "refused":
            raise ConvBNError(
                f"the model's conv {target.name!r} has no bias but checkpoint layer {layer!r} has one, and "
                "fold_bias=None refuses to fold it. Pass fold_bias='beta' or 'moving_mean', or give the "
                f"conv a bias. Received: fold_bias={fold_bias!r}"
            )
        params = fitted.params
        if fitted.bias == "folded":
            report.folded[target.name] = fold_bias  # type: ignore[assignment]
        elif fitted.bias == "zero":
            zero_bias.append(target.name)
        lost = [
            f"the model's BatchNorm has no {name}, and the checkpoint's {name} is not all {word}"
            for name, word in (("gamma", "ones"), ("beta", "zeros")) if name in fitted.lost
        ]
        if lost:
            if report.folded.pop(target.name, None) == "beta" and lost[-1].startswith("the model's BatchNorm has no beta"):
                lost[-1] += " (it holds the folded conv bias: fold_bias='moving_mean' leaves beta alone)"
            report.mismatched.append(Mismatch(target.name, layer, "; ".join(lost)))
            continue
        params = dataclasses.replace(
            params,
            **(target.geometry or {}),
            momentum=params.momentum if target.momentum is None else target.momentum,
        )
        report.matched[target.name] = layer
        staged.append(Staged(target, layer, params, dict(ckpt.extras.get(layer, {}))))
    staged += stage_parts(matched_parts, ckpt, report, fold_bias=fold_bias, eps=eps, eps_differs=eps_differs,
                          zero_bias=zero_bias, unknown_eps=unknown_eps)
    if eps_differs:
        action = (
            "set to the checkpoint's (eps='checkpoint')" if eps == "checkpoint"
            else "kept the model's, since eps is layer configuration (eps='checkpoint' sets the checkpoint's)"
        )
        report.notes.append(
            f"BatchNorm eps differs for {len(eps_differs)} layer(s), which changes the outputs; {action}: "
            + _listed(eps_differs, 5)
        )
    if unknown_eps and eps == "model":
        report.notes.append(
            "a Flax variable tree records no BatchNorm eps: the model's BatchNorms need epsilon="
            + " or ".join(f"{e:g}" for e in sorted(unknown_eps))
            + " (the checkpoint's) for the outputs to match"
        )
    if zero_bias:
        report.notes.append(f"the checkpoint has no conv bias for {_listed(zero_bias, 5)}: set to zero")
    if report.folded:
        formula = {
            "beta": "beta' = beta + gamma * b / sqrt(moving_var + eps)",
            "moving_mean": "moving_mean' = moving_mean - b",
        }[fold_bias or "beta"]
        report.notes.append(
            f"folded the checkpoint's conv bias into {fold_bias} for {len(report.folded)} layer(s) whose "
            f"conv has none: {formula} (exact in eval mode)"
        )
    return staged


@dataclasses.dataclass
class StagedPart:
    """A model layer outside the pairs and the values it receives, in the neutral layout and the
    model's flatten order: ``kernel``/``bias`` for a conv or dense layer, ``norm`` for a norm."""

    part: Part
    layer: str
    kernel: Any = None
    bias: Any = None
    norm: Norm | None = None
    eps: float | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)


def _decide_flatten(part: Part, layer: CheckpointLayer) -> tuple[CheckpointLayer, str]:
    """``layer`` with the flatten sides it leaves undecided stated from the model's graph
    (:attr:`Part.flat`), and a description of any side where the two contradict each other."""
    from convbn.checkpoint import FeatureMap

    if layer.kind != "dense" or not (layer.flat_undecided or layer.flat_in or layer.flat_out):
        return layer, ""
    resolve_flat(part)
    if not part.flat:
        return layer, ""
    undecided = dict(layer.flat_undecided)
    fields: dict[str, Any] = {}
    for side, size in (("in", part.shape[0]), ("out", part.shape[1])):
        if side not in part.flat:
            continue
        model = part.flat[side]
        spatial = model is not None and model[0] * model[1] > 1
        stated = layer.flat_in if side == "in" else layer.flat_out
        if side in undecided:
            fields[f"flat_{side}"] = FeatureMap(*model, order=undecided[side]) if spatial else None  # type: ignore[misc]
            fields["flat_undecided"] = tuple((s, o) for s, o in fields.get("flat_undecided", layer.flat_undecided)
                                             if s != side)
            if spatial and model is not None and model[0] * model[1] * model[2] != size:
                return layer, f"the model's graph gives a {_dims(model)} map for a {size}-wide {side}put"
        elif stated is not None and stated.height * stated.width > 1 and stated.order != part.order:
            if not spatial or model is None or (
                    model[0] * model[1], model[2]) != (stated.height * stated.width, stated.channels):
                what = "a vector" if not spatial or model is None else f"a flattened {_dims(model)} map"
                return layer, (f"the checkpoint says its {side}put is a flattened {stated.height}x{stated.width}x"
                               f"{stated.channels} map, the model's graph {what}")
    return (dataclasses.replace(layer, **fields) if fields else layer), ""


def flat_map(shape: Sequence[Any], order: FlatOrder) -> tuple[bool, tuple[int, int, int] | None]:
    """What a reshape's rank-4 (or rank-2) side says of a dense layer's side (:attr:`Part.flat`):
    ``(True, (height, width, channels))`` for a map in ``order`` (``"chw"``: NCHW), ``(True, None)``
    for a vector, ``(False, None)`` for anything else."""
    if len(shape) == 2:
        return True, None
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        return False, None
    _, a, b, c = shape
    return True, ((int(b), int(c), int(a)) if order == "chw" else (int(a), int(b), int(c)))


def resolve_flat(part: Part) -> None:
    """Fill :attr:`Part.flat` where the framework left it to be computed on demand (torch runs a
    forward pass to propagate shapes)."""
    resolve = part.options.pop("resolve_flat", None)
    if resolve is not None:
        resolve()


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def out_width(part: Part) -> int:
    """The output channels or features of a conv, transposed conv or dense part."""
    return part.shape[2] * (part.groups or 1) if part.kind == "conv_transpose" else part.shape[-1]


def _what(index: int, pairs: int, items: Sequence[Any] | None) -> str:
    """How a matched layer's shape is described: a pair's or other layer's kernel, or a norm's width."""
    if index < pairs:
        return "kernel (HWIO)"
    kind = items[index - pairs].kind if items else ""
    return {"dense": "dense kernel (in, out)", "conv": "kernel (HWIO)",
            "conv_transpose": "transposed kernel (kh, kw, out, in)"}.get(kind, f"{kind} width")


def stage_parts(
    matched: Sequence[tuple[Part, SourcePart]],
    ckpt: Checkpoint,
    report: LoadReport,
    *,
    fold_bias: str | None,
    eps: str,
    eps_differs: list[str],
    zero_bias: list[str],
    unknown_eps: set[float],
) -> list[StagedPart]:
    """The values each matched model layer outside the pairs receives; fills ``report``.

    A dense layer's flattened features are put in the model's order (:meth:`Layer.as_order`); an
    undecided flatten is :attr:`LoadReport.undecided`, never guessed. A bias the model's layer lacks
    folds into the BatchNorm after it when the checkpoint has that BatchNorm after it too (else a
    non-zero bias is a mismatch); a bias the checkpoint lacks is zero.
    """
    from convbn.folding import fold_layer_bias

    by_part = {p.name: (p, a) for p, a in matched}
    by_piece = {(a.key, a.is_norm): p for p, a in matched}
    ready: dict[str, CheckpointLayer] = {}
    refused: set[str] = set()
    out: list[StagedPart] = []
    for part, piece in matched:  # kernel layers first: a fold changes the BatchNorm after them
        if piece.is_norm:
            continue
        layer = ckpt.others[piece.key]
        if layer.geometry and part.groups is not None and part.groups != layer.groups:
            report.mismatched.append(Mismatch(part.name, piece.name,
                                              f"groups {layer.groups} in the checkpoint, {part.groups} in the model"))
            refused.add(piece.key)
            continue
        decided, conflict = _decide_flatten(part, layer)
        if conflict:
            report.mismatched.append(Mismatch(part.name, piece.key, conflict))
            refused.add(piece.key)
            continue
        try:
            moved = decided.as_order(part.order, piece.key)
        except ConvBNError as exc:
            report.undecided.append(f"{part.name} <- {piece.key}: {exc}" + (
                "" if part.flat else "; the model's graph does not say either (example_input= lets a model "
                "that cannot be traced without one run)"))
            refused.add(piece.key)
            continue
        if moved is not decided:
            sides = [s for s, m in (("in", decided.flat_in), ("out", decided.flat_out))
                     if m is not None and m.order != part.order]
            report.permuted[part.name] = "+".join(sides)
        layer = moved
        if layer.bias is not None and not part.bias:
            after = by_part.get(part.norm)
            if after is not None and layer.norm is not None and after[1].key == piece.key and after[1].is_norm:
                if fold_bias is None:
                    raise ConvBNError(
                        f"the model's {part.kind} {part.name!r} has no bias but checkpoint layer {piece.key!r} has "
                        "one, and fold_bias=None refuses to fold it. Pass fold_bias='beta' or 'moving_mean', or "
                        f"give the layer a bias. Received: fold_bias={fold_bias!r}"
                    )
                model_eps = after[0].eps if after[0].eps is not None and eps == "model" else layer.norm.eps
                into = fold_bias if model_eps is not None else "moving_mean"  # beta' needs the eps it runs with
                folded = fold_layer_bias(
                    dataclasses.replace(layer, norm=dataclasses.replace(layer.norm, eps=model_eps)), into)  # type: ignore[arg-type]
                assert folded.norm is not None
                layer = dataclasses.replace(folded, norm=dataclasses.replace(folded.norm, eps=layer.norm.eps))
                report.folded[part.name] = into
            elif loses(layer.bias, "bias"):
                report.mismatched.append(Mismatch(
                    part.name, piece.key,
                    f"the checkpoint's {layer.kind} has a bias and the model's has none, and no BatchNorm reads it "
                    "in both to fold it into: give the layer a bias",
                ))
                refused.add(piece.key)
                continue
            else:
                layer = dataclasses.replace(layer, bias=None)
        bias = layer.bias
        if bias is None and part.bias:
            bias = np.zeros(layer.out_features, np.asarray(layer.kernel).dtype)
            zero_bias.append(part.name)
        ready[piece.key] = layer
        out.append(StagedPart(part, piece.key, kernel=layer.kernel, bias=bias))
        report.matched[part.name] = piece.name
    for part, piece in matched:
        if not piece.is_norm:
            continue
        if piece.key in refused or (piece.key not in ready and by_piece.get((piece.key, False)) is not None):
            continue  # its layer was refused (reported already)
        norm = ready.get(piece.key, ckpt.others[piece.key]).norm
        assert norm is not None
        lost = [
            f"the model's {part.kind} has no {name}, and the checkpoint's {name} is not all {word}"
            for name, present, value, word in (
                ("gamma", part.gamma, norm.gamma, "ones"), ("beta", part.bias, norm.beta, "zeros"))
            if not present and loses(value, name)
        ]
        if norm.kind == "group_norm" and part.groups is not None and norm.groups != part.groups:
            lost.append(f"groups {norm.groups} in the checkpoint, {part.groups} in the model")
        if lost:
            report.mismatched.append(Mismatch(part.name, piece.name, "; ".join(lost)))
            continue
        new_eps = None
        if part.eps is None:
            if norm.eps is not None:
                unknown_eps.add(norm.eps)
        elif norm.eps is not None and norm.eps != part.eps:
            eps_differs.append(f"{part.name} (model {part.eps:g}, checkpoint {norm.eps:g})")
            new_eps = norm.eps if eps == "checkpoint" else None
        extras = dict(ckpt.others[piece.key].extras)
        out.append(StagedPart(part, piece.key, norm=norm, eps=new_eps, extras=extras))
        report.matched[part.name] = piece.name
    return out


# -- entry points ------------------------------------------------------------------------------------


def model_kind(model: Any) -> str:
    """``"torch"``, ``"keras"`` or ``"flax"``, judged without importing any framework.

    Keras is checked first: under Keras's torch backend a Keras layer is also a ``torch.nn.Module``.
    """
    for name in ("keras", "tf_keras"):  # Keras 3, then Keras 2 (transformers' TF models are tf_keras)
        module = sys.modules.get(name)
        if module is not None and isinstance(model, module.layers.Layer):
            return "keras"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return "torch"
    if isinstance(model, Mapping):
        return "flax"
    linen = sys.modules.get("flax.linen")
    if (
        linen is not None and isinstance(model, tuple) and len(model) in (2, 3)
        and isinstance(model[0], linen.Module) and isinstance(model[1], Mapping)
        and (len(model) == 2 or isinstance(model[2], Mapping))
    ):
        return "flax"
    raise TypeError(
        "model must be a torch.nn.Module, a Keras 3 model or layer (or a tf_keras one), or a Flax variable tree "
        "(the mapping model.init returns) or (module, variables). Received: model of type "
        f"{type(model).__module__}.{type(model).__qualname__}"
    )


def _strict_error(what: str, report: LoadReport) -> LoadError:
    if report.ambiguous:
        return LoadError(
            f"{what} cannot tell which checkpoint layer goes where, and never guesses: "
            + "; ".join(report.ambiguous)
            + ". Pass mapping={model layer: checkpoint layer} for these (convbn convert --like: --map "
            "LIKE_LAYER=SRC_LAYER), or a live source model, whose graph decides; nothing was changed"
            f"\n{report.summary()}",
            report,
        )
    problems = ", ".join(
        f"{len(items)} {label}" for label, items in (
            ("missing", report.missing), ("unexpected", report.unexpected), ("mismatched", report.mismatched),
            ("with an undecided flatten", report.undecided), ("of a kind not filled (untouched)", report.untouched),
        ) if items
    )
    return LoadError(
        f"{what} with strict=True needs every model layer with parameters matched to a checkpoint layer of "
        f"the same kind and shape and every checkpoint layer used; nothing was changed (pass strict=False to load what "
        f"matches). Received: {problems}\n{report.summary()}",
        report,
    )


def load_into(
    model: Any,
    path: str | os.PathLike[str] | Checkpoint | Any,
    *,
    mapping: Mapping[str, str] | None = None,
    example_input: Any = None,
    expected_output: Any = None,
    output_tolerance: float = 1e-4,
    fold_bias: FoldOption = "beta",
    strict: bool = True,
    eps: EpsPolicy = "model",
) -> LoadReport:
    """Load a checkpoint of any supported format into a model built from ordinary layers.

    The model is a ``torch.nn.Module``, a Keras 3 model, or a Flax variable tree (what
    ``module.init`` returns) or ``(module, variables)``, made of the framework's own layers
    (convbn's own layers work too). Every layer with parameters of these kinds is filled: Conv ->
    BatchNorm pairs, and every other conv (grouped, depthwise), transposed conv, dense layer,
    BatchNorm (after a dense layer, or standalone), LayerNorm and GroupNorm
    (:attr:`LoadReport.parts`); a layer of another kind is :attr:`LoadReport.untouched`. Its
    Conv -> BatchNorm pairs are found from the model itself: torch traces the forward with
    ``torch.fx`` (a conv whose only consumer is a BatchNorm; residual blocks included) and falls
    back to module registration order when tracing fails; Keras follows the layer graph (or the
    layer order of a subclassed model); a Flax tree, which has no graph, pairs a conv with the
    BatchNorm that follows it in tree order (or, in a tree whose key order was lost, by Flax's
    names).

    The pairs are matched to the source's layers by :func:`convbn.loading.matching.match`: first
    ``mapping``, then names that correspond (torch ``layer1.0.conv1``, Keras ``layer1_0_conv1``,
    Flax ``layer1/0/conv1``), then the structure of the model's data-flow graph (torch.fx, the Keras
    layer graph or the TensorFlow graph of a subclassed model's call, the jaxpr of a Flax module)
    against the source's (a live source model's), then order, only where the model's graph fixes
    it: same-shaped layers in a chain take the source's same-shaped layers in order. Same-shaped
    layers that nothing tells apart (a bottleneck's ``conv3`` and its shortcut against a file, any
    repeated shape in a model without a graph) are never guessed: they are
    :attr:`LoadReport.ambiguous`, and ``strict`` raises :class:`LoadError` naming them; ``mapping``
    or a live source decides. :attr:`LoadReport.how` says what decided each layer. The other layers
    match the same way, only ever to a checkpoint layer of their kind. Each matched pair receives:

    - the kernel in the framework's layout (OIHW for torch, HWIO otherwise);
    - the conv bias, or, when the model's conv has none, the bias folded into the BatchNorm
      (``fold_bias``, with the eps the BatchNorm runs with; exact in eval mode), or zero when the
      checkpoint has none;
    - gamma, beta and the moving statistics, as they are (a moving variance estimated with the
      biased or the unbiased batch variance estimates the same quantity).

    Every other layer receives its tensors in the framework's layout (:mod:`convbn.layouts`); a
    bias the model's layer lacks folds into the BatchNorm reading it when the checkpoint has that
    BatchNorm after it too (else a nonzero one is mismatched). A dense layer reading a flattened
    feature map (or reshaped into one) gets its features in the model's order (NCHW for torch,
    NHWC otherwise), the map taken from the checkpoint or from the model's graph (torch.fx shapes
    on the example, Keras ``Flatten``/``Reshape``, the jaxpr's reshapes):
    :attr:`LoadReport.permuted`; one neither decides is :attr:`LoadReport.undecided` and refused.

    BatchNorm eps and momentum are the model's own layer configuration and are kept (eps may be
    set to the checkpoint's with ``eps="checkpoint"``); an eps that differs from the checkpoint's
    is named in the notes, since it changes the outputs. Geometry (stride, padding, dilation) is
    the model's: most formats do not store it (see the conversion docs).

    Nothing changes unless the whole load succeeds: every value is computed and checked first,
    then written; if writing fails part-way, what was written is restored. A Flax tree is never
    modified: the new tree is :attr:`LoadReport.variables`.

    Args:
        model: a ``torch.nn.Module``, a built Keras 3 model or layer, or a Flax variable tree
            ``{"params": ..., "batch_stats": ...}``.
        path: the checkpoint (any format :func:`convbn.load_checkpoint` reads, detected from its
            content), a :class:`~convbn.Checkpoint` already loaded, or a live source model (a
            ``torch.nn.Module``, a built Keras model, Flax ``(module, variables)``), whose graph
            aligns with the model's by structure.
        mapping: model layer -> checkpoint layer (the names the report and the refusal use), for
            layers the matcher cannot decide; checked against the shapes.
        example_input: an input (NumPy, NHWC for images; torch models get it as NCHW) on which both
            models run in eval mode after loading; max|y - y_source| / max|y_source| goes in
            :attr:`LoadReport.output_error`. Per-layer checks cannot see a swap; this can. With a
            file source, ``expected_output`` must be given (the source model's output on it).
            Above ``output_tolerance`` the load is refused with ``strict`` (the model restored) and
            reported mismatched otherwise.
        expected_output: with a file source and ``example_input``: the source model's output (NHWC,
            an array or a sequence of arrays).
        output_tolerance: the relative output error ``example_input`` accepts (default 1e-4:
            float32 models agree to about 1e-6; a swapped layer gives 1e-2 and more).
        fold_bias: where a checkpoint conv bias goes when the model's conv has none: ``"beta"``
            (the default: ``beta' = beta + gamma * b / sqrt(var + eps)``) or ``"moving_mean"``
            (``mean' = mean - b``, right for fine-tuning); None or False refuses (an error).
        strict: raise :class:`LoadError` (with the report) when any model layer with parameters or
            checkpoint layer is unmatched, mismatched, ambiguous or undecided, or the model has a
            layer of a kind not filled. With False, load what matches and report the rest.
        eps: ``"model"`` keeps each BatchNorm's eps; ``"checkpoint"`` sets it to the checkpoint's
            (torch and Keras; a Flax tree holds no eps).

    Returns:
        A :class:`LoadReport`; for a Flax tree, ``report.variables`` is the loaded tree.

    Raises:
        LoadError: with ``strict=True``, when anything is unmatched or ambiguous, or the outputs on
            ``example_input`` differ; nothing was changed.
        ConvBNError: an unreadable checkpoint, a fused checkpoint (it has no BatchNorm statistics),
            a conv bias to fold with ``fold_bias=None``, an unbuilt Keras model, or bad options.
        TypeError: when ``model`` is none of the supported kinds.

    Example:
        >>> report = convbn.load_into(torch_model, "resnet.weights.h5")  # doctest: +SKIP
        >>> report.matched["layer1.0.conv1"], report.folded  # doctest: +SKIP
        ('conv2d_1', {})
        >>> variables = convbn.load_into(flax_variables, "resnet.pt").variables  # doctest: +SKIP
    """
    from convbn.convert import Checkpoint, load_checkpoint

    into = _fold_target(fold_bias)
    _check_eps_policy(eps)
    kind = model_kind(model)
    if kind == "flax" and eps == "checkpoint":
        raise ConvBNError(
            "eps='checkpoint' sets each BatchNorm's eps, which a Flax variable tree does not hold "
            "(it is the module's epsilon): build the BatchNorms with the checkpoint's eps (the report "
            "names it) and use eps='model'. Received: eps='checkpoint' with a Flax variable tree"
        )
    example = _example(example_input, expected_output, path)
    framework = importlib.import_module(f"convbn.loading._{kind}")
    found: ModelPairs = framework.find_pairs(model, example)
    live = _live_kind(path)
    source_graph: Graph | None = None
    if live is not None:
        source_framework = importlib.import_module(f"convbn.loading._{live}")
        ckpt, source_graph = _live_checkpoint(path, source_framework, example)
    elif isinstance(path, Checkpoint):
        ckpt = path
    else:
        ckpt = load_checkpoint(Path(path))
        source_graph = file_graph(Path(path), ckpt)
    if ckpt.fused or (found.targets and _looks_fused(ckpt)):
        what = "a fused checkpoint" if ckpt.fused else (
            f"{len(ckpt.unpaired)} conv(s) and no BatchNorm, as 'convbn fuse' writes them")
        raise ConvBNError(
            "a fused checkpoint has no BatchNorm statistics to load into the model's BatchNorms (its "
            f"BatchNorms were folded into the convs). Load the unfused checkpoint. Received: {what}"
        )
    report = LoadReport(
        pairing=found.pairing,
        pairs={t.name: t.bn_name for t in found.targets},
        notes=list(found.notes),
        unused=list(ckpt.tensors),
        untouched=list(found.untouched),
        parts={p.name: p.kind for p in found.parts},
    )
    if found.graph is None and (found.targets or found.parts):
        report.notes.append(
            "the model's graph is unknown (" + _why_no_graph(kind, model) + "): layers of a repeated shape "
            "cannot be told apart by order, and are reported ambiguous unless names or mapping= decide"
        )
    order = checkpoint_order(ckpt, report.notes)
    staged = stage(found.targets, ckpt, order, report, fold_bias=into, eps=eps, graph=found.graph,
                   source_graph=source_graph, mapping=mapping, parts=found.parts)
    if strict and not report.ok:
        raise _strict_error("load_into", report)
    if staged:
        report.notes.append(
            "moving statistics were copied as they are; each BatchNorm keeps its own momentum and "
            "moving-variance update (biased or unbiased), which only affect training"
        )
    saved = framework.snapshot(model) if example is not None and strict and kind != "flax" else None
    result = framework.apply(model, staged)
    if kind == "flax":
        report.variables = result
    if example is not None:
        loaded = _with_variables(model, result) if kind == "flax" else model
        expected = (
            source_framework.run(path, example) if live is not None else _arrays(expected_output)
        )
        report.output_error = _output_error(framework.run(loaded, example), expected)
        if report.output_error > output_tolerance:
            report.mismatched.append(Mismatch(
                "(model output)", "(source output)",
                f"on example_input the outputs differ by {report.output_error:.3g} relative, over "
                f"output_tolerance={output_tolerance:g}",
            ))
            if strict:
                if saved is not None:
                    framework.restore(model, saved)
                report.variables = None
                raise LoadError(
                    f"load_into matched every layer, but the loaded model's output on example_input differs "
                    f"from the source's by {report.output_error:.3g} relative (output_tolerance="
                    f"{output_tolerance:g}); the model was restored as it was. Check the geometry and eps "
                    f"the report names, or the matched list\n{report.summary()}",
                    report,
                )
    report.loaded = True
    return report


def _why_no_graph(kind: str, model: Any) -> str:
    if kind == "flax":
        return ("a Flax variable tree has none: pass (module, variables) with example_input= so its graph is "
                "traced" if isinstance(model, Mapping) else "the Flax module could not be traced")
    if kind == "torch":
        return "torch.fx could not trace it"
    return "a subclassed or nested Keras model has no layer graph convbn follows"


def _live_kind(source: Any) -> str | None:
    """The framework of a live source model, or None for a path or a Checkpoint."""
    from convbn.checkpoint import Checkpoint

    if isinstance(source, (str, os.PathLike, Checkpoint)):
        return None
    try:
        return model_kind(source)
    except TypeError:
        raise TypeError(
            "the source must be a checkpoint path, a convbn.Checkpoint, or a live model (a torch.nn.Module, a "
            "Keras model, or Flax (module, variables)). Received: source of type "
            f"{type(source).__module__}.{type(source).__qualname__}"
        ) from None


def _live_checkpoint(source: Any, framework: Any, example: np.ndarray | None) -> tuple[Checkpoint, Graph | None]:
    """A live source model's layers as a checkpoint under its own names (its pairs in ``layers``,
    every other layer in ``others``, in its order), and its graph."""
    from convbn.checkpoint import Checkpoint, FeatureMap, LayerSource
    from convbn.formats._common import mark_flatten_undecided

    found: ModelPairs = framework.find_pairs(source, example)
    ckpt = Checkpoint(format="live", metadata={"source_format": "live"})
    for target, params in zip(found.targets, framework.read(source, found), strict=True):
        ckpt.layers[target.name] = params
        ckpt.sources[target.name] = LayerSource(
            conv={}, bn={}, reason="graph", conv_name=target.name, bn_name=target.bn_name,
            geometry=target.geometry is not None, settings=target.eps is not None,
        )
    ckpt.others = framework.read_parts(source, found)
    ckpt.order = [n for n in found.order if n in ckpt.layers or n in ckpt.others]
    orders = {p.order for p in found.parts}
    # A live model states no flattened map: a dense layer that may read (or feed) one is undecided,
    # as it is in a file of the same framework.
    mark_flatten_undecided(ckpt, orders.pop() if len(orders) == 1 else "hwc")
    for part in found.parts:  # what the source's own graph decides is decided
        layer = ckpt.others.get(part.name)
        if layer is None or layer.kind != "dense" or not layer.flat_undecided:
            continue
        resolve_flat(part)
        if not part.flat:
            continue
        maps: dict[str, Any] = {side: None if m is None or m[0] * m[1] == 1 else FeatureMap(*m, order=part.order)
                                for side, m in part.flat.items()}
        fields: dict[str, Any] = {f"flat_{side}": m for side, m in maps.items()}
        fields["flat_undecided"] = tuple((s, o) for s, o in layer.flat_undecided if s not in maps)
        ckpt.others[part.name] = dataclasses.replace(layer, **fields)
    return ckpt, found.graph


def parts_as_layers(found: ModelPairs, read: Callable[[Part], CheckpointLayer | Norm]) -> dict[str, CheckpointLayer]:
    """A live model's other layers as checkpoint layers: ``read(part)`` gives a conv or dense layer
    (without BatchNorm) or a norm's :class:`~convbn.checkpoint.Norm`; a BatchNorm a part names as
    directly after it (:attr:`Part.norm`) is carried by that layer, as readers of files do."""
    from convbn.checkpoint import Layer as CheckpointLayer

    values = {p.name: read(p) for p in found.parts}
    carried = {p.norm: p.name for p in found.parts if p.norm and p.norm in values}
    out: dict[str, CheckpointLayer] = {}
    for part in found.parts:
        value = values[part.name]
        if isinstance(value, CheckpointLayer):
            norm = values.get(part.norm) if part.norm in carried else None
            out[part.name] = value if norm is None else dataclasses.replace(
                value, norm=norm, norm_name=part.norm)  # type: ignore[arg-type]
        elif part.name not in carried:
            out[part.name] = CheckpointLayer(part.kind, norm=value)  # type: ignore[arg-type]
    return out


def _arrays(value: Any) -> list[np.ndarray]:
    """An output given as an array, or a sequence or mapping of arrays, as float32 arrays in order."""
    if isinstance(value, Mapping):
        return [a for v in value.values() for a in _arrays(v)]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _arrays(v)]
    return [np.asarray(value, np.float32)]


def _example(example_input: Any, expected_output: Any, source: Any) -> np.ndarray | None:
    """``example_input`` as a NumPy array, once checked against what the source allows."""
    if example_input is None:
        if expected_output is not None:
            raise ConvBNError("expected_output= needs example_input=, the input it is the output of")
        return None
    if _live_kind(source) is None and expected_output is None:
        raise ConvBNError(
            "example_input= compares the loaded model's output with the source's, so with a checkpoint file it "
            "needs expected_output= (the source model's output on that input); or pass the live source model. "
            "Received: example_input without expected_output, source a checkpoint"
        )
    x = np.asarray(example_input)
    if x.dtype.kind != "f":
        raise ConvBNError(f"example_input must be a floating-point array (NHWC for images). Received: dtype {x.dtype}")
    return x.astype(np.float32)


def _output_error(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """max|y - y_source| / max|y_source| over every output."""
    if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(got, expected, strict=False)):
        raise ConvBNError(
            "the loaded model's outputs on example_input are not shaped as the source's: "
            f"{[a.shape for a in got]} against {[b.shape for b in expected]} (both NHWC)"
        )
    scale = max((float(np.max(np.abs(b))) for b in expected if b.size), default=0.0)
    worst = max((float(np.max(np.abs(a - b))) for a, b in zip(got, expected, strict=True) if a.size), default=0.0)
    return worst / scale if scale else worst


def _with_variables(model: Any, variables: Any) -> Any:
    """A Flax model ``(module, variables[, apply kwargs])`` holding the new variables."""
    return (model[0], variables, *model[2:]) if isinstance(model, tuple) else variables


def _looks_fused(ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` is what ``convbn fuse`` writes in a format that cannot mark it (torch,
    Keras, Flax files hold only tensors): convs and no BatchNorm at all."""
    return not ckpt.layers and bool(ckpt.unpaired) and set(ckpt.unpaired.values()) == {"conv"}


def _unused(ckpt: Checkpoint) -> list[str]:
    """The checkpoint's tensors outside conv+BatchNorm pairs: those of its other layers (a
    classifier, a lone conv), then its loose tensors."""
    return [*(t for layer in ckpt.others.values() for t in layer.tensors.values()), *ckpt.tensors]


def conform_checkpoint(
    ckpt: Checkpoint,
    like: Checkpoint,
    *,
    fold_bias: FoldOption = "beta",
    strict: bool = True,
    mapping: Mapping[str, str] | None = None,
    like_graph: Graph | None = None,
    source_graph: Graph | None = None,
) -> tuple[Checkpoint, LoadReport]:
    """``ckpt``'s layers under the names, in the order, of ``like`` (a state file of the user's model).

    ``like``'s conv+BatchNorm layers are matched to ``ckpt``'s by the matcher :func:`load_into` uses
    (``mapping``, names, then order and kernel shape where unambiguous; two files have no graphs, so
    layers of a repeated shape that names do not decide are ambiguous and refused); each matched layer takes ``ckpt``'s values (the conv
    bias folded where ``like``'s conv has none, or zero where ``ckpt``'s has none) with ``ckpt``'s eps
    and momentum, under ``like``'s names. Everything else of ``like`` (layers left unmatched with
    ``strict=False``, its other tensors) keeps ``like``'s own values, as :func:`load_into` leaves
    those weights of a model as they are, so a writer of ``like``'s format writes a file that the
    user's model loads with its framework's own strict loader.

    Args:
        ckpt: the checkpoint to convert.
        like: a checkpoint read from the model's own state file (torch state_dict, Keras
            ``.weights.h5``/``.keras``, Flax msgpack).
        fold_bias: as for :func:`load_into`.
        strict: as for :func:`load_into`.
        mapping: ``like`` layer -> ``ckpt`` layer, for layers the matcher cannot decide (as for
            :func:`load_into`; the CLI's ``--map``).
        like_graph: ``like``'s data flow where its file records one
            (:func:`convbn.loading.graphs.file_graph`: a ``.keras`` archive).
        source_graph: ``ckpt``'s, likewise; with both, layers match by structure.

    Returns:
        ``(conformed, report)``: a checkpoint in ``like``'s format with ``like``'s sources, and the
        :class:`LoadReport` (``matched`` maps ``like``'s layers to ``ckpt``'s).

    Raises:
        LoadError: with ``strict=True``, when anything is unmatched.
        ConvBNError: a fused checkpoint on either side, or a bias to fold with ``fold_bias=None``.

    Example:
        >>> out, report = conform_checkpoint(load_checkpoint("w.weights.h5"), load_checkpoint("mine.pt"))  # doctest: +SKIP
        >>> save_checkpoint(out, "converted.pt", "torch")  # doctest: +SKIP
    """
    from convbn.checkpoint import Checkpoint
    from convbn.formats._common import origin_format

    into = _fold_target(fold_bias)
    if ckpt.fused or like.fused:
        raise ConvBNError(
            "conforming needs conv+BatchNorm layers on both sides; a fused checkpoint has no BatchNorm. "
            f"Received: {'the checkpoint' if ckpt.fused else 'the like file'} is fused"
        )
    targets = []
    for key, p in like.layers.items():
        source = like.sources.get(key)
        stored = source is not None and source.settings
        targets.append(Target(
            name=key,
            bn_name=source.bn_name if source is not None else "",
            kernel_shape=tuple(int(d) for d in np.shape(p.kernel)),
            bias=p.bias is not None,
            gamma=p.gamma is not None or (source is not None and "gamma" in source.bn),
            beta=p.beta is not None or (source is not None and "beta" in source.bn),
            eps=p.eps if stored else None,
        ))
    report = LoadReport(pairing="checkpoint", pairs={t.name: t.bn_name for t in targets}, unused=_unused(ckpt))
    order = checkpoint_order(ckpt, report.notes)
    staged = stage(targets, ckpt, order, report, fold_bias=into, eps="checkpoint", mapping=mapping,
                   graph=like_graph, source_graph=source_graph)
    if strict and not report.ok:
        raise _strict_error("conforming to the like file", report)
    by_name = {s.target.name: s for s in staged if isinstance(s, Staged)}
    out = Checkpoint(format=like.format, convention=like.convention, metadata=dict(like.metadata))
    out.metadata["source_format"] = origin_format(like)
    for key, params in like.layers.items():
        if key in like.sources:
            out.sources[key] = like.sources[key]
        if key in by_name:
            s = by_name[key]
            out.layers[key] = s.params
            if params.groups != 1 and s.params.groups == 1:
                # The like file knows the conv is grouped (a Keras DepthwiseConv2D) where a source
                # that stores no groups (a torch state_dict) does not; the same HWIO kernel, and the
                # writer needs the groups to lay it out as the like file's layer.
                out.layers[key] = dataclasses.replace(s.params, groups=params.groups)
            extras = s.extras or like.extras.get(key)
        else:
            out.layers[key] = params
            extras = like.extras.get(key)
        if extras:
            out.extras[key] = dict(extras)
    out.tensors = dict(like.tensors)
    out.others = dict(like.others)  # the like file's other layers (a classifier) keep its values
    out.order = list(like.order)
    out.unpaired = dict(like.unpaired)
    out.notes = list(report.notes)
    if report.folded:
        out.metadata["folded_bias"] = f"{into}:{','.join(report.folded)}"
    kept = [k for k in like.layers if k not in by_name] + list(like.others) + list(like.tensors)
    if kept:
        out.notes.append(f"kept the like file's own values for {_listed(kept, 5)} (not in the checkpoint)")
    if ckpt.tensors or ckpt.others:
        left = [*ckpt.others, *ckpt.tensors]
        out.notes.append(
            f"not written: {len(left)} other layer(s) and tensor(s) of the checkpoint ({_listed(left, 5)}): "
            "only conv+BatchNorm layers are matched to the like file"
        )
    report.loaded = True
    return out, report
