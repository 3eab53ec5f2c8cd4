"""Orbax checkpoints of Flax variables, against orbax-checkpoint itself and real flax.linen models.

Orbax imports JAX and starts its save threads: each write costs about a second, so the tests
share a few directories where they only read.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn import ConvBNError
from convbn.cli import main
from tests.conftest import need, need_module
from tests.formats.builders import assert_same_arrays, random_checkpoint
from tests.formats.hostile import cli_refuses, refused, refused_everywhere

need("jax", "flax", "orbax")
ocp = need_module("orbax.checkpoint")
import jax  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import serialization  # noqa: E402

# float32 JAX conv+BN against torch's: the same float32 arithmetic in another order.
TOL = 1e-5


class Linen(nn.Module):
    """flax.linen default names (Conv_0 + BatchNorm_0, ...), the first conv without a bias."""

    @nn.compact
    def __call__(self, x: Any) -> Any:
        for i, w in enumerate((8, 16, 16)):
            x = nn.Conv(w, (3, 3), padding="SAME", use_bias=i > 0)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
        return x


def _variables(seed: int = 0) -> dict[str, Any]:
    """Trained-looking variables for :class:`Linen` on 3 channels, as NumPy arrays."""
    x = np.zeros((1, 8, 8, 3), np.float32)
    shapes = jax.eval_shape(lambda: Linen().init(jax.random.PRNGKey(0), x))
    rng = np.random.default_rng(seed)
    stats = jax.tree_util.tree_map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype), shapes["batch_stats"])
    params = jax.tree_util.tree_map(lambda a: (rng.standard_normal(a.shape) * 0.3).astype(a.dtype), shapes["params"])
    return {"params": params, "batch_stats": stats}


def _save(tree: Any, path: Path) -> Path:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.absolute(), tree)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return path


def _same(a: convbn.Checkpoint, b: convbn.Checkpoint) -> None:
    assert list(a.layers) == list(b.layers) and [s.reason for s in a.sources.values()] == [
        s.reason for s in b.sources.values()]
    for name in a.layers:
        assert_same_arrays(a.layers[name], b.layers[name])
    assert sorted(a.tensors) == sorted(b.tensors)
    assert sorted(a.dropped) == sorted(b.dropped), (a.dropped, b.dropped)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same linen variables saved by Orbax and by flax's msgpack."""
    directory = tmp_path_factory.mktemp("orbax")
    variables = _variables()
    (directory / "v.msgpack").write_bytes(serialization.to_bytes(variables))
    return {"variables": variables, "orbax": _save(variables, directory / "v"), "msgpack": directory / "v.msgpack"}


def test_an_orbax_checkpoint_reads_as_the_msgpack_file_of_the_same_variables(written):
    orbax = convbn.load_checkpoint(written["orbax"])
    assert orbax.format == "flax" and list(orbax.layers) == ["Conv_0", "Conv_1", "Conv_2"]
    _same(orbax, convbn.load_checkpoint(written["msgpack"]))
    np.testing.assert_array_equal(orbax.layers["Conv_1"].kernel, written["variables"]["params"]["Conv_1"]["kernel"])


def test_a_train_state_drops_and_reports_the_optimizer_as_msgpack_does(tmp_path):
    import optax
    from flax.training import train_state

    class State(train_state.TrainState):
        batch_stats: Any

    variables = _variables(seed=1)
    state = State.create(apply_fn=Linen().apply, params=variables["params"], tx=optax.adam(1e-3),
                         batch_stats=variables["batch_stats"])
    (tmp_path / "s.msgpack").write_bytes(serialization.to_bytes(state))
    orbax = convbn.load_checkpoint(_save(state, tmp_path / "s"))
    msgpack = convbn.load_checkpoint(tmp_path / "s.msgpack")
    assert "step" in orbax.dropped and any(d.startswith("opt_state/0/mu/Conv_0") for d in orbax.dropped)
    _same(orbax, msgpack)


