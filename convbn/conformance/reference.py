"""The float64 oracle and the error measures every check uses.

The oracle is convbn's NumPy backend run in float64 (two-pass statistics, im2col conv) and its
analytic backward pass :func:`convbn.backends.numpy.conv_bn_vjp`. The test suite checks both
against an independent loop-based reference and finite differences; here they are the yardstick.

Errors are relative, with a scale chosen so that one number means the same thing for every case:

- outputs ``y``: per output channel, ``max |actual - expected| / max |reference|`` over that
  channel, worst channel reported. Per channel, so a channel scaled up by a tiny variance cannot
  hide an error in the others. The scale is at least the size of the terms the output is computed
  from, so that cancellation does not turn rounding into a large relative error: ``|gamma|`` in
  training, ``|gamma| (sum |x| |w| + |bias| + |moving_mean|) / sqrt(moving_var + eps)`` in eval
  (see :func:`train_floor`, :func:`eval_floor`; :class:`Forward` carries it).
- ``moving_mean``: ``|actual - expected| / max(|reference|, sqrt(reference moving_var))``: the mean
  is measured in units of the spread it was estimated from, so a mean near zero is not a division
  by zero.
- ``moving_var``: ``|actual - expected| / reference``.
- gradients: ``max |actual - expected| / max |reference|`` over the whole tensor. The conv bias
  in training is the exception: batch statistics cancel any constant added before BatchNorm, so its
  exact gradient is zero and its computed value is rounding of a sum of terms each bounded by
  ``|gamma| |dy| / sqrt(var + eps)``; that sum, per channel, is its scale. Where ``|mean| >> std``
  (the extreme cases) the kernel gradient ``sum(x dz)`` cancels in the same way, the ``dz`` of a
  channel summing to zero, and its scale is ``sum |x| |dz|`` (:func:`kernel_grad_scale`), the
  standard error bound of the dot products it is made of.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from convbn.backends import numpy as np_backend
from convbn.geometry import plan_for
from convbn.params import ConvBNParams, with_arrays

__all__ = [
    "Forward",
    "bias_grad_scale",
    "forward",
    "gradients",
    "grad_error",
    "kernel_grad_scale",
    "mean_error",
    "output_error",
    "eval_floor",
    "to_float64",
    "train_floor",
    "var_error",
]

_TINY = 1e-300


@dataclasses.dataclass(frozen=True)
class Forward:
    """The reference results of one forward call (NHWC); ``moving_*`` are None in eval."""

    y: np.ndarray
    moving_mean: np.ndarray | None = None
    moving_var: np.ndarray | None = None
    #: per channel, the least scale of an error in ``y`` (:func:`eval_floor`, :func:`train_floor`)
    floor: np.ndarray | None = None


def to_float64(params: ConvBNParams) -> ConvBNParams:
    """``params`` with every array as float64 NumPy."""
    return with_arrays(params, **{k: np.asarray(v, np.float64) for k, v in params.arrays().items()})


def forward(x: np.ndarray, params: ConvBNParams, training: bool) -> Forward:
    """The float64 result of ``conv_bn`` on NHWC ``x`` (computed in float64 whatever its dtype)."""
    x64 = np.asarray(x, np.float64)
    p64 = to_float64(params)
    plan = plan_for(x64.shape, p64, "NHWC", training)
    out = np_backend.conv_bn(x64, p64, plan)
    if not training:
        return Forward(out, floor=eval_floor(x64, p64))
    y, new = out
    return Forward(y, np.asarray(new.moving_mean, np.float64), np.asarray(new.moving_var, np.float64),
                   floor=train_floor(p64))


def gradients(x: np.ndarray, params: ConvBNParams, dy: np.ndarray, training: bool) -> dict[str, np.ndarray]:
    """Float64 gradients of ``sum(conv_bn(x, params) * dy)`` (NHWC), by the analytic backward pass."""
    x64 = np.asarray(x, np.float64)
    p64 = to_float64(params)
    plan = plan_for(x64.shape, p64, "NHWC", training)
    grads = np_backend.conv_bn_vjp(x64, p64, np.asarray(dy, np.float64), plan)
    fields = {"x", *p64.arrays()}
    return {k: v for k, v in grads.items() if k in fields}


def bias_grad_scale(x: np.ndarray, params: ConvBNParams, dy: np.ndarray) -> float:
    """The training-mode conv-bias gradient's scale: ``max_c sum |dy_c| |gamma_c| / sqrt(var_c + eps)``."""
    x64 = np.asarray(x, np.float64)
    p64 = to_float64(params)
    out = p64.out_channels
    bare = dataclasses.replace(
        p64, gamma=None, beta=None, moving_mean=np.zeros(out), moving_var=np.ones(out), eps=0.0
    )
    z = np_backend.conv_bn(x64, bare, plan_for(x64.shape, bare, "NHWC", False))
    var = z.reshape(-1, out).var(axis=0)
    gamma = np.abs(p64.gamma) if p64.gamma is not None else np.ones(out)
    dsum = np.abs(np.asarray(dy, np.float64)).reshape(-1, out).sum(axis=0)
    return float(np.max(dsum * gamma / np.sqrt(var + p64.eps)))


