"""Regression tests for the review of the pure TF bundle reader and writer (issue 10).

Each hostile index is built by hand (records, data bytes) so that it holds exactly the defect
under test; everything else about it is what TF writes.
"""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from convbn import ConvBNError
from convbn.formats import _tfbundle, _tfproto, slim
from tests.conftest import need


def _crafted(directory: Path, data: bytes, records: Sequence[tuple[bytes, bytes]]) -> Path:
    """A one-shard bundle at ``directory/model.ckpt`` of ``data`` and the index ``records``."""
    prefix = directory / "model.ckpt"
    _tfbundle.shard_path(prefix, 0, 1).write_bytes(data)
    header = (b"", _tfproto.encode_bundle_header(1))
    _tfbundle.index_path(prefix).write_bytes(_tfbundle._build_table([header, *sorted(records)]))
    return prefix


def _floats(*values: float) -> tuple[bytes, int]:
    data = np.asarray(values, "<f4").tobytes()
    return data, _tfbundle.masked_crc(data)


def _entry(dtype: int, shape: Sequence[int], size: int, crc: int, offset: int = 0) -> bytes:
    return _tfproto.encode_bundle_entry(dtype=dtype, shape=shape, size=size, crc32c=crc, offset=offset)


def _partitioned(tmp_path: Path, slices: Sequence[Sequence[tuple[int, int]]]) -> Path:
    """Variable ``v`` of shape [4] with ``slices``, each stored (as the same two values 1, 2)."""
    data, crc = _floats(1.0, 2.0)
    records = [(b"v", _tfproto.encode_bundle_entry(dtype=1, shape=(4,), size=0, crc32c=0, slices=slices))]
    stored = set()
    for piece in slices:
        key = _tfbundle.slice_key(b"v", piece)
        if key not in stored:
            stored.add(key)
            records.append((key, _entry(1, (2,), 8, crc, offset=8 * len(stored) - 8)))
    return _crafted(tmp_path, data * len(stored), records)


def test_repeated_slices_of_a_partitioned_variable_are_refused(tmp_path: Path) -> None:
    bundle = _tfbundle.Bundle(_partitioned(tmp_path, [[(0, 2)], [(0, 2)]]))
    with pytest.raises(ConvBNError, match=r"overlaps another of its slices.*model\.ckpt\.index, tensor='v'"):
        bundle.read("v")


def test_overlapping_slices_of_a_partitioned_variable_are_refused(tmp_path: Path) -> None:
    # [0, 3) and [2, 3) hold the 4 values of v between them, with v[3] in neither.
    prefix = tmp_path / "model.ckpt"
    three, crc3 = _floats(1.0, 2.0, 3.0)
    one, crc1 = _floats(4.0)
    slices = [[(0, 3)], [(2, 1)]]
    records = [
        (b"v", _tfproto.encode_bundle_entry(dtype=1, shape=(4,), size=0, crc32c=0, slices=slices)),
        (_tfbundle.slice_key(b"v", slices[0]), _entry(1, (3,), 12, crc3)),
        (_tfbundle.slice_key(b"v", slices[1]), _entry(1, (1,), 4, crc1, offset=12)),
    ]
    _crafted(tmp_path, three + one, records)
    with pytest.raises(ConvBNError, match="overlaps another of its slices"):
        _tfbundle.Bundle(prefix).read("v")


def test_slices_that_tile_their_variable_still_read(tmp_path: Path) -> None:
    bundle = _tfbundle.Bundle(_partitioned(tmp_path, [[(0, 2)], [(2, 2)]]))
    np.testing.assert_array_equal(bundle.read("v"), np.asarray([1, 2, 1, 2], np.float32))


def _with_variant(tmp_path: Path, dtype: int = 21) -> Path:
    data, crc = _floats(1.0, 2.0)
    records = [(b"w", _entry(1, (2,), 8, crc)), (b"iterator", _entry(dtype, (), 8, 0, offset=8))]
    return _crafted(tmp_path, data + b"\0" * 8, records)


