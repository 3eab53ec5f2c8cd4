"""Random checkpoints and framework models for the format tests."""

from __future__ import annotations

import itertools

import numpy as np

import convbn
from convbn.convert import Checkpoint


def random_layer(
    rng: np.random.Generator,
    cin: int,
    cout: int,
    k: int = 3,
    *,
    bias: bool = True,
    gamma: bool = True,
    beta: bool = True,
    dtype: object = np.float32,
    **static: object,
) -> convbn.ConvBNParams:
    """A conv+BN layer with trained-looking statistics (not the 0/1 initial values)."""
    w = rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)
    return convbn.ConvBNParams(
        kernel=w.astype(dtype),
        bias=rng.standard_normal(cout).astype(dtype) if bias else None,
        gamma=rng.uniform(0.5, 1.5, cout).astype(dtype) if gamma else None,
        beta=rng.standard_normal(cout).astype(dtype) if beta else None,
        moving_mean=(rng.standard_normal(cout) * 0.5).astype(dtype),
        moving_var=rng.uniform(0.5, 2.0, cout).astype(dtype),
        **static,
    )


def random_checkpoint(seed: int = 0, widths: tuple[int, ...] = (3, 8, 16, 16), **kwargs: object) -> Checkpoint:
    """A chain of conv+BN layers ``layer1``, ``layer2``, ... (3x3 kernels)."""
    rng = np.random.default_rng(seed)
    ckpt = Checkpoint(format="test", convention="torch")
    for i, (cin, cout) in enumerate(itertools.pairwise(widths), 1):
        ckpt.layers[f"layer{i}"] = random_layer(rng, cin, cout, eps=1e-5, momentum=0.9, **kwargs)
    return ckpt


def assert_same_arrays(a: convbn.ConvBNParams, b: convbn.ConvBNParams) -> None:
    """Every array field bit-identical (dtype, shape and values), None where the other is None."""
    for field in ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_var"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape, (field, x.dtype, y.dtype, x.shape, y.shape)
            assert np.array_equal(x, y), field


def reference_eval(x: np.ndarray, params: convbn.ConvBNParams, **override: object) -> np.ndarray:
    """The independent float64 reference (tests/reference.py) in eval mode."""
    from tests import reference

    p = {
        name: None if getattr(params, name) is None else np.asarray(getattr(params, name), np.float64)
        for name in ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_var")
    }
    p.update(stride=params.stride, padding=params.padding, dilation=params.dilation, groups=params.groups,
             eps=params.eps, momentum=params.momentum, var_update=params.var_update)
    p.update(override)
    return reference.conv_bn(np.asarray(x, np.float64), p)  # type: ignore[no-any-return]



def relu_chain(x: np.ndarray, ckpt: Checkpoint) -> np.ndarray:
    """``ckpt``'s layers in order, each followed by a ReLU, in eval mode on the NumPy backend (float64)."""
    h = np.asarray(x, np.float64)
    for p in ckpt.layers.values():
        h = np.maximum(convbn.conv_bn(h, p, backend="numpy"), 0)
    return h
