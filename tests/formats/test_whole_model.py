"""Whole conv nets, every tensor: torchvision/timm-style models (tests/_support/whole_nets.py)
convert through each format and come back as a state_dict that the original module loads with
``strict=True`` and that computes the original's outputs.

The torch reader classifies every module into the layer vocabulary (conv+BatchNorm pairs, lone
convs, dense layers with or without a BatchNorm1d, standalone BatchNorms); the writers emit each.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

import convbn
from tests.conftest import need

pytestmark = pytest.mark.needs("torch")

NETS = ("resnet", "mobilenet_v2", "efficient")


def _net(name: str, seed: int = 0) -> Any:
    from tests._support.whole_nets import build

    return build(name, seed)


def _outputs(model: Any, seed: int = 1) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((2, 3, 16, 16)).astype(np.float32))
    with torch.no_grad():
        return model.eval()(x).numpy()


def _save(model: Any, path: Any) -> dict[str, Any]:
    import torch

    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, path)
    return state


def _reloaded(name: str, path: Any) -> Any:
    """A fresh net of architecture ``name`` (other random values) loaded strictly from ``path``."""
    import torch

    fresh = _net(name, seed=99)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return fresh.eval()


def _assert_same_state(path: Any, state: dict[str, Any]) -> None:
    import torch

    back = torch.load(path, weights_only=True)
    assert list(back) == list(state)  # the source's names, in the source's order
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


@pytest.mark.parametrize("name", NETS)
def test_the_torch_reader_classifies_every_tensor(tmp_path, name):
    model = _net(name)
    state = _save(model, tmp_path / "m.pt")
    ckpt = convbn.load_checkpoint(tmp_path / "m.pt")
    assert ckpt.tensors == {}  # nothing left unclassified
    kinds = {n: layer.kind for n, layer in ckpt.others.items()}
    modules = dict(model.named_modules())
    for layer_name, layer in ckpt.others.items():
        module = modules[layer_name]
        expected = {"Conv2d": "conv", "Linear": "dense", "BatchNorm2d": "batch_norm"}[type(module).__name__]
        assert layer.kind == expected, layer_name
        weight = getattr(module, "weight", None)
        if layer.kind == "dense":
            np.testing.assert_array_equal(layer.kernel, weight.detach().numpy().T)
        elif layer.kind == "conv":
            np.testing.assert_array_equal(layer.kernel, weight.detach().numpy().transpose(2, 3, 1, 0))
    convs = {n for n, m in modules.items() if type(m).__name__ == "Conv2d"}
    assert set(ckpt.layers) | {n for n, k in kinds.items() if k == "conv"} == convs
    assert set(ckpt.layers).isdisjoint(kinds)
    # The model's layer order, pairs and others interleaved.
    assert [n for n, _ in ckpt.in_order()] == [
        n for n in modules if n in ckpt.layers or n in ckpt.others
    ]
    used = {t for s in ckpt.sources.values() for t in (*s.conv.values(), *s.bn.values())}
    used |= {t for layer in ckpt.others.values() for t in layer.tensors.values()}
    assert used == set(state)


def test_a_dense_layer_takes_the_batchnorm1d_after_it(tmp_path):
    import torch

    model = _net("efficient")
    _save(model, tmp_path / "m.pt")
    ckpt = convbn.load_checkpoint(tmp_path / "m.pt")
    head = ckpt.others["pre_logits"]
    assert head.kind == "dense" and head.norm is not None and head.norm_name == "head_bn"
    assert "head_bn" not in ckpt.others and ckpt.others["se.conv_reduce"].norm is None
    assert ckpt.others["conv_stem"].kind == "conv" and ckpt.others["conv_stem"].bias is not None
    # The neutral dense layer and BatchNorm compute what torch's Linear + BatchNorm1d compute.
    x = np.random.default_rng(0).standard_normal((3, 8))
    norm = head.norm
    y = (x @ np.asarray(head.kernel, np.float64) + head.bias - norm.moving_mean) / np.sqrt(norm.moving_var + norm.eps)
    y = y * norm.gamma + norm.beta
    with torch.no_grad():
        expected = model.head_bn(model.pre_logits(torch.from_numpy(x.astype(np.float32)))).numpy()
    assert np.max(np.abs(y - expected)) < 1e-5


@pytest.mark.parametrize("name", NETS)
def test_torch_to_torch_writes_every_tensor_back(tmp_path, name):
    model = _net(name)
    state = _save(model, tmp_path / "m.pt")
    written = convbn.save_checkpoint(convbn.load_checkpoint(tmp_path / "m.pt"), tmp_path / "back.pt", "torch")
    assert not any("not written" in n for n in written.notes)
    _assert_same_state(tmp_path / "back.pt", state)


@pytest.mark.parametrize("name", NETS)
def test_torch_to_safetensors_to_torch_loads_strictly(tmp_path, name):
    model = _net(name)
    state = _save(model, tmp_path / "m.pt")
    expected = _outputs(model)
    convbn.save_checkpoint(convbn.load_checkpoint(tmp_path / "m.pt"), tmp_path / "m.safetensors", "safetensors")
    mid = convbn.load_checkpoint(tmp_path / "m.safetensors")
    assert mid.tensors == {} and set(mid.others) == set(convbn.load_checkpoint(tmp_path / "m.pt").others)
    convbn.save_checkpoint(mid, tmp_path / "back.pt", "torch")
    _assert_same_state(tmp_path / "back.pt", state)
    assert np.array_equal(_outputs(_reloaded(name, tmp_path / "back.pt")), expected)


def test_folding_a_dense_bias_into_the_batchnorm_after_it_keeps_the_outputs(tmp_path):
    """prepare_for_format's conv rule applies to a dense layer followed by a BatchNorm, with the
    same formula; eval outputs stay the same, into beta and into the moving mean."""
    from convbn.convert import prepare_for_format

    _save(_net("efficient"), tmp_path / "m.pt")
    ckpt = convbn.load_checkpoint(tmp_path / "m.pt")
    head = ckpt.others["pre_logits"]
    x = np.random.default_rng(2).standard_normal((4, 8))

    def run(layer: Any) -> np.ndarray:
        n = layer.norm
        h = x @ np.asarray(layer.kernel, np.float64) + (0 if layer.bias is None else np.asarray(layer.bias, np.float64))
        return (h - n.moving_mean) / np.sqrt(np.asarray(n.moving_var, np.float64) + n.eps) * n.gamma + n.beta

    for into in ("beta", "moving_mean"):
        folded = prepare_for_format(ckpt, "torch", fold_bias=into)
        layer = folded.others["pre_logits"]
        assert layer.bias is None and "bias" not in layer.tensors
        assert np.max(np.abs(run(layer) - run(head))) < 1e-5 * np.max(np.abs(run(head)))
        assert any("folded the bias of 1 dense layer(s)" in n for n in folded.notes)
        assert folded.others["conv_stem"].bias is not None  # no BatchNorm after it: nothing to fold into
    unfolded = dataclasses.replace(head, norm=None)
    assert convbn.convert.fold_layer_bias(unfolded) is unfolded


@pytest.mark.parametrize("name", NETS)
def test_torch_to_slim_to_torch_keeps_every_value(tmp_path, name):
    """A TF checkpoint holds every layer (slim's conv2d, fully_connected, batch_norm scopes) but not
    the torch names of a conv's BatchNorm (slim puts it under the conv's scope) and no dense bias
    before a BatchNorm (folded into its beta): torch -> slim -> torch comes back under convbn's
    L.conv / L.bn names for the pairs and the source's for the rest, every value there, and the
    renamed state_dict loads strictly and computes the original's outputs."""
    import torch

    from convbn.checkpoint import parse_flatten

    model = _net(name)
    state = _save(model, tmp_path / "m.pt")
    expected = _outputs(model)
    source = convbn.load_checkpoint(tmp_path / "m.pt")
    written = convbn.save_checkpoint(source, tmp_path / "m.ckpt", "slim")
    assert not any("not written" in n for n in written.notes)
    mid = convbn.load_checkpoint(tmp_path / "m.ckpt")
    assert mid.tensors == {} and set(mid.others) == set(source.others)
    # Without its .meta graph a TF checkpoint does not say whether a dense input is a flattened map.
    dense = [n for n, o in mid.others.items() if o.kind == "dense"]
    convbn.save_checkpoint(mid.with_flatten(parse_flatten([f"{n}=none" for n in dense])), tmp_path / "back.pt", "torch")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    renamed = {}
    for key, where in source.sources.items():
        for leaf in ("weight", "bias"):
            if f"{key}.conv.{leaf}" in back:
                renamed[f"{where.conv_name}.{leaf}"] = back.pop(f"{key}.conv.{leaf}")
        for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            renamed[f"{where.bn_name}.{leaf}"] = back.pop(f"{key}.bn.{leaf}")
    for key, layer in source.others.items():  # slim keeps a dense layer's BatchNorm under its scope
        for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if layer.norm_name and f"{key}.bn.{leaf}" in back:
                renamed[f"{layer.norm_name}.{leaf}"] = back.pop(f"{key}.bn.{leaf}")
    renamed.update(back)
    for key, value in state.items():  # a dense bias before a BatchNorm was folded into its beta
        if key not in renamed and key.endswith(".bias"):
            renamed[key] = torch.zeros_like(value)
    assert sorted(renamed) == sorted(state)
    fresh = _net(name, seed=99)
    fresh.load_state_dict(renamed, strict=True)
    assert np.max(np.abs(_outputs(fresh) - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_a_dense_layer_after_a_flatten_is_refused_across_flatten_orders_not_guessed(tmp_path):
    """torch flattens NCHW, Keras/Flax/TF NHWC: a Linear reading a flattened 4-channel map needs its
    rows permuted, which a state_dict cannot say. The torch reader marks that side undecided (its
    width is a multiple of the layer before it), the write is refused naming it until its map is
    stated, and then the Keras kernel's rows come out in NHWC order."""
    need("h5py")
    import torch
    from torch import nn

    from convbn.checkpoint import parse_flatten
    from convbn.convert import check_flatten_order

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6, 2))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    ckpt = convbn.load_checkpoint(tmp_path / "m.pt")
    assert ckpt.others["3"].flat_undecided == (("in", "chw"),)
    check_flatten_order(ckpt, "torch")  # same order: nothing to decide
    check_flatten_order(ckpt, "safetensors")
    with pytest.raises(convbn.ConvBNError, match=r"dense layer '3': whether its input features are a flattened"):
        convbn.save_checkpoint(ckpt, tmp_path / "m.weights.h5", "keras")
    assert not (tmp_path / "m.weights.h5").exists()
    # Through safetensors the undecided side is kept, so the refusal is too.
    convbn.save_checkpoint(ckpt, tmp_path / "m.safetensors", "safetensors")
    with pytest.raises(convbn.ConvBNError, match=r"dense layer '3': whether its input"):
        convbn.save_checkpoint(convbn.load_checkpoint(tmp_path / "m.safetensors"), tmp_path / "m.weights.h5", "keras")
    stated = ckpt.with_flatten(parse_flatten(["3=2x3x4"]))
    convbn.save_checkpoint(stated, tmp_path / "m.weights.h5", "keras")
    kernel = convbn.load_checkpoint(tmp_path / "m.weights.h5").others["3"].kernel
    weight = model[3].weight.detach().numpy()  # (out, c*h*w)
    expected = weight.reshape(2, 4, 2, 3).transpose(2, 3, 1, 0).reshape(24, 2)  # rows in (h, w, c) order
    np.testing.assert_array_equal(kernel, expected)
    # A classifier after global pooling (input width = the conv's channels) is decided: a vector.
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Linear(4, 2))
    torch.save(pooled.state_dict(), tmp_path / "p.pt")
    assert convbn.load_checkpoint(tmp_path / "p.pt").others["2"].flat_undecided == ()


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("target", ["m.weights.h5", "m.keras"])
def test_torch_to_keras_to_torch_loads_strictly(tmp_path, name, target):
    """Keras 3 files hold every layer (Conv2D, Dense, BatchNormalization groups) under the torch
    module names, which Keras allows, and record the order and pairs in a root attribute Keras
    ignores: torch -> Keras -> torch gives back the source's state_dict."""
    need("h5py")
    model = _net(name)
    state = _save(model, tmp_path / "m.pt")
    expected = _outputs(model)
    written = convbn.save_checkpoint(convbn.load_checkpoint(tmp_path / "m.pt"), tmp_path / target, "keras")
    assert not any("not written" in n for n in written.notes)
    mid = convbn.load_checkpoint(tmp_path / target)
    assert mid.tensors == {}
    convbn.save_checkpoint(mid, tmp_path / "back.pt", "torch")
    _assert_same_state_values(tmp_path / "back.pt", state)
    assert np.array_equal(_outputs(_reloaded(name, tmp_path / "back.pt")), expected)


