"""Hostile and corrupt torch files: each is refused with one ConvBNError naming the file, reads
nothing outside what the file holds for a tensor, and the CLI exits 2 writing nothing."""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import convbn
import convbn.cli
from tests.conftest import need
from tests.formats.hostile import cli_refuses, refused

need("torch")
import torch  # noqa: E402


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "c.weight": torch.randn(4, 3, 3, 3, generator=g),
        "c.bias": torch.randn(4, generator=g),
        "b.weight": torch.rand(4, generator=g) + 0.5,
        "b.bias": torch.randn(4, generator=g),
        "b.running_mean": torch.randn(4, generator=g),
        "b.running_var": torch.rand(4, generator=g) + 0.5,
        "b.num_batches_tracked": torch.tensor(3),
    }


def _rezip(src: Path, dst: Path, edit: Callable[[str, bytes], bytes] = lambda n, b: b, method: int = zipfile.ZIP_STORED) -> Path:
    """``src``'s members written again into ``dst`` (``edit`` may change each one's bytes)."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", method) as out:
        for info in z.infolist():
            out.writestr(info.filename, edit(info.filename, z.read(info.filename)))
    return dst


def _edit_pickle(old: bytes, new: bytes) -> Callable[[str, bytes], bytes]:
    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("/data.pkl"):
            return data
        assert old in data, "the pickle no longer has the bytes this test edits"
        return data.replace(old, new, 1)

    return edit




@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "ok.pt"
    torch.save(_state(), path)
    return path


def test_a_rezipped_file_reads_back_and_a_deflated_one_is_refused(saved, tmp_path, capsys):
    plain = _rezip(saved, tmp_path / "plain.pt")
    ckpt = convbn.load_checkpoint(plain)
    np.testing.assert_array_equal(ckpt.layers["c"].moving_var, _state()["b.running_var"].numpy())
    # Read in place, the deflated bytes became a running_var of about -9e4.
    deflated = _rezip(saved, tmp_path / "deflated.pt", method=zipfile.ZIP_DEFLATED)
    refused(deflated, "'ok/data.pkl' is compressed")
    cli_refuses(deflated, capsys)


def test_a_stride_0_tensor_is_bounded_by_its_storage(tmp_path, capsys):
    path = tmp_path / "expanded.pt"
    torch.save({"w": torch.zeros(1).expand(32768, 32768, 1, 1)}, path)
    assert path.stat().st_size < 4096  # it read back as a 4 GiB kernel
    refused(path, "tensor 'w'", "4294967296 bytes", "4-byte storage")
    cli_refuses(path, capsys)


def test_tensors_sharing_a_storage_may_not_take_more_than_it_holds(tmp_path):
    base = torch.arange(8, dtype=torch.float32)
    shared = tmp_path / "shared.pt"
    # Disjoint views of one buffer and a tensor saved twice (tied weights) read back as saved.
    tied = torch.arange(10, 13, dtype=torch.float32)
    torch.save({"a": base[:4], "b": base[4:], "tied": tied, "tied_again": tied}, shared)
    ckpt = convbn.load_checkpoint(shared)
    for name, want in (("a", [0, 1, 2, 3]), ("b", [4, 5, 6, 7]), ("tied", [10, 11, 12]), ("tied_again", [10, 11, 12])):
        np.testing.assert_array_equal(ckpt.tensors[name], np.array(want, np.float32))
    overlapping = tmp_path / "overlapping.pt"
    torch.save({"a": base[:6], "b": base[2:]}, overlapping)
    refused(overlapping, "tensor 'b'", "beside the other tensors sharing it")


def test_a_storage_larger_than_its_record_is_refused(saved, tmp_path):
    # Storage 0 (c.weight, 108 floats) declared as 200: torch.load slices 800 bytes from the
    # record's offset and returns the next members' bytes as weights.
    path = _rezip(saved, tmp_path / "lying.pt", _edit_pickle(b"K\x6ct", b"K\xc8t"))
    torch.load(path, weights_only=True, mmap=True)  # what convbn must not do
    refused(path, "storage '0' declares 800 bytes", "data/0 holds 432")


def test_legacy_files_with_lying_or_missing_storages_are_refused(tmp_path, capsys):
    good = tmp_path / "legacy.pt"
    torch.save(_state(), good, _use_new_zipfile_serialization=False)
    data = good.read_bytes()
    np.testing.assert_array_equal(convbn.load_checkpoint(good).layers["c"].kernel,
                                  _state()["c.weight"].numpy().transpose(2, 3, 1, 0))
    lying = tmp_path / "lying.pt"
    lying.write_bytes(data.replace(b"K\x6cN", b"J\x00\x00\x00\x40N", 1))  # 108 floats -> 2**30
    refused(lying, "storage '")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[:-20])
    refused(truncated, "is not in the file")
    cli_refuses(truncated, capsys)


@pytest.mark.parametrize(
    ("kind", "make", "said"),
    [
        ("quantized", lambda: torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8), "quantized (torch.qint8)"),
        ("sparse", lambda: torch.randn(4, 4).to_sparse(), "sparse (torch.sparse_coo)"),
        ("meta", lambda: torch.empty(4, device="meta"), "a meta tensor"),
        ("float8", lambda: torch.zeros(4, dtype=torch.float8_e4m3fn), "has dtype torch.float8_e4m3fn"),
    ],
)
def test_tensors_other_than_dense_cpu_ones_are_an_unsupported_kind(tmp_path, capsys, kind, make, said):
    path = tmp_path / f"{kind}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantize_per_tensor is deprecated
        tensor = make()
    torch.save({**_state(), "odd": tensor}, path)
    refused(path, "tensor 'odd'", said, "unsupported tensor kind")
    if kind == "quantized":
        cli_refuses(path, capsys)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.bool, torch.float16,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.needs("ml_dtypes")), torch.int64])
def test_every_numpy_dtype_passes_the_storage_scan(tmp_path, dtype):
    # Newer dtypes are saved with torch.storage.UntypedStorage and _rebuild_tensor_v3.
    values = torch.arange(6).reshape(2, 3).to(dtype)
    path = tmp_path / "dtypes.pt"
    torch.save({"x": values}, path)
    got = convbn.load_checkpoint(path).tensors["x"]
    want = values.float().numpy() if dtype == torch.bfloat16 else values.numpy()
    np.testing.assert_array_equal(np.asarray(got, want.dtype), want)


@pytest.mark.parametrize(
    ("raised", "old", "new"),
    [
        # c.weight's storage offset, BININT1 0, becomes the string "a": set_() raises TypeError.
        (TypeError, b"QK\x00", b"QX\x01\x00\x00\x00a"),
        # A truthy non-dict tensor metadata (7th argument): set_tensor_metadata's AssertionError.
        (AssertionError, b")Rq\x0bt", b")Rq\x0bK\x01t"),
    ],
)
def test_errors_inside_torchs_unpickler_become_one_line(saved, tmp_path, capsys, raised, old, new):
    path = _rezip(saved, tmp_path / "bad.pt", _edit_pickle(old, new))
    with pytest.raises(raised):
        torch.load(path, weights_only=True, mmap=True)
    refused(path, "not a readable torch checkpoint")
    cli_refuses(path, capsys)


class _Run:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))

    marker = ""


def test_a_pickle_that_would_run_code_runs_nothing(saved, tmp_path):
    marker = tmp_path / "ran"
    _Run.marker = str(marker)
    evil = pickle.dumps({"w": _Run()}, protocol=2)
    path = _rezip(saved, tmp_path / "evil.pt", lambda name, data: evil if name.endswith("/data.pkl") else data)
    refused(path, "refused to unpickle")
    assert not marker.exists()


# The C unpickler allocates what a pickle declares before reading it: a BINBYTES of 1 GiB followed
# by 2 bytes; a LONG_BINPUT of memo index 2**30 after one opcode (the memo table grows to the
# index, 8 bytes a slot; found by tests/fuzz). The scan must refuse both first.
LYING_PICKLES = {
    "length": b"\x80\x02B" + struct.pack("<I", 2**30) + b"xx",
    "memo_index": b"\x80\x02Nr" + struct.pack("<I", 2**30) + b".",
}


@pytest.mark.parametrize("lie", sorted(LYING_PICKLES))
@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_a_lying_pickle_allocates_nothing(tmp_path, container, lie):
    import tracemalloc

    from convbn.formats.torch import _LEGACY_MAGIC

    lying = LYING_PICKLES[lie]
    path = tmp_path / "lying.pt"
    if container == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", lying)
            z.writestr("archive/version", b"3\n")
    else:
        path.write_bytes(_LEGACY_MAGIC + b"." + lying)
    tracemalloc.start()
    try:
        message = refused(path, "not a readable torch checkpoint")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**24, (peak, message)
