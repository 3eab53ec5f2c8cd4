"""The seed's DCGAN, whole, as a TF1 graph built like carpedm20/DCGAN-tensorflow's ops.py/model.py,
and its tf-slim rewrite: the oracle and the target of tests/formats/test_dcgan_whole.py.

Generator: ``g_h0_lin`` (linear: ``Matrix``, ``bias``) -> reshape to a ``S x S x 8g`` map ->
``g_bn0`` -> three ``deconv2d`` (``w``, ``biases``, ``conv2d_transpose`` SAME stride 2) each followed
by a BatchNorm -> a last ``deconv2d`` -> tanh. Discriminator: ``d_h0_conv`` -> lrelu -> three conv2d +
BatchNorm -> flatten -> ``d_h4_lin``. BatchNorm is contrib/slim-style (decay 0.9, eps 1e-5,
``scale=True``). Images are 32x32, so both flattened maps are 2x2 and their order matters.
Nothing here imports TensorFlow at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.formats.slim_graphs import import_slim, randomize

SEED = 11
BATCH = 2
IMAGE = 32  # 32 / 16 = 2: the generator's first map and the discriminator's last are 2x2
C_DIM = 3
Z_DIM = 6
GF = DF = 4  # gf_dim, df_dim
S = IMAGE // 16
# Generator deconv scopes, their BatchNorm scopes (None: the last one has none) and widths.
G_DECONVS = [("g_h1", "g_bn1", GF * 4), ("g_h2", "g_bn2", GF * 2), ("g_h3", "g_bn3", GF), ("g_h4", None, C_DIM)]
D_CONVS = [("d_h0_conv", None, DF), ("d_h1_conv", "d_bn1", DF * 2), ("d_h2_conv", "d_bn2", DF * 4),
           ("d_h3_conv", "d_bn3", DF * 8)]


def _ops(tf: Any, slim: Any, train: bool) -> dict[str, Any]:
    """DCGAN's ops.py: linear, conv2d, deconv2d and the batch_norm class, rebuilt from their description."""
    tf1 = tf.compat.v1

    def batch_norm(x: Any, name: str) -> Any:
        return slim.batch_norm(x, decay=0.9, updates_collections=None, epsilon=1e-5, scale=True,
                               is_training=train, scope=name)

    def conv2d(x: Any, out: int, name: str) -> Any:
        with tf1.variable_scope(name):
            w = tf1.get_variable("w", [5, 5, x.get_shape()[-1], out],
                                 initializer=tf1.truncated_normal_initializer(stddev=0.02))
            conv = tf.nn.conv2d(x, w, strides=[1, 2, 2, 1], padding="SAME")
            biases = tf1.get_variable("biases", [out], initializer=tf1.constant_initializer(0.0))
            return tf.reshape(tf.nn.bias_add(conv, biases), conv.get_shape())

    def deconv2d(x: Any, output_shape: list[int], name: str) -> Any:
        with tf1.variable_scope(name):
            w = tf1.get_variable("w", [5, 5, output_shape[-1], x.get_shape()[-1]],
                                 initializer=tf1.random_normal_initializer(stddev=0.02))
            deconv = tf.nn.conv2d_transpose(x, w, output_shape=output_shape, strides=[1, 2, 2, 1])
            biases = tf1.get_variable("biases", [output_shape[-1]], initializer=tf1.constant_initializer(0.0))
            return tf.reshape(tf.nn.bias_add(deconv, biases), deconv.get_shape())

    def linear(x: Any, size: int, scope: str) -> Any:
        with tf1.variable_scope(scope):
            matrix = tf1.get_variable("Matrix", [x.get_shape().as_list()[1], size], tf.float32,
                                      tf1.random_normal_initializer(stddev=0.02))
            bias = tf1.get_variable("bias", [size], initializer=tf1.constant_initializer(0.0))
            return tf.matmul(x, matrix) + bias

    return {"batch_norm": batch_norm, "conv2d": conv2d, "deconv2d": deconv2d, "linear": linear}


def _lrelu(tf: Any, x: Any) -> Any:
    return tf.maximum(x, 0.2 * x)


def generator(tf: Any, slim: Any, z: Any, train: bool) -> Any:
    """model.py's generator."""
    ops = _ops(tf, slim, train)
    h = ops["linear"](z, GF * 8 * S * S, "g_h0_lin")
    h = tf.nn.relu(ops["batch_norm"](tf.reshape(h, [-1, S, S, GF * 8]), "g_bn0"))
    size = S
    for scope, bn, out in G_DECONVS:
        size *= 2
        h = ops["deconv2d"](h, [BATCH, size, size, out], scope)
        h = tf.nn.relu(ops["batch_norm"](h, bn)) if bn is not None else tf.nn.tanh(h)
    return h


