"""PyTorch backend.

Eval runs one ``F.conv2d`` with BatchNorm folded into the weights; the fold is cached per params
object and device/dtype, and revalidated with torch's in-place version counters so an optimizer
step on the tensors is never served a stale fold. Training runs the conv and torch's own
batch-norm kernel, which also updates (clones of) the moving statistics with momentum
``1 - momentum``: exactly the ``"unbiased"`` update, and one O(channels) step from the
``"biased"`` one. NHWC input is handed to torch as a channels_last view, so no copy is made for
the layout.

``sync`` training (:func:`train_sync`) shares the batch statistics over a ``torch.distributed``
process group, the way ``nn.SyncBatchNorm`` does, but on any device and backend (gloo on CPU too).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from convbn._dtypes import numpy_to_torch, torch_to_numpy
from convbn.backends._common import (
    ONE_VALUE_ACROSS_REPLICAS,
    combine_moments,
    fold_arrays,
    moving_update,
    with_moving_stats,
)
from convbn.caches import Folded, ParamArrays, TorchFold
from convbn.errors import ConvBNError
from convbn.geometry import Plan
from convbn.layouts import HWIO_TO_OIHW, OIHW_TO_HWIO
from convbn.params import ARRAY_FIELDS, ConvBNParams, with_arrays

NAME = "torch"

__all__ = [
    "NAME",
    "asarray",
    "conv_bn",
    "conversion_key",
    "empty_output",
    "fuse",
    "resolve_device",
    "static_shape",
    "sync_group",
    "to_backend",
    "to_numpy",
    "train_in_place",
    "train_sync",
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
    return torch_to_numpy(a.detach().cpu(), f"a torch tensor of shape {list(a.shape)}")


def asarray(a: Any, device: Any = None) -> torch.Tensor:
    """``a`` as a torch tensor on ``device``; NumPy data is shared, not copied."""
    return _tensor(a, device, copy=False)


def _tensor(a: Any, device: Any, copy: bool) -> torch.Tensor:
    """:func:`asarray` with a choice of copying NumPy data, which only :func:`to_backend` needs: the
    protocol's ``asarray`` is the same ``(a, device)`` on every backend."""
    if not isinstance(a, torch.Tensor):
        from convbn.backends.numpy import to_numpy as any_to_numpy

        arr = any_to_numpy(a)
        a = numpy_to_torch(np.ascontiguousarray(np.array(arr, copy=True) if copy else arr))
    if device is not None and a.device != torch.device(device):
        a = a.to(device=device)
    return a


def conversion_key() -> None:
    """Nothing besides the device decides :func:`to_backend`'s result."""
    return None


def to_backend(params: ConvBNParams, device: Any = None) -> ConvBNParams:
    # Copies NumPy data: the tensors may be trained in place, and the caller's arrays must not change.
    dev = resolve_device(device) if device is not None else None
    return with_arrays(params, **{n: _tensor(v, dev, copy=True) for n, v in params.arrays().items()})


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _param_tensors(params: ConvBNParams, device: torch.device) -> ParamArrays:
    """The params as tensors on ``device``, cached per params object and device.

    Foreign arrays are converted once; torch tensors are held as they are (the same objects, so
    in-place updates stay visible and the fold cache below notices them by version counter).
    """
    cache = params.cache
    per_device = cache.torch_tensors
    if per_device is None:
        per_device = cache.torch_tensors = {}
    cached = per_device.get(device)
    if cached is None:
        # Ordinary tensors even when first seen under torch.inference_mode: the cache outlives the
        # mode, and inference tensors can neither be saved for backward nor report versions.
        with torch.inference_mode(False):
            cached = per_device[device] = ParamArrays(
                *(None if (v := getattr(params, n)) is None else asarray(v, device) for n in ARRAY_FIELDS)
            )
    return cached


def _fold(t: ParamArrays, eps: float, dtype: torch.dtype) -> Folded:
    cd = _compute_dtype(dtype)
    w, b = fold_arrays(ParamArrays._make(None if v is None else v.to(cd) for v in t), eps, torch.rsqrt)
    return Folded(w.permute(HWIO_TO_OIHW).to(dtype).contiguous(), b.to(dtype))


class _Unversioned:
    """Stands in for an absent array among a fold's sources: a version counter that never moves,
    and nothing to differentiate."""

    _version = 0
    requires_grad = False


