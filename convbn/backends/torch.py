"""PyTorch backend.

Eval runs one ``F.conv2d`` with BatchNorm folded into the weights; the fold is cached per params
object and device/dtype, and revalidated with torch's in-place version counters so an optimizer
step on the tensors is never served a stale fold. Training runs the conv and torch's own
``F.batch_norm`` kernel with momentum 1, which leaves the exact batch mean and unbiased variance
in scratch buffers; the moving update for either ``var_update`` is then O(channels).
NHWC input is handed to torch as a channels_last view, so no copy is made for the layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from convbn.backends._common import fold, moving_update
from convbn.errors import ConvBNError
from convbn.geometry import Plan
from convbn.params import ARRAY_FIELDS, ConvBNParams, with_arrays

NAME = "torch"

__all__ = [
    "NAME",
    "asarray",
    "conv_bn",
    "fuse",
    "resolve_device",
    "static_shape",
    "to_backend",
    "to_numpy",
]


def static_shape(x: torch.Tensor) -> tuple[int, ...]:
    return x.shape


def resolve_device(spec: Any = None) -> torch.device:
    """``None``: CUDA if available, else Apple MPS, else CPU. ``"gpu"`` means CUDA."""
    if isinstance(spec, torch.device):
        return spec
    if spec is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    text = str(spec).lower()
    if text.startswith("gpu"):
        text = "cuda" + text[3:]
    if text.startswith("tpu"):
        raise ConvBNError(f"the torch backend has no TPU support. Received: device={spec!r}")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConvBNError(
            f"device must be 'cpu', 'cuda', 'cuda:N', 'gpu' or 'mps'. Received: device={spec!r}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConvBNError(f"device {spec!r} was requested but torch sees no CUDA GPU")
    return device


def to_numpy(a: torch.Tensor) -> np.ndarray:
    t = a.detach()
    if t.dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:
            return t.float().cpu().numpy()
        return t.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.cpu().numpy()


def asarray(
    a: Any, device: Any = None, dtype: torch.dtype | None = None, copy: bool = False
) -> torch.Tensor:
    """``a`` as a torch tensor on ``device``; NumPy data is shared unless ``copy``."""
    if not isinstance(a, torch.Tensor):
        from convbn.backends.numpy import to_numpy as any_to_numpy

        arr = np.array(any_to_numpy(a), copy=True) if copy else np.asarray(any_to_numpy(a))
        if arr.dtype.name == "bfloat16":
            a = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
        else:
            a = torch.from_numpy(np.ascontiguousarray(arr))
    if (device is not None and a.device != torch.device(device)) or (
        dtype is not None and a.dtype != dtype
    ):
        a = a.to(device=device, dtype=dtype)
    return a


def to_backend(params: ConvBNParams, device: Any = None) -> ConvBNParams:
    # Copies NumPy data: the tensors may be trained in place, and the caller's arrays must not change.
    dev = resolve_device(device) if device is not None else None
    return with_arrays(params, **{n: asarray(v, dev, copy=True) for n, v in params.arrays().items()})


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _param_tensors(params: ConvBNParams, device: torch.device) -> dict[str, Any]:
    """The params as tensors on ``device``; foreign arrays are converted once and cached."""
    key = ("torch-tensors", device)
    cached = params._cache.get(key)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    out = {n: (None if (v := getattr(params, n)) is None else asarray(v, device)) for n in ARRAY_FIELDS}
    if not all(isinstance(getattr(params, n), torch.Tensor) for n in params.arrays()):
        params._cache[key] = out
    return out


def _needs_grad(tensors: dict[str, Any]) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors.values()
    )


def _folded(params: ConvBNParams, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded OIHW weight and bias in ``x``'s dtype; cached unless autograd needs the graph."""
    t = _param_tensors(params, x.device)
    if _needs_grad(t):
        return _fold(t, params.eps, x.dtype)
    key = ("torch-fold", x.device, x.dtype)
    versions = tuple(v._version for v in t.values() if v is not None)
    cached = params._cache.get(key)
    if cached is not None and cached[0] == versions:
        return cached[1]  # type: ignore[no-any-return]
    with torch.no_grad():
        result = _fold(t, params.eps, x.dtype)
    params._cache[key] = (versions, result)
    return result


