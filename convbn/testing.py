"""Run `conv_bn` on a named backend from NumPy data, and take gradients with each framework's own
autodiff: the harness the conformance suite and the tests share.

Everything goes in and comes out as NumPy, so results from different backends compare directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convbn import dispatch
from convbn.api import conv_bn, to_backend
from convbn.geometry import plan_for
from convbn.params import ConvBNParams, with_arrays

__all__ = ["gradients", "run", "to_framework"]

GRAD_FIELDS = ("kernel", "bias", "gamma", "beta")


def to_framework(backend: str, a: Any, device: Any = None) -> Any:
    """NumPy ``a`` as ``backend``'s array on ``device`` (None: the framework's default)."""
    module = dispatch.load_backend(dispatch.normalize_name(backend))
    return module.asarray(a, device)


def run(
    backend: str,
    x: np.ndarray,
    params: ConvBNParams,
    training: bool = False,
    data_format: str = "NHWC",
    device: Any = None,
) -> tuple[np.ndarray, ConvBNParams | None]:
    """``conv_bn`` with ``x`` and ``params`` as ``backend``'s own arrays; results as NumPy.

    Returns ``(y, new_params)``; ``new_params`` is None in eval mode.
    """
    name = dispatch.normalize_name(backend)
    module = dispatch.load_backend(name)
    native = to_backend(params, name, device)
    xb = module.asarray(x, None if name == "numpy" else module.resolve_device(device))
    out = conv_bn(xb, native, training, data_format=data_format)
    if not training:
        return module.to_numpy(out), None
    y, new = out
    return module.to_numpy(y), with_arrays(
        params, moving_mean=module.to_numpy(new.moving_mean), moving_var=module.to_numpy(new.moving_var)
    )


def gradients(
    backend: str,
    x: np.ndarray,
    params: ConvBNParams,
    dy: np.ndarray,
    training: bool = False,
    data_format: str = "NHWC",
    device: Any = None,
) -> dict[str, np.ndarray]:
    """Gradients of ``sum(conv_bn(x, params) * dy)`` w.r.t. ``x``, kernel, bias, gamma and beta.

    The numpy backend uses its analytic backward pass; the others their own autodiff (torch
    autograd, ``tf.GradientTape``, ``jax.grad``). Keys: ``"x"`` and each grad field that is set.
    """
    name = dispatch.normalize_name(backend)
    fields = [f for f in GRAD_FIELDS if getattr(params, f) is not None]
    if name == "numpy":
        from convbn.backends import numpy as np_backend

        plan = plan_for(x.shape, params, data_format, training)
        grads = np_backend.conv_bn_vjp(x, params, dy, plan)
        return {k: v for k, v in grads.items() if k == "x" or k in fields}
    return _GRADIENTS[name](x, params, dy, training, data_format, fields, device)


def _output(out: Any, training: bool) -> Any:
    return out[0] if training else out


def _torch_gradients(x, params, dy, training, data_format, fields, device):  # type: ignore[no-untyped-def]

    from convbn.backends import torch as tb

    dev = tb.resolve_device(device)
    native = to_backend(params, "torch", dev)
    leaves = {"x": tb.asarray(x, dev).clone().requires_grad_(True)}
    for f in fields:
        leaves[f] = getattr(native, f).clone().requires_grad_(True)
    p = with_arrays(native, **{f: leaves[f] for f in fields})
    y = _output(conv_bn(leaves["x"], p, training, data_format=data_format), training)
    (y * tb.asarray(dy, dev).to(y.dtype)).sum().backward()
    return {k: tb.to_numpy(v.grad) for k, v in leaves.items()}


def _tf_gradients(x, params, dy, training, data_format, fields, device):  # type: ignore[no-untyped-def]
    import tensorflow as tf

    from convbn.backends import tensorflow as tfb

    dev = tfb.resolve_device(device)
    with tf.device(dev):
        native = to_backend(params, "tensorflow", dev)
        leaves = {"x": tf.constant(x)}
        for f in fields:
            leaves[f] = getattr(native, f)
        with tf.GradientTape() as tape:
            for v in leaves.values():
                tape.watch(v)
            p = with_arrays(native, **{f: leaves[f] for f in fields})
            y = _output(conv_bn(leaves["x"], p, training, data_format=data_format), training)
            loss = tf.reduce_sum(y * tf.cast(tf.constant(dy), y.dtype))
        grads = tape.gradient(loss, leaves)
    return {k: np.asarray(v.numpy()) for k, v in grads.items()}


def _jax_gradients(x, params, dy, training, data_format, fields, device):  # type: ignore[no-untyped-def]
    import jax
    import jax.numpy as jnp

    from convbn.backends import jax as jb

    dev = jb.resolve_device(device)
    native = to_backend(params, "jax", dev)
    leaves = {"x": jb.asarray(x, dev)}
    for f in fields:
        leaves[f] = getattr(native, f)
    dyj = jb.asarray(dy, dev)

    def loss(leaves: dict[str, Any]) -> Any:
        p = with_arrays(native, **{f: leaves[f] for f in fields})
        y = _output(conv_bn(leaves["x"], p, training, data_format=data_format), training)
        return jnp.sum(y * dyj.astype(y.dtype))

    grads = jax.grad(loss)(leaves)
    return {k: np.asarray(v) for k, v in grads.items()}


_GRADIENTS = {"torch": _torch_gradients, "tensorflow": _tf_gradients, "jax": _jax_gradients}
