"""convbn.flax.ConvBN (linen) and convbn.flax.nnx.ConvBN: against Flax's own Conv + BatchNorm."""

from __future__ import annotations

import numpy as np
import pytest

import convbn
from tests import reference
from tests._support.assertions import rel_err
from tests.cases import CASES, reference_params
from tests.conftest import need

# Float64 (conftest enables x64): only summation order differs (<= 1e-15 measured). Float32 against
# nn.BatchNorm's default use_fast_variance=True (E[x^2]-E[x]^2) on data with mean ~0.5 and unit
# variance: measured <= 3e-7 relative; 5e-6 leaves headroom. SEMANTICS.md trap 8 shows that default
# collapsing on large-mean data, which the last test checks convbn does not.
TOL64 = 1e-12
TOL32 = 5e-6

LAYER_CASES = [c for c in CASES if c.name in (
    "same_s2_even", "explicit_asym", "dilation_stride_same", "depthwise", "slim_style",
)]


@pytest.fixture(autouse=True)
def _flax():
    need("flax")


def _x(shape=(4, 9, 9, 3), dtype=np.float64):
    return (np.random.default_rng(1).standard_normal(shape) + 0.5).astype(dtype)


def _randomize(variables, seed=0):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = str(path[-1].key)
        values = rng.uniform(0.5, 1.5, a.shape) if name in ("scale", "var") else rng.standard_normal(a.shape)
        return jnp.asarray(values, a.dtype)

    return jax.tree_util.tree_map_with_path(fill, variables)


