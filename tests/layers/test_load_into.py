"""convbn.load_into: checkpoints from one framework into models of another built from ordinary layers.

The same residual block (tests/_support/nets.py) is built in torch, Keras 3 and Flax linen.
Each source model gets random weights and statistics through its own framework, is saved with the
framework's own saver, converted to each other framework's format and loaded with ``load_into``
into a fresh model; eval outputs must then agree with the source's.

Tolerance: every framework computes in float32 and the values pass through unconverted except
for a folded bias (rounded once into float32). Over five random weight sets (``python -m
tests.layers.test_load_into`` remeasures), max|y - y_source| / max|y_source| was at most 2.1e-7
over the six directions, and 6.2e-7 with the conv bias folded into beta or the moving mean (three
targets); the tf-slim DCGAN checkpoint loaded into torch gave 5.5e-7 against TF's own outputs.
1e-5, the bound the feature was specified with, is 16 times the worst, while a wrong layer,
kernel layout, eps or a lost bias gives 1e-3 to 1.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn.convert import Checkpoint
from convbn.loading import LoadError, Target, match_layers
from tests._support import nets as bm
from tests._support.assertions import rel_err
from tests.conftest import need

TOL = 1e-5
FORMAT = {"torch": "torch", "keras": "keras", "flax": "flax"}
SUFFIX = {"torch": ".pt", "keras": ".weights.h5", "flax": ".msgpack"}
PAIRS = {"torch": bm.TORCH_PAIRS, "keras": bm.KERAS_PAIRS, "flax": bm.FLAX_PAIRS}


#: What each framework's models and files need (tests/conftest.py's ``need``).
NEEDS = {"torch": ("torch",), "keras": ("keras", "h5py"), "flax": ("flax",)}


def _need(framework: str) -> None:
    need(*NEEDS[framework])


@dataclasses.dataclass
class Source:
    path: Path
    x: np.ndarray
    y: np.ndarray


def _fresh(framework: str, **kwargs: Any) -> tuple[Any, Any]:
    """``(model to pass to load_into, run(model_or_variables, x))``."""
    if framework == "torch":
        return bm.torch_build(**kwargs), bm.torch_run
    if framework == "keras":
        return bm.keras_build(**kwargs), bm.keras_run
    module, variables = bm.flax_build(**kwargs)
    return variables, lambda v, x: bm.flax_run(module, v, x)


def _source(framework: str, directory: Path, seed: int = 7, **kwargs: Any) -> Source:
    _need(framework)
    values = bm.random_values(seed=seed, **kwargs)
    x = bm.x_input()
    path = directory / f"source_{framework}_{seed}{SUFFIX[framework]}"
    if framework == "torch":
        model = bm.torch_assign(bm.torch_build(**kwargs), values)
        bm.torch_save(model, path)
        y = bm.torch_run(model, x)
    elif framework == "keras":
        model = bm.keras_assign(bm.keras_build(**kwargs), values)
        bm.keras_save(model, path)
        y = bm.keras_run(model, x)
    else:
        module, variables = bm.flax_build(**kwargs)
        variables = bm.flax_assign(variables, values)
        bm.flax_save(variables, path)
        y = bm.flax_run(module, variables, x)
    return Source(path, x, y)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("load_into")
    cache: dict[str, Source] = {}

    def get(framework: str) -> Source:
        _need(framework)
        if framework not in cache:
            cache[framework] = _source(framework, directory)
        return cache[framework]

    return {"get": get, "dir": directory}


def _parameters(model: Any) -> dict[str, np.ndarray]:
    """Every parameter and buffer of a torch model, copied."""
    return {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}


# -- the three frameworks, each loading the other two -----------------------------------------------

DIRECTIONS = [(s, t) for s in FORMAT for t in FORMAT if s != t]


@pytest.mark.parametrize(("source", "target"), DIRECTIONS, ids=[f"{s}-to-{t}" for s, t in DIRECTIONS])
def test_converted_checkpoint_loads_into_ordinary_layers_and_outputs_match(source, target, sources, tmp_path):
    _need(target)
    src = sources["get"](source)
    converted = tmp_path / f"converted{SUFFIX[target]}"
    convbn.save_checkpoint(convbn.load_checkpoint(src.path), converted, FORMAT[target])
    model, run = _fresh(target)
    assert rel_err(run(model, src.x), src.y) > 0.1  # a fresh model computes something else

    report = convbn.load_into(model, converted)

    assert report.ok and report.loaded
    assert list(report.matched) == PAIRS[target]
    assert list(report.matched.values()) == list(convbn.load_checkpoint(converted).layers)
    assert report.folded == {} and report.unused == [] and report.untouched == []
    assert report.pairing == {"torch": "torch.fx", "keras": "layer graph", "flax": "tree order"}[target]
    loaded = report.variables if target == "flax" else model
    assert rel_err(run(loaded, src.x), src.y) <= TOL


@pytest.mark.parametrize(("source", "target"), [("keras", "torch"), ("torch", "flax")])
def test_the_source_file_itself_loads_the_same(source, target, sources):
    """load_into reads any format: the other framework's own file, without converting it first."""
    _need(target)
    src = sources["get"](source)
    model, run = _fresh(target)
    report = convbn.load_into(model, src.path)
    assert report.ok
    assert rel_err(run(report.variables if target == "flax" else model, src.x), src.y) <= TOL


