"""Sharded safetensors and torch checkpoints (``*.index.json`` + shards), read and written.

Oracles: ``safetensors.numpy.load_file`` and ``torch.load(weights_only=True)`` per shard with the
index (transformers is not installed), and shards written the way transformers' ``save_pretrained``
writes them, with those libraries, from a real torch model.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn import ConvBNError
from convbn.cli import main
from convbn.convert import format_for_path
from convbn.formats._sharded import parse_size, split
from tests.conftest import need
from tests.formats.builders import assert_same_arrays, random_checkpoint
from tests.formats.hostile import cli_refuses, refused, refused_everywhere

WIDTHS = (3, 8, 16, 16, 32)  # four layers, 34,560 bytes of float32 tensors in all


def _index(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _same_layers(a: convbn.Checkpoint, b: convbn.Checkpoint) -> None:
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers.values(), b.layers.values(), strict=True):
        assert_same_arrays(x, y)


# -- sizes and splitting -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("10KB", 10 * 10**3), ("2GiB", 2 * 2**30),
        ("3MiB", 3 * 2**20), ("7kib", 7 * 2**10), ("5Gb", 5 * 10**9 // 8), ("40mb", 40 * 10**6 // 8),
        ("1234", 1234), (1234, 1234),
    ],
)
def test_max_shard_size_reads_as_transformers_reads_it(size, expected):
    # transformers' convert_file_size_to_int: SI units, binary *iB units, and a lowercase final
    # "b" for bits; convbn also takes a plain number of bytes as a string (the CLI's spelling).
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["1.5GB", "GB", "5TB", "-3", "0", "", True, "5 GB"])
def test_a_max_shard_size_that_is_no_size_is_refused(size):
    with pytest.raises(ConvBNError, match="max_shard_size must be a positive number of bytes"):
        parse_size(size)


def test_split_keeps_order_and_closes_a_shard_before_it_overflows():
    rng = random.Random(0)
    for _ in range(200):
        limit = rng.randint(1, 100)
        sizes = [(f"t{i}", rng.randint(0, 150)) for i in range(rng.randint(1, 30))]
        shards = split(sizes, limit)
        size_of = dict(sizes)
        assert [n for shard in shards for n in shard] == [n for n, _ in sizes]
        for shard, following in zip(shards, [*shards[1:], None], strict=True):
            total = sum(size_of[n] for n in shard)
            # Over the limit only a shard whose tensors after the first are empty: one oversized tensor.
            assert total <= limit or sum(size_of[n] for n in shard[1:]) == 0 or size_of[shard[-1]] > limit
            if following:  # greedy: the next shard's first tensor did not fit into this one
                assert total + size_of[following[0]] > limit or total > limit or size_of[following[0]] > limit


def test_the_index_name_is_not_read_as_a_tf_index():
    # Regression: ".index" in "model.safetensors.index.json" made the suffix rule answer slim.
    assert format_for_path("out/model.safetensors.index.json") == "safetensors"
    assert format_for_path("pytorch_model.bin.index.json") == "torch"


# -- safetensors ---------------------------------------------------------------------------------------


@pytest.mark.needs("safetensors")
def test_safetensors_shards_are_what_transformers_writes_and_read_back_bit_exactly(tmp_path):
    from safetensors.numpy import load_file

    ckpt = random_checkpoint(widths=WIDTHS)
    convbn.save_checkpoint(ckpt, tmp_path / "model.safetensors", "safetensors", max_shard_size="10KB")
    index = _index(tmp_path / "model.safetensors.index.json")
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(tmp_path)) == [*files, "model.safetensors.index.json"]
    loaded: dict[str, np.ndarray] = {}
    for file in files:
        shard = load_file(tmp_path / file)
        nbytes = [a.nbytes for a in shard.values()]
        assert sum(nbytes) <= 10_000 or len(nbytes) == 1, file
        assert {t for t, f in index["weight_map"].items() if f == file} == set(shard)
        loaded.update(shard)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in loaded.values())
    for name, params in ckpt.layers.items():
        for field in ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_var"):
            np.testing.assert_array_equal(loaded[f"{name}/{field}"], getattr(params, field))
    for named in (tmp_path / "model.safetensors.index.json", tmp_path, tmp_path / "model.safetensors"):
        back = convbn.load_checkpoint(named)
        assert back.format == "safetensors" and list(back.layers) == list(ckpt.layers)
        _same_layers(ckpt, back)


def test_a_checkpoint_that_fits_stays_one_file_unless_the_index_is_named(tmp_path):
    ckpt = random_checkpoint(widths=WIDTHS)
    convbn.save_checkpoint(ckpt, tmp_path / "a" / "model.safetensors", "safetensors", max_shard_size="5GB")
    assert os.listdir(tmp_path / "a") == ["model.safetensors"]
    convbn.save_checkpoint(ckpt, tmp_path / "b" / "model.safetensors.index.json", "safetensors")
    assert sorted(os.listdir(tmp_path / "b")) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    _same_layers(ckpt, convbn.load_checkpoint(tmp_path / "b"))


def test_a_tensor_larger_than_the_limit_gets_a_shard_of_its_own(tmp_path):
    ckpt = random_checkpoint(widths=WIDTHS)
    convbn.save_checkpoint(ckpt, tmp_path / "model.safetensors", "safetensors", max_shard_size=1000)
    index = _index(tmp_path / "model.safetensors.index.json")["weight_map"]
    # layer4's kernel (3*3*16*32*4 = 18,432 bytes) is alone; its 128-byte vectors share shards.
    alone = index["layer4/kernel"]
    assert [t for t, f in index.items() if f == alone] == ["layer4/kernel"]
    assert index["layer4/bias"] != alone
    _same_layers(ckpt, convbn.load_checkpoint(tmp_path))


def _hf_model() -> Any:
    need("torch")
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, bias=False), torch.nn.BatchNorm2d(16),
    )
    with torch.no_grad():
        for m in model:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model.eval()


def _hf_shards(state: dict[str, Any], directory: Path, suffix: str, save: Any, shards: int = 3) -> Path:
    """``state`` split in order into ``shards`` files under transformers' names, saved with ``save``,
    and the index, its weight_map sorted by name as Hugging Face's index files are."""
    names = list(state)
    chunks = [list(c) for c in np.array_split(np.array(names, dtype=object), shards)]
    files = [f"{'model' if suffix == 'safetensors' else 'pytorch_model'}-{i:05d}-of-{shards:05d}.{suffix}"
             for i in range(1, shards + 1)]
    weight_map = {}
    for i, file in enumerate(files):
        part = {k: state[k] for k in chunks[i]}
        save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    index = directory / (f"model.safetensors{'.index.json'}" if suffix == "safetensors" else "pytorch_model.bin.index.json")
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}))
    return index


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
@pytest.mark.needs("torch", "safetensors")
def test_shards_written_like_transformers_convert_like_the_single_file(tmp_path, suffix):
    import torch
    from safetensors.torch import save_file

    model = _hf_model()
    state = model.state_dict()
    torch.save(state, tmp_path / "single.pt")
    save = (lambda part, path: save_file(part, path, metadata={"format": "pt"})) if suffix == "safetensors" else torch.save
    (tmp_path / "hf").mkdir()
    index = _hf_shards(state, tmp_path / "hf", suffix, save)
    single = convbn.load_checkpoint(tmp_path / "single.pt")
    sharded = convbn.load_checkpoint(index)
    assert list(sharded.layers) == list(single.layers) == ["0", "3", "6"]
    _same_layers(single, sharded)
    # And through the CLI, to torch, verified: the written model computes what the source does.
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out.pt"), "--verify"]) == 0
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(written) == list(state)  # a torch source keeps its module names
    copy = _hf_model()
    with torch.no_grad():
        for p in copy.parameters():
            p.zero_()
    copy.load_state_dict(written)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(copy.eval()(x), model(x), rtol=0, atol=0)


