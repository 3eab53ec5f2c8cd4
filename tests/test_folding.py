"""The conv-bias / zero-bias / missing-gamma rule (:mod:`convbn.folding`), checked against running
the unfolded conv + bias + BatchNorm in NumPy float64, and the three places that apply it
(``save_checkpoint``'s preparation, the loaders' staging, the single-pair adapters) agreeing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import convbn
from convbn import folding
from convbn.checkpoint import Checkpoint
from convbn.convert import prepare_for_format
from convbn.loading import conform_checkpoint
from tests import reference
from tests.conftest import need_module

# Folding changes only beta (or the moving mean); the outputs then differ by the rounding of one
# add, a sqrt and a division in float64 (<= 1e-15 relative measured, SEMANTICS.md "Bias folding");
# 1e-12 leaves a 1000x margin and is still 1e9 times below what a wrong formula gives.
TOL64 = 1e-12


def _params(*, bias="random", gamma=True, beta=True, dtype=np.float64, seed=3) -> convbn.ConvBNParams:
    rng = np.random.default_rng(seed)
    o = 5
    b = {"random": rng.normal(0, 3, o), "zero": np.zeros(o), None: None}[bias]
    return convbn.ConvBNParams(
        kernel=rng.normal(size=(3, 3, 2, o)).astype(dtype),
        bias=None if b is None else b.astype(dtype),
        gamma=rng.uniform(0.5, 2.0, o).astype(dtype) if gamma else None,
        beta=rng.normal(size=o).astype(dtype) if beta else None,
        moving_mean=rng.normal(size=o).astype(dtype),
        moving_var=rng.uniform(0.05, 3.0, o).astype(dtype),
        eps=1e-3, padding="SAME",
    )


def _unfolded_eval(x: np.ndarray, p: convbn.ConvBNParams) -> np.ndarray:
    """conv + bias + BatchNorm in eval mode, written out: an absent gamma is ones, beta zeros."""
    z = reference.conv(x, p.kernel, p.stride, p.padding, p.dilation, p.groups)
    o = z.shape[-1]
    z = z + (np.zeros(o) if p.bias is None else np.asarray(p.bias, np.float64))
    gamma = np.ones(o) if p.gamma is None else np.asarray(p.gamma, np.float64)
    beta = np.zeros(o) if p.beta is None else np.asarray(p.beta, np.float64)
    mean, var = np.asarray(p.moving_mean, np.float64), np.asarray(p.moving_var, np.float64)
    return (z - mean) / np.sqrt(var + p.eps) * gamma + beta


def _x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, 6, 6, 2))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("into", ["beta", "moving_mean"])
@pytest.mark.parametrize("gamma", [True, False], ids=["gamma", "no_gamma"])
def test_fold_is_exact_in_eval_mode(into, gamma):
    p = _params(gamma=gamma)
    fitted = folding.fit(p, bias=False, fold=into)
    assert fitted.bias == "folded" and fitted.params.bias is None and fitted.lost == ()
    x = _x()
    assert _rel(_unfolded_eval(x, fitted.params), _unfolded_eval(x, p)) <= TOL64
    # Only the field folded into changes; the other stays bit for bit.
    untouched = "moving_mean" if into == "beta" else "beta"
    np.testing.assert_array_equal(getattr(fitted.params, untouched), getattr(p, untouched))
    # Not the fold without the bias: the bias matters by far more than the tolerance.
    assert _rel(_unfolded_eval(x, dataclasses.replace(p, bias=None)), _unfolded_eval(x, p)) > 1e-3


def test_fold_keeps_float32_and_rounds_once():
    p32 = _params(dtype=np.float32)
    fitted = folding.fit(p32, bias=False, fold="beta")
    assert fitted.params.beta.dtype == np.float32
    # beta' computed in float64 from the float32 values, stored rounded once: within half an ulp.
    g, b = p32.gamma.astype(np.float64), p32.bias.astype(np.float64)
    exact = p32.beta.astype(np.float64) + g * b / np.sqrt(p32.moving_var.astype(np.float64) + p32.eps)
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(fitted.params.beta.astype(np.float64) - exact) <= ulp / 2)


def test_a_missing_gamma_folds_as_ones():
    p = _params(gamma=False)
    ones = dataclasses.replace(p, gamma=np.ones(5))
    np.testing.assert_array_equal(
        folding.fit(p, bias=False, fold="beta").params.beta, folding.fit(ones, bias=False, fold="beta").params.beta
    )


def test_a_zero_bias_is_dropped_and_a_nonzero_one_refused_without_a_fold_target():
    zero = _params(bias="zero")
    dropped = folding.fit(zero, bias=False)
    assert (dropped.bias, dropped.lost, dropped.params.bias) == ("dropped", (), None)
    np.testing.assert_array_equal(dropped.params.beta, zero.beta)
    np.testing.assert_array_equal(dropped.params.moving_mean, zero.moving_mean)

    p = _params()
    refused = folding.fit(p, bias=False)
    assert (refused.bias, refused.lost) == ("refused", ("bias",))
    assert refused.params is p


def test_a_zero_bias_folds_to_nothing():
    zero = _params(bias="zero")
    for into in ("beta", "moving_mean"):
        folded = folding.fit(zero, bias=False, fold=into).params
        np.testing.assert_array_equal(folded.beta, zero.beta)
        np.testing.assert_array_equal(folded.moving_mean, zero.moving_mean)


def test_a_destination_with_a_bias_gets_zero_and_keeps_a_given_one():
    p = _params(bias=None, dtype=np.float32)
    fitted = folding.fit(p, bias=True)
    assert fitted.bias == "zero" and fitted.params.bias.dtype == np.float32
    np.testing.assert_array_equal(fitted.params.bias, np.zeros(5, np.float32))
    x = _x()
    assert _rel(_unfolded_eval(x, fitted.params), _unfolded_eval(x, p)) == 0.0

    q = _params()
    for holds in (True, None):
        kept = folding.fit(q, bias=holds)
        assert kept.bias is None and kept.params is q


def test_gamma_and_beta_a_destination_lacks():
    ones = dataclasses.replace(_params(bias=None), gamma=np.ones(5), beta=np.zeros(5))
    assert folding.fit(ones, bias=None, gamma=False, beta=False).lost == ()
    assert folding.fit(_params(bias=None), bias=None, gamma=False, beta=False).lost == ("gamma", "beta")
    # A bias folded into beta gives beta a value a destination without beta cannot hold; folded
    # into the moving mean it leaves the absent beta absent.
    no_beta = _params(beta=False)
    assert folding.fit(no_beta, bias=False, beta=False, fold="beta").lost == ("beta",)
    assert folding.fit(no_beta, bias=False, beta=False, fold="moving_mean").lost == ()


def test_filled_and_unknown_fold_target():
    np.testing.assert_array_equal(folding.filled(None, "gamma", 3, np.float32), np.ones(3, np.float32))
    np.testing.assert_array_equal(folding.filled(None, "bias", 2, np.float64), np.zeros(2))
    with pytest.raises(convbn.ConvBNError, match="fold_bias must be 'beta' or 'moving_mean'"):
        folding.fit(_params(), bias=False, fold="gamma")  # type: ignore[arg-type]


# -- the three places that apply the rule ------------------------------------------------------------


def _checkpoint(p: convbn.ConvBNParams) -> Checkpoint:
    return Checkpoint(layers={"conv1": p}, format="torch")


@pytest.mark.parametrize("bias", ["zero", "random"])
def test_saving_loading_and_assigning_agree(bias):
    p = _params(bias=bias)
    no_bias = _checkpoint(_params(bias=None, seed=9))
    # save_checkpoint to a format without conv biases folds (a zero bias folds to nothing).
    saved = prepare_for_format(_checkpoint(p), "slim").layers["conv1"]
    expected = folding.fit(p, bias=False, fold="beta").params
    assert saved.bias is None
    np.testing.assert_array_equal(saved.beta, expected.beta)
    # Loading into a conv without bias with folding refused: a zero bias is dropped, others refused.
    if bias == "zero":
        loaded = conform_checkpoint(_checkpoint(p), no_bias, fold_bias=None)[0].layers["conv1"]
        assert loaded.bias is None
        np.testing.assert_array_equal(loaded.beta, p.beta)
    else:
        with pytest.raises(convbn.ConvBNError, match="fold_bias=None refuses to fold"):
            conform_checkpoint(_checkpoint(p), no_bias, fold_bias=None)
    # Loading with a fold target folds, with the checkpoint's eps.
    loaded = conform_checkpoint(_checkpoint(p), no_bias, fold_bias="beta")[0].layers["conv1"]
    np.testing.assert_array_equal(loaded.beta, expected.beta)


@pytest.mark.parametrize("bias", ["zero", "random"])
def test_assigning_into_a_conv_without_bias(bias):
    need_module("torch")
    import torch

    p = dataclasses.replace(_params(bias=bias), var_update="unbiased")
    conv, bn = torch.nn.Conv2d(2, 5, 3, padding=1, bias=False, dtype=torch.float64), torch.nn.BatchNorm2d(5).double()
    if bias == "random":
        with pytest.raises(convbn.ConvBNError, match="conv has no bias, but the params' bias is not all 0"):
            convbn.adapters.assign_torch(conv, bn, p)
        return
    convbn.adapters.assign_torch(conv, bn, p)
    np.testing.assert_array_equal(bn.bias.detach().numpy(), p.beta)
    x = _x()
    with torch.no_grad():
        y = bn.eval()(conv(torch.from_numpy(x).permute(0, 3, 1, 2))).permute(0, 2, 3, 1).numpy()
    assert _rel(y, _unfolded_eval(x, p)) <= TOL64