_UNVERSIONED = _Unversioned()


def _folded(params: ConvBNParams, x: torch.Tensor) -> Folded:
    """Folded OIHW weight and bias in ``x``'s dtype, cached per params object, device and dtype.

    The cache entry records the in-place version counters of the source tensors and is rebuilt
    when one moved (an optimizer step on the same tensors). The cached fold is an ordinary tensor
    even when computed under ``torch.inference_mode``, so a later call with autograd can use it.
    When autograd records a graph through the params, the cached fold is handed out through
    :class:`_FoldGrad` (one autograd node with the fold's derivative), so eval gives bit-identical
    numbers with and without gradients and pays no per-call fold. A source that is an inference
    tensor (which has no version counter) is folded per call.
    """
    device, dtype = x.device, x.dtype
    if torch.compiler.is_compiling():
        # Traced into the compiled graph, where the compiler handles (and may hoist) the fold;
        # version counters and inference-tensor checks do not trace.
        return _fold(_param_tensors(params, device), params.eps, dtype)
    # The hot path of every eval call: one dict lookup and six version counters, read unrolled
    # (a loop over them costs as much again as the reads on a small conv).
    folds = params.cache.torch_folds
    entry = None if folds is None else folds.get((device, dtype))
    if entry is None:
        entry = _fold_entry(params, device, dtype)
    if entry.per_call:
        return _fold(_param_tensors(params, device), params.eps, dtype)
    k, b, g, be, m, v = entry.sources
    version = k._version + b._version + g._version + be._version + m._version + v._version
    folded = entry.folded
    if folded is None or entry.version != version:
        with torch.inference_mode(False), torch.no_grad():
            folded = entry.folded = _fold(_param_tensors(params, device), params.eps, dtype)
        entry.version = version
    if torch.is_grad_enabled() and any(t.requires_grad for t in entry.sources):
        return Folded(*_FoldGrad.apply(*folded, *_param_tensors(params, device), params.eps))
    return folded


def _fold_entry(params: ConvBNParams, device: torch.device, dtype: torch.dtype) -> TorchFold:
    """A new, empty fold entry for ``(device, dtype)`` in the params' cache."""
    cache = params.cache
    folds = cache.torch_folds
    if folds is None:
        folds = cache.torch_folds = {}
    tensors = _param_tensors(params, device)
    k, b, g, be, m, v = (_UNVERSIONED if t is None else t for t in tensors)
    present = [t for t in tensors if t is not None]
    entry = folds[(device, dtype)] = TorchFold((k, b, g, be, m, v), any(t.is_inference() for t in present))
    return entry


