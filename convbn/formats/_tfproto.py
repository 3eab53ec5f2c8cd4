"""The protobuf messages of TF checkpoints, decoded and encoded without TensorFlow.

A TF checkpoint holds protobuf messages in three places: its ``.index`` table (a
``BundleHeaderProto`` under the empty key, then one ``BundleEntryProto`` per tensor), the
``_CHECKPOINTABLE_OBJECT_GRAPH`` string tensor of TF2 checkpoints (a ``TrackableObjectGraph``) and
the ``.meta`` file beside a TF1 checkpoint (a ``MetaGraphDef``).

Why a hand decoder and not the ``protobuf`` runtime: the runtime alone cannot parse these messages;
it needs their definitions, which ship only inside TensorFlow (``tensorflow/core/protobuf/*_pb2``).
Vendoring TF's ``.proto`` files and generating classes would pin a protobuf version range for a
library that otherwise needs none, and would decode every field of a multi-megabyte graph where
convbn reads a dozen. The wire format itself is small (varints, fixed 32/64-bit values and
length-delimited bytes), so this module decodes exactly the messages and fields convbn uses, from
the tables in ``_SCHEMAS`` below; every other field is skipped unread.

Decoded messages duck-type TF's generated classes for those fields: the same attribute names, the
proto3 default for a field that is absent (0, ``""``, ``b""``, an empty list, an empty message),
``string`` fields as ``str`` and ``bytes`` fields as ``bytes``, enums as ints, maps as dicts whose
missing keys read as the default value (``node.attr["padding"].s`` is ``b""`` when unset, and
``"shape" in node.attr`` is False), and ``HasField``. So code written against ``meta_graph_pb2``
reads ``parse_meta_graph(data)`` unchanged.

Malformed input (a truncated varint, a length past the end of its message, a wire type a field
cannot have, nesting deeper than 100 messages, bytes that are not UTF-8 in a string) raises
:class:`ProtoError` naming the byte offset: a ``ValueError`` for the caller to wrap with the file
it read. Decoding is iterative over fields and recursive only over nesting, which the depth limit
bounds; every value decoded is backed by bytes of the input and no length prefix is trusted to
allocate, so the result grows with the input: about 6 bytes of Python objects per input byte for a
real graph, at most about 45 for a flood of empty messages. A 4.8 MB tf-slim training graph decodes
in about 0.35 s of CPU (TF's C++ parser: 0.02 s, after TF's seconds of import).

The encoders write what a bundle writer needs: :func:`encode_bundle_header`,
:func:`encode_bundle_entry` and :func:`encode_object_graph`, byte for byte what TensorFlow writes
for the same values (fields in number order, proto3 defaults left out, repeated scalars packed).
"""

from __future__ import annotations

import gc
import struct
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "MAX_DEPTH",
    "Message",
    "ProtoError",
    "checkpoint_key",
    "encode_bundle_entry",
    "encode_bundle_header",
    "encode_object_graph",
    "encode_varint",
    "parse_bundle_entry",
    "parse_bundle_header",
    "parse_meta_graph",
    "parse_object_graph",
    "tensor_value",
    "varint",
]

#: TensorFlow's own limit on nested messages (protobuf's default recursion limit).
MAX_DEPTH = 100

