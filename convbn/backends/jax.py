"""JAX backend.

The whole op is one jitted function per (shapes, dtypes, static config, plan), so eager calls
compile once and never retrace; inside the caller's own ``jax.jit`` it is inlined. Eval folds
BatchNorm into the kernel inside the trace (XLA keeps it off the hot path). Training statistics
use the two-pass variance in float32 or wider (Flax's default E[x^2]-E[x]^2 collapses on
large-mean data). Float64 needs ``jax_enable_x64``, which convbn never sets on its own.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from convbn.backends._common import fold, moving_update
from convbn.errors import ConvBNError
from convbn.geometry import Plan
from convbn.params import ConvBNParams, with_arrays

NAME = "jax"

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


def to_backend(params: ConvBNParams, device: Any = None) -> ConvBNParams:
    dev = resolve_device(device) if device is not None else None
    return with_arrays(params, **{n: asarray(v, dev) for n, v in params.arrays().items()})


def _compute_dtype(dtype: Any) -> Any:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _conv(x: Any, kernel: Any, plan: Plan) -> Any:
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


def _conv_bn(x: Any, params: ConvBNParams, plan: Plan) -> Any:
    dtype = x.dtype
    cd = _compute_dtype(dtype)
    shape = _channel_shape(plan)

    def cast(v: Any, to: Any) -> Any:
        return None if v is None else jnp.asarray(v, to)

    if not plan.training:
        w, b = fold(
            cast(params.kernel, cd), cast(params.bias, cd), cast(params.gamma, cd),
            cast(params.beta, cd), cast(params.moving_mean, cd), cast(params.moving_var, cd),
            params.eps, lax.rsqrt,
        )
        return _conv(x, w.astype(dtype), plan) + b.astype(dtype).reshape(shape)
    z = _conv(x, cast(params.kernel, dtype), plan)
    if params.bias is not None:
        z = z + cast(params.bias, dtype).reshape(shape)
    axes = (0, 1, 2) if plan.data_format == "NHWC" else (0, 2, 3)
    zc = z.astype(cd)
    mean = jnp.mean(zc, axis=axes)
    centered = zc - mean.reshape(shape)
    var = jnp.mean(jnp.square(centered), axis=axes)
    scale = lax.rsqrt(var + params.eps)
    if params.gamma is not None:
        scale = scale * cast(params.gamma, cd)
    y = centered * scale.reshape(shape)
    if params.beta is not None:
        y = y + cast(params.beta, cd).reshape(shape)
    count = plan.values_per_channel
    assert count is not None
    mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
    old_mean, old_var = jnp.asarray(params.moving_mean), jnp.asarray(params.moving_var)
    new_mean, new_var = moving_update(
        params, old_mean.astype(cd), old_var.astype(cd), mean, var * (count / (count - 1)), count
    )
    new = with_arrays(
        params, moving_mean=new_mean.astype(old_mean.dtype), moving_var=new_var.astype(old_var.dtype)
    )
    return y.astype(dtype), new


_conv_bn_jit = jax.jit(_conv_bn, static_argnames=("plan",))


def conv_bn(x: Any, params: ConvBNParams, plan: Plan) -> Any:
    if isinstance(x, jax.core.Tracer):
        return _conv_bn(x, params, plan)
    return _conv_bn_jit(x, params, plan)


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
