"""convbn.formats._tfproto against TensorFlow's own generated classes, the oracle.

Real messages (the .meta graphs of tf-slim, DCGAN-style, ``tf.compat.v1.layers`` and Keras-in-graph
networks, the object graphs of ``tf.train.Checkpoint``, the index entries of checkpoints of every
dtype) are parsed by TF's classes and by convbn's decoder, and every field the decoder's tables
list is compared, recursively, by value and type. The encoders' bytes are parsed back by TF's
classes and compared with what TF serializes itself. Random messages built with TF's classes and
random or damaged bytes run through both. Hostile bytes must give a ProtoError, and only that.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convbn.formats import _tfproto as tfproto
from convbn.formats._tfproto import ProtoError

ROOT = Path(__file__).resolve().parents[2]
#: Property tests decode small messages in microseconds: more examples than the suite's default.
EXAMPLES = max(200, settings().max_examples)

PARSERS: dict[str, Callable[[bytes], Any]] = {
    "BundleHeaderProto": tfproto.parse_bundle_header,
    "BundleEntryProto": tfproto.parse_bundle_entry,
    "TrackableObjectGraph": tfproto.parse_object_graph,
    "MetaGraphDef": tfproto.parse_meta_graph,
}


def tf_class(name: str) -> Any:
    """TensorFlow's generated class for one of the four top-level messages."""
    from tensorflow.core.protobuf import meta_graph_pb2, tensor_bundle_pb2, trackable_object_graph_pb2

    for module in (tensor_bundle_pb2, trackable_object_graph_pb2, meta_graph_pb2):
        if hasattr(module, name):
            return getattr(module, name)
    raise KeyError(name)


def tf_parse(name: str, data: bytes) -> Any:
    message = tf_class(name)()
    message.ParseFromString(data)
    return message


def assert_same(mine: Any, theirs: Any, path: str = "") -> int:
    """Every field in ``mine``'s table equal (value and type) in TF's ``theirs``, recursively, with
    the same presence for fields that have it; returns how many values were compared."""
    count = 0
    for field in type(mine).FIELDS.values():
        where = f"{path}.{field.name}"
        ours, tfs = getattr(mine, field.name), getattr(theirs, field.name)
        descriptor = theirs.DESCRIPTOR.fields_by_name[field.name]
        if field.value is not None:  # a map
            assert sorted(ours) == sorted(tfs), where
            for key in tfs:
                count += _same_value(field.value, ours[key], tfs[key], f"{where}[{key!r}]")
        elif field.repeated:
            assert len(ours) == len(tfs), where
            for i, (a, b) in enumerate(zip(ours, tfs, strict=True)):
                count += _same_value(field, a, b, f"{where}[{i}]")
        else:
            if descriptor.has_presence:
                assert mine.HasField(field.name) == theirs.HasField(field.name), where
            count += _same_value(field, ours, tfs, where)
    return count


def _same_value(field: Any, ours: Any, tfs: Any, where: str) -> int:
    if field.message is not None:
        return assert_same(ours, tfs, where)
    assert type(ours) is type(tfs), (where, ours, tfs)
    if isinstance(ours, float):  # bit for bit: NaN payloads and -0.0 included
        assert struct.pack("<d", ours) == struct.pack("<d", tfs), (where, ours, tfs)
    else:
        assert ours == tfs, (where, ours, tfs)
    return 1


# -- the tables are TensorFlow's ---------------------------------------------------------------------

# FieldDescriptor.type -> the kind convbn's tables call it.
_KINDS = {1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 7: "fixed32", 8: "bool", 9: "string",
          12: "bytes", 13: "uint32", 14: "enum"}


@pytest.mark.needs("tensorflow")
def test_every_table_entry_is_the_field_tensorflow_defines() -> None:
    seen: set[type] = set()
    checked = 0
    stack = [(type(parse(b"")), tf_class(name).DESCRIPTOR) for name, parse in PARSERS.items()]
    while stack:
        cls, descriptor = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for field in cls.FIELDS.values():
            theirs = descriptor.fields_by_number[field.number]
            assert theirs.name == field.name, (descriptor.full_name, field.number)
            assert theirs.is_repeated == (field.repeated or field.value is not None), theirs.full_name
            if field.value is not None:
                entry = theirs.message_type
                assert entry.GetOptions().map_entry, theirs.full_name
                assert _KINDS[entry.fields_by_name["key"].type] == field.message.FIELDS[1].kind
                stack.append((field.message, entry))
            elif field.message is not None:
                assert theirs.type == theirs.TYPE_MESSAGE, theirs.full_name
                stack.append((field.message, theirs.message_type))
            else:
                assert _KINDS[theirs.type] == field.kind, theirs.full_name
            checked += 1
    assert checked > 60  # every table was reached from the four top-level messages


