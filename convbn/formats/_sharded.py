"""Hugging Face-style sharded checkpoints: ``<name>.index.json`` and the shard files it names.

The index is ``{"metadata": {...}, "weight_map": {tensor: shard file}}``, as transformers'
``save_pretrained`` writes it for ``model.safetensors`` and ``pytorch_model.bin``. One set of
rules serves both formats here: which index a path names, the checks on it, and how tensors are
split into shards by ``max_shard_size``; each format reads and writes its own shard files.

A checkpoint is named by its index, by a directory holding exactly one index, or by the file
name the index was written for (``model.safetensors`` when only ``model.safetensors.index.json``
and its shards exist), so a sharded write can be read back under the name it was given.

Shard names are checked lexically: a relative path with no ``..``, so a shard cannot lie outside
the index's directory. Symlinks inside the directory are followed, since Hugging Face's download
cache makes every file of a snapshot one (pointing into the cache's ``blobs``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from convbn.errors import ConvBNError

__all__ = ["INDEX_SUFFIX", "Shards", "find_index", "index_files", "parse_size", "shard_names", "split", "write_index"]

INDEX_SUFFIX = ".index.json"
#: An index is a few hundred bytes per tensor; larger is not an index.
_MAX_INDEX = 64 * 1024 * 1024


def find_index(path: Path, is_shard: Callable[[Path], bool], suffixes: tuple[str, ...]) -> Path | None:
    """The index ``path`` names for a format whose shard files ``is_shard`` recognises, or None.

    ``path`` is the index itself, a directory holding exactly one ``*.index.json``, or a missing
    file ``X`` next to ``X.index.json``. The index's first shard must be of the format (judged by
    ``is_shard`` from its content), so a safetensors index is never read as a torch one; an index
    whose shard cannot be found from it belongs to the format its name says (``suffixes``, as in
    ``model.safetensors.index.json``), whose reader then says what is wrong. Never raises.
    """
    try:
        if path.is_dir():
            indexes = [p for p in path.iterdir() if p.name.endswith(INDEX_SUFFIX)]
            if len(indexes) != 1:
                return None
            index = indexes[0]
        elif path.name.endswith(INDEX_SUFFIX):
            index = path
        elif not path.exists() and Path(f"{path}{INDEX_SUFFIX}").exists():
            index = Path(f"{path}{INDEX_SUFFIX}")
        else:
            return None
        if not index.is_file():
            return None
    except OSError:
        return None
    try:
        if index.stat().st_size > _MAX_INDEX:
            raise ValueError("too large for an index")
        weight_map = json.loads(index.read_bytes()).get("weight_map")
        shard = index.parent / _checked_name(index, next(iter(weight_map.values())))
        if not shard.is_file():
            raise ValueError("no first shard")
    except Exception:  # a corrupt index, or a shard that is not there: the name decides
        return index if index.name[: -len(INDEX_SUFFIX)].endswith(suffixes) else None
    return index if is_shard(shard) else None


def index_files(path: Path) -> list[Path]:
    """The index ``path`` resolves to and every shard it names (for callers that must not write
    over any file of a source); ``[path]`` when ``path`` names no readable index."""
    index = find_index(path, lambda _: True, ())
    if index is None:
        return [path]
    try:
        return [index, *Shards.read(index).files]
    except ConvBNError:
        return [index]


class Shards:
    """A checked index: its path, the shard files in order, and which tensors each must hold."""

    def __init__(self, index: Path, tensors: dict[Path, list[str]], metadata: dict[str, Any]) -> None:
        self.index = index
        self.tensors = tensors
        self.metadata = metadata

    @property
    def files(self) -> list[Path]:
        return list(self.tensors)

    @classmethod
    def read(cls, index: Path) -> Shards:
        """Parse and check ``index``: a JSON object whose ``weight_map`` maps tensor names to shard
        names inside its directory, each shard a regular file. Shards come in name order (the
        ``-00001-of-00003`` numbering), each with its tensors in the index's order."""
        try:
            size = index.stat().st_size
            if size > _MAX_INDEX:
                raise ConvBNError(f"{index}: a shard index must be under {_MAX_INDEX} bytes. Received: {size} bytes")
            document = json.loads(index.read_bytes())
        except OSError as exc:
            raise ConvBNError(f"{index}: the shard index cannot be read: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConvBNError(f"{index}: corrupted shard index: not JSON ({exc})") from None
        except RecursionError:
            raise ConvBNError(f"{index}: corrupted shard index: nested too deeply") from None
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        metadata = document.get("metadata", {}) if isinstance(document, dict) else None
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
            or not isinstance(metadata, dict)
        ):
            raise ConvBNError(
                f"{index}: a shard index must be a JSON object with a non-empty \"weight_map\" of tensor name "
                'to shard file (strings) and an optional "metadata" object'
            )
        by_name: dict[str, list[str]] = {}
        for tensor, name in weight_map.items():
            by_name.setdefault(name, []).append(tensor)
        _check_numbering(index, list(by_name))
        tensors: dict[Path, list[str]] = {}
        for name in sorted(by_name, key=_shard_order):
            shard = index.parent / _checked_name(index, name)
            try:
                mode = shard.stat().st_mode
            except OSError:
                raise ConvBNError(f"{index}: shard {name!r} is missing (no file {shard})") from None
            if not stat.S_ISREG(mode):
                raise ConvBNError(f"{index}: shard {name!r} must be a regular file. Received: {shard}")
            if not os.access(shard, os.R_OK):
                raise ConvBNError(f"{index}: shard {name!r} must be readable. Received: permission denied")
            tensors[shard] = by_name[name]
        return cls(index, tensors, metadata)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Errors about a shard raised inside the block also name the index the user gave."""
        try:
            yield
        except ConvBNError as exc:
            if str(exc).startswith(str(self.index)):
                raise
            raise ConvBNError(f"{self.index}: {exc}") from None

    def check(self, shard: Path, held: Sequence[str], seen: dict[str, Path]) -> None:
        """``held`` (the tensors ``shard`` holds) against the index: exactly its tensors, none also
        in an earlier shard (``seen``: tensor → shard, updated)."""
        for tensor in held:
            if tensor in seen:
                raise ConvBNError(
                    f"{self.index}: tensor {tensor!r} is in two shards, {seen[tensor].name} and {shard.name}"
                )
            seen[tensor] = shard
        listed, holds = self.tensors[shard], set(held)
        missing = [t for t in listed if t not in holds]
        if missing:
            raise ConvBNError(
                f"{self.index}: the weight_map puts tensor {missing[0]!r} in {shard.name}, which does not "
                f"hold it ({len(missing)} such tensor(s))"
            )
        wanted = set(listed)
        unlisted = [t for t in held if t not in wanted]
        if unlisted:
            raise ConvBNError(
                f"{self.index}: shard {shard.name} holds tensor {unlisted[0]!r}, which the weight_map does not "
                f"put there ({len(unlisted)} such tensor(s))"
            )


def _checked_name(index: Path, name: str) -> PurePosixPath:
    """A shard name as a relative path inside the index's directory (no ``..``, not absolute)."""
    shard = PurePosixPath(name)
    if not name or shard.is_absolute() or ".." in shard.parts or "\\" in name or "\x00" in name:
        raise ConvBNError(
            f"{index}: shard {name[:120]!r} lies outside the index's directory; a shard must be a file "
            "name relative to it"
        )
    return shard


