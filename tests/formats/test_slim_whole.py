"""slim checkpoints beyond conv+BatchNorm, without TensorFlow: every layer kind written under tf-slim's
names and read back as the same layer, a bias before a BatchNorm folded (checked against the
unfolded layer's output), and dense layers' flatten order permuted or refused, never guessed.

The restores into real tf-slim layers are in test_dcgan_whole.py; here the oracle is NumPy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import convbn
from convbn.checkpoint import Checkpoint, FeatureMap, Layer, Norm, parse_flatten
from convbn.cli import main
from convbn.formats import _tfbundle, slim
from convbn.layouts import flat_rows


def _norm(rng: np.random.Generator, width: int, gamma: bool = True) -> Norm:
    return Norm(
        "batch_norm",
        gamma=rng.uniform(0.5, 1.5, width).astype(np.float32) if gamma else None,
        beta=rng.standard_normal(width).astype(np.float32),
        moving_mean=rng.standard_normal(width).astype(np.float32),
        moving_var=rng.uniform(0.5, 2.0, width).astype(np.float32),
        eps=1e-5, momentum=0.9,
    )


def _array(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _bn(y: np.ndarray, norm: Norm) -> np.ndarray:
    gamma = 1.0 if norm.gamma is None else norm.gamma.astype(np.float64)
    assert norm.eps is not None
    return (y - norm.moving_mean) / np.sqrt(norm.moving_var.astype(np.float64) + norm.eps) * gamma + norm.beta


def _values(prefix: Path) -> dict[str, np.ndarray]:
    bundle = _tfbundle.Bundle(prefix)
    return {name: bundle.read(name) for name in bundle.shapes}


def _every_kind(rng: np.random.Generator) -> Checkpoint:
    return Checkpoint(format="slim", others={
        "stem": Layer("conv", kernel=_array(rng, 3, 3, 3, 4), bias=_array(rng, 4)),
        "up": Layer("conv_transpose", kernel=_array(rng, 5, 5, 6, 4), norm=_norm(rng, 6)),  # (kh, kw, out, in)
        "up_head": Layer("conv_transpose", kernel=_array(rng, 5, 5, 2, 6), bias=_array(rng, 2)),
        "dw": Layer("conv", kernel=_array(rng, 3, 3, 1, 8), groups=4, bias=_array(rng, 8)),
        "fc": Layer("dense", kernel=_array(rng, 12, 5), norm=_norm(rng, 5, gamma=False)),
        "logits": Layer("dense", kernel=_array(rng, 5, 3), bias=_array(rng, 3)),
        "bn": Layer("batch_norm", norm=_norm(rng, 6)),
    })


def test_every_layer_kind_is_written_under_slim_names_and_read_back(tmp_path: Path) -> None:
    ckpt = _every_kind(np.random.default_rng(0))
    written = convbn.save_checkpoint(ckpt, tmp_path / "m.ckpt", "slim")
    values = _values(tmp_path / "m.ckpt")
    assert set(values) == {
        "stem/weights", "stem/biases", "up/weights", *(f"up/BatchNorm/{r}" for r in ("gamma", "beta", "moving_mean",
        "moving_variance")), "up_head/weights", "up_head/biases", "dw/depthwise_weights", "dw/biases",
        "fc/weights", "fc/BatchNorm/beta", "fc/BatchNorm/moving_mean", "fc/BatchNorm/moving_variance",
        "logits/weights", "logits/biases", "bn/gamma", "bn/beta", "bn/moving_mean", "bn/moving_variance",
    }
    assert np.array_equal(values["dw/depthwise_weights"], ckpt.others["dw"].kernel.reshape(3, 3, 4, 2))
    assert written.tensors == {}
    back = slim.read(tmp_path / "m.ckpt")
    assert back.tensors == {} and not back.layers
    assert {n: (layer.kind, layer.norm is not None) for n, layer in back.others.items()} == {
        n: (layer.kind, layer.norm is not None) for n, layer in ckpt.others.items()
    }
    for name, layer in ckpt.others.items():
        got = back.others[name]
        for field in ("kernel", "bias"):
            a, b = getattr(layer, field), getattr(got, field)
            assert (a is None) == (b is None) and (a is None or np.array_equal(a, b)), (name, field)
        if layer.norm is not None:
            assert got.norm is not None
            for field in ("gamma", "beta", "moving_mean", "moving_var"):
                a, b = getattr(layer.norm, field), getattr(got.norm, field)
                assert (a is None) == (b is None) and (a is None or np.array_equal(a, b)), (name, field)
    assert back.others["dw"].groups == 4
    # Written back, the same bytes.
    slim.write(back, tmp_path / "again.ckpt")
    again = _values(tmp_path / "again.ckpt")
    assert set(again) == set(values) and all(np.array_equal(again[n], values[n]) for n in values)


@pytest.mark.parametrize("kind", ["conv_transpose", "dense"])
def test_a_bias_before_a_batchnorm_is_folded_with_the_same_output(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(1)
    kernel = _array(rng, 7, 5) if kind == "dense" else _array(rng, 1, 1, 5, 7)
    layer = Layer(kind, kernel=kernel, bias=_array(rng, 5) * 3, norm=_norm(rng, 5))  # type: ignore[arg-type]
    written = convbn.save_checkpoint(Checkpoint(format="torch", others={"L": layer}), tmp_path / "m.ckpt", "slim")
    assert any(f"folded the bias of 1 {kind} layer(s) into beta" in n for n in written.notes)
    values = _values(tmp_path / "m.ckpt")
    assert "L/biases" not in values and "L/BatchNorm/beta" in values
    back = slim.read(tmp_path / "m.ckpt").others["L"]
    assert back.bias is None and back.kind == kind and back.norm is not None
    x = rng.standard_normal((4, 7))
    matrix = kernel if kind == "dense" else kernel[0, 0].T  # a 1x1 transposed conv is x @ kernel[0, 0].T
    want = _bn(x @ matrix + layer.bias, layer.norm)  # type: ignore[arg-type]
    assert back.norm.eps == 1e-3  # a TF checkpoint stores no eps: slim's default is assumed
    got = _bn(x @ (back.kernel if kind == "dense" else back.kernel[0, 0].T), dataclasses.replace(back.norm, eps=1e-5))
    assert np.max(np.abs(got - want)) < 1e-5 * np.max(np.abs(want))
    dropped = _bn(x @ matrix, layer.norm)  # type: ignore[arg-type]
    assert np.max(np.abs(dropped - want)) > 1e-1 * np.max(np.abs(want))  # the bias matters


def test_a_dense_layer_after_an_nchw_flatten_is_permuted_for_slim(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    h, w, c = 2, 3, 4
    kernel = _array(rng, h * w * c, 5)  # rows in torch's (c, h, w) flatten order
    head = Layer("dense", kernel=kernel, bias=_array(rng, 5), flat_in=FeatureMap(h, w, c, "chw"))
    written = convbn.save_checkpoint(Checkpoint(format="torch", others={"head": head}), tmp_path / "m.ckpt", "slim")
    assert any("permuted the input rows of dense layer 'head' from 'chw' to 'hwc'" in n for n in written.notes)
    nhwc = rng.standard_normal((2, h, w, c))
    want = nhwc.transpose(0, 3, 1, 2).reshape(2, -1) @ kernel  # torch: NCHW map, flatten, linear
    got = nhwc.reshape(2, -1) @ _values(tmp_path / "m.ckpt")["head/weights"]  # slim: NHWC flatten
    assert np.max(np.abs(got - want)) < 1e-5 * np.max(np.abs(want))
    assert np.max(np.abs(nhwc.reshape(2, -1) @ kernel - want)) > 1e-1 * np.max(np.abs(want))


def test_an_undecided_flatten_is_refused_and_stated_explicitly(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    kernel = _array(rng, 24, 5)
    # What a torch reader gives for a Linear whose input it cannot trace: stored in (c, h, w) order if a map.
    ckpt = Checkpoint(format="torch", others={"head": Layer("dense", kernel=kernel, flat_undecided=(("in", "chw"),))})
    with pytest.raises(convbn.ConvBNError, match=r"dense layer 'head': .*--flatten head=HxWxC") as info:
        convbn.save_checkpoint(ckpt, tmp_path / "m.ckpt", "slim")
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())
    unfolded = Layer("dense", kernel=kernel[:, :2], bias=np.ones(2, np.float32), norm=_norm(rng, 2))
    with pytest.raises(convbn.ConvBNError, match=r"a slim dense with a normalizer has no bias: fold it"):
        slim.write(Checkpoint(format="slim", others={"fc": unfolded}), tmp_path / "u.ckpt")  # save_checkpoint folds
    assert not list(tmp_path.iterdir())
    stated = ckpt.with_flatten(parse_flatten(["head=2x3x4"]))
    assert stated.others["head"].flat_in == FeatureMap(2, 3, 4, "chw") and not stated.others["head"].flat_undecided
    convbn.save_checkpoint(stated, tmp_path / "m.ckpt", "slim")
    assert np.array_equal(_values(tmp_path / "m.ckpt")["head/weights"], flat_rows(kernel, 2, 3, 4, "chw", "hwc"))
    vector = ckpt.with_flatten(parse_flatten(["head=none"]))
    convbn.save_checkpoint(vector, tmp_path / "v.ckpt", "slim")
    assert np.array_equal(_values(tmp_path / "v.ckpt")["head/weights"], kernel)
    with pytest.raises(convbn.ConvBNError, match=r"a dense layer with 24 inputs cannot read a flattened 2x2x2 map"):
        ckpt.with_flatten(parse_flatten(["head=2x2x2"]))
    with pytest.raises(convbn.ConvBNError, match=r"--flatten must name a dense layer .*Received: 'fc'"):
        ckpt.with_flatten(parse_flatten(["fc=2x3x4"]))
    for bad in ("head", "head=2x3", "head=in:none", "head=0x3x8", "=2x3x4", "head=side:2x3x4"):
        with pytest.raises(convbn.ConvBNError, match=r"--flatten takes LAYER=HxWxC"):
            parse_flatten([bad])


def test_a_graphless_slim_dense_layer_is_undecided_but_stays_in_tf_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    ckpt = Checkpoint(format="slim", others={"fc": Layer("dense", kernel=_array(rng, 8, 2), bias=_array(rng, 2))})
    slim.write(ckpt, tmp_path / "m.ckpt")
    back = slim.read(tmp_path / "m.ckpt")
    assert back.others["fc"].flat_undecided == (("in", "hwc"), ("out", "hwc"))
    assert any("undecided flatten: there is no .meta graph" in n and "fc" in n for n in back.notes)
    # TF to TF needs no decision: whatever the map, its order is NHWC on both sides.
    convbn.save_checkpoint(back, tmp_path / "again.ckpt", "slim")
    assert np.array_equal(_values(tmp_path / "again.ckpt")["fc/weights"], ckpt.others["fc"].kernel)
    # An NCHW order is refused while undecided.
    with pytest.raises(convbn.ConvBNError, match=r"dense layer 'fc'"):
        back.in_feature_order("chw")
    stated = back.with_flatten(parse_flatten(["fc=1x2x4", "fc=out:1x1x2"]))
    moved = stated.in_feature_order("chw")
    assert np.array_equal(moved.others["fc"].kernel, flat_rows(ckpt.others["fc"].kernel, 1, 2, 4, "hwc", "chw"))
    assert any("permuted the input rows and output columns of dense layer 'fc'" in n for n in moved.notes)


def test_convert_takes_flatten_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(5)
    kernel = _array(rng, 8, 2)
    slim.write(Checkpoint(format="slim", others={"fc": Layer("dense", kernel=kernel)}), tmp_path / "m.ckpt")
    assert main(["convert", str(tmp_path / "m.ckpt"), str(tmp_path / "o.ckpt"), "--flatten", "fc=2x2x2"]) == 0
    assert "flatten of dense layer 'fc' given explicitly: fc=2x2x2" in capsys.readouterr().out
    assert np.array_equal(_values(tmp_path / "o.ckpt")["fc/weights"], kernel)
    assert main(["convert", str(tmp_path / "m.ckpt"), str(tmp_path / "p.ckpt"), "--flatten", "fc=2x2"]) == 2
    assert "--flatten takes LAYER=HxWxC" in capsys.readouterr().err
    assert not (tmp_path / "p.ckpt.index").exists()


@pytest.mark.needs("torch")
def test_a_torch_classifier_is_written_as_slim_fully_connected(tmp_path: Path) -> None:
    """torch -> slim writes a Linear after pooling as what slim.fully_connected restores: its
    (in, out) kernel and biases, giving the torch logits from the pooled features."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    written = convbn.save_checkpoint(convbn.load_checkpoint(tmp_path / "m.pt"), tmp_path / "m.ckpt", "slim")
    assert written.tensors == {}
    values = _values(tmp_path / "m.ckpt")
    assert {"5/weights", "5/biases"} <= set(values)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        pooled = model[:5](x).numpy()
        want = model(x).numpy()
    got = pooled @ values["5/weights"] + values["5/biases"]
    assert np.max(np.abs(got - want)) < 1e-5 * np.max(np.abs(want))


