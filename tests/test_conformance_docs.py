"""docs/conformance.md stays in step with the code: its tolerance table is the one in
``convbn.conformance.tolerances``, and its real run's table was held to those tolerances."""

from __future__ import annotations

import pathlib
import re

import pytest

from convbn.conformance.cases import DTYPES
from convbn.conformance.tolerances import GROUPS, TOLERANCES, markdown_table, tolerance

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "conformance.md"


def test_tolerance_table_is_the_one_in_the_code():
    assert markdown_table() in DOC.read_text()


def test_every_tolerance_is_at_least_its_measured_worst_case():
    for (group, dtype), t in TOLERANCES.items():
        assert t.measured <= t.value, (group, dtype, t)
        assert t.measured > 0 and t.where, (group, dtype, "not measured")


def _run_table() -> list[list[str]]:
    text = DOC.read_text()
    block = text.split("## A real run", 1)[1].split("```", 2)[1]
    lines = block.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    rows = []
    for line in lines[header + 2:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_real_run_table_was_held_to_the_current_tolerances():
    rows = _run_table()
    assert {r[2] for r in rows} >= {*GROUPS, "edge", "agree"}
    checked = 0
    for backend, _device, group, *cells in rows:
        assert len(cells) == len(DTYPES), (backend, group, cells)
        for dtype, cell in zip(DTYPES, cells, strict=True):
            match = re.fullmatch(r"(FAIL )?([0-9.e+-]+) / ([0-9.e+-]+)\*?", cell)
            if match is None:
                assert cell in ("reference", "skip", "-"), cell
                continue
            assert match.group(1) is None, f"the documented run has a failure: {backend} {group} {dtype}"
            error, tol = float(match.group(2)), float(match.group(3))
            if group == "agree":
                allowed = {2 * tolerance(g, dtype) for g in GROUPS}
            elif group in ("edge", "gpu"):
                allowed = {0.0, tolerance("eval", dtype), tolerance("train", dtype)}
            else:
                allowed = {tolerance(group, dtype)}
            assert tol in allowed or any(tol == pytest.approx(a) for a in allowed), (backend, group, dtype, tol)
            assert error <= tol
            checked += 1
    assert checked > 100
