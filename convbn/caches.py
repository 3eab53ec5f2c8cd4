"""What a :class:`~convbn.params.ConvBNParams` caches about itself: one named, typed slot per use.

Derived values (the validated plans, converted tensors, folded kernels) are computed on first use
and kept on the params object they were derived from, in its :class:`CacheSlots` (``params.cache``).
A params object's arrays are treated as immutable (torch tensors changed in place are caught by
their version counters), so an entry never needs invalidating while its params live; a new params
object (from a training step, ``dataclasses.replace``, a pytree transform, unpickling or
``copy``) starts with empty slots, except what :func:`convbn.geometry.share_plans` and the
backends hand on deliberately. Slots are never pickled, copied or compared.

This module imports nothing of convbn's and no framework: the entries hold framework objects as
``Any``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from convbn.geometry import Plan
    from convbn.params import ConvBNParams

__all__ = ["CacheSlots", "Folded", "NativeKey", "ParamArrays", "PlanKey", "TorchFold"]

#: ``plan_for``'s key: the input's shape, data format, training, sync.
PlanKey = tuple[tuple[Any, ...], str, bool, bool]


class ParamArrays(NamedTuple):
    """The six array fields of a params object as one backend's tensors (None where unset)."""

    kernel: Any
    bias: Any
    gamma: Any
    beta: Any
    moving_mean: Any
    moving_var: Any

    def with_statistics(self, moving_mean: Any, moving_var: Any) -> ParamArrays:
        """These arrays with new moving statistics (a training step's); ``_replace`` without
        its keyword machinery, which costs a microsecond per step."""
        return ParamArrays(self.kernel, self.bias, self.gamma, self.beta, moving_mean, moving_var)


class Folded(NamedTuple):
    """BatchNorm folded into the conv: the weight in the layout the backend's conv takes, and the bias."""

    weight: Any
    bias: Any


class NativeKey(NamedTuple):
    """What decides the params :func:`convbn.conv_bn` converts for NumPy input: the backend, the
    device (as text) and the backend's ``conversion_key()``."""

    backend: str
    device: str
    conversion: Hashable


@dataclasses.dataclass(slots=True, eq=False)
class TorchFold:
    """A torch fold and what it was computed from, valid while the sources' version counters stay.

    ``sources`` are the six arrays folded (held, so their counters can be read and never belong
    to a newer tensor), an absent one replaced by an object whose ``_version`` is constant, so
    the hot path reads six counters without a loop. ``version`` is the sum of their counters
    when ``folded`` was computed (-1: not yet): a counter only ever grows, so the sum changes
    exactly when one of them does. ``per_call``: a source is an inference tensor, which has no
    version counter, so nothing can tell when it changes and it is folded on every call instead.
    """

    sources: tuple[Any, Any, Any, Any, Any, Any]
    per_call: bool
    version: int = -1
    folded: Folded | None = None


class CacheSlots:
    """The caches of one params object, one attribute per use, each None until first filled.

    The defaults live on the class, so creating the slots (on every training step) costs one
    empty object; an attribute is set on the instance when its first value is computed.
    """

    #: :func:`convbn.geometry.plan_for`'s validated plans; shared with the params of a training
    #: step (same static config and shapes) by :func:`convbn.geometry.share_plans`.
    plans: dict[PlanKey, Plan] | None = None
    #: :func:`convbn.conv_bn` on NumPy input: these params converted to a backend, per key.
    native: dict[NativeKey, ConvBNParams] | None = None
    #: torch backend: the arrays as torch tensors, per device.
    torch_tensors: dict[Any, ParamArrays] | None = None
    #: torch backend: the eval fold, per ``(device, dtype)``.
    torch_folds: dict[tuple[Any, Any], TorchFold] | None = None
    #: TensorFlow backend: the arrays as TF tensors or variables (eager ones only).
    tf_tensors: ParamArrays | None = None
    #: TensorFlow backend: the eval fold of frozen params, per ``(dtype, depthwise kernel)``.
    tf_folds: dict[tuple[Any, bool], Folded] | None = None
    #: JAX backend: the eager eval fold, per dtype.
    jax_folds: dict[Any, Folded] | None = None

    def __repr__(self) -> str:
        return f"CacheSlots({', '.join(sorted(vars(self)))})"
