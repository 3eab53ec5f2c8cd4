"""Which model layer takes which checkpoint layer: right, or refused.

Layers are framework-neutral descriptors (:class:`Layer`: a name, a kind, a shape, other names it is
known by), optionally with the data flow between them (:class:`Graph`). :func:`match` decides, in
this order, and never past the point where the evidence runs out:

1. ``mapping``: what the user said, checked against the shapes.
2. Names that correspond: the same name on both sides once ``.``, ``/``, ``:`` and ``-`` read as
   ``_`` and case is dropped (torch ``layer1.0.conv1``, Keras ``layer1_0_conv1``, Flax
   ``layer1/0/conv1``), as they are or without the leading parts every name of that side shares
   (a TF model's ``resnet/`` before each layer), or with a part that repeats the one before left
   out (Flax's ``layer/layer_0`` for torch's ``layer.0``), with equal shapes, one layer each side. Keras's generated names
   (``conv2d_3``) count the layers of the session that built the model and are never taken as names.
3. Structure, where both graphs are known: colour refinement over both graphs at once (a layer's
   colour is its kind and shape, refined by the colours of its producers and consumers until stable;
   then by producers only and by consumers only, so that a head or stem only one side has does not
   hide the rest); a colour held by exactly one layer on each side matches the two. Residual
   branches differ by their producers (a bottleneck's ``conv3`` reads ``conv2``, its shortcut the
   block's input), not by where a graph happens to list them.
4. Order, only where it is unambiguous: among the layers of one shape still unmatched, a model
   layer whose rank in that shape's order the model's graph fixes (every other one of that shape
   is its ancestor or its descendant) takes the source layer of the same rank (fixed the same way
   by the source's graph where it has one, else the source's listing order), and only while the
   listing agrees with the model's graph on every matched layer (one inversion, and the listing is
   not a forward order: nothing is matched by order). A shape with one
   layer left on each side matches too. Layers whose rank no graph fixes (parallel branches of one
   shape; any repeated shape of a model without a graph) are **ambiguous**: never matched by a
   guess, reported with the candidates so that the caller refuses and asks for ``mapping``.

Nothing here imports a framework.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence

from convbn.errors import ConvBNError

__all__ = ["INPUT", "Ambiguity", "Flow", "Graph", "Layer", "Matching", "match", "name_key"]

#: The producer name of a layer that reads the model's input directly (``<input>1`` a second input).
INPUT = "<input>"

_GENERATED = re.compile(
    r"(conv2d|depthwise_conv2d|separable_conv2d|conv2d_transpose|batch_normalization|dense)(_\d+)?"
)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer to match.

    Attributes:
        name: its name on its side (torch module path, Keras layer name, Flax path, checkpoint key).
        kind: what it is (``"conv_bn"``); only layers of one kind match each other.
        shape: its defining shape in the neutral layout (the HWIO kernel for a conv).
        aliases: other names it is known by (a checkpoint layer's conv name in its source).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    aliases: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Graph:
    """The data flow among one side's parametric layers.

    ``producers[name]`` holds the parametric layers (or :data:`INPUT`) whose outputs reach
    ``name``'s input through parameter-free operations only (activations, padding, additions).
    Layers that are not matched (a lone conv, a dense head) may be nodes too, ``kinds[name]`` saying
    what they are: they carry structure.
    """

    producers: Mapping[str, frozenset[str]]
    kinds: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, producers: Mapping[str, Iterable[str]], matched: Iterable[str]) -> Graph:
        """A graph of ``producers``; its nodes outside ``matched`` are of kind ``"other"``."""
        names = set(matched)
        return cls({k: frozenset(v) for k, v in producers.items()}, {k: "other" for k in producers if k not in names})

    def consumers(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {n: set() for n in self.producers}
        for name, producers in self.producers.items():
            for p in producers:
                out.setdefault(p, set()).add(name)
        return out

    def ancestors(self) -> dict[str, frozenset[str]]:
        """Every layer's transitive producers."""
        memo: dict[str, frozenset[str]] = {}

        def visit(name: str, stack: frozenset[str]) -> frozenset[str]:
            if name in memo:
                return memo[name]
            found: set[str] = set()
            for p in self.producers.get(name, ()):
                if p not in stack:  # a cycle (a module called twice) adds nothing
                    found |= {p} | visit(p, stack | {name})
            memo[name] = frozenset(found)
            return memo[name]

        for name in self.producers:
            visit(name, frozenset())
        return memo