def discriminator(tf: Any, slim: Any, image: Any, train: bool) -> Any:
    """model.py's discriminator; returns the logits."""
    ops = _ops(tf, slim, train)
    h = image
    for scope, bn, out in D_CONVS:
        h = ops["conv2d"](h, out, scope)
        h = _lrelu(tf, ops["batch_norm"](h, bn) if bn is not None else h)
    return ops["linear"](tf.reshape(h, [BATCH, -1]), 1, "d_h4_lin")


def build(directory: Path) -> dict[str, Any]:
    """Train both nets 2 Adam steps (beta1=0.5), save with ``tf.compat.v1.train.Saver`` (and the
    .meta), then restore in eval mode; returns the prefix, test inputs and eval outputs."""
    import tensorflow as tf

    slim = import_slim()
    tf1 = tf.compat.v1
    rng = np.random.default_rng(SEED)
    prefix = str(directory / "dcgan.ckpt")
    with tf.Graph().as_default():
        tf1.set_random_seed(SEED)
        z = tf1.placeholder(tf.float32, (BATCH, Z_DIM), name="z")
        image = tf1.placeholder(tf.float32, (BATCH, IMAGE, IMAGE, C_DIM), name="image")
        with tf1.variable_scope("generator"):
            fake = generator(tf, slim, z, train=True)
        with tf1.variable_scope("discriminator") as scope:
            real_logits = discriminator(tf, slim, image, train=True)
            scope.reuse_variables()
            fake_logits = discriminator(tf, slim, fake, train=True)
        loss = tf.reduce_mean(real_logits**2) + tf.reduce_mean((fake_logits - 1) ** 2)
        train = tf1.train.AdamOptimizer(2e-3, beta1=0.5).minimize(loss)
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            randomize(sess, tf1, rng, conv_scale=1.0)
            for _ in range(2):
                feed = {z: rng.uniform(-1, 1, (BATCH, Z_DIM)), image: rng.standard_normal(image.shape)}
                sess.run(train, feed)
            tf1.train.Saver().save(sess, prefix)
    z_test = rng.uniform(-1, 1, (BATCH, Z_DIM)).astype(np.float32)
    x_test = rng.standard_normal((BATCH, IMAGE, IMAGE, C_DIM)).astype(np.float32)
    with tf.Graph().as_default():
        z = tf1.placeholder(tf.float32, z_test.shape)
        image = tf1.placeholder(tf.float32, x_test.shape)
        with tf1.variable_scope("generator"):
            fake = generator(tf, slim, z, train=False)
        with tf1.variable_scope("discriminator"):
            logits = discriminator(tf, slim, image, train=False)
        with tf1.Session() as sess:
            tf1.train.Saver().restore(sess, prefix)
            run = sess.run({"fake": fake, "logits": logits}, {z: z_test, image: x_test})
    return {"prefix": prefix, "z": z_test, "x": x_test, **run}


def run_slim_rewrite(prefix: str, z: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
    """The DCGAN rewritten with tf-slim layers (``slim.fully_connected``, ``slim.conv2d_transpose`` and
    ``slim.conv2d`` with ``normalizer_fn=slim.batch_norm``: no bias before a BatchNorm), restored
    from ``prefix`` alone with a plain ``Saver()``; returns the eval-mode fake images and logits."""
    import tensorflow as tf

    slim = import_slim()
    tf1 = tf.compat.v1
    bn = {"scale": True, "epsilon": 1e-5, "decay": 0.9, "is_training": False}

    def lrelu(h: Any) -> Any:
        return _lrelu(tf, h)

    with tf.Graph().as_default():
        z_in = tf1.placeholder(tf.float32, z.shape)
        image = tf1.placeholder(tf.float32, x.shape)
        with tf1.variable_scope("generator"):
            h = slim.fully_connected(z_in, GF * 8 * S * S, activation_fn=None, scope="g_h0_lin")
            h = tf.nn.relu(slim.batch_norm(tf.reshape(h, [-1, S, S, GF * 8]), scope="g_bn0", **bn))
            for scope, norm, out in G_DECONVS:
                if norm is not None:
                    h = slim.conv2d_transpose(h, out, [5, 5], stride=2, activation_fn=tf.nn.relu,
                                              normalizer_fn=slim.batch_norm, normalizer_params=bn, scope=scope)
                else:
                    h = slim.conv2d_transpose(h, out, [5, 5], stride=2, activation_fn=tf.nn.tanh, scope=scope)
            fake = h
        with tf1.variable_scope("discriminator"):
            h = image
            for scope, norm, out in D_CONVS:
                if norm is not None:
                    h = slim.conv2d(h, out, [5, 5], stride=2, activation_fn=lrelu,
                                    normalizer_fn=slim.batch_norm, normalizer_params=bn, scope=scope)
                else:
                    h = slim.conv2d(h, out, [5, 5], stride=2, activation_fn=lrelu, scope=scope)
            logits = slim.fully_connected(slim.flatten(h), 1, activation_fn=None, scope="d_h4_lin")
        with tf1.Session() as sess:
            tf1.train.Saver().restore(sess, prefix)
            return sess.run({"fake": fake, "logits": logits}, {z_in: z, image: x})  # type: ignore[no-any-return]
