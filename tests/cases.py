"""The geometry matrix for the tests: the declared one from :mod:`convbn.conformance.cases`, plus
helpers to feed it to the independent loop reference in ``tests/reference.py``."""

from __future__ import annotations

import numpy as np

import convbn
from convbn.conformance.cases import EXTREME, GEOMETRY, Case

__all__ = ["CASES", "CASE_IDS", "EXTREME", "Case", "reference_params", "to_layout"]

CASES = list(GEOMETRY)
CASE_IDS = [c.name for c in CASES]


def reference_params(params: convbn.ConvBNParams, case: Case) -> dict:
    """The reference's inputs; geometry from the case as written, not as convbn normalized it."""
    return {
        "kernel": params.kernel, "bias": params.bias, "gamma": params.gamma, "beta": params.beta,
        "moving_mean": params.moving_mean, "moving_var": params.moving_var, "stride": case.stride,
        "padding": case.padding, "dilation": case.dilation, "groups": case.groups,
        "eps": params.eps, "momentum": params.momentum, "var_update": params.var_update,
    }


def to_layout(a: np.ndarray, data_format: str) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if data_format == "NCHW" else a