def kernel_grad_scale(x: np.ndarray, params: ConvBNParams, dy: np.ndarray) -> float:
    """The training-mode kernel gradient's scale: ``max sum |x| |dz|`` over kernel entries.

    ``dK = sum over positions of x (x) dz`` with ``dz = gamma r (dy - mean(dy) - zhat mean(dy zhat))``;
    ``dz`` sums to zero per channel, so for inputs far from zero (``|mean| >> std``) the sum
    cancels and its rounding is relative to ``sum |x| |dz|``, not to the small result.
    """
    x64 = np.asarray(x, np.float64)
    p64 = to_float64(params)
    out = p64.out_channels
    bare = dataclasses.replace(
        p64, bias=None, gamma=None, beta=None, moving_mean=np.zeros(out), moving_var=np.ones(out), eps=0.0
    )
    z = np_backend.conv_bn(x64, bare, plan_for(x64.shape, bare, "NHWC", False))
    axes = (0, 1, 2)
    mean, var = z.mean(axis=axes), z.var(axis=axes)
    r = 1.0 / np.sqrt(var + p64.eps)
    zhat = (z - mean) * r
    dy64 = np.asarray(dy, np.float64)
    gamma = np.ones(out) if p64.gamma is None else p64.gamma
    dz = gamma * r * (dy64 - dy64.mean(axis=axes) - zhat * (dy64 * zhat).mean(axis=axes))
    plain = dataclasses.replace(bare, kernel=np.abs(p64.kernel))
    dkernel = np_backend.conv_bn_vjp(np.abs(x64), plain, np.abs(dz), plan_for(x64.shape, plain, "NHWC", False))
    return float(np.max(dkernel["kernel"]))


def _finite_or_inf(value: float) -> float:
    return value if np.isfinite(value) else float("inf")


def output_error(
    actual: Any, expected: Any, reference: np.ndarray, channel_axis: int, floor: Any = None
) -> tuple[float, str]:
    """Worst per-channel ``max |actual - expected| / max(max |reference|, floor)``, and which channel.

    ``floor`` (per channel, or None) keeps a channel whose exact output is ~0 from turning
    rounding into a relative error of 1: see :func:`train_floor`.
    """
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    r = np.asarray(reference, np.float64)
    if a.shape != e.shape:
        return float("inf"), f"shape {a.shape}, expected {e.shape}"
    if e.size == 0:
        return 0.0, "empty"
    axes = tuple(i for i in range(a.ndim) if i != channel_axis % a.ndim)
    diff = np.abs(a - e)
    diff = np.where(np.isnan(diff), np.inf, diff)
    scale = np.maximum(np.max(np.abs(r), axis=axes), _TINY)
    if floor is not None:
        scale = np.maximum(scale, np.asarray(floor, np.float64))
    per_channel = np.max(diff, axis=axes) / scale
    worst = int(np.argmax(per_channel))
    return _finite_or_inf(float(per_channel[worst])), f"channel {worst}"


