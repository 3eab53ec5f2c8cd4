"""Keras 2 / tf_keras ``.h5`` weights (``save_weights("x.h5")``) and whole-model ``.h5`` files.

The oracle is tf_keras itself: files it writes read into convbn tensor for tensor, and files convbn
writes load with its ``load_weights`` (by order and by name) and with Keras 3's legacy-h5 loading,
computing what torch computes. The hostile-input guarantees of the Keras 3 reader hold for this
layout too.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn import ConvBNError
from convbn.cli import main
from convbn.convert import fuse_checkpoint
from convbn.formats import keras as keras_format
from tests._support import nets
from tests._support.assertions import rel_err
from tests.conftest import need
from tests.formats.builders import assert_same_arrays, random_checkpoint
from tests.formats.hostile import refused_everywhere

need("h5py")
import h5py  # noqa: E402

# Bytes another file holds: four float32 values that would make a valid moving mean.
SECRET = np.array([11.5, -2.25, 7.0, 3.125], "<f4")
# float32 conv+BN in TF/Keras vs float32 torch or float64 NumPy, relative to max|y| (SEMANTICS.md
# section 4: within 3.2e-5 absolute at |y| ~ 5).
TOL = 1e-5

Mutate = Callable[[Any, Path], None]


# -- a hand-built Keras 2 file, for the hostile cases ------------------------------------------------


def _legacy(path: Path, mutate: Mutate | None = None, *, whole: bool = False, mean: bool = True) -> Path:
    """A Keras 2 weights file as tf_keras writes it: conv (3x3, 2 -> 4, no bias) and conv_bn; with
    ``whole``, under model_weights with a model_config, as ``model.save("m.h5")`` writes it.
    ``mutate(root, dir)`` then changes it (``mean=False`` leaves the moving mean to it)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if whole else f
        if whole:
            f.attrs["model_config"] = json.dumps(_config())
        root.attrs["layer_names"] = [b"input_1", b"conv", b"conv_bn"]
        root.create_group("input_1").attrs["weight_names"] = np.array([], np.float64)
        conv = root.create_group("conv")
        conv.attrs["weight_names"] = [b"conv/kernel:0"]
        conv.create_dataset("conv/kernel:0", data=rng.standard_normal((3, 3, 2, 4)).astype("f4"))
        bn = root.create_group("conv_bn")
        bn.attrs["weight_names"] = [f"conv_bn/{w}:0".encode() for w in ("gamma", "beta", "moving_mean", "moving_variance")]
        bn.create_dataset("conv_bn/gamma:0", data=np.full(4, 2.0, "f4"))
        bn.create_dataset("conv_bn/beta:0", data=np.zeros(4, "f4"))
        if mean:
            bn.create_dataset("conv_bn/moving_mean:0", data=np.zeros(4, "f4"))
        bn.create_dataset("conv_bn/moving_variance:0", data=np.ones(4, "f4"))
        if mutate is not None:
            mutate(root, path.parent)
    return path


def _config(eps: Any = 1e-5, strides: Any = (2, 2), fused: Any = None) -> dict[str, Any]:
    def layer(cls: str, name: str, inbound: str | None, **config: Any) -> dict[str, Any]:
        return {"class_name": cls, "name": name, "config": {"name": name, **config},
                "inbound_nodes": [[[inbound, 0, 0, {}]]] if inbound else []}

    return {"class_name": "Functional", "config": {"name": "m", "layers": [
        layer("InputLayer", "input_1", None),
        layer("Conv2D", "conv", "input_1", strides=list(strides), padding="valid", use_bias=False),
        layer("BatchNormalization", "conv_bn", "conv", epsilon=eps, momentum=0.9, fused=fused),
    ]}}


def _mean(whole: bool) -> str:
    return ("model_weights/" if whole else "") + "conv_bn/conv_bn/moving_mean:0"


