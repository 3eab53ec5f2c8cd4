""":func:`convbn.load_into` for Flax variable trees: pairs by tree order, returns a new tree.

A variable tree has no graph. Flax creates a module's variables when the module first runs, so in
the tree ``init`` returns, a conv's subtree comes right before that of the BatchNorm it feeds: a
conv (``kernel`` of rank 4, optional ``bias``) pairs with the BatchNorm (``batch_stats`` with
``mean``/``var``) that follows it with the same width, then by Flax's names (``Conv_3`` with
``BatchNorm_3``, ``P/conv`` with ``P/bn``, ``convN`` with ``bnN``). A tree that went through a JAX
transformation (``jax.jit``, ``tree_map``) has its keys sorted, which loses that order; it is then
paired by names first, and ordered by the natural order of its paths (``Conv_2`` before
``Conv_10``), which is Flax's creation order for its default names.

A model given as ``(module, variables)`` (or ``(module, variables, apply_kwargs)``) also has a
graph: ``module.apply`` is traced with ``jax.make_jaxpr`` on the example input (or, without one, on
``(1, 32, 32, C)`` for the first conv's ``C``), and the data flow between the modules whose variables
the traced operations read is the model's graph. Such a model can be a live source and can run on
``example_input``; a bare tree cannot.

Nothing imports JAX here unless the tree holds JAX arrays or a module is given (it is imported
already then).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from convbn.checkpoint import Layer, Norm
from convbn.errors import ConvBNError
from convbn.formats._pairing import Unit, natural_key, pair_units
from convbn.layouts import transpose_from_flax, transpose_to_flax
from convbn.loading import ModelPairs, Part, Staged, StagedPart, Target, flat_map, out_width, parts_as_layers
from convbn.loading.matching import Flow, Graph, State
from convbn.params import ConvBNParams

__all__ = ["apply", "find_pairs", "read", "read_parts", "restore", "run", "snapshot"]

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


def _split(model: Any) -> tuple[Any, Mapping[str, Any], dict[str, Any]]:
    """``(module or None, variables, apply kwargs)`` of a tree or a ``(module, variables[, kwargs])``."""
    if isinstance(model, tuple):
        return model[0], model[1], dict(model[2]) if len(model) > 2 else {}
    return None, model, {}


def find_pairs(model: Any, example: np.ndarray | None = None) -> ModelPairs:
    """The tree's conv -> BatchNorm pairs (see the module docstring), with the module's graph if given."""
    module, variables, kwargs = _split(model)
    found = _tree_pairs(variables)
    if module is not None:
        try:
            found.graph = _data_flow(module, variables, kwargs, example, found.targets, found.parts, found.untouched)
        except Exception as exc:  # tracing user code raises anything
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            found.notes.append(f"module.apply could not be traced ({type(exc).__name__}: {first[:160]}): no graph")
        else:
            if example is None:
                found.notes.append("the module's graph was traced on a (1, 32, 32, C) input: example_input= sets it")
    return found


def _tree_pairs(variables: Mapping[str, Any]) -> ModelPairs:
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
    parts: list[Part] = []
    previous: Part | None = None
    order: list[str] = []
    paired_bns = {t.handle[1] for t in targets}
    for path, leaves in [*param_modules.items(), *((p, {}) for p in stat_modules if p not in param_modules)]:
        if path in paired_bns:
            continue
        part = None if path in used else _part(path, leaves, stat_modules.get(path, {}))
        if part is not None and part.kind == "batch_norm" and previous is not None and not lost and (
                previous.kind in ("conv", "dense") and out_width(previous) == part.shape[0]):
            previous.norm = part.name  # Flax creates a module's variables when it first runs
        previous = part
        if part is not None:
            parts.append(part)
            used.add(path)
        if path in used:
            order.append("/".join(path))
    untouched = ["/".join(p) for p in param_modules if p not in used]
    return ModelPairs(targets, pairing, notes, untouched, parts=parts, order=order)


def _part(path: Path, leaves: Mapping[str, Any], stat: Mapping[str, Any]) -> Part | None:
    """A module's variables as a layer load_into fills outside the pairs; None for another kind.

    A tree does not say a module's class: a rank-4 kernel is a conv (a ``ConvTranspose`` holds the same
    leaves, so a transposed conv is only recognized with its module), a rank-2 one a dense layer;
    ``scale``/``bias`` alone are a norm only under Flax's own names (``LayerNorm_0``, ``GroupNorm_0``).
    """
    name = "/".join(path)
    kernel = leaves.get("kernel")
    if kernel is not None and set(leaves) <= {"kernel", "bias"} and not stat and np.ndim(kernel) in (2, 4):
        kind = "conv" if np.ndim(kernel) == 4 else "dense"
        return Part(name, kind, tuple(int(d) for d in np.shape(kernel)), "bias" in leaves, handle=path)
    if not set(leaves) <= {"scale", "bias"} or (not leaves and not stat):
        return None
    width = int(np.shape(next(iter({**leaves, **stat}.values())))[-1])
    if {"mean", "var"} <= set(stat):
        return Part(name, "batch_norm", (width,), "bias" in leaves, "scale" in leaves, handle=path)
    last = path[-1] if path else ""
    for kind, prefix in (("layer_norm", "LayerNorm_"), ("group_norm", "GroupNorm_")):
        if not stat and last.startswith(prefix):
            return Part(name, kind, (width,), "bias" in leaves, "scale" in leaves, handle=path)
    return None


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


def _data_flow(
    module: Any, variables: Mapping[str, Any], kwargs: dict[str, Any], example: np.ndarray | None,
    targets: list[Target], parts: list[Part] = (),  # type: ignore[assignment]
    untouched: list[str] = (),  # type: ignore[assignment]
) -> Graph:
    """Which modules feed which, from the jaxpr of ``module.apply``: an operation reading a module's
    variables and data computed from the input belongs to that module. Sets each dense part's
    :attr:`Part.flat` from the same jaxpr (:func:`_flat_sides`)."""
    import jax
    import jax.extend.core as jax_core
    import jax.numpy as jnp

    if example is None:  # the first module created (tree order) sizes it: a Dense (1, in), a conv (1, 32, 32, C)
        kernels = [np.shape(v["kernel"]) for _, v in _modules(variables["params"]) if np.ndim(v.get("kernel", 0)) in (2, 4)]
        if not kernels:
            raise ConvBNError("no conv or dense kernel to size an input by")
        first = kernels[0]
        example = np.zeros((1, first[0]) if len(first) == 2 else (1, 32, 32, first[2]), np.float32)
    x = jnp.asarray(example)
    import flax.linen as nn

    called: dict[str, Any] = {}

    def record(call: Any, args: Any, kw: Any, context: Any) -> Any:
        if context.method_name == "__call__":
            called.setdefault("/".join(context.module.path), context.module)
        return call(*args, **kw)

    with nn.intercept_methods(record):
        closed = jax.make_jaxpr(lambda v, a: module.apply(v, a, **kwargs))(variables, x)
    _by_class(parts, targets, called, untouched, variables)
    unit: dict[str, str] = {}
    for t in targets:
        unit["/".join(t.handle[0])] = unit["/".join(t.handle[1])] = t.name
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
    recorder = Flow()
    states: dict[Any, State] = {}
    jaxpr = closed.jaxpr
    owners: dict[Any, str] = {}
    made: dict[Any, Any] = {}
    alias: dict[Any, Any] = {}
    users: dict[Any, list[Any]] = {}
    for var, path in zip(jaxpr.invars, paths, strict=False):
        keys = [str(getattr(k, "key", k)) for k in path]
        owner = "/".join(keys[1:-1])
        states[var] = Flow.parameter(unit.get(owner, owner))
        if keys[0] == "params" and keys[-1] == "kernel":
            owners[var] = owner
    for var in jaxpr.invars[len(paths):]:
        states[var] = Flow.INPUT

    def state(var: Any) -> State:
        return states.get(var, Flow.NOTHING) if isinstance(var, jax_core.Var) else Flow.NOTHING

    def walk(eqns: Any) -> None:
        for eqn in eqns:
            ins = [state(v) for v in eqn.invars]
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            inner = getattr(inner, "jaxpr", inner)
            reads = any(n for _, n in ins) and any(d for d, _ in ins)
            if reads and inner is not None and len(getattr(inner, "invars", ())) == len(eqn.invars):
                states.update(zip(inner.invars, ins, strict=True))  # a call (pjit, custom_jvp): look inside
                alias.update((i, o) for i, o in zip(inner.invars, eqn.invars, strict=True)
                             if isinstance(o, jax_core.Var))
                walk(inner.eqns)
                outs = [state(v) for v in inner.outvars]
                if len(outs) == len(eqn.outvars):
                    states.update(zip(eqn.outvars, outs, strict=True))
                    alias.update((o, i) for o, i in zip(eqn.outvars, inner.outvars, strict=True)
                                 if isinstance(i, jax_core.Var))
                    continue
            out = recorder.step(ins)
            states.update((o, out) for o in eqn.outvars)
            for v in eqn.outvars:
                made[v] = eqn
            for v in eqn.invars:
                if isinstance(v, jax_core.Var):
                    users.setdefault(_resolve(v, alias), []).append(eqn)

    walk(jaxpr.eqns)
    outputs = {_resolve(v, alias) for v in jaxpr.outvars if isinstance(v, jax_core.Var)}
    dense = {p.name: p for p in parts if p.kind == "dense"}
    for eqn in [e for e in made.values() if e.primitive.name == "dot_general"]:
        kernel = owners.get(_resolve(eqn.invars[1], alias)) if isinstance(eqn.invars[1], jax_core.Var) else None
        if kernel in dense and not dense[kernel].flat:
            dense[kernel].flat = _flat_sides(eqn, made, alias, users, outputs)
    return recorder.graph(t.name for t in targets)


def _by_class(parts: list[Part], targets: list[Target], called: Mapping[str, Any], untouched: list[str],
              variables: Mapping[str, Any]) -> None:
    """The parts as their modules' classes say, once the module ran: a ``ConvTranspose`` (whose
    leaves are a ``Conv``'s) is a transposed conv, and no conv of a pair, a conv's
    ``feature_group_count`` its groups, a norm's ``epsilon`` its eps; a ``LayerNorm`` or
    ``GroupNorm`` under a name of its own is a part."""
    import flax.linen as nn

    params, stats = _roots(variables)
    for t in [t for t in targets if isinstance(called.get("/".join(t.handle[0])), nn.ConvTranspose)]:
        targets.remove(t)
        conv_path, bn_path = t.handle
        width = int(np.shape(_at(stats, bn_path)["mean"])[-1])
        parts += [Part(t.name, "conv", t.kernel_shape, t.bias, norm=t.bn_name, handle=conv_path),
                  Part(t.bn_name, "batch_norm", (width,), t.beta, t.gamma, handle=bn_path)]
    for part in parts:
        m = called.get(part.name)
        if isinstance(m, nn.ConvTranspose):
            flag = bool(getattr(m, "transpose_kernel", False))
            kh, kw, a, b = part.shape
            part.kind, part.options = "conv_transpose", {"transpose_kernel": flag}
            part.shape, part.groups = ((kh, kw, a, b) if flag else (kh, kw, b, a)), 1
        elif isinstance(m, nn.Conv):
            part.groups = int(m.feature_group_count)
        elif isinstance(m, (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            part.eps = float(m.epsilon)
    for name in list(untouched):
        m = called.get(name)
        kind = "layer_norm" if isinstance(m, nn.LayerNorm) else "group_norm" if isinstance(m, nn.GroupNorm) else None
        leaves = _at(params, tuple(name.split("/")))
        if kind is None or not leaves or not set(leaves) <= {"scale", "bias"} or _at(stats, tuple(name.split("/"))):
            continue
        assert m is not None
        width = int(np.shape(next(iter(leaves.values())))[-1])
        groups = None
        if kind == "group_norm":  # flax states num_groups or group_size
            groups = int(m.num_groups) if m.num_groups else width // int(m.group_size)
        parts.append(Part(name, kind, (width,), "bias" in leaves, "scale" in leaves, groups=groups,
                          eps=float(m.epsilon), handle=tuple(name.split("/"))))
        untouched.remove(name)


def _resolve(var: Any, alias: Mapping[Any, Any]) -> Any:
    """The variable ``var`` stands for across call boundaries (a pjit's inner inputs and outputs)."""
    for _ in range(256):
        if var not in alias:
            break
        var = alias[var]
    return var


#: jaxpr primitives that reduce a map to a vector (a mean is a reduce_sum and a division).
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_mean"}


def _flat_sides(dot: Any, made: Mapping[Any, Any], alias: Mapping[Any, Any], users: Mapping[Any, list[Any]],
                outputs: set[Any]) -> dict[str, tuple[int, int, int] | None]:
    """What the jaxpr says of a ``Dense``'s sides (:attr:`Part.flat`): a ``reshape`` of a rank-4 value
    into its input, or of its output into a rank-4 value, through shape-keeping operations, gives the
    map; a reduction or another dense layer a vector; anything else (a ``transpose`` before the
    reshape) leaves the side undecided."""
    out: dict[str, tuple[int, int, int] | None] = {}
    var = dot.invars[0]
    for _ in range(64):  # the input side
        eqn = made.get(_resolve(var, alias))
        if eqn is None:
            if len(var.aval.shape) == 2:
                out["in"] = None
            break
        name = eqn.primitive.name
        if name == "reshape":
            shape = tuple(eqn.invars[0].aval.shape)
            before = made.get(_resolve(eqn.invars[0], alias))
            decided, found = flat_map(shape, "hwc")
            if decided and (before is None or before.primitive.name != "transpose"):
                out["in"] = found
            break
        if (name in _REDUCTIONS and len(eqn.outvars[0].aval.shape) == 2) or name == "dot_general":
            out["in"] = None
            break
        if len(eqn.outvars) != 1 or not eqn.invars or tuple(eqn.outvars[0].aval.shape) != tuple(
                eqn.invars[0].aval.shape) or not hasattr(eqn.invars[0], "aval"):
            break
        var = eqn.invars[0]
    var = dot.outvars[0]
    for _ in range(64):  # the output side
        if _resolve(var, alias) in outputs or var in outputs:
            out["out"] = None
            break
        after = users.get(_resolve(var, alias), [])
        if len(after) != 1:
            break
        eqn = after[0]
        name = eqn.primitive.name
        if name == "reshape":
            shape = tuple(eqn.outvars[0].aval.shape)
            later = users.get(_resolve(eqn.outvars[0], alias), [])
            decided, found = flat_map(shape, "hwc")
            if decided and not any(e.primitive.name == "transpose" for e in later):
                out["out"] = found
            break
        if name == "dot_general":
            out["out"] = None
            break
        if len(eqn.outvars) != 1 or tuple(eqn.outvars[0].aval.shape) != tuple(var.aval.shape):
            break
        var = eqn.outvars[0]
    return out


def read(model: Any, found: ModelPairs) -> list[ConvBNParams]:
    """Each pair's values as the tree holds them; eps and momentum are Flax's defaults (a tree records none)."""
    _, variables, _ = _split(model)
    params, stats = _roots(variables)

    def array(name: str, tree: Mapping[str, Any]) -> np.ndarray | None:
        return None if name not in tree else np.array(tree[name])

    out = []
    for t in found.targets:
        conv_path, bn_path = t.handle
        conv, bn, stat = _at(params, conv_path), _at(params, bn_path), _at(stats, bn_path)
        out.append(ConvBNParams(
            kernel=np.array(conv["kernel"]), bias=array("bias", conv),
            gamma=array("scale", bn), beta=array("bias", bn),
            moving_mean=np.array(stat["mean"]), moving_var=np.array(stat["var"]),
            eps=1e-5, momentum=0.99, var_update="biased",
        ))
    return out


def read_parts(model: Any, found: ModelPairs) -> dict[str, Layer]:
    """Every other layer's values as the tree holds them; a norm's eps is unknown (a tree records none)."""
    _, variables, _ = _split(model)
    params, stats = _roots(variables)

    def read_part(part: Part) -> Layer | Norm:
        leaves, stat = _at(params, part.handle), _at(stats, part.handle)
        value = {k: np.array(v) for k, v in {**leaves, **stat}.items()}
        if part.kind == "conv_transpose":
            kernel = transpose_from_flax(value["kernel"], part.options.get("transpose_kernel", False))
            return Layer("conv_transpose", kernel, value.get("bias"))
        if part.kind in ("conv", "dense"):
            return Layer(part.kind, value["kernel"], value.get("bias"), groups=part.groups or 1)  # type: ignore[arg-type]
        return Norm(part.kind, value.get("scale"), value.get("bias"), value.get("mean"), value.get("var"),  # type: ignore[arg-type]
                    var_update="biased" if part.kind == "batch_norm" else None)

    return parts_as_layers(found, read_part)


def _at(tree: Mapping[str, Any], path: Path) -> Mapping[str, Any]:
    for key in path:
        tree = tree.get(key, {})
    return tree


def run(model: Any, x: np.ndarray) -> list[np.ndarray]:
    """``module.apply(variables, x, **apply_kwargs)`` (the module's eval mode), every output as NumPy."""
    module, variables, kwargs = _split(model)
    if module is None:
        raise ConvBNError(
            "example_input= runs the model, and a Flax variable tree cannot run: pass (module, variables). "
            "Received: a variable tree"
        )
    import jax

    return [np.asarray(leaf, np.float32) for leaf in jax.tree_util.tree_leaves(module.apply(variables, x, **kwargs))]


def snapshot(model: Any) -> None:
    """Nothing: :func:`apply` returns a new tree and never changes the model's."""


def restore(model: Any, saved: Any) -> None:
    """Nothing to restore (see :func:`snapshot`)."""


def _write_part(params: dict[str, Any], stats: dict[str, Any], s: StagedPart) -> None:
    path, part = s.part.handle, s.part
    if part.kind in ("conv", "conv_transpose", "dense"):
        kernel = s.kernel if part.kind != "conv_transpose" else transpose_to_flax(
            np.asarray(s.kernel), part.options.get("transpose_kernel", False))
        _set(params, path, "kernel", kernel)
        if part.bias:
            _set(params, path, "bias", s.bias)
        return
    norm = s.norm
    assert norm is not None
    n = part.shape[0]
    if part.gamma:
        _set(params, path, "scale", np.ones(n) if norm.gamma is None else norm.gamma)
    if part.bias:
        _set(params, path, "bias", np.zeros(n) if norm.beta is None else norm.beta)
    if part.kind == "batch_norm":
        _set(stats, path, "mean", norm.moving_mean)
        _set(stats, path, "var", norm.moving_var)


def apply(model: Any, staged: list[Staged | StagedPart]) -> Any:
    """A new tree holding the staged values; the model's tree is not modified."""
    _, variables, _ = _split(model)
    out = _copy(variables)
    params, stats = out["params"], out.setdefault("batch_stats", {})
    for s in staged:
        if isinstance(s, StagedPart):
            _write_part(params, stats, s)
            continue
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
