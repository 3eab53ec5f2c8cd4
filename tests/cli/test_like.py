"""``convbn convert SRC DST --like MODEL_STATE``: the output takes the names of the user's model.

The models are tests/_support/nets.py's residual block; the reference output is computed
with ``convbn.conv_bn`` on the NumPy backend in float64 from the source values, independently of
any framework. Tolerance: the frameworks run in float32; the same block loaded through
``load_into`` measured at most 6.2e-7 relative (tests/layers/test_load_into.py), and 1e-5 is kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn.cli import main
from tests._support import nets as bm
from tests._support.assertions import rel_err
from tests.conftest import need

TOL = 1e-5


def _run(capsys: Any, *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _reference(values: list[dict[str, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """The block's eval output, float64 NumPy: relu(bn2(conv2(relu(bn1(conv1 x)))) + bn(conv x))."""
    geometry = [{"stride": 2, "padding": 1}, {"stride": 1, "padding": 1}, {"stride": 2, "padding": 0}]
    params = [
        convbn.ConvBNParams(
            kernel=v["kernel"].astype(np.float64), bias=v["bias"].astype(np.float64) if "bias" in v else None,
            gamma=v["gamma"].astype(np.float64), beta=v["beta"].astype(np.float64),
            moving_mean=v["mean"].astype(np.float64), moving_var=v["var"].astype(np.float64), eps=bm.EPS, **g,
        )
        for v, g in zip(values, geometry, strict=True)
    ]
    x64 = x.astype(np.float64)
    h = np.maximum(convbn.conv_bn(x64, params[0], backend="numpy"), 0)
    h = convbn.conv_bn(h, params[1], backend="numpy")
    return np.maximum(h + convbn.conv_bn(x64, params[2], backend="numpy"), 0)  # type: ignore[no-any-return]


@pytest.fixture
def flax_source(tmp_path: Path) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """Block values with conv biases as a flax msgpack file (written without JAX), layers L0-L2."""
    need("msgpack")
    values = bm.random_values(seed=3, bias=True)
    path = tmp_path / "src.msgpack"
    convbn.save_checkpoint(bm.checkpoint_of(values), path, "flax")
    return path, values


@pytest.mark.needs("torch")
def test_torch_like_file_gives_a_state_dict_the_model_loads_strictly(tmp_path, flax_source, capsys):
    import torch

    src, values = flax_source
    like = tmp_path / "mine.pt"
    bm.torch_save(bm.torch_build(), like)
    dst = tmp_path / "out.pt"
    code, out, err = _run(capsys, "convert", src, dst, "--like", like, "--verify")
    assert code == 0, err
    assert f"layers take the names of {like}: L0 -> conv1, L1 -> conv2, L2 -> downsample.0" in out
    assert out.count("folded into beta") == 3 and out.rstrip().endswith("verified: all 3 layer(s) within tolerance")
    state = torch.load(dst, weights_only=True)
    assert list(state) == list(torch.load(like, weights_only=True))  # the like file's names, in its order
    model = bm.torch_build()
    model.load_state_dict(state, strict=True)
    x = bm.x_input()
    assert rel_err(bm.torch_run(model, x), _reference(values, x)) <= TOL


