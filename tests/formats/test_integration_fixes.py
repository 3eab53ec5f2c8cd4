"""Where the pieces of TF bundles without TensorFlow, Keras 2 ``.h5`` and sharded files meet
``save_checkpoint``, the ``convbn convert`` command and ``assign_keras``.

No framework is needed except by the tf_keras test: every format here is written and read by
convbn alone.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn.cli import main
from convbn.formats import _tfbundle, slim
from tests.conftest import need
from tests.formats.builders import assert_same_arrays, random_checkpoint, random_layer, reference_eval


@pytest.mark.needs("h5py")
def test_a_keras2_h5_target_keeps_the_unbiased_update_and_a_keras3_one_notes_the_change(tmp_path: Path) -> None:
    """A Keras 2 ``.h5`` loads into fused BatchNorms (unbiased update), like torch's: converting an
    unbiased checkpoint to it changes nothing, so no note, and ``keep_var_update`` lets it through."""
    ckpt = random_checkpoint(var_update="unbiased")
    for name in ("m.h5", "m.hdf5"):
        written = convbn.save_checkpoint(ckpt, tmp_path / name, "keras", keep_var_update=True)
        assert not [n for n in written.notes if "moving-variance update" in n], written.notes
        back = convbn.load_checkpoint(tmp_path / name)
        assert [p.var_update for p in back.layers.values()] == ["unbiased"] * 3
        for layer, params in ckpt.layers.items():
            assert_same_arrays(back.layers[layer], params)
    # A Keras 3 file loads into BatchNorms with the biased update: the same checkpoint is noted there,
    # and refused with keep_var_update.
    written = convbn.save_checkpoint(ckpt, tmp_path / "m.weights.h5", "keras")
    assert [n for n in written.notes if "changes from unbiased to biased for 3 layer(s)" in n]
    with pytest.raises(convbn.ConvBNError, match="keras BatchNorms update the moving variance with the biased"):
        convbn.save_checkpoint(ckpt, tmp_path / "k.weights.h5", "keras", keep_var_update=True)
    assert not (tmp_path / "k.weights.h5").exists()


@pytest.mark.needs("h5py")
def test_the_cli_converts_to_keras2_h5_without_a_var_update_note_and_with_keep_var_update(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src.safetensors"
    convbn.save_checkpoint(random_checkpoint(var_update="unbiased"), src, "safetensors")
    assert main(["convert", str(src), str(tmp_path / "m.h5"), "--keep-var-update"]) == 0
    assert "moving-variance update" not in capsys.readouterr().out
    back, source = convbn.load_checkpoint(tmp_path / "m.h5"), convbn.load_checkpoint(src)
    for layer, params in source.layers.items():
        assert_same_arrays(back.layers[layer], params)


def test_writers_get_the_shard_size_in_bytes_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``save_checkpoint`` parses ``"2KB"`` and hands the writer 2000: the writer never sees the string."""
    given: list[Any] = []
    real = slim.write

    def recording(ckpt: convbn.Checkpoint, path: Path, *, max_shard_size: int | str | None = None) -> None:
        given.append(max_shard_size)
        real(ckpt, path, max_shard_size=max_shard_size)

    monkeypatch.setattr(slim, "write", recording)
    ckpt = random_checkpoint(bias=False)
    convbn.save_checkpoint(ckpt, tmp_path / "m.ckpt", "slim", max_shard_size="2KB")
    assert given == [2000]
    sizes = [p.stat().st_size for p in sorted(tmp_path.glob("m.ckpt.data-*"))]
    # In name order, as TF's Saver writes (layerK/BatchNorm/* before layerK/weights): layer1's
    # BatchNorm and kernel and layer2's BatchNorm fit one shard; a kernel over 2000 bytes gets one
    # of its own, and the next BatchNorm starts the next.
    l1, l2, l3 = ckpt.layers.values()
    bn = [p.gamma.nbytes + p.beta.nbytes + p.moving_mean.nbytes + p.moving_var.nbytes for p in (l1, l2, l3)]
    assert l1.kernel.nbytes + bn[0] + bn[1] <= 2000 < l2.kernel.nbytes
    assert sizes == [bn[0] + l1.kernel.nbytes + bn[1], l2.kernel.nbytes, bn[2], l3.kernel.nbytes]
    bundle = _tfbundle.Bundle(tmp_path / "m.ckpt")
    np.testing.assert_array_equal(bundle.read("layer3/weights"), ckpt.layers["layer3"].kernel)
    back = convbn.load_checkpoint(tmp_path / "m.ckpt")
    for layer, params in ckpt.layers.items():
        assert np.array_equal(back.layers[layer].kernel, params.kernel), layer


