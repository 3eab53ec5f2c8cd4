"""What ``convert``, ``fuse`` and ``inspect`` share: options, a progress bar, tables, staging."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from convbn import conventions
from convbn.convert import Checkpoint, LayerCheck, detect_format, format_for_path
from convbn.errors import ConvBNError
from convbn.formats import FORMATS, import_frameworks, load_format


def add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source_format", choices=FORMATS, metavar="F",
                        help=f"source format ({', '.join(FORMATS)}); detected from the content when omitted")
    parser.add_argument("--pair", action="append", default=None, metavar="CONV=BN",
                        help="pair this conv with this BatchNorm (repeatable), or the path of a mapping file")
    parser.add_argument("--eps", type=float, default=None, metavar="E",
                        help="BatchNorm eps of every layer (default: the file's, else the source's default)")
    parser.add_argument("--momentum", type=float, default=None, metavar="M",
                        help="BatchNorm momentum as the fraction kept, e.g. 0.9 for torch's momentum=0.1")
    parser.add_argument("--use-ema", action="store_true",
                        help="read moving-average shadow values (slim checkpoints that have them)")


def add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", dest="target_format", choices=FORMATS, metavar="F",
                        help="target format; from DST's suffix when omitted")
    parser.add_argument("--verify", action="store_true",
                        help="compare every layer's conv_bn output before and after; exit 1 above tolerance")
    parser.add_argument("--force", action="store_true", help="overwrite an existing DST")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def target_format(args: argparse.Namespace, dst: Path, default: str | None = None) -> str:
    name = args.target_format or format_for_path(dst) or default
    if name is None:
        raise ConvBNError(
            f"the target format must be given with --to or follow from DST's suffix "
            f"(.pt, .weights.h5, .keras, .msgpack, .safetensors, .ckpt). Received: DST={str(dst)!r}"
        )
    return name


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """Never write over the source; refuse an existing DST without --force."""
    if (dst.exists() and src.exists() and os.path.samefile(src, dst)) or dst.resolve() == src.resolve() or (
        _same_tf_checkpoint(src, dst)
    ):
        raise ConvBNError(f"DST must differ from SRC: convbn never modifies its source. Received: DST={str(dst)!r}")
    if not force and (dst.exists() or Path(f"{dst}.index").exists()):
        raise ConvBNError(f"{dst} exists; pass --force to overwrite it")
    if not dst.parent.is_dir():
        raise ConvBNError(f"DST's directory must exist. Received: {str(dst.parent)!r}")


def _same_tf_checkpoint(src: Path, dst: Path) -> bool:
    """Whether DST, written as a TF checkpoint, would replace SRC's files: a TF checkpoint is named
    by its prefix, its .index or .data file, or its directory (no TensorFlow needed)."""
    slim = load_format("slim")
    if not slim.sniff(src):
        return False
    return bool(slim.resolve(src).resolve() == slim.write_prefix(dst).resolve())


def prepare_conversion(src: Path, source_format: str | None, target_format: str | None) -> str:
    """SRC's format (detected unless given), with the frameworks both formats need imported in a
    safe order (torch before TensorFlow) before either is read or written."""
    name = source_format or detect_format(src)
    import_frameworks(name, *([target_format] if target_format else []))
    return name


def check_target(ckpt: Checkpoint, dst: Path, to: str) -> None:
    """What the target format refuses at DST itself (a slim prefix's stale ``.meta``), checked
    before writing to the staging path, where the format's writer cannot see it."""
    check = getattr(load_format(to), "check_destination", None)
    if check is not None:
        check(ckpt, dst)


@contextlib.contextmanager
def staged(dst: Path) -> Iterator[Path]:
    """A path beside ``dst`` to write to; its files move to ``dst``'s directory only on success.

    Lets ``--verify`` read the output back before anything appears at DST.
    """
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".stage", dir=dst.parent))
    try:
        yield scratch / dst.name
        for file in sorted(scratch.iterdir(), key=lambda f: (f.name.endswith(".index"), f.name)):
            os.replace(file, dst.parent / file.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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
            **({"problem": c.problem} if c.problem else {}),
        }
        for c in checks
    ]


def print_lists(ckpt: Checkpoint, notes: Sequence[str], out: TextIO) -> None:
    if ckpt.unpaired:
        listed = ", ".join(f"{n} ({'conv' if k == 'conv' else 'BatchNorm'})" for n, k in ckpt.unpaired.items())
        print(f"unpaired (kept as tensors): {listed}", file=out)
    if ckpt.dropped:
        shown = ", ".join(ckpt.dropped[:8]) + (f", ... ({len(ckpt.dropped) - 8} more)" if len(ckpt.dropped) > 8 else "")
        print(f"dropped: {shown}", file=out)
    for line in notes:
        print(f"note: {line}", file=out)
