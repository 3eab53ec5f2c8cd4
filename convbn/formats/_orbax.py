"""Orbax PyTree checkpoints of Flax variables: which directories are ones, checks, and I/O.

Flax's documentation recommends Orbax for checkpoints, so the flax format reads and writes them
besides msgpack files. Reading and writing go through ``orbax-checkpoint`` itself
(``ocp.StandardCheckpointer``), imported only when an Orbax directory is read or written: the
format's storage (OCDBT databases of zarr arrays, written by tensorstore) is not one to
reimplement. The extra ``convbn[orbax]`` installs it.

A checkpoint is a directory holding ``_METADATA`` (or ``_CHECKPOINT_METADATA`` /
``manifest.ocdbt``), as ``StandardCheckpointer().save(path, variables)`` writes it. A step
directory of a ``CheckpointManager`` (``root/3``, holding ``_CHECKPOINT_METADATA`` and one item
such as ``default/``) reads as its item; the manager's root holds several steps, so it is refused
with their names rather than guessing which one is meant.

tensorstore opens whatever files the checkpoint's metadata leads it to, so before Orbax sees the
directory: every entry under it must be a regular file or directory, a symlink only to somewhere
inside it; every tree key in ``_METADATA`` must be a plain name (no ``/``: without OCDBT each array
is a directory named after its keys); and the arrays the metadata declares may not add up to more
than :data:`MAX_EXPANSION` times the bytes on disk (plus 64 MiB), since compressed chunks of a
small file could otherwise decompress into any amount of memory. The OCDBT manifest is binary and
is left to tensorstore's own checks. Orbax stores no checksum of array data: a damaged byte inside a
chunk reads as another value, here as with orbax itself (damage to its structure is refused).

Orbax reports a damaged checkpoint twice besides its exception: an absl WARNING, and tracebacks
("Event loop is closed") that tensorstore's threads print through ``sys.unraisablehook`` when
their futures complete after Orbax closed the event loop awaiting them. Neither is convbn's to
show (the one error line is), so :func:`_quiet` keeps them off stderr.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import stat
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from convbn.errors import ConvBNError

__all__ = ["MAX_EXPANSION", "is_checkpoint", "load", "require", "save"]

#: Orbax's own file names: any of them marks a directory as an Orbax checkpoint.
_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")
#: Trained weights compress by well under 2x; far more than this is a decompression bomb.
MAX_EXPANSION = 100
_SLACK = 64 * 1024 * 1024
_MAX_JSON = 64 * 1024 * 1024


_MISSING = "Orbax checkpoints need orbax-checkpoint, which is not installed: pip install 'convbn[orbax]'"


def _ocp() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError(_MISSING) from None
    return ocp


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """absl's logger off while the block runs, as it was after; and :func:`_closed_loop_filter`
    in place of ``sys.unraisablehook`` from then on (once), since the tracebacks come after."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL + 1)
    if not getattr(sys.unraisablehook, "drops_closed_loop_errors", False):
        sys.unraisablehook = _closed_loop_filter(sys.unraisablehook)
    try:
        yield
    finally:
        absl.setLevel(level)


def _closed_loop_filter(previous: Callable[[Any], object]) -> Callable[[Any], object]:
    """An unraisable hook dropping what tensorstore's threads raise when a future completes after
    Orbax closed the event loop awaiting it (``RuntimeError: Event loop is closed`` from
    ``call_soon_threadsafe``), and passing everything else to ``previous``.

    They arrive on tensorstore's threads after a failed restore has returned, with nothing to wait
    on, so no block can scope them; they are about a loop that no longer exists, so dropping them
    loses nothing.
    """

    def hook(unraisable: Any) -> object:
        exc, tb = unraisable.exc_value, unraisable.exc_traceback
        frames = [f.name for f in traceback.extract_tb(tb)] if tb is not None else []
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and "call_soon_threadsafe" in frames:
            return None
        return previous(unraisable)

    hook.drops_closed_loop_errors = True  # type: ignore[attr-defined]
    return hook


