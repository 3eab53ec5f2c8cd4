"""TensorFlow checkpoints, written with tf-slim names (format ``"slim"``).

A TF checkpoint is named by its prefix (``model.ckpt`` for ``model.ckpt.index`` +
``model.ckpt.data-*``), by its ``.index`` or ``.data-*`` file, or by a directory holding a
``checkpoint`` state file (or exactly one ``.index``).

Reading understands:

- tf-slim: ``L/weights`` (``L/depthwise_weights``, ``L/pointwise_weights``) with ``L/BatchNorm/*``;
- DCGAN-style: ``d_h1_conv/w`` + ``d_h1_conv/biases`` with a BatchNorm scope ``d_bn1/*``;
- ``tf.compat.v1.layers``: ``conv1/kernel`` + ``conv1/bias`` with ``bn1/*`` or ``batch_normalization*/*``;
- TF2 object-based checkpoints (``tf.train.Checkpoint`` of a Keras model or a ``tf.Module``): the
  object graph stored in the file gives each variable its path, e.g. ``model/_functional/_operations/1/kernel``;
- ``ExponentialMovingAverage`` shadows (``<var>/ExponentialMovingAverage``), used with ``use_ema=True``.

Every other TF1 layer is read into ``Checkpoint.others`` by kind: a conv without BatchNorm
(``weights``/``w`` + ``biases``), a transposed conv (a ``conv2d_transpose`` filter, ``(kh, kw, out,
in)``), a dense layer (``weights``, ``kernel``, DCGAN's ``Matrix``), each with the BatchNorm after it
if any, and every BatchNorm left standalone (DCGAN's ``g_bn0`` after a reshape). A dense layer's
flattened input or output map comes from the ``.meta`` graph's ``Reshape`` ops; where nothing says,
it is undecided (``Layer.flat_undecided``) and never guessed.

Layers come in TF graph order when a ``.meta`` file (a MetaGraphDef) sits next to the prefix, else in
natural name order. Pairing: explicit ``pairs``, then the ``.meta`` graph (which BatchNorm consumes
which conv's output; the graph also gives each conv's stride, padding and dilation and each fused
BatchNorm's epsilon), then naming conventions, then (object-based checkpoints only) order.

Writing produces what ``slim.conv2d(..., normalizer_fn=slim.batch_norm, scope=L)`` restores (and for
``Checkpoint.others`` what ``slim.conv2d``, ``slim.conv2d_transpose``, ``slim.fully_connected`` and
``slim.batch_norm`` restore, dense layers in NHWC feature order):
``L/weights`` (``L/depthwise_weights`` for a depthwise layer), ``L/BatchNorm/gamma`` iff the layer
has a gamma, ``L/BatchNorm/beta`` (zeros when the layer has none), ``L/BatchNorm/moving_mean`` and
``L/BatchNorm/moving_variance``; a fused checkpoint gives ``L/weights`` + ``L/biases``. Every other
tensor is written under its own name when the checkpoint came from a TF checkpoint, and listed in
the notes as not written otherwise. slim has no conv bias: a layer with one is refused (fold it
first with :func:`convbn.convert.fold_bias`; ``save_checkpoint`` does). A grouped (not depthwise)
conv is written as ``L/weights`` and reads back with ``groups=1``: a TF checkpoint does not store
groups. An existing ``<prefix>.meta`` that does not describe the written variables makes the
write fail (:func:`check_destination`): a later read would trust it.

Nothing here imports TensorFlow: the tensor bundle (index and data shards) is read and written
by :mod:`convbn.formats._tfbundle`, and the ``.meta`` graph and TF2 object graph are decoded by
:mod:`convbn.formats._tfproto` (the ``.meta`` graph analysed by :mod:`convbn.formats._tfgraph`). The index is checked whole before any tensor is read, and what
would read outside the data or take more memory than the files hold is refused with one line
naming the file and the tensor (see :mod:`convbn.formats._tfbundle`). A partitioned variable is
read whole from its slices. ``write(..., max_shard_size=)`` splits the data into several shards.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import itertools
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convbn import conventions
from convbn.checkpoint import Checkpoint, FeatureMap, Layer, LayerSource, Norm
from convbn.errors import ConvBNError
from convbn.formats import _tfbundle, _tfgraph, _tfproto
from convbn.formats._caps import FormatCaps
from convbn.formats._common import listing, not_written_note, origin_format
from convbn.formats._pairing import natural_key
from convbn.layouts import depthwise_from_tf, depthwise_to_tf
from convbn.params import ConvBNParams

__all__ = ["CAPS", "NAME", "check_destination", "read", "resolve", "sniff", "write", "write_prefix"]

NAME = "slim"
#: TF checkpoints are read and written without TensorFlow. slim.conv2d with a normalizer has no
#: conv bias; write() writes Checkpoint.others (every layer kind, under slim's names) and honours
#: Checkpoint.fused (conv weights + biases, what slim.conv2d without a normalizer has).
CAPS = FormatCaps(
    suffixes=(".ckpt", ".index"),
    conv_bias=False, writes_others=True, writes_fused=True, write_options=frozenset({"max_shard_size"}),
    prefix=True, shards="data_files", flatten_order="hwc", var_update="unbiased", checks_destination=True,
    convention="slim", settings_note="TF checkpoints",
)

_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")
_STATE_PATH = re.compile(r'^\s*model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', re.MULTILINE)

_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
_EMA_SUFFIX = "/ExponentialMovingAverage"

# Leaf names (leading underscores removed: Keras 3 tracks its kernel as ``_kernel``).
_KERNEL_ROLES = ("pointwise_weights", "weights", "kernel", "w", "depthwise_weights", "depthwise_kernel")
_DEPTHWISE_ROLES = ("depthwise_weights", "depthwise_kernel")
_BIAS_ROLES = ("biases", "bias", "b")
_BN_ROLES = {
    "gamma": "gamma",
    "beta": "beta",
    "moving_mean": "moving_mean",
    "moving_variance": "moving_variance",
}

# Optimizer state that is not a slot of a model variable, and the top-level scopes Keras-in-TF1
# optimizers keep their variables under.
_BOOKKEEPING_LEAF = re.compile(r"global_step|beta[12]_power(_\d+)?|save_counter")
_OPTIMIZER_SCOPE = re.compile(r"(training|Adam|AdamW|SGD|RMSprop|Adagrad|Adadelta|Adamax|Nadam|Ftrl)(_\d+)?")


_STYLE_TEXT = {
    "slim": "tf-slim ('L/weights' + 'L/BatchNorm')",
    "dcgan": "DCGAN-style (conv 'w' + 'biases', a separate BatchNorm scope)",
    "tf_v1_layers": "tf.compat.v1.layers ('kernel'/'bias', 'bn'/'batch_normalization')",
    "keras3": "TF2 object-based (Keras 3 / tf.Module)",
    "keras2": "TF2 object-based tf_keras ('layer_with_weights-N')",
}
_STYLE_PRESET = {
    "slim": conventions.SLIM,
    "dcgan": conventions.DCGAN,
    "tf_v1_layers": conventions.TF_V1_LAYERS,
    "keras3": conventions.KERAS3,
    "keras2": conventions.KERAS2_FUSED,
}


# -- locating the checkpoint (no TensorFlow) ------------------------------------------------------


def _has_index_magic(index: Path) -> bool:
    magic = _tfbundle.INDEX_MAGIC
    with open(index, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < _tfbundle.FOOTER_BYTES:
            return False
        f.seek(size - len(magic))
        return f.read(len(magic)) == magic


def _prefix_from_state(directory: Path) -> Path:
    """The prefix a ``checkpoint`` state file names (relative to its directory, as TF resolves it)."""
    state = directory / "checkpoint"
    match = _STATE_PATH.search(state.read_text(encoding="utf-8", errors="replace"))
    if match is None:
        raise ConvBNError(
            f"a TF 'checkpoint' state file must name model_checkpoint_path. Received: file={state}"
        )
    # Text-format escapes, including octal bytes of non-ASCII paths.
    try:
        raw = codecs.escape_decode(match.group(1).encode("utf-8"))[0].decode("utf-8")  # type: ignore[attr-defined]
    except ValueError as exc:  # a bad escape, or bytes that are not UTF-8
        raise ConvBNError(
            f"a TF 'checkpoint' state file must name a UTF-8 path: {_tfgraph.first_line(exc)}. Received: file={state}"
        ) from None
    prefix = Path(raw)
    if not prefix.is_absolute():
        return directory / prefix
    if not _tfbundle.index_path(prefix).is_file() and _tfbundle.index_path(directory / prefix.name).is_file():
        return directory / prefix.name  # the directory was moved after saving
    return prefix


def resolve(path: str | os.PathLike[str]) -> Path:
    """The checkpoint prefix that ``path`` names, without importing TensorFlow.

    ``path`` may be the prefix (``model.ckpt``), its ``.index``, ``.data-*`` or ``.meta`` file, or a
    directory holding a ``checkpoint`` state file (or exactly one ``.index`` file).

    Raises:
        ConvBNError: when ``path`` names no TF checkpoint (the message says what was looked for).
    """
    path = Path(path)
    if path.is_dir():
        if (path / "checkpoint").is_file():
            prefix = _prefix_from_state(path)
            if not _tfbundle.index_path(prefix).is_file():
                raise ConvBNError(
                    f"the checkpoint named by {path / 'checkpoint'} must exist: {_tfbundle.index_path(prefix)} is "
                    f"missing. Received: path={str(path)!r}"
                )
            return prefix
        indexes = sorted(path.glob("*.index"))
        if len(indexes) == 1:
            return indexes[0].with_name(indexes[0].name[: -len(".index")])
        raise ConvBNError(
            "a TF checkpoint directory must hold a 'checkpoint' state file or exactly one '.index' "
            f"file. Received: path={str(path)!r} with {len(indexes)} '.index' files"
        )
    name = path.name
    if name.endswith(".index"):
        prefix = path.with_name(name[: -len(".index")])
    elif _DATA_SUFFIX.search(name):
        prefix = path.with_name(_DATA_SUFFIX.sub("", name))
    elif name.endswith(".meta") and not _tfbundle.index_path(path).is_file():
        prefix = path.with_name(name[: -len(".meta")])
    else:
        prefix = path
    if not _tfbundle.index_path(prefix).is_file():
        raise ConvBNError(
            "a TF checkpoint must exist at the prefix given: expected "
            f"{_tfbundle.index_path(prefix)} and {prefix}.data-*. Received: path={str(path)!r}"
        )
    return prefix


def sniff(path: Path) -> bool:
    """Whether ``path`` names a TF checkpoint (prefix, ``.index``/``.data-*`` file, or directory).

    Judged from the index's footer magic; never imports TensorFlow and never raises.
    """
    try:
        return _has_index_magic(_tfbundle.index_path(resolve(path)))
    except Exception:
        return False


# -- reading ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Var:
    name: str  # logical name: the TF1 variable name, or a TF2 object path
    key: str  # the checkpoint key to read
    shape: tuple[int, ...]
    depthwise: bool = False  # a (kh, kw, in_channels, multiplier) depthwise kernel

    @property
    def scope(self) -> str:
        return self.name.rpartition("/")[0]

    @property
    def role(self) -> str:
        return self.name.rpartition("/")[2].lstrip("_")


class _Source:
    """An open checkpoint: its index checked, tensors read one at a time."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.index = _tfbundle.index_path(prefix)
        self.bundle = _tfbundle.Bundle(prefix)
        self.shapes = self.bundle.shapes

    def data_name(self) -> str:
        return ", ".join(str(f) for f in self.bundle.data_files)

    def get(self, key: str) -> np.ndarray:
        return self.bundle.read(key)


