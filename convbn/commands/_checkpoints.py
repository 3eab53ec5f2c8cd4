"""What ``convert``, ``fuse`` and ``inspect`` share: options, a progress bar, tables, staging."""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from convbn import conventions
from convbn.convert import Checkpoint, LayerCheck, format_for_path, read_format
from convbn.errors import ConvBNError
from convbn.formats import FORMATS, caps, import_frameworks, load_format
from convbn.formats._io import placement, staging
from convbn.formats._sharded import index_files


def add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source_format", choices=FORMATS, metavar="F",
                        help=f"source format ({', '.join(FORMATS)}); detected from the content when omitted")
    parser.add_argument("--pair", action="append", default=None, metavar="CONV=BN",
                        help="pair this conv with this BatchNorm (repeatable), or the path of a mapping file")
    parser.add_argument("--eps", type=float, default=None, metavar="E",
                        help="BatchNorm eps of every layer (default: the file's, else the source's default)")
    momentum = parser.add_mutually_exclusive_group()
    momentum.add_argument("--momentum", type=float, default=None, metavar="M",
                          help="BatchNorm momentum as the fraction kept, e.g. 0.9 for torch's momentum=0.1 "
                               "(below 0.5 from a torch source is refused as torch's spelling)")
    momentum.add_argument("--torch-momentum", type=float, default=None, metavar="M",
                          help="BatchNorm momentum in torch's spelling, the weight of the new value "
                               "(0.1 is 0.9 kept)")
    parser.add_argument("--use-ema", action="store_true",
                        help="read moving-average shadow values (slim checkpoints that have them)")


