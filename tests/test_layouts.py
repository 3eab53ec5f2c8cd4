"""convbn.layouts against the frameworks' own ops: a layout is right when torch's op on the torch
tensor and TensorFlow's (or NumPy's) op on the translated tensor give the same numbers."""

from __future__ import annotations

import numpy as np
import pytest

from convbn import layouts
from convbn.errors import ConvBNError
from tests._support.assertions import rel_err

# float64 throughout: the ops differ only in summation order, ~1e-15 relative.
TOL = 1e-12


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.needs("torch", "tensorflow")
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_kernel_matches_between_torch_and_tf(groups: int) -> None:
    import torch  # noqa: I001  (torch before TensorFlow)
    import torch.nn.functional as F
    import tensorflow as tf

    rng = _rng(1)
    x = rng.standard_normal((2, 4, 7, 6))
    w = rng.standard_normal((6, 4 // groups, 3, 2))
    expected = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), groups=groups).numpy()
    kernel = layouts.conv_from_torch(w)
    assert kernel.shape == (3, 2, 4 // groups, 6)
    if groups == 1:
        got = tf.nn.conv2d(x.transpose(0, 2, 3, 1), kernel, 1, "VALID").numpy()
    else:  # TF's CPU conv2d has no groups: run each group and concatenate
        per = [
            tf.nn.conv2d(x.transpose(0, 2, 3, 1)[..., g * 2 : (g + 1) * 2], kernel[..., g * 3 : (g + 1) * 3], 1, "VALID")
            for g in range(groups)
        ]
        got = np.concatenate([p.numpy() for p in per], axis=-1)
    assert rel_err(got.transpose(0, 3, 1, 2), expected) < TOL
    np.testing.assert_array_equal(layouts.conv_to_torch(kernel), w)


@pytest.mark.needs("torch", "tensorflow")
def test_depthwise_kernel_matches_tf_depthwise_conv() -> None:
    import torch  # noqa: I001  (torch before TensorFlow)
    import torch.nn.functional as F
    import tensorflow as tf

    rng = _rng(2)
    c, m = 3, 2
    x = rng.standard_normal((2, c, 6, 5))
    w = rng.standard_normal((c * m, 1, 3, 3))
    expected = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), groups=c).numpy()
    tf_kernel = layouts.depthwise_to_tf(layouts.conv_from_torch(w), c)
    got = tf.nn.depthwise_conv2d(x.transpose(0, 2, 3, 1), tf_kernel, [1, 1, 1, 1], "VALID").numpy()
    assert rel_err(got.transpose(0, 3, 1, 2), expected) < TOL
    np.testing.assert_array_equal(layouts.depthwise_from_tf(tf_kernel), layouts.conv_from_torch(w))


@pytest.mark.needs("torch", "tensorflow")
@pytest.mark.parametrize("stride", [1, 2])
def test_transposed_conv_kernel_matches_tf_conv2d_transpose(stride: int) -> None:
    import torch  # noqa: I001  (torch before TensorFlow)
    import torch.nn.functional as F
    import tensorflow as tf

    rng = _rng(3)
    x = rng.standard_normal((2, 4, 5, 3))
    w = rng.standard_normal((4, 6, 3, 3))  # (in, out, kh, kw)
    expected = F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride).numpy()
    kernel = layouts.transpose_from_torch(w)
    assert kernel.shape == (3, 3, 6, 4)
    out_shape = [2, expected.shape[2], expected.shape[3], 6]
    got = tf.nn.conv2d_transpose(x.transpose(0, 2, 3, 1), kernel, out_shape, stride, "VALID").numpy()
    assert rel_err(got.transpose(0, 3, 1, 2), expected) < TOL
    np.testing.assert_array_equal(layouts.transpose_to_torch(kernel), w)


