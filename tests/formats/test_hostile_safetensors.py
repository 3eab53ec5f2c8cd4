"""Hostile and corrupt safetensors files: each is refused with one ConvBNError naming the file (and
the header key), before any tensor is viewed; the CLI exits 2 writing nothing."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
import convbn.cli
from tests.formats.builders import random_checkpoint
from tests.formats.hostile import cli_refuses, refused


def _write(path: Path, header: bytes | dict[str, Any], data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@pytest.fixture
def neutral(tmp_path: Path) -> Path:
    """A convbn safetensors file with two layers and convbn's metadata."""
    path = tmp_path / "m.safetensors"
    convbn.save_checkpoint(random_checkpoint(widths=(3, 4, 4)), path, "safetensors")
    return path


def _edited(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """``src`` with its header changed by ``edit``, the data bytes kept."""
    header, data = _split(src)
    edit(header)
    return _write(dst, header, data)




def test_a_header_nested_5000_deep_is_refused(tmp_path, capsys):
    path = _write(tmp_path / "deep.safetensors", b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}")
    refused(path, "nested too deeply")
    cli_refuses(path, capsys)


def _layer(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        layers = json.loads(header["__metadata__"]["convbn.layers"])
        layers[0][key] = value
        header["__metadata__"]["convbn.layers"] = json.dumps(layers)

    return edit


def _meta(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        header["__metadata__"][key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (_layer("eps", "x"), "layer 'layer1' has eps=\"x\""),
        (_layer("momentum", None), "layer 'layer1' has momentum=null"),
        (_layer("extras", [1]), "layer 'layer1' has extras=[1]"),
        (_layer("source_conv", {"kernel": 3}), "layer 'layer1' has source_conv="),
        (_layer("kernel", 7), "layer 'layer1' has kernel=7"),
        (_layer("stride", {"a": 1}), "layer 'layer1' has stride="),
        (_layer("padding", [["x", 1], [1, 1]]), "layer 'layer1'"),
        (_layer("geometry", "yes"), "layer 'layer1' has geometry=\"yes\""),
        (_meta("convbn.dropped", "5"), "'convbn.dropped': it must be a JSON list of strings. Received: 5"),
        (_meta("convbn.notes", "[1]"), "'convbn.notes'"),
        (_meta("convbn.unpaired", '["a"]'), "'convbn.unpaired'"),
        (_meta("convbn.layers", '{"a": 1}'), "'convbn.layers'"),
        (_meta("convbn.layers", "[1]"), "'convbn.layers'"),
        (_meta("convbn.notes", "[" * 5000 + "]" * 5000), "'convbn.notes': nested too deeply"),
        (_meta("convbn.fused", 1), "__metadata__ must map strings to strings"),
    ],
)
def test_unvalidated_convbn_metadata_is_refused_naming_the_key(neutral, tmp_path, edit, said):
    path = _edited(neutral, tmp_path / "bad.safetensors", edit)
    refused(path, said)


def test_a_note_that_is_not_a_string_writes_nothing(neutral, tmp_path, capsys):
    # It used to fail in the CLI's report after DST was written, leaving DST behind with exit 1.
    path = _edited(neutral, tmp_path / "bad.safetensors", _meta("convbn.notes", "[1, {}]"))
    cli_refuses(path, capsys)


def _tensor(offsets: list[int], dtype: str = "F32", shape: tuple[int, ...] = (4,)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": offsets}


def test_overlapping_tensors_and_repeated_keys_are_refused(tmp_path, capsys):
    data = np.arange(8, dtype=np.float32).tobytes()
    fine = _write(tmp_path / "fine.safetensors", {"a": _tensor([0, 16]), "b": _tensor([16, 32])}, data)
    np.testing.assert_array_equal(convbn.load_checkpoint(fine).tensors["b"], [4, 5, 6, 7])
    overlap = _write(tmp_path / "overlap.safetensors", {"a": _tensor([0, 16]), "b": _tensor([8, 24])}, data)
    refused(overlap, "tensors 'a' and 'b' overlap")
    cli_refuses(overlap, capsys)
    raw = b'{"a":' + json.dumps(_tensor([0, 16])).encode() + b',"a":' + json.dumps(_tensor([16, 32])).encode() + b"}"
    refused(_write(tmp_path / "twice.safetensors", raw, data), "key 'a' appears twice")


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        (_tensor([16, 32]), "ends at byte 32 of the data, which has 16"),
        (_tensor([0, 2**62], shape=(2**60,)), "ends at byte"),
        (_tensor([0, 16], shape=(2.0, 2)), "corrupted safetensors header entry for tensor 'a'"),
        (_tensor([0, 16], shape=(True, 4)), "corrupted safetensors header entry for tensor 'a'"),
        (_tensor([-16, 0]), "corrupted safetensors header entry for tensor 'a'"),
        (_tensor([0, 12]), "must span 16 bytes"),
        ({"dtype": "F32", "shape": [4]}, "corrupted safetensors header entry for tensor 'a'"),
        ([1, 2], "Received: [1, 2]"),
    ],
)
def test_entries_that_lie_about_their_bytes_are_refused(tmp_path, entry, said):
    path = _write(tmp_path / "bad.safetensors", {"a": entry}, np.zeros(4, np.float32).tobytes())
    refused(path, said)


def test_a_header_longer_than_the_file_is_refused_before_reading_it(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 90 * 1024 * 1024) + b'{"a":{}}')
    start = time.perf_counter()
    refused(path, "header of 94371840 bytes, file of 16")
    assert time.perf_counter() - start < 1.0