@pytest.mark.parametrize("whole", [False, True], ids=["weights", "whole-model"])
def test_the_baseline_file_reads(tmp_path, whole):
    """The files the hostile cases start from are valid (so each refusal is the mutation's), and
    read as tf_keras means them: fused BatchNorm (unbiased update), the config's geometry and eps."""
    ckpt = convbn.load_checkpoint(_legacy(tmp_path / "m.h5", whole=whole))
    assert list(ckpt.layers) == ["conv"] and ckpt.convention == "keras2" and ckpt.tensors == {}
    layer = ckpt.layers["conv"]
    np.testing.assert_array_equal(np.asarray(layer.gamma), np.full(4, 2.0, "f4"))
    assert layer.bias is None and layer.var_update == "unbiased"
    assert ckpt.sources["conv"].bn["moving_var"] == "conv_bn/conv_bn/moving_variance:0"
    if whole:
        assert (layer.stride, layer.padding, layer.eps, layer.momentum) == ((2, 2), "VALID", 1e-5, 0.9)
        assert ckpt.sources["conv"].reason == "graph"
    else:
        assert (layer.stride, layer.eps, layer.momentum) == ((1, 1), 1e-3, 0.99)
        assert ckpt.sources["conv"].reason == "naming"


def test_a_config_that_turns_fusing_off_gives_the_biased_update(tmp_path):
    def unfused(root: Any, directory: Path) -> None:
        root.file.attrs["model_config"] = json.dumps(_config(fused=False))

    layer = convbn.load_checkpoint(_legacy(tmp_path / "m.h5", unfused, whole=True)).layers["conv"]
    assert layer.var_update == "biased"


def _secret_file(directory: Path) -> Path:
    secret = directory / "passwd"
    secret.write_bytes(SECRET.tobytes())
    return secret


def _other_file(directory: Path) -> Path:
    with h5py.File(directory / "other.h5", "w") as other:
        other.create_dataset("data", data=np.frombuffer(_secret_file(directory).read_bytes(), "<f4"))
    return directory / "other.h5"


def _external_storage(root: Any, directory: Path) -> None:
    root["conv_bn"].create_dataset("conv_bn/moving_mean:0", shape=(4,), dtype="<f4",
                                   external=[(str(_secret_file(directory)), 0, SECRET.nbytes)])


def _external_link(root: Any, directory: Path) -> None:
    root["conv_bn/conv_bn/moving_mean:0"] = h5py.ExternalLink(str(_other_file(directory)), "/data")


def _virtual(root: Any, directory: Path) -> None:
    layout = h5py.VirtualLayout(shape=(4,), dtype="<f4")
    layout[:] = h5py.VirtualSource(str(_other_file(directory)), "data", shape=(4,))
    root["conv_bn/conv_bn"].create_virtual_dataset("moving_mean:0", layout)


def _soft_link(root: Any, directory: Path) -> None:
    root["conv_bn/conv_bn/moving_mean:0"] = h5py.SoftLink(f"{root.name.rstrip('/')}/conv_bn/conv_bn/beta:0")


def _hard_link(root: Any, directory: Path) -> None:
    root["conv_bn/conv_bn/moving_mean:0"] = root["conv_bn/conv_bn/beta:0"]


def _fill_value(root: Any, directory: Path) -> None:
    # 256 MiB declared, no byte of it stored: reading would materialize the fill value.
    root["conv_bn"].create_dataset("conv_bn/moving_mean:0", shape=(64 << 20,), dtype="f4", fillvalue=1.0)


def _compressed(root: Any, directory: Path) -> None:
    ds = root["conv_bn"].create_dataset("conv_bn/moving_mean:0", shape=(64 << 20,), dtype="f4",
                                        chunks=(1 << 10,), compression="gzip", fillvalue=2.0)
    ds[:4] = 1.0


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (_external_storage, ("external storage",)),
        (_external_link, ("external link",)),
        (_virtual, ("virtual dataset",)),
        (_soft_link, ("soft link",)),
        (_hard_link, ("second link",)),
        (_fill_value, ("268435456", "stores 0")),
        (_compressed, ("268435456", "compressed")),
    ],
    ids=["external-storage", "external-link", "virtual", "soft-link", "hard-link", "fill-value", "compressed"],
)
@pytest.mark.parametrize("whole", [False, True], ids=["weights", "whole-model"])
def test_data_outside_the_file_or_beyond_it_is_never_read(tmp_path, mutate, fragments, whole):
    """The moving mean replaced by a dataset that reads another file, another dataset of this one,
    or more than the file holds: refused naming the file and the dataset, nothing written."""
    src = _legacy(tmp_path / "m.h5", mutate, whole=whole, mean=False)
    assert src.stat().st_size < 1 << 20
    message = refused_everywhere(src, _mean(whole), *fragments)
    assert "11.5" not in message
    for file in tmp_path.rglob("*"):
        if file.is_file() and file.name not in ("passwd", "other.h5"):
            assert SECRET.tobytes() not in file.read_bytes(), file


