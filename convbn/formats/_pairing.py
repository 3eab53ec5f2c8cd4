"""Pairing convs with the BatchNorms that follow them, shared by every format reader.

A reader lists what it found as :class:`Unit` objects (one per conv, one per BatchNorm, in source
order) and calls :func:`pair_units`. The rules, strongest first:

1. ``explicit``: pairs the user gave (``pairs=``, ``--pair CONV=BN``, a mapping file). A name that
   is not in the file, or a pair whose channel counts differ, is an error.
2. ``graph``: pairs the file's own graph states (a ``.keras`` config, a TF ``.meta``), given by
   the reader.
3. ``naming``: conventions, tried per conv against the unpaired BatchNorms of the same parent
   (:func:`naming_candidates`).
4. ``order``: a conv whose next unit in source order is an unpaired BatchNorm with the same
   channel count (``order="adjacent"``); or, for files that only keep the order within each layer
   class (Keras ``.weights.h5``), the k-th conv of a width with the k-th BatchNorm of that width,
   where nothing else could own them (``order="by_kind"``, which refuses the file otherwise).

A dense layer pairs with the BatchNorm after it (torch's ``BatchNorm1d`` after a ``Linear``) by the
same rules, except ``by_kind``: a file that keeps the order only within each layer class cannot say
which BatchNorm follows a dense layer. A reader turns conv pairs into ``Checkpoint.layers`` and
everything else, dense pairs and unpaired units alike, into ``Checkpoint.others``; what is not a
unit at all stays in ``Checkpoint.tensors``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from convbn.errors import ConvBNError

__all__ = [
    "Pair",
    "Unit",
    "check_unit",
    "layer_key",
    "natural_key",
    "naming_candidates",
    "pair_units",
    "preview_names",
    "parse_pairs",
    "source_order",
]

Kind = Literal["conv", "conv_transpose", "dense", "bn", "other"]
#: The kinds of unit a BatchNorm can follow. An ``"other"`` unit (a LayerNorm, a GroupNorm) pairs
#: with nothing; it is listed so that :func:`source_order` keeps its place.
PRODUCERS = ("conv", "conv_transpose", "dense")
Order = Literal["adjacent", "by_kind"]


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that puts ``conv2`` before ``conv10``.

    Example:
        >>> sorted(["conv10", "conv2", "conv1"], key=natural_key)
        ['conv1', 'conv2', 'conv10']
    """
    # Alternating (str, int, str, ...) so two keys always compare position by position.
    parts = re.split(r"(\d+)", name)
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts))


@dataclasses.dataclass
class Unit:
    """A conv, a dense layer or a BatchNorm found in a file.

    Attributes:
        name: the module path, variable scope or layer name, as the source writes it.
        kind: ``"conv"``, ``"dense"`` or ``"bn"``.
        channels: the conv's output channels or dense layer's output features, or the BatchNorm's
            feature count.
        payload: whatever the reader needs to build the layer later (tensor names, arrays).
        vectors: the shapes of the unit's per-channel tensors, by their names in the file: a conv's
            bias, a BatchNorm's statistics and affine parameters. :func:`pair_units` refuses an
            unpaired unit whose vectors are not all ``(channels,)``: such a group is corrupt, and
            leaving it out would convert the file without it, silently (a paired unit's tensors are
            checked when its layer is built, with every tensor of the layer named).
        kernel: a conv's kernel name, which ``channels`` comes from (for the error message).
        family: the layer's class where a file orders layers only within each class (a Keras
            ``.weights.h5``: ``"Conv2D"``, ``"DepthwiseConv2D"``), for ``order="by_kind"``.
    """

    name: str
    kind: Kind
    channels: int
    payload: Any = None
    vectors: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    kernel: str = ""
    family: str = ""


@dataclasses.dataclass
class Pair:
    """A conv (or dense layer) and the BatchNorm that follows it.

    Attributes:
        key: the layer's name in ``Checkpoint.layers`` (see :func:`layer_key`).
        conv: the conv or dense unit.
        bn: the BatchNorm unit.
        reason: ``"explicit"``, ``"graph"``, ``"naming"`` or ``"order"``.
    """

    key: str
    conv: Unit
    bn: Unit
    reason: str


def _split(name: str) -> tuple[str, str, str]:
    """``(parent, separator, leaf)`` at the last ``/`` or ``.``."""
    cut = max(name.rfind("/"), name.rfind("."))
    if cut < 0:
        return "", "", name
    return name[:cut], name[cut], name[cut + 1 :]


