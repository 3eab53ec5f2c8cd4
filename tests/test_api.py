"""Dispatch, conversion, fusion, tracing and error behaviour of the public API."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

import convbn
from convbn import dispatch, testing
from tests import reference
from tests._support.assertions import rel_err
from tests.cases import CASES, reference_params
from tests.conftest import need

CASE = next(c for c in CASES if c.name == "same_s2_even")


def _f32(params):
    return convbn.to_numpy(dataclasses.replace(
        params, **{k: v.astype(np.float32) for k, v in params.arrays().items()}))


# -- dispatch -------------------------------------------------------------------------------------

def test_torch_tensor_and_parameter_dispatch_to_torch():
    need("torch")
    import torch

    x, params = CASE.params()
    expected = reference.conv_bn(x, reference_params(params, CASE))
    for xt in (torch.from_numpy(x), torch.nn.Parameter(torch.from_numpy(x))):
        y = convbn.conv_bn(xt, params)
        assert isinstance(y, torch.Tensor)
        assert rel_err(y.detach().numpy(), expected) < 1e-9


def test_tf_tensor_and_variable_dispatch_to_tensorflow():
    need("tensorflow")
    import tensorflow as tf

    x, params = CASE.params()
    expected = reference.conv_bn(x, reference_params(params, CASE))
    for xt in (tf.constant(x), tf.Variable(x)):
        y = convbn.conv_bn(xt, params)
        assert isinstance(y, tf.Tensor)
        assert rel_err(y.numpy(), expected) < 1e-9


def test_jax_array_dispatches_to_jax():
    need("jax")
    import jax

    x, params = CASE.params()
    y = convbn.conv_bn(jax.numpy.asarray(x), params)
    assert isinstance(y, jax.Array)
    assert rel_err(np.asarray(y), reference.conv_bn(x, reference_params(params, CASE))) < 1e-9


def test_numpy_input_goes_to_named_backend_and_returns_numpy(backend, monkeypatch):
    x, params = CASE.params()
    calls = []
    module = dispatch.load_backend(backend)
    original = module.conv_bn
    monkeypatch.setattr(module, "conv_bn", lambda *a: calls.append(backend) or original(*a))
    y = convbn.conv_bn(x, params, backend=backend, device="cpu")
    assert calls == [backend]
    assert isinstance(y, np.ndarray)
    assert rel_err(y, reference.conv_bn(x, reference_params(params, CASE))) < 1e-9


def test_numpy_input_uses_env_var(monkeypatch):
    x, params = CASE.params()
    monkeypatch.setenv("CONVBN_BACKEND", "numpy")
    seen = []
    module = dispatch.load_backend("numpy")
    original = module.conv_bn
    monkeypatch.setattr(module, "conv_bn", lambda *a: seen.append(1) or original(*a))
    convbn.conv_bn(x, params)
    assert seen == [1]
    monkeypatch.setenv("CONVBN_BACKEND", "caffe")
    with pytest.raises(convbn.ConvBNError, match="CONVBN_BACKEND must be one of .* Received: CONVBN_BACKEND='caffe'"):
        convbn.conv_bn(x, params)


def test_auto_backend_follows_documented_order(monkeypatch):
    monkeypatch.delenv("CONVBN_BACKEND", raising=False)
    installed = {"torch": False, "jax": True, "tensorflow": True, "numpy": True}
    monkeypatch.setattr(dispatch, "is_installed", lambda name: installed[name])
    assert dispatch.auto_backend() == "jax"
    installed["jax"] = False
    assert dispatch.auto_backend() == "tensorflow"
    installed["tensorflow"] = False
    assert dispatch.auto_backend() == "numpy"
    installed["torch"] = True
    assert dispatch.auto_backend() == "torch"


def test_training_on_numpy_input_returns_numpy_params(backend):
    x, params = CASE.params()
    _y, new = convbn.conv_bn(x, params, training=True, backend=backend)
    _, mean_ref, var_ref = reference.conv_bn(x, reference_params(params, CASE), training=True)
    assert isinstance(new.moving_mean, np.ndarray) and isinstance(new.moving_var, np.ndarray)
    assert rel_err(new.moving_mean, mean_ref) < 1e-9
    assert rel_err(new.moving_var, var_ref) < 1e-9
    assert new.kernel is params.kernel and new.stride == params.stride


def test_missing_framework_names_the_extra(monkeypatch):
    monkeypatch.setattr(dispatch, "_modules", {})
    monkeypatch.setattr(dispatch, "is_installed", lambda name: name == "numpy")
    x, params = CASE.params()
    with pytest.raises(ImportError, match=r"pip install 'convbn\[torch\]'"):
        convbn.conv_bn(x, params, backend="torch")


def test_unsupported_input_type_is_a_type_error():
    _, params = CASE.params()
    with pytest.raises(TypeError, match="Received: x of type builtins.list"):
        convbn.conv_bn([[1.0]], params)
    with pytest.raises(TypeError, match="params must be a convbn.ConvBNParams"):
        convbn.conv_bn(np.zeros((1, 4, 4, 3)), {"kernel": 1})


def test_backend_mismatch_and_device_on_framework_input_are_errors():
    need("torch")
    import torch

    x, params = CASE.params()
    with pytest.raises(convbn.ConvBNError, match="backend must match x's framework"):
        convbn.conv_bn(torch.from_numpy(x), params, backend="jax")
    with pytest.raises(convbn.ConvBNError, match="device applies to NumPy input only"):
        convbn.conv_bn(torch.from_numpy(x), params, device="cpu")


def test_bad_device_names_the_device(backend):
    x, params = CASE.params()
    with pytest.raises(convbn.ConvBNError, match="Received: device='quantum'|runs on the CPU only"):
        convbn.conv_bn(x, params, backend=backend, device="quantum")


def test_import_leaves_frameworks_unimported():
    code = (
        "import sys, numpy as np, convbn\n"
        "p = convbn.ConvBNParams(kernel=np.ones((3,3,2,4)), moving_mean=np.zeros(4), moving_var=np.ones(4))\n"
        "y = convbn.conv_bn(np.ones((1,5,5,2)), p, backend='numpy')\n"
        "y2, _ = convbn.conv_bn(np.ones((2,5,5,2)), p, True, backend='numpy')\n"
        "w, b = convbn.fuse(p)\n"
        "from convbn import from_flax, from_keras, from_torch, to_flax, to_keras, to_torch\n"
        "from convbn import LoadError, LoadReport, load_into\n"
        "import convbn.adapters, convbn.loading\n"
        "assert convbn.loading.model_kind({'params': {}}) == 'flax'\n"
        "assert abs(y[0,2,2,0] - 18/np.sqrt(1.001)) < 1e-12, y[0,2,2,0]\n"
        "print(sorted(m for m in ('torch','tensorflow','jax','flax','keras','jaxlib') if m in sys.modules))\n"
    )
    env = {**os.environ, "CONVBN_BACKEND": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_tf_eager_call_runs_on_the_device_x_lives_on():
    """Eager TF places ops on its default device, not on their input's; conv_bn pins itself to x's.
    Two logical CPUs stand in for a CPU and a GPU (TF's default is the first)."""
    need("tensorflow")
    code = (
        "import numpy as np, tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "import convbn\n"
        "rng = np.random.default_rng(0)\n"
        "p = convbn.ConvBNParams(kernel=rng.normal(size=(3, 3, 2, 4)), moving_mean=rng.normal(size=4),\n"
        "                        moving_var=rng.uniform(0.5, 2, 4))\n"
        "xn = rng.normal(size=(2, 5, 5, 2))\n"
        "with tf.device('/CPU:1'):\n"
        "    x = tf.constant(xn)\n"
        "y = convbn.conv_bn(x, p)\n"
        "y2, new = convbn.conv_bn(x, p, training=True)\n"
        "ref = convbn.conv_bn(xn, p, backend='numpy')\n"
        "ref2, refnew = convbn.conv_bn(xn, p, training=True, backend='numpy')\n"
        "err = max(np.abs(y.numpy() - ref).max(), np.abs(y2.numpy() - ref2).max(),\n"
        "          np.abs(new.moving_var.numpy() - refnew.moving_var).max())\n"
        "print(y.device, y2.device, new.moving_var.device, err)\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    *devices, err = out.stdout.split()
    assert all(d.endswith("device:CPU:1") for d in devices), devices
    assert float(err) < 1e-12


def test_params_registered_with_jax_when_convbn_imported_first():
    need("jax")
    code = (
        "import numpy as np, convbn, importlib.util\n"
        "assert importlib.util.find_spec('jax') is not None\n"  # a lookup alone must not disarm the hook
        "import jax, jax.numpy as jnp\n"
        "p = convbn.ConvBNParams(kernel=np.ones((1,1,1,2)), moving_mean=np.zeros(2), moving_var=np.ones(2), eps=0.0)\n"
        "leaves = jax.tree_util.tree_leaves(p)\n"
        "print(len(leaves), float(jax.jit(lambda q: q.moving_var.sum())(p)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "2.0"]


# -- tracing and autodiff -------------------------------------------------------------------------

def test_jax_jit_and_grad_through_params():
    need("jax")
    import jax
    import jax.numpy as jnp

    x, params = CASE.params()
    jp = convbn.to_backend(params, "jax")
    expected = reference.conv_bn(x, reference_params(params, CASE), training=True)

    @jax.jit
    def step(p, xb):
        return convbn.conv_bn(xb, p, training=True)

    y, new = step(jp, jnp.asarray(x))
    assert rel_err(np.asarray(y), expected[0]) < 1e-9
    assert rel_err(np.asarray(new.moving_var), expected[2]) < 1e-9
    assert new.stride == params.stride and new.var_update == params.var_update

    dy = np.random.default_rng(3).standard_normal(expected[0].shape)
    grads = jax.grad(lambda p: jnp.sum(convbn.conv_bn(jnp.asarray(x), p) * dy))(jp)
    assert isinstance(grads, convbn.ConvBNParams)
    oracle = testing.gradients("numpy", x, params, dy)
    for name in ("kernel", "bias", "gamma", "beta"):
        assert rel_err(np.asarray(getattr(grads, name)), oracle[name]) < 1e-9


def test_jax_eager_calls_do_not_retrace():
    need("jax")
    import jax.numpy as jnp

    from convbn.backends import jax as jb

    x, params = CASE.params()
    jp = convbn.to_backend(params, "jax")
    convbn.conv_bn(jnp.asarray(x), jp)
    convbn.conv_bn(jnp.asarray(x), jp, training=True)

    def compiled():
        return jb._train_jit._cache_size() + jb._conv_bias._cache_size()

    before = compiled()
    for _ in range(3):
        convbn.conv_bn(jnp.asarray(x), jp)
        convbn.conv_bn(jnp.asarray(x), jp, training=True)
    assert compiled() == before


def test_tf_function_with_unknown_batch_and_gradient_tape():
    need("tensorflow")
    import tensorflow as tf

    x, params = CASE.params()
    tp = convbn.to_backend(params, "tensorflow")
    expected = reference.conv_bn(x, reference_params(params, CASE), training=True)
    traces = []

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float64)])
    def step(xb):
        traces.append(1)
        y, new = convbn.conv_bn(xb, tp, training=True)
        return y, new.moving_mean, new.moving_var

    y, mean, var = step(tf.constant(x))
    step(tf.constant(x[:1]))
    assert len(traces) == 1
    assert rel_err(y.numpy(), expected[0]) < 1e-9
    assert rel_err(mean.numpy(), expected[1]) < 1e-9
    assert rel_err(var.numpy(), expected[2]) < 1e-9

    eval_fn = tf.function(lambda xb: convbn.conv_bn(xb, tp))
    assert rel_err(eval_fn(tf.constant(x)).numpy(), reference.conv_bn(x, reference_params(params, CASE))) < 1e-9


