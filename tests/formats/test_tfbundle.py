"""TF tensor bundles read and written by convbn.formats._tfbundle, without TensorFlow.

The first half needs no framework: what convbn writes reads back bit for bit, damaged files are
refused with one line naming the file and the tensor, and one tensor is read without reading its
shard. The second half holds TensorFlow as the oracle: everything TF writes (SaveV2 with every
dtype, a sharded Saver with a partitioned variable, tf.train.Checkpoint, the tf-slim and DCGAN
networks with EMA shadows and optimizer slots) reads as TF reads it, and everything convbn writes
loads in tf.train.load_checkpoint, a graph-mode Saver and tf.train.Checkpoint.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn import ConvBNError
from convbn.convert import Checkpoint
from convbn.formats import _tfbundle, slim
from tests.conftest import available, need
from tests.formats.builders import random_checkpoint
from tests.formats.hostile import refused_everywhere


def _values() -> dict[str, Any]:
    """One tensor per dtype a checkpoint holds that NumPy has without ml_dtypes, scalars and empties."""
    rng = np.random.default_rng(0)
    return {
        "f16": rng.standard_normal((2, 3)).astype(np.float16),
        "f32": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
        "f32/scalar": np.float32(-0.0),
        "f64": np.array([np.pi, -np.inf, np.nan]),
        "f64/empty": np.zeros((0, 3)),
        "i8": np.array([-128, 127], np.int8),
        "i16": np.array([-32768, 7], np.int16),
        "i32": np.array([[-(2**31), 2**31 - 1]], np.int32),
        "i64": np.array([-(2**63), 2**40], np.int64),
        "u8": np.array([0, 255], np.uint8),
        "u16": np.array([65535], np.uint16),
        "u32": np.array([2**32 - 1], np.uint32),
        "u64": np.array([2**64 - 1], np.uint64),
        "bool": np.array([True, False, True]),
        "c64": np.array([1 + 2j], np.complex64),
        "c128": np.array([[-1j]], np.complex128),
        "str": np.array([[b"conv1", b""], [b"\x00trailing\x00", b"x" * 300]], object),
        "str/scalar": np.array(b"scalar", object),
        "str/empty": np.zeros((0,), object),
    }


def _assert_same(mine: np.ndarray, expected: Any, name: str) -> None:
    """Same dtype, shape and bits (strings: the same bytes, trailing NULs included)."""
    expected = np.asarray(expected, dtype=object if mine.dtype == object else None)
    assert mine.shape == expected.shape, (name, mine.shape, expected.shape)
    if mine.dtype == object:
        assert [bytes(v) for v in mine.flat] == [bytes(v) for v in expected.flat], name
    else:
        assert mine.dtype == expected.dtype and mine.tobytes() == expected.tobytes(), (name, mine, expected)


# -- without TensorFlow ------------------------------------------------------------------------


def test_every_dtype_round_trips_bit_exactly(tmp_path: Path) -> None:
    values = _values()
    files = _tfbundle.write(tmp_path / "m.ckpt", values.items())
    assert [f.name for f in files] == ["m.ckpt.data-00000-of-00001", "m.ckpt.index"]
    bundle = _tfbundle.Bundle(tmp_path / "m.ckpt")
    assert bundle.shapes == {name: np.shape(v) for name, v in sorted(values.items())}
    for name, value in values.items():
        _assert_same(bundle.read(name), value, name)


@pytest.mark.needs("ml_dtypes")
def test_bfloat16_and_float8_round_trip_bit_exactly(tmp_path: Path) -> None:
    import ml_dtypes

    bits = np.arange(256, dtype=np.uint8)
    values = {
        "bf16": np.arange(-3, 3, 0.5).astype(ml_dtypes.bfloat16),
        "e5m2": bits.view(ml_dtypes.float8_e5m2),
        "e4m3": bits.view(ml_dtypes.float8_e4m3fn),
    }
    _tfbundle.write(tmp_path / "m.ckpt", values.items())
    bundle = _tfbundle.Bundle(tmp_path / "m.ckpt")
    for name, value in values.items():
        _assert_same(bundle.read(name), value, name)


def test_max_shard_size_splits_the_data_in_order(tmp_path: Path) -> None:
    values: dict[str, np.ndarray] = {f"t{i}": np.full(10, i, np.float32) for i in range(5)}  # 40 bytes each
    values["big"] = np.arange(100, dtype=np.float64)  # 800 bytes: a shard of its own
    files = _tfbundle.write(tmp_path / "m.ckpt", values.items(), max_shard_size=100)
    names = [f.name for f in files]
    assert names == [f"m.ckpt.data-0000{k}-of-00004" for k in range(4)] + ["m.ckpt.index"]
    assert [f.stat().st_size for f in files[:-1]] == [80, 80, 40, 800]
    bundle = _tfbundle.Bundle(tmp_path / "m.ckpt")
    assert [bundle.entries[n].shard for n in values] == [0, 0, 1, 1, 2, 3]
    for name, value in values.items():
        _assert_same(bundle.read(name), value, name)


def test_the_slim_writer_shards_and_reads_back(tmp_path: Path) -> None:
    source = random_checkpoint(widths=(3, 8, 16), bias=False)
    slim.write(source, tmp_path / "m.ckpt", max_shard_size=256)
    back = slim.read(tmp_path / "m.ckpt")
    assert len(list(tmp_path.glob("m.ckpt.data-*-of-*"))) > 2
    for name, params in source.layers.items():
        for field in ("kernel", "gamma", "beta", "moving_mean", "moving_var"):
            _assert_same(np.asarray(getattr(back.layers[name], field)), getattr(params, field), f"{name}.{field}")


def test_save_checkpoint_shards_a_slim_checkpoint_by_a_size_with_a_unit(tmp_path: Path) -> None:
    """save_checkpoint passes max_shard_size as given ("1KB" here, 1000 bytes); it was a TypeError."""
    source = random_checkpoint(widths=(3, 8, 16), bias=False)
    convbn.save_checkpoint(source, tmp_path / "m.ckpt", "slim", max_shard_size="1KB")
    shards = sorted(tmp_path.glob("m.ckpt.data-*"))
    sizes = {p.name: p.stat().st_size for p in shards}
    bundle = _tfbundle.Bundle(tmp_path / "m.ckpt")
    alone = {bundle.shard(e.shard).name for e in bundle.entries.values() if e.size > 1000}
    assert len(shards) > 2 and all(size <= 1000 for name, size in sizes.items() if name not in alone), sizes
    assert sum(sizes.values()) == sum(e.size for e in bundle.entries.values())
    _assert_same(bundle.read("layer2/weights"), source.layers["layer2"].kernel, "layer2/weights")


def test_a_table_of_many_blocks_reads_back(tmp_path: Path) -> None:
    """Past 256 KiB of index entries TF's table starts a new block; names sharing long prefixes
    exercise the restart points."""
    values = {f"{'scope/' * 40}v{i:05d}": np.array([i], np.int32) for i in range(1200)}
    _tfbundle.write(tmp_path / "m.ckpt", values.items())
    entries = _tfbundle.table_entries((tmp_path / "m.ckpt.index").read_bytes())
    assert [k.decode() for k, _ in entries[1:]] == sorted(values)
    bundle = _tfbundle.Bundle(tmp_path / "m.ckpt")
    assert all(int(bundle.read(name)[0]) == value[0] for name, value in values.items())


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ([("a", np.zeros(1)), ("a", np.ones(1))], "'a' twice"),
        ([("", np.zeros(1))], "non-empty strings"),
        ([("a\x00b", np.zeros(1))], "without NUL"),
        ([("when", np.array(["2024-01-01"], "datetime64[D]"))], "dtype datetime64[D]"),
        ([("odd", np.array([object()]))], "bytes or str"),
    ],
    ids=["repeated", "empty-name", "nul", "datetime", "object"],
)
def test_what_a_bundle_cannot_hold_is_refused_and_nothing_is_written(
    tmp_path: Path, tensors: list[tuple[str, np.ndarray]], fragment: str
) -> None:
    with pytest.raises(ConvBNError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        _tfbundle.write(tmp_path / "m.ckpt", tensors)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data shards are written when the index fails (a full disk): none of them appears."""

    def full_disk(entries: Any) -> bytes:
        raise OSError(28, "No space left on device")

    (tmp_path / "keep.txt").write_text("unrelated")
    monkeypatch.setattr(_tfbundle, "_build_table", full_disk)
    with pytest.raises(ConvBNError, match=r"writing the TF checkpoint failed: No space left on device\. .*x\.ckpt"):
        slim.write(random_checkpoint(bias=False), tmp_path / "x.ckpt", max_shard_size=100)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def _bundle(directory: Path, **values: np.ndarray) -> Path:
    prefix = directory / "m.ckpt"
    _tfbundle.write(prefix, values.items(), max_shard_size=64)
    return prefix


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_tensor_whose_bytes_do_not_match_its_checksum_is_refused(tmp_path: Path) -> None:
    prefix = _bundle(tmp_path, a=np.arange(16, dtype=np.float32), b=np.ones(4, np.float32))
    _flip(Path(f"{prefix}.data-00000-of-00002"), 9)
    refused_everywhere(prefix, "do not match the checksum", "m.ckpt.data-00000-of-00002", "tensor='a'")