def _missing_layer(root: Any, directory: Path) -> None:
    root.attrs["layer_names"] = [b"conv", b"conv_bn", b"elsewhere"]


def _missing_weight(root: Any, directory: Path) -> None:
    root["conv"].attrs["weight_names"] = [b"conv/kernel:0", b"conv/bias:0"]


def _numbers_as_names(root: Any, directory: Path) -> None:
    root.attrs["layer_names"] = np.arange(3)


def _not_utf8(root: Any, directory: Path) -> None:
    root["conv"].attrs["weight_names"] = [b"\xff\xfe"]


def _vars_group(root: Any, directory: Path) -> None:
    root["conv"].create_group("vars").create_dataset("0", data=np.zeros(4, "f4"))


def _path_out_of_the_layer(root: Any, directory: Path) -> None:
    root["conv"].attrs["weight_names"] = [b"../conv_bn/conv_bn/beta:0"]


@pytest.mark.parametrize(
    ("mutate", "where", "fragment"),
    [
        (_missing_layer, "/", "'elsewhere', which the file has no group for"),
        (_missing_weight, "conv", "'conv/bias:0', which the file has no dataset for"),
        (_numbers_as_names, "/", "must be a list of names"),
        (_not_utf8, "conv", "UTF-8"),
        (_vars_group, "conv/vars", "Keras 3's layout"),
        (_path_out_of_the_layer, "conv", "no dataset for"),
    ],
    ids=["missing-layer", "missing-weight", "numbers", "not-utf8", "vars-group", "dot-dot"],
)
def test_names_the_attributes_list_must_be_the_files_own(tmp_path, mutate, where, fragment):
    refused_everywhere(_legacy(tmp_path / "m.h5", mutate), repr(where), fragment)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (b"{", "model_config must be JSON"),
        (b"[1, 2]", "must hold a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "model_config must be JSON"),
        (json.dumps(_config(eps="x")).encode(), "epsilon"),
        (json.dumps(_config(strides=(2, "2"))).encode(), "strides"),
        (json.dumps(_config(fused="yes")).encode(), "fused"),
    ],
    ids=["truncated", "list", "nested", "string-eps", "string-stride", "string-fused"],
)
def test_a_malformed_model_config_is_refused(tmp_path, config, fragment):
    def bad(root: Any, directory: Path) -> None:
        root.file.attrs["model_config"] = config

    refused_everywhere(_legacy(tmp_path / "m.h5", bad, whole=True), fragment)


def test_a_whole_model_file_without_layer_names_is_refused(tmp_path):
    def drop(root: Any, directory: Path) -> None:
        del root.attrs["layer_names"]

    refused_everywhere(_legacy(tmp_path / "m.h5", drop, whole=True), "'layer_names'", "model_weights")


def test_the_optimizer_state_of_a_whole_model_file_is_dropped_and_listed(tmp_path):
    def optimizer(root: Any, directory: Path) -> None:
        root.file.create_dataset("optimizer_weights/Adam/iter:0", data=np.int64(3))

    ckpt = convbn.load_checkpoint(_legacy(tmp_path / "m.h5", optimizer, whole=True))
    assert ckpt.dropped == ["optimizer_weights/Adam/iter:0"] and list(ckpt.layers) == ["conv"]


def test_long_name_lists_split_as_tf_keras_splits_them(tmp_path):
    """An HDF5 header holds 64 KiB: tf_keras splits a longer layer_names into layer_names0, 1, ...;
    convbn writes them so (tf_keras's own reader joins them back) and reads them."""
    need("tf_keras")
    from tf_keras.src.saving.legacy import hdf5_format

    ckpt = random_checkpoint(widths=(2,) * 301)
    ckpt.layers = {f"{'x' * 120}_{k}": p for k, p in ckpt.layers.items()}
    convbn.save_checkpoint(ckpt, tmp_path / "long.h5", "keras")
    with h5py.File(tmp_path / "long.h5") as f:
        assert "layer_names" not in f.attrs and "layer_names1" in f.attrs
        listed = hdf5_format.load_attributes_from_hdf5_group(f, "layer_names")
    assert listed == [n for k in ckpt.layers for n in (k, f"{k}_bn")]
    back = convbn.load_checkpoint(tmp_path / "long.h5")
    assert list(back.layers) == list(ckpt.layers)
    for key in ckpt.layers:
        assert_same_arrays(back.layers[key], ckpt.layers[key])