#: What a traced value carries: the graph nodes its data came from, and the nodes whose
#: parameters it was computed from without any data (a kernel, ``rsqrt(var + eps) * scale``).
State = tuple[frozenset[str], frozenset[str]]
_NONE: frozenset[str] = frozenset()


class Flow:
    """Builds a :class:`Graph` while a model's operations are replayed in order (an fx graph, a
    jaxpr, a TensorFlow graph, an eager forward pass, a Keras config).

    Each value has a :data:`State`. An operation whose inputs carry both data and a node's
    parameters belongs to that node: its producers are where the data came from, and its output
    comes from the node. Any other operation passes its inputs' states on.
    """

    #: The state of the model's input, and of a value from nothing (a constant).
    INPUT: State = (frozenset({INPUT}), _NONE)
    NOTHING: State = (_NONE, _NONE)

    def __init__(self) -> None:
        self.producers: dict[str, set[str]] = {}

    @staticmethod
    def parameter(node: str) -> State:
        """The state of a parameter (or buffer) of ``node``."""
        return _NONE, frozenset({node})

    def step(self, states: Iterable[State]) -> State:
        """The state of an operation's outputs, given its inputs'; records the producers it shows."""
        listed = list(states)
        data = frozenset().union(*(d for d, _ in listed)) if listed else _NONE
        nodes = frozenset().union(*(n for _, n in listed)) if listed else _NONE
        if not (data and nodes):
            return data, nodes
        for node in nodes:
            self.producers.setdefault(node, set()).update(data - {node})
        return nodes, _NONE

    def graph(self, matched: Iterable[str]) -> Graph:
        """The graph recorded; nodes outside ``matched`` are of kind ``"other"``."""
        return Graph.of(self.producers, matched)


@dataclasses.dataclass(frozen=True)
class Ambiguity:
    """Model layers and source layers of one shape that nothing decides between."""

    model: tuple[str, ...]
    source: tuple[str, ...]
    shape: tuple[int, ...]
    why: str

    def describe(self) -> str:
        return (
            f"model layers {', '.join(self.model)} and checkpoint layers {', '.join(self.source)} "
            f"(all {self.shape}): {self.why}"
        )


@dataclasses.dataclass
class Matching:
    """Indices into the model's and the source's layers.

    ``how`` says, per matched model index, what decided it: ``"mapping"``, ``"name"``,
    ``"structure"``, ``"order"`` or ``"shape"`` (the only layer of its shape left on each side).
    Ambiguous layers are in ``ambiguous`` only, never in ``missing`` or ``unexpected``.
    """

    matched: list[tuple[int, int]]
    mismatched: list[tuple[int, int]]
    missing: list[int]
    unexpected: list[int]
    notes: list[str]
    ambiguous: list[Ambiguity] = dataclasses.field(default_factory=list)
    how: dict[int, str] = dataclasses.field(default_factory=dict)


def _tokens(name: str) -> tuple[str, ...] | None:
    """A name's parts, lower case, split at ``.``, ``/``, ``:``, ``-`` and ``_``; None for a generated name."""
    lowered = name.strip().lower()
    last = [p for p in re.split(r"[./:\-]+", lowered) if p]
    if not last or _GENERATED.fullmatch(last[-1]):
        return None
    return tuple(p for p in re.split(r"[./:\-_]+", lowered) if p)


def name_key(name: str) -> str | None:
    """The form in which names of different frameworks correspond; None for a generated name."""
    tokens = _tokens(name)
    return None if not tokens else "_".join(tokens)


def _names(names: Iterable[str], limit: int = 12) -> str:
    listed = list(names)
    return ", ".join(listed[:limit]) + (f", ... ({len(listed) - limit} more)" if len(listed) > limit else "")


def _common_prefix(names: Sequence[tuple[str, ...]]) -> int:
    """How many leading parts every name shares (a model's own name, ``resnet/`` before every layer)."""
    if len(names) < 2:
        return 0
    n = min(len(t) for t in names) - 1  # a whole name is never a prefix to drop
    for k in range(max(n, 0)):
        if len({t[k] for t in names}) != 1:
            return k
    return max(n, 0)


def _collapsed(tokens: tuple[str, ...]) -> tuple[str, ...]:
    """``tokens`` without a part that repeats the one before: Flax names a list attribute's modules
    ``layer/layer_0`` where torch has ``layer.0``."""
    return tuple(t for k, t in enumerate(tokens) if k == 0 or t != tokens[k - 1])