def test_sharded_torch_files_are_what_torch_load_reads(tmp_path):
    need("torch")
    import torch

    ckpt = random_checkpoint(widths=WIDTHS)
    convbn.save_checkpoint(ckpt, tmp_path / "pytorch_model.bin", "torch", max_shard_size="10KB")
    index = _index(tmp_path / "pytorch_model.bin.index.json")["weight_map"]
    files = sorted(set(index.values()))
    n = len(files)
    assert n > 1 and files == [f"pytorch_model-{i:05d}-of-{n:05d}.bin" for i in range(1, n + 1)]
    state: dict[str, Any] = {}
    for file in files:
        part = torch.load(tmp_path / file, weights_only=True)
        assert {k for k, f in index.items() if f == file} == set(part)
        state.update(part)
    for name, params in ckpt.layers.items():
        np.testing.assert_array_equal(state[f"{name}.conv.weight"].numpy(), np.asarray(params.kernel).transpose(3, 2, 0, 1))
        np.testing.assert_array_equal(state[f"{name}.bn.running_var"].numpy(), params.moving_var)
    _same_layers(ckpt, convbn.load_checkpoint(tmp_path / "pytorch_model.bin"))


def test_cli_converts_shards_to_shards_and_verifies(tmp_path, capsys):
    need("torch")
    convbn.save_checkpoint(random_checkpoint(widths=WIDTHS), tmp_path / "src" / "pytorch_model.bin", "torch",
                           max_shard_size="10KB")
    dst = tmp_path / "dst" / "model.safetensors"
    assert main(["convert", str(tmp_path / "src"), str(dst), "--max-shard-size", "9000", "--verify"]) == 0
    assert "verified: all 4 layer(s)" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "dst")) > 2 and not dst.exists()
    _same_layers(convbn.load_checkpoint(tmp_path / "src"), convbn.load_checkpoint(dst))


