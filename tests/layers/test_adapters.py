"""from_*/to_*/assign_* between each framework's own Conv + BatchNorm layers and ConvBNParams."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import convbn
from convbn import adapters
from tests import reference
from tests._support.assertions import rel_err
from tests.conftest import need_module

# Float64 comparisons differ only in summation order (<= 1e-15 measured); float32 runs compare a
# framework's unfolded Conv + BatchNorm with convbn's folded eval, measured <= 4e-7 relative here
# (SEMANTICS.md: fused vs unfused 3.8e-6 absolute at |y| = 8.4); 5e-6 leaves 10x headroom.
TOL64 = 1e-12
TOL32 = 5e-6


def _x(shape=(4, 9, 9, 3), dtype=np.float64):
    return (np.random.default_rng(1).standard_normal(shape) + 0.5).astype(dtype)


def _ref(params: convbn.ConvBNParams) -> dict:
    return {
        "kernel": params.kernel, "bias": params.bias, "gamma": params.gamma, "beta": params.beta,
        "moving_mean": params.moving_mean, "moving_var": params.moving_var, "stride": params.stride,
        "padding": params.padding, "dilation": params.dilation, "groups": params.groups,
        "eps": params.eps, "momentum": params.momentum, "var_update": params.var_update,
    }


# -- torch ------------------------------------------------------------------------------------------


def _torch_pair(*, padding=1, stride=1, groups=1, bias=True, affine=True, momentum=0.1, eps=1e-5, k=3):
    import torch
    from torch import nn

    torch.manual_seed(0)
    conv = nn.Conv2d(3 * groups, 6, k, stride, padding, 1, groups, bias, dtype=torch.float64)
    bn = nn.BatchNorm2d(6, eps, momentum, affine=affine, dtype=torch.float64)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return conv, bn


@pytest.mark.parametrize("config", [
    dict(),
    dict(padding="same", k=4),
    dict(padding=0, stride=2, bias=False, affine=False),
    dict(groups=2, momentum=0.3, eps=1e-3),
], ids=["pad1", "same_even_kernel", "valid_s2_no_affine", "groups"])
@pytest.mark.needs("torch")
def test_from_torch_computes_what_torch_computes(config):
    import torch

    conv, bn = _torch_pair(**config)
    params = convbn.from_torch(conv, bn)
    np.testing.assert_array_equal(params.kernel, conv.weight.detach().numpy().transpose(2, 3, 1, 0))
    assert params.momentum == 1 - config.get("momentum", 0.1)
    assert params.eps == config.get("eps", 1e-5) and params.var_update == "unbiased"
    assert (params.gamma is None) == (params.beta is None) == (not config.get("affine", True))
    assert (params.bias is None) == (not config.get("bias", True))
    x = _x((4, 9, 9, 3 * config.get("groups", 1)))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    with torch.no_grad():
        expected = bn.eval()(conv(xt)).numpy().transpose(0, 2, 3, 1)
        assert rel_err(convbn.conv_bn(x, params, backend="numpy"), expected) < TOL64
        y, new = convbn.conv_bn(x, params, True, backend="numpy")
        expected = bn.train()(conv(xt)).numpy().transpose(0, 2, 3, 1)
    assert rel_err(y, expected) < TOL64
    assert rel_err(new.moving_mean, bn.running_mean.numpy()) < TOL64
    assert rel_err(new.moving_var, bn.running_var.numpy()) < TOL64


@pytest.mark.needs("torch")
def test_from_torch_copies_and_to_torch_round_trips_bit_for_bit():
    import torch

    conv, bn = _torch_pair(padding="same", k=4, momentum=0.03)
    params = convbn.from_torch(conv, bn)
    original = conv.weight.detach().clone()
    with torch.no_grad():
        conv.weight.add_(1.0)  # later training of the modules does not reach the params
        np.testing.assert_array_equal(params.kernel, original.numpy().transpose(2, 3, 1, 0))
        conv.weight.copy_(original)
    conv2, bn2 = convbn.to_torch(params)
    assert conv2.padding == "same" and bn2.momentum == 0.03 and bn2.eps == bn.eps
    assert conv2.weight.dtype == torch.float64
    for a, b in ((conv, conv2), (bn, bn2)):
        for key, value in a.state_dict().items():
            if key != "num_batches_tracked":
                assert torch.equal(value, b.state_dict()[key]), key
    x = torch.from_numpy(_x((2, 3, 8, 8)))
    with torch.no_grad():
        assert torch.equal(bn.eval()(conv(x)), bn2.eval()(conv2(x)))


@pytest.mark.needs("torch")
def test_to_torch_explicit_symmetric_padding_and_missing_gamma():
    import torch

    x = _x((2, 6, 6, 3))
    rng = np.random.default_rng(0)
    params = convbn.ConvBNParams(
        kernel=rng.standard_normal((3, 3, 3, 4)), moving_mean=rng.standard_normal(4),
        moving_var=rng.uniform(0.5, 2, 4), beta=rng.standard_normal(4), padding=((1, 1), (2, 2)),
        eps=1e-3, momentum=0.9,
    )
    conv, bn = convbn.to_torch(params)
    assert conv.padding == (1, 2) and bn.affine
    np.testing.assert_array_equal(bn.weight.detach().numpy(), np.ones(4))  # gamma None: ones
    with torch.no_grad():
        y = bn.eval()(conv(torch.from_numpy(x.transpose(0, 3, 1, 2)))).numpy().transpose(0, 2, 3, 1)
    assert rel_err(y, reference.conv_bn(x, _ref(params))) < TOL64


@pytest.mark.needs("torch")
def test_torch_adapter_errors():
    from torch import nn

    conv, bn = _torch_pair()
    with pytest.raises(TypeError, match="conv must be a torch.nn.Conv2d. Received: conv of type Linear"):
        convbn.from_torch(nn.Linear(3, 6), bn)
    with pytest.raises(TypeError, match="bn must be a torch.nn.BatchNorm2d"):
        convbn.from_torch(conv, nn.BatchNorm1d(6))
    with pytest.raises(convbn.ConvBNError, match="cumulative average.*Received: bn.momentum=None"):
        convbn.from_torch(conv, nn.BatchNorm2d(6, momentum=None))
    with pytest.raises(convbn.ConvBNError, match="track_running_stats=True.*Received: bn.track_running_stats=False"):
        convbn.from_torch(conv, nn.BatchNorm2d(6, track_running_stats=False))
    with pytest.raises(convbn.ConvBNError, match="Received: conv.padding_mode='reflect'"):
        convbn.from_torch(nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"), bn)
    with pytest.raises(convbn.ConvBNError, match="Received: bn.num_features=5, conv.out_channels=6"):
        convbn.from_torch(conv, nn.BatchNorm2d(5))
    with pytest.raises(convbn.ConvBNError, match="lazy module"):
        convbn.from_torch(nn.LazyConv2d(6, 3), bn)
    params = convbn.from_torch(conv, bn)
    strided = dataclasses.replace(params, padding="SAME", stride=2)
    with pytest.raises(convbn.ConvBNError, match=r"convbn.torch.ConvBN2d.from_params.*Received: padding='SAME', stride=\(2, 2\)"):
        convbn.to_torch(strided)
    with pytest.raises(convbn.ConvBNError, match=r"Received: padding=\(\(0, 1\), \(1, 1\)\)"):
        convbn.to_torch(dataclasses.replace(params, padding=((0, 1), (1, 1))))
    with pytest.raises(convbn.ConvBNError, match="unbiased batch variance.*Received: params.var_update='biased'"):
        convbn.to_torch(dataclasses.replace(params, var_update="biased"))
    with pytest.raises(TypeError, match="params must be a convbn.ConvBNParams"):
        convbn.to_torch({"kernel": params.kernel})


@pytest.mark.needs("torch")
def test_assign_torch_checks_geometry_and_sets_the_convention():
    import torch
    from torch import nn

    conv, bn = _torch_pair(padding=1)
    params = dataclasses.replace(convbn.from_torch(conv, bn), padding="SAME", eps=1e-3, momentum=0.99)
    target_conv = nn.Conv2d(3, 6, 3, padding=1, dtype=torch.float64)  # SAME at stride 1 is padding 1
    target_bn = nn.BatchNorm2d(6, dtype=torch.float64)
    target_bn.num_batches_tracked.fill_(7)
    adapters.assign_torch(target_conv, target_bn, params)
    assert torch.equal(target_conv.weight, conv.weight) and torch.equal(target_bn.running_var, bn.running_var)
    assert target_bn.eps == 1e-3 and target_bn.momentum == 0.01
    assert int(target_bn.num_batches_tracked) == 7
    with pytest.raises(convbn.ConvBNError, match=r"conv must have the geometry.*stride: params \(1, 1\), conv \(2, 2\)"):
        adapters.assign_torch(nn.Conv2d(3, 6, 3, 2, padding=1), nn.BatchNorm2d(6), params)
    with pytest.raises(convbn.ConvBNError, match=r"kernel_size: params \(3, 3\), conv \(5, 5\)"):
        adapters.assign_torch(nn.Conv2d(3, 6, 5, padding=2), nn.BatchNorm2d(6), params)
    with pytest.raises(convbn.ConvBNError, match="in_channels: params 3, conv 6"):
        adapters.assign_torch(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), params)
    with pytest.raises(convbn.ConvBNError, match="padding: params 'SAME', conv"):
        adapters.assign_torch(nn.Conv2d(3, 6, 3, padding=0), nn.BatchNorm2d(6), params)
    with pytest.raises(convbn.ConvBNError, match="conv has no bias, but the params' bias is not all 0"):
        adapters.assign_torch(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), params)
    zero_bias = dataclasses.replace(params, bias=np.zeros(6))
    adapters.assign_torch(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), zero_bias)


# -- Keras ------------------------------------------------------------------------------------------


def _keras():
    return need_module("keras")


def _keras_pair(keras, *, depthwise=False, dtype="float64", **bn_kwargs):
    rng = np.random.default_rng(0)
    if depthwise:
        conv = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, dtype=dtype)
        channels = 3
    else:
        conv = keras.layers.Conv2D(6, 3, strides=2, padding="same", groups=3, use_bias=True, dtype=dtype)
        channels = 6
    bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-4, dtype=dtype, **bn_kwargs)
    bn(conv(np.zeros((1, 9, 9, channels), dtype)))
    for w in conv.weights + bn.weights:
        w.assign(rng.uniform(0.5, 1.5, w.shape) if "variance" in w.name or "gamma" in w.name
                 else rng.standard_normal(w.shape))
    return conv, bn, channels


@pytest.mark.parametrize("depthwise", [False, True], ids=["grouped", "depthwise"])
def test_from_keras_computes_what_keras_computes(depthwise):
    keras = _keras()
    conv, bn, channels = _keras_pair(keras, depthwise=depthwise)
    params = convbn.from_keras(conv, bn)
    assert params.var_update == "biased" and params.momentum == 0.9 and params.eps == 1e-4
    assert params.groups == 3 and params.padding == "SAME" and params.stride == (2, 2)
    x = _x((4, 9, 9, channels))
    expected = keras.ops.convert_to_numpy(bn(conv(x), training=False))
    assert rel_err(convbn.conv_bn(x, params, backend="numpy"), expected) < TOL64
    y, new = convbn.conv_bn(x, params, True, backend="numpy")
    expected = keras.ops.convert_to_numpy(bn(conv(x), training=True))
    assert rel_err(y, expected) < TOL64
    assert rel_err(new.moving_mean, bn.moving_mean.numpy()) < TOL64
    assert rel_err(new.moving_var, bn.moving_variance.numpy()) < TOL64


def test_keras_round_trip_is_bit_for_bit_and_depthwise_loads_back():
    keras = _keras()
    conv, bn, _ = _keras_pair(keras, center=False)
    params = convbn.from_keras(conv, bn)
    assert params.beta is None and params.gamma is not None
    conv2, bn2 = convbn.to_keras(params)
    assert not bn2.center and bn2.scale and conv2.groups == 3 and bn2.momentum == 0.9
    for a, b in zip(conv.weights + bn.weights, conv2.weights + bn2.weights, strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = _x((2, 9, 9, 6))
    np.testing.assert_array_equal(bn(conv(x)).numpy(), bn2(conv2(x)).numpy())
    dw, dw_bn, _ = _keras_pair(keras, depthwise=True)
    p = convbn.from_keras(dw, dw_bn)
    target = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, dtype="float64")
    target_bn = keras.layers.BatchNormalization(dtype="float64")
    target_bn(target(np.zeros((1, 9, 9, 3))))
    adapters.assign_keras(target, target_bn, p)
    np.testing.assert_array_equal(target.kernel.numpy(), dw.kernel.numpy())
    assert target_bn.momentum == 0.9 and target_bn.epsilon == 1e-4


def test_keras_adapter_errors():
    keras = _keras()
    conv, bn, _ = _keras_pair(keras)
    params = convbn.from_keras(conv, bn)
    with pytest.raises(TypeError, match="conv must be a Keras 3 keras.layers.Conv2D"):
        convbn.from_keras(keras.layers.Dense(4), bn)
    with pytest.raises(convbn.ConvBNError, match="conv must be built"):
        convbn.from_keras(keras.layers.Conv2D(6, 3), bn)
    relu = keras.layers.Conv2D(6, 3, activation="relu")
    relu.build((None, 9, 9, 6))
    with pytest.raises(convbn.ConvBNError, match="Received: conv.activation='relu'"):
        convbn.from_keras(relu, bn)
    wrong_axis = keras.layers.BatchNormalization(axis=1)
    wrong_axis.build((None, 6, 5, 5))
    with pytest.raises(convbn.ConvBNError, match="bn.axis must be the conv's channel axis.*Received: bn.axis=1"):
        convbn.from_keras(conv, wrong_axis)
    with pytest.raises(convbn.ConvBNError, match="only 'same' and 'valid'.*Received: padding=\\(\\(1, 1\\), \\(1, 1\\)\\)"):
        convbn.to_keras(dataclasses.replace(params, padding=1, stride=2))
    with pytest.raises(convbn.ConvBNError, match="stride > 1 together with dilation > 1"):
        convbn.to_keras(dataclasses.replace(params, dilation=2))
    with pytest.raises(convbn.ConvBNError, match="biased batch variance.*Received: params.var_update='unbiased'"):
        convbn.to_keras(dataclasses.replace(params, var_update="unbiased"))
    with pytest.raises(convbn.ConvBNError, match=r"stride: params \(1, 1\), conv \(2, 2\)"):
        adapters.assign_keras(conv, bn, dataclasses.replace(params, stride=1))
    # Explicit padding equal to SAME at stride 1 is 'same'; at stride 2 only 'SAME' itself is.
    same1 = dataclasses.replace(params, stride=1, padding=((1, 1), (1, 1)))
    assert adapters.keras_padding(same1) == "same"


# -- torch -> Keras ---------------------------------------------------------------------------------


@pytest.mark.needs("torch")
def test_torch_modules_to_keras_convbn_keep_training_like_torch():
    """The docs' path: a torch Conv2d + BatchNorm2d becomes convbn.keras.ConvBN, which keeps torch's
    momentum and unbiased variance update, so one training step agrees with torch's."""
    keras = _keras()
    import torch

    from convbn.keras import ConvBN

    conv, bn = _torch_pair(padding=1)
    layer = ConvBN.from_params(convbn.from_torch(conv, bn), dtype="float64")
    assert layer.var_update == "unbiased" and layer.momentum == 0.9
    x = _x((4, 9, 9, 3))
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    with torch.no_grad():
        y_torch = bn.train()(conv(torch.from_numpy(x.transpose(0, 3, 1, 2)))).numpy().transpose(0, 2, 3, 1)
    assert rel_err(y, y_torch) < TOL64
    assert rel_err(layer.moving_variance.numpy(), bn.running_var.numpy()) < TOL64
    assert rel_err(layer.moving_mean.numpy(), bn.running_mean.numpy()) < TOL64