class _FoldGrad(torch.autograd.Function):
    """The folded ``(weight, bias)`` from :func:`_fold`, given precomputed, with the fold's gradient.

    ``W' = permute(K * s)``, ``b' = beta + (bias - mean) * s`` with ``s = gamma r``,
    ``r = 1 / sqrt(var + eps)``. Backward, with ``gK`` the weight gradient in HWIO:
    ``dK = gK s``, ``ds = sum(gK K) + gb (bias - mean)``, ``dgamma = ds r``,
    ``dvar = -ds gamma r^3 / 2``, ``dbeta = gb``, ``dbias = gb s``, ``dmean = -gb s``,
    computed in float32 (float64 for float64) like the fold itself.
    """

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, b: torch.Tensor, kernel: torch.Tensor, bias: Any,  # type: ignore[override]
                gamma: Any, beta: Any, mean: torch.Tensor, var: torch.Tensor, eps: float) -> Any:
        ctx.save_for_backward(kernel, bias, gamma, mean, var)
        ctx.eps = eps
        ctx.beta_dtype = None if beta is None else beta.dtype
        # New tensor objects sharing the cached storage: autograd attaches its node to these, never
        # to the cache entry.
        return w.detach(), b.detach()

    @staticmethod
    def backward(ctx: Any, gw: torch.Tensor | None, gb: torch.Tensor | None) -> Any:  # type: ignore[override]
        kernel, bias, gamma, mean, var = ctx.saved_tensors
        cd = _compute_dtype(kernel.dtype)
        k, m, v = kernel.to(cd), mean.to(cd), var.to(cd)
        r = torch.rsqrt(v + ctx.eps)
        g = gamma.to(cd) if gamma is not None else None
        s = r if g is None else g * r
        centered = -m if bias is None else bias.to(cd) - m
        gk = torch.zeros_like(k) if gw is None else gw.to(cd).permute(OIHW_TO_HWIO)
        gb_ = torch.zeros_like(m) if gb is None else gb.to(cd)
        ds = (gk * k).sum(dim=(0, 1, 2)) + gb_ * centered
        dkernel = (gk * s).to(kernel.dtype)
        dbias = None if bias is None else (gb_ * s).to(bias.dtype)
        dgamma = None if g is None else (ds * r).to(gamma.dtype)
        dbeta = None if ctx.beta_dtype is None else gb_.to(ctx.beta_dtype)
        dmean = (-gb_ * s).to(mean.dtype)
        dvar = (-0.5 * ds * r**3 * (1.0 if g is None else g)).to(var.dtype)
        return None, None, dkernel, dbias, dgamma, dbeta, dmean, dvar, None


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: Plan) -> torch.Tensor:
    """Conv of NHWC/NCHW ``x`` with an OIHW weight; returns NCHW (channels_last for NHWC input).

    Symmetric padding goes to the conv itself; TF's asymmetric SAME split (odd total) needs one
    explicit pad, whose amounts come from the cached plan.
    """
    xc = x.permute(0, 3, 1, 2) if plan.data_format == "NHWC" else x
    if plan.symmetric:
        return F.conv2d(xc, weight, bias, plan.stride, plan.conv_padding, plan.dilation, plan.groups)
    (top, bottom), (left, right) = plan.pads  # type: ignore[misc]  # torch shapes are static
    xc = F.pad(xc, (left, right, top, bottom))
    return F.conv2d(xc, weight, bias, plan.stride, 0, plan.dilation, plan.groups)


def _layout_out(y: torch.Tensor, plan: Plan) -> torch.Tensor:
    return y.permute(0, 2, 3, 1) if plan.data_format == "NHWC" else y


def conv_bn(x: torch.Tensor, params: ConvBNParams, plan: Plan) -> Any:
    if plan.training:
        return _train(x, params, plan)
    weight, bias = _folded(params, x)
    # _conv and _layout_out written out: on a small conv their two calls are a measurable part
    # of the per-call cost (docs/performance.md).
    if plan.data_format == "NHWC":
        if plan.symmetric:
            return F.conv2d(x.permute(0, 3, 1, 2), weight, bias, plan.stride, plan.conv_padding, plan.dilation,
                            plan.groups).permute(0, 2, 3, 1)
        return _conv(x, weight, bias, plan).permute(0, 2, 3, 1)
    if plan.symmetric:
        return F.conv2d(x, weight, bias, plan.stride, plan.conv_padding, plan.dilation, plan.groups)
    return _conv(x, weight, bias, plan)