@pytest.mark.needs("torch", "keras", "h5py")
def test_keras_like_file_loads_with_load_weights_and_keeps_the_head(tmp_path, capsys):
    values = bm.random_values(seed=4)
    src = tmp_path / "src.pt"
    bm.torch_save(bm.torch_assign(bm.torch_build(), values), src)
    mine = bm.keras_build(head=True)
    like = tmp_path / "mine.weights.h5"
    mine.save_weights(like)
    head = [w.copy() for w in mine.get_layer("head").get_weights()]
    dst = tmp_path / "out.weights.h5"
    code, out, err = _run(capsys, "convert", src, dst, "--like", like, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["like"]["matched"] == {"conv1": "conv1", "conv2": "conv2", "down_conv": "downsample.0"}
    model = bm.keras_build(head=True)
    model.load_weights(dst)  # Keras's own loader: every layer's weights must be there
    assert all(np.array_equal(a, b) for a, b in zip(model.get_layer("head").get_weights(), head, strict=True))
    import keras

    trunk = keras.Model(model.input, model.get_layer("block_out").output)
    x = bm.x_input()
    assert rel_err(bm.keras_run(trunk, x), _reference(values, x)) <= TOL


@pytest.mark.needs("torch", "flax")
def test_flax_like_file_restores_with_from_bytes(tmp_path, capsys):
    from flax import serialization

    values = bm.random_values(seed=5)
    src = tmp_path / "src.pt"
    bm.torch_save(bm.torch_assign(bm.torch_build(), values), src)
    module, variables = bm.flax_build()
    like = tmp_path / "mine.msgpack"
    bm.flax_save(variables, like)
    dst = tmp_path / "out.msgpack"
    code, _, err = _run(capsys, "convert", src, dst, "--like", like)
    assert code == 0, err
    restored = serialization.from_bytes(variables, dst.read_bytes())
    x = bm.x_input()
    assert rel_err(bm.flax_run(module, restored, x), _reference(values, x)) <= TOL


@pytest.mark.needs("msgpack")
def test_strict_refuses_a_partial_match_and_no_strict_keeps_the_like_values(tmp_path, capsys):
    values = bm.random_values(seed=6)
    src = tmp_path / "src.msgpack"
    convbn.save_checkpoint(bm.checkpoint_of(values[:2]), src, "flax")  # no shortcut layer
    like = tmp_path / "mine.msgpack"
    mine = bm.random_values(seed=7)
    convbn.save_checkpoint(bm.checkpoint_of(mine), like, "flax")
    dst = tmp_path / "out.msgpack"
    code, out, err = _run(capsys, "convert", src, dst, "--like", like)
    assert (code, out) == (2, "")
    assert "conforming to the like file with strict=True" in err and "missing (model layers without a checkpoint layer): L2" in err
    assert not dst.exists()
    code, out, err = _run(capsys, "convert", src, dst, "--like", like, "--no-strict")
    assert code == 0, err
    assert "missing from SRC (kept as in the like file): L2" in out
    written = convbn.load_checkpoint(dst)
    assert list(written.layers) == ["L0", "L1", "L2"]
    assert np.array_equal(written.layers["L1"].kernel, values[1]["kernel"])
    assert np.array_equal(written.layers["L2"].kernel, mine[2]["kernel"])


@pytest.mark.parametrize(("dst_name", "extra", "message"), [
    # A torch DST needs torch before anything else is judged.
    pytest.param("out.pt", [], "with --like, DST must be in the like file's format", marks=pytest.mark.needs("torch")),
    ("out.msgpack", ["--no-conv-bias"], "--no-conv-bias does not apply with --like"),
    ("mine.msgpack", ["--force"], "DST must differ from the --like file"),
])
def test_like_errors(tmp_path, flax_source, capsys, dst_name, extra, message):
    src, values = flax_source
    like = tmp_path / "mine.msgpack"
    convbn.save_checkpoint(bm.checkpoint_of(values), like, "flax")
    before = like.read_bytes()
    code, out, err = _run(capsys, "convert", src, tmp_path / dst_name, "--like", like, *extra)
    assert (code, out) == (2, "") and message in err
    assert like.read_bytes() == before


def test_like_needs_a_format_that_keeps_names(tmp_path, flax_source, capsys):
    src, values = flax_source
    like = tmp_path / "mine.safetensors"
    convbn.save_checkpoint(bm.checkpoint_of(values), like, "safetensors")
    code, _, err = _run(capsys, "convert", src, tmp_path / "out.safetensors", "--like", like)
    assert code == 2 and "--like takes a state file in one of ['torch', 'keras', 'flax']" in err
    code, _, err = _run(capsys, "convert", src, tmp_path / "out.msgpack", "--like", tmp_path / "none.msgpack")
    assert code == 2 and "--like must name an existing state file" in err
