"""The flax format against real flax.linen modules: msgpack both ways, read without flax."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import convbn
from convbn import ConvBNError
from tests._support.assertions import rel_err
from tests.conftest import need
from tests.formats.builders import assert_same_arrays, random_checkpoint, relu_chain

need("jax", "flax")
import jax  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import serialization  # noqa: E402

# float32 conv+BN in JAX vs float64 NumPy, relative to max|y|: measured <= 1e-6 here
# (SEMANTICS.md section 4: JAX conv+eval BN within 7.4e-6 absolute of float64 at |y| ~ 5).
TOL = 1e-5


class Block(nn.Module):
    features: int
    eps: float
    momentum: float
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=self.use_bias, name="conv")(x)
        return nn.BatchNorm(use_running_average=True, epsilon=self.eps, momentum=self.momentum, name="bn")(x)


class Net(nn.Module):
    """Layers ``layerN`` with ``conv`` + ``bn``: convbn's default flax names."""

    widths: tuple[int, ...]
    eps: float = 1e-5
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths[1:], 1):
            x = nn.relu(Block(w, self.eps, self.momentum, name=f"layer{i}")(x))
        return x


class Linen(nn.Module):
    """flax.linen default names: Conv_0, BatchNorm_0, ..., plus a Dense head."""

    @nn.compact
    def __call__(self, x):
        for w in (8, 8, 16):
            x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(w, (3, 3))(x)))
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def _variables(model, x, seed=0):
    """Random trained-looking variables for ``model``. ``jax.eval_shape`` gives the tree without
    running the initializers (``model.init`` compiles each one, tens of seconds on a busy CPU)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    rng = np.random.default_rng(seed)
    stats = jax.tree_util.tree_map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype), shapes["batch_stats"])
    params = jax.tree_util.tree_map(lambda a: (rng.standard_normal(a.shape) * 0.3).astype(a.dtype), shapes["params"])
    return {"params": params, "batch_stats": stats}


def test_reads_linen_default_names_and_writes_them_back(tmp_path):
    model = Linen()
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(np.float32)
    variables = _variables(model, x)
    (tmp_path / "v.msgpack").write_bytes(serialization.to_bytes(variables))
    ckpt = convbn.load_checkpoint(tmp_path / "v.msgpack")
    assert ckpt.format == "flax" and list(ckpt.layers) == ["Conv_0", "Conv_1", "Conv_2"]
    assert [s.reason for s in ckpt.sources.values()] == ["naming"] * 3
    assert ckpt.tensors == {} and list(ckpt.others) == ["Dense_0"] and ckpt.others["Dense_0"].kind == "dense"
    assert (ckpt.layers["Conv_0"].eps, ckpt.layers["Conv_0"].momentum, ckpt.layers["Conv_0"].var_update) == (
        1e-5, 0.99, "biased")
    assert np.array_equal(ckpt.layers["Conv_1"].moving_var, variables["batch_stats"]["BatchNorm_1"]["var"])
    # The conv+BN layers compute what the modules compute (the head is Dense on the mean).
    features = relu_chain(x, ckpt)
    head = features.mean(axis=(1, 2)) @ np.asarray(ckpt.others["Dense_0"].kernel, np.float64)
    head += np.asarray(ckpt.others["Dense_0"].bias, np.float64)
    assert rel_err(model.apply(variables, x), head) < TOL
    # Written back, it restores into the same model bit for bit.
    convbn.save_checkpoint(ckpt, tmp_path / "w.msgpack", "flax")
    restored = serialization.from_bytes(variables, (tmp_path / "w.msgpack").read_bytes())
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(variables), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_written_default_names_load_into_a_real_module(tmp_path):
    ckpt = random_checkpoint(seed=5)
    ckpt.layers["layer3"] = dataclasses.replace(ckpt.layers["layer3"], bias=None)
    convbn.save_checkpoint(ckpt, tmp_path / "c.msgpack", "flax")
    data = (tmp_path / "c.msgpack").read_bytes()
    assert serialization.msgpack_restore(data)["params"]["layer1"]["conv"]["kernel"].shape == (3, 3, 3, 8)
    x = np.random.default_rng(1).standard_normal((2, 6, 6, 3)).astype(np.float32)
    model = Net((3, 8, 16, 16))
    template = _variables(model, x)
    template["params"]["layer3"]["conv"].pop("bias")
    restored = serialization.from_bytes(template, data)
    restored["params"]["layer3"]["conv"]["bias"] = np.zeros(16, np.float32)  # a bias-free conv is a zero bias
    assert rel_err(model.apply(restored, x), relu_chain(x, ckpt)) < TOL


def test_training_state_drops_optimizer_and_step(tmp_path):
    x = np.zeros((1, 5, 5, 3), np.float32)
    variables = _variables(Net((3, 4)), x)
    state = {"step": 12, "params": variables["params"], "batch_stats": variables["batch_stats"],
             "opt_state": {"0": {"mu": variables["params"], "nu": variables["params"]}}}
    (tmp_path / "s.msgpack").write_bytes(serialization.to_bytes(state))
    ckpt = convbn.load_checkpoint(tmp_path / "s.msgpack")
    assert list(ckpt.layers) == ["layer1"] and ckpt.tensors == {}
    assert "step" in ckpt.dropped and "opt_state/0/mu/layer1/conv/kernel" in ckpt.dropped
    assert len(ckpt.dropped) == 1 + 2 * 4


def test_encoder_matches_flax_decoder_for_every_dtype_and_chunking(tmp_path, monkeypatch):
    import ml_dtypes

    import convbn.formats.flax as fx

    ckpt = random_checkpoint(seed=6)
    ckpt.metadata["source_format"] = "flax"
    ckpt.tensors = {
        "params/emb/table": np.arange(40, dtype=np.float16).reshape(8, 5),
        "params/emb/bf": np.linspace(-1, 1, 7).astype(ml_dtypes.bfloat16),
        "params/emb/f64": np.linspace(-1, 1, 3),
        "params/emb/scalar": np.array(3, np.int32),
    }
    monkeypatch.setattr(fx, "_MAX_CHUNK", 64)  # chunk every array above 64 bytes, as flax does above 1 GiB
    convbn.save_checkpoint(ckpt, tmp_path / "t.msgpack", "flax")
    tree = serialization.msgpack_restore((tmp_path / "t.msgpack").read_bytes())
    for name, value in ckpt.tensors.items():
        got = tree["params"]["emb"][name.rsplit("/", 1)[1]]
        assert np.asarray(got).dtype == value.dtype and np.array_equal(np.asarray(got), value), name
    assert np.array_equal(tree["params"]["layer2"]["conv"]["kernel"], ckpt.layers["layer2"].kernel)
    back = convbn.load_checkpoint(tmp_path / "t.msgpack")
    for name in ckpt.layers:
        assert_same_arrays(back.layers[name], ckpt.layers[name])
    for name, value in ckpt.tensors.items():
        assert back.tensors[name].dtype == value.dtype and np.array_equal(back.tensors[name], value)


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_msgpack(tmp_path, cut):
    convbn.save_checkpoint(random_checkpoint(), tmp_path / "c.msgpack", "flax")
    data = (tmp_path / "c.msgpack").read_bytes()
    (tmp_path / "t.msgpack").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ConvBNError, match=r"t.msgpack: truncated flax msgpack file"):
        convbn.load_checkpoint(tmp_path / "t.msgpack")
