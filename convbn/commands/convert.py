"""``convbn convert SRC DST``: read a checkpoint in one format and write it in another."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from convbn.commands import _checkpoints as common
from convbn.convert import Checkpoint, LayerCheck, load_checkpoint, save_checkpoint, verify_checkpoint


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "convert",
        help="convert a checkpoint between torch, slim, keras, flax and safetensors",
        description="Read SRC, fold conv biases where the target has none, write DST atomically.",
    )
    parser.add_argument("src", metavar="SRC", help="source checkpoint (a file, or a TF prefix/directory)")
    parser.add_argument("dst", metavar="DST", help="destination (a TF prefix such as model.ckpt for slim)")
    common.add_source_options(parser)
    parser.add_argument("--fold-bias", choices=("beta", "moving_mean"), default=None,
                        help="fold conv biases into BatchNorm's beta (default) or moving mean")
    parser.add_argument("--no-conv-bias", action="store_true",
                        help="fold every conv bias away even where the target could hold it")
    common.add_target_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    to = common.target_format(args, dst)
    common.check_destination(src, dst, args.force)
    source_format = common.prepare_conversion(src, args.source_format, to)
    ckpt = load_checkpoint(
        src, source_format, pairs=args.pair, eps=args.eps, momentum=args.momentum, use_ema=args.use_ema
    )
    read_notes = len(ckpt.notes)
    checks: list[LayerCheck] = []
    try:
        written = _write(args, ckpt, dst, to, read_notes, checks)
    except _VerificationFailed:
        return 1
    report(args, ckpt, written, to, read_notes, checks, written_ok=True)
    return 0


def _write(
    args: argparse.Namespace, ckpt: Checkpoint, dst: Path, to: str, read_notes: int, checks: list[LayerCheck]
) -> Checkpoint:
    """Write into a staging path; with --verify, read it back and check before it reaches DST."""
    common.check_target(ckpt, dst, to)
    with common.staged(dst) as staging:
        bar = common.ProgressBar(len(ckpt.layers), "writing")
        try:
            written = save_checkpoint(
                ckpt, staging, to, fold_bias=args.fold_bias,
                conv_bias=False if args.no_conv_bias else None, progress=bar,
            )
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
                report(args, ckpt, written, to, read_notes, checks, written_ok=False)
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
          f"{len(ckpt.tensors)} other tensor(s)", file=out)
    if rows:
        print(common.table(headers, rows), file=out)
    common.print_lists(ckpt, notes, out)
    for c in checks:
        if c.problem:
            print(f"verify: {c.source or c.target}: {c.problem}", file=out)
    if args.verify:
        failed = [c for c in checks if not c.ok]
        if failed:
            print(f"verification FAILED for {len(failed)} layer(s); nothing was written to {args.dst}", file=out)
        else:
            print(f"verified: all {len(checks)} layer(s) within tolerance", file=out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