#: ``<stem>-00002-of-00005<ext>``: the numbering transformers and :func:`shard_names` give shards.
_NUMBERED = re.compile(r"(.*)-(\d{5})-of-(\d{5})(\.[^./]*)?")


def _check_numbering(index: Path, names: list[str]) -> None:
    """Shards numbered ``-K-of-N`` alike must all be named: a weight_map that leaves one out would
    read as a checkpoint without that shard's tensors, and nothing would say so."""
    numbered = [_NUMBERED.fullmatch(name) for name in names]
    if not all(numbered) or len({(m[1], m[3], m[4]) for m in numbered if m}) != 1:
        return
    first = numbered[0]
    assert first is not None
    count = int(first[3])
    absent = sorted(set(range(1, count + 1)) - {int(m[2]) for m in numbered if m})
    if absent:
        missing = f"{first[1]}-{absent[0]:05d}-of-{count:05d}{first[4] or ''}"
        raise ConvBNError(
            f"{index}: the weight_map puts no tensor in shard {missing!r} of the {count} its shard names "
            f"number ({len(absent)} such shard(s)); a tensor left out of it would be read past"
        )


def _shard_order(name: str) -> tuple[Any, ...]:
    """Shards by name, numbers compared as numbers (``-00002-of-`` before ``-00010-of-``)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


# -- writing ---------------------------------------------------------------------------------------

_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}


def parse_size(size: int | str) -> int:
    """``max_shard_size`` in bytes, read as transformers' ``save_pretrained`` reads it.

    An int, or a string of digits (bytes), or digits followed by ``GiB``/``MiB``/``KiB`` (powers of
    2), ``GB``/``MB``/``KB`` (powers of 10), case-insensitively, except that a lowercase final
    ``b`` means bits, as in transformers (``"5Gb"`` is 625,000,000 bytes).

    Raises:
        ConvBNError: for anything else, or a size below 1.

    Example:
        >>> parse_size("5GB"), parse_size("500MiB"), parse_size(1000)
        (5000000000, 524288000, 1000)
    """
    text = str(size).strip()
    value: int | None = None
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif text.isdigit():
        value = int(text)
    else:
        for unit, factor in _UNITS.items():
            digits = text[: -len(unit)]
            if text.upper().endswith(unit) and digits.isdigit():
                value = int(digits) * factor
                if not unit.endswith("IB") and text.endswith("b"):
                    value //= 8
                break
    if value is None or value < 1:
        raise ConvBNError(
            "max_shard_size must be a positive number of bytes or an integer with a unit (GB, MB, KB, "
            f"GiB, MiB, KiB), e.g. '5GB'. Received: max_shard_size={size!r}"
        )
    return value


def split(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``max_bytes`` of tensor data each, in order.

    As transformers does it: a shard is closed when the next tensor would take it over the limit,
    and a tensor larger than the limit gets a shard of its own. Unlike transformers, shards keep
    the tensors' order (an oversized tensor closes the shard before it), so reading the shards
    in turn gives the original order, which pairing by order relies on.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
        if used > max_bytes:
            shards.append(current)
            current, used = [], 0
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(path: Path, count: int) -> tuple[list[str], str]:
    """The shard file names and the index name for writing ``count`` shards of ``path``.

    ``dir/model.safetensors`` gives ``model-00001-of-00003.safetensors`` ... and
    ``model.safetensors.index.json``; ``path`` may also name the index itself.
    """
    name = path.name[: -len(INDEX_SUFFIX)] if path.name.endswith(INDEX_SUFFIX) else path.name
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    ext = f".{suffix}" if dot else ""
    return [f"{stem}-{i:05d}-of-{count:05d}{ext}" for i in range(1, count + 1)], f"{name}{INDEX_SUFFIX}"


def write_index(directory: Path, index_name: str, weight_map: dict[str, str], total_size: int) -> None:
    """The index file transformers writes: ``{"metadata": {"total_size": N}, "weight_map": ...}``."""
    document = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / index_name).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
