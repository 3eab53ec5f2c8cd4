"""transformers' ResNet as third-party code: its PyTorch model's weights, loaded by convbn into its
TensorFlow (tf_keras) and Flax models, reproduce the PyTorch ``last_hidden_state``. For the TF model,
transformers' own ``from_pt=True`` converter is a second oracle, variable by variable (its Flax
``from_pt=True`` does not reproduce the PyTorch output in this setup, so it is no oracle there).

transformers 4.x is the last line with the TF and Flax models; tox's cross env installs it.
"""

from __future__ import annotations

import numpy as np
import pytest

import convbn
from tests._support.assertions import rel_err

pytestmark = pytest.mark.needs("torch", "tensorflow", "jax", "flax", "tf_keras", "transformers")

# float32 end to end through a dozen conv+BN layers: a few ulps per layer, measured ~5e-7.
TOL = 1e-5

CONFIGS = {
    # embedding 8 -> 32: the first bottleneck's conv3 and its shortcut are both 1x1 8 -> 32.
    "bottleneck": dict(embedding_size=8, hidden_sizes=[32, 32], depths=[2, 1], layer_type="bottleneck"),
    "basic": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic"),
}


def _torch_model(kind: str, seed: int):  # type: ignore[no-untyped-def]
    import torch
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(seed)
    model = ResNetModel(ResNetConfig(**CONFIGS[kind])).eval()
    with torch.no_grad():  # non-trivial statistics, so that a mis-assigned BatchNorm shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def source(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    import torch

    kind = request.param
    model = _torch_model(kind, seed=len(kind))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).last_hidden_state.numpy()
    root = tmp_path_factory.mktemp(kind)
    state = root / "resnet.pt"
    torch.save(model.state_dict(), state)
    model.save_pretrained(root / "hf")
    return kind, x.numpy(), expected, state, root / "hf"


def test_into_the_tf_model(source) -> None:  # type: ignore[no-untyped-def]
    from transformers import ResNetConfig, TFResNetModel

    kind, x, expected, state, hf = source
    model = TFResNetModel(ResNetConfig(**CONFIGS[kind]))
    model(x)  # builds the variables
    before = model(x, training=False).last_hidden_state.numpy()
    report = convbn.load_into(model, state)
    assert report.ok, report.summary()
    got = model(x, training=False).last_hidden_state.numpy()
    assert rel_err(got, expected) < TOL
    assert rel_err(before, expected) > 0.1  # the load changed the model: random weights do not pass

    oracle = TFResNetModel.from_pretrained(hf, from_pt=True)
    assert rel_err(oracle(x, training=False).last_hidden_state.numpy(), expected) < TOL
    # Variable names differ in their first part only (each model instance's own name).
    ours = {w.name.split("/", 1)[1]: w.numpy() for w in model.weights}
    theirs = {w.name.split("/", 1)[1]: w.numpy() for w in oracle.weights}
    assert ours.keys() == theirs.keys()
    worst = max(rel_err(ours[k], theirs[k]) for k in ours)
    assert worst < 1e-6, worst


def test_into_the_flax_model(source) -> None:  # type: ignore[no-untyped-def]
    from transformers import FlaxResNetModel, ResNetConfig

    kind, x, expected, state, _ = source
    model = FlaxResNetModel(ResNetConfig(**CONFIGS[kind]), seed=3)
    before = np.asarray(model(x, train=False).last_hidden_state)
    report = convbn.load_into(model.params, state)
    assert report.ok, report.summary()
    got = np.asarray(model(x, params=report.variables, train=False).last_hidden_state)
    assert rel_err(got, expected) < TOL
    assert rel_err(before, expected) > 0.1
