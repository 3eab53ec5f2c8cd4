"""TensorFlow backend.

TF's own 'SAME' is the reference semantics, so SAME padding is passed through as is (this also
works when the spatial size is unknown inside ``tf.function``). Eval runs one conv with BatchNorm
folded in (cached per params object in eager mode when no ``tf.Variable`` is involved; inside a
graph the fold is a handful of O(weights) ops). Training uses the fused batch-norm kernel
(FusedBatchNormV3), which returns the batch mean and the unbiased variance; float64 and
``eps < 1.001e-5`` (which cuDNN would clamp) use ``tf.nn.moments`` instead. NCHW is transposed to
NHWC internally: TF's CPU kernels do not all support NCHW.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from convbn.backends._common import fold, moving_update
from convbn.errors import ConvBNError
from convbn.geometry import Plan
from convbn.params import ARRAY_FIELDS, ConvBNParams, with_arrays

NAME = "tensorflow"

__all__ = [
    "NAME",
    "asarray",
    "conv_bn",
    "fuse",
    "resolve_device",
    "static_shape",
    "to_backend",
    "to_numpy",
]

_FUSED_DTYPES = (tf.float16, tf.bfloat16, tf.float32)
_CUDNN_MIN_EPS = 1.001e-5


def static_shape(x: Any) -> tuple[int | None, ...]:
    shape = x.shape
    if shape.rank is None:
        raise ConvBNError("x must have a known rank (4). Received: x.shape=<unknown rank>")
    return tuple(shape.as_list())


def resolve_device(spec: Any = None) -> str:
    """A TF device string; ``None`` picks the first GPU, else the CPU."""
    if spec is None:
        gpus = tf.config.list_logical_devices("GPU")
        return gpus[0].name if gpus else "/CPU:0"
    text = str(spec).lower()
    if text.startswith("/"):  # already a TF device name
        return str(spec)
    prefix, _, index = text.partition(":")
    kind = {"cuda": "GPU", "gpu": "GPU", "cpu": "CPU", "tpu": "TPU"}.get(prefix)
    if kind is None or (index and not index.isdigit()):
        raise ConvBNError(
            f"device must be 'cpu', 'gpu', 'cuda', 'tpu' or one of those with ':N'. Received: device={spec!r}"
        )
    name = f"/{kind}:{index or 0}"
    if kind != "CPU" and not any(d.name.endswith(name[1:]) for d in tf.config.list_logical_devices(kind)):
        raise ConvBNError(f"device {spec!r} was requested but TensorFlow sees no {kind}")
    return name


def to_numpy(a: Any) -> np.ndarray:
    return np.asarray(a.numpy() if hasattr(a, "numpy") else a)


def asarray(a: Any, device: Any = None) -> Any:
    if isinstance(a, (tf.Tensor, tf.Variable)) and device is None:
        return a
    if not isinstance(a, (tf.Tensor, tf.Variable)):
        from convbn.backends.numpy import to_numpy as any_to_numpy

        a = any_to_numpy(a)
    if device is None:
        return tf.convert_to_tensor(a)
    with tf.device(device):
        return tf.identity(tf.convert_to_tensor(a))


def to_backend(params: ConvBNParams, device: Any = None) -> ConvBNParams:
    dev = resolve_device(device) if device is not None else None
    return with_arrays(params, **{n: asarray(v, dev) for n, v in params.arrays().items()})


def _compute_dtype(dtype: tf.DType) -> tf.DType:
    return tf.float64 if dtype == tf.float64 else tf.float32


def _param_tensors(params: ConvBNParams) -> dict[str, Any]:
    """The params as TF tensors; foreign arrays are converted once (eagerly) and cached."""
    key = "tf-tensors"
    cached = params._cache.get(key)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    values = {n: getattr(params, n) for n in ARRAY_FIELDS}
    native = all(isinstance(v, (tf.Tensor, tf.Variable)) for v in values.values() if v is not None)
    out = {n: (None if v is None else asarray(v)) for n, v in values.items()}
    if not native and tf.executing_eagerly():
        params._cache[key] = out
    return out


def _cacheable(t: dict[str, Any]) -> bool:
    return tf.executing_eagerly() and not any(isinstance(v, tf.Variable) for v in t.values())


def _fold(t: dict[str, Any], eps: float, dtype: tf.DType) -> tuple[Any, Any]:
    cd = _compute_dtype(dtype)
    c = {n: (None if v is None else tf.cast(v, cd)) for n, v in t.items()}
    w, b = fold(c["kernel"], c["bias"], c["gamma"], c["beta"], c["moving_mean"], c["moving_var"],
                eps, tf.math.rsqrt)
    return tf.cast(w, dtype), tf.cast(b, dtype)


def _folded(params: ConvBNParams, dtype: tf.DType) -> tuple[Any, Any]:
    t = _param_tensors(params)
    if not _cacheable(t):
        return _fold(t, params.eps, dtype)
    key = ("tf-fold", dtype)
    cached = params._cache.get(key)
    if cached is None:
        cached = _fold(t, params.eps, dtype)
        params._cache[key] = cached
    return cached  # type: ignore[no-any-return]


def _conv(x: Any, kernel: Any, params: ConvBNParams, plan: Plan) -> Any:
    """NHWC conv with an HWIO kernel; depthwise uses the depthwise kernel where TF allows it."""
    strides = (1, *plan.stride, 1)
    if params.padding == "SAME":
        padding: Any = "SAME"
    elif plan.pads == ((0, 0), (0, 0)):
        padding = "VALID"
    else:
        assert plan.pads is not None
        padding = [[0, 0], list(plan.pads[0]), list(plan.pads[1]), [0, 0]]
    # tf.nn.depthwise_conv2d rejects stride > 1 together with dilation > 1, and (on CPU) unequal
    # strides; the grouped conv does neither.
    sh, sw = plan.stride
    if plan.depthwise and sh == sw and (plan.stride == (1, 1) or plan.dilation == (1, 1)):
        kh, kw, _, out = kernel.shape
        dw_kernel = tf.reshape(kernel, (kh, kw, plan.in_channels, out // plan.in_channels))
        return tf.nn.depthwise_conv2d(x, dw_kernel, strides, padding, dilations=plan.dilation)
    return _conv2d(x, kernel, strides, padding, plan)


def _conv2d(x: Any, kernel: Any, strides: Any, padding: Any, plan: Plan) -> Any:
    """``tf.nn.conv2d`` where TF's CPU kernels can run it and its gradient; otherwise as Keras does.

    On CPU, TF's conv2d gradient rejects dilation ("Current CPU implementations do not yet support
    dilation rates larger than 1") and groups ("Gradients for grouped convolutions are not supported
    on CPU"), and inside a ``tf.function`` even the grouped forward fails (Grappler fuses it with the
    bias add into a kernel without groups). So, like Keras: dilation at stride 1 with a named
    padding goes through ``tf.nn.convolution`` (space-to-batch, which has a gradient); grouped
    convs, and the rest of the dilated ones, are compiled by XLA, forward and backward.
    """
    if plan.groups == 1 and plan.dilation == (1, 1):
        return tf.nn.conv2d(x, kernel, strides, padding, dilations=plan.dilation)
    if plan.groups == 1 and plan.stride == (1, 1) and isinstance(padding, str):
        return tf.nn.convolution(x, kernel, strides, padding, dilations=plan.dilation)
    named = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
    return _xla_conv2d(x, kernel, tuple(strides), named, plan.dilation)


@tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
def _xla_conv2d(x: Any, kernel: Any, strides: Any, padding: Any, dilations: Any) -> Any:
    explicit = padding if isinstance(padding, str) else [list(p) for p in padding]
    return tf.nn.conv2d(x, kernel, list(strides), explicit, dilations=list(dilations))

def conv_bn(x: Any, params: ConvBNParams, plan: Plan) -> Any:
    if isinstance(x, tf.Variable):
        x = tf.convert_to_tensor(x)
    nchw = plan.data_format == "NCHW"
    if nchw:
        x = tf.transpose(x, (0, 2, 3, 1))
    dtype = x.dtype
    if not plan.training:
        w, b = _folded(params, dtype)
        y = tf.nn.bias_add(_conv(x, w, params, plan), b)
        return tf.transpose(y, (0, 3, 1, 2)) if nchw else y
    t = _param_tensors(params)
    cd = _compute_dtype(dtype)
    z = _conv(x, tf.cast(t["kernel"], dtype), params, plan)
    if t["bias"] is not None:
        z = tf.nn.bias_add(z, tf.cast(t["bias"], dtype))
    channels = plan.out_channels
    gamma = tf.ones([channels], cd) if t["gamma"] is None else tf.cast(t["gamma"], cd)
    beta = tf.zeros([channels], cd) if t["beta"] is None else tf.cast(t["beta"], cd)
    if plan.values_per_channel is not None:
        count: Any = float(plan.values_per_channel)
    else:
        count = tf.cast(tf.size(z) // channels, cd)
    if dtype in _FUSED_DTYPES and params.eps >= _CUDNN_MIN_EPS:
        empty = tf.zeros([0], tf.float32)
        y, mean, var_unbiased = tf.raw_ops.FusedBatchNormV3(
            x=z, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=params.eps,
            exponential_avg_factor=1.0, data_format="NHWC", is_training=True,
        )[:3]
    else:
        zc = tf.cast(z, cd)
        mean, var = tf.nn.moments(zc, axes=(0, 1, 2))
        y = tf.cast(tf.nn.batch_normalization(zc, mean, var, beta, gamma, params.eps), dtype)
        var_unbiased = var * (count / (count - 1.0))
    mean, var_unbiased = tf.stop_gradient(mean), tf.stop_gradient(var_unbiased)
    old_mean, old_var = t["moving_mean"], t["moving_var"]
    new_mean, new_var = moving_update(
        params, tf.cast(old_mean, cd), tf.cast(old_var, cd), mean, var_unbiased, count
    )
    new = with_arrays(
        params,
        moving_mean=tf.cast(new_mean, old_mean.dtype),
        moving_var=tf.cast(new_var, old_var.dtype),
    )
    return (tf.transpose(y, (0, 3, 1, 2)) if nchw else y), new


def fuse(params: ConvBNParams) -> tuple[Any, Any]:
    t = _param_tensors(params)
    return _fold(t, params.eps, t["kernel"].dtype)