def _assert_same_state_values(path: Any, state: dict[str, Any]) -> None:
    """The source's names and values; num_batches_tracked, which no other framework stores, is 0."""
    import torch

    back = torch.load(path, weights_only=True)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            assert int(back[key]) == 0
            continue
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


@pytest.mark.parametrize("name", NETS)
def test_keras_loads_the_written_archive_with_every_layer_in_place(tmp_path, name):
    """keras.saving.load_model rebuilds the .keras file convbn writes, and each Keras layer, found
    by the torch module's name, holds that module's values (so the groups are numbered in the
    order Keras lists the layers)."""
    need("keras")
    import keras

    model = _net(name)
    _save(model, tmp_path / "m.pt")
    convbn.save_checkpoint(convbn.load_checkpoint(tmp_path / "m.pt"), tmp_path / "m.keras", "keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    # The .weights.h5 of the same checkpoint loads into that model with Keras's own loader too.
    convbn.save_checkpoint(convbn.load_checkpoint(tmp_path / "m.pt"), tmp_path / "m.weights.h5", "keras")
    for layer in loaded.layers:
        layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    loaded.load_weights(tmp_path / "m.weights.h5")
    checked = 0
    for module_name, module in model.named_modules():
        kind = type(module).__name__
        if kind not in ("Conv2d", "Linear", "BatchNorm2d", "BatchNorm1d"):
            continue
        weights = [np.asarray(w) for w in loaded.get_layer(module_name).get_weights()]
        if kind == "Conv2d":
            expected = [module.weight.detach().numpy().transpose(2, 3, 1, 0)]
        elif kind == "Linear":
            expected = [module.weight.detach().numpy().T]
        else:
            expected = [module.weight.detach().numpy(), module.bias.detach().numpy(),
                        module.running_mean.numpy(), module.running_var.numpy()]
        if kind in ("Conv2d", "Linear") and module.bias is not None:
            expected.append(module.bias.detach().numpy())
        assert len(weights) == len(expected), module_name
        for got, want in zip(weights, expected, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=module_name)
        checked += 1
    assert checked == len([m for m in model.modules() if type(m).__name__ in ("Conv2d", "Linear", "BatchNorm2d", "BatchNorm1d")])


@pytest.mark.parametrize("name", [*NETS, "decoder"])
def test_torch_to_flax_to_torch_loads_strictly(tmp_path, name):
    """A flax msgpack file nests every layer under the torch module path (params/layer1/0/conv1,
    batch_stats/layer1/0/bn1) and says so in a top-level 'convbn' entry that from_bytes ignores:
    torch -> flax -> torch gives back the source's state_dict."""
    need("msgpack")
    model = _net(name)
    state = _save(model, tmp_path / "m.pt")
    expected = _outputs(model)
    written = convbn.save_checkpoint(convbn.load_checkpoint(tmp_path / "m.pt"), tmp_path / "m.msgpack", "flax")
    assert not any("not written" in n for n in written.notes)
    mid = convbn.load_checkpoint(tmp_path / "m.msgpack")
    assert mid.tensors == {}
    convbn.save_checkpoint(mid, tmp_path / "back.pt", "torch")
    _assert_same_state_values(tmp_path / "back.pt", state)
    assert np.array_equal(_outputs(_reloaded(name, tmp_path / "back.pt")), expected)


def test_transposed_convs_go_through_flax_as_flax_conv_transpose_kernels_and_back(tmp_path):
    """torch -> flax -> torch of a net with ConvTranspose2d layers, the transposed convs stated as such
    (a state_dict shows one only by its bias): the flax file holds ConvTranspose kernels, recorded as
    such, and the torch file written from it loads strictly and computes the original's outputs."""
    need("msgpack")
    from convbn import layouts
    from convbn.formats.flax import transpose_padding

    model = _net("decoder")
    state = _save(model, tmp_path / "m.pt")
    expected = _outputs(model)
    ckpt = convbn.load_checkpoint(tmp_path / "m.pt")
    assert ckpt.others["head"].kind == "conv_transpose"  # its bias has weight.shape[1] values
    # 'up' is bias-free: a ConvTranspose2d by the BatchNorm after it (up_bn, weight.shape[1] wide),
    # which 'head' reads as a transposed conv does. Its stride 2 and padding 1, as a model states them.
    assert ckpt.others["up"].kind == "conv_transpose" and ckpt.others["up"].norm_name == "up_bn"
    assert "up_bn" not in ckpt.others and ckpt.kind_undecided == []
    ckpt.others["up"] = dataclasses.replace(ckpt.others["up"], stride=(2, 2), padding=((1, 1), (1, 1)), geometry=True)
    written = convbn.save_checkpoint(ckpt, tmp_path / "m.msgpack", "flax")
    assert any("padding=((2, 2), (2, 2)) for up" in n for n in written.notes)
    assert transpose_padding(ckpt.others["up"]) == "((2, 2), (2, 2))"
    mid = convbn.load_checkpoint(tmp_path / "m.msgpack")
    assert {n: layer.kind for n, layer in mid.others.items() if n in ("up", "head")} == {
        "up": "conv_transpose", "head": "conv_transpose"}
    assert np.array_equal(mid.others["up"].kernel, layouts.transpose_from_torch(state["up.weight"].numpy()))
    assert all(c.ok for c in convbn.convert.verify_checkpoint(ckpt, mid))
    convbn.save_checkpoint(mid, tmp_path / "back.pt", "torch")
    _assert_same_state_values(tmp_path / "back.pt", state)
    assert np.array_equal(_outputs(_reloaded("decoder", tmp_path / "back.pt")), expected)


def test_verify_runs_every_other_layer_and_catches_a_wrong_one(tmp_path):
    """verify_checkpoint checks dense layers (with their BatchNorm1d) and lone convs too, in
    float64 against the source; a converted fc with a changed value fails its check."""
    need("h5py")
    from convbn.convert import verify_checkpoint

    _save(_net("efficient"), tmp_path / "m.pt")
    source = convbn.load_checkpoint(tmp_path / "m.pt")
    convbn.save_checkpoint(source, tmp_path / "m.weights.h5", "keras")
    converted = convbn.load_checkpoint(tmp_path / "m.weights.h5")
    checks = verify_checkpoint(source, converted)
    others = {c.source: c for c in checks if c.source in source.others}
    assert set(others) == set(source.others) and all(c.ok for c in checks)
    assert others["pre_logits"].geometry == "dense + batch_norm" and others["se.conv_reduce"].geometry == "conv"
    head = converted.others["classifier"]
    kernel = np.array(head.kernel)
    kernel[0, 0] += 0.5
    converted.others["classifier"] = dataclasses.replace(head, kernel=kernel)
    bad = {c.source: c for c in verify_checkpoint(source, converted)}
    assert not bad["classifier"].ok and bad["classifier"].max_rel > 1e-3
    assert all(c.ok for n, c in bad.items() if n != "classifier")


def test_inspect_lists_every_layer_by_kind(tmp_path, capsys):
    from convbn.cli import main

    _save(_net("efficient"), tmp_path / "m.pt")
    assert main(["inspect", str(tmp_path / "m.pt"), "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    kinds = {r["name"]: (r["kind"], r["kernel"], r["norm"]) for r in report["others"]}
    assert kinds["pre_logits"] == ("dense", [8, 12], "head_bn")
    assert kinds["conv_stem"] == ("conv", [3, 3, 3, 8], "")
    assert report["order"][:3] == ["conv_stem", "conv_pw", "conv_dw"] and report["tensors"] == {}
    assert main(["inspect", str(tmp_path / "m.pt")]) == 0
    text = capsys.readouterr().out
    assert "3 conv+BatchNorm layer(s), 0 other tensor(s), 5 other layer(s)" in text and "other layers:" in text
    assert "unpaired (each its own layer): conv_stem (conv), se.conv_reduce (conv), se.conv_expand (conv)" in text


def test_convert_verify_reports_the_other_layers_it_ran(tmp_path, capsys):
    need("h5py")
    from convbn.cli import main

    _save(_net("efficient"), tmp_path / "m.pt")
    assert main(["convert", str(tmp_path / "m.pt"), str(tmp_path / "m.weights.h5"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "3 layer(s) converted, 0 other tensor(s), 5 other layer(s)" in out
    assert out.splitlines()[-1] == "verified: all 8 layer(s) within tolerance"  # 3 pairs and 5 other layers


@pytest.mark.parametrize("key, value", [
    ("padding", [1, 2]), ("kind", "conv9"), ("norm", {"kind": "foo"}), ("norm", 3), ("stride", [1]),
    ("flat_in", {"height": 1}), ("tensors", {"kernel": "nope"}), ("tensors", {"weird": "fc/kernel"}), ("groups", True),
])
def test_corrupt_other_layer_metadata_is_refused_in_one_line(tmp_path, key, value):
    """A safetensors file's convbn.others entry is checked field by field: a bad one is a one-line
    ConvBNError naming the file and the layer, never a traceback or a wrong layer."""
    import json
    import struct

    from convbn.checkpoint import Checkpoint, Layer, Norm

    ckpt = Checkpoint(format="torch")
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    ckpt.others["fc"] = Layer("dense", kernel=np.ones((4, 3), np.float32), bias=zeros,
                              norm=Norm("batch_norm", gamma=ones, beta=zeros, moving_mean=zeros, moving_var=ones, eps=1e-5))
    convbn.save_checkpoint(ckpt, tmp_path / "a.safetensors", "safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    others = json.loads(header["__metadata__"]["convbn.others"])
    others[0][key] = value
    header["__metadata__"]["convbn.others"] = json.dumps(others)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-(8 + len(encoded)) % 8)
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])
    assert convbn.load_checkpoint(tmp_path / "a.safetensors").others["fc"].norm is not None
    with pytest.raises(convbn.ConvBNError, match=r"b\.safetensors: .*'fc'") as info:
        convbn.load_checkpoint(tmp_path / "b.safetensors")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("record", [b"not json", '{"layers": [["fc", "dense"]]}', '{"layers": "x"}',
                                    '{"layers": [], "layer_names": 3}'])
def test_a_corrupt_keras_layer_record_is_refused_in_one_line(tmp_path, record):
    """The 'convbn' root attribute of a .weights.h5 (kinds, pairs, names) is type-checked: a
    corrupt one is a one-line ConvBNError naming the file, never a wrong pairing."""
    need("h5py")
    import h5py

    _save(_net("efficient"), tmp_path / "m.pt")
    convbn.save_checkpoint(convbn.load_checkpoint(tmp_path / "m.pt"), tmp_path / "m.weights.h5", "keras")
    with h5py.File(tmp_path / "m.weights.h5", "r+") as f:
        assert "pre_logits" in f.attrs["convbn"]
        f.attrs["convbn"] = record
    with pytest.raises(convbn.ConvBNError, match=r"m\.weights\.h5: the root attribute 'convbn' must be") as info:
        convbn.load_checkpoint(tmp_path / "m.weights.h5")
    assert "\n" not in str(info.value)
