"""Pure-NumPy backend: float64-capable, and the reference the other backends are checked against.

The conv is an im2col over a padded input (``sliding_window_view``) contracted per group with
``einsum``; statistics use the two-pass variance. :func:`conv_bn_vjp` is the analytic backward pass
used as the gradient oracle. Float16/bfloat16 input is computed in float32 and cast back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from convbn.backends._common import fold, moving_update
from convbn.errors import ConvBNError
from convbn.geometry import Plan
from convbn.params import ARRAY_FIELDS, ConvBNParams, with_arrays

NAME = "numpy"

__all__ = [
    "NAME",
    "asarray",
    "conv_bn",
    "conversion_key",
    "empty_output",
    "conv_bn_vjp",
    "fuse",
    "resolve_device",
    "static_shape",
    "sync_group",
    "to_backend",
    "to_numpy",
    "train_in_place",
    "train_sync",
]


def static_shape(x: np.ndarray) -> tuple[int, ...]:
    return x.shape


def resolve_device(spec: Any = None) -> str:
    if spec is None or str(spec).lower() == "cpu":
        return "cpu"
    raise ConvBNError(f"the numpy backend runs on the CPU only. Received: device={spec!r}")


def to_numpy(a: Any) -> np.ndarray:
    """Any framework's array as NumPy, in its own dtype (bfloat16 needs ml_dtypes: :mod:`convbn._dtypes`)."""
    if isinstance(a, np.ndarray):
        return a
    from convbn.dispatch import backend_name_of, load_backend

    try:
        name = backend_name_of(a)
    except TypeError:
        return np.asarray(a)
    return load_backend(name).to_numpy(a)


def asarray(a: Any, device: Any = None) -> np.ndarray:
    return to_numpy(a)


def conversion_key() -> None:
    """Nothing besides the device decides :func:`to_backend`'s result."""
    return None


def to_backend(params: ConvBNParams, device: Any = None) -> ConvBNParams:
    resolve_device(device)
    return with_arrays(
        params, **{n: to_numpy(v) for n, v in params.arrays().items()}
    )


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _pad(x: np.ndarray, pads: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    (t, b), (left, right) = pads
    return np.pad(x, ((0, 0), (t, b), (left, right), (0, 0)))


def _patches(xp: np.ndarray, kh: int, kw: int, plan: Plan) -> np.ndarray:
    """``(N, Ho, Wo, C, kh, kw)`` views of the padded NHWC input, one per output position."""
    (sh, sw), (dh, dw) = plan.stride, plan.dilation
    windows = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(1, 2))
    return windows[:, ::sh, ::sw, :, ::dh, ::dw]


