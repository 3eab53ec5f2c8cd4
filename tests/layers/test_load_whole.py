"""convbn.load_into fills every layer of a whole net, not only its Conv -> BatchNorm pairs.

Each torch net of tests/_support/whole_nets.py (a ResNet with basic and bottleneck blocks, a
MobileNetV2, an EfficientNet-style net with squeeze-excite convs and a BatchNorm1d after a Linear)
has an independent Keras 3 functional port and an independent Flax linen port
(tests/_support/whole_ports.py: Keras's own generated names, Flax names of their own, so matching
rests on kinds, shapes, the graphs and order, never on torch's names). The torch net gets random
values everywhere, is saved with ``torch.save``, and is loaded with ``load_into`` from the file and
from the live model; the eval outputs must then agree with torch's (NHWC against NCHW handled by
the ports' input layout). The reverse direction loads a randomized Keras port into the torch net.

Tolerance: every value passes through unconverted (layout permutations are exact) except a dense
bias folded into the BatchNorm after it (the Keras EfficientNet port has no bias there), rounded
once into float32; what remains is the frameworks' float32 arithmetic. Measured over the 12
torch -> port loads and the reverse loads (``python /tmp/...`` is not needed: the test prints
nothing; rerun with ``-s`` and a print of ``rel_err`` to remeasure), max|y - y_torch| / max|y_torch|
was at most 2.3e-7. TOL = 1e-5 is over 40 times that, while a classifier, squeeze-excite conv or
BatchNorm1d left at init gives 0.01 to 1 (tested below).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import convbn
from convbn.loading import LoadError
from tests._support.assertions import rel_err
from tests.conftest import need

TOL = 1e-5
NETS = ("resnet", "mobilenet_v2", "efficient")
SIZE = 16


def _torch_net(name: str, seed: int = 1) -> Any:
    need("torch")
    from tests._support import whole_nets

    return whole_nets.build(name, seed)


def _torch_run(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per net: the randomized torch model and its ``torch.save`` state file."""
    need("torch")
    import torch

    directory = tmp_path_factory.mktemp("whole")
    out = {}
    for name in NETS:
        model = _torch_net(name)
        path = directory / f"{name}.pt"
        torch.save(model.state_dict(), path)
        out[name] = (model, path)
    return out


def _keras(name: str) -> Any:
    need("keras")
    from tests._support import whole_ports

    return whole_ports.KERAS[name](size=SIZE)


def _flax(name: str) -> tuple[Any, Any]:
    need("flax")
    from tests._support import whole_ports

    return whole_ports.flax_build(name, SIZE)


SOURCES = ("file", "live")


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("net", NETS)
def test_torch_net_loads_whole_into_the_keras_port(net, source, torch_files):
    from tests._support import whole_ports

    model, path = torch_files[net]
    keras_model = _keras(net)
    head = keras_model.layers[-1]
    fresh = [w.copy() for w in head.get_weights()]
    x = _x()
    y = _torch_run(model, x)
    report = convbn.load_into(keras_model, path if source == "file" else model)
    assert report.ok, report.summary()
    assert head.name in report.matched and report.parts[head.name] == "dense"
    assert rel_err(whole_ports.keras_run(keras_model, x), y) <= TOL
    # The classifier was loaded too: put back its fresh values and the outputs are far off.
    loaded = head.get_weights()
    head.set_weights(fresh)
    assert rel_err(whole_ports.keras_run(keras_model, x), y) > 0.1
    head.set_weights(loaded)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("net", NETS)
def test_torch_net_loads_whole_into_the_flax_port(net, source, torch_files):
    from tests._support import whole_ports

    model, path = torch_files[net]
    module, variables = _flax(net)
    x = _x()
    y = _torch_run(model, x)
    report = convbn.load_into((module, variables), path if source == "file" else model)
    assert report.ok, report.summary()
    loaded = report.variables
    assert rel_err(whole_ports.flax_run(module, loaded, x), y) <= TOL
    fresh_head = {**loaded["params"], "logits": variables["params"]["logits"]}
    assert rel_err(whole_ports.flax_run(module, {**loaded, "params": fresh_head}, x), y) > 0.1


