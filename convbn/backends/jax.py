"""JAX backend.

The whole op is one jitted function per (shapes, dtypes, static config, plan), so eager calls
compile once and never retrace; inside the caller's own ``jax.jit`` it is inlined. Eval folds
BatchNorm into the kernel: inside the trace under the caller's jit, once per params object for
eager calls. The conv takes the formulation XLA runs fastest: a matmul for 1x1 kernels, shifted
multiply-adds for depthwise kernels, ``conv_general_dilated`` otherwise. Training statistics
use the two-pass variance in float32 or wider (Flax's default E[x^2]-E[x]^2 collapses on
large-mean data). Float64 needs ``jax_enable_x64``, which convbn never sets on its own.

Training on several devices: the recommended JAX path needs no ``sync`` at all. Shard the batch
over a mesh (``jax.device_put(x, NamedSharding(mesh, P("data")))``, params replicated) and call
``conv_bn`` under plain ``jax.jit``: the program is written for the whole batch, so its statistics
are the whole batch's, and XLA's SPMD partitioner inserts the cross-device reductions itself.
``sync=axis_name`` is for code that is already per-device, inside ``shard_map`` or ``pmap``: there
each device sees only its shard, and :func:`train_sync` all-reduces the moments with
``lax.psum``, whose transpose makes the gradients those of the global loss. Both shard evenly,
so every device holds the same number of images.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from convbn.backends._common import (
    ONE_VALUE_ACROSS_REPLICAS,
    combine_moments,
    fold,
    moving_update,
    with_moving_stats,
)
from convbn.caches import Folded
from convbn.errors import ConvBNError
from convbn.geometry import Plan
from convbn.params import ConvBNParams, with_arrays

NAME = "jax"

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


def static_shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def resolve_device(spec: Any = None) -> Any:
    """A ``jax.Device``; ``None`` is JAX's default device (GPU/TPU when present)."""
    if spec is None:
        return jax.devices()[0]
    if isinstance(spec, jax.Device):
        return spec
    text = str(spec).lower()
    kind, _, index = text.partition(":")
    platform = {"cuda": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}.get(kind)
    if platform is None or (index and not index.isdigit()):
        raise ConvBNError(
            f"device must be 'cpu', 'gpu', 'cuda', 'tpu' or one of those with ':N'. Received: device={spec!r}"
        )
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        raise ConvBNError(f"device {spec!r} was requested but JAX sees no {platform.upper()}") from None
    i = int(index or 0)
    if i >= len(devices):
        raise ConvBNError(f"device {spec!r} was requested but JAX sees {len(devices)} {platform.upper()}(s)")
    return devices[i]


def to_numpy(a: Any) -> np.ndarray:
    return np.asarray(a)


def asarray(a: Any, device: Any = None) -> Any:
    if not isinstance(a, jax.Array):
        from convbn.backends.numpy import to_numpy as any_to_numpy

        a = jnp.asarray(any_to_numpy(a))
    return a if device is None else jax.device_put(a, device)


def conversion_key() -> bool:
    """What besides the device decides :func:`to_backend`'s result: the x64 flag (off, float64
    NumPy data becomes float32 arrays), so converted params cached under one setting are not
    reused under the other."""
    return bool(jax.config.read("jax_enable_x64"))


def to_backend(params: ConvBNParams, device: Any = None) -> ConvBNParams:
    dev = resolve_device(device) if device is not None else None
    return with_arrays(params, **{n: asarray(v, dev) for n, v in params.arrays().items()})


def _compute_dtype(dtype: Any) -> Any:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


#: Depthwise kernels with at most this many taps run as shifted multiply-adds (see _conv).
_MAX_TAPS = 49


def _pointwise(kernel: Any, plan: Plan) -> bool:
    """A 1x1 dense conv without padding on NHWC data: a matmul over the channel axis."""
    return (
        kernel.shape[0] == 1 and kernel.shape[1] == 1 and plan.groups == 1
        and plan.data_format == "NHWC" and plan.pads == ((0, 0), (0, 0))
    )


