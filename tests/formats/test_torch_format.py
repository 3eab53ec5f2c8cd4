"""The torch format against real torch modules: reading any naming, writing loadable state_dicts."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

import convbn
from convbn import ConvBNError
from tests.conftest import need
from tests.formats.builders import assert_same_arrays, random_checkpoint

need("torch")
import torch  # noqa: E402
from torch import nn  # noqa: E402


def _trained(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-default statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g))
            m.num_batches_tracked.fill_(7)
    return module.eval()


class Net(nn.Module):
    """Layers ``L`` as ``L.conv`` + ``L.bn``: convbn's default torch names."""

    def __init__(self, widths, eps, momentum, bias=True):
        super().__init__()
        self.blocks = nn.ModuleDict()
        for i, (cin, cout) in enumerate(itertools.pairwise(widths), 1):
            block = nn.Module()
            block.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
            block.bn = nn.BatchNorm2d(cout, eps=eps, momentum=momentum)
            self.blocks[f"layer{i}"] = block

    def forward(self, x):
        outs = []
        for block in self.blocks.values():
            x = block.bn(block.conv(x))
            outs.append(x)
        return outs


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_reads_any_naming_and_reproduces_the_module(tmp_path):
    model = _trained(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16 * 25, 4),
    ))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    ckpt = convbn.load_checkpoint(tmp_path / "m.pt")
    assert ckpt.format == "torch" and list(ckpt.layers) == ["0", "3"]
    assert [ckpt.sources[k].reason for k in ckpt.layers] == ["order", "order"]
    assert ckpt.tensors == {} and ckpt.unpaired == {} and ckpt.others["6"].kind == "dense"
    assert np.array_equal(ckpt.others["6"].kernel, model[6].weight.detach().numpy().T)
    assert np.array_equal(ckpt.layers["0"].kernel, model[0].weight.detach().numpy().transpose(2, 3, 1, 0))
    assert ckpt.layers["3"].bias is None
    assert (ckpt.layers["0"].eps, ckpt.layers["0"].momentum, ckpt.layers["0"].var_update) == (1e-5, 0.9, "unbiased")
    assert int(ckpt.extras["0"]["num_batches_tracked"]) == 7
    # The layers compute what the real modules compute.
    x = np.random.default_rng(0).standard_normal((2, 5, 5, 3)).astype(np.float32)
    with torch.no_grad():
        y1 = model[1](model[0](_nchw(x)))
        y2 = model[4](model[3](model[2](y1)))
    p0 = dataclasses.replace(ckpt.layers["0"], padding=1)
    p3 = dataclasses.replace(ckpt.layers["3"], padding=1)
    z1 = convbn.conv_bn(x, p0, backend="numpy")
    z2 = convbn.conv_bn(np.maximum(z1, 0), p3, backend="numpy")
    # float32 conv+BN against float32: a few ulps of |y| ~ 5 (SEMANTICS.md section 4: ~4e-6).
    np.testing.assert_allclose(z1, y1.numpy().transpose(0, 2, 3, 1), atol=2e-5)
    np.testing.assert_allclose(z2, y2.numpy().transpose(0, 2, 3, 1), atol=2e-5)


def test_torchvision_style_names_pair_by_naming(tmp_path):
    block = nn.Module()
    block.conv1, block.conv2 = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)
    block.bn2, block.bn1 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)  # registration order misleads order pairing
    model = nn.Module()
    model.layer1 = nn.Sequential(block)
    torch.save(_trained(model).state_dict(), tmp_path / "m.pt")
    ckpt = convbn.load_checkpoint(tmp_path / "m.pt")
    assert {k: (s.bn_name, s.reason) for k, s in ckpt.sources.items()} == {
        "layer1.0.conv1": ("layer1.0.bn1", "naming"), "layer1.0.conv2": ("layer1.0.bn2", "naming")}


def test_writes_default_names_that_a_real_module_loads_strictly(tmp_path):
    ckpt = random_checkpoint()
    convbn.save_checkpoint(ckpt, tmp_path / "m.pt", "torch")
    net = Net((3, 8, 16, 16), eps=1e-5, momentum=0.1)
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert list(state)[:7] == ["layer1.conv.weight", "layer1.conv.bias", "layer1.bn.weight", "layer1.bn.bias",
                               "layer1.bn.running_mean", "layer1.bn.running_var", "layer1.bn.num_batches_tracked"]
    net.blocks.load_state_dict(state, strict=True)
    net.eval()
    x = np.random.default_rng(1).standard_normal((2, 6, 6, 3)).astype(np.float32)
    with torch.no_grad():
        outs = net(_nchw(x))
    h = x
    for (name, p), out in zip(ckpt.layers.items(), outs, strict=True):
        h = convbn.conv_bn(h, dataclasses.replace(p, padding=1), backend="numpy")
        np.testing.assert_allclose(h, out.numpy().transpose(0, 2, 3, 1), atol=3e-5, err_msg=name)


def test_round_trip_is_bit_exact_including_other_tensors(tmp_path):
    model = _trained(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1, bias=False),
                                   nn.BatchNorm2d(8, affine=False), nn.Flatten(), nn.Linear(8, 2)))
    model[1].num_batches_tracked.fill_(11)
    original = model.state_dict()
    torch.save(original, tmp_path / "a.pt")
    ckpt = convbn.load_checkpoint(tmp_path / "a.pt")
    assert ckpt.layers["2"].gamma is None and ckpt.layers["2"].beta is None
    convbn.save_checkpoint(ckpt, tmp_path / "b.pt", "torch")
    back = torch.load(tmp_path / "b.pt", weights_only=True)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    again = convbn.load_checkpoint(tmp_path / "b.pt")
    for name in ckpt.layers:
        assert_same_arrays(again.layers[name], ckpt.layers[name])


