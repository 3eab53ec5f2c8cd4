"""convbn's own safetensors reader/writer against the safetensors package."""

from __future__ import annotations

import json

import numpy as np

import convbn
from tests.conftest import need_module
from tests.formats.builders import random_checkpoint

safetensors_numpy = need_module("safetensors.numpy")
from safetensors import safe_open  # noqa: E402


def test_the_safetensors_package_reads_what_convbn_writes(tmp_path):
    ckpt = random_checkpoint()
    ckpt.tensors["head.weight"] = np.arange(12, dtype=np.float64).reshape(3, 4)
    ckpt.extras["layer1"] = {"num_batches_tracked": np.array(5, np.int64)}
    convbn.save_checkpoint(ckpt, tmp_path / "m.safetensors", "safetensors")
    loaded = safetensors_numpy.load_file(tmp_path / "m.safetensors")
    expected = {f"{name}/{field}": value for name, p in ckpt.layers.items() for field, value in p.arrays().items()}
    expected["head.weight"] = ckpt.tensors["head.weight"]
    expected["layer1/num_batches_tracked"] = np.array(5, np.int64)
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value), key
    with safe_open(tmp_path / "m.safetensors", framework="numpy") as f:
        meta = f.metadata()
    assert meta["convbn"] == "1" and json.loads(meta["convbn.layers"])[1]["name"] == "layer2"


def test_a_plain_state_dict_file_reads_as_torch(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "features.0.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),  # OIHW
        "features.0.bias": rng.standard_normal(8).astype(np.float32),
        "features.1.weight": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "features.1.bias": rng.standard_normal(8).astype(np.float32),
        "features.1.running_mean": rng.standard_normal(8).astype(np.float32),
        "features.1.running_var": rng.uniform(0.5, 2, 8).astype(np.float32),
        "features.1.num_batches_tracked": np.array(3, np.int64),
        "classifier.weight": rng.standard_normal((2, 8)).astype(np.float32),
    }
    safetensors_numpy.save_file(state, tmp_path / "hf.safetensors", metadata={"format": "pt"})
    ckpt = convbn.load_checkpoint(tmp_path / "hf.safetensors")
    assert ckpt.format == "safetensors" and list(ckpt.layers) == ["features.0"]
    p = ckpt.layers["features.0"]
    assert np.array_equal(p.kernel, state["features.0.weight"].transpose(2, 3, 1, 0))
    assert np.array_equal(p.moving_var, state["features.1.running_var"]) and p.eps == 1e-5
    assert ckpt.tensors == {} and ckpt.others["classifier"].kind == "dense"
    assert np.array_equal(ckpt.others["classifier"].kernel, state["classifier.weight"].T)
    assert ckpt.notes[0] == "no convbn metadata: read as a torch state_dict (torch names, OIHW kernels)"
