""":func:`convbn.load_into` for Flax variable trees: pairs by tree order, returns a new tree.

A variable tree has no graph. Flax creates a module's variables when the module first runs, so in
the tree ``init`` returns, a conv's subtree comes right before that of the BatchNorm it feeds: a
conv (``kernel`` of rank 4, optional ``bias``) pairs with the BatchNorm (``batch_stats`` with
``mean``/``var``) that follows it with the same width, then by Flax's names (``Conv_3`` with
``BatchNorm_3``, ``P/conv`` with ``P/bn``, ``convN`` with ``bnN``). A tree that went through a JAX
transformation (``jax.jit``, ``tree_map``) has its keys sorted, which loses that order; it is then
paired by names first, and ordered by the natural order of its paths (``Conv_2`` before
``Conv_10``), which is Flax's creation order for its default names.

Nothing imports JAX here unless the tree holds JAX arrays (it is imported already then).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from convbn.errors import ConvBNError
from convbn.formats._pairing import Unit, natural_key, pair_units
from convbn.loading import ModelPairs, Staged, Target

__all__ = ["apply", "find_pairs"]

Path = tuple[str, ...]


def _modules(tree: Mapping[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(path, {leaf name: array})`` for every subtree holding arrays, in tree order."""
    leaves = {str(k): v for k, v in tree.items() if not isinstance(v, Mapping)}
    if leaves:
        yield prefix, leaves
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _modules(value, (*prefix, str(key)))


def _is_sorted(tree: Mapping[str, Any]) -> bool:
    """Whether every level's keys are in string order (as JAX's tree functions leave them)."""
    keys = [str(k) for k in tree]
    return keys == sorted(keys) and all(_is_sorted(v) for v in tree.values() if isinstance(v, Mapping))


def _roots(variables: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    params = variables.get("params")
    if not isinstance(params, Mapping):
        raise ConvBNError(
            "a Flax variable tree must hold 'params' (and 'batch_stats' for BatchNorm): pass what "
            f"model.init returns. Received: a mapping with keys {sorted(map(str, variables))[:6]}"
        )
    stats = variables.get("batch_stats", {})
    if not isinstance(stats, Mapping):
        raise ConvBNError(f"variables['batch_stats'] must be a mapping. Received: {type(stats).__name__}")
    return params, stats


def find_pairs(variables: Mapping[str, Any]) -> ModelPairs:
    """The tree's conv -> BatchNorm pairs (see the module docstring)."""
    params, stats = _roots(variables)
    param_modules = dict(_modules(params))
    stat_modules = dict(_modules(stats))
    units: list[Unit] = []
    for path, leaves in [*param_modules.items(), *((p, {}) for p in stat_modules if p not in param_modules)]:
        name = "/".join(path)
        kernel = leaves.get("kernel")
        stat = stat_modules.get(path, {})
        if kernel is not None and np.ndim(kernel) == 4 and set(leaves) <= {"kernel", "bias"} and not stat:
            units.append(Unit(name, "conv", int(np.shape(kernel)[-1]), payload=path))
        elif {"mean", "var"} <= set(stat) and set(leaves) <= {"scale", "bias"} and np.ndim(stat["mean"]) == 1:
            units.append(Unit(name, "bn", int(np.shape(stat["mean"])[0]), payload=path))
    lost = _is_sorted(params)
    if lost:
        found, _ = pair_units(units, naming=True, order="adjacent")
        found.sort(key=lambda p: natural_key(p.conv.name))
        pairing = "tree names"
        notes = [
            "the tree's keys are sorted (as after jax.jit or tree_map), which loses the modules' order: "
            "paired by Flax's names (Conv_3 with BatchNorm_3, P/conv with P/bn) and ordered by natural "
            "order; pass the tree model.init returns to pair by tree order"
        ]
    else:
        adjacent = {
            a.name: b.name
            for a, b in itertools.pairwise(units)
            if a.kind == "conv" and b.kind == "bn" and a.channels == b.channels
        }
        found, _ = pair_units(units, graph=adjacent, naming=True, order=None)
        pairing, notes = "tree order", []
    targets = []
    used: set[Path] = set()
    for pair in found:
        conv_path, bn_path = pair.conv.payload, pair.bn.payload
        conv, bn = param_modules[conv_path], param_modules.get(bn_path, {})
        targets.append(Target(
            name=pair.conv.name,
            bn_name=pair.bn.name,
            kernel_shape=tuple(int(d) for d in np.shape(conv["kernel"])),
            bias="bias" in conv,
            gamma="scale" in bn,
            beta="bias" in bn,
            handle=(conv_path, bn_path),
        ))
        used.update((conv_path, bn_path))
    untouched = ["/".join(p) for p in param_modules if p not in used]
    return ModelPairs(targets, pairing, notes, untouched)


def _copy(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Plain nested dicts, sharing the leaves."""
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _like(value: Any, old: Any, where: str) -> Any:
    """``value`` as an array of ``old``'s kind (NumPy or JAX) and dtype."""
    array = np.asarray(value)
    if array.shape != tuple(np.shape(old)):
        raise ConvBNError(f"{where} must keep its shape {tuple(np.shape(old))}. Received: shape {array.shape}")
    if isinstance(old, np.ndarray):
        return array.astype(old.dtype)
    import jax.numpy as jnp

    return jnp.asarray(array, dtype=old.dtype)


def _set(tree: dict[str, Any], path: Path, leaf: str, value: Any) -> None:
    node = tree
    for key in path:
        node = node[key]
    node[leaf] = _like(value, node[leaf], "/".join((*path, leaf)))


def apply(variables: Mapping[str, Any], staged: list[Staged]) -> Any:
    """A new tree holding the staged values; ``variables`` is not modified."""
    out = _copy(variables)
    params, stats = out["params"], out.setdefault("batch_stats", {})
    for s in staged:
        conv_path, bn_path = s.target.handle
        p = s.params
        n = p.out_channels
        _set(params, conv_path, "kernel", p.kernel)
        if s.target.bias:
            _set(params, conv_path, "bias", p.bias)
        if s.target.gamma:
            _set(params, bn_path, "scale", np.ones(n) if p.gamma is None else p.gamma)
        if s.target.beta:
            _set(params, bn_path, "bias", np.zeros(n) if p.beta is None else p.beta)
        _set(stats, bn_path, "mean", p.moving_mean)
        _set(stats, bn_path, "var", p.moving_var)
    core = sys.modules.get("flax.core")
    if core is not None and isinstance(variables, core.FrozenDict):
        return core.freeze(out)
    return out
