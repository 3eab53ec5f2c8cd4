"""A real tf-slim checkpoint converted to torch and flax (and back) through the public API and the CLI.

The checkpoint is the one ``slim_graphs.build_slim`` trains and saves with tf-slim's own layers
(``slim.conv2d`` / ``slim.separable_conv2d`` with ``normalizer_fn=slim.batch_norm``: SAME stride 1,
SAME stride 2, depthwise, VALID dilation 2; with and without gamma). The converted files are
loaded into real ``torch.nn`` and ``flax.linen`` modules, which must reproduce the TF graph's
eval-mode outputs. Every test needs TensorFlow, tf-slim and the target framework, and skips
unless all of them are under test (the tox ``cross`` env).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn.checkpoint import parse_flatten
from tests._support.assertions import rel_err
from tests.reference import tf_same_pads

# Max |module - TF| / max|TF| per layer. The torch and flax modules run in float64 on the
# converted float32 weights (exact in float64), so only the TF graph's float32 rounding remains:
# measured 6.2e-8 to 2.3e-7 over these layers, the same for torch and flax (within 1e-15), as for
# convbn itself in test_slim.py. 2e-6 (test_slim's TOL) leaves 8x headroom and stays far below a
# wrong eps (1e-3 vs 1e-5: ~5e-4).
TOL = 2e-6

pytestmark = pytest.mark.needs("tensorflow", "tf_slim", "tf_keras")


def _tf_values(prefix: str | Path) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _bits_equal(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def torch_file(slim_net: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, convbn.Checkpoint]:
    """The slim network converted to a torch state_dict with load_checkpoint + save_checkpoint."""
    path = tmp_path_factory.mktemp("torch") / "model.pt"
    written = convbn.save_checkpoint(convbn.load_checkpoint(slim_net["prefix"]), path, "torch")
    return path, written


@pytest.mark.needs("torch")
def test_slim_to_torch_modules_reproduce_the_slim_graph(
    slim_net: dict[str, Any], torch_file: tuple[Path, convbn.Checkpoint]
) -> None:
    import torch
    import torch.nn.functional as F

    path, written = torch_file
    ckpt = convbn.load_checkpoint(slim_net["prefix"])
    # The notes say what torch cannot hold: the eps to build with. The head conv and the dense fc
    # (with its BatchNorm) are written as torch modules of their own.
    notes = " ".join(written.notes)
    assert "not written" not in notes
    assert "build the target BatchNorm layers with eps=0.001, momentum=0.001" in notes
    model = torch.nn.ModuleDict()
    for name, p in ckpt.layers.items():  # geometry from the .meta graph, as `convbn inspect` shows it
        block = torch.nn.Module()
        block.conv = torch.nn.Conv2d(p.in_channels, p.out_channels, p.kernel_size, stride=p.stride,
                                     dilation=p.dilation, groups=p.groups, bias=False)
        block.bn = torch.nn.BatchNorm2d(p.out_channels, eps=p.eps)
        model[name] = block
    state = torch.load(path, weights_only=True)
    assert {key.split(".")[0] for key in state} == {*ckpt.layers, "head", "fc"}
    assert np.array_equal(state["head.weight"].numpy(), ckpt.others["head"].kernel.transpose(3, 2, 0, 1))
    model.load_state_dict({k: v for k, v in state.items() if k.split(".")[0] in ckpt.layers}, strict=True)
    model.double().eval()
    raw = slim_net["raw"]
    for i, (name, p) in enumerate(ckpt.layers.items()):
        x = torch.from_numpy(raw["inputs"][i].astype(np.float64)).permute(0, 3, 1, 2)
        if p.padding == "SAME":  # TF's SAME, extra row/column at the bottom/right
            (top, bottom), (left, right) = (
                tf_same_pads(n, k, s, d) for n, k, s, d in zip(x.shape[2:], p.kernel_size, p.stride, p.dilation, strict=True)
            )
            x = F.pad(x, (left, right, top, bottom))
        with torch.no_grad():
            y = model[name].bn(model[name].conv(x)).permute(0, 2, 3, 1).numpy()
        assert rel_err(y, raw["outputs"][i]) < TOL, name


@pytest.mark.needs("jax", "flax")
def test_slim_to_flax_modules_reproduce_the_slim_graph(slim_net: dict[str, Any], tmp_path: Path) -> None:
    import jax
    from flax import linen, serialization

    ckpt = convbn.load_checkpoint(slim_net["prefix"])
    written = convbn.save_checkpoint(ckpt, tmp_path / "model.msgpack", "flax")
    assert "build the target BatchNorm layers with eps=0.001, momentum=0.999" in " ".join(written.notes)

    class Net(linen.Module):
        """One Conv + BatchNorm submodule per layer, named as the layer: the tree convbn writes."""

        @linen.compact
        def __call__(self, xs: list[Any]) -> list[Any]:
            ys = []
            for (name, p), x in zip(ckpt.layers.items(), xs, strict=True):
                block = Block(p.out_channels, p.kernel_size, p.stride, str(p.padding), p.dilation, p.groups, p.eps,
                              name=name)
                ys.append(block(x))
            return ys

    class Block(linen.Module):
        features: int
        kernel_size: tuple[int, int]
        strides: tuple[int, int]
        padding: str
        dilation: tuple[int, int]
        groups: int
        eps: float

        @linen.compact
        def __call__(self, x: Any) -> Any:
            x = linen.Conv(self.features, self.kernel_size, self.strides, self.padding, kernel_dilation=self.dilation,
                           feature_group_count=self.groups, use_bias=False, param_dtype=jax.numpy.float64,
                           name="conv")(x)
            return linen.BatchNorm(use_running_average=True, epsilon=self.eps, param_dtype=jax.numpy.float64,
                                   name="bn")(x)

    xs = [np.asarray(x, np.float64) for x in slim_net["raw"]["inputs"]]
    # The variables' tree, traced only: Net().init itself would compile every initializer.
    template = jax.eval_shape(lambda: Net().init(jax.random.PRNGKey(0), xs))
    # from_bytes checks the file's tree against the module's: every path and shape must match.
    variables = serialization.from_bytes(template, (tmp_path / "model.msgpack").read_bytes())
    variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)
    ys = Net().apply(variables, xs)
    for name, y, want in zip(ckpt.layers, ys, slim_net["raw"]["outputs"], strict=True):
        assert rel_err(np.asarray(y), want) < TOL, name


@pytest.mark.needs("torch")
def test_the_cli_converts_slim_to_torch_asking_for_torch_alone(
    slim_net: dict[str, Any], torch_file: tuple[Path, convbn.Checkpoint], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """``convbn convert model.ckpt model.pt --verify``: it verifies, writes what the API writes, and
    asks for torch alone: the TF checkpoint is read without TensorFlow, so none is imported."""
    import importlib
    import types

    import torch

    import convbn.formats
    from convbn.cli import main

    # Both frameworks are loaded in this process already: let the CLI see none, and record which it
    # asks for.
    asked: list[str] = []

    def import_module(name: str, package: str | None = None) -> Any:
        if name in ("torch", "tensorflow"):
            asked.append(name)
            return sys.modules[name]
        return importlib.import_module(name, package)

    monkeypatch.setattr(convbn.formats, "sys", types.SimpleNamespace(modules={}))
    monkeypatch.setattr(convbn.formats, "importlib", types.SimpleNamespace(import_module=import_module, util=importlib.util))
    dst = tmp_path / "cli.pt"
    assert main(["convert", slim_net["prefix"], str(dst), "--verify"]) == 0
    monkeypatch.undo()
    assert asked == ["torch"]
    assert capsys.readouterr().out.splitlines()[-1] == "verified: all 6 layer(s) within tolerance"
    cli, api = torch.load(dst, weights_only=True), torch.load(torch_file[0], weights_only=True)
    assert list(cli) == list(api)
    assert all(torch.equal(cli[k], api[k]) and cli[k].dtype == api[k].dtype for k in api)


@pytest.mark.needs("torch")
def test_slim_to_torch_to_slim_is_bit_exact(
    slim_net: dict[str, Any], torch_file: tuple[Path, convbn.Checkpoint], tmp_path: Path
) -> None:
    source = convbn.load_checkpoint(slim_net["prefix"])
    via_torch = convbn.load_checkpoint(torch_file[0])
    assert list(via_torch.layers) == list(source.layers)
    # torch stores no groups: the depthwise layer needs it set again (the notes say so).
    via_torch.layers = {
        name: dataclasses.replace(p, groups=source.layers[name].groups) for name, p in via_torch.layers.items()
    }
    # A torch file cannot say that fc reads a flattened map: state the slim graph's.
    fmap = source.others["fc"].flat_in
    assert fmap is not None
    via_torch = via_torch.with_flatten(parse_flatten([f"fc={fmap.height}x{fmap.width}x{fmap.channels}"]))
    prefix = tmp_path / "back.ckpt"
    convbn.save_checkpoint(via_torch, prefix, "slim")
    original, back = _tf_values(slim_net["prefix"]), _tf_values(prefix)
    layer_variables = {name for src in source.sources.values() for name in (*src.conv.values(), *src.bn.values())}
    for name in layer_variables:
        assert _bits_equal(back[name], original[name]), name
    # torch's BatchNorm always has a weight: slim's scale=False layers come back with a gamma of ones.
    no_gamma = [name for name, p in source.layers.items() if p.gamma is None]
    assert no_gamma == ["conv1", "conv2"]
    for name in no_gamma:
        gamma = back[f"{name}/BatchNorm/gamma"]
        assert gamma.dtype == np.float32 and np.array_equal(gamma, np.ones_like(gamma))
    # The head conv and fc come back under slim's names, bit for bit; fc's BatchNorm gains torch's gamma of ones.
    others = {name for layer in source.others.values() for name in layer.tensors.values()}
    for name in others:
        assert _bits_equal(back[name], original[name]), name
    assert np.array_equal(back["fc/BatchNorm/gamma"], np.ones_like(back["fc/BatchNorm/gamma"]))
    assert set(back) == layer_variables | others | {f"{name}/BatchNorm/gamma" for name in [*no_gamma, "fc"]}