def test_torch_eval_cache_follows_in_place_updates():
    need("torch")
    import torch

    x, params = CASE.params()
    tp = convbn.to_backend(params, "torch")
    xt = torch.from_numpy(x)
    convbn.conv_bn(xt, tp)
    with torch.no_grad():
        tp.gamma.mul_(2.0)  # an optimizer step on the same tensor
    assert np.all(params.gamma * 2.0 == tp.gamma.numpy())  # to_backend copied: the source is untouched
    doubled = dataclasses.replace(params, gamma=params.gamma * 2.0)
    assert rel_err(convbn.conv_bn(xt, tp).numpy(), reference.conv_bn(x, reference_params(doubled, CASE))) < 1e-9


def test_torch_eval_gradient_flows_to_params():
    need("torch")
    import torch

    x, params = CASE.params()
    tp = convbn.to_backend(params, "torch")
    gamma = tp.gamma.clone().requires_grad_(True)
    p = dataclasses.replace(tp, gamma=gamma)
    dy = np.random.default_rng(4).standard_normal((2, 4, 4, 4))
    for _ in range(2):  # a second call must not reuse the first call's graph
        gamma.grad = None
        (convbn.conv_bn(torch.from_numpy(x), p) * torch.from_numpy(dy)).sum().backward()
    assert rel_err(gamma.grad.numpy(), testing.gradients("numpy", x, params, dy)["gamma"]) < 1e-9


