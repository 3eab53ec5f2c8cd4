"""The conformance report: every result, a summary per backend x device x check group x dtype,
and the same as a text table or JSON."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import platform
from collections.abc import Sequence
from typing import Any

from convbn.conformance.cases import DTYPES
from convbn.conformance.results import ORDER, Result

__all__ = ["GROUP_ORDER", "Report", "Summary", "environment"]

#: Row order within a backend; ``agree`` rows (pairs of backends) come last.
GROUP_ORDER = ("eval", "train", "stats", "grad", "extreme", "edge", "gpu", "distributed", "agree")

_DISTRIBUTIONS = {
    "numpy": ("numpy",),
    "torch": ("torch",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "jax": ("jax",),
}


def _version(name: str) -> str | None:
    for dist in _DISTRIBUTIONS.get(name, (name,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _device_names(name: str, devices: Sequence[str]) -> dict[str, str]:
    from convbn import dispatch

    module = dispatch.load_backend(name)
    return {d: str(module.resolve_device(d)) for d in devices}


def environment(
    backends: Sequence[str],
    devices: dict[str, list[str]],
    *,
    quick: bool,
    allow_tf32: bool,
    precision: dict[str, str],
) -> dict[str, Any]:
    """What the run ran on: versions, devices, flags."""
    from convbn import __version__

    return {
        "convbn": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "backends": {
            name: {"version": _version(name), "devices": _device_names(name, devices[name])}
            for name in backends
        },
        "quick": quick,
        "allow_tf32": allow_tf32,
        "gpu_precision": precision,
    }


@dataclasses.dataclass(frozen=True)
class Summary:
    """The results of one backend (or pair) x device x group x dtype, reduced to one cell."""

    backend: str
    device: str
    group: str
    dtype: str
    status: str  # "pass", "fail", "skip" or "ref"
    checks: int
    failed: int
    skipped: int
    worst: Result | None  # the result with the largest error / tolerance

    def cell(self) -> str:
        if self.status == "fail" and self.worst is not None and self.worst.exception:
            # A crashed check has no number; the cell must not show a passing one beside FAIL.
            return f"error: {self.worst.exception.split(':', 1)[0]}"
        if self.worst is None or self.worst.error is None:
            return {"skip": "skip", "ref": "reference", "pass": "ok", "fail": "FAIL"}[self.status]
        text = f"{self.worst.error:.1e} / {_tol(self.worst.tolerance)}"
        if self.status == "fail":
            return f"FAIL {text}"
        return text + ("*" if self.skipped else "")

    def as_dict(self) -> dict[str, Any]:
        w = self.worst
        return {
            "backend": self.backend,
            "device": self.device,
            "group": self.group,
            "dtype": self.dtype,
            "status": self.status,
            "checks": self.checks,
            "failed": self.failed,
            "skipped": self.skipped,
            "worst_error": None if w is None else w.error,
            "tolerance": None if w is None else w.tolerance,
            "worst_case": None if w is None else w.case,
            "worst_quantity": None if w is None else w.quantity,
            "error": w.exception if w is not None and w.exception else None,
        }


def _tol(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.0e}" if f"{value:.1e}"[:3] in ("1.0", "2.0", "5.0") else f"{value:.1e}"


def _row_key(backend: str, device: str, group: str) -> tuple[int, int, str, int]:
    first = backend.split("~")[0]
    pair = "~" in backend
    return (
        1 if pair else 0,
        ORDER.index(first) if first in ORDER else len(ORDER),
        backend + "/" + device,
        GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER),
    )


class Report:
    """The results of a conformance run, with the summary table, failures and JSON."""

    def __init__(self, results: Sequence[Result], meta: dict[str, Any]) -> None:
        self.results = list(results)
        self.meta = meta

    @property
    def passed(self) -> bool:
        """True when no check failed (skipped checks do not fail a run)."""
        return not any(r.failed for r in self.results)

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.failed]

    def counts(self) -> dict[str, int]:
        out = {"checks": len(self.results), "pass": 0, "fail": 0, "skip": 0, "ref": 0}
        for r in self.results:
            out[r.status] += 1
        return out

    def summaries(self) -> list[Summary]:
        """One :class:`Summary` per backend x device x group x dtype, in report order."""
        cells: dict[tuple[str, str, str, str], list[Result]] = {}
        for r in self.results:
            cells.setdefault((r.backend, r.device, r.group, r.dtype), []).append(r)
        out = []
        for key in sorted(cells, key=lambda k: (_row_key(k[0], k[1], k[2]), DTYPES.index(k[3]))):
            rs = cells[key]
            measured = [r for r in rs if r.status in ("pass", "fail")]
            failed = sum(r.failed for r in rs)
            skipped = sum(r.status == "skip" for r in rs)
            if failed:
                status = "fail"
            elif measured:
                status = "pass"
            elif any(r.status == "ref" for r in rs):
                status = "ref"
            else:
                status = "skip"
            with_error = [r for r in measured if r.error is not None]
            # A failure without a number (a crash first) outranks every measured error: showing the
            # largest measured one would put a passing number in a failed cell.
            unmeasured = sorted((r for r in rs if r.failed and r.error is None), key=lambda r: not r.exception)
            if unmeasured:
                worst: Result | None = unmeasured[0]
            elif with_error:
                worst = max(with_error, key=lambda r: r.ratio)
            else:
                worst = None
            out.append(Summary(*key, status, len(rs), failed, skipped, worst))
        return out

    def skip_reasons(self) -> list[tuple[str, str, int]]:
        """``(backend, reason, count)`` for every distinct reason a check was skipped."""
        reasons: dict[tuple[str, str], int] = {}
        for r in self.results:
            if r.status == "skip":
                reasons[(r.backend, r.detail)] = reasons.get((r.backend, r.detail), 0) + 1
        return [(b, d, n) for (b, d), n in sorted(reasons.items())]

    def table(self) -> str:
        """The summary as a text table: one row per backend x device x group, one column per dtype."""
        rows: dict[tuple[str, str, str], dict[str, Summary]] = {}
        for s in self.summaries():
            rows.setdefault((s.backend, s.device, s.group), {})[s.dtype] = s
        header = ["backend", "device", "check", *DTYPES]
        body = [
            [b, d, g, *(cells[dt].cell() if dt in cells else "-" for dt in DTYPES)]
            for (b, d, g), cells in rows.items()
        ]
        widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(header, widths, strict=True)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in body]
        return "\n".join(lines)

    def text(self, max_failures: int = 20) -> str:
        """The full human-readable report: header, table, counts, failures, skip reasons."""
        meta = self.meta
        backends = ", ".join(
            f"{n} {info['version'] or '?'} ({', '.join(info['devices'].values())})"
            for n, info in meta["backends"].items()
        )
        lines = [
            f"convbn {meta['convbn']} conformance{' (quick)' if meta['quick'] else ''}: {backends}",
            f"GPU float32: {'TF32 allowed' if meta['allow_tf32'] else 'TF32 off'}",
            "Each cell: worst error / tolerance over the group's checks (errors are relative; "
            "see docs/conformance.md). * = some checks skipped.",
            "",
            self.table(),
            "",
        ]
        c = self.counts()
        lines.append(
            f"{c['checks']} checks: {c['pass']} passed, {c['fail']} failed, {c['skip']} skipped, "
            f"{c['ref']} are the reference itself"
        )
        failures = self.failures
        if failures:
            lines.append("")
            lines.append("Failures:")
            worst_first = sorted(failures, key=lambda r: -r.ratio if r.error is not None else float("-inf"))
            lines += [f"  {r.message()}" for r in worst_first[:max_failures]]
            if len(failures) > max_failures:
                lines.append(f"  ... and {len(failures) - max_failures} more (--json lists them all)")
        reasons = self.skip_reasons()
        if reasons:
            lines.append("")
            lines.append("Skipped:")
            lines += [f"  {b}: {d} ({n} checks)" for b, d, n in reasons]
        lines.append("")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: meta, counts, summary rows, failures, skip reasons.

        Non-finite errors (NaN or an infinite mismatch) appear as the string ``"inf"``.
        """
        return _json_safe({
            **self.meta,
            "passed": self.passed,
            "counts": self.counts(),
            "summary": [s.as_dict() for s in self.summaries()],
            "failures": [dict(dataclasses.asdict(r), message=r.message()) for r in self.failures],
            "skipped": [{"backend": b, "reason": d, "checks": n} for b, d, n in self.skip_reasons()],
        })


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