# -- Flax -------------------------------------------------------------------------------------------


def _flax():
    return need_module("flax.linen")


def _flax_pair(nn, *, use_scale=True, padding="SAME"):
    import jax
    import jax.numpy as jnp

    conv = nn.Conv(6, (3, 3), strides=2, padding=padding, param_dtype=jnp.float64)
    bn = nn.BatchNorm(momentum=0.9, epsilon=1e-4, use_scale=use_scale, use_fast_variance=False,
                      param_dtype=jnp.float64)
    cv = conv.init(jax.random.key(0), jnp.zeros((1, 9, 9, 3)))
    bv = bn.init(jax.random.key(1), jnp.zeros((1, 5, 5, 6)), use_running_average=True)
    rng = np.random.default_rng(0)
    bv = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape)), bv)
    return conv, bn, cv, bv


def test_from_flax_computes_what_flax_computes():
    nn = _flax()
    import jax.numpy as jnp

    conv, bn, cv, bv = _flax_pair(nn, padding=((0, 1), (1, 1)))
    params = convbn.from_flax(cv, bv, conv=conv, bn=bn)
    assert params.momentum == 0.9 and params.eps == 1e-4 and params.var_update == "biased"
    assert params.padding == ((0, 1), (1, 1)) and params.stride == (2, 2)
    x = jnp.asarray(_x())
    expected = bn.apply(bv, conv.apply(cv, x), use_running_average=True)
    assert rel_err(convbn.conv_bn(x, params), expected) < TOL64
    (y, new) = convbn.conv_bn(x, params, True)
    expected, updates = bn.apply(bv, conv.apply(cv, x), use_running_average=False, mutable=["batch_stats"])
    assert rel_err(y, expected) < TOL64
    assert rel_err(new.moving_var, updates["batch_stats"]["var"]) < TOL64
    assert rel_err(new.moving_mean, updates["batch_stats"]["mean"]) < TOL64


