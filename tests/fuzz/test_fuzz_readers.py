"""The mutation fuzzer in the suite: a fixed, seeded set of mutants per format must all be clean.

Clean: the mutant loads (and converts, exit 0, DST written), or is refused with a one-line
``ConvBNError`` (exit 2, nothing written), within the worker's memory limit and timeout and without
a signal. Mutants with a known answer are held to it: a hostile one (data stored outside the file)
must be refused, an equivalent rewrite must read as its seed does. The torch and safetensors seeds
include a sharded checkpoint (``*.index.json`` and two shards), slim's a TF checkpoint in four data
files; ``orbax`` fuzzes Orbax directories and ``keras2`` tf_keras' ``.h5`` weights. Counts are sized for about three minutes for all the formats on two cores;
``python -m tests.fuzz --mutants 2000`` is the longer run (tests/fuzz/__main__.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from convbn.errors import ConvBNError
from tests.conftest import available, need
from tests.fuzz import runner, seeds
from tests.fuzz.mutate import Deep, dumps_json

#: Mutants per format: fewer where a mutant costs more (an HDF5 rewrite, a TF checkpoint), or where
#: the seeds are fewer (one Orbax directory).
MUTANTS = {"torch": 500, "safetensors": 500, "flax": 500, "orbax": 100, "keras": 300, "keras2": 100, "slim": 300}
SEED = 0
#: Formats with a known defect the fuzzer finds: strict, so the marker goes once it is fixed.
KNOWN: dict[str, str] = {}


def _target_enabled(name: str, module: str) -> bool:
    return available(name if name == "torch" else module)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt", [pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=KNOWN[f])) if f in KNOWN else f for f in MUTANTS]
)
def test_every_mutant_is_read_or_refused_cleanly(fmt: str, tmp_path: Path) -> None:
    need(*seeds.REQUIRES[fmt])
    built = seeds.build([fmt])
    targets = runner.default_targets([fmt], _target_enabled)
    report = runner.run(built, targets, MUTANTS[fmt], seed=SEED, jobs=2, timeout=30, out=tmp_path)
    assert report.mutants[fmt] == MUTANTS[fmt]
    assert not report.unclean_seeds, report.summary()  # the seeds themselves load and convert
    assert report.count == 0, "not clean:\n" + report.summary()


def test_mutants_are_the_same_bytes_for_the_same_seed() -> None:
    bundles = seeds.safetensors_seeds()
    first = [runner.make_mutant("safetensors", bundles, i, SEED).bundle.files for i in range(20)]
    again = [runner.make_mutant("safetensors", bundles, i, SEED).bundle.files for i in range(20)]
    other = [runner.make_mutant("safetensors", bundles, i, SEED + 1).bundle.files for i in range(20)]
    assert first == again
    assert first != other
    assert all(m != bundles[0].files and m != bundles[1].files for m in first[:5])


def test_only_a_one_line_convbn_error_is_clean() -> None:
    assert runner._unclean_error(ConvBNError("model.pt: tensor 'w' is truncated")) is None
    kind, _, _ = runner._unclean_error(ConvBNError("model.pt: bad\n  Traceback ...")) or ("",) * 3
    assert kind == "multi-line ConvBNError"
    try:
        [][1]
    except IndexError as exc:
        assert runner._unclean_error(exc) == ("IndexError", "?", "IndexError: list index out of range")
    assert runner._unclean_error(MemoryError())[0] == "MemoryError"  # type: ignore[index]


def test_deep_nesting_is_written_past_the_encoders_recursion_limit() -> None:
    import json

    text = dumps_json({"a": Deep(5000, 1)})
    assert text == b'{"a": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}"
    with pytest.raises(RecursionError):
        json.loads(text)


def test_the_tf_index_codec_writes_what_tensorflow_reads(tmp_path: Path) -> None:
    """The slim mutants' index rewriter round-trips a real index: TF reads every tensor back unchanged."""
    need("tensorflow")
    import numpy as np
    import tensorflow as tf

    from tests.fuzz.mutate import encode_table, table_entries

    seed = seeds.slim_seeds()[0]
    index = seed.files["model.ckpt.index"]
    entries = table_entries(index)
    assert entries[0][0] == b"" and b"conv1/weights" in dict(entries)
    rewritten = seeds.Bundle("rewritten", {**seed.files, "model.ckpt.index": encode_table(entries, index[-8:])},
                             seed.entry)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    original = tf.train.load_checkpoint(str(seed.write(tmp_path / "a")))
    again = tf.train.load_checkpoint(str(rewritten.write(tmp_path / "b")))
    names = original.get_variable_to_shape_map()
    assert again.get_variable_to_shape_map() == names
    for name in names:
        assert np.array_equal(again.get_tensor(name), original.get_tensor(name)), name