def test_efficientnet_squeeze_excite_and_batchnorm1d_are_loaded(torch_files):
    """The SE convs (conv with bias, no BatchNorm), the stem conv with bias and the BatchNorm1d after
    the Linear are layers of their own: each matched, the Linear's bias folded into the BatchNorm
    where the Keras Dense has none, and each changes the output when left at init."""
    from tests._support import whole_ports

    model, path = torch_files["efficient"]
    keras_model = _keras("efficient")
    report = convbn.load_into(keras_model, path)
    by_source = {v: k for k, v in report.matched.items()}
    for torch_name, kind in (("conv_stem", "conv"), ("se.conv_reduce", "conv"), ("se.conv_expand", "conv"),
                             ("pre_logits", "dense"), ("head_bn", "batch_norm"), ("classifier", "dense")):
        assert report.parts[by_source[torch_name]] == kind
    assert report.folded == {by_source["pre_logits"]: "beta"}
    x = _x()
    y = _torch_run(model, x)
    assert rel_err(whole_ports.keras_run(keras_model, x), y) <= TOL
    fresh = _keras("efficient")
    for torch_name in ("se.conv_reduce", "head_bn"):
        layer = keras_model.get_layer(by_source[torch_name])
        kept = layer.get_weights()
        layer.set_weights(fresh.layers[keras_model.layers.index(layer)].get_weights())
        assert rel_err(whole_ports.keras_run(keras_model, x), y) > 0.01, torch_name  # 1000 times TOL
        layer.set_weights(kept)


def _randomize_keras(model: Any, seed: int = 3) -> Any:
    rng = np.random.default_rng(seed)
    values = []
    for w in model.weights:
        shape = tuple(w.shape)
        v = rng.standard_normal(shape).astype(np.float32) * 0.5
        values.append(np.abs(v) + 0.5 if "variance" in w.path else v)
    model.set_weights(values)
    return model


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("net", NETS)
def test_keras_port_loads_whole_into_the_torch_net(net, source, tmp_path):
    need("torch", "keras")
    from tests._support import whole_nets, whole_ports

    keras_model = _randomize_keras(_keras(net))
    x = _x(1)
    y = whole_ports.keras_run(keras_model, x)
    if source == "file":
        path = tmp_path / "port.keras"  # a .weights.h5 does not say which BatchNorm follows which conv
        keras_model.save(path)
        src: Any = path
    else:
        src = keras_model
    model = whole_nets.NETS[net]().eval()
    report = convbn.load_into(model, src)
    assert report.ok, report.summary()
    assert rel_err(_torch_run(model, x), y) <= TOL


def _two_heads_torch() -> Any:
    import torch
    from torch import nn

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.left = nn.Linear(6, 4)
            self.right = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            v = torch.relu(self.conv(x)).mean((2, 3))
            return self.left(v), self.right(v)

    need("torch")
    torch.manual_seed(5)
    return TwoHeads().eval()


def _two_heads_keras() -> Any:
    need("keras")
    import keras
    from keras import layers as L

    inp = keras.Input((8, 8, 3))
    v = L.GlobalAveragePooling2D()(L.Conv2D(6, 3, padding="same", activation="relu")(inp))
    return keras.Model(inp, [L.Dense(4)(v), L.Dense(4)(v)])


def test_interchangeable_dense_heads_are_refused_by_name_then_decided_by_mapping(tmp_path):
    """Two same-shaped heads on parallel branches: neither names (Keras's are generated), the graph
    nor order tell them apart, so load_into refuses and names all four; mapping= decides."""
    need("torch", "keras")
    import torch

    model = _two_heads_torch()
    path = tmp_path / "heads.pt"
    torch.save(model.state_dict(), path)
    keras_model = _two_heads_keras()
    before = [w.copy() for w in keras_model.get_weights()]
    dense = [layer.name for layer in keras_model.layers if layer.__class__.__name__ == "Dense"]
    with pytest.raises(LoadError) as caught:
        convbn.load_into(keras_model, path)
    message = str(caught.value)
    assert all(name in message for name in (*dense, "left", "right")) and "mapping=" in message
    assert all(np.array_equal(a, b) for a, b in zip(before, keras_model.get_weights(), strict=True))
    report = convbn.load_into(keras_model, path, mapping={dense[0]: "left", dense[1]: "right"})
    assert report.how[dense[0]] == "mapping"
    x = _x(2)[:, :8, :8]
    import keras

    got = [keras.ops.convert_to_numpy(v) for v in keras_model(x, training=False)]
    with torch.no_grad():
        want = [t.numpy() for t in model(torch.from_numpy(x).permute(0, 3, 1, 2))]
    assert max(rel_err(a, b) for a, b in zip(got, want, strict=True)) <= TOL


