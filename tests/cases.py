"""The geometry and parameter matrix the backend tests run over."""

from __future__ import annotations

import dataclasses

import numpy as np

import convbn


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    x_shape: tuple[int, int, int, int]  # NHWC
    kernel_hw: tuple[int, int]
    out_channels: int
    stride: object = 1
    padding: object = "SAME"
    dilation: object = 1
    groups: int = 1
    bias: bool = True
    gamma: bool = True
    beta: bool = True

    def arrays(self, seed: int = 0) -> dict[str, np.ndarray | None]:
        rng = np.random.default_rng(seed)
        c = self.x_shape[3]
        o = self.out_channels
        kernel = rng.standard_normal((*self.kernel_hw, c // self.groups, o)) / np.sqrt(
            self.kernel_hw[0] * self.kernel_hw[1] * c / self.groups
        )
        return {
            "x": rng.standard_normal(self.x_shape) + 0.5,
            "kernel": kernel,
            "bias": rng.standard_normal(o) if self.bias else None,
            "gamma": rng.uniform(0.5, 1.5, o) if self.gamma else None,
            "beta": rng.standard_normal(o) if self.beta else None,
            "moving_mean": rng.standard_normal(o) * 0.5,
            "moving_var": rng.uniform(0.5, 2.0, o),
        }

    def params(self, seed: int = 0, var_update: str = "unbiased", **overrides) -> tuple[np.ndarray, convbn.ConvBNParams]:
        a = self.arrays(seed)
        x = a.pop("x")
        settings = dict(
            stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
            eps=1e-3, momentum=0.9, var_update=var_update,
        )
        settings.update(overrides)
        return x, convbn.ConvBNParams(**a, **settings)


CASES = [
    Case("same_s2_even", (2, 8, 8, 3), (3, 3), 4, stride=2),
    Case("same_s2_odd", (2, 7, 7, 3), (3, 3), 4, stride=2),
    Case("same_s1_odd", (2, 7, 9, 3), (3, 3), 4),
    Case("same_even_kernel", (2, 8, 8, 3), (4, 4), 4),
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
    Case("slim_style", (2, 6, 6, 3), (3, 3), 4, bias=False, gamma=False),
    Case("no_gamma_beta", (2, 6, 6, 3), (1, 1), 4, gamma=False, beta=False),
]
CASE_IDS = [c.name for c in CASES]


def reference_params(params: convbn.ConvBNParams, case: Case) -> dict:
    """The reference's inputs; geometry from the case as written, not as convbn normalized it."""
    return {
        "kernel": params.kernel, "bias": params.bias, "gamma": params.gamma, "beta": params.beta,
        "moving_mean": params.moving_mean, "moving_var": params.moving_var, "stride": case.stride,
        "padding": case.padding, "dilation": case.dilation, "groups": case.groups,
        "eps": params.eps, "momentum": params.momentum, "var_update": params.var_update,
    }


def rel_err(actual, expected) -> float:
    """Max abs difference relative to the reference's max magnitude (>= 1e-3)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.size == 0:
        return 0.0
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-3))


def to_layout(a: np.ndarray, data_format: str) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if data_format == "NCHW" else a
