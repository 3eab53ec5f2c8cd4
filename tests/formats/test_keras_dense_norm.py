"""A Dense (or Conv2DTranspose) followed by a BatchNormalization in a .keras archive's graph is one
layer with its BatchNorm, as convbn's own .weights.h5 record pairs it: converting a torch Linear +
BatchNorm1d to .keras and verifying compares like with like."""

from __future__ import annotations

import numpy as np
import pytest

import convbn
from tests.conftest import need


def test_a_keras_archive_pairs_a_dense_layer_with_the_batchnorm_after_it(tmp_path):
    need("keras")
    import keras

    layers = keras.layers
    model = keras.Sequential([
        keras.Input((6,)), layers.Dense(5, name="fc"), layers.BatchNormalization(name="fc_bn"), layers.ReLU(),
        layers.Dense(2, name="head"),
    ])
    rng = np.random.default_rng(0)
    for layer in model.layers:
        layer.set_weights([rng.uniform(0.5, 1.5, w.shape) if "variance" in w.path else rng.standard_normal(w.shape)
                           for w in layer.weights])
    model.save(tmp_path / "k.keras")
    archive = convbn.load_checkpoint(tmp_path / "k.keras")
    norm = archive.others["fc"].norm
    assert norm is not None and "fc_bn" not in archive.others
    np.testing.assert_array_equal(norm.moving_var, np.asarray(model.layers[1].moving_variance))
    assert norm.eps == pytest.approx(model.layers[1].epsilon)


@pytest.mark.needs("torch")
def test_torch_linear_and_batchnorm1d_to_a_keras_archive_verifies(tmp_path):
    need("h5py")
    import torch
    from torch import nn

    from convbn.cli import main

    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
        model[1].running_mean.uniform_(-1, 1)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert main(["convert", str(tmp_path / "m.pt"), str(tmp_path / "m.keras"), "--verify"]) == 0
    back = convbn.load_checkpoint(tmp_path / "m.keras")
    assert back.others["0"].norm is not None
    np.testing.assert_array_equal(back.others["0"].norm.moving_var, model[1].running_var.numpy())
