"""The keras format against real Keras 3 models: .weights.h5 and .keras, both ways."""

from __future__ import annotations

import dataclasses
import zipfile

import numpy as np
import pytest

import convbn
from convbn import ConvBNError
from tests._support.assertions import rel_err
from tests.conftest import need
from tests.formats.builders import assert_same_arrays, random_checkpoint, relu_chain

need("keras", "h5py")
import h5py  # noqa: E402
import keras  # noqa: E402

layers = keras.layers

# float32 conv+BN in Keras vs float64 NumPy, relative to max|y|: measured <= 1.5e-6 here
# (SEMANTICS.md section 4: Keras conv+BN is within 7.6e-6 absolute of float64 at |y| ~ 5).
TOL = 1e-5


def _randomize_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            shapes = [w.shape for w in layer.get_weights()]
            values = [rng.uniform(0.5, 1.5, s) for s in shapes]
            values[-3 if len(shapes) >= 3 else 0] = rng.standard_normal(shapes[0])  # beta / mean
            layer.set_weights([v.astype("float32") for v in values])
    return model


def _functional():
    inp = keras.Input((9, 9, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="stem")(inp)
    x = layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="stem_bn")(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(16, 3, padding="valid", use_bias=False, name="body")(x)
    x = layers.BatchNormalization(name="body_norm")(x)
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(2, name="head")(x)
    return _randomize_bn(keras.Model(inp, out))


def test_reads_a_real_model_from_weights_h5_and_keras(tmp_path):
    model = _functional()
    model.save_weights(tmp_path / "m.weights.h5")
    model.save(tmp_path / "m.keras")
    for name in ("m.weights.h5", "m.keras"):
        ckpt = convbn.load_checkpoint(tmp_path / name)
        assert ckpt.format == "keras" and list(ckpt.layers) == ["stem", "body"], name
        stem, body = ckpt.layers["stem"], ckpt.layers["body"]
        k_stem, b_stem = model.get_layer("stem").get_weights()
        g, b, m, v = model.get_layer("stem_bn").get_weights()
        assert_same_arrays(stem, convbn.ConvBNParams(kernel=k_stem, bias=b_stem, gamma=g, beta=b, moving_mean=m,
                                                     moving_var=v))
        assert body.bias is None
        assert ckpt.tensors == {} and [o.kind for o in ckpt.others.values()] == ["dense"], name
        (head,) = ckpt.others.values()
        kernel, bias = model.get_layer("head").get_weights()
        assert np.array_equal(head.kernel, kernel) and np.array_equal(head.bias, bias)
        if name == "m.keras":
            assert [s.reason for s in ckpt.sources.values()] == ["graph", "graph"]
            assert (stem.stride, stem.padding, stem.eps, stem.momentum) == ((2, 2), "SAME", 1e-5, 0.9)
            assert (body.padding, body.eps, body.momentum, body.var_update) == ("VALID", 1e-3, 0.99, "biased")
        else:
            assert [s.reason for s in ckpt.sources.values()] == ["naming", "order"]
            assert (stem.stride, stem.eps) == ((1, 1), 1e-3)  # not stored: defaults, and said so
            assert any("do not store BatchNorm eps" in n for n in ckpt.notes)
    # The layers, with the .keras geometry, compute what the model's layers compute.
    ckpt = convbn.load_checkpoint(tmp_path / "m.keras")
    x = np.random.default_rng(0).standard_normal((2, 9, 9, 3)).astype(np.float32)
    probe = keras.Model(model.inputs, [model.get_layer("stem_bn").output, model.get_layer("body_norm").output])
    k1, k2 = probe.predict(x, verbose=0)
    y1 = convbn.conv_bn(x.astype(np.float64), ckpt.layers["stem"], backend="numpy")
    y2 = convbn.conv_bn(np.maximum(y1, 0), ckpt.layers["body"], backend="numpy")
    assert rel_err(k1, y1) < TOL and rel_err(k2, y2) < TOL


def test_the_graph_keeps_a_batchnorm_that_follows_no_conv_unpaired(tmp_path):
    inp = keras.Input((6, 6, 4))
    x = layers.Conv2D(4, 3, padding="same", name="a")(inp)
    x = layers.ReLU()(x)
    x = layers.BatchNormalization(name="a_bn")(x)  # after the ReLU: not a conv+BN pair
    model = _randomize_bn(keras.Model(inp, x))
    model.save(tmp_path / "m.keras")
    ckpt = convbn.load_checkpoint(tmp_path / "m.keras")
    assert ckpt.layers == {} and ckpt.unpaired == {"a": "conv", "a_bn": "bn"}
    # Without the graph the name says they pair; the .keras config is what prevents it.
    model.save_weights(tmp_path / "m.weights.h5")
    assert list(convbn.load_checkpoint(tmp_path / "m.weights.h5").layers) == ["a"]


def test_weights_h5_without_a_graph_is_refused_when_order_could_mislead(tmp_path):
    """Two Conv2Ds and one BatchNorm of one width: the old rule (k-th conv, next BatchNorm of its
    width) paired the lone conv with the main conv's BatchNorm; the file is refused instead, and
    an explicit pair loads it."""
    inp = keras.Input((6, 6, 4))
    x = layers.Conv2D(4, 1, name="lone")(inp)                    # conv2d, no BatchNorm after it
    x = layers.Conv2D(4, 3, padding="same", name="main")(x)      # conv2d_1
    x = layers.BatchNormalization(name="norm")(x)                # batch_normalization
    model = _randomize_bn(keras.Model(inp, x))
    model.save_weights(tmp_path / "m.weights.h5")
    with pytest.raises(convbn.ConvBNError, match=r"width 4 .*\['lone', 'main'\] / \['norm'\].*--pair"):
        convbn.load_checkpoint(tmp_path / "m.weights.h5")
    fixed = convbn.load_checkpoint(tmp_path / "m.weights.h5", pairs={"main": "norm"})
    assert {k: (s.bn_name, s.reason) for k, s in fixed.sources.items()} == {"main": ("norm", "explicit")}
    assert fixed.unpaired == {"lone": "conv"}


def _sequential(ckpt, padding="same"):
    model = keras.Sequential([keras.Input((7, 7, 3))])
    for p in ckpt.layers.values():
        model.add(layers.Conv2D(p.out_channels, p.kernel_size, padding=padding, use_bias=p.bias is not None))
        model.add(layers.BatchNormalization(epsilon=p.eps, momentum=p.momentum))
        model.add(layers.ReLU())
    return model


def test_written_weights_load_into_a_real_model(tmp_path):
    ckpt = random_checkpoint(seed=3)
    ckpt.layers["layer2"] = dataclasses.replace(ckpt.layers["layer2"], bias=None, gamma=None)  # slim-like
    written = convbn.save_checkpoint(ckpt, tmp_path / "c.weights.h5", "keras")
    assert any("build the target BatchNorm layers with eps=1e-05, momentum=0.9" in n for n in written.notes)
    model = _sequential(ckpt)
    model.load_weights(tmp_path / "c.weights.h5")
    x = np.random.default_rng(1).standard_normal((2, 7, 7, 3)).astype(np.float32)
    assert rel_err(model.predict(x, verbose=0), relu_chain(x, ckpt)) < TOL
    bn2 = model.layers[4].get_weights()
    assert np.array_equal(bn2[0], np.ones(16, np.float32))  # absent gamma written as 1


def test_written_keras_archive_rebuilds_with_load_model(tmp_path):
    ckpt = random_checkpoint(seed=4)
    ckpt.layers["layer1"] = dataclasses.replace(ckpt.layers["layer1"], stride=2, padding="VALID")
    convbn.save_checkpoint(ckpt, tmp_path / "c.keras", "keras")
    assert zipfile.ZipFile(tmp_path / "c.keras").namelist() == ["metadata.json", "config.json", "model.weights.h5"]
    model = keras.saving.load_model(tmp_path / "c.keras")
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((2, 9, 9, p.in_channels)).astype(np.float32) for p in ckpt.layers.values()]
    for y, x, p in zip(model.predict(xs, verbose=0), xs, ckpt.layers.values(), strict=True):
        assert rel_err(y, convbn.conv_bn(x.astype(np.float64), p, backend="numpy")) < TOL
    # ... and the same file loads into a plain model with these layers in order.
    plain = _sequential(ckpt)
    plain.layers[0].strides, plain.layers[0].padding = (2, 2), "valid"
    plain.load_weights(tmp_path / "c.keras")
    assert np.array_equal(plain.layers[0].get_weights()[0], ckpt.layers["layer1"].kernel)
    back = convbn.load_checkpoint(tmp_path / "c.keras")
    for name, p in ckpt.layers.items():
        q = back.layers[name]
        assert_same_arrays(q, p)
        assert (q.stride, q.padding, q.eps, q.momentum) == (p.stride, p.padding, p.eps, p.momentum)


