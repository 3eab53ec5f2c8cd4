"""bfloat16 in Keras 3 weight files, with Keras's own loader and writer as the oracle."""

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