def _stack(dtype, use_fast_variance=False):
    """A convbn ConvBN and Flax's Conv + BatchNorm, sharing random variables."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from convbn.flax import ConvBN

    model = ConvBN(6, (3, 3), strides=2, use_bias=True, momentum=0.9, epsilon=1e-4, param_dtype=dtype)
    variables = _randomize(model.init(jax.random.key(0), jnp.zeros((1, 9, 9, 3), dtype), use_running_average=True))
    # Both keep float32 statistics by default; float64 ones make the float64 comparison exact.
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a.astype(dtype), variables["batch_stats"])
    conv = nn.Conv(6, (3, 3), strides=2, param_dtype=dtype, dtype=dtype)
    bn = nn.BatchNorm(momentum=0.9, epsilon=1e-4, use_fast_variance=use_fast_variance, param_dtype=dtype, dtype=dtype)
    conv_vars = {"params": variables["params"]["conv"]}
    bn_vars = {"params": variables["params"]["bn"], "batch_stats": variables["batch_stats"]["bn"]}
    return model, variables, conv, conv_vars, bn, bn_vars


def test_variable_tree_has_flax_names():
    import jax
    import jax.numpy as jnp

    _, variables, *_ = _stack(jnp.float32)
    shapes = jax.tree_util.tree_map(jnp.shape, variables)
    assert shapes == {
        "params": {"conv": {"kernel": (3, 3, 3, 6), "bias": (6,)}, "bn": {"scale": (6,), "bias": (6,)}},
        "batch_stats": {"bn": {"mean": (6,), "var": (6,)}},
    }


def test_jitted_training_matches_flax_batchnorm():
    import jax
    import jax.numpy as jnp

    model, variables, conv, conv_vars, bn, bn_vars = _stack(jnp.float64)
    x = jnp.asarray(_x())

    @jax.jit
    def step(variables, x):
        return model.apply(variables, x, use_running_average=False, mutable=["batch_stats"])

    @jax.jit
    def step_ref(conv_vars, bn_vars, x):
        return bn.apply(bn_vars, conv.apply(conv_vars, x), use_running_average=False, mutable=["batch_stats"])

    for i in range(3):
        y, updates = step(variables, x * (i + 1))
        y_ref, updates_ref = step_ref(conv_vars, bn_vars, x * (i + 1))
        variables = {**variables, **updates}
        bn_vars = {**bn_vars, **updates_ref}
        assert rel_err(y, y_ref) < TOL64
        assert rel_err(variables["batch_stats"]["bn"]["mean"], bn_vars["batch_stats"]["mean"]) < TOL64
        assert rel_err(variables["batch_stats"]["bn"]["var"], bn_vars["batch_stats"]["var"]) < TOL64
    y = jax.jit(lambda v, x: model.apply(v, x, use_running_average=True))(variables, x)
    assert rel_err(y, bn.apply(bn_vars, conv.apply(conv_vars, x), use_running_average=True)) < TOL64

    # A random output gradient: one constant per channel would cancel in BatchNorm's backward.
    dy = jnp.asarray(np.random.default_rng(2).standard_normal((4, 5, 5, 6)))

    def loss(params, apply):
        return jnp.sum(apply(params) * dy)

    grads = jax.grad(loss)(variables["params"], lambda p: model.apply(
        {"params": p, "batch_stats": variables["batch_stats"]}, x, use_running_average=False, mutable=["batch_stats"])[0])
    grads_ref = jax.grad(loss)({"conv": conv_vars["params"], "bn": bn_vars["params"]}, lambda p: bn.apply(
        {"params": p["bn"], "batch_stats": bn_vars["batch_stats"]}, conv.apply({"params": p["conv"]}, x),
        use_running_average=False, mutable=["batch_stats"])[0])
    for path in (("conv", "kernel"), ("bn", "scale"), ("bn", "bias")):
        assert rel_err(grads[path[0]][path[1]], grads_ref[path[0]][path[1]]) < TOL64, path


def test_float32_matches_flax_default_fast_variance():
    import jax.numpy as jnp

    model, variables, conv, conv_vars, bn, bn_vars = _stack(jnp.float32, use_fast_variance=True)
    x = jnp.asarray(_x(dtype=np.float32))
    y, updates = model.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    y_ref, updates_ref = bn.apply(bn_vars, conv.apply(conv_vars, x), use_running_average=False, mutable=["batch_stats"])
    assert y.dtype == jnp.float32
    assert rel_err(y, y_ref) < TOL32
    assert rel_err(updates["batch_stats"]["bn"]["var"], updates_ref["batch_stats"]["var"]) < TOL32


def test_init_leaves_statistics_and_use_running_average_is_required():
    import jax
    import jax.numpy as jnp

    from convbn.flax import ConvBN

    model = ConvBN(4, 3)
    x = jnp.asarray(_x())
    variables = model.init(jax.random.key(0), x, use_running_average=False)  # as nn.BatchNorm: no update
    np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], np.zeros(4))
    np.testing.assert_array_equal(variables["batch_stats"]["bn"]["var"], np.ones(4))
    with pytest.raises(ValueError, match="use_running_average"):
        model.apply(variables, x)
    with pytest.raises(ValueError, match="use_running_average"):
        ConvBN(4, 3, use_running_average=True).apply(variables, x, use_running_average=False)
    y = ConvBN(4, 3, use_running_average=True).apply(variables, x)
    np.testing.assert_array_equal(y, model.apply(variables, x, use_running_average=True))


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_geometry_and_unbiased_update_match_the_reference_and_conv_bn(case):
    import jax.numpy as jnp

    from convbn.flax import ConvBN

    x, params = case.params(momentum=0.8)  # var_update="unbiased": torch's, which Flax's BN cannot do
    model, variables = ConvBN.from_params(params)
    assert model.var_update == "unbiased"
    xj = jnp.asarray(x)
    y_eval = model.apply(variables, xj, use_running_average=True)
    assert rel_err(y_eval, reference.conv_bn(x, reference_params(params, case))) < TOL64
    np.testing.assert_array_equal(y_eval, convbn.conv_bn(xj, model.params(variables)))
    y, updates = model.apply(variables, xj, use_running_average=False, mutable=["batch_stats"])
    y_ref, mean, var = reference.conv_bn(x, reference_params(params, case), training=True)
    assert rel_err(y, y_ref) < TOL64
    assert rel_err(updates["batch_stats"]["bn"]["mean"], mean) < TOL64
    assert rel_err(updates["batch_stats"]["bn"]["var"], var) < TOL64
    y_direct, new = convbn.conv_bn(xj, model.params(variables), True)
    np.testing.assert_array_equal(y, y_direct)
    np.testing.assert_array_equal(updates["batch_stats"]["bn"]["var"], new.moving_var)


def test_params_and_from_params_round_trip_bit_for_bit():
    import jax
    import jax.numpy as jnp

    from convbn.flax import ConvBN

    model, variables, *_ = _stack(jnp.float64)
    params = model.params(variables)
    assert (params.stride, params.momentum, params.eps, params.var_update) == ((2, 2), 0.9, 1e-4, "biased")
    clone, clone_vars = ConvBN.from_params(params)
    assert jax.tree_util.tree_structure(clone_vars) == jax.tree_util.tree_structure(variables)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(clone_vars), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = jnp.asarray(_x())
    np.testing.assert_array_equal(model.apply(variables, x, use_running_average=True),
                                  clone.apply(clone_vars, x, use_running_average=True))
    with pytest.raises(convbn.ConvBNError, match="variables must hold params/conv/kernel"):
        model.params({"params": {}})


def test_large_mean_data_keeps_its_variance():
    """SEMANTICS.md trap 8: Flax's default fast variance gives 0 on 1e3 + N(0, 0.01^2) in float32."""
    import jax
    import jax.numpy as jnp

    from convbn.flax import ConvBN

    x = (1e3 + 0.01 * np.random.default_rng(0).standard_normal((8, 6, 6, 1))).astype(np.float32)
    model = ConvBN(1, 1, use_running_average=False, momentum=0.0)
    variables = model.init(jax.random.key(0), jnp.asarray(x))
    variables = {"params": {"conv": {"kernel": jnp.ones((1, 1, 1, 1))}, "bn": variables["params"]["bn"]},
                 "batch_stats": variables["batch_stats"]}
    _, updates = model.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    assert rel_err(updates["batch_stats"]["bn"]["var"], [np.var(x.astype(np.float64))]) < 1e-2


