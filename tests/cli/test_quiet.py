"""The CLI keeps the frameworks' native logging off stderr, and ``--verbose`` lets it through.

Run in subprocesses: the logging goes to file descriptor 2 from C++, before and after
``absl::InitializeLog()``, which only a real process shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

import convbn
from tests.conftest import require_backend
from tests.formats.builders import random_checkpoint

#: absl/glog lines and absl's banner, as TensorFlow and XLA print them.
NOISE = re.compile(r"^([IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]|WARNING: All log messages before absl)", re.M)


def _convbn(*argv: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "convbn", *map(str, argv)], capture_output=True, text=True,
                          env={**environ, **(env or {})}, timeout=600)


def test_native_log_lines_are_dropped_and_everything_else_passes():
    """Without any framework: lines in absl's format go, fatal lines and other text stay, in order."""
    script = textwrap.dedent("""
        import os, sys
        from convbn.cli import quiet_native_logs
        with quiet_native_logs():
            os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
            os.write(2, b"I0000 00:00:1796158669.485330    6504 cudart_stub.cc:31] Could not find cuda drivers\\n")
            os.write(2, b"E0000 00:00:1796158675.513807    6504 cuda_platform.cc:52] failed call to cuInit: x\\n")
            os.write(2, b"kept 1\\nW1201 20:57:17.123456 77 a.cc:3] w\\nF0000 00:00:1.5 9 b.cc:1] fatal kept\\n")
            os.write(2, b"partial ")
            os.write(2, b"line kept\\n")
            print("python's own stderr kept", file=sys.stderr)
            print("level", os.environ["TF_CPP_MIN_LOG_LEVEL"])
        os.write(2, b"I0000 00:00:1.0 1 after.cc:1] after the block, kept\\n")
    """)
    for user_level, expected in ((None, "3"), ("1", "1")):
        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        if user_level is not None:
            env["TF_CPP_MIN_LOG_LEVEL"] = user_level
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"level {expected}\n"  # a user's own TF_CPP_MIN_LOG_LEVEL wins
        assert sorted(result.stderr.splitlines()) == sorted([
            "kept 1", "F0000 00:00:1.5 9 b.cc:1] fatal kept", "partial line kept", "python's own stderr kept",
            "I0000 00:00:1.0 1 after.cc:1] after the block, kept"])


@pytest.fixture
def slim_checkpoint(tmp_path):
    source = tmp_path / "src.safetensors"
    convbn.save_checkpoint(random_checkpoint(), source, "safetensors")
    result = _convbn("convert", source, tmp_path / "model.ckpt")
    assert result.returncode == 0, result.stderr
    assert not NOISE.search(result.stderr), result.stderr
    return tmp_path / "model.ckpt"


def test_slim_inspect_imports_no_framework_and_prints_nothing_on_stderr(slim_checkpoint):
    """TF checkpoints are read without TensorFlow: inspecting one loads no framework at all."""
    script = textwrap.dedent(f"""
        import sys
        from convbn.cli import main
        status = main(["inspect", {str(slim_checkpoint)!r}])
        print("loaded:", sorted(m for m in ("tensorflow", "keras", "jax", "torch") if m in sys.modules))
        sys.exit(status)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.splitlines()[-1] == "loaded: []"
    assert "layer1/BatchNorm" in result.stdout


def test_info_is_quiet_and_verbose_shows_the_logs():
    """``convbn info`` runs every backend, so it loads TensorFlow and JAX, the noisy ones."""
    require_backend("tensorflow")
    quiet = _convbn("info")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert re.search(r"^tensorflow +\d", quiet.stdout, re.M), quiet.stdout  # it did run on TensorFlow
    verbose = _convbn("--verbose", "info")
    assert verbose.returncode == 0 and verbose.stdout == quiet.stdout
    # Where this machine's TensorFlow logs at all (a CPU-only one prints its CUDA probe), --verbose shows it.
    bare = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}, timeout=300)
    if NOISE.search(bare.stderr):
        assert NOISE.search(verbose.stderr), verbose.stderr


def test_conformance_is_quiet():
    require_backend("tensorflow")
    require_backend("jax")
    result = _convbn("conformance", "--quick", "--backends", "tensorflow,jax", "--no-gpu")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert not NOISE.search(result.stderr), result.stderr
    assert "cuInit" not in result.stderr
    # What is left on stderr is convbn's own progress, one "[done/total] seconds label" line each.
    assert all(re.match(r"\[\d+/\d+\] +\d+\.\d+s ", line) for line in result.stderr.splitlines()), result.stderr
    assert result.stdout.rstrip().endswith("PASSED"), result.stdout[-500:]
