"""`ConvBNParams`: the parameters of one Conv2D + BatchNorm pair, in one canonical layout.

The kernel is HWIO, ``(kh, kw, in_channels // groups, out_channels)``: the layout TF, Keras and
Flax store. Backends transpose internally. Momentum is the fraction of the old moving value kept
(``new = momentum * old + (1 - momentum) * batch``), the Keras/Flax/slim convention.

The class is a frozen dataclass (``dataclasses.replace`` works) and a JAX pytree: the six array
fields are leaves, the geometry and convention fields are static. It is registered with JAX when
JAX is imported, whichever of the two is imported first, so ``import convbn`` never imports JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import math
import operator
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Literal

import numpy as np

from convbn.errors import ConvBNError

__all__ = ["ARRAY_FIELDS", "STATIC_FIELDS", "ConvBNParams", "Padding"]

Pair = tuple[int, int]
ExplicitPadding = tuple[tuple[int, int], tuple[int, int]]
Padding = str | int | Sequence[int] | Sequence[Sequence[int]]
VarUpdate = Literal["unbiased", "biased"]

#: The array fields, in pytree-leaf order.
ARRAY_FIELDS = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_var")
#: The static fields: geometry and BatchNorm convention.
STATIC_FIELDS = ("stride", "padding", "dilation", "groups", "eps", "momentum", "var_update")
_VAR_UPDATES = ("unbiased", "biased")
_ARRAY_SET = frozenset(ARRAY_FIELDS)
_arrays_getter = operator.attrgetter(*ARRAY_FIELDS)
_static_getter = operator.attrgetter(*STATIC_FIELDS)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def normalize_pair(value: Any, name: str, minimum: int = 1) -> Pair:
    """An int or a pair of ints, each ``>= minimum``, as a pair."""
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(
        _is_int(v) for v in value
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ConvBNError(f"{name} must be an int or a pair of ints. Received: {name}={value!r}")
    if min(pair) < minimum:
        raise ConvBNError(f"{name} must be >= {minimum}. Received: {name}={value!r}")
    return pair


def normalize_padding(padding: Any) -> str | ExplicitPadding:
    """``"SAME"``, ``"VALID"``, or explicit ``((top, bottom), (left, right))``.

    Accepts the two names in any case, an int (all sides), a pair ``(ph, pw)`` (top/bottom and
    left/right), or the explicit nested form.
    """
    if isinstance(padding, str):
        upper = padding.upper()
        if upper in ("SAME", "VALID"):
            return upper
    elif _is_int(padding):
        if padding >= 0:
            p = int(padding)
            return ((p, p), (p, p))
    elif isinstance(padding, Sequence) and len(padding) == 2:
        if all(_is_int(p) and p >= 0 for p in padding):
            ph, pw = (int(p) for p in padding)
            return ((ph, ph), (pw, pw))
        if all(
            isinstance(side, Sequence)
            and not isinstance(side, str)
            and len(side) == 2
            and all(_is_int(p) and p >= 0 for p in side)
            for side in padding
        ):
            (t, b), (left, right) = padding
            return ((int(t), int(b)), (int(left), int(right)))
    raise ConvBNError(
        "padding must be 'SAME', 'VALID', a non-negative int, a pair (ph, pw) or "
        f"((top, bottom), (left, right)). Received: padding={padding!r}"
    )


def _shape(array: Any) -> tuple[int | None, ...] | None:
    """The shape of an array of any framework, with None for unknown dims; None if it has none."""
    shape = getattr(array, "shape", None)
    if shape is None:
        return None
    try:
        dims = tuple(shape)
    except TypeError:  # a TF TensorShape of unknown rank
        return None
    return tuple(d if _is_int(d) else getattr(d, "value", None) for d in dims)


@dataclasses.dataclass(frozen=True, eq=False)
class ConvBNParams:
    """Parameters and configuration of one Conv2D followed by BatchNorm.

    Args:
        kernel: conv kernel, HWIO ``(kh, kw, in_channels // groups, out_channels)``.
        moving_mean: BatchNorm moving mean, ``(out_channels,)``.
        moving_var: BatchNorm moving variance, ``(out_channels,)``.
        bias: conv bias ``(out_channels,)``, or None when the conv has none (tf-slim style).
        gamma: BatchNorm scale, or None for a scale of 1 (slim's ``scale=False``).
        beta: BatchNorm offset, or None for an offset of 0.
        stride: an int or a pair ``(sh, sw)``.
        padding: ``"SAME"`` (TF semantics: an odd total puts the extra row/column at the
            bottom/right), ``"VALID"``, an int, a pair ``(ph, pw)`` or ``((top, bottom), (left, right))``.
            Ints and pairs are stored in the explicit form.
        dilation: an int or a pair.
        groups: number of conv groups; ``in_channels == groups`` is depthwise.
        eps: added to the variance inside the square root.
        momentum: fraction of the old moving value kept in training,
            ``new = momentum * old + (1 - momentum) * batch``. torch's ``momentum=0.1`` is 0.9 here.
        var_update: which batch variance feeds ``moving_var`` in training: ``"unbiased"`` (N-1;
            torch, TF's fused op, tf-slim, Keras 2) or ``"biased"`` (N; Keras 3, Flax). The output is
            always normalized with the biased batch variance.

    Arrays may be NumPy arrays or any framework's arrays; they are treated as immutable (derived
    values such as the folded eval kernel are cached per params object). Params compare by
    identity, so a changed params object is a new object, e.g. from ``dataclasses.replace``.

    Raises:
        ConvBNError: for a malformed geometry spec, convention, or mismatched array shapes.

    Example:
        >>> import numpy as np, convbn
        >>> p = convbn.ConvBNParams(kernel=np.ones((3, 3, 4, 8), np.float32),
        ...                         moving_mean=np.zeros(8, np.float32), moving_var=np.ones(8, np.float32),
        ...                         stride=2, padding="SAME")
        >>> p.stride, p.out_channels
        ((2, 2), 8)
    """

    kernel: Any
    moving_mean: Any
    moving_var: Any
    bias: Any = None
    gamma: Any = None
    beta: Any = None
    stride: Any = 1
    padding: Any = "SAME"
    dilation: Any = 1
    groups: int = 1
    eps: float = 1e-3
    momentum: float = 0.99
    var_update: VarUpdate = "unbiased"
    _cache: dict[Any, Any] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ARRAY_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (list, tuple, float, int)) and not isinstance(value, bool):
                set_(self, name, np.asarray(value))
        set_(self, "stride", normalize_pair(self.stride, "stride"))
        set_(self, "dilation", normalize_pair(self.dilation, "dilation"))
        set_(self, "padding", normalize_padding(self.padding))
        if not _is_int(self.groups) or self.groups < 1:
            raise ConvBNError(f"groups must be a positive int. Received: groups={self.groups!r}")
        set_(self, "groups", int(self.groups))
        if not isinstance(self.eps, (float, int, np.floating, np.integer)) or not (
            math.isfinite(self.eps) and self.eps >= 0
        ):
            raise ConvBNError(f"eps must be a finite number >= 0. Received: eps={self.eps!r}")
        set_(self, "eps", float(self.eps))
        if not isinstance(self.momentum, (float, int, np.floating, np.integer)) or not (
            0.0 <= self.momentum <= 1.0
        ):
            raise ConvBNError(
                "momentum is the fraction of the old moving value kept and must be in [0, 1] "
                "(torch's momentum=0.1 is 0.9 here; see convbn.conventions). "
                f"Received: momentum={self.momentum!r}"
            )
        set_(self, "momentum", float(self.momentum))
        if self.var_update not in _VAR_UPDATES:
            raise ConvBNError(
                f"var_update must be 'unbiased' or 'biased'. Received: var_update={self.var_update!r}"
            )
        self._check_shapes()

    def _check_shapes(self) -> None:
        kshape = _shape(self.kernel)
        if kshape is None:
            raise ConvBNError(
                "kernel must be an array. Received: "
                f"kernel of type {type(self.kernel).__name__}"
            )
        if len(kshape) != 4:
            raise ConvBNError(
                "kernel must be 4-D HWIO (kh, kw, in_channels // groups, out_channels). "
                f"Received: kernel.shape={kshape}"
            )
        out = kshape[3]
        if out is not None and out % self.groups:
            raise ConvBNError(
                f"groups must divide the kernel's out_channels. Received: groups={self.groups}, "
                f"kernel.shape={kshape}"
            )
        for name in ("moving_mean", "moving_var", "bias", "gamma", "beta"):
            value = getattr(self, name)
            if value is None:
                if name in ("moving_mean", "moving_var"):
                    raise ConvBNError(f"{name} is required. Received: {name}=None")
                continue
            shape = _shape(value)
            if shape is None or len(shape) != 1 or (
                shape[0] is not None and out is not None and shape[0] != out
            ):
                raise ConvBNError(
                    f"{name} must have shape (out_channels,) = ({out},) to match the kernel. "
                    f"Received: {name}.shape={shape}, kernel.shape={kshape}"
                )

    # -- derived, read-only views -------------------------------------------------------------

    @property
    def kernel_size(self) -> Pair:
        """``(kh, kw)``."""
        shape = _shape(self.kernel)
        assert shape is not None
        return (shape[0], shape[1])  # type: ignore[return-value]

    @property
    def in_channels(self) -> int:
        """Input channels the conv expects (``kernel.shape[2] * groups``)."""
        shape = _shape(self.kernel)
        assert shape is not None and shape[2] is not None
        return shape[2] * self.groups

    @property
    def out_channels(self) -> int:
        """Output channels (``kernel.shape[3]``)."""
        shape = _shape(self.kernel)
        assert shape is not None and shape[3] is not None
        return shape[3]

    def arrays(self) -> dict[str, Any]:
        """The array fields that are set, by name."""
        return {name: getattr(self, name) for name in ARRAY_FIELDS if getattr(self, name) is not None}

    def static_config(self) -> tuple[Any, ...]:
        """The static fields as a hashable tuple (the JAX pytree aux data)."""
        # Cached: it is computed on every jitted call that takes these params as an argument.
        static = self._cache.get("static")
        if static is None:
            static = self._cache["static"] = _static_getter(self)
        return static  # type: ignore[no-any-return]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_cache", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        object.__setattr__(self, "_cache", {})


def _rebuild(arrays: Sequence[Any], static: tuple[Any, ...]) -> ConvBNParams:
    """Build params without validation: for pytree unflattening and internal updates.

    Pytree transforms put arbitrary leaves (tracers, ``None``, in_axes ints) in the array slots,
    so nothing may be checked here.
    """
    params = object.__new__(ConvBNParams)
    # One __dict__ update instead of a setattr per field: this runs on every jitted call's output
    # and every training step.
    state = params.__dict__
    state.update(zip(ARRAY_FIELDS, arrays, strict=False))
    state.update(zip(STATIC_FIELDS, static, strict=False))
    state["_cache"] = {}
    return params


def with_arrays(params: ConvBNParams, **arrays: Any) -> ConvBNParams:
    """``params`` with some array fields replaced, skipping re-validation (internal, hot path)."""
    unknown = arrays.keys() - _ARRAY_SET
    if unknown:
        raise TypeError(f"with_arrays takes array fields {ARRAY_FIELDS}. Received: {sorted(unknown)}")
    new = object.__new__(ConvBNParams)
    state = new.__dict__
    state.update(params.__dict__)
    state.update(arrays)
    static = params._cache.get("static")
    state["_cache"] = {} if static is None else {"static": static}
    return new


# -- JAX pytree registration ------------------------------------------------------------------

_registered_with_jax = False
_registration_lock = threading.Lock()


def _register_with_jax(jax: ModuleType) -> None:
    global _registered_with_jax
    with _registration_lock:
        if _registered_with_jax:
            return
        tree_util = jax.tree_util
        keys = tuple(tree_util.GetAttrKey(name) for name in ARRAY_FIELDS)

        def flatten_with_keys(p: ConvBNParams) -> tuple[Any, tuple[Any, ...]]:
            return [(k, getattr(p, n)) for k, n in zip(keys, ARRAY_FIELDS, strict=False)], p.static_config()

        def flatten(p: ConvBNParams) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
            return _arrays_getter(p), p.static_config()

        tree_util.register_pytree_with_keys(
            ConvBNParams, flatten_with_keys, lambda aux, leaves: _rebuild(leaves, aux), flatten
        )
        _registered_with_jax = True


class _RegisterOnJaxImport(importlib.abc.MetaPathFinder):
    """Registers ConvBNParams as a pytree right after ``jax`` is first imported.

    ``import convbn`` must not import JAX, yet ``jax.jit(f)(params)`` must work even when the user
    imported convbn first and never called a convbn function on a JAX array.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "jax":
            return None
        # Ask the other finders; ``importlib.util.find_spec("jax")`` also lands here without
        # importing, so the hook stays installed until the module really executes.
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module: ModuleType) -> None:
            exec_module(module)
            _register_with_jax(module)
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)

        loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


def _install_jax_hook() -> None:
    if "jax" in sys.modules:
        _register_with_jax(sys.modules["jax"])
    elif not any(isinstance(f, _RegisterOnJaxImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnJaxImport())


_install_jax_hook()