def _bn_values(rng: np.random.Generator, scope: str, width: int) -> dict[str, np.ndarray]:
    return {
        f"{scope}/BatchNorm/{role}": (rng.uniform(0.5, 2.0, width) if role == "moving_variance" else _array(rng, width))
        .astype(np.float32)
        for role in ("gamma", "beta", "moving_mean", "moving_variance")
    }


def test_without_a_graph_a_transposed_scope_names_a_square_transposed_kernel(tmp_path: Path) -> None:
    """slim's own ``Conv2d_transpose`` scope (or a ``deconv`` one) says what a square (out == in) filter
    is, where its shape cannot: the kernel stays (kh, kw, out, in), not read as a conv's HWIO."""
    rng = np.random.default_rng(7)
    kernel = _array(rng, 4, 4, 6, 6)
    values = {"gen/Conv2d_transpose/weights": kernel, **_bn_values(rng, "gen/Conv2d_transpose", 6),
              "gen/deconv_out/weights": _array(rng, 3, 3, 6, 6), "gen/deconv_out/biases": _array(rng, 6)}
    _tfbundle.write(tmp_path / "m.ckpt", values.items())
    ckpt = slim.read(tmp_path / "m.ckpt")
    assert not ckpt.layers and ckpt.tensors == {}
    assert {n: layer.kind for n, layer in ckpt.others.items()} == {
        "gen/Conv2d_transpose": "conv_transpose", "gen/deconv_out": "conv_transpose"}
    np.testing.assert_array_equal(ckpt.others["gen/Conv2d_transpose"].kernel, kernel)
    assert not any(note.startswith("read as convs") for note in ckpt.notes)


