"""TensorFlow backend.

TF's own 'SAME' is the reference semantics, so SAME padding is passed through as is (this also
works when the spatial size is unknown inside ``tf.function``). Eval runs one conv and one bias add
with BatchNorm folded in. Frozen params (eager tensors or NumPy; not ``tf.Variable``) are folded
once per params object and dtype, also when first seen while tracing a ``tf.function`` (the folded
tensors are then captured); the fold is skipped from the cache while a GradientTape might record,
so gradients with respect to watched params stay exact. Variables and graph tensors are folded
inside each call (O(weights)). Training uses the fused batch-norm kernel (FusedBatchNormV3), which
also updates the moving statistics; float64 and ``eps < 1.001e-5`` (which cuDNN would clamp) use
``tf.nn.moments`` instead. NCHW is transposed to NHWC internally: TF's CPU kernels do not all
support NCHW.

``sync=True`` shares the batch statistics across the replicas of the current ``tf.distribute``
replica context (see :func:`train_sync`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import tensorflow as tf

from convbn.backends._common import (
    ONE_VALUE_ACROSS_REPLICAS,
    combine_moments,
    fold_arrays,
    moving_update,
    with_moving_stats,
)
from convbn.caches import Folded, ParamArrays
from convbn.errors import ConvBNError
from convbn.geometry import Plan, plan_for
from convbn.params import ARRAY_FIELDS, ConvBNParams, with_arrays

NAME = "tensorflow"

__all__ = [
    "NAME",
    "asarray",
    "conv_bn",
    "conversion_key",
    "empty_output",
    "fuse",
    "resolve_device",
    "static_shape",
    "sync_group",
    "to_backend",
    "to_numpy",
    "train_in_place",
    "train_sync",
]

_FUSED_DTYPES = (tf.float16, tf.bfloat16, tf.float32)
_CUDNN_MIN_EPS = 1.001e-5
with tf.init_scope():  # the module may first be imported while a tf.function is being traced
    _EagerTensor = type(tf.constant(0.0))

try:  # private, stable since TF 2.13; without it a fold is never cached while a tape might record
    from tensorflow.python.eager.record import could_possibly_record as _could_possibly_record
except ImportError:  # pragma: no cover - depends on the TF version
    _could_possibly_record = None


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


def conversion_key() -> None:
    """Nothing besides the device decides :func:`to_backend`'s result."""
    return None


def to_backend(params: ConvBNParams, device: Any = None) -> ConvBNParams:
    dev = resolve_device(device) if device is not None else None
    return with_arrays(params, **{n: asarray(v, dev) for n, v in params.arrays().items()})


def _compute_dtype(dtype: tf.DType) -> tf.DType:
    return tf.float64 if dtype == tf.float64 else tf.float32


def _recording() -> bool:
    """Whether a GradientTape (or forward accumulator) may be recording: a cached fold would cut
    the gradient path to params the tape watches. Unknown means yes."""
    if _could_possibly_record is None:
        return True
    return bool(_could_possibly_record())


def _frozen(values: Any) -> bool:
    """True when no value is a ``tf.Variable`` or a graph tensor: the values cannot change."""
    return not any(
        isinstance(v, tf.Variable) or (isinstance(v, tf.Tensor) and not isinstance(v, _EagerTensor))
        for v in values
        if v is not None
    )


def _param_tensors(params: ConvBNParams) -> ParamArrays:
    """The params as TF tensors or variables.

    Cached per params object unless a value is a graph tensor (which belongs to one trace); foreign
    arrays are converted once, eagerly, even when first seen while tracing a ``tf.function``.
    """
    cache = params.cache
    cached = cache.tf_tensors
    if cached is not None:
        return cached
    values = [getattr(params, n) for n in ARRAY_FIELDS]
    if any(isinstance(v, tf.Tensor) and not isinstance(v, _EagerTensor) for v in values):
        return ParamArrays(*(None if v is None else asarray(v) for v in values))
    with tf.init_scope():
        out = cache.tf_tensors = ParamArrays(*(None if v is None else asarray(v) for v in values))
    return out