def _batch_norm(
    z: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """Training-mode batch norm updating ``mean``/``var`` in place: ``torch.batch_norm`` itself.

    ``F.batch_norm`` only adds Python checks on top: one for a single value per channel (the plan
    already rejected that) and one that refuses ``eps = 0`` in training, which convbn allows.
    """
    return torch.batch_norm(z, gamma, beta, mean, var, True, momentum, eps, torch.backends.cudnn.enabled)


def _train_conv(
    x: torch.Tensor, t: ParamArrays, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.dtype]:
    """The conv of a training step, in ``x``'s dtype, and gamma/beta in the batch-norm dtype.

    Batch-norm parameters and statistics are float32 (float64 for float64 input). Returns
    ``(z, gamma, beta, bn_dtype)``, ``z`` NCHW (channels_last for NHWC input).
    """
    dtype = x.dtype
    kernel = t.kernel
    if kernel.dtype != dtype:
        kernel = kernel.to(dtype)
    conv_bias = t.bias
    if conv_bias is not None and conv_bias.dtype != dtype:
        conv_bias = conv_bias.to(dtype)
    z = _conv(x, kernel.permute(HWIO_TO_OIHW), conv_bias, plan)
    bn_dtype = _compute_dtype(dtype)
    gamma, beta = t.gamma, t.beta
    if gamma is not None and gamma.dtype != bn_dtype:
        gamma = gamma.to(bn_dtype)
    if beta is not None and beta.dtype != bn_dtype:
        beta = beta.to(bn_dtype)
    if dtype == torch.float16 and z.device.type == "cpu":
        # CPU batch_norm has no float16 kernel with float32 params; compute in float32.
        z = z.float()
    return z, gamma, beta, bn_dtype


def _train(x: torch.Tensor, params: ConvBNParams, plan: Plan) -> tuple[torch.Tensor, ConvBNParams]:
    """Conv, then torch's fused batch-norm kernel, which also updates the moving statistics.

    ``torch.batch_norm`` updates its running buffers in place as ``(1 - f) * r + f * batch`` with the
    unbiased batch variance. With ``f = 1 - momentum`` and clones of the old statistics that is
    exactly the ``"unbiased"`` update, done inside the kernel. For ``"biased"`` the variance buffer
    starts at 0, so it receives ``(1 - momentum) * unbiased``, and one O(channels) step turns that
    into ``momentum * old + (1 - momentum) * unbiased * (N - 1) / N``. No second pass over the data.
    """
    t = _param_tensors(params, x.device)
    dtype = x.dtype
    z, gamma, beta, bn_dtype = _train_conv(x, t, plan)
    old_mean, old_var = t.moving_mean, t.moving_var
    count = plan.values_per_channel
    assert count is not None  # torch shapes are static
    m = params.momentum
    if old_mean.dtype == bn_dtype and old_var.dtype == bn_dtype:
        mean = old_mean.clone()
        unbiased = params.var_update == "unbiased"
        var = old_var.clone() if unbiased else torch.zeros_like(old_var)
        y = _batch_norm(z, gamma, beta, mean, var, 1.0 - m, params.eps)
        if not unbiased:
            # Out of place: the kernel's buffer may be held for its backward (torch.compile's
            # AOTAutograd checks its version), and this is O(channels).
            with torch.no_grad():
                var = torch.add(var * ((count - 1) / count), old_var, alpha=m)
    else:
        # Statistics stored in another dtype: let torch write the exact batch mean and unbiased
        # variance into scratch buffers (momentum 1), then update in O(channels).
        batch_mean = torch.zeros(plan.out_channels, dtype=bn_dtype, device=x.device)
        batch_var = torch.zeros(plan.out_channels, dtype=bn_dtype, device=x.device)
        y = _batch_norm(z, gamma, beta, batch_mean, batch_var, 1.0, params.eps)
        with torch.no_grad():
            new_mean, new_var = moving_update(
                params, old_mean.to(bn_dtype), old_var.to(bn_dtype), batch_mean, batch_var, count
            )
            mean, var = new_mean.to(old_mean.dtype), new_var.to(old_var.dtype)
    if y.dtype != dtype:
        y = y.to(dtype)
    new = with_moving_stats(params, mean, var)
    # The next step's params hold the same tensors but for the statistics, already on the device.
    new.cache.torch_tensors = {x.device: t.with_statistics(mean, var)}
    return _layout_out(y, plan), new


def train_in_place(x: torch.Tensor, params: ConvBNParams, plan: Plan) -> torch.Tensor:
    """Training that updates ``params``' own moving-statistics tensors, as ``nn.BatchNorm2d`` does.

    With the ``"unbiased"`` update and statistics in the batch-norm dtype, torch's batch-norm
    kernel updates them itself, with no clone: the kernel and arguments :func:`conv_bn` runs on
    its clones, so the numbers are the same. Otherwise :func:`conv_bn`'s statistics are copied in.
    """
    mean, var = params.moving_mean, params.moving_var
    for name, value in (("moving_mean", mean), ("moving_var", var)):
        if not isinstance(value, torch.Tensor) or value.device != x.device or value.requires_grad:
            kind = (f"a tensor on {value.device} with requires_grad={value.requires_grad}"
                    if isinstance(value, torch.Tensor) else f"of type {type(value).__name__}")
            raise ConvBNError(
                f"training in place writes params.{name} itself, so it must be a torch tensor on x's "
                f"device ({x.device}) that does not require grad. Received: {name} {kind}"
            )
    bn_dtype = _compute_dtype(x.dtype)
    if params.var_update == "unbiased" and mean.dtype == var.dtype == bn_dtype:
        z, gamma, beta, _ = _train_conv(x, _param_tensors(params, x.device), plan)
        y = _batch_norm(z, gamma, beta, mean, var, 1.0 - params.momentum, params.eps)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return _layout_out(y, plan)
    y, new = _train(x, params, plan)
    with torch.no_grad():
        mean.copy_(new.moving_mean)
        var.copy_(new.moving_var)
    return y


def sync_group(sync: Any) -> Any:
    """``True``: the default process group; a ``ProcessGroup``: that group. Either needs
    ``torch.distributed`` initialized in this process (``init_process_group``, or ``torchrun``)."""
    if sync is not True and not isinstance(sync, dist.ProcessGroup):
        raise ConvBNError(
            "sync must be True (the default torch.distributed process group) or a "
            "torch.distributed.ProcessGroup that this rank belongs to (from dist.new_group). "
            f"Received: sync={sync!r} of type {type(sync).__name__}"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise ConvBNError(
            "sync needs torch.distributed initialized in this process: call "
            "torch.distributed.init_process_group(...) on every rank first (torchrun sets up the "
            f"environment for it). Received: sync={sync!r} with no process group"
        )
    return dist.group.WORLD if sync is True else sync


def _psum(group: Any) -> Any:
    """``combine_moments``'s psum over ``group``: the tuple concatenated, so one all-reduce."""

    def psum(parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        flat = torch.cat([p.reshape(-1) for p in parts])
        dist.all_reduce(flat, group=group)
        return tuple(v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in parts]), parts, strict=True))

    return psum