def test_without_a_graph_a_square_kernel_beside_transposed_convs_is_said_to_be_read_as_a_conv(tmp_path: Path) -> None:
    """Nothing in a bare checkpoint tells a square conv filter from a square transposed one: beside a
    transposed conv its width gives away (6 -> 4 with a 4-wide bias), the square one is read as slim
    reads it, a conv, and the notes say so and how to decide it."""
    rng = np.random.default_rng(8)
    values = {"g_h1/w": _array(rng, 5, 5, 4, 6), "g_h1/biases": _array(rng, 4),
              "g_h2/w": _array(rng, 5, 5, 4, 4), "g_h2/biases": _array(rng, 4)}
    _tfbundle.write(tmp_path / "m.ckpt", values.items())
    ckpt = slim.read(tmp_path / "m.ckpt")
    assert {n: layer.kind for n, layer in ckpt.others.items()} == {"g_h1": "conv_transpose", "g_h2": "conv"}
    [note] = [note for note in ckpt.notes if note.startswith("read as convs")]
    assert note == (
        "read as convs: 1 kernel(s) whose shape cannot tell a conv from a transposed conv (as many inputs "
        "as outputs) and that no .meta graph or scope name places (g_h2/w); keep the checkpoint's .meta "
        "file beside it for the graph to decide"
    )
