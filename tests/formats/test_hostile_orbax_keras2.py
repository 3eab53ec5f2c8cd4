"""Damaged Orbax directories and Keras 2 ``.h5`` files the mutation fuzzer found (tests/fuzz):
each is refused with one line on stderr and exit 2, in a fresh process (where the CLI's own stderr
is the terminal's) and within a time limit, so that a hang (or a crash inside libhdf5) fails the
test instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import available, need
from tests.formats.hostile import refused
from tests.fuzz import runner, seeds

#: Far above what a refusal takes (about 3 s with the imports), far below the old hang (minutes).
TIMEOUT = 90


def _cli(*argv: str) -> tuple[int, list[str]]:
    """``convbn ARGV`` in a fresh process: its exit status and stderr's lines."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-m", "convbn.cli", *argv], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)
    return done.returncode, done.stderr.strip().splitlines()


def _refused_by_the_cli(path: Path, *fragments: str) -> None:
    """inspect and convert each exit 2 with one line naming ``path`` and nothing written."""
    before = set(os.listdir(path.parent))
    for argv in (["inspect", str(path)], ["convert", str(path), str(path.parent / "out.safetensors")]):
        rc, err = _cli(*argv)
        assert rc == 2 and len(err) == 1 and str(path) in err[0], (argv, rc, err)
        assert all(f in err[0] for f in fragments), err
    assert set(os.listdir(path.parent)) == before


# ------------------------------------------------------------------------------------------ Orbax

#: Damage the fuzzer found in manifest.ocdbt (``python -m tests.fuzz --formats orbax --seed 1``): a
#: flipped bit and inserted bytes. Each made orbax log an absl warning and tensorstore's threads print
#: "Event loop is closed" tracebacks besides the error line, in most runs. Applied here at fixed places
#: of the top-level manifest rather than by mutant index: orbax names its data files at random and
#: writes more or fewer of them from run to run, which moves the file a fuzzer index picks.
ORBAX_MANIFEST_DAMAGE = ("flip_bits", "insert")
MANIFEST = "ckpt/manifest.ocdbt"