def train_sync(x: torch.Tensor, params: ConvBNParams, plan: Plan, group: Any) -> tuple[torch.Tensor, ConvBNParams]:
    """Training with the batch statistics of every rank of ``group``, as ``nn.SyncBatchNorm``.

    Forward: each rank's per-channel count, mean and M2 (two passes over a shifted copy), combined
    in float64 by :func:`combine_moments` with two all-reduces of ``C + 1`` and ``C`` numbers; the
    output is torch's inference batch-norm kernel on the global statistics. Backward
    (:class:`_SyncNorm`): one all-reduce of the per-channel ``sum(dy)`` and ``sum(dy * xhat)``,
    which makes every rank's input gradient that of the loss summed over ranks. An empty local
    batch still joins all three collectives; ranks whose shapes differ are fine, since the
    collectives are per channel. Every rank must run the forward, and the backward, together.

    Raises:
        ConvBNError: when the ranks together hold one value per channel (no variance to compute).
    """
    t = _param_tensors(params, x.device)
    z, gamma, beta, bn_dtype = _train_conv(x, t, plan)
    count = plan.values_per_channel
    assert count is not None  # torch shapes are static
    c = plan.out_channels
    # Local moments by the corrected two-pass algorithm on data shifted by a rough mean:
    # ``d = z - rough`` is near 0, so ``mean = rough + sum(d) / n`` and ``M2 = sum(d^2) - sum(d)^2 / n``
    # lose nothing to |mean| >> std (torch's channels_last statistics kernel does: 7e-3 relative
    # variance error at std / |mean| = 1e-5). The moments are combined in float64 (float32 where
    # the device has none: MPS), because a float32 local mean is off by half an ulp of |mean| and
    # the parallel formula's n_i (mean_i - mean)^2 turns that into a variance error of
    # ~1e-7 |mean| / (std sqrt(n_i)): 1.6e-6 at |mean| = 1e3, std = 1 on 256 values.
    wide = torch.float32 if z.device.type == "mps" else torch.float64
    with torch.no_grad():
        if count:
            dims = (0, 2, 3)
            rough = z.sum(dims, dtype=bn_dtype) / count
            d = z - rough.view(1, -1, 1, 1)
            residual = d.sum(dims).to(wide)
            squares = d.mul_(d).sum(dims).to(wide)
            local_mean = rough.to(wide) + residual / count
            # Rounding can leave a constant channel's M2 a hair below zero; with eps = 0 that is a NaN.
            m2 = (squares - residual * residual / count).clamp_(min=0)
        else:
            local_mean = m2 = torch.zeros(c, dtype=wide, device=z.device)
        n = torch.full((1,), float(count), dtype=wide, device=z.device)
        total_t, mean, m2 = combine_moments(n, local_mean, m2, _psum(group))
    # Identical on every rank (all-reduce results are), so every rank takes the same branch.
    total = round(float(total_t))
    if total == 0:  # every rank's batch is empty: as one process with an empty batch
        return empty_output(x, plan.out_shape), params  # type: ignore[arg-type]
    if total == 1:
        raise ConvBNError(ONE_VALUE_ACROSS_REPLICAS + f" Received: x.shape={tuple(x.shape)}")
    y = _SyncNorm.apply(z, gamma, beta, mean.to(bn_dtype), (m2 / total).to(bn_dtype), params.eps, total, group)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    old_mean, old_var = t.moving_mean, t.moving_var
    with torch.no_grad():
        new_mean, new_var = moving_update(
            params, old_mean.to(wide), old_var.to(wide), mean, m2 / (total - 1), total
        )
        new_mean, new_var = new_mean.to(old_mean.dtype), new_var.to(old_var.dtype)
    new = with_moving_stats(params, new_mean, new_var)
    new.cache.torch_tensors = {x.device: t.with_statistics(new_mean, new_var)}
    return _layout_out(y, plan), new


