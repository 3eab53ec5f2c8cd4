"""TensorFlow: ``conv_bn`` against Keras 3 ``Conv2D`` (``DepthwiseConv2D`` for depthwise) +
``BatchNormalization``, eager and inside ``tf.function``.

NHWC only: TF's CPU Conv2D kernel rejects NCHW unless oneDNN is on ("The Conv2D op currently only
supports the NHWC tensor format"), so Keras ``channels_first`` is not something a CPU user can run.

Eval: convbn gets frozen params (``convbn.to_backend(params, "tensorflow")``, eager tensors), the
inference setup; Keras reads its variables. Training: both sides hold ``tf.Variable`` weights and
statistics and take a ``GradientTape`` step with respect to the input and the trainable weights;
convbn's step assigns the returned moving statistics to its variables, as Keras does internally.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import convbn
from benchmarks.common import Contest, Shape

NAME = "tensorflow"
DATA_FORMATS = ("NHWC",)
EPS = 1e-3
MOMENTUM = 0.99


def environment() -> dict[str, Any]:
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default (all cores)",
    }


def _layers(shape: Shape, a: dict[str, np.ndarray]) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    depthwise = shape.groups == shape.c and shape.groups > 1
    if depthwise:
        conv: keras.layers.Layer = keras.layers.DepthwiseConv2D(
            shape.k, strides=shape.stride, padding="same", use_bias=False)
        kernel = a["kernel"].reshape(shape.k, shape.k, shape.c, shape.out // shape.c)
    else:
        conv = keras.layers.Conv2D(shape.out, shape.k, strides=shape.stride, padding="same", use_bias=False,
                                   groups=shape.groups)
        kernel = a["kernel"]
    bn = keras.layers.BatchNormalization(axis=-1, momentum=MOMENTUM, epsilon=EPS)
    conv.build(shape.x_nhwc)
    bn.build((shape.n, -(-shape.h // shape.stride), -(-shape.w // shape.stride), shape.out))
    conv.set_weights([kernel])
    bn.set_weights([a["gamma"], a["beta"], a["moving_mean"], a["moving_var"]])
    return conv, bn


def _params(shape: Shape, a: dict[str, np.ndarray], variables: bool) -> convbn.ConvBNParams:
    make: Callable[[np.ndarray], Any] = (lambda v: tf.Variable(v)) if variables else tf.constant
    return convbn.ConvBNParams(
        kernel=make(a["kernel"]), gamma=make(a["gamma"]), beta=make(a["beta"]),
        moving_mean=make(a["moving_mean"]), moving_var=make(a["moving_var"]),
        stride=shape.stride, padding="SAME", groups=shape.groups,
        eps=EPS, momentum=MOMENTUM, var_update="biased",
    )


def _np(t: Any) -> np.ndarray:
    return np.asarray(t.numpy() if hasattr(t, "numpy") else t).copy()


def contests(shape: Shape, data_formats: tuple[str, ...] = DATA_FORMATS) -> Iterator[Contest]:
    a = shape.arrays()
    x = tf.constant(a["x"])
    dy = tf.constant(a["dy"])
    depthwise = shape.groups == shape.c and shape.groups > 1

    conv, bn = _layers(shape, a)
    frozen = _params(shape, a, variables=False)

    def eval_convbn() -> Any:
        return convbn.conv_bn(x, frozen)

    def eval_native() -> Any:
        return bn(conv(x), training=False)

    eval_convbn_fn = tf.function(lambda xb: convbn.conv_bn(xb, frozen))
    eval_native_fn = tf.function(lambda xb: bn(conv(xb), training=False))

    def eval_outputs(ours: Callable[[], Any], theirs: Callable[[], Any]) -> Any:
        return {"y": _np(ours())}, {"y": _np(theirs())}

    yield Contest(NAME, shape, "eval", "NHWC eager", eval_convbn, eval_native,
                  lambda: eval_outputs(eval_convbn, eval_native), "Keras Conv2D+BatchNormalization, eager")
    yield Contest(NAME, shape, "eval", "NHWC tf.function", lambda: eval_convbn_fn(x), lambda: eval_native_fn(x),
                  lambda: eval_outputs(lambda: eval_convbn_fn(x), lambda: eval_native_fn(x)),
                  "Keras Conv2D+BatchNormalization in tf.function")

    def train_pair() -> tuple[Callable[[], Any], Callable[[], Any], Callable[[], Any]]:
        tconv, tbn = _layers(shape, a)
        params = _params(shape, a, variables=True)
        native_vars = [tconv.kernel, tbn.gamma, tbn.beta]

        def ours(xb: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(xb)
                y, new = convbn.conv_bn(xb, params, training=True)
                loss = tf.reduce_sum(y * dy)
            grads = tape.gradient(loss, [xb, params.kernel, params.gamma, params.beta])
            params.moving_mean.assign(new.moving_mean)
            params.moving_var.assign(new.moving_var)
            return y, grads

        def theirs(xb: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(xb)
                y = tbn(tconv(xb), training=True)
                loss = tf.reduce_sum(y * dy)
            return y, tape.gradient(loss, [xb, *native_vars])

        def outputs(ours: Callable[[Any], Any], theirs: Callable[[Any], Any]) -> Any:
            y, (dx, dk, dg, _db) = ours(x)
            yn, (dxn, dkn, dgn, _dbn) = theirs(x)
            dkn = _np(dkn)
            if depthwise:
                dkn = dkn.reshape(shape.k, shape.k, 1, shape.out)
            return (
                {"y": _np(y), "dx": _np(dx), "dkernel": _np(dk), "dgamma": _np(dg),
                 "moving_mean": _np(params.moving_mean), "moving_var": _np(params.moving_var)},
                {"y": _np(yn), "dx": _np(dxn), "dkernel": dkn, "dgamma": _np(dgn),
                 "moving_mean": _np(tbn.moving_mean), "moving_var": _np(tbn.moving_variance)},
            )

        return ours, theirs, outputs

    ours, theirs, outputs = train_pair()
    yield Contest(NAME, shape, "train", "NHWC eager", lambda: ours(x), lambda: theirs(x),
                  lambda: outputs(ours, theirs), "Keras layers, GradientTape step, eager")
    ours, theirs, outputs = train_pair()
    ours_fn, theirs_fn = tf.function(ours), tf.function(theirs)
    yield Contest(NAME, shape, "train", "NHWC tf.function", lambda: ours_fn(x), lambda: theirs_fn(x),
                  lambda: outputs(ours_fn, theirs_fn), "Keras layers, GradientTape step in tf.function")
