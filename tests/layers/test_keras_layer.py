"""convbn.keras.ConvBN: against Keras's own Conv2D + BatchNormalization, conv_bn and the reference.

In-process tests run on Keras's TensorFlow backend; the JAX and torch Keras backends run the main
checks in subprocesses, since a Keras backend is fixed when Keras is first imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import convbn
from tests import reference
from tests._support.assertions import rel_err
from tests.cases import CASES, reference_params, to_layout
from tests.conftest import need, need_module

# Float64: only summation order differs (<= 1e-15 measured). Float32: Keras's unfolded BatchNorm vs
# convbn's folded eval and fused training kernels, measured <= 1e-7 relative on all three Keras
# backends (SEMANTICS.md: Keras backends agree within 1.9e-6 absolute at |y| ~ 5); 5e-6 leaves
# headroom. Mixed float16: SEMANTICS.md measured 2.5e-3 to 3.3e-3 absolute at |y| ~ 5 for fp16.
TOL64 = 1e-12
TOL32 = 5e-6
TOL16 = 5e-3

LAYER_CASES = [c for c in CASES if c.name in (
    "same_s2_even", "explicit_asym", "dilation_stride_same", "depthwise", "slim_style",
)]


def _keras():
    return need_module("keras")


def _x(shape=(4, 9, 9, 3), dtype="float64"):
    return (np.random.default_rng(1).standard_normal(shape) + 0.5).astype(dtype)


def _pair(keras, dtype="float64", **kwargs):
    """A built ConvBN and a Conv2D + BatchNormalization holding the same random weights."""
    from convbn.keras import ConvBN

    args = dict(filters=6, kernel_size=3, strides=2, padding="same", use_bias=True, momentum=0.9, epsilon=1e-4)
    args.update(kwargs)
    layer = ConvBN(**args, dtype=dtype)
    layer.build((None, 9, 9, 3))
    rng = np.random.default_rng(0)
    for w in layer.weights:
        w.assign(rng.uniform(0.5, 1.5, w.shape) if w.name in ("gamma", "moving_variance") else rng.standard_normal(w.shape))
    conv = keras.layers.Conv2D(6, 3, strides=args["strides"], padding="same", use_bias=True, dtype=dtype)
    bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-4, dtype=dtype, scale=args.get("scale", True),
                                         center=args.get("center", True))
    bn(conv(np.zeros((1, 9, 9, 3), dtype)))
    for target, source in zip(conv.weights + bn.weights, layer.weights, strict=True):
        target.assign(source.numpy())
    return layer, conv, bn


def test_weights_have_keras_names_and_order():
    keras = _keras()
    layer, conv, bn = _pair(keras)
    assert [w.name for w in layer.weights] == ["kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance"]
    assert [w.name for w in layer.trainable_weights] == ["kernel", "bias", "gamma", "beta"]
    assert [w.name for w in conv.weights + bn.weights] == [w.name for w in layer.weights]


def test_training_matches_batchnormalization_including_gradients():
    keras = _keras()
    import tensorflow as tf

    layer, conv, bn = _pair(keras)
    x = tf.constant(_x())
    dy = tf.constant(np.random.default_rng(2).standard_normal((4, 5, 5, 6)))
    for step in range(3):
        xs = x * (step + 1)
        with tf.GradientTape(persistent=True) as tape:
            y = layer(xs, training=True)
            y_ref = bn(conv(xs), training=True)
            loss, loss_ref = tf.reduce_sum(y * dy), tf.reduce_sum(y_ref * dy)
        assert rel_err(y.numpy(), y_ref.numpy()) < TOL64
        assert rel_err(layer.moving_mean.numpy(), bn.moving_mean.numpy()) < TOL64
        assert rel_err(layer.moving_variance.numpy(), bn.moving_variance.numpy()) < TOL64
        grads = tape.gradient(loss, layer.trainable_weights)
        grads_ref = tape.gradient(loss_ref, conv.trainable_weights + bn.trainable_weights)
        for g, g_ref, w in zip(grads, grads_ref, layer.trainable_weights, strict=True):
            # The conv bias cancels in training mode: its gradient is rounding noise (~1e-15).
            assert rel_err(g.numpy(), g_ref.numpy()) < (1e-9 if w.name == "bias" else TOL64), w.name
    assert rel_err(layer(x).numpy(), bn(conv(x)).numpy()) < TOL64


def test_training_flag_and_trainable_false_follow_batchnormalization():
    keras = _keras()
    layer, conv, bn = _pair(keras)
    x = _x()
    eval_y = keras.ops.convert_to_numpy(layer(x))
    before = layer.moving_mean.numpy().copy()
    assert np.array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), eval_y)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), before)  # training=None: inference
    layer.trainable = False
    bn.trainable = False
    frozen = keras.ops.convert_to_numpy(layer(x, training=True))
    np.testing.assert_array_equal(frozen, eval_y)  # trainable=False: inference even in training
    np.testing.assert_array_equal(layer.moving_mean.numpy(), before)
    assert rel_err(frozen, keras.ops.convert_to_numpy(bn(conv(x), training=True))) < TOL64
    layer.trainable = True
    assert rel_err(keras.ops.convert_to_numpy(layer(x, training=True)), eval_y) > 1e-2


def test_output_is_exactly_conv_bn_of_its_params():
    keras = _keras()
    layer, _, _ = _pair(keras, dtype="float32")
    x = keras.ops.convert_to_tensor(_x(dtype="float32"))
    params = layer.params()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x)), keras.ops.convert_to_numpy(convbn.conv_bn(x, params)))
    y, new = convbn.conv_bn(x, params, True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=True)), keras.ops.convert_to_numpy(y))
    np.testing.assert_array_equal(layer.moving_variance.numpy(), keras.ops.convert_to_numpy(new.moving_var))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_geometry_matches_the_reference(case, data_format):
    keras = _keras()
    from convbn.keras import ConvBN

    x, params = case.params(momentum=0.8, var_update="biased")
    layer = ConvBN.from_params(params, data_format=data_format)
    assert layer.dtype == "float64"
    layout = "NHWC" if data_format == "channels_last" else "NCHW"
    xl = to_layout(x, layout)
    y_eval = keras.ops.convert_to_numpy(layer(xl))
    assert rel_err(y_eval, to_layout(reference.conv_bn(x, reference_params(params, case)), layout)) < TOL64
    y, mean, var = reference.conv_bn(x, reference_params(params, case), training=True)
    assert rel_err(keras.ops.convert_to_numpy(layer(xl, training=True)), to_layout(y, layout)) < TOL64
    assert rel_err(layer.moving_mean.numpy(), mean) < TOL64
    assert rel_err(layer.moving_variance.numpy(), var) < TOL64
    shape = layer.compute_output_shape((None, *xl.shape[1:]))
    assert shape == (None, *y_eval.shape[1:])


def test_unbiased_update_follows_torch():
    keras = _keras()
    layer, _, _ = _pair(keras, var_update="unbiased")
    p = layer.params()
    x = _x()
    layer(x, training=True)
    _, mean, var = reference.conv_bn(x, {**reference_params(p, CASES[0]), "stride": 2, "padding": "SAME",
                                         "dilation": 1, "groups": 1}, training=True)
    assert rel_err(layer.moving_variance.numpy(), var) < TOL64
    assert rel_err(layer.moving_mean.numpy(), mean) < TOL64


def test_fit_updates_moving_statistics_like_conv_bn():
    keras = _keras()
    layer, _, _ = _pair(keras, dtype="float32")
    start = layer.params()
    model = keras.Sequential([keras.Input((9, 9, 3)), layer])
    model.compile(keras.optimizers.SGD(learning_rate=0.0), "mse")  # weights stay; statistics move
    x = _x(dtype="float32")
    model.fit(x, np.zeros((4, 5, 5, 6), "float32"), batch_size=4, epochs=1, verbose=0, shuffle=False)
    _, expected = convbn.conv_bn(x, start, True, backend="numpy")
    assert rel_err(layer.moving_mean.numpy(), expected.moving_mean) < TOL32
    assert rel_err(layer.moving_variance.numpy(), expected.moving_var) < TOL32
    np.testing.assert_array_equal(layer.kernel.numpy(), start.kernel)


def test_keras_file_round_trip(tmp_path):
    keras = _keras()
    from convbn.keras import ConvBN

    model = keras.Sequential([
        keras.Input((9, 9, 3)),
        ConvBN(8, 3, strides=2, padding=((0, 1), (1, 0)), kernel_regularizer=keras.regularizers.L2(1e-4), name="a"),
        keras.layers.ReLU(),
        ConvBN(4, (1, 3), var_update="unbiased", momentum=0.9, epsilon=1e-5, center=False, use_bias=True, name="b"),
    ])
    x = _x(dtype="float32")
    model(x, training=True)  # moved statistics must survive the round trip too
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.layers[0]) is ConvBN
    for a, b in zip(model.layers, loaded.layers, strict=True):
        assert a.get_config() == b.get_config()
        for wa, wb in zip(a.weights, b.weights, strict=True):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(wa), keras.ops.convert_to_numpy(wb))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), keras.ops.convert_to_numpy(loaded(x)))
    assert loaded.layers[2].var_update == "unbiased" and loaded.layers[0].padding == [[0, 1], [1, 0]]
    clone = ConvBN.from_config(model.layers[0].get_config())
    assert clone.get_config() == model.layers[0].get_config()


def test_params_and_from_params_round_trip_bit_for_bit():
    keras = _keras()
    from convbn.keras import ConvBN

    layer, _, _ = _pair(keras, scale=False)
    params = layer.params()
    assert params.gamma is None and params.momentum == 0.9 and params.var_update == "biased"
    clone = ConvBN.from_params(params)
    assert [w.name for w in clone.weights] == [w.name for w in layer.weights]
    for a, b in zip(layer.weights, clone.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = _x()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x)), keras.ops.convert_to_numpy(clone(x)))


def test_mixed_precision_stays_close_to_float32():
    keras = _keras()
    from convbn.keras import ConvBN

    layer, _, _ = _pair(keras, dtype="float32")
    half = ConvBN.from_params(layer.params(), dtype="mixed_float16")
    assert half.kernel.dtype == "float32"
    x = _x(dtype="float32")
    y16 = keras.ops.convert_to_numpy(half(x, training=True))
    assert y16.dtype == np.float16
    assert rel_err(y16, keras.ops.convert_to_numpy(layer(x, training=True))) < TOL16
    assert rel_err(half.moving_variance.numpy(), layer.moving_variance.numpy()) < TOL16


def test_regularizers_add_their_losses():
    keras = _keras()
    layer, _, _ = _pair(keras, kernel_regularizer=keras.regularizers.L2(0.5))
    layer(_x())
    (loss,) = layer.losses
    assert rel_err(keras.ops.convert_to_numpy(loss), 0.5 * np.sum(layer.kernel.numpy() ** 2)) < 1e-6


def test_errors_name_the_argument():
    _keras()
    from convbn.keras import ConvBN

    with pytest.raises(convbn.ConvBNError, match="groups must be a positive int dividing filters. Received: groups=4, filters=6"):
        ConvBN(6, 3, groups=4)
    with pytest.raises(convbn.ConvBNError, match="Received: padding='full'"):
        ConvBN(6, 3, padding="full")
    with pytest.raises(convbn.ConvBNError, match="Received: data_format='NHWC'"):
        ConvBN(6, 3, data_format="NHWC")
    with pytest.raises(convbn.ConvBNError, match="groups must divide the input channels.*Received: groups=2"):
        ConvBN(6, 3, groups=2).build((None, 8, 8, 3))
    with pytest.raises(convbn.ConvBNError, match="channel dimension of the input must be known"):
        ConvBN(6, 3).build((None, 8, 8, None))
    with pytest.raises(convbn.ConvBNError, match="must be built before its params exist"):
        ConvBN(6, 3).params()


_SUBPROCESS_CHECKS = textwrap.dedent('''
    import json, os, sys, tempfile
    import numpy as np
    import keras, convbn
    from convbn.keras import ConvBN

    assert keras.backend.backend() == os.environ["KERAS_BACKEND"]
    from tests._support.assertions import rel_err as rel
    def npy(t):
        return keras.ops.convert_to_numpy(t)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 9, 9, 3)) + 0.5).astype("float32")
    layer = ConvBN(6, 3, strides=2, use_bias=True, momentum=0.9, epsilon=1e-4)
    layer.build(x.shape)
    for w in layer.weights:
        w.assign(rng.uniform(0.5, 1.5, w.shape) if w.name in ("gamma", "moving_variance") else rng.standard_normal(w.shape))
    conv = keras.layers.Conv2D(6, 3, strides=2, padding="same")
    bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-4)
    bn(conv(x[:1]))
    for target, source in zip(conv.weights + bn.weights, layer.weights):
        target.assign(npy(source))
    out = {"backend": keras.backend.backend(), "train_y": 0.0, "train_mean": 0.0, "train_var": 0.0}
    for step in range(2):
        y, y_ref = layer(x, training=True), bn(conv(x), training=True)
        out["train_y"] = max(out["train_y"], rel(npy(y), npy(y_ref)))
        out["train_mean"] = max(out["train_mean"], rel(npy(layer.moving_mean), npy(bn.moving_mean)))
        out["train_var"] = max(out["train_var"], rel(npy(layer.moving_variance), npy(bn.moving_variance)))
    out["eval_y"] = rel(npy(layer(x)), npy(bn(conv(x))))
    xt = keras.ops.convert_to_tensor(x)
    out["exact_conv_bn"] = bool(np.array_equal(npy(layer(xt)), npy(convbn.conv_bn(xt, layer.params()))))
    layer.trainable = False
    out["frozen_is_eval"] = bool(np.array_equal(npy(layer(x, training=True)), npy(layer(x))))
    layer.trainable = True
    model = keras.Sequential([keras.Input((9, 9, 3)), layer, keras.layers.ReLU(),
                              ConvBN(4, 3, dilation_rate=2, strides=2, var_update="unbiased")])
    start = layer.params()
    model.compile(keras.optimizers.SGD(learning_rate=0.0), "mse")
    model.fit(x, np.zeros((4, 3, 3, 4), "float32"), batch_size=4, epochs=1, verbose=0, shuffle=False)
    _, expected = convbn.conv_bn(x, start, True, backend="numpy")
    out["fit_mean"] = rel(npy(layer.moving_mean), expected.moving_mean)
    out["fit_var"] = rel(npy(layer.moving_variance), expected.moving_var)
    path = os.path.join(tempfile.mkdtemp(), "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    out["file_round_trip"] = bool(np.array_equal(npy(model(x)), npy(loaded(x))))
    print(json.dumps(out))
''')


@pytest.mark.slow
@pytest.mark.parametrize("keras_backend", ["jax", "torch"])
def test_other_keras_backends_in_a_subprocess(keras_backend):
    """The same layer on Keras's JAX and torch backends: BatchNormalization's numbers in training
    and eval, exactly conv_bn's, trainable=False, fit, and the .keras round trip."""
    need(keras_backend, "keras")
    env = {**os.environ, "KERAS_BACKEND": keras_backend, "CUDA_VISIBLE_DEVICES": ""}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", _SUBPROCESS_CHECKS], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["backend"] == keras_backend
    for key in ("train_y", "train_mean", "train_var", "eval_y", "fit_mean", "fit_var"):
        assert out[key] < TOL32, (key, out[key])
    assert out["exact_conv_bn"] and out["frozen_is_eval"] and out["file_round_trip"], out
