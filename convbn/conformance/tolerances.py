"""Every tolerance of the conformance suite, in one place, with where each number comes from.

Errors are measured as described in :mod:`convbn.conformance.reference` (relative, per channel
for outputs). Each tolerance is the worst error measured over every backend (numpy, torch,
tensorflow, jax), case, mode and layout of the full matrix on CPU, times 5, rounded up to 1, 2 or
5 times a power of ten. The factor 5 leaves room for other CPUs, BLAS/oneDNN versions and GPU
kernels (cuDNN with TF32 off) without letting a semantic mistake through:

- float64: every backend computes in float64 and differs from the reference only in summation
  order (measured <= 6e-15). Such noise changes with a CPU's vector width, so float64 has a floor
  of 1e-12: a thousand times the noise, and still five orders of magnitude below the smallest real
  defect (a backend quietly computing in float32 is off by 1e-7).
- float32: rounding of O(100)-term dot products and of the BatchNorm arithmetic, 1e-7..2e-6
  measured; the tolerances (1e-6..1e-5) stay hundreds of times below the 3e-3 that the smallest
  semantic mistake in the matrix produces (the biased instead of the unbiased moving variance on
  32 values per channel: 0.1 / 32 of a variance of ~1).
- bfloat16 / float16: ``x`` and ``y`` are rounded to 8 / 11 significant bits and the conv runs in
  that precision on some backends, so errors are around 2^-8 / 2^-11 of the output scale, more
  where rounding accumulates (gradients). The moving statistics are computed in float32 from the
  rounded conv output. At this precision the moving-variance convention is within the tolerance;
  float64 and float32 decide it.
- extreme (tiny/huge moving variance, large-mean input): on inputs whose spread is 1e-4 of their
  mean the conv output itself is rounded at 1e4 times the spread, so float32 loses four digits and
  float64 two; still 100 times below what a one-pass ``E[x^2] - E[x]^2`` variance does (an error
  of 100% or more).

Derived tolerances, not listed separately:

- ``edge`` checks that compare values (eval on one value per channel, non-contiguous input, traced
  calls) use the ``eval`` or ``train`` tolerance of their dtype; the zero-size batch must leave
  the moving statistics bit-identical (tolerance 0).
- ``gpu`` checks use the ``eval`` / ``train`` tolerances.
- ``agree`` (two backends against each other) uses twice the group's tolerance: each is within
  one tolerance of the reference, so by the triangle inequality they are within two of each other.

The table in ``docs/conformance.md`` is :func:`markdown_table` (a test checks that the two match).
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


# (group, dtype) -> Tolerance. Measured with the full matrix (`convbn conformance --json`) on a
# 2-core x86-64 CPU, numpy 2.4.6, torch 2.13.0+cpu, tensorflow-cpu 2.21.0, jax 0.10.2.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("eval", "float64"): Tolerance(1e-12, 4.40e-16, "torch explicit_asym[eval,NCHW] y"),
    ("train", "float64"): Tolerance(1e-12, 5.65e-15, "torch two_values[train_unbiased,NCHW] y"),
    ("stats", "float64"): Tolerance(1e-12, 2.13e-16, "torch same_even_kernel[train_biased,NHWC] moving_var"),
    ("grad", "float64"): Tolerance(1e-12, 2.28e-15, "jax depthwise_mult[train_unbiased,NHWC] dgamma"),
    ("extreme", "float64"): Tolerance(2e-11, 3.62e-12, "jax large_mean_depthwise[train_unbiased,NHWC] y"),
    ("eval", "float32"): Tolerance(2e-06, 2.95e-07, "torch dilation[eval,NCHW] y"),
    ("train", "float32"): Tolerance(1e-05, 1.66e-06, "numpy two_values[train_unbiased,NHWC] y"),
    ("stats", "float32"): Tolerance(1e-06, 1.15e-07, "tensorflow dilation[train_unbiased,NHWC] moving_var"),
    ("grad", "float32"): Tolerance(5e-06, 8.39e-07, "tensorflow depthwise_mult[train_unbiased,NHWC] dgamma"),
    ("extreme", "float32"): Tolerance(1e-02, 1.19e-03, "torch large_mean[train_unbiased,NCHW] y"),
    ("eval", "bfloat16"): Tolerance(5e-02, 5.90e-03, "tensorflow depthwise[eval,NHWC] y"),
    ("train", "bfloat16"): Tolerance(5e-02, 6.27e-03, "tensorflow dilation_stride_same[train_unbiased,NHWC] y"),
    ("stats", "bfloat16"): Tolerance(5e-03, 6.10e-04, "tensorflow depthwise_mult[train_biased,NHWC] moving_mean"),
    ("grad", "bfloat16"): Tolerance(2e-01, 2.27e-02, "tensorflow dilation[train_unbiased,NHWC] dkernel"),
    ("extreme", "bfloat16"): Tolerance(5e-02, 5.42e-03, "tensorflow huge_moving_var[train_unbiased,NHWC] y"),
    ("eval", "float16"): Tolerance(5e-03, 7.14e-04, "tensorflow depthwise_mult[eval,NHWC] y"),
    ("train", "float16"): Tolerance(5e-03, 8.51e-04, "tensorflow depthwise_mult[train_unbiased,NHWC] y"),
    ("stats", "float16"): Tolerance(1e-03, 1.31e-04, "tensorflow depthwise_mult[train_unbiased,NHWC] moving_var"),
    ("grad", "float16"): Tolerance(2e-02, 2.64e-03, "tensorflow no_gamma_beta[train_unbiased,NHWC] dkernel"),
    ("extreme", "float16"): Tolerance(5e-03, 8.76e-04, "tensorflow tiny_moving_var[train_unbiased,NHWC] y"),

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