def _tapwise(x: Any, kernel: Any, plan: Plan) -> bool:
    """A float32/float64 depthwise conv with one output per input channel and a small kernel
    (lower precisions keep the convolution, which accumulates in float32)."""
    return (
        plan.depthwise and plan.out_channels == plan.in_channels
        and kernel.shape[0] * kernel.shape[1] <= _MAX_TAPS
        and x.dtype in (jnp.float32, jnp.float64)
    )


def _depthwise_taps(x: Any, kernel: Any, plan: Plan) -> Any:
    """Depthwise conv as a sum over kernel taps of strided input slices times per-channel weights.

    XLA fuses this into one loop over the output; on CPU that is ~17x faster than XLA's grouped
    convolution for 8x56x56x128 (3x3), and its gradient ~8x faster.
    """
    kh, kw = kernel.shape[0], kernel.shape[1]
    (sh, sw), (dh, dw) = plan.stride, plan.dilation
    ho, wo = plan.out_hw
    assert ho is not None and wo is not None
    (top, bottom), (left, right) = plan.pads  # type: ignore[misc]
    nhwc = plan.data_format == "NHWC"
    h_axis, w_axis = (1, 2) if nhwc else (2, 3)
    pad = [(0, 0, 0)] * 4
    pad[h_axis], pad[w_axis] = (top, bottom, 0), (left, right, 0)
    xp = lax.pad(x, jnp.zeros((), x.dtype), pad)
    weights = kernel[:, :, 0, :] if nhwc else kernel[:, :, 0, :, None, None]
    out = None
    for i in range(kh):
        for j in range(kw):
            start = [0, 0, 0, 0]
            limit = list(xp.shape)
            strides = [1, 1, 1, 1]
            start[h_axis], start[w_axis] = i * dh, j * dw
            limit[h_axis], limit[w_axis] = i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1
            strides[h_axis], strides[w_axis] = sh, sw
            term = lax.slice(xp, start, limit, strides) * weights[i, j]
            out = term if out is None else out + term
    return out


def _conv(x: Any, kernel: Any, plan: Plan) -> Any:
    """The conv, in the formulation XLA runs fastest for its shape."""
    if _pointwise(kernel, plan):
        # XLA:CPU runs dot_general through a faster kernel than a 1x1 convolution (about 20% in
        # eval and 6x with the gradient on 8x56x56x256 -> 64); a stride subsamples the input.
        sh, sw = plan.stride
        if (sh, sw) != (1, 1):
            x = x[:, ::sh, ::sw, :]
        return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))
    if _tapwise(x, kernel, plan):
        return _depthwise_taps(x, kernel, plan)
    layout = plan.data_format
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=plan.stride,
        padding=plan.pads,  # type: ignore[arg-type]  # always resolved: JAX shapes are static
        rhs_dilation=plan.dilation,
        dimension_numbers=(layout, "HWIO", layout),
        feature_group_count=plan.groups,
    )


def _channel_shape(plan: Plan) -> tuple[int, ...]:
    return (-1,) if plan.data_format == "NHWC" else (-1, 1, 1)


def _cast(v: Any, to: Any) -> Any:
    return None if v is None else jnp.asarray(v, to)


def _eval(x: Any, params: ConvBNParams, plan: Plan) -> Any:
    """Eval inside a trace.

    XLA:CPU runs the conv as a library call and fuses no epilogue into it, so a bias add costs the
    same output pass as BatchNorm's scale and shift. Folding the kernel inside the trace would only
    add a pass over the kernel on every call; instead the folded per-channel scale and shift are
    applied to the conv output in one fused pass. (Eager calls fold the kernel once per params
    object: see :func:`conv_bn`.)
    """
    dtype = x.dtype
    cd = _compute_dtype(dtype)
    shape = _channel_shape(plan)
    scale, shift = fold(
        jnp.ones((), cd), _cast(params.bias, cd), _cast(params.gamma, cd), _cast(params.beta, cd),
        _cast(params.moving_mean, cd), _cast(params.moving_var, cd), params.eps, lax.rsqrt,
    )
    z = _conv(x, _cast(params.kernel, dtype), plan)
    return (z.astype(cd) * scale.reshape(shape) + shift.reshape(shape)).astype(dtype)


