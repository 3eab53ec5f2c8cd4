"""The dtypes NumPy lacks (bfloat16, the float8s), and torch <-> NumPy conversion of them, in one place.

NumPy has no bfloat16 or float8; the ``ml_dtypes`` package gives it those (JAX and TensorFlow
install it, torch and convbn's core do not). torch's ``Tensor.numpy()`` refuses bfloat16, so a
bfloat16 tensor crosses as its 16-bit pattern (``view(int16)``) reinterpreted on the other side:
bit-exact, and no copy on the CPU.

Without ml_dtypes there is one behaviour everywhere (the torch backend's ``to_numpy``, the torch,
safetensors and Flax readers, :func:`convbn.testing.cast`): a :class:`~convbn.errors.ConvBNError`
naming the tensor and where it is, and the fix, ``pip install ml_dtypes``. Data is never widened
to float32 in silence: a checkpoint converted without ml_dtypes would otherwise come out twice
the size and in another dtype than the one it was saved in, with nothing saying so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convbn.errors import ConvBNError

__all__ = ["keras_float_name", "ml_dtype", "numpy_to_torch", "torch_to_numpy"]

#: torch dtypes NumPy has only through ml_dtypes, with the integer type of the same width whose
#: bits they cross as. The float8s are left out: convbn's torch paths refuse them.
_TORCH_BITS = {"bfloat16": "int16"}

#: The floating dtypes a Keras layer takes by name as its dtype policy.
_KERAS_FLOATS = ("float16", "bfloat16", "float32", "float64")


def ml_dtype(name: str, where: str) -> np.dtype:
    """The NumPy dtype ml_dtypes gives ``name`` (``"bfloat16"``, ``"float8_e4m3fn"``, ...).

    ``where`` names the tensor for the error, e.g. ``"model.pt: tensor 'conv.weight'"``.

    Raises:
        ConvBNError: when ml_dtypes is not installed.
    """
    try:
        import ml_dtypes
    except ImportError:
        raise ConvBNError(
            f"{where} is {name}, which NumPy has only through the ml_dtypes package (it comes with "
            "TensorFlow and JAX): pip install ml_dtypes"
        ) from None
    return np.dtype(getattr(ml_dtypes, name))


def keras_float_name(dtype: np.dtype) -> str:
    """The dtype policy Keras layers holding ``dtype`` weights are built with: the float's own name,
    ``"float32"`` for any other (a float8 or integer kernel would not compute in Keras)."""
    return dtype.name if dtype.name in _KERAS_FLOATS else "float32"


def torch_to_numpy(t: Any, where: str) -> np.ndarray:
    """CPU tensor ``t`` as NumPy in its own dtype, sharing its memory (bfloat16 bit-exact).

    Raises:
        ConvBNError: for bfloat16 without ml_dtypes (see the module docstring).
        TypeError, RuntimeError: torch's own, for a dtype NumPy cannot hold at all.
    """
    name = str(t.dtype).rpartition(".")[2]
    bits = _TORCH_BITS.get(name)
    if bits is None:
        return t.numpy()  # type: ignore[no-any-return]
    dtype = ml_dtype(name, where)
    import torch

    return t.view(getattr(torch, bits)).numpy().view(dtype)  # type: ignore[no-any-return]


def numpy_to_torch(a: np.ndarray) -> Any:
    """NumPy ``a`` as a CPU tensor in its own dtype, sharing its memory (bfloat16 bit-exact).

    ``a``'s strides must be ones torch can take (make it contiguous first, as the callers do).
    """
    import torch

    bits = _TORCH_BITS.get(a.dtype.name)
    if bits is None:
        return torch.from_numpy(a)
    return torch.from_numpy(a.view(bits)).view(getattr(torch, a.dtype.name))
