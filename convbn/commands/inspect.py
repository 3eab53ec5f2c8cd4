"""``convbn inspect SRC``: what convbn reads from a checkpoint, before converting it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from convbn.checkpoint import Layer
from convbn.commands import _checkpoints as common
from convbn.convert import load_checkpoint


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "inspect",
        help="list a checkpoint's layers by kind (conv+BatchNorm pairs, convs, dense layers, norms), "
             "conventions, pairing, and what is left over",
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint file, or a TF prefix/directory")
    common.add_source_options(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src = Path(args.src)
    source_format = common.read_format(src, args.source_format)
    common.require_packages(source_format)
    ckpt = load_checkpoint(
        src, source_format, pairs=args.pair, eps=args.eps, momentum=common.momentum(args, source_format),
        use_ema=args.use_ema,
    )
    rows = common.layer_rows(ckpt)
    tensors = {k: {"shape": list(np.shape(v)), "dtype": common.dtype_of(v)} for k, v in ckpt.tensors.items()}
    others = [_other_row(name, layer) for name, layer in ckpt.others.items()]
    out = sys.stdout
    if args.json:
        json.dump({
            "source": str(args.src),
            "format": ckpt.format,
            "source_format": ckpt.metadata.get("source_format", ckpt.format),
            "convention": ckpt.convention,
            "fused": ckpt.fused,
            "layers": rows,
            "others": others,
            "order": [name for name, _ in ckpt.in_order()],
            "tensors": tensors,
            "unpaired": ckpt.unpaired,
            "dropped": ckpt.dropped,
            "notes": ckpt.notes,
        }, out, indent=2)
        print(file=out)
        return 0
    print(f"{args.src}: {ckpt.format} checkpoint, convention {ckpt.convention or 'unknown'}, "
          f"{len(rows)} conv+BatchNorm layer(s), {len(tensors)} other tensor(s)"
          + (f", {len(others)} other layer(s)" if others else ""), file=out)
    if rows:
        headers = ["layer", "conv", "BatchNorm", "kernel (HWIO)", "dtype", "bias", "gamma", "eps", "momentum",
                   "var update", "geometry", "paired by"]
        table_rows = [
            [r["name"], r["conv"], r["bn"], "x".join(map(str, r["kernel_hwio"])), r["dtype"],
             "yes" if r["bias"] else "no", "yes" if r["gamma"] else "no", f"{r['eps']:g}",
             f"{r['momentum_kept']:g} kept" + (f" ({r['momentum_native']:g})" if r.get("momentum_native") not in
                                                (None, r["momentum_kept"]) else ""),
             r["var_update"], _geometry(r), r["pairing"]]
            for r in rows
        ]
        print(common.table(headers, table_rows), file=out)
    if others:
        print("other layers:", file=out)
        headers = ["layer", "kind", "kernel (neutral)", "dtype", "bias", "then", "eps"]
        print(common.table(headers, [
            [r["name"], r["kind"], "x".join(map(str, r["kernel"])) or "-", r["dtype"], "yes" if r["bias"] else "no",
             r["norm"] or "-", "-" if r["eps"] is None else f"{r['eps']:g}"]
            for r in others
        ]), file=out)
    if tensors:
        print("other tensors:", file=out)
        for name, info in tensors.items():
            print(f"  {name}  {'x'.join(map(str, info['shape'])) or 'scalar'}  {info['dtype']}", file=out)
    common.print_lists(ckpt, ckpt.notes, out)
    return 0


def _other_row(name: str, layer: Layer) -> dict[str, Any]:
    """A layer that is not a conv+BatchNorm pair, as inspect reports it: its kind, the neutral
    kernel's shape, and the BatchNorm after it (or, for a norm, its own settings)."""
    norm = layer.norm
    ref = layer.kernel if layer.kernel is not None else norm.moving_mean if norm is not None and \
        norm.moving_mean is not None else None if norm is None else norm.gamma if norm.gamma is not None else norm.beta
    return {
        "name": name,
        "kind": layer.kind,
        "kernel": list(np.shape(layer.kernel)) if layer.kernel is not None else [],
        "dtype": common.dtype_of(ref) if ref is not None else "",
        "bias": layer.bias is not None,
        "norm": (layer.norm_name or "batch_norm") if layer.kernel is not None and norm is not None else "",
        "eps": None if norm is None else norm.eps,
        "tensors": dict(layer.tensors),
    }


def _geometry(row: dict[str, Any]) -> str:
    if not row["geometry_from_file"]:
        return "defaults"
    stride = "x".join(map(str, row["stride"]))
    return f"s{stride} {row['padding']}"
