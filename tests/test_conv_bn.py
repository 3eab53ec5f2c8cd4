"""Every backend against the independent float64 reference, over the geometry matrix."""

from __future__ import annotations

import numpy as np
import pytest

import convbn
from convbn import testing
from tests import reference
from tests.cases import CASE_IDS, CASES, reference_params, rel_err, to_layout

# float64: every backend computes in float64, so only summation order differs (~1e-15 observed).
# float32: SEMANTICS.md measured up to ~1.7e-4 max-rel error per element near zero; relative to the
# output's max magnitude the measured worst case here is below 2e-6, so 2e-5 leaves 10x headroom.
TOL = {np.float64: 1e-9, np.float32: 2e-5}
MODES = ["eval", "train_unbiased", "train_biased"]


@pytest.fixture(scope="module")
def expected_cache():
    return {}


def _expected(cache, case, mode, params, x):
    key = (case.name, mode)
    if key not in cache:
        cache[key] = reference.conv_bn(x, reference_params(params, case), training=mode != "eval")
    return cache[key]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference(backend, case, mode, data_format, dtype, expected_cache):
    var_update = "biased" if mode == "train_biased" else "unbiased"
    x, params = case.params(var_update=var_update)
    expected = _expected(expected_cache, case, mode, params, x)
    cast = convbn.ConvBNParams(
        **{k: (None if v is None else v.astype(dtype)) for k, v in params.arrays().items()},
        stride=params.stride, padding=params.padding, dilation=params.dilation, groups=params.groups,
        eps=params.eps, momentum=params.momentum, var_update=params.var_update,
    )
    training = mode != "eval"
    y, new = testing.run(backend, to_layout(x.astype(dtype), data_format), cast, training, data_format)
    assert y.dtype == dtype
    tol = TOL[dtype]
    if not training:
        assert rel_err(y, to_layout(expected, data_format)) < tol
        return
    y_ref, mean_ref, var_ref = expected
    assert rel_err(y, to_layout(y_ref, data_format)) < tol
    assert rel_err(new.moving_mean, mean_ref) < tol
    assert rel_err(new.moving_var, var_ref) < tol
    # The other convention is measurably different, so the check above can tell them apart.
    other = reference.conv_bn(
        x, {**reference_params(params, case), "var_update": "biased" if var_update == "unbiased" else "unbiased"},
        training=True,
    )
    assert rel_err(other[2], var_ref) > 10 * tol


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("same_s2_even", "depthwise_mult", "explicit_asym")],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_gradients_match_oracle(framework, case, mode):
    x, params = case.params()
    dy = np.random.default_rng(1).standard_normal(reference.conv(x, params.kernel, case.stride, case.padding,
                                                                 case.dilation, case.groups).shape)
    training = mode == "train"
    oracle = testing.gradients("numpy", x, params, dy, training)
    got = testing.gradients(framework, x, params, dy, training)
    assert set(got) == set(oracle) == {"x", "kernel", "bias", "gamma", "beta"}
    for name in oracle:
        if training and name == "bias":
            # Batch statistics cancel a constant added before BatchNorm: the true gradient is 0.
            assert np.max(np.abs(got[name])) < 1e-9 * np.max(np.abs(dy)) * x.size
            continue
        assert rel_err(got[name], oracle[name]) < 1e-9, name


@pytest.mark.parametrize("training", [False, True])
def test_gradient_oracle_matches_finite_differences(training):
    case = next(c for c in CASES if c.name == "explicit_asym")
    x, params = case.params()
    rng = np.random.default_rng(2)
    dy = rng.standard_normal(reference.conv(x, params.kernel, case.stride, case.padding).shape)
    grads = testing.gradients("numpy", x, params, dy, training)

    def loss(x_, **arrays):
        p = params if not arrays else convbn.ConvBNParams(**{**params.arrays(), **arrays},
                                                          stride=case.stride, padding=case.padding,
                                                          eps=params.eps, momentum=params.momentum)
        y = reference.conv_bn(x_, reference_params(p, case), training)
        return float(np.sum((y[0] if training else y) * dy))

    h = 1e-6
    for name, base in [("x", x), ("kernel", params.kernel), ("gamma", params.gamma), ("beta", params.beta)]:
        flat_idx = rng.choice(base.size, size=min(5, base.size), replace=False)
        for idx in flat_idx:
            plus, minus = base.copy(), base.copy()
            plus.flat[idx] += h
            minus.flat[idx] -= h
            if name == "x":
                fd = (loss(plus) - loss(minus)) / (2 * h)
            else:
                fd = (loss(x, **{name: plus}) - loss(x, **{name: minus})) / (2 * h)
            assert abs(grads[name].flat[idx] - fd) < 1e-5 * max(1.0, abs(fd)), (name, idx)
