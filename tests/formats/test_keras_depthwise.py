"""DepthwiseConv2D in Keras 3 weight files, with Keras's own load_weights and layers as the oracle."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import convbn
from tests.conftest import need

pytestmark = pytest.mark.needs("torch")


def _randomize(model: Any) -> Any:
    from tests._support.whole_nets import randomize

    return randomize(model)


def test_like_a_keras_file_with_depthwise_convs_writes_keras_depthwise_kernels(tmp_path):
    """convert --like a Keras .weights.h5 whose model has DepthwiseConv2D layers: the torch
    depthwise kernel (C*m, 1, kh, kw) goes into the like file's (kh, kw, C, m) depthwise_kernel, so
    Keras's own load_weights takes the file and the model computes torch's outputs."""
    need("h5py")
    need("keras")
    import keras
    import torch
    from torch import nn

    from convbn.cli import main

    # The Conv2D comes first: a .weights.h5 without a config pairs each class's k-th conv with the
    # next BatchNorm of its width, which a DepthwiseConv2D first would defeat (see the xfail below).
    model = _randomize(nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(16),
    ))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    layers = keras.layers

    def build() -> Any:
        return keras.Sequential([
            keras.Input((5, 5, 4)),
            layers.Conv2D(8, 3, padding="same", groups=2, use_bias=False), layers.BatchNormalization(epsilon=1e-5),
            layers.ReLU(), layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False),
            layers.BatchNormalization(epsilon=1e-5),
        ])

    build().save_weights(tmp_path / "like.weights.h5")
    out = tmp_path / "out.weights.h5"
    assert main(["convert", str(tmp_path / "m.pt"), str(out), "--like", str(tmp_path / "like.weights.h5"),
                 "--verify"]) == 0
    k = build()
    k.load_weights(out)
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 5)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(k(x.transpose(0, 2, 3, 1), training=False))
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_a_keras_file_with_depthwise_convs_converts_back_to_keras(tmp_path):
    """A Keras-written .weights.h5 with DepthwiseConv2D layers (one with a BatchNorm, one lone with
    a bias) converted to .weights.h5 keeps each (kh, kw, C, m) depthwise_kernel, so Keras's own
    load_weights takes the file and the model computes what the source model did."""
    need("h5py")
    need("keras")
    import keras

    layers = keras.layers

    def build() -> Any:
        return keras.Sequential([
            keras.Input((5, 5, 4)),
            layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False, name="depthwise_conv2d"),
            layers.BatchNormalization(name="batch_normalization"), layers.ReLU(),
            layers.DepthwiseConv2D(3, padding="same", name="depthwise_conv2d_1"),
        ])

    rng = np.random.default_rng(0)
    source = build()
    for layer in source.layers:
        layer.set_weights([rng.uniform(0.5, 1.5, w.shape) if "variance" in w.path else rng.standard_normal(w.shape)
                           for w in layer.weights])
    source.save_weights(tmp_path / "src.weights.h5")
    x = rng.standard_normal((2, 5, 5, 4)).astype(np.float32)
    expected = np.asarray(source(x, training=False))
    # Two DepthwiseConv2Ds of width 8 and one BatchNorm: the file cannot say whose it is (see below).
    ckpt = convbn.load_checkpoint(tmp_path / "src.weights.h5", pairs={"depthwise_conv2d": "batch_normalization"})
    convbn.save_checkpoint(ckpt, tmp_path / "out.weights.h5", "keras")
    k = build()
    k.load_weights(tmp_path / "out.weights.h5")
    np.testing.assert_array_equal(np.asarray(k(x, training=False)), expected)


def _save(tmp_path: Any, *layers_: Any) -> Any:
    import keras

    model = keras.Sequential([keras.Input((5, 5, 4)), *layers_])
    rng = np.random.default_rng(1)
    for layer in model.layers:
        layer.set_weights([rng.uniform(0.5, 1.5, w.shape) if "variance" in w.path else rng.standard_normal(w.shape)
                           for w in layer.weights])
    model.save_weights(tmp_path / "k.weights.h5")
    return model


def _assert_loads_back(ckpt: Any, model: Any, tmp_path: Any) -> None:
    """The checkpoint written as .weights.h5 loads into a fresh copy of ``model`` with Keras's own
    load_weights, and that copy computes exactly what ``model`` does."""
    import keras

    convbn.save_checkpoint(ckpt, tmp_path / "out.weights.h5", "keras")
    back = keras.Sequential([keras.Input((5, 5, 4)), *(type(layer).from_config(layer.get_config())
                                                       for layer in model.layers)])
    back.load_weights(tmp_path / "out.weights.h5")
    x = np.random.default_rng(2).standard_normal((2, 5, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(back(x, training=False)), np.asarray(model(x, training=False)))


def test_a_weights_file_with_depthwise_before_conv_of_one_width_is_refused_not_guessed(tmp_path):
    """DepthwiseConv2D+BN before a Conv2D+BN of the same width: a .weights.h5 orders layers only
    within each class, so either conv may own either BatchNorm. The old rule (k-th conv with the
    next BatchNorm of its width) gave the Conv2D the depthwise conv's BatchNorm; now the file is
    refused, naming the width's layers and --pair, and the explicit pairs load it exactly."""
    need("h5py")
    need("keras")
    import keras

    layers = keras.layers
    model = _save(tmp_path, layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False,
                                                   name="depthwise_conv2d"),
                  layers.BatchNormalization(name="batch_normalization"),
                  layers.Conv2D(8, 1, use_bias=False, name="conv2d"), layers.BatchNormalization(name="batch_normalization_1"))
    with pytest.raises(convbn.ConvBNError, match=r"width 8 .*Conv2D, DepthwiseConv2D.*'conv2d'.*--pair") as refused:
        convbn.load_checkpoint(tmp_path / "k.weights.h5")
    assert "'batch_normalization_1'" in str(refused.value)
    ckpt = convbn.load_checkpoint(tmp_path / "k.weights.h5", pairs={
        "depthwise_conv2d": "batch_normalization", "conv2d": "batch_normalization_1"})
    _assert_loads_back(ckpt, model, tmp_path)


