"""Real TF1 / tf-slim / Keras graphs that write the checkpoints the slim-format tests read.

Each builder trains a few steps, saves with the framework's own saver (plus the ``.meta`` graph for
TF1), then rebuilds the graph in inference mode, restores it and records, per conv+BatchNorm layer,
the layer's input and the BatchNorm's output (before any activation): the oracle the tests compare
``convbn.conv_bn`` against.

``tf.compat.v1.layers`` needs ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported, so
``python -m tests.formats.slim_graphs v1 OUTDIR`` builds that one in a fresh process and stores its
oracle in ``OUTDIR/outputs.npz``. Nothing here imports TensorFlow at import time.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

SEED = 0


def need_slim() -> None:
    """Skip unless TensorFlow is under test and tf-slim (with tf_keras behind its batch_norm) is installed."""
    from tests.conftest import need

    need("tensorflow", "tf_slim", "tf_keras")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no POSIX locks: each worker builds its own copy
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shared_build(factory: Any, name: str, build: Callable[[Path], Any]) -> Any:
    """``build(directory)`` once per test session, across xdist workers; its (pickled) result.

    ``factory`` is pytest's ``tmp_path_factory``. Tests only read what was built (tests that damage
    files work on copies).
    """
    root = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by all workers of this run
    directory = root / f"slim-{name}"
    with _locked(root / f"slim-{name}.lock"):
        done = directory / "result.pickle"
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            result = build(directory)
            with open(directory / "result.tmp", "wb") as f:
                pickle.dump(result, f)
            os.replace(directory / "result.tmp", done)
        with open(done, "rb") as f:
            return pickle.load(f)  # written by this test run just above


def import_slim() -> Any:
    """tf_slim with the two shims it needs under TF 2.21 (see SEMANTICS.md, trap 6)."""
    import tensorflow as tf
    import tf_keras.src.legacy_tf_layers as legacy_layers
    from tensorflow.python.framework import ops

    sys.modules.setdefault("tf_keras.legacy_tf_layers", legacy_layers)
    ops.Tensor = tf.Tensor
    import tf_slim

    return tf_slim


def randomize(sess: Any, tf1: Any, rng: np.random.Generator, conv_scale: float = 0.3) -> None:
    """Non-trivial values for every model variable (moving stats included), before training."""
    trainable = {v.op.name for v in tf1.trainable_variables()}
    for var in tf1.global_variables():
        name, shape = var.op.name, var.shape.as_list()
        if name not in trainable and not name.endswith(("moving_mean", "moving_variance")):
            continue  # optimizer slots, EMA shadows, counters
        if name.endswith("moving_variance"):
            value = rng.uniform(0.5, 2.0, shape)
        elif name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("moving_mean", "beta", "biases", "bias")):
            value = rng.standard_normal(shape) * 0.5
        elif len(shape) >= 2:
            fan_in = int(np.prod(shape[:-1])) if len(shape) == 4 else shape[0]
            value = rng.standard_normal(shape) * conv_scale / np.sqrt(fan_in) * 3
        else:
            continue
        var.load(value.astype(var.dtype.base_dtype.as_numpy_dtype), sess)


# -- tf-slim -------------------------------------------------------------------------------------

# scope, kind, outputs, kernel, stride, padding, rate, scale (gamma)
SLIM_LAYERS = [
    ("conv1", "conv", 8, 3, 1, "SAME", 1, False),
    ("conv10", "conv", 16, 3, 2, "SAME", 1, True),
    ("conv2", "depthwise", 2, 3, 1, "SAME", 1, False),  # outputs = depth multiplier
    ("conv3", "conv", 8, 3, 1, "VALID", 2, True),
]
SLIM_INPUT = (2, 9, 9, 3)
SLIM_EMA_DECAY = 0.5


def _slim_net(slim: Any, tf: Any, x: Any, training: bool) -> tuple[list[Any], list[Any], Any]:
    """The slim test network; returns each layer's input, each BatchNorm output and the loss."""
    inputs, outputs = [], []
    h = x
    for scope, kind, out, k, stride, padding, rate, scale in SLIM_LAYERS:
        params = {"is_training": training, "scale": scale}
        inputs.append(h)
        if kind == "depthwise":
            y = slim.separable_conv2d(
                h, None, [k, k], depth_multiplier=out, stride=stride, padding=padding, rate=rate,
                activation_fn=None, normalizer_fn=slim.batch_norm, normalizer_params=params, scope=scope,
            )
        else:
            y = slim.conv2d(
                h, out, [k, k], stride=stride, padding=padding, rate=rate, activation_fn=None,
                normalizer_fn=slim.batch_norm, normalizer_params=params, scope=scope,
            )
        outputs.append(y)
        h = tf.nn.relu(y)
    head = slim.conv2d(h, 4, [1, 1], activation_fn=None, scope="head")  # no BatchNorm: conv + biases
    flat = slim.flatten(h)
    fc = slim.fully_connected(  # BatchNorm after a dense layer: not a conv pair
        flat, 5, activation_fn=None, normalizer_fn=slim.batch_norm,
        normalizer_params={"is_training": training}, scope="fc",
    )
    loss = tf.reduce_mean(head**2) + tf.reduce_mean(fc**2)
    return inputs, outputs, loss


