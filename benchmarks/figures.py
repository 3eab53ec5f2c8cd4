"""The docs' figures, drawn from real runs as plain SVG (no plotting library):

    convbn conformance --quick --json > conformance.json
    python -m benchmarks.run --out benchmarks/results
    python -m benchmarks.figures --conformance conformance.json --benchmarks benchmarks/results/results.json

writes ``docs/_static/conformance.svg`` (worst error / tolerance per backend, device, check group
and dtype: the table that ``convbn conformance`` ends with) and ``docs/_static/benchmarks.svg``
(each contest's time ratio, convbn / native, with its interquartile range). Either input may be
left out; ``--out`` picks another directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "_static"
DTYPES = ("float64", "float32", "bfloat16", "float16")
FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif' font-size='12'"
GOOD, CLOSE, BAD, TRACK, INK, FAINT = "#3b8d5a", "#d08a1d", "#c0392b", "#e6e8eb", "#222", "#777"
ROW = 18

# The conformance cells span 1e-4 to 1 of the tolerance on a log scale: a passing check sits
# anywhere in that range, and a linear bar would show every float64 cell (1e-4 of its tolerance
# or less) as empty.
LOG_FLOOR = -4.0


class Svg:
    """A list of SVG elements with the few shapes the figures need."""

    def __init__(self, width: int, height: int, title: str) -> None:
        self.width, self.height = width, height
        self.parts = [f"<title>{escape(title)}</title>",
                      f"<rect width='{width}' height='{height}' fill='white'/>"]

    def rect(self, x: float, y: float, w: float, h: float, fill: str) -> None:
        self.parts.append(f"<rect x='{x:.1f}' y='{y:.1f}' width='{max(w, 0):.1f}' height='{h:.1f}' fill='{fill}'/>")

    def line(self, x1: float, y1: float, x2: float, y2: float, stroke: str, dash: bool = False) -> None:
        style = " stroke-dasharray='3,3'" if dash else ""
        self.parts.append(f"<line x1='{x1:.1f}' y1='{y1:.1f}' x2='{x2:.1f}' y2='{y2:.1f}' stroke='{stroke}'{style}/>")

    def text(self, x: float, y: float, s: str, anchor: str = "start", fill: str = INK, bold: bool = False) -> None:
        weight = " font-weight='bold'" if bold else ""
        self.parts.append(f"<text x='{x:.1f}' y='{y:.1f}' text-anchor='{anchor}' fill='{fill}'{weight}>{escape(s)}</text>")

    def render(self) -> str:
        # An intrinsic size plus a viewBox: as an <img>, the theme's max-width: 100% scales it down
        # to the content column, keeping its proportions.
        return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{self.width}' height='{self.height}' "
                f"viewBox='0 0 {self.width} {self.height}' {FONT}>\n" + "\n".join(self.parts) + "\n</svg>\n")


def _color(fraction: float) -> str:
    return GOOD if fraction < 0.5 else CLOSE if fraction <= 1 else BAD


def conformance_svg(report: dict[str, Any]) -> str:
    """Rows backend/device/check as in the CLI's table; each dtype cell a log-scale bar of worst
    error / tolerance, its right edge the tolerance."""
    cells: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for row in report["summary"]:
        cells.setdefault((row["backend"], row["device"], row["group"]), {})[row["dtype"]] = row
    label_w, cell_w, bar_w, top = 250, 150, 96, 78
    svg = Svg(label_w + cell_w * len(DTYPES) + 10, top + ROW * len(cells) + 40, "convbn conformance")
    versions = ", ".join(f"{name} {b['version']}" for name, b in report["backends"].items())
    run = "convbn conformance" + (" --quick" if report.get("quick") else "")
    counts = report["counts"]
    svg.text(0, 16, f"{run}: {counts['pass']} of {counts['checks']} checks passed, {counts['fail']} failed", bold=True)
    svg.text(0, 34, versions, fill=FAINT)
    svg.text(0, 52, "bar: worst error / tolerance, log scale from 1e-4 (left) to 1 (the tolerance, dashed)", fill=FAINT)
    for i, dtype in enumerate(DTYPES):
        svg.text(label_w + i * cell_w, top - 8, dtype, bold=True)
    for r, ((backend, device, group), by_dtype) in enumerate(cells.items()):
        y = top + r * ROW
        if r % 2:
            svg.rect(0, y, svg.width, ROW, "#f7f8f9")
        svg.text(0, y + 13, f"{backend}  {device}  {group}")
        for i, dtype in enumerate(DTYPES):
            x = label_w + i * cell_w
            cell = by_dtype.get(dtype)
            if cell is None or cell["status"] in ("ref", "skip") or cell["tolerance"] is None:
                word = {"ref": "reference", "skip": "skip"}.get(cell["status"] if cell else "", "-")
                svg.text(x, y + 13, word, fill=FAINT)
                continue
            fraction = (cell["worst_error"] or 0.0) / cell["tolerance"]
            if cell["status"] == "fail" and cell["worst_error"] is None:  # crashed: no error to draw
                svg.rect(x, y + 4, bar_w, ROW - 8, BAD)
                svg.text(x + bar_w + 4, y + 13, "error", fill=BAD)
                continue
            position = 0.0 if fraction <= 0 else min(max(math.log10(fraction) / -LOG_FLOOR + 1, 0.0), 1.15)
            svg.rect(x, y + 4, bar_w, ROW - 8, TRACK)
            color = BAD if cell["status"] == "fail" else _color(fraction)
            svg.rect(x, y + 4, bar_w * position, ROW - 8, color)
            svg.line(x + bar_w, y + 2, x + bar_w, y + ROW - 2, INK, dash=True)
            label = "0" if fraction == 0 else f"{fraction:.0e}" if fraction < 1e-3 else f"{fraction:.2g}"
            svg.text(x + bar_w + 4, y + 13, label, fill=color)
    return svg.render()


def _contests(report: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    for result in report["layers"]:
        if result.get("timing"):
            yield f"{result['backend']}  {result['shape']}  {result['mode']}  {result['variant']}", result["timing"]


def benchmarks_svg(report: dict[str, Any]) -> str:
    """One bar per contest: the median per-pair ratio convbn / native (below 1: convbn faster), the
    whisker its interquartile range, on a linear scale with native's time at 1."""
    contests = list(_contests(report))
    label_w, plot_w, top = 330, 480, 70
    # The scale fits the ratios, not the quartiles: one noisy contest's IQR (a quick run on a busy
    # machine can reach 20) would squash every bar; its whisker is clipped at the edge instead.
    scale_max = math.ceil(max([1.5] + [t["ratio"] for _, t in contests]) * 2) / 2
    svg = Svg(label_w + plot_w + 60, top + ROW * len(contests) + 40, "convbn benchmarks")
    m, settings = report["machine"], report["settings"]
    run = "python -m benchmarks.run" + (" --quick" if settings["quick"] else "")
    svg.text(0, 16, "time of conv_bn / time of the framework's own layers (below 1: convbn is faster)", bold=True)
    svg.text(0, 34, f"{run}: {report['date'][:10]}, {m['cpu']} ({m['cores']} cores), {settings['samples']} "
                    f"samples, {settings['threads']} thread(s); whisker: the ratio's IQR", fill=FAINT)

    def at(ratio: float) -> float:
        return label_w + plot_w * min(ratio, scale_max) / scale_max

    for k in range(int(scale_max * 2) + 1):
        svg.text(at(k / 2), top - 8, f"{k / 2:g}", anchor="middle", fill=FAINT)
    previous = None
    for r, (label, timing) in enumerate(contests):
        y = top + r * ROW
        backend = label.split()[0]
        if backend != previous and previous is not None:
            svg.line(0, y, svg.width, y, "#ccc")
        previous = backend
        svg.text(0, y + 13, label)
        ratio = timing["ratio"]
        svg.rect(label_w, y + 4, at(ratio) - label_w, ROW - 8, GOOD if ratio < 1 else CLOSE)
        svg.line(at(timing["ratio_q1"]), y + ROW / 2, at(timing["ratio_q3"]), y + ROW / 2, INK)
        svg.text(max(at(ratio), at(timing["ratio_q3"])) + 4, y + 13, f"{ratio:.2f}")
    bottom = top + ROW * len(contests)
    svg.line(at(1.0), top - 4, at(1.0), bottom, INK, dash=True)
    svg.text(at(1.0), bottom + 16, "native = 1", anchor="middle", fill=FAINT)
    return svg.render()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.figures", description="Draw the docs' figures (SVG) from a conformance and a benchmark run."
    )
    parser.add_argument("--conformance", type=Path, help="`convbn conformance --json` output")
    parser.add_argument("--benchmarks", type=Path, help="`python -m benchmarks.run`'s results.json")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"directory (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.conformance is None and args.benchmarks is None:
        parser.error("give --conformance, --benchmarks or both")
    args.out.mkdir(parents=True, exist_ok=True)
    for source, draw, name in ((args.conformance, conformance_svg, "conformance.svg"),
                               (args.benchmarks, benchmarks_svg, "benchmarks.svg")):
        if source is not None:
            (args.out / name).write_text(draw(json.loads(source.read_text())), encoding="utf-8")
            print(f"wrote {args.out / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
