"""Where the pieces of TF bundles without TensorFlow, Keras 2 ``.h5`` and sharded files meet
``save_checkpoint`` and the ``convbn convert`` command.

No framework is needed: every format here is written and read by convbn alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convbn
from convbn.cli import main
from convbn.formats import _tfbundle, slim
from tests.formats.builders import assert_same_arrays, random_checkpoint


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
    # In write order: layer1 fits one shard; a kernel over 2000 bytes gets one of its own, and the
    # BatchNorm after it the next.
    l1, l2, l3 = ckpt.layers.values()
    bn = [p.gamma.nbytes + p.beta.nbytes + p.moving_mean.nbytes + p.moving_var.nbytes for p in (l1, l2, l3)]
    assert sizes == [l1.kernel.nbytes + bn[0], l2.kernel.nbytes, bn[1], l3.kernel.nbytes, bn[2]]
    bundle = _tfbundle.Bundle(tmp_path / "m.ckpt")
    np.testing.assert_array_equal(bundle.read("layer3/weights"), ckpt.layers["layer3"].kernel)
    back = convbn.load_checkpoint(tmp_path / "m.ckpt")
    for layer, params in ckpt.layers.items():
        assert np.array_equal(back.layers[layer].kernel, params.kernel), layer


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
