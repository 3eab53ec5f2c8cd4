"""bfloat16 in Keras 3 weight files, with Keras's own loader and writer as the oracle."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import convbn
from tests.conftest import need

pytestmark = pytest.mark.needs("torch")


def _randomize(model: Any) -> Any:
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) * 2 - 1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=gen) * 2 - 1)
    return model.eval()


def test_a_bfloat16_keras_file_reads_back_and_loads_into_keras(tmp_path):
    """Keras 3 stores a bfloat16 variable as 2-byte opaque data with the attribute dtype='bfloat16'
    and reads it back only with that attribute; convbn's reader must read such files (its own and
    Keras's) as bfloat16, not crash on the opaque dtype."""
    need("h5py")
    need("keras")
    import keras
    import torch
    from torch import nn

    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))).to(torch.bfloat16)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    convbn.save_checkpoint(convbn.load_checkpoint(tmp_path / "m.pt"), tmp_path / "m.weights.h5", "keras")
    back = convbn.load_checkpoint(tmp_path / "m.weights.h5").layers["0"]
    assert str(np.asarray(back.moving_var).dtype) == "bfloat16"
    want = model[1].running_var.float().numpy()
    np.testing.assert_array_equal(np.asarray(back.moving_var, np.float32), want)

    layers = keras.layers
    k = keras.Sequential([keras.Input((5, 5, 3)), layers.Conv2D(4, 3, use_bias=False, dtype="bfloat16"),
                          layers.BatchNormalization(dtype="bfloat16")])
    k.load_weights(tmp_path / "m.weights.h5")
    np.testing.assert_array_equal(np.asarray(k.layers[1].moving_variance, np.float32), want)
    # A file Keras wrote reads too.
    k.save_weights(tmp_path / "k.weights.h5")
    theirs = convbn.load_checkpoint(tmp_path / "k.weights.h5")
    (only,) = theirs.layers.values()
    np.testing.assert_array_equal(np.asarray(only.moving_var, np.float32), want)