def test_h5_targets_get_the_keras2_layout_and_other_names_are_refused(tmp_path):
    """``*.h5`` used to be refused ("must be named *.weights.h5"); it is Keras 2's file name."""
    ckpt = random_checkpoint()
    ticks: list[str] = []
    convbn.save_checkpoint(ckpt, tmp_path / "c.h5", "keras", progress=ticks.append)
    assert ticks == list(ckpt.layers)
    with h5py.File(tmp_path / "c.h5") as f:
        assert [n.decode() for n in f.attrs["layer_names"]] == [
            "layer1", "layer1_bn", "layer2", "layer2_bn", "layer3", "layer3_bn"]
        assert [n.decode() for n in f["layer1_bn"].attrs["weight_names"]] == [
            f"layer1_bn/{w}:0" for w in ("gamma", "beta", "moving_mean", "moving_variance")]
        np.testing.assert_array_equal(f["layer2/layer2/kernel:0"][()], ckpt.layers["layer2"].kernel)
    back = convbn.load_checkpoint(tmp_path / "c.h5")
    assert back.convention == "keras2" and list(back.layers) == list(ckpt.layers)
    for key, params in ckpt.layers.items():
        assert_same_arrays(back.layers[key], params)
    with pytest.raises(ConvBNError, match=r"\*.weights.h5 or \*.keras \(Keras 3\), or \*.h5 .* Received: 'c.hd5'"):
        convbn.save_checkpoint(ckpt, tmp_path / "c.hd5", "keras")
    assert keras_format.target_var_update(tmp_path / "c.h5") == "unbiased"
    assert keras_format.target_var_update(tmp_path / "c.weights.h5") == "biased"


def test_a_keras_archive_holding_the_keras2_layout_is_refused(tmp_path):
    """A .keras archive is Keras 3's: its weights in Keras 2's layout are a corrupt archive."""
    src = tmp_path / "m.keras"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3"}))
        zf.writestr("config.json", json.dumps(_config()))
        zf.write(_legacy(tmp_path / "w.h5"), "model.weights.h5")
    refused_everywhere(src, "has Keras 2's layout")


def test_a_lambda_layers_code_is_never_run(tmp_path):
    """A whole-model file's config marshals a Lambda's bytecode; reading the file (library and CLI)
    takes the weights and the geometry, and never runs it."""
    need("tf_keras")
    import tf_keras

    sentinel = tmp_path / "ran"
    # Built from source so that its bytecode holds the path (a closure would not marshal).
    touch = eval(f"lambda x: (open({str(sentinel)!r}, 'w').close(), x)[1]")

    inp = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.Lambda(touch)(inp)
    x = tf_keras.layers.Conv2D(4, 3, strides=2, padding="same", name="conv")(x)
    x = tf_keras.layers.BatchNormalization(epsilon=1e-4, name="bn")(x)
    model = tf_keras.Model(inp, x)
    model.save(tmp_path / "m.h5")
    sentinel.unlink()
    with h5py.File(tmp_path / "m.h5") as f:
        assert "Lambda" in f.attrs["model_config"]
    ckpt = convbn.load_checkpoint(tmp_path / "m.h5")
    assert main(["inspect", str(tmp_path / "m.h5")]) == 0
    assert main(["convert", str(tmp_path / "m.h5"), str(tmp_path / "m.safetensors")]) == 0
    assert not sentinel.exists()
    layer = ckpt.layers["conv"]
    kernel, bias = model.get_layer("conv").get_weights()
    gamma, beta, mean, var = model.get_layer("bn").get_weights()
    assert_same_arrays(layer, dataclasses.replace(layer, kernel=kernel, bias=bias, gamma=gamma, beta=beta,
                                                  moving_mean=mean, moving_var=var))
    assert (layer.stride, layer.padding, layer.eps) == ((2, 2), "SAME", 1e-4)


# -- tf_keras as the oracle ----------------------------------------------------------------------------