def test_nothing_is_mutated_in_place(backend):
    x, params = CASE.params()
    before = {k: v.copy() for k, v in params.arrays().items()}
    x_before = x.copy()
    convbn.conv_bn(x, params, training=True, backend=backend)
    convbn.conv_bn(x, params, training=False, backend=backend)
    for k, v in params.arrays().items():
        np.testing.assert_array_equal(v, before[k])
    np.testing.assert_array_equal(x, x_before)


def test_zero_size_batch(backend):
    """3 -> 4 channels at stride 2: the empty output's shape is the geometry's, in both layouts,
    never a framework kernel's (TF's oneDNN conv keeps the input's channel count)."""
    x, params = CASE.params()
    assert x.shape[3] != params.kernel.shape[3]
    for fmt, xs in (("NHWC", x), ("NCHW", x.transpose(0, 3, 1, 2))):
        want = reference.conv_bn(x, reference_params(params, CASE))[:0]
        want = want if fmt == "NHWC" else want.transpose(0, 3, 1, 2)
        y = convbn.conv_bn(xs[:0], params, backend=backend, data_format=fmt)
        assert y.shape == want.shape and y.dtype == x.dtype
        y, new = convbn.conv_bn(xs[:0], params, training=True, backend=backend, data_format=fmt)
        assert y.shape == want.shape and y.dtype == x.dtype
        np.testing.assert_array_equal(new.moving_mean, params.moving_mean)
        np.testing.assert_array_equal(new.moving_var, params.moving_var)


