"""Placing what a write staged: directories (Orbax checkpoints) exclusively, indexes last, nothing
left behind on failure; and which files of a sharded source a conversion may never write over."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest

import convbn
from convbn import ConvBNError
from convbn.cli import main
from convbn.commands._checkpoints import source_files
from convbn.formats import _io
from tests.conftest import need
from tests.formats.builders import assert_same_arrays, random_checkpoint

WIDTHS = (3, 8, 16, 16, 32)  # four layers: four shards at 10KB


def _listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _stage_directory(stage: _io.Stage, marker: str) -> None:
    """Stage an Orbax-like directory at ``stage.path`` whose files say who wrote it."""
    stage.path.mkdir()
    (stage.path / "_METADATA").write_text(marker)
    (stage.path / "d").mkdir()
    (stage.path / "d" / "chunk").write_text(marker)


# -- directories ------------------------------------------------------------------------------------


def test_of_racing_directory_placements_exactly_one_wins_and_the_losers_leave_nothing(tmp_path):
    target = tmp_path / "ckpt"
    writers = 6
    barrier = threading.Barrier(writers)
    outcomes: dict[int, str] = {}

    def write(i: int) -> None:
        with _io.staging(target) as stage:
            _stage_directory(stage, f"writer {i}")
            barrier.wait()
            try:
                stage.place(overwrite=False)
            except ConvBNError as exc:
                outcomes[i] = str(exc)
            except BaseException as exc:  # recorded: the assertion below names it
                outcomes[i] = f"{type(exc).__name__}: {exc}"
            else:
                outcomes[i] = "placed"

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, outcome in outcomes.items() if outcome == "placed"]
    assert len(winners) == 1, outcomes
    losers = {outcome for i, outcome in outcomes.items() if i not in winners}
    assert losers == {f"{target} exists; pass --force (overwrite=True) to overwrite it"}
    assert _listing(tmp_path) == ["ckpt", "ckpt/_METADATA", "ckpt/d", "ckpt/d/chunk"]  # no stage, no claim
    assert (target / "_METADATA").read_text() == (target / "d" / "chunk").read_text() == f"writer {winners[0]}"


def test_a_rival_arriving_between_the_claim_and_the_rename_loses(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    rename = os.rename
    rival: list[str] = []

    def rename_after_the_rival_tried(src: Any, dst: Any) -> None:
        if not rival:  # our claim exists: the other writer, placing now, must fail and leave it alone
            with _io.staging(target) as other:
                _stage_directory(other, "the rival")
                with pytest.raises(ConvBNError) as info:
                    other.place(overwrite=False)
                rival.append(str(info.value))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_after_the_rival_tried)
    with _io.staging(target) as stage:
        _stage_directory(stage, "the first")
        stage.place(overwrite=False)
    assert rival == [f"{target} exists; pass --force (overwrite=True) to overwrite it"]
    assert (target / "d" / "chunk").read_text() == "the first"
    assert _listing(tmp_path) == ["ckpt", "ckpt/_METADATA", "ckpt/d", "ckpt/d/chunk"]


def test_a_failed_rename_removes_the_claim_and_says_so_in_one_line(tmp_path, monkeypatch):
    def failing(src: Any, dst: Any) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "rename", failing)
    target = tmp_path / "ckpt"
    with pytest.raises(ConvBNError) as info, _io.staging(target) as stage:
        _stage_directory(stage, "mine")
        stage.place(overwrite=False)
    assert str(info.value) == f"ckpt could not be placed at {target}: Permission denied"
    assert _listing(tmp_path) == []


def test_a_failure_after_a_directory_was_placed_removes_it(tmp_path):
    (tmp_path / "b").write_text("someone else's")
    with pytest.raises(ConvBNError, match="exists"), _io.staging(tmp_path / "a") as stage:
        _stage_directory(stage, "mine")  # "a" is placed before "b", whose name is taken
        (stage.scratch / "b").write_text("mine")
        stage.place(overwrite=False)
    assert _listing(tmp_path) == ["b"] and (tmp_path / "b").read_text() == "someone else's"


def test_overwriting_a_non_empty_directory_is_refused_in_one_line_and_touches_nothing(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "_METADATA").write_text("theirs")
    with pytest.raises(ConvBNError) as info, _io.staging(target) as stage:
        _stage_directory(stage, "mine")
        stage.place(overwrite=True)
    assert str(info.value).startswith(f"ckpt could not be placed at {target}: ") and "\n" not in str(info.value)
    assert _listing(tmp_path) == ["ckpt", "ckpt/_METADATA"] and (target / "_METADATA").read_text() == "theirs"


def test_fuse_to_an_orbax_directory_that_appears_meanwhile_leaves_it_alone(tmp_path, monkeypatch, capsys):
    need("jax", "flax", "orbax")
    from convbn.commands import fuse

    convbn.save_checkpoint(random_checkpoint(widths=(3, 8)), tmp_path / "m.safetensors", "safetensors")
    dst = tmp_path / "deploy"
    real = fuse.save_checkpoint

    def racing(*args: Any, **kwargs: Any) -> Any:
        written = real(*args, **kwargs)
        dst.mkdir()
        (dst / "theirs").write_text("the other run")
        return written

    monkeypatch.setattr(fuse, "save_checkpoint", racing)
    assert main(["fuse", str(tmp_path / "m.safetensors"), str(dst), "--to", "flax"]) == 2
    assert capsys.readouterr().err == f"convbn fuse: error: {dst} exists; pass --force (overwrite=True) to overwrite it\n"
    assert _listing(tmp_path) == ["deploy", "deploy/theirs", "m.safetensors"]


# -- indexes last -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_index_is_placed_after_every_file_it_names(tmp_path, monkeypatch, overwrite):
    # Shard names that sort after the index's: the order must come from what the index is.
    shards = ["shard-a.safetensors", "z-shard.safetensors"]
    seen: list[tuple[str, bool]] = []
    link, replace = os.link, os.replace

    def watch(real: Any) -> Any:
        def placing(src: Any, dst: Any) -> None:
            if Path(dst).parent == tmp_path:
                seen.append((Path(dst).name, all((tmp_path / s).exists() for s in shards)))
            real(src, dst)
        return placing

    monkeypatch.setattr(os, "link", watch(link))
    monkeypatch.setattr(os, "replace", watch(replace))
    with _io.staging(tmp_path / "model.safetensors") as stage:
        for name in [*shards, "model.safetensors.index.json"]:
            (stage.scratch / name).write_text(name)
        stage.place(overwrite=overwrite)
    assert seen[-1] == ("model.safetensors.index.json", True), seen
    assert _listing(tmp_path) == ["model.safetensors.index.json", *shards]
    assert all((tmp_path / n).read_text() == n for n in _listing(tmp_path))


def test_a_sharded_write_that_loses_to_an_index_leaves_none_of_its_shards(tmp_path, monkeypatch):
    dst = tmp_path / "model.safetensors"
    real = _io.Stage.place

    def racing(self: _io.Stage, **kwargs: Any) -> None:  # the other writer's index lands first
        Path(f"{dst}.index.json").write_text("the other writer")
        real(self, **kwargs)

    monkeypatch.setattr(_io.Stage, "place", racing)
    with pytest.raises(ConvBNError, match="model.safetensors exists"):
        convbn.save_checkpoint(random_checkpoint(widths=WIDTHS), dst, "safetensors", max_shard_size="10KB",
                               overwrite=False)
    assert _listing(tmp_path) == ["model.safetensors.index.json"]
    assert Path(f"{dst}.index.json").read_text() == "the other writer"


# -- a sharded source is every file its index names -------------------------------------------------


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    """A four-shard safetensors checkpoint alone in ``tmp_path/ck``; the directory."""
    convbn.save_checkpoint(random_checkpoint(widths=WIDTHS), tmp_path / "ck" / "model.safetensors",
                           "safetensors", max_shard_size="10KB")
    return tmp_path / "ck"


def test_source_files_of_a_sharded_source_are_its_index_and_every_shard(sharded):
    index = sharded / "model.safetensors.index.json"
    expected = [index, *(sharded / f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5))]
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in expected)
    for named in (sharded, index, sharded / "model.safetensors"):  # every way to name it
        assert source_files(named, "safetensors") == expected, named
    single = sharded.parent / "one.safetensors"
    convbn.save_checkpoint(random_checkpoint(), single, "safetensors")
    assert source_files(single, "safetensors") == [single]


@pytest.mark.parametrize("command", ["convert", "fuse"])
def test_a_shard_of_the_source_is_refused_as_dst_before_reading(sharded, command, capsys, monkeypatch):
    from convbn.commands import convert, fuse

    module = convert if command == "convert" else fuse

    def no_reading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("SRC was read before DST was judged")

    monkeypatch.setattr(module, "load_checkpoint", no_reading)
    before = {p.name: p.read_bytes() for p in sharded.iterdir()}
    shard = sharded / "model-00002-of-00004.safetensors"
    assert main([command, str(sharded), str(shard), "--force"]) == 2
    assert capsys.readouterr().err == (
        f"convbn {command}: error: DST must differ from SRC: convbn never modifies its source, and {shard} is a "
        f"file of {sharded}. Received: DST={str(shard)!r}\n"
    )
    assert {p.name: p.read_bytes() for p in sharded.iterdir()} == before


def test_fuse_of_a_sharded_source_beside_it_reads_every_shard(sharded, capsys):
    original = convbn.load_checkpoint(sharded)
    assert main(["fuse", str(sharded), str(sharded.parent / "fused.safetensors")]) == 0
    fused = convbn.load_checkpoint(sharded.parent / "fused.safetensors")
    expected = convbn.convert.fuse_checkpoint(original)
    assert list(fused.layers) == list(original.layers) == ["layer1", "layer2", "layer3", "layer4"]
    for name, params in expected.layers.items():
        assert_same_arrays(fused.layers[name], params)


def test_the_target_format_message_names_orbax_directories(sharded, capsys):
    dst = sharded.parent / "out"
    assert main(["convert", str(sharded), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "convbn convert: error: the target format must be given with --to or follow from DST's suffix (.pt, .bin, "
        ".safetensors, .weights.h5, .h5, .hdf5, .keras, .msgpack, .ckpt); an Orbax directory, of any other name, takes "
        f"--to flax. Received: DST={str(dst)!r}\n"
    )
    assert not dst.exists()
