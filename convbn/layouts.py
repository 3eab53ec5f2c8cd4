"""Every kernel and feature layout convbn translates between, written once.

convbn's neutral layout is TensorFlow's: HWIO conv kernels, ``(in, out)`` dense kernels, NHWC
feature maps. Formats and framework interop translate through the functions here and nowhere else,
so each layout fact has one place to be right in:

=====================  =================================  ===============================
layer                  torch                              neutral (TF, Keras, Flax)
=====================  =================================  ===============================
conv                   ``(out, in/groups, kh, kw)``       ``(kh, kw, in/groups, out)``
depthwise conv         ``(C*m, 1, kh, kw)``               ``(kh, kw, 1, C*m)``; TF/Keras
                                                          store ``(kh, kw, C, m)``
transposed conv        ``(in, out/groups, kh, kw)``       ``(kh, kw, out/groups, in)``
dense                  ``(out, in)``                      ``(in, out)``
=====================  =================================  ===============================

Flax's ``ConvTranspose`` keeps its own kernel (:func:`transpose_to_flax`): with
``transpose_kernel=True`` it is the neutral ``(kh, kw, out, in)`` filter itself; with the default
``transpose_kernel=False`` it is ``(kh, kw, in, out)``, spatially flipped. Both were checked
against the gradient of ``jax.lax.conv_general_dilated`` (what TF's ``conv2d_transpose`` computes),
with ``padding="SAME"`` giving TF's crop, at strides 1 and 2 and odd and even sizes
(tests/test_layouts_flax.py).

A depthwise conv's output channel ``c*m + j`` is input channel ``c``'s ``j``-th filter in both
frameworks, so its two neutral forms differ by a reshape only. The transposed conv's torch layout
is the conv's with in and out swapped, so one permutation serves both.

A dense layer that reads a flattened feature map sees its features in the framework's data order:
``(H, W, C)`` after an NHWC flatten, ``(C, H, W)`` after an NCHW one. Moving such a layer between
the two reorders its input rows (:func:`flat_rows`); a dense layer whose output is reshaped into a
map reorders its output columns and bias (:func:`flat_columns`).

The functions take and return NumPy arrays; framework code permutes its own tensors with the
permutation constants.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from convbn.errors import ConvBNError

__all__ = [
    "HWIO_TO_OIHW",
    "OIHW_TO_HWIO",
    "FlatOrder",
    "conv_from_torch",
    "conv_to_torch",
    "dense_from_torch",
    "dense_to_torch",
    "depthwise_from_tf",
    "depthwise_to_tf",
    "flat_columns",
    "flat_permutation",
    "flat_rows",
    "transpose_from_flax",
    "transpose_from_torch",
    "transpose_to_flax",
    "transpose_to_torch",
]

#: torch's conv kernel (and transposed conv kernel) axes to the neutral ones: ``permute(*OIHW_TO_HWIO)``.
OIHW_TO_HWIO = (2, 3, 1, 0)
#: The neutral conv kernel axes to torch's.
HWIO_TO_OIHW = (3, 2, 0, 1)

#: The order a flattened feature map's features are in: NHWC frameworks give ``"hwc"``, NCHW ``"chw"``.
FlatOrder = Literal["hwc", "chw"]


def _rank(array: np.ndarray, rank: int, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != rank:
        raise ConvBNError(f"a {what} must have {rank} dimensions. Received: shape {array.shape}")
    return array


def conv_from_torch(weight: np.ndarray) -> np.ndarray:
    """torch's ``(out, in/groups, kh, kw)`` conv weight as the neutral HWIO kernel."""
    return _rank(weight, 4, "torch conv weight").transpose(OIHW_TO_HWIO)


def conv_to_torch(kernel: np.ndarray) -> np.ndarray:
    """The neutral HWIO kernel as torch's ``(out, in/groups, kh, kw)`` conv weight."""
    return _rank(kernel, 4, "conv kernel (HWIO)").transpose(HWIO_TO_OIHW)


def depthwise_from_tf(kernel: np.ndarray) -> np.ndarray:
    """TF/Keras's depthwise ``(kh, kw, C, m)`` kernel as the neutral grouped ``(kh, kw, 1, C*m)``."""
    kernel = _rank(kernel, 4, "depthwise kernel (kh, kw, C, m)")
    kh, kw, c, m = kernel.shape
    return kernel.reshape(kh, kw, 1, c * m)


