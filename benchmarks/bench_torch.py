"""torch: ``conv_bn`` against ``nn.Conv2d`` + ``nn.BatchNorm2d``.

Native NCHW is the module stack on an NCHW tensor; native NHWC is what a torch user writes for
NHWC data: the same modules on ``x.permute(0, 3, 1, 2)`` (a channels_last view, no copy), permuted
back. convbn gets the same weights as OIHW tensors viewed as HWIO (``weight.permute(2, 3, 1, 0)``),
as a torch codebase holds them (and as ``convbn.torch``'s module does); the backend's permute back
is then the contiguous OIHW tensor itself, so no weight transpose runs per step. TF-style SAME padding at stride 2 on an even input pads one row/column at the bottom/right,
so the native stack starts with ``nn.ZeroPad2d`` there (what torch ports of TF models do).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import convbn
from benchmarks.common import Contest, Shape
from convbn.geometry import same_pads

NAME = "torch"
DATA_FORMATS = ("NCHW", "NHWC")


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def _modules(shape: Shape, a: dict[str, np.ndarray]) -> nn.Sequential:
    (pt, pb), (pl, pr) = (same_pads(shape.h, shape.k, shape.stride, 1), same_pads(shape.w, shape.k, shape.stride, 1))
    layers: list[nn.Module] = []
    if pt == pb and pl == pr:
        conv = nn.Conv2d(shape.c, shape.out, shape.k, shape.stride, (pt, pl), groups=shape.groups, bias=False)
    else:
        layers.append(nn.ZeroPad2d((pl, pr, pt, pb)))
        conv = nn.Conv2d(shape.c, shape.out, shape.k, shape.stride, 0, groups=shape.groups, bias=False)
    bn = nn.BatchNorm2d(shape.out, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(a["kernel"]).permute(3, 2, 0, 1))
        bn.weight.copy_(torch.from_numpy(a["gamma"]))
        bn.bias.copy_(torch.from_numpy(a["beta"]))
        bn.running_mean.copy_(torch.from_numpy(a["moving_mean"]))
        bn.running_var.copy_(torch.from_numpy(a["moving_var"]))
    return nn.Sequential(*layers, conv, bn)


def _params(shape: Shape, a: dict[str, np.ndarray], trainable: bool) -> convbn.ConvBNParams:
    """The same weights as :func:`_modules`, held as a torch user holds them: an OIHW weight
    tensor, handed to convbn as its HWIO view ``weight.permute(2, 3, 1, 0)`` (no copy)."""
    def t(name: str, grad: bool = False) -> torch.Tensor:
        return torch.from_numpy(a[name].copy()).requires_grad_(grad)

    weight = torch.from_numpy(a["kernel"]).permute(3, 2, 0, 1).contiguous().requires_grad_(trainable)
    return convbn.ConvBNParams(
        kernel=weight.permute(2, 3, 1, 0), gamma=t("gamma", trainable), beta=t("beta", trainable),
        moving_mean=t("moving_mean"), moving_var=t("moving_var"),
        stride=shape.stride, padding="SAME", groups=shape.groups,
        eps=1e-5, momentum=0.9, var_update="unbiased",
    )


def _limit(shape: Shape, a: dict[str, np.ndarray], nhwc: bool) -> Any:
    """The physical limit of eval: one ``F.conv2d`` with BatchNorm folded into the OIHW weight and
    the bias beforehand (float64, then float32) and TF's SAME split resolved to torch padding (one
    ``F.pad`` first where it is asymmetric, as any torch code needs), plus the two permute views
    an NHWC tensor needs to reach ``F.conv2d``. No checks, no caches: what no wrapper can beat."""
    scale = a["gamma"].astype(np.float64) / np.sqrt(a["moving_var"].astype(np.float64) + 1e-5)
    w = torch.from_numpy((a["kernel"] * scale).astype(np.float32)).permute(3, 2, 0, 1).contiguous()
    b = torch.from_numpy((a["beta"] - a["moving_mean"] * scale).astype(np.float32))
    (pt, pb), (pl, pr) = same_pads(shape.h, shape.k, shape.stride, 1), same_pads(shape.w, shape.k, shape.stride, 1)
    stride, groups = shape.stride, shape.groups
    conv2d = F.conv2d
    if nhwc:
        if (pt, pl) == (pb, pr):
            def limit(x: torch.Tensor) -> torch.Tensor:
                return conv2d(x.permute(0, 3, 1, 2), w, b, stride, (pt, pl), 1, groups).permute(0, 2, 3, 1)
        else:
            def limit(x: torch.Tensor) -> torch.Tensor:
                xp = F.pad(x.permute(0, 3, 1, 2), (pl, pr, pt, pb))
                return conv2d(xp, w, b, stride, 0, 1, groups).permute(0, 2, 3, 1)
    elif (pt, pl) == (pb, pr):
        def limit(x: torch.Tensor) -> torch.Tensor:
            return conv2d(x, w, b, stride, (pt, pl), 1, groups)
    else:
        def limit(x: torch.Tensor) -> torch.Tensor:
            return conv2d(F.pad(x, (pl, pr, pt, pb)), w, b, stride, 0, 1, groups)
    return limit


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().copy()


def contests(shape: Shape, data_formats: tuple[str, ...] = DATA_FORMATS) -> Iterator[Contest]:
    a = shape.arrays()
    x_nhwc = torch.from_numpy(a["x"])
    dy_nhwc = torch.from_numpy(a["dy"])
    for fmt in data_formats:
        nhwc = fmt == "NHWC"
        x = x_nhwc.contiguous() if nhwc else x_nhwc.permute(0, 3, 1, 2).contiguous()
        dy = dy_nhwc.contiguous() if nhwc else dy_nhwc.permute(0, 3, 1, 2).contiguous()

        def to_native(t: torch.Tensor, nhwc: bool = nhwc) -> torch.Tensor:
            return t.permute(0, 3, 1, 2) if nhwc else t

        def from_native(t: torch.Tensor, nhwc: bool = nhwc) -> torch.Tensor:
            return t.permute(0, 2, 3, 1) if nhwc else t

        def to_nhwc(t: torch.Tensor, nhwc: bool = nhwc) -> np.ndarray:
            return _np(t if nhwc else t.permute(0, 2, 3, 1))

        # -- eval under no_grad ------------------------------------------------------------------
        model = _modules(shape, a).eval()
        params = _params(shape, a, trainable=False)

        def eval_convbn(x: torch.Tensor = x, params: convbn.ConvBNParams = params, fmt: str = fmt) -> Any:
            with torch.no_grad():
                return convbn.conv_bn(x, params, data_format=fmt)

        def eval_native(x: torch.Tensor = x, model: nn.Module = model, to_native: Any = to_native,
                        from_native: Any = from_native) -> Any:
            with torch.no_grad():
                return from_native(model(to_native(x)))

        folded = _limit(shape, a, nhwc)

        def eval_limit(x: torch.Tensor = x, folded: Any = folded) -> Any:
            with torch.no_grad():
                return folded(x)

        def eval_outputs(ec: Any = eval_convbn, en: Any = eval_native, to_nhwc: Any = to_nhwc) -> Any:
            return {"y": to_nhwc(ec())}, {"y": to_nhwc(en())}

        yield Contest(NAME, shape, "eval", fmt, eval_convbn, eval_native, eval_outputs,
                      "nn.Conv2d+nn.BatchNorm2d, eval, no_grad", limit=eval_limit,
                      limit_outputs=lambda el=eval_limit, to_nhwc=to_nhwc: {"y": to_nhwc(el())})

        # -- training: forward + backward ----------------------------------------------------------
        tmodel = _modules(shape, a).train()
        xg = x.clone().requires_grad_(True)
        xn = x.clone().requires_grad_(True)
        state = {"params": _params(shape, a, trainable=True)}

        def train_convbn(xg: torch.Tensor = xg, dy: torch.Tensor = dy, state: dict[str, Any] = state,
                         fmt: str = fmt) -> Any:
            y, state["params"] = convbn.conv_bn(xg, state["params"], True, data_format=fmt)
            y.backward(dy)
            return y

        def train_native(xn: torch.Tensor = xn, dy: torch.Tensor = dy, model: nn.Module = tmodel,
                         to_native: Any = to_native, from_native: Any = from_native) -> Any:
            y = from_native(model(to_native(xn)))
            y.backward(dy)
            return y

        def train_outputs(fmt: str = fmt, xg: torch.Tensor = xg, xn: torch.Tensor = xn,
                          dy: torch.Tensor = dy, to_nhwc: Any = to_nhwc, to_native: Any = to_native,
                          from_native: Any = from_native) -> Any:
            p = _params(shape, a, trainable=True)
            m = _modules(shape, a).train()
            xg.grad = None
            xn.grad = None
            y, new = convbn.conv_bn(xg, p, True, data_format=fmt)
            y.backward(dy)
            yn = from_native(m(to_native(xn)))
            yn.backward(dy)
            conv, bn = m[-2], m[-1]
            weight = p.kernel._base  # the OIHW leaf behind the HWIO view
            ours = {"y": to_nhwc(y), "dx": to_nhwc(xg.grad), "dkernel": _np(weight.grad.permute(2, 3, 1, 0)),
                    "dgamma": _np(p.gamma.grad), "moving_mean": _np(new.moving_mean),
                    "moving_var": _np(new.moving_var)}
            theirs = {"y": to_nhwc(yn), "dx": to_nhwc(xn.grad), "dkernel": _np(conv.weight.grad.permute(2, 3, 1, 0)),
                      "dgamma": _np(bn.weight.grad), "moving_mean": _np(bn.running_mean),
                      "moving_var": _np(bn.running_var)}
            return ours, theirs

        yield Contest(NAME, shape, "train", fmt, train_convbn, train_native, train_outputs,
                      "nn.Conv2d+nn.BatchNorm2d, train, forward+backward")
