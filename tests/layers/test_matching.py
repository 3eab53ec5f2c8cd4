"""load_into matches layers rightly or refuses: the swap case, and a small ResNet across frameworks.

The models are tests/layers/resnet_models.py's: a bottleneck whose ``conv3`` and shortcut have the
same kernel shape, listed in a different order by each framework, and a small ResNet around it.
Every test compares eval outputs of the loaded model with the source's.

Tolerance: every framework computes in float32 and the values pass through unconverted; over the
six live directions below max|y - y_source| / max|y_source| measured 2.45e-7 (``python -m
tests.layers.test_matching`` remeasures). 1e-5, the bound of tests/layers/test_load_into.py, is
kept; a swapped conv3/shortcut gives 0.1 to 1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn.loading import LoadError
from convbn.loading.matching import INPUT, Graph, Layer, match
from tests._support.assertions import rel_err
from tests.layers import resnet_models as rm

TOL = 1e-5
SWAP = (1, 1, 8, 32)  # b2_conv3 and b2_down


def _torch_file(model: Any, path: Path) -> Path:
    import torch

    torch.save(model.state_dict(), path)
    return path


def _old_order_and_shape(model: list[tuple[str, tuple[int, ...]]], ckpt: list[tuple[str, tuple[int, ...]]]) -> dict[str, str]:
    """The rule load_into used before: the k-th model layer of a kernel shape takes the k-th
    checkpoint layer of that shape, each side in its own listing order."""
    out = {}
    for name, shape in model:
        k = [n for n, s in model if s == shape].index(name)
        out[name] = [n for n, s in ckpt if s == shape][k]
    return out


# -- the swap case -----------------------------------------------------------------------------------


@pytest.mark.needs("torch", "keras")
def test_swap_case_live_torch_into_keras_and_back_is_exact():
    source = rm.torch_build(block=True)
    x = rm.x_input(block=True)
    y = rm.torch_run(source, x)
    keras_model = rm.keras_build(block=True, names="_k")
    assert rel_err(rm.keras_run(keras_model, x), y) > 0.1

    report = convbn.load_into(keras_model, source, example_input=x)

    assert report.ok and report.matched["b2_conv3_k"] == "b2_conv3" and report.matched["b2_down_k"] == "b2_down"
    assert report.how["b2_conv3_k"] == "structure" and report.output_error is not None
    assert rel_err(rm.keras_run(keras_model, x), y) <= TOL and report.output_error <= TOL

    back = rm.torch_build(block=True, seed=5)
    assert rel_err(rm.torch_run(back, x), y) > 0.1
    report = convbn.load_into(back, keras_model, example_input=x)
    assert report.ok and report.matched["b2_conv3"] == "b2_conv3_k" and report.matched["b2_down"] == "b2_down_k"
    assert rel_err(rm.torch_run(back, x), y) <= TOL


@pytest.mark.needs("torch", "keras")
def test_swap_case_from_a_torch_file_is_refused_naming_the_ambiguity(tmp_path):
    """A torch state file has no graph: which same-shaped layer is the shortcut is a guess, refused
    with nothing changed; mapping= decides, and the outputs then agree."""
    source = rm.torch_build(block=True)
    path = _torch_file(source, tmp_path / "torch_state.pt")
    x = rm.x_input(block=True)
    keras_model = rm.keras_build(block=True, names="_k")
    before = [w.copy() for w in keras_model.get_weights()]

    with pytest.raises(LoadError) as info:
        convbn.load_into(keras_model, path)

    first = str(info.value).splitlines()[0]
    for name in ("b2_conv3_k", "b2_down_k", "b2_conv3", "b2_down", "mapping="):
        assert name in first
    assert info.value.report.ambiguous and not info.value.report.loaded
    assert all(np.array_equal(a, b) for a, b in zip(before, keras_model.get_weights(), strict=True))

    report = convbn.load_into(keras_model, path, strict=False)  # loads what is decided, never the guess
    assert not report.ok and "b2_conv3_k" not in report.matched and len(report.matched) == 2

    report = convbn.load_into(keras_model, path, mapping={"b2_conv3_k": "b2_conv3", "b2_down_k": "b2_down"},
                              example_input=x, expected_output=rm.torch_run(source, x))
    assert report.ok and report.how["b2_down_k"] == "mapping"
    assert rel_err(rm.keras_run(keras_model, x), rm.torch_run(source, x)) <= TOL


@pytest.mark.needs("torch", "keras")
def test_the_old_order_and_shape_rule_swaps_the_bottleneck(tmp_path):
    """What the old matcher did with this case: conv3 <- the shortcut and back, outputs wrong."""
    source = rm.torch_build(block=True)
    path = _torch_file(source, tmp_path / "torch_state.pt")
    ckpt = convbn.load_checkpoint(path)
    keras_model = rm.keras_build(block=True, names="_k")
    found = __import__("convbn.loading._keras", fromlist=["find_pairs"]).find_pairs(keras_model)
    model_layers = [(t.name, tuple(t.kernel_shape)) for t in found.targets]
    ckpt_layers = [(k, tuple(np.shape(p.kernel))) for k, p in ckpt.layers.items()]
    old = _old_order_and_shape(model_layers, ckpt_layers)
    assert old["b2_conv3_k"] == "b2_down" and old["b2_down_k"] == "b2_conv3"

    # the old assignment, loaded: the outputs differ from the source's
    wrong = convbn.load_into(keras_model, path, mapping=old)
    assert wrong.ok  # a mapping is what the user said: loaded as said
    x = rm.x_input(block=True)
    assert rel_err(rm.keras_run(keras_model, x), rm.torch_run(source, x)) > 0.05
    # the same assignment is caught by example_input: refused, and the model restored as it was
    weights = [w.copy() for w in keras_model.get_weights()]
    with pytest.raises(LoadError, match="output on example_input differs"):
        convbn.load_into(rm.keras_build(block=True, names="_k"), source, mapping=old, example_input=x)
    assert all(np.array_equal(a, b) for a, b in zip(weights, keras_model.get_weights(), strict=True))


@pytest.mark.needs("torch", "keras")
def test_a_failing_example_check_restores_the_model(tmp_path):
    source = rm.torch_build(block=True)
    x = rm.x_input(block=True)
    target = rm.keras_build(block=True, names="_k")
    old = {"b2_conv3_k": "b2_down", "b2_down_k": "b2_conv3"}
    before = [w.copy() for w in target.get_weights()]
    with pytest.raises(LoadError, match="restored"):
        convbn.load_into(target, source, mapping=old, example_input=x)
    assert all(np.array_equal(a, b) for a, b in zip(before, target.get_weights(), strict=True))
    report = convbn.load_into(target, source, mapping=old, example_input=x, strict=False)
    assert not report.ok and report.output_error > 0.05


def _tf_keras_block() -> Any:
    """The bottleneck as a tf_keras (Keras 2) functional model, names suffixed ``_t``."""
    import tf_keras

    L = tf_keras.layers

    def cbr(key: str, x: Any, relu: bool = True) -> Any:
        k, _, cout, stride, pad = rm.LAYERS[key]
        if pad:
            x = L.ZeroPadding2D(pad)(x)
        x = L.Conv2D(cout, k, strides=stride, use_bias=False, name=f"{key}_t")(x)
        x = L.BatchNormalization(epsilon=rm.EPS, name=f"{key}_bn_t")(x)
        return L.ReLU()(x) if relu else x

    inp = tf_keras.Input(rm.BLOCK_X_SHAPE[1:])
    h = cbr("b2_conv3", cbr("b2_conv2", cbr("b2_conv1", inp)), relu=False)
    return tf_keras.Model(inp, L.ReLU()(L.Add()([h, cbr("b2_down", inp, relu=False)])))


@pytest.mark.needs("torch", "tf_keras")
def test_swap_case_live_torch_and_tf_keras_both_ways():
    source = rm.torch_build(block=True)
    x = rm.x_input(block=True)
    y = rm.torch_run(source, x)
    model = _tf_keras_block()
    report = convbn.load_into(model, source, example_input=x)
    assert report.ok and report.matched["b2_down_t"] == "b2_down" and report.output_error <= TOL
    assert rel_err(model(x, training=False).numpy(), y) <= TOL
    back = rm.torch_build(block=True, seed=4)
    report = convbn.load_into(back, model, example_input=x)
    assert report.ok and report.matched["b2_conv3"] == "b2_conv3_t" and report.output_error <= TOL
    assert rel_err(rm.torch_run(back, x), y) <= TOL


@pytest.mark.needs("torch", "keras", "h5py")
def test_a_keras_archive_records_its_graph_so_the_swap_case_matches_by_structure(tmp_path):
    """A .keras file's config.json says which layer feeds which: against it, the torch model's
    conv3 and shortcut are told apart although no name corresponds; a .weights.h5 of the same
    model records no graph and is refused."""
    source = rm.torch_build(block=True)
    x = rm.x_input(block=True)
    y = rm.torch_run(source, x)
    keras_model = rm.keras_build(block=True, names="_k")
    convbn.load_into(keras_model, source)
    keras_model.save(tmp_path / "block.keras")
    keras_model.save_weights(tmp_path / "block.weights.h5")

    target = rm.torch_build(block=True, seed=9)
    report = convbn.load_into(target, tmp_path / "block.keras", example_input=x, expected_output=y)
    assert report.ok and report.matched["b2_conv3"] == "b2_conv3_k" and report.matched["b2_down"] == "b2_down_k"
    assert report.how["b2_down"] == "structure" and report.output_error <= TOL
    assert rel_err(rm.torch_run(target, x), y) <= TOL
    with pytest.raises(LoadError, match="model layers b2_down, b2_conv3 .*parallel branches"):
        convbn.load_into(rm.torch_build(block=True, seed=9), tmp_path / "block.weights.h5")


@pytest.mark.needs("torch", "keras")
def test_a_torch_model_fx_cannot_trace_gets_its_graph_from_a_forward_pass():
    """Data-dependent control flow stops torch.fx; one eval forward under a TorchFunctionMode still
    gives the data flow, so the swap case aligns with a live Keras source by structure."""
    from torch import nn

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = rm.torch_build(seed=8)

        def forward(self, x):
            return self.net(x) if x.sum() > -1e9 else self.net(-x)  # torch.fx cannot trace the branch

    x = rm.x_input()
    source = rm.keras_build(names=None)  # Keras's generated names: nothing corresponds
    convbn.load_into(source, rm.torch_build(seed=3))
    y = rm.keras_run(source, x)
    for example in (None, x):
        model = Branchy().eval()
        report = convbn.load_into(model, source, example_input=example)
        assert report.ok and report.pairing == "module order" and set(report.how.values()) == {"structure"}
        assert any("traced from one forward pass" in n for n in report.notes)
        assert rel_err(rm.torch_run(model, x), y) <= TOL
        assert model.training is False and model.net.training is False


@pytest.mark.needs("torch", "tensorflow", "tf_keras", "transformers")
def test_transformers_tf_resnet_graph_aligns_with_the_torch_one_by_structure_alone():
    """TFResNetModel is a subclassed tf_keras model called with a dict: its call is traced on the
    input Keras recorded, and with every name made to differ its pairs still align with torch's
    ResNetModel by the two graphs, its repeated shapes included."""
    import torch
    from transformers import ResNetConfig, ResNetModel, TFResNetModel

    from convbn.loading import _keras, _torch

    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1],
                          layer_type="bottleneck", reduction=4)
    torch.manual_seed(0)
    source = ResNetModel(config).eval()
    model = TFResNetModel(config)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    model(x)
    t, k = _torch.find_pairs(source), _keras.find_pairs(model)
    assert t.graph is not None and k.graph is not None
    renamed = {n: f"n{i}" for i, n in enumerate(t.graph.producers)}

    def rename(n: str) -> str:
        return renamed.get(n, n)

    source_layers = [Layer(rename(p.name), "conv_bn", tuple(p.kernel_shape)) for p in reversed(t.targets)]
    graph = Graph({rename(a): frozenset(map(rename, b)) for a, b in t.graph.producers.items()},
                  {rename(a): v for a, v in t.graph.kinds.items()})
    layers = [Layer(p.name, "conv_bn", tuple(p.kernel_shape)) for p in k.targets]
    shapes = [la.shape for la in layers]
    assert any(shapes.count(s) > 1 for s in shapes)  # repeated shapes: shape alone cannot decide
    m = match(layers, source_layers, model_graph=k.graph, source_graph=graph)
    assert not m.ambiguous and len(m.matched) == len(layers) == len(source_layers)
    back = {v: n for n, v in renamed.items()}
    for i, j in m.matched:  # the TF name is torch's under resnet/, with / for .
        ours = layers[i].name.split("/", 1)[1].replace("/", ".")
        assert back[source_layers[j].name] == ours

    report = convbn.load_into(model, source)
    with torch.no_grad():
        expected = source(torch.from_numpy(x)).last_hidden_state.numpy()
    assert report.ok and rel_err(model(x, training=False).last_hidden_state.numpy(), expected) <= TOL


def test_example_input_with_a_file_needs_the_expected_output(tmp_path):
    with pytest.raises(convbn.ConvBNError, match="needs expected_output="):
        convbn.load_into({"params": {}}, tmp_path / "x.pt", example_input=np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(convbn.ConvBNError, match="expected_output= needs example_input="):
        convbn.load_into({"params": {}}, tmp_path / "x.pt", expected_output=np.zeros(3))


# -- the matcher on descriptors ----------------------------------------------------------------------


def _bottleneck(order: list[str], tag: str) -> tuple[list[Layer], Graph]:
    """The bottleneck's layers named ``conv1_<tag>``... (names that do not correspond across tags)."""
    shapes = {"conv1": (1, 1, 8, 8), "conv2": (3, 3, 8, 8), "conv3": SWAP, "down": SWAP}
    producers = {"conv1": {INPUT}, "conv2": {"conv1"}, "conv3": {"conv2"}, "down": {INPUT}}
    layers = [Layer(f"{n}_{tag}", "conv_bn", shapes[n]) for n in order]
    return layers, Graph({f"{n}_{tag}": frozenset(f"{p}_{tag}" if p != INPUT else p for p in ps)
                          for n, ps in producers.items()})