def build_slim(directory: Path) -> dict[str, Any]:
    """A tf-slim network trained 3 Adam steps with an ExponentialMovingAverage, saved with its .meta.

    Returns the prefix, the test input, and per layer the eval-mode inputs/outputs for the raw
    variables and for the EMA-restored ones.
    """
    import tensorflow as tf

    slim = import_slim()
    tf1 = tf.compat.v1
    rng = np.random.default_rng(SEED)
    prefix = str(directory / "model.ckpt")
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(SEED)
        x = tf1.placeholder(tf.float32, SLIM_INPUT)
        _, _, loss = _slim_net(slim, tf, x, training=True)
        step = tf1.train.get_or_create_global_step()
        with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
            train = tf1.train.AdamOptimizer(1e-2).minimize(loss, global_step=step)
        ema = tf1.train.ExponentialMovingAverage(SLIM_EMA_DECAY)
        with tf.control_dependencies([train]):
            train = ema.apply(tf1.trainable_variables())
        saver = tf1.train.Saver()
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            randomize(sess, tf1, rng)
            for _ in range(3):
                sess.run(train, {x: rng.standard_normal(SLIM_INPUT).astype(np.float32)})
            saver.save(sess, prefix)  # also writes model.ckpt.meta

    x_test = (rng.standard_normal(SLIM_INPUT) + 0.3).astype(np.float32)
    result: dict[str, Any] = {"prefix": prefix, "x": x_test}
    for label, use_ema in (("raw", False), ("ema", True)):
        graph = tf.Graph()
        with graph.as_default():
            x = tf1.placeholder(tf.float32, SLIM_INPUT)
            inputs, outputs, _ = _slim_net(slim, tf, x, training=False)
            tf1.train.get_or_create_global_step()
            if use_ema:
                var_list = tf1.train.ExponentialMovingAverage(SLIM_EMA_DECAY).variables_to_restore()
            else:
                var_list = tf1.global_variables()
            with tf1.Session() as sess:
                tf1.train.Saver(var_list).restore(sess, prefix)
                result[label] = sess.run({"inputs": inputs, "outputs": outputs}, {x: x_test})
    return result