def test_zero_size_batch_keeps_the_autograd_graph():
    need("torch")
    import torch

    x, params = CASE.params()
    xt = torch.from_numpy(x[:0]).requires_grad_(True)
    y, _ = convbn.conv_bn(xt, params, training=True)
    (y.sum() + 1).backward()
    assert xt.grad is not None and xt.grad.shape == xt.shape


def test_non_contiguous_input(backend):
    x, params = CASE.params()
    wide = np.repeat(x, 2, axis=2)[:, :, ::2]  # a strided view equal to x
    assert not wide.flags.c_contiguous
    np.testing.assert_array_equal(wide, x)
    y = testing.run(backend, wide, params)[0]
    assert rel_err(y, reference.conv_bn(x, reference_params(params, CASE))) < 1e-9


# -- fuse, to_backend, conventions ----------------------------------------------------------------

@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("groups", "slim_style", "depthwise_mult")],
                         ids=lambda c: c.name)
def test_fuse_matches_eval(backend, case):
    x, params = case.params()
    native = convbn.to_backend(params, backend)
    w, b = convbn.fuse(native)
    module = dispatch.load_backend(backend)
    assert type(w) is type(module.asarray(np.zeros(1)))
    w, b = module.to_numpy(w), module.to_numpy(b)
    scale = (params.gamma if params.gamma is not None else 1.0) / np.sqrt(params.moving_var + params.eps)
    np.testing.assert_allclose(w, params.kernel * scale, rtol=1e-12)
    y = reference.conv(x, w, case.stride, case.padding, case.dilation, case.groups) + b
    assert rel_err(y, reference.conv_bn(x, reference_params(params, case))) < 1e-9


def test_to_backend_round_trip_is_exact(backend):
    _, params = CASE.params()
    back = convbn.to_numpy(convbn.to_backend(params, backend))
    for k, v in params.arrays().items():
        np.testing.assert_array_equal(getattr(back, k), v)
    assert back.static_config() == params.static_config()


def test_conventions_translate_momentum():
    from convbn import conventions

    assert conventions.TORCH.momentum == pytest.approx(0.9)
    assert conventions.TORCH.momentum_from_native(0.1) == pytest.approx(0.9)
    assert conventions.TORCH.momentum_to_native(0.99) == pytest.approx(0.01)
    assert conventions.KERAS3.momentum_from_native(0.99) == 0.99
    assert conventions.get("pytorch") is conventions.TORCH
    assert conventions.get("tf-slim").has_gamma is False
    assert (conventions.FLAX.var_update, conventions.KERAS3.var_update) == ("biased", "biased")
    assert {c.var_update for c in (conventions.TORCH, conventions.SLIM, conventions.KERAS2_FUSED,
                                   conventions.TF_V1_LAYERS)} == {"unbiased"}
    with pytest.raises(convbn.ConvBNError, match="Received: convention='caffe'"):
        conventions.get("caffe")
    p = conventions.TORCH.params(np.ones((3, 3, 2, 4), np.float32))
    np.testing.assert_array_equal(p.moving_var, np.ones(4, np.float32))
    assert (p.eps, p.momentum, p.var_update) == (1e-5, 0.9, "unbiased")