def test_a_convbn_write_round_trips_bit_exactly_and_orbax_restores_it(tmp_path):
    ckpt = random_checkpoint(widths=(3, 8, 16))
    convbn.save_checkpoint(ckpt, tmp_path / "out", "flax")
    back = convbn.load_checkpoint(tmp_path / "out")
    for name, params in ckpt.layers.items():
        assert_same_arrays(params, back.layers[name])
    restored = ocp.StandardCheckpointer().restore((tmp_path / "out").absolute())
    np.testing.assert_array_equal(restored["params"]["layer2"]["conv"]["kernel"], ckpt.layers["layer2"].kernel)
    np.testing.assert_array_equal(restored["batch_stats"]["layer1"]["bn"]["var"], ckpt.layers["layer1"].moving_var)
    # Read from Orbax and written again, the names stay linen's: the same model restores it.
    convbn.save_checkpoint(back, tmp_path / "again", "flax")
    _same(back, convbn.load_checkpoint(tmp_path / "again"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_every_float_dtype_round_trips_bit_exactly(tmp_path, dtype):
    import ml_dtypes

    ckpt = random_checkpoint(widths=(3, 4, 8), dtype=ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    convbn.save_checkpoint(ckpt, tmp_path / "out", "flax")
    back = convbn.load_checkpoint(tmp_path / "out")
    for name, params in ckpt.layers.items():
        assert_same_arrays(params, back.layers[name])


def test_pytree_and_zarr_checkpoints_read_like_standard_ones(tmp_path, written):
    # PyTreeCheckpointer, and without OCDBT: every array a zarr directory named after its keys.
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))
    checkpointer.save((tmp_path / "zarr").absolute(), args=ocp.args.PyTreeSave(written["variables"]))
    checkpointer.close()
    assert (tmp_path / "zarr" / "params.Conv_1.kernel").is_dir()
    ocp.PyTreeCheckpointer().save((tmp_path / "pytree").absolute(), written["variables"])
    expected = convbn.load_checkpoint(written["msgpack"])
    for name in ("zarr", "pytree"):
        _same(convbn.load_checkpoint(tmp_path / name), expected)


def _torch_model() -> Any:
    need("torch")
    import torch

    torch.manual_seed(0)
    layers: list[Any] = []
    for i, (cin, cout) in enumerate([(3, 8), (8, 16), (16, 16)]):
        bn = torch.nn.BatchNorm2d(cout)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
        layers += [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=i > 0), bn, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


@pytest.mark.needs("torch")
def test_torch_to_orbax_restores_into_a_linen_model_with_the_same_outputs(tmp_path, capsys, monkeypatch):
    import torch

    model = _torch_model()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    # Relative paths, as typed: Orbax finds no metadata under a relative path unless convbn makes
    # it absolute (regression: --verify failed reading its own output back).
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "m.pt", "ckpt", "--to", "flax", "--verify"]) == 0
    assert "verified: all 3 layer(s)" in capsys.readouterr().out
    restored = ocp.StandardCheckpointer().restore((tmp_path / "ckpt").absolute())
    # convbn's names, layer "0" = Conv_0 + BatchNorm_0 of Linen: rename and apply.
    params = {f"Conv_{i}": restored["params"][n]["conv"] for i, n in enumerate(("0", "3", "6"))}
    params.update({f"BatchNorm_{i}": restored["params"][n]["bn"] for i, n in enumerate(("0", "3", "6"))})
    stats = {f"BatchNorm_{i}": restored["batch_stats"][n]["bn"] for i, n in enumerate(("0", "3", "6"))}
    x = np.random.default_rng(1).standard_normal((2, 9, 9, 3)).astype(np.float32)
    y = Linen().apply({"params": params, "batch_stats": stats}, x)
    with torch.no_grad():
        expected = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=TOL * float(np.abs(expected).max()))