def _train(x: Any, params: ConvBNParams, plan: Plan) -> tuple[Any, Any, Any]:
    """Training: ``(y, new moving mean, new moving var)``; two-pass batch variance."""
    dtype = x.dtype
    cd = _compute_dtype(dtype)
    shape = _channel_shape(plan)
    z = _conv(x, _cast(params.kernel, dtype), plan)
    if params.bias is not None:
        z = z + _cast(params.bias, dtype).reshape(shape)
    axes = (0, 1, 2) if plan.data_format == "NHWC" else (0, 2, 3)
    zc = z.astype(cd)
    mean = jnp.mean(zc, axis=axes)
    centered = zc - mean.reshape(shape)
    var = jnp.mean(jnp.square(centered), axis=axes)
    scale = lax.rsqrt(var + params.eps)
    if params.gamma is not None:
        scale = scale * _cast(params.gamma, cd)
    y = centered * scale.reshape(shape)
    if params.beta is not None:
        y = y + _cast(params.beta, cd).reshape(shape)
    count = plan.values_per_channel
    assert count is not None
    mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
    old_mean, old_var = jnp.asarray(params.moving_mean), jnp.asarray(params.moving_var)
    new_mean, new_var = moving_update(
        params, old_mean.astype(cd), old_var.astype(cd), mean, var * (count / (count - 1)), count
    )
    return y.astype(dtype), new_mean.astype(old_mean.dtype), new_var.astype(old_var.dtype)


def _conv_bn(x: Any, params: ConvBNParams, plan: Plan) -> Any:
    """The op inside a trace (the caller's ``jax.jit``, ``grad``, ``vmap``...)."""
    if not plan.training:
        return _eval(x, params, plan)
    y, mean, var = _train(x, params, plan)
    return y, with_moving_stats(params, mean, var)


_eval_jit = jax.jit(_eval, static_argnames=("plan",))
# Eager training returns only the new statistics from the compiled function: returning whole
# params would copy the unchanged kernel, gamma and beta through XLA on every step.
_train_jit = jax.jit(_train, static_argnames=("plan",))


@functools.partial(jax.jit, static_argnames=("plan",))
def _conv_bias(x: Any, kernel: Any, bias: Any, plan: Plan) -> Any:
    return _conv(x, kernel, plan) + bias.reshape(_channel_shape(plan))


def _folded(params: ConvBNParams, dtype: Any) -> tuple[Any, Any]:
    """The folded kernel and bias in ``dtype``, cached per params object: JAX arrays are immutable,
    so a params object's fold never goes stale."""
    cache = params.cache
    folds = cache.jax_folds
    if folds is None:
        folds = cache.jax_folds = {}
    cached = folds.get(dtype)
    if cached is None:
        kernel, bias = fuse(params)
        cached = folds[dtype] = Folded(kernel.astype(dtype), bias.astype(dtype))
    return cached


def conv_bn(x: Any, params: ConvBNParams, plan: Plan) -> Any:
    if isinstance(x, jax.core.Tracer):
        return _conv_bn(x, params, plan)
    traced_params = any(isinstance(v, jax.core.Tracer) for v in params.arrays().values())
    if not plan.training:
        if traced_params:
            return _eval_jit(x, params, plan)
        # Eager eval: fold once per params object, then one jitted conv + bias per call.
        kernel, bias = _folded(params, x.dtype)
        return _conv_bias(x, kernel, bias, plan)
    y, mean, var = _train_jit(x, params, plan)
    # The new params keep this call's plans, so a training loop does not plan again every step.
    return y, with_moving_stats(params, mean, var)


