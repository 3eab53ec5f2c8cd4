"""One module per framework, each with the same functions: :class:`BackendModule` declares them.

The protocol is the contract, in one place: every backend module (``numpy``, ``torch``,
``tensorflow``, ``jax``) defines exactly its members, with the same parameters and defaults,
and lists them in ``__all__`` together with its documented extras (:data:`EXTRAS`). Callers reach
a backend only through them (:func:`convbn.dispatch.load_backend` returns a ``BackendModule``), so
mypy checks the calls, and ``tests/test_backend_protocol.py`` checks each module's signatures.

A backend module imports its framework at the top: it is only loaded after dispatch chose it.
This package imports none.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from convbn.geometry import Plan
    from convbn.params import ConvBNParams

__all__ = ["EXTRAS", "BackendModule"]

#: Public functions a backend has beyond the protocol, per backend: NumPy's analytic backward
#: pass, the gradient oracle the others' autodiff is checked against.
EXTRAS: dict[str, frozenset[str]] = {
    "numpy": frozenset({"conv_bn_vjp"}),
    "torch": frozenset(),
    "tensorflow": frozenset(),
    "jax": frozenset(),
}


class BackendModule(Protocol):
    """What every backend module defines (a module satisfies it structurally)."""

    #: The backend's name, as :data:`convbn.dispatch.BACKENDS` spells it.
    NAME: str

    def static_shape(self, x: Any) -> tuple[int | None, ...]:
        """``x``'s shape as a tuple, None for dims unknown at trace time."""

    def resolve_device(self, spec: Any = None) -> Any:
        """The framework's device for a spec (``None`` = best available, ``"cpu"``,
        ``"cuda"``/``"gpu"``, ``"cuda:1"``, ``"tpu"``, ``"mps"``), or a ``ConvBNError``."""

    def asarray(self, a: Any, device: Any = None) -> Any:
        """Any array (NumPy or another framework's) as this framework's, on ``device`` (None:
        where it is, NumPy data on the default device). NumPy data may be shared, not copied."""

    def to_numpy(self, a: Any) -> np.ndarray:
        """This framework's array as NumPy, in its own dtype (bfloat16 through
        :mod:`convbn._dtypes`)."""

    def conversion_key(self) -> Hashable:
        """What besides the device decides :meth:`to_backend`'s result, so params converted and
        cached under one setting are not reused under another: JAX's x64 flag (off, float64
        NumPy data becomes float32); a constant where nothing does."""

    def to_backend(self, params: ConvBNParams, device: Any = None) -> ConvBNParams:
        """``params`` with every array converted; NumPy data is copied where the framework
        trains tensors in place, so the caller's arrays never change."""

    def conv_bn(self, x: Any, params: ConvBNParams, plan: Plan) -> Any:
        """The op; ``plan`` (:class:`convbn.geometry.Plan`) carries the validated geometry and
        the mode. Returns ``y`` in eval, ``(y, new_params)`` in training. Never sees an empty
        batch (see :func:`convbn.api.empty_batch`)."""

    def train_in_place(self, x: Any, params: ConvBNParams, plan: Plan) -> Any:
        """A training step that writes the new moving statistics into ``params.moving_mean`` and
        ``params.moving_var`` themselves, as a framework's BatchNorm layer updates its buffers,
        and returns ``y``. ``y`` and the statistics written are bit for bit those of
        :meth:`conv_bn` in training. For the native layers, whose statistics live in arrays that
        can be written: torch tensors on ``x``'s device that do not require grad,
        ``tf.Variable``s, writeable NumPy arrays; anything else is a ``ConvBNError`` naming what
        it received (JAX arrays never can be written). ``plan`` is a training plan, never of an
        empty batch."""

    def empty_output(self, x: Any, shape: tuple[Any, ...]) -> Any:
        """Zeros of ``shape`` in ``x``'s dtype, on ``x``'s device, for a zero-size batch."""

    def fuse(self, params: ConvBNParams) -> tuple[Any, Any]:
        """``(kernel, bias)`` with BatchNorm folded into the conv, HWIO."""

    def sync_group(self, sync: Any) -> Any:
        """The replicas ``conv_bn(..., sync=sync)`` shares statistics across, in the framework's
        terms (a process group, axis names, a replica context), or a ``ConvBNError`` saying what
        is missing for it."""

    def train_sync(self, x: Any, params: ConvBNParams, plan: Plan, group: Any) -> Any:
        """Training with the batch statistics of every replica
        (:func:`convbn.backends._common.combine_moments`): ``(y, new_params)`` with the same new
        moving statistics on every replica. Runs for an empty local batch too: it still takes
        part in the collectives."""


if TYPE_CHECKING:  # mypy checks each module against the protocol; nothing runs
    from convbn.backends import jax as _jax
    from convbn.backends import numpy as _numpy
    from convbn.backends import tensorflow as _tensorflow
    from convbn.backends import torch as _torch

    _numpy_backend: BackendModule = _numpy
    _torch_backend: BackendModule = _torch
    _tensorflow_backend: BackendModule = _tensorflow
    _jax_backend: BackendModule = _jax
