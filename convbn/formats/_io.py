"""Atomic, exclusive output: write into a scratch directory beside the destination, then place.

Every writer writes through :func:`atomic_output`, and the CLI stages through :func:`staging` to
read its output back before placing it, so both share these guarantees:

- nothing appears at the destination unless the whole write succeeded (files and directories are
  renamed or hard-linked into place on the same filesystem; an index, a TF checkpoint's
  ``.index`` or a sharded file's ``*.index.json``, goes last, so a reader never sees an index
  naming data that is not there yet, and what was placed is removed again if a later entry fails);
- missing destination directories are created, and removed again when the write fails (only the
  ones created here);
- without overwriting, placement is exclusive, so of two writers racing for one destination
  exactly one wins and the other gets a :class:`~convbn.errors.ConvBNError` and leaves nothing: a
  file is hard-linked to its final name, which fails when the name exists; a directory (an Orbax
  checkpoint) cannot be hard-linked, so its final name is claimed by ``os.mkdir``, which fails
  when the name exists, and the staged directory is renamed onto the empty claim (POSIX renames a
  directory onto an empty one atomically), so a reader sees nothing, an empty directory for an
  instant, or the whole checkpoint;
- files listed as protected (the source's) are never replaced, whatever path reaches them;
- a scratch directory left by a killed process (named ``.<name>.convbn<pid>.<random>.tmp`` or
  ``.stage``) is removed by the next write into the same directory once its pid is gone.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from convbn.errors import ConvBNError
from convbn.formats._sharded import INDEX_SUFFIX

__all__ = ["Stage", "atomic_output", "parent_directories", "placement", "staging"]

#: convbn's scratch directories: ``.<name>.convbn<owner pid>.<random>.<tmp|stage>``.
_SCRATCH = re.compile(r"^\..+\.convbn(\d+)\.[A-Za-z0-9_]+\.(tmp|stage)$")


@dataclasses.dataclass(frozen=True)
class _Policy:
    overwrite: bool = True
    protected: frozenset[tuple[int, int]] = frozenset()


#: What is placed last: a reader that finds an index finds everything it names.
_INDEXES = (".index", INDEX_SUFFIX)

_POLICY: contextvars.ContextVar[_Policy | None] = contextvars.ContextVar("convbn_placement", default=None)


@contextlib.contextmanager
def placement(*, overwrite: bool = True, protect: Iterable[str | os.PathLike[str]] = ()) -> Iterator[None]:
    """How :func:`atomic_output` places files inside the block: replacing existing ones or not, and
    never onto the (existing) files in ``protect``, compared by device and inode."""
    token = _POLICY.set(_Policy(overwrite, frozenset(_identity(Path(p)) for p in protect if Path(p).exists())))
    try:
        yield
    finally:
        _POLICY.reset(token)


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


@dataclasses.dataclass
class Stage:
    """A scratch directory beside ``target``: write to :attr:`path`, then :meth:`place`."""

    target: Path
    scratch: Path

    @property
    def path(self) -> Path:
        return self.scratch / self.target.name

    def place(self, *, overwrite: bool | None = None) -> None:
        """Move every file and directory written in the scratch directory next to :attr:`target`.

        ``overwrite`` None follows the enclosing :func:`placement`. Indexes go last. On any failure
        the entries already placed by this call are removed again and nothing else is touched.
        """
        policy = _POLICY.get() or _Policy()
        replace = policy.overwrite if overwrite is None else overwrite
        parent = self.target.parent
        placed: list[Path] = []
        try:
            for entry in sorted(self.scratch.iterdir(), key=lambda e: (e.name.endswith(_INDEXES), e.name)):
                final = parent / entry.name
                if final.exists() and _identity(final) in policy.protected:
                    raise ConvBNError(
                        f"DST must differ from SRC: convbn never modifies its source, and {final} is a "
                        f"file of the source. Received: DST={str(self.target)!r}"
                    )
                try:
                    if replace:
                        os.replace(entry, final)
                    elif entry.is_dir():
                        _rename_exclusive(entry, final, self.target)
                    else:
                        _link_exclusive(entry, final, self.target)
                except OSError as exc:
                    raise ConvBNError(f"{entry.name} could not be placed at {final}: {exc.strerror or exc}") from None
                placed.append(final)
        except BaseException:
            for final in placed:
                with contextlib.suppress(OSError):
                    if final.is_dir() and not final.is_symlink():
                        shutil.rmtree(final)
                    else:
                        final.unlink()
            raise


def _exists(target: Path) -> ConvBNError:
    return ConvBNError(f"{target} exists; pass --force (overwrite=True) to overwrite it")


def _rename_exclusive(directory: Path, final: Path, target: Path) -> None:
    """Give ``directory`` the name ``final`` unless that name exists: claim it by ``os.mkdir``
    (exclusive), then rename onto the empty claim, which is removed again if the rename fails."""
    try:
        os.mkdir(final)
    except FileExistsError:
        raise _exists(target) from None
    try:
        os.rename(directory, final)
    except BaseException:
        with contextlib.suppress(OSError):
            final.rmdir()  # only while still our empty claim
        raise


def _link_exclusive(file: Path, final: Path, target: Path) -> None:
    """Give ``file`` the name ``final`` unless that name exists (atomically: a hard link)."""
    try:
        os.link(file, final)
    except FileExistsError:
        raise _exists(target) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # No hard links here: claim the name exclusively, then replace the empty claim.
        try:
            os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise _exists(target) from None
        try:
            os.replace(file, final)
        except BaseException:
            with contextlib.suppress(OSError):
                final.unlink()
            raise
        return
    file.unlink()


@contextlib.contextmanager
def staging(target: str | os.PathLike[str], suffix: str = ".stage") -> Iterator[Stage]:
    """A :class:`Stage` for ``target``, creating its missing parent directories.

    The scratch directory is always removed; directories created here are removed again when the
    block raises (and are left empty by nothing else). Stale scratch directories of dead convbn
    processes in the same directory are removed first.
    """
    target = Path(target)
    with parent_directories(target):
        _remove_stale(target.parent)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.convbn{os.getpid()}.", suffix=suffix,
                                        dir=target.parent))
        try:
            yield Stage(target, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def parent_directories(target: str | os.PathLike[str]) -> Iterator[None]:
    """Create ``target``'s missing parent directories (as TF's Saver does); remove the ones
    created here again, innermost first, when the block raises."""
    created = _make_parents(Path(target).parent)
    try:
        yield
    except BaseException:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield ``scratch / path.name`` in a scratch directory next to ``path``.

    The writer writes there exactly what it would write at ``path`` (one file, or a TF checkpoint's
    ``<prefix>.index`` and ``<prefix>.data-*``). When the block succeeds every file the writer
    created is placed next to ``path`` as the enclosing :func:`placement` says (replacing existing
    files by default); when it raises, nothing appears at ``path``.
    """
    with staging(path, suffix=".tmp") as stage:
        yield stage.path
        stage.place()


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; the ones created, outermost first."""
    missing: list[Path] = []
    d = directory
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            created.append(d)
    except OSError as exc:
        for c in reversed(created):
            with contextlib.suppress(OSError):
                c.rmdir()
        raise ConvBNError(f"DST's directory {directory} could not be created: {exc.strerror or exc}") from None
    if not directory.is_dir():
        raise ConvBNError(f"DST's directory must be a directory. Received: {str(directory)!r}")
    return created


def _remove_stale(directory: Path) -> None:
    """Remove convbn scratch directories in ``directory`` whose owner process is gone."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        match = _SCRATCH.match(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False) or _alive(int(match.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
