"""Transposed convs in the flax format: linen's ConvTranspose read and written in its own kernel
convention (``transpose_kernel=False``), checked against flax's and torch's own layers; kinds the
file cannot state are recorded where convbn writes, said where it reads, never guessed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn import ConvBNError
from convbn.checkpoint import Checkpoint, Layer, Norm
from tests._support.assertions import rel_err
from tests.conftest import need

need("jax", "flax")
import jax  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import serialization  # noqa: E402

TOL = 1e-5  # float32 flax and torch transposed convs against each other, relative to max|y|


class Decoder(nn.Module):
    """linen's default names: ConvTranspose_0 + BatchNorm_0 (k=4, stride 2), ConvTranspose_1 with a bias."""

    @nn.compact
    def __call__(self, x: Any) -> Any:
        x = nn.ConvTranspose(6, (4, 4), strides=(2, 2), padding="SAME", use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
        return nn.ConvTranspose(2, (3, 3), padding="SAME")(x)


def _variables(model: nn.Module, x: np.ndarray) -> dict[str, Any]:
    """Random variables for ``model`` in the order ``init`` creates them (``jax.eval_shape`` and
    jax.tree_util sort the keys, which loses which BatchNorm follows which layer)."""
    shapes = model.init(jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(0)

    def fill(tree: Any, stats: bool) -> Any:
        if isinstance(tree, dict):
            return {k: fill(v, stats) for k, v in tree.items()}
        value = rng.uniform(0.5, 1.5, tree.shape) if stats else rng.standard_normal(tree.shape) * 0.5
        return value.astype(tree.dtype)

    return {collection: fill(dict(tree), collection == "batch_stats") for collection, tree in shapes.items()}


def _x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 3, 4, 5)).astype(np.float32)  # odd and even sizes