@pytest.mark.needs("torch")
def test_orbax_to_torch_gives_the_linen_model_s_outputs(tmp_path, written):
    import torch

    assert main(["convert", str(written["orbax"]), str(tmp_path / "m.pt"), "--verify"]) == 0
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    model = _torch_model()
    renamed = {}  # convbn's torch names, layer Conv_0 = Conv_0.conv + Conv_0.bn: Sequential's 0 and 1
    for i, n in enumerate((0, 3, 6)):
        renamed.update({f"{n}.{k}": state[f"Conv_{i}.conv.{k}"] for k in ("weight", "bias") if f"Conv_{i}.conv.{k}" in state})
        renamed.update({f"{n + 1}.{k}": state[f"Conv_{i}.bn.{k}"] for k in
                        ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")})
    model.load_state_dict(renamed)
    x = np.random.default_rng(2).standard_normal((2, 9, 9, 3)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    expected = np.asarray(Linen().apply(written["variables"], x))
    np.testing.assert_allclose(y, expected, rtol=0, atol=TOL * float(np.abs(expected).max()))


def test_a_checkpoint_manager_step_reads_and_its_root_is_refused_naming_the_steps(tmp_path, written):
    manager = ocp.CheckpointManager((tmp_path / "run").absolute())
    for step in (100, 200):
        manager.save(step, args=ocp.args.StandardSave(written["variables"]))
    manager.wait_until_finished()
    manager.close()
    _same(convbn.load_checkpoint(tmp_path / "run" / "200"), convbn.load_checkpoint(written["msgpack"]))
    refused_everywhere(tmp_path / "run", "holds several checkpoints (steps 100, 200)", str(tmp_path / "run" / "200"))


# -- writing -----------------------------------------------------------------------------------------


def test_an_existing_destination_is_never_written_into(tmp_path, capsys):
    ckpt = random_checkpoint(widths=(3, 8))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "mine.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    for dst in ("dir", "file"):
        with pytest.raises(ConvBNError, match="written as a new directory"):
            convbn.save_checkpoint(ckpt, tmp_path / dst, "flax")
    convbn.save_checkpoint(ckpt, tmp_path / "m.safetensors", "safetensors")
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "file"), "--to", "flax", "--force"]) == 2
    assert "written as a new directory, even with --force" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep" and os.listdir(tmp_path / "dir") == ["mine.txt"]


def test_a_failed_orbax_write_leaves_nothing(tmp_path, monkeypatch):
    from convbn.formats import _orbax

    def half(tree: Any, path: Path, custom_metadata: Any = None) -> None:
        path.mkdir()
        (path / "_METADATA").write_text("{}")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(_orbax, "save", half)
    with pytest.raises(OSError, match="simulated"):
        convbn.save_checkpoint(random_checkpoint(widths=(3, 8)), tmp_path / "sub" / "ckpt", "flax", overwrite=False)
    assert os.listdir(tmp_path) == []


