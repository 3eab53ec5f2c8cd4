"""``convbn convert``, ``convbn fuse`` and ``convbn inspect``: reports, exit codes, safety."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import convbn
from convbn.cli import main
from convbn.commands._checkpoints import ProgressBar
from tests.conftest import need
from tests.formats.builders import assert_same_arrays, random_checkpoint


@pytest.fixture
def source(tmp_path):
    """A 3-layer convbn safetensors checkpoint (readable with no framework installed)."""
    ckpt = random_checkpoint()
    ckpt.tensors["head.weight"] = np.ones((2, 16), np.float32)
    path = tmp_path / "src.safetensors"
    convbn.save_checkpoint(ckpt, path, "safetensors")
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_writes_reports_and_verifies(tmp_path, source, capsys):
    dst = tmp_path / "out.safetensors"
    code, out, err = _run(capsys, "convert", source, dst, "--verify")
    assert code == 0 and err == ""  # no progress bar when stderr is not a terminal
    lines = out.splitlines()
    assert lines[0] == f"{source} (safetensors) -> {dst} (safetensors): 3 layer(s) converted, 1 other tensor(s)"
    assert lines[1].split() == ["layer", "kernel", "(HWIO)", "dtype", "conv", "bias", "paired", "by", "max", "abs",
                                "err", "max", "rel", "err", "tolerance", "ok"]
    assert lines[3].split() == ["layer1", "3x3x3x8", "float32", "kept", "graph", "0.00e+00", "0.00e+00", "2e-06", "ok"]
    assert lines[-1] == "verified: all 3 layer(s) within tolerance"
    before, after = convbn.load_checkpoint(source), convbn.load_checkpoint(dst)
    for name in before.layers:
        assert_same_arrays(after.layers[name], before.layers[name])


@pytest.mark.parametrize(("flags", "into"), [(["--no-conv-bias"], "beta"), (["--fold-bias", "moving_mean"], "moving_mean")])
def test_convert_folds_on_request_and_reports_it_as_json(tmp_path, source, capsys, flags, into):
    dst = tmp_path / "out.safetensors"
    code, out, _ = _run(capsys, "convert", source, dst, "--verify", "--json", *flags)
    assert code == 0
    report = json.loads(out)
    assert [row["conv_bias"] for row in report["layers"]] == [f"folded into {into}"] * 3
    assert report["ok"] is True and [c["ok"] for c in report["verify"]] == [True] * 3
    assert all(0 < c["max_rel"] <= c["tolerance"] for c in report["verify"])
    assert report["tensors"] == {"head.weight": [2, 16]}
    assert any(f"folded the conv bias of 3 layer(s) into {into}" in n for n in report["notes"])
    assert all(p.bias is None for p in convbn.load_checkpoint(dst).layers.values())


def test_an_existing_destination_needs_force_and_the_source_is_never_written(tmp_path, source, capsys):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"precious")
    code, out, err = _run(capsys, "convert", source, dst)
    assert (code, out) == (2, "")
    assert err == f"convbn convert: error: {dst} exists; pass --force to overwrite it\n"
    assert dst.read_bytes() == b"precious"
    assert _run(capsys, "convert", source, dst, "--force")[0] == 0
    assert dst.read_bytes() != b"precious"
    original = source.read_bytes()
    code, _, err = _run(capsys, "convert", source, source, "--force")
    assert code == 2 and "DST must differ from SRC: convbn never modifies its source" in err
    assert source.read_bytes() == original


def test_a_failed_verification_exits_1_and_writes_nothing(tmp_path, source, capsys, monkeypatch):
    import convbn.formats.safetensors as st

    real = st.as_numpy

    def buggy(value):  # a writer that scales every kernel by 1.001
        array = real(value)
        return array * np.float32(1.001) if array.ndim == 4 else array

    monkeypatch.setattr(st, "as_numpy", buggy)
    dst = tmp_path / "out.safetensors"
    code, out, _ = _run(capsys, "convert", source, dst, "--verify")
    assert code == 1
    assert out.splitlines()[-1] == f"verification FAILED for 3 layer(s); nothing was written to {dst}"
    assert " FAIL" in out
    assert sorted(os.listdir(tmp_path)) == ["src.safetensors"]


def _bad_inputs(tmp_path, source):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01not a checkpoint")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(source.read_bytes()[:300])
    ckpt = convbn.load_checkpoint(source)
    var = np.array(ckpt.layers["layer3"].moving_var)
    var[0] = np.nan
    nan = tmp_path / "nan.safetensors"
    convbn.save_checkpoint(dataclasses.replace(ckpt, layers={**ckpt.layers, "layer3": dataclasses.replace(
        ckpt.layers["layer3"], moving_var=var)}), nan, "safetensors")
    return {
        "missing": ([tmp_path / "nope.pt"], f"a checkpoint must exist at the path given. Received: '{tmp_path / 'nope.pt'}' (no such file)"),
        "unknown": ([junk], f"{junk}: not a checkpoint in any known format"),
        "wrong --from": ([source, "--from", "flax"], f"{source}: format='flax' was given but the file is a safetensors checkpoint"),
        "truncated": ([truncated], f"{truncated}: truncated or corrupted safetensors file"),
        "nan variance": ([nan], f"{nan}: a moving variance must be finite and >= 0. Received: layer3/moving_var[0]=nan"),
        "bad --pair": ([source, "--pair", "x"], "a pair must be CONV=BN or the path of a mapping file. Received: 'x'"),
    }


def test_bad_input_gets_one_line_and_exit_2(tmp_path, source, capsys):
    for what, (args, message) in _bad_inputs(tmp_path, source).items():
        for command in (["convert", args[0], tmp_path / "o.safetensors", *args[1:]], ["inspect", *args]):
            code, out, err = _run(capsys, *command)
            assert code == 2 and out == "", (what, command)
            assert err.count("\n") == 1 and err.startswith(f"convbn {command[0]}: error: {message}"), (what, err)
    assert not (tmp_path / "o.safetensors").exists()


def test_shape_mismatch_and_malicious_pickle_through_the_cli(tmp_path, capsys):
    need("torch")
    import torch

    state = {"c.weight": torch.zeros(8, 3, 3, 3), "b.running_mean": torch.zeros(4), "b.running_var": torch.ones(4)}
    torch.save(state, tmp_path / "m.pt")
    code, _, err = _run(capsys, "convert", tmp_path / "m.pt", tmp_path / "o.safetensors", "--pair", "c=b")
    assert code == 2 and err == (
        "convbn convert: error: a paired conv and BatchNorm must have the same channel count "
        f"(in {tmp_path / 'm.pt'}). Received: 'c' has 8 output channels, 'b' has 4\n")

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')",))

    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as zf:  # torch.save's layout, with a pickle that runs code
        zf.writestr("evil/data.pkl", pickle.dumps({"0.weight": Payload()}, protocol=2))
        zf.writestr("evil/version", "3\n")
    code, _, err = _run(capsys, "inspect", evil)
    assert code == 2 and err.startswith(f"convbn inspect: error: {evil}: refused to unpickle") and err.count("\n") == 1
    assert not marker.exists()
    with zipfile.ZipFile(evil) as zf:
        pickle.loads(zf.read("evil/data.pkl"))  # the payload is real: unrestricted unpickling runs it
    assert marker.read_text() == "ran"


def test_the_console_entry_point_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "convbn", "convert", str(tmp_path / "missing.pt"),
                             str(tmp_path / "o.pt")], capture_output=True, text=True, cwd=os.getcwd())
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"convbn convert: error: a checkpoint must exist at the path given. Received: '{tmp_path / 'missing.pt'}' (no such file)"]


def test_target_format_must_be_known(tmp_path, source, capsys):
    code, _, err = _run(capsys, "convert", source, tmp_path / "out.xyz")
    assert code == 2 and "the target format must be given with --to or follow from DST's suffix" in err
    assert _run(capsys, "convert", source, tmp_path / "out.xyz", "--to", "safetensors")[0] == 0


def test_inspect_lists_layers_conventions_and_leftovers(tmp_path, capsys):
    ckpt = random_checkpoint()
    ckpt.tensors["stray.running_mean"] = np.zeros(4, np.float32)
    ckpt.unpaired = {"stray": "bn"}
    ckpt.dropped = ["optimizer"]
    ckpt.convention = "torch"
    convbn.save_checkpoint(ckpt, tmp_path / "m.safetensors", "safetensors")
    code, out, _ = _run(capsys, "inspect", tmp_path / "m.safetensors")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{tmp_path / 'm.safetensors'}: safetensors checkpoint, convention torch, 3 conv+BatchNorm layer(s), 1 other tensor(s)"
    assert lines[3].split() == ["layer1", "3x3x3x8", "float32", "yes", "yes", "1e-05", "0.9", "kept", "(0.1)",
                                "unbiased", "defaults", "graph"]
    assert "unpaired (kept as tensors): stray (BatchNorm)" in lines
    assert "dropped: optimizer" in lines
    code, out, _ = _run(capsys, "inspect", tmp_path / "m.safetensors", "--json")
    report = json.loads(out)
    assert [row["name"] for row in report["layers"]] == ["layer1", "layer2", "layer3"]
    assert report["layers"][1]["kernel_hwio"] == [3, 3, 8, 16] and report["layers"][1]["momentum_native"] == pytest.approx(0.1)
    assert report["tensors"] == {"stray.running_mean": {"shape": [4], "dtype": "float32"}}
    assert report["unpaired"] == {"stray": "bn"} and report["dropped"] == ["optimizer"]


def test_fuse_writes_conv_weight_and_bias(tmp_path, source, capsys):
    dst = tmp_path / "fused.safetensors"
    code, out, _ = _run(capsys, "fuse", source, dst, "--verify")
    assert code == 0 and out.splitlines()[-1] == "verified: all 3 layer(s) within tolerance"
    fused, original = convbn.load_checkpoint(dst), convbn.load_checkpoint(source)
    assert fused.fused
    x = np.random.default_rng(0).standard_normal((1, 5, 5, 3))
    p, q = original.layers["layer1"], fused.layers["layer1"]
    assert q.gamma is None and q.eps == 0.0 and np.array_equal(q.moving_var, np.ones(8, np.float32))
    y = convbn.conv_bn(x, p, backend="numpy")
    assert np.max(np.abs(convbn.conv_bn(x, q, backend="numpy") - y)) / np.max(np.abs(y)) < 2e-6


def test_fuse_to_torch_loads_into_a_model_without_batchnorm(tmp_path, capsys):
    need("torch")
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)).eval()
    model[1].running_var.uniform_(0.5, 2)
    model[1].running_mean.normal_()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert _run(capsys, "fuse", tmp_path / "m.pt", tmp_path / "f.pt")[0] == 0
    state = torch.load(tmp_path / "f.pt", weights_only=True)
    assert sorted(state) == ["0.bias", "0.weight"]
    deploy = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1)).eval()
    deploy.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), atol=2e-5, rtol=0)


def test_progress_bar_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = ProgressBar(3, "writing", stream)
    for name in ("a", "b", "c"):
        bar(name)
    bar.close()
    frames = stream.getvalue().split("\r")
    assert frames[1].startswith("writing   [##########....................] 1/3 a")
    assert frames[3].startswith("writing   [##############################] 3/3 c")
    quiet = io.StringIO()
    bar = ProgressBar(3, "writing", quiet)
    bar("a")
    bar.close()
    assert quiet.getvalue() == ""
    single = Terminal()
    ProgressBar(1, "writing", single)("a")
    assert single.getvalue() == ""
