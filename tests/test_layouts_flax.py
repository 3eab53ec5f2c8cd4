"""Flax ``ConvTranspose``'s kernel convention, measured against jax.lax rather than assumed.

Oracle: TF's ``conv2d_transpose`` is by definition the gradient of ``conv2d`` with respect to its
input, so the VJP of ``jax.lax.conv_general_dilated`` (NHWC, HWIO, SAME) with the neutral
``(kh, kw, out, in)`` filter is the reference; flax's layer runs ``jax.lax.conv_transpose``.
"""

from __future__ import annotations

import numpy as np
import pytest

from convbn import layouts

pytestmark = pytest.mark.needs("jax", "flax")

CASES = [(5, 2, 3), (5, 2, 4), (4, 2, 3), (3, 2, 4), (3, 1, 5), (2, 2, 3)]  # kernel, stride, input size


def _reference(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    n, h, w, _ = x.shape
    out = kernel.shape[2]

    def conv(y: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(y, jnp.asarray(kernel), (stride, stride), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    _, vjp = jax.vjp(conv, jnp.zeros((n, h * stride, w * stride, out), kernel.dtype))
    return np.asarray(vjp(jnp.asarray(x))[0])


@pytest.mark.parametrize("transpose_kernel", [True, False])
@pytest.mark.parametrize("k,stride,size", CASES)
def test_flax_conv_transpose_kernel_convention(k: int, stride: int, size: int, transpose_kernel: bool) -> None:
    import flax.linen as nn
    import jax.numpy as jnp

    rng = np.random.default_rng(k * 100 + stride * 10 + size)
    x = rng.standard_normal((2, size, size + 1, 3))  # odd and even sizes together
    kernel = rng.standard_normal((k, k, 4, 3))  # neutral (kh, kw, out, in)
    want = _reference(x, kernel, stride)
    layer = nn.ConvTranspose(4, (k, k), strides=(stride, stride), padding="SAME", use_bias=False,
                             transpose_kernel=transpose_kernel)
    flax_kernel = layouts.transpose_to_flax(kernel, transpose_kernel)
    got = np.asarray(layer.apply({"params": {"kernel": jnp.asarray(flax_kernel)}}, jnp.asarray(x)))
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) < 1e-12 * np.max(np.abs(want))  # float64: the same sums
    assert np.array_equal(layouts.transpose_from_flax(flax_kernel, transpose_kernel), kernel)
    if k > 1 and not transpose_kernel:
        # Swapping in/out without the spatial flip is wrong: the flip is part of the convention.
        unflipped = kernel.transpose(0, 1, 3, 2)
        bad = np.asarray(layer.apply({"params": {"kernel": jnp.asarray(unflipped)}}, jnp.asarray(x)))
        assert np.max(np.abs(bad - want)) > 1e-2 * np.max(np.abs(want))