def eval_floor(x: np.ndarray, params: ConvBNParams) -> np.ndarray:
    """The scale of the terms an eval-mode output channel is computed from.

    Eval computes ``a (z + bias - moving_mean) + beta`` with ``a = gamma / sqrt(moving_var + eps)``
    and ``z`` the conv. Rounding of ``z`` is relative to ``sum |x| |w|`` over its window (the
    standard bound for a dot product), and rounding of the subtraction to ``|moving_mean|``; where
    these cancel, the exact output is small, and measured against it alone a correct float32 result
    on a few positions per channel reads as an error of 1e-5 or more. The floor is
    ``|a| (max over positions of (|x| * |w|) + |bias| + |moving_mean|)`` per channel.
    """
    x64 = np.asarray(x, np.float64)
    p64 = to_float64(params)
    out = p64.out_channels
    bare = dataclasses.replace(
        p64, kernel=np.abs(p64.kernel), bias=None, gamma=None, beta=None,
        moving_mean=np.zeros(out), moving_var=np.ones(out), eps=0.0,
    )
    abs_conv = np_backend.conv_bn(np.abs(x64), bare, plan_for(x64.shape, bare, "NHWC", False))
    terms = abs_conv.reshape(-1, out).max(axis=0, initial=0.0) + np.abs(p64.moving_mean)
    if p64.bias is not None:
        terms = terms + np.abs(p64.bias)
    gamma = np.ones(out) if p64.gamma is None else np.abs(p64.gamma)
    return gamma * terms / np.sqrt(p64.moving_var + p64.eps)


def train_floor(params: ConvBNParams) -> np.ndarray:
    """The scale of a training-mode output channel: ``|gamma|`` (1 without gamma).

    Training normalizes each channel to unit variance before gamma and beta, so ``|gamma|`` is the
    size its values have; a batch whose values in a channel are all equal (e.g. every output
    position in the padding) has the exact output ``beta`` there, and rounding of ``z - mean``
    is measured against that size rather than against ~0.
    """
    out = params.out_channels
    return np.ones(out) if params.gamma is None else np.abs(np.asarray(params.gamma, np.float64))


def mean_error(actual: Any, expected: Any, reference_mean: Any, reference_var: Any) -> tuple[float, str]:
    """Worst ``|actual - expected| / max(|mean|, sqrt(var))`` over channels, and which channel."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    scale = np.maximum(
        np.maximum(np.abs(np.asarray(reference_mean, np.float64)), np.sqrt(np.asarray(reference_var, np.float64))),
        _TINY,
    )
    err = np.abs(a - e) / scale
    err = np.where(np.isnan(err), np.inf, err)
    worst = int(np.argmax(err))
    return _finite_or_inf(float(err[worst])), f"channel {worst}"


def var_error(actual: Any, expected: Any, reference_var: Any) -> tuple[float, str]:
    """Worst ``|actual - expected| / reference_var`` over channels, and which channel."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    err = np.abs(a - e) / np.maximum(np.abs(np.asarray(reference_var, np.float64)), _TINY)
    err = np.where(np.isnan(err), np.inf, err)
    worst = int(np.argmax(err))
    return _finite_or_inf(float(err[worst])), f"channel {worst}"


def grad_error(actual: Any, expected: Any, reference: Any, scale: float | None = None) -> float:
    """``max |actual - expected| / max(max |reference|, scale)``."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.shape != e.shape:
        return float("inf")
    if e.size == 0:
        return 0.0
    diff = float(np.max(np.abs(a - e)))
    denom = max(float(np.max(np.abs(np.asarray(reference, np.float64)))), scale or 0.0, _TINY)
    return _finite_or_inf(diff / denom)
