"""Hostile and corrupt TF checkpoints: each is refused with one ConvBNError line naming the file,
before TensorFlow's reader sees what would abort the process (SIGABRT), and the CLI exits 2 with
nothing written.

The indexes are built here byte by byte (a LevelDB-style table of BundleEntryProto records), so a
test can say exactly which field lies."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn import ConvBNError
from convbn.cli import main
from convbn.formats import slim
from tests.conftest import need
from tests.formats.hostile import refused_everywhere

need("tensorflow")
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import graph_pb2, node_def_pb2  # noqa: E402
from tensorflow.core.protobuf import meta_graph_pb2, tensor_bundle_pb2, trackable_object_graph_pb2  # noqa: E402

MAGIC = bytes.fromhex("57fb808b247547db")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: TF checks each table block's."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _block(entries: list[tuple[bytes, bytes]], compression: int = 0) -> bytes:
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    body += struct.pack("<II", 0, 1) + bytes([compression])
    return body + struct.pack("<I", _masked_crc(body))


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _table(entries: list[tuple[bytes, bytes]], *, compression: int = 0, index_offset: int | None = None) -> bytes:
    """A TF table: one data block, an empty metaindex, an index block, the footer."""
    data = _block(entries, compression)
    meta = _block([])
    handle = _varint(0) + _varint(len(data) - 5)
    index = _block([(b"\xff", handle)])
    meta_at, index_at = len(data), len(data) + len(meta)
    footer = _varint(meta_at) + _varint(len(meta) - 5) + _varint(index_offset or index_at) + _varint(len(index) - 5)
    return data + meta + index + footer.ljust(40, b"\0") + MAGIC


def _entry(dtype: int = 1, shape: tuple[int, ...] = (4,), *, offset: int = 0, size: int | None = None,
           shard: int = 0, data: bytes = b"") -> bytes:
    """An entry; ``data``, the bytes it names, gives its checksum (TF checks it as it reads)."""
    e = tensor_bundle_pb2.BundleEntryProto(dtype=dtype, shard_id=shard, offset=offset, crc32c=_masked_crc(data))
    for d in shape:
        e.shape.dim.add(size=d)
    e.size = 4 * int(np.prod(shape)) if size is None else size
    return e.SerializeToString()


def _checkpoint(directory: Path, entries: list[tuple[bytes, bytes]], *, shards: int = 1, data: int = 64,
                **table: Any) -> Path:
    """``directory/m.ckpt``: the index of ``entries`` after a header, and ``data`` bytes of shard 0."""
    header = tensor_bundle_pb2.BundleHeaderProto(num_shards=shards).SerializeToString()
    prefix = directory / "m.ckpt"
    Path(f"{prefix}.index").write_bytes(_table([(b"", header), *entries], **table))
    Path(f"{prefix}.data-00000-of-{shards:05d}").write_bytes(np.arange(data // 4, dtype="<f4").tobytes())
    return prefix


def test_the_hand_built_index_reads(tmp_path):
    """The table writer above makes indexes TensorFlow reads: every refusal below is the lie's."""
    data = np.arange(16, dtype="<f4").tobytes()
    prefix = _checkpoint(tmp_path, [(b"c/weights", _entry(shape=(1, 1, 2, 4), size=32, data=data[:32])),
                                    (b"t", _entry(shape=(4,), offset=32, data=data[32:48]))])
    ckpt = convbn.load_checkpoint(prefix)
    np.testing.assert_array_equal(ckpt.others["c"].kernel, np.arange(8, dtype="f4").reshape(1, 1, 2, 4))
    np.testing.assert_array_equal(ckpt.tensors["t"], np.arange(8, 12, dtype="f4"))


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        (_entry(shape=(-1, 4), size=16), "dimensions >= 0"),
        (_entry(shape=(1,) * 300, size=4), "rank of at most 32"),
        (_entry(shape=(4,), size=12), "12 bytes"),  # float32 x 4 is 16 bytes
        (_entry(dtype=2, shape=(4,), size=16), "16 bytes"),  # float64 x 4 is 32
        (_entry(shape=(1 << 40,), size=1 << 42), "past its end"),
        (_entry(shape=(4,), offset=56), "past its end"),
        (_entry(shard=3), "shard 3 of 1"),
        (_entry(shard=-1), "shard -1 of 1"),
    ],
    ids=["negative-dim", "rank-300", "short-size", "lying-dtype", "huge", "offset", "shard-id", "negative-shard"],
)
def test_an_entry_tensorflow_would_abort_on_is_refused_first(tmp_path, entry, fragment):
    prefix = _checkpoint(tmp_path, [(b"c/weights", entry)])
    message = refused_everywhere(prefix, fragment, "'c/weights'")
    if "past its end" in fragment:
        assert "data must hold every tensor" in message and "m.ckpt.data-00000-of-00001" in message, message
    else:
        assert "index must be readable" in message and "m.ckpt.index" in message, message