def test_flax_tree_is_not_modified_and_a_jitted_tree_pairs_by_names(sources):
    _need("flax")
    import jax

    src = sources["get"]("torch")
    module, variables = bm.flax_build()
    before = jax.tree_util.tree_map(np.array, variables)
    shuffled = jax.jit(lambda v: v)(variables)  # keys come back sorted: BatchNorm_* before Conv_*
    assert list(shuffled["params"]) != list(variables["params"])
    report = convbn.load_into(shuffled, src.path)
    assert report.ok and report.pairing == "tree names"
    assert report.matched == {"Conv_0": "conv1", "Conv_1": "conv2", "Conv_2": "downsample.0"}
    assert rel_err(bm.flax_run(module, report.variables, src.x), src.y) <= TOL
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(variables), strict=True):
        assert np.array_equal(a, np.asarray(b))


def test_flax_eps_checkpoint_is_refused_and_eps_is_named():
    _need("flax")
    _, variables = bm.flax_build()
    ckpt = bm.checkpoint_of(bm.random_values(), eps=1e-3)
    with pytest.raises(convbn.ConvBNError, match="a Flax variable tree"):
        convbn.load_into(variables, ckpt, eps="checkpoint")
    report = convbn.load_into(variables, ckpt)
    assert any("epsilon=0.001" in note for note in report.notes)


def test_keras_model_with_a_head_the_checkpoint_lacks_is_refused_or_left(sources):
    _need("keras")
    src = sources["get"]("torch")
    model = bm.keras_build(head=True)
    head = [w.copy() for w in model.get_layer("head").get_weights()]
    with pytest.raises(LoadError, match="1 missing"):
        convbn.load_into(model, src.path)  # strict: every model layer with parameters is filled
    report = convbn.load_into(model, src.path, strict=False)
    assert report.missing == ["head"] and report.parts == {"head": "dense"} and report.untouched == []
    assert all(np.array_equal(a, b) for a, b in zip(head, model.get_layer("head").get_weights(), strict=True))
    import keras

    trunk = keras.Model(model.input, model.get_layer("block_out").output)
    assert rel_err(bm.keras_run(trunk, src.x), src.y) <= TOL


