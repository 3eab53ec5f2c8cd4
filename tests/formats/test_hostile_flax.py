"""Hostile and corrupt flax msgpack files: each is refused with one ConvBNError naming the file,
with arrays checked against their bytes before they are viewed; the CLI exits 2 writing nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
import convbn.cli
from convbn.formats import flax as flax_format
from tests.conftest import need
from tests.formats.hostile import cli_refuses, refused

need("msgpack")
import msgpack  # noqa: E402


def _array(shape: Any, dtype: Any, data: bytes) -> msgpack.ExtType:
    """flax's ndarray extension (type 1: shape, dtype name, bytes), with whatever fields are given."""
    return msgpack.ExtType(1, msgpack.packb([shape, dtype, data], use_bin_type=True))


def _real(a: np.ndarray) -> msgpack.ExtType:
    return _array(list(a.shape), a.dtype.name, a.tobytes())


def _write(path: Path, tree: Any) -> Path:
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    return path




def _chunked(shape: dict[str, Any], chunks: dict[str, Any]) -> dict[str, Any]:
    return {"__msgpack_chunked_array__": True, "shape": shape, "chunks": chunks}


def test_the_minimal_chunked_array_is_a_clean_error(tmp_path, capsys):
    path = _write(tmp_path / "chunk.msgpack", {"params": {"w": _chunked({}, {})}})
    refused(path, "chunked array at '/params/w'")
    cli_refuses(path, capsys)


def test_chunked_arrays_are_joined_and_checked_against_their_shape(tmp_path):
    values = np.arange(12, dtype=np.float32)
    parts = {"0": _real(values[:5]), "1": _real(values[5:])}
    good = _write(tmp_path / "good.msgpack", {"params": {"w": _chunked({"0": 3, "1": 4}, parts)}})
    np.testing.assert_array_equal(convbn.load_checkpoint(good).tensors["params/w"], values.reshape(3, 4))
    bad = _write(tmp_path / "bad.msgpack", {"params": {"w": _chunked({"0": 3, "1": 5}, parts)}})
    refused(bad, "shape [3, 5] but its chunks hold 12 values")
    mixed = {"0": _real(values[:5]), "1": _real(values[5:].astype(np.float64))}
    refused(_write(tmp_path / "mixed.msgpack", {"params": {"w": _chunked({"0": 12}, mixed)}}), "of one dtype")
    refused(_write(tmp_path / "str.msgpack", {"params": {"w": _chunked({"0": "12"}, parts)}}), "'/params/w'")


def test_maps_nested_beyond_the_bound_are_refused(tmp_path, capsys):
    def nested(depth: int) -> dict[str, Any]:
        tree: dict[str, Any] = {"w": _real(np.ones(2, np.float32))}
        for _ in range(depth - 2):  # the root and the innermost map count too
            tree = {"m": tree}
        return {"params": tree}

    at_bound = _write(tmp_path / "ok.msgpack", nested(flax_format.MAX_DEPTH))
    deep_name = "params/" + "m/" * (flax_format.MAX_DEPTH - 2) + "w"
    np.testing.assert_array_equal(convbn.load_checkpoint(at_bound).tensors[deep_name], [1, 1])
    # About 500 levels raised RecursionError.
    path = _write(tmp_path / "deep.msgpack", nested(500))
    refused(path, f"nest deeper than {flax_format.MAX_DEPTH} levels")
    cli_refuses(path, capsys)
    lists = _write(tmp_path / "lists.msgpack", {"params": {"w": [[[[]]]], "deep": [[], [[[]]]]}})
    assert convbn.load_checkpoint(lists).dropped == ["params/w", "params/deep"]


@pytest.mark.parametrize(
    ("shape", "dtype", "data", "said"),
    [
        ([-1], "float32", bytes(16), "shape must be a list of ints >= 0"),
        ([2, -1], "float32", bytes(16), "shape must be a list of ints >= 0"),
        ([2**40], "float32", bytes(16), f"needs {2**42} bytes; the file holds 16"),
        ([5], "float32", bytes(16), "needs 20 bytes; the file holds 16"),
        ([4], "(2,)f4", bytes(32), "dtype '(2,)f4'"),
        ([4], "object", bytes(32), "dtype 'object'"),
        ([4], "V4", bytes(16), "dtype 'V4'"),
        ([4.0], "float32", bytes(16), "shape must be a list of ints >= 0"),
        ("4", "float32", bytes(16), "shape must be a list of ints >= 0"),
        ([4], "float32", 7, "an array's data must be bytes. Received: int"),
    ],
    ids=["minus-1", "inferred", "2**40", "short", "subarray", "object", "void", "float-dim", "str-shape", "int-data"],
)
def test_an_array_whose_shape_and_dtype_do_not_match_its_bytes_is_refused(tmp_path, shape, dtype, data, said):
    path = _write(tmp_path / "bad.msgpack", {"params": {"w": _array(shape, dtype, data)}})
    refused(path, "corrupted flax msgpack file", said)


def test_an_array_that_matches_its_bytes_reads_back(tmp_path):
    values = np.arange(6, dtype=np.int16).reshape(2, 3)
    path = _write(tmp_path / "ok.msgpack", {"params": {"w": _real(values)}})
    got = convbn.load_checkpoint(path).tensors["params/w"]
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, values)