def _object_graph_names(source: _Source) -> tuple[dict[str, str], list[str]]:
    """Logical names of a TF2 object-based checkpoint: ``{path: key}`` and the dropped keys.

    Each variable is named by its shortest path from the root that does not pass through an
    ``optimizer``; variables reachable only through one, optimizer slots and ``save_counter`` are
    dropped, as are non-variable attributes.
    """
    value = source.get(_OBJECT_GRAPH)
    if value.dtype != object or value.shape != ():
        raise ConvBNError(
            f"a TF2 checkpoint's object graph must be a string scalar. Received: file={source.data_name()}, "
            f"tensor={_OBJECT_GRAPH!r} of dtype {value.dtype}, shape {value.shape}"
        )
    try:
        graph = _tfproto.parse_object_graph(value.item())
    except ValueError as exc:
        raise ConvBNError(
            f"a TF2 checkpoint's object graph must parse: {_tfgraph.first_line(exc)}. "
            f"Received: file={source.data_name()}, tensor={_OBJECT_GRAPH!r}"
        ) from None
    nodes = graph.nodes
    if not nodes:
        raise ConvBNError(
            f"a TF2 checkpoint's object graph must have a root object. Received: file={source.data_name()}, "
            f"tensor={_OBJECT_GRAPH!r} with no objects"
        )
    slots = {s.slot_variable_node_id for n in nodes for s in n.slot_variables}
    best: dict[int, tuple[str, ...]] = {}
    seen = {(0, False)}
    queue: collections.deque[tuple[int, bool, tuple[str, ...]]] = collections.deque([(0, False, ())])
    while queue:
        node_id, via_optimizer, path = queue.popleft()
        if not via_optimizer and node_id not in best:
            best[node_id] = path
        for child in nodes[node_id].children:
            flag = via_optimizer or child.local_name == "optimizer" or (not path and child.local_name == "save_counter")
            if child.node_id < len(nodes) and (child.node_id, flag) not in seen:
                seen.add((child.node_id, flag))
                queue.append((child.node_id, flag, (*path, child.local_name)))
    names: dict[str, str] = {}
    for node_id, node in enumerate(nodes):
        for attr in node.attributes:
            if attr.name == "VARIABLE_VALUE" and node_id in best and node_id not in slots and best[node_id]:
                if attr.checkpoint_key in source.bundle.unreadable:
                    continue  # dropped by _variables, with a note
                if attr.checkpoint_key not in source.shapes:
                    raise ConvBNError(
                        f"a TF2 checkpoint's object graph must name keys its index holds; variable "
                        f"{'/'.join(best[node_id])!r} is stored under {attr.checkpoint_key!r}, which it does not. "
                        f"Received: file={source.index}"
                    )
                names["/".join(best[node_id])] = attr.checkpoint_key
    kept = set(names.values())
    dropped = [k for k in source.shapes if k not in kept]
    return names, dropped


def _is_bookkeeping(name: str, names: Iterable[str]) -> bool:
    """Optimizer slots (``<variable>/<optimizer>``), ``global_step``, Adam's ``beta1_power`` and the like."""
    scope, _, leaf = name.rpartition("/")
    if _BOOKKEEPING_LEAF.fullmatch(leaf) or _OPTIMIZER_SCOPE.fullmatch(name.partition("/")[0]):
        return True
    return bool(scope) and scope in names and not name.endswith(_EMA_SUFFIX)


_DCGAN_CONV = re.compile(r"(?P<prefix>.*?)h(?P<n>\d+)_conv")
_RENAMES = (
    ("conv2d", "batch_normalization"),
    ("conv", "bn"),
    ("conv", "batchnorm"),
    ("conv", "batch_norm"),
    ("conv", "norm"),
    ("Conv", "BatchNorm"),
    ("Conv2d", "BatchNorm"),
)