def test_subclassed_keras_model_pairs_by_layer_order(sources):
    """A subclassed Keras model has no layer graph: a conv pairs with the BatchNormalization
    tracked right after it."""
    _need("keras")
    import keras

    L = keras.layers

    class Block(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.pad = L.ZeroPadding2D(1)
            self.conv1 = L.Conv2D(bm.OUT, 3, strides=2, use_bias=False)
            self.bn1 = L.BatchNormalization(epsilon=bm.EPS)
            self.conv2 = L.Conv2D(bm.OUT, 3, padding="same", use_bias=False)
            self.bn2 = L.BatchNormalization(epsilon=bm.EPS)
            self.down_conv = L.Conv2D(bm.OUT, 1, strides=2, use_bias=False)
            self.down_bn = L.BatchNormalization(epsilon=bm.EPS)

        def call(self, x, training=False):
            h = keras.ops.relu(self.bn1(self.conv1(self.pad(x)), training=training))
            h = self.bn2(self.conv2(h), training=training)
            return keras.ops.relu(h + self.down_bn(self.down_conv(x), training=training))

    src = sources["get"]("torch")
    model = Block()
    model(src.x)
    report = convbn.load_into(model, src.path)
    assert report.ok and report.pairing == "layer order"
    assert list(report.matched.values()) == bm.TORCH_PAIRS
    assert rel_err(bm.keras_run(model, src.x), src.y) <= TOL


# -- bias folding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("into", ["beta", "moving_mean"])
def test_conv_bias_is_folded_into_a_model_without_bias(into, tmp_path):
    _need("torch")
    src = _source("torch", tmp_path, bias=True)
    model = bm.torch_build(bias=False)
    report = convbn.load_into(model, src.path, fold_bias=into)
    assert report.ok
    assert report.folded == dict.fromkeys(bm.TORCH_PAIRS, into)
    assert any(f"folded the checkpoint's conv bias into {into}" in n for n in report.notes)
    assert rel_err(bm.torch_run(model, src.x), src.y) <= TOL


def test_refusing_to_fold_raises_and_changes_nothing(tmp_path):
    _need("torch")
    src = _source("torch", tmp_path, bias=True)
    model = bm.torch_build(bias=False)
    before = _parameters(model)
    for refuse in (None, False):
        with pytest.raises(convbn.ConvBNError, match="fold_bias=None refuses to fold"):
            convbn.load_into(model, src.path, fold_bias=refuse)
    after = _parameters(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_missing_bias_becomes_zero(tmp_path):
    _need("torch")
    src = _source("torch", tmp_path)
    model = bm.torch_build(bias=True)
    report = convbn.load_into(model, src.path)
    assert report.ok and any("set to zero" in n for n in report.notes)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in (model.conv1, model.conv2, model.downsample[0]))
    assert rel_err(bm.torch_run(model, src.x), src.y) <= TOL


def test_a_bias_is_folded_with_the_eps_the_model_runs_with(tmp_path):
    """The model keeps eps 1e-3; folding into beta with the checkpoint's 1e-5 instead would leave
    an error of order gamma * b * (1/sqrt(var + 1e-5) - 1/sqrt(var + 1e-3))."""
    _need("torch")
    src = _source("torch", tmp_path, bias=True)
    model = bm.torch_build(bias=False, eps=1e-3)
    report = convbn.load_into(model, src.path)
    assert report.folded == dict.fromkeys(bm.TORCH_PAIRS, "beta") and any("eps differs" in n for n in report.notes)
    same_eps = bm.torch_assign(bm.torch_build(bias=True, eps=1e-3), bm.random_values(seed=7, bias=True))
    assert rel_err(bm.torch_run(model, src.x), bm.torch_run(same_eps, src.x)) <= TOL


def test_a_gamma_or_beta_the_model_lacks_is_a_mismatch(tmp_path):
    _need("torch")
    from torch import nn

    src = _source("torch", tmp_path, bias=True)
    model = bm.torch_build()
    model.bn2 = nn.BatchNorm2d(bm.OUT, eps=bm.EPS, affine=False)
    report = convbn.load_into(model, src.path, strict=False)
    assert [m.model for m in report.mismatched] == ["conv2"] and "conv2" not in report.folded
    reason = report.mismatched[0].reason
    assert reason.startswith("the model's BatchNorm has no gamma, and the checkpoint's gamma is not all ones; "
                             "the model's BatchNorm has no beta, and the checkpoint's beta is not all zeros")
    assert reason.endswith("(it holds the folded conv bias: fold_bias='moving_mean' leaves beta alone)")
    assert float(model.bn2.running_var.min()) == 1.0  # not loaded


@pytest.fixture(scope="module")
def dcgan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.formats import slim_graphs

    need("torch")
    slim_graphs.need_slim()
    # The same session-wide build tests/formats uses (built once, shared across modules).
    return slim_graphs.shared_build(tmp_path_factory, "dcgan", slim_graphs.build_dcgan)  # type: ignore[no-any-return]


def test_dcgan_slim_checkpoint_with_conv_biases_loads_into_a_torch_model_without(dcgan):
    """tf-slim DCGAN discriminator (conv ``w`` + ``biases``, BatchNorm eps 1e-5) into torch convs
    with ``bias=False``; TF's SAME at stride 2 on even sizes is (1, 2) padding, reproduced with
    ``nn.ZeroPad2d`` as a torch user would."""
    import torch
    from torch import nn

    from tests.formats.slim_graphs import DCGAN_LAYERS

    class Discriminator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pad = nn.ZeroPad2d((1, 2, 1, 2))
            (_, _, w0), (_, _, w1), (_, _, w2) = DCGAN_LAYERS
            self.h0 = nn.Conv2d(3, w0, 5, stride=2)  # no BatchNorm: keeps its bias
            self.h1 = nn.Conv2d(w0, w1, 5, stride=2, bias=False)
            self.bn1 = nn.BatchNorm2d(w1)
            self.h2 = nn.Conv2d(w1, w2, 5, stride=2, bias=False)
            self.bn2 = nn.BatchNorm2d(w2)
            self.act = nn.LeakyReLU(0.2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.act(self.h0(self.pad(x)))
            y1 = self.bn1(self.h1(self.pad(h)))
            y2 = self.bn2(self.h2(self.pad(self.act(y1))))
            return y1, y2

    model = Discriminator().eval()
    report = convbn.load_into(model, dcgan["prefix"])
    assert report.ok
    assert report.matched == {"h0": "d_h0_conv", "h1": "d_h1_conv", "h2": "d_h2_conv"}
    assert report.folded == {"h1": "beta", "h2": "beta"} and report.parts == {"h0": "conv"}
    assert report.unused == [] and report.untouched == []
    # The lone first conv is no conv+BatchNorm pair: it is loaded as a layer of its own (it keeps its bias).
    with torch.no_grad():
        y1, y2 = model(torch.from_numpy(dcgan["x"]).permute(0, 3, 1, 2))
    for got, want in zip((y1, y2), dcgan["outputs"], strict=True):
        assert rel_err(got.permute(0, 2, 3, 1).numpy(), want) <= TOL


# -- strict, missing, mismatched, all-or-nothing ----------------------------------------------------


def _drop_downsample(path: Path, out: Path) -> None:
    import torch

    state = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("downsample.")}, out)