def naming_candidates(conv: str) -> list[str]:
    """BatchNorm names that, by a common convention, belong to the conv named ``conv``.

    In order of preference:

    - ``P.conv`` → ``P.bn`` (also ``/``; ``bn``, ``batchnorm``, ``batch_norm``, ``BatchNorm``,
      ``norm``): convbn's own templates for torch and flax.
    - ``conv`` → ``conv/BatchNorm`` (tf-slim's normalizer scope), ``conv.bn``, ``conv_bn`` (convbn's
      Keras template).
    - a leaf ``<x>conv<n>`` → sibling ``<x>bn<n>``: torchvision (``conv1``/``bn1``), Keras
      applications (``conv1_conv``/``conv1_bn``).
    - ``Conv_<n>`` → sibling ``BatchNorm_<n>``: flax.linen's default names. linen numbers each
      module class separately, so the indices only correspond when every ``Conv_*`` of the parent
      has a BatchNorm: :func:`pair_units` applies this rule only where a parent holds as many
      ``Conv_*`` as ``BatchNorm_*`` and no transposed conv (a model with a conv without BatchNorm falls to the order rule
      or stays unpaired, rather than pairing ``Conv_1`` with the first conv's neighbour).

    Example:
        >>> naming_candidates("layer1.0.conv2")[-1]
        'layer1.0.bn2'
    """
    parent, sep, leaf = _split(conv)
    out: list[str] = []
    if leaf == "conv" and sep:
        out += [f"{parent}{sep}{bn}" for bn in ("bn", "batchnorm", "batch_norm", "BatchNorm", "norm")]
    out += [f"{conv}/BatchNorm", f"{conv}.bn", f"{conv}_bn"]
    match = re.fullmatch(r"(.*)conv(\d*)", leaf)
    if match and leaf != "conv":
        out.append(f"{parent}{sep}{match.group(1)}bn{match.group(2)}")
    match = re.fullmatch(r"Conv_(\d+)", leaf)
    if match:
        out.append(f"{parent}{sep}BatchNorm_{match.group(1)}")
    return out


_LINEN_CONV = re.compile(r"Conv_\d+")
_LINEN_BN = re.compile(r"BatchNorm_\d+")


def _linen_unbalanced_parents(units: Sequence[Unit]) -> set[str]:
    """Parents whose ``Conv_*`` and ``BatchNorm_*`` counts differ, or that hold a transposed conv
    (``ConvTranspose_*`` takes BatchNorm indices too): there linen's per-class indices do not say
    which BatchNorm follows which conv."""
    counts: dict[str, list[int]] = {}
    transposed: set[str] = set()
    for unit in units:
        parent, _sep, leaf = _split(unit.name)
        if unit.kind == "conv" and _LINEN_CONV.fullmatch(leaf):
            counts.setdefault(parent, [0, 0])[0] += 1
        elif unit.kind == "conv_transpose":
            transposed.add(parent)
        elif unit.kind == "bn" and _LINEN_BN.fullmatch(leaf):
            counts.setdefault(parent, [0, 0])[1] += 1
    return transposed | {parent for parent, (convs, bns) in counts.items() if convs != bns}


def layer_key(conv: str, bn: str) -> str:
    """The layer's name: the conv's own name, or ``P`` for convbn's ``P.conv`` + ``P.bn`` template.

    So a checkpoint written with the default names (``L.conv.weight``, ``L.bn.weight``) reads back
    as layer ``L``.

    Example:
        >>> layer_key("block1.conv", "block1.bn"), layer_key("features.0", "features.1")
        ('block1', 'features.0')
    """
    parent, sep, leaf = _split(conv)
    bn_parent, bn_sep, _ = _split(bn)
    if leaf == "conv" and sep and bn_parent == parent and bn_sep == sep:
        return parent
    return conv


