"""load_checkpoint / save_checkpoint: folding, fusion, detection, bad input and atomic writes.

These run without any framework: the safetensors format is implemented with NumPy alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import numpy as np
import pytest

import convbn
from convbn import ConvBNError
from convbn.convert import (
    Checkpoint,
    LayerSource,
    detect_format,
    format_for_path,
    fuse_checkpoint,
    prepare_for_format,
    verify_checkpoint,
)
from tests._support.assertions import rel_err
from tests.formats.builders import assert_same_arrays, random_checkpoint, reference_eval


def _x(params, seed=1):
    return np.random.default_rng(seed).standard_normal((2, 7, 6, params.in_channels))


# -- round trip and provenance -----------------------------------------------------------------------

def test_safetensors_round_trip_is_bit_exact_with_settings_and_geometry(tmp_path):
    ckpt = random_checkpoint()
    ckpt.layers["layer2"] = dataclasses.replace(ckpt.layers["layer2"], stride=2, padding=((0, 1), (1, 0)), gamma=None)
    ckpt.sources = {name: LayerSource(conv={"kernel": f"{name}.conv.weight"}, bn={}, reason="naming",
                                      conv_name=f"{name}.conv", bn_name=f"{name}.bn", geometry=name == "layer2")
                    for name in ckpt.layers}
    ckpt.tensors["fc.weight"] = np.arange(6, dtype=np.float16).reshape(2, 3)
    ckpt.extras["layer1"] = {"num_batches_tracked": np.array(7, np.int64)}
    ckpt.dropped = ["optimizer"]
    ckpt.metadata["source_format"] = "torch"
    convbn.save_checkpoint(ckpt, tmp_path / "m.safetensors", "safetensors")
    back = convbn.load_checkpoint(tmp_path / "m.safetensors")
    assert list(back.layers) == list(ckpt.layers)
    for name in ckpt.layers:
        assert_same_arrays(back.layers[name], ckpt.layers[name])
        a, b = back.layers[name], ckpt.layers[name]
        assert (a.eps, a.momentum, a.var_update) == (b.eps, b.momentum, b.var_update)
    assert back.layers["layer2"].stride == (2, 2)
    assert back.layers["layer2"].padding == ((0, 1), (1, 0))
    assert back.sources["layer2"].geometry and not back.sources["layer1"].geometry
    assert back.sources["layer1"].conv_name == "layer1.conv"
    assert np.array_equal(back.tensors["fc.weight"], ckpt.tensors["fc.weight"])
    assert back.tensors["fc.weight"].dtype == np.float16
    assert int(back.extras["layer1"]["num_batches_tracked"]) == 7
    assert back.dropped == ["optimizer"]
    assert back.metadata["source_format"] == "torch"
    assert back.convention == "torch"


def test_safetensors_header_records_provenance(tmp_path):
    ckpt = random_checkpoint()
    convbn.save_checkpoint(ckpt, tmp_path / "m.safetensors", "safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    layers = json.loads(meta["convbn.layers"])
    assert [entry["name"] for entry in layers] == ["layer1", "layer2", "layer3"]
    assert layers[0]["eps"] == 1e-5 and layers[0]["momentum"] == 0.9 and layers[0]["var_update"] == "unbiased"
    assert meta["convbn.convention"] == "torch"


# -- bias folding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("into", ["beta", "moving_mean"])
def test_folding_is_exact_at_inference_and_never_mutates_the_source(tmp_path, into):
    ckpt = random_checkpoint(dtype=np.float64)
    before = {name: {f: None if v is None else np.array(v) for f, v in p.arrays().items()}
              for name, p in ckpt.layers.items()}
    notes = list(ckpt.notes)
    written = convbn.save_checkpoint(ckpt, tmp_path / "m.safetensors", "safetensors", fold_bias=into)
    back = convbn.load_checkpoint(tmp_path / "m.safetensors")
    for name, p in ckpt.layers.items():
        q = back.layers[name]
        assert q.bias is None and written.layers[name].bias is None
        x = _x(p)
        assert rel_err(reference_eval(x, q), reference_eval(x, p)) < 1e-13
        # only the named statistic moved
        changed = "beta" if into == "beta" else "moving_mean"
        for field in ("kernel", "gamma", "beta", "moving_mean", "moving_var"):
            same = np.array_equal(np.asarray(getattr(q, field)), before[name][field])
            assert same == (field != changed), field
    # the caller's checkpoint is untouched
    for name, p in ckpt.layers.items():
        for field, value in p.arrays().items():
            assert np.array_equal(value, before[name][field])
    assert ckpt.notes == notes
    assert any(f"folded the conv bias of 3 layer(s) into {into}" in n for n in written.notes)


def test_moving_mean_fold_is_eps_independent_and_beta_fold_is_not():
    ckpt = random_checkpoint(dtype=np.float64)
    p = ckpt.layers["layer1"]
    x = _x(p)
    for eps in (1e-5, 1e-1):
        by_mean = prepare_for_format(ckpt, "torch", fold_bias="moving_mean").layers["layer1"]
        by_beta = prepare_for_format(ckpt, "torch", fold_bias="beta").layers["layer1"]
        expected = reference_eval(x, p, eps=eps)
        assert rel_err(reference_eval(x, by_mean, eps=eps), expected) < 1e-13
        beta_err = rel_err(reference_eval(x, by_beta, eps=eps), expected)
        assert (beta_err < 1e-13) == (eps == p.eps)


def test_fold_rules_per_target():
    ckpt = random_checkpoint()
    assert all(p.bias is not None for p in prepare_for_format(ckpt, "torch").layers.values())
    assert all(p.bias is None for p in prepare_for_format(ckpt, "slim").layers.values())
    assert all(p.bias is None for p in prepare_for_format(ckpt, "keras", conv_bias=False).layers.values())
    assert all(p.bias is None for p in prepare_for_format(ckpt, "flax", fold_bias="moving_mean").layers.values())
    no_bias = random_checkpoint(bias=False)
    added = prepare_for_format(no_bias, "torch", conv_bias=True)
    assert all(np.array_equal(p.bias, np.zeros(p.out_channels, np.float32)) for p in added.layers.values())
    with pytest.raises(ConvBNError, match="conv_bias=True needs a target whose conv\\+BatchNorm layers hold a conv bias"):
        prepare_for_format(ckpt, "slim", conv_bias=True)
    with pytest.raises(ConvBNError, match="fold_bias must be 'beta' or 'moving_mean'. Received: fold_bias='gamma'"):
        prepare_for_format(ckpt, "torch", fold_bias="gamma")


# -- fusion and verification -------------------------------------------------------------------------

def test_fuse_checkpoint_matches_the_reference_and_round_trips(tmp_path):
    ckpt = random_checkpoint(dtype=np.float64)
    fused = fuse_checkpoint(ckpt)
    assert fused.fused and not ckpt.fused
    for name, p in ckpt.layers.items():
        q = fused.layers[name]
        x = _x(p)
        plain_conv = reference_eval(x, p, gamma=None, beta=None, moving_mean=np.zeros(p.out_channels),
                                    moving_var=np.ones(p.out_channels), eps=0.0, kernel=np.asarray(q.kernel),
                                    bias=np.asarray(q.bias))
        assert rel_err(plain_conv, reference_eval(x, p)) < 1e-13
    convbn.save_checkpoint(fused, tmp_path / "f.safetensors", "safetensors")
    back = convbn.load_checkpoint(tmp_path / "f.safetensors")
    assert back.fused
    assert all(c.ok for c in verify_checkpoint(ckpt, back))
    with pytest.raises(ConvBNError, match="already fused"):
        fuse_checkpoint(fused)


def test_verify_catches_real_mistakes():
    ckpt = random_checkpoint()
    p = ckpt.layers["layer1"]
    wrong = {
        "lost bias": dataclasses.replace(p, bias=None),
        "flipped kernel": dataclasses.replace(p, kernel=np.ascontiguousarray(np.asarray(p.kernel)[::-1, ::-1])),
        "momentum only": dataclasses.replace(p, momentum=0.1),  # no effect at inference: passes
    }
    for what, q in wrong.items():
        other = Checkpoint(layers={"x": q, **{k: v for k, v in ckpt.layers.items() if k != "layer1"}})
        check = verify_checkpoint(ckpt, other)[0]
        assert check.ok == (what == "momentum only"), (what, check)
    missing = verify_checkpoint(ckpt, Checkpoint(layers=dict(list(ckpt.layers.items())[:2])))
    assert [c.ok for c in missing] == [True, True, False] and missing[2].problem
    reshaped = Checkpoint(layers={**ckpt.layers, "layer3": ckpt.layers["layer2"]})
    assert "differs from the source's" in verify_checkpoint(ckpt, reshaped)[2].problem


def test_verify_uses_a_stored_eps():
    ckpt = random_checkpoint()
    p = ckpt.layers["layer1"]
    other = Checkpoint(layers={"layer1": dataclasses.replace(p, eps=0.5)})
    assert verify_checkpoint(ckpt, other)[0].ok  # eps not stored by the target: the user sets it
    other.sources["layer1"] = LayerSource(conv={}, bn={}, reason="graph", settings=True)
    assert not verify_checkpoint(ckpt, other)[0].ok


# -- detection and bad input -------------------------------------------------------------------------

def test_format_for_path():
    assert [format_for_path(p) for p in ("a.pt", "a.pth", "m.bin", "a.weights.h5", "a.keras", "v.msgpack",
                                         "x.safetensors", "model.ckpt", "model.ckpt.index", "weird.txt")] == [
        "torch", "torch", "torch", "keras", "keras", "flax", "safetensors", "slim", "slim", None]


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(ConvBNError) as info:
        convbn.load_checkpoint(tmp_path / "nope.pt")
    assert str(info.value) == f"a checkpoint must exist at the path given. Received: '{tmp_path / 'nope.pt'}' (no such file)"
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(ConvBNError, match=r"junk.bin: not a checkpoint in any known format"):
        detect_format(junk)
    with pytest.raises(ConvBNError, match=r"junk.bin: not a readable torch checkpoint"):
        convbn.load_checkpoint(junk, "torch")
    with pytest.raises(ConvBNError, match=r"format must be one of \['torch', 'slim', 'keras', 'flax', 'safetensors'\]. Received: format='onnx'"):
        convbn.load_checkpoint(junk, "onnx")


def test_wrong_format_named(tmp_path):
    convbn.save_checkpoint(random_checkpoint(), tmp_path / "m.safetensors", "safetensors")
    with pytest.raises(ConvBNError, match=r"m.safetensors: format='flax' was given but the file is a safetensors checkpoint"):
        convbn.load_checkpoint(tmp_path / "m.safetensors", "flax")


@pytest.mark.parametrize("cut", [4, 200, -10])
def test_truncated_safetensors(tmp_path, cut):
    convbn.save_checkpoint(random_checkpoint(), tmp_path / "m.safetensors", "safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:cut])
    with pytest.raises(ConvBNError, match=r"t.safetensors: .*(truncated|not a checkpoint)"):
        convbn.load_checkpoint(tmp_path / "t.safetensors", "safetensors" if cut > 8 else None)


def test_corrupted_safetensors_header(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "c.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ConvBNError) as info:
        convbn.load_checkpoint(path)
    assert str(info.value) == f"{path}: tensor 'w' must span 16 bytes for shape [4] F32. Received: data_offsets=[0, 12]"


@pytest.mark.parametrize(("value", "shown"), [(-0.5, "-0.5"), (np.nan, "nan")])
def test_negative_or_nan_variance_names_file_and_tensor(tmp_path, value, shown):
    ckpt = random_checkpoint()
    var = np.array(ckpt.layers["layer2"].moving_var)
    var[3] = value
    ckpt.layers["layer2"] = dataclasses.replace(ckpt.layers["layer2"], moving_var=var)
    path = tmp_path / "m.safetensors"
    convbn.save_checkpoint(ckpt, path, "safetensors")
    with pytest.raises(ConvBNError) as info:
        convbn.load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: a moving variance must be finite and >= 0. Received: layer2/moving_var[3]=")
    assert shown in str(info.value)


def test_shape_mismatch_names_file_and_tensors(tmp_path):
    ckpt = random_checkpoint()
    path = tmp_path / "m.safetensors"
    convbn.save_checkpoint(ckpt, path, "safetensors")
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["convbn.layers"] = header["__metadata__"]["convbn.layers"].replace(
        '"moving_var": "layer1/moving_var"', '"moving_var": "layer2/moving_var"')
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    path.write_bytes(bytes(raw[:8]) + new + bytes(raw[8 + n :]))
    with pytest.raises(ConvBNError) as info:
        convbn.load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: layer 'layer1' (")
    assert "moving_var='layer2/moving_var'" in message
    assert "moving_var must have shape (out_channels,) = (8,) to match the kernel. Received: moving_var.shape=(16,)" in message


# -- atomic writes -----------------------------------------------------------------------------------

def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import convbn.formats.safetensors as st

    ckpt = random_checkpoint()
    calls = []

    def fail_after_first(progress, name):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(st, "tick", fail_after_first)
    with pytest.raises(OSError, match="disk full"):
        convbn.save_checkpoint(ckpt, tmp_path / "m.safetensors", "safetensors")
    assert calls == ["layer1", "layer2"]  # it did write part of the file before failing
    assert os.listdir(tmp_path) == []


def test_a_failed_overwrite_keeps_the_old_file(tmp_path, monkeypatch):
    import convbn.formats.safetensors as st

    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old contents")
    monkeypatch.setattr(st, "tick", lambda progress, name: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        convbn.save_checkpoint(random_checkpoint(), path, "safetensors")
    assert path.read_bytes() == b"old contents" and os.listdir(tmp_path) == ["m.safetensors"]


def test_overwrite_false_refuses_an_existing_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(ConvBNError, match="exists; refusing to overwrite it"):
        convbn.save_checkpoint(random_checkpoint(), path, "safetensors", overwrite=False)
    assert path.read_bytes() == b"old"
