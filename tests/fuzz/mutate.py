"""Seeded mutations of checkpoint bytes: generic byte damage plus a few format-aware lies.

Every mutator is ``(rng, data) -> bytes`` and deterministic given ``rng``. The generic ones (flips,
truncation, insertion, deletion, "interesting" integers) find what a reader assumes about sizes and
offsets; the format-aware ones keep the container valid and lie in one field (a safetensors header's
length, shape, dtype or offsets; a zip entry's sizes or compression; a msgpack number; an HDF5
attribute or dataset), which byte damage rarely reaches past the first check.
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
    """``value`` wrapped in ``depth`` one-element lists: serialised by hand (the encoders recurse)."""

    depth: int
    value: Any


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
        text = text.replace(f'"__deep_{i}__"', "[" * node.depth + dumps_json(node.value).decode() + "]" * node.depth)
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
            parent[key] = Deep(rng.choice((100, 600, 5000)), value)
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
        tree = _mutate_tree(rng, unwrap(msgpack.unpackb(data, raw=False, strict_map_key=False)))
        deep = _find_deep(tree)
        packed = bytes(msgpack.packb(wrap(tree), use_bin_type=True))
        if deep is not None:
            inner = bytes(msgpack.packb(wrap(deep.value), use_bin_type=True))
            packed = packed.replace(bytes(msgpack.packb(msgpack.ExtType(0, b""))), b"\x91" * deep.depth + inner, 1)
        return packed
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError):
        return data


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
                    old = f[name][()]
                    del f[name]
                    shape = np.shape(old)
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
    return ()


def mutate(rng: random.Random, name: str, data: bytes) -> tuple[bytes, str]:
    """One to three stacked mutations of ``data`` (half of them format-aware where one fits); and their names."""
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
    return data, "+".join(applied)
