"""The ``slim`` format: TF checkpoints read from real tf-slim, DCGAN, tf.compat.v1.layers and TF2
graphs, written as tf-slim, and restored into real ``slim.conv2d(normalizer_fn=slim.batch_norm)``.

Every checkpoint is made by the test itself with the framework's own saver (see ``slim_graphs``).
The graphs are slow to build, so each is built once per test session, shared between xdist
workers through a file lock, and only read afterwards; tests that damage files work on copies.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn.convert import Checkpoint, fold_bias
from convbn.formats import slim
from convbn.layouts import depthwise_to_tf
from tests._support.assertions import rel_err
from tests.conftest import need, need_module
from tests.formats.slim_graphs import need_slim, shared_build

ROOT = Path(__file__).resolve().parents[2]

# tf-slim builds on TF's legacy layers, which warn on every use.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`layer.apply` is deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore:`tf.layers.flatten` is deprecated:UserWarning"),
]

# Max |convbn - TF| / max|TF| of a layer's output: the TF graphs run in float32, convbn here in
# float64 (NumPy backend). Measured 0.6e-7 to 3.2e-7 over every layer below (float32 rounding of
# dot products of at most 5*5*16 = 400 terms, and of the BatchNorm). 2e-6 leaves 6x headroom and
# is still 250x below what a wrong eps (1e-3 vs 1e-5: ~5e-4) or an unfolded bias (>1e-2) gives.
TOL = 2e-6
# Moving statistics after one training step in the TF graph vs convbn's update from the read
# convention: measured <= 4.1e-8 (float32 rounding); the other variance estimator is off by
# >= 5.7e-6 on the 9-values-per-channel batch used.
STATS_TOL = 5e-7

# -- shared fixtures (slim_net and dcgan_net live in conftest.py: other modules convert them too) --


@pytest.fixture(scope="module")
def graph_pairing(tmp_path_factory: pytest.TempPathFactory) -> str:
    need_slim()
    from tests.formats import slim_graphs

    return shared_build(tmp_path_factory, "graph", slim_graphs.build_graph_pairing)  # type: ignore[no-any-return]


def _build_v1_in_subprocess(directory: Path) -> str:
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.formats.slim_graphs", "v1", str(directory)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(directory / "v1.ckpt")


@pytest.fixture(scope="module")
def v1_net(tmp_path_factory: pytest.TempPathFactory) -> str:
    need_slim()  # tf_keras backs tf.compat.v1.layers under TF_USE_LEGACY_KERAS=1
    return shared_build(tmp_path_factory, "v1", _build_v1_in_subprocess)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def keras3_net(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    need("keras")
    from tests.formats import slim_graphs

    return shared_build(tmp_path_factory, "keras3", slim_graphs.build_keras3)  # type: ignore[no-any-return]


def _copy_checkpoint(prefix: str | Path, directory: Path, *, meta: bool = True) -> Path:
    """Copy a checkpoint's files (optionally without its .meta) into ``directory``."""
    prefix = Path(prefix)
    directory.mkdir(parents=True, exist_ok=True)
    for file in prefix.parent.glob(prefix.name + ".*"):
        if meta or not file.name.endswith(".meta"):
            shutil.copy(file, directory / file.name)
    return directory / prefix.name


def _f64(params: convbn.ConvBNParams) -> convbn.ConvBNParams:
    return dataclasses.replace(params, **{k: np.asarray(v, np.float64) for k, v in params.arrays().items()})


def _run(x: np.ndarray, params: convbn.ConvBNParams, **geometry: Any) -> np.ndarray:
    """Eval-mode conv_bn in float64 on the NumPy backend."""
    params = dataclasses.replace(_f64(params), **geometry) if geometry else _f64(params)
    return convbn.conv_bn(np.asarray(x, np.float64), params, backend="numpy")  # type: ignore[no-any-return]


def _tf_values(prefix: str | Path) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _save_raw(prefix: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A name-based checkpoint written by TF's own SaveV2, bypassing convbn's writer."""
    import tensorflow as tf

    tf.raw_ops.SaveV2(
        prefix=str(prefix), tensor_names=list(tensors), shape_and_slices=[""] * len(tensors),
        tensors=[tf.constant(v) for v in tensors.values()],
    )
    return prefix


def _bits_equal(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _assert_same_checkpoint(a: Checkpoint, b: Checkpoint) -> None:
    assert list(a.layers) == list(b.layers)
    for name, pa in a.layers.items():
        pb = b.layers[name]
        for field in ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_var"):
            va, vb = getattr(pa, field), getattr(pb, field)
            assert (va is None) == (vb is None), (name, field)
            assert va is None or _bits_equal(va, vb), (name, field)
        assert pa.groups == pb.groups
    if a.others.keys() == b.others.keys():  # the same layers (names read from a DCGAN file and slim's differ)
        for name, la in a.others.items():
            lb = b.others[name]
            assert (la.kind, la.groups, la.norm is None) == (lb.kind, lb.groups, lb.norm is None), name
            for owner_a, owner_b, fields in ((la, lb, ("kernel", "bias")), (la.norm, lb.norm, _NORM_FIELDS)):
                for field in fields if owner_a is not None else ():
                    va, vb = getattr(owner_a, field), getattr(owner_b, field)
                    assert (va is None) == (vb is None) and (va is None or _bits_equal(va, vb)), (name, field)
        a, b = dataclasses.replace(a, others={}), dataclasses.replace(b, others={})
    # Other layers and tensors by their TF names: in graph order or name order, either may come first.
    held_a, held_b = _held(a), _held(b)
    assert set(held_a) == set(held_b)
    for name, value in held_a.items():
        assert _bits_equal(value, held_b[name]), name


_NORM_FIELDS = ("gamma", "beta", "moving_mean", "moving_var")


def _held(ckpt: Checkpoint) -> dict[str, Any]:
    """Every value outside the conv+BatchNorm pairs by its TF name: the other tensors, and the other
    layers' tensors under the names they were read from (a depthwise kernel in TF's layout)."""
    held = dict(ckpt.tensors)
    for layer in ckpt.others.values():
        norm = layer.norm
        values = {"kernel": layer.kernel, "bias": layer.bias, **({} if norm is None else {
            "gamma": norm.gamma, "beta": norm.beta, "moving_mean": norm.moving_mean, "moving_var": norm.moving_var})}
        for field, name in layer.tensors.items():
            value = values[field]
            if field == "kernel" and layer.kind == "conv" and layer.groups > 1 and np.shape(value)[2] == 1:
                value = depthwise_to_tf(value, layer.groups)
            held[name] = value
    return held


# -- locating a checkpoint: no TensorFlow needed ---------------------------------------------------

MAGIC = bytes.fromhex("57fb808b247547db")


def _fake_checkpoint(directory: Path, name: str = "model.ckpt") -> Path:
    """Files shaped like a TF checkpoint (index footer magic + a data file); enough for sniff."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.index").write_bytes(b"\0" * 40 + MAGIC)
    (directory / f"{name}.data-00000-of-00001").write_bytes(b"")
    return directory / name


