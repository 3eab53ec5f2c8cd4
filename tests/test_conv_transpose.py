"""convbn.conv_transpose, the float64 reference --verify runs transposed convs with, against the
frameworks' own ops: ``torch.nn.functional.conv_transpose2d`` (symmetric pads, output_padding,
dilation, groups) and ``tf.nn.conv2d_transpose`` (SAME, VALID and explicit pads with an
``output_shape``), both in float64, over odd and even input sizes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from convbn.conv_transpose import conv_transpose, transpose_window
from convbn.errors import ConvBNError

SWEEP = list(itertools.product((1, 2), (3, 4, 5), ("SAME", "VALID")))  # stride, kernel, padding


def _case(seed: int, k: int, cin: int = 3, cout: int = 4, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, 3, 4, cin)), rng.standard_normal((k, k, cout // groups, cin))


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-12 * max(1.0, float(np.max(np.abs(want))))


@pytest.mark.needs("tensorflow")
@pytest.mark.parametrize("stride, k, padding", SWEEP)
def test_the_reference_is_tf_conv2d_transpose(stride: int, k: int, padding: str) -> None:
    import tensorflow as tf

    x, kernel = _case(stride * 10 + k, k)
    bias = np.random.default_rng(k).standard_normal(4)
    got = conv_transpose(x, kernel, bias, stride=(stride, stride), padding=padding)
    rows = [transpose_window(n, k, stride, 1, padding)[1] for n in x.shape[1:3]]
    want = tf.nn.conv2d_transpose(x, kernel, (2, *rows, 4), stride, padding).numpy() + bias
    _close(got, want)
    if padding == "SAME":
        assert rows == [3 * stride, 4 * stride]
        crop = k - stride
        if crop % 2:  # the odd row is cropped at the bottom, as TF does: cropping it at the top is wrong
            top = (crop + 1) // 2, crop // 2
            shifted = conv_transpose(x, kernel, bias, stride=(stride, stride), padding=[top, top])
            assert np.max(np.abs(shifted - want)) > 1e-2


@pytest.mark.needs("tensorflow")
@pytest.mark.parametrize("pads, extra", [(((1, 2), (2, 1)), (1, 0)), (((0, 0), (3, 1)), (0, 1)), (((2, 2), (1, 1)), (1, 1))])
def test_explicit_pads_are_tf_explicit_padding_with_its_output_shape(pads, extra) -> None:
    import tensorflow as tf

    x, kernel = _case(7, 4)
    got = conv_transpose(x, kernel, stride=(2, 2), padding=pads, output_padding=extra)
    shape = [transpose_window(n, 4, 2, 1, p, e)[1] for n, p, e in zip(x.shape[1:3], pads, extra, strict=True)]
    want = tf.nn.conv2d_transpose(x, kernel, (2, *shape, 4), 2, [[0, 0], *map(list, pads), [0, 0]]).numpy()
    _close(got, want)


@pytest.mark.needs("torch")
@pytest.mark.parametrize("stride, k, padding, output_padding, dilation, groups", [
    *((s, k, 0, 0, 1, 1) for s, k in itertools.product((1, 2), (3, 4, 5))),  # VALID
    (2, 5, 2, 1, 1, 1), (2, 4, 1, 1, 1, 1), (2, 3, 1, 0, 2, 1), (1, 3, 1, 0, 1, 2), (2, 4, 1, 1, 1, 2),
])
def test_the_reference_is_torch_conv_transpose2d(stride, k, padding, output_padding, dilation, groups) -> None:
    import torch
    import torch.nn.functional as F

    from convbn import layouts

    x, kernel = _case(stride * 100 + k * 10 + padding, k, cin=4, cout=6, groups=groups)
    bias = np.random.default_rng(3).standard_normal(6)
    pads = "VALID" if padding == 0 else ((padding, padding), (padding, padding))
    got = conv_transpose(x, kernel, bias, stride=(stride, stride), padding=pads, dilation=(dilation, dilation),
                         groups=groups, output_padding=(output_padding, output_padding))
    want = F.conv_transpose2d(
        torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(np.ascontiguousarray(layouts.transpose_to_torch(kernel))),
        torch.from_numpy(bias), stride=stride, padding=padding, output_padding=output_padding, groups=groups,
        dilation=dilation,
    ).permute(0, 2, 3, 1).numpy()
    _close(got, want)


@pytest.mark.parametrize("call, match", [
    (lambda: transpose_window(4, 5, 2, 1, "SAME", 1), "output_padding is not defined"),
    (lambda: transpose_window(2, 3, 1, 1, (3, 3)), "keep at least one output"),
    (lambda: conv_transpose(np.ones((1, 2, 2, 3)), np.ones((3, 3, 4, 2))), "must take x's 3 channels"),
    (lambda: conv_transpose(np.ones((1, 2, 2, 3)), np.ones((3, 3, 4, 3)), groups=2), "in 2 group"),
])
def test_what_is_undefined_is_refused(call, match) -> None:
    with pytest.raises(ConvBNError, match=match):
        call()