def test_without_orbax_checkpoint_the_error_names_the_extra(tmp_path, written, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'convbn\[orbax\]'"):
        convbn.load_checkpoint(written["orbax"])

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the source was read before the missing package was reported")

    monkeypatch.setattr("convbn.commands.convert.load_checkpoint", never)
    assert main(["convert", str(written["msgpack"]), str(tmp_path / "ckpt"), "--to", "flax"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "convbn[orbax]" in err[0] and not (tmp_path / "ckpt").exists()


# -- hostile directories -------------------------------------------------------------------------------


@pytest.fixture
def copy(tmp_path, written) -> Path:
    import shutil

    return Path(shutil.copytree(written["orbax"], tmp_path / "ck"))


def test_a_symlink_out_of_the_checkpoint_is_refused(copy, tmp_path):
    (tmp_path / "secret").write_bytes(b"x" * 100)
    data = next(p for p in (copy / "d").iterdir())
    data.unlink()
    data.symlink_to(tmp_path / "secret")
    refused_everywhere(copy, f"d/{data.name} is a symlink to {tmp_path / 'secret'}, outside the checkpoint")


def test_a_fifo_in_the_checkpoint_is_refused(copy):
    os.mkfifo(copy / "d" / "pipe")
    refused_everywhere(copy, "d/pipe must be a regular file or a directory")


@pytest.mark.parametrize("key", ["../../outside", "a/b", "..", ""])
def test_a_metadata_key_that_could_name_another_path_is_refused(copy, key):
    meta = json.loads((copy / "_METADATA").read_text())
    entry = next(iter(meta["tree_metadata"].values()))
    entry["key_metadata"][-1]["key"] = key
    (copy / "_METADATA").write_text(json.dumps(meta))
    refused_everywhere(copy, f"the tree key {key!r} is not a plain name")


@pytest.mark.parametrize(("content", "said"), [("{", "not JSON"), ("[]", '"tree_metadata" object'),
                                                ('{"tree_metadata": {"a": 1}}', "key_metadata")])
def test_corrupt_metadata_is_refused(copy, content, said):
    (copy / "_METADATA").write_text(content)
    refused_everywhere(copy, said)


def test_missing_or_corrupt_array_data_is_refused_in_one_line(copy):
    for data in (copy / "ocdbt.process_0" / "d").iterdir():
        data.write_bytes(data.read_bytes()[:10])
    refused_everywhere(copy, "not a readable Orbax checkpoint")


def test_arrays_declaring_far_more_than_the_files_hold_are_refused(copy, written, monkeypatch):
    from convbn.formats import _orbax

    # The real bound is 100x the bytes on disk + 64 MiB; a smaller one shows the check runs before
    # anything is restored.
    monkeypatch.setattr(_orbax, "_SLACK", 0)
    monkeypatch.setattr(_orbax, "MAX_EXPANSION", 0)
    total = sum(a.nbytes for a in jax.tree_util.tree_leaves(written["variables"]))
    refused(copy, f"the Orbax metadata declares arrays of {total} bytes", "decompression bomb")
    cli_refuses(copy)


def test_mutated_checkpoints_load_or_are_refused_in_one_line(tmp_path, written):
    import random
    import shutil

    from tests.fuzz.mutate import mutate

    reference = convbn.load_checkpoint(written["orbax"])
    files = sorted(p.relative_to(written["orbax"]) for p in written["orbax"].rglob("*") if p.is_file())
    refusals = 0
    for seed in range(30):
        rng = random.Random(seed)
        copy = Path(shutil.copytree(written["orbax"], tmp_path / f"m{seed}"))
        target = copy / rng.choice(files)
        data, how, _ = mutate(rng, target.name, target.read_bytes())
        target.write_bytes(data)
        try:
            ckpt = convbn.load_checkpoint(copy)
        except ConvBNError as exc:
            assert "\n" not in str(exc) and str(copy) in str(exc), (seed, how, str(exc))
            refusals += 1
            continue
        except Exception as exc:  # pragma: no cover - the failure being looked for
            pytest.fail(f"seed {seed} ({target.relative_to(copy)}, {how}): {type(exc).__name__}: {exc}")
        # Read: the same layers and shapes. Orbax stores no checksum of array data, so bytes damaged
        # inside a data file's chunk read as other values (orbax's own restore reads them too).
        assert list(ckpt.layers) == list(reference.layers), (seed, how)
        for name, params in reference.layers.items():
            assert np.shape(ckpt.layers[name].kernel) == np.shape(params.kernel), (seed, how)
    assert refusals > 0


def test_fuse_writes_an_orbax_directory(tmp_path):
    ckpt = random_checkpoint(widths=(3, 8))
    convbn.save_checkpoint(ckpt, tmp_path / "m.safetensors", "safetensors")
    assert main(["fuse", str(tmp_path / "m.safetensors"), str(tmp_path / "deploy"), "--to", "flax"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["deploy", "m.safetensors"]  # no stage, no claim left over
    # Flax stores no BatchNorm-free marker: a fused layer reads back as a conv without BatchNorm.
    conv = convbn.load_checkpoint(tmp_path / "deploy").others["layer1/conv"]
    expected = convbn.convert.fuse_checkpoint(ckpt).layers["layer1"]
    assert conv.kind == "conv" and conv.tensors == {"kernel": "params/layer1/conv/kernel", "bias": "params/layer1/conv/bias"}
    assert np.array_equal(conv.kernel, expected.kernel)
    assert np.array_equal(conv.bias, expected.bias)
    x = np.random.default_rng(0).standard_normal((1, 5, 5, 3))
    y = convbn.conv_bn(x, ckpt.layers["layer1"], backend="numpy")
    assert np.max(np.abs(convbn.conv_bn(x, expected, backend="numpy") - y)) / np.max(np.abs(y)) < 2e-6
    assert main(["fuse", str(tmp_path / "m.safetensors"), str(tmp_path / "deploy"), "--to", "flax"]) == 2