def check_unit(unit: Unit, source: str) -> None:
    """Raise ConvBNError unless every per-channel tensor of ``unit`` has ``unit.channels`` values.

    A conv's are measured against its kernel's output channels; a BatchNorm's against the length
    most of its tensors share, so the message names the odd one out.

    Example:
        >>> check_unit(Unit("bn1", "bn", 4, vectors={"bn1.running_mean": (5,), "bn1.running_var": (4,),
        ...            "bn1.weight": (4,)}), "m.pt")
        Traceback (most recent call last):
        ...
        convbn.errors.ConvBNError: m.pt: the tensors of BatchNorm 'bn1' must have one value per channel. Received: 'bn1.running_mean' has shape [5], 'bn1.running_var' has 4 values
    """
    if unit.kind in PRODUCERS:
        bad = next(((t, s) for t, s in unit.vectors.items() if tuple(s) != (unit.channels,)), None)
        if bad is not None:
            label = {"conv": "conv", "conv_transpose": "transposed conv"}.get(unit.kind, "dense layer")
            raise ConvBNError(
                f"{source}: the bias of {label} {unit.name!r} must have one value per output channel. Received: "
                f"{bad[0]!r} has shape {list(bad[1])}, the kernel {unit.kernel or unit.name!r} has "
                f"{unit.channels} output channels"
            )
        return
    if unit.kind == "other":
        return
    flat = [tuple(s) for s in unit.vectors.values() if len(s) == 1]
    common = max(flat, key=flat.count) if flat else None
    for tensor, shape in unit.vectors.items():
        if tuple(shape) != common:
            ref = next((t for t, s in unit.vectors.items() if tuple(s) == common), None)
            other = f"{ref!r} has {common[0]} values" if ref and common else "not one value per channel"
            raise ConvBNError(
                f"{source}: the tensors of BatchNorm {unit.name!r} must have one value per channel. Received: "
                f"{tensor!r} has shape {list(shape)}, {other}"
            )


def _check_channels(conv: Unit, bn: Unit, where: str) -> None:
    if conv.channels != bn.channels:
        raise ConvBNError(
            f"a paired conv and BatchNorm must have the same channel count ({where}). Received: "
            f"{conv.name!r} has {conv.channels} output channels, {bn.name!r} has {bn.channels}"
        )


def pair_units(
    units: Sequence[Unit],
    *,
    explicit: Mapping[str, str] | None = None,
    graph: Mapping[str, str] | None = None,
    naming: bool = True,
    order: Order | None = "adjacent",
    source: str = "",
) -> tuple[list[Pair], list[Unit]]:
    """Pair convs with BatchNorms by the rules in the module docstring.

    Args:
        units: every conv and BatchNorm in the file, in source order.
        explicit: conv name → BatchNorm name, from the user; wins over every other rule.
        graph: conv name → BatchNorm name, from the file's graph.
        naming: whether to apply the naming conventions of :func:`naming_candidates`.
        order: ``"adjacent"``, ``"by_kind"`` or None (no order rule).
        source: the file, for error messages.

    Returns:
        ``(pairs, unpaired)``: pairs in the order of their convs in ``units``, and the units left
        over, in source order.

    Raises:
        ConvBNError: when an unpaired unit's tensors disagree on its channel count
            (:func:`check_unit`), or an explicit pair names a conv or BatchNorm that is not in the file, uses one twice, or
            pairs different channel counts.

    Example:
        >>> units = [Unit("0", "conv", 8), Unit("1", "bn", 8), Unit("fc", "conv", 4)]
        >>> pairs, rest = pair_units(units)
        >>> [(p.key, p.bn.name, p.reason) for p in pairs], [u.name for u in rest]
        ([('0', '1', 'order')], ['fc'])
    """
    where = f"in {source}" if source else "in the checkpoint"
    by_name: dict[tuple[str, str], Unit] = {
        ("conv" if u.kind in PRODUCERS else u.kind, u.name): u for u in units
    }  # a dense layer is looked up as a conv is: explicit and graph pairs name either
    position = {id(u): i for i, u in enumerate(units)}
    conv_of: dict[int, tuple[Unit, str]] = {}  # id(bn) -> (conv, reason)
    paired: set[int] = set()

    def take(conv: Unit, bn: Unit, reason: str) -> None:
        paired.update((id(conv), id(bn)))
        conv_of[id(bn)] = (conv, reason)

    for conv_name, bn_name in (explicit or {}).items():
        conv = by_name.get(("conv", conv_name))
        bn = by_name.get(("bn", bn_name))
        for unit, kind in ((conv, "conv"), (bn, "bn")):
            if unit is None:
                known = sorted(
                    (u.name for u in units if u.kind == kind or (kind == "conv" and u.kind in PRODUCERS)), key=natural_key
                )
                label = "conv" if kind == "conv" else "BatchNorm"
                raise ConvBNError(
                    f"an explicit pair must name a {label} {where}; known {label}s: "
                    f"{preview_names(known)}. Received: pair {conv_name}={bn_name}"
                )
        assert conv is not None and bn is not None
        if id(conv) in paired or id(bn) in paired:
            raise ConvBNError(
                f"each conv and BatchNorm may be in one explicit pair only. Received: pair "
                f"{conv_name}={bn_name} reuses one of them"
            )
        _check_channels(conv, bn, where)
        take(conv, bn, "explicit")

    for conv_name, bn_name in (graph or {}).items():
        conv = by_name.get(("conv", conv_name))
        bn = by_name.get(("bn", bn_name))
        if conv is None or bn is None or id(conv) in paired or id(bn) in paired:
            continue
        if conv.channels == bn.channels:
            take(conv, bn, "graph")

    if naming:
        linen_unbalanced = _linen_unbalanced_parents(units)
        for conv in units:
            if conv.kind not in PRODUCERS or id(conv) in paired:
                continue
            for candidate in naming_candidates(conv.name):
                if _split(conv.name)[0] in linen_unbalanced and _LINEN_BN.fullmatch(_split(candidate)[2]):
                    continue
                bn = by_name.get(("bn", candidate))
                if bn is not None and id(bn) not in paired and bn.channels == conv.channels:
                    take(conv, bn, "naming")
                    break

    if order == "adjacent":
        for i, conv in enumerate(units[:-1]):
            bn = units[i + 1]
            if (
                conv.kind in PRODUCERS
                and bn.kind == "bn"
                and id(conv) not in paired
                and id(bn) not in paired
                and conv.channels == bn.channels
            ):
                take(conv, bn, "order")
    elif order == "by_kind":
        _pair_by_class_order(units, paired, take, where)

    pairs = []
    used_keys: set[str] = set()
    for bn_id, (conv, reason) in sorted(conv_of.items(), key=lambda kv: position[id(kv[1][0])]):
        bn = next(u for u in units if id(u) == bn_id)
        key = layer_key(conv.name, bn.name)
        if key in used_keys:
            key = conv.name
        used_keys.add(key)
        pairs.append(Pair(key=key, conv=conv, bn=bn, reason=reason))
    unpaired = [u for u in units if id(u) not in paired]
    for unit in unpaired:
        check_unit(unit, source or "the checkpoint")
    return pairs, unpaired