def _by_names(model: Sequence[Layer], source: Sequence[Layer], free_m: set[int], free_s: set[int]) -> dict[int, int]:
    """Model layer -> source layer where a corresponding name is unique on both sides and the shapes
    agree. A name corresponds as it is, or without the leading parts all names of its side share."""

    def keys(layers: Sequence[Layer], free: set[int]) -> dict[int, set[str]]:
        tokens = {i: [t for t in map(_tokens, (layers[i].name, *sorted(layers[i].aliases))) if t] for i in free}
        drop = _common_prefix([ts[0] for ts in tokens.values() if ts])
        forms = {i: {t for full in ts for t in (full, full[drop:])} for i, ts in tokens.items()}
        return {i: {"_".join(t) for t in ts} | {"_".join(_collapsed(t)) for t in ts} for i, ts in forms.items()}

    m_keys, s_keys = keys(model, free_m), keys(source, free_s)
    m_count: dict[str, int] = {}
    s_count: dict[str, int] = {}
    for ks, count in ((m_keys, m_count), (s_keys, s_count)):
        for k in (k for group in ks.values() for k in group):
            count[k] = count.get(k, 0) + 1
    s_by_key: dict[str, int] = {k: j for j, ks in s_keys.items() for k in ks if s_count[k] == 1}
    candidates: dict[int, set[int]] = {
        i: {s_by_key[k] for k in ks if m_count[k] == 1 and k in s_by_key} for i, ks in m_keys.items()
    }
    claimed: dict[int, set[int]] = {}
    for i, js in candidates.items():
        for j in js:
            claimed.setdefault(j, set()).add(i)
    out: dict[int, int] = {}
    for i, js in sorted(candidates.items()):
        if len(js) == 1:
            j = next(iter(js))
            if claimed[j] == {i} and source[j].kind == model[i].kind and source[j].shape == model[i].shape:
                out[i] = j
    return out


def _refine(
    model: Sequence[Layer],
    m_graph: Graph,
    source: Sequence[Layer],
    s_graph: Graph,
    fixed: Mapping[int, int],
    directions: tuple[bool, bool],
) -> tuple[dict[str, int], dict[str, int]]:
    """Stable colours of every node of both graphs, refined jointly (same colour, same role).

    ``directions``: whether producers, and whether consumers, refine the colours.
    """
    m_layers = {layer.name: layer for layer in model}
    s_layers = {layer.name: layer for layer in source}
    m_fixed = {model[i].name: k for k, i in enumerate(fixed)}
    s_fixed = {source[j].name: k for k, j in enumerate(fixed.values())}

    def initial(name: str, layers: Mapping[str, Layer], graph: Graph, pinned: Mapping[str, int]) -> tuple[object, ...]:
        if name in pinned:
            return ("pinned", pinned[name])
        if name.startswith(INPUT):
            return ("input", name)
        layer = layers.get(name)
        if layer is not None:
            return ("layer", layer.kind, layer.shape)
        return ("other", graph.kinds.get(name, ""))

    def nodes(graph: Graph) -> set[str]:
        return set(graph.producers) | {p for ps in graph.producers.values() for p in ps}

    sides = [
        (m_graph, m_graph.consumers(), {n: initial(n, m_layers, m_graph, m_fixed) for n in nodes(m_graph)}),
        (s_graph, s_graph.consumers(), {n: initial(n, s_layers, s_graph, s_fixed) for n in nodes(s_graph)}),
    ]
    table: dict[object, int] = {}
    colours = [{n: table.setdefault(sig, len(table)) for n, sig in signature.items()} for _, _, signature in sides]
    classes = len(table)
    up, down = directions
    while True:
        table = {}
        colours = [
            {
                n: table.setdefault((
                    colour[n],
                    tuple(sorted(colour[p] for p in graph.producers.get(n, ()))) if up else (),
                    tuple(sorted(colour[c] for c in consumers.get(n, ()))) if down else (),
                ), len(table))
                for n in colour
            }
            for (graph, consumers, _), colour in zip(sides, colours, strict=True)
        ]
        if len(table) == classes:  # refining only splits classes: no new class, stable
            return colours[0], colours[1]
        classes = len(table)


def _fixed_ranks(names: Sequence[str], ancestors: Mapping[str, frozenset[str]] | None) -> dict[str, int]:
    """The rank among ``names`` that every execution order gives a name, for names whose rank is fixed."""
    if ancestors is None:
        return {}
    out: dict[str, int] = {}
    members = set(names)
    for name in names:
        before = ancestors.get(name, frozenset()) & members
        after = {o for o in members if name in ancestors.get(o, frozenset())}
        if len(before) + len(after) == len(members) - 1:
            out[name] = len(before)
    return out