def require() -> None:
    """Raise :func:`load`'s and :func:`save`'s ImportError now, without importing orbax (and JAX),
    when orbax-checkpoint is not installed: the CLI checks before reading anything."""
    try:
        found = importlib.util.find_spec("orbax.checkpoint") is not None
    except (ImportError, ValueError):  # no orbax package, or one set to None in sys.modules
        found = False
    if not found:
        raise ImportError(_MISSING)


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is an Orbax checkpoint directory, a step directory of one, or a
    CheckpointManager root of steps (which :func:`load` refuses by name). Never raises."""
    try:
        if not path.is_dir():
            return False
        if any((path / m).is_file() for m in _MARKERS):
            return True
        return bool(_steps(path))
    except OSError:
        return False


def _steps(root: Path) -> list[str]:
    """The step directories of a CheckpointManager root (integer names holding Orbax files)."""
    return sorted(
        (d.name for d in root.iterdir() if d.name.isdigit() and d.is_dir() and (d / "_CHECKPOINT_METADATA").is_file()),
        key=int,
    )


def _item(path: Path) -> Path:
    """The directory holding the variables: ``path``, or a step directory's single item."""
    if (path / "_METADATA").is_file() or (path / "manifest.ocdbt").is_file():
        return path
    items = [d for d in sorted(path.iterdir()) if d.is_dir() and (d / "_METADATA").is_file()]
    if (path / "_CHECKPOINT_METADATA").is_file():
        if len(items) == 1:
            return items[0]
        raise ConvBNError(
            f"{path}: an Orbax step directory must hold one item of variables; it holds "
            f"{len(items)} ({', '.join(d.name for d in items) or 'none'}): name the one to read"
        )
    steps = _steps(path)
    if not steps:
        raise ConvBNError(f"{path}: not an Orbax checkpoint: it holds none of {', '.join(_MARKERS)} and no steps")
    shown = ", ".join(steps[:10]) + (f", ... ({len(steps) - 10} more)" if len(steps) > 10 else "")
    raise ConvBNError(
        f"{path}: an Orbax CheckpointManager directory holds several checkpoints (steps {shown}); "
        f"name one of them, e.g. {path / steps[-1]}"
    )


def _check_tree(root: Path) -> int:
    """Every entry under ``root`` a regular file or directory, or a symlink resolving inside it;
    the bytes its files hold."""
    inside = root.resolve()
    total = 0
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            entry = Path(directory) / name
            mode = entry.lstat().st_mode
            if stat.S_ISLNK(mode):
                target = entry.resolve()
                if target != inside and inside not in target.parents:
                    raise ConvBNError(
                        f"{root}: {entry.relative_to(root)} is a symlink to {target}, outside the checkpoint; "
                        "an Orbax checkpoint must not read outside its directory"
                    )
                mode = target.stat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ConvBNError(
                    f"{root}: {entry.relative_to(root)} must be a regular file or a directory (a FIFO or "
                    "device would block or stream forever)"
                )
            if stat.S_ISREG(mode):
                total += entry.stat().st_size
    return total


