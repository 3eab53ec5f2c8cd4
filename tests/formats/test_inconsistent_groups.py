"""A BatchNorm or conv whose tensors disagree on the channel count is an error naming the tensor and
both lengths, not a group quietly left unpaired (the file then converted without it, exit 0)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
import convbn.cli
from tests.conftest import need
from tests.formats.hostile import cli_refuses, refused


def _state(override: dict[str, tuple[int, ...]] | None = None, only: str = "") -> dict[str, np.ndarray]:
    """A torch-named conv ``l.conv`` (4 out channels) + BatchNorm ``l.bn``, which pair by name;
    ``override`` reshapes tensors, ``only`` keeps the names that start with it."""
    rng = np.random.default_rng(0)
    shapes = {"l.conv.weight": (4, 3, 3, 3), "l.conv.bias": (4,), "l.bn.weight": (4,), "l.bn.bias": (4,),
              "l.bn.running_mean": (4,), "l.bn.running_var": (4,)}
    shapes.update(override or {})
    return {k: rng.uniform(0.5, 1.5, s).astype(np.float32) for k, s in shapes.items() if k.startswith(only)}


def _save_torch(path: Path, state: dict[str, np.ndarray]) -> Path:
    need("torch")
    import torch

    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    return path


def _save_safetensors(path: Path, state: dict[str, np.ndarray]) -> Path:
    """A plain safetensors file (no convbn metadata), as safetensors.torch.save_file writes one."""
    header: dict[str, Any] = {}
    offset = 0
    for name, array in state.items():
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(a.tobytes() for a in state.values()))
    return path


SAVERS = {"torch": (_save_torch, "m.pt"), "safetensors": (_save_safetensors, "m.safetensors")}




@pytest.mark.parametrize("fmt", list(SAVERS))
def test_a_consistent_conv_and_batchnorm_convert(tmp_path, fmt):
    save, name = SAVERS[fmt]
    state = _state()
    ckpt = convbn.load_checkpoint(save(tmp_path / name, state))
    assert list(ckpt.layers) == ["l"] and not ckpt.unpaired
    np.testing.assert_array_equal(ckpt.layers["l"].moving_mean, state["l.bn.running_mean"])
    np.testing.assert_array_equal(ckpt.layers["l"].bias, state["l.conv.bias"])


@pytest.mark.parametrize("fmt", list(SAVERS))
def test_a_batchnorm_with_a_running_mean_of_another_length_is_an_error(tmp_path, capsys, fmt):
    save, name = SAVERS[fmt]
    # 5 means beside 4 of everything else: the BatchNorm could not pair with the 4-channel conv
    # and was left out of the conversion, exit 0.
    path = save(tmp_path / name, _state({"l.bn.running_mean": (5,)}))
    refused(path, "BatchNorm 'l.bn'", "'l.bn.running_mean' has shape [5]", "has 4 values")
    cli_refuses(path, capsys)


@pytest.mark.parametrize("fmt", list(SAVERS))
@pytest.mark.parametrize(
    ("override", "said"),
    [
        ({"l.bn.running_var": (4, 1)}, "'l.bn.running_var' has shape [4, 1], 'l.bn."),
        ({"l.bn.weight": (3,)}, "'l.bn.weight' has shape [3], 'l.bn."),
        ({"l.bn.running_mean": (2, 2), "l.bn.running_var": (2, 2), "l.bn.weight": (2, 2), "l.bn.bias": (2, 2)},
         "has shape [2, 2], not one value per channel"),
    ],
)
def test_a_lone_batchnorm_whose_tensors_disagree_names_the_odd_one(tmp_path, fmt, override, said):
    save, name = SAVERS[fmt]
    refused(save(tmp_path / name, _state(override, only="l.bn.")), "BatchNorm 'l.bn'", said)


@pytest.mark.parametrize("fmt", list(SAVERS))
def test_a_paired_batchnorm_whose_tensors_disagree_names_the_layer_and_tensor(tmp_path, fmt):
    save, name = SAVERS[fmt]
    path = save(tmp_path / name, _state({"l.bn.running_var": (4, 1)}))
    refused(path, "layer 'l'", "moving_var='l.bn.running_var'", "Received: moving_var.shape=(4, 1), kernel.shape=(3, 3, 3, 4)")


@pytest.mark.parametrize("fmt", list(SAVERS))
def test_an_unpaired_conv_whose_bias_is_not_one_per_output_channel_is_an_error(tmp_path, capsys, fmt):
    save, name = SAVERS[fmt]
    path = save(tmp_path / name, _state({"l.conv.bias": (5,)}, only="l.conv."))  # no BatchNorm
    refused(path, "conv 'l.conv'", "'l.conv.bias' has shape [5], the kernel 'l.conv.weight' has 4 output channels")
    cli_refuses(path, capsys)


@pytest.mark.parametrize("fmt", list(SAVERS))
def test_a_paired_conv_with_a_wrong_bias_names_the_layer(tmp_path, fmt):
    save, name = SAVERS[fmt]
    refused(save(tmp_path / name, _state({"l.conv.bias": (5,)})), "layer 'l'", "bias='l.conv.bias'", "bias.shape=(5,)")


def test_a_flax_batchnorm_whose_statistics_disagree_is_an_error(tmp_path, capsys):
    need("msgpack")
    import msgpack

    def array(shape: tuple[int, ...]) -> msgpack.ExtType:
        a = np.ones(shape, np.float32)
        return msgpack.ExtType(1, msgpack.packb([list(shape), "float32", a.tobytes()]))

    tree = {
        "params": {"Conv_0": {"kernel": array((3, 3, 3, 4))}, "BatchNorm_0": {"scale": array((4,)), "bias": array((4,))}},
        "batch_stats": {"BatchNorm_0": {"mean": array((6,)), "var": array((4,))}},
    }
    path = tmp_path / "m.msgpack"
    path.write_bytes(msgpack.packb(tree))
    refused(path, "BatchNorm 'BatchNorm_0'", "'batch_stats/BatchNorm_0/mean' has shape [6]", "has 4 values")
    dst = tmp_path / "out.safetensors"
    assert convbn.cli.main(["convert", str(path), str(dst)]) == 2 and not dst.exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