# Each message: (field number, name, kind, repeated). A kind is a scalar kind of _SCALARS, the name
# of another message here, or "map:<key kind>:<value kind>" (a repeated key=1/value=2 entry).
# Only the fields convbn reads are listed; tests/formats/test_tfproto.py checks every entry against
# TensorFlow's descriptors.
_SCHEMAS: dict[str, tuple[tuple[int, str, str, bool], ...]] = {
    "VersionDef": ((1, "producer", "int32", False), (2, "min_consumer", "int32", False),
                   (3, "bad_consumers", "int32", True)),
    "BundleHeaderProto": ((1, "num_shards", "int32", False), (2, "endianness", "enum", False),
                          (3, "version", "VersionDef", False)),
    "Dim": ((1, "size", "int64", False), (2, "name", "string", False)),
    "TensorShapeProto": ((2, "dim", "Dim", True), (3, "unknown_rank", "bool", False)),
    "Extent": ((1, "start", "int64", False), (2, "length", "int64", False)),
    "TensorSliceProto": ((1, "extent", "Extent", True),),
    "BundleEntryProto": ((1, "dtype", "enum", False), (2, "shape", "TensorShapeProto", False),
                         (3, "shard_id", "int32", False), (4, "offset", "int64", False),
                         (5, "size", "int64", False), (6, "crc32c", "fixed32", False),
                         (7, "slices", "TensorSliceProto", True)),
    "ObjectReference": ((1, "node_id", "int32", False), (2, "local_name", "string", False)),
    "SerializedTensor": ((1, "name", "string", False), (2, "full_name", "string", False),
                         (3, "checkpoint_key", "string", False)),
    "SlotVariableReference": ((1, "original_variable_node_id", "int32", False), (2, "slot_name", "string", False),
                              (3, "slot_variable_node_id", "int32", False)),
    "TrackableObject": ((1, "children", "ObjectReference", True), (2, "attributes", "SerializedTensor", True),
                        (3, "slot_variables", "SlotVariableReference", True)),
    "TrackableObjectGraph": ((1, "nodes", "TrackableObject", True),),
    "TensorProto": ((1, "dtype", "enum", False), (2, "tensor_shape", "TensorShapeProto", False),
                    (4, "tensor_content", "bytes", False), (5, "float_val", "float", True),
                    (6, "double_val", "double", True), (7, "int_val", "int32", True),
                    (8, "string_val", "bytes", True), (10, "int64_val", "int64", True),
                    (11, "bool_val", "bool", True), (13, "half_val", "int32", True),
                    (16, "uint32_val", "uint32", True), (17, "uint64_val", "uint64", True)),
    "NameAttrList": ((1, "name", "string", False), (2, "attr", "map:string:AttrValue", False)),
    "ListValue": ((2, "s", "bytes", True), (3, "i", "int64", True), (4, "f", "float", True), (5, "b", "bool", True),
                  (6, "type", "enum", True), (7, "shape", "TensorShapeProto", True),
                  (8, "tensor", "TensorProto", True), (9, "func", "NameAttrList", True)),
    "AttrValue": ((1, "list", "ListValue", False), (2, "s", "bytes", False), (3, "i", "int64", False),
                  (4, "f", "float", False), (5, "b", "bool", False), (6, "type", "enum", False),
                  (7, "shape", "TensorShapeProto", False), (8, "tensor", "TensorProto", False),
                  (9, "placeholder", "string", False), (10, "func", "NameAttrList", False)),
    "NodeDef": ((1, "name", "string", False), (2, "op", "string", False), (3, "input", "string", True),
                (4, "device", "string", False), (5, "attr", "map:string:AttrValue", False)),
    "OpDef": ((1, "name", "string", False),),
    "FunctionDef": ((1, "signature", "OpDef", False), (3, "node_def", "NodeDef", True)),
    "FunctionDefLibrary": ((1, "function", "FunctionDef", True),),
    "GraphDef": ((1, "node", "NodeDef", True), (2, "library", "FunctionDefLibrary", False)),
    "MetaGraphDef": ((2, "graph_def", "GraphDef", False),),
}

# Scalar kind -> (wire type, default). Wire types: 0 varint, 1 64-bit, 2 length-delimited, 5 32-bit.
_SCALARS: dict[str, tuple[int, Any]] = {
    "int32": (0, 0), "int64": (0, 0), "uint32": (0, 0), "uint64": (0, 0), "enum": (0, 0), "bool": (0, False),
    "fixed32": (5, 0), "float": (5, 0.0), "double": (1, 0.0), "string": (2, ""), "bytes": (2, b""),
}
_WIRE_NAMES = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "start-group", 4: "end-group", 5: "32-bit"}
_MASK64 = (1 << 64) - 1