def test_an_index_whose_block_does_not_match_its_checksum_is_refused(tmp_path: Path) -> None:
    prefix = _bundle(tmp_path, a=np.arange(4, dtype=np.float32))
    _flip(Path(f"{prefix}.index"), 3)  # a byte of the first data block
    refused_everywhere(prefix, "m.ckpt.index", "does not match its checksum")


def test_an_index_whose_keys_are_out_of_order_is_refused(tmp_path: Path) -> None:
    """TF finds a tensor by binary search over sorted keys: out of order, some could not be found."""
    prefix = _bundle(tmp_path, a=np.zeros(2, np.float32), b=np.ones(2, np.float32))
    index = Path(f"{prefix}.index")
    header, a, b = _tfbundle.table_entries(index.read_bytes())
    index.write_bytes(_tfbundle._build_table([header, b, a]))
    refused_everywhere(prefix, "m.ckpt.index", "its keys are not in order (b'a' after b'b')")


def test_a_string_tensor_with_a_damaged_length_is_refused(tmp_path: Path) -> None:
    prefix = _bundle(tmp_path, s=np.array([b"abc", b"de"], object))
    _flip(Path(f"{prefix}.data-00000-of-00001"), 0)  # the first length, 3 -> 2
    with pytest.raises(ConvBNError, match=r"string lengths do not match their checksum\. .*data-00000-of-00001, tensor='s'"):
        _tfbundle.Bundle(prefix).read("s")


