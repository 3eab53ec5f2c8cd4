"""Shapes, the interleaved timer and the result records shared by every backend's benchmark.

A *contest* is convbn against the framework's own idiomatic layers on the same input and weights.
Both contenders are warmed up (compilation, tracing, caches) before timing starts, then timed in
alternating order (A B B A A B ...) so that load from other processes on the machine hits both
alike; each sample is the mean over enough calls to last ``min_time`` seconds, and the reported
figure is the median over samples.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["SHAPES", "Contest", "Result", "Shape", "Timing", "interleaved", "rel_err"]


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark geometry, NHWC: ``x`` is ``(n, h, w, c)``, the kernel ``k x k``."""

    name: str
    n: int
    h: int
    w: int
    c: int
    out: int
    k: int
    stride: int = 1
    groups: int = 1

    @property
    def x_nhwc(self) -> tuple[int, int, int, int]:
        return (self.n, self.h, self.w, self.c)

    def describe(self) -> str:
        kind = "depthwise " if self.groups == self.c and self.groups > 1 else ""
        stride = f", stride {self.stride}" if self.stride != 1 else ""
        return f"{self.n}x{self.h}x{self.w}x{self.c} -> {self.out}, {kind}{self.k}x{self.k}{stride} SAME"

    def arrays(self, seed: int = 0) -> dict[str, np.ndarray]:
        """float32 input and weights (HWIO kernel) with running statistics away from 0/1."""
        rng = np.random.default_rng(seed)
        fan_in = self.k * self.k * self.c // self.groups
        return {
            "x": rng.standard_normal(self.x_nhwc).astype(np.float32),
            "kernel": (rng.standard_normal((self.k, self.k, self.c // self.groups, self.out)) / np.sqrt(fan_in)).astype(np.float32),
            "gamma": rng.uniform(0.5, 1.5, self.out).astype(np.float32),
            "beta": rng.standard_normal(self.out).astype(np.float32),
            "moving_mean": (rng.standard_normal(self.out) * 0.1).astype(np.float32),
            "moving_var": rng.uniform(0.5, 2.0, self.out).astype(np.float32),
            "dy": rng.standard_normal((self.n, -(-self.h // self.stride), -(-self.w // self.stride), self.out)).astype(np.float32),
        }


#: The benchmark geometries (all SAME padding, no conv bias: the usual conv+BN layout).
SHAPES = (
    Shape("tiny", 1, 8, 8, 16, 16, 3),
    Shape("resnet3x3", 8, 56, 56, 64, 64, 3),
    Shape("bottleneck1x1", 8, 56, 56, 256, 64, 1),
    Shape("down3x3s2", 8, 56, 56, 64, 128, 3, stride=2),
    Shape("depthwise3x3", 8, 56, 56, 128, 128, 3, groups=128),
)


@dataclasses.dataclass
class Contest:
    """convbn against a native equivalent, plus how to get comparable outputs from both.

    ``convbn``/``native`` run one step and return something to synchronize on; ``outputs()`` runs
    each once more and returns a dict of NumPy arrays per contender with the same keys and layouts
    (``y``, and in training the kernel gradient in HWIO and the updated moving statistics).
    """

    backend: str
    shape: Shape
    mode: str  # "eval" or "train"
    variant: str  # e.g. "NHWC", "NCHW", "NHWC tf.function"
    convbn: Callable[[], Any]
    native: Callable[[], Any]
    outputs: Callable[[], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
    native_name: str
    sync: Callable[[Any], Any] = lambda out: out
    #: The physical limit, where one is defined: the least work that computes the same output
    #: (torch eval: one ``F.conv2d`` with BatchNorm already folded into the weight and bias and the
    #: padding resolved), timed in the same rotation as the other two.
    limit: Callable[[], Any] | None = None
    #: The limit's outputs, as ``outputs()`` gives them, so it is checked to compute the same.
    limit_outputs: Callable[[], dict[str, np.ndarray]] | None = None


@dataclasses.dataclass
class Timing:
    """Per-call seconds; ``ratio`` is the median of the per-pair ratios (see :func:`interleaved`)."""

    convbn_s: float
    native_s: float
    ratio: float
    ratio_q1: float
    ratio_q3: float
    ratio_of_medians: float
    calls_per_sample: int
    samples: int
    convbn_samples: list[float] = dataclasses.field(default_factory=list)
    native_samples: list[float] = dataclasses.field(default_factory=list)
    #: With a limit: its median per-call seconds, and the median (and quartiles) of the per-sample
    #: ratios convbn / limit, whose samples ran back to back with convbn's.
    limit_s: float | None = None
    limit_ratio: float | None = None
    limit_q1: float | None = None
    limit_q3: float | None = None
    limit_samples: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Result:
    backend: str
    shape: str
    geometry: str
    mode: str
    variant: str
    native: str
    timing: Timing | None
    max_rel_diff: dict[str, float]
    note: str = ""
    #: The limit's output against the native one's, where the contest has a limit.
    limit_rel_diff: float | None = None


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max|b|``: the difference relative to the reference's scale."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return float(np.max(np.abs(a - b))) / max(scale, 1e-30) if a.size else 0.0


def _time_calls(fn: Callable[[], Any], sync: Callable[[Any], Any], calls: int,
                clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    out = None
    for _ in range(calls):
        out = fn()
    sync(out)
    return (clock() - start) / calls


def _median_ratio(ta: Sequence[float], tb: Sequence[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-pair ratios ``ta[i] / tb[i]``."""
    ratios = sorted(x / y for x, y in zip(ta, tb, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]


def interleaved(
    a: Callable[[], Any],
    b: Callable[[], Any],
    sync: Callable[[Any], Any],
    *,
    samples: int,
    min_time: float,
    warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
    limit: Callable[[], Any] | None = None,
) -> Timing:
    """Median per-call seconds of ``a`` and ``b``, sampled alternately after ``warmup`` calls each.

    The order alternates every sample (ABBA...) so that a slow drift in machine load biases
    neither. Sample ``i`` of ``a`` and sample ``i`` of ``b`` run back to back, under the same load,
    so ``ratio`` is the median of the per-pair ratios a_i / b_i, with their quartiles in
    ``ratio_q1``/``ratio_q3``. On a shared machine the per-sample times are often bimodal (the
    other processes come and go), and median(a) / median(b), kept as ``ratio_of_medians``, can then
    compare a sample from a busy phase with one from a quiet phase.
    ``clock`` is wall time by default; ``time.process_time`` (CPU time of this process) is far less
    sensitive to other processes on a busy machine, but counts spinning threads as busy.
    ``limit``, a third contender, joins the same rotation (A B L, then L B A, ...), so ``a`` sits
    next to it in every sample; ``limit_ratio`` is the median of the per-sample ratios a_i / l_i.
    """
    contenders = [a, b] if limit is None else [a, b, limit]
    for _ in range(warmup):
        for fn in contenders:
            sync(fn())
    calls = 1
    while True:  # calibrate on the slowest so each sample lasts about min_time
        slowest = max(_time_calls(fn, sync, calls, clock) for fn in contenders) * calls
        if slowest >= min_time or calls >= 1 << 16:
            break
        calls = min(calls * max(2, int(min_time / max(slowest, 1e-9))), 1 << 16)
    times: list[list[float]] = [[] for _ in contenders]
    for i in range(samples):
        order = range(len(contenders)) if i % 2 == 0 else range(len(contenders) - 1, -1, -1)
        for j in order:
            times[j].append(_time_calls(contenders[j], sync, calls, clock))
    ta, tb = times[0], times[1]
    ratio, q1, q3 = _median_ratio(ta, tb)
    ma, mb = statistics.median(ta), statistics.median(tb)
    timing = Timing(ma, mb, ratio, q1, q3, ma / mb, calls, samples, ta, tb)
    if limit is not None:
        tl = times[2]
        timing.limit_s = statistics.median(tl)
        timing.limit_ratio, timing.limit_q1, timing.limit_q3 = _median_ratio(ta, tl)
        timing.limit_samples = tl
    return timing
