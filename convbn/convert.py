"""Checkpoints as convbn sees them, and conversion between formats.

A :class:`Checkpoint` is an ordered ``dict`` of conv+BatchNorm pairs as :class:`ConvBNParams` (HWIO,
kept-fraction momentum, the source's eps and ``var_update``), plus every other tensor and a list of
what was deliberately dropped, so a conversion never loses anything silently. Format modules live
in :mod:`convbn.formats`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import numpy as np

from convbn.errors import ConvBNError
from convbn.params import ConvBNParams

__all__ = ["Checkpoint", "LayerSource", "fold_bias", "natural_key"]

FoldTarget = Literal["beta", "moving_mean"]


@dataclasses.dataclass
class LayerSource:
    """Where one layer came from: the source tensor names and why the conv and BatchNorm paired.

    ``reason`` is one of ``"explicit"`` (``pairs=``/``--pair``), ``"graph"`` (``.meta`` or ``.keras``
    config), ``"naming"`` (a naming convention) or ``"order"`` (a conv followed by a BatchNorm with
    matching channels).
    """

    conv: dict[str, str]
    bn: dict[str, str]
    reason: str


@dataclasses.dataclass
class Checkpoint:
    """Conv+BatchNorm layers and the rest of a checkpoint.

    Attributes:
        layers: conv+BatchNorm pairs in source order, keyed by the conv's own name in the source.
        tensors: every other tensor, by its source name (dense layers, lone convs, embeddings).
        dropped: names deliberately left out (optimizer slots, ``global_step``), never silently.
        format: the source format name.
        convention: name of the :mod:`convbn.conventions` preset the source follows, if known.
        sources: per layer, the source tensor names and the pairing reason.
        notes: human-readable report lines (defaults assumed, overrides applied, folds done).
        metadata: free-form provenance carried to formats that can store it (safetensors).
    """

    layers: dict[str, ConvBNParams] = dataclasses.field(default_factory=dict)
    tensors: dict[str, Any] = dataclasses.field(default_factory=dict)
    dropped: list[str] = dataclasses.field(default_factory=list)
    format: str = ""
    convention: str | None = None
    sources: dict[str, LayerSource] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that puts ``conv2`` before ``conv10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


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
    b = np.asarray(params.bias, np.float64)
    if into == "moving_mean":
        mean = np.asarray(params.moving_mean)
        return dataclasses.replace(params, bias=None, moving_mean=(mean.astype(np.float64) - b).astype(mean.dtype))
    var = np.asarray(params.moving_var, np.float64)
    gamma = 1.0 if params.gamma is None else np.asarray(params.gamma, np.float64)
    dtype = np.asarray(params.beta if params.beta is not None else params.bias).dtype
    beta = 0.0 if params.beta is None else np.asarray(params.beta, np.float64)
    new_beta = beta + gamma * b / np.sqrt(var + params.eps)
    return dataclasses.replace(params, bias=None, beta=np.asarray(new_beta).astype(dtype))