def test_structure_tells_the_branches_apart_in_any_listing_order():
    model, m_graph = _bottleneck(["conv1", "conv2", "down", "conv3"], "m")
    source, s_graph = _bottleneck(["down", "conv1", "conv2", "conv3"], "s")
    m = match(model, source, model_graph=m_graph, source_graph=s_graph)
    got = {model[i].name: source[j].name for i, j in m.matched}
    assert got == {"conv1_m": "conv1_s", "conv2_m": "conv2_s", "conv3_m": "conv3_s", "down_m": "down_s"}
    assert not m.ambiguous and set(m.how.values()) == {"structure"}


def test_without_the_sources_graph_parallel_same_shapes_are_ambiguous_and_a_chain_is_not():
    model, m_graph = _bottleneck(["conv1", "conv2", "down", "conv3"], "m")
    source, _ = _bottleneck(["conv1", "conv2", "conv3", "down"], "s")
    m = match(model, source, model_graph=m_graph)
    assert [(a.model, a.source) for a in m.ambiguous] == [(("down_m", "conv3_m"), ("conv3_s", "down_s"))]
    assert {model[i].name for i, _ in m.matched} == {"conv1_m", "conv2_m"}
    # two same-shaped convs in a chain: the model's graph fixes their ranks, the file's order follows
    a, b = (Layer(n, "conv_bn", SWAP) for n in ("a", "b"))
    chain = Graph({"a": frozenset({INPUT}), "b": frozenset({"a"})})
    m = match([a, b], [Layer("x", "conv_bn", SWAP), Layer("y", "conv_bn", SWAP)], model_graph=chain)
    assert m.matched == [(0, 0), (1, 1)] and set(m.how.values()) == {"order"} and not m.ambiguous