def test_a_missing_second_shard_is_refused(tmp_path: Path) -> None:
    prefix = _bundle(tmp_path, a=np.zeros(16, np.float32), b=np.zeros(16, np.float32))
    Path(f"{prefix}.data-00001-of-00002").unlink()
    refused_everywhere(prefix, "m.ckpt.data-00001-of-00002 is missing", "tensor='b'")


def test_a_truncated_shard_is_refused(tmp_path: Path) -> None:
    prefix = _bundle(tmp_path, a=np.zeros(16, np.float32))
    shard = Path(f"{prefix}.data-00000-of-00001")
    shard.write_bytes(shard.read_bytes()[:40])
    refused_everywhere(prefix, "past its end (40 bytes)", "tensor='a'")


def test_a_shard_linked_from_outside_the_checkpoint_directory_is_refused(tmp_path: Path) -> None:
    """The data file's name comes from the prefix, but a symlink can lead anywhere: a checkpoint
    must not read files outside its directory (TensorFlow followed the link)."""
    outside = _bundle(tmp_path, a=np.arange(4, dtype=np.float32))
    (tmp_path / "ckpt").mkdir()
    prefix = tmp_path / "ckpt" / "m.ckpt"
    os.link(f"{outside}.index", f"{prefix}.index")
    os.symlink(f"{outside}.data-00000-of-00001", f"{prefix}.data-00000-of-00001")
    refused_everywhere(prefix, "links to", "outside the checkpoint's directory", "tensor='a'")


