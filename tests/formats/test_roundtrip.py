"""Keras 3 -> torch -> flax -> Keras 3 with real models of each framework.

Each step is checked on the model's own output, not only on convbn's arrays: the torch module, the
flax module and the Keras model built from the converted files compute what the original Keras
model computes, and the weights come back bit for bit.
"""

from __future__ import annotations

import numpy as np

import convbn
from convbn.convert import verify_checkpoint
from tests._support.assertions import rel_err
from tests.conftest import need
from tests.formats.builders import assert_same_arrays

need("torch", "jax", "flax", "keras", "h5py")
import jax  # noqa: E402
import keras  # noqa: E402
import torch  # noqa: E402
from flax import linen, serialization  # noqa: E402

# Two float32 frameworks on a 3-layer conv+BN+ReLU chain, relative to max|y|: measured <= 2e-6
# (one layer: torch vs TF 8.1e-6 absolute at |y| ~ 5 in SEMANTICS.md section 4).
TOL = 1e-5
WIDTHS = (3, 8, 16, 8)
EPS, MOMENTUM = 1e-3, 0.99  # Keras defaults


def _keras_model(seed=0):
    rng = np.random.default_rng(seed)
    model = keras.Sequential([keras.Input((8, 8, WIDTHS[0]))])
    for i, w in enumerate(WIDTHS[1:], 1):
        model.add(keras.layers.Conv2D(w, 3, padding="same", use_bias=i != 2, name=f"conv{i}"))
        model.add(keras.layers.BatchNormalization(name=f"bn{i}"))
        model.add(keras.layers.ReLU())
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.get_weights()[0].shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n).astype("float32"), rng.standard_normal(n).astype("float32"),
                               (rng.standard_normal(n) * 0.3).astype("float32"),
                               rng.uniform(0.5, 2, n).astype("float32")])
    return model


class TorchNet(torch.nn.Module):
    def __init__(self, names):
        super().__init__()
        self.names = names
        for (name, cin, cout, bias) in names:
            block = torch.nn.Module()
            block.conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
            block.bn = torch.nn.BatchNorm2d(cout, eps=EPS, momentum=1 - MOMENTUM)
            self.add_module(name, block)

    def forward(self, x):
        for (name, *_) in self.names:
            block = getattr(self, name)
            x = torch.relu(block.bn(block.conv(x)))
        return x


class FlaxNet(linen.Module):
    names: tuple

    @linen.compact
    def __call__(self, x):
        # Submodules named <L> holding "conv" and "bn": convbn's flax template params/<L>/conv, ...
        for (name, _, cout, bias) in self.names:
            x = Block(cout, bias, name=name)(x)
        return x


class Block(linen.Module):
    features: int
    use_bias: bool

    @linen.compact
    def __call__(self, x):
        x = linen.Conv(self.features, (3, 3), padding="SAME", use_bias=self.use_bias, name="conv")(x)
        x = linen.BatchNorm(use_running_average=True, epsilon=EPS, momentum=MOMENTUM, name="bn")(x)
        return linen.relu(x)


def test_keras_to_torch_to_flax_to_keras_reproduces_the_model(tmp_path):
    original = _keras_model()
    original.save_weights(tmp_path / "a.weights.h5")
    x = np.random.default_rng(1).standard_normal((2, 8, 8, WIDTHS[0])).astype(np.float32)
    expected = original.predict(x, verbose=0)

    source = convbn.load_checkpoint(tmp_path / "a.weights.h5")
    names = tuple((name, p.in_channels, p.out_channels, p.bias is not None) for name, p in source.layers.items())
    assert [n[0] for n in names] == ["conv1", "conv2", "conv3"]

    # Keras -> torch: a real torch module loads it strictly and computes the same.
    convbn.save_checkpoint(source, tmp_path / "b.pt", "torch")
    net = TorchNet(names).eval()
    net.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True), strict=True)
    with torch.no_grad():
        y_torch = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    assert rel_err(y_torch, expected) < TOL

    # torch -> flax: a real linen module restores it with from_bytes and computes the same.
    from_torch = convbn.load_checkpoint(tmp_path / "b.pt", eps=EPS, momentum=MOMENTUM)
    convbn.save_checkpoint(from_torch, tmp_path / "c.msgpack", "flax")
    model = FlaxNet(names)
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    variables = serialization.from_bytes(template, (tmp_path / "c.msgpack").read_bytes())
    assert rel_err(model.apply(variables, x), expected) < TOL

    # flax -> Keras: a fresh Keras model loads it and predicts the original's output exactly.
    from_flax = convbn.load_checkpoint(tmp_path / "c.msgpack", eps=EPS, momentum=MOMENTUM)
    convbn.save_checkpoint(from_flax, tmp_path / "d.weights.h5", "keras")
    fresh = _keras_model(seed=99)
    fresh.load_weights(tmp_path / "d.weights.h5")
    assert np.array_equal(fresh.predict(x, verbose=0), expected)

    # No folding anywhere: every array is bit-identical after the full circle, and --verify agrees.
    back = convbn.load_checkpoint(tmp_path / "d.weights.h5", eps=EPS, momentum=MOMENTUM)
    for p, q in zip(source.layers.values(), back.layers.values(), strict=True):
        assert_same_arrays(q, p)
    for step in (from_torch, from_flax, back):
        assert all(c.ok and c.max_abs == 0.0 for c in verify_checkpoint(source, step))


def test_folding_on_the_way_is_verified_on_the_real_model(tmp_path):
    original = _keras_model(seed=2)
    original.save_weights(tmp_path / "a.weights.h5")
    x = np.random.default_rng(3).standard_normal((2, 8, 8, WIDTHS[0])).astype(np.float32)
    expected = original.predict(x, verbose=0)
    source = convbn.load_checkpoint(tmp_path / "a.weights.h5")
    for into in ("beta", "moving_mean"):
        convbn.save_checkpoint(source, tmp_path / f"{into}.pt", "torch", fold_bias=into)
        names = tuple((name, p.in_channels, p.out_channels, False) for name, p in source.layers.items())
        net = TorchNet(names).eval()
        net.load_state_dict(torch.load(tmp_path / f"{into}.pt", weights_only=True), strict=True)
        with torch.no_grad():
            y = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
        assert rel_err(y, expected) < TOL, into
