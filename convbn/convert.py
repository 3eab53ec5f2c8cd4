"""Checkpoints as convbn sees them, and conversion between formats.

A :class:`Checkpoint` is an ordered ``dict`` of conv+BatchNorm pairs as :class:`ConvBNParams` (HWIO,
kept-fraction momentum, the source's eps and ``var_update``), plus every other tensor and a list of
what was deliberately dropped, so a conversion never loses anything silently. Format modules live
in :mod:`convbn.formats`; :func:`load_checkpoint` and :func:`save_checkpoint` pick them, and
:func:`save_checkpoint` folds conv biases where the target has none.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convbn.checkpoint import Checkpoint, Layer, LayerSource
from convbn.errors import ConvBNError
from convbn.folding import FoldTarget, fit, fold_bias, fold_layer_bias
from convbn.formats import FORMATS, caps, load_format
from convbn.formats._common import listing
from convbn.formats._io import parent_directories, placement
from convbn.formats._pairing import natural_key, parse_pairs
from convbn.params import ConvBNParams

__all__ = [
    "Checkpoint",
    "LayerCheck",
    "LayerSource",
    "check_kinds",
    "check_layout",
    "check_shard_size",
    "check_source",
    "detect_format",
    "fold_bias",
    "fold_layer_bias",
    "format_for_path",
    "fuse_checkpoint",
    "geometry_label",
    "load_checkpoint",
    "natural_key",
    "read_format",
    "save_checkpoint",
    "tolerance_for",
    "verify_checkpoint",
    "verify_others",
]

PairSpec = Mapping[str, str] | str | os.PathLike[str] | Iterable[str] | None


# -- formats ----------------------------------------------------------------------------------------

#: Content sniffing order; slim last, since its sniff may look for companion files.
_SNIFF_ORDER = ("torch", "safetensors", "keras", "flax", "slim")


def _format_module(name: str) -> Any:
    try:
        return load_format(name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("convbn."):
            raise ConvBNError(f"the {name!r} format is not available in this convbn build") from None
        raise


def format_for_path(path: str | os.PathLike[str]) -> str | None:
    """The format a path's suffix suggests (``.pt`` → torch, ``.weights.h5`` → keras, ...), or None.

    Example:
        >>> format_for_path("model.weights.h5"), format_for_path("model.msgpack")
        ('keras', 'flax')
    """
    p = Path(path)
    if p.name.endswith(".index.json"):  # a shard index: model.safetensors.index.json
        p = p.with_name(p.name[: -len(".index.json")])
    named = {suffix: name for name in FORMATS for suffix in caps(name).suffixes}
    for suffix in reversed(p.suffixes):
        if suffix.lower() in named:
            return named[suffix.lower()]
    if p.suffix.startswith(".data-"):  # a data file of a checkpoint named by its prefix
        return next((name for name in FORMATS if caps(name).prefix), None)
    return None


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of the checkpoint at ``path``, judged from its content.

    Each format's ``sniff`` is asked in turn (torch, safetensors, keras, flax, then slim, which
    also resolves TF checkpoint prefixes and directories). No framework is imported.

    Raises:
        ConvBNError: when nothing is at ``path`` or no format recognises it.

    Example:
        >>> detect_format("model.pt")  # doctest: +SKIP
        'torch'
    """
    p = Path(path)
    check_source(p)
    for name in _SNIFF_ORDER:
        try:
            module = load_format(name)
        except ModuleNotFoundError:
            continue
        if module.sniff(p):
            return name
    if not p.exists():
        raise ConvBNError(f"a checkpoint must exist at the path given. Received: {str(p)!r} (no such file)")
    if p.is_dir():
        indexes = sorted(f.name for f in p.glob("*.index.json"))
        if len(indexes) > 1:
            raise ConvBNError(f"{p}: the directory holds {len(indexes)} shard indexes ({', '.join(indexes)}); name one")
        raise ConvBNError(
            f"{p}: a directory is a checkpoint only when it holds a TF 'checkpoint' file, one shard index "
            "(*.index.json) or an Orbax checkpoint; name the file inside it"
        )
    raise ConvBNError(
        f"{p}: not a checkpoint in any known format ({', '.join(FORMATS)}): unrecognised content, or "
        "a corrupted file. Name the format with format= / --from if it is one of these"
    )


