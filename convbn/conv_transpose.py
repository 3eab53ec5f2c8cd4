"""Transposed convolution in NumPy float64: the reference ``convbn convert --verify`` runs
transposed convs with, and the window arithmetic that says which outputs a framework keeps.

A transposed conv is the gradient of a conv with respect to its input (TF's ``conv2d_transpose``
is defined so; torch's ``ConvTranspose2d`` computes the same op). Each input pixel ``(i, j)``
scatters ``kernel[a, b] @ x[i, j]`` into the *full* output at ``(i*s + a*d, j*s + b*d)``, which has
``(n - 1)*s + (k - 1)*d + 1`` rows; no kernel flip. The frameworks then keep a window of it, which
:func:`transpose_window` computes per spatial dim from the layer's ``padding`` (as
:class:`convbn.checkpoint.Layer` states it):

- ``"SAME"`` (TF, Keras, slim, flax's ``'SAME'``): ``n*s`` outputs, starting ``max(full - n*s, 0)
  // 2`` rows in; an odd crop drops the extra row at the bottom (for k=5, s=2: 1 row at the top, 2
  at the bottom). Rows past the full output (``k < s``) are zeros. ``output_padding`` must be 0.
- ``"VALID"``: the full output, plus ``output_padding`` zero rows at the end.
- per-side pads ``((top, bottom), (left, right))``: ``full - top - bottom + output_padding``
  outputs, starting ``top`` rows in: torch's ``padding=p, output_padding=op`` is ``((p, p), (p,
  p))`` with ``op``; TF's explicit padding with ``output_shape`` is the same with ``op = out -
  (full - top - bottom)``.

The kernel is in convbn's neutral layout ``(kh, kw, out/groups, in)`` (TF's filter); input channel
``c`` belongs to group ``c // (in/groups)``, whose outputs are ``g*(out/groups) ...``, as in torch.
tests/test_conv_transpose.py checks both functions against ``torch.nn.functional.conv_transpose2d``
and ``tf.nn.conv2d_transpose``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convbn.errors import ConvBNError

__all__ = ["conv_transpose", "transpose_window"]


def transpose_window(n: int, k: int, s: int, d: int, padding: Any, output_padding: int = 0) -> tuple[int, int]:
    """``(first, size)``: the rows of the full transposed-conv output of ``n`` inputs that one spatial
    dim keeps, for kernel size ``k``, stride ``s``, dilation ``d`` and ``padding`` ``"SAME"``,
    ``"VALID"`` or ``(before, after)``; see the module docstring.

    Example:
        >>> transpose_window(4, 5, 2, 1, "SAME")  # DCGAN's deconv2d: 8 of the 11 full rows, from row 1
        (1, 8)

    Raises:
        ConvBNError: for ``output_padding`` with SAME, negative pads, or an empty window.
    """
    full = (n - 1) * s + (k - 1) * d + 1
    if padding == "SAME":
        if output_padding:
            raise ConvBNError(
                f"a SAME transposed conv keeps n*stride outputs; output_padding is not defined for it. "
                f"Received: output_padding={output_padding}"
            )
        return max(full - n * s, 0) // 2, n * s
    before, after = (0, 0) if padding == "VALID" else (int(padding[0]), int(padding[1]))
    size = full - before - after + output_padding
    if min(before, after, output_padding) < 0 or size <= 0:
        raise ConvBNError(
            f"a transposed conv's pads and output_padding must be >= 0 and keep at least one output. Received: "
            f"pads ({before}, {after}), output_padding {output_padding} for {n} inputs, kernel {k}, stride {s}, "
            f"dilation {d}"
        )
    return before, size


def conv_transpose(
    x: Any,
    kernel: Any,
    bias: Any = None,
    *,
    stride: tuple[int, int] = (1, 1),
    padding: Any = "VALID",
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    output_padding: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """The transposed conv of NHWC ``x`` with the neutral ``(kh, kw, out/groups, in)`` ``kernel`` (plus
    ``bias``), in float64; ``padding`` is ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))``.

    Example:
        >>> y = conv_transpose(np.ones((1, 4, 4, 2)), np.ones((5, 5, 3, 2)), stride=(2, 2), padding="SAME")
        >>> y.shape
        (1, 8, 8, 3)

    Raises:
        ConvBNError: when the kernel's input channels, groups or window do not fit ``x``.
    """
    x = np.asarray(x, np.float64)
    w = np.asarray(kernel, np.float64)
    if x.ndim != 4 or w.ndim != 4:
        raise ConvBNError(f"conv_transpose takes NHWC x and a 4-D kernel. Received: x {x.shape}, kernel {w.shape}")
    n, h, wd, cin = x.shape
    kh, kw, per_group, k_in = w.shape
    if k_in != cin or groups < 1 or cin % groups:
        raise ConvBNError(
            f"a transposed conv kernel (kh, kw, out/groups, in) must take x's {cin} channels in {groups} group(s). "
            f"Received: kernel {w.shape}"
        )
    pads = ("SAME", "SAME") if padding == "SAME" else ("VALID", "VALID") if padding == "VALID" else tuple(padding)
    (sh, sw), (dh, dw) = stride, dilation
    top, out_h = transpose_window(h, kh, sh, dh, pads[0], output_padding[0])
    left, out_w = transpose_window(wd, kw, sw, dw, pads[1], output_padding[1])
    full = np.zeros((n, max((h - 1) * sh + (kh - 1) * dh + 1, top + out_h),
                     max((wd - 1) * sw + (kw - 1) * dw + 1, left + out_w), groups * per_group))
    xg = x.reshape(n, h, wd, groups, cin // groups)
    wg = w.reshape(kh, kw, per_group, groups, cin // groups)
    for a in range(kh):
        for b in range(kw):
            taps = np.einsum("nhwgc,jgc->nhwgj", xg, wg[a, b]).reshape(n, h, wd, groups * per_group)
            full[:, a * dh : a * dh + (h - 1) * sh + 1 : sh, b * dw : b * dw + (wd - 1) * sw + 1 : sw] += taps
    y = full[:, top : top + out_h, left : left + out_w]
    return y if bias is None else y + np.asarray(bias, np.float64)