def test_a_sequential_nested_in_a_functional_model_reads_whole(tmp_path):
    """tf_keras Sequential inside a functional model, saved whole and as weights: the outer graph
    pairs the top-level layers, the nested model's layers pair in their own order (its config
    entry is not the outer graph's), the Sequential's eps, stride and scale=False come through."""
    need("tf_keras")
    import tf_keras

    layers = tf_keras.layers
    inner = tf_keras.Sequential([
        tf_keras.Input((8, 8, 3)),
        layers.Conv2D(4, 3, strides=2, padding="same", name="c"), layers.BatchNormalization(epsilon=1e-4, name="b"),
        layers.ReLU(), layers.Conv2D(4, 1, use_bias=False, name="d"), layers.BatchNormalization(scale=False, name="e"),
    ], name="inner")
    inp = tf_keras.Input((8, 8, 3))
    out = layers.BatchNormalization(name="head_bn")(layers.Conv2D(2, 1, name="head")(inner(inp)))
    model = _randomize(tf_keras.Model(inp, out))
    model.save(tmp_path / "m.h5")
    model.save_weights(tmp_path / "w.h5")
    for name in ("m.h5", "w.h5"):
        ckpt = convbn.load_checkpoint(tmp_path / name)
        assert {k: s.bn_name for k, s in ckpt.sources.items()} == {"c": "b", "d": "e", "head": "head_bn"}, name
        assert ckpt.tensors == {} and ckpt.unpaired == {}, name
        assert ckpt.layers["d"].gamma is None and ckpt.layers["d"].bias is None
        kernel, bias = inner.get_layer("c").get_weights()
        np.testing.assert_array_equal(ckpt.layers["c"].kernel, kernel)
        np.testing.assert_array_equal(ckpt.layers["c"].bias, bias)
        np.testing.assert_array_equal(ckpt.layers["d"].moving_var, inner.get_layer("e").get_weights()[-1])
    whole = convbn.load_checkpoint(tmp_path / "m.h5")
    assert whole.sources["head"].reason == "graph" and whole.layers["head"].eps == 1e-3