# -- real messages -------------------------------------------------------------------------------------


def _conv_graph_meta() -> bytes:
    """A tf-slim graph with what slim.py reads from graphs: convs at stride 2, atrous (SpaceToBatchND),
    explicit padding, NCHW, depthwise, fused and unfused BatchNorm under a tensor-valued is_training
    (If nodes with branch functions), Adam's gradients and an ExponentialMovingAverage."""
    import tensorflow as tf

    from tests.formats import slim_graphs

    slim = slim_graphs.import_slim()
    tf1 = tf.compat.v1
    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float32, (2, 17, 17, 3))
        training = tf1.placeholder_with_default(True, ())
        bn = {"is_training": training}
        h = slim.conv2d(x, 8, 3, stride=2, normalizer_fn=slim.batch_norm, normalizer_params=bn, scope="c1")
        h = slim.conv2d(h, 8, 3, rate=2, normalizer_fn=slim.batch_norm, normalizer_params={**bn, "fused": False},
                        scope="c2")
        h = slim.separable_conv2d(h, None, 3, depth_multiplier=2, normalizer_fn=slim.batch_norm, scope="dw")
        kernel = tf1.get_variable("explicit/weights", (3, 3, 16, 4))
        h = tf.nn.conv2d(h, kernel, 1, [[0, 0], [1, 2], [0, 1], [0, 0]])
        h = tf.nn.atrous_conv2d(h, tf1.get_variable("atrous/weights", (3, 3, 4, 4)), 2, "SAME")
        h = tf.transpose(tf.nn.conv2d(tf.transpose(h, (0, 3, 1, 2)), tf1.get_variable("nchw/weights", (1, 1, 4, 4)),
                                      (1, 1, 2, 2), "VALID", data_format="NCHW"), (0, 2, 3, 1))
        loss = tf.reduce_mean(h**2)
        with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
            tf1.train.AdamOptimizer(1e-3).minimize(loss)
        tf1.train.ExponentialMovingAverage(0.99).apply(tf1.trainable_variables())
        return tf1.train.export_meta_graph().SerializeToString()  # type: ignore[no-any-return]


def _keras_graph_meta() -> bytes:
    """A tf_keras model built in graph mode (Keras-in-TF1, as old Keras .meta files are)."""
    import tensorflow as tf
    import tf_keras

    with tf.Graph().as_default():
        model = tf_keras.Sequential([
            tf_keras.layers.Conv2D(4, 3, strides=2, padding="same", input_shape=(9, 9, 3)),
            tf_keras.layers.BatchNormalization(),
            tf_keras.layers.DepthwiseConv2D(3, dilation_rate=2, use_bias=False),
            tf_keras.layers.BatchNormalization(epsilon=1e-5),
        ])
        model.compile(optimizer="adam", loss="mse")
        model.train_function = model.make_train_function()
        return tf.compat.v1.train.export_meta_graph().SerializeToString()  # type: ignore[no-any-return]


_V1_LAYERS = textwrap.dedent("""
    import sys
    import tensorflow as tf
    tf1 = tf.compat.v1
    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float32, (2, 9, 9, 3))
        h = tf1.layers.conv2d(x, 8, 3, strides=2, padding="same", name="conv1")
        h = tf1.layers.batch_normalization(h, training=True, name="bn1")
        h = tf1.layers.conv2d(h, 4, 3, dilation_rate=2, use_bias=False)
        h = tf1.layers.batch_normalization(h, training=False)
        with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
            tf1.train.MomentumOptimizer(1e-2, 0.9).minimize(tf.reduce_mean(h ** 2))
        open(sys.argv[1], "wb").write(tf1.train.export_meta_graph().SerializeToString())
""")