def _naming_candidates(kernel: _Var, bn_scopes: set[str], auto_counts: dict[str, bool]) -> list[str]:
    """The BatchNorm scopes that naming conventions suggest for ``kernel``."""
    scope = kernel.scope
    parent, _, leaf = scope.rpartition("/")

    def join(name: str) -> str:
        return f"{parent}/{name}" if parent else name

    nested = [s for s in (f"{scope}/BatchNorm", f"{scope}/batch_normalization", f"{scope}/bn") if s in bn_scopes]
    if nested:
        return nested
    match = _DCGAN_CONV.fullmatch(leaf)
    if match:
        base = join(f"{match['prefix']}bn{match['n']}")
        found = [s for s in (base, f"{base}/batch_normalization") if s in bn_scopes]
        if found:
            return found[:1]
    if re.fullmatch(r"conv2d(_\d+)?", leaf) and not auto_counts.get(parent, False):
        return []  # Keras auto-names line up only when every conv2d_N has its batch_normalization_N
    found = []
    for old, new in _RENAMES:
        for m in re.finditer(re.escape(old), leaf):
            candidate = join(leaf[: m.start()] + new + leaf[m.end() :])
            if candidate in bn_scopes and candidate not in found:
                found.append(candidate)
    if leaf.startswith("res") and join("bn" + leaf[3:]) in bn_scopes:  # Caffe ResNets: res2a_branch2a, bn2a_branch2a
        found.append(join("bn" + leaf[3:]))
    return found


def _auto_name_counts(kernels: Iterable[_Var], bn_scopes: Iterable[str]) -> dict[str, bool]:
    """Per parent scope: whether Keras auto-named convs and BatchNorms are equally many."""
    convs: collections.Counter[str] = collections.Counter()
    bns: collections.Counter[str] = collections.Counter()
    for k in kernels:
        parent, _, leaf = k.scope.rpartition("/")
        convs[parent] += bool(re.fullmatch(r"conv2d(_\d+)?", leaf))
    for s in bn_scopes:
        parent, _, leaf = s.rpartition("/")
        bns[parent] += bool(re.fullmatch(r"batch_normalization(_\d+)?", leaf))
    return {p: convs[p] == bns[p] for p in convs}


def _order_pairs(kernels: list[_Var], bns: dict[str, dict[str, _Var]]) -> dict[str, tuple[str, bool]]:
    """Object-based checkpoints: a conv directly followed (same parent) by a BatchNorm of its width.

    Returns ``{kernel: (bn_scope, depthwise)}``. Keras 3 names a depthwise kernel ``kernel`` too:
    a ``(kh, kw, C, m)`` kernel followed by a BatchNorm of width ``C*m`` (not ``m``) is depthwise.
    """
    items = [(k.scope, "conv", k.name) for k in kernels] + [(s, "bn", s) for s in bns]
    items.sort(key=lambda item: natural_key(item[0]))
    pairs = {}
    for (scope, kind, name), (next_scope, next_kind, bn) in itertools.pairwise(items):
        if kind != "conv" or next_kind != "bn" or scope.rpartition("/")[0] != next_scope.rpartition("/")[0]:
            continue
        a, b = scope.rpartition("/")[2], next_scope.rpartition("/")[2]
        if a.isdigit() and b.isdigit() and int(b) != int(a) + 1:
            continue  # a layer without variables (an activation) sits between them
        kernel = next(k for k in kernels if k.name == name)
        width = bns[bn]["moving_mean"].shape
        if width == (_out_channels(kernel),):
            pairs[name] = (bn, kernel.depthwise)
        elif width == (kernel.shape[2] * kernel.shape[3],) and kernel.role == "kernel":
            pairs[name] = (bn, True)
    return pairs


def _out_channels(kernel: _Var) -> int:
    shape = kernel.shape
    return shape[2] * shape[3] if kernel.depthwise else shape[3]


def _pick_kernel(candidates: list[_Var]) -> _Var | None:
    for role in _KERNEL_ROLES:
        for var in candidates:
            if var.role == role:
                return var
    return candidates[0] if len(candidates) == 1 else None


def read(
    path: str | os.PathLike[str],
    *,
    pairs: Mapping[str, str] | None = None,
    eps: float | None = None,
    momentum: float | None = None,
    use_ema: bool = False,
) -> Checkpoint:
    """Read a TF checkpoint (tf-slim, DCGAN, ``tf.compat.v1.layers`` or TF2 object-based names).

    Args:
        path: the checkpoint prefix, its ``.index``/``.data-*`` file, or a directory holding a
            ``checkpoint`` state file.
        pairs: conv scope (or kernel variable) -> BatchNorm scope, e.g. ``{"d_h1_conv": "d_bn1"}``;
            wins over the graph and naming rules.
        eps: BatchNorm epsilon for every layer, instead of the one read from the ``.meta`` graph or
            the naming style's preset (a TF checkpoint does not store it).
        momentum: moving-average momentum (fraction kept) for every layer, instead of the preset's.
        use_ema: take each variable's ``ExponentialMovingAverage`` shadow where it has one.

    Returns:
        A :class:`~convbn.convert.Checkpoint`: layers keyed by conv scope in source order, other
        variables in ``tensors`` (TF2 object-based ones by object path), optimizer slots,
        ``global_step`` and unused EMA shadows in ``dropped``, and ``notes`` saying which defaults
        were assumed and what stayed unpaired.

    Raises:
        ConvBNError: for a missing, truncated or corrupt file, a BatchNorm tensor that is not 1-D or
            does not match its conv's width, a negative or NaN moving variance, a bad ``pairs``
            entry, or ``use_ema=True`` without EMA shadows. The message names the file and tensor.

    Example:
        >>> ckpt = read("model.ckpt")  # doctest: +SKIP
        >>> ckpt.layers["conv1"].kernel.shape, ckpt.convention  # doctest: +SKIP
        ((3, 3, 3, 16), 'slim')
    """
    prefix = resolve(path)
    source = _Source(prefix)
    ckpt = Checkpoint(format=NAME)
    object_based = _OBJECT_GRAPH in source.shapes
    variables = _variables(source, object_based, use_ema, ckpt)
    bns = _batchnorms(variables, source)
    kernels = [v for v in variables.values() if len(v.shape) == 4 and v.role in _KERNEL_ROLES]
    graph = None if object_based else _tfgraph.load_graph(prefix, variables, bns, ckpt.notes)
    # TF1 checkpoints: transposed-conv and dense kernels are read as layers of their own kind (TF2
    # object-based ones keep them in tensors: their object paths name no layer kind).
    kinds = {} if object_based else _layer_kinds(variables, kernels, bns, graph, ckpt.notes)
    conv_kernels = [k for k in kernels if kinds.get(k.name) != "conv_transpose"]
    chosen = _pair(source, variables, conv_kernels, bns, graph, pairs or {}, object_based, ckpt.notes)

    def position(name: str) -> tuple[Any, ...]:
        if graph is not None and name in graph.order:
            return (0, graph.order[name])
        return (1, natural_key(name))

    # One layer per conv, keyed by its scope (by the kernel's name when two kernels share a scope).
    layer_of: dict[str, str] = {}
    for kernel_name in sorted(chosen, key=position):
        scope = variables[kernel_name].scope or kernel_name
        layer_of[kernel_name] = kernel_name if scope in layer_of.values() else scope

    by_scope: dict[str, list[_Var]] = collections.defaultdict(list)
    for var in variables.values():
        by_scope[var.scope].append(var)
    consumed: set[str] = set()
    styles: dict[str, list[str]] = collections.defaultdict(list)
    graph_eps: list[str] = []
    unfused: list[str] = []
    for kernel_name, layer in layer_of.items():
        bn_scope, reason, style = chosen[kernel_name]
        kernel_var = variables[kernel_name]
        bias_var = next(
            (v for v in by_scope[kernel_var.scope] if v.role in _BIAS_ROLES and v.name not in consumed), None
        )
        preset = _STYLE_PRESET[style]
        graph_layer_eps = graph.bn_eps.get(bn_scope) if graph is not None else None
        eps_from_graph = eps is None and graph_layer_eps is not None
        layer_eps = graph_layer_eps if eps_from_graph else eps
        if eps_from_graph:
            graph_eps.append(layer)
        var_update = preset.var_update
        if graph is not None and bn_scope in graph.bn_unfused:
            var_update = "biased"  # TF's non-fused batch norm updates with the biased variance
            unfused.append(layer)
        params, (conv_names, bn_names) = _build_layer(
            source, kernel_var, bias_var, bns[bn_scope],
            graph.geometry.get(kernel_name, {}) if graph is not None else {},
            eps=preset.eps if layer_eps is None else layer_eps,
            momentum=preset.momentum if momentum is None else momentum,
            var_update=var_update,
        )
        ckpt.layers[layer] = params
        ckpt.sources[layer] = LayerSource(
            conv=conv_names,
            bn=bn_names,
            reason=reason,
            conv_name=kernel_var.scope or kernel_var.name,
            bn_name=bn_scope,
            # stride/padding/dilation from the graph's conv op (a depthwise kernel's shape gives
            # groups either way); eps from its fused BatchNorm op. momentum is never stored.
            geometry=graph is not None and kernel_name in graph.geometry,
            settings=eps_from_graph,
        )
        styles[style].append(layer)
        consumed.add(kernel_name)
        consumed.update(v.name for v in bns[bn_scope].values())
        if bias_var is not None:
            consumed.add(bias_var.name)

    if not object_based:
        _read_others(
            ckpt, source, variables, kinds, bns, graph, chosen, consumed, by_scope, styles, eps, momentum, position
        )
    for name in sorted([*ckpt.layers, *ckpt.others], key=lambda n: position(_first_variable(ckpt, n))):
        ckpt.order.append(name)
    ckpt.others = {name: ckpt.others[name] for name in ckpt.order if name in ckpt.others}  # in source order too

    # Everything else, in the same order, read one tensor at a time.
    for name in sorted((n for n in variables if n not in consumed), key=position):
        var = variables[name]
        value = source.get(var.key)
        if var.role == "moving_variance" and var.scope in bns:
            _check_variance(source, var, value)
        if value.dtype.kind in "OSU":
            ckpt.dropped.append(var.key)
            ckpt.notes.append(f"dropped string tensor {var.key!r}")
            continue
        ckpt.tensors[name] = value

    _report(ckpt, styles, graph, graph_eps, unfused, kernels, chosen, bns, eps, momentum)
    return ckpt