def _randomize(model: Any, seed: int = 0) -> Any:
    """Every weight random, BatchNorm variances positive: no tensor keeps an initial value."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if hasattr(layer, "layers"):  # a nested model
            _randomize(layer, seed + 1)
            continue
        values = [rng.standard_normal(w.shape).astype("f4") * 0.3 for w in layer.get_weights()]
        if type(layer).__name__ == "BatchNormalization":
            values[-1] = rng.uniform(0.5, 1.5, values[-1].shape).astype("f4")
        layer.set_weights(values)
    return model


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """keras.applications' MobileNetV2 (tf_keras, small, random weights), saved with save_weights
    and save: Conv2D, DepthwiseConv2D and BatchNormalization(momentum=0.999), a Dense head."""
    need("tf_keras")
    import tf_keras

    model = tf_keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=5)
    directory = tmp_path_factory.mktemp("mobilenet")
    _randomize(model).save_weights(directory / "w.h5")
    model.save(directory / "m.h5")
    return model, directory


def _assert_every_tensor(model: Any, ckpt: Any) -> None:
    """Each of the model's weights is in the checkpoint exactly once, bit-exactly: in a layer (a
    depthwise kernel as the grouped HWIO), another layer or among the other tensors."""
    fields: dict[str, np.ndarray] = {}
    for key, source in ckpt.sources.items():
        params = ckpt.layers[key]
        for field, name in {**source.conv, **source.bn}.items():
            fields[name] = np.asarray(getattr(params, field))
    for other in ckpt.others.values():
        values = {"kernel": other.kernel, "bias": other.bias}
        if other.norm is not None:
            values.update(gamma=other.norm.gamma, beta=other.norm.beta, moving_mean=other.norm.moving_mean,
                          moving_var=other.norm.moving_var)
        fields.update({name: np.asarray(values[field]) for field, name in other.tensors.items()})
    found = {**fields, **{k: np.asarray(v) for k, v in ckpt.tensors.items()}}
    assert len(found) == len(fields) + len(ckpt.tensors)
    expected = {}
    for layer in model.layers:
        for weight in layer.weights:
            expected[f"{layer.name}/{weight.name}"] = weight.numpy()
    assert sorted(found) == sorted(expected)
    for name, value in expected.items():
        got = found[name]
        if name.endswith("depthwise_kernel:0"):
            kh, kw, c, m = value.shape
            value = value.reshape(kh, kw, 1, c * m)
        assert got.dtype == value.dtype and np.array_equal(got, value), name


def test_tf_keras_files_read_tensor_for_tensor(mobilenet):
    model, directory = mobilenet
    weights, whole = (convbn.load_checkpoint(directory / name) for name in ("w.h5", "m.h5"))
    bns = [layer.name for layer in model.layers if type(layer).__name__ == "BatchNormalization"]
    for ckpt in (weights, whole):
        _assert_every_tensor(model, ckpt)
        assert sorted(s.bn_name for s in ckpt.sources.values()) == sorted(bns)  # every BN follows a conv
        assert ckpt.tensors == {} and [(n, o.kind) for n, o in ckpt.others.items()] == [("predictions", "dense")]
    assert {s.reason for s in whole.sources.values()} == {"graph"}
    assert {k: s.bn_name for k, s in weights.sources.items()} == {k: s.bn_name for k, s in whole.sources.items()}
    for key, params in whole.layers.items():
        conv = model.get_layer(key)
        bn = model.get_layer(whole.sources[key].bn_name)
        groups = conv.weights[0].shape[2] if type(conv).__name__ == "DepthwiseConv2D" else conv.groups
        assert (params.stride, params.padding, params.groups) == (conv.strides, conv.padding.upper(), groups), key
        assert (params.eps, params.momentum, params.var_update) == (bn.epsilon, bn.momentum, "unbiased"), key


def test_tf_keras_pairs_compute_what_convbn_computes(mobilenet):
    """Each conv -> BatchNorm of the model, run by tf_keras in inference, against conv_bn with the
    layer read from the whole-model file (depthwise and strided ones included)."""
    model, directory = mobilenet
    ckpt = convbn.load_checkpoint(directory / "m.h5")
    rng = np.random.default_rng(1)
    for key, params in ckpt.layers.items():
        conv, bn = model.get_layer(key), model.get_layer(ckpt.sources[key].bn_name)
        x = rng.standard_normal((2, 9, 9, params.in_channels)).astype("f4")
        expected = bn(conv(x), training=False).numpy()
        got = convbn.conv_bn(x.astype(np.float64), params, backend="numpy")
        assert rel_err(got, expected) < TOL, key


def test_a_tf_keras_file_written_back_is_the_same_file(mobilenet, tmp_path):
    """Keras 2 -> convbn -> .h5 (directly, and through safetensors) gives tf_keras's layers, weight
    names and values, and a fresh model loads it by order to the same outputs."""
    need("tf_keras", "safetensors")
    import tf_keras

    model, directory = mobilenet
    assert main(["convert", str(directory / "w.h5"), str(tmp_path / "a.h5")]) == 0
    assert main(["convert", str(directory / "w.h5"), str(tmp_path / "w.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "w.safetensors"), str(tmp_path / "b.h5")]) == 0

    def text(names: Any) -> list[str]:
        return [n.decode() if isinstance(n, bytes) else n for n in names]

    def contents(path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with h5py.File(path) as f:
            out["/"] = [n for n in text(f.attrs["layer_names"]) if len(f[n].attrs["weight_names"])]
            for layer in out["/"]:
                out[layer] = text(f[layer].attrs["weight_names"])
                for weight in out[layer]:
                    out[f"{layer}/{weight}"] = f[layer][weight][()]
        return out

    original = contents(directory / "w.h5")
    for name in ("a.h5", "b.h5"):
        written = contents(tmp_path / name)
        assert sorted(written) == sorted(original), name
        for key, value in original.items():
            assert np.array_equal(written[key], value), (name, key)
    fresh = tf_keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=5)
    fresh.load_weights(tmp_path / "b.h5")
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("f4")
    assert np.array_equal(fresh(x, training=False).numpy(), model(x, training=False).numpy())


# The torch net and its tf_keras / Keras 3 twin (tests/_support/nets.py): a strided conv with
# explicit padding, a depthwise conv with a bias, a 1x1 conv; each followed by a BatchNorm (eps 1e-3).
_NAMES, _BIAS = ("0", "3", "6"), (False, True, False)


def test_torch_to_h5_loads_into_tf_keras_and_keras3_with_torchs_outputs(tmp_path):
    """torch -> .h5 (the CLI, then geometry set where a state_dict has none) loads with tf_keras by
    order and by name, and with Keras 3's legacy-h5 loading; all three compute torch's outputs."""
    need("torch", "tf_keras", "keras")
    import keras
    import tf_keras
    import torch

    net = nets.torch_stem_dw_pw(_BIAS, eps=1e-3)
    torch.save(net.state_dict(), tmp_path / "m.pt")
    ckpt = convbn.load_checkpoint(tmp_path / "m.pt")
    ckpt.layers["3"] = dataclasses.replace(ckpt.layers["3"], groups=8)  # a state_dict has no groups
    convbn.save_checkpoint(ckpt, tmp_path / "m.h5", "keras")
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 9)).astype("f4")
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    nhwc = x.transpose(0, 2, 3, 1)
    for by_name in (False, True):
        model = nets.keras_stem_dw_pw(tf_keras, _NAMES, _BIAS)
        model.load_weights(tmp_path / "m.h5", by_name=by_name)
        assert rel_err(model(nhwc, training=False).numpy(), expected) < TOL, by_name
    model3 = nets.keras_stem_dw_pw(keras, _NAMES, _BIAS)
    model3.load_weights(tmp_path / "m.h5")
    assert rel_err(keras.ops.convert_to_numpy(model3(nhwc, training=False)), expected) < TOL


def test_a_keras_applications_resnet_converts_to_torch_and_back(tmp_path):
    """keras.applications' ResNet blocks (tf_keras, random weights; shortcut convs listed before
    the BatchNorms they pair with): .h5 -> .pt -> .h5 gives back every layer bit-exactly, and the
    model holding those weights computes what the original computes."""
    need("torch", "tf_keras")
    import torch
    from tf_keras.src.applications import resnet

    def build() -> Any:
        def stacks(x: Any) -> Any:
            x = resnet.stack1(x, 8, 2, stride1=1, name="conv2")
            return resnet.stack1(x, 16, 1, name="conv3")

        return resnet.ResNet(stacks, False, True, "tiny", include_top=False, weights=None, input_shape=(32, 32, 3))

    model = _randomize(build())
    model.save_weights(tmp_path / "w.h5")
    assert main(["convert", str(tmp_path / "w.h5"), str(tmp_path / "m.pt")]) == 0
    state = torch.load(tmp_path / "m.pt")
    original = convbn.load_checkpoint(tmp_path / "w.h5")
    assert {s.reason for s in original.sources.values()} == {"naming"}
    for key, params in original.layers.items():  # the torch file holds the layers, in torch's layout
        np.testing.assert_array_equal(state[f"{key}.conv.weight"].numpy(), np.asarray(params.kernel).transpose(3, 2, 0, 1))
        np.testing.assert_array_equal(state[f"{key}.bn.running_var"].numpy(), params.moving_var)
    assert main(["convert", str(tmp_path / "m.pt"), str(tmp_path / "back.h5")]) == 0
    back = convbn.load_checkpoint(tmp_path / "back.h5")
    assert list(back.layers) == list(original.layers)
    fresh = build()
    for key, params in back.layers.items():
        assert_same_arrays(params, original.layers[key])
        fresh.get_layer(key).set_weights([np.asarray(params.kernel), np.asarray(params.bias)])
        fresh.get_layer(original.sources[key].bn_name).set_weights(
            [np.asarray(getattr(params, f)) for f in ("gamma", "beta", "moving_mean", "moving_var")])
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("f4")
    assert np.array_equal(fresh(x, training=False).numpy(), model(x, training=False).numpy())


def test_parallel_branches_with_default_names_are_refused_not_mispaired(tmp_path, capsys):
    """tf_keras lists a functional model's layers by depth: two branches come as conv2d, conv2d_1,
    batch_normalization, batch_normalization_1, and the BatchNorm after conv2d_1 is conv2d's. The
    weights file cannot tell, so it is refused with the --pair that settles it; with those pairs,
    or from the whole-model file's graph, the branches compute what tf_keras computes."""
    need("tf_keras")
    import tf_keras

    inputs = tf_keras.Input((8, 8, 3))
    a = tf_keras.layers.BatchNormalization()(tf_keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs))
    b = tf_keras.layers.BatchNormalization()(tf_keras.layers.Conv2D(8, 1, padding="same", use_bias=False)(inputs))
    model = _randomize(tf_keras.Model(inputs, tf_keras.layers.Add()([a, b])))
    # Default names carry the process's layer counters (conv2d, or conv2d_3 after other tests).
    conv_a, conv_b, bn_a, bn_b = (layer.name for layer in model.layers[1:5])
    assert [type(layer).__name__ for layer in model.layers[1:5]] == ["Conv2D"] * 2 + ["BatchNormalization"] * 2
    model.save_weights(tmp_path / "w.h5")
    model.save(tmp_path / "m.h5")
    refused_everywhere(tmp_path / "w.h5", f"--pair {conv_a}={bn_a}")
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("f4")
    expected = model(x, training=False).numpy()
    explicit = convbn.load_checkpoint(tmp_path / "w.h5", pairs={conv_a: bn_a, conv_b: bn_b})
    for ckpt in (explicit, convbn.load_checkpoint(tmp_path / "m.h5")):
        assert {k: s.bn_name for k, s in ckpt.sources.items()} == {conv_a: bn_a, conv_b: bn_b}
        got = sum(convbn.conv_bn(x, params, backend="numpy") for params in ckpt.layers.values())
        assert rel_err(got, expected) < 1e-5