def test_flax_round_trip_and_settings():
    nn = _flax()
    import jax
    import jax.numpy as jnp

    conv, bn, cv, bv = _flax_pair(nn, use_scale=False)
    params = convbn.from_flax(cv, bv, conv=conv, bn=bn)
    assert params.gamma is None
    (conv2, cv2), (bn2, bv2) = convbn.to_flax(params)
    assert jax.tree_util.tree_structure(cv2) == jax.tree_util.tree_structure(cv)
    assert jax.tree_util.tree_structure(bv2) == jax.tree_util.tree_structure(bv)
    for a, b in zip(jax.tree_util.tree_leaves((cv, bv)), jax.tree_util.tree_leaves((cv2, bv2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (conv2.strides, bn2.momentum, bn2.epsilon, bn2.use_scale) == ((2, 2), 0.9, 1e-4, False)
    x = jnp.asarray(_x())
    np.testing.assert_array_equal(
        bn.apply(bv, conv.apply(cv, x), use_running_average=True),
        bn2.apply(bv2, conv2.apply(cv2, x), use_running_average=True),
    )
    # Without modules, the keywords or Flax's defaults apply; params-only dicts are accepted.
    plain = convbn.from_flax(cv["params"], bv, stride=2)
    assert (plain.stride, plain.eps, plain.momentum, plain.padding) == ((2, 2), 1e-5, 0.99, "SAME")


def test_from_flax_reads_nnx_modules():
    _flax()
    import jax.numpy as jnp
    from flax import nnx

    conv = nnx.Conv(3, 6, (3, 3), strides=2, padding="VALID", rngs=nnx.Rngs(0))
    bn = nnx.BatchNorm(6, momentum=0.8, use_bias=False, rngs=nnx.Rngs(0))
    bn.mean.set_value(jnp.arange(6.0))
    params = convbn.from_flax(conv, bn)
    assert (params.stride, params.padding, params.momentum, params.beta) == ((2, 2), "VALID", 0.8, None)
    np.testing.assert_array_equal(params.kernel, np.asarray(conv.kernel.get_value()))
    np.testing.assert_array_equal(params.moving_mean, np.arange(6.0))


def test_flax_adapter_errors():
    nn = _flax()
    conv, bn, cv, bv = _flax_pair(nn)
    with pytest.raises(convbn.ConvBNError, match="Received: stride=1, module's 2"):
        convbn.from_flax(cv, bv, conv=conv, stride=1)
    with pytest.raises(convbn.ConvBNError, match="not zero padding. Received: padding='CIRCULAR'"):
        convbn.from_flax(cv, bv, padding="CIRCULAR")
    with pytest.raises(convbn.ConvBNError, match="input dilation"):
        convbn.from_flax(cv, bv, conv=nn.Conv(6, (3, 3), input_dilation=2))
    with pytest.raises(convbn.ConvBNError, match="bn_vars\\['batch_stats'\\] must hold \\['mean', 'var'\\]"):
        convbn.from_flax(cv, {"params": bv["params"]})
    with pytest.raises(TypeError, match="conv_vars must be a mapping of variables. Received: conv_vars of type list"):
        convbn.from_flax([1], bv)
    with pytest.raises(convbn.ConvBNError, match="bn.axis must be -1"):
        convbn.from_flax(cv, bv, bn=nn.BatchNorm(axis=1))
    params = convbn.from_flax(cv, bv, conv=conv, bn=bn)
    with pytest.raises(convbn.ConvBNError, match="flax.linen.BatchNorm updates its moving variance with the biased"):
        convbn.to_flax(dataclasses.replace(params, var_update="unbiased"))