def test_strict_missing_layer_raises_with_the_report_and_changes_nothing(sources, tmp_path):
    _need("torch")
    src = sources["get"]("torch")
    partial = tmp_path / "partial.pt"
    _drop_downsample(src.path, partial)
    model = bm.torch_build()
    before = _parameters(model)
    with pytest.raises(LoadError) as info:
        convbn.load_into(model, partial)
    assert isinstance(info.value, convbn.ConvBNError)
    report = info.value.report
    assert report.missing == ["downsample.0"] and not report.loaded
    assert report.matched == {"conv1": "conv1", "conv2": "conv2"}
    assert "1 missing" in str(info.value) and "downsample.0" in str(info.value)
    after = _parameters(model)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_non_strict_loads_what_matches_and_reports_the_rest(sources, tmp_path):
    _need("torch")
    src = sources["get"]("torch")
    partial = tmp_path / "partial.pt"
    _drop_downsample(src.path, partial)
    model = bm.torch_build()
    shortcut = {k: v for k, v in _parameters(model).items() if k.startswith("downsample.")}
    report = convbn.load_into(model, partial, strict=False)
    assert report.loaded and not report.ok and report.missing == ["downsample.0"]
    reference = bm.torch_build()
    reference.load_state_dict(__import__("torch").load(src.path, weights_only=True))
    for name in ("conv1.weight", "bn1.running_var", "conv2.weight", "bn2.bias"):
        assert np.array_equal(_parameters(model)[name], _parameters(reference)[name])
    assert all(np.array_equal(v, _parameters(model)[k]) for k, v in shortcut.items())


