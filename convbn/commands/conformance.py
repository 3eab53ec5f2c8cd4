"""``convbn conformance``: run the conformance matrix on the installed frameworks and devices.

Progress goes to stderr; the report (a table, or JSON with ``--json``) to stdout. Exit status 0
when every check passes, 1 when any fails (skipped checks, e.g. no GPU, do not fail a run), 2 for
bad input such as a requested backend that is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from convbn import dispatch
from convbn.errors import ConvBNError


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "conformance",
        help="check every installed backend against the float64 reference and each other",
        description=(
            "Run the conformance matrix (geometry, parameters, extreme statistics, eval and "
            "training, NHWC and NCHW, float64/float32/bfloat16/float16, gradients, edge cases) on "
            "every installed framework and device, and print worst error / tolerance per backend, "
            "device and check group."
        ),
    )
    parser.add_argument(
        "--backends",
        metavar="LIST",
        help="comma-separated backends (numpy, torch, tensorflow, jax); default: every installed one",
    )
    parser.add_argument("--quick", action="store_true", help="a representative subset (under a minute)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument(
        "--allow-tf32",
        action="store_true",
        help="let GPU float32 convs/matmuls use TF32 (off by default) to measure its effect",
    )
    parser.add_argument("--no-gpu", action="store_true", help="run on the CPU only")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help=(
            "run the distributed group instead: training across replicas (sync=) on each framework's "
            "own engine against one process on the whole batch. On CPU each backend makes its "
            "replicas itself; under torchrun (python -m convbn.conformance) it runs on the launched "
            "processes"
        ),
    )
    parser.add_argument(
        "--world",
        metavar="LIST",
        default="2,3",
        help="with --distributed: comma-separated replica counts (default 2,3; torchrun sets its own)",
    )
    parser.set_defaults(func=run)


def _parse_backends(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConvBNError(f"--backends must name at least one backend. Received: --backends={text!r}")
    return [dispatch.normalize_name(n, what="--backends") for n in names]


class _Progress:
    """A one-line progress display on a terminal; a line per tenth of the work otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.start = time.monotonic()
        self.last_tenth = -1

    def __call__(self, done: int, total: int, label: str) -> None:
        elapsed = time.monotonic() - self.start
        text = f"[{done}/{total}] {elapsed:5.1f}s {label}"
        if self.tty:
            self.stream.write("\r\033[K" + text[:120])
            if done == total:
                self.stream.write("\n")
        else:
            tenth = done * 10 // max(total, 1)
            if tenth == self.last_tenth:
                return
            self.last_tenth = tenth
            self.stream.write(text + "\n")
        self.stream.flush()


@contextlib.contextmanager
def _jax_float64(names: list[str]) -> Iterator[None]:
    """float64 on JAX needs jax_enable_x64; this command is the process, so it turns it on for
    the run (and back afterwards) rather than reporting float64 JAX as skipped."""
    if "jax" not in names:
        yield
        return
    if "torch" in names:
        import torch  # noqa: F401  (torch before the others)
    import jax

    old = jax.config.jax_enable_x64  # type: ignore[attr-defined]
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def _parse_worlds(text: str) -> tuple[int, ...]:
    try:
        worlds = tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        worlds = ()
    if not worlds or min(worlds) < 1:
        raise ConvBNError(f"--world must be comma-separated replica counts >= 1. Received: --world={text!r}")
    return worlds


def _launched_rank() -> int | None:
    """This process's rank when a launcher such as torchrun started it, else None."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"])
    return None


def _run_distributed(args: argparse.Namespace) -> Any:
    from convbn.conformance import distributed

    worlds = _parse_worlds(args.world)
    backends = _parse_backends(args.backends)
    if _launched_rank() is not None:
        # Every launched process runs this: the replicas are the processes, and only torch's
        # engine spans processes here.
        worlds = (int(os.environ["WORLD_SIZE"]),)
        backends = backends or ["torch"]
    return distributed.run(backends, worlds=worlds, quick=args.quick)


def run(args: argparse.Namespace) -> int:
    from convbn.conformance import runner

    if args.distributed:
        report = _run_distributed(args)
        if (_launched_rank() or 0) != 0:
            return 0 if report.passed else 1  # rank 0 prints the report for every replica
    else:
        names = runner.select(_parse_backends(args.backends))
        with _jax_float64(names):
            report = runner.run(
                names,
                quick=args.quick,
                gpu=not args.no_gpu,
                allow_tf32=args.allow_tf32,
                progress=_Progress(sys.stderr),
            )
    if args.json:
        json.dump(report.as_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(report.text())
    return 0 if report.passed else 1