def check_source(path: str | os.PathLike[str]) -> None:
    """Refuse what is at ``path`` when no checkpoint can be there, before anything opens it.

    A FIFO, device or socket would block or stream forever when sniffed, and an unreadable file
    would fail deep inside a reader; a missing path is left to the format detection, since a TF
    checkpoint is named by a prefix that is no file.

    Raises:
        ConvBNError: naming the path and what it is.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConvBNError(f"{p}: a checkpoint must be readable. Received: {exc.strerror or exc}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise ConvBNError(
            f"{p}: a checkpoint must be a regular file, a TF checkpoint prefix or a directory. Received: {kind}"
        )
    if not os.access(p, os.R_OK if stat.S_ISREG(mode) else os.R_OK | os.X_OK):
        raise ConvBNError(f"{p}: a checkpoint must be readable. Received: permission denied")


def read_format(path: Path, format: str | None = None) -> str:
    """The format :func:`load_checkpoint` reads ``path`` as: ``format`` checked against the
    content, or detected (raises ConvBNError like :func:`load_checkpoint`, before any reading)."""
    check_source(path)
    if format is None:
        return detect_format(path)
    name = str(format).lower()
    module = _format_module(name)
    if module.sniff(path):
        return name
    if not path.exists() and not module.CAPS.prefix:  # a prefix names files, not itself
        raise ConvBNError(f"a checkpoint must exist at the path given. Received: {str(path)!r} (no such file)")
    try:
        actual = detect_format(path)
    except ConvBNError:
        actual = None
    if actual is not None:
        raise ConvBNError(f"{path}: format={name!r} was given but the file is a {actual} checkpoint")
    raise ConvBNError(f"{path}: not a readable {name} checkpoint (unrecognised content, or a corrupted file)")


def load_checkpoint(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    pairs: PairSpec = None,
    eps: float | None = None,
    momentum: float | None = None,
    use_ema: bool = False,
) -> Checkpoint:
    """Read a checkpoint: its conv+BatchNorm pairs as :class:`ConvBNParams`, and everything else.

    Args:
        path: the file (``.pt``/``.pth``/``.bin``, ``.weights.h5``/``.keras``, ``.msgpack``,
            ``.safetensors``), or for a TF checkpoint its prefix (``model.ckpt``) or its directory.
        format: ``"torch"``, ``"slim"``, ``"keras"``, ``"flax"`` or ``"safetensors"``; detected
            from the content when None.
        pairs: explicit conv → BatchNorm pairs, winning over graph and naming rules: a mapping
            ``{"d_h1_conv": "d_bn1"}``, ``CONV=BN`` strings, or a mapping file (see
            :func:`convbn.formats._pairing.parse_pairs`).
        eps: override every layer's eps (else the file's, else the source convention's default).
        momentum: override every layer's momentum, as the fraction kept (torch's 0.1 is 0.9).
        use_ema: read ExponentialMovingAverage shadow values (slim checkpoints that have them).

    Returns:
        A :class:`Checkpoint` whose ``notes`` say which defaults were assumed.

    Raises:
        ConvBNError: a missing, unknown, corrupted or truncated file; a shape mismatch; a moving
            variance that is negative or NaN; a bad explicit pair; an untrusted pickle. Messages
            name the file and the tensor.
        ImportError: when the format needs a package that is not installed (named).

    Example:
        >>> ckpt = convbn.load_checkpoint("model.pt")  # doctest: +SKIP
        >>> list(ckpt.layers)[:2]  # doctest: +SKIP
        ['features.0', 'features.3']
    """
    p = Path(path)
    name = read_format(p, format)
    module = _format_module(name)
    explicit = parse_pairs(pairs)
    ckpt: Checkpoint = module.read(p, pairs=explicit, eps=eps, momentum=momentum, use_ema=use_ema)
    ckpt.metadata.setdefault("source_format", ckpt.format or name)
    _check_statistics(ckpt, p)
    return ckpt


def _check_statistics(ckpt: Checkpoint, path: Path) -> None:
    """Every format's moving variances are finite and >= 0 (readers check as they build layers;
    this covers any that do not)."""
    from convbn.formats._common import check_variance

    for layer, params in ckpt.layers.items():
        source = ckpt.sources.get(layer)
        check_variance(path, layer, params, source.bn.get("moving_var", layer) if source else layer)


def prepare_for_format(
    ckpt: Checkpoint,
    format: str,
    *,
    fold_bias: FoldTarget | None = None,
    conv_bias: bool | None = None,
) -> Checkpoint:
    """The checkpoint as ``save_checkpoint`` writes it: conv biases folded where the target needs.

    A copy: ``ckpt`` is never modified. The rules are those of :func:`save_checkpoint`.
    """
    name = str(format).lower()
    target = fold_bias
    if target is not None and target not in ("beta", "moving_mean"):
        raise ConvBNError(f"fold_bias must be 'beta' or 'moving_mean'. Received: fold_bias={target!r}")
    holds_bias = caps(name).conv_bias
    if conv_bias and not holds_bias:
        raise ConvBNError(
            f"conv_bias=True needs a target whose conv+BatchNorm layers hold a conv bias; the {name} "
            f"format's have none (tf-slim's conv2d with a normalizer). Received: format={name!r}, conv_bias=True"
        )
    if ckpt.fused and conv_bias is False:
        raise ConvBNError("a fused checkpoint has no BatchNorm to fold a bias into. Received: conv_bias=False")
    if conv_bias and target is not None:
        raise ConvBNError(
            f"fold_bias folds the conv bias away, which conv_bias=True keeps. Received: "
            f"fold_bias={target!r}, conv_bias=True"
        )
    check_flatten_order(ckpt, name)
    check_kinds(ckpt, name)
    fold = not ckpt.fused and (conv_bias is False or not holds_bias or target is not None)
    into: FoldTarget = target or "beta"
    out = ckpt.copy()
    folded: list[str] = []
    added: list[str] = []
    holds = False if fold else (True if conv_bias else None)
    for layer, params in ckpt.layers.items():
        fitted = fit(params, bias=holds, fold=into if fold else None)
        out.layers[layer] = fitted.params
        if fitted.bias == "folded":
            folded.append(layer)
        elif fitted.bias == "zero":
            added.append(layer)
    others_folded: list[str] = []
    if fold:
        for layer, other in ckpt.others.items():
            if other.bias is not None and other.norm is not None and other.norm.kind == "batch_norm":
                out.others[layer] = fold_layer_bias(other, into)
                others_folded.append(layer)
    if others_folded:
        kinds = sorted({ckpt.others[n].kind for n in others_folded})
        out.notes.append(
            f"folded the bias of {len(others_folded)} {'/'.join(kinds)} layer(s) into {into} of the BatchNorm "
            f"after it, as for a conv: {', '.join(others_folded[:5])}"
        )
        folded += others_folded
    if folded:
        why = "the target has no conv bias" if not holds_bias else "conv_bias=False"
        formula = (
            "beta' = beta + gamma * b / sqrt(moving_var + eps)"
            if into == "beta"
            else "moving_mean' = moving_mean - b"
        )
        if len(folded) > len(others_folded):
            out.notes.append(
                f"folded the conv bias of {len(folded) - len(others_folded)} layer(s) into {into} ({why}): {formula}"
            )
        out.metadata["folded_bias"] = f"{into}:{','.join(folded)}"
    if added:
        out.notes.append(f"added a zero conv bias to {len(added)} layer(s) that had none (conv_bias=True)")
    return out


def check_flatten_order(ckpt: Checkpoint, format: str) -> None:
    """Refuse to guess the feature order of a dense layer that may read a flattened feature map
    (or be reshaped into one) when the source and the target flatten maps differently (torch
    NCHW, the others NHWC): a side the reader could not decide (:attr:`Layer.flat_undecided`, see
    :func:`convbn.formats._common.mark_flatten_undecided`) is refused, naming the layer and
    ``--flatten``, until it is stated (:meth:`Checkpoint.with_flatten`).

    Raises:
        ConvBNError: naming the dense layer and how to state its map.
    """
    source, target = (
        caps(name).flatten_order if name in FORMATS else None
        for name in (ckpt.metadata.get("source_format") or ckpt.format, format)
    )
    if source is None or target is None or source == target:
        return
    for name, item in ckpt.others.items():
        item.as_order(target, name)  # a side the source itself could not decide: refused, naming --flatten


def check_kinds(ckpt: Checkpoint, format: str) -> None:
    """Refuse to write, to a format that records which layers are transposed convs
    (:attr:`FormatCaps.records_kinds <convbn.formats._caps.FormatCaps>`: Flax, Keras, safetensors),
    a layer whose source could not say whether it is a conv or a transposed conv
    (:attr:`Checkpoint.kind_undecided`) when the checkpoint holds transposed convs too: written as
    a conv, a model with a transposed conv there would load it wrong (flax even stores the two
    kinds' kernels differently). Without transposed convs elsewhere, such layers are the convs of a
    conv net and are written as convs. torch and TF targets store the same array either way.

    Raises:
        ConvBNError: naming the layers and how to state them (``--kind``, :meth:`Checkpoint.with_kinds`).
    """
    if format not in FORMATS or not caps(format).records_kinds:
        return
    undecided = [n for n in ckpt.kind_undecided if n in ckpt.layers or n in ckpt.others]
    transposed = [n for n, layer in ckpt.others.items() if layer.kind == "conv_transpose"]
    if undecided and transposed:
        raise ConvBNError(
            f"{len(undecided)} layer(s) were read as convs but their source file cannot tell a conv from a "
            f"transposed conv ({listing(undecided)}), and the checkpoint has transposed convs "
            f"({listing(transposed)}); the {format} format records which each is, so state it: convbn "
            f"convert --kind {undecided[0]}=conv_transpose (or =conv), once per layer; in Python "
            "Checkpoint.with_kinds"
        )


def save_checkpoint(
    ckpt: Checkpoint,
    path: str | os.PathLike[str],
    format: str,
    *,
    fold_bias: FoldTarget | None = None,
    conv_bias: bool | None = None,
    overwrite: bool = True,
    keep_var_update: bool = False,
    progress: Callable[[str], None] | None = None,
    max_shard_size: int | str | None = None,
) -> Checkpoint:
    """Write ``ckpt`` in ``format``, folding conv biases where the target has none.

    Bias handling, per layer with a conv bias ``b``:

    - ``slim`` target: always folded (tf-slim's conv2d with a normalizer has no bias).
    - other targets: kept unchanged, unless ``conv_bias=False`` or ``fold_bias`` is given, which fold it.
    - ``fold_bias="beta"`` (the default way): ``beta' = beta + gamma * b / sqrt(moving_var + eps)``.
    - ``fold_bias="moving_mean"``: ``moving_mean' = moving_mean - b``.

    Both are exact at inference. Choose ``"moving_mean"`` when the converted model will be
    fine-tuned: training replaces the moving mean with statistics of a bias-free conv, which is
    what ``moving_mean - b`` already is, while ``beta`` keeps the bias's effect, so the result is
    independent of eps. Choose ``"beta"`` (the default) to keep the moving statistics as trained.
    ``conv_bias=True`` gives layers without a bias a zero one.

    The moving-variance update: torch, TF and Keras 2 (``*.h5``) checkpoints are loaded into
    BatchNorms that update the moving variance with the unbiased batch variance, Keras 3 and Flax
    ones with the biased one (safetensors stores each layer's). A layer whose ``var_update`` differs is written anyway
    with a line in ``notes`` naming it: a checkpoint holds weights, not a training rule, and the
    weights and eval outputs are unchanged; only fine-tuning then updates ``moving_var`` with the
    target's rule. ``keep_var_update=True`` refuses such a conversion instead, as
    :func:`convbn.to_keras` refuses to build a Keras layer that would train differently (build
    :class:`convbn.keras.ConvBN` / :class:`convbn.torch.ConvBN2d` to keep the source's rule).

    The write is atomic (a scratch file renamed into place), so a failure leaves nothing at
    ``path``; missing directories of ``path`` are created (and removed again if the write
    fails). With ``overwrite=False`` the final placement is exclusive: if ``path`` appears while
    the file is written, the write fails instead of replacing it. ``ckpt`` is not modified.

    Args:
        ckpt: the checkpoint, e.g. from :func:`load_checkpoint`.
        path: the destination file (a prefix such as ``model.ckpt`` for slim).
        format: ``"torch"``, ``"slim"``, ``"keras"``, ``"flax"`` or ``"safetensors"``.
        fold_bias: ``"beta"`` or ``"moving_mean"``; giving it asks for folding.
        conv_bias: False to fold every conv bias, True to keep (or add zero) biases, None for the
            target's default.
        overwrite: when False, refuse an existing ``path``.
        keep_var_update: refuse (instead of noting) layers whose moving-variance update the
            target's BatchNorms do not follow.
        progress: called with each layer's name as it is written (where the format reports it).
        max_shard_size: split the tensors into shards of at most this many bytes (an int, or a
            string such as ``"5GB"``, ``"500MiB"``, read as transformers' ``save_pretrained``
            reads it), for the formats that write shards: ``safetensors`` and ``torch`` write shards
            named ``model-00001-of-00003.safetensors`` and an index ``model.safetensors.index.json``
            beside ``path``, all placed together or not at all (a checkpoint that fits stays one
            file at ``path``, unless ``path`` names the index); ``slim`` writes data files
            ``path.data-0000K-of-0000N``.

    Returns:
        The checkpoint as written (folded copy, with notes on what was folded and assumed).

    Raises:
        ConvBNError: an unknown format, conflicting options, an existing ``path`` with
            ``overwrite=False``, a changed moving-variance update with ``keep_var_update=True``,
            or data the format cannot hold, a ``max_shard_size`` the format cannot honour.

    Example:
        >>> ckpt = convbn.load_checkpoint("model.pt")  # doctest: +SKIP
        >>> convbn.save_checkpoint(ckpt, "model.weights.h5", "keras")  # doctest: +SKIP
    """
    name = str(format).lower()
    if name not in FORMATS:
        raise ConvBNError(f"format must be one of {list(FORMATS)}. Received: format={format!r}")
    module = _format_module(name)
    p = Path(path)
    declared = caps(name)
    options: dict[str, Any] = {}
    if max_shard_size is not None:  # parsed here, once: every writer gets a number of bytes
        options["max_shard_size"] = check_shard_size(name, max_shard_size)
    if progress is not None and "progress" in declared.write_options:
        options["progress"] = progress
    if not overwrite and _destination_exists(p, name):
        raise ConvBNError(f"{p} exists; refusing to overwrite it (pass overwrite=True / --force)")
    check_layout(p, name, max_shard_size)
    prepared = prepare_for_format(ckpt, name, fold_bias=fold_bias, conv_bias=conv_bias)
    if prepared.others and not declared.writes_others:
        from convbn.formats._common import others_as_tensors

        others_as_tensors(prepared)
    # A Keras target's update depends on the layout its name asks for (Keras 2's *.h5 is fused).
    expected = module.target_var_update(p) if declared.var_update == "by_path" else declared.var_update
    _var_update_change(prepared, name, expected, refuse=keep_var_update)
    if declared.settings_note is not None and declared.convention is not None and not prepared.fused:
        # The files store no BatchNorm settings, and the writer leaves this note to us.
        from convbn import conventions
        from convbn.formats._common import unstored_settings_note

        unstored_settings_note(prepared, declared.settings_note, conventions.get(declared.convention))
    # A directory (an Orbax checkpoint) is placed exclusively too: its final name is claimed with
    # mkdir, then the written directory renamed onto the empty claim (formats/_io.py).
    with parent_directories(p), placement(overwrite=overwrite):
        module.write(prepared, p, **options)
    return prepared


def check_shard_size(format: str, max_shard_size: int | str) -> int:
    """``max_shard_size`` in bytes, for a format whose writer takes it (``write(...,
    max_shard_size=)``): what :func:`save_checkpoint` checks before writing anything.

    Raises:
        ConvBNError: a size :func:`convbn.formats._sharded.parse_size` refuses, or a format whose
            files are written whole.
    """
    from convbn.formats._sharded import parse_size

    size = parse_size(max_shard_size)
    shardable = [n for n in FORMATS if caps(n).shards is not None]
    if format not in shardable:
        raise ConvBNError(
            f"the {format} format is written whole, not in shards; max_shard_size applies to "
            f"{', '.join(shardable)}. Received: max_shard_size={max_shard_size!r}, format={format!r}"
        )
    return size


def _var_update_change(ckpt: Checkpoint, format: str, expected: str | None, *, refuse: bool) -> None:
    """Note (or refuse) layers that the target's BatchNorms, updating with ``expected``, would
    train with another update."""
    if expected is None or ckpt.fused:
        return
    changed = [layer for layer, p in ckpt.layers.items() if p.var_update != expected]
    if not changed:
        return
    was = ckpt.layers[changed[0]].var_update
    shown = ", ".join(changed[:5]) + (f", ... ({len(changed) - 5} more)" if len(changed) > 5 else "")
    if refuse:
        raise ConvBNError(
            f"{format} BatchNorms update the moving variance with the {expected} batch variance, and "
            f"{len(changed)} layer(s) were trained with the {was} one ({shown}); drop keep_var_update "
            f"/ --keep-var-update to convert anyway (weights and eval outputs are unchanged). "
            f"Received: var_update={was!r}, format={format!r}"
        )
    ckpt.notes.append(
        f"moving-variance update changes from {was} to {expected} for {len(changed)} layer(s) ({shown}): "
        f"{format} BatchNorms train with the {expected} batch variance; weights and eval outputs are "
        "unchanged, fine-tuning differs slightly (keep_var_update=True / --keep-var-update refuses)"
    )


def check_layout(path: Path, format: str, max_shard_size: int | str | None) -> None:
    """Refuse, even when overwriting, a write that would leave the other layout of a safetensors or
    torch checkpoint at ``path`` beside it: shards and an index next to an old single file, or a
    single file next to an old index. Placement replaces files by name only, so the old one would
    stay, and ``path`` and its directory would then read as two different checkpoints."""
    if caps(format).shards != "index_json" or path.name.endswith(".index.json"):
        return
    index = Path(f"{path}.index.json")
    if max_shard_size is not None and path.is_file():
        raise ConvBNError(
            f"{path} is a single-file checkpoint, which a sharded write would leave beside its shards; "
            f"remove it first. Received: max_shard_size={max_shard_size!r}"
        )
    if max_shard_size is None and index.exists():
        raise ConvBNError(
            f"{index} indexes a sharded checkpoint at {path}, which a single-file write would leave "
            "beside it; remove the index and its shards first, or write with max_shard_size"
        )


def _destination_exists(path: Path, format: str) -> bool:
    if path.exists():
        return True
    if caps(format).prefix:
        return Path(f"{path}.index").exists()
    return Path(f"{path}.index.json").exists()  # the index of a sharded write at ``path``


# -- fusion -----------------------------------------------------------------------------------------


def fuse_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    """Fold each layer's BatchNorm into its conv, for deployment.

    Each layer becomes ``kernel' = kernel * s`` and ``bias' = beta + (b - mean) * s`` with
    ``s = gamma / sqrt(var + eps)`` (absent gamma/beta/bias are 1/0/0), computed in float64 and
    stored in the kernel's dtype. The BatchNorm left behind is the identity (mean 0, variance 1,
    eps 0) and writers write the conv weight and bias only (``fused=True``).

    Returns:
        A new checkpoint; ``ckpt`` is not modified.

    Raises:
        ConvBNError: when ``ckpt`` is already fused.

    Example:
        >>> fused = fuse_checkpoint(convbn.load_checkpoint("model.pt"))  # doctest: +SKIP
    """
    from convbn.backends._common import fold

    if ckpt.fused:
        raise ConvBNError("the checkpoint is already fused: its BatchNorms were folded into the convs")
    out = ckpt.copy()
    out.fused = True
    for layer, params in ckpt.layers.items():
        kernel = np.asarray(params.kernel)
        bias, gamma, beta, mean, var = (
            None if v is None else np.asarray(v, np.float64)
            for v in (params.bias, params.gamma, params.beta, params.moving_mean, params.moving_var)
        )
        w, b = fold(kernel.astype(np.float64), bias, gamma, beta, mean, var, params.eps, lambda v: 1.0 / np.sqrt(v))
        dtype = kernel.dtype
        n = params.out_channels
        out.layers[layer] = dataclasses.replace(
            params,
            kernel=w.astype(dtype),
            bias=np.asarray(b).astype(dtype),
            gamma=None,
            beta=None,
            moving_mean=np.zeros(n, dtype),
            moving_var=np.ones(n, dtype),
            eps=0.0,
        )
        out.extras.pop(layer, None)
    out.notes.append(
        f"fused {len(ckpt.layers)} BatchNorm(s) into their convs: W' = W * gamma / sqrt(var + eps), "
        "b' = beta + (b - mean) * gamma / sqrt(var + eps)"
    )
    out.metadata["fused"] = "true"
    return out


# -- verification -----------------------------------------------------------------------------------

#: Largest acceptable ``max|y_target - y_source| / max|y_source|`` per storage dtype. Both sides
#: are computed in float64 from the stored parameters, so only the conversion itself (a folded
#: value rounded once into the storage dtype) contributes. Worst cases measured over 144 random
#: 3x3 16->32 layers per dtype (variances 1e-7 to 200, biases and means up to 10x the activations;
#: folding into beta, into moving_mean, and full fusion): float64 4.4e-16, float32 5.3e-8, float16
#: 3.5e-4, bfloat16 3.4e-3. Each limit is 15 to 40 times that, and still far below what a real
#: mistake gives (a lost bias, a flipped kernel or a wrong eps: 0.1 to 1).
#: tests/formats/test_verify.py re-measures this.
_TOLERANCE = {"float64": 1e-14, "float32": 2e-6, "float16": 1e-2, "bfloat16": 5e-2}


def tolerance_for(dtype: Any) -> float:
    """The verification tolerance for parameters stored in ``dtype`` (see ``_TOLERANCE``)."""
    name = np.dtype(dtype).name
    return _TOLERANCE.get(name, _TOLERANCE["float32"])


@dataclasses.dataclass
class LayerCheck:
    """One layer's verification: ``conv_bn`` with source vs converted parameters.

    Attributes:
        source: the layer's name in the source checkpoint.
        target: its name in the converted checkpoint.
        max_abs: largest absolute difference of the outputs.
        max_rel: ``max_abs / max|y_source|``.
        tolerance: the limit for the converted layer's storage dtype.
        ok: ``max_rel <= tolerance`` and matching shapes.
        problem: why it failed, when it did for another reason than the numbers.
        geometry: the stride, padding and dilation the layer ran with, and whether they came
            from the source file or are ConvBNParams defaults (the format stores no geometry).
    """

    source: str
    target: str
    max_abs: float
    max_rel: float
    tolerance: float
    ok: bool
    problem: str = ""
    geometry: str = ""


def geometry_label(params: ConvBNParams, from_file: bool) -> str:
    """``"stride 2, padding 'SAME', dilation 1 (from the file)"``: what ``verify`` ran a layer
    with, and whether the source file stated it (else they are the reader's defaults, stride 1 and
    ``'SAME'``, or values set since)."""
    def pair(v: tuple[int, int]) -> str:
        return str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"

    padding = params.padding if isinstance(params.padding, str) else [list(p) for p in params.padding]
    where = "from the file" if from_file else "not from the file: its format stores no geometry"
    return f"stride {pair(params.stride)}, padding {padding!r}, dilation {pair(params.dilation)} ({where})"


def verify_checkpoint(
    source: Checkpoint,
    converted: Checkpoint,
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[LayerCheck]:
    """Run every layer through ``conv_bn`` with source and converted parameters and compare.

    Layers are matched by name when both checkpoints have the same layer names (their order may
    differ: a TF checkpoint read without its ``.meta`` lists layers in name order), else by
    position (a target format that renames layers keeps their order). Both sides run on the NumPy
    backend in float64 from the stored parameters on the same random input, with the source's
    geometry and eps (the converted side uses its own eps when it is fused or its file stores eps),
    so the difference is what the conversion changed. An extra or missing layer, or a changed
    shape, is a failed check. Each check names the geometry it ran with
    (:attr:`LayerCheck.geometry`): where the source format stores none, that is stride 1,
    ``"SAME"``, dilation 1, which checks the stored numbers but not the model's own geometry.

    A converted file that cannot record whether a layer is a conv or a transposed conv (a torch
    state_dict, or a safetensors file without convbn's metadata, stores a bias-free ConvTranspose2d
    weight as a Conv2d's: the same tensor, the same neutral kernel) is read back under the source's
    structure: a converted layer its reader lists in :attr:`Checkpoint.kind_undecided` is read as a
    transposed conv where the source has one at the same place (by name, else in layer order), with
    the standalone BatchNorm that follows it in the file when the source's carries one
    (:meth:`Checkpoint.with_kinds`). Only that label changes: every number is still compared, a
    kernel of another shape or other values still fails, and a layer the reader decided (by its
    bias, its BatchNorm, or a format that records kinds) is never re-read.

    Returns:
        One :class:`LayerCheck` per layer.

    Example:
        >>> checks = verify_checkpoint(src, convbn.load_checkpoint("out.pt"))  # doctest: +SKIP
        >>> all(c.ok for c in checks)  # doctest: +SKIP
        True
    """
    rng = np.random.default_rng(seed)
    checks: list[LayerCheck] = []
    converted = _under_source_kinds(source, converted)
    if set(converted.layers) == set(source.layers):
        target_items = [(name, converted.layers[name]) for name in source.layers]
    else:
        target_items = list(converted.layers.items())
    for i, (name, params) in enumerate(source.layers.items()):
        if i < len(target_items):
            target_name, converted_params = target_items[i]
            where = converted.sources.get(target_name)
            stored = bool(where and where.settings)
            check = _check_layer(rng, name, params, target_name, converted_params, converted.fused, stored)
            origin = source.sources.get(name)
            checks.append(dataclasses.replace(check, geometry=geometry_label(params, bool(origin and origin.geometry))))
        else:
            checks.append(LayerCheck(name, "", np.inf, np.inf, 0.0, False, "missing from the converted checkpoint"))
        if progress is not None:
            progress(name)
    for target_name, _ in target_items[len(source.layers):]:
        checks.append(LayerCheck("", target_name, np.inf, np.inf, 0.0, False, "not in the source checkpoint"))
    return checks + verify_others(source, converted, rng)


def _under_source_kinds(source: Checkpoint, converted: Checkpoint) -> Checkpoint:
    """``converted`` with each layer whose kind its file could not decide read as the source's
    transposed conv at the same place (see :func:`verify_checkpoint`)."""
    undecided = set(converted.kind_undecided)
    if not undecided:
        return converted
    theirs, mine = source.in_order(), converted.in_order()
    spec: dict[str, str] = {}
    if {n for n, _ in theirs} == {n for n, _ in mine}:
        spec = {n: "conv_transpose" for n, item in theirs
                if n in undecided and isinstance(item, Layer) and item.kind == "conv_transpose"}
    else:
        j = 0
        for _, item in theirs:
            if j >= len(mine):
                break
            name, got = mine[j]
            if name in undecided and isinstance(item, Layer) and item.kind == "conv_transpose":
                spec[name] = "conv_transpose"
                after = mine[j + 1][1] if j + 1 < len(mine) else None
                if (item.norm is not None and isinstance(got, Layer) and got.norm is None
                        and isinstance(after, Layer) and after.kind == "batch_norm"):
                    j += 1  # the BatchNorm with_kinds gives it, if its width fits
            j += 1
    if not spec:
        return converted
    try:
        return converted.with_kinds(spec)
    except ConvBNError:
        return converted  # tensors no transposed conv has: the kinds then differ, and the check fails


#: Layer kinds :func:`verify_others` does not run (their outputs are not computed here): none.
NOT_VERIFIED: tuple[str, ...] = ()


def verify_others(source: Checkpoint, converted: Checkpoint, rng: np.random.Generator | None = None) -> list[LayerCheck]:
    """Run every layer of ``source.others`` and its converted counterpart in float64 on the same
    random input and compare, as :func:`verify_checkpoint` does for conv+BatchNorm pairs.

    Dense layers (with the BatchNorm after them, their flattened input in the source's order), lone
    convs, transposed convs (with the BatchNorm after them; :func:`convbn.conv_transpose.conv_transpose`),
    standalone BatchNorms, LayerNorms and GroupNorms are run; a kind in
    :data:`NOT_VERIFIED` is listed as a check that is ok with the problem "not run". Layers match by
    name when both sides hold the same names, else by position. A converted layer whose file could
    not say conv or transposed conv is read as the source's, as :func:`verify_checkpoint` says.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    converted = _under_source_kinds(source, converted)
    if set(source.others) == set(converted.others):
        pairs = [(name, name) for name in source.others]
    else:
        pairs = list(itertools.zip_longest(source.others, converted.others))
    checks = []
    for name, target in pairs:
        if name is None or target is None:
            problem = "not in the source checkpoint" if name is None else "missing from the converted checkpoint"
            checks.append(LayerCheck(name or "", target or "", np.inf, np.inf, 0.0, False, problem))
            continue
        a, b = source.others[name], converted.others[target]
        tol = tolerance_for(_layer_dtype(a) if tolerance_for(_layer_dtype(a)) > tolerance_for(_layer_dtype(b))
                            else _layer_dtype(b))
        label = f"{a.kind}" + (" + batch_norm" if a.kernel is not None and a.norm is not None else "")
        if a.kind != b.kind or (a.norm is None) != (b.norm is None):
            checks.append(LayerCheck(name, target, np.inf, np.inf, tol, False,
                                     f"a {b.kind} in the converted checkpoint, a {a.kind} in the source", label))
            continue
        if a.kind in NOT_VERIFIED:
            checks.append(LayerCheck(name, target, 0.0, 0.0, tol, True, f"not run: {a.kind} layers are not verified",
                                     label))
            continue
        try:
            x = _other_input(rng, a)
            y_ref, y_new = _run_other(a, x, converted=None), _run_other(_in_order_of(b, a), x, converted=a)
        except ConvBNError as exc:
            checks.append(LayerCheck(name, target, np.inf, np.inf, tol, False, str(exc), label))
            continue
        if y_ref.shape != y_new.shape:
            checks.append(LayerCheck(name, target, np.inf, np.inf, tol, False,
                                     f"output shape {y_new.shape} differs from the source's {y_ref.shape}", label))
            continue
        max_abs = float(np.max(np.abs(y_new - y_ref))) if y_ref.size else 0.0
        scale = float(np.max(np.abs(y_ref))) if y_ref.size else 0.0
        max_rel = max_abs / scale if scale > 0 else max_abs
        checks.append(LayerCheck(name, target, max_abs, max_rel, tol, bool(np.isfinite(max_rel) and max_rel <= tol),
                                 "", label))
    return checks


def _layer_dtype(layer: Layer) -> np.dtype:
    norm = layer.norm
    ref = layer.kernel if layer.kernel is not None else next(
        v for v in (norm.moving_mean, norm.gamma, norm.beta, np.zeros(0)) if v is not None  # type: ignore[union-attr]
    )
    return np.asarray(ref).dtype


def _other_input(rng: np.random.Generator, layer: Layer) -> np.ndarray:
    if layer.kind == "dense":
        return rng.standard_normal((2, int(np.shape(layer.kernel)[0])))
    if layer.kind == "conv":
        kh, kw, cin, _ = np.shape(layer.kernel)
        dh, dw = layer.dilation
        return rng.standard_normal((2, (kh - 1) * dh + 4, (kw - 1) * dw + 4, int(cin) * layer.groups))
    if layer.kind == "conv_transpose":
        return rng.standard_normal((2, 3, 4, int(np.shape(layer.kernel)[3])))  # odd and even sizes
    return rng.standard_normal((2, 3, 3, layer.out_features))


def _f64(value: Any) -> Any:
    return None if value is None else np.asarray(value, np.float64)


def _in_order_of(layer: Layer, source: Layer) -> Layer:
    """The converted dense ``layer`` with its flattened sides in ``source``'s feature order, so the
    two compute on the same input. A side of ``layer`` whose map its file does not record (a Keras,
    Flax or TF file read back reads it as undecided, in its framework's order) takes the source's
    map in that order: the stored rows are what the target framework's own flatten feeds them."""
    if layer.kind != "dense" or source.kind != "dense":
        return layer
    undecided = dict(layer.flat_undecided)
    fields: dict[str, Any] = {}
    for side in ("in", "out"):
        mine, theirs = getattr(layer, f"flat_{side}"), getattr(source, f"flat_{side}")
        if mine is None and theirs is not None and side in undecided:
            fields[f"flat_{side}"] = dataclasses.replace(theirs, order=undecided[side])
    # A side still undecided runs as stored: the source reads it as a vector, in either order.
    layer = dataclasses.replace(layer, **fields, flat_undecided=())
    for side in ("in", "out"):
        mine, theirs = getattr(layer, f"flat_{side}"), getattr(source, f"flat_{side}")
        if mine is not None and theirs is not None and mine.order != theirs.order:
            layer = layer.as_order(theirs.order)
    return layer


def _run_other(layer: Layer, x: np.ndarray, *, converted: Layer | None) -> np.ndarray:
    """``layer``'s eval output for ``x`` in float64 (NHWC maps, neutral layouts). For the converted
    side (``converted`` is the source layer), a norm whose file stored no eps runs with the source's."""
    from convbn.api import conv_bn

    norm = layer.norm
    eps = None if norm is None else norm.eps
    if converted is not None and converted.norm is not None and (eps is None or eps != converted.norm.eps):
        eps = converted.norm.eps  # the target is built with the source's eps, as the report says
    if layer.kind == "dense":
        kernel = _f64(layer.kernel)
        y = x @ kernel + (0.0 if layer.bias is None else _f64(layer.bias))
    elif layer.kind == "conv":
        # The converted side runs with the source's geometry, as conv+BatchNorm pairs do: a format
        # that stores none (a TF checkpoint without its .meta) reads back stride 1.
        geo = layer if converted is None else converted
        params = ConvBNParams(
            kernel=_f64(layer.kernel), bias=_f64(layer.bias), moving_mean=np.zeros(layer.out_features),
            moving_var=np.ones(layer.out_features), eps=0.0, stride=geo.stride, padding=geo.padding,
            dilation=geo.dilation,
            # A file that stores no geometry (a torch state_dict) reads groups 1; the model it loads
            # into has the source's groups, which the kernel's shape allows.
            groups=layer.groups if converted is None or layer.geometry else converted.groups,
        )
        y = conv_bn(x, params, backend="numpy")
    elif layer.kind == "conv_transpose":
        from convbn.conv_transpose import conv_transpose

        geo = layer if converted is None else converted  # the source's geometry, as for a conv
        y = conv_transpose(x, _f64(layer.kernel), _f64(layer.bias), stride=geo.stride, padding=geo.padding,
                           dilation=geo.dilation, groups=geo.groups, output_padding=geo.output_padding)
    else:
        y = x
    if norm is None:
        return np.asarray(y)
    gamma = 1.0 if norm.gamma is None else _f64(norm.gamma)
    beta = 0.0 if norm.beta is None else _f64(norm.beta)
    if norm.kind == "batch_norm":
        y = (y - _f64(norm.moving_mean)) / np.sqrt(_f64(norm.moving_var) + (eps or 0.0))
    elif norm.kind == "layer_norm":
        y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + (eps or 0.0))
    else:
        groups = int(norm.groups or 1)
        g = y.reshape(*y.shape[:-1], groups, -1)
        axes = (*range(1, g.ndim - 2), g.ndim - 1)
        g = (g - g.mean(axes, keepdims=True)) / np.sqrt(g.var(axes, keepdims=True) + (eps or 0.0))
        y = g.reshape(y.shape)
    return np.asarray(y * gamma + beta)


def _check_layer(
    rng: np.random.Generator,
    name: str,
    params: ConvBNParams,
    target_name: str,
    converted: ConvBNParams,
    fused: bool,
    stored_settings: bool,
) -> LayerCheck:
    from convbn.api import conv_bn

    tol = tolerance_for(_storage_dtype(converted, params))
    src_shape, dst_shape = np.shape(params.kernel), np.shape(converted.kernel)
    if src_shape != dst_shape:
        return LayerCheck(
            name, target_name, np.inf, np.inf, tol, False,
            f"kernel shape {dst_shape} differs from the source's {src_shape}",
        )
    ref = _as_float64(params)
    # The converted side runs with the source's eps unless its file states one (or it is fused):
    # a target that stores no eps is built by the user with the eps the report names.
    eps = converted.eps if fused or stored_settings else params.eps
    other = dataclasses.replace(ref, eps=eps, **_float64_arrays(converted))
    kh, kw = params.kernel_size
    dh, dw = params.dilation
    x = rng.standard_normal((2, (kh - 1) * dh + 4, (kw - 1) * dw + 4, params.in_channels))
    y_ref = conv_bn(x, ref, backend="numpy")
    y_new = conv_bn(x, other, backend="numpy")
    max_abs = float(np.max(np.abs(y_new - y_ref))) if y_ref.size else 0.0
    scale = float(np.max(np.abs(y_ref))) if y_ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    ok = bool(np.isfinite(max_rel) and max_rel <= tol)
    return LayerCheck(name, target_name, max_abs, max_rel, tol, ok)


def _storage_dtype(*params: ConvBNParams) -> np.dtype:
    """The coarsest float dtype among the kernels (a float16 side limits the achievable error)."""
    dtypes = [np.asarray(p.kernel).dtype for p in params]
    return max(dtypes, key=lambda d: tolerance_for(d))


def _float64_arrays(params: ConvBNParams) -> dict[str, Any]:
    return {
        name: None if value is None else np.asarray(value, np.float64)
        for name, value in (
            (n, getattr(params, n)) for n in ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_var")
        )
    }


def _as_float64(params: ConvBNParams) -> ConvBNParams:
    return dataclasses.replace(params, **_float64_arrays(params))
