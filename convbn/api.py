"""The public functional API: `conv_bn`, `fuse`, `to_backend`, `to_numpy`."""

from __future__ import annotations

import warnings
from typing import Any, cast

import numpy as np

from convbn import dispatch
from convbn.backends import BackendModule
from convbn.caches import NativeKey
from convbn.errors import ConvBNError
from convbn.geometry import Plan, plan_for
from convbn.params import ConvBNParams, with_arrays

__all__ = ["conv_bn", "fuse", "to_backend", "to_numpy"]


def conv_bn(
    x: Any,
    params: ConvBNParams,
    training: bool = False,
    *,
    data_format: str = "NHWC",
    backend: str | None = None,
    device: Any = None,
    sync: Any = None,
) -> Any:
    """Conv2D followed by BatchNorm, with one meaning on every backend.

    ``y = (conv(x, kernel) + bias - mean) / sqrt(var + eps) * gamma + beta``, where in eval mode
    ``mean``/``var`` are the moving statistics and in training mode the batch statistics (biased
    variance). Padding ``"SAME"`` is TensorFlow's, including the asymmetric split.

    Args:
        x: input, ``(N, H, W, C)`` or ``(N, C, H, W)`` per ``data_format``. A torch tensor runs on
            the torch backend, a ``tf.Tensor``/``tf.Variable`` on TensorFlow, a ``jax.Array`` or
            tracer on JAX, each on the device where ``x`` lives. A NumPy array runs on
            ``backend`` (else ``$CONVBN_BACKEND``, else the first installed of torch, jax,
            tensorflow, numpy) on ``device`` (else the best available) and comes back as NumPy.
        params: a :class:`ConvBNParams`; its arrays may be of any framework.
        training: normalize with batch statistics and return updated moving statistics.
        data_format: ``"NHWC"`` or ``"NCHW"``, for both ``x`` and ``y``.
        backend: for NumPy input, ``"numpy"``, ``"torch"``, ``"tensorflow"`` or ``"jax"``.
        device: for NumPy input, ``"cpu"``, ``"cuda"``/``"gpu"`` (``":N"`` suffix allowed),
            ``"tpu"``, ``"mps"`` or a framework device object.
        sync: in training, share the batch statistics across replicas, on the framework's own
            distributed engine: the statistics are those of every replica's batch together
            (weighted by each replica's number of values, so uneven shards are right), the
            moving-variance update uses the global count, every replica returns the same new
            moving statistics, and gradients flow across replicas as in torch's SyncBatchNorm.
            torch: a ``torch.distributed`` process group, or ``True`` for the default group;
            JAX: the axis name (or a tuple of names) of the enclosing ``shard_map``/``pmap``;
            TensorFlow: ``True``, the current ``tf.distribute`` replica context. Every replica
            must call with the same ``sync``, even one holding an empty batch. Ignored in eval.
            None or False: this call's batch only.

    Returns:
        eval: ``y``. training: ``(y, new_params)``, ``new_params`` being ``params`` with the
        moving statistics updated as ``momentum * old + (1 - momentum) * batch``. Nothing is
        modified in place. ``y`` has ``x``'s dtype; statistics are computed in float32 or wider.

    Raises:
        ConvBNError: for a bad data_format, rank, channel count, padding, a training batch with
            one value per channel (without ``sync``), or a ``sync`` the backend cannot honour
            (NumPy input, torch.distributed not initialized, no replica context, an unknown axis).
        TypeError: when ``x`` is not an array of a supported framework, or ``params`` is not a
            ``ConvBNParams``.
        ImportError: when the requested backend's framework is not installed (names the extra).

    Example:
        >>> import numpy as np, convbn
        >>> params = convbn.ConvBNParams(kernel=np.ones((3, 3, 2, 4), np.float32),
        ...                              moving_mean=np.zeros(4, np.float32),
        ...                              moving_var=np.ones(4, np.float32), eps=0.0)
        >>> y = convbn.conv_bn(np.ones((1, 4, 4, 2), np.float32), params, backend="numpy")
        >>> float(y[0, 1, 1, 0]), float(y[0, 0, 0, 0])
        (18.0, 8.0)
    """
    if not isinstance(params, ConvBNParams):
        raise TypeError(
            f"params must be a convbn.ConvBNParams. Received: params of type {type(params).__name__}"
        )
    name = dispatch.backend_name_of(x)
    synced = bool(training) and sync is not None and sync is not False
    if name == "numpy":
        if synced:
            raise ConvBNError(
                "sync needs x as a torch, TensorFlow or JAX array on one of the replicas that share "
                f"statistics; NumPy input has no replicas. Received: sync={sync!r} with a NumPy x"
            )
        return _conv_bn_numpy(x, params, training, data_format, backend, device)
    if backend is not None and dispatch.normalize_name(backend) != name:
        raise ConvBNError(
            f"backend must match x's framework or be None (x is a {name} array); convert x first. "
            f"Received: backend={backend!r}"
        )
    if device is not None:
        raise ConvBNError(
            f"device applies to NumPy input only: a {name} x runs where it lives; move it with "
            f"{name} first. Received: device={device!r}"
        )
    module = dispatch.load_backend(name)
    if synced:
        # An empty replica still takes part in the collectives, so the backend sees it too.
        group = module.sync_group(sync)
        plan = plan_for(module.static_shape(x), params, data_format, True, synced=True)
        return module.train_sync(x, params, plan, group)
    plan = plan_for(module.static_shape(x), params, data_format, training)
    if plan.empty:
        return empty_batch(module, x, params, plan)
    return module.conv_bn(x, params, plan)