class _SyncNorm(torch.autograd.Function):
    """``y = (z - mean) / sqrt(var + eps) * gamma + beta`` with ``mean``/``var`` the statistics of
    all ranks' ``z``, and the exact gradient through them.

    With ``xhat = (z - mean) r``, ``k = gamma r`` and sums over every rank's values,
    ``dz = k (dy - sum(dy) / N - xhat sum(dy xhat) / N)``: each rank reduces its own two sums
    (torch's inference batch-norm backward kernel, which centres on ``mean`` before multiplying,
    so a large mean does not cancel), all-reduces them once, and applies the per-channel affine
    ``xhat (-k sum(dy xhat) / N) - k sum(dy) / N`` with the inference kernel again, plus ``k dy``.
    ``dgamma``/``dbeta`` are this rank's own sums: summed over ranks they are the total's.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,  # type: ignore[override]
                mean: torch.Tensor, var: torch.Tensor, eps: float, total: int, group: Any) -> torch.Tensor:
        ctx.save_for_backward(z, gamma, mean, var)
        ctx.eps, ctx.total, ctx.group, ctx.has_beta = eps, total, group, beta is not None
        return torch.batch_norm(z, gamma, beta, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> Any:  # type: ignore[override]
        z, gamma, mean, var = ctx.saved_tensors
        weight = torch.ones_like(mean) if gamma is None else gamma
        if z.numel():
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                dy, z, weight, mean, var, None, None, False, ctx.eps, [False, True, True]
            )
        else:  # torch's kernel dies of SIGFPE on an empty input; an empty rank adds nothing
            sum_dy_xhat = sum_dy = torch.zeros_like(mean)
        both = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(both, group=ctx.group)
        total_dy, total_dy_xhat = both.split(mean.numel())
        k = weight * torch.rsqrt(var + ctx.eps)
        dz = None
        if ctx.needs_input_grad[0]:
            dz = torch.batch_norm(z, -k * total_dy_xhat / ctx.total, -k * total_dy / ctx.total, mean, var,
                                  False, 0.0, ctx.eps, torch.backends.cudnn.enabled)
            dz = dz.addcmul_(dy, k.view(1, -1, 1, 1))
        dgamma = sum_dy_xhat if gamma is not None and ctx.needs_input_grad[1] else None
        dbeta = sum_dy if ctx.has_beta and ctx.needs_input_grad[2] else None
        return dz, dgamma, dbeta, None, None, None, None, None


def empty_output(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zeros of ``shape`` like ``x``: the output of a zero-size batch. Adding ``x.sum()`` (an exact
    0 over no elements) keeps the result in ``x``'s autograd graph, so ``backward`` still works."""
    return x.new_zeros(shape) + x.sum()


def fuse(params: ConvBNParams) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = params.kernel
    t = _param_tensors(params, kernel.device if isinstance(kernel, torch.Tensor) else torch.device("cpu"))
    dtype = t.kernel.dtype
    cd = _compute_dtype(dtype)
    w, b = fold_arrays(ParamArrays._make(None if v is None else v.to(cd) for v in t), params.eps, torch.rsqrt)
    return w.to(dtype), b.to(dtype)