class ProtoError(ValueError):
    """A protobuf message that does not decode; the message says what and at which byte."""


def varint(data: bytes, at: int, end: int) -> tuple[int, int]:
    """The unsigned LEB128 varint at ``data[at:]`` (not past ``end``, at most 10 bytes) and where it ends."""
    value = shift = 0
    start = at
    while at < end and shift < 70:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value & _MASK64, at
        shift += 7
    raise ProtoError(f"the varint at byte {start} runs past the end of its message (byte {end})")


# How _decode handles a field: a varint or fixed-width scalar, a string, bytes, a message, a map entry.
_VARINT, _FIXED, _STRING, _BYTES, _MESSAGE, _MAP = range(6)


class _Field:
    """One field of a message table, with what decoding and defaults need."""

    __slots__ = ("action", "default", "kind", "message", "name", "number", "repeated", "value", "wire")

    def __init__(self, number: int, name: str, kind: str, repeated: bool) -> None:
        self.number, self.name, self.kind, self.repeated = number, name, kind, repeated
        self.message: type[Message] | None = None  # for a message or map field: its (entry) class
        self.value: _Field | None = None  # for a map field: the entry's value field
        self.wire, self.default = _SCALARS.get(kind, (2, None))
        self.action = {0: _VARINT, 1: _FIXED, 5: _FIXED}.get(self.wire, {"string": _STRING, "bytes": _BYTES}.get(kind))

    def empty(self) -> Any:
        """What TF's classes give for this field when the message does not set it."""
        if self.action == _MAP:
            assert self.value is not None
            return _Map(self.value)
        if self.repeated:
            return []
        if self.message is not None:
            return self.message()
        return self.default


class Message:
    """A decoded message: set fields are instance attributes, unset ones read as their defaults.

    Each message class has a slot per field and no ``__dict__``: a flood of tiny messages costs
    64 bytes each, not 144.
    """

    __slots__ = ()
    FIELDS: ClassVar[dict[int, _Field]] = {}
    BY_NAME: ClassVar[dict[str, _Field]] = {}

    def __init__(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not set: the field's default, as TF's classes return it.
        field = type(self).BY_NAME.get(name)
        if field is None:
            raise AttributeError(f"{type(self).__name__} has no field {name!r} (convbn decodes only the ones it reads)")
        return field.empty()

    def HasField(self, name: str) -> bool:  # the name TF's generated classes use
        """Whether ``name`` was present in the bytes decoded (what TF's ``HasField`` answers for
        message fields and oneof members)."""
        if name not in type(self).BY_NAME:
            raise ValueError(f"{type(self).__name__} has no field {name!r}")
        return name in _set_fields(self)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in _set_fields(self).items())
        return f"{type(self).__name__}({fields})"


def _set_fields(message: Message) -> dict[str, Any]:
    """The fields ``message`` has a value for (an unset slot raises, and skips __getattr__ this way)."""
    values = {}
    for name in type(message).BY_NAME:
        try:
            values[name] = object.__getattribute__(message, name)
        except AttributeError:
            pass
    return values


class _Map(dict):  # type: ignore[type-arg]
    """A protobuf map: a missing key reads as the value's default (not inserted), as in TF's classes."""

    def __init__(self, value: _Field) -> None:
        super().__init__()
        self.value_field = value

    def __missing__(self, key: Any) -> Any:
        return self.value_field.empty()