def add_target_options(parser: argparse.ArgumentParser, *, var_update: bool = True) -> None:
    parser.add_argument("--to", dest="target_format", choices=FORMATS, metavar="F",
                        help="target format; from DST's suffix when omitted (a suffix naming another "
                             "format is refused)")
    parser.add_argument("--verify", action="store_true",
                        help="compare every layer's conv_bn output before and after (at the geometry the "
                             "file stores, else stride 1 / SAME, as the report says); exit 1 above tolerance")
    if var_update:
        parser.add_argument("--keep-var-update", action="store_true",
                            help="refuse a target whose BatchNorms update the moving variance otherwise "
                                 "(biased vs unbiased) than the source's; by default convert and say so in a note")
    parser.add_argument("--force", action="store_true", help="overwrite an existing DST (never a file of SRC)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def target_format(args: argparse.Namespace, dst: Path, default: str | None = None) -> str:
    """``--to``, else the format DST's suffix names, else ``default``."""
    name = args.target_format or format_for_path(dst) or default
    if name is None:
        raise ConvBNError(
            "the target format must be given with --to or follow from DST's suffix (.pt, .bin, .safetensors, "
            ".weights.h5, .h5, .hdf5, .keras, .msgpack, .ckpt); an Orbax directory, of any other name, takes "
            f"--to flax. Received: DST={str(dst)!r}"
        )
    return name


def require_packages(*formats: str) -> None:
    """Refuse, before any reading, a format whose package is not installed (no import needed)."""
    for name in formats:
        package, extra = caps(name).package or (None, None)
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConvBNError(
                f"the {name} format needs {package}, which is not installed: pip install 'convbn[{extra}]'"
            )


def momentum(args: argparse.Namespace, source_format: str) -> float | None:
    """The momentum override as the fraction kept, from ``--momentum`` or ``--torch-momentum``.

    ``--momentum`` below 0.5 from a torch source is torch's spelling (0.1, the weight of the new
    value) far more often than a real 0.1 kept, so it is refused with the fix.
    """
    if args.torch_momentum is not None:
        if not 0.0 <= args.torch_momentum <= 1.0:
            raise ConvBNError(f"--torch-momentum must be in [0, 1]. Received: --torch-momentum {args.torch_momentum:g}")
        return 1.0 - float(args.torch_momentum)
    convention = caps(source_format).convention
    spells_new = convention is not None and not conventions.get(convention).native_momentum_is_kept
    if args.momentum is not None and args.momentum < 0.5 and spells_new:
        kept = 1.0 - args.momentum
        raise ConvBNError(
            f"--momentum is the fraction kept, and {args.momentum:g} from a {source_format} source looks like "
            f"{convention}'s spelling: {convention}'s momentum={args.momentum:g} is {kept:g} kept; pass --momentum {kept:g} or "
            f"--torch-momentum {args.momentum:g}. Received: --momentum {args.momentum:g}"
        )
    return args.momentum


def prepare_source(args: argparse.Namespace, src: Path, *targets: str | None) -> str:
    """SRC checked (it exists, is a file or TF checkpoint, is readable) and its format, with every
    package the conversion needs present: all before DST is looked at and before any reading."""
    name = read_format(src, args.source_format)
    require_packages(name, *(t for t in targets if t))
    return name


def source_files(src: Path, source_format: str) -> list[Path]:
    """Every file SRC consists of: the file (or Orbax directory), a sharded checkpoint's index and
    every shard it names, or a TF checkpoint's index, data shards and graph."""
    if not caps(source_format).prefix:
        return index_files(src)
    prefix = load_format(source_format).resolve(src)
    files = [Path(f"{prefix}.index"), *prefix.parent.glob(f"{glob.escape(prefix.name)}.data-*"),
             Path(f"{prefix}.meta")]
    if src.is_dir():
        files.append(src / "checkpoint")
    return [f for f in files if f.exists()]


def check_destination(src: Path, source_format: str, dst: Path, to: str, force: bool) -> None:
    """Never write over any file of the source; refuse a DST suffix naming another format than
    ``to`` (a torch file named ``.safetensors`` misleads every reader) and an existing DST
    without --force.

    Paths are compared resolved and by inode, so a symlink or a hard link to a source file is
    refused too; placement checks again (see :func:`staged`).
    """
    protected = source_files(src, source_format)
    prefixed = caps(to).prefix
    if prefixed:
        prefix = load_format(to).write_prefix(dst)
        written = [Path(f"{prefix}.index"), Path(f"{prefix}.data-00000-of-00001"),
                   *prefix.parent.glob(f"{glob.escape(prefix.name)}.data-*")]
    else:
        written = [dst]
    same = {p.resolve() for p in protected}
    for path in written:
        if path.resolve() in same or (path.exists() and any(os.path.samefile(path, p) for p in protected)):
            raise ConvBNError(
                f"DST must differ from SRC: convbn never modifies its source, and {path} is a file of "
                f"{src}. Received: DST={str(dst)!r}"
            )
    by_suffix = format_for_path(dst)
    if by_suffix and by_suffix != to:
        raise ConvBNError(
            f"DST's suffix must match --to: {dst.name!r} names the {by_suffix} format, not {to}; "
            f"rename DST or drop --to. Received: DST={str(dst)!r}, --to {to}"
        )
    if dst.is_dir():
        raise ConvBNError(f"DST must name a file (a prefix for slim), not a directory. Received: DST={str(dst)!r}")
    if not force and (dst.exists() or (prefixed and written[0].exists())):
        raise ConvBNError(f"{dst} exists; pass --force to overwrite it")
    for parent in (dst.parent, *dst.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConvBNError(f"DST's directory must be a directory. Received: {str(parent)!r}")
            break


def prepare_conversion(source_format: str, target_format: str | None) -> None:
    """Import the frameworks both formats need in a safe order (torch before TensorFlow) before
    either is read or written."""
    import_frameworks(source_format, *([target_format] if target_format else []))


def check_target(ckpt: Checkpoint, dst: Path, to: str) -> None:
    """What the target format refuses at DST itself (a slim prefix's stale ``.meta``), checked
    before writing to the staging path, where the format's writer cannot see it."""
    if caps(to).checks_destination:
        load_format(to).check_destination(ckpt, dst)


@contextlib.contextmanager
def staged(dst: Path, *, force: bool, protect: Sequence[Path]) -> Iterator[Path]:
    """A path beside ``dst`` to write to; its files move to ``dst``'s directory only on success.

    Lets ``--verify`` read the output back before anything appears at DST. Missing directories
    are created (and removed if anything fails); without ``force`` the placement is exclusive (a
    DST that appeared meanwhile wins and this run fails), and never onto a file in ``protect``.
    """
    with staging(dst) as stage:
        yield stage.path
        with placement(protect=protect):
            stage.place(overwrite=force)


class ProgressBar:
    """A one-line progress bar on stderr, shown only on a terminal and for more than one layer."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = total
        self.label = label
        self.done = 0
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.enabled = total > 1 and bool(isatty())

    def __call__(self, name: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = int(width * min(self.done, self.total) / self.total)
        text = f"\r{self.label:<9} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {name[:40]:<40}"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()


def dtype_of(value: Any) -> str:
    return str(np.asarray(value).dtype) if value is not None else "-"


def layer_rows(ckpt: Checkpoint) -> list[dict[str, Any]]:
    """One JSON-friendly row per layer: shapes, dtype, conventions, pairing."""
    rows = []
    convention = conventions.ALL.get(ckpt.convention or "")
    for name, p in ckpt.layers.items():
        source = ckpt.sources.get(name)
        row: dict[str, Any] = {
            "name": name,
            "conv": (source.conv_name or source.conv.get("kernel", "")) if source else "",
            "bn": (source.bn_name or source.bn.get("moving_mean", "")) if source else "",
            "kernel_hwio": list(np.shape(p.kernel)),
            "dtype": dtype_of(p.kernel),
            "bias": p.bias is not None,
            "gamma": p.gamma is not None,
            "beta": p.beta is not None,
            "eps": p.eps,
            "momentum_kept": p.momentum,
            "var_update": p.var_update,
            "stride": list(p.stride),
            "padding": p.padding if isinstance(p.padding, str) else [list(x) for x in p.padding],
            "groups": p.groups,
            "geometry_from_file": bool(source and source.geometry),
            "pairing": source.reason if source else "",
        }
        if convention is not None:
            row["momentum_native"] = convention.momentum_to_native(p.momentum)
        rows.append(row)
    return rows


def bias_change(before: Checkpoint, after: Checkpoint) -> dict[str, str]:
    """Per layer: 'kept', 'folded into beta/moving_mean', 'added (zero)', 'fused' or '-'."""
    folded_into = after.metadata.get("folded_bias", ":").split(":", 1)[0]
    out = {}
    for name, p in before.layers.items():
        q = after.layers.get(name)
        if after.fused:
            out[name] = "fused"
        elif q is None:
            out[name] = "?"
        elif p.bias is not None and q.bias is None:
            out[name] = f"folded into {folded_into}"
        elif p.bias is None and q.bias is not None:
            out[name] = "added (zero)"
        else:
            out[name] = "kept" if p.bias is not None else "-"
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_rows(checks: Sequence[LayerCheck]) -> list[dict[str, Any]]:
    return [
        {
            "layer": c.source or c.target,
            "target": c.target,
            "max_abs": c.max_abs if np.isfinite(c.max_abs) else None,
            "max_rel": c.max_rel if np.isfinite(c.max_rel) else None,
            "tolerance": c.tolerance,
            "ok": c.ok,
            "geometry": c.geometry,
            **({"problem": c.problem} if c.problem else {}),
        }
        for c in checks
    ]


def print_lists(ckpt: Checkpoint, notes: Sequence[str], out: TextIO) -> None:
    if ckpt.unpaired:
        for label, names in (
            ("unpaired (each its own layer)", [n for n in ckpt.unpaired if n in ckpt.others]),
            ("unpaired (kept as tensors)", [n for n in ckpt.unpaired if n not in ckpt.others]),
        ):
            if names:
                listed = ", ".join(f"{n} ({'conv' if ckpt.unpaired[n] == 'conv' else 'BatchNorm'})" for n in names)
                print(f"{label}: {listed}", file=out)
    if ckpt.dropped:
        shown = ", ".join(ckpt.dropped[:8]) + (f", ... ({len(ckpt.dropped) - 8} more)" if len(ckpt.dropped) > 8 else "")
        print(f"dropped: {shown}", file=out)
    for line in notes:
        print(f"note: {line}", file=out)