def _fold(t: ParamArrays, eps: float, dtype: tf.DType, plan: Plan | None = None) -> Folded:
    cd = _compute_dtype(dtype)
    w, b = fold_arrays(ParamArrays._make(None if v is None else tf.cast(v, cd) for v in t), eps, tf.math.rsqrt)
    w = tf.cast(w, dtype)
    if plan is not None and _use_depthwise(plan):
        w = _depthwise_kernel(w, plan)
    return Folded(w, tf.cast(b, dtype))


def _folded(params: ConvBNParams, dtype: tf.DType, plan: Plan) -> Folded:
    """Folded kernel (already in the conv op's layout) and bias in ``dtype``.

    Frozen params (eager tensors or NumPy, never variables) are folded once per params object and
    dtype, eagerly, and the result is reused by every later call, eager or traced: inside a
    ``tf.function`` the folded tensors are captured, so the graph holds one conv and one bias add.
    Variables (which can be assigned) and graph tensors are folded inside the call.
    """
    t = _param_tensors(params)
    if not _frozen(t) or _recording():
        return _fold(t, params.eps, dtype, plan)
    cache = params.cache
    folds = cache.tf_folds
    if folds is None:
        folds = cache.tf_folds = {}
    key = (dtype, _use_depthwise(plan))
    cached = folds.get(key)
    if cached is None:
        with tf.init_scope():
            cached = folds[key] = _fold(t, params.eps, dtype, plan)
    return cached


def _use_depthwise(plan: Plan) -> bool:
    # tf.nn.depthwise_conv2d rejects stride > 1 together with dilation > 1, and (on CPU) unequal
    # row and column strides; the grouped conv takes both.
    return (
        plan.depthwise
        and plan.stride[0] == plan.stride[1]
        and (plan.stride == (1, 1) or plan.dilation == (1, 1))
    )


