"""Run `conv_bn` on a named backend from NumPy data, and take gradients with each framework's own
autodiff: the harness the conformance suite and the tests share.

Everything goes in and comes out as NumPy, so results from different backends compare directly.
``dtype`` runs ``x`` in another precision than the NumPy data's: the framework itself casts it
(so bfloat16 needs no NumPy support), the params keep their own dtype (mixed precision), and
low-precision results come back as float32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from convbn import dispatch
from convbn._dtypes import ml_dtype
from convbn.api import conv_bn, to_backend
from convbn.errors import ConvBNError
from convbn.geometry import plan_for
from convbn.params import ConvBNParams, with_arrays

__all__ = ["NotSupported", "as_numpy", "cast", "gradients", "on_device", "run", "to_framework"]

GRAD_FIELDS = ("kernel", "bias", "gamma", "beta")
LOW_PRECISION = ("bfloat16", "float16")


class NotSupported(RuntimeError):
    """The backend cannot run this dtype or device here (e.g. float64 on JAX without x64)."""


def to_framework(backend: str, a: Any, device: Any = None) -> Any:
    """NumPy ``a`` as ``backend``'s array on ``device`` (None: the framework's default)."""
    module = dispatch.load_backend(dispatch.normalize_name(backend))
    return module.asarray(a, device)


def cast(backend: str, a: Any, dtype: str | None) -> Any:
    """``backend``'s array ``a`` cast to ``dtype`` by the framework (None: unchanged).

    Raises:
        NotSupported: float64 on JAX without ``jax_enable_x64``; bfloat16 on NumPy without
            ml_dtypes.
    """
    if dtype is None:
        return a
    name = dispatch.normalize_name(backend)
    if name == "numpy":
        if dtype == "bfloat16":
            try:
                np_dtype = ml_dtype(dtype, "the numpy backend's input")
            except ConvBNError as exc:  # the bridge's refusal, as this module's "skip this case"
                raise NotSupported(str(exc)) from None
            return np.asarray(a).astype(np_dtype)
        return np.asarray(a).astype(dtype)
    if name == "torch":
        import torch

        return a.to(getattr(torch, dtype))
    if name == "tensorflow":
        import tensorflow as tf

        return tf.cast(a, dtype)
    import jax

    x64 = jax.config.jax_enable_x64  # type: ignore[attr-defined]
    if dtype == "float64" and not x64:
        raise NotSupported("float64 on JAX needs jax.config.update('jax_enable_x64', True)")
    return a.astype(dtype)


def as_numpy(backend: str, a: Any) -> np.ndarray:
    """``backend``'s array as NumPy; bfloat16/float16 as float32 (cast by the framework)."""
    name = dispatch.normalize_name(backend)
    if name == "torch":
        import torch

        t = a.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return np.asarray(t.cpu().numpy())
    if name == "tensorflow":
        import tensorflow as tf

        if a.dtype in (tf.bfloat16, tf.float16):
            a = tf.cast(a, tf.float32)
        return np.asarray(a.numpy())
    if name == "jax":
        if str(a.dtype) in LOW_PRECISION:
            a = a.astype("float32")
        return np.asarray(a)
    out = np.asarray(a)
    return out.astype(np.float32) if out.dtype.name in LOW_PRECISION else out


@contextlib.contextmanager
def on_device(backend: str, device: Any) -> Iterator[None]:
    """Places ops on ``device`` where the framework needs telling (TF: ops follow the scope, not
    their inputs, and would otherwise go to the first GPU)."""
    if dispatch.normalize_name(backend) == "tensorflow":
        import tensorflow as tf

        from convbn.backends import tensorflow as tfb

        with tf.device(tfb.resolve_device(device)):
            yield
    else:
        yield


def _native_x(name: str, module: Any, x: np.ndarray, device: Any, dtype: str | None) -> Any:
    dev = None if name == "numpy" else module.resolve_device(device)
    return cast(name, module.asarray(x, dev), dtype)


def run(
    backend: str,
    x: np.ndarray,
    params: ConvBNParams,
    training: bool = False,
    data_format: str = "NHWC",
    device: Any = None,
    dtype: str | None = None,
) -> tuple[np.ndarray, ConvBNParams | None]:
    """``conv_bn`` with ``x`` and ``params`` as ``backend``'s own arrays; results as NumPy.

    ``dtype`` casts ``x`` (not the params) in the framework before the call. Returns
    ``(y, new_params)``; ``new_params`` is None in eval mode.
    """
    name = dispatch.normalize_name(backend)
    module = dispatch.load_backend(name)
    with on_device(name, device):
        native = to_backend(params, name, device)
        xb = _native_x(name, module, x, device, dtype)
        # NumPy input would otherwise go to the auto-selected framework, not the numpy backend.
        chosen = "numpy" if name == "numpy" else None
        out = conv_bn(xb, native, training, data_format=data_format, backend=chosen)
        if not training:
            return as_numpy(name, out), None
        y, new = out
        return as_numpy(name, y), with_arrays(
            params,
            moving_mean=as_numpy(name, new.moving_mean),
            moving_var=as_numpy(name, new.moving_var),
        )


