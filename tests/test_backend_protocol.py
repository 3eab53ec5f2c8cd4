"""Every backend module matches :class:`convbn.backends.BackendModule`, signature by signature.

mypy checks the same thing statically (convbn/backends/__init__.py assigns each module to the
protocol); this test checks what mypy cannot: parameter names and kinds as callers pass them,
default values, and that ``__all__`` is exactly the protocol plus the documented extras.
"""

from __future__ import annotations

import importlib
import inspect
import types
from typing import Any

import pytest

from convbn.backends import EXTRAS, BackendModule


def _protocol() -> dict[str, inspect.Signature | None]:
    """Each protocol member: its signature without ``self``, or None for a data attribute."""
    members: dict[str, inspect.Signature | None] = dict.fromkeys(BackendModule.__annotations__)
    for name, value in vars(BackendModule).items():
        if inspect.isfunction(value) and not name.startswith("_"):
            sig = inspect.signature(value)
            members[name] = sig.replace(parameters=list(sig.parameters.values())[1:])
    return members


def _shape(sig: inspect.Signature) -> list[tuple[str, Any, Any]]:
    """What a caller relies on: each parameter's name, kind and default (not the annotations)."""
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def mismatches(module: types.ModuleType, name: str) -> list[str]:
    """How ``module`` (backend ``name``) departs from the protocol; empty when it matches."""
    found = []
    protocol = _protocol()
    for member, sig in protocol.items():
        if not hasattr(module, member):
            found.append(f"{member}: missing")
        elif sig is None:
            if not isinstance(getattr(module, member), str):
                found.append(f"{member}: not a str")
        elif not callable(getattr(module, member)):
            found.append(f"{member}: not a function")
        elif _shape(inspect.signature(getattr(module, member))) != _shape(sig):
            found.append(f"{member}{inspect.signature(getattr(module, member))}: the protocol has {member}{sig}")
    exported = set(getattr(module, "__all__", ()))
    expected = set(protocol) | EXTRAS[name]
    if exported != expected:
        found.append(f"__all__ lists {sorted(exported - expected)} beyond and lacks {sorted(expected - exported)}")
    for extra in EXTRAS[name]:
        if not callable(getattr(module, extra, None)):
            found.append(f"{extra}: a documented extra that is missing")
    return found


def test_the_protocol_declares_every_backend_function() -> None:
    # The list the issue names: a member dropped from the protocol would go unchecked everywhere.
    assert set(_protocol()) == {
        "NAME", "static_shape", "resolve_device", "asarray", "to_numpy", "conversion_key", "to_backend",
        "conv_bn", "train_in_place", "empty_output", "fuse", "sync_group", "train_sync",
    }  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        "numpy",  # framework-free: runs in every run
        pytest.param("torch", marks=pytest.mark.needs("torch")),
        pytest.param("tensorflow", marks=pytest.mark.needs("tensorflow")),
        pytest.param("jax", marks=pytest.mark.needs("jax")),
    ],
)
def test_backend_module_matches_the_protocol(name: str) -> None:
    module = importlib.import_module(f"convbn.backends.{name}")
    assert mismatches(module, name) == []
    assert module.NAME == name


def _copy_of_numpy_backend(**changes: Any) -> types.ModuleType:
    """A module object with the numpy backend's members, ``changes`` applied (None deletes)."""
    from convbn.backends import numpy as backend

    copy = types.ModuleType("broken_backend")
    vars(copy).update({k: v for k, v in vars(backend).items() if not k.startswith("__") or k == "__all__"})
    for member, value in changes.items():
        if value is None:
            delattr(copy, member)
        else:
            setattr(copy, member, value)
    return copy


def test_the_check_passes_an_unchanged_copy() -> None:
    # So the failures below come from the change alone, not from copying the module.
    assert mismatches(_copy_of_numpy_backend(), "numpy") == []


def _asarray_with_extras(a: Any, device: Any = None, dtype: Any = None) -> Any:
    return a


def _asarray_renamed(a: Any, where: Any = None) -> Any:
    return a


def _asarray_other_default(a: Any, device: Any = "cpu") -> Any:
    return a


def _asarray_keyword_only(a: Any, *, device: Any = None) -> Any:
    return a


@pytest.mark.parametrize(
    "drifted", [_asarray_with_extras, _asarray_renamed, _asarray_other_default, _asarray_keyword_only]
)
def test_the_check_fails_a_copy_whose_signature_drifted(drifted: Any) -> None:
    found = mismatches(_copy_of_numpy_backend(asarray=drifted), "numpy")
    assert len(found) == 1 and found[0].startswith("asarray("), found


def test_the_check_fails_a_copy_missing_a_function() -> None:
    found = mismatches(_copy_of_numpy_backend(fuse=None), "numpy")
    assert found == ["fuse: missing"]


