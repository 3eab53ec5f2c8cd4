"""The benchmark suite runs, and both contenders of every contest compute the same numbers.

No timing is asserted: speed is measured by ``python -m benchmarks.run``, not tested. This runs
that command on the tiny shape with ``--quick`` and checks the values each side produced.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import available

ROOT = Path(__file__).resolve().parent.parent
# The native layers each backend is compared against come from these packages.
NATIVE = {"torch": ("torch",), "tensorflow": ("tensorflow", "keras"), "jax": ("jax", "flax")}
# Contests per backend on one shape: eval and train for each data format / execution mode.
EXPECTED = {
    "torch": {("eval", "NCHW"), ("eval", "NHWC"), ("train", "NCHW"), ("train", "NHWC")},
    "tensorflow": {("eval", "NHWC eager"), ("eval", "NHWC tf.function"),
                   ("train", "NHWC eager"), ("train", "NHWC tf.function")},
    "jax": {("eval", "NHWC jit"), ("train", "NHWC jit")},
}
# convbn against the native layers, float32, relative to the native output's largest magnitude.
# Measured over all five benchmark shapes: eval (folded vs unfolded) up to 1.5e-6; training up to
# 3.7e-6 on TF and 6.5e-6 on JAX (kernel gradients, where convbn's matmul and multiply-add
# formulations sum in another order); 0 where both run the same kernels (torch training). 5e-5 is
# 7x the worst case; a convention mismatch (eps, momentum, variance) shows up at 1e-3 or more.
TOL = 5e-5


def _runnable(name: str) -> bool:
    return all(available(m) for m in NATIVE[name])


@pytest.mark.slow
def test_quick_suite_on_tiny_shape(tmp_path):
    names = [n for n in NATIVE if _runnable(n)]
    if not names:
        pytest.skip("no framework backend with its native layers is under test")
    subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--shapes", "tiny",
         "--backends", *names, "--out", str(tmp_path)],
        cwd=ROOT, check=True, timeout=900,
    )
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["skipped"] == []
    for name in names:
        rows = [r for r in report["layers"] if r["backend"] == name]
        assert {(r["mode"], r["variant"]) for r in rows} == EXPECTED[name]
        for r in rows:
            keys = {"y"} if r["mode"] == "eval" else {"y", "dx", "dkernel", "dgamma", "moving_mean", "moving_var"}
            assert set(r["max_rel_diff"]) == keys
            for key, diff in r["max_rel_diff"].items():
                assert diff < TOL, (r["variant"], r["mode"], key, diff)
            t = r["timing"]
            # The summary is the raw samples' (5 of each with --quick), paired in time order.
            ours, theirs = t["convbn_samples"], t["native_samples"]
            assert len(ours) == len(theirs) == t["samples"] == 5
            assert all(math.isfinite(v) and v > 0 for v in ours + theirs)
            assert t["convbn_s"] == statistics.median(ours) and t["native_s"] == statistics.median(theirs)
            assert t["ratio"] == pytest.approx(statistics.median(a / b for a, b in zip(ours, theirs, strict=True)))
    table = (tmp_path / "results.md").read_text()
    assert sum(line.startswith("| ") and " | tiny | " in line for line in table.splitlines()) == len(report["layers"])



@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux /proc")
def test_the_checkpoint_benchmarks_measure_a_conversion_in_one_child(tmp_path, monkeypatch):
    """``checkpoint_conversion`` measures through ``checkpoint_memory.measure`` (one child script):
    on a two-layer stand-in for ResNet-50, safetensors -> TF checkpoint (numpy only) converts every
    layer, and a route measured directly writes the same values it read."""
    import convbn
    from benchmarks import checkpoint_conversion, checkpoint_memory

    monkeypatch.setattr(checkpoint_conversion, "resnet50_shapes", lambda: [(3, 3, 4), (1, 4, 8)])
    result = checkpoint_conversion.run("safetensors:slim", tmp_path)
    src = tmp_path / "src.safetensors"
    assert result["layers"] == 2 and result["size"] == src.stat().st_size, result
    assert result["peak"] >= result["before"] > 0 and result["seconds"] > 0 and result["import_s"] > 0, result
    assert not list(tmp_path.glob("dst_*")), "the route's output is removed after it"

    direct = checkpoint_memory.measure(src, tmp_path / "m.ckpt", "slim", "", [], "direct")
    assert direct["layers"] == 2 and not direct["tensorflow"], direct
    back, want = convbn.load_checkpoint(tmp_path / "m.ckpt"), convbn.load_checkpoint(src)
    assert list(back.layers) == list(want.layers)
    for name, params in want.layers.items():
        for field in ("kernel", "gamma", "beta", "moving_mean", "moving_var"):
            np.testing.assert_array_equal(getattr(back.layers[name], field), getattr(params, field))