@pytest.mark.parametrize("dtype", [999, 21, 101], ids=["unknown-dtype", "variant", "ref-dtype"])
def test_an_entry_of_a_dtype_convbn_does_not_read_is_left_out_by_name(tmp_path, dtype):
    """Such a tensor (a tf.data iterator's variant state, say) is dropped with a note naming it; the
    tensors beside it still read, and reading it alone is refused by name."""
    data = np.arange(4, dtype="<f4").tobytes()
    prefix = _checkpoint(tmp_path, [(b"odd", _entry(dtype=dtype)), (b"t", _entry(shape=(4,), data=data))])
    ckpt = convbn.load_checkpoint(prefix)
    np.testing.assert_array_equal(ckpt.tensors["t"], np.arange(4, dtype="f4"))
    assert "odd" in ckpt.dropped and "odd" not in ckpt.tensors
    assert any("'odd'" in note and "dtypes convbn does not read" in note for note in ckpt.notes), ckpt.notes


def test_a_missing_shard_file_is_refused(tmp_path):
    prefix = _checkpoint(tmp_path, [(b"a", _entry()), (b"b", _entry(shard=1))], shards=2)
    refused_everywhere(prefix, "m.ckpt.data-00001-of-00002 is missing")


def test_a_shard_that_is_not_a_regular_file_is_refused(tmp_path):
    """A FIFO as data file would block the read forever."""
    prefix = _checkpoint(tmp_path, [(b"a", _entry())])
    data = Path(f"{prefix}.data-00000-of-00001")
    data.unlink()
    os.mkfifo(data)
    refused_everywhere(prefix, "not a regular file")


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ({"compression": 1}, "compressed"),
        ({"index_offset": 1 << 30}, "runs past the file"),
    ],
    ids=["snappy-block", "index-past-end"],
)
def test_a_broken_table_is_refused(tmp_path, table, fragment):
    refused_everywhere(_checkpoint(tmp_path, [(b"a", _entry())], **table), fragment)


def test_an_index_without_header_is_refused(tmp_path):
    prefix = tmp_path / "m.ckpt"
    Path(f"{prefix}.index").write_bytes(_table([(b"a", _entry())]))
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(64))
    refused_everywhere(prefix, "no header")


def _save(prefix: Path, tensors: dict[str, Any]) -> None:
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=list(tensors), shape_and_slices=[""] * len(tensors),
                      tensors=[tf.constant(v) for v in tensors.values()])


def test_an_object_graph_naming_a_key_the_index_lacks_is_refused(tmp_path):
    """A TF2 checkpoint's object graph says where each variable is stored; a key that is not in the
    index was a KeyError."""
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    root = graph.nodes.add()
    root.children.add(node_id=1, local_name="conv")
    variable = graph.nodes.add()
    variable.attributes.add(name="VARIABLE_VALUE", checkpoint_key="conv/.ATTRIBUTES/VARIABLE_VALUE")
    prefix = tmp_path / "m.ckpt"
    _save(prefix, {"_CHECKPOINTABLE_OBJECT_GRAPH": graph.SerializeToString(),
                   "other/.ATTRIBUTES/VARIABLE_VALUE": np.ones(3, "f4")})
    refused_everywhere(prefix, "conv/.ATTRIBUTES/VARIABLE_VALUE", "object graph")


