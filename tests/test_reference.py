"""Checks on the yardsticks themselves: the float64 NumPy reference against the independent loop
reference in ``tests/reference.py``, and the analytic gradient oracle against finite differences.

Everything else in the conformance suite is measured against these two, so they are checked
directly, over the whole declared matrix.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import convbn
from convbn.conformance import reference as oracle
from convbn.conformance.cases import EXTREME, GEOMETRY, MODES
from convbn.conformance.tolerances import tolerance
from tests import reference
from tests.cases import reference_params


def _loop_reference(case, x, params, training):
    return reference.conv_bn(x, reference_params(params, case), training)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [*GEOMETRY, *EXTREME], ids=lambda c: c.name)
def test_numpy_reference_matches_loop_reference(case, mode):
    """Within the float64 tolerance of the group the case's checks belong to."""
    training = mode != "eval"
    extreme = case in EXTREME
    x, params = case.params(var_update="biased" if mode == "train_biased" else "unbiased")
    got = oracle.forward(x, params, training)
    expected = _loop_reference(case, x, params, training)
    if not training:
        err, where = oracle.output_error(got.y, expected, expected, -1)
        assert err <= tolerance("extreme" if extreme else "eval", "float64"), (where, err)
        return
    y, mean, var = expected
    assert oracle.output_error(got.y, y, y, -1)[0] <= tolerance("extreme" if extreme else "train", "float64")
    stats_tol = tolerance("extreme" if extreme else "stats", "float64")
    assert oracle.mean_error(got.moving_mean, mean, mean, var)[0] <= stats_tol
    assert oracle.var_error(got.moving_var, var, var)[0] <= stats_tol


@pytest.mark.parametrize("case", GEOMETRY, ids=lambda c: c.name)
def test_var_update_conventions_differ_by_far_more_than_the_tolerance(case):
    """The stats check can tell biased from unbiased in float64 and float32 on every case."""
    x, params = case.params(var_update="unbiased")
    unbiased = _loop_reference(case, x, params, True)[2]
    biased = _loop_reference(case, x, dataclasses.replace(params, var_update="biased"), True)[2]
    diff = oracle.var_error(biased, unbiased, unbiased)[0]
    assert diff > 10 * tolerance("stats", "float32") > 10 * tolerance("stats", "float64")


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("case", [c for c in GEOMETRY if c.name in ("explicit_asym", "depthwise_mult", "gamma_no_beta")],
                         ids=lambda c: c.name)
def test_gradient_oracle_matches_finite_differences(case, training):
    x, params = case.params()
    rng = np.random.default_rng(2)
    y_shape = oracle.forward(x, params, False).y.shape
    dy = rng.standard_normal(y_shape)
    grads = oracle.gradients(x, params, dy, training)
    assert set(grads) == {"x", *params.arrays()} - {"moving_mean", "moving_var"}

    def loss(x_, **arrays):
        p = convbn.ConvBNParams(**{**params.arrays(), **arrays}, stride=case.stride, padding=case.padding,
                                dilation=case.dilation, groups=case.groups, eps=params.eps,
                                momentum=params.momentum)
        y = _loop_reference(case, x_, p, training)
        return float(np.sum((y[0] if training else y) * dy))

    h = 1e-6
    for name in grads:
        base = x if name == "x" else getattr(params, name)
        for idx in rng.choice(base.size, size=min(5, base.size), replace=False):
            plus, minus = base.copy(), base.copy()
            plus.flat[idx] += h
            minus.flat[idx] -= h
            if name == "x":
                fd = (loss(plus) - loss(minus)) / (2 * h)
            else:
                fd = (loss(x, **{name: plus}) - loss(x, **{name: minus})) / (2 * h)
            assert abs(grads[name].flat[idx] - fd) < 1e-5 * max(1.0, abs(fd)), (name, idx)