def test_kinds_never_cross_a_batchnorm_is_not_a_layernorm():
    """A LayerNorm and a BatchNorm of one width are different layers: never matched to each other,
    while a LayerNorm loads into a LayerNorm (from the live model: a state file cannot tell a
    LayerNorm's weight and bias from those of another layer)."""
    need("torch")
    import torch
    from torch import nn

    torch.manual_seed(4)
    source = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12)).eval()
    with torch.no_grad():
        source[1].weight.normal_()
    target = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12))
    with pytest.raises(LoadError, match="1 missing, 1 unexpected"):
        convbn.load_into(target, source)
    report = convbn.load_into(target, source, strict=False)
    assert report.missing == ["1"] and report.unexpected == ["1"] and report.matched == {"0": "0"}
    same = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12)).eval()
    report = convbn.load_into(same, source)
    assert report.parts == {"0": "dense", "1": "layer_norm"}
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(same(x), source(x))


def test_a_bias_with_nowhere_to_go_is_a_mismatch_and_a_layer_of_unknown_kind_is_refused(tmp_path):
    need("torch", "keras")
    import keras
    import torch
    from torch import nn

    source = nn.Sequential(nn.Linear(6, 4))
    path = tmp_path / "lin.pt"
    torch.save(source.state_dict(), path)
    inp = keras.Input((6,))
    no_bias = keras.Model(inp, keras.layers.Dense(4, use_bias=False)(inp))
    with pytest.raises(LoadError, match="no BatchNorm reads it"):
        convbn.load_into(no_bias, path)

    class WithPReLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 4)
            self.act = nn.PReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.lin(x))

    target = WithPReLU()
    with pytest.raises(LoadError, match="untouched"):
        convbn.load_into(target, path)
    report = convbn.load_into(target, path, strict=False)
    assert report.untouched == ["act"] and report.matched == {"lin": "0"}
    assert torch.equal(target.lin.weight, source[0].weight) and torch.equal(target.lin.bias, source[0].bias)


def _flattening_torch() -> Any:
    """A conv, a Linear reading its flattened NCHW map, and a Linear whose output is viewed as a
    (2, 4, 4) map for a last conv: both dense layers need their features permuted for NHWC."""
    import torch
    from torch import nn

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 4 * 4, 10)
            self.lin = nn.Linear(10, 2 * 4 * 4)
            self.out = nn.Conv2d(2, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc(torch.flatten(torch.relu(self.conv(x)), 1)))
            return self.out(self.lin(h).view(-1, 2, 4, 4))

    torch.manual_seed(9)
    return Flat().eval()


def _flattening_keras() -> Any:
    import keras
    from keras import layers as L

    inp = keras.Input((4, 4, 3))
    h = L.Dense(10, activation="relu")(L.Flatten()(L.Conv2D(4, 3, padding="same", activation="relu")(inp)))
    return keras.Model(inp, L.Conv2D(3, 1)(L.Reshape((4, 4, 2))(L.Dense(32)(h))))


def _flattening_flax() -> tuple[Any, Any]:
    import flax.linen as nn
    import jax

    class Flat(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            h = nn.relu(nn.Conv(4, (3, 3))(x))
            h = nn.relu(nn.Dense(10)(h.reshape(h.shape[0], -1)))
            return nn.Conv(3, (1, 1))(nn.Dense(32)(h).reshape(-1, 4, 4, 2))

    module = Flat()
    return module, module.init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 3), np.float32))