@pytest.mark.needs("torch")
def test_dense_kernel_matches_torch_linear() -> None:
    import torch
    import torch.nn.functional as F

    rng = _rng(4)
    x = rng.standard_normal((3, 5))
    w = rng.standard_normal((7, 5))
    b = rng.standard_normal(7)
    expected = F.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)).numpy()
    assert rel_err(x @ layouts.dense_from_torch(w) + b, expected) < TOL
    np.testing.assert_array_equal(layouts.dense_to_torch(layouts.dense_from_torch(w)), w)


@pytest.mark.needs("torch")
def test_flat_rows_turn_an_nchw_flatten_into_an_nhwc_one() -> None:
    """A classifier after torch's ``flatten`` (C, H, W order) reads an NHWC flatten once its rows move."""
    import torch

    rng = _rng(5)
    n, c, h, w, out = 2, 3, 4, 5, 6
    x = rng.standard_normal((n, c, h, w))
    weight = rng.standard_normal((out, c * h * w))
    expected = (torch.from_numpy(x).flatten(1) @ torch.from_numpy(weight).T).numpy()
    kernel = layouts.flat_rows(layouts.dense_from_torch(weight), h, w, c, "chw", "hwc")
    got = x.transpose(0, 2, 3, 1).reshape(n, -1) @ kernel
    assert rel_err(got, expected) < TOL
    back = layouts.flat_rows(kernel, h, w, c, "hwc", "chw")
    np.testing.assert_array_equal(back, layouts.dense_from_torch(weight))


@pytest.mark.needs("torch")
def test_flat_columns_turn_an_nchw_reshape_into_an_nhwc_one() -> None:
    """A dense layer whose output torch reshapes to (C, H, W) (a generator's first layer) gives the same
    map as an NHWC reshape once its columns and bias move."""
    import torch

    rng = _rng(6)
    n, c, h, w, features = 2, 4, 2, 3, 5
    z = rng.standard_normal((n, features))
    weight = rng.standard_normal((c * h * w, features))
    bias = rng.standard_normal(c * h * w)
    torch_map = (torch.from_numpy(z) @ torch.from_numpy(weight).T + torch.from_numpy(bias)).view(n, c, h, w)
    kernel = layouts.flat_columns(layouts.dense_from_torch(weight), h, w, c, "chw", "hwc")
    b = layouts.flat_columns(bias, h, w, c, "chw", "hwc")
    nhwc_map = (z @ kernel + b).reshape(n, h, w, c)
    assert rel_err(nhwc_map, torch_map.numpy().transpose(0, 2, 3, 1)) < TOL


def test_flat_permutation_is_its_own_inverse_pair() -> None:
    p = layouts.flat_permutation(3, 4, 5, "chw", "hwc")
    q = layouts.flat_permutation(3, 4, 5, "hwc", "chw")
    np.testing.assert_array_equal(p[q], np.arange(60))
    np.testing.assert_array_equal(layouts.flat_permutation(3, 4, 5, "hwc", "hwc"), np.arange(60))


def test_bad_layouts_are_refused_with_what_was_wrong() -> None:
    with pytest.raises(ConvBNError, match=r"a torch conv weight must have 4 dimensions. Received: shape \(3, 3\)"):
        layouts.conv_from_torch(np.zeros((3, 3)))
    with pytest.raises(ConvBNError, match=r"over 4 channels must be \(kh, kw, 1, 4\*m\). Received: shape \(3, 3, 1, 6\)"):
        layouts.depthwise_to_tf(np.zeros((3, 3, 1, 6)), 4)
    with pytest.raises(ConvBNError, match=r"input features \(10\) are not a flattened 2x2x3 feature map \(12\)"):
        layouts.flat_rows(np.zeros((10, 2)), 2, 2, 3, "chw", "hwc")
    with pytest.raises(ConvBNError, match=r"a flatten order is 'hwc' or 'chw'. Received: target='nhwc'"):
        layouts.flat_permutation(2, 2, 3, "chw", "nhwc")  # type: ignore[arg-type]
