"""The backends' fast paths compute the same numbers as the plain formulation they replace.

Each fast path (cached folds, the fused batch-norm kernels' in-kernel moving-average update, the
JAX matmul and shifted-multiply-add convolutions, plans kept across training steps) is checked
against the independent float64 reference, at the edges where it could go wrong.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import convbn
from convbn import dispatch, geometry, testing
from tests import reference
from tests._support.assertions import rel_err
from tests.cases import Case, reference_params, to_layout
from tests.conftest import need

# float32 against the float64 reference: as in test_conv_bn (measured worst case below 2e-6
# relative to the output's scale; 2e-5 leaves 10x headroom). float64: summation order only.
TOL32 = 2e-5
TOL64 = 1e-9

# Geometries that take the JAX matmul (1x1) and shifted multiply-add (depthwise) formulations,
# and their neighbours that must not.
FAST_CASES = [
    Case("pointwise_s2", (2, 7, 8, 5), (1, 1), 6, stride=2),
    Case("pointwise_padded", (2, 5, 5, 3), (1, 1), 4, padding=1),
    Case("pointwise_grouped", (2, 5, 5, 4), (1, 1), 6, groups=2),
    Case("depthwise_5x5_s2_asym", (2, 9, 8, 4), (5, 5), 4, groups=4, stride=2, padding=((1, 3), (2, 0))),
    Case("depthwise_dilated", (2, 9, 9, 3), (3, 3), 3, groups=3, dilation=(2, 1)),
    Case("depthwise_rect_stride", (2, 8, 9, 3), (3, 2), 3, groups=3, stride=(2, 1), padding="VALID"),
]


def _cast(params: convbn.ConvBNParams, dtype) -> convbn.ConvBNParams:
    return dataclasses.replace(params, **{k: v.astype(dtype) for k, v in params.arrays().items()})


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", FAST_CASES, ids=lambda c: c.name)
def test_conv_formulations_match_reference(framework, case, training, data_format):
    x, params = case.params()
    expected = reference.conv_bn(x, reference_params(params, case), training=training)
    y, new = testing.run(framework, to_layout(x, data_format), params, training, data_format)
    y_ref = expected[0] if training else expected
    assert rel_err(y, to_layout(y_ref, data_format)) < TOL64
    if training:
        assert rel_err(new.moving_mean, expected[1]) < TOL64
        assert rel_err(new.moving_var, expected[2]) < TOL64


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", [FAST_CASES[0], FAST_CASES[3]], ids=lambda c: c.name)
def test_conv_formulations_gradients(framework, case, training):
    x, params = case.params()
    dy = np.random.default_rng(1).standard_normal(
        reference.conv(x, params.kernel, case.stride, case.padding, case.dilation, case.groups).shape)
    oracle = testing.gradients("numpy", x, params, dy, training)
    got = testing.gradients(framework, x, params, dy, training)
    for name in ("x", "kernel", "gamma", "beta"):
        assert rel_err(got[name], oracle[name]) < TOL64, name


@pytest.mark.parametrize("var_update", ["unbiased", "biased"])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 1.0])
def test_moving_update_edges_float32(framework, momentum, var_update):
    # float32 takes the fused kernels (torch F.batch_norm, TF FusedBatchNormV3), whose own
    # moving-average update is used with factor 1 - momentum, including the ends 0 and 1.
    case = Case("edges", (3, 6, 6, 3), (3, 3), 4)
    x, params = case.params(var_update=var_update, momentum=momentum)
    _, mean_ref, var_ref = reference.conv_bn(x, reference_params(params, case), training=True)
    _, new = testing.run(framework, x.astype(np.float32), _cast(params, np.float32), True)
    assert rel_err(new.moving_mean, mean_ref) < TOL32
    assert rel_err(new.moving_var, var_ref) < TOL32
    if momentum == 1.0:  # nothing of the batch may leak in
        np.testing.assert_array_equal(new.moving_mean, params.moving_mean.astype(np.float32))
        np.testing.assert_array_equal(new.moving_var, params.moving_var.astype(np.float32))


@pytest.mark.parametrize("var_update", ["unbiased", "biased"])
def test_statistics_stored_in_float64_with_float32_data(framework, var_update):
    # The fused kernels want float32 statistics; float64 ones take the general path and stay float64.
    case = Case("mixed", (2, 6, 6, 3), (3, 3), 4)
    x, params = case.params(var_update=var_update)
    y_ref, mean_ref, var_ref = reference.conv_bn(x, reference_params(params, case), training=True)
    mixed = dataclasses.replace(params, kernel=params.kernel.astype(np.float32),
                                gamma=params.gamma.astype(np.float32), beta=params.beta.astype(np.float32),
                                bias=params.bias.astype(np.float32))
    y, new = testing.run(framework, x.astype(np.float32), mixed, True)
    assert y.dtype == np.float32
    assert new.moving_mean.dtype == np.float64 and new.moving_var.dtype == np.float64
    assert rel_err(y, y_ref) < TOL32
    assert rel_err(new.moving_mean, mean_ref) < TOL32
    assert rel_err(new.moving_var, var_ref) < TOL32


# Large-mean data, 1e3 + N(0, 0.01^2) in float32 (true variance ~1e-4): E[x^2] - E[x]^2 collapses
# here (flax's default gives var 0 and an output off by 7.6; Keras on torch gives 0.0625, off by
# 0.87; SEMANTICS.md trap 8). A sound variance leaves only the float32 rounding of the batch mean
# (ulp(1000) = 6e-5, i.e. 0.6% of the standard deviation): measured max |y - y_ref| 1.5e-3 (JAX)
# to 1.9e-2 (TF), moving-variance relative error 2e-6 to 3.1e-4. Bounds: 0.05 and 3e-3.
LARGE_MEAN_Y_TOL = 0.05
LARGE_MEAN_VAR_TOL = 3e-3


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_large_mean_batch_statistics_float32(backend, data_format):
    rng = np.random.default_rng(0)
    x = (1e3 + rng.standard_normal((8, 16, 16, 4)) * 0.01).astype(np.float32)
    params = convbn.ConvBNParams(
        kernel=np.eye(4, dtype=np.float32).reshape(1, 1, 4, 4),  # z = x exactly
        moving_mean=np.zeros(4, np.float32), moving_var=np.ones(4, np.float32),
        eps=1e-5, momentum=0.0, var_update="biased",
    )
    xd = x.astype(np.float64)
    mean, var = xd.mean(axis=(0, 1, 2)), xd.var(axis=(0, 1, 2))
    y_ref = (xd - mean) / np.sqrt(var + 1e-5)
    y, new = testing.run(backend, to_layout(x, data_format), params, True, data_format)
    assert np.max(np.abs(y - to_layout(y_ref, data_format))) < LARGE_MEAN_Y_TOL
    assert np.max(np.abs(new.moving_var - var)) / np.max(var) < LARGE_MEAN_VAR_TOL


def test_training_loop_keeps_plans_and_statistics(framework, monkeypatch):
    # Each step's returned params feed the next step (same tensors, new statistics): the geometry
    # is planned once, and the statistics follow the reference over three steps.
    case = Case("loop", (2, 6, 6, 3), (3, 3), 4, stride=2)
    x, params = case.params()
    module = dispatch.load_backend(framework)
    native = convbn.to_backend(params, framework)
    xb = module.asarray(x)
    made = []
    original = geometry._make_plan
    monkeypatch.setattr(geometry, "_make_plan", lambda *a: made.append(1) or original(*a))
    p = native
    ref = reference_params(params, case)
    for _ in range(3):
        y, p = convbn.conv_bn(xb, p, training=True)
        y_ref, ref["moving_mean"], ref["moving_var"] = reference.conv_bn(x, ref, training=True)
        assert rel_err(module.to_numpy(y), y_ref) < TOL64
    assert len(made) == 1
    assert rel_err(module.to_numpy(p.moving_mean), ref["moving_mean"]) < TOL64
    assert rel_err(module.to_numpy(p.moving_var), ref["moving_var"]) < TOL64
    assert p.kernel is native.kernel and p.gamma is native.gamma


# -- torch: the cached fold survives torch.inference_mode ------------------------------------------

def test_torch_fold_cached_under_inference_mode_serves_autograd_later():
    """A fold first computed under ``torch.inference_mode`` is an ordinary tensor: a later call
    with autograd uses it and gets the right values and input gradients; params created as
    inference tensors are folded per call (they have no version counter to validate a cache)."""
    need("torch")
    import torch

    case = Case("inference_mode", (2, 7, 7, 3), (3, 3), 4, stride=2)
    x, params = case.params()
    expected = reference.conv_bn(x, reference_params(params, case))
    dy = np.random.default_rng(3).standard_normal(expected.shape)
    oracle = testing.gradients("numpy", x, params, dy)
    with torch.inference_mode():
        assert rel_err(convbn.conv_bn(torch.from_numpy(x), params).numpy(), expected) < TOL64
    xt = torch.from_numpy(x).requires_grad_()
    y = convbn.conv_bn(xt, params)
    (y * torch.from_numpy(dy)).sum().backward()
    assert rel_err(y.detach().numpy(), expected) < TOL64
    assert rel_err(xt.grad.numpy(), oracle["x"]) < TOL64

    with torch.inference_mode():
        tp = convbn.to_backend(params, "torch")
        assert rel_err(convbn.conv_bn(torch.from_numpy(x), tp).numpy(), expected) < TOL64
        tp.gamma.mul_(2.0)  # in place, inside inference mode: no version counter records it
        doubled = dataclasses.replace(params, gamma=params.gamma * 2.0)
        assert rel_err(convbn.conv_bn(torch.from_numpy(x), tp).numpy(),
                       reference.conv_bn(x, reference_params(doubled, case))) < TOL64
    assert rel_err(convbn.conv_bn(torch.from_numpy(x), tp).numpy(),
                   reference.conv_bn(x, reference_params(doubled, case))) < TOL64


@pytest.mark.parametrize("present", [("bias", "gamma", "beta"), ()], ids=["all", "none"])
def test_torch_eval_with_gradients_uses_the_cached_fold_exactly(present):
    """Eval with autograd through the params hands out the cached fold through one autograd node:
    the output is bit-identical to the no_grad call, and every parameter's gradient (the moving
    statistics included) passes torch's float64 gradcheck against finite differences."""
    need("torch")
    import torch

    case = Case("eval_grad", (2, 6, 6, 3), (3, 3), 4, stride=2, bias="bias" in present,
                gamma="gamma" in present, beta="beta" in present)
    x, params = case.params()
    names = [n for n, v in params.arrays().items() if v is not None]
    leaves = {n: torch.tensor(np.asarray(getattr(params, n)), requires_grad=True) for n in names}
    tp = dataclasses.replace(params, **leaves)
    xt = torch.from_numpy(x).requires_grad_()
    with torch.no_grad():
        y_plain = convbn.conv_bn(xt, tp)
    y = convbn.conv_bn(xt, tp)
    assert y.requires_grad and torch.equal(y.detach(), y_plain)
    assert rel_err(y.detach().numpy(), reference.conv_bn(x, reference_params(params, case))) < TOL64

    def run(xv, *arrays):
        return convbn.conv_bn(xv, dataclasses.replace(params, **dict(zip(names, arrays, strict=True))))

    assert torch.autograd.gradcheck(run, (xt, *leaves.values()))