def _check_metadata(item: Path) -> None:
    """``_METADATA``'s tree keys are plain names: none may lead tensorstore to another path."""
    meta = item / "_METADATA"
    if not meta.is_file():
        return
    if meta.stat().st_size > _MAX_JSON:
        raise ConvBNError(f"{meta}: an Orbax _METADATA file must be under {_MAX_JSON} bytes")
    try:
        document = json.loads(meta.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvBNError(f"{meta}: corrupted Orbax metadata: not JSON ({exc})") from None
    except RecursionError:
        raise ConvBNError(f"{meta}: corrupted Orbax metadata: nested too deeply") from None
    tree = document.get("tree_metadata") if isinstance(document, dict) else None
    if not isinstance(tree, dict):
        raise ConvBNError(f'{meta}: corrupted Orbax metadata: it must be a JSON object with a "tree_metadata" object')
    for entry in tree.values():
        keys = entry.get("key_metadata") if isinstance(entry, dict) else None
        if not isinstance(keys, list):
            raise ConvBNError(f"{meta}: corrupted Orbax metadata: every tree entry must list its key_metadata")
        for key in keys:
            name = key.get("key") if isinstance(key, dict) else None
            if not isinstance(name, (str, int)) or any(c in str(name) for c in "/\\\x00") or str(name) in ("", ".", ".."):
                raise ConvBNError(
                    f"{meta}: the tree key {str(name)[:80]!r} is not a plain name; Orbax keys name "
                    "files inside the checkpoint, and this one could name another path"
                )


def _declared_bytes(tree: Any) -> int:
    """The bytes the metadata's arrays declare (scalars count 8)."""
    import jax

    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            total += 8
            continue
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"an array's shape must be ints >= 0. Received: {shape}")
        total += math.prod(shape) * np.dtype(dtype).itemsize
    return total


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The variables of the Orbax checkpoint at ``path``: nested dicts (lists become dicts keyed
    ``"0"``, ``"1"``, ...) of NumPy arrays and Python scalars, after the checks above; and the
    custom metadata saved with them (empty when there is none)."""
    item = _item(path).absolute()  # orbax finds no metadata under a relative path
    on_disk = _check_tree(item)
    _check_metadata(item)
    ocp = _ocp()
    try:
        with _quiet(), contextlib.closing(ocp.StandardCheckpointer()) as checkpointer:
            step = checkpointer.metadata(item)
            metadata, custom = step.item_metadata, getattr(step, "custom_metadata", None)
            if metadata is None:  # orbax logs a warning and returns none when it cannot read it
                raise ConvBNError(f"{path}: not a readable Orbax checkpoint (truncated or corrupted): "
                                  "Orbax finds no item metadata in it")
            declared = _declared_bytes(metadata.tree)
            if declared > MAX_EXPANSION * on_disk + _SLACK:
                raise ConvBNError(
                    f"{path}: the Orbax metadata declares arrays of {declared} bytes, but the checkpoint holds "
                    f"{on_disk}; more than {MAX_EXPANSION}x is refused as corrupt (a decompression bomb)"
                )
            restored = checkpointer.restore(item)
    except ConvBNError:
        raise
    except Exception as exc:  # orbax and tensorstore raise many types for a corrupt checkpoint
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConvBNError(f"{path}: not a readable Orbax checkpoint (truncated or corrupted): {first}") from None
    if not isinstance(restored, dict):
        raise ConvBNError(f"{path}: an Orbax checkpoint of Flax variables must hold a dict. Received: {type(restored).__name__}")
    return _plain(restored), dict(custom) if isinstance(custom, dict) else {}


def _plain(node: Any) -> Any:
    """Orbax's restored tree as dicts of NumPy arrays (a jax.Array on the CPU converts without a
    copy). ``None`` is an empty subtree to JAX (optax's ``EmptyState``), so it is left out, as
    flax's msgpack leaves out the empty dict it writes for one."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items() if v is not None}
    if isinstance(node, (list, tuple)):
        return {str(i): _plain(v) for i, v in enumerate(node) if v is not None}
    if isinstance(node, (bool, int, float, str, np.ndarray)):
        return node
    return np.asarray(node)


def save(tree: dict[str, Any], path: Path, custom_metadata: dict[str, Any] | None = None) -> None:
    """Write ``tree`` (nested dicts of arrays) as ``ocp.StandardCheckpointer().save(path, tree)``
    does, with ``custom_metadata`` (JSON) in its ``_CHECKPOINT_METADATA``, which ``restore`` ignores;
    ``path`` must not exist (the writer gives a fresh scratch path)."""
    ocp = _ocp()
    with _quiet(), contextlib.closing(ocp.StandardCheckpointer()) as checkpointer:
        checkpointer.save(path.absolute(), tree, custom_metadata=custom_metadata)
        checkpointer.wait_until_finished()