def gradients(
    backend: str,
    x: np.ndarray,
    params: ConvBNParams,
    dy: np.ndarray,
    training: bool = False,
    data_format: str = "NHWC",
    device: Any = None,
    dtype: str | None = None,
) -> dict[str, np.ndarray]:
    """Gradients of ``sum(conv_bn(x, params) * dy)`` w.r.t. ``x``, kernel, bias, gamma and beta.

    The numpy backend uses its analytic backward pass; the others their own autodiff (torch
    autograd, ``tf.GradientTape``, ``jax.grad``). Keys: ``"x"`` and each grad field that is set.
    ``dtype`` casts ``x`` (and ``dy``) in the framework; the params keep their dtype.
    """
    name = dispatch.normalize_name(backend)
    fields = [f for f in GRAD_FIELDS if getattr(params, f) is not None]
    if name == "numpy":
        from convbn.backends import numpy as np_backend

        xn = cast("numpy", x, dtype)
        plan = plan_for(xn.shape, params, data_format, training)
        grads = np_backend.conv_bn_vjp(xn, params, dy, plan)
        return {k: as_numpy("numpy", v) for k, v in grads.items() if k == "x" or k in fields}
    with on_device(name, device):
        return _GRADIENTS[name](x, params, dy, training, data_format, fields, device, dtype)


def _output(out: Any, training: bool) -> Any:
    return out[0] if training else out


def _torch_gradients(x, params, dy, training, data_format, fields, device, dtype):  # type: ignore[no-untyped-def]
    from convbn.backends import torch as tb

    dev = tb.resolve_device(device)
    native = to_backend(params, "torch", dev)
    leaves = {"x": cast("torch", tb.asarray(x, dev).clone(), dtype).requires_grad_(True)}
    for f in fields:
        leaves[f] = getattr(native, f).clone().requires_grad_(True)
    p = with_arrays(native, **{f: leaves[f] for f in fields})
    y = _output(conv_bn(leaves["x"], p, training, data_format=data_format), training)
    (y * tb.asarray(dy, dev).to(y.dtype)).sum().backward()
    return {k: as_numpy("torch", v.grad) for k, v in leaves.items()}


def _tf_gradients(x, params, dy, training, data_format, fields, device, dtype):  # type: ignore[no-untyped-def]
    import tensorflow as tf

    native = to_backend(params, "tensorflow", device)
    leaves = {"x": cast("tensorflow", tf.constant(x), dtype)}
    for f in fields:
        leaves[f] = getattr(native, f)
    with tf.GradientTape() as tape:
        for v in leaves.values():
            tape.watch(v)
        p = with_arrays(native, **{f: leaves[f] for f in fields})
        y = _output(conv_bn(leaves["x"], p, training, data_format=data_format), training)
        loss = tf.reduce_sum(y * tf.cast(tf.constant(dy), y.dtype))
    grads = tape.gradient(loss, leaves)
    return {k: as_numpy("tensorflow", v) for k, v in grads.items()}


def _jax_gradients(x, params, dy, training, data_format, fields, device, dtype):  # type: ignore[no-untyped-def]
    from convbn.backends import jax as jb

    dev = jb.resolve_device(device)
    native = to_backend(params, "jax", dev)
    leaves = {"x": cast("jax", jb.asarray(x, dev), dtype)}
    for f in fields:
        leaves[f] = getattr(native, f)
    grads = _jax_vjp()(leaves, native, jb.asarray(dy, dev), tuple(fields), training, data_format)
    return {k: as_numpy("jax", v) for k, v in grads.items()}


@functools.cache
def _jax_vjp() -> Any:
    """``jax.jit(jax.grad(...))`` of the loss, compiled once per shapes and static config: one XLA
    compile per case instead of dispatching (and compiling) every op of the backward pass."""
    import jax
    import jax.numpy as jnp

    def vjp(leaves: dict[str, Any], native: ConvBNParams, dy: Any, fields: tuple[str, ...],
            training: bool, data_format: str) -> Any:
        def loss(leaves: dict[str, Any]) -> Any:
            p = with_arrays(native, **{f: leaves[f] for f in fields})
            y = _output(conv_bn(leaves["x"], p, training, data_format=data_format), training)
            return jnp.sum(y * dy.astype(y.dtype))

        return jax.grad(loss)(leaves)

    return jax.jit(vjp, static_argnames=("fields", "training", "data_format"))


_GRADIENTS = {"torch": _torch_gradients, "tensorflow": _tf_gradients, "jax": _jax_gradients}