# -- TensorFlow: frozen params are folded once, also for tf.function, without losing gradients ----

def test_tf_frozen_params_fold_once_and_keep_gradients():
    need("tensorflow")
    import tensorflow as tf

    case = Case("tf_frozen", (2, 8, 8, 3), (3, 3), 4, stride=2)
    x, params = case.params()
    tp = convbn.to_backend(params, "tensorflow")
    expected = reference.conv_bn(x, reference_params(params, case))
    traces = []

    @tf.function
    def run(xb):
        traces.append(1)
        return convbn.conv_bn(xb, tp)

    for _ in range(3):
        assert rel_err(run(tf.constant(x)).numpy(), expected) < TOL64
    assert len(traces) == 1
    ops = {op.type for op in run.get_concrete_function(tf.constant(x)).graph.get_operations()}
    assert "Conv2D" in ops and "Rsqrt" not in ops  # the fold ran once, outside the graph
    assert rel_err(convbn.conv_bn(tf.constant(x), tp).numpy(), expected) < TOL64  # eager, cached

    # A tape watching the frozen params still gets exact gradients after the fold was cached.
    dy = np.random.default_rng(2).standard_normal(expected.shape)
    oracle = testing.gradients("numpy", x, params, dy)
    with tf.GradientTape() as tape:
        tape.watch(tp.gamma)
        loss = tf.reduce_sum(convbn.conv_bn(tf.constant(x), tp) * dy)
    assert rel_err(tape.gradient(loss, tp.gamma).numpy(), oracle["gamma"]) < TOL64


