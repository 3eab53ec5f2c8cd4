"""The ``convbn`` command. Each subcommand lives in ``convbn/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a ``(args) -> int`` handler.

Exit status: 0 success, 1 a check failed, 2 bad input (a one-line message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from convbn import __version__
from convbn.errors import ConvBNError

#: Subcommand modules under convbn.commands, in the order ``convbn --help`` lists them.
COMMANDS = ("info", "conformance", "convert", "fuse", "inspect")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convbn",
        description="Conv2D + BatchNorm with one meaning in PyTorch, TensorFlow, JAX and NumPy.",
    )
    parser.add_argument("--version", action="version", version=f"convbn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"convbn.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    # The CLI's own output is the report; keep TensorFlow's C++ start-up logging off it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
