"""Each single-framework tox env is what it claims: the frameworks it promises to lack are absent.

tox.ini sets ``CONVBN_TEST_ABSENT`` per env; the suite's no-framework paths (a TF checkpoint
converted without TensorFlow, ``import convbn`` importing nothing) are only proven where the
framework cannot be imported at all, so this checks that it cannot, in the run's own interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ABSENT = [n.strip() for n in os.environ.get("CONVBN_TEST_ABSENT", "").split(",") if n.strip()]


@pytest.mark.parametrize("name", ABSENT)
def test_promised_absent(name: str) -> None:
    assert importlib.util.find_spec(name) is None, f"{name} is installed in an env that promises it absent"
    probe = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, probe.stderr