def test_tf_variables_are_folded_per_call():
    need("tensorflow")
    import tensorflow as tf

    case = Case("tf_vars", (2, 6, 6, 3), (3, 3), 4)
    x, params = case.params()
    vp = dataclasses.replace(params, **{k: tf.Variable(v) for k, v in params.arrays().items()})
    run = tf.function(lambda xb: convbn.conv_bn(xb, vp))
    assert rel_err(run(tf.constant(x)).numpy(), reference.conv_bn(x, reference_params(params, case))) < TOL64
    convbn.conv_bn(tf.constant(x), vp)
    vp.gamma.assign(params.gamma * 3.0)  # an optimizer step: no fold may be stale
    tripled = reference.conv_bn(x, reference_params(dataclasses.replace(params, gamma=params.gamma * 3.0), case))
    assert rel_err(run(tf.constant(x)).numpy(), tripled) < TOL64
    assert rel_err(convbn.conv_bn(tf.constant(x), vp).numpy(), tripled) < TOL64


# -- JAX: eager calls fold once per params object; traced calls give the same numbers -------------

def test_jax_eager_fold_matches_traced_and_reference():
    need("jax")
    import jax
    import jax.numpy as jnp

    from convbn.backends import jax as jb

    case = Case("jax_eager", (2, 8, 8, 3), (3, 3), 4, stride=2)
    x, params = case.params()
    jp = convbn.to_backend(params, "jax")
    expected = reference.conv_bn(x, reference_params(params, case))
    eager = convbn.conv_bn(jnp.asarray(x), jp)
    assert jp.cache.jax_folds is not None and np.dtype(np.float64) in jp.cache.jax_folds
    traced = jax.jit(lambda p, xb: convbn.conv_bn(xb, p))(jp, jnp.asarray(x))
    assert rel_err(np.asarray(eager), expected) < TOL64
    assert rel_err(np.asarray(traced), expected) < TOL64
    compiled = jb._conv_bias._cache_size()
    for _ in range(3):
        convbn.conv_bn(jnp.asarray(x), jp)
    assert jb._conv_bias._cache_size() == compiled


def test_training_with_eps_zero(framework):
    # eps = 0 is valid (the variance of a batch with spread is positive); torch's F.batch_norm
    # wrapper refuses it in training, so the backend calls the kernel directly.
    case = Case("eps0", (2, 5, 5, 2), (3, 3), 4)
    x, params = case.params(eps=0.0)
    y_ref, mean_ref, var_ref = reference.conv_bn(x, reference_params(params, case), training=True)
    y, new = testing.run(framework, x, params, True)
    assert rel_err(y, y_ref) < TOL64
    assert rel_err(new.moving_mean, mean_ref) < TOL64
    assert rel_err(new.moving_var, var_ref) < TOL64