def test_shape_mismatch_is_reported_and_not_loaded(sources, tmp_path):
    _need("torch")
    import torch

    src = sources["get"]("torch")
    state = torch.load(src.path, weights_only=True)
    state["conv2.weight"] = torch.randn(8, 8, 5, 5)  # a 5x5 conv where the model has 3x3
    changed = tmp_path / "changed.pt"
    torch.save(state, changed)
    model = bm.torch_build()
    before = _parameters(model)
    with pytest.raises(LoadError, match="1 mismatched"):
        convbn.load_into(model, changed)
    assert all(np.array_equal(before[k], v) for k, v in _parameters(model).items())
    report = convbn.load_into(model, changed, strict=False)
    assert report.mismatched == [convbn.loading.Mismatch(
        "conv2", "conv2", "kernel (HWIO) (5, 5, 8, 8) in the checkpoint, (3, 3, 8, 8) in the model"
    )]
    assert report.missing == [] and report.unexpected == [] and list(report.matched) == ["conv1", "downsample.0"]
    after = _parameters(model)
    assert np.array_equal(after["conv2.weight"], before["conv2.weight"])
    assert np.array_equal(after["bn2.running_var"], before["bn2.running_var"])
    assert not np.array_equal(after["conv1.weight"], before["conv1.weight"])


