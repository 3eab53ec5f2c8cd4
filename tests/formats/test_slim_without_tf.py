"""TF checkpoints converted and inspected in a process where TensorFlow cannot be imported.

Each source checkpoint is converted slim -> torch -> slim, slim -> flax and slim -> safetensors,
and inspected, twice: in a subprocess whose ``sys.modules['tensorflow'] = None`` makes every
``import tensorflow`` fail (as in an environment without it), and in this process, where TensorFlow
is importable wherever it is installed. The written files must hold the same tensors, bit for bit,
and ``convbn inspect`` must print the same.

The sources written by real TF (tf-slim, DCGAN-style, ``tf.compat.v1.layers``, a TF2
``tf.train.Checkpoint`` of a Keras model) need TensorFlow here in the parent; the ones convbn writes
itself (tf-slim, DCGAN-style and object-based names) run everywhere, also in tox's torch env where
TensorFlow is not installed at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn.formats import _tfbundle, _tfproto, slim
from tests.conftest import available, need
from tests.formats import slim_graphs
from tests.formats.builders import assert_same_arrays, random_checkpoint

ROOT = Path(__file__).resolve().parents[2]

#: Runs a list of steps, each a CLI argv (``["cli", [...]]``) or an API conversion
#: (``["api", src, dst, format]``), and returns each step's exit status and stdout: the same code in
#: the subprocess without TensorFlow and in this process.
_RUN_STEPS = """
import contextlib, io
import convbn
from convbn.cli import main

def run_steps(steps):
    results = []
    for kind, *args in steps:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            if kind == "cli":
                status = main(args[0])
            else:
                ckpt = convbn.load_checkpoint(args[0])
                if args[3:]:  # --flatten items
                    ckpt = ckpt.with_flatten(convbn.checkpoint.parse_flatten(args[3]))
                convbn.save_checkpoint(ckpt, args[1], args[2])
                status = 0
        results.append([status, out.getvalue()])
    return results
