"""``convbn convert SRC DST``: read a checkpoint in one format and write it in another."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from convbn.checkpoint import parse_flatten
from convbn.commands import _checkpoints as common
from convbn.convert import (
    Checkpoint,
    LayerCheck,
    check_layout,
    check_shard_size,
    detect_format,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from convbn.errors import ConvBNError
from convbn.formats import FORMATS, _orbax, caps, load_format
from convbn.formats._sharded import INDEX_SUFFIX
from convbn.loading import LoadReport, conform_checkpoint
from convbn.loading.graphs import file_graph

#: Formats whose writers keep the names of a checkpoint read from the same format.
LIKE_FORMATS = tuple(name for name in FORMATS if caps(name).like_files)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "convert",
        help="convert a checkpoint between torch, slim, keras, flax and safetensors",
        description="Read SRC, fold conv biases where the target has none, write DST atomically (creating its "
                    "directories; never onto a file of SRC).",
    )
    parser.add_argument("src", metavar="SRC", help="source checkpoint (a file, or a TF prefix/directory)")
    parser.add_argument("dst", metavar="DST", help="destination (a TF prefix such as model.ckpt for slim)")
    common.add_source_options(parser)
    parser.add_argument("--fold-bias", choices=("beta", "moving_mean"), default=None,
                        help="fold conv biases into BatchNorm's beta (default) or moving mean")
    parser.add_argument("--no-conv-bias", action="store_true",
                        help="fold every conv bias away even where the target could hold it")
    parser.add_argument("--like", metavar="MODEL_STATE", default=None,
                        help="a state file of your model (torch state_dict, Keras .weights.h5/.keras, flax "
                             "msgpack): write DST with its names and order, matching conv+BatchNorm layers "
                             "by name, by the graphs of .keras archives, then by kernel shape where that is "
                             "unambiguous (layers of one shape that nothing tells apart are refused: see "
                             "--map); the rest of MODEL_STATE is kept as it is")
    parser.add_argument("--map", metavar="LIKE_LAYER=SRC_LAYER", action="append", default=[], dest="mapping",
                        help="with --like: the like file's conv layer LIKE_LAYER takes SRC's layer SRC_LAYER "
                             "(names as the refusal or 'convbn inspect' lists them); repeat for each layer "
                             "order and shape cannot decide")
    parser.add_argument("--no-strict", action="store_true",
                        help="with --like: write what matches even when a layer is missing, unexpected or "
                             "of another shape (the report lists them) instead of refusing")
    parser.add_argument("--max-shard-size", metavar="SIZE", default=None,
                        help="write safetensors/torch/slim targets in shards of at most SIZE (bytes, or e.g. "
                             "5GB, 500MB, 2GiB, as transformers' save_pretrained reads it): DST's name gives "
                             "model-00001-of-0000N.safetensors and model.safetensors.index.json beside it "
                             "(a checkpoint that fits stays one file); a TF checkpoint's data files are "
                             "model.ckpt.data-0000K-of-0000N")
    parser.add_argument("--flatten", metavar="LAYER=HxWxC", action="append", default=None,
                        help="state what a dense layer's features are where the source cannot say (repeatable): "
                             "LAYER=HxWxC, its input is a flattened HxWxC feature map; LAYER=out:HxWxC, its "
                             "output is reshaped into one; LAYER=none, neither. Needed to convert such a layer "
                             "between NHWC and NCHW frameworks, which reorders its features")
    parser.add_argument("--kind", metavar="LAYER=KIND", action="append", default=[], dest="kinds",
                        help="state whether a layer the source cannot decide is a conv or a transposed conv "
                             "(repeatable): LAYER=conv_transpose or LAYER=conv. A torch state_dict stores a "
                             "bias-free ConvTranspose2d weight as a Conv2d's; the notes list such layers, and a "
                             "target that records kinds (flax, keras, safetensors) is refused until they are stated")
    common.add_target_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    # SRC first (a bad source is the first thing to fix), then the options, then DST; all before
    # any reading or framework import.
    source_format = common.read_format(src, args.source_format)
    like_format = _like_format(args, dst)
    to = common.target_format(args, dst, default=like_format)
    common.require_packages(source_format, to)
    if (caps(source_format).directories and src.is_dir()) or _writes_directory(to, dst):
        _orbax.require()
    momentum = common.momentum(args, source_format)
    common.check_destination(src, source_format, dst, to, args.force)
    if not args.force and Path(f"{dst}{INDEX_SUFFIX}").exists():
        raise ConvBNError(f"{dst}{INDEX_SUFFIX} exists (a sharded checkpoint written at {dst}); pass --force to overwrite it")
    if args.max_shard_size is not None:
        _check_shard_size(args.max_shard_size, to)
    check_layout(dst, to, args.max_shard_size)
    if like_format is not None:
        _check_like(args, dst, to, like_format)
        _mapping(args.mapping)
    elif args.mapping:
        raise ConvBNError(f"--map applies with --like only. Received: --map {args.mapping[0]!r} without --like")
    flatten = parse_flatten(args.flatten)
    kinds = _kinds(args.kinds)
    common.prepare_conversion(source_format, to)
    ckpt = load_checkpoint(
        src, source_format, pairs=args.pair, eps=args.eps, momentum=momentum, use_ema=args.use_ema
    )
    if flatten:
        ckpt = ckpt.with_flatten(flatten)
    if kinds:
        ckpt = ckpt.with_kinds(kinds)
    read_notes = len(ckpt.notes)
    match: LoadReport | None = None
    to_write: Checkpoint | None = None
    if like_format is not None:
        ckpt, to_write, match = _conform(args, ckpt, like_format)
    checks: list[LayerCheck] = []
    # A sharded source is its index and every shard: none may be written over.
    protect = common.source_files(src, source_format)
    try:
        written = _write(args, ckpt, dst, to, read_notes, checks, protect, to_write=to_write, match=match)
    except _VerificationFailed:
        return 1
    report(args, ckpt, written, to, read_notes, checks, written_ok=True, match=match)
    return 0


def _check_shard_size(size: str, to: str) -> None:
    """``--max-shard-size`` checked against the target before any reading."""
    try:
        check_shard_size(to, size)
    except ConvBNError as exc:
        raise ConvBNError(str(exc).replace("max_shard_size=", "--max-shard-size ").replace("max_shard_size", "--max-shard-size")) from None


def _writes_directory(to: str, dst: Path) -> bool:
    """Whether writing format ``to`` at ``dst`` makes a directory (an Orbax checkpoint)."""
    return caps(to).directories and bool(load_format(to).writes_directory(dst))


def _like_format(args: argparse.Namespace, dst: Path) -> str | None:
    """The --like file's format, or None without --like."""
    if args.like is None:
        return None
    like = Path(args.like)
    if not like.exists():
        raise ConvBNError(f"--like must name an existing state file of your model. Received: --like {args.like!r}")
    name = detect_format(like)
    if name not in LIKE_FORMATS:
        raise ConvBNError(
            f"--like takes a state file in one of {list(LIKE_FORMATS)}, whose names the target keeps. "
            f"Received: --like {args.like!r} ({name})"
        )
    return name