def _slim_vars() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "c/weights": rng.standard_normal((3, 3, 2, 4)).astype("f4"),
        "c/BatchNorm/beta": np.zeros(4, "f4"),
        "c/BatchNorm/moving_mean": np.zeros(4, "f4"),
        "c/BatchNorm/moving_variance": np.ones(4, "f4"),
    }


def _meta(prefix: Path, conv: dict[str, Any], extra: list[Any] = ()) -> None:
    graph = graph_pb2.GraphDef()
    for name in _slim_vars():
        graph.node.add(name=name, op="VariableV2")
    node = graph.node.add(name="c/Conv2D", op="Conv2D", input=["input", "c/weights"])
    for key, value in conv.items():
        if isinstance(value, bytes):
            node.attr[key].s = value
        else:
            node.attr[key].list.i.extend(value)
    graph.node.extend(extra)
    Path(f"{prefix}.meta").write_bytes(meta_graph_pb2.MetaGraphDef(graph_def=graph).SerializeToString())


@pytest.mark.parametrize(
    ("conv", "fragment"),
    [
        ({"data_format": b"\xff\xfe", "padding": b"SAME"}, "data_format"),
        ({"strides": [1, 2], "padding": b"SAME"}, "strides"),
        ({"padding": b"EXPLICIT", "explicit_paddings": [0, 0]}, "explicit_paddings"),
    ],
    ids=["not-utf8", "short-strides", "short-paddings"],
)
def test_a_corrupt_meta_graph_is_refused_by_name(tmp_path, conv, fragment):
    prefix = tmp_path / "m.ckpt"
    _save(prefix, _slim_vars())
    _meta(prefix, conv)
    message = refused_everywhere(prefix, "m.ckpt.meta", "'c/Conv2D'", fragment)
    assert "well-formed" in message


def test_a_huge_constant_in_the_meta_graph_is_not_expanded(tmp_path):
    """A SpaceToBatchND block shape declared [2**40] with one value: make_ndarray would repeat it
    2**40 times. It is no block shape (2 values), so the conv op's own geometry is used."""
    prefix = tmp_path / "m.ckpt"
    _save(prefix, _slim_vars())
    block = node_def_pb2.NodeDef(name="block", op="Const")
    block.attr["value"].tensor.dtype = 3
    block.attr["value"].tensor.tensor_shape.dim.add(size=1 << 40)
    block.attr["value"].tensor.int_val.append(2)
    s2b = node_def_pb2.NodeDef(name="s2b", op="SpaceToBatchND", input=["input", "block", "pads"])
    bn = node_def_pb2.NodeDef(name="c/BatchNorm/FusedBatchNormV3", op="FusedBatchNormV3", input=["c/Conv2D"])
    _meta(prefix, {"strides": [1, 2, 2, 1], "padding": b"VALID"}, [block, s2b, bn])
    graph = Path(f"{prefix}.meta")
    proto = meta_graph_pb2.MetaGraphDef.FromString(graph.read_bytes())
    next(n for n in proto.graph_def.node if n.name == "c/Conv2D").input[0] = "s2b"
    graph.write_bytes(proto.SerializeToString())
    layer = convbn.load_checkpoint(prefix).layers["c"]
    assert (layer.stride, layer.padding, layer.dilation) == ((2, 2), "VALID", (1, 1))


@pytest.mark.parametrize("path", [rb"\x", rb"\377\376.ckpt"], ids=["bad-escape", "not-utf8"])
def test_a_state_file_with_a_broken_path_is_refused(tmp_path, path):
    _save(tmp_path / "m.ckpt", _slim_vars())
    (tmp_path / "checkpoint").write_bytes(b'model_checkpoint_path: "' + path + b'"\n')
    with pytest.raises(ConvBNError, match=rf"'checkpoint' state file must name a UTF-8 path: .*file={tmp_path}"):
        slim.resolve(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 2