_DENSE_ROLES = ("weights", "kernel", "Matrix", "w")
#: A scope whose last part names a transposed conv: slim's and Keras's default, or a ``deconv`` one.
_TRANSPOSE_SCOPE = re.compile(r"(^|/)(conv2d_transpose(_\d+)?|[^/]*deconv[^/]*)$", re.IGNORECASE)


def _first_variable(ckpt: Checkpoint, layer: str) -> str:
    """A layer's kernel (or BatchNorm moving mean) variable, which places it in source order."""
    source = ckpt.sources.get(layer)
    if source is not None:
        return source.conv["kernel"]
    other = ckpt.others[layer]
    return other.tensors.get("kernel") or other.tensors["moving_mean"]


def _layer_kinds(
    variables: Mapping[str, _Var],
    kernels: list[_Var],
    bns: Mapping[str, Mapping[str, _Var]],
    graph: _tfgraph.Graph | None,
    notes: list[str],
) -> dict[str, str]:
    """Kernel variable -> ``"conv"``, ``"conv_transpose"`` or ``"dense"``.

    The ``.meta`` graph says which op each kernel feeds. Without one (or for a kernel it does not
    use), a 4-D kernel is a transposed conv's ``(kh, kw, out, in)`` filter when its scope is slim's
    ``Conv2d_transpose`` (or names a ``deconv``), or when its bias, or the one BatchNorm its name
    suggests, is ``out`` wide where ``out != in``; otherwise a conv, as slim reads it. A square
    kernel (``out == in``) in a file that has transposed convs cannot be told apart: it is read as a
    conv and the notes say so. A 2-D ``weights``/``kernel``/``Matrix``/``w`` is a dense kernel.
    """
    kinds: dict[str, str] = {}
    auto_counts = _auto_name_counts(kernels, bns)
    undecided: list[str] = []
    for kernel in kernels:
        if kernel.name.rpartition("/")[2].startswith("_"):
            continue  # a TF2 object path (Keras 3's '_kernel') written under its own name: kept as it is
        if graph is not None and (kernel.name in graph.geometry or kernel.name in graph.kinds):
            kinds[kernel.name] = graph.kinds.get(kernel.name, "conv")
            continue
        out_t, out_c = kernel.shape[2], kernel.shape[3]
        kinds[kernel.name] = "conv"
        if kernel.depthwise:
            continue
        if _TRANSPOSE_SCOPE.search(kernel.scope):
            kinds[kernel.name] = "conv_transpose"  # slim's own scope for conv2d_transpose, or a 'deconv' one
            continue
        if out_t == out_c:
            undecided.append(kernel.name)
            continue
        bias = next((v for v in variables.values() if v.scope == kernel.scope and v.role in _BIAS_ROLES), None)
        widths = {bns[s]["moving_mean"].shape[0] for s in _naming_candidates(kernel, set(bns), auto_counts)}
        if (bias is not None and bias.shape == (out_t,)) or (bias is None and widths == {out_t}):
            kinds[kernel.name] = "conv_transpose"
    for var in variables.values():
        if len(var.shape) == 2 and var.name.rpartition("/")[2] in _DENSE_ROLES:
            kinds[var.name] = "dense"
    if undecided and any(k == "conv_transpose" for k in kinds.values()):
        # A file with transposed convs elsewhere: a square kernel here could be one too, and nothing
        # in the file says which. Read as a conv (slim's reading), and say so.
        shown = listing(undecided)
        notes.append(
            f"read as convs: {len(undecided)} kernel(s) whose shape cannot tell a conv from a transposed "
            f"conv (as many inputs as outputs) and that no .meta graph or scope name places ({shown}); "
            "keep the checkpoint's .meta file beside it for the graph to decide"
        )
    return kinds


