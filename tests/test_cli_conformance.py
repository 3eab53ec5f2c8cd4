"""``convbn conformance``: exit status, progress on stderr, the table and the JSON report."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from convbn import cli, dispatch
from convbn.conformance import runner
from convbn.conformance.cases import EDGE_CASE, Task
from convbn.conformance.tolerances import GROUPS
from tests.conftest import backend_enabled
from tests.test_conformance import _swap_same_split


def _run(capsys, *argv):
    status = cli.main(["conformance", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_quick_json_on_numpy_reports_every_group_with_measured_errors(capsys):
    status, out, err = _run(capsys, "--quick", "--json", "--backends", "numpy")
    assert status == 0
    report = json.loads(out)  # stdout is only the JSON
    assert "[" in err and "pairwise" in err  # progress went to stderr
    assert report["passed"] is True and report["counts"]["fail"] == 0
    rows = {(r["group"], r["dtype"]): r for r in report["summary"] if r["backend"] == "numpy"}
    for group in GROUPS:
        for dtype in ("float32", "float16"):
            row = rows[(group, dtype)]
            assert row["status"] == "pass"
            assert 0 <= row["worst_error"] <= row["tolerance"], row
    # float64 numpy is the reference itself: reported as such, not as a pass.
    assert rows[("eval", "float64")]["status"] == "ref"


def test_table_has_a_row_per_backend_device_group(capsys):
    status, out, _ = _run(capsys, "--quick", "--backends", "numpy")
    assert status == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    assert lines[header].split() == ["backend", "device", "check", "float64", "float32", "bfloat16", "float16"]
    rows = [line.split()[:3] for line in lines[header + 2:] if line.startswith("numpy")]
    assert [r[2] for r in rows] == ["eval", "train", "stats", "grad", "extreme", "edge"]
    assert lines[-1] == "PASSED"


def test_unknown_backend_is_bad_input(capsys):
    status, out, err = _run(capsys, "--backends", "numpy,caffe")
    assert status == 2 and out == ""
    assert "--backends must be one of ['numpy', 'torch', 'tensorflow', 'jax']. Received: --backends='caffe'" in err


def test_requested_backend_not_installed_is_bad_input(capsys, monkeypatch):
    real = dispatch.is_installed
    monkeypatch.setattr(dispatch, "is_installed", lambda name: name != "jax" and real(name))
    status, _, err = _run(capsys, "--quick", "--backends", "numpy,jax")
    assert status == 2
    assert "requested backends ['jax'] are not installed: pip install 'convbn[jax]'" in err


def test_a_broken_backend_fails_the_run_and_is_named(capsys, monkeypatch, framework):
    _swap_same_split(dispatch.load_backend(framework), monkeypatch)
    # One task is enough to see the command report it; the matrix itself is test_conformance's.
    one = Task("forward", EDGE_CASE, "float32", ("eval",), ("NHWC",))
    monkeypatch.setattr(runner, "tasks", lambda quick: [one])
    status, out, _ = _run(capsys, "--quick", "--backends", framework, "--no-gpu")
    assert status == 1
    assert out.splitlines()[-1] == "FAILED"
    assert f"{framework} on cpu, float32 eval check, case same_s2_even[eval,NHWC]: y error " in out
    row = next(line for line in out.splitlines() if line.split()[:3] == [framework, "cpu", "eval"])
    cells = re.split(r"\s{2,}", row.strip())
    assert cells[3] == "-" and cells[4].startswith("FAIL ")  # the float32 column


@pytest.mark.slow
def test_every_backend_under_test_measured_and_pairwise_agreement(capsys):
    """``--quick --json`` on the backends under test (all four in the cross env): every backend
    and check group measured and passing, and every pair of backends compared."""
    names = [n for n in dispatch.BACKENDS if backend_enabled(n)]
    if len(names) < 2:
        pytest.skip("pairwise agreement needs two backends under test")
    status, out, _ = _run(capsys, "--quick", "--json", "--no-gpu", "--backends", ",".join(names))
    report = json.loads(out)
    assert status == 0 and report["passed"], [f["message"] for f in report["failures"]]
    assert list(report["backends"]) == names
    measured = {(r["backend"], r["group"]) for r in report["summary"] if r["status"] == "pass"}
    for name in names:
        for group in (*GROUPS, "edge"):
            assert (name, group) in measured
    agree = [r for r in report["summary"] if r["group"] == "agree"]
    assert {r["backend"] for r in agree} == {f"{a}~{b}" for a, b in itertools.combinations(names, 2)}
    for row in agree:
        if row["status"] != "skip":
            assert row["status"] == "pass" and row["worst_error"] <= row["tolerance"], row