def _inversion(
    model: Sequence[Layer],
    source: Sequence[Layer],
    pairs: Mapping[int, int],
    m_anc: Mapping[str, frozenset[str]] | None,
    s_anc: Mapping[str, frozenset[str]] | None,
) -> str | None:
    """Two matched layers the model's graph puts one way and the source (its graph, else its listing)
    the other way round, described; None when there is none."""
    if m_anc is None:
        return None
    for i1, j1 in pairs.items():
        before = m_anc.get(model[i1].name, frozenset())
        for i2, j2 in pairs.items():
            if model[i2].name not in before:
                continue
            # model[i2] runs before model[i1]: the source's j2 must not come after j1
            later = j2 > j1 if s_anc is None else source[j1].name in s_anc.get(source[j2].name, frozenset())
            if later:
                return (f"{model[i2].name} runs before {model[i1].name}, but {source[j2].name} comes after "
                        f"{source[j1].name}")
    return None


def _increasing(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The longest run of ``pairs`` (sorted by the first index) whose second index increases too."""
    best: list[list[tuple[int, int]]] = []
    for pair in pairs:
        chains = [c for c in best if c[-1][1] < pair[1]]
        best.append([*max(chains, key=len, default=[]), pair])
    return max(best, key=len, default=[])


def match(
    model: Sequence[Layer],
    source: Sequence[Layer],
    *,
    model_graph: Graph | None = None,
    source_graph: Graph | None = None,
    mapping: Mapping[str, str] | None = None,
) -> Matching:
    """Match ``model``'s layers to ``source``'s (each in its own listing order); see the module docstring.

    Args:
        model: the model's layers, in its order.
        source: the checkpoint's (or source model's) layers, in its order.
        model_graph: the model's data flow, where known.
        source_graph: the source's data flow, where known.
        mapping: model layer name -> source layer name (or one of its aliases), decided by the user.

    Returns:
        A :class:`Matching`.

    Raises:
        ConvBNError: ``mapping`` names a layer neither side has, or one source layer twice.
    """
    notes: list[str] = []
    free_m, free_s = set(range(len(model))), set(range(len(source)))
    matched: dict[int, int] = {}
    how: dict[int, str] = {}
    mismatched: list[tuple[int, int]] = []

    def take(pairs: Mapping[int, int], reason: str) -> None:
        for i, j in pairs.items():
            matched[i] = j
            how[i] = reason
            free_m.discard(i)
            free_s.discard(j)

    if mapping:
        m_index = {layer.name: i for i, layer in enumerate(model)}
        s_index = {name: j for j, layer in enumerate(source) for name in (*layer.aliases, layer.name)}
        unknown = [f"model layer {k!r}" for k in mapping if k not in m_index]
        unknown += [f"checkpoint layer {v!r}" for v in mapping.values() if v not in s_index]
        if unknown:
            raise ConvBNError(
                f"mapping names {', '.join(unknown)}, which that side does not have. The model's layers are "
                f"{_names(m.name for m in model)}; the checkpoint's {_names(s.name for s in source)}"
            )
        taken = [s_index[v] for v in mapping.values()]
        twice = sorted({source[j].name for j in taken if taken.count(j) > 1})
        if twice:
            raise ConvBNError(f"mapping gives checkpoint layer(s) {', '.join(twice)} to more than one model layer")
        explicit: dict[int, int] = {}
        for m_name, s_name in mapping.items():
            i, j = m_index[m_name], s_index[s_name]
            if model[i].shape != source[j].shape or model[i].kind != source[j].kind:
                mismatched.append((i, j))
                free_m.discard(i)
                free_s.discard(j)
            else:
                explicit[i] = j
        take(explicit, "mapping")

    take(_by_names(model, source, free_m, free_s), "name")

    if model_graph is not None and source_graph is not None:
        for directions in ((True, True), (True, False), (False, True)):
            while True:
                m_colour, s_colour = _refine(model, model_graph, source, source_graph, matched, directions)
                by_colour: dict[int, tuple[list[int], list[int]]] = {}
                for i in free_m:
                    if model[i].name in m_colour:
                        by_colour.setdefault(m_colour[model[i].name], ([], []))[0].append(i)
                for j in free_s:
                    if source[j].name in s_colour:
                        by_colour.setdefault(s_colour[source[j].name], ([], []))[1].append(j)
                found = {
                    ms[0]: ss[0]
                    for ms, ss in by_colour.values()
                    if len(ms) == 1 and len(ss) == 1
                    and model[ms[0]].shape == source[ss[0]].shape and model[ms[0]].kind == source[ss[0]].kind
                }
                if not found:
                    break
                take(found, "structure")

    m_anc = model_graph.ancestors() if model_graph is not None else None
    s_anc = source_graph.ancestors() if source_graph is not None else None
    ambiguous: list[Ambiguity] = []
    groups: dict[tuple[str, tuple[int, ...]], tuple[list[int], list[int]]] = {}
    for i in sorted(free_m):
        groups.setdefault((model[i].kind, model[i].shape), ([], []))[0].append(i)
    for j in sorted(free_s):
        groups.setdefault((source[j].kind, source[j].shape), ([], []))[1].append(j)
    undecided_m: set[int] = set()
    undecided_s: set[int] = set()
    ordered: list[tuple[tuple[int, ...], list[int], list[int], dict[int, int]]] = []
    for (_, shape), (ms, ss) in groups.items():
        if not ms or not ss:
            continue
        if len(ms) == 1 and len(ss) == 1:
            take({ms[0]: ss[0]}, "shape")
            continue
        if len(ms) != len(ss):
            ambiguous.append(Ambiguity(
                tuple(model[i].name for i in ms), tuple(source[j].name for j in ss), shape,
                f"{len(ms)} in the model, {len(ss)} in the checkpoint, and which are absent cannot be told",
            ))
            undecided_m.update(ms)
            undecided_s.update(ss)
            continue
        m_rank = _fixed_ranks([model[i].name for i in ms], m_anc)
        s_names = [source[j].name for j in ss]
        # The source's listing order is trusted only at ranks the model's graph fixes.
        s_rank = _fixed_ranks(s_names, s_anc) if s_anc is not None else {n: k for k, n in enumerate(s_names)}
        rank_to_s = {r: ss[s_names.index(n)] for n, r in s_rank.items()}
        by_order = {
            i: rank_to_s[m_rank[model[i].name]]
            for i in ms if model[i].name in m_rank and m_rank[model[i].name] in rank_to_s
        }
        ordered.append((shape, ms, ss, by_order))
    # The listing is a forward order only if it agrees with the model's graph wherever both place
    # two matched layers; one inversion, and no order is trusted.
    inversion = _inversion(model, source, {**matched, **{i: j for *_, o in ordered for i, j in o.items()}},
                           m_anc, s_anc)
    for shape, ms, ss, by_order in ordered:
        if inversion is None:
            take(by_order, "order")
        else:
            by_order = {}
        rest_m = [i for i in ms if i not in by_order]
        rest_s = [j for j in ss if j not in by_order.values()]
        if rest_m or rest_s:
            why = (
                "the model's graph is unknown, so nothing orders them" if m_anc is None
                else f"the checkpoint's order contradicts the model's graph ({inversion}), so it orders nothing"
                if inversion is not None
                else "they sit on parallel branches, and neither names nor the graphs tell them apart"
            )
            ambiguous.append(Ambiguity(
                tuple(model[i].name for i in rest_m), tuple(source[j].name for j in rest_s), shape, why
            ))
            undecided_m.update(rest_m)
            undecided_s.update(rest_s)

    left_m = sorted(free_m - undecided_m)
    left_s = sorted(free_s - undecided_s)
    anchors = sorted(matched.items())
    in_order = _increasing(anchors)

    def place(index: int, side: int) -> int:
        return sum(1 for anchor in in_order if anchor[side] < index)

    for gap in sorted({place(i, 0) for i in left_m}):
        ts = [i for i in left_m if place(i, 0) == gap]
        ls = [j for j in left_s if place(j, 1) == gap]
        for kind in dict.fromkeys(model[i].kind for i in ts):  # a layer only mismatches one of its kind
            mismatched += zip((i for i in ts if model[i].kind == kind), (j for j in ls if source[j].kind == kind),
                              strict=False)
    moved = [(i, j) for i, j in anchors if (i, j) not in in_order]
    if moved:
        notes.append(
            "matched out of order (the listing order differs): "
            + ", ".join(f"{model[i].name} <- {source[j].name} (by {how[i]})" for i, j in moved)
        )
    return Matching(
        matched=anchors,
        mismatched=mismatched,
        missing=[i for i in left_m if i not in {a for a, _ in mismatched}],
        unexpected=[j for j in left_s if j not in {b for _, b in mismatched}],
        notes=notes,
        ambiguous=ambiguous,
        how=how,
    )