def test_the_check_fails_a_copy_exporting_an_undocumented_name() -> None:
    copy = _copy_of_numpy_backend()
    copy.__all__ = [*copy.__all__, "_conv"]
    assert mismatches(copy, "numpy") == ["__all__ lists ['_conv'] beyond and lacks []"]
    copy.__all__ = [n for n in copy.__all__ if n not in ("_conv", "conv_bn_vjp")]
    assert mismatches(copy, "numpy") == ["__all__ lists [] beyond and lacks ['conv_bn_vjp']"]


@pytest.mark.needs("jax")
def test_jax_conversion_key_follows_x64() -> None:
    # api.py keys its converted-params cache on it; a constant key would reuse float32 params
    # converted without x64 once x64 is turned on.
    import jax

    from convbn.backends import jax as jb

    before = jax.config.read("jax_enable_x64")
    try:
        jax.config.update("jax_enable_x64", False)
        off = jb.conversion_key()
        jax.config.update("jax_enable_x64", True)
        on = jb.conversion_key()
    finally:
        jax.config.update("jax_enable_x64", before)
    assert off != on


def _train_in_place_with_momentum(x: Any, params: Any, plan: Any, momentum: float) -> Any:
    return x


def test_the_check_fails_a_copy_without_the_layers_training_path() -> None:
    # ConvBN2d trains through train_in_place: a backend that lacks it, or has it with the extra
    # momentum argument the layer once passed to torch's kernel itself, is caught.
    assert mismatches(_copy_of_numpy_backend(train_in_place=None), "numpy") == ["train_in_place: missing"]
    found = mismatches(_copy_of_numpy_backend(train_in_place=_train_in_place_with_momentum), "numpy")
    assert len(found) == 1 and found[0].startswith("train_in_place("), found


def _writable_stats(name: str, params: Any) -> Any:
    """``params`` on backend ``name`` with its moving statistics in arrays that can be written."""
    import dataclasses

    import convbn

    if name == "numpy":
        return dataclasses.replace(params, moving_mean=params.moving_mean.copy(), moving_var=params.moving_var.copy())
    native = convbn.to_backend(params, name)
    if name == "tensorflow":
        import tensorflow as tf

        return dataclasses.replace(native, moving_mean=tf.Variable(native.moving_mean),
                                   moving_var=tf.Variable(native.moving_var))
    return native


@pytest.mark.parametrize(
    "name",
    [
        "numpy",
        pytest.param("torch", marks=pytest.mark.needs("torch")),
        pytest.param("tensorflow", marks=pytest.mark.needs("tensorflow")),
    ],
)
@pytest.mark.parametrize("var_update", ["unbiased", "biased"])
def test_train_in_place_writes_conv_bn_training_numbers(name: str, var_update: str) -> None:
    import numpy as np

    from convbn.backends.numpy import to_numpy
    from convbn.conformance.cases import Case
    from convbn.dispatch import load_backend
    from convbn.geometry import plan_for

    x, params = Case("in_place", (2, 6, 7, 3), (3, 3), 4, stride=2).params(var_update=var_update, momentum=0.8)
    module = load_backend(name)
    xb = module.asarray(x)
    p = _writable_stats(name, params)
    plan = plan_for(module.static_shape(xb), p, "NHWC", True)
    y_ref, new = module.conv_bn(xb, _writable_stats(name, params), plan)
    before = to_numpy(p.moving_mean).copy()
    y = module.train_in_place(xb, p, plan)
    np.testing.assert_array_equal(to_numpy(y), to_numpy(y_ref))
    np.testing.assert_array_equal(to_numpy(p.moving_mean), to_numpy(new.moving_mean))
    np.testing.assert_array_equal(to_numpy(p.moving_var), to_numpy(new.moving_var))
    assert np.max(np.abs(to_numpy(p.moving_mean) - before)) > 1e-3  # they were written


@pytest.mark.parametrize(
    "name",
    [
        "numpy",
        pytest.param("torch", marks=pytest.mark.needs("torch")),
        pytest.param("tensorflow", marks=pytest.mark.needs("tensorflow")),
        pytest.param("jax", marks=pytest.mark.needs("jax")),
    ],
)
def test_train_in_place_refuses_statistics_it_cannot_write(name: str) -> None:
    import dataclasses

    import numpy as np

    import convbn
    from convbn.conformance.cases import Case
    from convbn.dispatch import load_backend
    from convbn.geometry import plan_for

    x, params = Case("in_place", (2, 6, 7, 3), (3, 3), 4).params()
    module = load_backend(name)
    xb = module.asarray(x)
    if name == "numpy":
        mean = params.moving_mean.copy()
        mean.flags.writeable = False
        unwritable = dataclasses.replace(params, moving_mean=mean)
    else:  # NumPy statistics (torch and TF), immutable arrays (JAX, TF eager tensors)
        unwritable = convbn.to_backend(params, name) if name in ("jax", "tensorflow") else params
    before = np.array(unwritable.moving_mean)
    plan = plan_for(module.static_shape(xb), unwritable, "NHWC", True)
    with pytest.raises(convbn.ConvBNError, match=r"params\.moving_mean.*Received: moving_mean"):
        module.train_in_place(xb, unwritable, plan)
    np.testing.assert_array_equal(np.array(unwritable.moving_mean), before)
