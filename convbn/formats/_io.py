"""Atomic output: write into a scratch directory, rename into place only when everything succeeded."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output"]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield ``scratch / path.name`` in a scratch directory next to ``path``.

    The writer writes there exactly what it would write at ``path`` (one file, or a TF checkpoint's
    ``<prefix>.index`` and ``<prefix>.data-*``). When the block succeeds every file the writer
    created is renamed next to ``path`` (same filesystem, so each rename is atomic), data before the
    ``.index`` so a reader never sees an index without its data. When it raises, nothing appears at
    ``path`` and the scratch directory is removed.
    """
    target = Path(path)
    parent = target.parent
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        yield scratch / target.name
        written = sorted(scratch.iterdir(), key=lambda f: (f.name.endswith(".index"), f.name))
        for file in written:
            os.replace(file, parent / file.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
