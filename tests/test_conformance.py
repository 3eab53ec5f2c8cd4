"""The declared conformance matrix (:mod:`convbn.conformance`) run on each backend under test.

One test per backend x task (a case in a dtype, over its modes and layouts); each compares every
output, moving statistic and gradient with the float64 reference at the tolerance of its group
and dtype, and fails with one line per failed comparison naming the backend, the case and the
error. The numpy backend in float64 *is* the reference; ``test_reference.py`` checks it against
an independent implementation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from convbn import dispatch
from convbn.conformance import cases, runner
from convbn.conformance.cases import DTYPES, EDGE_CASE, Task
from convbn.conformance.runner import Oracle, Result, run_task
from convbn.dispatch import BACKENDS
from convbn.geometry import plan_for
from tests.conftest import backend_enabled, need

ORACLE = Oracle()  # float64 results, shared by every test in this worker
TASKS = [t for t in cases.tasks() if t.kind in ("forward", "grad", "edge")]


def assert_passes(results: list[Result]) -> None:
    """Fail with every failed comparison's message; skip when nothing could be measured here."""
    failures = [r for r in results if r.failed]
    if failures:
        raise AssertionError("\n".join(r.message() for r in failures))
    if not any(r.status == "pass" for r in results):
        pytest.skip("; ".join(sorted({r.detail for r in results})) or "nothing to check")


@pytest.mark.matrix
@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.id)
def test_matrix(backend, task):
    results = run_task(backend, "cpu", task, ORACLE)
    assert results
    assert_passes(results)


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_already_on_gpu(framework, dtype):
    """Skipped (not passed) where the framework sees no GPU."""
    results = run_task(framework, "cpu", Task("gpu", EDGE_CASE, dtype, ("eval", "train_unbiased"), ("NHWC",)),
                       ORACLE)
    assert results and all(r.device == "gpu" for r in results)
    assert_passes(results)


# -- the suite catches broken backends ---------------------------------------------------------------

def _swap_same_split(module, monkeypatch):
    """Break ``module``: SAME pads the other way round (the extra row/column at the top/left)."""
    original = module.conv_bn

    def broken(x, params, plan):
        if params.padding != "SAME" or plan.pads is None:
            return original(x, params, plan)
        swapped = tuple((after, before) for before, after in plan.pads)
        p = dataclasses.replace(params, padding=swapped)
        return original(x, p, plan_for(module.static_shape(x), p, plan.data_format, plan.training))

    monkeypatch.setattr(module, "conv_bn", broken)


def _biased_moving_var(module, monkeypatch):
    """Break ``module``: the moving variance is always updated with the biased batch variance."""
    original = module.conv_bn

    def broken(x, params, plan):
        return original(x, dataclasses.replace(params, var_update="biased"), plan)

    monkeypatch.setattr(module, "conv_bn", broken)


def test_swapped_same_split_is_caught_and_named(framework, monkeypatch):
    module = dispatch.load_backend(framework)
    _swap_same_split(module, monkeypatch)
    task = Task("forward", EDGE_CASE, "float32", ("eval", "train_unbiased"), ("NHWC",))
    results = run_task(framework, "cpu", task, Oracle())
    with pytest.raises(AssertionError) as info:
        assert_passes(results)
    message = str(info.value)
    assert f"{framework} on cpu, float32 eval check, case same_s2_even[eval,NHWC]: y error " in message
    assert f"{framework} on cpu, float32 train check, case same_s2_even[train_unbiased,NHWC]: y error " in message
    worst = max(r.error for r in results if r.failed)
    assert worst > 1e3 * max(r.tolerance for r in results if r.failed)  # far beyond rounding


def test_biased_moving_update_is_caught_and_named(framework, monkeypatch):
    module = dispatch.load_backend(framework)
    _biased_moving_var(module, monkeypatch)
    task = Task("forward", EDGE_CASE, "float32", ("train_unbiased", "train_biased"), ("NHWC",))
    results = run_task(framework, "cpu", task, Oracle())
    failed = [r for r in results if r.failed]
    # Only the unbiased convention's moving variance is wrong; outputs and the biased mode pass.
    assert [(r.group, r.case, r.quantity) for r in failed] == [
        ("stats", "same_s2_even[train_unbiased,NHWC]", "moving_var")
    ]
    assert failed[0].message().startswith(
        f"{framework} on cpu, float32 stats check, case same_s2_even[train_unbiased,NHWC]: moving_var error "
    )
    # 0.1 * var / 32 against a moving variance of ~1: about 3e-3, hundreds of tolerances.
    assert failed[0].error > 100 * failed[0].tolerance


def test_gpu_check_is_skipped_not_passed_without_gpu():
    available = [n for n in ("torch", "tensorflow", "jax") if backend_enabled(n)]
    if not available:
        pytest.skip("no framework backend under test")
    name = available[0]
    if runner.gpu_device(name) is not None:
        pytest.skip(f"{name} sees a GPU; test_input_already_on_gpu runs the check there")
    results = run_task(name, "cpu", Task("gpu", EDGE_CASE, "float32"), ORACLE)
    assert [(r.status, r.detail) for r in results] == [("skip", f"no GPU visible to {name}")]
    assert not any(r.status == "pass" for r in results)


# -- GPU precision settings ---------------------------------------------------------------------------

def _precision_flags(name):
    if name == "torch":
        import torch

        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):
            return (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
        return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if name == "tensorflow":
        import tensorflow as tf

        return tf.config.experimental.tensor_float_32_execution_enabled()
    import jax

    return jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]


_TF32 = {
    # (allow_tf32=False, allow_tf32=True) as each framework spells it
    "tensorflow": (False, True),
    "jax": ("highest", "tensorfloat32"),
}


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_gpu_precision_sets_and_restores_flags(framework, allow_tf32):
    before = _precision_flags(framework)
    with runner.gpu_precision(allow_tf32, [framework]) as state:
        inside = _precision_flags(framework)
        assert framework in state
    assert _precision_flags(framework) == before
    if framework == "torch":
        legacy = isinstance(inside[0], bool)
        expected = (allow_tf32, allow_tf32) if legacy else (("tf32",) * 2 if allow_tf32 else ("ieee",) * 2)
        assert inside == expected
    else:
        assert inside == _TF32[framework][allow_tf32]


# -- the error measures ---------------------------------------------------------------------------------

def test_output_error_is_per_channel():
    """A channel scaled up (tiny variance) cannot hide an error in another channel."""
    reference = np.ones((1, 2, 2, 2))
    reference[..., 1] = 1e4
    actual = reference.copy()
    actual[0, 0, 0, 0] += 1e-3
    from convbn.conformance.reference import output_error

    assert output_error(actual, reference, reference, -1) == (pytest.approx(1e-3), "channel 0")
    # NaN is an infinite error, never a pass.
    actual[0, 0, 0, 1] = np.nan
    assert output_error(actual, reference, reference, -1) == (float("inf"), "channel 1")


def test_requested_backends_are_the_ones_tested():
    for name in BACKENDS:
        if backend_enabled(name):
            need(name)  # does not skip
    assert all(dispatch.is_installed(n) for n in BACKENDS if backend_enabled(n))
