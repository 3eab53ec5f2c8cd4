"""A torch state_dict does not say ConvTranspose2d or Conv2d for a bias-free 4-D weight: what the
reader decides from the BatchNorm after it, what it leaves undecided (and says), that conv nets whose
BatchNorms sit before their convs read as before, that a target recording kinds refuses to guess,
and that --verify reads such a file under the source's structure without hiding a wrong kernel.

Oracles: torch's own modules (``ConvTranspose2d`` + ``BatchNorm2d`` in eval mode) for the numbers,
torchvision's DenseNet and timm's pre-activation bottleneck module names and registration order
for the conv nets (built here: neither package imports in this environment).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn import layouts
from convbn.cli import main
from convbn.convert import verify_checkpoint
from convbn.formats import torch as torch_format
from tests._support.assertions import rel_err

pytestmark = pytest.mark.needs("torch")


def _randomize(model: Any, seed: int) -> Any:
    """Random weights and BatchNorm statistics, in eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=gen)
                tensor.copy_(values.abs() + 0.5 if name.endswith("running_var") else values)
    return model.eval()


def _dcgan_generator() -> Any:
    """pytorch/examples' DCGAN generator (dcgan/main.py), at small widths: every ConvTranspose2d
    bias-free, each but the last followed by a BatchNorm2d."""
    from torch import nn

    nz, ngf, nc = 5, 4, 3
    generator = nn.Module()
    generator.main = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
    )
    return _randomize(generator, 0)


def _save(model: Any, path: Path) -> Path:
    import torch

    torch.save(model.state_dict(), path)
    return path


def test_the_dcgan_generators_transposed_convs_are_read_from_their_batch_norms(tmp_path: Path) -> None:
    import torch

    model = _dcgan_generator()
    ckpt = convbn.load_checkpoint(_save(model, tmp_path / "g.pt"))
    kinds = {n: (layer.kind, layer.norm is not None) for n, layer in ckpt.others.items()}
    assert kinds == {**{f"main.{i}": ("conv_transpose", True) for i in (0, 3, 6, 9)}, "main.12": ("conv", False)}
    assert ckpt.layers == {} and ckpt.tensors == {}
    # The last one has no BatchNorm and no bias: nothing decides it, and the notes say so.
    assert ckpt.kind_undecided == ["main.12"]
    (note,) = [n for n in ckpt.notes if n.startswith("read as convs")]
    assert "1 kernel(s)" in note and "(main.12)" in note and "--kind LAYER=conv_transpose" in note
    # Values: each layer run by convbn's transposed conv + BatchNorm equals torch's modules.
    x = torch.randn(2, 32, 3, 4, generator=torch.Generator().manual_seed(1))
    layer = ckpt.others["main.3"]
    assert np.array_equal(layer.kernel, layouts.transpose_from_torch(model.main[3].weight.detach().numpy()))
    with torch.no_grad():
        want = model.main[4](model.main[3](x)).permute(0, 2, 3, 1).numpy()
    from convbn.conv_transpose import conv_transpose

    assert layer.norm is not None
    y = conv_transpose(x.permute(0, 2, 3, 1).numpy(), layer.kernel, stride=(2, 2), padding=((1, 1), (1, 1)))
    norm = layer.norm
    y = (y - norm.moving_mean) / np.sqrt(norm.moving_var.astype(np.float64) + 1e-5) * norm.gamma + norm.beta
    assert rel_err(y, want) < 1e-5