def test_a_listing_the_models_graph_contradicts_orders_nothing():
    """A checkpoint listed backwards (its stem last) is no forward order: its same-shaped chain is
    refused, not matched in reverse."""
    stem = (3, 3, 3, 8)
    layers = [Layer("stem", "conv_bn", stem), Layer("a", "conv_bn", SWAP), Layer("b", "conv_bn", SWAP)]
    chain = Graph({"stem": frozenset({INPUT}), "a": frozenset({"stem"}), "b": frozenset({"a"})})
    forward = [Layer("s0", "conv_bn", stem), Layer("x", "conv_bn", SWAP), Layer("y", "conv_bn", SWAP)]
    assert match(layers, forward, model_graph=chain).matched == [(0, 0), (1, 1), (2, 2)]
    m = match(layers, forward[::-1], model_graph=chain)
    assert m.matched == [(0, 2)] and m.how == {0: "shape"}
    assert [(a.model, a.source) for a in m.ambiguous] == [(("a", "b"), ("y", "x"))]
    assert "contradicts the model's graph (stem runs before a, but s0 comes after y)" in m.ambiguous[0].why


def test_names_correspond_across_frameworks_but_generated_keras_names_do_not():
    s = [Layer("layer1.0.conv3", "conv_bn", SWAP), Layer("layer1.0.downsample.0", "conv_bn", SWAP)]
    m = match([Layer("layer1_0_downsample_0", "conv_bn", SWAP), Layer("layer1/0/conv3", "conv_bn", SWAP)], s)
    assert m.matched == [(0, 1), (1, 0)] and set(m.how.values()) == {"name"}
    generated = [Layer("conv2d_1", "conv_bn", SWAP), Layer("conv2d", "conv_bn", SWAP)]
    m = match(generated, [Layer("conv2d", "conv_bn", SWAP), Layer("conv2d_1", "conv_bn", SWAP)])
    assert m.matched == [] and len(m.ambiguous) == 1