def test_a_failing_write_restores_every_pair(sources, monkeypatch):
    _need("torch")
    from convbn.loading import _torch

    src = sources["get"]("torch")
    model = bm.torch_build()
    before = _parameters(model)
    calls = []
    original = _torch.assign_torch

    def flaky(conv, bn, params):
        calls.append(conv)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        original(conv, bn, params)

    monkeypatch.setattr(_torch, "assign_torch", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convbn.load_into(model, src.path)
    assert len(calls) == 3
    after = _parameters(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


# -- how pairs are found -----------------------------------------------------------------------------


def test_untraceable_forward_falls_back_to_module_order(sources):
    _need("torch")
    from torch import nn

    src = sources["get"]("torch")
    block = bm.torch_build()

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.block(x)
            return self.block(-x)

    model = Branchy().eval()
    report = convbn.load_into(model, src.path)
    assert report.ok and report.pairing == "module order"
    assert "torch.fx could not trace the model" in report.notes[0]
    assert list(report.matched) == ["block.conv1", "block.conv2", "block.downsample.0"]
    assert rel_err(bm.torch_run(block, src.x), src.y) <= TOL


def test_conv_feeding_more_than_its_batchnorm_is_not_a_pair():
    _need("torch")
    from torch import nn

    class Tap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # folding a bias into bn would change the second use

    model = Tap()
    before = _parameters(model)
    report = convbn.load_into(model, bm.checkpoint_of(bm.random_values()[:1]), strict=False)
    assert report.pairs == {} and report.unexpected == ["L0"] and report.missing == ["conv", "bn"]
    assert report.parts == {"conv": "conv", "bn": "batch_norm"} and report.untouched == []
    assert "conv: its output feeds more than its BatchNorm; not a pair" in report.notes
    assert all(np.array_equal(before[k], v) for k, v in _parameters(model).items())


def test_convbn_torch_layers_are_pairs_too(sources):
    _need("torch")
    from torch import nn

    from convbn.torch import ConvBN2d

    src = sources["get"]("torch")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = ConvBN2d(bm.IN, bm.OUT, 3, stride=2, padding=1)
            self.b = ConvBN2d(bm.OUT, bm.OUT, 3, padding=1)
            self.s = ConvBN2d(bm.IN, bm.OUT, 1, stride=2, padding=0)

        def forward(self, x):
            return (self.b(self.a(x).relu()) + self.s(x)).relu()

    model = Block().eval()
    report = convbn.load_into(model, src.path)
    assert report.ok and list(report.matched) == ["a.conv", "b.conv", "s.conv"]
    assert rel_err(bm.torch_run(model, src.x), src.y) <= TOL


# -- eps ---------------------------------------------------------------------------------------------


def test_eps_is_the_models_unless_asked(sources):
    _need("torch")
    src = sources["get"]("torch")
    model = bm.torch_build(eps=1e-3)
    report = convbn.load_into(model, src.path)
    assert model.bn1.eps == 1e-3
    note = next(n for n in report.notes if n.startswith("BatchNorm eps differs for 3 layer(s)"))
    assert "conv1 (model 0.001, checkpoint 1e-05, assumed: the file stores none)" in note
    assert rel_err(bm.torch_run(model, src.x), src.y) > 1e-4  # eps changes the outputs
    convbn.load_into(model, src.path, eps="checkpoint")
    assert model.bn1.eps == 1e-5 and model.bn1.momentum == 0.1
    assert rel_err(bm.torch_run(model, src.x), src.y) <= TOL


def test_keras_eps_checkpoint_sets_epsilon_and_outputs_follow(sources):
    _need("keras")
    src = sources["get"]("torch")
    model = bm.keras_build(eps=1e-3)
    model.predict(src.x, verbose=0)  # a compiled predict function that read eps=1e-3
    convbn.load_into(model, src.path, eps="checkpoint")
    assert model.get_layer("bn1").epsilon == 1e-5
    assert rel_err(model.predict(src.x, verbose=0), src.y) <= TOL


# -- errors ------------------------------------------------------------------------------------------


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, a Keras 3 model"):
        convbn.load_into(object(), "x.pt")
    with pytest.raises(convbn.ConvBNError, match="fold_bias must be 'beta', 'moving_mean', or None/False"):
        convbn.load_into({"params": {}}, "x.pt", fold_bias="gamma")
    with pytest.raises(convbn.ConvBNError, match="eps must be 'model' or 'checkpoint'. Received: eps='mine'"):
        convbn.load_into({"params": {}}, "x.pt", eps="mine")
    with pytest.raises(convbn.ConvBNError, match="must hold 'params'"):
        convbn.load_into({"weights": {}}, bm.checkpoint_of(bm.random_values()))
    fused = convbn.convert.fuse_checkpoint(bm.checkpoint_of(bm.random_values()))
    with pytest.raises(convbn.ConvBNError, match="a fused checkpoint has no BatchNorm statistics"):
        convbn.load_into({"params": {}}, fused)


def test_unbuilt_keras_model_is_refused():
    _need("keras")
    import keras

    model = keras.Sequential([keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization()])
    with pytest.raises(convbn.ConvBNError, match="the Keras model must be built"):
        convbn.load_into(model, bm.checkpoint_of(bm.random_values()))


# -- the matcher, framework-free ---------------------------------------------------------------------


def _shapes_ckpt(shapes: list[tuple[int, ...]], names: list[str] | None = None) -> Checkpoint:
    ckpt = Checkpoint()
    for i, shape in enumerate(shapes):
        key = names[i] if names else f"c{i}"
        n = shape[-1]
        ckpt.layers[key] = convbn.ConvBNParams(kernel=np.zeros(shape, np.float32), moving_mean=np.zeros(n, np.float32),
                                               moving_var=np.ones(n, np.float32))
    return ckpt


def _targets(shapes: list[tuple[int, ...]]) -> list[Target]:
    return [Target(f"m{i}", f"b{i}", s, bias=False, gamma=True, beta=True) for i, s in enumerate(shapes)]


A, B, C, D = (3, 3, 3, 8), (3, 3, 8, 16), (1, 1, 3, 16), (3, 3, 16, 16)


def _match(model: list[tuple[int, ...]], ckpt: list[tuple[int, ...]]):
    c = _shapes_ckpt(ckpt)
    return match_layers(_targets(model), c, list(c.layers))


def test_matcher_finds_a_missing_layer_in_the_middle():
    m = _match([A, B, C, D], [A, C, D])
    assert m.matched == [(0, 0), (2, 1), (3, 2)] and m.missing == [1] and m.unexpected == [] and m.notes == []


def test_matcher_reports_a_changed_shape_as_mismatched():
    m = _match([A, B, D], [A, C, D])
    assert m.matched == [(0, 0), (2, 2)] and m.mismatched == [(1, 1)] and not m.missing and not m.unexpected


def test_matcher_takes_a_reordered_branch_by_its_unique_shape():
    m = _match([A, B, C], [A, C, B])
    assert sorted(m.matched) == [(0, 0), (1, 2), (2, 1)] and "out of order" in m.notes[0]


def test_matcher_says_when_repeated_shapes_make_it_ambiguous():
    """Which of three same-shaped layers two checkpoint layers belong to is a guess: none is matched."""
    m = _match([D, D, D], [D, D])
    assert m.matched == [] and m.missing == [] and m.unexpected == []
    assert [(a.model, a.source) for a in m.ambiguous] == [(("m0", "m1", "m2"), ("c0", "c1"))]


def test_matcher_prefers_equal_names_among_equal_shapes():
    c = _shapes_ckpt([D, D], names=["m1", "x"])
    m = match_layers(_targets([D, D, D]), c, list(c.layers))
    assert (1, 0) in m.matched and m.notes == []


def test_matcher_extra_checkpoint_layer_is_unexpected():
    m = _match([A, B], [A, B, C])
    assert m.matched == [(0, 0), (1, 1)] and m.unexpected == [2]


def _measure(seeds: int = 5) -> tuple[float, float]:
    """The worst relative output error over ``seeds`` random weight sets: every direction, then
    every target with a bias folded either way (the numbers the tolerance above is based on)."""
    import tempfile

    directory = Path(tempfile.mkdtemp())
    cross = fold = 0.0
    for seed in range(seeds):
        sources = {fw: _source(fw, directory, seed=100 + seed) for fw in FORMAT}
        for source, target in DIRECTIONS:
            converted = directory / f"c{seed}_{source}_{target}{SUFFIX[target]}"
            convbn.save_checkpoint(convbn.load_checkpoint(sources[source].path), converted, FORMAT[target])
            model, run = _fresh(target)
            report = convbn.load_into(model, converted)
            y = run(report.variables if target == "flax" else model, sources[source].x)
            cross = max(cross, rel_err(y, sources[source].y))
        src = _source("torch", directory, seed=200 + seed, bias=True)
        for into in ("beta", "moving_mean"):
            for target in FORMAT:
                model, run = _fresh(target)
                report = convbn.load_into(model, src.path, fold_bias=into)
                y = run(report.variables if target == "flax" else model, src.x)
                fold = max(fold, rel_err(y, src.y))
    return cross, fold


if __name__ == "__main__":
    import torch  # before TensorFlow

    cross, fold = _measure()
    print(f"worst relative error: cross {cross:.2e}, folded {fold:.2e} (torch {torch.__version__})")


def test_loading_a_numpy_tree_imports_no_framework(tmp_path):
    """Model kinds are told apart through sys.modules: a tree of NumPy arrays loads without JAX."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, convbn\n"
        "from tests._support import nets as bm\n"
        "values = bm.random_values()\n"
        "tree = {'params': {}, 'batch_stats': {}}\n"
        "for i, v in enumerate(values):\n"
        "    tree['params'][f'Conv_{i}'] = {'kernel': np.zeros_like(v['kernel'])}\n"
        "    tree['params'][f'BatchNorm_{i}'] = {'scale': np.ones_like(v['gamma']), 'bias': np.zeros_like(v['beta'])}\n"
        "    tree['batch_stats'][f'BatchNorm_{i}'] = {'mean': np.zeros_like(v['mean']), 'var': np.ones_like(v['var'])}\n"
        "out = convbn.load_into(tree, bm.checkpoint_of(values)).variables\n"
        "assert np.array_equal(out['batch_stats']['BatchNorm_2']['var'], values[2]['var'])\n"
        "assert tree['params']['Conv_0']['kernel'].max() == 0\n"
        "print(sorted(m for m in ('torch','tensorflow','jax','flax','keras','jaxlib') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.stdout.strip() == "[]"


def test_a_flax_file_with_sorted_keys_is_taken_in_natural_order():
    from convbn.loading import checkpoint_order

    names = sorted(f"Conv_{i}" for i in range(12))  # Conv_0, Conv_1, Conv_10, Conv_11, Conv_2, ...
    ckpt = _shapes_ckpt([A] * 12, names=names)
    ckpt.metadata["source_format"] = "flax"
    notes: list[str] = []
    assert checkpoint_order(ckpt, notes) == [f"Conv_{i}" for i in range(12)]
    assert "sorted as strings" in notes[0]
    ckpt.metadata["source_format"] = "torch"  # a torch file's order is the module order: kept
    assert checkpoint_order(ckpt, []) == names
