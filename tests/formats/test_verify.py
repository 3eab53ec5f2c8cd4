"""The verification tolerances in convbn.convert, re-measured.

_TOLERANCE says each limit is 15 to 40 times the worst conversion error measured on folded and
fused layers; this measures it again on fresh random layers and checks that margin, and that real
mistakes stay far above the limit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import convbn
from convbn.convert import _TOLERANCE, Checkpoint, fuse_checkpoint, prepare_for_format, verify_checkpoint
from tests.conftest import need_module


def _layer(rng, dtype, var_scale, bias_scale, cin=16, cout=32):
    w = rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)
    return convbn.ConvBNParams(
        kernel=w.astype(dtype), bias=(rng.standard_normal(cout) * bias_scale).astype(dtype),
        gamma=rng.uniform(0.2, 2, cout).astype(dtype), beta=rng.standard_normal(cout).astype(dtype),
        moving_mean=(rng.standard_normal(cout) * bias_scale).astype(dtype),
        moving_var=(rng.uniform(0.1, 2, cout) * var_scale).astype(dtype), eps=1e-5 if var_scale < 1e-3 else 1e-3,
    )


DTYPES = ["float64", "float32", "float16", "bfloat16"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_conversion_error_is_well_inside_the_tolerance(dtype):
    if dtype == "bfloat16":
        dtype = need_module("ml_dtypes").bfloat16
    rng = np.random.default_rng(7)
    worst = 0.0
    for var_scale in (1e-6, 1.0, 100.0):
        for bias_scale in (0.1, 10.0):
            ckpt = Checkpoint(layers={f"l{i}": _layer(rng, dtype, var_scale, bias_scale) for i in range(2)})
            for converted in (prepare_for_format(ckpt, "slim"), prepare_for_format(ckpt, "torch", fold_bias="moving_mean"),
                              fuse_checkpoint(ckpt)):
                worst = max(worst, *(c.max_rel for c in verify_checkpoint(ckpt, converted)))
    limit = _TOLERANCE[np.dtype(dtype).name]
    assert 0 <= worst <= limit / 10, (worst, limit)


def test_real_mistakes_fail_by_orders_of_magnitude():
    rng = np.random.default_rng(8)
    p = _layer(rng, np.float32, 1.0, 1.0)
    ckpt = Checkpoint(layers={"l": p})
    mistakes = {
        "bias dropped instead of folded": dataclasses.replace(p, bias=None),
        "kernel spatially flipped": dataclasses.replace(p, kernel=np.ascontiguousarray(np.asarray(p.kernel)[::-1, ::-1])),
        "OIHW read as HWIO (3x3, I == O)": None,
        "variance read as std": dataclasses.replace(p, moving_var=np.sqrt(p.moving_var)),
    }
    square = _layer(rng, np.float32, 1.0, 1.0, cin=8, cout=8)
    for what, wrong in mistakes.items():
        source = ckpt if wrong is not None else Checkpoint(layers={"l": square})
        if wrong is None:
            wrong = dataclasses.replace(square, kernel=np.ascontiguousarray(np.asarray(square.kernel).transpose(0, 1, 3, 2)))
        check = verify_checkpoint(source, Checkpoint(layers={"l": wrong}))[0]
        assert not check.ok and check.max_rel > 1000 * check.tolerance, (what, check)
