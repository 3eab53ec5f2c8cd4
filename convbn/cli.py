"""The ``convbn`` command. Each subcommand lives in ``convbn/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a ``(args) -> int`` handler.

Exit status: 0 success, 1 a check failed, 2 bad input (a one-line message on stderr, no traceback).

The command's own output is its report, so the frameworks' native logging is kept off stderr
unless ``--verbose`` is given (see :func:`quiet_native_logs`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

from convbn import __version__
from convbn.errors import ConvBNError

__all__ = ["COMMANDS", "build_parser", "main", "quiet_native_logs"]

#: Subcommand modules under convbn.commands, in the order ``convbn --help`` lists them.
COMMANDS = ("info", "conformance", "convert", "fuse", "inspect")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

#: The filter between the process's fd 2 and the real stderr: it drops absl/glog-formatted
#: info, warning and error lines (``I0000 00:00:1796158669.485330    6504 cudart_stub.cc:31] ...``)
#: and absl's pre-initialisation banner, and passes everything else, fatal (``F``) lines included.
#: It is a separate process so that it still forwards what a framework writes just before it
#: aborts the interpreter; it ignores SIGINT, which the terminal sends to the whole group.
_FILTER = r"""
import os, re, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
noise = re.compile(
    rb"(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] .*)\r?\n?\Z")
pending = b""
while True:
    chunk = os.read(0, 65536)
    lines = (pending + chunk).splitlines(keepends=True)
    pending = lines.pop() if lines and chunk and not lines[-1].endswith(b"\n") else b""
    out = b"".join(line for line in lines if not noise.match(line))
    while out:
        out = out[os.write(2, out):]
    if not chunk:
        break
"""


def build_parser() -> argparse.ArgumentParser:
    """The full ``convbn`` argument parser, every subcommand included.

    The CLI reference in the docs is generated from it (sphinx-argparse), so its name is stable.
    Building it imports no framework.
    """
    parser = argparse.ArgumentParser(
        prog="convbn",
        description="Conv2D + BatchNorm with one meaning in PyTorch, TensorFlow, JAX and NumPy.",
    )
    parser.add_argument("--version", action="version", version=f"convbn {__version__}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="let the frameworks' own logging (TensorFlow's and XLA's C++ logs, CUDA probes) through "
        "to stderr; without it convbn silences them",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"convbn.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with contextlib.nullcontext() if args.verbose else quiet_native_logs():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except (ConvBNError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"convbn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ImportError as exc:
        print(f"convbn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"convbn {args.command}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Keep TensorFlow's, XLA's and absl's C++ logging off stderr while the block runs.

    Must be entered before any framework is imported. Two parts, because neither alone is enough
    (measured with TF 2.21 and jax 0.10 on a machine without a GPU):

    - ``TF_CPP_MIN_LOG_LEVEL=3`` (``setdefault``: a user's own value wins) silences TensorFlow's
      run-time logs, such as ``E0000 ... failed call to cuInit``, and its CPU-feature banner;
    - the lines absl writes *before* ``absl::InitializeLog()`` (``I0000 ... cudart_stub.cc:31]
      Could not find cuda drivers``, printed while ``import tensorflow`` runs) ignore every
      environment variable, so file descriptor 2 goes through a filter that drops lines in absl's
      format and passes the rest. Python's ``sys.stderr`` keeps writing to the real stderr
      directly (so a progress bar still sees the terminal).

    ``JAX_PLATFORMS`` is not touched: forcing it would hide a GPU the user has.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    filtered = _filter_fd2()
    if filtered is None:
        yield
        return
    saved, proc, stream = filtered
    previous = sys.stderr
    sys.stderr = stream
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            stream.close()
        sys.stderr = previous
        os.dup2(saved, 2)
        os.close(saved)
        if proc.stdin is not None:
            proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _filter_fd2() -> tuple[int, subprocess.Popen[bytes], TextIO] | None:
    """Route fd 2 through :data:`_FILTER`: ``(the real stderr's fd, the filter, a text stream on
    the real stderr)``, or None where that cannot be done (stderr already redirected in-process, as
    under pytest's capture, or no interpreter to start)."""
    real = sys.__stderr__
    if real is None or sys.stderr is not real or not sys.executable:
        return None
    try:
        if real.fileno() != 2:
            return None
        real.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):
        return None
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=saved)
    except OSError:
        os.close(saved)
        return None
    assert proc.stdin is not None
    os.dup2(proc.stdin.fileno(), 2)
    encoding = real.encoding or "utf-8"
    stream = open(saved, "w", encoding=encoding, errors="backslashreplace", buffering=1, closefd=False)
    return saved, proc, stream


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