def test_names_correspond_without_a_prefix_every_name_shares_and_with_flax_list_names():
    """transformers' TF ResNet puts ``resnet/`` before every layer, and its Flax port names list items
    ``layer/layer_0``: both correspond to torch's ``encoder.stages.0.layer.0``."""
    torch_names = ["encoder.stages.0.layer.0.convolution", "encoder.stages.0.layer.1.convolution"]
    s = [Layer(n, "conv_bn", SWAP) for n in torch_names]
    tf = [Layer(f"resnet/{n.replace('.', '/')}", "conv_bn", SWAP) for n in reversed(torch_names)]
    m = match(tf, s)
    assert m.matched == [(0, 1), (1, 0)] and set(m.how.values()) == {"name"}
    flax = [Layer(f"encoder/stages/0/layer/layer_{k}/convolution", "conv_bn", SWAP) for k in (1, 0)]
    m = match(flax, s)
    assert m.matched == [(0, 1), (1, 0)] and set(m.how.values()) == {"name"}
    # a prefix only the model's one layer has is no common prefix: nothing dropped, nothing matched
    m = match([Layer("resnet/encoder/stages/0/layer/0/convolution", "conv_bn", SWAP)],
              [Layer("encoder.stages.0.layer.1.convolution", "conv_bn", SWAP)])
    assert m.how == {0: "shape"}


