""":func:`convbn.load_into` for ``torch.nn.Module``: pairs from ``torch.fx``, else module order.

Loaded only once the model is known to be a torch module, so importing torch here is free.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from torch import nn

from convbn.adapters import _check_torch_pair, _torch_padding_to_convbn, assign_torch, kept_from_torch
from convbn.errors import ConvBNError
from convbn.loading import ModelPairs, Staged, Target

__all__ = ["apply", "find_pairs"]

_BN = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _convbn_layer() -> type | None:
    """convbn's own ``ConvBN2d``, if its module was imported (no instance can exist otherwise)."""
    module = sys.modules.get("convbn.torch")
    return None if module is None else module.ConvBN2d  # type: ignore[no-any-return]


class _Tracer(torch.fx.Tracer):  # type: ignore[misc]
    """fx's tracer, keeping every Conv2d/BatchNorm (subclasses too) and ``ConvBN2d`` as one call."""

    def __init__(self, leaf: tuple[type, ...]) -> None:
        super().__init__()
        self._leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaf) or bool(super().is_leaf_module(m, qualname))


def _fx_pairs(model: nn.Module, modules: dict[str, nn.Module], layer: type | None, notes: list[str]) -> list[tuple[str, str]]:
    """(conv, bn) where the conv's only consumer, in every call, is the BatchNorm."""
    leaf: tuple[type, ...] = (nn.Conv2d, *_BN, *((layer,) if layer is not None else ()))
    graph = _Tracer(leaf).trace(model)
    partner: dict[str, str | None] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target)
        module = modules.get(name)
        if layer is not None and isinstance(module, layer):
            conv, bn = f"{name}.conv", f"{name}.bn"
        elif isinstance(module, nn.Conv2d):
            conv, bn = name, None
            users = list(node.users)
            norms = [u for u in users if u.op == "call_module" and isinstance(modules.get(str(u.target)), _BN)]
            if len(users) == 1 and norms and norms[0].args and norms[0].args[0] is node:
                bn = str(norms[0].target)
            elif norms:
                notes.append(f"{name}: its output feeds more than its BatchNorm; not a pair")
        else:
            continue
        if conv in partner and partner[conv] != bn:
            if partner[conv] is not None:
                notes.append(f"{conv} is called more than once, not always before the same BatchNorm; not a pair")
            bn = None
        partner[conv] = bn
    pairs = [(conv, bn) for conv, bn in partner.items() if bn is not None]
    bns = [bn for _, bn in pairs]
    shared = {bn for bn in bns if bns.count(bn) > 1}
    for bn in sorted(shared):
        notes.append(f"{bn} follows more than one conv; not paired")
    return [(conv, bn) for conv, bn in pairs if bn not in shared]


def _order_pairs(model: nn.Module, layer: type | None) -> list[tuple[str, str]]:
    """(conv, bn) where the BatchNorm is the next leaf module registered after the conv."""
    pairs: list[tuple[str, str]] = []
    previous: tuple[str, nn.Module] | None = None
    skip = None
    for name, module in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        if layer is not None and isinstance(module, layer):
            pairs.append((f"{name}.conv", f"{name}.bn"))
            skip, previous = f"{name}.", None
            continue
        if not isinstance(module, (nn.Conv2d, *_BN)) and any(True for _ in module.children()):
            continue  # a container: its children come next
        if previous is not None and isinstance(previous[1], nn.Conv2d) and isinstance(module, _BN):
            if module.num_features == previous[1].out_channels:
                pairs.append((previous[0], name))
        previous = (name, module)
    return pairs


def _geometry(conv: nn.Conv2d) -> dict[str, Any]:
    return {
        "stride": tuple(conv.stride),
        "padding": _torch_padding_to_convbn(conv.padding),
        "dilation": tuple(conv.dilation),
        "groups": int(conv.groups),
    }


def find_pairs(model: nn.Module) -> ModelPairs:
    """The model's Conv2d -> BatchNorm2d pairs, in forward order (or registration order)."""
    modules = dict(model.named_modules())
    layer = _convbn_layer()
    notes: list[str] = []
    try:
        pairs = _fx_pairs(model, modules, layer, notes)
        pairing = "torch.fx"
    except Exception as exc:  # fx raises many types: TraceError, TypeError, NotImplementedError...
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        notes = [
            f"torch.fx could not trace the model ({type(exc).__name__}: {first[:160]}); paired each "
            "Conv2d with the BatchNorm registered right after it (module order)"
        ]
        pairs = _order_pairs(model, layer)
        pairing = "module order"
    targets: list[Target] = []
    used: set[str] = set()
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        try:
            _check_torch_pair(conv, bn)
        except (ConvBNError, TypeError) as exc:
            notes.append(f"{conv_name} + {bn_name} left as they are: {exc}")
            continue
        o, i, kh, kw = (int(d) for d in conv.weight.shape)
        owner: Any = modules.get(conv_name.rsplit(".", 1)[0]) if "." in conv_name else None
        geometry = _geometry(conv)
        if layer is not None and isinstance(owner, layer):
            # ConvBN2d pads itself (TF's SAME at any stride); its inner conv's padding may be 0.
            geometry["padding"] = getattr(owner, "padding")  # noqa: B009
        targets.append(Target(
            name=conv_name,
            bn_name=bn_name,
            kernel_shape=(kh, kw, i, o),
            bias=conv.bias is not None,
            gamma=bn.weight is not None,
            beta=bn.bias is not None,
            eps=float(bn.eps),
            momentum=None if bn.momentum is None else kept_from_torch(bn.momentum, bn_name),
            geometry=geometry,
            handle=(conv, bn),
        ))
        used.update((conv_name, bn_name))
    untouched = [
        name or "(root)"
        for name, module in modules.items()
        if name not in used
        and (any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)))
        and not (layer is not None and isinstance(module, layer))
    ]
    return ModelPairs(targets, pairing, notes, untouched)


def apply(model: nn.Module, staged: list[Staged]) -> None:
    """Write every staged pair with ``assign_torch``; restore all of them if any write fails."""
    saved = []
    for s in staged:
        conv, bn = s.target.handle
        tensors = [t for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                               bn.num_batches_tracked) if t is not None]
        saved.append((bn, [(t, t.detach().clone()) for t in tensors], bn.eps, bn.momentum))
    try:
        for s in staged:
            conv, bn = s.target.handle
            momentum = bn.momentum
            # The conv's own geometry (checked by matching already) and torch's variance update, so
            # that assign_torch's checks hold for ConvBN2d's inner modules as for plain ones.
            assign_torch(conv, bn, dataclasses.replace(s.params, **_geometry(conv), var_update="unbiased"))
            bn.momentum = momentum  # the model's, exactly (None stays None)
            tracked = s.extras.get("num_batches_tracked")
            if tracked is not None and bn.num_batches_tracked is not None:
                with torch.no_grad():
                    bn.num_batches_tracked.copy_(torch.as_tensor(tracked))
    except BaseException:
        with torch.no_grad():
            for bn, tensors, eps, momentum in saved:
                for tensor, value in tensors:
                    tensor.copy_(value)
                bn.eps, bn.momentum = eps, momentum
        raise
