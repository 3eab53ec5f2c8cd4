"""`ConvBNSpec`: everything static about one Conv2D + BatchNorm pair, validated without arrays.

The spec holds the geometry (kernel size, channel counts, stride, padding, dilation, groups) and
the BatchNorm convention (eps, momentum as the fraction kept, var_update). It is frozen and
hashable, so it can key caches and be JAX's static pytree data: :class:`convbn.ConvBNParams` is a
spec plus arrays. Layers and adapters validate their configuration by building one, before any
weight exists, and turning SAME/VALID/explicit padding into per-side pads happens here only
(:meth:`ConvBNSpec.pads`).

This module imports nothing of convbn's but the error type: the types at the bottom.

Example:
    >>> from convbn import ConvBNSpec
    >>> spec = ConvBNSpec(kernel_size=3, in_channels=16, out_channels=32, stride=2)
    >>> spec.pads(8, 7)          # TF's SAME: an odd total puts the extra row/column after
    ((0, 1), (1, 1))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from convbn.errors import ConvBNError

__all__ = [
    "ConvBNSpec",
    "ExplicitPadding",
    "Padding",
    "Pair",
    "VarUpdate",
    "normalize_padding",
    "normalize_pair",
    "output_size",
    "same_pads",
    "is_int",
    "symmetric",
]

Pair = tuple[int, int]
ExplicitPadding = tuple[tuple[int, int], tuple[int, int]]
Padding = str | int | Sequence[int] | Sequence[Sequence[int]]
VarUpdate = Literal["unbiased", "biased"]

_VAR_UPDATES = ("unbiased", "biased")


def is_int(value: Any) -> bool:
    """A Python or NumPy int, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def normalize_pair(value: Any, name: str, minimum: int = 1) -> Pair:
    """An int or a pair of ints, each ``>= minimum``, as a pair."""
    if is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(
        is_int(v) for v in value
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ConvBNError(f"{name} must be an int or a pair of ints. Received: {name}={value!r}")
    if min(pair) < minimum:
        raise ConvBNError(f"{name} must be >= {minimum}. Received: {name}={value!r}")
    return pair


def normalize_padding(padding: Any, name: str = "padding") -> str | ExplicitPadding:
    """``"SAME"``, ``"VALID"``, or explicit ``((top, bottom), (left, right))``.

    Accepts the two names in any case, an int (all sides), a pair ``(ph, pw)`` (top/bottom and
    left/right), or the explicit nested form.
    """
    if isinstance(padding, str):
        upper = padding.upper()
        if upper in ("SAME", "VALID"):
            return upper
    elif is_int(padding):
        if padding >= 0:
            p = int(padding)
            return ((p, p), (p, p))
    elif isinstance(padding, Sequence) and len(padding) == 2:
        if all(is_int(p) and p >= 0 for p in padding):
            ph, pw = (int(p) for p in padding)
            return ((ph, ph), (pw, pw))
        if all(
            isinstance(side, Sequence)
            and not isinstance(side, str)
            and len(side) == 2
            and all(is_int(p) and p >= 0 for p in side)
            for side in padding
        ):
            (t, b), (left, right) = padding
            return ((int(t), int(b)), (int(left), int(right)))
    raise ConvBNError(
        f"{name} must be 'SAME', 'VALID', a non-negative int, a pair (ph, pw) or "
        f"((top, bottom), (left, right)). Received: {name}={padding!r}"
    )


def same_pads(n: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TF 'SAME' padding ``(before, after)`` for one spatial dim; an odd total puts the extra after.

    ``out = ceil(n / s)``, ``k_eff = (k - 1) * d + 1``, ``total = max((out - 1) * s + k_eff - n, 0)``.
    """
    out = -(-n // s)
    k_eff = (k - 1) * d + 1
    total = max((out - 1) * s + k_eff - n, 0)
    return (total // 2, total - total // 2)


def output_size(n: int, k: int, s: int, d: int, before: int, after: int) -> int:
    """Output length of a conv over ``n`` inputs padded by ``before``/``after``."""
    return (n + before + after - ((k - 1) * d + 1)) // s + 1


def symmetric(pads: ExplicitPadding) -> bool:
    """True when each spatial dim pads the same before and after (a conv's own padding suffices)."""
    return all(before == after for before, after in pads)


#: The spec's fields, in order: geometry, then BatchNorm convention.
FIELDS = (
    "kernel_size", "in_channels", "out_channels", "stride", "padding", "dilation", "groups",
    "eps", "momentum", "var_update",
)


def _channels(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if not is_int(value) or value < 0:
        raise ConvBNError(f"{name} must be an int >= 0. Received: {name}={value!r}")
    return int(value)


def _normalized(values: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The spec's fields from ``values``, checked and in canonical form; errors name each value
    as ``names`` spells it (a layer's own argument names), else by the field's name."""

    def name(field: str) -> str:
        return names.get(field, field)

    out: dict[str, Any] = {}
    kernel_size = values.get("kernel_size")
    out["kernel_size"] = None if kernel_size is None else normalize_pair(kernel_size, name("kernel_size"))
    out["stride"] = normalize_pair(values.get("stride", 1), name("stride"))
    out["padding"] = normalize_padding(values.get("padding", "SAME"), name("padding"))
    out["dilation"] = normalize_pair(values.get("dilation", 1), name("dilation"))
    groups = values.get("groups", 1)
    if not is_int(groups) or groups < 1:
        raise ConvBNError(f"{name('groups')} must be a positive int. Received: {name('groups')}={groups!r}")
    out["groups"] = int(groups)
    known = []
    for field in ("in_channels", "out_channels"):
        out[field] = _channels(values.get(field), name(field))
        if out[field] is not None:
            known.append(field)
    if any(out[field] % groups for field in known):
        raise ConvBNError(
            f"{name('groups')} must be a positive int dividing {' and '.join(name(f) for f in known)}. "
            f"Received: {name('groups')}={groups!r}, " + ", ".join(f"{name(f)}={out[f]}" for f in known)
        )
    eps = values.get("eps", 1e-3)
    if not isinstance(eps, (float, int, np.floating, np.integer)) or not (math.isfinite(eps) and eps >= 0):
        raise ConvBNError(f"{name('eps')} must be a finite number >= 0. Received: {name('eps')}={eps!r}")
    out["eps"] = float(eps)
    momentum = values.get("momentum", 0.99)
    if not isinstance(momentum, (float, int, np.floating, np.integer)) or not 0.0 <= momentum <= 1.0:
        raise ConvBNError(
            f"{name('momentum')} is the fraction of the old moving value kept and must be in [0, 1] "
            "(torch's momentum=0.1 is 0.9 here; see convbn.conventions). "
            f"Received: {name('momentum')}={momentum!r}"
        )
    out["momentum"] = float(momentum)
    var_update = values.get("var_update", "unbiased")
    if var_update not in _VAR_UPDATES:
        raise ConvBNError(
            f"{name('var_update')} must be 'unbiased' or 'biased'. Received: {name('var_update')}={var_update!r}"
        )
    out["var_update"] = var_update
    return out


@dataclasses.dataclass(frozen=True, init=False)
class ConvBNSpec:
    """The static part of one Conv2D + BatchNorm: geometry and BatchNorm convention, no arrays.

    Building one validates every setting, so a layer can check its configuration before it has
    weights. Specs are frozen, hashable and equal when their settings are; ``dataclasses.replace``
    makes a changed (re-validated) copy. :class:`convbn.ConvBNParams` holds one as ``params.spec``
    (with the kernel's size and channel counts) and uses it as its static JAX pytree data.

    Args:
        kernel_size: ``(kh, kw)`` or an int; None when not known yet.
        in_channels: the conv's input channels; None when not known yet (a Keras layer before
            ``build``).
        out_channels: the conv's output channels; None when not known yet.
        stride: an int or a pair ``(sh, sw)``.
        padding: ``"SAME"`` (TF semantics: an odd total puts the extra row/column at the
            bottom/right), ``"VALID"``, an int, a pair ``(ph, pw)`` or ``((top, bottom), (left,
            right))``. Ints and pairs are stored in the explicit form.
        dilation: an int or a pair.
        groups: number of conv groups, dividing both channel counts; ``in_channels == groups`` is
            depthwise.
        eps: added to the variance inside the square root.
        momentum: fraction of the old moving value kept in training,
            ``new = momentum * old + (1 - momentum) * batch``. torch's ``momentum=0.1`` is 0.9 here.
        var_update: which batch variance feeds the moving variance in training: ``"unbiased"``
            (N-1; torch, TF's fused op, tf-slim, Keras 2) or ``"biased"`` (N; Keras 3, Flax).

    Raises:
        ConvBNError: for a malformed setting, naming it and the value received.

    Example:
        >>> from convbn import ConvBNSpec
        >>> spec = ConvBNSpec(kernel_size=3, in_channels=4, out_channels=8, padding=1, momentum=0.9)
        >>> spec.kernel_size, spec.padding, spec.pads(5, 5)
        ((3, 3), ((1, 1), (1, 1)), ((1, 1), (1, 1)))
        >>> spec == ConvBNSpec(kernel_size=(3, 3), in_channels=4, out_channels=8, padding=(1, 1), momentum=0.9)
        True
    """

    kernel_size: Pair | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    stride: Pair = (1, 1)
    padding: str | ExplicitPadding = "SAME"
    dilation: Pair = (1, 1)
    groups: int = 1
    eps: float = 1e-3
    momentum: float = 0.99
    var_update: VarUpdate = "unbiased"

    def __init__(
        self,
        kernel_size: int | Sequence[int] | None = None,
        in_channels: int | None = None,
        out_channels: int | None = None,
        stride: int | Sequence[int] = 1,
        padding: Padding = "SAME",
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        eps: float = 1e-3,
        momentum: float = 0.99,
        var_update: VarUpdate = "unbiased",
    ) -> None:
        self._set(_normalized({
            "kernel_size": kernel_size, "in_channels": in_channels, "out_channels": out_channels,
            "stride": stride, "padding": padding, "dilation": dilation, "groups": groups, "eps": eps,
            "momentum": momentum, "var_update": var_update,
        }, {}))

    def _set(self, values: Mapping[str, Any]) -> None:
        state = self.__dict__
        state.update(values)
        # Hashed on every jitted call (the spec is the pytree's static data): computed once.
        state["_hash"] = hash(tuple(state[f] for f in FIELDS))

    @classmethod
    def named(cls, names: Mapping[str, str], **settings: Any) -> ConvBNSpec:
        """A spec whose errors name the settings as a layer's arguments do (``names`` maps a
        field to the argument, e.g. ``{"stride": "strides"}``).

        Raises:
            ConvBNError: as the constructor, with the arguments' names.
        """
        unknown = settings.keys() - set(FIELDS)
        if unknown:
            raise TypeError(f"ConvBNSpec has no field {sorted(unknown)}")
        spec = object.__new__(cls)
        spec._set(_normalized(settings, names))
        return spec

    def __hash__(self) -> int:
        return self.__dict__["_hash"]  # type: ignore[no-any-return]

    def __getstate__(self) -> dict[str, Any]:
        return {f: self.__dict__[f] for f in FIELDS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._set(_normalized(state, {}))

    def settings(self) -> dict[str, Any]:
        """The fields by name (what ``ConvBNSpec(**settings)`` takes back)."""
        return {f: self.__dict__[f] for f in FIELDS}

    def pads(self, height: int | None = None, width: int | None = None) -> ExplicitPadding | None:
        """The per-side pads ``((top, bottom), (left, right))`` for an input of ``height`` x ``width``.

        VALID and explicit padding do not depend on the size. TF's SAME does only along a dim with
        stride > 1: there ``total = max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)``, split
        with the extra row/column after; at stride 1 it is ``(k - 1) * d`` whatever ``n``.

        Args:
            height: the input's height, or None when unknown.
            width: the input's width, or None when unknown.

        Returns:
            The pads, or None for SAME along a strided dim whose size is unknown.

        Raises:
            ConvBNError: for SAME padding on a spec without a ``kernel_size``.

        Example:
            >>> from convbn import ConvBNSpec
            >>> ConvBNSpec(kernel_size=4).pads()     # stride 1: the same pads at any size
            ((1, 2), (1, 2))
            >>> ConvBNSpec(kernel_size=3, stride=2).pads() is None
            True
        """
        padding = self.padding
        if padding == "VALID":
            return ((0, 0), (0, 0))
        if padding != "SAME":
            return padding  # type: ignore[return-value]
        if self.kernel_size is None:
            raise ConvBNError("SAME padding needs the kernel size to resolve its pads. Received: kernel_size=None")
        pads = []
        for n, k, s, d in zip((height, width), self.kernel_size, self.stride, self.dilation, strict=True):
            if s == 1:
                n = 1  # stride 1: the total is k_eff - 1 at every size
            elif n is None:
                return None
            pads.append(same_pads(n, k, s, d))
        return (pads[0], pads[1])