def _v1_layers_meta(directory: Path) -> bytes:
    """tf.compat.v1.layers, which needs TF_USE_LEGACY_KERAS=1 before TF loads: a fresh process."""
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = directory / "v1.meta"
    proc = subprocess.run([sys.executable, "-c", _V1_LAYERS, str(out)], env=env, capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_bytes()


def _assert_meta_graph(data: bytes) -> None:
    import tensorflow as tf

    theirs = tf_parse("MetaGraphDef", data)
    mine = tfproto.parse_meta_graph(data)
    assert assert_same(mine, theirs) > 100
    # Every small Const reads as tf.make_ndarray reads it (slim.py reads block shapes and paddings).
    nodes = [*theirs.graph_def.node, *(n for f in theirs.graph_def.library.function for n in f.node_def)]
    ours = [*mine.graph_def.node, *(n for f in mine.graph_def.library.function for n in f.node_def)]
    consts = 0
    for a, b in zip(ours, nodes, strict=True):
        if b.op == "Const" and b.attr["dtype"].type in (1, 2, 3, 9, 10):
            expected = tf.make_ndarray(b.attr["value"].tensor)
            if expected.size <= 1024:
                value = tfproto.tensor_value(a.attr["value"].tensor)
                assert value.dtype == expected.dtype and np.array_equal(value, expected, equal_nan=True), b.name
                consts += 1
    assert consts > 5


@pytest.mark.needs("tensorflow", "tf_slim", "tf_keras")
def test_a_tf_slim_graph_decodes_as_tensorflow_parses_it() -> None:
    data = _conv_graph_meta()
    _assert_meta_graph(data)
    ops = {n.op for n in tfproto.parse_meta_graph(data).graph_def.node}
    assert {"If", "SpaceToBatchND", "DepthwiseConv2dNative", "FusedBatchNormV3", "Conv2D"} <= ops


@pytest.mark.needs("tensorflow", "tf_keras")
def test_a_keras_graph_mode_graph_decodes_as_tensorflow_parses_it() -> None:
    _assert_meta_graph(_keras_graph_meta())


@pytest.mark.needs("tensorflow", "tf_keras")
def test_a_tf_v1_layers_graph_decodes_as_tensorflow_parses_it(tmp_path: Path) -> None:
    _assert_meta_graph(_v1_layers_meta(tmp_path))


def test_saved_slim_and_dcgan_meta_files_decode_as_tensorflow_parses_them(
    slim_net: dict[str, Any], dcgan_net: dict[str, Any]
) -> None:
    for net in (slim_net, dcgan_net):
        _assert_meta_graph(Path(str(net["prefix"]) + ".meta").read_bytes())


def _table_values(index: Path) -> list[tuple[bytes, bytes]]:
    from convbn.formats import _tfbundle

    return _tfbundle.table_entries(index.read_bytes())


def _object_graph_bytes(prefix: str) -> bytes:
    import tensorflow as tf

    return tf.train.load_checkpoint(prefix).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")  # type: ignore[no-any-return]


@pytest.mark.needs("tensorflow", "keras", "tf_keras")
def test_object_graphs_of_keras_models_and_a_tf_module_decode_as_tensorflow_parses_them(tmp_path: Path) -> None:
    import keras
    import tensorflow as tf
    import tf_keras

    legacy = tf_keras.Sequential([tf_keras.layers.Conv2D(2, 1, input_shape=(3, 3, 1)), tf_keras.layers.BatchNormalization()])
    legacy_optimizer = tf_keras.optimizers.legacy.Adam()  # tracks its slots as slot_variables
    legacy_optimizer.apply_gradients([(tf.ones_like(v), v) for v in legacy.trainable_variables])
    model = keras.Sequential([keras.Input((5, 5, 2)), keras.layers.Conv2D(3, 3), keras.layers.BatchNormalization()])
    optimizer = keras.optimizers.Adam()
    optimizer.apply_gradients([(tf.ones_like(v), v) for v in model.trainable_variables])  # slots and iterations

    class Block(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = tf.Variable(tf.ones((3, 3, 2, 4)), name="k")
            self.layers = [tf.Variable(1.0), {"a.b/c": tf.Variable([2, 3])}]  # names TF escapes

    prefixes = [
        tf.train.Checkpoint(model=model, optimizer=optimizer).write(str(tmp_path / "keras")),
        tf.train.Checkpoint(model=legacy, optimizer=legacy_optimizer).write(str(tmp_path / "tf_keras")),
        tf.train.Checkpoint(block=Block(), step=tf.Variable(7, dtype=tf.int64)).write(str(tmp_path / "module")),
    ]
    for prefix in prefixes:
        data = _object_graph_bytes(prefix)
        mine = tfproto.parse_object_graph(data)
        assert assert_same(mine, tf_parse("TrackableObjectGraph", data)) > 20
        keys = {a.checkpoint_key for n in mine.nodes for a in n.attributes}
        assert keys <= set(tf.train.load_checkpoint(prefix).get_variable_to_shape_map())
    assert any(n.slot_variables for n in tfproto.parse_object_graph(_object_graph_bytes(prefixes[1])).nodes)


# Every dtype a checkpoint holds, as NumPy/TF names (bfloat16 through TF).
_DTYPES = ["float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
           "uint32", "uint64", "bool", "complex64", "complex128", "string"]


def _entries_match(index: Path) -> int:
    """Each entry of ``index`` decodes as TF parses it, and re-encodes to the very bytes TF wrote."""
    values = _table_values(index)
    assert values[0][0] == b""
    header = tfproto.parse_bundle_header(values[0][1])
    assert assert_same(header, tf_parse("BundleHeaderProto", values[0][1])) == 4  # bad_consumers is empty
    assert tfproto.encode_bundle_header(
        header.num_shards, endianness=header.endianness, producer=header.version.producer,
        min_consumer=header.version.min_consumer,
    ) == values[0][1]
    for key, value in values[1:]:
        entry = tfproto.parse_bundle_entry(value)
        assert assert_same(entry, tf_parse("BundleEntryProto", value)) >= 5, key
        again = tfproto.encode_bundle_entry(
            dtype=entry.dtype, shape=[d.size for d in entry.shape.dim], shard_id=entry.shard_id, offset=entry.offset,
            size=entry.size, crc32c=entry.crc32c,
            slices=[[(e.start, e.length if e.HasField("length") else None) for e in s.extent] for s in entry.slices],
        )
        assert again == value, key
    return len(values) - 1


@pytest.mark.needs("tensorflow")
def test_index_entries_of_every_dtype_decode_and_reencode_as_tensorflow_writes_them(tmp_path: Path) -> None:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    variables = {}
    for name in _DTYPES:
        dtype = tf.as_dtype(name)
        if name == "string":
            values = tf.constant([b"", b"a\x00b", b"x" * 300])
        else:
            values = tf.cast(rng.standard_normal((2, 3)) * 100, dtype)
        variables[name] = tf.Variable(values)
        variables[name + "_scalar"] = tf.Variable(values[0, 0] if name != "string" else values[1])
        variables[name + "_empty"] = tf.Variable(tf.zeros((0, 4), dtype))
    prefix = tf.train.Checkpoint(**variables).write(str(tmp_path / "all"))
    assert _entries_match(Path(prefix + ".index")) == len(variables) + 1  # + the object graph


@pytest.mark.needs("tensorflow")
def test_partitioned_and_multi_shard_index_entries_decode_and_reencode_as_tensorflow_writes_them(
    tmp_path: Path,
) -> None:
    import tensorflow as tf

    tf1 = tf.compat.v1
    with tf.Graph().as_default():
        with tf1.device("/cpu:0"):
            tf1.get_variable("part", (10, 3), partitioner=tf1.fixed_size_partitioner(3))
        with tf1.device("/cpu:1"):  # a second device: Saver(sharded=True) writes a second shard
            tf1.get_variable("plain", (4,), dtype=tf.float64)
        with tf1.Session(config=tf1.ConfigProto(device_count={"CPU": 2})) as sess:
            sess.run(tf1.global_variables_initializer())
            prefix = tf1.train.Saver(sharded=True).save(sess, str(tmp_path / "part"))
    assert _entries_match(Path(prefix + ".index")) == 5  # part (its slices listed), 3 slices, plain
    values = _table_values(Path(prefix + ".index"))
    entries = [tfproto.parse_bundle_entry(v) for _, v in values[1:]]
    assert tfproto.parse_bundle_header(values[0][1]).num_shards == 2
    assert {e.shard_id for e in entries} == {0, 1}
    assert any(e.slices for e in entries)


def _paths(graph: Any) -> dict[int, list[str]]:
    """Each object's first path from the root, breadth first (as TF names checkpoint keys)."""
    paths: dict[int, list[str]] = {0: []}
    queue = [0]
    for node_id in queue:
        for child in graph.nodes[node_id].children:
            if child.node_id not in paths:
                paths[child.node_id] = [*paths[node_id], child.local_name]
                queue.append(child.node_id)
    return paths


@pytest.mark.needs("tensorflow")
def test_checkpoint_keys_are_the_ones_tensorflow_derives_from_object_paths(tmp_path: Path) -> None:
    import tensorflow as tf

    root = tf.Module()
    root.plain = tf.Variable(1.0)
    root.tricky = {"a.b/c": tf.Variable(2.0), "..": [tf.Variable(3.0)], "S/": tf.Variable(4.0)}
    prefix = tf.train.Checkpoint(root=root).write(str(tmp_path / "keys"))
    graph = tfproto.parse_object_graph(_object_graph_bytes(prefix))
    paths = _paths(graph)
    keys = [(tfproto.checkpoint_key(paths[i], a.name), a.checkpoint_key)
            for i, n in enumerate(graph.nodes) for a in n.attributes if i in paths]
    assert len(keys) == 4 and all(mine == theirs for mine, theirs in keys), keys  # root= is the root itself


# -- the encoders --------------------------------------------------------------------------------------

_ENTRIES: list[dict[str, Any]] = [
    {"dtype": 1, "shape": (3, 3, 16, 32), "size": 18432, "crc32c": 0xFFFFFFFF, "offset": 2**40, "shard_id": 3},
    {"dtype": 19, "shape": (), "size": 2, "crc32c": 0},  # a scalar: its empty shape is still written
    {"dtype": 7, "shape": (0, 5), "size": 0, "crc32c": 12345},
    {"dtype": 1, "shape": (10, 3), "size": 0, "crc32c": 0, "slices": [[(0, 4), (0, None)], [(4, 0), (1, 2)]]},
]


@pytest.mark.needs("tensorflow")
@pytest.mark.parametrize("values", _ENTRIES)
def test_an_encoded_bundle_entry_is_what_tensorflow_serializes(values: dict[str, Any]) -> None:
    theirs = tf_class("BundleEntryProto")()
    for name in ("dtype", "size", "crc32c", "offset", "shard_id"):
        setattr(theirs, name, values.get(name, 0))
    theirs.shape.SetInParent()
    for d in values["shape"]:
        theirs.shape.dim.add(size=d)
    for piece in values.get("slices", ()):
        extents = theirs.slices.add()
        for start, length in piece:
            extent = extents.extent.add(start=start)
            if length is not None:
                extent.length = length
    data = tfproto.encode_bundle_entry(**values)
    assert data == theirs.SerializeToString()
    assert assert_same(tfproto.parse_bundle_entry(data), tf_parse("BundleEntryProto", data)) >= 6


@pytest.mark.needs("tensorflow")
def test_an_encoded_bundle_header_is_what_tensorflow_serializes() -> None:
    theirs = tf_class("BundleHeaderProto")(num_shards=7, endianness=1)
    theirs.version.producer, theirs.version.min_consumer = 1, 0
    assert tfproto.encode_bundle_header(7, endianness=1) == theirs.SerializeToString()
    theirs.endianness, theirs.version.producer, theirs.version.min_consumer = 0, 2, 1
    assert tfproto.encode_bundle_header(7, producer=2, min_consumer=1) == theirs.SerializeToString()


_TREE = {"model": {"conv": {"kernel": "model/conv/kernel/.ATTRIBUTES/VARIABLE_VALUE"},
                   "bn": {"gamma": "g", "moving_mean": "m"}},
         "save_counter": "save_counter/.ATTRIBUTES/VARIABLE_VALUE"}


@pytest.mark.needs("tensorflow")
def test_an_encoded_object_graph_is_what_tensorflow_serializes() -> None:
    theirs = tf_class("TrackableObjectGraph")()
    # Breadth first: 0 root; 1 model, 2 save_counter; 3 conv, 4 bn; 5 kernel; 6 gamma, 7 moving_mean.
    children = {0: [("model", 1), ("save_counter", 2)], 1: [("conv", 3), ("bn", 4)], 3: [("kernel", 5)],
                4: [("gamma", 6), ("moving_mean", 7)]}
    keys = {2: "save_counter/.ATTRIBUTES/VARIABLE_VALUE", 5: "model/conv/kernel/.ATTRIBUTES/VARIABLE_VALUE",
            6: "g", 7: "m"}
    for node_id in range(8):
        node = theirs.nodes.add()
        for name, child in children.get(node_id, ()):
            node.children.add(node_id=child, local_name=name)
        if node_id in keys:
            node.attributes.add(name="VARIABLE_VALUE", checkpoint_key=keys[node_id])
    data = tfproto.encode_object_graph(_TREE)
    assert data == theirs.SerializeToString()
    assert assert_same(tfproto.parse_object_graph(data), tf_parse("TrackableObjectGraph", data)) > 20


@pytest.mark.needs("tensorflow")
def test_an_encoded_object_graph_restores_through_tf_train_checkpoint(tmp_path: Path) -> None:
    import tensorflow as tf

    def model(seed: int) -> tf.Module:
        rng = np.random.default_rng(seed)
        net = tf.Module()
        net.conv = tf.Module()
        net.conv.kernel = tf.Variable(rng.standard_normal((3, 3, 2, 4)).astype(np.float32))
        net.bn = [tf.Variable(rng.standard_normal(4))]
        return net

    source = model(1)
    values = {("net", "conv", "kernel"): source.conv.kernel, ("net", "bn", "0"): source.bn[0],
              ("save_counter",): tf.Variable(3, dtype=tf.int64)}  # restore() creates one to match
    tree = {"net": {"conv": {"kernel": tfproto.checkpoint_key(("net", "conv", "kernel"))},
                    "bn": {"0": tfproto.checkpoint_key(("net", "bn", "0"))}},
            "save_counter": tfproto.checkpoint_key(("save_counter",))}
    names = [tfproto.checkpoint_key(path) for path in values] + ["_CHECKPOINTABLE_OBJECT_GRAPH"]
    tensors = [v.read_value() for v in values.values()] + [tf.constant(tfproto.encode_object_graph(tree))]
    prefix = str(tmp_path / "written")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
    target = model(2)
    checkpoint = tf.train.Checkpoint(net=target)
    checkpoint.restore(prefix).assert_consumed()
    assert int(checkpoint.save_counter) == 3
    assert np.array_equal(target.conv.kernel.numpy(), source.conv.kernel.numpy())
    assert np.array_equal(target.bn[0].numpy(), source.bn[0].numpy())


def test_encoders_round_trip_through_the_decoder() -> None:
    for values in _ENTRIES:
        entry = tfproto.parse_bundle_entry(tfproto.encode_bundle_entry(**values))
        assert [d.size for d in entry.shape.dim] == list(values["shape"])
        assert (entry.dtype, entry.size, entry.crc32c, entry.offset, entry.shard_id) == (
            values["dtype"], values["size"], values["crc32c"], values.get("offset", 0), values.get("shard_id", 0))
        slices = [[(e.start, e.length if e.HasField("length") else None) for e in s.extent] for s in entry.slices]
        assert slices == [list(piece) for piece in values.get("slices", ())]
    graph = tfproto.parse_object_graph(tfproto.encode_object_graph(_TREE))
    paths = _paths(graph)
    leaves = {"/".join(paths[i]): n.attributes[0].checkpoint_key for i, n in enumerate(graph.nodes) if n.attributes}
    assert leaves == {"model/conv/kernel": "model/conv/kernel/.ATTRIBUTES/VARIABLE_VALUE", "model/bn/gamma": "g",
                      "model/bn/moving_mean": "m", "save_counter": "save_counter/.ATTRIBUTES/VARIABLE_VALUE"}
    for value in (0, 1, 127, 128, 300, 2**63, 2**64 - 1, -1, -(2**63)):
        assert tfproto.varint(tfproto.encode_varint(value), 0, 10) == (value % 2**64, len(tfproto.encode_varint(value)))


# -- random messages: TF's classes build them, both parsers read them -----------------------------------

_INTS = {3: (-(2**63), 2**63 - 1), 4: (0, 2**64 - 1), 5: (-(2**31), 2**31 - 1), 6: (0, 2**64 - 1),
         7: (0, 2**32 - 1), 13: (0, 2**32 - 1), 14: (-(2**31), 2**31 - 1), 15: (-(2**31), 2**31 - 1),
         16: (-(2**63), 2**63 - 1), 17: (-(2**31), 2**31 - 1), 18: (-(2**63), 2**63 - 1)}


def _scalar_strategy(field: Any) -> st.SearchStrategy[Any]:
    if field.type in _INTS:
        low, high = _INTS[field.type]
        return st.one_of(st.integers(-3, 300), st.integers(low, high)).filter(lambda v: low <= v <= high)
    return {1: st.floats(), 2: st.floats(width=32), 8: st.booleans(), 9: st.text(max_size=6),
            12: st.binary(max_size=6)}[field.type]


def _fill(data: st.DataObject, message: Any, depth: int) -> None:
    """Set a random subset of ``message``'s fields (all of TF's, not only the ones convbn reads)."""
    for field in message.DESCRIPTOR.fields:
        if (field.message_type is not None and depth >= 4) or not data.draw(st.booleans()):
            continue
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key in data.draw(st.lists(_scalar_strategy(field.message_type.fields_by_name["key"]), max_size=3)):
                if value_field.message_type is not None:
                    _fill(data, value[key], depth + 1)
                else:
                    value[key] = data.draw(_scalar_strategy(value_field))
        elif field.is_repeated and field.message_type is not None:
            for _ in range(data.draw(st.integers(0, 3))):
                _fill(data, value.add(), depth + 1)
        elif field.is_repeated:
            value.extend(data.draw(st.lists(_scalar_strategy(field), max_size=4)))
        elif field.message_type is not None:
            value.SetInParent()
            _fill(data, value, depth + 1)
        else:
            setattr(message, field.name, data.draw(_scalar_strategy(field)))


@pytest.mark.needs("tensorflow")
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data(), name=st.sampled_from(["BundleHeaderProto", "BundleEntryProto", "TrackableObjectGraph",
                                             "MetaGraphDef"]))
def test_random_messages_decode_as_tensorflow_parses_them(data: st.DataObject, name: str) -> None:
    message = tf_class(name)()
    if name == "MetaGraphDef":  # most of its fields are never read: aim at the graph
        _fill(data, message.graph_def.node.add(), 2)
        _fill(data, message.graph_def.library.function.add(), 2)
    else:
        _fill(data, message, 0)
    raw = message.SerializeToString()
    assert_same(PARSERS[name](raw), tf_parse(name, raw))


def _tf_parses(name: str, raw: bytes) -> Any:
    try:
        return tf_parse(name, raw)
    except Exception:
        return None


@pytest.mark.needs("tensorflow")
@settings(max_examples=EXAMPLES, deadline=None)
@given(raw=st.binary(max_size=64), name=st.sampled_from(sorted(PARSERS)))
def test_random_bytes_decode_as_tensorflow_parses_them_or_raise_proto_error(raw: bytes, name: str) -> None:
    try:
        mine = PARSERS[name](raw)
    except ProtoError:
        return  # TF may accept what convbn refuses: groups, and known fields of another wire type
    theirs = _tf_parses(name, raw)
    if theirs is not None:  # TF refuses non-UTF-8 in string fields convbn skips unread
        assert_same(mine, theirs)


def _real_messages() -> list[tuple[str, bytes]]:
    """Small real messages from the encoders, with nested, packed, fixed and repeated fields."""
    return [
        ("BundleHeaderProto", tfproto.encode_bundle_header(3)),
        *(("BundleEntryProto", tfproto.encode_bundle_entry(**values)) for values in _ENTRIES),
        ("TrackableObjectGraph", tfproto.encode_object_graph(_TREE)),
        ("MetaGraphDef", _GRAPH),
    ]


def _ld(number: int, body: bytes) -> bytes:
    """A length-delimited field."""
    return tfproto.encode_varint(number << 3 | 2) + tfproto.encode_varint(len(body)) + body


def _vi(number: int, value: int) -> bytes:
    return tfproto.encode_varint(number << 3) + tfproto.encode_varint(value)


# A GraphDef with a conv node: name, op, inputs, attrs (list of ints packed and unpacked, bytes, float,
# shape, tensor with content and with typed values), and a function with a node.
_CONV = (_ld(1, b"conv") + _ld(2, b"Conv2D") + _ld(3, b"x") + _ld(3, b"^w")
         + _ld(5, _ld(1, b"strides") + _ld(2, _ld(1, _ld(3, bytes([1, 2, 2, 1]))))) + _ld(5, _ld(1, b"dilations") + _ld(2, _ld(1, _vi(3, 1) + _vi(3, 2) + _vi(3, 2) + _vi(3, 1))))
         + _ld(5, _ld(1, b"padding") + _ld(2, _ld(2, b"SAME"))) + _ld(5, _ld(1, b"epsilon") + _ld(2, b"\x25" + struct.pack("<f", 1e-3)))
         + _ld(5, _ld(1, b"shape") + _ld(2, _ld(7, _ld(2, _vi(1, 3)) + _ld(2, _vi(1, -1)))))
         + _ld(5, _ld(1, b"value") + _ld(2, _ld(8, _vi(1, 3) + _ld(2, _ld(2, _vi(1, 2))) + _ld(4, struct.pack("<2i", 2, -2)))))
         + _ld(5, _ld(1, b"half") + _ld(2, _ld(8, _vi(1, 19) + _ld(2, _ld(2, _vi(1, 3))) + _ld(13, tfproto.encode_varint(0x3C00))))))
_GRAPH = _ld(2, _ld(1, _CONV) + _ld(2, _ld(1, _ld(1, _ld(1, b"branch")) + _ld(3, _CONV))))


def test_a_hand_built_graph_decodes_field_by_field() -> None:
    graph = tfproto.parse_meta_graph(_GRAPH).graph_def
    conv, = graph.node
    assert (conv.name, conv.op, conv.input) == ("conv", "Conv2D", ["x", "^w"])
    assert conv.attr["strides"].list.i == [1, 2, 2, 1] and conv.attr["dilations"].list.i == [1, 2, 2, 1]
    assert conv.attr["padding"].s == b"SAME" and conv.attr["data_format"].s == b"" and "data_format" not in conv.attr
    assert conv.attr["epsilon"].f == float(np.float32(1e-3))
    shape = conv.attr["shape"].shape
    assert [d.size for d in shape.dim] == [3, -1] and not shape.unknown_rank and conv.attr["shape"].HasField("shape")
    assert not conv.attr["padding"].HasField("shape")
    assert tfproto.tensor_value(conv.attr["value"].tensor).tolist() == [2, -2]
    assert tfproto.tensor_value(conv.attr["half"].tensor).tolist() == [1.0, 1.0, 1.0]  # the last value repeated
    assert tfproto.tensor_value(conv.attr["half"].tensor).dtype == np.float16
    function, = graph.library.function
    assert function.signature.name == "branch" and function.node_def[0].attr["padding"].s == b"SAME"
    assert graph.library.function[0].node_def[0].attr["missing"].func.name == ""


# -- hostile bytes -------------------------------------------------------------------------------------

_DEEP = b""
for _ in range(MAX_DEPTH := tfproto.MAX_DEPTH):
    _DEEP = _ld(10, _ld(2, _ld(2, _DEEP)))  # AttrValue.func -> NameAttrList.attr entry -> AttrValue


@pytest.mark.parametrize(("name", "raw", "fragment"), [
    ("BundleEntryProto", b"\x08", "the varint at byte 1 runs past the end"),
    ("BundleEntryProto", b"\x08" + b"\xff" * 11, "the varint at byte 1 runs past"),
    ("BundleEntryProto", b"\x12\x05\x12\x00", "declares 5 bytes, past the end of its message (byte 4)"),
    ("BundleEntryProto", b"\x12\x04\x12\x05\x08\x01", "'dim' of TensorShapeProto at byte 2 declares 5 bytes"),
    ("BundleEntryProto", b"\x31" + bytes(8), "field 'crc32c' of BundleEntryProto at byte 0 has wire type 1"),
    ("BundleEntryProto", b"\x0a\x01\x01", "field 'dtype' of BundleEntryProto at byte 0 has wire type 2"),
    ("BundleEntryProto", b"\x30\x01", "field 'crc32c' of BundleEntryProto at byte 0 has wire type 0"),
    ("BundleEntryProto", b"\x35\x01\x00", "the 32-bit value of field 'crc32c' at byte 1 runs past"),
    ("BundleEntryProto", b"\x00\x01", "has number 0"),
    ("BundleEntryProto", b"\x43\x44", "wire type 3, which TF's messages never use"),
    ("BundleEntryProto", b"\x47", "wire type 7"),
    ("BundleEntryProto", b"\x49\x00\x00", "field 9 of BundleEntryProto at byte 1 runs past the end"),
    ("TrackableObjectGraph", b"\x0a\x05\x0a\x03\x12\x01\xff", "string field 'local_name' of ObjectReference"),
    ("MetaGraphDef", _ld(2, _ld(1, _ld(5, _ld(2, _ld(1, _ld(4, b"\x00\x00\x80")))))), "packed field 'f' at byte"),
    ("MetaGraphDef", _ld(2, _ld(1, _ld(5, _ld(2, _ld(1, _ld(3, b"\x80")))))), "the varint at byte"),
    ("MetaGraphDef", _ld(2, _ld(1, b"\x12" + b"\xff" * 9 + b"\x01")), "declares 18446744073709551615 bytes"),
    ("MetaGraphDef", _ld(2, _ld(1, _ld(5, _ld(2, _DEEP)))), f"nest deeper than {MAX_DEPTH} levels"),
])
def test_malformed_bytes_raise_one_clear_proto_error(name: str, raw: bytes, fragment: str) -> None:
    with pytest.raises(ProtoError) as info:
        PARSERS[name](raw)
    assert isinstance(info.value, ValueError) and fragment in str(info.value) and "\n" not in str(info.value)


def _nested(levels: int, innermost: bytes = b"") -> bytes:
    """A MetaGraphDef whose node attr nests ``levels`` AttrValue -> func -> attr cycles deep: the
    innermost AttrValue is message number 4 + 3 * levels from the top (MetaGraphDef is 0)."""
    value = innermost
    for _ in range(levels):
        value = _ld(10, _ld(2, _ld(2, value)))
    return _ld(2, _ld(1, _ld(5, _ld(2, value))))


def test_nesting_up_to_the_limit_decodes_and_one_more_level_is_refused() -> None:
    levels = (MAX_DEPTH - 4) // 3
    value, seen = tfproto.parse_meta_graph(_nested(levels)).graph_def.node[0].attr[""], 0
    while value.HasField("func"):
        value, seen = value.func.attr[""], seen + 1
    assert seen == levels
    with pytest.raises(ProtoError, match=f"nest deeper than {MAX_DEPTH} levels"):
        tfproto.parse_meta_graph(_nested(levels, _ld(10, b"")))


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=st.integers(0, len(_ENTRIES) + 2), cut=st.integers(0, 2000),
       edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4))