def _manifest_mutant(orbax_seed: list[seeds.Bundle], how: str) -> seeds.Bundle:
    """The seed with its manifest damaged by ``how``: the first byte (inside OCDBT's magic number)
    with one bit flipped, or eight bytes inserted in the middle (inside the checksummed body)."""
    (base,) = orbax_seed
    files = dict(base.files)
    data = files[MANIFEST]
    if how == "flip_bits":
        files[MANIFEST] = bytes([data[0] ^ 0x10]) + data[1:]
    else:
        files[MANIFEST] = data[: len(data) // 2] + b"\x00\xff" * 4 + data[len(data) // 2:]
    return seeds.Bundle(base.name, files, base.entry)


@pytest.fixture(scope="module")
def orbax_seed() -> list[seeds.Bundle]:
    need(*seeds.REQUIRES["orbax"])
    return seeds.orbax_seeds()


@pytest.mark.parametrize("how", ORBAX_MANIFEST_DAMAGE)
def test_a_damaged_orbax_manifest_is_one_line_on_stderr(how: str, orbax_seed: list[seeds.Bundle],
                                                        tmp_path: Path) -> None:
    path = _manifest_mutant(orbax_seed, how).write(tmp_path)
    _refused_by_the_cli(path, "not a readable Orbax checkpoint")


def test_a_failed_orbax_restore_leaves_logging_hooks_and_threads_as_they_were(
    orbax_seed: list[seeds.Bundle], tmp_path: Path
) -> None:
    """In this process: absl's level is back, no thread is left, the hook passes other errors on."""
    from convbn.formats import _orbax

    path = _manifest_mutant(orbax_seed, ORBAX_MANIFEST_DAMAGE[0]).write(tmp_path)
    absl = logging.getLogger("absl")
    absl.setLevel(logging.INFO)
    threads = set(threading.enumerate())
    refused(path, "not a readable Orbax checkpoint")
    assert absl.level == logging.INFO
    # No new thread is left behind (one an earlier save started may have ended meanwhile); an
    # executor thread the failed restore started may take a moment to finish.
    deadline = time.monotonic() + 10
    while not set(threading.enumerate()) <= threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(threading.enumerate()) <= threads

    loop = asyncio.new_event_loop()
    loop.close()
    raised: list[BaseException] = []
    closed = RuntimeError("Event loop is closed")
    for fail in (lambda: loop.call_soon_threadsafe(print), lambda: int("x"), lambda: _raise(closed)):
        try:
            fail()
        except (RuntimeError, ValueError) as exc:
            raised.append(exc)
    seen: list[Any] = []
    hook = _orbax._closed_loop_filter(seen.append)
    for error in raised:
        hook(types.SimpleNamespace(exc_value=error, exc_traceback=error.__traceback__))
    # Only the closed loop's own error is dropped: the same text raised elsewhere is passed on.
    assert [str(u.exc_value) for u in seen] == ["invalid literal for int() with base 10: 'x'", "Event loop is closed"]


def test_an_orbax_round_trip_still_reads_back_bit_exactly(tmp_path: Path) -> None:
    """The quieting does not get in the way of a good save and restore."""
    need(*seeds.REQUIRES["orbax"])
    from convbn.formats import _orbax

    tree = {"params": {"conv": {"kernel": np.arange(24, dtype="f4").reshape(2, 3, 1, 4)}}}
    _orbax.save(tree, tmp_path / "ckpt")
    back, custom = _orbax.load(tmp_path / "ckpt")
    assert custom == {}
    assert np.array_equal(back["params"]["conv"]["kernel"], tree["params"]["conv"]["kernel"])
    assert back["params"]["conv"]["kernel"].dtype == np.float32


# ---------------------------------------------------------------------------------------- Keras 2


def _raise(exc: BaseException) -> None:
    raise exc


def _heap_objects(data: bytes) -> tuple[int, list[tuple[int, int, int]]]:
    """The first global heap collection's offset and its objects as ``(offset, index, size)``."""
    start = data.index(b"GCOL\x01")
    length = struct.unpack_from("<Q", data, start + 8)[0]
    at, objects = 16, []
    while at + 16 <= length:
        index, _, size = struct.unpack_from("<HH4xQ", data, start + at)
        objects.append((start + at, index, size))
        at += 16 + -(-size // 8) * 8 if index else size
        if not index:
            break
    return start, objects


def _keras2_h5(path: Path) -> bytes:
    """A small Keras 2 weights file as h5py writes it: ``layer_names`` and ``weight_names``."""
    need("h5py")
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"conv", b"conv_bn"]
        f.attrs["backend"] = b"tensorflow"
        conv = f.create_group("conv")
        conv.attrs["weight_names"] = [b"conv/kernel:0"]
        conv.create_dataset("conv/kernel:0", data=rng.standard_normal((3, 3, 2, 4)).astype("f4"))
        bn = f.create_group("conv_bn")
        names = ["gamma", "beta", "moving_mean", "moving_variance"]
        bn.attrs["weight_names"] = [f"conv_bn/{n}:0".encode() for n in names]
        for n, value in zip(names, (np.ones(4), np.zeros(4), np.zeros(4), np.ones(4)), strict=True):
            bn.create_dataset(f"conv_bn/{n}:0", data=value.astype("f4"))
    return path.read_bytes()


def test_the_keras2_file_built_here_reads(tmp_path: Path) -> None:
    """The unmutated file reads, with the values written: the check refuses only what is damaged."""
    import convbn

    path = tmp_path / "model.h5"
    _keras2_h5(path)
    ckpt = convbn.load_checkpoint(path)
    assert list(ckpt.layers) == ["conv"]
    want = np.random.default_rng(0).standard_normal((3, 3, 2, 4)).astype("f4")
    assert np.array_equal(ckpt.layers["conv"].kernel, want)


def test_a_global_heap_free_space_of_zero_bytes_is_refused_not_spun_on(tmp_path: Path) -> None:
    """libhdf5 walks a heap's objects by their sizes; a free-space object of size 0 never advances."""
    path = tmp_path / "model.h5"
    data = bytearray(_keras2_h5(path))
    start, objects = _heap_objects(bytes(data))
    free = next(at for at, index, _ in objects if index == 0)
    data[free + 8:free + 16] = struct.pack("<Q", 0)
    path.write_bytes(bytes(data))
    _refused_by_the_cli(path, f"global heap collection at byte {start} is corrupt", f"object 0 at byte {free}",
                        "never advance", "layer_names")


def test_a_global_heap_object_past_its_collection_is_refused(tmp_path: Path) -> None:
    """An object larger than its collection would make libhdf5 read past the collection."""
    path = tmp_path / "model.h5"
    data = bytearray(_keras2_h5(path))
    _, objects = _heap_objects(bytes(data))
    at, index, _ = objects[0]
    data[at + 8:at + 16] = struct.pack("<Q", 1 << 40)
    path.write_bytes(bytes(data))
    _refused_by_the_cli(path, f"object {index} at byte {at} declares {1 << 40} bytes", "run past the collection")


@pytest.mark.skipif(not available("tf_keras"), reason="the fuzzer's keras2 seed is written by tf_keras")
def test_the_fuzzers_hanging_keras2_mutant_is_refused_in_time(tmp_path: Path) -> None:
    """Mutant 4 of the suite's keras2 seed set (tests/fuzz/test_fuzz_readers.py: SEED 0) spun for
    minutes inside libhdf5 reading the 'layer_names' attribute: an object's size was flipped."""
    need(*seeds.REQUIRES["keras2"])
    mutant = runner.make_mutant("keras2", seeds.keras2_seeds(), 4, 0)
    path = mutant.bundle.write(tmp_path)
    _refused_by_the_cli(path, "global heap collection", "corrupt")