@pytest.mark.parametrize("dtype", [21, 20, 29])  # DT_VARIANT, DT_RESOURCE, DT_INT4
def test_a_tensor_of_an_unreadable_dtype_is_refused_only_when_read(tmp_path: Path, dtype: int) -> None:
    bundle = _tfbundle.Bundle(_with_variant(tmp_path, dtype))
    np.testing.assert_array_equal(bundle.read("w"), np.asarray([1, 2], np.float32))
    assert "iterator" not in bundle.shapes
    with pytest.raises(ConvBNError, match=rf"dtype {dtype} is not a tensor dtype.*tensor='iterator'"):
        bundle.read("iterator")


def test_slim_read_drops_a_tensor_of_an_unreadable_dtype_with_a_note(tmp_path: Path) -> None:
    ckpt = slim.read(_with_variant(tmp_path))
    np.testing.assert_array_equal(ckpt.tensors["w"], np.asarray([1, 2], np.float32))
    assert "iterator" in ckpt.dropped and "iterator" not in ckpt.tensors
    assert any("iterator" in note and "dtypes convbn does not read" in note for note in ckpt.notes)


def test_a_tf_checkpoint_with_an_iterator_reads_without_it(tmp_path: Path) -> None:
    """TF stores a tf.data iterator's state as a DT_VARIANT tensor, beside the model's variables."""
    need("tensorflow")
    import tensorflow as tf

    iterator = iter(tf.data.Dataset.range(4))
    next(iterator)
    prefix = tf.train.Checkpoint(w=tf.Variable([1.5, -2.0]), it=iterator).write(str(tmp_path / "ckpt"))
    ckpt = slim.read(prefix)
    np.testing.assert_array_equal(ckpt.tensors["w"], np.asarray([1.5, -2.0], np.float32))
    assert "it/.ATTRIBUTES/ITERATOR_STATE" in ckpt.dropped
    with pytest.raises(ConvBNError, match="dtype 21 is not a tensor dtype convbn reads"):
        _tfbundle.Bundle(Path(prefix)).read("it/.ATTRIBUTES/ITERATOR_STATE")


@pytest.mark.parametrize("dtype", [1, 7])  # float32, string
def test_an_empty_tensor_too_large_for_numpy_is_refused(tmp_path: Path, dtype: int) -> None:
    data, crc = _floats(1.0)
    size = 0 if dtype == 1 else 4
    prefix = _crafted(tmp_path, data, [(b"huge", _entry(dtype, (0, 2**62, 2**62), size, crc))])
    with pytest.raises(ConvBNError, match=r"larger than any array can be.*tensor='huge'"):
        _tfbundle.Bundle(prefix).read("huge")


def test_an_empty_tensor_with_large_dimensions_still_reads(tmp_path: Path) -> None:
    prefix = _crafted(tmp_path, b"", [(b"empty", _entry(1, (0, 2**20, 2**20), 0, _tfbundle.masked_crc(b"")))])
    assert _tfbundle.Bundle(prefix).read("empty").shape == (0, 2**20, 2**20)


def test_entries_sharing_bytes_are_refused(tmp_path: Path) -> None:
    data, crc = _floats(1.0, 2.0, 3.0, 4.0)
    records = [(f"t{i}".encode(), _entry(1, (4,), 16, crc)) for i in range(3)]
    with pytest.raises(ConvBNError, match=r"overlap those of tensor 't0'.*tensor='t1'"):
        _tfbundle.Bundle(_crafted(tmp_path, data, records))


def test_entries_overlapping_in_part_are_refused(tmp_path: Path) -> None:
    data, _ = _floats(1.0, 2.0, 3.0)
    records = [(b"a", _entry(1, (2,), 8, 0)), (b"b", _entry(1, (2,), 8, 0, offset=4))]
    with pytest.raises(ConvBNError, match=r"overlap those of tensor 'a'.*tensor='b'"):
        _tfbundle.Bundle(_crafted(tmp_path, data, records))


