"""``convbn fuse SRC DST``: fold each BatchNorm into its conv, for deployment.

The output is a checkpoint (by default in SRC's format) holding, per layer, the conv's weight and
bias only, at the conv's names: load it into the same model with each BatchNorm removed (or
replaced by an identity) and each conv given a bias. Other tensors are kept when the format is
unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from convbn.commands import _checkpoints as common
from convbn.commands.convert import report
from convbn.convert import (
    fuse_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from convbn.errors import ConvBNError
from convbn.formats import caps


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "fuse",
        help="fold every BatchNorm into its conv (conv weight + bias, no BatchNorm) for deployment",
        description=(
            "Write DST with each conv+BatchNorm pair replaced by one conv with a bias: "
            "W' = W * gamma / sqrt(var + eps), b' = beta + (b - mean) * gamma / sqrt(var + eps)."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="source checkpoint")
    parser.add_argument("dst", metavar="DST", help="destination; SRC's format unless --to or its suffix says otherwise")
    common.add_source_options(parser)
    common.add_target_options(parser, var_update=False)  # a fused layer has no BatchNorm to train
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    source_format = common.read_format(src, args.source_format)
    to = common.target_format(args, dst, default=source_format)
    if not caps(to).writes_fused:
        raise ConvBNError(f"the {to} format cannot write fused layers (conv weight + bias without BatchNorm)")
    common.require_packages(source_format, to)
    momentum = common.momentum(args, source_format)
    common.check_destination(src, source_format, dst, to, args.force)
    common.prepare_conversion(source_format, to)
    ckpt = load_checkpoint(
        src, source_format, pairs=args.pair, eps=args.eps, momentum=momentum, use_ema=args.use_ema
    )
    read_notes = len(ckpt.notes)
    fused = fuse_checkpoint(ckpt)
    checks = []
    if args.verify:
        bar = common.ProgressBar(len(ckpt.layers), "verifying")
        try:
            checks = verify_checkpoint(ckpt, fused, progress=bar)
        finally:
            bar.close()
        if not all(c.ok for c in checks):
            report(args, ckpt, fused, to, read_notes, checks, written_ok=False, command="fuse")
            return 1
    common.check_target(fused, dst, to)
    with common.staged(dst, force=args.force, protect=common.source_files(src, source_format)) as staging:
        bar = common.ProgressBar(len(ckpt.layers), "writing")
        try:
            written = save_checkpoint(fused, staging, to, progress=bar)
        finally:
            bar.close()
    report(args, ckpt, written, to, read_notes, checks, written_ok=True, command="fuse")
    return 0