# -- nnx --------------------------------------------------------------------------------------------


def test_nnx_layer_trains_like_nnx_batchnorm_and_switches_with_eval():
    import jax.numpy as jnp
    from flax import nnx

    from convbn.flax.nnx import ConvBN

    layer = ConvBN(3, 6, 3, strides=2, use_bias=True, momentum=0.9, epsilon=1e-4, param_dtype=jnp.float64,
                   rngs=nnx.Rngs(0))
    conv = nnx.Conv(3, 6, (3, 3), strides=2, param_dtype=jnp.float64, rngs=nnx.Rngs(1))
    bn = nnx.BatchNorm(6, momentum=0.9, epsilon=1e-4, use_fast_variance=False, param_dtype=jnp.float64,
                       rngs=nnx.Rngs(1))
    for stat in (layer.bn.mean, layer.bn.var):  # float64 statistics, as in the linen test
        stat.set_value(stat.get_value().astype(jnp.float64))
    nnx.update(conv, nnx.state(layer.conv))
    nnx.update(bn, nnx.state(layer.bn))
    assert [path for path, _ in nnx.to_flat_state(nnx.state(layer))] == [
        ("bn", "bias"), ("bn", "mean"), ("bn", "scale"), ("bn", "var"), ("conv", "bias"), ("conv", "kernel"),
    ]
    x = jnp.asarray(_x())

    @nnx.jit
    def step(layer, x):
        return layer(x)

    @nnx.jit
    def step_ref(conv, bn, x):
        return bn(conv(x))

    for i in range(2):
        assert rel_err(step(layer, x * (i + 1)), step_ref(conv, bn, x * (i + 1))) < TOL64
        assert rel_err(layer.bn.var.get_value(), bn.var.get_value()) < TOL64
        assert rel_err(layer.bn.mean.get_value(), bn.mean.get_value()) < TOL64
    layer.eval()
    bn.eval()
    before = np.asarray(layer.bn.mean.get_value())
    assert rel_err(layer(x), bn(conv(x))) < TOL64
    np.testing.assert_array_equal(layer.bn.mean.get_value(), before)
    params = layer.params()
    np.testing.assert_array_equal(layer(x), convbn.conv_bn(x, params))
    np.testing.assert_array_equal(convbn.from_flax(layer.conv, layer.bn).kernel, params.kernel)