def _build_classes() -> dict[str, type[Message]]:
    classes: dict[str, type[Message]] = {
        name: type(name, (Message,), {"__slots__": tuple(spec[1] for spec in schema)}) for name, schema in _SCHEMAS.items()
    }

    def link(field: _Field) -> _Field:
        if field.kind in classes:
            field.message, field.action = classes[field.kind], _MESSAGE
        elif field.kind.startswith("map:"):
            _, key_kind, value_kind = field.kind.split(":")
            entry: type[Message] = type(f"{field.name}Entry", (Message,), {"__slots__": ("key", "value")})
            key, field.value = link(_Field(1, "key", key_kind, False)), link(_Field(2, "value", value_kind, False))
            entry.FIELDS, entry.BY_NAME = {1: key, 2: field.value}, {"key": key, "value": field.value}
            field.message, field.action = entry, _MAP
        elif field.kind not in _SCALARS:
            raise AssertionError(f"unknown kind {field.kind!r}")
        return field

    for name, schema in _SCHEMAS.items():
        fields = [link(_Field(*spec)) for spec in schema]
        classes[name].FIELDS = {f.number: f for f in fields}
        classes[name].BY_NAME = {f.name: f for f in fields}
    return classes


_CLASSES = _build_classes()


# -- decoding --------------------------------------------------------------------------------------


def _scalar(field: _Field, raw: int) -> Any:
    """A varint's value as the field's kind reads it (protobuf truncates 32-bit kinds)."""
    kind = field.kind
    if kind == "int64":
        return raw - (1 << 64) if raw >> 63 else raw
    if kind in ("int32", "enum"):
        raw &= 0xFFFFFFFF
        return raw - (1 << 32) if raw >> 31 else raw
    if kind == "bool":
        return raw != 0
    if kind == "uint32":
        return raw & 0xFFFFFFFF
    if kind == "uint64":
        return raw
    raise ProtoError(f"field {field.name!r} holds a {kind}, not a varint")


def _fixed(field: _Field, data: bytes, at: int, end: int, count: int = 1) -> tuple[Any, ...]:
    """``count`` 32-bit or 64-bit values of ``field`` at ``data[at:]``."""
    width = 4 if field.wire == 5 else 8
    if at + width * count > end:
        raise ProtoError(f"the {width * 8}-bit value of field {field.name!r} at byte {at} runs past the end (byte {end})")
    code = {"fixed32": "I", "float": "f", "double": "d"}[field.kind]
    return struct.unpack_from(f"<{count}{code}", data, at)