def _pair_by_class_order(units: Sequence[Unit], paired: set[int], take: Any, where: str) -> None:
    """``order="by_kind"``: the k-th conv of a width takes the k-th BatchNorm of that width.

    A file that keeps its layers' order only within each class (a Keras ``.weights.h5``) can say
    which BatchNorm a conv owns only when nothing else could own that width's BatchNorms: all the
    width's convs are of one class (``Unit.family``), no transposed conv or dense layer has that
    width, and there are as many convs as BatchNorms. Otherwise any of them may follow any conv,
    and guessing would load a wrong model: the width's layers are named and the file refused. A
    width whose BatchNorms only a dense or transposed conv layer could follow keeps them standalone.
    """
    loose = [u for u in units if id(u) not in paired]
    for width in dict.fromkeys(u.channels for u in loose if u.kind == "bn"):
        bns = [u for u in loose if u.kind == "bn" and u.channels == width]
        owners = [u for u in loose if u.kind in PRODUCERS and u.channels == width]
        convs = [u for u in owners if u.kind == "conv"]
        if not convs:
            continue
        classes = sorted({u.family or u.kind for u in owners})
        if len(classes) == 1 and len(convs) == len(bns):
            for conv, bn in zip(convs, bns, strict=True):
                take(conv, bn, "order")
            continue
        why = (f"{len(bns)} BatchNorm(s) and {len(convs)} {classes[0]}(s)" if len(classes) == 1
               else "layers of the classes " + ", ".join(classes))
        raise ConvBNError(
            f"the file keeps its layers' order only within each class (a Keras .weights.h5), so it cannot "
            f"say which layer each BatchNorm of width {width} {where} follows ({why}: "
            f"{preview_names([u.name for u in owners])} / {preview_names([u.name for u in bns])}); pass "
            "pairs / --pair CONV=BN for them, or read the .keras file, whose config says"
        )


@dataclasses.dataclass
class Entry:
    """One layer of the checkpoint, as :func:`source_order` lists them.

    Attributes:
        name: the layer's key: the pair's key, else the unit's own name.
        unit: the conv or dense unit, or for a standalone BatchNorm the BatchNorm unit.
        bn: the BatchNorm that follows ``unit``, or None.
        pair: the conv+BatchNorm pair (a ``Checkpoint.layers`` entry); None for the others.
    """

    name: str
    unit: Unit
    bn: Unit | None = None
    pair: Pair | None = None