"""

#: The subprocess: TensorFlow blocked before convbn loads, the steps from argv, results as JSON.
_WITHOUT_TF = """
import json, sys
sys.modules["tensorflow"] = None
""" + _RUN_STEPS + """
results = run_steps(json.loads(sys.argv[1]))
assert sys.modules["tensorflow"] is None, "something imported TensorFlow past the block"
print(json.dumps(results))
"""


def _without_tf(steps: list[list[Any]]) -> list[tuple[int, str]]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TF, json.dumps(steps)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [(status, out) for status, out in json.loads(proc.stdout.splitlines()[-1])]


def _here(steps: list[list[Any]]) -> list[tuple[int, str]]:
    namespace: dict[str, Any] = {}
    exec(_RUN_STEPS, namespace)
    return [(status, out) for status, out in namespace["run_steps"](steps)]


# -- sources -----------------------------------------------------------------------------------


def _convbn_slim(directory: Path) -> Path:
    prefix = directory / "model.ckpt"
    slim.write(random_checkpoint(seed=1, widths=(3, 8, 16), bias=False), prefix)
    return prefix


def _dcgan_values(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """DCGAN's names: conv ``w`` + ``biases``, a separate BatchNorm scope ``d_bnN``."""
    values: dict[str, np.ndarray] = {}
    for n, (cin, cout) in enumerate([(3, 8), (8, 16)]):
        values[f"d_h{n}_conv/w"] = rng.standard_normal((5, 5, cin, cout)).astype(np.float32)
        values[f"d_h{n}_conv/biases"] = rng.standard_normal(cout).astype(np.float32)
        if n:
            values[f"d_bn{n}/beta"] = rng.standard_normal(cout).astype(np.float32)
            values[f"d_bn{n}/gamma"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
            values[f"d_bn{n}/moving_mean"] = rng.standard_normal(cout).astype(np.float32)
            values[f"d_bn{n}/moving_variance"] = rng.uniform(0.5, 2, cout).astype(np.float32)
    return values


def _convbn_dcgan(directory: Path) -> Path:
    prefix = directory / "dcgan.ckpt"
    _tfbundle.write(prefix, _dcgan_values(np.random.default_rng(2)).items(), max_shard_size=1000)
    return prefix


def _convbn_object_based(directory: Path) -> Path:
    """A TF2 object-based checkpoint as tf.train.Checkpoint(model=...) stores a Keras 3 model."""
    rng = np.random.default_rng(3)
    layers = {
        "0": {"_kernel": rng.standard_normal((3, 3, 3, 8)).astype(np.float32), "bias": np.zeros(8, np.float32)},
        "1": {"gamma": rng.uniform(0.5, 1.5, 8).astype(np.float32), "beta": rng.standard_normal(8).astype(np.float32),
              "moving_mean": rng.standard_normal(8).astype(np.float32),
              "moving_variance": rng.uniform(0.5, 2, 8).astype(np.float32)},
    }
    tree: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for layer, variables in layers.items():
        for name, value in variables.items():
            key = _tfproto.checkpoint_key(["model", "_operations", layer, name])
            tree.setdefault(layer, {})[name] = key
            values[key] = value
    values["_CHECKPOINTABLE_OBJECT_GRAPH"] = np.array(
        _tfproto.encode_object_graph({"model": {"_operations": tree}}), object
    )
    prefix = directory / "ckpt-1"
    _tfbundle.write(prefix, values.items())
    return prefix


def _v1_layers(directory: Path) -> str:
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-m", "tests.formats.slim_graphs", "v1", str(directory)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(directory / "v1.ckpt")


_TF = pytest.mark.needs("tensorflow")
SOURCES = [
    pytest.param("convbn-slim", id="convbn-slim"),
    pytest.param("convbn-dcgan", id="convbn-dcgan"),
    pytest.param("convbn-object", id="convbn-object"),
    pytest.param("slim", id="tf-slim", marks=_TF),
    pytest.param("dcgan", id="tf-dcgan", marks=_TF),
    pytest.param("v1", id="tf-v1-layers", marks=_TF),
    pytest.param("keras3", id="tf2-keras3", marks=[_TF, pytest.mark.needs("keras")]),
]


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    name = request.param
    if name == "slim":
        return Path(request.getfixturevalue("slim_net")["prefix"])
    if name == "dcgan":
        return Path(request.getfixturevalue("dcgan_net")["prefix"])
    if name == "v1":
        slim_graphs.need_slim()
        return Path(slim_graphs.shared_build(tmp_path_factory, "v1", _v1_layers))
    if name == "keras3":
        return Path(slim_graphs.shared_build(tmp_path_factory, "keras3", slim_graphs.build_keras3)["prefix"])
    build = {"convbn-slim": _convbn_slim, "convbn-dcgan": _convbn_dcgan, "convbn-object": _convbn_object_based}[name]
    return build(tmp_path_factory.mktemp(name))


# -- the comparison ----------------------------------------------------------------------------


def _targets() -> list[str]:
    """The target formats this run can write (and read back here)."""
    targets = ["safetensors"]
    if available("torch"):
        targets.append("torch")
    if available("msgpack"):
        targets.append("flax")
    return targets


_SUFFIX = {"torch": "model.pt", "flax": "model.msgpack", "safetensors": "model.safetensors", "slim": "back.ckpt"}


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    """Both files read as the same layers (every array bit for bit, the same geometry and
    conventions), tensors and notes."""
    x, y = convbn.load_checkpoint(a), convbn.load_checkpoint(b)
    assert list(x.layers) == list(y.layers) and list(x.tensors) == list(y.tensors), (a, b)
    for name in x.layers:
        assert_same_arrays(x.layers[name], y.layers[name])
        for field in ("stride", "padding", "dilation", "groups", "eps", "momentum", "var_update"):
            assert getattr(x.layers[name], field) == getattr(y.layers[name], field), (name, field)
    for name in x.tensors:
        u, v = np.asarray(x.tensors[name]), np.asarray(y.tensors[name])
        assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes(), name
    assert [n.replace(str(b.parent), str(a.parent)) for n in y.notes] == x.notes


def _flatten_items(source: Path) -> list[str]:
    """``--flatten`` items for the dense layers of ``source`` that read a flattened map, or are
    reshaped into one, as its .meta graph says."""
    items = []
    for name, layer in convbn.load_checkpoint(source).others.items():
        for prefix, fmap in (("", layer.flat_in), ("out:", layer.flat_out)):
            if fmap is not None:
                items.append(f"{name}={prefix}{fmap.height}x{fmap.width}x{fmap.channels}")
    return items


def _plan(source: Path, out: Path, *, cli: bool) -> tuple[list[list[Any]], dict[str, Path]]:
    """The conversions of ``source`` into ``out``: the steps and the file each target lands in."""
    steps: list[list[Any]] = []
    files: dict[str, Path] = {}
    for target in _targets():
        files[target] = out / _SUFFIX[target]
        if cli:
            steps.append(["cli", ["convert", str(source), str(files[target]), "--to", target]])
        else:
            steps.append(["api", str(source), str(files[target]), target])
    if "torch" in files:
        files["slim"] = out / _SUFFIX["slim"]
        # A torch file cannot say that a dense layer reads a flattened map: state the source's.
        flatten = _flatten_items(source)
        if cli:
            options = [item for spec in flatten for item in ("--flatten", spec)]
            steps.append(["cli", ["convert", str(files["torch"]), str(files["slim"]), "--to", "slim", *options]])
        else:
            steps.append(["api", str(files["torch"]), str(files["slim"]), "slim", flatten])
    if cli:
        steps.append(["cli", ["inspect", str(source)]])
    return steps, files


def _compare(source: Path, tmp_path: Path, *, cli: bool) -> None:
    (tmp_path / "without").mkdir()
    (tmp_path / "with").mkdir()
    steps, files = _plan(source, tmp_path / "without", cli=cli)
    reference_steps, reference_files = _plan(source, tmp_path / "with", cli=cli)
    without = _without_tf(steps)
    here = _here(reference_steps)
    assert [status for status, _ in without] == [0] * len(steps), without
    assert [status for status, _ in here] == [0] * len(steps), here
    for target, path in files.items():
        _assert_same_checkpoint(path, reference_files[target])
    if cli:
        inspected = without[-1][1]
        assert inspected == here[-1][1] and str(source) in inspected and "layer" in inspected, inspected


def test_the_cli_converts_and_inspects_without_tensorflow(source: Path, tmp_path: Path) -> None:
    _compare(source, tmp_path, cli=True)


def test_load_and_save_checkpoint_convert_without_tensorflow(source: Path, tmp_path: Path) -> None:
    _compare(source, tmp_path, cli=False)


def test_the_block_makes_tensorflow_unimportable(tmp_path: Path) -> None:
    """The subprocess's block is real: a step that needs TensorFlow fails there."""
    need("torch")
    prefix = _convbn_slim(tmp_path)
    code = _WITHOUT_TF.replace("status = 0", "import tensorflow")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([["api", str(prefix), str(tmp_path / "m.pt"), "torch"]])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "ModuleNotFoundError: import of tensorflow halted" in proc.stderr, proc.stderr[-2000:]