def _preact_bottleneck() -> Any:
    """timm's PreActBottleneck (resnetv2.py) registration order: the shortcut conv first, then
    norm1, conv1, norm2, conv2, norm3, conv3. ``downsample.conv`` (16, 8) is followed by ``norm1``
    of 8 features, its *input*'s width."""
    from torch import nn

    class Downsample(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 1, bias=False)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.downsample = Downsample()
            self.norm1 = nn.BatchNorm2d(8)
            self.conv1 = nn.Conv2d(8, 4, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.norm3 = nn.BatchNorm2d(4)
            self.conv3 = nn.Conv2d(4, 16, 1, bias=False)

    second = Block()
    second.downsample.conv = nn.Conv2d(16, 16, 1, bias=False)
    second.norm1 = nn.BatchNorm2d(16)
    second.conv1 = nn.Conv2d(16, 4, 1, bias=False)
    net = nn.Module()
    net.stem = nn.Conv2d(3, 8, 3, bias=False)
    net.blocks = nn.Sequential(Block(), second)
    net.norm = nn.BatchNorm2d(16)
    return _randomize(net, 2)


def _dense_block() -> Any:
    """torchvision's DenseNet names (features.conv0/norm0, denseblockN.denselayerM.{norm1, conv1,
    norm2, conv2}, transitionN.{norm, conv}): 4 initial features, growth 4, bn_size 2, so
    denselayer1's conv2 (4, 8) is followed by denselayer2's norm1 of 8 features."""
    from torch import nn

    class DenseLayer(nn.Module):
        def __init__(self, cin: int) -> None:
            super().__init__()
            self.norm1 = nn.BatchNorm2d(cin)
            self.conv1 = nn.Conv2d(cin, 8, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 4, 3, padding=1, bias=False)

    features = nn.Sequential()
    features.add_module("conv0", nn.Conv2d(3, 4, 7, bias=False))
    features.add_module("norm0", nn.BatchNorm2d(4))
    block = nn.Sequential()
    for i, cin in enumerate((4, 8, 12), start=1):
        block.add_module(f"denselayer{i}", DenseLayer(cin))
    features.add_module("denseblock1", block)
    transition = nn.Sequential()
    transition.add_module("norm", nn.BatchNorm2d(16))
    transition.add_module("conv", nn.Conv2d(16, 8, 1, bias=False))
    features.add_module("transition1", transition)
    features.add_module("norm5", nn.BatchNorm2d(8))
    net = nn.Module()
    net.features = features
    return _randomize(net, 3)


@pytest.mark.parametrize("build", [_preact_bottleneck, _dense_block], ids=["preact-resnet", "densenet"])
def test_conv_nets_with_batch_norms_before_their_convs_read_as_before(
    build: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build()
    path = _save(model, tmp_path / "net.pt")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    # The rule that a naive "BatchNorm of weight.shape[1] after it" would misread is present here.
    keys = list(state)
    misread = [k for i, k in enumerate(keys[:-1]) if k.endswith(".weight") and state[k].ndim == 4
               and keys[i + 1].endswith(".weight") and state[keys[i + 1]].shape == (state[k].shape[1],)
               and state[k].shape[0] != state[k].shape[1]]
    assert misread
    ckpt = convbn.load_checkpoint(path)
    assert not [n for n, o in ckpt.others.items() if o.kind == "conv_transpose"]
    assert not [n for n in ckpt.notes if n.startswith("read as convs")]
    # Every weight reads as the Conv2d it is, values included.
    for name, params in ckpt.layers.items():
        assert np.array_equal(params.kernel, layouts.conv_from_torch(state[ckpt.sources[name].conv["kernel"]]))
    for layer in ckpt.others.values():
        if layer.kind == "conv":
            assert np.array_equal(layer.kernel, layouts.conv_from_torch(state[layer.tensors["kernel"]]))
    # Nothing changes for them: the same reading as without the BatchNorm rule.
    monkeypatch.setattr(torch_format, "_transposed_by_batch_norm", lambda listed, arrays: None)
    before = convbn.load_checkpoint(path)
    assert list(before.layers) == list(ckpt.layers) and before.order == ckpt.order
    assert {n: (o.kind, o.norm is not None) for n, o in before.others.items()} == {
        n: (o.kind, o.norm is not None) for n, o in ckpt.others.items()
    }
    assert before.notes == ckpt.notes


@pytest.mark.needs("msgpack")
def test_a_target_that_records_kinds_refuses_an_undecided_layer_until_stated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _dcgan_generator()
    src = _save(model, tmp_path / "g.pt")
    assert main(["convert", str(src), str(tmp_path / "g.msgpack")]) == 2
    err = capsys.readouterr().err
    assert "(main.12)" in err and "--kind main.12=conv_transpose" in err and "records which each is" in err
    assert not (tmp_path / "g.msgpack").exists()
    with pytest.raises(convbn.ConvBNError, match="the keras format records"):
        convbn.save_checkpoint(convbn.load_checkpoint(src), tmp_path / "g.weights.h5", "keras")
    # torch and TF files store the same array for either kind: written as read.
    convbn.save_checkpoint(convbn.load_checkpoint(src), tmp_path / "again.pt", "torch")
    # Stated, it converts, verifies, and flax's file holds main.12 as a ConvTranspose kernel.
    argv = ["convert", str(src), str(tmp_path / "g.msgpack"), "--kind", "main.12=conv_transpose", "--verify"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "verified: all 5 layer(s) within tolerance"
    tree = convbn.load_checkpoint(tmp_path / "g.msgpack")
    assert tree.others["main/12"].kind == "conv_transpose"
    assert np.array_equal(tree.others["main/12"].kernel, layouts.transpose_from_torch(model.main[12].weight.detach().numpy()))
    # Stated as a conv, it is written as one.
    assert main(["convert", str(src), str(tmp_path / "c.msgpack"), "--kind", "main.12=conv"]) == 0
    assert convbn.load_checkpoint(tmp_path / "c.msgpack").others["main/12"].kind == "conv"
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "d.msgpack"), "--kind", "main.3=conv"]) == 2
    assert "could not decide" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "d.msgpack"), "--kind", "main.12=deconv"]) == 2
    assert "--kind takes LAYER=conv or LAYER=conv_transpose" in capsys.readouterr().err
    assert not (tmp_path / "d.msgpack").exists()