def test_empty_tensors_at_one_offset_are_not_overlaps(tmp_path: Path) -> None:
    data, crc = _floats(1.0, 2.0)
    empty = _tfbundle.masked_crc(b"")
    records = [(b"a", _entry(1, (0,), 0, empty, offset=4)), (b"b", _entry(1, (0, 3), 0, empty, offset=4)),
               (b"c", _entry(1, (2,), 8, crc))]
    bundle = _tfbundle.Bundle(_crafted(tmp_path, data, records))
    np.testing.assert_array_equal(bundle.read("c"), np.asarray([1, 2], np.float32))
    assert bundle.read("b").shape == (0, 3)


def test_big_endian_and_native_arrays_are_written_little_endian(tmp_path: Path) -> None:
    values = np.arange(6, dtype=np.float64).reshape(2, 3) * 1.5
    other = ">" if sys.byteorder == "little" else "<"
    tensors = [("native", values.astype("=f8")), ("swapped", values.astype(other + "f8")),
               ("strided", values.astype(other + "f8").T)]
    _tfbundle.write(tmp_path / "model.ckpt", tensors)
    bundle = _tfbundle.Bundle(tmp_path / "model.ckpt")
    assert bundle.read("native").tobytes() == values.astype("<f8").tobytes()
    np.testing.assert_array_equal(bundle.read("swapped"), values)
    np.testing.assert_array_equal(bundle.read("strided"), values.T)


def test_encoding_a_tensor_copies_nothing_until_its_chunks_are_written() -> None:
    # A transposed (non-contiguous) tensor needs a C-order copy: made when its chunks are
    # consumed, one tensor at a time, not when the writer encodes every tensor up front.
    values = np.arange(1 << 20, dtype=np.float64).reshape(1024, 1024).T
    tracemalloc.start()
    try:
        _, chunks, size = _tfbundle._encode("x", values)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size == values.nbytes and peak < values.nbytes // 8
    assert b"".join(chunk for chunk, _ in chunks) == np.ascontiguousarray(values).astype("<f8").tobytes()


def test_a_uint8_constant_out_of_range_is_a_proto_error() -> None:
    cls = _tfproto._CLASSES["TensorProto"]
    uint8 = _tfproto._parse("TensorProto", _tfproto._encode(cls, {"dtype": 4, "int_val": [300]}))
    with pytest.raises(_tfproto.ProtoError, match="outside its range"):
        _tfproto.tensor_value(uint8)
    half = _tfproto._parse("TensorProto", _tfproto._encode(cls, {"dtype": 19, "half_val": [-1]}))
    with pytest.raises(_tfproto.ProtoError, match="outside its range"):
        _tfproto.tensor_value(half)
    fine = _tfproto._parse("TensorProto", _tfproto._encode(cls, {"dtype": 4, "tensor_shape": {"dim": [{"size": 2}]}, "int_val": [255, 7]}))
    np.testing.assert_array_equal(_tfproto.tensor_value(fine), np.asarray([255, 7], np.uint8))


def test_a_string_with_a_lone_surrogate_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConvBNError, match=r"must encode as UTF-8.*tensor='words'"):
        _tfbundle.write(tmp_path / "model.ckpt", [("words", np.asarray(["ok", "\ud800"], object))])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["\ud800", "a\udcff"])
def test_a_name_that_does_not_encode_or_repeats_is_refused(tmp_path: Path, name: str) -> None:
    tensors = [(name, np.zeros(1, np.float32)), (name, np.ones(1, np.float32))]
    with pytest.raises(ConvBNError, match="must encode as UTF-8|must be unique"):
        _tfbundle.write(tmp_path / "model.ckpt", tensors)
    assert not list(tmp_path.iterdir())