def _packed(field: _Field, data: bytes, at: int, end: int) -> list[Any]:
    """The values of a packed repeated scalar field in ``data[at:end]``."""
    if field.wire == 0:
        values = []
        while at < end:
            raw, at = varint(data, at, end)
            values.append(_scalar(field, raw))
        return values
    width = 4 if field.wire == 5 else 8
    if (end - at) % width:
        raise ProtoError(f"packed field {field.name!r} at byte {at} holds {end - at} bytes, not a multiple of {width}")
    return list(_fixed(field, data, at, end, (end - at) // width))


def _skip(data: bytes, at: int, end: int, wire: int, number: int, where: str) -> int:
    """Where the value of an unread field (field ``number`` of ``where``) ends."""
    if wire == 0:
        return varint(data, at, end)[1]
    if wire == 2:
        length, at = varint(data, at, end)
        stop = at + length
    elif wire in (1, 5):
        stop = at + (8 if wire == 1 else 4)
    else:  # groups (3, 4) are proto2-only, and TF's messages are proto3; 6 and 7 are not wire types
        raise ProtoError(f"field {number} of {where} at byte {at} has wire type {wire}, which TF's messages never use")
    if stop > end:
        raise ProtoError(f"field {number} of {where} at byte {at} runs past the end of its message (byte {end})")
    return stop


def _merge(old: Message, new: Message) -> None:
    """Merge ``new`` into ``old`` as protobuf does for a message field that occurs twice."""
    present = _set_fields(old)
    for name, value in _set_fields(new).items():
        field = type(old).BY_NAME[name]
        if name not in present:
            setattr(old, name, value)
        elif field.action == _MAP:
            present[name].update(value)
        elif field.repeated:
            present[name].extend(value)
        elif field.message is not None:
            _merge(present[name], value)
        else:
            setattr(old, name, value)


def _decode(cls: type[Message], data: bytes, at: int, end: int, depth: int) -> Message:
    # The hot loop of reading a .meta graph (megabytes of node inputs): one-byte tags and lengths
    # are read inline, and fields are gathered in a dict, then set on the message's slots.
    if depth > MAX_DEPTH:
        raise ProtoError(f"messages nest deeper than {MAX_DEPTH} levels (at byte {at})")
    fields = cls.FIELDS
    values: dict[str, Any] = {}
    while at < end:
        start = at
        key = data[at]
        if key < 0x80:
            at += 1
        else:
            key, at = varint(data, at, end)
        wire = key & 7
        field = fields.get(key >> 3)
        if field is None:
            if key >> 3 == 0:
                raise ProtoError(f"a field of {cls.__name__} at byte {start} has number 0, which protobuf forbids")
            at = _skip(data, at, end, wire, key >> 3, cls.__name__)
            continue
        value: Any
        action = field.action
        if wire == 2:
            length = data[at] if at < end else 0x80
            if length < 0x80:
                at += 1
            else:
                length, at = varint(data, at, end)
            stop = at + length
            if stop > end:
                raise ProtoError(
                    f"field {field.name!r} of {cls.__name__} at byte {start} declares {length} bytes, past the end "
                    f"of its message (byte {end})"
                )
            if action == _STRING:
                try:
                    value = data[at:stop].decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtoError(f"string field {field.name!r} of {cls.__name__} at byte {start} is not UTF-8") from None
            elif action == _MESSAGE or action == _MAP:
                assert field.message is not None
                value = _decode(field.message, data, at, stop, depth + 1)
            elif action == _BYTES:
                value = data[at:stop]
            elif field.repeated:  # a packed repeated scalar
                packed = _packed(field, data, at, stop)
                if field.name in values:
                    values[field.name].extend(packed)
                else:
                    values[field.name] = packed
                at = stop
                continue
            else:
                value = None
            at = stop
        elif wire == field.wire == 0:
            raw = data[at] if at < end else 0x80
            if raw < 0x80:
                at += 1
            else:
                raw, at = varint(data, at, end)
            value = _scalar(field, raw)
        elif wire == field.wire:
            (value,) = _fixed(field, data, at, end)
            at += 4 if wire == 5 else 8
        else:
            value = None
        if value is None:
            raise ProtoError(
                f"field {field.name!r} of {cls.__name__} at byte {start} has wire type {wire} "
                f"({_WIRE_NAMES.get(wire, 'invalid')}); a {field.kind} field has {field.wire} ({_WIRE_NAMES[field.wire]})"
            )
        if action == _MAP:
            entries = values.get(field.name)
            if entries is None:
                entries = values[field.name] = field.empty()
            entries[value.key] = value.value
        elif field.repeated:
            items = values.get(field.name)
            if items is None:
                values[field.name] = [value]
            else:
                items.append(value)
        elif action == _MESSAGE and field.name in values:
            _merge(values[field.name], value)
        else:
            values[field.name] = value
    message = object.__new__(cls)
    for name, value in values.items():
        setattr(message, name, value)
    return message


def _parse(name: str, data: bytes | bytearray | memoryview) -> Any:
    raw = data if isinstance(data, bytes) else bytes(data)
    # A graph decodes into ~10**5 objects, none in a reference cycle: collecting meanwhile would
    # only rescan the heap (with TensorFlow or torch loaded, that doubles the time).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _decode(_CLASSES[name], raw, 0, len(raw), 0)
    finally:
        if collecting:
            gc.enable()


def parse_bundle_header(data: bytes | bytearray | memoryview) -> Any:
    """A ``BundleHeaderProto`` (the ``.index`` entry under the empty key): ``num_shards``,
    ``endianness`` (0 little, 1 big), ``version.producer``/``min_consumer``/``bad_consumers``.

    Raises:
        ProtoError: when ``data`` does not decode (the message names the byte).
    """
    return _parse("BundleHeaderProto", data)


def parse_bundle_entry(data: bytes | bytearray | memoryview) -> Any:
    """A ``BundleEntryProto`` (one tensor of the ``.index``): ``dtype``, ``shape.dim[i].size``,
    ``shape.unknown_rank``, ``shard_id``, ``offset``, ``size``, ``crc32c`` and ``slices[i].extent[j]``
    (``start``, ``length``, ``HasField("length")``).

    Raises:
        ProtoError: when ``data`` does not decode.
    """
    return _parse("BundleEntryProto", data)


def parse_object_graph(data: bytes | bytearray | memoryview) -> Any:
    """A ``TrackableObjectGraph`` (the ``_CHECKPOINTABLE_OBJECT_GRAPH`` tensor): ``nodes[i]`` with
    ``children`` (``node_id``, ``local_name``), ``attributes`` (``name``, ``full_name``,
    ``checkpoint_key``) and ``slot_variables`` (``original_variable_node_id``, ``slot_name``,
    ``slot_variable_node_id``).

    Raises:
        ProtoError: when ``data`` does not decode.
    """
    return _parse("TrackableObjectGraph", data)


def parse_meta_graph(data: bytes | bytearray | memoryview) -> Any:
    """A ``MetaGraphDef`` (a ``.meta`` file), of which only ``graph_def`` is decoded: ``node``
    (``name``, ``op``, ``input``, ``device``, ``attr``) and ``library.function`` (``signature.name``,
    ``node_def``). ``attr`` maps names to ``AttrValue`` (``s``, ``i``, ``f``, ``b``, ``type``,
    ``shape``, ``tensor``, ``func``, ``placeholder``, ``list.{s,i,f,b,type,shape,tensor,func}``).

    Raises:
        ProtoError: when ``data`` does not decode.
    """
    return _parse("MetaGraphDef", data)


# DataType -> NumPy dtype of the tensors tensor_value decodes, and the repeated field holding them.
_TENSOR_DTYPES: dict[int, tuple[str, str]] = {
    1: ("<f4", "float_val"), 2: ("<f8", "double_val"), 3: ("<i4", "int_val"), 4: ("u1", "int_val"),
    5: ("<i2", "int_val"), 6: ("i1", "int_val"), 9: ("<i8", "int64_val"), 10: ("?", "bool_val"),
    17: ("<u2", "int_val"), 19: ("<f2", "half_val"), 22: ("<u4", "uint32_val"), 23: ("<u8", "uint64_val"),
}


def tensor_value(tensor: Any, *, max_elements: int = 1024) -> np.ndarray:
    """The value of a small numeric ``TensorProto`` (a Const node's ``attr["value"].tensor``), as
    ``tf.make_ndarray`` gives it: from ``tensor_content``, else from the typed values, the last one
    repeated to fill the shape (zeros when there are none).

    Raises:
        ProtoError: for an unknown rank, a negative dimension, more than ``max_elements`` elements
            (a declared shape never allocates past that), a dtype other than bool, ints, float16/32/64,
            a ``tensor_content`` whose length the shape and dtype do not give, or typed values
            outside the dtype's range.
    """
    if tensor.dtype not in _TENSOR_DTYPES:
        raise ProtoError(f"a constant of dtype {tensor.dtype} is not a numeric tensor convbn reads")
    code, values_field = _TENSOR_DTYPES[tensor.dtype]
    dtype = np.dtype(code)
    dims = [d.size for d in tensor.tensor_shape.dim]
    count = 1
    for d in dims:
        if d < 0:
            raise ProtoError(f"a constant's shape {dims[:8]} has a negative dimension")
        count *= d
    if tensor.tensor_shape.unknown_rank or count > max_elements:
        raise ProtoError(f"a constant of shape {dims[:8]} is larger than the {max_elements} elements expected")
    if tensor.tensor_content:
        if len(tensor.tensor_content) != count * dtype.itemsize:
            raise ProtoError(
                f"a constant of shape {dims[:8]} and dtype {dtype} holds {len(tensor.tensor_content)} bytes of content"
            )
        return np.frombuffer(tensor.tensor_content, dtype).astype(dtype.newbyteorder("="), copy=True).reshape(dims)
    values = getattr(tensor, values_field)[:count]
    try:
        if dtype == np.float16:  # half_val holds the float16 bit patterns in int32s
            flat = np.asarray(values, np.uint16).view(np.float16)
        else:
            flat = np.asarray(values, dtype.newbyteorder("="))
    except OverflowError:  # an int_val of 300 for a uint8, a negative half_val
        raise ProtoError(f"a constant of dtype {dtype} holds values outside its range") from None
    if len(flat) < count:
        flat = np.concatenate([flat, np.full(count - len(flat), flat[-1] if len(flat) else 0, flat.dtype)])
    return flat.reshape(dims)


# -- encoding --------------------------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """``value`` as a protobuf varint (the inverse of :func:`varint`)."""
    value &= _MASK64  # negative ints take ten bytes, two's complement, as protobuf writes them
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_scalar(field: _Field, value: Any) -> bytes:
    if field.wire == 0:
        return encode_varint(int(value))
    if field.wire in (1, 5):
        return struct.pack({"fixed32": "<I", "float": "<f", "double": "<d"}[field.kind], value)
    return value.encode("utf-8") if field.kind == "string" else bytes(value)


def _encode(cls: type[Message], values: Mapping[str, Any]) -> bytes:
    """``values`` (field name -> value; a mapping for a message, a sequence for a repeated field)
    as ``cls`` on the wire, the way TF serializes it: in field order, proto3 defaults omitted, a
    message given (even an empty one) always written, repeated scalars packed."""
    unknown = set(values) - set(cls.BY_NAME)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
    out = bytearray()
    for field in cls.FIELDS.values():
        value = values.get(field.name)
        if value is None:
            continue
        if field.message is not None:
            for item in value if field.repeated else (value,):
                body = _encode(field.message, item)
                out += encode_varint(field.number << 3 | 2) + encode_varint(len(body)) + body
        elif field.repeated and field.wire != 2:
            if value:
                body = b"".join(_encode_scalar(field, v) for v in value)
                out += encode_varint(field.number << 3 | 2) + encode_varint(len(body)) + body
        elif field.repeated:
            for item in value:
                body = _encode_scalar(field, item)
                out += encode_varint(field.number << 3 | 2) + encode_varint(len(body)) + body
        elif value != field.default or field.name == "length":  # Extent.length is a oneof: 0 is written
            body = _encode_scalar(field, value)
            if field.wire == 2:
                body = encode_varint(len(body)) + body
            out += encode_varint(field.number << 3 | field.wire) + body
    return bytes(out)


def encode_bundle_header(num_shards: int, *, endianness: int = 0, producer: int = 1, min_consumer: int = 0) -> bytes:
    """The ``BundleHeaderProto`` bytes TensorFlow's bundle writer stores under the empty key.

    Args:
        num_shards: how many ``.data-NNNNN-of-MMMMM`` files the checkpoint has.
        endianness: 0 for little-endian data (what TF writes on every platform it supports), 1 big.
        producer: the bundle format version (TF writes 1); ``min_consumer``: the oldest reader
            version that may read it (TF writes 0).

    Example:
        >>> parse_bundle_header(encode_bundle_header(2)).num_shards
        2
    """
    return _encode(_CLASSES["BundleHeaderProto"], {
        "num_shards": num_shards, "endianness": endianness,
        "version": {"producer": producer, "min_consumer": min_consumer},
    })


def encode_bundle_entry(
    *,
    dtype: int,
    shape: Sequence[int],
    size: int,
    crc32c: int,
    shard_id: int = 0,
    offset: int = 0,
    slices: Sequence[Sequence[tuple[int, int | None]]] = (),
) -> bytes:
    """The ``BundleEntryProto`` bytes of one tensor, as TensorFlow's bundle writer stores them.

    Args:
        dtype: the TF ``DataType`` number (1 float32, 2 float64, 3 int32, 7 string, 9 int64, ...).
        shape: the tensor's dimensions (``()`` for a scalar: the shape is still written, empty).
        size: the bytes the tensor takes in its data file; ``crc32c``: their masked CRC32C.
        shard_id: which data file holds it; ``offset``: where in that file it starts.
        slices: for a partitioned variable's full entry, each slice as ``(start, length)`` per
            dimension, ``length=None`` for "to the end" (TF's ``-`` extent).

    Example:
        >>> entry = parse_bundle_entry(encode_bundle_entry(dtype=1, shape=(3, 2), size=24, crc32c=7))
        >>> [d.size for d in entry.shape.dim], entry.size
        ([3, 2], 24)
    """
    return _encode(_CLASSES["BundleEntryProto"], {
        "dtype": dtype,
        "shape": {"dim": [{"size": d} for d in shape]},
        "shard_id": shard_id, "offset": offset, "size": size, "crc32c": crc32c,
        "slices": [
            {"extent": [{"start": s} if n is None else {"start": s, "length": n} for s, n in piece]} for piece in slices
        ],
    })


def checkpoint_key(path: Sequence[str], attribute: str = "VARIABLE_VALUE") -> str:
    """The key TF2 stores an object's attribute under: its path from the root, each local name
    escaped (``.`` as ``..``, ``/`` as ``.S``), then ``.ATTRIBUTES/<attribute>``.

    Example:
        >>> checkpoint_key(["model", "conv.1", "kernel"])
        'model/conv..1/kernel/.ATTRIBUTES/VARIABLE_VALUE'
    """
    escaped = [name.replace(".", "..").replace("/", ".S") for name in (*path, attribute)]
    return "/".join([*escaped[:-1], ".ATTRIBUTES", escaped[-1]])


def encode_object_graph(tree: Mapping[str, Any]) -> bytes:
    """The ``TrackableObjectGraph`` bytes of a nested mapping of objects.

    ``tree`` maps each local name to a child object: a mapping (an object with children of its
    own) or a ``str``, a variable stored under that checkpoint key (its ``VARIABLE_VALUE``
    attribute). Objects are numbered breadth first from the root (node 0), as TensorFlow numbers
    them, and a child's children are in the mapping's order.

    Example:
        >>> graph = parse_object_graph(encode_object_graph({"model": {"kernel": "model/kernel/.ATTRIBUTES/VARIABLE_VALUE"}}))
        >>> [c.local_name for n in graph.nodes for c in n.children], graph.nodes[2].attributes[0].checkpoint_key
        (['model', 'kernel'], 'model/kernel/.ATTRIBUTES/VARIABLE_VALUE')
    """
    nodes: list[dict[str, Any]] = []
    queue: list[Any] = [tree]
    while len(nodes) < len(queue):
        obj = queue[len(nodes)]
        if isinstance(obj, str):
            nodes.append({"attributes": [{"name": "VARIABLE_VALUE", "checkpoint_key": obj}]})
            continue
        if not isinstance(obj, Mapping):
            raise ValueError(f"an object graph's objects must be mappings or checkpoint keys. Received: {obj!r}")
        children = []
        for name, child in obj.items():
            children.append({"node_id": len(queue), "local_name": name})
            queue.append(child)
        nodes.append({"children": children})
    return _encode(_CLASSES["TrackableObjectGraph"], {"nodes": nodes})