def test_a_checkpoint_of_symlinks_into_one_blob_directory_reads(tmp_path: Path) -> None:
    """A hub cache links every file of a checkpoint to a blob store: the data lies beside the index."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    stored = _bundle(blobs, a=np.arange(4, dtype=np.float32))
    for suffix in (".index", ".data-00000-of-00001"):
        os.symlink(f"{stored}{suffix}", snapshot / f"m.ckpt{suffix}")
    _assert_same(_tfbundle.Bundle(snapshot / "m.ckpt").read("a"), np.arange(4, dtype=np.float32), "a")


def test_one_tensor_is_read_without_reading_its_shard(tmp_path: Path) -> None:
    """Reading the small tensor allocates its bytes, not the 32 MB before it in the same shard;
    the big one takes its own size and a chunk."""
    big = np.zeros(8 << 20, np.float32)
    prefix = tmp_path / "m.ckpt"
    _tfbundle.write(prefix, [("big", big), ("small", np.ones(4, np.float32))])
    bundle = _tfbundle.Bundle(prefix)
    tracemalloc.start()
    try:
        small = bundle.read("small")
        _, peak_small = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        value = bundle.read("big")
        _, peak_big = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _assert_same(small, np.ones(4, np.float32), "small")
    assert value.nbytes == big.nbytes and not value.any()
    assert peak_small < 3 << 20, peak_small  # a chunk buffer at most
    assert peak_big < big.nbytes + (3 << 20), peak_big


@pytest.mark.skipif(available("ml_dtypes"), reason="checks the refusal without ml_dtypes")
def test_bfloat16_without_ml_dtypes_is_refused_by_name(tmp_path: Path) -> None:
    prefix = tmp_path / "m.ckpt"
    _tfbundle.write(prefix, [("x", np.zeros(2, np.uint16))])
    index = Path(f"{prefix}.index")
    entries = _tfbundle.table_entries(index.read_bytes())
    entry = _tfbundle._tfproto.parse_bundle_entry(entries[1][1])
    record = _tfbundle._tfproto.encode_bundle_entry(dtype=14, shape=(2,), size=4, crc32c=entry.crc32c)
    index.write_bytes(_tfbundle._build_table([entries[0], (b"x", record)]))
    with pytest.raises(ConvBNError, match=r"m\.ckpt\.index: tensor 'x' is bfloat16, which NumPy has only through the ml_dtypes package"):
        _tfbundle.Bundle(prefix).read("x")


# -- TensorFlow as the oracle ------------------------------------------------------------------


def _tf() -> Any:
    need("tensorflow")
    import tensorflow as tf

    return tf


def _tf_values() -> dict[str, Any]:
    """Every dtype TF checkpoints hold, as TF tensors."""
    tf = _tf()
    values: dict[str, Any] = {name: tf.constant(v) for name, v in _values().items()}
    values["bf16"] = tf.constant([1.5, -2.25, 3e38], tf.bfloat16)
    values["str/scalar"] = tf.constant(b"scalar")
    return values


def _assert_reads_as_tf_does(prefix: Path) -> None:
    tf = _tf()
    reader = tf.train.load_checkpoint(str(prefix))
    bundle = _tfbundle.Bundle(prefix)
    assert {k: list(v) for k, v in bundle.shapes.items()} == reader.get_variable_to_shape_map()
    for name in bundle.shapes:
        _assert_same(bundle.read(name), reader.get_tensor(name), name)


def test_what_tf_saves_reads_bit_exactly(tmp_path: Path) -> None:
    tf = _tf()
    values = _tf_values()
    tf.raw_ops.SaveV2(prefix=str(tmp_path / "m.ckpt"), tensor_names=list(values),
                      shape_and_slices=[""] * len(values), tensors=list(values.values()))
    _assert_reads_as_tf_does(tmp_path / "m.ckpt")


def test_a_sharded_saver_with_a_partitioned_variable_reads_bit_exactly(tmp_path: Path) -> None:
    tf = _tf()
    tf1 = tf.compat.v1
    with tf.Graph().as_default() as graph:
        with tf.device("/cpu:0"):
            tf1.get_variable("a", initializer=tf.constant(np.arange(12, dtype=np.float32).reshape(3, 4)))
            tf1.get_variable("step", initializer=tf.constant(5, tf.int64))
        with tf.device("/cpu:1"):
            tf1.get_variable("p", shape=[10, 3], partitioner=tf1.fixed_size_partitioner(3),
                             initializer=tf1.random_normal_initializer(seed=1))
            tf1.get_variable("q", shape=[2, 9], dtype=tf.float64, partitioner=tf1.fixed_size_partitioner(2, axis=1),
                             initializer=tf1.random_normal_initializer(seed=2))
        saver = tf1.train.Saver(sharded=True)
        config = tf1.ConfigProto(device_count={"CPU": 2})
        with tf1.Session(graph=graph, config=config) as sess:
            sess.run(tf1.global_variables_initializer())
            prefix = saver.save(sess, str(tmp_path / "m.ckpt"))
    assert len(list(tmp_path.glob("m.ckpt.data-*-of-00002"))) == 2
    bundle = _tfbundle.Bundle(Path(prefix))
    assert [len(bundle.entries[n].slices) for n in ("a", "p", "q")] == [0, 3, 2]
    _assert_reads_as_tf_does(Path(prefix))
    # slim.read takes a partitioned variable whole, under its own name.
    ckpt = slim.read(prefix)
    _assert_same(np.asarray(ckpt.tensors["p"]), bundle.read("p"), "p")


def test_a_partitioned_variable_missing_a_slice_is_refused_by_name(tmp_path: Path) -> None:
    tf = _tf()
    tf1 = tf.compat.v1
    with tf.Graph().as_default(), tf1.Session() as sess:
        tf1.get_variable("p", shape=[6, 2], partitioner=tf1.fixed_size_partitioner(2))
        sess.run(tf1.global_variables_initializer())
        tf1.train.Saver().save(sess, str(tmp_path / "m.ckpt"))
    index = tmp_path / "m.ckpt.index"
    entries = _tfbundle.table_entries(index.read_bytes())
    assert sum(k.startswith(b"\x00") for k, _ in entries) == 2  # the two slices, keyed as TF encodes them
    index.write_bytes(_tfbundle._build_table([e for e in entries if not e[0].startswith(b"\x00p\x00\x01\x01\x02\x83")]))
    refused_everywhere(tmp_path / "m.ckpt", "slice [(3, 3), (0, 2)] of a partitioned variable is not stored",
                       "tensor='p'")


def test_tf_train_checkpoint_reads_bit_exactly(tmp_path: Path) -> None:
    """A TF2 object-based checkpoint: the object graph is a string scalar, read byte for byte."""
    tf = _tf()
    module = tf.Module()
    module.kernel = tf.Variable(np.random.default_rng(1).standard_normal((3, 3, 2, 4)).astype(np.float32))
    module.step = tf.Variable(np.int64(3))
    module.half = tf.Variable(np.array([1, 2], np.float16))
    prefix = tf.train.Checkpoint(model=module).write(str(tmp_path / "ckpt"))
    _assert_reads_as_tf_does(Path(prefix))
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" in _tfbundle.Bundle(Path(prefix)).shapes


def test_the_slim_and_dcgan_corpora_read_bit_exactly(slim_net: dict[str, Any], dcgan_net: dict[str, Any]) -> None:
    """Networks trained by tf-slim and DCGAN code: EMA shadows, Adam slots, global_step, beta powers."""
    for prefix in (slim_net["prefix"], dcgan_net["prefix"]):
        names = _tfbundle.Bundle(Path(prefix)).shapes
        assert any(n.endswith("/ExponentialMovingAverage") for n in names) or prefix == dcgan_net["prefix"]
        assert any(n.endswith("/Adam_1") for n in names)
        _assert_reads_as_tf_does(Path(prefix))


def test_what_convbn_writes_loads_in_tf_load_checkpoint(tmp_path: Path) -> None:
    values = {**_values(), "bf16": _tf_values()["bf16"].numpy()}
    prefix = tmp_path / "m.ckpt"
    _tfbundle.write(prefix, values.items(), max_shard_size=64)
    assert len(list(tmp_path.glob("m.ckpt.data-*"))) > 3
    reader = _tf().train.load_checkpoint(str(prefix))
    assert reader.get_variable_to_shape_map() == {n: list(np.shape(v)) for n, v in values.items()}
    for name, value in values.items():
        _assert_same(value, reader.get_tensor(name), name)


def _written_slim(tmp_path: Path) -> tuple[Path, Checkpoint]:
    ckpt = random_checkpoint(widths=(3, 8, 16), bias=False)
    prefix = tmp_path / "m.ckpt"
    slim.write(ckpt, prefix, max_shard_size=300)
    return prefix, convbn.load_checkpoint(prefix)


def test_what_convbn_writes_restores_with_a_graph_mode_saver(tmp_path: Path) -> None:
    tf = _tf()
    tf1 = tf.compat.v1
    prefix, ckpt = _written_slim(tmp_path)
    names = {name: np.asarray(v) for name, v in _tfbundle.Bundle(prefix).shapes.items()}
    with tf.Graph().as_default(), tf1.Session() as sess:
        variables = {name: tf1.get_variable(name, shape=shape, dtype=tf.float32) for name, shape in names.items()}
        tf1.train.Saver(variables).restore(sess, str(prefix))
        restored = sess.run(variables)
    layer = ckpt.layers["layer1"]
    _assert_same(restored["layer1/weights"], np.asarray(layer.kernel), "layer1/weights")
    _assert_same(restored["layer1/BatchNorm/moving_variance"], np.asarray(layer.moving_var), "moving_variance")
    assert set(restored) == set(names) and len(names) == 10


def test_what_convbn_writes_restores_with_tf_train_checkpoint(tmp_path: Path) -> None:
    """A name-based checkpoint: tf.train.Checkpoint.restore matches variables by name and consumes all."""
    tf = _tf()
    prefix, ckpt = _written_slim(tmp_path)
    module = tf.Module()
    shapes = _tfbundle.Bundle(prefix).shapes
    module.variables_ = [tf.Variable(tf.zeros(shape), name=name) for name, shape in shapes.items()]
    status = tf.train.Checkpoint(model=module).restore(str(prefix))
    status.assert_consumed()
    restored = {v.name.rpartition(":")[0]: v.numpy() for v in module.variables_}
    for layer_name, params in ckpt.layers.items():
        _assert_same(restored[f"{layer_name}/weights"], np.asarray(params.kernel), layer_name)
        _assert_same(restored[f"{layer_name}/BatchNorm/moving_mean"], np.asarray(params.moving_mean), layer_name)