def test_a_bad_mapping_is_refused_in_one_line():
    layers = [Layer("a", "conv_bn", SWAP)]
    with pytest.raises(convbn.ConvBNError, match="mapping names model layer 'nope'"):
        match(layers, layers, mapping={"nope": "a"})
    with pytest.raises(convbn.ConvBNError, match="more than one model layer"):
        match([*layers, Layer("b", "conv_bn", SWAP)], layers, mapping={"a": "a", "b": "a"})
    m = match(layers, [Layer("c", "conv_bn", (3, 3, 8, 32))], mapping={"a": "c"})
    assert m.mismatched == [(0, 0)] and m.matched == []


# -- a small ResNet, torch <-> Keras <-> Flax --------------------------------------------------------

BUILD = {
    "torch": lambda names: rm.torch_build(seed=11),
    "keras": lambda names: rm.keras_build(names=names),
    "flax": lambda names: rm.flax_build(names=names),
}
RUN = {"torch": rm.torch_run, "keras": rm.keras_run, "flax": rm.flax_run}
NEEDS = {"torch": ("torch",), "keras": ("keras",), "flax": ("flax",)}
LIVE = [(s, t) for s in RUN for t in RUN if s != t]


@dataclasses.dataclass
class _Source:
    model: Any
    y: np.ndarray