def _read_others(
    ckpt: Checkpoint,
    source: _Source,
    variables: Mapping[str, _Var],
    kinds: Mapping[str, str],
    bns: Mapping[str, dict[str, _Var]],
    graph: _tfgraph.Graph | None,
    chosen: Mapping[str, tuple[str, str, str]],
    consumed: set[str],
    by_scope: Mapping[str, list[_Var]],
    styles: Mapping[str, list[str]],
    eps: float | None,
    momentum: float | None,
    position: Any,
) -> None:
    """Every kernel not in a conv+BatchNorm pair (a lone conv, a transposed conv, a dense layer,
    each with the BatchNorm that follows it, if any) and every BatchNorm left, as
    :class:`~convbn.checkpoint.Layer` objects in ``ckpt.others``."""
    used_bns = {bn for bn, _, _ in chosen.values()}
    auto_counts = _auto_name_counts([variables[k] for k in kinds if len(variables[k].shape) == 4], bns)
    ckpt_style = next(iter(styles)) if len(styles) == 1 else "slim"
    read: dict[str, list[str]] = collections.defaultdict(list)
    undecided: list[str] = []
    flattened: list[str] = []
    for name in sorted((k for k in kinds if k not in chosen and k not in consumed), key=position):
        var, kind = variables[name], kinds[name]
        out = var.shape[-1] if kind == "dense" else var.shape[2] if kind == "conv_transpose" else _out_channels(var)
        bn_scope = graph.bn_of.get(name) if graph is not None else None
        if graph is None or (name not in graph.geometry and name not in graph.kinds):
            found = [s for s in _naming_candidates(var, set(bns), auto_counts)
                     if s not in used_bns and bns[s]["moving_mean"].shape == (out,)]
            if kind == "dense":
                found = [s for s in (f"{var.scope}/BatchNorm", f"{var.scope}/bn") if s in bns and s not in used_bns
                         and bns[s]["moving_mean"].shape == (out,)] or found
            bn_scope = found[0] if len(found) == 1 else None
        if bn_scope is not None and (bn_scope in used_bns or bns[bn_scope]["moving_mean"].shape != (out,)):
            bn_scope = None
        bias_var = next(
            (v for v in by_scope[var.scope] if v.role in _BIAS_ROLES and v.name not in consumed and v.name != name), None
        )
        kernel = source.get(var.key)
        groups = 1
        if var.depthwise:
            groups = kernel.shape[2]
            kernel = depthwise_from_tf(kernel)
        tensors = {"kernel": var.key}
        arrays: dict[str, Any] = {}
        _read_vector(source, "bias", bias_var, (out,), f"the {kind} kernel {var.key!r} {var.shape}", arrays, tensors)
        bias = arrays.get("bias")
        if bias_var is not None:
            consumed.add(bias_var.name)
        norm = None
        if bn_scope is not None:
            norm = _read_norm(source, bns[bn_scope], bn_scope, graph, ckpt_style, eps, momentum, tensors)
            used_bns.add(bn_scope)
            consumed.update(v.name for v in bns[bn_scope].values())
        geometry = graph.geometry.get(name, {}) if graph is not None and kind != "dense" else {}
        fields: dict[str, Any] = {}
        layer_name = var.scope or name
        if kind == "dense":
            side_in = graph.flat_in.get(name, "undecided") if graph is not None else "undecided"
            side_out = graph.flat_out.get(name, "undecided") if graph is not None else "undecided"
            fields["flat_in"] = side_in if isinstance(side_in, FeatureMap) else None
            fields["flat_out"] = side_out if isinstance(side_out, FeatureMap) else None
            fields["flat_undecided"] = tuple(
                (side, "hwc") for side, value in (("in", side_in), ("out", side_out)) if value == "undecided"
            )
            if fields["flat_undecided"]:
                undecided.append(layer_name)
            if fields["flat_in"] or fields["flat_out"]:
                flattened.append(layer_name)
        else:
            fields = {k: v for k, v in geometry.items() if k in ("stride", "padding", "dilation")}
            fields["geometry"] = bool(geometry)
            if kind == "conv" and graph is None:
                fields["padding"] = "SAME"  # slim.conv2d's default
        try:
            layer = Layer(kind, kernel=kernel, bias=bias, norm=norm, groups=groups, tensors=tensors, **fields)  # type: ignore[arg-type]
        except ConvBNError as exc:
            raise ConvBNError(f"{exc} (layer {layer_name!r} in {source.index})") from None
        if layer_name in ckpt.layers or layer_name in ckpt.others:
            layer_name = name
        ckpt.others[layer_name] = layer
        consumed.add(name)
        read[kind + ("+BatchNorm" if norm is not None else "")].append(layer_name)
    for scope in sorted((s for s in bns if s not in used_bns), key=lambda s: position(bns[s]["moving_mean"].name)):
        if scope in ckpt.layers or scope in ckpt.others:
            continue  # a BatchNorm scope named like a layer: left in tensors
        bn_tensors: dict[str, str] = {}
        norm = _read_norm(source, bns[scope], scope, graph, ckpt_style, eps, momentum, bn_tensors)
        ckpt.others[scope] = Layer("batch_norm", norm=norm, tensors=bn_tensors)
        consumed.update(v.name for v in bns[scope].values())
        read["batch_norm"].append(scope)
    if read:
        listed = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in read.items())
        ckpt.notes.append(f"read {sum(map(len, read.values()))} other layer(s) by kind ({listed})")
    if flattened:
        ckpt.notes.append(
            "flattened feature maps read from the .meta graph's Reshape ops: "
            + ", ".join(_flat_text(n, ckpt.others[n]) for n in flattened)
        )
    if undecided:
        why = "the .meta graph does not say" if graph is not None else "there is no .meta graph to say"
        ckpt.notes.append(
            f"undecided flatten: {why} whether the features of dense layer(s) {', '.join(undecided)} are a "
            "flattened feature map; converting them to an NCHW framework is refused until stated "
            "(convbn convert --flatten LAYER=HxWxC, LAYER=out:HxWxC or LAYER=none)"
        )


def _flat_text(name: str, layer: Layer) -> str:
    parts = []
    for side, m in (("input", layer.flat_in), ("output", layer.flat_out)):
        if m is not None:
            parts.append(f"{side} {m.height}x{m.width}x{m.channels} ({m.order})")
    return f"{name} ({', '.join(parts)})"


def _read_norm(
    source: _Source,
    roles: Mapping[str, _Var],
    scope: str,
    graph: _tfgraph.Graph | None,
    style: str,
    eps: float | None,
    momentum: float | None,
    tensors: dict[str, str],
) -> Norm:
    """A BatchNorm scope's tensors and settings (eps from the graph's fused op, else the style's preset)."""
    arrays: dict[str, Any] = {}
    width = roles["moving_mean"].shape
    for field, role in (("gamma", "gamma"), ("beta", "beta"), ("moving_mean", "moving_mean"),
                        ("moving_var", "moving_variance")):
        _read_vector(source, field, roles.get(role), width, f"the moving mean {roles['moving_mean'].key!r}", arrays, tensors)
    _check_variance(source, roles["moving_variance"], arrays["moving_var"])
    preset = _STYLE_PRESET[style]
    graph_eps = graph.bn_eps.get(scope) if graph is not None else None
    unfused = graph is not None and scope in graph.bn_unfused
    return Norm(
        "batch_norm",
        eps=eps if eps is not None else graph_eps if graph_eps is not None else preset.eps,
        momentum=preset.momentum if momentum is None else momentum,
        var_update="biased" if unfused else preset.var_update,
        **arrays,
    )


def _variables(source: _Source, object_based: bool, use_ema: bool, ckpt: Checkpoint) -> dict[str, _Var]:
    """The model variables by logical name; optimizer state and unused EMA values go to ``dropped``."""
    notes = ckpt.notes
    if object_based:
        logical, dropped = _object_graph_names(source)
    else:
        dropped = [k for k in source.shapes if _is_bookkeeping(k, source.shapes)]
        logical = {k: k for k in source.shapes if k not in set(dropped)}
    ckpt.dropped.extend(sorted(dropped, key=natural_key))
    unreadable = sorted(source.bundle.unreadable, key=natural_key)
    if unreadable:  # not in source.shapes: a variant or resource tensor is state, never a weight
        ckpt.dropped.extend(unreadable)
        ckpt.notes.append(f"dropped {len(unreadable)} tensors of dtypes convbn does not read: {unreadable[:8]}")
    if dropped:
        notes.append(
            f"dropped {len(dropped)} optimizer/bookkeeping entries (optimizer slots, step counters"
            f"{', the object graph' if object_based else ''}); listed in Checkpoint.dropped"
        )

    # ExponentialMovingAverage shadows: used instead of their variables, or dropped.
    shadows = {n[: -len(_EMA_SUFFIX)]: n for n in logical if n.endswith(_EMA_SUFFIX)}
    shadows = {v: s for v, s in shadows.items() if v in logical}
    if use_ema and not shadows:
        raise ConvBNError(
            "use_ema=True needs ExponentialMovingAverage shadow variables ('<var>/ExponentialMovingAverage'). "
            f"Received: file={source.index} with none"
        )
    keys: dict[str, str] = {}
    for name, key in logical.items():
        if name.endswith(_EMA_SUFFIX) and name[: -len(_EMA_SUFFIX)] in shadows:
            continue
        keys[name] = logical[shadows[name]] if use_ema and name in shadows else key
    ckpt.dropped.extend(sorted((logical[v] if use_ema else logical[s]) for v, s in shadows.items()))
    if shadows:
        notes.append(
            f"used the ExponentialMovingAverage shadows of {len(shadows)} variables; their raw values are dropped"
            if use_ema
            else f"dropped {len(shadows)} ExponentialMovingAverage shadows (read with use_ema=True to use them)"
        )
    variables = {}
    for name, key in keys.items():
        shape = source.shapes[key]
        depthwise = len(shape) == 4 and name.rpartition("/")[2].lstrip("_") in _DEPTHWISE_ROLES
        variables[name] = _Var(name, key, shape, depthwise)
    return variables


