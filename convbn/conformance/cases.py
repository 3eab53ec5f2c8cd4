"""The declared conformance matrix: cases, dtypes, modes, layouts, and the tasks built from them.

A :class:`Case` is one Conv2D + BatchNorm configuration with deterministic data (a seeded
generator, so every backend and every run sees the same numbers). The matrix is:

- :data:`GEOMETRY`: SAME at stride 1 and 2 on even and odd sizes with even kernels, VALID, int /
  pair / explicit asymmetric padding, rectangular kernels and strides, dilation, groups, depthwise
  with multiplier 1 and > 1, and conv bias / gamma / beta present or absent. Every case runs in
  eval and in training with both ``var_update`` conventions, in NHWC and NCHW, in float64 and
  float32; :data:`LOW_PRECISION_CASES` (a subset that still covers each geometry feature) also
  runs in bfloat16 and float16.
- :data:`EXTREME`: valid but numerically hard statistics: tiny and huge moving variances, and
  large-mean inputs on which the one-pass ``E[x^2] - E[x]^2`` variance collapses.
- :data:`GRADIENT_CASES`: gradients w.r.t. x, kernel, bias, gamma and beta in eval and training.
- Edge cases (one value per channel in training, a zero-size batch, non-contiguous input, a call
  traced by ``tf.function``/``jax.jit``, input already on a GPU) are built in
  :mod:`convbn.conformance.runner` from :data:`EDGE_CASE` and :data:`TRACED_CASE`.

Low-precision runs keep the parameters in float32 and only ``x`` in bfloat16/float16, as mixed
precision does. Inputs are rounded to the dtype before the float64 reference sees them, so the
reference and the backend start from the same numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from convbn.params import ConvBNParams

__all__ = [
    "DTYPES",
    "EDGE_CASE",
    "EXTREME",
    "GEOMETRY",
    "GRADIENT_CASES",
    "LAYOUTS",
    "LOW_PRECISION",
    "LOW_PRECISION_CASES",
    "MODES",
    "QUICK",
    "TRACED_CASE",
    "Case",
    "Task",
    "param_dtype",
    "round_to",
    "tasks",
]

#: Every dtype the suite runs, widest first.
DTYPES = ("float64", "float32", "bfloat16", "float16")
#: Dtypes whose parameters stay float32 (mixed precision).
LOW_PRECISION = ("bfloat16", "float16")
#: ``eval`` uses the moving statistics; the two training modes differ in ``var_update``.
MODES = ("eval", "train_unbiased", "train_biased")
LAYOUTS = ("NHWC", "NCHW")


@dataclasses.dataclass(frozen=True)
class Case:
    """One Conv2D + BatchNorm configuration and the recipe for its data.

    ``x`` is ``standard_normal * x_scale + x_loc``; the kernel is normal with variance
    ``1 / fan_in`` (so conv outputs are O(1)); the moving variance is uniform in ``var_range``.
    ``dtypes`` limits the dtypes the case is meaningful in (None: all of :data:`DTYPES`).
    """

    name: str
    x_shape: tuple[int, int, int, int]  # NHWC
    kernel_hw: tuple[int, int]
    out_channels: int
    stride: Any = 1
    padding: Any = "SAME"
    dilation: Any = 1
    groups: int = 1
    bias: bool = True
    gamma: bool = True
    beta: bool = True
    x_loc: float = 0.5
    x_scale: float = 1.0
    var_range: tuple[float, float] = (0.5, 2.0)
    eps: float = 1e-3
    dtypes: tuple[str, ...] | None = None
    note: str = ""

    def arrays(self, seed: int = 0) -> dict[str, np.ndarray | None]:
        """The case's float64 data: ``x`` (NHWC) and every params array (None where absent)."""
        rng = np.random.default_rng(seed)
        c = self.x_shape[3]
        o = self.out_channels
        kernel = rng.standard_normal((*self.kernel_hw, c // self.groups, o)) / np.sqrt(
            self.kernel_hw[0] * self.kernel_hw[1] * c / self.groups
        )
        return {
            "x": rng.standard_normal(self.x_shape) * self.x_scale + self.x_loc,
            "kernel": kernel,
            "bias": rng.standard_normal(o) if self.bias else None,
            "gamma": rng.uniform(0.5, 1.5, o) if self.gamma else None,
            "beta": rng.standard_normal(o) if self.beta else None,
            "moving_mean": rng.standard_normal(o) * 0.5,
            "moving_var": rng.uniform(*self.var_range, o),
        }

    def params(
        self, seed: int = 0, var_update: str = "unbiased", **overrides: Any
    ) -> tuple[np.ndarray, ConvBNParams]:
        """``(x, params)`` in float64, momentum 0.9 (kept), the case's eps and geometry."""
        a: dict[str, Any] = self.arrays(seed)
        x = a.pop("x")
        assert x is not None
        settings: dict[str, Any] = dict(
            stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
            eps=self.eps, momentum=0.9, var_update=var_update,
        )
        settings.update(overrides)
        return x, ConvBNParams(**a, **settings)

    def supports(self, dtype: str) -> bool:
        """Whether the case is meaningful in ``dtype``."""
        return self.dtypes is None or dtype in self.dtypes


GEOMETRY = (
    Case("same_s2_even", (2, 8, 8, 3), (3, 3), 4, stride=2, note="SAME split (0, 1): extra row at the bottom"),
    Case("same_s2_odd", (2, 7, 7, 3), (3, 3), 4, stride=2),
    Case("same_s1_odd", (2, 7, 9, 3), (3, 3), 4),
    Case("same_even_kernel", (2, 8, 8, 3), (4, 4), 4, note="SAME split (1, 2) at stride 1"),
    Case("same_even_kernel_s2", (2, 9, 8, 3), (2, 4), 5, stride=2),
    Case("valid", (2, 8, 7, 3), (3, 3), 4, padding="VALID"),
    Case("int_padding", (2, 6, 6, 3), (3, 3), 4, padding=2),
    Case("pair_padding", (2, 6, 6, 3), (3, 3), 4, padding=(1, 2)),
    Case("explicit_asym", (2, 6, 7, 3), (3, 3), 4, stride=2, padding=((0, 2), (1, 0))),
    Case("rect_kernel_stride", (2, 9, 10, 3), (3, 5), 4, stride=(1, 2)),
    Case("dilation", (2, 9, 9, 3), (3, 3), 4, dilation=2),
    Case("dilation_rect_stride", (2, 11, 10, 3), (3, 2), 4, stride=2, dilation=(2, 1), padding="VALID"),
    Case("dilation_stride_same", (2, 10, 10, 3), (3, 3), 4, stride=2, dilation=2),
    Case("groups", (2, 7, 7, 4), (3, 3), 6, groups=2),
    Case("depthwise", (2, 8, 8, 4), (3, 3), 4, groups=4, stride=2),
    Case("depthwise_mult", (2, 7, 7, 3), (3, 3), 6, groups=3),
    Case("depthwise_dilation_stride", (2, 11, 11, 3), (3, 3), 3, groups=3, stride=2, dilation=2),
    Case("no_bias", (2, 6, 6, 3), (3, 3), 4, bias=False),
    Case("slim_style", (2, 6, 6, 3), (3, 3), 4, bias=False, gamma=False, note="beta only, as tf-slim"),
    Case("no_gamma_beta", (2, 6, 6, 3), (1, 1), 4, gamma=False, beta=False),
    Case("gamma_no_beta", (2, 6, 6, 3), (3, 3), 4, beta=False),
    Case("two_values", (1, 1, 2, 3), (1, 1), 4, padding="VALID",
         note="two values per channel: the unbiased variance divides by 1"),
)

#: The geometry cases that also run in bfloat16 and float16: each geometry feature at least once.
LOW_PRECISION_CASES = tuple(
    c for c in GEOMETRY
    if c.name in (
        "same_s2_even", "same_even_kernel", "valid", "explicit_asym", "rect_kernel_stride",
        "dilation_stride_same", "groups", "depthwise", "depthwise_mult", "slim_style",
    )
)

EXTREME = (
    Case("tiny_moving_var", (2, 8, 8, 3), (3, 3), 4, stride=2, var_range=(1e-6, 1e-5), eps=1e-6,
         note="eval scales by up to 1/sqrt(2e-6) = 707; eps below cuDNN's 1e-5 floor"),
    Case("huge_moving_var", (2, 8, 8, 3), (3, 3), 4, var_range=(1e6, 1e8), eps=1e-3,
         note="eval output is beta plus a 1e-4-sized term"),
    Case("large_mean", (2, 8, 8, 3), (3, 3), 4, padding="VALID", x_loc=100.0, x_scale=0.01,
         eps=1e-5, dtypes=("float64", "float32"),
         note="batch std / |mean| ~ 1e-4: E[z^2] - E[z]^2 in float32 loses the variance entirely"),
    Case("large_mean_depthwise", (2, 8, 8, 4), (3, 3), 4, groups=4, padding="VALID", x_loc=300.0,
         x_scale=0.03, eps=1e-5, dtypes=("float64", "float32")),
)

#: Gradient cases, with the layouts each runs in.
GRADIENT_CASES = (
    (GEOMETRY[0], ("NHWC", "NCHW")),  # same_s2_even
    (next(c for c in GEOMETRY if c.name == "explicit_asym"), ("NHWC",)),
    (next(c for c in GEOMETRY if c.name == "dilation"), ("NHWC",)),
    (next(c for c in GEOMETRY if c.name == "dilation_stride_same"), ("NHWC",)),
    (next(c for c in GEOMETRY if c.name == "groups"), ("NHWC",)),
    (next(c for c in GEOMETRY if c.name == "depthwise_dilation_stride"), ("NHWC",)),
    (next(c for c in GEOMETRY if c.name == "depthwise_mult"), ("NHWC", "NCHW")),
    (next(c for c in GEOMETRY if c.name == "slim_style"), ("NHWC",)),
    (next(c for c in GEOMETRY if c.name == "no_gamma_beta"), ("NHWC",)),
)

#: The case the edge checks derive their inputs from (SAME at stride 2, odd split).
EDGE_CASE = GEOMETRY[0]
#: The case the traced-call edge check runs (a grouped conv: TF's graph rewrites mishandle those).
TRACED_CASE = next(c for c in GEOMETRY if c.name == "groups")

#: ``--quick``: ``(case, modes, layouts)`` runs in every dtype: one run per kind of trap (the odd
#: SAME split in both layouts and all three modes, a depthwise multiplier, explicit asymmetric
#: padding, beta-only params, large-mean and tiny-variance statistics).
QUICK = (
    ("same_s2_even", ("eval", "train_biased"), ("NHWC",)),
    ("same_s2_even", ("train_unbiased",), ("NCHW",)),
    ("depthwise_mult", ("train_biased",), ("NHWC",)),
    ("explicit_asym", ("eval",), ("NCHW",)),
    ("slim_style", ("train_unbiased",), ("NHWC",)),
    ("large_mean", ("train_unbiased",), ("NHWC",)),
    ("tiny_moving_var", ("eval",), ("NHWC",)),
)


def param_dtype(dtype: str) -> type[np.floating[Any]]:
    """The params' dtype for an ``x`` dtype: float64 for float64, float32 otherwise."""
    return np.float64 if dtype == "float64" else np.float32


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` rounded to ``dtype``'s precision (nearest, ties to even).

    float64 comes back as float64; every other dtype as float32, which holds bfloat16 and float16
    values exactly, so no bfloat16 support is needed in NumPy.
    """
    if dtype == "float64":
        return np.asarray(a, np.float64)
    f32 = np.asarray(a, np.float32)
    if dtype == "float32":
        return f32
    if dtype == "float16":
        return f32.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(f32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return rounded.astype(np.uint32).view(np.float32).reshape(f32.shape)
    raise ValueError(f"dtype must be one of {DTYPES}. Received: dtype={dtype!r}")


@dataclasses.dataclass(frozen=True)
class Task:
    """One unit of work for one backend and device: a case in a dtype, over modes and layouts.

    ``kind`` is ``"forward"`` (eval/train/stats groups, or ``extreme`` for :data:`EXTREME`
    cases), ``"grad"``, ``"edge"`` or ``"gpu"``.
    """

    kind: str
    case: Case
    dtype: str
    modes: tuple[str, ...] = MODES
    layouts: tuple[str, ...] = LAYOUTS

    @property
    def id(self) -> str:
        """``kind-case-dtype``: unique among :func:`tasks` (quick tasks of one case differ in their
        modes and layouts instead)."""
        return f"{self.kind}-{self.case.name}-{self.dtype}"


def _forward_tasks(cases: tuple[Case, ...], dtypes: tuple[str, ...]) -> list[Task]:
    return [Task("forward", c, d) for d in dtypes for c in cases if c.supports(d)]


def tasks(quick: bool = False) -> list[Task]:
    """Every task of the matrix (or of the ``--quick`` subset), in a stable order."""
    if quick:
        by_name = {c.name: c for c in (*GEOMETRY, *EXTREME)}
        out = [
            Task("forward", by_name[name], d, modes, layouts)
            for d in DTYPES
            for name, modes, layouts in QUICK
            if by_name[name].supports(d)
        ]
        out += [Task("grad", GEOMETRY[0], d, ("train_unbiased",), ("NHWC",)) for d in DTYPES]
    else:
        out = _forward_tasks(GEOMETRY, ("float64", "float32"))
        out += _forward_tasks(LOW_PRECISION_CASES, LOW_PRECISION)
        out += _forward_tasks(EXTREME, DTYPES)
        out += [
            Task("grad", c, d, ("eval", "train_unbiased"), layouts)
            for d in DTYPES
            for c, layouts in GRADIENT_CASES
        ]
    out += [Task("edge", EDGE_CASE, d) for d in DTYPES]
    out += [Task("gpu", EDGE_CASE, d, ("eval", "train_unbiased"), ("NHWC",)) for d in DTYPES]
    return out