def empty_batch(module: BackendModule, x: Any, params: ConvBNParams, plan: Plan) -> Any:
    """A zero-size batch, the same on every backend: ``y`` is empty with the shape the geometry
    gives (no framework kernel sees it), and training keeps the moving statistics, since there are
    no batch statistics to learn from."""
    y = module.empty_output(x, plan.out_shape)
    return (y, params) if plan.training else y


def _conv_bn_numpy(
    x: np.ndarray,
    params: ConvBNParams,
    training: bool,
    data_format: str,
    backend: str | None,
    device: Any,
) -> Any:
    name = dispatch.auto_backend(backend)
    module = dispatch.load_backend(name)
    plan = plan_for(x.shape, params, data_format, training)
    if plan.empty:  # nothing to compute or convert: the shape comes from the geometry
        y = np.zeros(cast("tuple[int, ...]", plan.out_shape), x.dtype)  # NumPy shapes are concrete
        return (y, params) if plan.training else y
    resolved = module.resolve_device(device)
    cache = params.cache
    converted = cache.native
    if converted is None:
        converted = cache.native = {}
    key = NativeKey(name, str(resolved), module.conversion_key())
    native = converted.get(key)
    if native is None:
        native = converted[key] = module.to_backend(params, resolved)
    xb = module.asarray(x, resolved)
    out = module.conv_bn(xb, native, plan)
    if not plan.training:
        return _as_input_dtype(module.to_numpy(out), x.dtype, name)
    y, new = out
    return _as_input_dtype(module.to_numpy(y), x.dtype, name), with_arrays(
        params,
        moving_mean=_as_input_dtype(module.to_numpy(new.moving_mean), _dtype_of(params.moving_mean), name),
        moving_var=_as_input_dtype(module.to_numpy(new.moving_var), _dtype_of(params.moving_var), name),
    )


def _dtype_of(a: Any) -> np.dtype:
    from convbn.backends.numpy import to_numpy

    return to_numpy(a).dtype  # O(channels): the moving statistics


def _as_input_dtype(a: np.ndarray, dtype: np.dtype, backend: str) -> np.ndarray:
    """NumPy results in the dtype the caller gave; a backend that computed in less precision (JAX
    without ``jax_enable_x64`` turns float64 into float32) is named in a warning, not hidden."""
    if a.dtype == dtype:
        return a
    if np.dtype(dtype).itemsize > a.dtype.itemsize:
        hint = (
            " JAX computes in float32 unless jax_enable_x64 is set (convbn never changes that global "
            "setting): jax.config.update('jax_enable_x64', True), or pass backend='numpy' or 'torch'."
            if backend == "jax" else ""
        )
        warnings.warn(
            f"the {backend} backend computed {dtype} input in {a.dtype}; the result is returned as "
            f"{dtype} but has {a.dtype} precision.{hint}",
            RuntimeWarning,
            stacklevel=4,
        )
    return a.astype(dtype)


def fuse(params: ConvBNParams) -> tuple[Any, Any]:
    """Fold BatchNorm into the conv for inference: ``(kernel, bias)``, kernel HWIO.

    ``W' = W * gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``,
    with absent gamma/beta/bias taken as 1/0/0. Computed in float32 or wider, returned in the
    kernel's dtype and framework (the backend of ``params.kernel``).

    Then ``conv(x, W') + b'`` equals ``conv_bn(x, params)`` in eval mode.

    Example:
        >>> import numpy as np, convbn
        >>> p = convbn.ConvBNParams(kernel=np.ones((1, 1, 1, 1)), moving_mean=np.array([1.0]),
        ...                         moving_var=np.array([4.0]), gamma=np.array([2.0]), eps=0.0)
        >>> w, b = convbn.fuse(p)
        >>> float(w[0, 0, 0, 0]), float(b[0])
        (1.0, -1.0)
    """
    if not isinstance(params, ConvBNParams):
        raise TypeError(
            f"params must be a convbn.ConvBNParams. Received: params of type {type(params).__name__}"
        )
    return dispatch.load_backend(dispatch.backend_name_of(params.kernel)).fuse(params)


def to_backend(params: ConvBNParams, backend: str, device: Any = None) -> ConvBNParams:
    """``params`` with every array converted to ``backend``'s type, on ``device``.

    Convert once before a loop so calls don't pay a conversion each time.

    Args:
        params: the params to convert (not modified).
        backend: ``"numpy"``, ``"torch"``, ``"tensorflow"`` or ``"jax"``.
        device: as in :func:`conv_bn`; None keeps tensors where they are and puts converted
            NumPy data on the framework's default device.

    Example:
        >>> import numpy as np, convbn
        >>> p = convbn.ConvBNParams(kernel=np.ones((1, 1, 1, 1)), moving_mean=np.zeros(1),
        ...                         moving_var=np.ones(1))
        >>> type(convbn.to_backend(p, "numpy").kernel).__name__
        'ndarray'
    """
    name = dispatch.normalize_name(backend)
    return dispatch.load_backend(name).to_backend(params, device)


def to_numpy(params: ConvBNParams) -> ConvBNParams:
    """``params`` with every array as a NumPy array."""
    return to_backend(params, "numpy")