def _source(framework: str, x: np.ndarray, names: str | None = "") -> _Source:
    """A source model holding values of its own (the torch ones, loaded by mapping-free names)."""
    torch_model = rm.torch_build(seed=3)
    if framework == "torch":
        return _Source(torch_model, rm.torch_run(torch_model, x))
    model = BUILD[framework]("")
    report = convbn.load_into(model, torch_model)
    if framework == "flax":
        model = (model[0], report.variables)
    return _Source(model, RUN[framework](model, x))


def _loaded(framework: str, model: Any, report: Any) -> Any:
    return (model[0], report.variables) if framework == "flax" else model


@pytest.mark.parametrize(("source", "target"), LIVE, ids=[f"{s}-to-{t}" for s, t in LIVE])
def test_small_resnet_live_source_to_another_framework(source, target):
    """Live models on both sides: the graphs align, whatever the names (Keras's and Flax's are
    generated here)."""
    from tests.conftest import need

    need(*NEEDS[source], *NEEDS[target])
    x = rm.x_input()
    src = _source(source, x)
    model = BUILD[target](None)
    assert rel_err(RUN[target](model, x), src.y) > 0.1
    report = convbn.load_into(model, src.model, example_input=x)
    assert report.ok and len(report.matched) == len(rm.LAYERS) and not report.ambiguous
    assert report.output_error is not None and report.output_error <= TOL
    assert rel_err(RUN[target](_loaded(target, model, report), x), src.y) <= TOL


FILES = [("torch", "keras"), ("torch", "flax"), ("keras", "torch"), ("flax", "torch"), ("keras", "flax")]


def _save(framework: str, model: Any, directory: Path) -> Path:
    if framework == "torch":
        return _torch_file(model, directory / "src.pt")
    if framework == "keras":
        path = directory / "src.weights.h5"
        model.save_weights(path)
        return path
    from flax import serialization

    path = directory / "src.msgpack"
    path.write_bytes(serialization.to_bytes(model[1]))
    return path


@pytest.mark.parametrize(("source", "target"), FILES, ids=[f"{s}-to-{t}" for s, t in FILES])
def test_small_resnet_from_a_file_matches_by_names_or_refuses(source, target, tmp_path):
    """From a file (no graph): names that correspond decide every layer; with names that do not,
    the same-shaped layers are refused, never guessed."""
    from tests.conftest import need

    need(*NEEDS[source], *NEEDS[target], *(("h5py",) if "keras" in (source, target) else ()))
    x = rm.x_input()
    src = _source(source, x)
    path = _save(source, src.model, tmp_path)
    model = BUILD[target]("")
    report = convbn.load_into(model, path)
    assert report.ok and set(report.how.values()) <= {"name", "shape"}
    assert rel_err(RUN[target](_loaded(target, model, report), x), src.y) <= TOL
    if target != "torch":
        with pytest.raises(LoadError, match="b2_conv3.*b2_down|b2_down.*b2_conv3"):
            convbn.load_into(BUILD[target](None), path)


def _measure() -> float:
    """The worst relative output error over the live directions (the number the tolerance is based on)."""
    x = rm.x_input()
    worst = 0.0
    for source, target in LIVE:
        src = _source(source, x)
        model = BUILD[target](None)
        report = convbn.load_into(model, src.model)
        worst = max(worst, rel_err(RUN[target](_loaded(target, model, report), x), src.y))
    return worst


if __name__ == "__main__":
    import torch  # before TensorFlow

    print(f"worst relative error over the live directions: {_measure():.2e} (torch {torch.__version__})")