def _check_like(args: argparse.Namespace, dst: Path, to: str, like_format: str) -> None:
    like = Path(args.like)
    if to != like_format:
        raise ConvBNError(
            f"with --like, DST must be in the like file's format, whose names it takes. Received: DST "
            f"format {to!r}, --like {args.like!r} ({like_format})"
        )
    if to == "keras" and dst.suffix.lower() == ".keras":
        raise ConvBNError(
            "with --like, write Keras weights as *.weights.h5 or Keras 2's *.h5 (what model.load_weights "
            f"reads; a .keras archive carries its own model config). Received: DST={str(dst)!r}"
        )
    if args.no_conv_bias:
        raise ConvBNError("--no-conv-bias does not apply with --like: the like file's convs decide which keep a bias")
    if dst.resolve() == like.resolve():
        raise ConvBNError(f"DST must differ from the --like file: convbn never modifies its inputs. Received: DST={str(dst)!r}")


def _kinds(items: list[str]) -> dict[str, str]:
    """``--kind LAYER=KIND`` options as :meth:`Checkpoint.with_kinds` takes them."""
    out: dict[str, str] = {}
    for item in items:
        layer, sep, kind = item.rpartition("=")
        if not sep or not layer or kind not in ("conv", "conv_transpose") or layer in out:
            raise ConvBNError(
                "--kind takes LAYER=conv or LAYER=conv_transpose, each layer once. Received: --kind "
                f"{item!r}" + (" (given twice)" if layer in out else "")
            )
        out[layer] = kind
    return out