@pytest.mark.parametrize(("fmt", "name"), [("torch", "pytorch_model.bin"), ("safetensors", "model.safetensors")])
def test_the_hugging_face_writers_shard_by_the_bytes_they_are_given(tmp_path: Path, fmt: str, name: str) -> None:
    """One parser of sizes (``_sharded.parse_size``, called by ``save_checkpoint``): the torch and
    safetensors writers, like slim's, take bytes and shard by them, and parse nothing themselves."""
    if fmt == "torch":
        need("torch")
    module = importlib.import_module(f"convbn.formats.{fmt}")
    assert "parse_size" not in inspect.getsource(module), fmt
    ckpt = random_checkpoint(bias=False)
    (tmp_path / "direct").mkdir()
    module.write(ckpt, tmp_path / "direct" / name, max_shard_size=2000)
    convbn.save_checkpoint(ckpt, tmp_path / name, fmt, max_shard_size="2KB")
    for where in (tmp_path, tmp_path / "direct"):
        index = json.loads((where / f"{name}.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1, index
        back = convbn.load_checkpoint(where)
        for layer, params in ckpt.layers.items():
            assert_same_arrays(back.layers[layer], params)
    assert (tmp_path / f"{name}.index.json").read_bytes() == (tmp_path / "direct" / f"{name}.index.json").read_bytes()


@pytest.mark.needs("h5py")
def test_hdf5_names_a_keras2_target_by_its_suffix(tmp_path: Path) -> None:
    """``convbn convert SRC model.hdf5`` needs no --to: the Keras reader and writer take ``*.hdf5``."""
    src = tmp_path / "src.safetensors"
    convbn.save_checkpoint(random_checkpoint(var_update="unbiased"), src, "safetensors")
    assert convbn.convert.format_for_path("model.hdf5") == "keras"
    assert main(["convert", str(src), str(tmp_path / "model.hdf5")]) == 0
    back, source = convbn.load_checkpoint(tmp_path / "model.hdf5"), convbn.load_checkpoint(src)
    assert back.convention == "keras2"
    for layer, params in source.layers.items():
        assert_same_arrays(back.layers[layer], params)


@pytest.mark.needs("h5py")
def test_like_writes_a_keras2_h5_under_the_like_files_names(tmp_path: Path) -> None:
    """``--like mine.weights.h5`` with DST ``*.h5``: the Keras 2 file takes the like file's layer names."""
    src, like = tmp_path / "src.safetensors", tmp_path / "mine.weights.h5"
    source = random_checkpoint(seed=1, var_update="unbiased")
    convbn.save_checkpoint(source, src, "safetensors")
    convbn.save_checkpoint(random_checkpoint(seed=2), like, "keras")
    assert main(["convert", str(src), str(tmp_path / "out.h5"), "--like", str(like)]) == 0
    back, names = convbn.load_checkpoint(tmp_path / "out.h5"), list(convbn.load_checkpoint(like).layers)
    assert list(back.layers) == names
    for name, params in zip(names, source.layers.values(), strict=True):
        assert np.array_equal(back.layers[name].kernel, params.kernel), name
        assert np.array_equal(back.layers[name].moving_var, params.moving_var), name


def test_assign_keras_writes_tf_keras_layers_which_then_compute_the_params(tmp_path: Path) -> None:
    """One assignment path for both Kerases: a tf_keras conv (dense and depthwise) + fused BatchNorm
    given params computes what convbn's reference computes; its update rule is checked as Keras 3's."""
    need("tensorflow", "tf_keras")
    import tf_keras

    from convbn import adapters

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 9, 9, 4)).astype(np.float32)
    cases = [
        (tf_keras.layers.Conv2D(6, 3, strides=2, padding="same", use_bias=True),
         random_layer(rng, 4, 6, stride=2, padding="SAME", eps=1e-4, momentum=0.9)),
        (tf_keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False),
         random_layer(rng, 1, 8, bias=False, padding="VALID", groups=4, eps=1e-4, momentum=0.9)),
    ]
    for conv, params in cases:
        bn = tf_keras.layers.BatchNormalization()
        bn(conv(x))
        adapters.assign_keras(conv, bn, params)
        assert (bn.epsilon, bn.momentum, adapters.keras_var_update(bn)) == (1e-4, 0.9, "unbiased")
        y = bn(conv(x), training=False).numpy()
        want = reference_eval(x, params)
        assert np.max(np.abs(y - want)) / np.max(np.abs(want)) < 1e-5, type(conv).__name__
        with pytest.raises(convbn.ConvBNError, match=r"tf_keras BatchNormalization\(fused=True\) updates .* unbiased"):
            adapters.assign_keras(conv, bn, dataclasses.replace(params, var_update="biased"))
    unfused = tf_keras.layers.BatchNormalization(fused=False)
    unfused(conv(x))
    assert adapters.keras_var_update(unfused) == "biased"
    with pytest.raises(TypeError, match="conv must be a Keras 3 keras.layers.Conv2D"):
        convbn.from_keras(conv, bn)  # reading tf_keras layers into params is not offered