@pytest.mark.parametrize("target", ["keras", "flax"])
def test_dense_layers_around_a_flatten_are_permuted_as_the_models_graph_says(target, tmp_path):
    """torch flattens NCHW, Keras and Flax NHWC. The state file cannot say the maps' sizes, but the
    model's graph (Keras's Flatten and Reshape, the jaxpr's reshapes) does: the input rows of the
    first dense layer and the output columns and bias of the second are permuted, and named."""
    need("torch", target)
    import torch

    model = _flattening_torch()
    path = tmp_path / "flat.pt"
    torch.save(model.state_dict(), path)
    x = _x(3)[:, :4, :4]
    with torch.no_grad():
        want = model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    if target == "keras":
        import keras

        keras_model = _flattening_keras()
        report = convbn.load_into(keras_model, path)
        got = keras.ops.convert_to_numpy(keras_model(x, training=False))
        dense = [layer.name for layer in keras_model.layers if layer.__class__.__name__ == "Dense"]
    else:
        module, variables = _flattening_flax()
        report = convbn.load_into((module, variables), path, example_input=x, expected_output=want)
        got = np.asarray(module.apply(report.variables, x))
        dense = ["Dense_0", "Dense_1"]
    assert report.permuted == {dense[0]: "in", dense[1]: "out"}, report.summary()
    assert rel_err(got, want) <= TOL


def test_the_reverse_permutation_comes_from_the_live_sources_graph():
    """A live Keras source states its maps (its Flatten and Reshape): loaded into the torch net, the
    dense layers are permuted back to NCHW order."""
    need("torch", "keras")
    import keras
    import torch

    source = _randomize_keras(_flattening_keras(), seed=6)
    model = _flattening_torch()
    report = convbn.load_into(model, source)
    assert report.permuted == {"fc": "in", "lin": "out"}, report.summary()
    x = _x(4)[:, :4, :4]
    with torch.no_grad():
        got = model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert rel_err(got, keras.ops.convert_to_numpy(source(x, training=False))) <= TOL


def test_a_flatten_no_graph_decides_is_refused_naming_the_layer_until_stated(tmp_path):
    """A subclassed Keras model has no layer graph to say what its Flatten flattened: load_into
    refuses naming the dense layer and how to state its map; stated with Checkpoint.with_flatten,
    the rows are permuted and the report says so."""
    need("torch", "keras")
    import keras
    import torch

    model = _flattening_torch()
    path = tmp_path / "flat.pt"
    torch.save(model.state_dict(), path)
    L = keras.layers

    class Sub(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.conv = L.Conv2D(4, 3, padding="same", activation="relu")
            self.flat = L.Flatten()
            self.fc = L.Dense(10, activation="relu")
            self.lin = L.Dense(32)
            self.out = L.Conv2D(3, 1)

        def call(self, x: Any) -> Any:
            return self.out(keras.ops.reshape(self.lin(self.fc(self.flat(self.conv(x)))), (-1, 4, 4, 2)))

    sub = Sub()
    x = _x(3)[:, :4, :4]
    sub(x)
    fc, lin = sub.fc.name, sub.lin.name
    with pytest.raises(LoadError, match=f"{fc} <- fc") as caught:
        convbn.load_into(sub, path)
    assert len(caught.value.report.undecided) == 2 and f"{lin} <- lin" in str(caught.value)
    assert "--flatten" in str(caught.value)
    ckpt = convbn.load_checkpoint(path).with_flatten(convbn.checkpoint.parse_flatten(["fc=4x4x4", "lin=out:4x4x2"]))
    report = convbn.load_into(sub, ckpt)
    assert report.permuted == {fc: "in", lin: "out"}
    with torch.no_grad():
        want = model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert rel_err(keras.ops.convert_to_numpy(sub(x, training=False)), want) <= TOL


def _upsampling_torch() -> Any:
    """A transposed conv (torch's ``padding=1`` at stride 2 and k=4 is TF's SAME crop), a GroupNorm,
    a Linear and a LayerNorm over its features."""
    import torch
    from torch import nn

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 4, 4, 2, 1)
            self.gn = nn.GroupNorm(2, 4)
            self.fc = nn.Linear(4, 6)
            self.ln = nn.LayerNorm(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ln(self.fc(torch.relu(self.gn(self.up(x))).mean((2, 3))))

    torch.manual_seed(11)
    model = Up().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


@pytest.mark.parametrize("keras_name", ["keras", "tf_keras"])
def test_transposed_conv_group_norm_and_layer_norm_load_both_ways(keras_name):
    need("torch", keras_name)
    import importlib

    import torch

    ns = importlib.import_module(keras_name)
    L = ns.layers
    model = _upsampling_torch()
    inp = ns.Input((5, 5, 3))
    h = L.GlobalAveragePooling2D()(L.ReLU()(L.GroupNormalization(2, epsilon=1e-5)(
        L.Conv2DTranspose(4, 4, 2, padding="same")(inp))))
    keras_model = ns.Model(inp, L.LayerNormalization(epsilon=1e-5)(L.Dense(6)(h)))
    report = convbn.load_into(keras_model, model)
    kinds = {"conv_transpose", "group_norm", "dense", "layer_norm"}
    assert report.ok and set(report.parts.values()) == kinds and len(report.matched) == 4
    x = _x(5)[:, :5, :5]
    with torch.no_grad():
        want = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert rel_err(np.asarray(keras_model(x, training=False)), want) <= TOL
    back = type(model)().eval()
    report = convbn.load_into(back, keras_model)
    assert report.ok and set(report.parts.values()) == kinds
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values(), strict=True))


