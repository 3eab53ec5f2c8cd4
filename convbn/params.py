"""`ConvBNParams`: the parameters of one Conv2D + BatchNorm pair, in one canonical layout.

The kernel is HWIO, ``(kh, kw, in_channels // groups, out_channels)``: the layout TF, Keras and
Flax store. Backends transpose internally. Momentum is the fraction of the old moving value kept
(``new = momentum * old + (1 - momentum) * batch``), the Keras/Flax/slim convention.

Params are a :class:`~convbn.spec.ConvBNSpec` (``params.spec``: the geometry and convention,
static) plus six arrays. The class is a frozen dataclass (``dataclasses.replace`` works, on the
arrays and the settings alike) and a JAX pytree: the arrays are leaves, the spec is the static
data. It is registered with JAX when JAX is imported, whichever of the two is imported first, so
``import convbn`` never imports JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import operator
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from convbn.caches import CacheSlots
from convbn.errors import ConvBNError
from convbn.spec import ConvBNSpec, Pair, VarUpdate, is_int

# Still importable from here, where they were first defined.
from convbn.spec import ExplicitPadding as ExplicitPadding
from convbn.spec import Padding as Padding
from convbn.spec import normalize_padding as normalize_padding
from convbn.spec import normalize_pair as normalize_pair

__all__ = ["ARRAY_FIELDS", "STATIC_FIELDS", "ConvBNParams", "ConvBNSpec", "Padding"]

#: The array fields, in pytree-leaf order.
ARRAY_FIELDS = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_var")
#: The settings the constructor takes besides the arrays: the spec's, less what the kernel's
#: shape gives (kernel size and channel counts).
STATIC_FIELDS = ("stride", "padding", "dilation", "groups", "eps", "momentum", "var_update")
_ARRAY_SET = frozenset(ARRAY_FIELDS)
_arrays_getter = operator.attrgetter(*ARRAY_FIELDS)


def array_shape(array: Any) -> tuple[int | None, ...] | None:
    """The shape of an array of any framework, with None for unknown dims; None if it has none."""
    shape = getattr(array, "shape", None)
    if shape is None:
        return None
    try:
        dims = tuple(shape)
    except TypeError:  # a TF TensorShape of unknown rank
        return None
    return tuple(d if is_int(d) else getattr(d, "value", None) for d in dims)


def _kernel_shape(kernel: Any) -> tuple[int | None, ...]:
    """The kernel's shape, which must be 4-D HWIO."""
    kshape = array_shape(kernel)
    if kshape is None:
        raise ConvBNError(f"kernel must be an array. Received: kernel of type {type(kernel).__name__}")
    if len(kshape) != 4:
        raise ConvBNError(
            "kernel must be 4-D HWIO (kh, kw, in_channels // groups, out_channels). "
            f"Received: kernel.shape={kshape}"
        )
    return kshape


def _spec_for_kernel(kernel: Any, settings: dict[str, Any]) -> ConvBNSpec:
    """The spec of params holding ``kernel``: its size and channel counts come from the shape
    (None where a dim is unknown, as in a TF graph)."""
    kshape = _kernel_shape(kernel)
    kh, kw, k_in, out = kshape
    groups = settings.get("groups", 1)
    if is_int(groups) and groups >= 1 and out is not None and out % groups:
        raise ConvBNError(
            f"groups must divide the kernel's out_channels. Received: groups={groups}, kernel.shape={kshape}"
        )
    return ConvBNSpec(
        kernel_size=None if kh is None or kw is None else (kh, kw),
        in_channels=None if k_in is None or not is_int(groups) else k_in * groups,
        out_channels=out,
        **settings,
    )


