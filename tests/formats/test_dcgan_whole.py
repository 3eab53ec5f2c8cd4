"""The seed's DCGAN, whole: a TF1 graph built like carpedm20/DCGAN-tensorflow (generator and
discriminator, ``Matrix``/``bias`` linears, ``w``/``biases`` convs and deconvs, contrib-style
BatchNorm), saved with ``tf.compat.v1.train.Saver``, converts with no ``--pair`` flags to its tf-slim
rewrite, which restores from the converted checkpoint alone and reproduces both nets in eval mode.

Oracle: the TF graph itself (tests/formats/dcgan_graphs.py), built once per session.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn.cli import main
from tests._support.assertions import rel_err
from tests.formats.slim_graphs import need_slim, shared_build

pytestmark = [
    pytest.mark.filterwarnings("ignore:`layer.apply` is deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore:`tf.layers.flatten` is deprecated:UserWarning"),
]

# The bound. Measured (max |diff| / max |TF|): the slim rewrite 1.8e-6 on the fake images and
# 1.1e-7 on the logits, the torch port 3.3e-6 and 2.2e-7: float32 rounding through four transposed
# convs, with the biases folded into beta (a float32 rounding of its own). A bias dropped instead of
# folded, or d_h4_lin's rows left in the other flatten order, is off by more than 1e-2 (asserted below).
TOL = 1e-5

DENSE = ("generator/g_h0_lin", "discriminator/d_h4_lin")
DECONVS_BN = ("generator/g_h1", "generator/g_h2", "generator/g_h3")


@pytest.fixture(scope="module")
def dcgan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    need_slim()
    from tests.formats import dcgan_graphs

    return shared_build(tmp_path_factory, "dcgan-whole", dcgan_graphs.build)  # type: ignore[no-any-return]


def _values(prefix: Path) -> dict[str, np.ndarray]:
    from convbn.formats import _tfbundle

    bundle = _tfbundle.Bundle(prefix)
    return {name: bundle.read(name) for name in bundle.shapes}


def test_the_whole_dcgan_reads_as_layers_with_nothing_left(dcgan: dict[str, Any]) -> None:
    ckpt = convbn.load_checkpoint(dcgan["prefix"])
    assert ckpt.tensors == {}
    assert list(ckpt.layers) == ["discriminator/d_h1_conv", "discriminator/d_h2_conv", "discriminator/d_h3_conv"]
    kinds = {name: (layer.kind, layer.norm is not None) for name, layer in ckpt.others.items()}
    assert kinds == {
        "generator/g_h0_lin": ("dense", False), "generator/g_bn0": ("batch_norm", True),
        **{n: ("conv_transpose", True) for n in DECONVS_BN}, "generator/g_h4": ("conv_transpose", False),
        "discriminator/d_h0_conv": ("conv", False), "discriminator/d_h4_lin": ("dense", False),
    }
    assert ckpt.order[:2] == ["generator/g_h0_lin", "generator/g_bn0"] and ckpt.order[-1] == "discriminator/d_h4_lin"
    # Only optimizer state is left out, each entry by name.
    assert ckpt.dropped and all("Adam" in n or n.endswith("_power") for n in ckpt.dropped), ckpt.dropped
    lin, head = ckpt.others["generator/g_h0_lin"], ckpt.others["discriminator/d_h4_lin"]
    assert lin.flat_out == convbn.checkpoint.FeatureMap(2, 2, 32, "hwc") and lin.flat_in is None
    assert head.flat_in == convbn.checkpoint.FeatureMap(2, 2, 32, "hwc") and head.flat_out is None
    for name in (*DECONVS_BN, "generator/g_h4"):
        layer = ckpt.others[name]
        assert layer.stride == (2, 2) and layer.padding == "SAME" and layer.geometry and layer.bias is not None
    assert all(ckpt.others[n].norm.eps == 1e-5 and ckpt.others[n].norm.momentum == 0.9 for n in DECONVS_BN)  # type: ignore[union-attr]
    # The values are the checkpoint's, in TF's own layouts.
    stored = _values(Path(dcgan["prefix"]))
    assert np.array_equal(ckpt.others["generator/g_h1"].kernel, stored["generator/g_h1/w"])
    assert np.array_equal(head.kernel, stored["discriminator/d_h4_lin/Matrix"])
    assert np.array_equal(ckpt.others["generator/g_bn0"].norm.moving_var, stored["generator/g_bn0/moving_variance"])  # type: ignore[union-attr]


def _doc_command(containing: str) -> list[str]:
    """The argv of the one ``$ convbn ...`` line of docs/dcgan-to-slim.md that contains ``containing``."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "dcgan-to-slim.md").read_text(encoding="utf-8")
    (line,) = [line for line in text.splitlines() if line.startswith("$ convbn ") and containing in line]
    return shlex.split(line[2:])[1:]