def train_in_place(x: Any, params: ConvBNParams, plan: Plan) -> Any:
    """Always a ``ConvBNError``: JAX arrays are immutable, so there are no statistics to write;
    :func:`conv_bn` in training returns them in new params (what Flax's layers store)."""
    raise ConvBNError(
        "training in place writes params.moving_mean and params.moving_var themselves, and JAX "
        "arrays cannot be written: use conv_bn(x, params, training=True), which returns the new "
        f"statistics in new params. Received: moving_mean of type {type(params.moving_mean).__name__}"
    )


def empty_output(x: Any, shape: tuple[int, ...]) -> Any:
    """Zeros of ``shape`` in ``x``'s dtype, on ``x``'s devices: the output of a zero-size batch."""
    return jnp.zeros(shape, x.dtype) + jnp.sum(x)


@functools.partial(jax.jit, static_argnames=("eps",))
def _fuse(kernel: Any, bias: Any, gamma: Any, beta: Any, mean: Any, var: Any, eps: float) -> Any:
    dtype = kernel.dtype
    cd = _compute_dtype(dtype)
    k, b, g, bt, m, v = (None if a is None else a.astype(cd) for a in (kernel, bias, gamma, beta, mean, var))
    w, b = fold(k, b, g, bt, m, v, eps, lax.rsqrt)
    return w.astype(dtype), b.astype(dtype)


def fuse(params: ConvBNParams) -> tuple[Any, Any]:
    p = to_backend(params)
    return _fuse(p.kernel, p.bias, p.gamma, p.beta, p.moving_mean, p.moving_var, params.eps)  # type: ignore[no-any-return]


AxisNames = str | tuple[str, ...]


def sync_group(sync: Any) -> AxisNames:
    """The axis name(s) of the enclosing ``shard_map``/``pmap``, checked to be bound here.

    JAX resolves axis names at trace time; an unbound one would surface as a ``NameError`` (or an
    ``AssertionError`` from ``psum`` inside ``shard_map``) deep in the trace, so it is looked up
    first and refused with the fix.
    """
    names = sync if isinstance(sync, tuple) else (sync,)
    if not names or not all(isinstance(n, str) for n in names):
        raise ConvBNError(
            "sync on JAX must be the axis name of the enclosing shard_map/pmap, or a non-empty tuple of "
            f"them (e.g. sync='data'). Received: sync={sync!r}"
        )
    for name in names:
        try:
            lax.axis_size(name)
        except NameError:
            raise ConvBNError(
                f"sync={sync!r} needs the axis {name!r} bound by an enclosing shard_map or pmap; none is "
                "here. Call conv_bn inside jax.shard_map(..., mesh=...) or jax.pmap(..., axis_name=...) "
                f"over {name!r}, or drop sync under plain jax.jit on a sharded batch (XLA then computes "
                "global statistics itself)"
            ) from None
    return sync  # type: ignore[no-any-return]


def _psum(axes: AxisNames) -> Any:
    """``combine_moments``'s all-reduce: the tuple flattened into one array, so one collective."""

    def psum(arrays: tuple[Any, ...]) -> tuple[Any, ...]:
        flat = lax.psum(jnp.concatenate([jnp.ravel(a) for a in arrays]), axes)
        out, start = [], 0
        for a in arrays:
            out.append(flat[start : start + a.size].reshape(a.shape))
            start += a.size
        return tuple(out)

    return psum