@pytest.mark.needs("msgpack")
def test_cli_refuses_a_max_shard_size_for_a_format_written_whole(tmp_path, capsys):
    convbn.save_checkpoint(random_checkpoint(widths=WIDTHS), tmp_path / "m.safetensors", "safetensors")
    before = sorted(os.listdir(tmp_path))
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "m.msgpack"), "--max-shard-size", "1KB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the flax format is written whole" in err[0] and "--max-shard-size '1KB'" in err[0]
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "o.safetensors"), "--max-shard-size", "1.5GB"]) == 2
    assert "--max-shard-size must be a positive number" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_a_failed_sharded_write_leaves_no_shard(tmp_path, monkeypatch, fmt):
    if fmt == "torch":
        need("torch")
    def fail(*args: Any) -> None:
        raise ConvBNError("disk full (simulated)")

    # The index is written last, after every shard: failing there leaves shards in the scratch only.
    monkeypatch.setattr(f"convbn.formats.{fmt}.write_index", fail)
    dst = tmp_path / "out" / "model.x"
    with pytest.raises(ConvBNError, match="simulated"):
        convbn.save_checkpoint(random_checkpoint(widths=WIDTHS), dst, fmt, max_shard_size="10KB")
    assert os.listdir(tmp_path) == []  # no shard, no index, and the created directory removed


# -- hostile indexes ---------------------------------------------------------------------------------------


@pytest.fixture(params=["safetensors", "torch"])
def shards(request, tmp_path) -> Path:
    """A four-shard checkpoint in ``tmp_path/ck``; the index's path."""
    if request.param == "torch":
        need("torch")
    name = "model.safetensors" if request.param == "safetensors" else "pytorch_model.bin"
    convbn.save_checkpoint(random_checkpoint(widths=WIDTHS), tmp_path / "ck" / name, request.param, max_shard_size="10KB")
    return tmp_path / "ck" / f"{name}.index.json"