def run_slim_layers(prefix: str, specs: list[dict[str, Any]], inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Restore ``prefix`` into fresh ``slim.conv2d(normalizer_fn=slim.batch_norm)`` layers and run each.

    ``specs`` items: scope, outputs, kernel, and optionally stride, padding, rate, scale, epsilon,
    depthwise (then ``outputs`` is the depth multiplier), normalizer (False: no BatchNorm, so the
    layer has ``biases``, as a fused checkpoint does).
    """
    import tensorflow as tf

    slim = import_slim()
    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        placeholders, outputs = [], []
        for spec, value in zip(specs, inputs, strict=True):
            x = tf1.placeholder(tf.float32, value.shape)
            params = {"is_training": False, "scale": spec.get("scale", False)}
            if "epsilon" in spec:
                params["epsilon"] = spec["epsilon"]
            normalizer = spec.get("normalizer", True)
            common = dict(
                stride=spec.get("stride", 1), padding=spec.get("padding", "SAME"), rate=spec.get("rate", 1),
                activation_fn=None, normalizer_fn=slim.batch_norm if normalizer else None,
                normalizer_params=params if normalizer else None, scope=spec["scope"],
            )
            k = [spec["kernel"], spec["kernel"]]
            if spec.get("depthwise"):
                y = slim.separable_conv2d(x, None, k, depth_multiplier=spec["outputs"], **common)
            else:
                y = slim.conv2d(x, spec["outputs"], k, **common)
            placeholders.append(x)
            outputs.append(y)
        with tf1.Session() as sess:
            tf1.train.Saver(tf1.global_variables()).restore(sess, prefix)
            return list(sess.run(outputs, dict(zip(placeholders, inputs, strict=True))))


def slim_specs() -> list[dict[str, Any]]:
    """:func:`run_slim_layers` specs of the network :func:`build_slim` trains."""
    return [
        {"scope": s, "outputs": o, "kernel": k, "stride": st, "padding": p, "rate": r, "scale": sc,
         "depthwise": kind == "depthwise"}
        for s, kind, o, k, st, p, r, sc in SLIM_LAYERS
    ]


# -- a graph whose pairing only the graph knows ----------------------------------------------------


def build_graph_pairing(directory: Path) -> str:
    """``enc/a`` (conv) feeds BatchNorm ``enc/b``: no naming rule pairs them, the graph does.

    ``conv1`` -> relu -> ``bn1``: naming would pair them, the graph shows the BatchNorm is not
    applied to the conv's output.
    """
    import tensorflow as tf

    slim = import_slim()
    tf1 = tf.compat.v1
    prefix = str(directory / "graph.ckpt")
    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float32, (1, 6, 6, 3))
        with tf1.variable_scope("enc"):
            with tf1.variable_scope("a"):
                kernel = tf1.get_variable("kernel", [3, 3, 3, 4])
            h = slim.batch_norm(tf.nn.conv2d(x, kernel, 1, "SAME"), is_training=False, scope="b")
        with tf1.variable_scope("conv1"):
            kernel1 = tf1.get_variable("kernel", [3, 3, 4, 4])
        h = tf.nn.relu(tf.nn.conv2d(h, kernel1, 1, "SAME"))
        slim.batch_norm(h, is_training=False, scale=True, scope="bn1")
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            randomize(sess, tf1, np.random.default_rng(SEED + 1))
            tf1.train.Saver().save(sess, prefix)
    return prefix


def build_training_switch(directory: Path) -> dict[str, Any]:
    """slim layers whose ``is_training`` is a tensor (a cond in the graph): ``c1`` fused with
    epsilon 1e-4, ``c2`` with ``fused=False``; returns the prefix and each layer's eval input/output."""
    import tensorflow as tf

    slim = import_slim()
    tf1 = tf.compat.v1
    rng = np.random.default_rng(SEED + 6)
    prefix = str(directory / "switch.ckpt")
    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float32, (None, None, None, 3))
        training = tf1.placeholder_with_default(False, [])
        y1 = slim.conv2d(x, 4, [3, 3], activation_fn=None, normalizer_fn=slim.batch_norm,
                         normalizer_params={"is_training": training, "epsilon": 1e-4}, scope="c1")
        h = tf.nn.relu(y1)
        y2 = slim.conv2d(h, 4, [3, 3], activation_fn=None, normalizer_fn=slim.batch_norm,
                         normalizer_params={"is_training": training, "fused": False}, scope="c2")
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            randomize(sess, tf1, rng)
            tf1.train.Saver().save(sess, prefix)
            x_test = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
            run = sess.run({"inputs": [x, h], "outputs": [y1, y2]}, {x: x_test})
            # One training step on a 1x3x3 batch (9 values per channel, so the unbiased and the
            # biased variance differ by 1/8): the moving statistics slim's updates produce.
            updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
            x_train = rng.standard_normal((1, 3, 3, 3)).astype(np.float32)
            train = sess.run({"inputs": [x, h], "updates": updates}, {x: x_train, training: True})
            stats = {v.op.name: v for v in tf1.global_variables() if "moving_" in v.op.name}
            train["stats"] = sess.run(stats)
    return {"prefix": prefix, **run, "train_inputs": train["inputs"], "train_stats": train["stats"]}


