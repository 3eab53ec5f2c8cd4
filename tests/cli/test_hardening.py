"""The CLI and the conversion API refuse surprising input, never harm the source, leave no litter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convbn
from convbn.cli import main
from convbn.errors import ConvBNError
from tests.conftest import require_backend
from tests.formats.builders import random_checkpoint


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src.safetensors"
    convbn.save_checkpoint(random_checkpoint(), path, "safetensors")
    return path


@pytest.fixture
def torch_source(tmp_path):
    require_backend("torch")
    path = tmp_path / "model.pt"
    convbn.save_checkpoint(random_checkpoint(), path, "torch")
    return path


# -- semantics that a conversion would change ---------------------------------------------------------


@pytest.mark.needs("h5py")
def test_a_changed_moving_variance_update_is_noted_or_refused_alike_in_python_and_the_cli(tmp_path, torch_source, capsys):
    ckpt = convbn.load_checkpoint(torch_source)
    assert {p.var_update for p in ckpt.layers.values()} == {"unbiased"}
    written = convbn.save_checkpoint(ckpt, tmp_path / "py.weights.h5", "keras")
    note = ("moving-variance update changes from unbiased to biased for 3 layer(s) (layer1, layer2, layer3): keras "
            "BatchNorms train with the biased batch variance")
    assert [n for n in written.notes if n.startswith(note)]
    with pytest.raises(ConvBNError, match="keras BatchNorms update the moving variance with the biased batch variance"):
        convbn.save_checkpoint(ckpt, tmp_path / "refused.weights.h5", "keras", keep_var_update=True)
    assert not (tmp_path / "refused.weights.h5").exists()
    # Same target convention: no note.
    assert not [n for n in convbn.save_checkpoint(ckpt, tmp_path / "same.pt", "torch").notes if "variance update" in n]

    code, out, _ = _run(capsys, "convert", torch_source, tmp_path / "y.keras")
    assert code == 0 and f"note: {note}" in out
    code, out, err = _run(capsys, "convert", torch_source, tmp_path / "z.keras", "--keep-var-update")
    assert code == 2 and out == "" and err.count("\n") == 1 and "biased batch variance" in err
    assert not (tmp_path / "z.keras").exists()


@pytest.mark.needs("h5py")
def test_a_torch_spelled_momentum_is_refused_with_the_fix(tmp_path, torch_source, capsys):
    code, out, err = _run(capsys, "convert", torch_source, tmp_path / "o.safetensors", "--momentum", "0.1")
    assert code == 2 and out == "" and not (tmp_path / "o.safetensors").exists()
    assert err == ("convbn convert: error: --momentum is the fraction kept, and 0.1 from a torch source looks like "
                   "torch's spelling: torch's momentum=0.1 is 0.9 kept; pass --momentum 0.9 or --torch-momentum 0.1. "
                   "Received: --momentum 0.1\n")
    code, _, err = _run(capsys, "inspect", torch_source, "--momentum", "0.1")
    assert code == 2 and "--torch-momentum 0.1" in err
    for flags in (["--torch-momentum", "0.1"], ["--momentum", "0.9"]):
        dst = tmp_path / f"o{len(flags[0])}.safetensors"
        assert _run(capsys, "convert", torch_source, dst, *flags)[0] == 0
        assert [p.momentum for p in convbn.load_checkpoint(dst).layers.values()] == pytest.approx([0.9] * 3)
    # A real 0.3 kept from a format that spells momentum as kept is taken as given.
    convbn.save_checkpoint(random_checkpoint(), tmp_path / "k.weights.h5", "keras")
    assert _run(capsys, "convert", tmp_path / "k.weights.h5", tmp_path / "k.safetensors", "--momentum", "0.3")[0] == 0
    assert [p.momentum for p in convbn.load_checkpoint(tmp_path / "k.safetensors").layers.values()] == pytest.approx([0.3] * 3)
    with pytest.raises(SystemExit):
        main(["convert", str(torch_source), str(tmp_path / "b.safetensors"), "--momentum", "0.9", "--torch-momentum", "0.1"])


@pytest.mark.needs("torch")
def test_a_destination_suffix_naming_another_format_is_refused(tmp_path, source, capsys):
    dst = tmp_path / "model.safetensors"
    code, out, err = _run(capsys, "convert", source, dst, "--to", "torch")
    assert code == 2 and out == "" and not dst.exists()
    assert err == (f"convbn convert: error: DST's suffix must match --to: 'model.safetensors' names the safetensors "
                   f"format, not torch; rename DST or drop --to. Received: DST={str(dst)!r}, --to torch\n")


# -- the source first ---------------------------------------------------------------------------------


def test_the_source_is_judged_before_the_destination(tmp_path, capsys):
    empty = tmp_path / "emptydir"
    empty.mkdir()
    (tmp_path / "out.pt").write_bytes(b"keep")
    code, _, err = _run(capsys, "convert", empty, tmp_path / "out.pt")
    assert code == 2 and err.startswith(f"convbn convert: error: {empty}: a directory is a checkpoint only when")
    assert (tmp_path / "out.pt").read_bytes() == b"keep"


def test_a_fifo_source_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    # In subprocesses: opening a FIFO blocks until a writer comes, which is what this guards against.
    api = subprocess.run([sys.executable, "-c", f"import convbn; convbn.load_checkpoint({str(fifo)!r})"],
                         capture_output=True, text=True, timeout=120)
    assert api.stderr.splitlines()[-1] == (
        f"convbn.errors.ConvBNError: {fifo}: a checkpoint must be a regular file, a TF checkpoint prefix or a "
        "directory. Received: a FIFO")
    result = subprocess.run([sys.executable, "-m", "convbn", "convert", str(fifo), str(tmp_path / "o.safetensors")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == (
        f"convbn convert: error: {fifo}: a checkpoint must be a regular file, a TF checkpoint prefix or a "
        "directory. Received: a FIFO\n")
    assert not (tmp_path / "o.safetensors").exists()


def test_a_missing_framework_is_named_before_the_source_is_read(tmp_path, source, capsys, monkeypatch):
    import importlib.util

    from convbn.commands import convert as command

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))

    def not_now(*args, **kwargs):
        raise AssertionError("the source was read before the missing framework was reported")

    monkeypatch.setattr(command, "load_checkpoint", not_now)
    code, out, err = _run(capsys, "convert", source, tmp_path / "o.pt")
    assert code == 2 and out == "" and not (tmp_path / "o.pt").exists()
    assert err == "convbn convert: error: the torch format needs torch, which is not installed: pip install 'convbn[torch]'\n"


# -- the source is never harmed -----------------------------------------------------------------------


@pytest.fixture
def slim_source(tmp_path):
    require_backend("tensorflow")
    prefix = tmp_path / "ck" / "model.ckpt"
    prefix.parent.mkdir()
    convbn.save_checkpoint(random_checkpoint(), prefix, "slim")
    (tmp_path / "ck" / "model.ckpt.meta").write_bytes(b"a graph")  # a file of the checkpoint as well
    return prefix


def test_no_destination_may_be_a_file_of_the_source_checkpoint(tmp_path, slim_source, capsys):
    ck = slim_source.parent
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    os.link(ck / "model.ckpt.data-00000-of-00001", tmp_path / "alias.safetensors")
    os.symlink(ck / "model.ckpt.index", tmp_path / "link.safetensors")
    targets = [ck / "model.ckpt.data-00000-of-00001", ck / "model.ckpt.meta", ck / "model.ckpt.index",
               tmp_path / "alias.safetensors", tmp_path / "link.safetensors", ck / "sub" / ".." / "model.ckpt.meta"]
    for src in (slim_source, ck):
        for dst in targets:
            code, out, err = _run(capsys, "convert", src, dst, "--to", "safetensors", "--force")
            assert code == 2 and out == "", (src, dst, err)
            assert err.startswith("convbn convert: error: DST must differ from SRC: convbn never modifies its source"), err
    # Written as slim onto the same prefix, through its directory or its index.
    for dst in (slim_source, ck / "model.ckpt.index"):
        assert _run(capsys, "convert", slim_source, dst, "--force")[0] == 2
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    assert (tmp_path / "alias.safetensors").read_bytes() == before["model.ckpt.data-00000-of-00001"]


# -- destination directories, staging litter, races ---------------------------------------------------


def test_missing_destination_directories_are_created_and_removed_on_failure(tmp_path, source, capsys, monkeypatch):
    dst = tmp_path / "out" / "sub" / "model.safetensors"
    code, _, err = _run(capsys, "convert", source, dst)
    assert code == 0, err
    assert convbn.load_checkpoint(dst).layers.keys() == convbn.load_checkpoint(source).layers.keys()
    convbn.save_checkpoint(convbn.load_checkpoint(source), tmp_path / "py" / "m.safetensors", "safetensors")
    assert (tmp_path / "py" / "m.safetensors").is_file()
    from convbn.formats import safetensors

    def broken(ckpt, path, *args, **kwargs):
        raise ConvBNError("the writer failed")

    with monkeypatch.context() as m:  # a failing Python write leaves no directory behind either
        m.setattr(safetensors, "write", broken)
        with pytest.raises(ConvBNError, match="the writer failed"):
            convbn.save_checkpoint(convbn.load_checkpoint(source), tmp_path / "py2" / "m.safetensors", "safetensors")
    assert not (tmp_path / "py2").exists()

    from convbn.commands import convert as command

    def failing(ckpt, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise ConvBNError("the write failed")

    monkeypatch.setattr(command, "save_checkpoint", failing)
    code, _, err = _run(capsys, "convert", source, tmp_path / "new" / "deeper" / "m.safetensors")
    assert code == 2 and err == "convbn convert: error: the write failed\n"
    assert not (tmp_path / "new").exists()
    code, _, _ = _run(capsys, "convert", source, tmp_path / "out" / "other" / "m.safetensors")
    assert code == 2 and _listing(tmp_path / "out") == ["sub", "sub/model.safetensors"]  # only what convbn created goes


def test_stale_stages_of_dead_runs_are_cleaned_and_live_ones_kept(tmp_path, source, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".o.safetensors.convbn{dead.pid}.k1llz.stage"
    stale.mkdir()
    (stale / "o.safetensors").write_bytes(b"partial")
    stale_tmp = tmp_path / f".o.safetensors.convbn{dead.pid}.x.tmp"
    stale_tmp.mkdir()
    live = tmp_path / f".o.safetensors.convbn{os.getppid()}.l1ve.stage"
    live.mkdir()
    foreign = tmp_path / ".o.safetensors.someone.stage"
    foreign.mkdir()
    assert _run(capsys, "convert", source, tmp_path / "o.safetensors")[0] == 0
    assert _listing(tmp_path) == sorted([live.name, foreign.name, "o.safetensors", "src.safetensors"])


def test_a_destination_that_appears_during_the_write_wins(tmp_path, source, capsys, monkeypatch):
    from convbn.commands import convert as command

    real = command.save_checkpoint
    dst = tmp_path / "o.safetensors"

    def racing(ckpt, path, *args, **kwargs):
        written = real(ckpt, path, *args, **kwargs)
        dst.write_bytes(b"the other run")
        return written

    monkeypatch.setattr(command, "save_checkpoint", racing)
    code, out, err = _run(capsys, "convert", source, dst)
    assert code == 2 and out == "" and err == f"convbn convert: error: {dst} exists; pass --force (overwrite=True) to overwrite it\n"
    assert dst.read_bytes() == b"the other run"
    assert _listing(tmp_path) == ["o.safetensors", "src.safetensors"]
    assert _run(capsys, "convert", source, dst, "--force")[0] == 0  # --force replaces it
    assert dst.read_bytes() != b"the other run"


def test_save_checkpoint_without_overwrite_is_exclusive(tmp_path, source, monkeypatch):
    from convbn.formats import _io

    real = _io.Stage.place
    dst = tmp_path / "o.safetensors"

    def racing(self, **kwargs):  # the other writer places its file after our check, before ours
        dst.write_bytes(b"the other writer")
        real(self, **kwargs)

    monkeypatch.setattr(_io.Stage, "place", racing)
    with pytest.raises(ConvBNError, match="o.safetensors exists"):
        convbn.save_checkpoint(convbn.load_checkpoint(source), dst, "safetensors", overwrite=False)
    assert dst.read_bytes() == b"the other writer" and _listing(tmp_path) == ["o.safetensors", "src.safetensors"]


def test_two_concurrent_converts_to_one_destination_one_wins(tmp_path, source):
    dst = tmp_path / "o.safetensors"
    runs = [subprocess.Popen([sys.executable, "-m", "convbn", "convert", str(source), str(dst)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    assert next(err for code, err in results if code == 2).startswith(f"convbn convert: error: {dst} exists")
    assert _listing(tmp_path) == ["o.safetensors", "src.safetensors"]


# -- verify says what it verified ---------------------------------------------------------------------


@pytest.mark.needs("h5py")
def test_verify_names_the_geometry_it_checked(tmp_path, torch_source, capsys):
    code, out, _ = _run(capsys, "convert", torch_source, tmp_path / "o.safetensors", "--verify")
    assert code == 0
    assert ("verify geometry, every layer: stride 1, padding 'SAME', dilation 1 (not from the file: its format "
            "stores no geometry)") in out.splitlines()
    code, out, _ = _run(capsys, "convert", torch_source, tmp_path / "j.safetensors", "--verify", "--json")
    rows = json.loads(out)["verify"]
    assert [r["geometry"] for r in rows] == ["stride 1, padding 'SAME', dilation 1 (not from the file: its format stores no geometry)"] * 3
    ckpt = random_checkpoint(stride=2, padding="VALID")
    convbn.save_checkpoint(ckpt, tmp_path / "g.keras", "keras")  # a .keras config states the geometry
    checks = convbn.convert.verify_checkpoint(convbn.load_checkpoint(tmp_path / "g.keras"),
                                              convbn.load_checkpoint(tmp_path / "g.keras"))
    assert [c.geometry for c in checks] == ["stride 2, padding 'VALID', dilation 1 (from the file)"] * 3


# -- a fused checkpoint is named as one ---------------------------------------------------------------


def test_load_into_names_a_fused_torch_checkpoint(tmp_path, torch_source, capsys):
    import torch

    assert _run(capsys, "fuse", torch_source, tmp_path / "fused.pt")[0] == 0
    ckpt = random_checkpoint()
    model = torch.nn.Sequential(*[m for p in ckpt.layers.values() for m in (
        torch.nn.Conv2d(p.in_channels, p.out_channels, 3, padding=1), torch.nn.BatchNorm2d(p.out_channels))])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConvBNError, match="a fused checkpoint has no BatchNorm statistics"):
        convbn.load_into(model, tmp_path / "fused.pt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert np.isfinite(before["1.running_var"].numpy()).all()


# -- a crashed conformance check reads as one ---------------------------------------------------------


def test_a_crashed_conformance_check_reads_error_not_a_passing_number(monkeypatch):
    from convbn import testing
    from convbn.conformance import runner
    from convbn.conformance.report import Report

    real = testing.run

    def crashing(backend, x, params, training, layout, device, dtype, *args, **kwargs):
        if dtype == "float32" and not training and layout == "NCHW":  # NHWC still measures and passes
            raise RuntimeError("Must provide as many biases as the last dimension [4] vs. [0,8,8,3]")
        return real(backend, x, params, training, layout, device, dtype, *args, **kwargs)

    monkeypatch.setattr(testing, "run", crashing)
    report = runner.run(["numpy"], quick=True, gpu=False)
    crashed = [r for r in report.results if r.exception]
    assert crashed and all(r.failed and r.error is None for r in crashed)
    cells = {(s.group, s.dtype): s for s in report.summaries()}
    group = crashed[0].group
    cell = cells[(group, "float32")]
    # The cell also holds measured checks that passed; their number must not stand beside FAIL.
    assert any(r.error is not None and r.status == "pass" for r in report.results
               if (r.group, r.dtype) == (group, "float32"))
    assert cell.cell() == "error: RuntimeError"
    row = next(r for r in report.table().splitlines() if r.split()[:3] == ["numpy", "cpu", group])
    assert "error: RuntimeError" in row and "FAIL" not in row
    summary = next(s for s in report.as_dict()["summary"] if (s["group"], s["dtype"]) == (group, "float32"))
    assert summary["status"] == "fail" and summary["error"] == (
        "RuntimeError: Must provide as many biases as the last dimension [4] vs. [0,8,8,3]")
    assert not report.passed and isinstance(report, Report)


# -- convbn info ----------------------------------------------------------------------------------


def _metadata_version(*dists: str) -> str | None:
    import importlib.metadata

    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@pytest.mark.parametrize("onednn", ["0", None])
def test_info_reports_versions_python_and_onednn_as_installed(onednn):
    import platform

    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    result = subprocess.run([sys.executable, "-m", "convbn", "info", "--json"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["convbn"] == convbn.__version__ and report["python"] == platform.python_version()
    dists = {"numpy": ("numpy",), "torch": ("torch",), "tensorflow": ("tensorflow", "tensorflow-cpu"), "jax": ("jax",)}
    assert {row["backend"]: row["version"] for row in report["backends"]} == {
        name: _metadata_version(*d) for name, d in dists.items()}
    assert all(row["installed"] == (row["version"] is not None) for row in report["backends"])
    assert report["packages"] == {d: _metadata_version(d) for d in report["packages"]}
    assert set(report["packages"]) >= {"keras", "flax", "safetensors", "h5py"}
    if onednn:
        assert report["onednn"] == "TF_ENABLE_ONEDNN_OPTS=0"
    else:  # TensorFlow's default follows the CPU's neural-network instructions
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
        on = bool({"avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile"} & set(flags))
        assert report["onednn"] == f"TF_ENABLE_ONEDNN_OPTS unset (TensorFlow's default on this CPU: {'on' if on else 'off'})"