def _batchnorms(variables: Mapping[str, _Var], source: _Source) -> dict[str, dict[str, _Var]]:
    """BatchNorm scopes (those holding moving_mean and moving_variance) and their variables by role."""
    found: dict[str, dict[str, _Var]] = collections.defaultdict(dict)
    for var in variables.values():
        if var.role in _BN_ROLES and var.scope:
            found[var.scope][_BN_ROLES[var.role]] = var
    bns = {s: r for s, r in found.items() if "moving_mean" in r and "moving_variance" in r}
    for roles in bns.values():
        for role, var in roles.items():
            if len(var.shape) != 1:
                raise ConvBNError(
                    f"BatchNorm {role} must be 1-D. Received: file={source.index}, tensor={var.key!r}, "
                    f"shape={var.shape}"
                )
    return bns


def _style(kernel: _Var, bn: str, object_based: bool) -> str:
    """Which source style (and so which convention preset) a conv+BatchNorm pair follows."""
    if object_based:
        return "keras2" if "layer_with_weights-" in kernel.name else "keras3"
    if bn.rpartition("/")[2] == "BatchNorm":
        return "slim"
    return {"w": "dcgan", "kernel": "tf_v1_layers"}.get(kernel.role, "slim")


def _pair(
    source: _Source,
    variables: dict[str, _Var],
    kernels: list[_Var],
    bns: dict[str, dict[str, _Var]],
    graph: _tfgraph.Graph | None,
    pairs: Mapping[str, str],
    object_based: bool,
    notes: list[str],
) -> dict[str, tuple[str, str, str]]:
    """``{kernel name: (BatchNorm scope, reason, style)}``: explicit, graph, naming, then order.

    May mark a kernel depthwise in ``variables`` (Keras 3 names depthwise kernels ``kernel``).
    """
    chosen: dict[str, tuple[str, str, str]] = {}
    used: set[str] = set()

    def take(kernel: _Var, bn: str, reason: str) -> None:
        chosen[kernel.name] = (bn, reason, _style(kernel, bn, object_based))
        used.add(bn)

    for conv_name, bn_name in pairs.items():
        kernel = variables.get(conv_name) or _pick_kernel(
            [v for v in variables.values() if v.scope == conv_name and len(v.shape) == 4]
        )
        if kernel is None or len(kernel.shape) != 4:
            raise ConvBNError(
                "pairs must map a conv scope holding one 4-D kernel to a BatchNorm scope. "
                f"Received: pairs[{conv_name!r}] with no 4-D kernel under {conv_name!r} in {source.index}"
            )
        if bn_name not in bns:
            raise ConvBNError(
                "pairs must name a BatchNorm scope holding moving_mean and moving_variance; "
                f"the checkpoint has {sorted(bns, key=natural_key)[:8]}. "
                f"Received: pairs[{conv_name!r}]={bn_name!r}"
            )
        if bn_name in used:
            raise ConvBNError(f"pairs must give each BatchNorm one conv. Received: {bn_name!r} twice")
        take(kernel, bn_name, "explicit")

    if graph is not None:
        for kernel in kernels:
            bn = graph.bn_of.get(kernel.name)
            if kernel.name not in chosen and bn is not None and bn not in used:
                take(kernel, bn, "graph")

    auto_counts = _auto_name_counts(kernels, bns)
    for kernel in sorted(kernels, key=lambda k: natural_key(k.name)):
        if kernel.name in chosen:
            continue
        if graph is not None and (kernel.name in graph.geometry or kernel.name in graph.not_conv):
            continue  # the graph shows what this kernel feeds: no naming guess overrides it
        candidates = [
            s for s in _naming_candidates(kernel, set(bns), auto_counts)
            if s not in used and bns[s]["moving_mean"].shape == (_out_channels(kernel),)
        ]
        if len(candidates) == 1:
            take(kernel, candidates[0], "naming")

    if object_based:
        rest = [k for k in kernels if k.name not in chosen]
        for name, (bn, depthwise) in _order_pairs(rest, {s: r for s, r in bns.items() if s not in used}).items():
            if depthwise and not variables[name].depthwise:
                variables[name] = dataclasses.replace(variables[name], depthwise=True)
                width = bns[bn]["moving_mean"].shape[0]
                notes.append(f"read {name!r} as a depthwise kernel: the BatchNorm after it is {width} wide")
            take(variables[name], bn, "order")
    return chosen


def _read_vector(
    source: _Source,
    field: str,
    var: _Var | None,
    width: tuple[int, ...],
    against: str,
    arrays: dict[str, Any],
    names: dict[str, str],
) -> None:
    """Read ``var`` (if any) into ``arrays[field]`` and its key into ``names[field]``; a shape other than
    ``width`` is refused, naming the tensor and what it must match."""
    if var is None:
        return
    if var.shape != width:
        raise ConvBNError(
            f"{var.role} must have shape {width} to match {against}. Received: file={source.index}, "
            f"tensor={var.key!r}, shape={var.shape}"
        )
    arrays[field] = source.get(var.key)
    names[field] = var.key


def _check_variance(source: _Source, var: _Var, value: np.ndarray) -> None:
    bad = ~(np.isfinite(value) & (value >= 0))
    if np.any(bad):
        raise ConvBNError(
            "BatchNorm moving_variance must be finite and >= 0. Received: "
            f"file={source.data_name()}, tensor={var.key!r} with {int(bad.sum())} bad values, "
            f"e.g. {value[bad][0]!r}"
        )


def _build_layer(
    source: _Source,
    kernel_var: _Var,
    bias_var: _Var | None,
    bn: dict[str, _Var],
    geometry: dict[str, Any],
    **convention: Any,
) -> tuple[ConvBNParams, tuple[dict[str, str], dict[str, str]]]:
    kernel = source.get(kernel_var.key)
    groups = 1
    if kernel_var.depthwise:
        kh, kw, channels, multiplier = kernel.shape
        kernel = kernel.reshape(kh, kw, 1, channels * multiplier)  # output channel c*m + j, as HWIO groups
        groups = channels
    out = kernel.shape[3]
    arrays: dict[str, Any] = {}
    conv_names = {"kernel": kernel_var.key}
    bn_names: dict[str, str] = {}
    fields = [("bias", bias_var, conv_names)] + [
        (field, bn.get(role), bn_names)
        for field, role in (("gamma", "gamma"), ("beta", "beta"), ("moving_mean", "moving_mean"),
                            ("moving_var", "moving_variance"))
    ]
    for field, var, names in fields:
        _read_vector(source, field, var, (out,), f"the conv kernel {kernel_var.key!r} {kernel_var.shape}", arrays, names)
    _check_variance(source, bn["moving_variance"], arrays["moving_var"])
    try:
        params = ConvBNParams(kernel=kernel, groups=groups, **arrays, **geometry, **convention)
    except ConvBNError as exc:
        raise ConvBNError(f"{exc} (layer {kernel_var.scope!r} in {source.index})") from None
    return params, (conv_names, bn_names)


