"""TF tensor bundles (``<prefix>.index`` + ``<prefix>.data-K-of-N``) read and written without TensorFlow.

A TF checkpoint is a *tensor bundle*. Its ``.index`` file is a LevelDB-style table: data blocks of
prefix-compressed ``(key, value)`` entries with restart points, a metaindex block (empty, as TF
leaves it), an index block of block handles, and a 48-byte footer ending in :data:`INDEX_MAGIC`;
each block is followed by a compression byte (TF writes none) and the masked CRC32C of the block
and that byte. The first entry, under the empty key, is a ``BundleHeaderProto`` (shard count,
endianness, version); each other entry a ``BundleEntryProto`` keyed by the tensor's name: dtype,
shape, shard, offset, size and the masked CRC32C of the tensor's bytes in its data shard
``<prefix>.data-<shard:05d>-of-<num_shards:05d>``. Tensors are stored in little-endian C order,
bool as one byte, strings as every element's varint length, the masked CRC32C of those lengths
(4 bytes), then the bytes of every element. A partitioned variable (``get_variable(partitioner=)``)
is an entry with ``slices`` and no data; each slice is an entry of its own, keyed by TF's
``EncodeTensorNameSlice`` (an ordered-code encoding of the name and the slice's starts and lengths).

What is used, and why:

- **google-crc32c** computes CRC32C (C code, with its own pure-Python fallback, wheels for every
  platform): the checksum of every block and tensor, checked on read and written on write. Masking
  (``((crc >> 15 | crc << 17) + 0xa282ead8)``) is TF's and done here.
- **Protocol buffers** (the header and entry records) are decoded and encoded by
  :mod:`convbn.formats._tfproto`, convbn's small wire-format codec for the few TF messages it
  reads: the protobuf runtime alone cannot, since TF's message definitions ship only inside TF.
- **Written here by hand**, since no maintained library reads or writes them without TF: the table
  (block parsing and building, handles, footer), the data shard layout (including strings and
  slice keys), and the checks below. numpy gives the arrays; ``ml_dtypes`` (installed with
  TensorFlow and JAX) gives bfloat16 and float8 arrays when it is present, and without it those
  tensors are refused by name with the package to install.

Reading (:class:`Bundle`) parses and checks the whole index first and refuses, with one line
naming the file and the tensor, what would read outside the data or take more memory than the
files hold: a broken table or block checksum, a missing or extra header, negative dimensions, a
rank above :data:`MAX_RANK`, a shape larger than any array, a size the shape and dtype do not
give, a shard out of range, missing, not a regular file or (through a symlink) outside the
checkpoint's directory, bytes past the end of their shard or shared with another tensor, and
slices that do not hold their variable's values (overlapping slices are refused when the variable
is read). A tensor of a dtype convbn does not read (a variant, a resource, int4) does not make the
rest unreadable: it is listed in :attr:`Bundle.unreadable` and refused by name when read. Tensors
are then read one at a time, streamed from their shard in chunks with the checksum checked: never
a whole shard when one tensor is wanted. Writing (:func:`write`) produces what TF's ``BundleWriter``
does (a table TF reads, data shards in the order given), through
:func:`convbn.formats._io.atomic_output`, split into several shards by ``max_shard_size``.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import stat
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from convbn._dtypes import ml_dtype
from convbn.errors import ConvBNError
from convbn.formats import _tfproto
from convbn.formats._io import atomic_output

__all__ = ["INDEX_MAGIC", "MAX_RANK", "Bundle", "Entry", "index_path", "masked_crc", "shard_path",
           "table_entries", "write"]

#: The last 8 bytes of every bundle index (LevelDB's table magic number, little-endian).
INDEX_MAGIC = bytes.fromhex("57fb808b247547db")
FOOTER_BYTES = 48
#: The most dimensions a tensor may have here (no model variable has more; NumPy's own limit is
#: 64, TensorFlow's 254).
MAX_RANK = 32
_BLOCK_TRAILER = 5  # compression type byte + masked CRC32C
_BLOCK_BYTES = 256 * 1024  # TF's table block size: a new data block starts past it
_RESTART_INTERVAL = 16  # TF's: every 16th key is stored whole
_CHUNK = 1 << 20  # bytes read (and checksummed) at a time
_MASK_DELTA = 0xA282EAD8

#: TF DataType enum -> NumPy dtype of the dtypes a checkpoint tensor may have (a name that NumPy
#: needs ml_dtypes for; None for DT_STRING). Quantized types read as their integer storage.
#: Resources, variants and reference types are refused.
_DTYPES: dict[int, str | None] = {
    1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 7: None, 8: "<c8", 9: "<i8", 10: "?",
    11: "i1", 12: "u1", 13: "<i4", 14: "bfloat16", 15: "<i2", 16: "<u2", 17: "<u2", 18: "<c16",
    19: "<f2", 22: "<u4", 23: "<u8", 24: "float8_e5m2", 25: "float8_e4m3fn",
}
_ML_DTYPES = frozenset({"bfloat16", "float8_e5m2", "float8_e4m3fn"})
_ITEMSIZE = {k: (None if v is None else 1 if v in ("float8_e5m2", "float8_e4m3fn") else 2 if v == "bfloat16"
                 else np.dtype(v).itemsize) for k, v in _DTYPES.items()}
#: NumPy dtype name -> the DataType written (quantized types are not written).
_WRITE_DTYPES = {
    "float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int16": 5, "int8": 6, "complex64": 8, "int64": 9,
    "bool": 10, "bfloat16": 14, "uint16": 17, "complex128": 18, "float16": 19, "uint32": 22, "uint64": 23,
    "float8_e5m2": 24, "float8_e4m3fn": 25,
}
_STRING = 7


def masked_crc(data: bytes, crc: int = 0) -> int:
    """TF's masked CRC32C of ``data`` (extending the unmasked ``crc``), as blocks and entries store it."""
    value = google_crc32c.extend(crc, data) if crc else google_crc32c.value(data)
    return _mask(value)


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def index_path(prefix: Path) -> Path:
    """``<prefix>.index``."""
    return prefix.with_name(prefix.name + ".index")