def _train_sync(x: Any, params: ConvBNParams, plan: Plan, axes: AxisNames) -> tuple[Any, Any, Any]:
    """:func:`_train` with every device's moments combined over ``axes``.

    The moments are taken about ``shift``, every device's means together, rounded once and the
    same on every device. Combined as they come, float32 local means carry half an ulp of
    ``|mean|``, which ``n_i (mean_i - mean)^2`` turns into a variance error of about
    ``ulp(|mean|) / (std sqrt(n_i))``: 3e-6 at ``|mean|`` = 1e3, std = 1, where one device is at
    1e-7. About ``shift`` the local means are of the size of the spread, so they round to
    nothing that matters. JAX has no float64 without ``jax_enable_x64``, so the precision comes
    from the frame, at the price of one all-reduce of the per-channel means. The shift is a
    constant to autodiff (moments about any constant have the same gradients), so the backward
    pass does not all-reduce for it.
    """
    dtype = x.dtype
    cd = _compute_dtype(dtype)
    shape = _channel_shape(plan)
    count = plan.values_per_channel
    assert count is not None
    n = jnp.asarray(count, cd)
    psum = _psum(axes)
    reduce_axes = (0, 1, 2) if plan.data_format == "NHWC" else (0, 2, 3)
    zeros = jnp.zeros((plan.out_channels,), cd)
    if count:
        z = _conv(x, _cast(params.kernel, dtype), plan)
        if params.bias is not None:
            z = z + _cast(params.bias, dtype).reshape(shape)
        zc = z.astype(cd)
        raw_mean = jnp.mean(zc, axis=reduce_axes)
    else:  # an empty shard: nothing to convolve, but its zeros still join the all-reduces
        raw_mean = zeros
    total, weighted = psum((n, lax.stop_gradient(raw_mean) * n))
    shift = lax.stop_gradient(weighted / total)
    if count:
        d = zc - shift.reshape(shape)
        local_mean = jnp.mean(d, axis=reduce_axes)
        local_m2 = jnp.sum(jnp.square(d - local_mean.reshape(shape)), axis=reduce_axes)
    else:
        local_mean = local_m2 = zeros
    total, mean, m2 = combine_moments(n, local_mean, local_m2, psum)
    if count:
        scale = lax.rsqrt(m2 / total + params.eps)
        if params.gamma is not None:
            scale = scale * _cast(params.gamma, cd)
        y = (d - mean.reshape(shape)) * scale.reshape(shape)
        if params.beta is not None:
            y = y + _cast(params.beta, cd).reshape(shape)
        y = y.astype(dtype)
    else:
        y = empty_output(x, plan.out_shape)  # type: ignore[arg-type]  # JAX shapes are static
    mean, m2, total = shift + lax.stop_gradient(mean), lax.stop_gradient(m2), lax.stop_gradient(total)
    old_mean, old_var = jnp.asarray(params.moving_mean), jnp.asarray(params.moving_var)
    new_mean, new_var = moving_update(
        params, old_mean.astype(cd), old_var.astype(cd), mean, m2 / (total - 1), total
    )
    if not count:  # every shard may be empty: then there are no statistics to learn from
        new_mean = jnp.where(total > 0, new_mean, old_mean.astype(cd))
        new_var = jnp.where(total > 0, new_var, old_var.astype(cd))
    return y, new_mean.astype(old_mean.dtype), new_var.astype(old_var.dtype)


def train_sync(x: Any, params: ConvBNParams, plan: Plan, group: AxisNames) -> tuple[Any, ConvBNParams]:
    """Training with the moments of every device over the axes ``group``.

    Runs in the caller's trace (``shard_map``/``pmap`` bind axis names only while tracing), so there
    is no jit of its own here. ``lax.psum`` is differentiable, and its transpose sums the cotangents
    over the devices: each device's gradient of its own loss w.r.t. its ``x`` is the gradient of
    the sum of every device's loss, as torch's SyncBatchNorm gives.

    Raises:
        ConvBNError: when the devices together hold one value per channel (known at trace time:
            every device holds the same number).
    """
    names = group if isinstance(group, tuple) else (group,)
    total = (plan.values_per_channel or 0) * math.prod(lax.axis_size(n) for n in names)
    if total == 1:
        raise ConvBNError(ONE_VALUE_ACROSS_REPLICAS + f" Received: x.shape={tuple(x.shape)}, sync={group!r}")
    y, mean, var = _train_sync(x, params, plan, group)
    return y, with_moving_stats(params, mean, var)