def _report(
    ckpt: Checkpoint,
    styles: dict[str, list[str]],
    graph: _tfgraph.Graph | None,
    graph_eps: list[str],
    unfused: list[str],
    kernels: list[_Var],
    chosen: Mapping[str, tuple[str, str, str]],
    bns: Mapping[str, Any],
    eps: float | None,
    momentum: float | None,
) -> None:
    notes = ckpt.notes
    if len(styles) == 1:
        ckpt.convention = _STYLE_PRESET[next(iter(styles))].name
    for style, layers in styles.items():
        preset = _STYLE_PRESET[style]
        text = (
            f"eps and momentum are not stored in a TF checkpoint: {len(layers)} layer(s) with "
            f"{_STYLE_TEXT[style]} names assume the {preset.name!r} preset (eps={preset.eps:g}, "
            f"momentum={preset.momentum:g} kept, {preset.var_update} variance update)"
        )
        if style == "dcgan":
            text += "; DCGAN's code passes epsilon=1e-5 and decay=0.9 to batch_norm explicitly"
        if style == "slim" and not any(ckpt.layers[name].gamma is not None for name in layers):
            text += "; no gamma (slim's scale=False), i.e. a scale of 1"
        notes.append(text)
    if eps is not None:
        notes.append(f"eps={eps:g} given explicitly: used for every layer")
    elif graph_eps:
        notes.append(f"eps read from the .meta graph's fused BatchNorm ops for {len(graph_eps)} layer(s)")
    if momentum is not None:
        notes.append(f"momentum={momentum:g} (fraction kept) given explicitly: used for every layer")
    if unfused:
        notes.append(f"non-fused BatchNorm in the .meta graph: biased variance update for {unfused}")
    if ckpt.layers:
        if graph is not None:
            notes.append("layer order, stride, padding and dilation read from the .meta graph")
        else:
            notes.append(
                "no .meta graph: layers in natural name order, with stride 1, SAME padding and dilation 1 "
                "(slim.conv2d's defaults; a TF checkpoint does not store them)"
            )
    reasons = collections.Counter(src.reason for src in ckpt.sources.values())
    if reasons:
        notes.append("paired by " + ", ".join(f"{r}: {n}" for r, n in reasons.items()))
    for kernel in kernels:
        if kernel.name not in chosen and kernel.name in ckpt.tensors:
            notes.append(f"conv {kernel.name!r} has no BatchNorm paired with it: kept in tensors")
    used_bns = {bn for bn, _, _ in chosen.values()}
    for scope in bns:
        if scope not in used_bns and bns[scope]["moving_mean"].name in ckpt.tensors:
            notes.append(f"BatchNorm {scope!r} follows no conv: kept in tensors")


# -- writing ---------------------------------------------------------------------------------------


