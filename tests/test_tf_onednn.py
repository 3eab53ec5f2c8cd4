"""TensorFlow's two CPU paths, whatever this machine's CPU.

TF turns its oneDNN kernels on by default on Intel CPUs with AVX-512 and off elsewhere, and the two
paths differ in shapes as well as in the last bits (oneDNN's conv returns a wrong shape for a
zero-size batch; grappler fuses conv + BatchNorm differently). ``TF_ENABLE_ONEDNN_OPTS`` is read
when TensorFlow loads, so each path runs in a fresh process: the quick conformance matrix of the
TensorFlow backend, and the zero-size batch through every entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(onednn: str) -> dict[str, str]:
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
@pytest.mark.parametrize("onednn", ["0", "1"])
def test_quick_conformance_passes_on_both_tf_cpu_paths(onednn):
    """The quick matrix in a child per path, except the path this process pinned for itself: the
    in-process conformance tests run that one already (tox's tensorflow env the whole matrix with
    oneDNN off, cross the quick one with it on), and a third run would only repeat them."""
    need("tensorflow")
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == onednn:
        pytest.skip(f"TF_ENABLE_ONEDNN_OPTS={onednn} is this process's own path: the in-process conformance "
                    "tests run it")
    proc = subprocess.run(
        [sys.executable, "-m", "convbn", "conformance", "--quick", "--json", "--no-gpu",
         "--backends", "tensorflow"],
        env=_env(onednn), capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["passed"], [f["message"] for f in report["failures"]]
    edge = [r for r in report["summary"] if r["backend"] == "tensorflow" and r["group"] == "edge"]
    assert edge and all(r["status"] == "pass" for r in edge if r["dtype"] == "float32"), edge


_ZERO_SIZE = textwrap.dedent("""
    import numpy as np, tensorflow as tf, convbn
    from convbn.keras import ConvBN
    rng = np.random.default_rng(0)
    for stride, padding in ((1, "SAME"), (2, "SAME"), (2, "VALID")):
        params = convbn.ConvBNParams(
            kernel=rng.standard_normal((3, 3, 3, 5)).astype(np.float32), bias=np.ones(5, np.float32),
            moving_mean=rng.standard_normal(5).astype(np.float32),
            moving_var=rng.uniform(0.5, 2, 5).astype(np.float32), stride=stride, padding=padding)
        full = rng.standard_normal((2, 9, 8, 3)).astype(np.float32)
        for fmt, x in (("NHWC", full), ("NCHW", full.transpose(0, 3, 1, 2))):
            want = convbn.conv_bn(x, params, data_format=fmt, backend="numpy")[:0]
            y = convbn.conv_bn(tf.constant(x[:0]), params, data_format=fmt)
            y2, new = convbn.conv_bn(tf.constant(x[:0]), params, True, data_format=fmt)
            assert y.shape == y2.shape == want.shape and y.dtype == tf.float32, (y.shape, want.shape)
            assert np.array_equal(new.moving_mean, params.moving_mean)
            assert np.array_equal(new.moving_var, params.moving_var)
        # Inside tf.function with the batch size unknown at trace time, 0 at run time.
        spec = tf.TensorSpec([None, *x.shape[1:]], tf.float32)
        ev = tf.function(lambda t: convbn.conv_bn(t, params, data_format=fmt), input_signature=[spec])
        tr = tf.function(lambda t: convbn.conv_bn(t, params, True, data_format=fmt)[1].moving_var,
                         input_signature=[spec])
        assert tuple(ev(tf.constant(x[:0])).shape) == want.shape
        assert np.array_equal(tr(tf.constant(x[:0])).numpy(), params.moving_var)
        ref = convbn.conv_bn(x, params, data_format=fmt, backend="numpy")
        assert np.abs(ev(tf.constant(x)).numpy() - ref).max() < 1e-4 * np.abs(ref).max()
    layer = ConvBN(5, 3, strides=2, padding="same")
    layer.build((None, 9, 8, 3))
    assert tuple(layer(tf.zeros((0, 9, 8, 3)), training=True).shape) == (0, 5, 4, 5)
    print("ok")
""")


@pytest.mark.slow
@pytest.mark.parametrize("onednn", ["0", "1"])
def test_zero_size_batch_with_new_channel_count_on_both_tf_cpu_paths(onednn):
    need("tensorflow")
    proc = subprocess.run([sys.executable, "-c", _ZERO_SIZE], env=_env(onednn),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