# -- DCGAN ---------------------------------------------------------------------------------------

DCGAN_INPUT = (2, 16, 16, 3)
# conv scope, BatchNorm scope (None: no BatchNorm), outputs
DCGAN_LAYERS = [("d_h0_conv", None, 8), ("d_h1_conv", "d_bn1", 16), ("d_h2_conv", "d_bn2", 32)]


def _dcgan_discriminator(slim: Any, tf: Any, x: Any, train: bool) -> tuple[list[Any], list[Any], Any]:
    """The DCGAN discriminator's conv/BN blocks, built as DCGAN's ops.py does."""
    tf1 = tf.compat.v1

    def conv2d(h: Any, out: int, name: str) -> Any:
        with tf1.variable_scope(name):
            w = tf1.get_variable(
                "w", [5, 5, h.shape[-1], out], initializer=tf1.truncated_normal_initializer(stddev=0.02)
            )
            conv = tf.nn.conv2d(h, w, strides=[1, 2, 2, 1], padding="SAME")
            biases = tf1.get_variable("biases", [out], initializer=tf1.constant_initializer(0.0))
            return tf.reshape(tf.nn.bias_add(conv, biases), conv.get_shape())

    def batch_norm(h: Any, name: str) -> Any:
        return slim.batch_norm(
            h, decay=0.9, epsilon=1e-5, scale=True, updates_collections=None, is_training=train, scope=name
        )

    inputs, outputs = [], []
    h = x
    for conv_scope, bn_scope, out in DCGAN_LAYERS:
        y = conv2d(h, out, conv_scope)
        if bn_scope is not None:
            inputs.append(h)
            y = batch_norm(y, bn_scope)
            outputs.append(y)
        h = tf.nn.leaky_relu(y, 0.2)
    logits = tf.reduce_mean(h, axis=[1, 2, 3])
    return inputs, outputs, logits


def build_dcgan(directory: Path) -> dict[str, Any]:
    """A DCGAN-style discriminator trained 3 steps (Adam, beta1=0.5), saved with its .meta."""
    import tensorflow as tf

    slim = import_slim()
    tf1 = tf.compat.v1
    rng = np.random.default_rng(SEED + 2)
    prefix = str(directory / "dcgan.ckpt")
    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float32, DCGAN_INPUT)
        _, _, logits = _dcgan_discriminator(slim, tf, x, train=True)
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(logits=logits, labels=tf.ones_like(logits)))
        train = tf1.train.AdamOptimizer(2e-3, beta1=0.5).minimize(loss)
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            randomize(sess, tf1, rng, conv_scale=1.0)
            for _ in range(3):
                sess.run(train, {x: rng.standard_normal(DCGAN_INPUT).astype(np.float32)})
            tf1.train.Saver().save(sess, prefix)
    x_test = rng.standard_normal(DCGAN_INPUT).astype(np.float32)
    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float32, DCGAN_INPUT)
        inputs, outputs, _ = _dcgan_discriminator(slim, tf, x, train=False)
        with tf1.Session() as sess:
            tf1.train.Saver().restore(sess, prefix)
            run = sess.run({"inputs": inputs, "outputs": outputs}, {x: x_test})
    return {"prefix": prefix, "x": x_test, **run}


