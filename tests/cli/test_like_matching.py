"""``convbn convert SRC DST --like MODEL_STATE`` with the swap case: refused, or decided by ``--map``.

SRC is a torch state file of tests/layers/resnet_models.py's bottleneck, MODEL_STATE a Keras
``.weights.h5`` of the same block under names that do not correspond to torch's; its ``conv3`` and
shortcut have one kernel shape and two files have no graph, so the match is refused, writing
nothing, until ``--map`` names the pairs. The Keras model then loads DST with its own
``load_weights`` and reproduces the torch block's outputs (tolerance as tests/layers/test_matching.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn.cli import main
from tests._support.assertions import rel_err
from tests.layers import resnet_models as rm

TOL = 1e-5


def _run(capsys: Any, *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.needs("torch", "keras", "h5py")
def test_like_with_the_swap_case_refuses_then_maps(tmp_path: Path, capsys: Any) -> None:
    import torch

    source = rm.torch_build(block=True)
    torch.save(source.state_dict(), tmp_path / "src.pt")
    model = rm.keras_build(block=True, names="_k")
    model.save_weights(tmp_path / "like.weights.h5")
    dst = tmp_path / "out.weights.h5"

    code, _, err = _run(capsys, "convert", tmp_path / "src.pt", dst, "--like", tmp_path / "like.weights.h5")
    assert code == 2 and not dst.exists()
    first = err.strip().splitlines()[0]
    for name in ("b2_conv3_k", "b2_down_k", "b2_conv3", "b2_down", "--map"):
        assert name in first

    # --no-strict writes what is decided and keeps the like file's own values for the rest
    code, out, _ = _run(capsys, "convert", tmp_path / "src.pt", dst, "--like", tmp_path / "like.weights.h5",
                        "--no-strict", "--json")
    assert code == 0 and len(json.loads(out)["like"]["ambiguous"]) == 1
    like = convbn.load_checkpoint(tmp_path / "like.weights.h5")
    written = convbn.load_checkpoint(dst)
    for key in ("b2_conv3_k", "b2_down_k"):
        np.testing.assert_array_equal(written.layers[key].kernel, like.layers[key].kernel)
    np.testing.assert_array_equal(written.layers["b2_conv1_k"].kernel,
                                  convbn.load_checkpoint(tmp_path / "src.pt").layers["b2_conv1"].kernel)
    dst.unlink()

    code, _, err = _run(capsys, "convert", tmp_path / "src.pt", dst, "--like", tmp_path / "like.weights.h5",
                        "--map", "b2_conv3_k=b2_conv3", "--map", "b2_down_k=b2_down", "--verify")
    assert code == 0, err
    model.load_weights(dst)
    x = rm.x_input(block=True)
    assert rel_err(rm.keras_run(model, x), rm.torch_run(source, x)) <= TOL

    # the swapped --map is what the user said: written, and the outputs show it is wrong
    swapped = tmp_path / "swapped.weights.h5"
    code, _, _ = _run(capsys, "convert", tmp_path / "src.pt", swapped, "--like", tmp_path / "like.weights.h5",
                      "--map", "b2_conv3_k=b2_down", "--map", "b2_down_k=b2_conv3")
    assert code == 0
    model.load_weights(swapped)
    assert rel_err(rm.keras_run(model, x), rm.torch_run(source, x)) > 0.05


@pytest.mark.needs("torch", "keras", "h5py")
@pytest.mark.parametrize(("argv", "message"), [
    (["--map", "b2_conv3_k"], "--map takes LIKE_LAYER=SRC_LAYER"),
    (["--map", "nope=b2_conv3"], "mapping names model layer 'nope'"),
    (["--map", "b2_conv3_k=b2_conv3", "--map", "b2_down_k=b2_conv3"], "more than one model layer"),
])
def test_a_bad_map_is_refused_in_one_line(tmp_path: Path, capsys: Any, argv: list[str], message: str) -> None:
    import torch

    torch.save(rm.torch_build(block=True).state_dict(), tmp_path / "src.pt")
    rm.keras_build(block=True, names="_k").save_weights(tmp_path / "like.weights.h5")
    dst = tmp_path / "out.weights.h5"
    code, _, err = _run(capsys, "convert", tmp_path / "src.pt", dst, "--like", tmp_path / "like.weights.h5", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not dst.exists()


@pytest.mark.needs("torch")
def test_map_without_like_is_refused(tmp_path: Path, capsys: Any) -> None:
    import torch

    torch.save(rm.torch_build(block=True).state_dict(), tmp_path / "src.pt")
    code, _, err = _run(capsys, "convert", tmp_path / "src.pt", tmp_path / "out.safetensors", "--map", "a=b")
    assert code == 2 and "--map applies with --like only" in err
    assert not np.any([p.name.startswith("out") for p in tmp_path.iterdir()])


@pytest.mark.needs("torch", "keras", "h5py")
def test_like_between_two_keras_archives_matches_the_swap_case_by_their_graphs(tmp_path: Path, capsys: Any) -> None:
    """Both .keras files record their graphs: the like model's conv3 and shortcut take SRC's by
    structure, although their names differ and their listing orders could not tell."""
    source = rm.keras_build(block=True, names="_k")
    convbn.load_into(source, rm.torch_build(block=True))
    source.save(tmp_path / "src.keras")
    model = rm.keras_build(block=True, names="_j")
    model.save(tmp_path / "like.keras")
    dst = tmp_path / "out.weights.h5"
    code, out, err = _run(capsys, "convert", tmp_path / "src.keras", dst, "--like", tmp_path / "like.keras", "--json")
    assert code == 0, err
    assert json.loads(out)["like"]["how"] == {f"{k}_j": "structure" for k in rm.keys(block=True)}
    model.load_weights(dst)
    x = rm.x_input(block=True)
    assert rel_err(rm.keras_run(model, x), rm.keras_run(source, x)) <= TOL