def _conv(x: np.ndarray, kernel: np.ndarray, plan: Plan) -> np.ndarray:
    """NHWC conv, HWIO kernel, explicit padding; per-group einsum."""
    kh, kw, cg, out = kernel.shape
    g = plan.groups
    assert plan.pads is not None
    patches = _patches(_pad(x, plan.pads), kh, kw, plan)
    n, ho, wo = patches.shape[:3]
    patches = patches.reshape(n, ho, wo, g, cg, kh, kw)
    k = kernel.reshape(kh, kw, cg, g, out // g)
    y = np.einsum("nhwgckl,klcgo->nhwgo", patches, k, optimize=True)
    return y.reshape(n, ho, wo, out)


def _prepare(x: np.ndarray, params: ConvBNParams, plan: Plan) -> tuple[np.ndarray, dict[str, Any]]:
    cd = _compute_dtype(x.dtype)
    xs = np.asarray(x, dtype=cd)
    if plan.data_format == "NCHW":
        xs = xs.transpose(0, 2, 3, 1)
    arrays = {
        name: (None if v is None else np.asarray(to_numpy(v), dtype=cd))
        for name, v in ((n, getattr(params, n)) for n in ARRAY_FIELDS)
    }
    return xs, arrays


def _finish(y: np.ndarray, x: np.ndarray, plan: Plan) -> np.ndarray:
    if plan.data_format == "NCHW":
        y = y.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(y.astype(x.dtype, copy=False))


def _batch_stats(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of NHWC ``z``, two-pass (no E[x^2]-E[x]^2 cancellation)."""
    mean = z.mean(axis=(0, 1, 2))
    var = np.square(z - mean).mean(axis=(0, 1, 2))
    return mean, var


def conv_bn(x: np.ndarray, params: ConvBNParams, plan: Plan) -> Any:
    xs, a = _prepare(x, params, plan)
    if not plan.training:
        w, b = fold(a["kernel"], a["bias"], a["gamma"], a["beta"], a["moving_mean"], a["moving_var"],
                    params.eps, _rsqrt)
        return _finish(_conv(xs, w, plan) + b, x, plan)
    z = _conv(xs, a["kernel"], plan)
    if a["bias"] is not None:
        z = z + a["bias"]
    mean, var = _batch_stats(z)
    y = (z - mean) * _rsqrt(var + params.eps)
    if a["gamma"] is not None:
        y = y * a["gamma"]
    if a["beta"] is not None:
        y = y + a["beta"]
    count = z.shape[0] * z.shape[1] * z.shape[2]
    new_mean, new_var = moving_update(
        params, a["moving_mean"], a["moving_var"], mean, var * (count / (count - 1)), count
    )
    stat_dtype = np.result_type(to_numpy(params.moving_mean).dtype, np.float32)
    new = with_arrays(
        params, moving_mean=new_mean.astype(stat_dtype), moving_var=new_var.astype(stat_dtype)
    )
    return _finish(y, x, plan), new


def train_in_place(x: np.ndarray, params: ConvBNParams, plan: Plan) -> np.ndarray:
    """:func:`conv_bn`'s training step, its new moving statistics written into the params' arrays."""
    mean, var = params.moving_mean, params.moving_var
    for name, value in (("moving_mean", mean), ("moving_var", var)):
        if not isinstance(value, np.ndarray) or not value.flags.writeable:
            kind = "a read-only ndarray" if isinstance(value, np.ndarray) else f"of type {type(value).__name__}"
            raise ConvBNError(
                f"training in place writes params.{name} itself, so it must be a writeable NumPy "
                f"array. Received: {name} {kind}"
            )
    y, new = conv_bn(x, params, plan)
    mean[...] = new.moving_mean
    var[...] = new.moving_var
    return y  # type: ignore[no-any-return]


def _rsqrt(v: np.ndarray) -> np.ndarray:
    return 1.0 / np.sqrt(v)


def empty_output(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zeros of ``shape`` in ``x``'s dtype: the output of a zero-size batch."""
    return np.zeros(shape, x.dtype)


def fuse(params: ConvBNParams) -> tuple[np.ndarray, np.ndarray]:
    a = {n: (None if v is None else to_numpy(v)) for n, v in ((n, getattr(params, n)) for n in ARRAY_FIELDS)}
    dtype = np.result_type(*(v.dtype for v in a.values() if v is not None), np.float32)
    a = {n: (None if v is None else v.astype(dtype, copy=False)) for n, v in a.items()}
    w, b = fold(a["kernel"], a["bias"], a["gamma"], a["beta"], a["moving_mean"], a["moving_var"],
                params.eps, _rsqrt)
    return w, b


def conv_bn_vjp(
    x: np.ndarray, params: ConvBNParams, dy: np.ndarray, plan: Plan
) -> dict[str, np.ndarray]:
    """Analytic gradients of ``sum(conv_bn(x, params) * dy)``: the float64 gradient oracle.

    Returns a dict with ``x``, ``kernel`` and, where the params have them, ``bias``, ``gamma``
    and ``beta``; each in the compute dtype (float64 for float64 input). The moving statistics get
    no gradient, as in every framework.
    """
    xs, a = _prepare(x, params, plan)
    dys = np.asarray(dy, dtype=xs.dtype)
    if plan.data_format == "NCHW":
        dys = dys.transpose(0, 2, 3, 1)
    kernel = a["kernel"]
    kh, kw, cg, out = kernel.shape
    g = plan.groups
    assert plan.pads is not None
    xp = _pad(xs, plan.pads)
    patches = _patches(xp, kh, kw, plan)
    n, ho, wo = patches.shape[:3]
    patches = patches.reshape(n, ho, wo, g, cg, kh, kw)
    k = kernel.reshape(kh, kw, cg, g, out // g)
    z = np.einsum("nhwgckl,klcgo->nhwgo", patches, k, optimize=True).reshape(n, ho, wo, out)
    if a["bias"] is not None:
        z = z + a["bias"]
    gamma = a["gamma"] if a["gamma"] is not None else np.ones(out, xs.dtype)
    grads: dict[str, np.ndarray] = {}
    axes = (0, 1, 2)
    if plan.training:
        mean, var = _batch_stats(z)
        inv = _rsqrt(var + params.eps)
        zhat = (z - mean) * inv
        m = n * ho * wo
        dzhat = dys * gamma
        dz = inv / m * (m * dzhat - dzhat.sum(axis=axes) - zhat * (dzhat * zhat).sum(axis=axes))
    else:
        inv = _rsqrt(a["moving_var"] + params.eps)
        zhat = (z - a["moving_mean"]) * inv
        dz = dys * gamma * inv
    if a["gamma"] is not None:
        grads["gamma"] = (dys * zhat).sum(axis=axes)
    if a["beta"] is not None:
        grads["beta"] = dys.sum(axis=axes)
    if a["bias"] is not None:
        grads["bias"] = dz.sum(axis=axes)
    dzg = dz.reshape(n, ho, wo, g, out // g)
    grads["kernel"] = np.einsum("nhwgckl,nhwgo->klcgo", patches, dzg, optimize=True).reshape(
        kh, kw, cg, out
    )
    # dx: scatter each kernel tap's contribution back onto the padded input.
    dpatch = np.einsum("nhwgo,klcgo->nhwgckl", dzg, k, optimize=True).reshape(n, ho, wo, g * cg, kh, kw)
    dxp = np.zeros_like(xp)
    (sh, sw), (dh, dw) = plan.stride, plan.dilation
    for i in range(kh):
        for j in range(kw):
            dxp[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw, :] += (
                dpatch[..., i, j]
            )
    (t, _), (left, _) = plan.pads
    dx = dxp[:, t : t + xs.shape[1], left : left + xs.shape[2], :]
    if plan.data_format == "NCHW":
        dx = dx.transpose(0, 3, 1, 2)
    grads["x"] = np.ascontiguousarray(dx)
    return grads


def sync_group(sync: Any) -> Any:
    """NumPy has no replicas: a ``sync`` is refused, naming the engines that have them."""
    raise ConvBNError(
        "the numpy backend runs in one process with no replicas; sync needs torch.distributed, JAX "
        f"collectives (shard_map/pmap) or tf.distribute. Received: sync={sync!r}"
    )


def train_sync(x: np.ndarray, params: ConvBNParams, plan: Plan, group: Any) -> Any:
    return sync_group(group)