def test_sniff_recognises_prefix_files_and_directories(tmp_path: Path) -> None:
    prefix = _fake_checkpoint(tmp_path / "run")
    assert slim.sniff(prefix)
    assert slim.sniff(prefix.with_name("model.ckpt.index"))
    assert slim.sniff(prefix.with_name("model.ckpt.data-00000-of-00001"))
    assert slim.sniff(tmp_path / "run")  # the only .index in the directory
    (tmp_path / "run" / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    assert slim.sniff(tmp_path / "run")
    assert slim.resolve(tmp_path / "run") == prefix


def test_sniff_says_no_without_raising(tmp_path: Path) -> None:
    assert not slim.sniff(tmp_path / "missing.ckpt")
    assert not slim.sniff(tmp_path)  # empty directory
    (tmp_path / "weights.pt").write_bytes(b"PK\x03\x04" + b"\0" * 60)
    assert not slim.sniff(tmp_path / "weights.pt")
    (tmp_path / "cut.index").write_bytes(MAGIC[:4])  # truncated: no footer
    assert not slim.sniff(tmp_path / "cut")
    (tmp_path / "odd.index").write_bytes(b"\1" * 48)  # right size, wrong magic
    assert not slim.sniff(tmp_path / "odd.index")
    (tmp_path / "checkpoint").write_text("garbage")
    assert not slim.sniff(tmp_path)


def test_resolve_follows_the_checkpoint_state_file(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "run", "ckpt-1")
    _fake_checkpoint(tmp_path / "run", "ckpt-2")
    state = tmp_path / "run" / "checkpoint"
    state.write_text('model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-1"\n')
    assert slim.resolve(tmp_path / "run") == tmp_path / "run" / "ckpt-2"
    # An absolute path from before the directory was moved resolves next to the state file.
    state.write_text('model_checkpoint_path: "/elsewhere/gone/ckpt-1"\n')
    assert slim.resolve(tmp_path / "run") == tmp_path / "run" / "ckpt-1"
    # A non-ASCII path: TF 2.21 writes it as UTF-8, text-format writers may escape it in octal.
    moved = _fake_checkpoint(tmp_path / "m\u00f8d", "model.ckpt")
    (moved.parent / "checkpoint").write_text(f'model_checkpoint_path: "{moved}"\n', encoding="utf-8")
    assert slim.resolve(moved.parent) == moved
    escaped = "".join(chr(b) if b < 128 else f"\\{b:03o}" for b in str(moved).encode("utf-8"))
    (moved.parent / "checkpoint").write_text(f'model_checkpoint_path: "{escaped}"\n')
    assert "\\303\\270" in (moved.parent / "checkpoint").read_text()
    assert slim.resolve(moved.parent) == moved
    state.write_text('model_checkpoint_path: "ckpt-9"\n')
    with pytest.raises(convbn.ConvBNError, match=r"ckpt-9\.index is missing"):
        slim.resolve(tmp_path / "run")
    with pytest.raises(convbn.ConvBNError, match=r"expected .*nope\.index.*Received: path="):
        slim.resolve(tmp_path / "nope")


def test_sniff_and_import_load_no_framework(tmp_path: Path) -> None:
    prefix = _fake_checkpoint(tmp_path / "run")
    code = (
        "import sys, pathlib\n"
        "from convbn.formats import slim\n"
        f"print(slim.sniff(pathlib.Path({str(prefix)!r})), slim.sniff(pathlib.Path({str(tmp_path / 'no')!r})))\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'jax', 'keras', 'tf_slim') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["True False", "[]"]


# -- tf-slim ---------------------------------------------------------------------------------------


def test_slim_checkpoint_reproduces_the_slim_graph(slim_net: dict[str, Any]) -> None:
    ckpt = slim.read(slim_net["prefix"])
    # Graph order (conv10 was built second), not name order.
    assert list(ckpt.layers) == ["conv1", "conv10", "conv2", "conv3"]
    assert {s.reason for s in ckpt.sources.values()} == {"graph"}
    assert ckpt.convention == "slim"
    p = ckpt.layers
    assert [q.gamma is not None for q in p.values()] == [False, True, False, True]
    assert all(q.bias is None and q.eps == 1e-3 and q.momentum == 0.999 for q in p.values())
    assert p["conv10"].stride == (2, 2) and p["conv3"].dilation == (2, 2) and p["conv3"].padding == "VALID"
    assert p["conv2"].groups == 16 and p["conv2"].kernel.shape == (3, 3, 1, 32)
    assert ckpt.sources["conv10"].bn["gamma"] == "conv10/BatchNorm/gamma"
    # Provenance: the scopes, and that geometry and eps came from the .meta graph.
    assert [(s.conv_name, s.bn_name) for s in ckpt.sources.values()] == [
        (name, f"{name}/BatchNorm") for name in ("conv1", "conv10", "conv2", "conv3")
    ]
    assert all(s.geometry and s.settings for s in ckpt.sources.values())
    raw = slim_net["raw"]
    for i, params in enumerate(p.values()):
        assert rel_err(_run(raw["inputs"][i], params), raw["outputs"][i]) < TOL
    # A 1x1 conv without BatchNorm and a dense layer with its BatchNorm are layers of their own kinds.
    assert ckpt.tensors == {}
    head, fc = ckpt.others["head"], ckpt.others["fc"]
    assert head.kind == "conv" and head.norm is None and head.tensors == {"kernel": "head/weights", "bias": "head/biases"}
    assert fc.kind == "dense" and fc.bias is None and fc.norm is not None and fc.norm.eps == 1e-3
    assert fc.tensors["moving_var"] == "fc/BatchNorm/moving_variance"
    assert fc.flat_in is not None and fc.flat_in.size == fc.kernel.shape[0]  # slim.flatten of conv3's map
    assert ckpt.order == ["conv1", "conv10", "conv2", "conv3", "head", "fc"]
    assert any("read 2 other layer(s) by kind (conv: head; dense+BatchNorm: fc)" in n for n in ckpt.notes)


def test_slim_values_are_the_checkpoint_values(slim_net: dict[str, Any]) -> None:
    stored = _tf_values(slim_net["prefix"])
    ckpt = slim.read(slim_net["prefix"])
    assert _bits_equal(ckpt.layers["conv1"].kernel, stored["conv1/weights"])
    assert _bits_equal(ckpt.layers["conv3"].moving_var, stored["conv3/BatchNorm/moving_variance"])
    depthwise = stored["conv2/depthwise_weights"]  # (3, 3, 16, 2): output channel c*2 + j
    assert _bits_equal(ckpt.layers["conv2"].kernel[:, :, 0, 2 * 5 + 1], depthwise[:, :, 5, 1])
    held = _held(ckpt)
    assert {"head/weights", "fc/weights", "fc/BatchNorm/moving_mean"} <= set(held)
    for name, value in held.items():
        assert _bits_equal(value, stored[name])


def test_use_ema_reads_the_shadows_and_reproduces_the_ema_graph(slim_net: dict[str, Any]) -> None:
    stored = _tf_values(slim_net["prefix"])
    ckpt = slim.read(slim_net["prefix"], use_ema=True)
    assert _bits_equal(ckpt.layers["conv10"].kernel, stored["conv10/weights/ExponentialMovingAverage"])
    assert not np.array_equal(stored["conv10/weights/ExponentialMovingAverage"], stored["conv10/weights"])
    assert ckpt.sources["conv10"].conv["kernel"] == "conv10/weights/ExponentialMovingAverage"
    # Moving statistics have no shadow: they are read as they are.
    assert _bits_equal(ckpt.layers["conv10"].moving_mean, stored["conv10/BatchNorm/moving_mean"])
    ema = slim_net["ema"]
    for i, params in enumerate(ckpt.layers.values()):
        assert rel_err(_run(ema["inputs"][i], params), ema["outputs"][i]) < TOL
    assert "conv10/weights" in ckpt.dropped
    assert _bits_equal(ckpt.others["head"].kernel, stored["head/weights/ExponentialMovingAverage"])
    plain = slim.read(slim_net["prefix"])
    assert "conv10/weights/ExponentialMovingAverage" in plain.dropped
    assert any("use_ema=True" in n for n in plain.notes)


def test_optimizer_state_is_dropped_never_mixed_in(slim_net: dict[str, Any]) -> None:
    ckpt = slim.read(slim_net["prefix"])
    names = set(_tf_values(slim_net["prefix"]))
    optimizer = {n for n in names if n.endswith(("/Adam", "/Adam_1"))}
    expected = optimizer | {"global_step", "beta1_power", "beta2_power"} | {
        n for n in names if n.endswith("/ExponentialMovingAverage")
    }
    assert len(optimizer) == 2 * 14  # Adam m and v of the 14 trainable variables
    assert set(ckpt.dropped) == expected
    used = {name for src in ckpt.sources.values() for name in (*src.conv.values(), *src.bn.values())}
    others = {name for layer in ckpt.others.values() for name in layer.tensors.values()}
    assert not expected & (used | others | set(ckpt.tensors))
    assert used | others | set(ckpt.tensors) | set(ckpt.dropped) == names  # nothing lost


def test_without_meta_layers_come_in_natural_order_paired_by_naming(slim_net: dict[str, Any], tmp_path: Path) -> None:
    prefix = _copy_checkpoint(slim_net["prefix"], tmp_path, meta=False)
    ckpt = slim.read(prefix)
    with_meta = slim.read(slim_net["prefix"])
    assert list(ckpt.layers) == ["conv1", "conv2", "conv3", "conv10"]
    assert {s.reason for s in ckpt.sources.values()} == {"naming"}
    assert all(p.stride == (1, 1) and p.padding == "SAME" for p in ckpt.layers.values())
    assert not any(s.geometry or s.settings for s in ckpt.sources.values())
    assert ckpt.sources["conv2"].conv_name == "conv2" and ckpt.sources["conv2"].bn_name == "conv2/BatchNorm"
    assert any("no .meta graph" in n for n in ckpt.notes)
    for name, params in ckpt.layers.items():
        assert _bits_equal(params.kernel, with_meta.layers[name].kernel)
    raw = slim_net["raw"]
    geometry = {"conv10": {"stride": 2}, "conv3": {"padding": "VALID", "dilation": 2}}
    for i, name in enumerate(["conv1", "conv10", "conv2", "conv3"]):
        y = _run(raw["inputs"][i], ckpt.layers[name], **geometry.get(name, {}))
        assert rel_err(y, raw["outputs"][i]) < TOL


def test_eps_and_momentum_overrides(slim_net: dict[str, Any]) -> None:
    ckpt = slim.read(slim_net["prefix"], eps=1e-5, momentum=0.9)
    assert all(p.eps == 1e-5 and p.momentum == 0.9 for p in ckpt.layers.values())
    assert any("eps=1e-05 given explicitly" in n for n in ckpt.notes)
    assert any("momentum=0.9" in n for n in ckpt.notes)
    # The override is honoured, so the output no longer matches the eps=1e-3 graph.
    raw = slim_net["raw"]
    assert rel_err(_run(raw["inputs"][0], ckpt.layers["conv1"]), raw["outputs"][0]) > 100 * TOL


# -- pairing by graph, by name, explicitly -----------------------------------------------------------


def test_graph_pairing_beats_naming(graph_pairing: str, tmp_path: Path) -> None:
    ckpt = slim.read(graph_pairing)
    # enc/a feeds enc/b: only the graph knows. conv1 -> relu -> bn1: the graph says no pair.
    assert list(ckpt.layers) == ["enc/a"]
    assert ckpt.sources["enc/a"].reason == "graph"
    assert ckpt.sources["enc/a"].bn["moving_mean"] == "enc/b/moving_mean"
    assert {"conv1/kernel", "bn1/gamma", "bn1/moving_variance"} <= set(_held(ckpt))
    assert ckpt.others["conv1"].norm is None and ckpt.others["bn1"].kind == "batch_norm"
    bare = slim.read(_copy_checkpoint(graph_pairing, tmp_path, meta=False))
    assert list(bare.layers) == ["conv1"]
    assert bare.sources["conv1"].reason == "naming"
    assert "enc/a/kernel" in _held(bare) and "enc/b/beta" in _held(bare)


def test_graph_gives_eps_and_variance_update_through_a_training_switch(tmp_path: Path) -> None:
    need_slim()
    from tests.formats import slim_graphs

    net = slim_graphs.build_training_switch(tmp_path)
    ckpt = slim.read(net["prefix"])
    assert [s.reason for s in ckpt.sources.values()] == ["graph", "graph"]
    c1, c2 = ckpt.layers.values()
    assert (c1.eps, c1.var_update) == (1e-4, "unbiased")  # from the fused op inside the cond
    assert (c2.eps, c2.var_update) == (1e-3, "biased")  # fused=False: TF's moments, biased
    assert any("non-fused BatchNorm" in n and "'c2'" in n for n in ckpt.notes)
    for i, params in enumerate(ckpt.layers.values()):
        assert rel_err(_run(net["inputs"][i], params), net["outputs"][i]) < TOL
    # One training step in the graph moves the statistics as the params' convention says.
    for i, (name, params) in enumerate(ckpt.layers.items()):
        x = np.asarray(net["train_inputs"][i], np.float64)
        _, new = convbn.conv_bn(x, _f64(params), True, backend="numpy")
        stats = net["train_stats"]
        assert rel_err(new.moving_mean, stats[f"{name}/BatchNorm/moving_mean"]) < STATS_TOL
        assert rel_err(new.moving_var, stats[f"{name}/BatchNorm/moving_variance"]) < STATS_TOL
        other = "biased" if params.var_update == "unbiased" else "unbiased"
        _, wrong = convbn.conv_bn(x, dataclasses.replace(_f64(params), var_update=other), True, backend="numpy")
        assert rel_err(wrong.moving_var, stats[f"{name}/BatchNorm/moving_variance"]) > 10 * STATS_TOL


def test_explicit_pairs_win(graph_pairing: str, tmp_path: Path) -> None:
    ckpt = slim.read(graph_pairing, pairs={"conv1": "bn1"})
    assert list(ckpt.layers) == ["enc/a", "conv1"]
    assert [s.reason for s in ckpt.sources.values()] == ["graph", "explicit"]
    stored = _tf_values(graph_pairing)
    assert _bits_equal(ckpt.layers["conv1"].gamma, stored["bn1/gamma"])
    bare = slim.read(_copy_checkpoint(graph_pairing, tmp_path, meta=False), pairs={"enc/a/kernel": "enc/b"})
    assert bare.sources["enc/a"].reason == "explicit"
    assert bare.sources["conv1"].reason == "naming"


def test_explicit_pairs_are_checked(graph_pairing: str) -> None:
    with pytest.raises(convbn.ConvBNError, match=r"no 4-D kernel under 'nothing'"):
        slim.read(graph_pairing, pairs={"nothing": "bn1"})
    with pytest.raises(convbn.ConvBNError, match=r"BatchNorm scope .*Received: pairs\['conv1'\]='bn9'"):
        slim.read(graph_pairing, pairs={"conv1": "bn9"})
    with pytest.raises(convbn.ConvBNError, match=r"'bn1' twice"):
        slim.read(graph_pairing, pairs={"conv1": "bn1", "enc/a": "bn1"})


# -- DCGAN -----------------------------------------------------------------------------------------


def test_dcgan_checkpoint_reproduces_the_dcgan_graph(dcgan_net: dict[str, Any], tmp_path: Path) -> None:
    for prefix, reason in ((dcgan_net["prefix"], "graph"), (_copy_checkpoint(dcgan_net["prefix"], tmp_path, meta=False), "naming")):
        ckpt = slim.read(prefix)
        assert list(ckpt.layers) == ["d_h1_conv", "d_h2_conv"]
        assert {s.reason for s in ckpt.sources.values()} == {reason}
        assert ckpt.convention == "dcgan"
        assert any("DCGAN's code passes epsilon=1e-5 and decay=0.9" in n for n in ckpt.notes)
        assert ckpt.tensors == {} and list(ckpt.others) == ["d_h0_conv"]  # a conv without BatchNorm
        assert ckpt.others["d_h0_conv"].tensors == {"kernel": "d_h0_conv/w", "bias": "d_h0_conv/biases"}
        for i, params in enumerate(ckpt.layers.values()):
            assert params.eps == 1e-5 and params.momentum == 0.9
            assert params.bias is not None and params.gamma is not None
            assert rel_err(_run(dcgan_net["inputs"][i], params, stride=2), dcgan_net["outputs"][i]) < TOL
        explicit = slim.read(prefix, pairs={"d_h1_conv": "d_bn1", "d_h2_conv": "d_bn2"})
        assert {s.reason for s in explicit.sources.values()} == {"explicit"}
        _assert_same_checkpoint(ckpt, explicit)
        # Dropping the bias instead of folding it is visibly wrong.
        params = dataclasses.replace(ckpt.layers["d_h1_conv"], bias=None)
        assert rel_err(_run(dcgan_net["inputs"][0], params, stride=2), dcgan_net["outputs"][0]) > 100 * TOL


def _assert_restores_dcgan(prefix: str | Path, dcgan_net: dict[str, Any]) -> None:
    """``prefix`` restored into ``slim.conv2d(normalizer_fn=slim.batch_norm, normalizer_params=
    {'scale': True, 'epsilon': 1e-5})`` layers reproduces the DCGAN graph's BatchNorm outputs."""
    from tests.formats import slim_graphs

    specs = [
        {"scope": scope, "outputs": out, "kernel": 5, "stride": 2, "scale": True, "epsilon": 1e-5}
        for scope, bn, out in slim_graphs.DCGAN_LAYERS if bn is not None
    ]
    outputs = slim_graphs.run_slim_layers(str(prefix), specs, dcgan_net["inputs"])
    for got, want in zip(outputs, dcgan_net["outputs"], strict=True):
        assert rel_err(got, want) < TOL


@pytest.mark.parametrize("into", ["beta", "moving_mean"])
def test_dcgan_converts_to_slim_with_either_fold(dcgan_net: dict[str, Any], tmp_path: Path, into: str) -> None:
    ckpt = convbn.load_checkpoint(dcgan_net["prefix"])
    prefix = tmp_path / "slim.ckpt"
    written = convbn.save_checkpoint(ckpt, prefix, "slim", fold_bias=into)
    # save_checkpoint returns the checkpoint as written; the one passed in is left alone.
    assert all(p.bias is None for p in written.layers.values())
    assert all(p.bias is not None for p in ckpt.layers.values())
    assert any(f"folded the conv bias of 2 layer(s) into {into}" in n for n in written.notes)
    assert any("build the target BatchNorm layers with eps=1e-05, momentum=0.9" in n for n in written.notes)
    names = set(_tf_values(prefix))
    assert "d_h1_conv/weights" in names and "d_h1_conv/BatchNorm/gamma" in names
    assert not any(n.endswith(("/biases", "/w")) and n.startswith(("d_h1", "d_h2")) for n in names)
    assert {"d_h0_conv/weights", "d_h0_conv/biases"} <= names  # the lone conv, under slim.conv2d's names
    _assert_restores_dcgan(prefix, dcgan_net)
    back = convbn.load_checkpoint(prefix)
    assert back.convention == "slim"
    _assert_same_checkpoint(written, back)


DOC = ROOT / "docs" / "dcgan-to-slim.md"


def _doc_block(fence: str, containing: str) -> str:
    """The one ``fence`` code block of docs/dcgan-to-slim.md that contains ``containing``."""
    blocks = re.findall(rf"^```{fence}\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.S | re.M)
    (block,) = [b for b in blocks if containing in b]
    return block


def _copy_as(prefix: str | Path, new_prefix: Path) -> Path:
    """A checkpoint's files (.index, .data-*, .meta) copied under another prefix."""
    prefix = Path(prefix)
    new_prefix.parent.mkdir(parents=True, exist_ok=True)
    for file in prefix.parent.glob(prefix.name + ".*"):
        shutil.copy(file, new_prefix.with_name(new_prefix.name + file.name[len(prefix.name):]))
    return new_prefix


def test_the_documented_python_conversions_run_as_written(
    dcgan_net: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/dcgan-to-slim.md's two Python snippets, executed from the doc itself."""
    from tests.formats import slim_graphs

    monkeypatch.chdir(tmp_path)
    _copy_as(dcgan_net["prefix"], tmp_path / "checkpoint" / "DCGAN.model-1000")
    (tmp_path / "slim").mkdir()
    # load_checkpoint, rename the lone conv, save_checkpoint(fold_bias="moving_mean"); then the doc's
    # discriminator (at this test's widths) restores everything with a plain Saver().
    exec(_doc_block("python", "convbn.load_checkpoint("), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == ["d_h1_conv graph d_h1_conv/w -> d_bn1/moving_mean", "d_h2_conv graph d_h2_conv/w -> d_bn2/moving_mean"]
    assert any("build the target BatchNorm layers with eps=1e-05, momentum=0.9" in line for line in printed)
    outputs = slim_graphs.run_slim_discriminator("slim/model.ckpt", dcgan_net["x"])
    for got, want in zip(outputs, dcgan_net["outputs"], strict=True):
        assert rel_err(got, want) < TOL
    # Per-layer control: slim.read, fold_bias("beta"), slim.write.
    exec(_doc_block("python", "slim.read("), {})
    _assert_restores_dcgan("slim/model.ckpt", dcgan_net)
    assert "d_h0_conv/weights" in _tf_values("slim/model.ckpt")


def test_the_documented_command_converts_and_verifies(
    dcgan_net: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from convbn.cli import main

    (command,) = [line[2:] for line in _doc_block("console", "--fold-bias beta --verify").splitlines() if line.startswith("$ ")]
    program, *argv = shlex.split(command)
    assert program == "convbn" and "--verify" in argv
    monkeypatch.chdir(tmp_path)
    _copy_as(dcgan_net["prefix"], tmp_path / "dcgan.ckpt")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "verified: all 3 layer(s) within tolerance"  # d_h0_conv too
    assert out.count("folded into beta") == 2
    _assert_restores_dcgan(tmp_path / "slim.ckpt", dcgan_net)


# -- tf.compat.v1.layers ---------------------------------------------------------------------------


def test_v1_layers_checkpoint_reproduces_the_graph(v1_net: str, tmp_path: Path) -> None:
    oracle = np.load(Path(v1_net).parent / "outputs.npz")
    geometry = [{"stride": 2}, {"padding": "VALID", "dilation": 2}, {"padding": "VALID"}]
    for prefix, reason in ((v1_net, "graph"), (_copy_checkpoint(v1_net, tmp_path, meta=False), "naming")):
        ckpt = slim.read(prefix)
        assert list(ckpt.layers) == ["conv1", "conv2", "conv2d"]
        assert {s.reason for s in ckpt.sources.values()} == {reason}
        assert ckpt.sources["conv2d"].bn["gamma"] == "batch_normalization/gamma"
        assert ckpt.convention == "tf_v1_layers"
        assert [p.bias is not None for p in ckpt.layers.values()] == [True, False, True]
        assert all(n.endswith("/Momentum") for n in ckpt.dropped) and len(ckpt.dropped) == 11
        assert ckpt.tensors == {}
        for i, params in enumerate(ckpt.layers.values()):
            extra = geometry[i] if reason == "naming" else {}
            y = _run(oracle[f"input{i}"], params, **extra)
            assert rel_err(y, oracle[f"output{i}"]) < TOL


# -- TF2 object-based ------------------------------------------------------------------------------


def test_keras3_object_checkpoint_reproduces_the_model(keras3_net: dict[str, Any]) -> None:
    ckpt = slim.read(keras3_net["prefix"])
    assert list(ckpt.layers) == ["model/_functional/_operations/1", "model/_functional/_operations/4"]
    assert {s.reason for s in ckpt.sources.values()} == {"order"}
    assert ckpt.convention == "keras3"
    conv, depthwise = ckpt.layers.values()
    assert conv.bias is not None and conv.var_update == "biased"
    assert depthwise.groups == 8 and depthwise.kernel.shape == (3, 3, 1, 16)
    # conv -> relu -> BatchNorm is not a pair; the dense layer stays too.
    assert "model/_functional/_operations/7/_kernel" in ckpt.tensors
    assert "model/_functional/_operations/9/moving_mean" in ckpt.tensors
    assert "model/_functional/_operations/11/_kernel" in ckpt.tensors
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" in ckpt.dropped
    assert all(k.startswith(("optimizer/", "save_counter", "_CHECKPOINTABLE")) for k in ckpt.dropped)
    assert sum(k.startswith("optimizer/_variables/") for k in ckpt.dropped) == 24  # Adam m and v
    for i, (params, geometry) in enumerate(zip(ckpt.layers.values(), [{"stride": 2}, {}], strict=True)):
        y = _run(keras3_net["inputs"][i], params, **geometry)
        assert rel_err(y, keras3_net["outputs"][i]) < TOL


def test_tf_keras_save_weights_checkpoint(tmp_path: Path) -> None:
    need("tf_keras")
    from tests.formats import slim_graphs

    net = slim_graphs.build_tf_keras(tmp_path)
    ckpt = slim.read(net["prefix"])
    assert list(ckpt.layers) == ["layer_with_weights-0", "layer_with_weights-2"]
    assert {s.reason for s in ckpt.sources.values()} == {"order"}
    assert ckpt.convention == "keras2" and ckpt.tensors == {}
    assert ckpt.layers["layer_with_weights-2"].groups == 8  # 'depthwise_kernel'
    for i, (params, geometry) in enumerate(zip(ckpt.layers.values(), [{"stride": 2}, {}], strict=True)):
        assert rel_err(_run(net["inputs"][i], params, **geometry), net["outputs"][i]) < TOL


def test_tf_module_object_checkpoint(tmp_path: Path) -> None:
    need("tensorflow")
    import tensorflow as tf

    rng = np.random.default_rng(5)

    def variable(*shape: int, low: float | None = None) -> tf.Variable:
        value = rng.uniform(low, 2.0, shape) if low is not None else rng.standard_normal(shape)
        return tf.Variable(value.astype(np.float32))

    net = tf.Module()
    net.conv1, net.bn1 = tf.Module(), tf.Module()
    net.conv1.kernel, net.conv1.bias = variable(3, 3, 2, 4), variable(4)
    net.bn1.gamma, net.bn1.beta = variable(4, low=0.5), variable(4)
    net.bn1.moving_mean, net.bn1.moving_variance = variable(4), variable(4, low=0.5)
    prefix = tf.train.Checkpoint(net=net).save(str(tmp_path / "mod" / "ckpt"))
    ckpt = slim.read(tmp_path / "mod")  # the directory, through its 'checkpoint' file
    assert list(ckpt.layers) == ["net/conv1"]
    assert ckpt.sources["net/conv1"].reason == "naming"
    assert ckpt.sources["net/conv1"].conv["kernel"] == "net/conv1/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    assert ckpt.dropped == ["_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/.ATTRIBUTES/VARIABLE_VALUE"]
    assert slim.resolve(tmp_path / "mod") == Path(prefix)
    x = rng.standard_normal((2, 5, 5, 2)).astype(np.float32)
    y = tf.nn.batch_normalization(
        tf.nn.conv2d(x, net.conv1.kernel, 1, "SAME") + net.conv1.bias,
        net.bn1.moving_mean, net.bn1.moving_variance, net.bn1.beta, net.bn1.gamma, 1e-3,
    )
    assert rel_err(_run(x, ckpt.layers["net/conv1"]), y.numpy()) < TOL


# -- writing and round trips -----------------------------------------------------------------------


def test_slim_round_trip_is_bit_exact_and_restores_into_slim(slim_net: dict[str, Any], tmp_path: Path) -> None:
    from tests.formats import slim_graphs

    ckpt = slim.read(slim_net["prefix"])
    prefix = tmp_path / "again.ckpt"
    slim.write(ckpt, prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.ckpt.data-00000-of-00001", "again.ckpt.index"]
    original, written = _tf_values(slim_net["prefix"]), _tf_values(prefix)
    kept = set(original) - set(ckpt.dropped)
    assert set(written) == kept
    for name in kept:
        assert _bits_equal(written[name], original[name]), name
    # The same numbers again, and a real slim graph restores them.
    bare = _copy_checkpoint(slim_net["prefix"], tmp_path / "bare", meta=False)
    _assert_same_checkpoint(slim.read(bare), slim.read(prefix))
    raw = slim_net["raw"]
    outputs = slim_graphs.run_slim_layers(str(prefix), slim_graphs.slim_specs(), raw["inputs"])
    for got, want in zip(outputs, raw["outputs"], strict=True):
        assert rel_err(got, want) < TOL


def test_object_based_and_v1_round_trips(keras3_net: dict[str, Any], v1_net: str, tmp_path: Path) -> None:
    need_slim()
    for i, source in enumerate((keras3_net["prefix"], v1_net)):
        ckpt = slim.read(source)
        # slim has no conv bias: fold it (moving_mean is exact in any dtype), then round-trip.
        folded = dataclasses.replace(ckpt, layers={k: fold_bias(p, "moving_mean") for k, p in ckpt.layers.items()})  # type: ignore[arg-type]
        prefix = tmp_path / f"rt{i}.ckpt"
        slim.write(folded, prefix)
        back = slim.read(prefix)
        _assert_same_checkpoint(folded, back)
        again = tmp_path / f"rt{i}b.ckpt"
        slim.write(back, again)
        assert (prefix.with_name(prefix.name + ".data-00000-of-00001").read_bytes()
                == again.with_name(again.name + ".data-00000-of-00001").read_bytes())


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
def test_write_read_round_trip_keeps_dtype_and_bits(tmp_path: Path, dtype: str) -> None:
    need("tensorflow")
    if dtype == "bfloat16":
        ml_dtypes = need_module("ml_dtypes")
        np_dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        np_dtype = np.dtype(dtype)
    rng = np.random.default_rng(1)

    def arr(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np_dtype)

    layer = convbn.ConvBNParams(
        kernel=arr(3, 3, 4, 6), gamma=arr(6), beta=arr(6), moving_mean=arr(6),
        moving_var=np.abs(arr(6)),
    )
    dw = convbn.ConvBNParams(kernel=arr(3, 3, 1, 8), groups=4, moving_mean=arr(8), moving_var=np.abs(arr(8)))
    ckpt = Checkpoint(
        layers={"block/conv": layer, "dw": dw}, tensors={"logits/weights": arr(6, 3), "step_scale": arr()}, format="slim"
    )
    slim.write(ckpt, tmp_path / "x.ckpt.index")  # the index named: the prefix is x.ckpt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt.data-00000-of-00001", "x.ckpt.index"]
    back = slim.read(tmp_path / "x.ckpt")
    assert back.layers["dw"].beta is not None and not np.any(np.asarray(back.layers["dw"].beta, np.float64))
    back.layers["dw"] = dataclasses.replace(back.layers["dw"], beta=None)
    _assert_same_checkpoint(ckpt, back)
    names = set(_tf_values(tmp_path / "x.ckpt"))
    assert names == {
        "block/conv/weights", "block/conv/BatchNorm/gamma", "block/conv/BatchNorm/beta",
        "block/conv/BatchNorm/moving_mean", "block/conv/BatchNorm/moving_variance",
        "dw/depthwise_weights", "dw/BatchNorm/beta", "dw/BatchNorm/moving_mean",
        "dw/BatchNorm/moving_variance", "logits/weights", "step_scale",
    }


def _layer(bias: bool = False) -> convbn.ConvBNParams:
    return convbn.ConvBNParams(
        kernel=np.ones((1, 1, 2, 3), np.float32), moving_mean=np.zeros(3, np.float32),
        moving_var=np.ones(3, np.float32), bias=np.ones(3, np.float32) if bias else None,
    )


def test_write_refuses_a_conv_bias_and_leaves_nothing(tmp_path: Path) -> None:
    ckpt = Checkpoint(layers={"ok": _layer(), "conv1": _layer(bias=True)})
    with pytest.raises(convbn.ConvBNError, match=r"no conv bias.*fold_bias.*Received: layer 'conv1' with a bias"):
        slim.write(ckpt, tmp_path / "out.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_bad_targets_and_names(tmp_path: Path) -> None:
    with pytest.raises(convbn.ConvBNError, match="not a directory"):
        slim.write(Checkpoint(layers={"a": _layer()}), tmp_path)
    with pytest.raises(convbn.ConvBNError, match="directory .* must exist"):
        slim.write(Checkpoint(layers={"a": _layer()}), tmp_path / "no" / "x.ckpt")
    with pytest.raises(convbn.ConvBNError, match="'a/weights' twice"):
        slim.write(Checkpoint(layers={"a": _layer()}, tensors={"a/weights": np.ones(2)}, format="slim"), tmp_path / "x.ckpt")
    with pytest.raises(convbn.ConvBNError, match="at least one"):
        slim.write(Checkpoint(), tmp_path / "x.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_slim_to_safetensors_and_back_is_bit_exact_and_keeps_geometry(slim_net: dict[str, Any], tmp_path: Path) -> None:
    original = _tf_values(slim_net["prefix"])
    bare = _copy_checkpoint(slim_net["prefix"], tmp_path / "bare", meta=False)
    for i, source in enumerate((slim_net["prefix"], bare)):
        ckpt = convbn.load_checkpoint(source)
        convbn.save_checkpoint(ckpt, tmp_path / f"m{i}.safetensors", "safetensors")
        neutral = convbn.load_checkpoint(tmp_path / f"m{i}.safetensors")
        assert neutral.metadata["source_format"] == "slim"
        for name, p in ckpt.layers.items():
            q, src = neutral.layers[name], neutral.sources[name]
            # Geometry (from the .meta, or the defaults), groups of the depthwise conv2, eps, provenance.
            assert (q.stride, q.padding, q.dilation, q.groups, q.eps) == (p.stride, p.padding, p.dilation, p.groups, p.eps)
            assert (src.conv_name, src.bn_name, src.geometry) == (name, f"{name}/BatchNorm", i == 0)
        prefix = tmp_path / f"back{i}.ckpt"
        convbn.save_checkpoint(neutral, prefix, "slim")
        back = _tf_values(prefix)
        assert set(back) == set(original) - set(ckpt.dropped)  # every tensor: the source is slim
        for name, value in back.items():
            assert _bits_equal(value, original[name]), name


def test_verify_matches_slim_layers_by_name_with_the_eps_of_their_graph(
    slim_net: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from convbn.cli import main
    from convbn.convert import verify_checkpoint

    graph = slim.read(slim_net["prefix"])  # eps 1e-3, read from the .meta's fused BatchNorm ops
    bare = slim.read(_copy_checkpoint(slim_net["prefix"], tmp_path, meta=False))  # eps assumed
    assert list(bare.layers) != list(graph.layers)  # name order, not graph order: matched by name
    for_1e5 = slim.read(slim_net["prefix"], eps=1e-5)
    checks = verify_checkpoint(graph, bare)
    # The other layers too: the head conv with the graph's geometry, fc with its BatchNorm.
    assert [(c.source, c.target, c.ok, c.max_abs) for c in checks] == [
        (n, n, True, 0.0) for n in [*graph.layers, *graph.others]
    ]
    # The graph runs these BatchNorms with 1e-3: a source meant for 1e-5 does not match it ...
    checks = verify_checkpoint(for_1e5, graph)[: len(graph.layers)]  # the conv+BatchNorm pairs
    assert not any(c.ok for c in checks) and min(c.max_rel for c in checks) > 100 * checks[0].tolerance
    # ... while a file that states no eps is run with the source's.
    assert all(c.ok for c in verify_checkpoint(for_1e5, bare))
    # So slim -> slim verifies, though the staged file read back has no .meta.
    assert main(["convert", slim_net["prefix"], str(tmp_path / "out.ckpt"), "--verify"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "verified: all 6 layer(s) within tolerance"


def test_inspect_names_the_scopes_and_the_graph_geometry(slim_net: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from convbn.cli import main

    assert main(["inspect", slim_net["prefix"], "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert [(r["conv"], r["bn"], r["geometry_from_file"], r["stride"]) for r in rows] == [
        ("conv1", "conv1/BatchNorm", True, [1, 1]), ("conv10", "conv10/BatchNorm", True, [2, 2]),
        ("conv2", "conv2/BatchNorm", True, [1, 1]), ("conv3", "conv3/BatchNorm", True, [1, 1]),
    ]


def test_other_tensors_are_written_only_from_a_tf_source(tmp_path: Path) -> None:
    need("tensorflow")
    layer_names = {"a/weights", "a/BatchNorm/beta", "a/BatchNorm/moving_mean", "a/BatchNorm/moving_variance"}
    fc = np.arange(6, dtype=np.float32).reshape(2, 3)
    from_torch = Checkpoint(layers={"a": _layer()}, tensors={"fc.weight": fc}, format="torch")
    written = convbn.save_checkpoint(from_torch, tmp_path / "t.ckpt", "slim")
    assert set(_tf_values(tmp_path / "t.ckpt")) == layer_names
    assert "not written: 1 other tensor(s) of the torch source (fc.weight); tensors of no known layer kind" in " ".join(written.notes)
    # A TF source's tensors travel, also by way of safetensors.
    from_slim = Checkpoint(layers={"a": _layer()}, tensors={"fc/weights": fc}, format="slim")
    convbn.save_checkpoint(from_slim, tmp_path / "s.safetensors", "safetensors")
    convbn.save_checkpoint(convbn.load_checkpoint(tmp_path / "s.safetensors"), tmp_path / "s.ckpt", "slim")
    values = _tf_values(tmp_path / "s.ckpt")
    assert set(values) == layer_names | {"fc/weights"} and _bits_equal(values["fc/weights"], fc)
    with pytest.raises(convbn.ConvBNError, match=r"Received: only other tensors of a torch source, which are not written"):
        convbn.save_checkpoint(Checkpoint(tensors={"fc.weight": fc}, format="torch"), tmp_path / "e.ckpt", "slim")
    assert not list(tmp_path.glob("e.ckpt*"))


def test_a_grouped_conv_is_written_as_weights_and_reported(tmp_path: Path) -> None:
    need("tensorflow")
    rng = np.random.default_rng(3)
    grouped = convbn.ConvBNParams(
        kernel=rng.standard_normal((3, 3, 2, 6)).astype(np.float32), groups=2,
        moving_mean=rng.standard_normal(6).astype(np.float32), moving_var=rng.uniform(0.5, 2, 6).astype(np.float32),
    )
    written = convbn.save_checkpoint(Checkpoint(layers={"g": grouped}), tmp_path / "g.ckpt", "slim")
    assert any("grouped convs written as 'L/weights'" in n and "g (groups=2)" in n for n in written.notes)
    back = convbn.load_checkpoint(tmp_path / "g.ckpt").layers["g"]
    assert back.groups == 1 and _bits_equal(back.kernel, grouped.kernel)
    # The file holds the grouped layer: with groups set again, it computes what the original does.
    x = rng.standard_normal((1, 5, 5, 4))
    assert np.array_equal(_run(x, dataclasses.replace(back, groups=2)), _run(x, grouped))


def test_a_meta_of_another_graph_at_the_prefix_is_refused(
    slim_net: dict[str, Any], dcgan_net: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from convbn.cli import main

    meta = tmp_path / "out.ckpt.meta"
    shutil.copy(slim_net["prefix"] + ".meta", meta)  # e.g. left by an earlier checkpoint at this prefix
    dcgan = convbn.load_checkpoint(dcgan_net["prefix"])
    message = rf"{re.escape(str(meta))} does not: it declares no variable 'd_h1_conv/weights'. Remove or rename it"
    with pytest.raises(convbn.ConvBNError, match=message):
        convbn.save_checkpoint(dcgan, tmp_path / "out.ckpt", "slim")
    # The CLI writes to a staging directory first; it checks the real destination all the same.
    assert main(["convert", dcgan_net["prefix"], str(tmp_path / "out.ckpt"), "--force"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert [p.name for p in tmp_path.iterdir()] == ["out.ckpt.meta"]
    (tmp_path / "junk.ckpt.meta").write_bytes(b"\xff not a graph")
    with pytest.raises(convbn.ConvBNError, match=r"junk\.ckpt\.meta does not: not a readable MetaGraphDef"):
        convbn.save_checkpoint(dcgan, tmp_path / "junk.ckpt", "slim")
    # The graph the weights are for is kept, and a later read takes order, pairs and geometry from it.
    written = convbn.save_checkpoint(convbn.load_checkpoint(slim_net["prefix"]), tmp_path / "out.ckpt", "slim")
    assert any(n.startswith(f"kept {meta}: it declares every variable written") for n in written.notes)
    back = convbn.load_checkpoint(tmp_path / "out.ckpt")
    assert list(back.layers) == ["conv1", "conv10", "conv2", "conv3"]
    assert {s.reason for s in back.sources.values()} == {"graph"} and back.layers["conv10"].stride == (2, 2)


def test_a_meta_whose_shapes_disagree_is_ignored_on_read(slim_net: dict[str, Any], tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    values = {
        "conv1/weights": rng.standard_normal((3, 3, 3, 4)).astype(np.float32),  # the graph's has 8 outputs
        "conv1/BatchNorm/beta": rng.standard_normal(4).astype(np.float32),
        "conv1/BatchNorm/moving_mean": rng.standard_normal(4).astype(np.float32),
        "conv1/BatchNorm/moving_variance": rng.uniform(0.5, 2, 4).astype(np.float32),
    }
    prefix = _save_raw(tmp_path / "model.ckpt", values)
    shutil.copy(slim_net["prefix"] + ".meta", tmp_path / "model.ckpt.meta")
    ckpt = slim.read(prefix)
    assert any(
        "model.ckpt.meta: it belongs to another checkpoint: its variable 'conv1/weights' has shape [3, 3, 3, 8], "
        "the checkpoint's [3, 3, 3, 4]" in n for n in ckpt.notes
    )
    assert ckpt.sources["conv1"].reason == "naming" and not ckpt.sources["conv1"].geometry
    assert _bits_equal(ckpt.layers["conv1"].kernel, values["conv1/weights"])


# A fused layer (float32 W * gamma / sqrt(var + eps)) in a TF graph vs the unfused TF graph: measured
# 1.0e-7 to 2.6e-7, within TOL.
def test_fuse_to_slim_restores_into_slim_conv2d_without_batchnorm(
    slim_net: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from convbn.cli import main
    from tests.formats import slim_graphs

    prefix = tmp_path / "fused.ckpt"
    assert main(["fuse", slim_net["prefix"], str(prefix), "--verify"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "verified: all 6 layer(s) within tolerance"
    names = set(_tf_values(prefix))
    assert {"conv1/weights", "conv1/biases", "conv2/depthwise_weights", "conv2/biases", "head/weights"} <= names
    assert not any(n.startswith(("conv1/", "conv10/", "conv2/", "conv3/")) and "BatchNorm" in n for n in names)
    specs = [dict(spec, normalizer=False) for spec in slim_graphs.slim_specs()]
    raw = slim_net["raw"]
    outputs = slim_graphs.run_slim_layers(str(prefix), specs, raw["inputs"])
    for got, want in zip(outputs, raw["outputs"], strict=True):
        assert rel_err(got, want) < TOL


# -- bad input -------------------------------------------------------------------------------------


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    need("tensorflow")
    rng = np.random.default_rng(2)
    return _save_raw(tmp_path / "small.ckpt", {
        "conv1/weights": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
        "conv1/BatchNorm/beta": rng.standard_normal(4).astype(np.float32),
        "conv1/BatchNorm/moving_mean": rng.standard_normal(4).astype(np.float32),
        "conv1/BatchNorm/moving_variance": rng.uniform(0.5, 2, 4).astype(np.float32),
    })


def test_small_checkpoint_reads(small: Path) -> None:
    ckpt = slim.read(small)
    assert list(ckpt.layers) == ["conv1"] and ckpt.layers["conv1"].gamma is None
    assert any("no gamma" in n for n in ckpt.notes)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(convbn.ConvBNError, match=r"expected .*model\.ckpt\.index.*Received: path="):
        slim.read(tmp_path / "model.ckpt")


def _data_file(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".data-00000-of-00001")


def test_truncated_or_corrupt_index(small: Path) -> None:
    index = small.with_name(small.name + ".index")
    content = index.read_bytes()
    index.write_bytes(content[: len(content) // 2])
    with pytest.raises(convbn.ConvBNError, match=rf"index must be readable.*Received: file={re.escape(str(index))}"):
        slim.read(small)
    damaged = bytearray(content)
    damaged[len(content) // 3] ^= 0xFF
    index.write_bytes(bytes(damaged))
    with pytest.raises(convbn.ConvBNError, match=rf"index must be readable: .*Received: file={re.escape(str(index))}"):
        slim.read(small)


def test_truncated_or_corrupt_data(small: Path) -> None:
    data = _data_file(small)
    content = data.read_bytes()
    data.write_bytes(content[: len(content) // 2])
    with pytest.raises(convbn.ConvBNError, match=rf"Received: file={re.escape(str(data))}, tensor='conv1/"):
        slim.read(small)
    damaged = bytearray(content)
    damaged[10] ^= 0xFF  # inside the first tensor: its stored checksum no longer matches
    data.write_bytes(bytes(damaged))
    with pytest.raises(convbn.ConvBNError, match=rf"truncated or corrupt.*Received: file={re.escape(str(data))}, tensor='conv1/"):
        slim.read(small)
    data.unlink()
    with pytest.raises(convbn.ConvBNError, match=r"data file .*data-00000-of-NNNNN.*no data file"):
        slim.read(small)


@pytest.mark.parametrize(
    ("tensor", "value", "message"),
    [
        ("conv1/BatchNorm/moving_mean", np.zeros((4, 1), np.float32), r"moving_mean must be 1-D.*shape=\(4, 1\)"),
        ("conv1/BatchNorm/beta", np.zeros(5, np.float32), r"beta must have shape \(4,\).*shape=\(5,\)"),
        ("conv1/BatchNorm/moving_variance", np.array([1, -0.5, 1, 1], np.float32), r"finite and >= 0.*-0\.5"),
        ("conv1/BatchNorm/moving_variance", np.array([1, 1, np.nan, 1], np.float32), r"finite and >= 0.*nan"),
    ],
)
def test_bad_tensors_name_file_and_tensor(small: Path, tensor: str, value: np.ndarray, message: str) -> None:
    values = _tf_values(small)
    values[tensor] = value
    prefix = _save_raw(small.with_name("bad.ckpt"), values)
    with pytest.raises(convbn.ConvBNError, match=message) as info:
        slim.read(prefix)
    assert f"tensor={tensor!r}" in str(info.value) and "bad.ckpt" in str(info.value)


def test_bad_variance_of_an_unpaired_batchnorm_is_caught(small: Path) -> None:
    values = _tf_values(small)
    values["fc/BatchNorm/moving_mean"] = np.zeros(2, np.float32)
    values["fc/BatchNorm/moving_variance"] = np.array([1, -1], np.float32)
    with pytest.raises(convbn.ConvBNError, match="tensor='fc/BatchNorm/moving_variance'"):
        slim.read(_save_raw(small.with_name("bad.ckpt"), values))


def test_use_ema_without_shadows(small: Path) -> None:
    with pytest.raises(convbn.ConvBNError, match=rf"use_ema=True needs .*Received: file={small}\.index"):
        slim.read(small, use_ema=True)


def test_the_cli_never_writes_over_a_source_named_another_way(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from convbn.cli import main

    files = {p: p.read_bytes() for p in small.parent.iterdir()}
    for src in (small.with_name("small.ckpt.index"), small.parent):  # the .index file, the directory
        for dst in (small, small.with_name("small.ckpt.index")):
            assert main(["convert", str(src), str(dst), "--to", "slim", "--force"]) == 2
            assert "DST must differ from SRC: convbn never modifies its source" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in small.parent.iterdir()} == files
