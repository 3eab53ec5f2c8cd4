"""What a refused checkpoint must look like, for the hostile-input tests of every reader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import convbn
from convbn import ConvBNError
from convbn.cli import main


def refused(path: Path, *fragments: str) -> str:
    """load_checkpoint's one-line ConvBNError, naming the file and containing ``fragments``."""
    with pytest.raises(ConvBNError) as info:
        convbn.load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def cli_refuses(path: Path, capsys: pytest.CaptureFixture[str] | None = None) -> None:
    """convert exits 2 with nothing at DST nor beside it, and so does inspect; with ``capsys``,
    each printed exactly one line on stderr, naming the file."""
    directory = Path(path).parent
    before = set(os.listdir(directory))
    dst = directory / "out.safetensors"
    assert main(["convert", str(path), str(dst)]) == 2
    assert not dst.exists() and set(os.listdir(directory)) == before
    assert main(["inspect", str(path)]) == 2
    if capsys is not None:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and all(str(path) in line for line in err), err


def refused_everywhere(path: Path, *fragments: str) -> str:
    """:func:`refused`, and :func:`cli_refuses` too: the message, for further checks."""
    message = refused(path, *fragments)
    cli_refuses(path)
    return message