def test_damaged_real_messages_decode_or_raise_proto_error(case: int, cut: int, edits: list[tuple[int, int]]) -> None:
    name, raw = _real_messages()[case]
    damaged = bytearray(raw[: len(raw) - cut % (len(raw) + 1)])
    for at, byte in edits:
        if damaged:
            damaged[at % len(damaged)] = byte
    try:
        PARSERS[name](bytes(damaged))
    except ProtoError as exc:
        assert "\n" not in str(exc)


def test_every_truncation_of_a_real_message_decodes_or_raises_proto_error() -> None:
    refused = 0
    for name, raw in _real_messages():
        for end in range(len(raw)):
            try:
                PARSERS[name](raw[:end])
            except ProtoError:
                refused += 1
    assert refused > 100


def test_a_flood_of_tiny_messages_takes_memory_in_proportion_to_its_bytes() -> None:
    raw = b"\x0a\x02\x0a\x00" * 50_000  # 50,000 objects, each with one child: 4 bytes apiece
    tracemalloc.start()
    try:
        graph = tfproto.parse_object_graph(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(graph.nodes) == 50_000 and graph.nodes[-1].children[0].node_id == 0
    assert peak < 48 * len(raw), peak / len(raw)  # slots, no per-message __dict__ (that took 86 per byte)