def test_torch_convention_training_matches_torch_batchnorm():
    """momentum=0.9 kept + unbiased is exactly torch's BatchNorm2d(momentum=0.1)."""
    need("torch")
    import torch

    from convbn import conventions

    x, params = CASE.params(bias=None) if False else CASE.params()
    params = conventions.TORCH.apply(params)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=0, bias=True).double()
    bn = torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(params.kernel).permute(3, 2, 0, 1))
        conv.bias.copy_(torch.from_numpy(params.bias))
        bn.weight.copy_(torch.from_numpy(params.gamma))
        bn.bias.copy_(torch.from_numpy(params.beta))
        bn.running_mean.copy_(torch.from_numpy(params.moving_mean))
        bn.running_var.copy_(torch.from_numpy(params.moving_var))
    xt = torch.nn.functional.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (0, 1, 0, 1))  # TF SAME, s=2, n=8
    y_native = bn.train()(conv(xt)).permute(0, 2, 3, 1).detach().numpy()
    y, new = convbn.conv_bn(x, params, training=True, backend="torch")
    assert rel_err(y, y_native) < 1e-12
    assert rel_err(new.moving_mean, bn.running_mean.numpy()) < 1e-12
    assert rel_err(new.moving_var, bn.running_var.numpy()) < 1e-12


# -- errors ---------------------------------------------------------------------------------------

def _params(**kw):
    base = dict(kernel=np.ones((3, 3, 3, 4)), moving_mean=np.zeros(4), moving_var=np.ones(4))
    base.update(kw)
    return convbn.ConvBNParams(**base)


def test_channel_mismatch_names_counts_and_format():
    with pytest.raises(convbn.ConvBNError) as err:
        convbn.conv_bn(np.zeros((2, 8, 8, 2)), _params(), backend="numpy")
    assert str(err.value) == (
        "x has 2 channels but the kernel expects 3. Received: x.shape=(2, 8, 8, 2) (data_format='NHWC')"
    )
    with pytest.raises(convbn.ConvBNError, match=r"x has 8 channels .*data_format='NCHW'"):
        convbn.conv_bn(np.zeros((2, 8, 8, 3)), _params(), data_format="NCHW", backend="numpy")


def test_wrong_rank_and_data_format():
    with pytest.raises(convbn.ConvBNError, match=r"x must be 4-D \(N, H, W, C\).*Received: x.shape=\(8, 8, 3\)"):
        convbn.conv_bn(np.zeros((8, 8, 3)), _params(), backend="numpy")
    with pytest.raises(convbn.ConvBNError, match="data_format must be 'NHWC' or 'NCHW'. Received: data_format='NWHC'"):
        convbn.conv_bn(np.zeros((1, 8, 8, 3)), _params(), data_format="NWHC", backend="numpy")


def test_groups_that_do_not_divide():
    with pytest.raises(convbn.ConvBNError, match=r"groups must divide the kernel's out_channels. Received: groups=3"):
        _params(kernel=np.ones((3, 3, 1, 4)), groups=3)
    with pytest.raises(convbn.ConvBNError, match="groups must be a positive int. Received: groups=0"):
        _params(groups=0)
    with pytest.raises(convbn.ConvBNError, match=r"x has 5 channels but the kernel expects 6 \(3 per group x groups=2\)"):
        convbn.conv_bn(np.zeros((1, 5, 5, 5)), _params(kernel=np.ones((3, 3, 3, 4)), groups=2), backend="numpy")