def test_a_weights_file_with_a_conv_more_than_batchnorms_of_its_width_is_refused(tmp_path):
    """Two Conv2Ds of width 8 and one BatchNorm of width 8: which conv the BatchNorm follows is not
    in a .weights.h5, so the file is refused rather than paired with the first conv."""
    need("h5py")
    need("keras")
    import keras

    layers = keras.layers
    _save(tmp_path, layers.Conv2D(8, 3, padding="same", name="conv2d"), layers.ReLU(),
          layers.Conv2D(8, 1, use_bias=False, name="conv2d_1"), layers.BatchNormalization(name="batch_normalization"))
    with pytest.raises(convbn.ConvBNError, match=r"1 BatchNorm\(s\) and 2 Conv2D\(s\)"):
        convbn.load_checkpoint(tmp_path / "k.weights.h5")


def test_a_weights_file_with_one_conv_class_per_width_still_pairs_by_class_order(tmp_path):
    """Conv2D+BN of widths 8 and 16 and a DepthwiseConv2D+BN of width 24: each width's
    BatchNorms can only follow one class, with as many layers as BatchNorms, so the file pairs
    without flags and Keras's load_weights takes the converted file with equal outputs."""
    need("h5py")
    need("keras")
    import keras

    layers = keras.layers
    model = _save(tmp_path, layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv2d"),
                  layers.BatchNormalization(name="batch_normalization"),
                  layers.DepthwiseConv2D(3, depth_multiplier=3, padding="same", use_bias=False, name="depthwise_conv2d"),
                  layers.BatchNormalization(name="batch_normalization_1"),
                  layers.Conv2D(16, 1, use_bias=False, name="conv2d_1"), layers.BatchNormalization(name="batch_normalization_2"))
    ckpt = convbn.load_checkpoint(tmp_path / "k.weights.h5")
    assert {(s.conv_name, s.bn_name) for s in ckpt.sources.values()} == {
        ("conv2d", "batch_normalization"), ("depthwise_conv2d", "batch_normalization_1"),
        ("conv2d_1", "batch_normalization_2")}
    _assert_loads_back(ckpt, model, tmp_path)