def _mapping(items: list[str]) -> dict[str, str]:
    """``--map LIKE_LAYER=SRC_LAYER`` options as a mapping."""
    out: dict[str, str] = {}
    for item in items:
        like, sep, src = item.partition("=")
        if not sep or not like or not src or like in out:
            raise ConvBNError(
                "--map takes LIKE_LAYER=SRC_LAYER, each like-file layer once. Received: --map "
                f"{item!r}" + (" (given twice)" if like in out else "")
            )
        out[like] = src
    return out


def _conform(args: argparse.Namespace, ckpt: Checkpoint, like_format: str) -> tuple[Checkpoint, Checkpoint, LoadReport]:
    """``(source under the like file's names, unfolded; what to write; the match report)``."""
    like = load_checkpoint(Path(args.like), like_format)
    out, match = conform_checkpoint(
        ckpt, like, fold_bias=args.fold_bias or "beta", strict=not args.no_strict, mapping=_mapping(args.mapping),
        like_graph=file_graph(Path(args.like), like), source_graph=file_graph(Path(args.src), ckpt),
    )
    out.notes[:0] = ckpt.notes
    # The source as it was, under the like file's names: what the written file is verified against.
    renamed = out.copy()
    for key, layer in match.matched.items():
        renamed.layers[key] = ckpt.layers[layer]
    renamed.format, renamed.dropped = ckpt.format, list(ckpt.dropped)
    return renamed, out, match


def _write(
    args: argparse.Namespace,
    ckpt: Checkpoint,
    dst: Path,
    to: str,
    read_notes: int,
    checks: list[LayerCheck],
    protect: list[Path],
    *,
    to_write: Checkpoint | None = None,
    match: LoadReport | None = None,
) -> Checkpoint:
    """Write into a staging path; with --verify, read it back and check before it reaches DST.

    ``to_write`` (with --like) is already folded per layer; ``ckpt`` is what it is verified against.
    """
    target = ckpt if to_write is None else to_write
    common.check_target(target, dst, to)
    # An existing DST was refused above for a directory always, for a file here.
    directory = _writes_directory(to, dst)
    if directory and dst.exists():
        raise ConvBNError(f"{dst} exists; an Orbax checkpoint is written as a new directory, even with --force")
    with common.staged(dst, force=args.force, protect=protect) as staging:
        bar = common.ProgressBar(len(target.layers), "writing")
        try:
            if to_write is None:
                written = save_checkpoint(
                    ckpt, staging, to, fold_bias=args.fold_bias,
                    conv_bias=False if args.no_conv_bias else None, keep_var_update=args.keep_var_update,
                    progress=bar, max_shard_size=args.max_shard_size,
                )
            else:
                written = save_checkpoint(to_write, staging, to, keep_var_update=args.keep_var_update,
                                          progress=bar, max_shard_size=args.max_shard_size)
        finally:
            bar.close()
        if args.verify:
            converted = load_checkpoint(staging, to)
            bar = common.ProgressBar(len(ckpt.layers), "verifying")
            try:
                checks += verify_checkpoint(ckpt, converted, progress=bar)
            finally:
                bar.close()
            if not all(c.ok for c in checks):
                report(args, ckpt, written, to, read_notes, checks, written_ok=False, match=match)
                raise _VerificationFailed()
    return written


class _VerificationFailed(Exception):
    pass