def _layer_entries(ckpt: Checkpoint, *, check_bias: bool = True) -> list[tuple[str, np.ndarray]]:
    """Each layer's variables under tf-slim's names (conv weights and biases when fused)."""
    from convbn.backends.numpy import to_numpy

    entries: list[tuple[str, np.ndarray]] = []
    for layer, params in ckpt.layers.items():
        if not isinstance(layer, str) or not layer:
            raise ConvBNError(f"layer names must be non-empty strings. Received: layer={layer!r}")
        if check_bias and params.bias is not None and not ckpt.fused:
            raise ConvBNError(
                "a slim checkpoint has no conv bias: fold it into BatchNorm first "
                "(save_checkpoint(..., fold_bias='beta' or 'moving_mean'), or convbn.convert.fold_bias). "
                f"Received: layer {layer!r} with a bias"
            )
        kernel = to_numpy(params.kernel)
        kh, kw, per_group, out = kernel.shape
        if params.groups > 1 and per_group == 1:
            # Depthwise: slim's (kh, kw, C, multiplier), output channel c*m + j as in HWIO groups.
            entries.append((f"{layer}/depthwise_weights", kernel.reshape(kh, kw, params.groups, out // params.groups)))
        else:
            entries.append((f"{layer}/weights", kernel))
        if ckpt.fused:
            # What slim.conv2d without a normalizer restores: weights and biases.
            bias = np.zeros(out, kernel.dtype) if params.bias is None else to_numpy(params.bias)
            entries.append((f"{layer}/biases", bias))
            continue
        mean = to_numpy(params.moving_mean)
        if params.gamma is not None:
            entries.append((f"{layer}/BatchNorm/gamma", to_numpy(params.gamma)))
        beta = np.zeros_like(mean) if params.beta is None else to_numpy(params.beta)
        entries.append((f"{layer}/BatchNorm/beta", beta))
        entries.append((f"{layer}/BatchNorm/moving_mean", mean))
        entries.append((f"{layer}/BatchNorm/moving_variance", to_numpy(params.moving_var)))
    return entries


def _norm_entries(scope: str, norm: Norm, dtype: Any) -> list[tuple[str, np.ndarray]]:
    """A BatchNorm's variables under ``scope`` as slim.batch_norm names them (gamma iff it has one,
    beta zeros where it has none); LayerNorm and GroupNorm have beta and gamma only."""
    from convbn.backends.numpy import to_numpy

    entries = []
    if norm.gamma is not None:
        entries.append((f"{scope}/gamma", to_numpy(norm.gamma)))
    width = next(np.shape(v)[0] for v in (norm.gamma, norm.beta, norm.moving_mean) if v is not None)
    entries.append((f"{scope}/beta", np.zeros(width, dtype) if norm.beta is None else to_numpy(norm.beta)))
    if norm.kind == "batch_norm":
        entries.append((f"{scope}/moving_mean", to_numpy(norm.moving_mean)))
        entries.append((f"{scope}/moving_variance", to_numpy(norm.moving_var)))
    return entries


def _other_entries(
    ckpt: Checkpoint, notes: list[str] | None = None, *, check_bias: bool = True
) -> list[tuple[str, np.ndarray]]:
    """Every other layer under the names of the slim layer that restores it: ``slim.conv2d``,
    ``slim.conv2d_transpose`` and ``slim.fully_connected`` (``L/weights``, then ``L/biases`` or, with
    a normalizer, ``L/BatchNorm/*``), ``slim.batch_norm`` / ``layer_norm`` / ``group_norm``
    (``L/beta``, ``L/gamma``, ...). Dense layers are put in NHWC feature order first (refused while a
    flatten is undecided). A bias before a BatchNorm is refused: slim's layers with a normalizer
    have none (``save_checkpoint`` folds it first). Appends to ``notes`` what was permuted."""
    from convbn.backends.numpy import to_numpy

    ordered = ckpt.in_feature_order("hwc")
    if notes is not None:
        notes.extend(ordered.notes[len(ckpt.notes):])
    entries: list[tuple[str, np.ndarray]] = []
    for name, layer in ordered.others.items():
        if not isinstance(name, str) or not name:
            raise ConvBNError(f"layer names must be non-empty strings. Received: layer={name!r}")
        if layer.norm is not None and layer.kind in ("batch_norm", "layer_norm", "group_norm"):
            entries.extend(_norm_entries(name, layer.norm, np.float32))
            continue
        kernel = to_numpy(layer.kernel)
        if check_bias and layer.norm is not None and layer.bias is not None:
            raise ConvBNError(
                f"a slim {layer.kind} with a normalizer has no bias: fold it into the BatchNorm first "
                "(save_checkpoint does, or convbn.convert.fold_layer_bias). "
                f"Received: layer {name!r} with a bias and a BatchNorm"
            )
        if layer.kind == "conv" and layer.groups > 1 and kernel.shape[2] == 1:
            entries.append((f"{name}/depthwise_weights", depthwise_to_tf(kernel, layer.groups)))
        elif layer.kind == "conv_transpose" and layer.groups > 1:
            raise ConvBNError(
                f"slim.conv2d_transpose has no groups. Received: layer {name!r} with groups={layer.groups}"
            )
        else:
            entries.append((f"{name}/weights", kernel))
        if layer.norm is not None:
            entries.extend(_norm_entries(f"{name}/BatchNorm", layer.norm, kernel.dtype))
        elif layer.bias is not None:
            entries.append((f"{name}/biases", to_numpy(layer.bias)))
    return entries


def _slim_entries(ckpt: Checkpoint) -> list[tuple[str, np.ndarray]]:
    """Every variable to write: the layers', then the other tensors when the source is a TF
    checkpoint too (their names and layouts are TF's). Appends to ``ckpt.notes`` what is not stored."""
    from convbn.backends.numpy import to_numpy

    entries = _layer_entries(ckpt) + _other_entries(ckpt, ckpt.notes)
    grouped = {name: p.groups for name, p in ckpt.layers.items() if p.groups > 1 and np.shape(p.kernel)[2] > 1}
    if grouped:
        listed = ", ".join(f"{name} (groups={g})" for name, g in grouped.items())
        ckpt.notes.append(
            f"grouped convs written as 'L/weights' (HWIO, in_channels/groups inputs): {listed}. A TF "
            "checkpoint does not store groups and slim.conv2d has none (tf.nn.conv2d and Keras "
            "Conv2D(groups=...) use these kernels); reading this file back gives groups=1: set groups "
            "with dataclasses.replace"
        )
    if ckpt.tensors:
        if origin_format(ckpt) == NAME:
            for name, value in ckpt.tensors.items():
                if not isinstance(name, str) or not name:
                    raise ConvBNError(f"tensor names must be non-empty strings. Received: name={name!r}")
                entries.append((name, to_numpy(value)))
        else:
            ckpt.notes.append(not_written_note(ckpt))
    seen: set[str] = set()
    for name, _ in entries:
        if name in seen:
            raise ConvBNError(
                f"every variable name in a slim checkpoint must be unique. Received: {name!r} twice "
                "(a layer's variable and a tensor of the same name?)"
            )
        seen.add(name)
    return entries


def write_prefix(path: str | os.PathLike[str]) -> Path:
    """The prefix :func:`write` writes for ``path``: ``path`` itself, or without a final ``.index``."""
    target = Path(path)
    if target.name.endswith(".index"):  # the index file named instead of the prefix
        target = target.with_name(target.name[: -len(".index")])
    return target


def check_destination(ckpt: Checkpoint, path: str | os.PathLike[str]) -> None:
    """Refuse a prefix whose ``.meta`` graph does not describe ``ckpt`` as the slim writer writes it.

    A later read takes layer order, pairing, stride, padding, dilation and eps from
    ``<prefix>.meta`` when one is there. A ``.meta`` is therefore kept only when it declares every
    variable of every written layer with the same shape (e.g. the graph of the slim model the
    weights are for); one left by another checkpoint at this prefix, or one that cannot be read,
    makes the write fail before anything is written. convbn never deletes it: remove or rename it,
    or write to another prefix. :func:`write` calls this; ``convbn convert`` calls it for the final
    destination before it writes to a staging directory.

    Args:
        ckpt: the checkpoint about to be written (as ``save_checkpoint`` passes it to :func:`write`).
        path: the prefix to write, or its ``.index`` file.

    Raises:
        ConvBNError: naming the ``.meta`` file and the first variable it contradicts.

    Example:
        >>> check_destination(ckpt, "out/model.ckpt")  # doctest: +SKIP
    """
    meta = _tfgraph.meta_path(write_prefix(path))
    if not meta.is_file():
        return
    try:
        # A conv bias is folded before writing, which changes no name or shape.
        entries = _layer_entries(ckpt, check_bias=False) + _other_entries(ckpt, check_bias=False)
        shapes = [(name, tuple(np.shape(value))) for name, value in entries]
    except ConvBNError:
        return  # write() reports what is wrong with the checkpoint itself
    try:
        declared = _tfgraph.declared_shapes(_tfgraph.read_meta(meta))
    except ValueError as exc:
        problem: str | None = str(exc)
    else:
        missing = [name for name, _ in shapes if name not in declared]
        problem = _tfgraph.shape_conflict(declared, shapes) or (
            f"it declares no variable {missing[0]!r}" if missing else None
        )
    if problem is not None:
        raise ConvBNError(
            f"a .meta graph next to the prefix written must describe the new checkpoint, since later reads "
            f"take layer order, pairing, stride, padding and eps from it; {meta} does not: {problem}. "
            f"Remove or rename it, or write to another prefix. Received: path={str(path)!r}"
        )


def write(ckpt: Checkpoint, path: str | os.PathLike[str], *, max_shard_size: int | None = None) -> None:
    """Write ``ckpt`` as a tf-slim checkpoint at prefix ``path`` (``path.index`` + ``path.data-*``).

    Each layer ``L`` becomes ``L/weights`` (``L/depthwise_weights`` when depthwise),
    ``L/BatchNorm/gamma`` (only if the layer has a gamma), ``L/BatchNorm/beta`` (zeros if it has
    none), ``L/BatchNorm/moving_mean`` and ``L/BatchNorm/moving_variance``: what
    ``slim.conv2d(..., normalizer_fn=slim.batch_norm, scope=L)`` restores (pass
    ``normalizer_params={'scale': True}`` for layers with a gamma). A fused checkpoint
    (:func:`convbn.convert.fuse_checkpoint`) becomes ``L/weights`` and ``L/biases``, what
    ``slim.conv2d`` without a normalizer restores. ``ckpt.tensors`` are written under their own
    names when the checkpoint came from a TF checkpoint, and listed in ``ckpt.notes`` as not written
    otherwise (their names and layouts are another framework's). Values are written bit for bit, in
    their own dtypes. Stride, padding, dilation, groups (of a grouped, non-depthwise conv), eps and
    momentum are not part of a TF checkpoint. An existing ``path.meta`` is kept only when it
    describes the new checkpoint (see :func:`check_destination`). TensorFlow is not needed: TF's
    ``tf.train.load_checkpoint``, ``tf.compat.v1.train.Saver.restore`` and (by name)
    ``tf.train.Checkpoint.restore`` read the result.

    Args:
        ckpt: the checkpoint; its layers must have no conv bias unless it is fused.
        path: the checkpoint prefix to write (its directory must exist); a path ending in
            ``.index`` names the prefix without it.
        max_shard_size: the most bytes per data file, ``path.data-0000K-of-0000N`` (a larger
            tensor gets a file of its own), as :func:`convbn.convert.save_checkpoint` parses
            ``"500MB"`` and the like; None writes one data file.

    Raises:
        ConvBNError: for a layer with a conv bias, a name written twice, an existing directory at
            ``path``, a ``path.meta`` of another graph, or a failed write; nothing is written then.

    Example:
        >>> write(convbn.convert.Checkpoint(layers={"conv1": params}), "out/model.ckpt")  # doctest: +SKIP
    """
    target = write_prefix(path)
    if target.is_dir():
        raise ConvBNError(
            f"a TF checkpoint is written at a prefix such as 'dir/model.ckpt', not a directory. Received: path={str(path)!r}"
        )
    if not target.parent.is_dir():
        raise ConvBNError(f"the directory to write the checkpoint into must exist. Received: path={str(path)!r}")
    entries = _slim_entries(ckpt)
    if not entries:
        what = (
            f"only other tensors of a {origin_format(ckpt) or 'non-TF'} source, which are not written to slim"
            if ckpt.tensors
            else "an empty checkpoint"
        )
        raise ConvBNError(f"a checkpoint to write must hold at least one layer or tensor. Received: {what}")
    check_destination(ckpt, target)
    if _tfgraph.meta_path(target).is_file():
        ckpt.notes.append(
            f"kept {_tfgraph.meta_path(target)}: it declares every variable written, so later reads take layer "
            "order, pairing, stride, padding and eps from it"
        )
    # In name order, as TF's Saver adds them: the data file's layout then depends on the variables
    # alone, not on which of them were read as layers (a rewrite of a read file is the same bytes).
    entries.sort(key=lambda entry: entry[0])
    _tfbundle.write(target, entries, max_shard_size=max_shard_size)