@dataclasses.dataclass(frozen=True, eq=False, init=False)
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

    The settings, with the kernel's size and channel counts, form ``params.spec``
    (:class:`~convbn.spec.ConvBNSpec`); ``params.stride`` and the others read it.
    :meth:`from_spec` builds params from a spec and arrays.

    Arrays may be NumPy arrays or any framework's arrays; they are treated as immutable (derived
    values such as the folded eval kernel are cached per params object, in ``cache``, a
    :class:`~convbn.caches.CacheSlots` that is never pickled, copied or compared). Params compare
    by identity, so a changed params object is a new object, e.g. from ``dataclasses.replace``.

    Raises:
        ConvBNError: for a malformed geometry spec, convention, or mismatched array shapes.

    Example:
        >>> import numpy as np, convbn
        >>> p = convbn.ConvBNParams(kernel=np.ones((3, 3, 4, 8), np.float32),
        ...                         moving_mean=np.zeros(8, np.float32), moving_var=np.ones(8, np.float32),
        ...                         stride=2, padding="SAME")
        >>> p.stride, p.out_channels, p.spec.pads(9, 9)
        ((2, 2), 8, ((1, 1), (1, 1)))
    """

    kernel: Any
    moving_mean: Any
    moving_var: Any
    bias: Any = None
    gamma: Any = None
    beta: Any = None
    # Read from ``spec`` (properties installed below the class); fields so that
    # ``dataclasses.replace(params, stride=2)`` and ``dataclasses.fields`` keep working.
    stride: Any = 1
    padding: Any = "SAME"
    dilation: Any = 1
    groups: int = 1
    eps: float = 1e-3
    momentum: float = 0.99
    var_update: VarUpdate = "unbiased"
    spec: ConvBNSpec = dataclasses.field(init=False, repr=False, compare=False)
    cache: CacheSlots = dataclasses.field(init=False, repr=False, compare=False)

    def __init__(
        self,
        kernel: Any,
        moving_mean: Any,
        moving_var: Any,
        bias: Any = None,
        gamma: Any = None,
        beta: Any = None,
        stride: Any = 1,
        padding: Any = "SAME",
        dilation: Any = 1,
        groups: int = 1,
        eps: float = 1e-3,
        momentum: float = 0.99,
        var_update: VarUpdate = "unbiased",
    ) -> None:
        arrays = (kernel, bias, gamma, beta, moving_mean, moving_var)
        spec = _spec_for_kernel(_as_array(kernel), {
            "stride": stride, "padding": padding, "dilation": dilation, "groups": groups, "eps": eps,
            "momentum": momentum, "var_update": var_update,
        })
        self._init(spec, arrays)

    def _init(self, spec: ConvBNSpec, arrays: Sequence[Any]) -> None:
        state = self.__dict__
        state.update(zip(ARRAY_FIELDS, (_as_array(a) for a in arrays), strict=True))
        state["spec"] = spec
        state["cache"] = CacheSlots()
        self.check_arrays()

    @classmethod
    def from_spec(cls, spec: ConvBNSpec, kernel: Any, moving_mean: Any, moving_var: Any,
                  bias: Any = None, gamma: Any = None, beta: Any = None) -> ConvBNParams:
        """Params with ``spec``'s geometry and convention holding these arrays.

        Args:
            spec: the spec; a kernel size or channel count it leaves None comes from the kernel.
            kernel, moving_mean, moving_var, bias, gamma, beta: as for the constructor.

        Raises:
            ConvBNError: when an array's shape does not match the spec.

        Example:
            >>> import numpy as np, convbn
            >>> spec = convbn.ConvBNSpec(stride=2, eps=1e-5)
            >>> p = convbn.ConvBNParams.from_spec(spec, np.ones((3, 3, 2, 4)), np.zeros(4), np.ones(4))
            >>> p.spec == convbn.ConvBNSpec(kernel_size=3, in_channels=2, out_channels=4, stride=2, eps=1e-5)
            True
        """
        if not isinstance(spec, ConvBNSpec):
            raise TypeError(f"spec must be a convbn.ConvBNSpec. Received: spec of type {type(spec).__name__}")
        kernel = _as_array(kernel)
        derived = _spec_for_kernel(kernel, {"groups": spec.groups})
        filled = {
            f: getattr(derived, f) for f in ("kernel_size", "in_channels", "out_channels") if getattr(spec, f) is None
        }
        params = object.__new__(cls)
        params._init(dataclasses.replace(spec, **filled) if filled else spec,
                     (kernel, bias, gamma, beta, moving_mean, moving_var))
        return params

    def check_arrays(self) -> None:
        """Raise unless the arrays have the shapes the spec says (params rebuilt by pytree
        transforms skipped the constructor, so planning calls this too).

        Raises:
            ConvBNError: naming the first array whose shape does not match.
        """
        kshape = _kernel_shape(self.kernel)
        spec = self.spec
        expected = (*(spec.kernel_size or (None, None)),
                    None if spec.in_channels is None else spec.in_channels // spec.groups, spec.out_channels)
        if any(e is not None and k is not None and e != k for e, k in zip(expected, kshape, strict=True)):
            raise ConvBNError(
                f"kernel.shape must be {expected} (kh, kw, in_channels // groups, out_channels) to match "
                f"params.spec. Received: kernel.shape={kshape}, spec={spec}"
            )
        out = kshape[3] if kshape[3] is not None else spec.out_channels
        for name in ("moving_mean", "moving_var", "bias", "gamma", "beta"):
            value = getattr(self, name)
            if value is None:
                if name in ("moving_mean", "moving_var"):
                    raise ConvBNError(f"{name} is required. Received: {name}=None")
                continue
            shape = array_shape(value)
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
        return self.spec.kernel_size  # type: ignore[return-value]

    @property
    def in_channels(self) -> int:
        """Input channels the conv expects (``kernel.shape[2] * groups``)."""
        return self.spec.in_channels  # type: ignore[return-value]

    @property
    def out_channels(self) -> int:
        """Output channels (``kernel.shape[3]``)."""
        return self.spec.out_channels  # type: ignore[return-value]

    def arrays(self) -> dict[str, Any]:
        """The array fields that are set, by name."""
        return {name: getattr(self, name) for name in ARRAY_FIELDS if getattr(self, name) is not None}

    def static_config(self) -> tuple[Any, ...]:
        """The settings (``STATIC_FIELDS``) as a hashable tuple; ``params.spec`` holds them all,
        and is what JAX sees as the pytree's static data."""
        return tuple(getattr(self.spec, name) for name in STATIC_FIELDS)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("cache", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "spec" not in state:  # pickled before the spec existed: the settings were attributes
            settings = {name: state.pop(name) for name in STATIC_FIELDS if name in state}
            state["spec"] = _spec_for_kernel(state["kernel"], settings)
        self.__dict__.update(state)
        self.__dict__["cache"] = CacheSlots()


def _spec_property(name: str) -> property:
    # A plain function (not operator.attrgetter), which torch.compile can trace.
    def get(self: ConvBNParams) -> Any:
        return getattr(self.spec, name)

    return property(get, doc=f"``spec.{name}`` (see :class:`~convbn.spec.ConvBNSpec`).")


for _name in STATIC_FIELDS:
    setattr(ConvBNParams, _name, _spec_property(_name))
del _name


def _as_array(value: Any) -> Any:
    """Python numbers and sequences as NumPy arrays; arrays of any framework as they are."""
    if isinstance(value, (list, tuple, float, int)) and not isinstance(value, bool):
        return np.asarray(value)
    return value


def _rebuild(arrays: Sequence[Any], spec: ConvBNSpec) -> ConvBNParams:
    """Build params without validation: for pytree unflattening and internal updates.

    Pytree transforms put arbitrary leaves (tracers, ``None``, in_axes ints) in the array slots,
    so nothing may be checked here.
    """
    params = object.__new__(ConvBNParams)
    # One __dict__ update instead of a setattr per field: this runs on every jitted call's output
    # and every training step.
    state = params.__dict__
    state.update(zip(ARRAY_FIELDS, arrays, strict=False))
    state["spec"] = spec
    state["cache"] = CacheSlots()
    return params


def assemble(spec: ConvBNSpec, **arrays: Any) -> ConvBNParams:
    """Params of ``spec`` holding ``arrays`` (missing ones None), unchecked: for layers whose
    variables were made from the spec (internal, hot path); planning checks the shapes."""
    unknown = arrays.keys() - _ARRAY_SET
    if unknown:
        raise TypeError(f"assemble takes array fields {ARRAY_FIELDS}. Received: {sorted(unknown)}")
    return _rebuild([arrays.get(name) for name in ARRAY_FIELDS], spec)


def with_arrays(params: ConvBNParams, **arrays: Any) -> ConvBNParams:
    """``params`` with some array fields replaced, skipping re-validation (internal, hot path)."""
    unknown = arrays.keys() - _ARRAY_SET
    if unknown:
        raise TypeError(f"with_arrays takes array fields {ARRAY_FIELDS}. Received: {sorted(unknown)}")
    new = object.__new__(ConvBNParams)
    state = new.__dict__
    state.update(params.__dict__)
    state.update(arrays)
    state["cache"] = CacheSlots()
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

        def flatten_with_keys(p: ConvBNParams) -> tuple[Any, ConvBNSpec]:
            return [(k, getattr(p, n)) for k, n in zip(keys, ARRAY_FIELDS, strict=False)], p.spec

        def flatten(p: ConvBNParams) -> tuple[tuple[Any, ...], ConvBNSpec]:
            return _arrays_getter(p), p.spec

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
