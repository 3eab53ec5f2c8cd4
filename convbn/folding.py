"""The one rule for a conv bias, a zero bias and a missing gamma or beta, wherever params meet a
destination (a checkpoint format, a model's layers, a single conv + BatchNorm pair).

An absent tensor means its neutral value: no conv bias is a zero bias, no gamma (``scale=False``,
``affine=False``) is ones, no beta (``center=False``) is zeros. So:

- a destination with a conv bias receiving params without one gets a zero bias;
- a destination without a conv bias receiving params with one gets it folded into the BatchNorm
  when a fold target is given (exact in eval mode, see :func:`fold_bias`); otherwise a bias that is
  all zero is dropped (nothing is lost) and any other bias is refused, since it would be lost;
- a destination without a gamma (or beta) takes params whose gamma is all ones (beta all zeros) or
  absent; any other value would be lost, and is reported in :attr:`Fitted.lost`.

Imports nothing of convbn's but the data types, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from convbn.checkpoint import Layer
from convbn.errors import ConvBNError
from convbn.params import ConvBNParams

__all__ = ["FILLS", "BiasAction", "FoldTarget", "Fitted", "filled", "fit", "fold_bias", "fold_layer_bias", "loses"]

FoldTarget = Literal["beta", "moving_mean"]

#: What an absent conv bias, gamma or beta stands for.
FILLS = {"bias": 0.0, "gamma": 1.0, "beta": 0.0}

#: What :func:`fit` did with the conv bias: ``"folded"`` into the BatchNorm, ``"dropped"`` (all
#: zero, the destination has none), ``"zero"`` (a zero bias added), ``"refused"`` (nonzero, the
#: destination has none and no fold target was given; the params come back unchanged), or None.
BiasAction = Literal["folded", "dropped", "zero", "refused"]


def loses(value: Any, name: str) -> bool:
    """Whether a destination without ``name`` (``"bias"``, ``"gamma"``, ``"beta"``) would lose
    ``value``: it is present and not all equal to the fill (:data:`FILLS`)."""
    if value is None:
        return False
    from convbn.backends.numpy import to_numpy  # any framework's array, a torch Parameter too

    return not bool(np.all(to_numpy(value) == FILLS[name]))


def filled(value: Any, name: str, n: int, dtype: Any) -> Any:
    """``value``, or, when it is absent, ``n`` copies of ``name``'s fill in ``dtype``."""
    return np.full(n, FILLS[name], dtype) if value is None else value


@dataclasses.dataclass(frozen=True)
class Fitted:
    """Params as a destination holds them (see :func:`fit`)."""

    params: ConvBNParams
    bias: BiasAction | None
    #: ``"bias"``, ``"gamma"``, ``"beta"``: what the destination lacks while the params hold a
    #: value other than its fill (a bias only when it was refused, not folded).
    lost: tuple[str, ...]


def fit(
    params: ConvBNParams,
    *,
    bias: bool | None,
    gamma: bool = True,
    beta: bool = True,
    fold: FoldTarget | None = None,
) -> Fitted:
    """The params as a destination that holds (True), lacks (False) or takes either (None) a conv
    bias, and holds or lacks a gamma and a beta, receives them; the rule of this module.

    A bias folded into beta changes beta before it is checked against ``beta=False``.

    Raises:
        ConvBNError: for an unknown ``fold``.
    """
    if fold is not None and fold not in ("beta", "moving_mean"):
        raise ConvBNError(f"fold_bias must be 'beta' or 'moving_mean'. Received: fold_bias={fold!r}")
    action: BiasAction | None = None
    lost: list[str] = []
    if bias is True and params.bias is None:
        from convbn.backends.numpy import to_numpy

        dtype = to_numpy(params.kernel).dtype
        params, action = dataclasses.replace(params, bias=np.zeros(params.out_channels, dtype)), "zero"
    elif bias is False and params.bias is not None:
        if fold is not None:
            params, action = fold_bias(params, fold), "folded"
        elif loses(params.bias, "bias"):
            action = "refused"
            lost.append("bias")
        else:
            params, action = dataclasses.replace(params, bias=None), "dropped"
    lost += [name for name, held in (("gamma", gamma), ("beta", beta)) if not held and loses(getattr(params, name), name)]
    return Fitted(params, action, tuple(lost))


def fold_bias(params: ConvBNParams, into: FoldTarget = "beta") -> ConvBNParams:
    """Remove the conv bias by folding it into BatchNorm; exact at inference.

    ``into="beta"``: ``beta' = beta + gamma * b / sqrt(moving_var + eps)``.
    ``into="moving_mean"``: ``moving_mean' = moving_mean - b`` (eps-independent, and it stays right
    when the target is fine-tuned, since training re-estimates the mean with the bias gone).
    Computed in float64, stored in the original dtypes. Params without a bias come back unchanged.

    Raises:
        ConvBNError: for an unknown ``into``.
    """
    if into not in ("beta", "moving_mean"):
        raise ConvBNError(f"fold_bias must be 'beta' or 'moving_mean'. Received: fold_bias={into!r}")
    if params.bias is None:
        return params
    beta, mean = _folded(params.bias, params.gamma, params.beta, params.moving_mean, params.moving_var, params.eps, into)
    return dataclasses.replace(params, bias=None, beta=beta, moving_mean=mean)


def _folded(bias: Any, gamma: Any, beta: Any, mean: Any, var: Any, eps: float, into: FoldTarget) -> tuple[Any, Any]:
    """``(beta', moving_mean')`` once a bias before a BatchNorm is folded into it (see
    :func:`fold_bias`): the one rule for a conv, a transposed conv and a dense layer."""
    b = np.asarray(bias, np.float64)
    if into == "moving_mean":
        m = np.asarray(mean)
        return beta, (m.astype(np.float64) - b).astype(m.dtype)
    g = FILLS["gamma"] if gamma is None else np.asarray(gamma, np.float64)
    dtype = np.asarray(beta if beta is not None else bias).dtype
    old = FILLS["beta"] if beta is None else np.asarray(beta, np.float64)
    new_beta = old + g * b / np.sqrt(np.asarray(var, np.float64) + eps)
    return np.asarray(new_beta).astype(dtype), mean


def fold_layer_bias(layer: Layer, into: FoldTarget = "beta") -> Layer:
    """:func:`fold_bias` for a dense layer or transposed conv followed by a BatchNorm
    (:attr:`Layer.norm`): the same formula; a layer without bias or BatchNorm comes back unchanged.
    A BatchNorm whose eps the source did not state folds into the moving mean, which needs none."""
    norm = layer.norm
    if layer.bias is None or norm is None or norm.kind != "batch_norm" or layer.kernel is None:
        return layer
    if norm.eps is None:
        into = "moving_mean"
    beta, mean = _folded(layer.bias, norm.gamma, norm.beta, norm.moving_mean, norm.moving_var, norm.eps or 0.0, into)
    tensors = {f: t for f, t in layer.tensors.items() if f != "bias"}
    return dataclasses.replace(
        layer, bias=None, norm=dataclasses.replace(norm, beta=beta, moving_mean=mean), tensors=tensors
    )
