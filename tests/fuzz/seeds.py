"""Seed checkpoints for the fuzzer: small real models saved by each framework's own writer.

A seed is a :class:`Bundle`: the bytes of every file a checkpoint consists of (a TF checkpoint is
an index, a data shard, a ``checkpoint`` file and maybe a ``.meta``; a sharded file is its
``*.index.json`` and shards; an Orbax checkpoint is a directory tree), and the path the readers are
given. Mutants are bundles too, so one runner handles single files and multi-file checkpoints.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests._support import nets

#: What each format's seeds and reader need, as ``tests.conftest.need`` names it (a backend or a
#: package, which is also its module's name). torch: ``torch.save`` and the reader's unpickler. slim:
#: TF writes the seeds and reads them. keras: Keras 3 on TensorFlow writes the seeds, the reader needs
#: only h5py; keras2: tf_keras (Keras 2) writes the seeds, h5py reads them. flax: flax writes the
#: seeds, the reader needs only msgpack. orbax: orbax-checkpoint writes the seeds and reads them.
#: safetensors: seeds written here, read with NumPy alone.
REQUIRES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "safetensors": (),
    "flax": ("flax", "msgpack"),
    "orbax": ("flax", "orbax"),
    "keras": ("keras", "h5py"),
    "keras2": ("tf_keras", "h5py"),
    "slim": ("tensorflow",),
}


@dataclasses.dataclass(frozen=True)
class Bundle:
    """The files of one checkpoint, by name relative to its directory, and the name to read."""

    name: str
    files: dict[str, bytes]  # by POSIX path relative to the directory
    entry: str

    def write(self, directory: Path) -> Path:
        """Write every file into ``directory``; returns the path to give the readers."""
        for rel, data in self.files.items():
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            (directory / rel).write_bytes(data)
        return directory / self.entry


def available(fmt: str) -> bool:
    """Whether the packages ``fmt``'s seeds and reader need are installed."""
    return all(importlib.util.find_spec(name) is not None for name in REQUIRES[fmt])