def _fold(t: dict[str, Any], eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    cd = _compute_dtype(dtype)
    c = {n: (None if v is None else v.to(cd)) for n, v in t.items()}
    w, b = fold(c["kernel"], c["bias"], c["gamma"], c["beta"], c["moving_mean"], c["moving_var"],
                eps, torch.rsqrt)
    return w.permute(3, 2, 0, 1).to(dtype).contiguous(), b.to(dtype)


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: Plan) -> torch.Tensor:
    """Conv of NHWC/NCHW ``x`` with an OIHW weight; returns NCHW (channels_last for NHWC input)."""
    xc = x.permute(0, 3, 1, 2) if plan.data_format == "NHWC" else x
    pads = plan.pads
    assert pads is not None
    if plan.symmetric:
        padding: Any = (pads[0][0], pads[1][0])
    else:
        xc = F.pad(xc, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
        padding = 0
    return F.conv2d(xc, weight, bias, plan.stride, padding, plan.dilation, plan.groups)


def _layout_out(y: torch.Tensor, plan: Plan) -> torch.Tensor:
    return y.permute(0, 2, 3, 1) if plan.data_format == "NHWC" else y


def conv_bn(x: torch.Tensor, params: ConvBNParams, plan: Plan) -> Any:
    if not plan.training:
        weight, bias = _folded(params, x)
        return _layout_out(_conv(x, weight, bias, plan), plan)
    t = _param_tensors(params, x.device)
    dtype = x.dtype
    cd = _compute_dtype(dtype)
    weight = t["kernel"].permute(3, 2, 0, 1).to(dtype)
    conv_bias = None if t["bias"] is None else t["bias"].to(dtype)
    z = _conv(x, weight, conv_bias, plan)
    # Scratch buffers: with momentum=1 torch writes the exact batch mean and unbiased variance.
    mean = torch.zeros(plan.out_channels, dtype=cd, device=x.device)
    var = torch.zeros(plan.out_channels, dtype=cd, device=x.device)
    bn_dtype = cd if dtype == torch.float64 else torch.float32
    gamma = None if t["gamma"] is None else t["gamma"].to(bn_dtype)
    beta = None if t["beta"] is None else t["beta"].to(bn_dtype)
    if dtype == torch.float16 and z.device.type == "cpu":
        # CPU batch_norm has no float16 kernel with float32 params; compute in float32.
        y = F.batch_norm(z.float(), mean, var, gamma, beta, True, 1.0, params.eps).to(dtype)
    else:
        y = F.batch_norm(z, mean, var, gamma, beta, True, 1.0, params.eps)
    with torch.no_grad():
        old_mean, old_var = t["moving_mean"], t["moving_var"]
        new_mean, new_var = moving_update(
            params, old_mean.to(cd), old_var.to(cd), mean, var, plan.values_per_channel
        )
        new = with_arrays(
            params,
            moving_mean=new_mean.to(old_mean.dtype),
            moving_var=new_var.to(old_var.dtype),
        )
    return _layout_out(y, plan), new


def fuse(params: ConvBNParams) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = params.kernel
    t = _param_tensors(params, kernel.device if isinstance(kernel, torch.Tensor) else torch.device("cpu"))
    dtype = t["kernel"].dtype
    cd = _compute_dtype(dtype)
    c = {n: (None if v is None else v.to(cd)) for n, v in t.items()}
    w, b = fold(c["kernel"], c["bias"], c["gamma"], c["beta"], c["moving_mean"], c["moving_var"],
                params.eps, torch.rsqrt)
    return w.to(dtype), b.to(dtype)
