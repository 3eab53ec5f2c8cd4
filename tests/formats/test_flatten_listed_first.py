"""A dense layer listed before the convs that feed it (``self.fc`` registered before
``self.conv``) may read their flattened map: the torch reader cannot tell, so it refuses to move
the layer between NCHW and NHWC orders until the map is stated, instead of writing the rows
unpermuted (a Keras model with Flatten then computed something else, with no note)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import convbn
from tests.conftest import need

pytestmark = pytest.mark.needs("torch")


def _net() -> Any:
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4 * 2 * 3, 2)  # registered first, runs last
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: Any) -> Any:
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    return Net().eval()


def test_a_dense_layer_listed_before_its_convs_is_undecided_and_converts_once_stated(tmp_path):
    need("keras")
    import keras
    import torch

    from convbn.checkpoint import parse_flatten

    model = _net()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    ckpt = convbn.load_checkpoint(tmp_path / "m.pt")
    assert ckpt.others["fc"].flat_undecided == (("in", "chw"),)
    with pytest.raises(convbn.ConvBNError, match=r"dense layer 'fc': whether its input"):
        convbn.save_checkpoint(ckpt, tmp_path / "m.weights.h5", "keras")
    convbn.save_checkpoint(ckpt.with_flatten(parse_flatten(["fc=2x3x4"])), tmp_path / "m.weights.h5", "keras")
    layers = keras.layers
    k = keras.Sequential([keras.Input((2, 3, 3)), layers.Conv2D(4, 3, padding="same", activation="relu"),
                          layers.Flatten(), layers.Dense(2)])
    k.load_weights(tmp_path / "m.weights.h5")
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 3)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = np.asarray(k(x.transpose(0, 2, 3, 1)))
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_an_mlp_without_convs_stays_decided(tmp_path):
    import torch
    from torch import nn

    torch.save(nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2)).state_dict(), tmp_path / "m.pt")
    ckpt = convbn.load_checkpoint(tmp_path / "m.pt")
    assert all(layer.flat_undecided == () for layer in ckpt.others.values())