def _upsampler() -> Any:
    """A decoder stage the BatchNorm rule does not reach: ConvTranspose2d(8, 4) + BatchNorm2d(4),
    then a Conv2d(4, 6) that reads it (so the weight after the BatchNorm is no transposed conv's)."""
    from torch import nn

    return _randomize(nn.Sequential(
        nn.ConvTranspose2d(8, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6),
    ), 4)


def test_verify_reads_an_undecided_file_under_the_sources_structure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import convbn.convert

    model = _upsampler()
    src = convbn.load_checkpoint(_save(model, tmp_path / "up.pt"))
    assert src.others["0"].kind == "conv_transpose" and src.others["0"].norm is not None  # by its bias
    out = tmp_path / "out.pt"
    convbn.save_checkpoint(src, out, "torch", conv_bias=False)
    back = convbn.load_checkpoint(out)
    # Bias folded away, the file says nothing: a conv, and a standalone BatchNorm after it.
    assert back.kind_undecided == ["0"] and back.others["0"].kind == "conv" and back.others["1"].kind == "batch_norm"
    checks = verify_checkpoint(src, back)
    assert [c.source for c in checks] == ["3", "0"] and all(c.ok for c in checks), checks
    with monkeypatch.context() as m:  # read as the file says, the layer kinds differ
        m.setattr(convbn.convert, "_under_source_kinds", lambda source, converted: converted)
        assert not all(c.ok for c in verify_checkpoint(src, back))
    # The file is right for a model of the source's structure: torch's own modules agree.
    fresh = _upsampler()
    state = torch.load(out, weights_only=True)
    fresh[0] = torch.nn.ConvTranspose2d(8, 4, 3, bias=False)
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(2, 8, 5, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(fresh.eval()(x).numpy(), model(x).numpy()) < 1e-5

    # Controls: the hint hides no wrong kernel. Spatially transposed, or in and out swapped
    # (another shape), verification fails.
    for label, wrong in (("kh<->kw", state["0.weight"].transpose(2, 3)), ("in<->out", state["0.weight"].transpose(0, 1))):
        bad = dict(state, **{"0.weight": wrong.contiguous()})
        torch.save(bad, tmp_path / "bad.pt")
        checks = verify_checkpoint(src, convbn.load_checkpoint(tmp_path / "bad.pt"))
        assert not all(c.ok for c in checks), label