def shard_path(prefix: Path, shard: int, num_shards: int) -> Path:
    """``<prefix>.data-<shard>-of-<num_shards>``, five digits each, as TF names data shards."""
    return prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}")


# -- the table ---------------------------------------------------------------------------------


_varint = _tfproto.varint
_encode_varint = _tfproto.encode_varint


def _table_block(data: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of the uncompressed table block at ``offset``, its checksum checked."""
    end = offset + size
    if end + _BLOCK_TRAILER > len(data) or size < 4:
        raise ValueError(f"a block at byte {offset} of {size} bytes runs past the file ({len(data)} bytes)")
    if data[end] != 0:
        raise ValueError(f"the block at byte {offset} is compressed (type {data[end]}); TF writes them uncompressed")
    if masked_crc(data[offset : end + 1]) != int.from_bytes(data[end + 1 : end + _BLOCK_TRAILER], "little"):
        raise ValueError(f"the block at byte {offset} does not match its checksum")
    restarts = int.from_bytes(data[end - 4 : end], "little")
    limit = end - 4 - 4 * restarts
    if restarts < 1 or limit < offset:
        raise ValueError(f"the block at byte {offset} declares {restarts} restart points")
    entries: list[tuple[bytes, bytes]] = []
    key, at = b"", offset
    while at < limit:
        shared, at = _varint(data, at, limit)
        own, at = _varint(data, at, limit)
        length, at = _varint(data, at, limit)
        if shared > len(key) or at + own + length > limit:
            raise ValueError(f"an entry at byte {at} of the block at byte {offset} runs past it")
        key = key[:shared] + data[at : at + own]
        entries.append((key, data[at + own : at + own + length]))
        at += own + length
    return entries


def table_entries(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a TF table, in file order, through its footer and index block.

    Raises:
        ValueError: naming what is wrong with the table (callers add the file).
    """
    if len(data) < FOOTER_BYTES or data[-len(INDEX_MAGIC) :] != INDEX_MAGIC:
        raise ValueError("it does not end in a TF table footer")
    footer = len(data) - FOOTER_BYTES
    handles = []
    at = footer
    for _ in range(4):  # metaindex offset, size (unused, as TensorFlow leaves it); index offset, size
        value, at = _varint(data, at, footer + 40)
        handles.append(value)
    entries: list[tuple[bytes, bytes]] = []
    previous_end = 0
    for _, handle in _table_block(data, handles[2], handles[3]):
        offset, at = _varint(handle, 0, len(handle))
        size, _ = _varint(handle, at, len(handle))
        if offset < previous_end:  # blocks lie in order, one after another: none is read twice
            raise ValueError(f"the index points twice into the bytes before {previous_end}")
        entries += _table_block(data, offset, size)
        previous_end = offset + size + _BLOCK_TRAILER
    for (a, _), (b, _) in itertools.pairwise(entries):
        if a >= b:  # TF looks keys up by binary search: unsorted keys would hide tensors
            raise ValueError(f"its keys are not in order ({b[:64]!r} after {a[:64]!r})")
    return entries


def _build_block(entries: Sequence[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    """A table block with its trailer: prefix-compressed entries, restart points, type 0, checksum."""
    out = bytearray()
    restarts: list[int] = []
    previous = b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            limit = min(len(previous), len(key))
            while shared < limit and previous[shared] == key[shared]:
                shared += 1
        out += _encode_varint(shared) + _encode_varint(len(key) - shared) + _encode_varint(len(value))
        out += key[shared:] + value
        previous = key
    for restart in restarts or [0]:
        out += struct.pack("<I", restart)
    out += struct.pack("<I", len(restarts or [0])) + b"\0"
    return bytes(out) + struct.pack("<I", masked_crc(bytes(out)))


def _build_table(entries: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A TF table of ``entries`` (sorted by key): data blocks, an empty metaindex, index, footer."""
    out = bytearray()
    index: list[tuple[bytes, bytes]] = []
    start = 0
    while start < len(entries):
        stop, size = start, 0
        while stop < len(entries) and (stop == start or size < _BLOCK_BYTES):
            size += len(entries[stop][0]) + len(entries[stop][1]) + 8
            stop += 1
        block = _build_block(entries[start:stop], _RESTART_INTERVAL)
        # The block's last key separates it from the next block's keys (TF shortens it; any key
        # >= this block's and < the next block's is valid).
        index.append((entries[stop - 1][0], _encode_varint(len(out)) + _encode_varint(len(block) - _BLOCK_TRAILER)))
        out += block
        start = stop
    handles = b""
    for block in (_build_block([], 1), _build_block(index, 1)):  # the metaindex, then the index
        handles += _encode_varint(len(out)) + _encode_varint(len(block) - _BLOCK_TRAILER)
        out += block
    return bytes(out) + handles.ljust(FOOTER_BYTES - len(INDEX_MAGIC), b"\0") + INDEX_MAGIC


# -- slice keys --------------------------------------------------------------------------------


def _signed_num(value: int) -> bytes:
    """TF's OrderedCode ``WriteSignedNumIncreasing``: a length in leading one-bits, then the value."""
    magnitude = ~value if value < 0 else value
    length = magnitude.bit_length() // 7 + 1
    raw = bytearray((value & ((1 << (8 * length)) - 1)).to_bytes(length, "big"))
    header = (0xFFFF << (16 - length)) & 0xFFFF if length <= 10 else 0
    raw[0] ^= header >> 8
    if length > 1:
        raw[1] ^= header & 0xFF
    return bytes(raw)


def _unsigned_num(value: int) -> bytes:
    """OrderedCode ``WriteNumIncreasing``: the byte count, then the big-endian bytes."""
    body = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return bytes([len(body)]) + body


def slice_key(name: bytes, extents: Sequence[tuple[int, int]]) -> bytes:
    """The key of one slice ``[(start, length)]`` of a partitioned variable (TF's
    ``EncodeTensorNameSlice``; a length of -1 takes the whole dimension)."""
    escaped = b"".join(b"\x00\xff" if c == 0 else b"\xff\x00" if c == 0xFF else bytes([c]) for c in name)
    key = _unsigned_num(0) + escaped + b"\x00\x01" + _unsigned_num(len(extents))
    for start, length in extents:
        key += _signed_num(start) + _signed_num(length)
    return key


# -- reading -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of a bundle, as its index entry describes it."""

    dtype: int  # TF DataType enum
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int  # masked
    #: A partitioned variable's slices: per slice, (start, length) per dimension; empty otherwise.
    slices: tuple[tuple[tuple[int, int], ...], ...] = ()


class Bundle:
    """An open tensor bundle: its index parsed and checked, tensors read one at a time.

    Raises ConvBNError (one line naming the file and the tensor) for what the module docstring
    lists, at construction for the index and in :meth:`read` for the data.
    """

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.index = index_path(prefix)
        try:
            raw = self.index.read_bytes()
            entries = table_entries(raw)
        except OSError as exc:
            raise self._refuse(f"it cannot be read ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise self._refuse(str(exc)) from None
        if not entries or entries[0][0] != b"":
            raise self._refuse("it has no header entry (the empty key) first")
        try:
            header = _tfproto.parse_bundle_header(entries[0][1])
        except ValueError as exc:
            raise self._refuse(f"its header does not parse ({exc})") from None
        if not 1 <= header.num_shards <= 99999 or header.endianness != 0:
            raise self._refuse(f"its header declares {header.num_shards} shards, endianness {header.endianness}")
        self.num_shards = int(header.num_shards)
        self._shard_sizes: dict[int, int] = {}
        #: Every tensor by name; a partitioned variable's slices are in :attr:`_slices` by key.
        self.entries: dict[str, Entry] = {}
        self._slices: dict[bytes, Entry] = {}
        #: Tensors of a dtype convbn cannot read (variants, resources, int4...) by name, with why:
        #: refused only when read, so that one of them does not make the rest unreadable.
        self.unreadable: dict[str, str] = {}
        for key, value in entries[1:]:
            entry = self._entry(key, value)
            if key.startswith(b"\x00"):
                self._slices[key] = entry  # of an unknown dtype, it cannot match its variable's
            elif entry.dtype not in _DTYPES:
                self.unreadable[key.decode("utf-8", "surrogateescape")] = str(
                    self._refuse(f"dtype {entry.dtype} is not a tensor dtype convbn reads", key)
                )
            else:
                self.entries[key.decode("utf-8", "surrogateescape")] = entry
        self._check_ranges()
        for name, entry in self.entries.items():
            if entry.slices:
                self._check_slices(name, entry)

    def _check_ranges(self) -> None:
        """No two tensors share bytes of a shard (TF writes each once): many entries over the same
        bytes would read, and hold, far more than the files."""
        named = [*self.entries.items(), *((key.decode("utf-8", "replace"), e) for key, e in self._slices.items())]
        spans = sorted((e.shard, e.offset, e.offset + e.size, name) for name, e in named if e.size)
        for (shard, _, end, first), (other, start, _, second) in itertools.pairwise(spans):
            if shard == other and start < end:
                raise self._refuse(f"its bytes in shard {shard} overlap those of tensor {first!r}", second)

    def _refuse(self, problem: str, key: bytes | str | None = None) -> ConvBNError:
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        where = "" if key is None else f", tensor={key!r}"
        return ConvBNError(f"a TF checkpoint index must be readable: {problem}. Received: file={self.index}{where}")

    def _entry(self, key: bytes, value: bytes) -> Entry:
        """The checked entry under ``key``: sane shape, data within its shard; for a dtype convbn
        does not read, only that dtype (nothing of it is ever read)."""
        if not key:
            raise self._refuse("a second header entry", key)
        try:
            proto = _tfproto.parse_bundle_entry(value)
        except ValueError as exc:
            raise self._refuse(f"an entry does not parse ({exc})", key) from None
        if proto.dtype not in _DTYPES:
            return Entry(int(proto.dtype), (), 0, 0, 0, 0)
        dims = [int(d.size) for d in proto.shape.dim]
        if proto.shape.unknown_rank or len(dims) > MAX_RANK or any(d < 0 for d in dims):
            rank = "unknown" if proto.shape.unknown_rank else len(dims)
            raise self._refuse(
                f"a tensor needs a rank of at most {MAX_RANK} and dimensions >= 0, not rank {rank} {dims[:8]}", key
            )
        # An empty tensor's other dimensions are never multiplied out by the checks below, but NumPy
        # refuses an array whose non-zero dimensions take more than 2**63 bytes.
        extent = 1
        for d in dims:
            extent *= d or 1
        if extent > 2**63 // (_ITEMSIZE[proto.dtype] or np.dtype(object).itemsize):
            raise self._refuse(f"shape {dims[:8]} is larger than any array can be", key)
        if proto.slices:
            slices = []
            for piece in proto.slices:
                extents = [(int(e.start), int(e.length) if e.HasField("length") else -1) for e in piece.extent]
                if len(extents) not in (0, len(dims)) or any(
                    start < 0 or (n != -1 and (n < 0 or start + n > d)) for (start, n), d in zip(extents, dims, strict=False)
                ):
                    raise self._refuse(f"a slice {extents[:8]} does not lie within shape {dims[:8]}", key)
                slices.append(tuple(extents))
            return Entry(int(proto.dtype), tuple(dims), 0, 0, 0, 0, tuple(slices))
        count = 1
        for d in dims:
            count *= d
        itemsize = _ITEMSIZE[proto.dtype]
        size, offset, shard = int(proto.size), int(proto.offset), int(proto.shard_id)
        # A string tensor takes at least a byte per length and the 4-byte checksum of the lengths.
        if (count * itemsize != size) if itemsize is not None else size < count + 4:
            raise self._refuse(f"shape {dims[:8]} of dtype {proto.dtype} does not take the {size} bytes declared", key)
        if not 0 <= shard < self.num_shards:
            raise self._refuse(f"shard {shard} of {self.num_shards}", key)
        shard_size = self._shard_size(shard, key)
        if offset < 0 or offset + size > shard_size:
            raise ConvBNError(
                f"a TF checkpoint's data must hold every tensor its index lists (truncated data?): bytes "
                f"{offset}..{offset + size} lie past its end ({shard_size} bytes). "
                f"Received: file={self.shard(shard)}, tensor={key.decode('utf-8', 'replace')!r}"
            )
        return Entry(int(proto.dtype), tuple(dims), shard, offset, size, int(proto.crc32c))

    def shard(self, shard: int) -> Path:
        """The data file of shard number ``shard``."""
        return shard_path(self.prefix, shard, self.num_shards)

    def _shard_size(self, shard: int, key: bytes) -> int:
        """The size of data shard ``shard``, which must be a regular file in the checkpoint's directory."""
        if shard in self._shard_sizes:
            return self._shard_sizes[shard]
        path = self.shard(shard)
        try:
            info = path.stat()
        except OSError:
            if not glob.glob(glob.escape(str(self.prefix)) + ".data-*"):
                raise ConvBNError(
                    f"a TF checkpoint needs its data file {self.prefix}.data-00000-of-NNNNN next to the index. "
                    f"Received: file={self.index} with no data file"
                ) from None
            raise self._refuse(f"its data file {path.name} is missing", key) from None
        if not stat.S_ISREG(info.st_mode):
            raise self._refuse(f"its data file {path.name} is not a regular file", key)
        if path.is_symlink():
            # A link may stay within the checkpoint (an HF-hub style blob store next to the index),
            # never lead out of it.
            target = path.resolve()
            homes = {self.prefix.parent.resolve(), self.index.resolve().parent}
            if not any(target.is_relative_to(home) for home in homes):
                raise self._refuse(f"its data file {path.name} links to {target}, outside the checkpoint's directory",
                                   key)
        self._shard_sizes[shard] = info.st_size
        return info.st_size

    def _check_slices(self, name: str, entry: Entry) -> None:
        """Every slice of partitioned ``name`` is stored, with its dtype and shape, and they tile it."""
        total = 0
        for extents in entry.slices:
            piece = self._slices.get(slice_key(name.encode("utf-8", "surrogateescape"), extents))
            shape = _slice_shape(entry.shape, extents)
            if piece is None or piece.dtype != entry.dtype or piece.shape != shape or piece.slices:
                raise self._refuse(f"slice {list(extents)[:8]} of a partitioned variable is not stored", name)
            count = 1
            for d in shape:
                count *= d
            total += count
        full = 1
        for d in entry.shape:
            full *= d
        if total != full:  # more would overlap; fewer would leave values unread
            raise self._refuse(f"its slices hold {total} values, not the {full} of shape {list(entry.shape)[:8]}", name)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape by name (a partitioned variable once, by its full shape)."""
        return {name: entry.shape for name, entry in self.entries.items()}

    @property
    def data_files(self) -> list[Path]:
        """The data shards the index names."""
        return [self.shard(k) for k in range(self.num_shards)]

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a NumPy array (strings: an object array of bytes), checksum checked.

        Raises:
            ConvBNError: for a tensor in :attr:`unreadable`, or data that do not match the index.
        """
        if name in self.unreadable:
            raise ConvBNError(self.unreadable[name])
        entry = self.entries[name]
        if not entry.slices:
            return self._read(name, entry)
        value = np.zeros(entry.shape, _numpy_dtype(entry.dtype, name, self.index) or object)
        # The slices hold as many values as the variable (checked when opened): none may overlap,
        # or some values would be left at zero.
        covered = np.zeros(entry.shape, np.bool_)
        for extents in entry.slices:
            piece = self._slices[slice_key(name.encode("utf-8", "surrogateescape"), extents)]
            where = tuple(slice(s, None if n == -1 else s + n) for s, n in extents)
            if covered[where].any():
                raise self._refuse(f"its slice {list(extents)[:8]} overlaps another of its slices", name)
            covered[where] = True
            value[where] = self._read(name, piece)
        return value

    def _read(self, name: str, entry: Entry) -> np.ndarray:
        dtype = _numpy_dtype(entry.dtype, name, self.index)
        path = self.shard(entry.shard)
        buffer = np.empty(entry.size, np.uint8)
        crc = read = 0
        try:
            with open(path, "rb") as f:
                f.seek(entry.offset)
                while read < entry.size:
                    chunk = f.read(min(_CHUNK, entry.size - read))
                    if not chunk:
                        break
                    if dtype is not None:
                        crc = google_crc32c.extend(crc, chunk)
                    buffer[read : read + len(chunk)] = np.frombuffer(chunk, np.uint8)
                    read += len(chunk)
        except OSError as exc:
            raise self._corrupt(path, name, f"it cannot be read ({exc.strerror or exc})") from None
        if read != entry.size:
            raise self._corrupt(path, name, f"{read} of its {entry.size} bytes are there")
        if dtype is None:
            return self._strings(path, name, entry, buffer.tobytes())
        if _mask(crc) != entry.crc32c:
            raise self._corrupt(path, name, "its bytes do not match the checksum in the index")
        value = buffer.view(dtype).reshape(entry.shape)
        return value != 0 if dtype == np.bool_ else value  # a bool is one byte, 0 or 1 (TF reads any non-0 as 1)

    def _strings(self, path: Path, name: str, entry: Entry, data: bytes) -> np.ndarray:
        """A DT_STRING tensor: varint lengths, the masked checksum of the lengths, then the bytes.

        TF checksums each length as a little-endian uint32 (uint64 past 2**32 - 1), not its varint;
        the entry's checksum covers those, the length checksum and the bytes.
        """
        count = 1
        for d in entry.shape:
            count *= d
        lengths, at = [], 0
        try:
            for _ in range(count):
                length, at = _varint(data, at, len(data))
                lengths.append(length)
        except ValueError:
            raise self._corrupt(path, name, "its string lengths run past its bytes") from None
        crc = google_crc32c.value(_length_bytes(lengths))
        if at + 4 > len(data) or _mask(crc) != int.from_bytes(data[at : at + 4], "little"):
            raise self._corrupt(path, name, "its string lengths do not match their checksum")
        crc = google_crc32c.extend(crc, data[at : at + 4])
        at += 4
        if at + sum(lengths) != len(data):
            raise self._corrupt(path, name, f"its strings take {at + sum(lengths)} bytes, not the {len(data)} declared")
        value = np.empty(count, object)
        for i, length in enumerate(lengths):
            value[i] = data[at : at + length]
            crc = google_crc32c.extend(crc, value[i])
            at += length
        if _mask(crc) != entry.crc32c:
            raise self._corrupt(path, name, "its bytes do not match the checksum in the index")
        return value.reshape(entry.shape)

    @staticmethod
    def _corrupt(path: Path, name: str, problem: str) -> ConvBNError:
        return ConvBNError(
            f"a TF checkpoint's data must hold every tensor its index lists (truncated or corrupt data?): "
            f"{problem}. Received: file={path}, tensor={name!r}"
        )


def _length_bytes(lengths: Sequence[int]) -> bytes:
    """String lengths as TF checksums them: uint32 each, uint64 where one does not fit."""
    return b"".join(struct.pack("<I" if n <= 0xFFFFFFFF else "<Q", n) for n in lengths)


def _slice_shape(shape: tuple[int, ...], extents: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    if not extents:
        return shape
    return tuple(d - s if n == -1 else n for (s, n), d in zip(extents, shape, strict=True))


def _numpy_dtype(dtype: int, name: str, index: Path) -> np.dtype[Any] | None:
    """The NumPy dtype of DataType ``dtype`` (None for strings); bfloat16 and float8 need ml_dtypes."""
    spec = _DTYPES[dtype]
    if spec is None:
        return None
    if spec in _ML_DTYPES:
        return ml_dtype(spec, f"{index}: tensor {name!r}")
    return np.dtype(spec)


# -- writing -----------------------------------------------------------------------------------


#: A tensor to write: its key, DataType, shape, (bytes written, bytes checksummed) chunks and size.
_Encoded = tuple[bytes, int, tuple[int, ...], Iterable[tuple[bytes, bytes]], int]


def _encode(name: str, value: np.ndarray) -> tuple[int, Iterable[tuple[bytes, bytes]], int]:
    """(DataType, its (bytes written, bytes checksummed) in chunks, the size) of one tensor as TF
    stores it: the two differ only for a string tensor's lengths (see :meth:`Bundle._strings`)."""
    if value.dtype.kind in "OSU":
        try:
            items = [item.encode("utf-8") if isinstance(item, str) else item for item in value.reshape(-1).tolist()]
        except UnicodeEncodeError as exc:
            raise ConvBNError(
                f"writing the TF checkpoint failed: a string tensor's str must encode as UTF-8 ({exc.reason} at "
                f"{exc.start}). Received: tensor={name!r}"
            ) from None
        if not all(isinstance(item, bytes) for item in items):
            raise ConvBNError(
                f"writing the TF checkpoint failed: a string tensor must hold bytes or str. Received: tensor={name!r} with "
                f"{type(next(i for i in items if not isinstance(i, bytes))).__name__}"
            )
        counted = _length_bytes([len(item) for item in items])
        check = struct.pack("<I", masked_crc(counted))
        parts = [(b"".join(_encode_varint(len(item)) for item in items), counted), (check, check)]
        parts += [(item, item) for item in items]
        return _STRING, parts, sum(len(written) for written, _ in parts)
    dtype = _WRITE_DTYPES.get(value.dtype.name)
    if dtype is None:
        raise ConvBNError(
            f"writing the TF checkpoint failed: a TF checkpoint stores floats, ints, bool, complex and strings. "
            f"Received: tensor={name!r} "
            f"of dtype {value.dtype}"
        )
    return dtype, _chunks(value), int(value.nbytes)


def _chunks(value: np.ndarray) -> Iterable[tuple[bytes, bytes]]:
    """``value``'s bytes, little-endian in C order, in chunks; copied only when the chunks are
    consumed, so that a writer holds one tensor's copy at a time, not every tensor's."""
    flat = np.ascontiguousarray(value.astype(value.dtype.newbyteorder("<"), copy=False)).reshape(-1).view(np.uint8)
    for at in range(0, flat.size, _CHUNK):
        chunk = flat[at : at + _CHUNK].tobytes()
        yield chunk, chunk


def write(
    prefix: str | os.PathLike[str],
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_size: int | None = None,
) -> list[Path]:
    """Write ``tensors`` (name, array) as a tensor bundle at ``prefix``; the files written.

    The data go in the order given, into shards of at most ``max_shard_size`` bytes where a tensor
    fits (one larger tensor gets a shard of its own; None: a single shard), named
    ``<prefix>.data-0000K-of-0000N``; the index lists the names sorted, as TF's. Everything is
    written through :func:`convbn.formats._io.atomic_output`: all the files appear, or none.

    Raises:
        ConvBNError: for an empty or repeated name, a name with a NUL, a name or string that
            does not encode as UTF-8, a dtype TF does not store, or a ``max_shard_size`` below 1.
    """
    if max_shard_size is not None and max_shard_size < 1:
        raise ConvBNError(f"max_shard_size must be at least 1 byte. Received: max_shard_size={max_shard_size}")
    target = Path(prefix)
    encoded: list[_Encoded] = []
    for name, value in tensors:
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ConvBNError(f"tensor names must be non-empty strings without NUL. Received: name={name!r}")
        try:
            key = name.encode("utf-8", "surrogateescape")  # the bytes a name read from a bundle had
        except UnicodeEncodeError:
            raise ConvBNError(f"tensor names must encode as UTF-8. Received: name={name!r}") from None
        array = np.asarray(value)
        dtype, chunks, size = _encode(name, array)
        encoded.append((key, dtype, array.shape, chunks, size))
    keys = [key for key, *_ in encoded]
    if len(set(keys)) != len(keys):
        repeated = next(k for k in keys if keys.count(k) > 1)
        raise ConvBNError(
            f"every tensor name in a TF checkpoint must be unique. "
            f"Received: {repeated.decode('utf-8', 'surrogateescape')!r} twice"
        )
    shard_of: list[int] = []
    used = 0
    for *_, size in encoded:
        if shard_of and max_shard_size is not None and used and used + size > max_shard_size:
            shard_of.append(shard_of[-1] + 1)
            used = 0
        else:
            shard_of.append(shard_of[-1] if shard_of else 0)
        used += size
    num_shards = (shard_of[-1] + 1) if shard_of else 1
    try:
        with atomic_output(target) as out:
            _write_files(out, encoded, shard_of, num_shards)
    except OSError as exc:
        raise ConvBNError(f"writing the TF checkpoint failed: {exc.strerror or exc}. Received: path={str(prefix)!r}") from None
    return [*(shard_path(target, k, num_shards) for k in range(num_shards)), index_path(target)]


def _write_files(out: Path, encoded: Sequence[_Encoded], shard_of: Sequence[int], num_shards: int) -> None:
    """The data shards, then the index, of a bundle at prefix ``out``."""
    records: list[tuple[bytes, bytes]] = []
    files = [open(shard_path(out, k, num_shards), "wb") for k in range(num_shards)]
    try:
        for (key, dtype, shape, chunks, size), shard in zip(encoded, shard_of, strict=True):
            f = files[shard]
            offset, crc = f.tell(), 0
            for chunk, counted in chunks:
                crc = google_crc32c.extend(crc, counted)
                f.write(chunk)
            record = _tfproto.encode_bundle_entry(
                dtype=dtype, shape=shape, shard_id=shard, offset=offset, size=size, crc32c=_mask(crc)
            )
            records.append((key, record))
    finally:
        for f in files:
            f.close()
    header = _tfproto.encode_bundle_header(num_shards)
    index_path(out).write_bytes(_build_table([(b"", header), *sorted(records)]))