def test_a_write_failing_part_way_restores_every_layer(torch_files, monkeypatch):
    """All or nothing: a write that fails after the pairs and some other layers were written puts
    every tensor back."""
    import torch

    from convbn.loading import _torch
    from tests._support import whole_nets

    path = torch_files["efficient"][1]

    model = whole_nets.NETS["efficient"]().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    write = _torch._write_part
    calls = []

    def failing(staged: Any) -> None:
        calls.append(staged.part.name)
        if len(calls) == 4:
            raise MemoryError("out of memory")
        write(staged)

    monkeypatch.setattr(_torch, "_write_part", failing)
    with pytest.raises(MemoryError):
        convbn.load_into(model, path)
    assert len(calls) == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_bare_flax_tree_loads_where_shapes_decide_and_refuses_repeated_shapes(torch_files):
    """Without its module a Flax tree has no graph: the EfficientNet-style net, whose layers all
    differ in kind or shape, loads whole; the ResNet's repeated 3x3 8->8 convs are refused by name."""
    from tests._support import whole_ports

    model, path = torch_files["efficient"]
    module, variables = _flax("efficient")
    report = convbn.load_into(variables, path)
    assert report.ok and set(report.how.values()) == {"shape"}
    x = _x()
    assert rel_err(whole_ports.flax_run(module, report.variables, x), _torch_run(model, x)) <= TOL
    _, variables = _flax("resnet")
    with pytest.raises(LoadError, match="the model's graph is unknown") as caught:
        convbn.load_into(variables, torch_files["resnet"][1])
    message = str(caught.value)
    assert all(name in message for name in ("s1b0/a/w", "s2b1/spatial/w", "layer1.0.conv1", "layer2.1.conv2"))


def test_flax_conv_transpose_group_norm_and_layer_norm_are_told_by_their_modules():
    """In a Flax tree a ConvTranspose holds a Conv's leaves, and a LayerNorm or GroupNorm named in
    the model's own words (``gn``, ``ln``) holds only ``scale`` and ``bias``: with the module given,
    its traced classes say what each is, so all load from the torch net, in flax's kernel convention."""
    need("torch", "flax")
    import flax.linen as nn
    import jax
    import torch

    class Up(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            h = nn.ConvTranspose(4, (4, 4), (2, 2), padding="SAME", name="up")(x)
            h = nn.relu(nn.GroupNorm(num_groups=2, epsilon=1e-5, name="gn")(h)).mean((1, 2))
            return nn.LayerNorm(epsilon=1e-5, name="ln")(nn.Dense(6, name="fc")(h))

    model = _upsampling_torch()
    module = Up()
    x = _x(5)[:, :5, :5]
    variables = module.init(jax.random.PRNGKey(0), x)
    report = convbn.load_into((module, variables), model, example_input=x)
    assert report.ok and report.parts == {"up": "conv_transpose", "fc": "dense", "gn": "group_norm", "ln": "layer_norm"}
    with torch.no_grad():
        want = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert rel_err(np.asarray(module.apply(report.variables, x)), want) <= TOL