def test_bfloat16_and_float16_survive(tmp_path):
    need("ml_dtypes")
    for dtype in (torch.bfloat16, torch.float16):
        model = _trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).to(dtype)
        torch.save(model.state_dict(), tmp_path / "h.pt")
        ckpt = convbn.load_checkpoint(tmp_path / "h.pt")
        convbn.save_checkpoint(ckpt, tmp_path / "h2.pt", "torch", overwrite=True)
        back = torch.load(tmp_path / "h2.pt", weights_only=True)
        for key, value in model.state_dict().items():
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), (dtype, key)


def test_nested_training_checkpoint_drops_the_optimizer(tmp_path):
    model = _trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    # What torch.optim.Adam(...).state_dict() holds: per-parameter m/v slots and hyperparameters.
    adam = {"state": {i: {"step": torch.tensor(5.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
                      for i, p in enumerate(model.parameters())},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1, 2, 3]}]}
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "optimizer": adam}, tmp_path / "c.pt")
    ckpt = convbn.load_checkpoint(tmp_path / "c.pt")
    assert list(ckpt.layers) == ["0"]
    assert sorted(ckpt.dropped) == ["epoch", "optimizer"]
    assert np.array_equal(ckpt.layers["0"].moving_var, model[1].running_var.numpy())


def test_explicit_pairs_override_and_mismatches_fail(tmp_path):
    model = _trained(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm2d(8), nn.BatchNorm2d(4)))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    ckpt = convbn.load_checkpoint(tmp_path / "m.pt", pairs={"0": "2"})
    assert ckpt.sources["0"].bn_name == "2" and ckpt.sources["0"].reason == "explicit"
    assert np.array_equal(ckpt.layers["0"].moving_mean, model[2].running_mean.numpy())
    assert ckpt.unpaired == {"1": "bn", "3": "bn"}
    assert [ckpt.others[n].kind for n in ("1", "3")] == ["batch_norm", "batch_norm"]
    assert np.array_equal(ckpt.others["3"].norm.moving_var, model[3].running_var.numpy())
    with pytest.raises(ConvBNError, match=r"must have the same channel count .*'0' has 8 output channels, '3' has 4"):
        convbn.load_checkpoint(tmp_path / "m.pt", pairs={"0": "3"})


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    target, marker = tmp_path / "evil.pt", tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return (exec, (f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')",))

    torch.save({"0.weight": torch.zeros(4, 3, 3, 3), "payload": Evil()}, target)
    # It really is malicious: unrestricted unpickling runs the payload (a marker file here).
    torch.load(target, weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()
    with pytest.raises(ConvBNError) as info:
        convbn.load_checkpoint(target)
    assert str(info.value).startswith(
        f"{target}: refused to unpickle: the file holds objects other than tensors and plain containers, "
        "and unpickling them could run code. Save model.state_dict() instead")
    assert not marker.exists()


def test_a_whole_pickled_module_is_refused(tmp_path):
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)), tmp_path / "model.pt")
    with pytest.raises(ConvBNError, match="refused to unpickle"):
        convbn.load_checkpoint(tmp_path / "model.pt")


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_truncated_or_corrupted_torch_files(tmp_path, damage):
    torch.save(_trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).state_dict(), tmp_path / "m.pt")
    data = bytearray((tmp_path / "m.pt").read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-200:] = b"\xff" * 200  # the zip's central directory
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    with pytest.raises(ConvBNError, match=r"bad.pt: not a readable torch checkpoint \(truncated or corrupted\)"):
        convbn.load_checkpoint(tmp_path / "bad.pt")


def test_legacy_torch_files_are_read(tmp_path):
    model = _trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    torch.save(model.state_dict(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    ckpt = convbn.load_checkpoint(tmp_path / "old.pt")
    assert np.array_equal(ckpt.layers["0"].gamma, model[1].weight.detach().numpy())


def test_a_bias_of_the_wrong_length_names_the_file_and_tensors(tmp_path):
    model = _trained(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    state = model.state_dict()
    state["0.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(ConvBNError) as info:
        convbn.load_checkpoint(tmp_path / "m.pt")
    assert str(info.value).startswith(f"{tmp_path / 'm.pt'}: layer '0' (kernel='0.weight', bias='0.bias', ")
    assert str(info.value).endswith(
        "bias must have shape (out_channels,) = (8,) to match the kernel. Received: bias.shape=(5,), "
        "kernel.shape=(3, 3, 3, 8)")


@pytest.mark.needs("torch", "ml_dtypes")
def test_written_tensors_equal_their_arrays_whatever_the_strides(tmp_path):
    """The torch writer makes each array contiguous: permuted views through torch, flipped
    (negative-stride) and broadcast ones through NumPy; the file holds the same values either way."""
    import ml_dtypes

    from convbn.formats.torch import _tensor

    k = np.random.default_rng(0).standard_normal((3, 3, 4, 5)).astype(np.float32)
    arrays = {
        "permuted": k.transpose(3, 2, 0, 1),
        "flipped": k[::-1, ::-1].transpose(3, 2, 0, 1),
        "broadcast": np.broadcast_to(k[:1], k.shape),
        "bfloat16": k.astype(ml_dtypes.bfloat16).transpose(3, 2, 0, 1),
        "empty": np.zeros((0, 3), np.float32).T,
    }
    torch.save({name: _tensor(a) for name, a in arrays.items()}, tmp_path / "t.pt")
    back = torch.load(tmp_path / "t.pt", weights_only=True)
    for name, a in arrays.items():
        t = back[name]
        assert t.is_contiguous(), name
        want = np.asarray(a, np.float32)
        assert np.array_equal(t.float().numpy(), want), name