def run_slim_discriminator(prefix: str, x: np.ndarray) -> list[np.ndarray]:
    """The slim discriminator of docs/dcgan-to-slim.md (widths of this test's DCGAN), restored
    with a plain ``Saver()``; returns each BatchNorm output."""
    import tensorflow as tf

    slim = import_slim()
    tf1 = tf.compat.v1
    with tf.Graph().as_default():
        image = tf1.placeholder(tf.float32, x.shape)
        bn = {"scale": True, "epsilon": 1e-5, "decay": 0.9, "is_training": False}
        (first, _, width), *rest = DCGAN_LAYERS
        h = slim.conv2d(image, width, [5, 5], stride=2, activation_fn=None, scope=first)
        h = tf.nn.leaky_relu(h, 0.2)
        outputs = []
        for scope, _, depth in rest:
            h = slim.conv2d(h, depth, [5, 5], stride=2, activation_fn=None,
                            normalizer_fn=slim.batch_norm, normalizer_params=bn, scope=scope)
            # Fetched through an Identity: with oneDNN on, grappler fuses conv + BatchNorm +
            # LeakyRelu and a fetch of the BatchNorm op itself is no longer found in the graph.
            outputs.append(tf.identity(h))
            h = tf.nn.leaky_relu(h, 0.2)
        with tf1.Session() as sess:
            tf1.train.Saver().restore(sess, prefix)
            return list(sess.run(outputs, {image: x}))


# -- tf.compat.v1.layers (needs TF_USE_LEGACY_KERAS=1: run in a fresh process) ----------------------

V1_INPUT = (2, 9, 9, 3)


def build_v1_layers(directory: Path) -> None:
    """conv1/bn1 (stride 2, conv bias), conv2/bn2 (VALID, dilation 2), conv2d/batch_normalization
    (auto-named), trained 3 Momentum steps; saves the checkpoint, .meta and ``outputs.npz``."""
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise RuntimeError("tf.compat.v1.layers needs TF_USE_LEGACY_KERAS=1 set before TensorFlow loads")
    import tensorflow as tf

    tf1 = tf.compat.v1
    rng = np.random.default_rng(SEED + 3)
    prefix = str(directory / "v1.ckpt")

    def net(x: Any, training: bool) -> tuple[list[Any], list[Any], Any]:
        layers = tf1.layers
        inputs, outputs = [x], []
        h = layers.conv2d(x, 8, 3, strides=2, padding="same", name="conv1")
        outputs.append(layers.batch_normalization(h, training=training, name="bn1"))
        inputs.append(tf.nn.relu(outputs[-1]))
        h = layers.conv2d(inputs[-1], 16, 3, padding="valid", dilation_rate=2, use_bias=False, name="conv2")
        outputs.append(layers.batch_normalization(h, training=training, name="bn2"))
        inputs.append(tf.nn.relu(outputs[-1]))
        h = layers.conv2d(inputs[-1], 4, 1)  # auto-named conv2d
        outputs.append(layers.batch_normalization(h, training=training))  # batch_normalization
        return inputs, outputs, tf.reduce_mean(outputs[-1] ** 2)

    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float32, V1_INPUT)
        _, _, loss = net(x, training=True)
        with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
            train = tf1.train.MomentumOptimizer(1e-2, 0.9).minimize(loss)
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            randomize(sess, tf1, rng)
            for _ in range(3):
                sess.run(train, {x: rng.standard_normal(V1_INPUT).astype(np.float32)})
            tf1.train.Saver().save(sess, prefix)
    x_test = rng.standard_normal(V1_INPUT).astype(np.float32)
    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float32, V1_INPUT)
        inputs, outputs, _ = net(x, training=False)
        with tf1.Session() as sess:
            tf1.train.Saver().restore(sess, prefix)
            run = sess.run({"inputs": inputs, "outputs": outputs}, {x: x_test})
    np.savez(
        directory / "outputs.npz",
        **{f"input{i}": v for i, v in enumerate(run["inputs"])},
        **{f"output{i}": v for i, v in enumerate(run["outputs"])},
    )