@pytest.mark.slow
def test_every_mutant_of_a_keras2_file_is_read_or_refused_cleanly(tmp_path):
    """The suite's mutation fuzzer (tests/fuzz) on both Keras 2 layouts: each mutant loads and
    converts, or is refused with one ConvBNError line and exit 2, nothing written."""
    from tests.fuzz import runner
    from tests.fuzz.seeds import Bundle

    bundles = []
    for whole in (False, True):
        path = _legacy(tmp_path / f"{'model' if whole else 'weights'}.h5", whole=whole)
        bundles.append(Bundle(f"keras2-{path.stem}", {path.name: path.read_bytes()}, path.name))
    report = runner.run({"keras": bundles}, {"keras": "safetensors"}, 150, seed=0, jobs=1, timeout=30,
                        out=tmp_path / "fuzz")
    assert report.mutants["keras"] == 150 and not report.unclean_seeds, report.summary()
    assert report.count == 0, "not clean:\n" + report.summary()


def test_the_source_layer_list_is_checked_before_it_names_anything(tmp_path):
    """The Keras 2 layer list travels in the checkpoint's metadata (through safetensors files too):
    one that lost its shape gives new names, said in a note; one naming what HDF5 cannot hold is
    refused in one line, with nothing written."""
    ckpt = convbn.load_checkpoint(_legacy(tmp_path / "m.h5"))
    garbled = ckpt.copy()
    garbled.metadata["keras2_layers"] = '[["conv", "not a list"]]'
    written = convbn.save_checkpoint(garbled, tmp_path / "garbled.h5", "keras")
    assert any("keras2_layers metadata is not a list" in n for n in written.notes)
    with h5py.File(tmp_path / "garbled.h5") as f:
        assert list(f.attrs["layer_names"]) == [b"conv", b"conv_bn"] and "conv/conv/kernel:0" in f
    assert_same_arrays(convbn.load_checkpoint(tmp_path / "garbled.h5").layers["conv"], ckpt.layers["conv"])
    twice = ckpt.copy()
    twice.metadata["keras2_layers"] = json.dumps([["conv", ["conv/kernel:0"]], ["conv", ["conv/kernel:0"]]])
    with pytest.raises(ConvBNError, match=r"twice.h5: cannot write 'conv' in the Keras 2 layout") as info:
        convbn.save_checkpoint(twice, tmp_path / "twice.h5", "keras")
    assert "\n" not in str(info.value) and sorted(p.name for p in tmp_path.iterdir()) == ["garbled.h5", "m.h5"]


def test_a_fused_checkpoint_loads_into_tf_keras_convs(tmp_path):
    """``convbn fuse`` to .h5: each layer is one Conv2D with its folded kernel and bias, which a
    tf_keras model of biased convs loads by order and computes the unfused conv+BN with."""
    need("tf_keras")
    import tf_keras

    ckpt = random_checkpoint(widths=(3, 8, 4), padding="VALID")
    convbn.save_checkpoint(fuse_checkpoint(ckpt), tmp_path / "fused.h5", "keras")
    with h5py.File(tmp_path / "fused.h5") as f:
        assert list(f.attrs["layer_names"]) == [b"layer1", b"layer2"]
    model = tf_keras.Sequential([tf_keras.Input((9, 9, 3)), tf_keras.layers.Conv2D(8, 3), tf_keras.layers.Conv2D(4, 3)])
    model.load_weights(tmp_path / "fused.h5")
    x = np.random.default_rng(0).standard_normal((2, 9, 9, 3)).astype("f4")
    expected = x.astype(np.float64)
    for params in ckpt.layers.values():
        expected = convbn.conv_bn(expected, params, backend="numpy")
    assert rel_err(model(x).numpy(), expected) < TOL
