"""tests/conftest.py's rule for what a test needs, checked on pytest runs in subprocesses.

Each run loads a small probe plugin (``-p``, before conftest) that hides chosen packages from
``importlib.util.find_spec`` and from import, records every test's outcome, and at the end which
frameworks the process imported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("torch", "tensorflow", "jax", "keras", "flax", "tf_keras", "tf_slim")

_PROBE = textwrap.dedent('''
    import importlib.util, json, os, sys

    HIDDEN = set(filter(None, os.environ["PROBE_HIDE"].split(",")))
    _find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return _find_spec(name, package)

    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
            return None

    importlib.util.find_spec = find_spec
    sys.meta_path.insert(0, Hide())
    REPORTS = []

    def _record(report):
        if report.when in ("collect", "call") or report.outcome != "passed":
            text = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr or "")
            text = text.removeprefix("Skipped: ")  # as a module-level skip is worded
            REPORTS.append([report.nodeid, report.when, report.outcome, text])

    def pytest_collectreport(report):
        if report.outcome != "passed":
            _record(report)

    def pytest_runtest_logreport(report):
        _record(report)

    def pytest_sessionfinish(session):
        names = %r
        with open(os.environ["PROBE_OUT"], "w") as f:
            json.dump({"imported": [n for n in names if n in sys.modules], "reports": REPORTS}, f)
''') % (FRAMEWORKS,)


def _pytest(tmp_path: Path, backends: str, *args: str, hide: str = "") -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """pytest in a fresh process with ``CONVBN_TEST_BACKENDS=backends`` and ``hide`` made missing."""
    (tmp_path / "_selection_probe.py").write_text(_PROBE)
    out = tmp_path / "probe.json"
    env = {**os.environ, "CONVBN_TEST_BACKENDS": backends, "PROBE_HIDE": hide, "PROBE_OUT": str(out),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_ADDOPTS", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "_selection_probe", "-p", "no:cacheprovider",
                          "-q", "-rs", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return run, json.loads(out.read_text()) if out.exists() else {}


# Files whose tests need torch, TensorFlow (Keras, tf-slim) or JAX (Flax) in every way conftest
# offers (module level, marker, helper, fixture); test_api and test_like also have NumPy tests.
FRAMEWORK_FILES = [
    "tests/layers/test_adapters.py", "tests/layers/test_torch_layer.py", "tests/formats/test_flax_format.py",
    "tests/formats/test_keras_format.py", "tests/formats/test_slim_conversions.py",
]


def test_a_numpy_run_runs_and_imports_no_framework(tmp_path):
    run, probe = _pytest(tmp_path, "numpy", *FRAMEWORK_FILES, "tests/test_api.py", "tests/cli/test_like.py")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert probe["imported"] == []
    outcome = {nodeid: (result, text) for nodeid, _, result, text in probe["reports"]}
    not_requested = re.compile(r"backend '(torch|tensorflow|jax)' not requested in CONVBN_TEST_BACKENDS")
    for nodeid, (result, text) in outcome.items():
        framework_test = nodeid.split("::")[0] in FRAMEWORK_FILES or re.search(r"\[(torch|tensorflow|jax)\b", nodeid)
        if framework_test:
            assert result == "skipped" and not_requested.fullmatch(text), (nodeid, result, text)
    # The NumPy tests did run, and the module-level skips are reported as such.
    passed = [n for n, (result, _) in outcome.items() if result == "passed"]
    assert "tests/test_api.py::test_nothing_is_mutated_in_place[numpy]" in passed and len(passed) > 20
    assert outcome["tests/formats/test_flax_format.py"] == ("skipped", "backend 'jax' not requested in CONVBN_TEST_BACKENDS")


def test_a_requested_backend_that_is_missing_fails_the_run(tmp_path):
    run, _ = _pytest(tmp_path, "numpy,torch", "--collect-only", "tests/test_reference.py", hide="torch")
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert "CONVBN_TEST_BACKENDS requests ['torch'], which are not installed: pip install 'convbn[torch]'" in run.stderr


def _package_tests(tmp_path: Path, package: str) -> list[str]:
    """Test files that need ``package`` in each way: marker, body, module level; and a typo."""
    (tmp_path / "test_marked.py").write_text(textwrap.dedent(f'''
        import pytest
        from tests.conftest import need, need_module

        @pytest.mark.needs({package!r})
        def test_marker():
            assert False, "ran without {package}"

        def test_body():
            need_module({package!r})
            assert False, "ran without {package}"

        def test_typo():
            need("pytorch")
    '''))
    (tmp_path / "test_module_level.py").write_text(f"from tests.conftest import need\n\nneed({package!r})\n\n"
                                                   "def test_never():\n    assert False\n")
    # The files live outside tests/ and the project's rootdir: tests/conftest.py comes in as a plugin.
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    # A module-level failure is a collection error, which would stop the run before the others.
    return ["-p", "tests.conftest", "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path),
            "--continue-on-collection-errors", str(tmp_path / "test_marked.py"), str(tmp_path / "test_module_level.py")]


def _outcomes(probe: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {nodeid: (result, text) for nodeid, when, result, text in probe["reports"]
            if result != "passed" or when == "call"}


def test_a_missing_package_is_skipped_where_the_run_does_not_expect_it(tmp_path):
    run, probe = _pytest(tmp_path, "numpy", *_package_tests(tmp_path, "msgpack"), hide="msgpack")
    outcome = _outcomes(probe)
    assert outcome.pop("test_marked.py::test_typo")[0] == "failed"
    assert outcome == {
        "test_marked.py::test_marker": ("skipped", "msgpack not installed"),
        "test_marked.py::test_body": ("skipped", "msgpack not installed"),
        "test_module_level.py": ("skipped", "msgpack not installed"),
    }
    assert "need('pytorch'): not a backend" in run.stdout and run.returncode == pytest.ExitCode.TESTS_FAILED


@pytest.mark.needs("jax")
def test_a_missing_package_fails_where_a_requested_backend_brings_it(tmp_path):
    """msgpack comes with flax in ``convbn[jax]``: a jax run must have it."""
    run, probe = _pytest(tmp_path, "numpy,jax", *_package_tests(tmp_path, "msgpack"), hide="msgpack")
    expects = "msgpack is not installed, but CONVBN_TEST_BACKENDS=numpy,jax expects it (tests/conftest.py)"
    outcome = _outcomes(probe)
    assert outcome["test_marked.py::test_marker"] == ("failed", expects)
    assert outcome["test_marked.py::test_body"][0] == "failed" and expects in outcome["test_marked.py::test_body"][1]
    assert outcome["test_module_level.py"][0] == "failed" and expects in outcome["test_module_level.py"][1]
    assert run.returncode != 0


@pytest.mark.needs("tensorflow")
def test_a_cross_env_oracle_is_not_expected_in_a_single_backend_run(tmp_path):
    _, probe = _pytest(tmp_path, "tensorflow", *_package_tests(tmp_path, "tf_slim"), hide="tf_slim")
    assert _outcomes(probe)["test_marked.py::test_marker"] == ("skipped", "tf_slim not installed")


@pytest.mark.slow
@pytest.mark.needs("torch", "tensorflow", "jax")
def test_a_missing_cross_env_oracle_fails_where_every_backend_is_requested(tmp_path):
    """tf-slim comes only with tox's cross env, which requests all four backends."""
    run, probe = _pytest(tmp_path, "numpy,torch,tensorflow,jax", *_package_tests(tmp_path, "tf_slim"), hide="tf_slim")
    expects = "tf_slim is not installed, but CONVBN_TEST_BACKENDS=numpy,torch,tensorflow,jax expects it (tests/conftest.py)"
    assert _outcomes(probe)["test_marked.py::test_marker"] == ("failed", expects)
    assert run.returncode == pytest.ExitCode.TESTS_FAILED


def test_no_test_uses_importorskip():
    """importorskip skips whatever is missing, including what the run must have: tests use need()."""
    offenders = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "tests").rglob("*.py"))
                 if path.name not in ("conftest.py", "test_backend_selection.py")
                 and "importorskip(" in path.read_text()]
    assert offenders == []
