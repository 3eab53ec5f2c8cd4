"""Hostile and corrupt Keras files (.weights.h5, .keras): each is refused with one ConvBNError line
naming the file (and the HDF5 object), never read outside the file, never expanded past what the
file holds, and the CLI exits 2 with nothing written."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from tests.conftest import need
from tests.formats.hostile import refused_everywhere

need("h5py")
import h5py  # noqa: E402

# Bytes another file holds: four float32 values that would make a valid moving mean.
SECRET = np.array([11.5, -2.25, 7.0, 3.125], "<f4")

Mutate = Callable[[Any, Path], None]


def _weights(path: Path, mutate: Mutate | None = None, *, mean: bool = True) -> Path:
    """A small Keras 3 ``.weights.h5``: conv2d (3x3, 2 -> 4) and batch_normalization; ``mutate(f, dir)``
    then changes it (``mean=False`` leaves the BatchNorm's moving mean, vars/2, to it)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        conv = f.create_group("layers/conv2d/vars")
        conv.attrs["name"] = "conv"
        conv.create_dataset("0", data=rng.standard_normal((3, 3, 2, 4)).astype("f4"))
        bn = f.create_group("layers/batch_normalization/vars")
        bn.attrs["name"] = "conv_bn"
        bn.create_dataset("0", data=np.ones(4, "f4"))
        bn.create_dataset("1", data=np.zeros(4, "f4"))
        if mean:
            bn.create_dataset("2", data=np.zeros(4, "f4"))
        bn.create_dataset("3", data=np.ones(4, "f4"))
        if mutate is not None:
            mutate(f, path.parent)
    return path


def _config(eps: Any = 1e-3) -> dict[str, Any]:
    return {
        "class_name": "Sequential",
        "config": {
            "name": "m",
            "layers": [
                {"class_name": "Conv2D", "name": "conv", "config": {"name": "conv", "strides": [1, 1],
                                                                     "padding": "same", "use_bias": False}},
                {"class_name": "BatchNormalization", "name": "conv_bn",
                 "config": {"name": "conv_bn", "epsilon": eps, "momentum": 0.99}},
            ],
        },
    }


def _archive(path: Path, weights: Path, config: bytes | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3"}))
        zf.writestr("config.json", json.dumps(_config()) if config is None else config)
        zf.write(weights, "model.weights.h5")
    return path


def _secret_file(directory: Path) -> Path:
    secret = directory / "passwd"
    secret.write_bytes(SECRET.tobytes())
    return secret


def test_the_baseline_file_reads(tmp_path):
    """The files the hostile cases start from are valid: each refusal below is the mutation's."""
    ckpt = convbn.load_checkpoint(_weights(tmp_path / "m.weights.h5"))
    assert list(ckpt.layers) == ["conv"]
    np.testing.assert_array_equal(np.asarray(ckpt.layers["conv"].moving_var), np.ones(4, "f4"))
    archive = convbn.load_checkpoint(_archive(tmp_path / "m.keras", tmp_path / "m.weights.h5"))
    assert archive.layers["conv"].eps == pytest.approx(1e-3)


def _no_secret_anywhere(directory: Path) -> None:
    """Only the files that hold the secret on purpose (passwd, other.h5) have its bytes."""
    for file in directory.rglob("*"):
        if file.is_file() and file.name not in ("passwd", "other.h5"):
            assert SECRET.tobytes() not in file.read_bytes(), file


def _external_storage(f: Any, directory: Path) -> None:
    f["layers/batch_normalization/vars"].create_dataset(
        "2", shape=(4,), dtype="<f4", external=[(str(_secret_file(directory)), 0, SECRET.nbytes)]
    )


def _external_link(f: Any, directory: Path) -> None:
    with h5py.File(directory / "other.h5", "w") as other:
        other.create_dataset("data", data=np.frombuffer(_secret_file(directory).read_bytes(), "<f4"))
    f["layers/batch_normalization/vars/2"] = h5py.ExternalLink(str(directory / "other.h5"), "/data")


def _virtual(f: Any, directory: Path) -> None:
    with h5py.File(directory / "other.h5", "w") as other:
        other.create_dataset("data", data=np.frombuffer(_secret_file(directory).read_bytes(), "<f4"))
    layout = h5py.VirtualLayout(shape=(4,), dtype="<f4")
    layout[:] = h5py.VirtualSource(str(directory / "other.h5"), "data", shape=(4,))
    f["layers/batch_normalization/vars"].create_virtual_dataset("2", layout)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [(_external_storage, "external"), (_external_link, "external link"), (_virtual, "virtual")],
    ids=["external-storage", "external-link", "virtual-dataset"],
)
@pytest.mark.parametrize("archive", [False, True], ids=["weights.h5", "keras"])
def test_data_outside_the_file_is_never_read(tmp_path, mutate, fragment, archive):
    weights = _weights(tmp_path / "m.weights.h5", mutate, mean=False)
    src = _archive(tmp_path / "m.keras", weights) if archive else weights
    message = refused_everywhere(src, fragment, "layers/batch_normalization/vars/2")
    assert "11.5" not in message
    _no_secret_anywhere(tmp_path)


def test_a_zip_bomb_config_is_refused_by_a_bounded_read(tmp_path):
    """80 MiB of spaces (valid JSON whitespace, ~80 KB compressed): past the 64 MiB config limit."""
    weights = _weights(tmp_path / "m.weights.h5")
    src = tmp_path / "bomb.keras"
    with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("metadata.json", "{}")
        with zf.open("config.json", "w") as member:
            member.write(b"{")
            for _ in range(80):
                member.write(b" " * (1 << 20))
            member.write(b"}")
        zf.write(weights, "model.weights.h5")
    assert src.stat().st_size < 1 << 20
    refused_everywhere(src, "config.json", "64 MiB")


def _huge_unwritten(f: Any, directory: Path) -> None:
    # 256 MiB declared, no byte of it stored: reading would materialize the fill value.
    f.create_dataset("layers/dense/vars/0", shape=(64 << 20,), dtype="f4", fillvalue=1.0)


def _huge_compressed(f: Any, directory: Path) -> None:
    # 256 MiB declared as gzip chunks, one small chunk written.
    ds = f.create_dataset("layers/dense/vars/0", shape=(64 << 20,), dtype="f4", chunks=(1 << 10,),
                          compression="gzip", fillvalue=2.0)
    ds[:4] = 1.0


@pytest.mark.parametrize("mutate", [_huge_unwritten, _huge_compressed], ids=["fill-value", "compressed"])
def test_a_dataset_larger_than_its_stored_bytes_is_refused_before_reading(tmp_path, mutate):
    src = _weights(tmp_path / "m.weights.h5", mutate)
    assert src.stat().st_size < 1 << 20
    refused_everywhere(src, "layers/dense/vars/0", "268435456")


def test_a_compressed_dataset_within_bounds_still_reads(tmp_path):
    """gzip is ordinary HDF5: a compressed moving mean that the file holds is read as written."""
    mean = np.array([0.5, -1.0, 2.0, 0.25], "f4")

    def compressed(f: Any, directory: Path) -> None:
        f["layers/batch_normalization/vars"].create_dataset("2", data=mean, compression="gzip", chunks=(4,))

    ckpt = convbn.load_checkpoint(_weights(tmp_path / "m.weights.h5", compressed, mean=False))
    np.testing.assert_array_equal(np.asarray(ckpt.layers["conv"].moving_mean), mean)


def _soft_loop(f: Any, directory: Path) -> None:
    f["layers/loop"] = h5py.SoftLink("/layers/loop")


def _dangling(f: Any, directory: Path) -> None:
    f["layers/batch_normalization/vars/2"] = h5py.SoftLink("/nowhere")


def _soft_to_data(f: Any, directory: Path) -> None:
    f["layers/dense/vars/0"] = h5py.SoftLink("/layers/conv2d/vars/0")


def _hard_cycle(f: Any, directory: Path) -> None:
    f["layers/conv2d/vars/again"] = f["layers/conv2d"]


def _hard_cycle_to_root(f: Any, directory: Path) -> None:
    f["layers/dense/root"] = f["/"]


@pytest.mark.parametrize(
    ("mutate", "where", "fragment"),
    [
        (_soft_loop, "layers/loop", "soft link"),
        (_dangling, "layers/batch_normalization/vars/2", "soft link"),
        (_soft_to_data, "layers/dense/vars/0", "soft link"),
        (_hard_cycle, "layers/conv2d/vars/again", "second link"),
        (_hard_cycle_to_root, "layers/dense/root", "second link"),
    ],
    ids=["soft-loop", "dangling", "soft-to-data", "hard-cycle", "hard-cycle-to-root"],
)
def test_links_are_not_followed(tmp_path, mutate, where, fragment):
    src = _weights(tmp_path / "m.weights.h5", mutate, mean=mutate is not _dangling)
    refused_everywhere(src, where, fragment)


def test_a_layer_name_that_is_not_utf8_is_refused(tmp_path):
    def bad_name(f: Any, directory: Path) -> None:
        f["layers/conv2d/vars"].attrs["name"] = np.void(b"\xff\xfe")
        f["layers/batch_normalization/vars"].attrs["name"] = b"\xff\xfe"

    refused_everywhere(_weights(tmp_path / "m.weights.h5", bad_name), "layers/", "name")


def test_a_string_dataset_is_refused(tmp_path):
    def strings(f: Any, directory: Path) -> None:
        f.create_dataset("layers/dense/vars/0", data=np.array([b"a", b"b"], dtype=h5py.string_dtype()))

    refused_everywhere(_weights(tmp_path / "m.weights.h5", strings), "layers/dense/vars/0", "dtype")


def test_a_corrupt_group_is_refused(tmp_path):
    """The symbol table of 'layers' overwritten: h5py's KeyError/RuntimeError/OSError becomes one line."""
    src = _weights(tmp_path / "m.weights.h5")
    data = bytearray(src.read_bytes())
    seen = 0
    for magic in (b"TREE", b"SNOD", b"HEAP"):
        at = data.find(magic, 200)
        while at >= 0:
            data[at : at + 4] = b"XXXX"
            seen += 1
            at = data.find(magic, at + 4)
    assert seen
    src.write_bytes(bytes(data))
    refused_everywhere(src)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (b"[1]", "config.json"),
        (b"\xff\xfe{}", "config.json"),
        (b"[" * 100_000 + b"]" * 100_000, "config.json"),
        (json.dumps(_config(eps="x")).encode(), "epsilon"),
        (json.dumps(_config(eps=True)).encode(), "epsilon"),
        (json.dumps({"class_name": "Sequential", "config": {"layers": [1, "a"]}}).encode(), "config.json"),
        (json.dumps({"class_name": "Sequential", "config": {"layers": [
            {"class_name": "Conv2D", "name": "conv", "config": {"strides": 2}},
            {"class_name": "BatchNormalization", "name": "conv_bn", "config": {}}]}}).encode(), "strides"),
        (json.dumps({"class_name": "Sequential", "config": {"layers": [
            {"class_name": "Conv2D", "name": "conv", "config": {"groups": "two"}},
            {"class_name": "BatchNormalization", "name": "conv_bn", "config": {}}]}}).encode(), "groups"),
    ],
    ids=["list", "not-utf8", "nested", "string-eps", "bool-eps", "entries", "int-strides", "string-groups"],
)
def test_a_malformed_config_is_refused(tmp_path, config, fragment):
    src = _archive(tmp_path / "m.keras", _weights(tmp_path / "m.weights.h5"), config)
    refused_everywhere(src, fragment)


def test_a_corrupt_lzma_member_is_refused(tmp_path):
    """A .keras member may use any zip method; a corrupt LZMA stream is the file's fault, not a
    traceback from the decompressor (found by tests/fuzz)."""
    weights = _weights(tmp_path / "m.weights.h5")
    src = tmp_path / "m.keras"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3"}))
        zf.writestr("config.json", json.dumps(_config()))
        zf.write(weights, "model.weights.h5", compress_type=zipfile.ZIP_LZMA)
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo("model.weights.h5")
    data = bytearray(src.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 9  # past LZMA's props
    data[start:start + 64] = bytes(64)
    src.write_bytes(bytes(data))
    refused_everywhere(src, "not a readable Keras weights file")