def test_keras_round_trip_is_bit_exact_with_every_tensor(tmp_path):
    model = _functional()
    model.save_weights(tmp_path / "a.weights.h5")
    ckpt = convbn.load_checkpoint(tmp_path / "a.weights.h5")
    convbn.save_checkpoint(ckpt, tmp_path / "b.weights.h5", "keras")

    def datasets(path):
        out = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return out

    a, b = datasets(tmp_path / "a.weights.h5"), datasets(tmp_path / "b.weights.h5")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    fresh = _functional()
    fresh.load_weights(tmp_path / "b.weights.h5")
    x = np.random.default_rng(0).standard_normal((2, 9, 9, 3)).astype(np.float32)
    assert np.array_equal(fresh.predict(x, verbose=0), model.predict(x, verbose=0))


def test_keras_files_must_be_named_for_load_weights(tmp_path):
    """``*.h5`` is Keras 2's name now (tests/formats/test_keras2_h5.py); other names are still refused."""
    with pytest.raises(ConvBNError, match=r"\*.weights.h5 or \*.keras \(Keras 3\), or \*.h5 .* Received: 'c.hd5'"):
        convbn.save_checkpoint(random_checkpoint(), tmp_path / "c.hd5", "keras")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["m.weights.h5", "m.keras"])
def test_truncated_keras_files(tmp_path, name):
    _functional().save(tmp_path / "m.keras") if name.endswith(".keras") else _functional().save_weights(tmp_path / name)
    data = (tmp_path / name).read_bytes()
    bad = tmp_path / f"bad_{name}"
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ConvBNError, match=r"bad_m\.(weights\.h5|keras): (not a readable Keras weights file \(truncated or corrupted\)|truncated)"):
        convbn.load_checkpoint(bad, "keras")