def _depthwise_kernel(kernel: Any, plan: Plan) -> Any:
    kh, kw, _, out = kernel.shape
    return tf.reshape(kernel, (kh, kw, plan.in_channels, out // plan.in_channels))


def _conv(x: Any, kernel: Any, params: ConvBNParams, plan: Plan, prepared: bool = False) -> Any:
    """NHWC conv with an HWIO kernel (or, when ``prepared``, the kernel already in the op's layout);
    depthwise uses the depthwise op where TF allows it. SAME goes to TF as is: its SAME is ours."""
    strides = (1, *plan.stride, 1)
    if params.padding == "SAME":
        padding: Any = "SAME"
    elif plan.pads == ((0, 0), (0, 0)):
        padding = "VALID"
    else:
        assert plan.pads is not None
        padding = [[0, 0], list(plan.pads[0]), list(plan.pads[1]), [0, 0]]
    if _use_depthwise(plan):
        dw_kernel = kernel if prepared else _depthwise_kernel(kernel, plan)
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


@functools.cache
def _several_devices() -> bool:
    return len(tf.config.list_logical_devices()) > 1


@tf.autograph.experimental.do_not_convert
def conv_bn(x: Any, params: ConvBNParams, plan: Plan) -> Any:
    # do_not_convert: there is no tensor-dependent Python control flow here, and converting it
    # would only slow tracing down.
    if _several_devices() and tf.executing_eagerly() and x.device:
        # Eager TF runs an op on its default device (a GPU when there is one), not on its input's:
        # pin the call to where x lives, as the torch and JAX backends do. Traced calls follow the
        # caller's own device scopes.
        with tf.device(x.device):
            return _conv_bn(x, params, plan)
    if plan.batch is None and None not in plan.out_hw:
        return _unknown_batch(x, params, plan)
    return _conv_bn(x, params, plan)


def _unknown_batch(x: Any, params: ConvBNParams, plan: Plan) -> Any:
    """A batch size unknown at trace time may be 0 at run time, which convbn never lets a kernel
    see (TF's oneDNN conv then keeps the input's channel count: a wrong shape in eval, an error in
    training). A ``tf.cond`` on the batch size gives the empty output the geometry's shape and keeps
    the moving statistics, as :func:`convbn.api.empty_batch` does for static shapes."""
    _, *rest = plan.out_shape
    traced: dict[str, Any] = {}

    def compute() -> Any:
        out = _conv_bn(x, params, plan)
        if not plan.training:
            return out
        y, new = out
        traced["new"] = new
        return y, new.moving_mean, new.moving_var

    def empty() -> Any:
        y = empty_output(x, (tf.shape(x)[0], *rest))
        if not plan.training:
            return y
        new = traced["new"]  # compute() is traced first: the same dtypes in both branches
        return y, tf.cast(params.moving_mean, new.moving_mean.dtype), tf.cast(params.moving_var, new.moving_var.dtype)

    out = tf.cond(tf.shape(x)[0] > 0, compute, empty)
    if not plan.training:
        return out
    y, mean, var = out
    return y, with_moving_stats(params, mean, var)


def _conv_bn(x: Any, params: ConvBNParams, plan: Plan) -> Any:
    if isinstance(x, tf.Variable):
        x = tf.convert_to_tensor(x)
    nchw = plan.data_format == "NCHW"
    if nchw:
        x = tf.transpose(x, (0, 2, 3, 1))
    dtype = x.dtype
    if not plan.training:
        w, b = _folded(params, dtype, plan)
        y = tf.nn.bias_add(_conv(x, w, params, plan, prepared=True), b)
        return tf.transpose(y, (0, 3, 1, 2)) if nchw else y
    y, new = _train(x, params, plan)
    return (tf.transpose(y, (0, 3, 1, 2)) if nchw else y), new


def _train(x: Any, params: ConvBNParams, plan: Plan) -> tuple[Any, ConvBNParams]:
    """Training on NHWC ``x``: conv, then FusedBatchNormV3, which also updates the moving stats.

    With ``exponential_avg_factor = 1 - momentum`` and the old statistics as inputs, the fused op
    returns ``momentum * old + (1 - momentum) * batch`` for the mean and, with the unbiased batch
    variance, for the variance: the ``"unbiased"`` update, done inside the kernel. For ``"biased"``
    the variance input is 0, so the op returns ``(1 - momentum) * unbiased``, and one O(channels)
    step gives ``momentum * old + (1 - momentum) * unbiased * (N - 1) / N``. Float64 (which the
    fused op rejects) and ``eps`` below cuDNN's minimum use ``tf.nn.moments`` (two-pass) instead.
    """
    t = _param_tensors(params)
    dtype = x.dtype
    cd = _compute_dtype(dtype)
    z = _conv(x, tf.cast(t.kernel, dtype), params, plan)
    if t.bias is not None:
        z = tf.nn.bias_add(z, tf.cast(t.bias, dtype))
    channels = plan.out_channels
    gamma = tf.ones([channels], cd) if t.gamma is None else tf.cast(t.gamma, cd)
    beta = tf.zeros([channels], cd) if t.beta is None else tf.cast(t.beta, cd)
    if plan.values_per_channel is not None:
        count: Any = float(plan.values_per_channel)
    else:
        count = tf.cast(tf.size(z) // channels, cd)
    old_mean, old_var = t.moving_mean, t.moving_var
    m = params.momentum
    if dtype in _FUSED_DTYPES and params.eps >= _CUDNN_MIN_EPS:
        unbiased = params.var_update == "unbiased"
        old_var_cd = tf.cast(old_var, cd)
        y, new_mean, new_var = tf.raw_ops.FusedBatchNormV3(
            x=z, scale=gamma, offset=beta, mean=tf.cast(old_mean, cd),
            variance=old_var_cd if unbiased else tf.zeros([channels], cd), epsilon=params.eps,
            exponential_avg_factor=1.0 - m, data_format="NHWC", is_training=True,
        )[:3]
        new_mean, new_var = tf.stop_gradient(new_mean), tf.stop_gradient(new_var)
        if not unbiased:
            new_var = old_var_cd * m + new_var * ((count - 1.0) / count)
    else:
        zc = tf.cast(z, cd)
        mean, var = tf.nn.moments(zc, axes=(0, 1, 2))
        y = tf.cast(tf.nn.batch_normalization(zc, mean, var, beta, gamma, params.eps), dtype)
        mean, var_unbiased = tf.stop_gradient(mean), tf.stop_gradient(var * (count / (count - 1.0)))
        new_mean, new_var = moving_update(
            params, tf.cast(old_mean, cd), tf.cast(old_var, cd), mean, var_unbiased, count
        )
    new_mean, new_var = tf.cast(new_mean, old_mean.dtype), tf.cast(new_var, old_var.dtype)
    new = with_moving_stats(params, new_mean, new_var)
    if isinstance(new_mean, _EagerTensor):
        new.cache.tf_tensors = t.with_statistics(new_mean, new_var)
    return y, new


def train_in_place(x: Any, params: ConvBNParams, plan: Plan) -> Any:
    """:func:`conv_bn`'s training step, its new moving statistics assigned to the params'
    ``tf.Variable``s (in a ``tf.function`` too: the assignments are ops of the graph)."""
    mean, var = params.moving_mean, params.moving_var
    for name, value in (("moving_mean", mean), ("moving_var", var)):
        if not isinstance(value, tf.Variable):
            raise ConvBNError(
                f"training in place assigns params.{name}, so it must be a tf.Variable. "
                f"Received: {name} of type {type(value).__name__}"
            )
    y, new = conv_bn(x, params, plan)
    mean.assign(new.moving_mean)
    var.assign(new.moving_var)
    return y


def empty_output(x: Any, shape: tuple[Any, ...]) -> Any:
    """Zeros of ``shape`` like ``x``: the output of a zero-size batch. Adding the sum of ``x`` (an
    exact 0 over no elements) keeps the result on ``x``'s device and in a tape's graph."""
    return tf.zeros(shape, x.dtype) + tf.reduce_sum(x)


def fuse(params: ConvBNParams) -> tuple[Any, Any]:
    t = _param_tensors(params)
    return _fold(t, params.eps, t.kernel.dtype)


def sync_group(sync: Any) -> Any:
    """``sync=True``: the current ``tf.distribute`` replica context (``strategy.run``'s function).

    With no strategy, TF's default replica context has one replica, whose statistics are the global
    ones: the same training step then runs with and without a strategy, as Keras's
    ``BatchNormalization(synchronized=True)`` does. In a strategy's cross-replica context (inside
    ``strategy.scope()`` but not ``strategy.run``) there is no replica to share with.
    """
    if sync is not True:
        raise ConvBNError(
            "sync for TensorFlow must be True, meaning the current tf.distribute replica context "
            f"(call conv_bn inside strategy.run). Received: sync={sync!r}"
        )
    context = tf.distribute.get_replica_context()
    if context is None:
        raise ConvBNError(
            "sync=True needs a tf.distribute replica context, and this call is in the cross-replica "
            "context of a strategy: call conv_bn inside strategy.run(...), not directly under "
            "strategy.scope(). Received: sync=True in cross-replica context"
        )
    return context


@tf.autograph.experimental.do_not_convert
def train_sync(x: Any, params: ConvBNParams, plan: Plan, group: Any) -> Any:
    """Training with the statistics of every replica of ``group`` (a ``tf.distribute.ReplicaContext``).

    Each replica reduces its own values to (count, mean, M2) per channel about a shift common to
    all replicas, in float32 (float64 for float64 input), and :func:`combine_moments` sums them
    over the replicas with ``ReplicaContext.all_reduce``: three all-reduces of one concatenated
    tensor each (the shift, then the moments). TF's all-reduce
    is differentiable (its gradient is the all-reduce of the incoming gradients), so each replica's
    gradients of its own loss include what every other replica's loss owes its values through the
    shared statistics, as torch's SyncBatchNorm does. A replica with an empty batch contributes
    zeros and still joins both all-reduces, forward and backward. One replica (no strategy) takes
    the single-device path, fused kernel included.
    """
    if group.num_replicas_in_sync == 1:
        local = plan_for(static_shape(x), params, plan.data_format, True)
        if local.empty:
            return empty_output(x, local.out_shape), params
        return conv_bn(x, params, local)
    if isinstance(x, tf.Variable):
        x = tf.convert_to_tensor(x)
    nchw = plan.data_format == "NCHW"
    if nchw:
        x = tf.transpose(x, (0, 2, 3, 1))
    t = _param_tensors(params)
    dtype = x.dtype
    cd = _compute_dtype(dtype)
    channels = plan.out_channels
    z = tf.cast(_sync_conv(x, t, params, plan), cd)
    if plan.values_per_channel is not None:
        count: Any = tf.constant(float(plan.values_per_channel), cd)
    else:
        count = tf.cast(tf.size(z) // channels, cd)
    psum = functools.partial(_all_sum, group)
    axes = (0, 1, 2)
    # Moments about a shift common to every replica (the replicas' means together, a constant to
    # autodiff): combined as they come, float32 local means carry half an ulp of |mean|, which
    # n_i (mean_i - mean)^2 turns into 3.5e-6 of the moving variance at |mean| = 1e3, std = 1
    # (tolerance 1e-6); about the shift they are of the size of the spread. One more all-reduce of
    # C + 1 numbers, the same scheme as the JAX backend's.
    raw_mean = tf.stop_gradient(tf.math.divide_no_nan(tf.reduce_sum(z, axis=axes), count))  # 0 if empty
    total, weighted = psum((count, raw_mean * count))
    shift = tf.stop_gradient(tf.math.divide_no_nan(weighted, total))
    d = z - shift
    mean = tf.math.divide_no_nan(tf.reduce_sum(d, axis=axes), count)
    m2 = tf.reduce_sum(tf.square(d - mean), axis=axes)
    total, mean, m2 = combine_moments(count, mean, m2, psum)
    # The global count is a run-time value: eagerly a ConvBNError, in a graph TF's assertion.
    if tf.executing_eagerly():
        if float(total) == 1.0:
            raise ConvBNError(ONE_VALUE_ACROSS_REPLICAS + f" Received: x.shape={tuple(x.shape)}")
    else:
        with tf.control_dependencies([tf.debugging.assert_none_equal(total, tf.ones_like(total),
                                                                     message=ONE_VALUE_ACROSS_REPLICAS)]):
            total = tf.identity(total)
    gamma = None if t.gamma is None else tf.cast(t.gamma, cd)
    beta = None if t.beta is None else tf.cast(t.beta, cd)
    y = tf.cast(tf.nn.batch_normalization(d, mean, m2 / total, beta, gamma, params.eps), dtype)
    old_mean, old_var = t.moving_mean, t.moving_var
    old_mean_cd, old_var_cd = tf.cast(old_mean, cd), tf.cast(old_var, cd)
    batch_mean, batch_m2 = shift + tf.stop_gradient(mean), tf.stop_gradient(m2)
    new_mean, new_var = moving_update(params, old_mean_cd, old_var_cd, batch_mean, batch_m2 / (total - 1.0), total)
    # Every replica empty: no statistics to learn from, the moving ones stay (as for one device).
    new_mean = tf.where(total > 0, new_mean, old_mean_cd)
    new_var = tf.where(total > 0, new_var, old_var_cd)
    new = with_moving_stats(params, tf.cast(new_mean, old_mean.dtype), tf.cast(new_var, old_var.dtype))
    return (tf.transpose(y, (0, 3, 1, 2)) if nchw else y), new


def _all_sum(group: Any, values: tuple[Any, ...]) -> tuple[Any, ...]:
    """``values`` summed over the replicas in one all-reduce: flattened, concatenated, split back."""
    flat = tf.concat([tf.reshape(v, [-1]) for v in values], axis=0)
    summed = group.all_reduce(tf.distribute.ReduceOp.SUM, flat)
    sizes = [int(np.prod(v.shape)) for v in values]
    return tuple(
        tf.reshape(part, v.shape) for part, v in zip(tf.split(summed, sizes), values, strict=True)
    )


def _sync_conv(x: Any, t: ParamArrays, params: ConvBNParams, plan: Plan) -> Any:
    """``conv(x) + bias`` (NHWC) for :func:`train_sync`. A zero-size batch never reaches the conv
    (oneDNN's returns a wrong shape for one) but gets zeros of the geometry's shape that still
    depend on ``x``, so the replica's statistics and gradients stay in the collectives' graph."""

    def compute() -> Any:
        z = _conv(x, tf.cast(t.kernel, x.dtype), params, plan)
        return z if t.bias is None else tf.nn.bias_add(z, tf.cast(t.bias, x.dtype))

    def empty() -> Any:
        return empty_output(x, (tf.shape(x)[0], *plan.out_hw, plan.out_channels))

    if plan.empty:
        return empty()
    if plan.batch is None and None not in plan.out_hw:
        return tf.cond(tf.shape(x)[0] > 0, compute, empty)
    return compute()
