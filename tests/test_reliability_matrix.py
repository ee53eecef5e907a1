"""docs/reliability.md's fault and bad-input matrix names, for each row, the tests that cover
it: each must exist in the suite (so the page cannot drift from it), every row of the D.5
matrix must be there, and a row without a test must say so plainly."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
ROWS = 20
"""Rows of the matrix in shared/reference/ecosystem-and-reliability.md, section D.5."""
_TEST = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def matrix_rows() -> dict[int, list[str]]:
    """Row number → its cells, from the table under ``## Fault and bad-input matrix``."""
    text = DOC.read_text()
    section = text.split("\n## Fault and bad-input matrix\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[int, list[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


@cache
def functions_in(path: str) -> frozenset[str]:
    """The test functions a file defines (module level or in a class)."""
    tree = ast.parse((ROOT / path).read_text())
    return frozenset(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    )


def test_every_row_of_the_matrix_is_there_once_with_five_cells() -> None:
    rows = matrix_rows()
    assert sorted(rows) == list(range(1, ROWS + 1))
    for number, cells in rows.items():
        assert len(cells) == 5, (number, cells)


def test_every_test_the_matrix_names_exists() -> None:
    missing = []
    named = 0
    for number, cells in matrix_rows().items():
        for path, name in _TEST.findall(cells[2]):
            named += 1
            if not (ROOT / path).is_file() or name not in functions_in(path):
                missing.append(f"row {number}: {path}::{name}")
    assert not missing, missing
    assert named >= ROWS


def test_a_row_names_tests_or_says_plainly_that_it_has_none() -> None:
    for number, cells in matrix_rows().items():
        tests_cell = cells[2]
        assert _TEST.search(tests_cell) or "no test yet" in tests_cell.lower(), (number, cells)


def test_the_leak_and_soak_section_is_there() -> None:
    assert "\n## Leak and soak\n" in DOC.read_text()
