"""An independent float64 Conv2D + BatchNorm, written as plainly as possible.

It shares no code with convbn: padding is recomputed from TF's documented SAME rule and the conv is a
direct loop over output positions, so a bug in convbn's im2col or padding arithmetic cannot hide in it.
"""

from __future__ import annotations

import math

import numpy as np


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def tf_same_pads(n, k, s, d):
    k_eff = (k - 1) * d + 1
    out = math.ceil(n / s)
    total = max((out - 1) * s + k_eff - n, 0)
    return total // 2, total - total // 2


def explicit_pads(padding, hw, kernel_hw, stride, dilation):
    if isinstance(padding, str) and padding.upper() == "SAME":
        return tuple(tf_same_pads(n, k, s, d) for n, k, s, d in zip(hw, kernel_hw, stride, dilation, strict=False))
    if isinstance(padding, str) and padding.upper() == "VALID":
        return ((0, 0), (0, 0))
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding[0], int):
        return ((padding[0], padding[0]), (padding[1], padding[1]))
    return tuple(tuple(p) for p in padding)


def conv(x, kernel, stride=1, padding="SAME", dilation=1, groups=1):
    """NHWC x, HWIO kernel, float64, direct summation."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    n, h, w, c = x.shape
    kh, kw, cg, o = kernel.shape
    (t, b), (left, right) = explicit_pads(padding, (h, w), (kh, kw), (sh, sw), (dh, dw))
    xp = np.zeros((n, h + t + b, w + left + right, c))
    xp[:, t : t + h, left : left + w] = x
    ho = (h + t + b - (kh - 1) * dh - 1) // sh + 1
    wo = (w + left + right - (kw - 1) * dw - 1) // sw + 1
    og = o // groups
    y = np.zeros((n, ho, wo, o))
    for i in range(ho):
        for j in range(wo):
            for g in range(groups):
                patch = xp[
                    :,
                    i * sh : i * sh + (kh - 1) * dh + 1 : dh,
                    j * sw : j * sw + (kw - 1) * dw + 1 : dw,
                    g * cg : (g + 1) * cg,
                ]
                y[:, i, j, g * og : (g + 1) * og] = np.tensordot(
                    patch, kernel[..., g * og : (g + 1) * og], axes=([1, 2, 3], [0, 1, 2])
                )
    return y


def conv_bn(x, p, training=False):
    """Reference for ``convbn.conv_bn`` on NHWC float64: returns y, or (y, new_mean, new_var)."""
    z = conv(x, p["kernel"], p["stride"], p["padding"], p["dilation"], p["groups"])
    if p.get("bias") is not None:
        z = z + p["bias"]
    gamma = p.get("gamma")
    beta = p.get("beta")
    gamma = 1.0 if gamma is None else np.asarray(gamma, np.float64)
    beta = 0.0 if beta is None else np.asarray(beta, np.float64)
    eps = p["eps"]
    if not training:
        return (z - p["moving_mean"]) / np.sqrt(p["moving_var"] + eps) * gamma + beta
    count = z.shape[0] * z.shape[1] * z.shape[2]
    mean = z.reshape(-1, z.shape[-1]).mean(axis=0)
    biased = ((z - mean) ** 2).reshape(-1, z.shape[-1]).mean(axis=0)
    y = (z - mean) / np.sqrt(biased + eps) * gamma + beta
    batch_var = biased * count / (count - 1) if p["var_update"] == "unbiased" else biased
    m = p["momentum"]
    new_mean = m * np.asarray(p["moving_mean"], np.float64) + (1 - m) * mean
    new_var = m * np.asarray(p["moving_var"], np.float64) + (1 - m) * batch_var
    return y, new_mean, new_var