# -- TF2 object-based ------------------------------------------------------------------------------

KERAS_INPUT = (2, 9, 9, 3)


def build_keras3(directory: Path) -> dict[str, Any]:
    """A Keras 3 model (conv/BN, depthwise/BN, conv->relu->BN) saved by tf.train.Checkpoint with
    its optimizer; returns the prefix and, per Conv->BN pair, its input and the BN output."""
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(SEED + 4)
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential([
        keras.Input(KERAS_INPUT[1:]),
        keras.layers.Conv2D(8, 3, strides=2, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(4, 1, use_bias=False),
        keras.layers.ReLU(),
        keras.layers.BatchNormalization(),  # after an activation: not a conv pair
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ])
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.standard_normal(n).astype(np.float32) * 0.5)
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype(np.float32))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype(np.float32))
            layer.beta.assign(rng.standard_normal(n).astype(np.float32) * 0.5)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(rng.standard_normal((8, *KERAS_INPUT[1:])), rng.standard_normal((8, 2)), epochs=1, verbose=0)
    prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(directory / "keras" / "ckpt"))
    x_test = rng.standard_normal(KERAS_INPUT).astype(np.float32)
    h = tf.constant(x_test)
    inputs, outputs = [], []
    conv_types = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
    previous, conv_input = None, None
    for layer in model.layers:
        out = layer(h, training=False)
        if isinstance(layer, keras.layers.BatchNormalization) and isinstance(previous, conv_types):
            inputs.append(np.asarray(conv_input))
            outputs.append(np.asarray(out))
        if isinstance(layer, conv_types):
            conv_input = h
        previous, h = layer, out
    return {"prefix": prefix, "inputs": inputs, "outputs": outputs}


def build_tf_keras(directory: Path) -> dict[str, Any]:
    """A tf_keras (Keras 2) model saved with ``save_weights`` in TF format after one epoch of Adam:
    conv/BN and depthwise/BN; returns the prefix and, per pair, its input and the BN output."""
    import tf_keras

    layers = tf_keras.layers
    rng = np.random.default_rng(SEED + 5)
    tf_keras.utils.set_random_seed(SEED)
    model = tf_keras.Sequential([
        layers.Conv2D(8, 3, strides=2, padding="same", input_shape=KERAS_INPUT[1:]),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False),
        layers.BatchNormalization(),
    ])
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.standard_normal(n) * 0.5)
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n))
    model.compile(optimizer="adam", loss="mse")
    model.fit(rng.standard_normal((4, *KERAS_INPUT[1:])), rng.standard_normal((4, 5, 5, 16)), epochs=1, verbose=0)
    prefix = str(directory / "weights")
    model.save_weights(prefix)  # no .h5 suffix: a TF object-based checkpoint
    x = rng.standard_normal(KERAS_INPUT).astype(np.float32)
    h1 = model.layers[1](model.layers[0](x), training=False)
    relu = model.layers[2](h1)
    h2 = model.layers[4](model.layers[3](relu), training=False)
    return {"prefix": prefix, "inputs": [x, np.asarray(relu)], "outputs": [np.asarray(h1), np.asarray(h2)]}


if __name__ == "__main__":
    if sys.argv[1:2] == ["v1"]:
        build_v1_layers(Path(sys.argv[2]))
    else:
        raise SystemExit("usage: python -m tests.formats.slim_graphs v1 OUTDIR")
