"""Math shared by every backend, written with operators only so it runs on any array type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from convbn.caches import ParamArrays
from convbn.geometry import share_plans
from convbn.params import ConvBNParams, with_arrays

__all__ = [
    "ONE_VALUE_ACROSS_REPLICAS", "combine_moments", "fold", "fold_arrays", "moving_update", "with_moving_stats",
]


def fold(
    kernel: Any,
    bias: Any,
    gamma: Any,
    beta: Any,
    mean: Any,
    var: Any,
    eps: float,
    rsqrt: Callable[[Any], Any],
) -> tuple[Any, Any]:
    """BatchNorm folded into an HWIO conv: ``W' = W * s``, ``b' = beta + (b - mean) * s``,
    ``s = gamma / sqrt(var + eps)``. Absent gamma/beta/bias mean 1/0/0."""
    scale = rsqrt(var + eps)
    if gamma is not None:
        scale = gamma * scale
    shift = (bias - mean) * scale if bias is not None else -mean * scale
    if beta is not None:
        shift = shift + beta
    return kernel * scale, shift


def fold_arrays(a: ParamArrays, eps: float, rsqrt: Callable[[Any], Any]) -> tuple[Any, Any]:
    """:func:`fold` of a backend's cached :class:`~convbn.caches.ParamArrays`."""
    return fold(a.kernel, a.bias, a.gamma, a.beta, a.moving_mean, a.moving_var, eps, rsqrt)


def moving_update(
    params: ConvBNParams,
    old_mean: Any,
    old_var: Any,
    batch_mean: Any,
    batch_var_unbiased: Any,
    count: Any,
) -> tuple[Any, Any]:
    """New moving statistics from the batch mean and the *unbiased* batch variance.

    ``count`` is the number of values per channel; the biased variance is derived from the unbiased
    one in O(channels), so no backend needs a second pass over the data.
    """
    m = params.momentum
    var = batch_var_unbiased if params.var_update == "unbiased" else batch_var_unbiased * ((count - 1) / count)
    new_mean = old_mean * m + batch_mean * (1.0 - m)
    new_var = old_var * m + var * (1.0 - m)
    return new_mean, new_var


#: The refusal every backend gives when the replicas of a sync group hold one value per channel
#: together: there is no batch variance to normalize with, and the unbiased one divides by zero.
ONE_VALUE_ACROSS_REPLICAS = (
    "training needs more than one value per channel across the replicas of the sync group to compute "
    "batch statistics; together they hold 1 (N * H_out * W_out summed over replicas)."
)


def combine_moments(
    count: Any, mean: Any, m2: Any, psum: Callable[[tuple[Any, ...]], tuple[Any, ...]]
) -> tuple[Any, Any, Any]:
    """Per-channel moments of every replica's values together, from each replica's own.

    Each replica has ``count`` values per channel with mean ``mean`` and sum of squared deviations
    ``m2`` (a replica with no values passes 0, 0, 0). ``psum`` sums a tuple of arrays over the
    replicas (one all-reduce per call, differentiable in every framework that has one). Returns
    the global ``(count, mean, m2)``:

    ``N = sum n_i``, ``mean = sum(n_i mean_i) / N``, ``M2 = sum(M2_i + n_i (mean_i - mean)^2)``,

    the parallel form of the two-pass variance (Chan et al.): no ``E[x^2] - E[x]^2``. Uneven
    replicas are weighted by their counts. In float32, local means far from zero carry half an ulp
    of ``|mean|``, which ``n_i (mean_i - mean)^2`` turns into a variance error of about
    ``ulp(|mean|) / (std sqrt(n_i))`` (3e-6 at ``|mean|`` = 1e3, std = 1): pass moments taken
    about a shift common to the replicas (their means together, one all-reduce earlier: the JAX
    and TF backends), or combine in float64 (torch).
    """
    total, weighted = psum((count, mean * count))
    global_mean = weighted / total
    (global_m2,) = psum((m2 + count * (mean - global_mean) ** 2,))
    return total, global_mean, global_m2


def with_moving_stats(params: ConvBNParams, moving_mean: Any, moving_var: Any) -> ConvBNParams:
    """``params`` with new moving statistics (same shapes), keeping its validated plans."""
    return share_plans(params, with_arrays(params, moving_mean=moving_mean, moving_var=moving_var))