def source_order(units: Sequence[Unit], pairs: Sequence[Pair], unpaired: Sequence[Unit]) -> list[Entry]:
    """Every layer :func:`pair_units` found, in source order: conv pairs, dense layers with their
    BatchNorm, and unpaired units alone, each at its first unit's place.

    Example:
        >>> units = [Unit("fc", "dense", 4), Unit("bn", "bn", 4), Unit("c", "conv", 2)]
        >>> found, rest = pair_units(units)
        >>> [(e.name, e.bn and e.bn.name, e.pair is not None) for e in source_order(units, found, rest)]
        [('fc', 'bn', False), ('c', None, False)]
    """
    by_first: dict[int, Entry] = {}
    for pair in pairs:
        conv_pair = pair if pair.conv.kind == "conv" else None
        name = pair.key if conv_pair else pair.conv.name
        by_first[id(pair.conv)] = Entry(name, pair.conv, pair.bn, conv_pair)
    for unit in unpaired:
        by_first[id(unit)] = Entry(unit.name, unit)
    return [by_first[id(u)] for u in units if id(u) in by_first]


def preview_names(names: Sequence[str], limit: int = 8) -> str:
    """Names for an error message: the first ``limit`` quoted, then how many more."""
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"[{shown}{more}]" if names else "none"


def parse_pairs(spec: Mapping[str, str] | str | os.PathLike[str] | Iterable[str] | None) -> dict[str, str]:
    """Explicit pairs from a mapping, ``CONV=BN`` strings, or a mapping file.

    A mapping file is either a JSON object ``{"conv": "bn", ...}`` or text with one pair per line,
    written ``conv=bn``, ``conv: bn`` or ``conv bn``; blank lines and ``#`` comments are ignored.

    Args:
        spec: a ``{conv: bn}`` mapping; a path to a mapping file; or an iterable of ``CONV=BN``
            strings and mapping-file paths (as ``--pair`` collects them). None means no pairs.

    Returns:
        conv name → BatchNorm name, in the order given.

    Raises:
        ConvBNError: for a malformed entry, a missing mapping file, or a conv or BatchNorm named
            twice.

    Example:
        >>> parse_pairs(["d_h1_conv=d_bn1", "d_h2_conv=d_bn2"])
        {'d_h1_conv': 'd_bn1', 'd_h2_conv': 'd_bn2'}
    """
    if spec is None:
        return {}
    items: list[tuple[str, str, str]] = []  # (conv, bn, where)
    if isinstance(spec, Mapping):
        items = [(str(k), str(v), "pairs") for k, v in spec.items()]
    elif isinstance(spec, (str, os.PathLike)):
        items = _read_pair_file(Path(spec))
    else:
        for entry in spec:
            if "=" in str(entry):
                conv, _, bn = str(entry).partition("=")
                items.append((conv.strip(), bn.strip(), f"--pair {entry}"))
            else:
                items += _read_pair_file(Path(entry))
    out: dict[str, str] = {}
    seen_bn: set[str] = set()
    for conv, bn, where in items:
        if not conv or not bn:
            raise ConvBNError(f"a pair must be written CONV=BN with both names. Received: {where}")
        if conv in out or bn in seen_bn:
            raise ConvBNError(
                f"each conv and BatchNorm may be paired once. Received: {conv}={bn} ({where}) "
                "repeats a name"
            )
        out[conv] = bn
        seen_bn.add(bn)
    return out


def _read_pair_file(path: Path) -> list[tuple[str, str, str]]:
    if not path.is_file():
        raise ConvBNError(
            "a pair must be CONV=BN or the path of a mapping file. "
            f"Received: {str(path)!r} (no '=' and no such file)"
        )
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConvBNError(f"pair file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ConvBNError(f"pair file {path} must hold a JSON object of conv: bn names")
        return [(str(k), v, f"{path}") for k, v in data.items()]
    items = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = re.split(r"\s*[=:]\s*|\s+", line, maxsplit=1)
        if len(parts) != 2:
            raise ConvBNError(
                f"each line of a pair file must read 'conv=bn'. Received: {path}:{number}: {raw!r}"
            )
        items.append((parts[0], parts[1], f"{path}:{number}"))
    return items
