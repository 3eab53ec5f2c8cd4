"""--verify of dense layers after a flatten: a torch -> Keras/Flax/TF conversion with --flatten
permutes the rows (Keras's own layers give torch's outputs), and verify compares each side in its
own feature order: the correct file passes, rows left unpermuted or permuted twice fail."""

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


def _flatten_net() -> Any:
    from torch import nn

    return _randomize(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 2 * 3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2),
    ))


@pytest.mark.parametrize("target", ["m.weights.h5", "m.msgpack", "model.ckpt"])
def test_verify_accepts_a_stated_flatten_it_converted_correctly(tmp_path, target):
    """torch -> an NHWC format with --flatten permutes the dense layer's rows (the framework's own
    layers give torch's outputs, checked in Keras below); --verify must compare the layer in each
    side's order, not refuse the correct file because the target reads its rows as undecided."""
    need("h5py" if target.endswith("h5") else "msgpack" if target.endswith("msgpack") else "tensorflow")
    import torch

    from convbn.cli import main

    model = _flatten_net()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    rc = main(["convert", str(tmp_path / "m.pt"), str(tmp_path / target), "--flatten", "4=2x3x4", "--verify"])
    assert rc == 0
    if target.endswith("h5"):
        need("keras")
        import keras

        layers = keras.layers
        k = keras.Sequential([
            keras.Input((2, 3, 3)), layers.Conv2D(4, 3, padding="same"), layers.BatchNormalization(epsilon=1e-5),
            layers.ReLU(), layers.Flatten(), layers.Dense(5), layers.BatchNormalization(epsilon=1e-5), layers.ReLU(),
            layers.Dense(2),
        ])
        k.load_weights(tmp_path / target)
        x = np.random.default_rng(0).standard_normal((2, 3, 2, 3)).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        got = np.asarray(k(x.transpose(0, 2, 3, 1), training=False))
        assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_verify_still_fails_a_dense_layer_written_without_its_flatten_permutation(tmp_path):
    """The other side of the check above: rows left in torch's (c, h, w) order in a Keras file, or
    permuted twice, are not what Keras's Flatten feeds them, and verify says so."""
    need("h5py")
    import dataclasses

    import torch

    from convbn.checkpoint import parse_flatten
    from convbn.convert import verify_checkpoint

    torch.save(_flatten_net().state_dict(), tmp_path / "m.pt")
    source = convbn.load_checkpoint(tmp_path / "m.pt").with_flatten(parse_flatten(["4=2x3x4"]))
    convbn.save_checkpoint(source, tmp_path / "m.weights.h5", "keras")
    good = convbn.load_checkpoint(tmp_path / "m.weights.h5")
    assert all(c.ok for c in verify_checkpoint(source, good))
    layer = good.others["4"]
    for wrong in (source.others["4"].kernel,  # not permuted
                  np.asarray(source.others["4"].as_order("hwc").kernel).reshape(2, 3, 4, 5).transpose(2, 0, 1, 3)
                  .reshape(24, 5)):  # permuted once more
        bad = dataclasses.replace(good, others={**good.others, "4": dataclasses.replace(layer, kernel=np.asarray(wrong))})
        checks = {c.source: c for c in verify_checkpoint(source, bad)}
        assert not checks["4"].ok and checks["4"].max_rel > 1e-2