def _stats(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Trained-looking moving statistics (not BatchNorm's initial 0/1)."""
    return (rng.standard_normal(n) * 0.5).astype(np.float32), rng.uniform(0.5, 2.0, n).astype(np.float32)


def _read_dir(directory: Path, name: str, entry: str) -> Bundle:
    files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
    return Bundle(name, files, entry)


def _sharded(name: str, entry: str, shards: list[tuple[str, bytes, list[str]]], total: int) -> Bundle:
    """A Hugging Face-style sharded checkpoint: ``(file, bytes, tensor names)`` per shard and the
    ``*.index.json`` transformers' ``save_pretrained`` writes beside them, named ``entry``."""
    weight_map = {tensor: file for file, _, tensors in shards for tensor in tensors}
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()
    return Bundle(name, {**{file: data for file, data, _ in shards}, entry: index}, entry)


def torch_seeds() -> list[Bundle]:
    """A two-layer Conv+BN ``state_dict`` saved by ``torch.save`` (zip, and the legacy format)."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
        torch.nn.Conv2d(4, 4, 3, stride=2, bias=False), torch.nn.BatchNorm2d(4),
    )
    net.train()
    net(torch.randn(2, 3, 8, 8))  # moving statistics and num_batches_tracked away from their initial values
    state = net.state_dict()
    out = []
    for name, zipped in (("zip", True), ("legacy", False)):
        buf = io.BytesIO()
        torch.save(state, buf, _use_new_zipfile_serialization=zipped)
        out.append(Bundle(f"torch-{name}", {"model.pt": buf.getvalue()}, "model.pt"))
    keys = list(state)
    shards = []
    for i, part in enumerate((keys[:7], keys[7:]), 1):  # the first pair in one shard, the second in the other
        buf = io.BytesIO()
        torch.save({k: state[k] for k in part}, buf)
        shards.append((f"pytorch_model-{i:05d}-of-00002.bin", buf.getvalue(), part))
    total = sum(t.numel() * t.element_size() for t in state.values())
    out.append(_sharded("torch-sharded", "pytorch_model.bin.index.json", shards, total))
    return out


def _safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors layout: u64 header length, JSON header, then the tensors back to back."""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64", np.dtype(np.float16): "F16"}
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for key, arr in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[key] = {"dtype": codes[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def safetensors_seeds() -> list[Bundle]:
    """Torch-named tensors as ``safetensors.torch.save_file`` lays them out, and convbn's own writer's output."""
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    for i, (cin, cout) in enumerate(((3, 4), (4, 4))):
        mean, var = _stats(rng, cout)
        tensors[f"features.{2 * i}.weight"] = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
        if i == 0:
            tensors["features.0.bias"] = rng.standard_normal(cout).astype(np.float32)
        bn = f"features.{2 * i + 1}"
        tensors[f"{bn}.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        tensors[f"{bn}.bias"] = rng.standard_normal(cout).astype(np.float32)
        tensors[f"{bn}.running_mean"], tensors[f"{bn}.running_var"] = mean, var
        tensors[f"{bn}.num_batches_tracked"] = np.array(7, np.int64)
    plain = Bundle("safetensors-torch-names", {"model.safetensors": _safetensors_bytes(tensors, {"format": "pt"})},
                   "model.safetensors")
    keys = list(tensors)
    parts = [keys[:7], keys[7:]]  # the second conv's weight starts the second shard
    shards = [(f"model-{i:05d}-of-00002.safetensors", _safetensors_bytes({k: tensors[k] for k in part},
                                                                          {"format": "pt"}), part)
              for i, part in enumerate(parts, 1)]
    sharded = _sharded("safetensors-sharded", "model.safetensors.index.json", shards,
                       sum(a.nbytes for a in tensors.values()))

    import convbn
    from tests.formats.builders import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        convbn.save_checkpoint(random_checkpoint(0, (3, 4, 4)), path, "safetensors")
        neutral = Bundle("safetensors-convbn", {"model.safetensors": path.read_bytes()}, "model.safetensors")
    return [plain, neutral, sharded]


def _linen_variables() -> dict[str, object]:
    """A linen Conv+BatchNorm pair's variables (params, and batch_stats after one training step)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            x = nn.BatchNorm(use_running_average=False)(nn.Conv(4, (3, 3))(x))
            return nn.BatchNorm(use_running_average=False)(nn.Conv(4, (3, 3), strides=2, use_bias=False)(x))

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    variables = Net().init(jax.random.PRNGKey(0), x)
    _, updates = Net().apply(variables, x, mutable=["batch_stats"])
    return {"params": variables["params"], "batch_stats": updates["batch_stats"]}


def flax_seeds() -> list[Bundle]:
    """The linen variables as ``flax.serialization.to_bytes``."""
    import flax.serialization

    return [Bundle("flax-linen", {"model.msgpack": flax.serialization.to_bytes(_linen_variables())}, "model.msgpack")]


def orbax_seeds() -> list[Bundle]:
    """The linen variables as ``orbax.checkpoint.StandardCheckpointer`` saves them: a directory."""
    import jax
    import orbax.checkpoint as ocp

    variables = jax.tree_util.tree_map(np.asarray, _linen_variables())
    with tempfile.TemporaryDirectory() as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(Path(tmp) / "ckpt", variables)
        checkpointer.wait_until_finished()
        checkpointer.close()
        return [_read_dir(Path(tmp), "orbax-linen", "ckpt")]


def keras_seeds() -> list[Bundle]:
    """A tiny Keras 3 Conv2D+BatchNormalization model as ``.weights.h5`` and as ``.keras``."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    model = nets.keras_two_conv_bn(keras)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(_stats(rng, 4)[0])
            layer.moving_variance.assign(_stats(rng, 4)[1])
    with tempfile.TemporaryDirectory() as tmp:
        model.save_weights(Path(tmp) / "model.weights.h5")
        model.save(Path(tmp) / "model.keras")
        return [
            Bundle("keras-weights-h5", {"model.weights.h5": (Path(tmp) / "model.weights.h5").read_bytes()},
                   "model.weights.h5"),
            Bundle("keras-archive", {"model.keras": (Path(tmp) / "model.keras").read_bytes()}, "model.keras"),
        ]


def keras2_seeds() -> list[Bundle]:
    """The same model in tf_keras (Keras 2) as ``save_weights("model.h5")`` writes it: the
    ``layer_names``/``weight_names`` layout of keras.applications' weight files."""
    import tf_keras

    model = nets.keras_two_conv_bn(tf_keras)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            mean, var = _stats(rng, 4)
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(var)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_weights(str(Path(tmp) / "model.h5"))
        return [Bundle("keras2-h5", {"model.h5": (Path(tmp) / "model.h5").read_bytes()}, "model.h5")]


def slim_seeds() -> list[Bundle]:
    """tf-slim-named variables (conv without bias, BatchNorm without gamma) saved by a TF1 ``Saver``, with and without ``.meta``."""
    import tensorflow as tf

    tf1 = tf.compat.v1
    rng = np.random.default_rng(0)
    out = []
    for meta in (False, True):
        graph = tf.Graph()
        with graph.as_default():
            for scope, (cin, cout) in (("conv1", (3, 4)), ("conv2", (4, 4))):
                mean, var = _stats(rng, cout)
                with tf1.variable_scope(scope):
                    tf1.get_variable("weights", initializer=rng.standard_normal((3, 3, cin, cout)).astype(np.float32))
                    with tf1.variable_scope("BatchNorm"):
                        tf1.get_variable("beta", initializer=rng.standard_normal(cout).astype(np.float32))
                        tf1.get_variable("moving_mean", initializer=mean, trainable=False)
                        tf1.get_variable("moving_variance", initializer=var, trainable=False)
            tf1.train.get_or_create_global_step()
            saver = tf1.train.Saver()
            with tf1.Session(graph=graph) as sess, tempfile.TemporaryDirectory() as tmp:
                sess.run(tf1.global_variables_initializer())
                saver.save(sess, str(Path(tmp) / "model.ckpt"), write_meta_graph=meta)
                out.append(_read_dir(Path(tmp), f"slim-{'meta' if meta else 'plain'}", "model.ckpt"))
    import convbn
    from tests.formats.builders import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:  # several data files, as convbn's pure writer splits them
        convbn.save_checkpoint(random_checkpoint(0, (3, 4, 4)), Path(tmp) / "model.ckpt", "slim", max_shard_size=400)
        out.append(_read_dir(Path(tmp), "slim-shards", "model.ckpt"))
    return out


BUILDERS: dict[str, Callable[[], list[Bundle]]] = {
    "torch": torch_seeds,
    "safetensors": safetensors_seeds,
    "flax": flax_seeds,
    "orbax": orbax_seeds,
    "keras": keras_seeds,
    "keras2": keras2_seeds,
    "slim": slim_seeds,
}


def build(formats: list[str]) -> dict[str, list[Bundle]]:
    """The seeds of each format, torch imported first where both torch and TensorFlow load."""
    order = sorted(formats, key=lambda f: f != "torch")
    return {fmt: BUILDERS[fmt]() for fmt in order}
