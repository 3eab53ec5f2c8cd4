"""Seeded mutations of checkpoint bytes: generic byte damage plus a few format-aware lies.

Every mutator is ``(rng, data) -> bytes`` and deterministic given ``rng``. The generic ones (flips,
truncation, insertion, deletion, "interesting" integers) find what a reader assumes about sizes and
offsets; the format-aware ones keep the container valid and lie in one field (a safetensors header's
length, shape, dtype or offsets; a zip entry's sizes or compression; a msgpack number; an HDF5
attribute or dataset; a shard index's weight_map; a JSON field of Orbax's metadata), which byte
damage rarely reaches past the first check.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import struct
import zipfile
from collections.abc import Callable
from typing import Any

Mutator = Callable[[random.Random, bytes], bytes]

#: Integers that break size and offset arithmetic: zero, signs, powers of two, word boundaries.
INTERESTING = (0, 1, -1, 2, 7, 8, 255, 256, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               2**40, 2**62, -(2**63), 2**63 - 1)


def flip_bits(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def random_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    if out:
        at = rng.randrange(len(out))
        n = min(rng.choice((1, 2, 4, 8, 32)), len(out) - at)
        out[at:at + n] = bytes(rng.randrange(256) for _ in range(n))
    return bytes(out)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[:rng.randrange(len(data))] if data else data


def insert(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(len(data) + 1)
    n = rng.choice((1, 3, 8, 64, 1024))
    fill = bytes(rng.randrange(256) for _ in range(n)) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * n
    return data[:at] + fill + data[at:]


def delete(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    at = rng.randrange(len(data))
    return data[:at] + data[at + rng.choice((1, 4, 16, 256)):]


def duplicate(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    at = rng.randrange(len(data))
    chunk = data[at:at + rng.choice((4, 16, 128))]
    to = rng.randrange(len(data) + 1)
    return data[:to] + chunk + data[to:]


def interesting_int(rng: random.Random, data: bytes) -> bytes:
    """Overwrite 1, 2, 4 or 8 bytes with an interesting integer, either byte order."""
    width = rng.choice((1, 2, 4, 8))
    if len(data) < width:
        return data
    value = rng.choice(INTERESTING) % (1 << (8 * width))
    raw = value.to_bytes(width, rng.choice(("little", "big")))
    at = rng.randrange(len(data) - width + 1)
    return data[:at] + raw + data[at + width:]


GENERIC: tuple[Mutator, ...] = (flip_bits, random_bytes, truncate, insert, delete, duplicate, interesting_int)


def _lie(rng: random.Random, value: Any) -> Any:
    """A replacement for a JSON/msgpack value of the wrong size, sign, type or depth."""
    return rng.choice((
        -1, 0, 2**31, 2**63, 1e308, float("nan"), "x", "", None, True, [], {}, [value, value],
        [[[[value]]]], [-1], [2**40], "F64", "BF16", "I8", "BOOL", "U8",
    ))


@dataclasses.dataclass(frozen=True)
class Deep:
    """``value`` wrapped in ``depth`` one-element lists (or one-key maps): serialised by hand, as the
    encoders recurse."""

    depth: int
    value: Any
    maps: bool = False


def dumps_json(tree: Any) -> bytes:
    """``json.dumps`` that also writes :class:`Deep` nodes."""
    deep: list[Deep] = []

    def default(node: Any) -> Any:
        if isinstance(node, Deep):
            deep.append(node)
            return f"__deep_{len(deep) - 1}__"
        raise TypeError(type(node).__name__)

    text = json.dumps(tree, allow_nan=True, default=default)
    for i, node in enumerate(deep):
        opening, closing = ('{"a": ', "}") if node.maps else ("[", "]")
        inner = dumps_json(node.value).decode()
        text = text.replace(f'"__deep_{i}__"', opening * node.depth + inner + closing * node.depth)
    return text.encode()


def _mutate_tree(rng: random.Random, tree: Any) -> Any:
    """One lie somewhere in a JSON-like tree: a number changed, a key removed, a value replaced, deep nesting."""
    paths: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            paths.append((node, key))
            walk(child)

    walk(tree)
    if not paths:
        return _lie(rng, tree)
    parent, key = rng.choice(paths)
    value = parent[key]
    roll = rng.random()
    if isinstance(value, bool) or not isinstance(value, int | float) or roll < 0.3:
        if roll < 0.1 and isinstance(parent, dict):
            del parent[key]
        elif roll < 0.15:
            parent[key] = Deep(rng.choice((100, 600, 5000)), value, maps=rng.random() < 0.5)
        else:
            parent[key] = _lie(rng, value)
    else:
        parent[key] = rng.choice((-value, value + 1, value - 1, value * 2**20, 0, -1, 2**32 + value, 2**63))
    return tree


def safetensors_header(rng: random.Random, data: bytes) -> bytes:
    """Keep the layout, lie in the header: its length field, or one JSON field (shape, dtype, offsets, metadata)."""
    if len(data) < 8:
        return data
    (n,) = struct.unpack("<Q", data[:8])
    header, body = data[8:8 + n], data[8 + n:]
    if rng.random() < 0.25:
        return struct.pack("<Q", rng.choice((0, 1, n - 1, n + 1, n + 8, len(data), 2**32, 2**63))) + data[8:]
    try:
        tree = json.loads(header)
    except ValueError:
        return data
    text = dumps_json(_mutate_tree(rng, tree))
    return struct.pack("<Q", len(text)) + text + body


def msgpack_tree(rng: random.Random, data: bytes) -> bytes:
    """Decode, lie in one number/key/value (inside flax's ndarray extension too), re-encode."""
    import msgpack

    def unwrap(node: Any) -> Any:
        if isinstance(node, msgpack.ExtType):
            try:
                return {"__ext__": node.code, "v": list(msgpack.unpackb(node.data, raw=False))}
            except Exception:
                return node
        if isinstance(node, dict):
            return {k: unwrap(v) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [unwrap(v) for v in node]
        return node

    def wrap(node: Any) -> Any:
        if isinstance(node, Deep):  # fixarray(1) headers, then the value: msgpack's packer caps nesting
            return msgpack.ExtType(0, b"")  # placeholder, replaced below
        if isinstance(node, dict) and set(node) == {"__ext__", "v"} and isinstance(node["v"], list):
            return msgpack.ExtType(int(node["__ext__"]) % 128, msgpack.packb(wrap(node["v"]), use_bin_type=True))
        if isinstance(node, dict):
            return {k: wrap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [wrap(v) for v in node]
        return node

    try:
        tree = unwrap(msgpack.unpackb(data, raw=False, strict_map_key=False))
        chunked = _chunk_one(rng, tree) if rng.random() < 0.35 else None
        if chunked is None or rng.random() < 0.5:
            tree = _mutate_tree(rng, tree)
        elif rng.random() < 0.8:
            _mutate_tree(rng, chunked)  # the lie inside the chunked array
        deep = _find_deep(tree)
        packed = bytes(msgpack.packb(wrap(tree), use_bin_type=True))
        if deep is not None:
            inner = bytes(msgpack.packb(wrap(deep.value), use_bin_type=True))
            level = b"\x81\xa1a" if deep.maps else b"\x91"
            packed = packed.replace(bytes(msgpack.packb(msgpack.ExtType(0, b""))), level * deep.depth + inner, 1)
        return packed
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError):
        return data


def _chunk_one(rng: random.Random, tree: Any) -> dict[str, Any] | None:
    """Rewrite one (unwrapped) flax ndarray as flax writes big arrays: ``__msgpack_chunked_array__``
    with its shape and 1-D chunks; returns the new node (None when the tree holds no ndarray)."""
    spots: list[tuple[dict[str, Any], str]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                if isinstance(child, dict) and set(child) == {"__ext__", "v"} and len(child["v"]) == 3:
                    spots.append((node, key))
                else:
                    walk(child)

    walk(tree)
    if not spots:
        return None
    parent, key = rng.choice(spots)
    shape, dtype, buf = parent[key]["v"]
    itemsize = max(1, len(buf) // max(1, _product(shape)))
    n = _product(shape)
    cut = rng.randrange(n + 1) if n else 0
    pieces = [(0, cut), (cut, n)] if 0 < cut < n else [(0, n)]
    chunks = {str(i): {"__ext__": parent[key]["__ext__"], "v": [[b - a], dtype, buf[a * itemsize:b * itemsize]]}
              for i, (a, b) in enumerate(pieces)}
    node = {"__msgpack_chunked_array__": True, "shape": {str(i): d for i, d in enumerate(shape)}, "chunks": chunks}
    parent[key] = node
    return node


def _product(shape: Any) -> int:
    n = 1
    for d in shape if isinstance(shape, list | tuple) else ():
        n *= d if isinstance(d, int) else 1
    return n


def _find_deep(tree: Any) -> Deep | None:
    if isinstance(tree, Deep):
        return tree
    children = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else ()
    for child in children:
        found = _find_deep(child)
        if found is not None:
            return found
    return None


def zip_fields(rng: random.Random, data: bytes) -> bytes:
    """Lie in a zip header: a local or central entry's sizes, offset, name length or compression method."""
    spots: list[tuple[int, int]] = []
    for magic, fields in ((b"PK\x03\x04", ((8, 2), (18, 4), (22, 4), (26, 2))),
                          (b"PK\x01\x02", ((10, 2), (20, 4), (24, 4), (28, 2), (42, 4))),
                          (b"PK\x05\x06", ((10, 2), (12, 4), (16, 4)))):
        at = data.find(magic)
        while at >= 0:
            spots.extend((at + off, width) for off, width in fields)
            at = data.find(magic, at + 1)
    if not spots:
        return data
    at, width = rng.choice(spots)
    if at + width > len(data):
        return data
    value = rng.choice((0, 1, 8, 12, 14, 0xFFFF, 0xFFFFFFFF, 2**31, rng.randrange(1 << (8 * width))))
    return data[:at] + (value % (1 << (8 * width))).to_bytes(width, "little") + data[at + width:]


def zip_rezip(rng: random.Random, data: bytes) -> bytes:
    """Rewrite the archive with deflate (readers that mmap stored members must notice) or a member mutated."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as src:
            members = [(info, src.read(info)) for info in src.infolist()]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError, RuntimeError):
        return data
    if not members:
        return data
    buf = io.BytesIO()
    victim = rng.randrange(len(members))
    deflate_all = rng.random() < 0.3
    with zipfile.ZipFile(buf, "w") as out:
        for i, (info, payload) in enumerate(members):
            if i == victim and not deflate_all:
                payload = mutate_member(rng, info.filename, payload)
            method = zipfile.ZIP_DEFLATED if deflate_all or (i == victim and rng.random() < 0.2) else info.compress_type
            out.writestr(info.filename, payload, compress_type=method)
    return buf.getvalue()


def mutate_member(rng: random.Random, name: str, payload: bytes) -> bytes:
    """A member of an archive: JSON as a tree, HDF5 with the HDF5 mutator, anything else as bytes."""
    if name.endswith(".json"):
        try:
            return dumps_json(_mutate_tree(rng, json.loads(payload)))
        except (ValueError, RecursionError):
            pass
    if name.endswith(".h5") and rng.random() < 0.6:
        return hdf5_objects(rng, payload)
    return rng.choice(GENERIC)(rng, payload)


def hdf5_objects(rng: random.Random, data: bytes) -> bytes:
    """Rewrite one HDF5 object: an attribute lied about, a dataset reshaped/retyped/emptied, a link to nowhere or a loop."""
    import tempfile

    import h5py
    import numpy as np

    with tempfile.NamedTemporaryFile(suffix=".h5") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            with h5py.File(tmp.name, "r+") as f:
                names: list[str] = []
                f.visit(names.append)
                groups = ["/", *[n for n in names if isinstance(f.get(n), h5py.Group)]]
                datasets = [n for n in names if isinstance(f.get(n), h5py.Dataset)]
                roll = rng.random()
                if datasets and roll < 0.45:
                    name = rng.choice(datasets)
                    shape = f[name].shape
                    # An earlier mutation may have declared a huge dataset: never read one into memory here.
                    old = f[name][()] if f[name].size <= 1 << 16 else np.zeros(1, f[name].dtype)
                    del f[name]
                    choice = rng.randrange(5)
                    if choice == 0:
                        f[name] = np.zeros((*shape, 2), np.float32)
                    elif choice == 1:
                        f[name] = np.asarray(old).astype(rng.choice((np.float64, np.int8, np.float16, np.bool_)))
                    elif choice == 2:
                        f[name] = np.zeros((0,), np.float32)
                    elif choice == 3:
                        f[name] = np.bytes_(b"abc")
                    else:
                        f.create_dataset(name, shape=(2**20, 2**10), dtype=np.float32)  # declared, never written
                elif roll < 0.7:
                    target = f[rng.choice(groups + datasets)]
                    keys = list(target.attrs)
                    if keys and rng.random() < 0.7:
                        key = rng.choice(keys)
                        target.attrs[key] = rng.choice((-1, 2**40, "x", b"\xff\xfe", np.zeros(3), ""))
                    else:
                        target.attrs[rng.choice(("name", "class_name", "keras_version", "epsilon"))] = "x"
                elif roll < 0.85 and groups:
                    group = rng.choice(groups)
                    link = f"{group.rstrip('/')}/{rng.choice(('vars', 'layers', 'x'))}_link"
                    if link not in f:
                        f[link] = h5py.SoftLink(rng.choice((group, "/nowhere", link)))
                elif names:
                    del f[rng.choice(names)]
        except (OSError, KeyError, ValueError, TypeError, RuntimeError):
            return data
        with open(tmp.name, "rb") as handle:
            return handle.read()


# A TF checkpoint index is a LevelDB-style table whose blocks carry a CRC32C, so byte damage mostly
# stops at the checksum; this codec rewrites the table around one lying BundleEntryProto field with
# valid checksums, the way a buggy or hostile writer would. Written from the format's description
# (block entries with restart points, block handles, a 48-byte footer), independent of convbn's reader.


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for byte in data:
        c = _CRC32C[(c ^ byte) & 0xFF] ^ (c >> 8)
    c ^= 0xFFFFFFFF
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _varint_bytes(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as protobuf writes it: ten bytes
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _block(data: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    end = offset + size
    restarts = int.from_bytes(data[end - 4:end], "little")
    limit, at, key, entries = end - 4 - 4 * restarts, offset, b"", []
    while at < limit:
        shared, at = _read_varint(data, at)
        own, at = _read_varint(data, at)
        length, at = _read_varint(data, at)
        key = key[:shared] + data[at:at + own]
        entries.append((key, data[at + own:at + own + length]))
        at += own + length
    return entries


def table_entries(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of a TF table (raises on anything unexpected)."""
    footer, handles, at = len(data) - 48, [], len(data) - 48
    for _ in range(4):
        value, at = _read_varint(data, at)
        handles.append(value)
    out = []
    for _, handle in _block(data, handles[2], handles[3]):
        offset, at = _read_varint(handle, 0)
        size, _ = _read_varint(handle, at)
        out += _block(data, offset, size)
    assert footer > 0
    return out


def _encode_block(entries: list[tuple[bytes, bytes]]) -> bytes:
    body, restarts = bytearray(), []
    for key, value in entries:  # every entry a restart point: no shared prefixes to get wrong
        restarts.append(len(body))
        body += _varint_bytes(0) + _varint_bytes(len(key)) + _varint_bytes(len(value)) + key + value
    restarts = restarts or [0]
    return bytes(body) + b"".join(r.to_bytes(4, "little") for r in restarts) + len(restarts).to_bytes(4, "little")


def encode_table(entries: list[tuple[bytes, bytes]], magic: bytes) -> bytes:
    """A TF table of ``entries`` in one data block, with valid checksums and footer."""
    out = bytearray()

    def put(block: bytes) -> bytes:
        handle = _varint_bytes(len(out)) + _varint_bytes(len(block))
        out.extend(block + b"\0" + _masked_crc32c(block + b"\0").to_bytes(4, "little"))
        return handle

    data = put(_encode_block(entries))
    meta = put(_encode_block([]))
    index = put(_encode_block([(entries[-1][0] if entries else b"", data)]))
    footer = (meta + index).ljust(40, b"\0")
    return bytes(out) + footer + magic


def _proto_fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field, wire type, value) of a protobuf message; value bytes for length-delimited fields."""
    fields: list[tuple[int, int, Any]] = []
    at = 0
    while at < len(data):
        tag, at = _read_varint(data, at)
        num, wire = tag >> 3, tag & 7
        value: Any
        if wire == 0:
            value, at = _read_varint(data, at)
        elif wire == 2:
            n, at = _read_varint(data, at)
            value, at = data[at:at + n], at + n
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, at = int.from_bytes(data[at:at + width], "little"), at + width
        else:
            raise ValueError(f"wire type {wire}")
        fields.append((num, wire, value))
    return fields


def _proto_bytes(fields: list[tuple[int, int, Any]]) -> bytes:
    out = bytearray()
    for num, wire, value in fields:
        out += _varint_bytes(num << 3 | wire)
        if wire == 0:
            out += _varint_bytes(value)
        elif wire == 2:
            out += _varint_bytes(len(value)) + value
        else:
            out += (value % (1 << (64 if wire == 1 else 32))).to_bytes(8 if wire == 1 else 4, "little")
    return bytes(out)


def _shape(dims: list[int], unknown: bool = False) -> bytes:
    fields = [(2, 2, _proto_bytes([(1, 0, d)])) for d in dims]
    return _proto_bytes(fields + ([(3, 0, 1)] if unknown else []))


def _lie_in_entry(rng: random.Random, value: bytes, header: bool) -> bytes:
    """One BundleEntryProto (or, under the empty key, BundleHeaderProto) field replaced by a lie."""
    fields = _proto_fields(value)
    lie: Any
    if header:  # num_shards 1, endianness 2, version 3
        num = rng.choice((1, 2, 3))
        lie = rng.choice((0, 2, -1, 2**31, 100000)) if num != 3 else b"\x08\xff\xff\xff\xff\x0f"
        fields = [f for f in fields if f[0] != num] + [(num, 2 if num == 3 else 0, lie)]
        return _proto_bytes(fields)
    # dtype 1, shape 2, shard_id 3, offset 4, size 5, crc32c 6 (fixed32), slices 7
    num = rng.choice((1, 2, 2, 2, 3, 4, 5, 5, 6, 7))
    if num == 2:
        dims = [d for f in _proto_fields(next((v for n, _, v in fields if n == 2), b""))
                if f[0] == 2 for d in [_proto_fields(f[2])[0][2] if f[2] else 0]]
        kind = rng.randrange(6)
        if kind == 0 and dims:
            dims[rng.randrange(len(dims))] = -1
        elif kind == 1:
            dims = [1] * rng.choice((33, 65, 255, 300))
        elif kind == 2 and dims:
            dims[rng.randrange(len(dims))] = rng.choice((0, 2**31, 2**40, 2**62))
        elif kind == 3:
            dims = [*dims, rng.choice((2, 3))]
        elif kind == 4:
            dims = dims[:-1]
        lie = _shape(dims, unknown=kind == 5)
    elif num == 7:
        lie = _proto_bytes([(1, 2, _proto_bytes([(1, 0, rng.choice((-1, 0, 5))), (2, 0, rng.choice((1, 2**40)))]))])
    elif num == 1:
        lie = rng.choice((0, 7, 20, 21, 23, 101, 999, -1))
    elif num == 6:
        lie = rng.randrange(1 << 32)
    else:
        lie = rng.choice((-1, 1, 2, 3, 2**31, 2**62, 100000)) + (rng.randrange(-4, 5) if num == 5 else 0)
    wire = 2 if num in (2, 7) else 5 if num == 6 else 0
    keep = [f for f in fields if f[0] != num or (num == 7 and rng.random() < 0.5)]
    return _proto_bytes([*keep, (num, wire, lie)])


def tf_index(rng: random.Random, data: bytes) -> bytes:
    """Rewrite a TF checkpoint index with valid checksums around one lie: an entry's field, a key, or the entry list."""
    try:
        entries = table_entries(data)
    except (ValueError, IndexError, AssertionError):
        return data
    if not entries:
        return data
    i = rng.randrange(len(entries))
    key, value = entries[i]
    roll = rng.random()
    if roll < 0.75:
        try:
            entries[i] = (key, _lie_in_entry(rng, value, header=key == b""))
        except (ValueError, IndexError):
            return data
    elif roll < 0.8:
        entries[i] = (key, rng.choice(GENERIC)(rng, value))  # a value that may not parse at all
    elif roll < 0.85:
        entries[i] = (rng.choice((b"\xff\xfe", key + b"/x", b"", key[:-1])), value)
    elif roll < 0.9:
        entries.insert(i, (key, value))  # the same key twice
    elif roll < 0.95:
        del entries[i]
    else:
        rng.shuffle(entries)
    return encode_table(entries, data[-8:])


#: Shard names a weight_map may lie with: outside the directory, absent, not a string.
_BAD_SHARDS: tuple[object, ...] = ("../x.safetensors", "/etc/passwd", "", "nope.bin", "d/../../x", "./", 3, None, [])


def shard_index(rng: random.Random, data: bytes) -> bytes:
    """Lie in a ``*.index.json``: one tensor moved to another shard, dropped, duplicated, renamed or
    sent to a bad shard name (:data:`_BAD_SHARDS`), or one JSON field elsewhere."""
    document = json.loads(data)
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or rng.random() < 0.3:
        return dumps_json(_mutate_tree(rng, document))
    tensor = rng.choice(list(weight_map))
    roll = rng.randrange(5)
    if roll == 0:
        weight_map[tensor] = rng.choice(sorted({str(v) for v in weight_map.values()}))
    elif roll == 1:
        weight_map[tensor] = rng.choice(_BAD_SHARDS)
    elif roll == 2:
        del weight_map[tensor]
    elif roll == 3:
        weight_map[f"{tensor}.extra"] = weight_map[tensor]
    else:
        weight_map[tensor.upper()] = weight_map.pop(tensor)
    return dumps_json(document)


def json_tree(rng: random.Random, data: bytes) -> bytes:
    """One lie in a JSON document (Orbax's ``_METADATA`` and ``_CHECKPOINT_METADATA``)."""
    return dumps_json(_mutate_tree(rng, json.loads(data)))


#: Format-aware mutators by the first bytes they recognise.
def aware_for(name: str, data: bytes) -> tuple[Mutator, ...]:
    """The format-aware mutators that fit a file, judged from its name and magic bytes."""
    if data.startswith(b"PK\x03\x04"):
        return (zip_fields, zip_rezip)
    if data.startswith(b"\x89HDF"):
        return (hdf5_objects,)
    if name.endswith(".safetensors"):
        return (safetensors_header,)
    if name.endswith(".msgpack"):
        return (msgpack_tree,)
    if name.endswith(".index"):
        return (tf_index,)
    if name.endswith(".index.json"):
        return (shard_index,)
    if name.endswith("_METADATA"):
        return (json_tree,)
    return ()


# Mutations with a known right answer, applied alone: a hostile file must be refused (loading it is
# the defect, however cleanly it goes), an equivalent rewrite must load to the seed's values or be
# refused (anything else is silent garbage).


def zip_deflate(rng: random.Random, data: bytes) -> bytes:
    """The same archive with every member deflated: the same values, or a refusal."""
    with zipfile.ZipFile(io.BytesIO(data)) as src:
        members = [(info, src.read(info)) for info in src.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as out:
        for info, payload in members:
            out.writestr(info.filename, payload)
    return buf.getvalue()


def safetensors_reordered(rng: random.Random, data: bytes) -> bytes:
    """The same tensors with the header's keys in another order and more padding: the same values."""
    (n,) = struct.unpack("<Q", data[:8])
    items = list(json.loads(data[8:8 + n]).items())
    rng.shuffle(items)
    text = json.dumps(dict(items)).encode() + b" " * rng.choice((0, 8, 13))
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


#: A file outside the checkpoint that a reader must never copy into its output.
OUTSIDE = "/etc/passwd"


def hdf5_outside(rng: random.Random, data: bytes) -> bytes:
    """A dataset stored in a file outside (HDF5 external raw storage), or an external link: refused."""
    import tempfile

    import h5py

    with tempfile.NamedTemporaryFile(suffix=".h5") as tmp:
        tmp.write(data)
        tmp.flush()
        with h5py.File(tmp.name, "r+") as f:
            names: list[str] = []
            f.visit(names.append)
            datasets = [n for n in names if isinstance(f.get(n), h5py.Dataset) and f[n].dtype.kind == "f"]
            name = rng.choice(datasets)
            shape, dtype = f[name].shape, f[name].dtype
            del f[name]
            if rng.random() < 0.7:
                f.create_dataset(name, shape=shape, dtype=dtype, external=[(OUTSIDE, 0, h5py.h5f.UNLIMITED)])
            else:
                f[name] = h5py.ExternalLink(OUTSIDE, "/")
        with open(tmp.name, "rb") as handle:
            return handle.read()


def keras_outside(rng: random.Random, data: bytes) -> bytes:
    """A ``.keras`` archive whose weights file has a dataset stored outside: refused."""
    with zipfile.ZipFile(io.BytesIO(data)) as src:
        members = [(info, src.read(info)) for info in src.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for info, payload in members:
            out.writestr(info, hdf5_outside(rng, payload) if info.filename.endswith(".h5") else payload)
    return buf.getvalue()


def shard_outside(rng: random.Random, data: bytes) -> bytes:
    """An index sending one shard's tensors to a file outside its directory: refused, never read."""
    document = json.loads(data)
    weight_map = document["weight_map"]
    shard = rng.choice(sorted(set(weight_map.values())))
    outside = rng.choice((f"../{shard}", OUTSIDE, f"sub/../../{shard}"))
    document["weight_map"] = {t: outside if s == shard else s for t, s in weight_map.items()}
    return dumps_json(document)


def expecting(name: str, data: bytes) -> list[tuple[Mutator, str]]:
    """The mutations with a known answer ("refused" or "same") that fit a file."""
    if name.endswith(".pt"):
        return [(zip_deflate, "same")] if data.startswith(b"PK\x03\x04") else []
    if name.endswith(".keras"):
        return [(zip_deflate, "same"), (keras_outside, "refused")]
    if name.endswith(".h5"):
        return [(hdf5_outside, "refused")]
    if name.endswith(".safetensors"):
        return [(safetensors_reordered, "same")]
    if name.endswith(".index.json"):
        return [(shard_outside, "refused")]
    return []


def mutate(rng: random.Random, name: str, data: bytes) -> tuple[bytes, str, str]:
    """One to three stacked mutations of ``data`` (half of them format-aware where one fits), their
    names, and what a right reader does with the result: "" (refuse it cleanly or read it),
    "refused" (it is hostile) or "same" (it holds the seed's values)."""
    known = expecting(name, data)
    if known and rng.random() < 0.1:
        mutator, expect = rng.choice(known)
        return mutator(rng, data), mutator.__name__, expect
    applied = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        aware = aware_for(name, data)
        mutator = rng.choice(aware) if aware and rng.random() < 0.5 else rng.choice(GENERIC)
        try:
            data = mutator(rng, data)
        except Exception:  # a format-aware mutator on bytes an earlier mutation broke: damage them instead
            mutator = rng.choice(GENERIC)
            data = mutator(rng, data)
        applied.append(mutator.__name__)
    return data, "+".join(applied), ""