def _as_documented(dcgan: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DCGAN checkpoint copied to ``checkpoint/DCGAN.model-1000`` (.meta included), the doc's name,
    with ``tmp_path`` the working directory."""
    source = Path(dcgan["prefix"])
    (tmp_path / "checkpoint").mkdir()
    for file in source.parent.glob(source.name + ".*"):
        shutil.copy(file, tmp_path / "checkpoint" / ("DCGAN.model-1000" + file.name[len(source.name):]))
    monkeypatch.chdir(tmp_path)


def test_the_whole_dcgan_converts_to_its_slim_rewrite(
    dcgan: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.formats import dcgan_graphs

    # The documented command, as written, on the checkpoint under the doc's name.
    _as_documented(dcgan, tmp_path, monkeypatch)
    argv = _doc_command("DCGAN.model-1000 slim/model.ckpt")
    assert "--pair" not in argv
    assert main(argv) == 0
    # Every layer is run against the source, the four transposed convs included: 3 pairs and 8 others.
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "verified: all 11 layer(s) within tolerance" and "not run" not in out
    out = tmp_path / "slim" / "model.ckpt"
    written = convbn.save_checkpoint(convbn.load_checkpoint(dcgan["prefix"]), tmp_path / "api.ckpt", "slim")
    notes = " ".join(written.notes)
    assert "folded the conv bias of 3 layer(s)" in notes
    assert "folded the bias of 3 conv_transpose layer(s) into beta of the BatchNorm after it" in notes
    assert all(n in notes for n in DECONVS_BN)
    assert written.tensors == {}
    values = _values(out)
    assert not [n for n in values if n.endswith(("/w", "/Matrix", "/bias"))]
    assert not [n for n in values if "BatchNorm" in n and n.rpartition("/BatchNorm")[0] + "/biases" in values]
    for name, value in _values(tmp_path / "api.ckpt").items():
        assert np.array_equal(value, values[name]), name
    got = dcgan_graphs.run_slim_rewrite(str(out), dcgan["z"], dcgan["x"])
    assert rel_err(got["fake"], dcgan["fake"]) < TOL
    assert rel_err(got["logits"], dcgan["logits"]) < TOL

    # Controls: a deconv bias dropped instead of folded, and d_h4_lin's rows in NCHW flatten order,
    # are each visibly wrong through the same restore.
    ckpt = convbn.load_checkpoint(dcgan["prefix"])
    for name in DECONVS_BN:
        ckpt.others[name] = dataclasses.replace(ckpt.others[name], bias=None)
    head = ckpt.others["discriminator/d_h4_lin"]
    ckpt.others["discriminator/d_h4_lin"] = dataclasses.replace(
        head, kernel=convbn.layouts.flat_rows(head.kernel, 2, 2, 32, "hwc", "chw")
    )
    convbn.save_checkpoint(ckpt, tmp_path / "wrong.ckpt", "slim")
    wrong = dcgan_graphs.run_slim_rewrite(str(tmp_path / "wrong.ckpt"), dcgan["z"], dcgan["x"])
    assert rel_err(wrong["fake"], dcgan["fake"]) > 1e-2
    assert rel_err(wrong["logits"], dcgan["logits"]) > 1e-2


def _torch_port() -> Any:
    """A faithful PyTorch port of the DCGAN: NCHW, bias=False before each BatchNorm, ``view`` into the
    generator's first map and ``flatten`` before ``d_h4_lin``; TF's SAME (asymmetric at stride 2) as
    an explicit pad for the convs and a crop of the last row and column for the transposed convs.
    Module names follow what ``convert --to torch`` writes for the TF scopes."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from tests.formats import dcgan_graphs as g

    class DeconvBN(nn.ConvTranspose2d):
        def __init__(self, cin: int, cout: int, norm: bool) -> None:
            # padding=1 keeps rows 1 .. 2n+1 of the full output; TF's SAME keeps 1 .. 2n.
            super().__init__(cin, cout, 5, stride=2, padding=1, bias=not norm)
            self.bn = nn.BatchNorm2d(cout, eps=1e-5) if norm else None

        def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
            y = super().forward(x, output_size)[:, :, : 2 * x.shape[2], : 2 * x.shape[3]]
            return y if self.bn is None else self.bn(y)

    class ConvBN(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, 5, stride=2, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=1e-5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(F.pad(x, (1, 2, 1, 2))))

    class Generator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g_h0_lin = nn.Linear(g.Z_DIM, g.GF * 8 * g.S * g.S)
            self.g_bn0 = nn.BatchNorm2d(g.GF * 8, eps=1e-5)
            width = g.GF * 8
            for scope, norm, out in g.G_DECONVS:
                setattr(self, scope, DeconvBN(width, out, norm is not None))
                width = out

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.g_bn0(self.g_h0_lin(z).view(-1, g.GF * 8, g.S, g.S)))
            for scope, norm, _ in g.G_DECONVS:
                h = getattr(self, scope)(h)
                h = torch.relu(h) if norm is not None else torch.tanh(h)
            return h

    class Discriminator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            width = g.C_DIM
            for scope, norm, out in g.D_CONVS:
                setattr(self, scope, ConvBN(width, out) if norm is not None else nn.Conv2d(width, out, 5, stride=2))
                width = out
            self.d_h4_lin = nn.Linear(width * g.S * g.S, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x
            for scope, norm, _ in g.D_CONVS:
                layer = getattr(self, scope)
                h = F.leaky_relu(layer(h if norm is not None else F.pad(h, (1, 2, 1, 2))), 0.2)
            return self.d_h4_lin(h.flatten(1))

    model = nn.Module()
    model.generator = Generator()
    model.discriminator = Discriminator()
    return model.eval()


@pytest.mark.needs("torch")
def test_the_whole_dcgan_converts_to_a_faithful_torch_port(
    dcgan: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    _as_documented(dcgan, tmp_path, monkeypatch)
    argv = _doc_command("dcgan.pt --to torch")
    assert "--verify" in argv and "--no-conv-bias" in argv
    assert main(argv) == 0
    # The bias-free transposed convs read back as ConvTranspose2d weights (their BatchNorms say so),
    # and every layer is run against the source.
    assert capsys.readouterr().out.splitlines()[-1] == "verified: all 11 layer(s) within tolerance"
    out = tmp_path / "dcgan.pt"
    written = convbn.save_checkpoint(
        convbn.load_checkpoint(dcgan["prefix"]), tmp_path / "api.pt", "torch", conv_bias=False
    )
    notes = " ".join(written.notes)
    assert "folded the bias of 3 conv_transpose layer(s)" in notes and "folded the conv bias of 3 layer(s)" in notes
    assert written.tensors == {}
    model = _torch_port()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with torch.no_grad():
        fake = model.generator(torch.from_numpy(dcgan["z"])).permute(0, 2, 3, 1).numpy()
        logits = model.discriminator(torch.from_numpy(dcgan["x"]).permute(0, 3, 1, 2)).numpy()
    assert rel_err(fake, dcgan["fake"]) < TOL
    assert rel_err(logits, dcgan["logits"]) < TOL
    # The flatten orders matter here: d_h4_lin's rows left in TF's NHWC order are visibly wrong.
    state = torch.load(out, weights_only=True)
    head = convbn.load_checkpoint(dcgan["prefix"]).others["discriminator/d_h4_lin"]
    state["discriminator.d_h4_lin.weight"] = torch.from_numpy(np.ascontiguousarray(head.kernel.T))
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        wrong = model.discriminator(torch.from_numpy(dcgan["x"]).permute(0, 3, 1, 2)).numpy()
    assert rel_err(wrong, dcgan["logits"]) > 1e-2


@pytest.mark.needs("torch")
def test_verifying_the_torch_file_hides_no_wrong_transposed_kernel(dcgan: dict[str, Any], tmp_path: Path) -> None:
    """A generator whose last transposed conv is bias-free too: nothing in the .pt says ConvTranspose2d
    for it, so verify reads it under the source's structure; a transposed-conv kernel corrupted in
    the file still fails, whether or not its kind was decided."""
    import torch

    from convbn.convert import verify_checkpoint

    source = convbn.load_checkpoint(dcgan["prefix"])
    source.others["generator/g_h4"] = dataclasses.replace(source.others["generator/g_h4"], bias=None)
    convbn.save_checkpoint(source, tmp_path / "g.pt", "torch", conv_bias=False)
    back = convbn.load_checkpoint(tmp_path / "g.pt")
    assert back.kind_undecided == ["generator.g_h4"] and back.others["generator.g_h4"].kind == "conv"
    assert any(n.startswith("read as convs: 1 kernel(s)") and "generator.g_h4" in n for n in back.notes)
    checks = verify_checkpoint(source, back)
    assert len(checks) == 11 and all(c.ok for c in checks), [c for c in checks if not c.ok]
    state = torch.load(tmp_path / "g.pt", weights_only=True)
    for layer, tamper in (
        ("generator.g_h4", lambda w: w.transpose(2, 3)),  # undecided: spatially transposed
        ("generator.g_h2", lambda w: w.transpose(2, 3)),  # decided by its BatchNorm
        ("generator.g_h2", lambda w: w.transpose(0, 1)),  # in and out swapped: another shape
        ("generator.g_h4", lambda w: w.flip(2, 3)),  # a flipped kernel, as flax stores it
    ):
        bad = dict(state, **{f"{layer}.weight": tamper(state[f"{layer}.weight"]).contiguous()})
        torch.save(bad, tmp_path / "bad.pt")
        failed = [c for c in verify_checkpoint(source, convbn.load_checkpoint(tmp_path / "bad.pt")) if not c.ok]
        assert failed, layer
    # A kernel with its input channels out of order fails, and only that layer.
    bad = dict(state, **{"generator.g_h1.weight": state["generator.g_h1.weight"].roll(1, 0)})
    torch.save(bad, tmp_path / "bad.pt")
    names = [c.source for c in verify_checkpoint(source, convbn.load_checkpoint(tmp_path / "bad.pt")) if not c.ok]
    assert names == ["generator/g_h1"]


@pytest.mark.needs("jax", "flax", "tensorflow")
def test_the_flax_ports_transposed_conv_padding_is_tf_same() -> None:
    """The port's ConvTranspose padding, derived in dcgan_flax.py, against tf.nn.conv2d_transpose
    (SAME, stride 2) at odd and even sizes; flax's own 'SAME' agrees, and the window one row off does not."""
    import flax.linen as nn
    import jax.numpy as jnp
    import tensorflow as tf

    from convbn import layouts
    from tests.formats.dcgan_flax import tf_same_transpose_padding

    assert tf_same_transpose_padding(5, 2) == (3, 2)
    rng = np.random.default_rng(5)
    for k, size in ((5, 3), (5, 4), (4, 3)):
        x = rng.standard_normal((2, size, size + 1, 3)).astype(np.float32)
        kernel = rng.standard_normal((k, k, 4, 3)).astype(np.float32)  # TF's (kh, kw, out, in)
        want = tf.nn.conv2d_transpose(x, kernel, (2, 2 * size, 2 * size + 2, 4), 2, "SAME").numpy()
        flax_kernel = {"params": {"kernel": jnp.asarray(layouts.transpose_to_flax(kernel))}}
        for padding in ((tf_same_transpose_padding(k, 2),) * 2, "SAME"):
            layer = nn.ConvTranspose(4, (k, k), strides=(2, 2), padding=padding, use_bias=False)
            assert rel_err(np.asarray(layer.apply(flax_kernel, x)), want) < TOL
        low, high = tf_same_transpose_padding(k, 2)
        if low != high:
            off = nn.ConvTranspose(4, (k, k), strides=(2, 2), padding=((high, low),) * 2, use_bias=False)
            assert rel_err(np.asarray(off.apply(flax_kernel, x)), want) > 1e-2


@pytest.mark.needs("jax", "flax", "msgpack")
def test_the_whole_dcgan_converts_to_a_faithful_flax_port(
    dcgan: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import flax.serialization

    from convbn.layouts import transpose_to_flax
    from tests.formats import dcgan_flax
    from tests.formats import dcgan_graphs as g

    _as_documented(dcgan, tmp_path, monkeypatch)
    argv = _doc_command("dcgan.msgpack --to flax")
    assert "--pair" not in argv and "--verify" in argv
    assert main(argv) == 0
    out = capsys.readouterr().out
    # Every layer is run against the source, the transposed convs included: 3 pairs and 8 others.
    assert out.splitlines()[-1] == "verified: all 11 layer(s) within tolerance" and "not run" not in out
    written = convbn.save_checkpoint(
        convbn.load_checkpoint(dcgan["prefix"]), tmp_path / "api.msgpack", "flax", conv_bias=False
    )
    notes = " ".join(written.notes)
    assert "folded the bias of 3 conv_transpose layer(s)" in notes and all(n in notes for n in DECONVS_BN)
    assert "folded the conv bias of 3 layer(s)" in notes and written.tensors == {}
    assert "strides=(2, 2), padding='SAME' for generator/g_h1, generator/g_h2, generator/g_h3, generator/g_h4" in notes
    data = (tmp_path / "dcgan.msgpack").read_bytes()
    assert data == (tmp_path / "api.msgpack").read_bytes()

    # Every source tensor is in the file, in flax's layout; every bias before a BatchNorm folded into beta.
    stored = {k: v for k, v in _values(Path(dcgan["prefix"])).items() if "Adam" not in k and not k.endswith("_power")}
    tree = flax.serialization.msgpack_restore(data)
    params, stats = tree["params"], tree["batch_stats"]
    seen: set[str] = set()

    def take(name: str) -> np.ndarray:
        seen.add(name)
        return stored[name]

    def bn(owner: str, module: dict[str, Any], stat: dict[str, Any], bias: str | None) -> None:
        beta, gamma, var = take(f"{owner}/beta"), take(f"{owner}/gamma"), take(f"{owner}/moving_variance")
        folded = beta if bias is None else beta + gamma * take(bias) / np.sqrt(var.astype(np.float64) + 1e-5)
        np.testing.assert_allclose(module["bias"], folded, rtol=1e-6, atol=1e-7)
        assert np.array_equal(module["scale"], gamma) and np.array_equal(stat["var"], var)
        assert np.array_equal(stat["mean"], take(f"{owner}/moving_mean"))

    gen, disc = params["generator"], params["discriminator"]
    for scope, module in (("generator/g_h0_lin", gen["g_h0_lin"]), ("discriminator/d_h4_lin", disc["d_h4_lin"])):
        assert np.array_equal(module["kernel"], take(f"{scope}/Matrix")) and np.array_equal(module["bias"], take(f"{scope}/bias"))
    bn("generator/g_bn0", gen["g_bn0"], stats["generator"]["g_bn0"], None)
    for scope, norm, _ in g.G_DECONVS:
        assert np.array_equal(gen[scope]["kernel"], transpose_to_flax(take(f"generator/{scope}/w")))
        if norm is None:
            assert np.array_equal(gen[scope]["bias"], take(f"generator/{scope}/biases"))
        else:
            assert "bias" not in gen[scope]
            bn(f"generator/{norm}", gen[f"{scope}_bn"], stats["generator"][f"{scope}_bn"], f"generator/{scope}/biases")
    for scope, norm, _ in g.D_CONVS:
        if norm is None:
            assert np.array_equal(disc[scope]["kernel"], take(f"discriminator/{scope}/w"))
            assert np.array_equal(disc[scope]["bias"], take(f"discriminator/{scope}/biases"))
        else:
            assert np.array_equal(disc[scope]["conv"]["kernel"], take(f"discriminator/{scope}/w"))
            assert "bias" not in disc[scope]["conv"]
            bn(f"discriminator/{norm}", disc[scope]["bn"], stats["discriminator"][scope]["bn"],
               f"discriminator/{scope}/biases")
    assert seen == set(stored)

    # The port restores the file with flax's own from_bytes and reproduces both TF nets.
    variables = flax.serialization.from_bytes(dcgan_flax.template(dcgan["z"], dcgan["x"]), data)
    got = dcgan_flax.run(variables, dcgan["z"], dcgan["x"])
    assert rel_err(got["fake"], dcgan["fake"]) < TOL
    assert rel_err(got["logits"], dcgan["logits"]) < TOL
    # Control: a ConvTranspose kernel with in/out swapped but not flipped is visibly wrong.
    unflipped = np.ascontiguousarray(stored["generator/g_h2/w"].transpose(0, 1, 3, 2))
    variables["params"]["generator"]["g_h2"]["kernel"] = unflipped
    wrong = dcgan_flax.run(variables, dcgan["z"], dcgan["x"])
    assert rel_err(wrong["fake"], dcgan["fake"]) > 1e-2



@pytest.mark.needs("torch")
def test_load_into_fills_the_whole_port_from_the_slim_checkpoint(dcgan: dict[str, Any]) -> None:
    """load_into, straight from the tf-slim checkpoint, one half of the port at a time: the
    discriminator's lone first conv, its conv+BatchNorm pairs (biases folded) and ``d_h4_lin``,
    whose rows the fx graph's ``flatten`` puts in NCHW order; the generator's ``g_h0_lin``
    (columns in NCHW order, as the ``view`` says), and its transposed convs, run inside a subclass's
    own forward and cropped, whose biases fold into the BatchNorm reading the crop. Both outputs
    are TF's."""
    import torch

    model = _torch_port()
    for half, other in (("discriminator", "generator"), ("generator", "discriminator")):
        report = convbn.load_into(getattr(model, half), dcgan["prefix"], strict=False)
        assert report.missing == [] and report.mismatched == [] and report.untouched == [], report.summary()
        assert report.unexpected and all(u.startswith(f"{other}/") for u in report.unexpected)
        if half == "discriminator":
            assert report.permuted == {"d_h4_lin": "in"} and "d_h0_conv" in report.matched
    assert report.permuted == {"g_h0_lin": "out"} and set(report.folded) == {"g_h1", "g_h2", "g_h3"}
    with torch.no_grad():
        logits = model.discriminator(torch.from_numpy(dcgan["x"]).permute(0, 3, 1, 2)).numpy()
        fake = model.generator(torch.from_numpy(dcgan["z"])).permute(0, 2, 3, 1).numpy()
    assert rel_err(logits, dcgan["logits"]) < TOL
    assert rel_err(fake, dcgan["fake"]) < TOL


@pytest.mark.needs("jax", "flax")
def test_load_into_fills_the_whole_flax_port_from_the_slim_checkpoint(dcgan: dict[str, Any]) -> None:
    """The Flax port's modules, each half given as (module, variables): the traced modules' classes
    say its ``ConvTranspose`` layers are transposed convs (their leaves are a ``Conv``'s), loaded with
    flax's kernel convention; ``g_h0_lin``'s output and ``d_h4_lin``'s input are NHWC as the slim
    checkpoint's, so nothing is permuted. Both outputs are TF's."""
    import jax

    from tests.formats import dcgan_flax

    generator, discriminator = dcgan_flax.models()
    out = {}
    for module, key, name, other in ((generator, "z", "fake", "discriminator"), (discriminator, "x", "logits", "generator")):
        variables = module.init(jax.random.key(0), dcgan[key])
        report = convbn.load_into((module, variables), dcgan["prefix"], strict=False,
                                  example_input=dcgan[key], expected_output=dcgan[name])
        assert report.missing == [] and report.mismatched == [] and report.untouched == [], report.summary()
        assert report.unexpected and all(u.startswith(f"{other}/") for u in report.unexpected)
        assert report.permuted == {}
        out[name] = np.asarray(module.apply(report.variables, dcgan[key]))
        assert report.output_error is not None and report.output_error < TOL
        if name == "fake":
            assert [report.parts[f"g_h{i}"] for i in range(1, 5)] == ["conv_transpose"] * 4
            assert set(report.folded) == {"g_h1", "g_h2", "g_h3"}
    assert report.parts["d_h0_conv"] == "conv" and report.parts["d_h4_lin"] == "dense"
    assert rel_err(out["fake"], dcgan["fake"]) < TOL and rel_err(out["logits"], dcgan["logits"]) < TOL