@pytest.mark.needs("torch")
def test_a_linen_conv_transpose_model_converts_to_torch_conv_transpose2d(tmp_path: Path) -> None:
    import torch

    model, x = Decoder(), _x()
    variables = _variables(model, x)
    (tmp_path / "d.msgpack").write_bytes(serialization.to_bytes(variables))
    ckpt = convbn.load_checkpoint(tmp_path / "d.msgpack")
    assert {n: (lay.kind, lay.norm is not None) for n, lay in ckpt.others.items()} == {
        "ConvTranspose_0": ("conv_transpose", True), "ConvTranspose_1": ("conv_transpose", False)}
    assert any("read 2 ConvTranspose layer(s)" in n and "transpose_kernel=False" in n for n in ckpt.notes)
    assert ckpt.tensors == {} and not ckpt.layers
    convbn.save_checkpoint(ckpt, tmp_path / "d.pt", "torch")

    # TF's SAME at k=4, s=2 crops one row each side, torch's padding=1; at k=3, s=1 also padding=1.
    port = torch.nn.Module()
    port.ConvTranspose_0 = torch.nn.ConvTranspose2d(5, 6, 4, stride=2, padding=1, bias=False)
    port.BatchNorm_0 = torch.nn.BatchNorm2d(6, eps=1e-5)
    port.ConvTranspose_1 = torch.nn.ConvTranspose2d(6, 2, 3, padding=1)
    port.load_state_dict(torch.load(tmp_path / "d.pt", weights_only=True), strict=True)
    port.eval()
    with torch.no_grad():
        h = torch.relu(port.BatchNorm_0(port.ConvTranspose_0(torch.from_numpy(x).permute(0, 3, 1, 2))))
        got = port.ConvTranspose_1(h).permute(0, 2, 3, 1).numpy()
    want = np.asarray(model.apply(variables, x))
    assert got.shape == want.shape == (2, 6, 8, 2)
    assert rel_err(got, want) < TOL

    # And back to flax, from the torch file: the same tree, under the same names. A state_dict shows
    # a ConvTranspose2d by a bias of weight.shape[1] values, or a bias-free one by the BatchNorm of
    # that width after it when the next weight reads it as a transposed conv would.
    torch_ckpt = convbn.load_checkpoint(tmp_path / "d.pt")
    assert {n: (lay.kind, lay.norm is not None) for n, lay in torch_ckpt.others.items()} == {
        "ConvTranspose_0": ("conv_transpose", True), "ConvTranspose_1": ("conv_transpose", False)}
    assert torch_ckpt.kind_undecided == []
    convbn.save_checkpoint(torch_ckpt, tmp_path / "back.msgpack", "flax")
    restored = serialization.from_bytes(variables, (tmp_path / "back.msgpack").read_bytes())
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(variables), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_flax_to_flax_keeps_the_tree_and_a_custom_name_is_recorded(tmp_path: Path) -> None:
    class Named(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.ConvTranspose(3, (3, 3), strides=(2, 2), name="up")(x)

    model, x = Named(), _x()
    variables = _variables(model, x)
    (tmp_path / "n.msgpack").write_bytes(serialization.to_bytes(variables))
    plain = convbn.load_checkpoint(tmp_path / "n.msgpack")
    # Nothing in a flax file says 'up' is a ConvTranspose: it reads as a Conv, and the notes say so.
    assert plain.others["up"].kind == "conv"
    assert any("read 1 module(s) with a 4-D kernel as Conv (up)" in n for n in plain.notes)

    stated = plain.copy()
    stated.others["up"] = Layer("conv_transpose", kernel=convbn.layouts.transpose_from_flax(
        variables["params"]["up"]["kernel"]), bias=variables["params"]["up"]["bias"], stride=(2, 2), padding="SAME",
        geometry=True)
    written = convbn.save_checkpoint(stated, tmp_path / "m.msgpack", "flax")
    assert any("strides=(2, 2), padding='SAME' for up" in n for n in written.notes)
    tree = serialization.msgpack_restore((tmp_path / "m.msgpack").read_bytes())
    assert json.loads(tree["convbn"]["conv_transpose"]) == ["params/up"]
    restored = serialization.from_bytes(variables, (tmp_path / "m.msgpack").read_bytes())
    assert np.array_equal(np.asarray(restored["params"]["up"]["kernel"]), variables["params"]["up"]["kernel"])
    back = convbn.load_checkpoint(tmp_path / "m.msgpack")
    assert back.others["up"].kind == "conv_transpose" and not any("4-D kernel as Conv" in n for n in back.notes)
    assert np.array_equal(back.others["up"].kernel, stated.others["up"].kernel)
    assert np.array_equal(np.asarray(model.apply(restored, x)), np.asarray(model.apply(variables, x)))


def _neutral(seed: int = 0) -> Checkpoint:
    """A TF-side checkpoint: a transposed conv + BatchNorm, one with a bias, in the neutral layout."""
    rng = np.random.default_rng(seed)

    def f32(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    norm = Norm("batch_norm", gamma=f32(6), beta=f32(6), moving_mean=f32(6),
                moving_var=rng.uniform(0.5, 2, 6).astype(np.float32), eps=1e-3, momentum=0.99)
    return Checkpoint(format="keras", others={
        "up1": Layer("conv_transpose", kernel=f32(5, 5, 6, 4), bias=f32(6), norm=norm, stride=(2, 2), padding="SAME",
                     geometry=True),
        "up2": Layer("conv_transpose", kernel=f32(3, 3, 2, 6), bias=f32(2), stride=(1, 1),
                     padding=((1, 1), (1, 1)), geometry=True),
    })


@pytest.mark.parametrize("name", ["t.msgpack", "orbax"])
def test_written_transposed_convs_read_back_and_verify(tmp_path: Path, name: str) -> None:
    if name == "orbax":
        need("orbax")
    source = _neutral()
    written = convbn.save_checkpoint(source, tmp_path / name, "flax")
    assert any("padding='SAME' for up1" in n and "padding=((1, 1), (1, 1)) for up2" in n for n in written.notes)
    back = convbn.load_checkpoint(tmp_path / name)
    assert [(n, lay.kind) for n, lay in back.others.items()] == [("up1", "conv_transpose"), ("up2", "conv_transpose")]
    for layer in ("up1", "up2"):
        assert np.array_equal(back.others[layer].kernel, source.others[layer].kernel)
    checks = convbn.convert.verify_checkpoint(source, back)
    assert len(checks) == 2 and all(c.ok and not c.problem for c in checks), checks
    # A changed kernel value fails its check: the transposed conv is run, not passed over.
    bad = back.copy()
    kernel = np.array(bad.others["up2"].kernel)
    kernel[0, 0, 0, 0] += 1.0
    bad.others["up2"] = dataclasses.replace(bad.others["up2"], kernel=kernel)
    assert [c.ok for c in convbn.convert.verify_checkpoint(source, bad)] == [True, False]


def test_flax_conv_transpose_with_the_noted_padding_computes_the_reference(tmp_path: Path) -> None:
    """The padding the notes name, in flax's own ConvTranspose, computes what --verify's reference does."""
    from convbn.conv_transpose import conv_transpose
    from convbn.formats.flax import transpose_padding

    layer = Layer("conv_transpose", kernel=np.random.default_rng(2).standard_normal((4, 4, 3, 5)), stride=(2, 2),
                  padding=((1, 2), (2, 1)), output_padding=(1, 0))
    x = _x().astype(np.float64)
    want = conv_transpose(x, layer.kernel, stride=layer.stride, padding=layer.padding, output_padding=layer.output_padding)
    flax_layer = nn.ConvTranspose(3, (4, 4), strides=(2, 2), padding=eval(transpose_padding(layer)), use_bias=False)
    kernel = convbn.layouts.transpose_to_flax(layer.kernel).astype(np.float32)
    got = np.asarray(flax_layer.apply({"params": {"kernel": kernel}}, x.astype(np.float32)))
    assert got.shape == want.shape and rel_err(got, want) < TOL


def test_a_grouped_transposed_conv_is_not_written_and_said(tmp_path: Path) -> None:
    ckpt = Checkpoint(format="keras", others={"up": Layer("conv_transpose", kernel=np.ones((3, 3, 2, 4), np.float32),
                                                          groups=2)})
    written = convbn.save_checkpoint(ckpt, tmp_path / "g.msgpack", "flax")
    assert any("not written: 1 grouped transposed conv(s) (up)" in n for n in written.notes)
    assert convbn.load_checkpoint(tmp_path / "g.msgpack").others == {}


@pytest.mark.parametrize("value", ["not json", '{"a": 1}', "[1]", "[" * 100_000])
def test_a_corrupt_record_is_refused_in_one_line(tmp_path: Path, value: str) -> None:
    convbn.save_checkpoint(_neutral(), tmp_path / "t.msgpack", "flax")
    tree = serialization.msgpack_restore((tmp_path / "t.msgpack").read_bytes())
    tree["convbn"]["conv_transpose"] = value
    (tmp_path / "bad.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    with pytest.raises(ConvBNError, match=r"bad\.msgpack: the 'convbn' entry's 'conv_transpose'") as info:
        convbn.load_checkpoint(tmp_path / "bad.msgpack")
    assert "\n" not in str(info.value)


def test_linen_indices_do_not_pair_a_conv_with_a_transposed_convs_batchnorm(tmp_path: Path) -> None:
    """ConvTranspose_0 -> BatchNorm_0, then Conv_0 without one: in a tree whose keys were sorted
    (jax.tree_util), Conv_0 and BatchNorm_0 share an index but not a layer."""

    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.BatchNorm(use_running_average=True)(nn.ConvTranspose(4, (3, 3), use_bias=False)(x))
            return nn.Conv(4, (3, 3))(x)

    variables = _variables(Mixed(), _x())
    sorted_tree = {c: dict(sorted(t.items())) for c, t in variables.items()}
    (tmp_path / "m.msgpack").write_bytes(serialization.msgpack_serialize(sorted_tree))
    ckpt = convbn.load_checkpoint(tmp_path / "m.msgpack")
    assert "Conv_0" not in ckpt.layers and ckpt.others["Conv_0"].norm is None
    assert ckpt.others["Conv_0"].kind == "conv" and ckpt.others["ConvTranspose_0"].kind == "conv_transpose"