@pytest.mark.parametrize("padding", ["FULL", -1, (1, 2, 3), ((1, 2), (3,)), 1.5, ((0, -1), (0, 0))])
def test_bad_padding_spec(padding):
    with pytest.raises(convbn.ConvBNError, match=r"padding must be 'SAME', 'VALID'.*Received: padding="):
        _params(padding=padding)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("stride", 0, "stride must be >= 1. Received: stride=0"),
    ("stride", (1, 2, 3), "stride must be an int or a pair of ints. Received: stride=(1, 2, 3)"),
    ("dilation", "2", "dilation must be an int or a pair of ints. Received: dilation='2'"),
    ("eps", -1e-3, "eps must be a finite number >= 0. Received: eps=-0.001"),
    ("momentum", 1.5, "momentum is the fraction of the old moving value kept"),
    ("var_update", "n-1", "var_update must be 'unbiased' or 'biased'. Received: var_update='n-1'"),
])
def test_bad_static_fields(field, value, message):
    with pytest.raises(convbn.ConvBNError) as err:
        _params(**{field: value})
    assert message in str(err.value)


def test_mismatched_stat_lengths_and_kernel_rank():
    with pytest.raises(convbn.ConvBNError, match=r"moving_var must have shape \(out_channels,\) = \(4,\).*Received: moving_var.shape=\(3,\)"):
        _params(moving_var=np.ones(3))
    with pytest.raises(convbn.ConvBNError, match=r"gamma must have shape .*Received: gamma.shape=\(4, 1\)"):
        _params(gamma=np.ones((4, 1)))
    with pytest.raises(convbn.ConvBNError, match=r"kernel must be 4-D HWIO.*Received: kernel.shape=\(3, 3, 4\)"):
        _params(kernel=np.ones((3, 3, 4)))
    with pytest.raises(convbn.ConvBNError, match="moving_mean is required"):
        _params(moving_mean=None)


def test_input_smaller_than_kernel():
    with pytest.raises(convbn.ConvBNError, match=r"padded input must be at least as large as the dilated kernel along H: 2 \+ 0 \+ 0 < 5"):
        convbn.conv_bn(np.zeros((1, 2, 8, 3)), _params(padding="VALID", dilation=2), backend="numpy")


def test_one_value_per_channel_in_training_is_a_clear_error(backend):
    p = _params(padding="VALID")
    with pytest.raises(convbn.ConvBNError, match=r"more than one value per channel.*Received: x.shape=\(1, 3, 3, 3\)"):
        convbn.conv_bn(np.ones((1, 3, 3, 3)), p, training=True, backend=backend)
    # eval with the same single value is fine
    y = convbn.conv_bn(np.ones((1, 3, 3, 3)), p, backend=backend)
    np.testing.assert_allclose(y, np.full((1, 1, 1, 4), 27 / np.sqrt(1 + 1e-3)), rtol=1e-6)


@pytest.mark.parametrize("native", [0.1, 0.01, 0.001, 0.03, 0.3, 0.0, 1.0])
def test_torch_momentum_round_trips_exactly(native):
    from convbn import conventions

    kept = conventions.torch_momentum_to_kept(native)
    assert abs(kept - (1.0 - native)) <= 1e-16
    assert conventions.kept_to_torch_momentum(kept) == native


def test_torch_momentum_without_a_short_decimal_is_left_alone():
    from convbn import conventions

    odd = 0.1234567890123456789
    assert conventions.kept_to_torch_momentum(conventions.torch_momentum_to_kept(odd)) == pytest.approx(odd, abs=1e-16)


def test_jax_without_x64_warns_and_keeps_float64_dtypes():
    """NumPy float64 through JAX with jax_enable_x64 off is computed in float32: the results come
    back in the caller's dtypes, at float32 accuracy, with a warning that says how to get float64."""
    need("jax")
    import jax

    x, params = CASE.params()
    expected = reference.conv_bn(x, reference_params(params, CASE), True)
    with jax.enable_x64(False):
        with pytest.warns(RuntimeWarning, match="jax_enable_x64"):
            y, new = convbn.conv_bn(x, params, training=True, backend="jax")
        with pytest.warns(RuntimeWarning, match="float32 precision"):
            y_eval = convbn.conv_bn(x, params, backend="jax")
    assert y.dtype == y_eval.dtype == new.moving_mean.dtype == new.moving_var.dtype == np.float64
    # float32 accuracy, not float64's: the computation really ran in float32.
    assert 1e-9 < rel_err(y, expected[0]) < 1e-5
    assert rel_err(new.moving_var, expected[2]) < 1e-5
    assert rel_err(y_eval, reference.conv_bn(x, reference_params(params, CASE))) < 1e-5
    # The same params object back under x64: converted anew, float64 accuracy again.
    assert rel_err(convbn.conv_bn(x, params, backend="jax"), reference.conv_bn(x, reference_params(params, CASE))) < 1e-12