def _edit(index: Path, edit: Any) -> Path:
    document = _index(index)
    edit(document["weight_map"])
    index.write_text(json.dumps(document))
    return index


def _first_shard(index: Path) -> str:
    return next(iter(_index(index)["weight_map"].values()))  # type: ignore[no-any-return]


def test_a_shard_outside_the_index_directory_is_refused(shards, tmp_path):
    outside = tmp_path / "elsewhere.bin"
    (shards.parent / _first_shard(shards)).rename(outside)
    for name in ("../elsewhere.bin", str(outside)):
        _edit(shards, lambda m, name=name: m.update(dict.fromkeys(m, name)))
        refused_everywhere(shards, f"shard {name!r} lies outside the index's directory")


def test_a_missing_shard_is_refused(shards):
    first = _first_shard(shards)
    (shards.parent / first).unlink()
    refused_everywhere(shards, f"shard {first!r} is missing")


def test_a_tensor_in_two_shards_is_refused(shards):
    # The second shard's file replaced by a copy of the first: its tensors are then in both.
    first, second = sorted(set(_index(shards)["weight_map"].values()))[:2]
    (shards.parent / second).write_bytes((shards.parent / first).read_bytes())
    refused_everywhere(shards, "is in two shards", f"{first} and {second}")


def test_a_weight_map_naming_a_tensor_its_shard_lacks_is_refused(shards):
    weight_map = _index(shards)["weight_map"]
    first, second = sorted(set(weight_map.values()))[:2]
    moved = next(t for t, f in weight_map.items() if f == second)
    _edit(shards, lambda m: m.update({moved: first}))
    refused_everywhere(shards, f"puts tensor {moved!r} in {first}, which does not hold it")


def test_a_shard_holding_a_tensor_the_index_does_not_list_is_refused(shards):
    dropped = next(iter(_index(shards)["weight_map"]))
    _edit(shards, lambda m: m.pop(dropped))
    refused_everywhere(shards, f"holds tensor {dropped!r}, which the weight_map does not put there")


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("{", "not JSON"),
        ('{"weight_map": []}', 'non-empty "weight_map"'),
        ('{"weight_map": {}}', 'non-empty "weight_map"'),
        ('{"weight_map": {"a": 3}}', 'non-empty "weight_map"'),
        ('{"weight_map": {"a": "x"}, "metadata": 1}', '"metadata" object'),
        ('{"weight_map": {"a": "x"}, "x": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ],
)
def test_a_corrupt_index_is_refused(shards, content, said):
    first = _first_shard(shards)
    shards.write_text(content.replace('"x"', json.dumps(first)))
    refused_everywhere(shards, said)


def test_a_shard_that_is_no_regular_file_is_refused(shards):
    last = sorted(set(_index(shards)["weight_map"].values()))[-1]
    (shards.parent / last).unlink()
    os.mkfifo(shards.parent / last)  # opening it would block
    refused_everywhere(shards, f"shard {last!r} must be a regular file")


@pytest.mark.needs("safetensors")
def test_safetensors_shards_with_differing_metadata_are_refused(tmp_path):
    from safetensors.numpy import save_file

    ckpt = random_checkpoint(widths=WIDTHS)
    convbn.save_checkpoint(ckpt, tmp_path / "model.safetensors", "safetensors", max_shard_size="10KB")
    from safetensors.numpy import load_file

    last = sorted(set(_index(tmp_path / "model.safetensors.index.json")["weight_map"].values()))[-1]
    save_file(load_file(tmp_path / last), tmp_path / last, metadata={"format": "pt"})
    refused_everywhere(tmp_path / "model.safetensors.index.json", f"shard {last} has other __metadata__")


def test_a_corrupt_shard_is_refused_naming_the_shard(shards):
    last = shards.parent / sorted(set(_index(shards)["weight_map"].values()))[-1]
    last.write_bytes(last.read_bytes()[:200])
    message = refused(shards.parent, str(last))
    assert "truncated" in message or "corrupted" in message, message
    cli_refuses(shards.parent)