def report(
    args: argparse.Namespace,
    ckpt: Checkpoint,
    written: Checkpoint,
    to: str,
    read_notes: int,
    checks: list[LayerCheck],
    *,
    written_ok: bool,
    command: str = "convert",
    match: LoadReport | None = None,
) -> None:
    """The summary: a table per layer (JSON with --json), then unpaired, dropped and notes."""
    out = sys.stdout
    bias = common.bias_change(ckpt, written)
    by_layer = {c.source: c for c in checks}
    notes = ckpt.notes[:read_notes] + written.notes[read_notes:]
    if args.json:
        layer_rows = common.layer_rows(ckpt)
        for entry in layer_rows:
            entry["conv_bias"] = bias[entry["name"]]
        payload = {
            "command": command,
            "source": str(args.src),
            "source_format": ckpt.format,
            "target": str(args.dst),
            "target_format": to,
            "written": written_ok,
            "layers": layer_rows,
            "tensors": {k: list(np.shape(v)) for k, v in ckpt.tensors.items()},
            "unpaired": ckpt.unpaired,
            "dropped": ckpt.dropped,
            "notes": notes,
        }
        if match is not None:
            payload["like"] = {
                "path": str(args.like),
                "matched": match.matched,
                "missing": match.missing,
                "unexpected": match.unexpected,
                "mismatched": [{"model": m.model, "checkpoint": m.checkpoint, "reason": m.reason}
                               for m in match.mismatched],
                "folded": match.folded,
                "ambiguous": match.ambiguous,
                "how": match.how,
            }
        if args.verify:
            payload["verify"] = common.check_rows(checks)
            payload["ok"] = all(c.ok for c in checks)
        json.dump(payload, out, indent=2, default=_jsonable)
        print(file=out)
        return
    headers = ["layer", "kernel (HWIO)", "dtype", "conv bias", "paired by"]
    if args.verify:
        headers += ["max abs err", "max rel err", "tolerance", "ok"]
    rows: list[list[Any]] = []
    for name, p in ckpt.layers.items():
        source = ckpt.sources.get(name)
        row: list[Any] = [name, "x".join(map(str, np.shape(p.kernel))), common.dtype_of(p.kernel), bias[name],
                          source.reason if source else ""]
        if args.verify:
            c = by_layer.get(name)
            row += [f"{c.max_abs:.2e}", f"{c.max_rel:.2e}", f"{c.tolerance:.0e}", "ok" if c.ok else "FAIL"] if c else ["-"] * 4
        rows.append(row)
    action = {"convert": "converted", "fuse": "fused"}[command]
    print(f"{args.src} ({ckpt.format}) -> {args.dst} ({to}): {len(ckpt.layers)} layer(s) {action}, "
          f"{len(ckpt.tensors)} other tensor(s)" + (f", {len(ckpt.others)} other layer(s)" if ckpt.others else ""),
          file=out)
    if match is not None:
        print(f"layers take the names of {args.like}: " + (
            ", ".join(f"{layer} -> {key}" for key, layer in match.matched.items()) or "none matched"), file=out)
        for label, items in (("missing from SRC (kept as in the like file)", match.missing),
                             ("unexpected (in SRC, not in the like file; not written)", match.unexpected)):
            if items:
                print(f"{label}: {', '.join(items)}", file=out)
        for m in match.mismatched:
            print(f"mismatched (kept as in the like file): {m.model} <- {m.checkpoint}: {m.reason}", file=out)
        for a in match.ambiguous:
            print(f"ambiguous (kept as in the like file; --map decides): {a}", file=out)
    if rows:
        print(common.table(headers, rows), file=out)
    common.print_lists(ckpt, notes, out)
    for c in checks:
        if c.problem:
            print(f"verify: {c.source or c.target}: {c.problem}", file=out)
    if args.verify:
        others = [c for c in checks if c.source in ckpt.others]
        pairs = [c for c in checks if c.source not in ckpt.others]
        geometries = {c.geometry for c in pairs if c.geometry}
        if len(geometries) == 1:
            print(f"verify geometry, every layer: {geometries.pop()}", file=out)
        else:
            for c in pairs:
                if c.geometry:
                    print(f"verify geometry: {c.source}: {c.geometry}", file=out)
        failed = [c for c in checks if not c.ok]
        if failed:
            print(f"verification FAILED for {len(failed)} layer(s); nothing was written to {args.dst}", file=out)
        else:
            print(f"verified: all {len(checks)} layer(s) within tolerance", file=out)
            unrun = [c.source for c in others if c.problem]
            if unrun:
                print(f"not verified (not run): {', '.join(unrun)}", file=out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