def depthwise_to_tf(kernel: np.ndarray, channels: int) -> np.ndarray:
    """The neutral grouped ``(kh, kw, 1, C*m)`` kernel of a depthwise conv over ``channels`` inputs as TF's
    ``(kh, kw, C, m)``."""
    kernel = _rank(kernel, 4, "depthwise kernel (HWIO)")
    kh, kw, one, out = kernel.shape
    if one != 1 or channels <= 0 or out % channels:
        raise ConvBNError(
            f"a depthwise kernel over {channels} channels must be (kh, kw, 1, {channels}*m). "
            f"Received: shape {kernel.shape}"
        )
    return kernel.reshape(kh, kw, channels, out // channels)


def transpose_from_torch(weight: np.ndarray) -> np.ndarray:
    """torch's ``(in, out/groups, kh, kw)`` transposed-conv weight as the neutral ``(kh, kw, out/groups, in)``
    (TF's ``conv2d_transpose`` filter layout)."""
    return _rank(weight, 4, "torch transposed conv weight").transpose(OIHW_TO_HWIO)


def transpose_to_torch(kernel: np.ndarray) -> np.ndarray:
    """The neutral ``(kh, kw, out/groups, in)`` transposed-conv kernel as torch's ``(in, out/groups, kh, kw)``."""
    return _rank(kernel, 4, "transposed conv kernel (kh, kw, out, in)").transpose(HWIO_TO_OIHW)


def transpose_to_flax(kernel: np.ndarray, transpose_kernel: bool = False) -> np.ndarray:
    """The neutral ``(kh, kw, out, in)`` transposed-conv kernel as ``flax.linen.ConvTranspose``'s kernel.

    ``transpose_kernel=True``: the same array (flax flips and swaps it itself, as ``jax.lax.conv_transpose``
    does). ``transpose_kernel=False`` (flax's default): ``(kh, kw, in, out)`` with both spatial axes
    reversed, since flax then runs it as a conv over the stride-dilated input.
    """
    kernel = _rank(kernel, 4, "transposed conv kernel (kh, kw, out, in)")
    return kernel if transpose_kernel else kernel[::-1, ::-1].transpose(0, 1, 3, 2)


def transpose_from_flax(kernel: np.ndarray, transpose_kernel: bool = False) -> np.ndarray:
    """``flax.linen.ConvTranspose``'s kernel as the neutral ``(kh, kw, out, in)`` (the inverse of
    :func:`transpose_to_flax`)."""
    kernel = _rank(kernel, 4, "flax ConvTranspose kernel")
    return kernel if transpose_kernel else kernel[::-1, ::-1].transpose(0, 1, 3, 2)


def dense_from_torch(weight: np.ndarray) -> np.ndarray:
    """torch's ``(out, in)`` linear weight as the neutral ``(in, out)`` dense kernel."""
    return _rank(weight, 2, "torch linear weight").T


def dense_to_torch(kernel: np.ndarray) -> np.ndarray:
    """The neutral ``(in, out)`` dense kernel as torch's ``(out, in)`` linear weight."""
    return _rank(kernel, 2, "dense kernel (in, out)").T


def flat_permutation(height: int, width: int, channels: int, source: FlatOrder, target: FlatOrder) -> np.ndarray:
    """Indices ``p`` such that ``features_target = features_source[p]`` for a flattened
    ``height x width x channels`` map.

    Example:
        >>> flat_permutation(1, 2, 2, "chw", "hwc").tolist()  # (c0w0, c0w1, c1w0, c1w1) -> (w0c0, w0c1, ...)
        [0, 2, 1, 3]
    """
    for name, order in (("source", source), ("target", target)):
        if order not in ("hwc", "chw"):
            raise ConvBNError(f"a flatten order is 'hwc' or 'chw'. Received: {name}={order!r}")
    if min(height, width, channels) <= 0:
        raise ConvBNError(
            f"a flattened feature map needs positive sizes. Received: height={height}, width={width}, "
            f"channels={channels}"
        )
    index = np.arange(height * width * channels)
    if source == target:
        return index
    if source == "chw":
        return index.reshape(channels, height, width).transpose(1, 2, 0).reshape(-1)
    return index.reshape(height, width, channels).transpose(2, 0, 1).reshape(-1)


def _check_features(size: int, height: int, width: int, channels: int, what: str) -> None:
    if size != height * width * channels:
        raise ConvBNError(
            f"a dense layer's {what} ({size}) are not a flattened {height}x{width}x{channels} feature map "
            f"({height * width * channels})"
        )


def flat_rows(
    kernel: np.ndarray, height: int, width: int, channels: int, source: FlatOrder, target: FlatOrder
) -> np.ndarray:
    """A neutral ``(in, out)`` dense kernel reading a flattened map in ``source`` order, rewritten to read it
    in ``target`` order (its input rows reordered)."""
    kernel = _rank(kernel, 2, "dense kernel (in, out)")
    _check_features(kernel.shape[0], height, width, channels, "input features")
    return kernel[flat_permutation(height, width, channels, source, target)]


def flat_columns(
    array: np.ndarray, height: int, width: int, channels: int, source: FlatOrder, target: FlatOrder
) -> np.ndarray:
    """A neutral ``(in, out)`` dense kernel, or its ``(out,)`` bias, whose output is reshaped into a map in
    ``source`` order, rewritten for a ``target``-order reshape (its output features reordered)."""
    array = np.asarray(array)
    if array.ndim not in (1, 2):
        raise ConvBNError(f"a dense kernel or bias must have 1 or 2 dimensions. Received: shape {array.shape}")
    _check_features(array.shape[-1], height, width, channels, "output features")
    return array[..., flat_permutation(height, width, channels, source, target)]