def test_a_torch_shard_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    need("torch")
    import zipfile

    import torch

    marker = tmp_path / "ran"
    convbn.save_checkpoint(random_checkpoint(widths=WIDTHS), tmp_path / "pytorch_model.bin", "torch",
                           max_shard_size="10KB")
    index = tmp_path / "pytorch_model.bin.index.json"
    last = tmp_path / sorted(set(_index(index)["weight_map"].values()))[-1]
    keys = list(torch.load(last, weights_only=True))
    evil = pickle.dumps({k: _Run(str(marker)) for k in keys}, protocol=2)
    members = {}
    with zipfile.ZipFile(last) as z:
        members = {info.filename: z.read(info.filename) for info in z.infolist()}
    with zipfile.ZipFile(last, "w", zipfile.ZIP_STORED) as out:
        for name, data in members.items():
            out.writestr(name, evil if name.endswith("/data.pkl") else data)
    refused_everywhere(index, "refused to unpickle", str(last))
    assert not marker.exists()


class _Run:
    """Unpickling it runs ``touch``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_directory_with_two_indexes_is_refused_naming_them(tmp_path):
    need("torch")
    ckpt = random_checkpoint(widths=WIDTHS)
    convbn.save_checkpoint(ckpt, tmp_path / "model.safetensors", "safetensors", max_shard_size="10KB")
    convbn.save_checkpoint(ckpt, tmp_path / "pytorch_model.bin", "torch", max_shard_size="10KB")
    refused_everywhere(tmp_path, "holds 2 shard indexes (model.safetensors.index.json, pytorch_model.bin.index.json)")


def test_an_existing_sharded_destination_needs_force(tmp_path, capsys):
    convbn.save_checkpoint(random_checkpoint(widths=WIDTHS), tmp_path / "m.safetensors", "safetensors")
    dst = tmp_path / "out" / "model.safetensors"
    args = ["convert", str(tmp_path / "m.safetensors"), str(dst), "--max-shard-size", "10KB"]
    assert main(args) == 0
    written = {f: (tmp_path / "out" / f).stat().st_mtime_ns for f in os.listdir(tmp_path / "out")}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"convbn convert: error: {dst}.index.json exists (a sharded checkpoint written at {dst}); "
                   "pass --force to overwrite it"]
    with pytest.raises(ConvBNError, match="refusing to overwrite"):
        convbn.save_checkpoint(random_checkpoint(widths=WIDTHS), dst, "safetensors", max_shard_size="10KB",
                               overwrite=False)
    assert {f: (tmp_path / "out" / f).stat().st_mtime_ns for f in os.listdir(tmp_path / "out")} == written
    assert main([*args, "--force"]) == 0


def test_a_sharded_source_is_never_written_over(tmp_path, capsys):
    convbn.save_checkpoint(random_checkpoint(widths=WIDTHS), tmp_path / "model.safetensors", "safetensors",
                           max_shard_size="10KB")
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    # DST's shards get the source's shard names: writing them would replace the source.
    dst = tmp_path / "model.safetensors"
    assert main(["convert", str(tmp_path), str(dst), "--max-shard-size", "10KB", "--force", "--no-conv-bias"]) == 2
    assert "DST must differ from SRC" in capsys.readouterr().err
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before


# -- mutation fuzzing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_mutated_indexes_load_or_are_refused_in_one_line(tmp_path, fmt):
    from tests.fuzz.mutate import mutate, shard_index

    if fmt == "torch":
        need("torch")
    name = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    reference = random_checkpoint(widths=WIDTHS)
    convbn.save_checkpoint(reference, tmp_path / name, fmt, max_shard_size="10KB")
    index = tmp_path / f"{name}.index.json"
    original = index.read_bytes()
    outcomes = {"read": 0, "refused": 0}
    for seed in range(80):
        rng = random.Random(seed)
        if rng.random() < 0.5:
            data, how = shard_index(rng, original), "index lie"
        else:
            data, how, _ = mutate(rng, index.name, original)
        index.write_bytes(data)
        try:
            ckpt = convbn.load_checkpoint(index)
        except ConvBNError as exc:
            assert "\n" not in str(exc) and str(tmp_path) in str(exc), (seed, how, str(exc))
            outcomes["refused"] += 1
            if seed % 10 == 0:
                cli_refuses(index)
            continue
        except Exception as exc:  # pragma: no cover - the failure being looked for
            pytest.fail(f"seed {seed} ({how}): {type(exc).__name__}: {exc}")
        # Read: then it is the same checkpoint (a lie that left every tensor where it is).
        _same_layers(reference, ckpt)
        outcomes["read"] += 1
    assert outcomes["refused"] > 40, outcomes  # most lies are caught, not read past


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_a_write_never_leaves_the_other_layout_beside_it(tmp_path, capsys, fmt):
    """With --force too: a sharded write over a single file (or the reverse) would leave the old
    layout in place, and the path and its directory would then read as two checkpoints."""
    need(fmt)
    suffix = {"safetensors": "safetensors", "torch": "bin"}[fmt]
    old, new = random_checkpoint(widths=WIDTHS, seed=1), random_checkpoint(widths=WIDTHS, seed=2)
    single = tmp_path / "a" / f"model.{suffix}"
    single.parent.mkdir()
    convbn.save_checkpoint(old, single, fmt)
    with pytest.raises(ConvBNError, match="single-file checkpoint, which a sharded write would leave"):
        convbn.save_checkpoint(new, single, fmt, overwrite=True, max_shard_size="10KB")
    src = tmp_path / "new.safetensors"
    convbn.save_checkpoint(new, src, "safetensors")
    assert main(["convert", str(src), str(single), "--to", fmt, "--force", "--max-shard-size", "10KB"]) == 2
    assert "a sharded write would leave" in capsys.readouterr().err
    assert sorted(os.listdir(single.parent)) == [single.name]
    _same_layers(convbn.load_checkpoint(single), old)

    sharded = tmp_path / "b" / f"model.{suffix}"
    sharded.parent.mkdir()
    convbn.save_checkpoint(old, sharded, fmt, max_shard_size="10KB")
    before = sorted(os.listdir(sharded.parent))
    with pytest.raises(ConvBNError, match="which a single-file write would leave beside it"):
        convbn.save_checkpoint(new, sharded, fmt, overwrite=True)
    assert main(["convert", str(src), str(sharded), "--to", fmt, "--force"]) == 2
    assert "a single-file write would leave" in capsys.readouterr().err
    assert sorted(os.listdir(sharded.parent)) == before
    convbn.save_checkpoint(new, sharded, fmt, overwrite=True, max_shard_size="10KB")  # same layout: fine
    _same_layers(convbn.load_checkpoint(sharded.parent), new)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_an_index_that_leaves_out_a_whole_shard_is_refused(tmp_path, fmt):
    """Deleting the weight_map entries of one whole shard (here the only tensor of shard 3 of 4)
    must not read as a smaller checkpoint: the numbering says a shard is missing."""
    need(fmt)
    name = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    convbn.save_checkpoint(random_checkpoint(widths=WIDTHS), tmp_path / name, fmt, max_shard_size="10KB")
    index = tmp_path / f"{name}.index.json"
    document = json.loads(index.read_bytes())
    shards = sorted(set(document["weight_map"].values()))
    alone = [t for t, s in document["weight_map"].items() if list(document["weight_map"].values()).count(s) == 1]
    assert alone, document  # the layout this test relies on: one shard holds a single tensor
    gone = document["weight_map"].pop(alone[0])
    index.write_text(json.dumps(document))
    assert len(shards) == 4 and gone in shards
    refused_everywhere(index, repr(gone), "puts no tensor in shard")
