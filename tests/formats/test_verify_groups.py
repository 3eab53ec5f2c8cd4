"""--verify of a lone depthwise conv into a format that stores no groups (a torch state_dict): the
converted side runs with the source's groups, as it runs with the source's stride and padding, so
the correct file passes (torch's own Conv2d(groups=C) computes Keras's DepthwiseConv2D)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import need

pytestmark = pytest.mark.needs("torch")


def test_a_lone_depthwise_conv_from_keras_to_torch_verifies_and_computes_keras_outputs(tmp_path):
    need("keras")
    import keras
    import torch
    from torch import nn

    from convbn.cli import main

    layers = keras.layers
    model = keras.Sequential([keras.Input((5, 5, 4)), layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")])
    rng = np.random.default_rng(0)
    model.layers[0].set_weights([rng.standard_normal(w.shape) for w in model.layers[0].weights])
    model.save(tmp_path / "k.keras")
    assert main(["convert", str(tmp_path / "k.keras"), str(tmp_path / "m.pt"), "--verify"]) == 0
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=4)
    (name,) = {k.rsplit(".", 1)[0] for k in torch.load(tmp_path / "m.pt", weights_only=True)}
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    conv.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in state.items()}, strict=True)
    x = rng.standard_normal((2, 5, 5, 4)).astype(np.float32)
    with torch.no_grad():
        got = conv(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    expected = np.asarray(model(x))
    assert name and np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))
