"""The code keeps the shape the project promises: small modules, short functions, one-way imports.

A module over ~400 lines or a function over ~60 usually holds two ideas (STYLE.md); these limits are
checked here so that a change which grows one past them is noticed when it is made, not in review.
Argument tables (a function whose body is one literal, e.g. argparse or a dict of rows) are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("polycommit", "orchestrator", "consumers", "projections")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _is_table(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A function that only builds an argument table: every statement is a call on a parser or a literal."""
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    calls = sum(1 for s in body if isinstance(s, ast.Expr | ast.Assign) and isinstance(s.value, ast.Call))
    literal = len(body) == 1 and isinstance(body[0], ast.Return | ast.Assign)
    return literal or (len(body) > 0 and calls / len(body) > 0.8)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines (limit {MAX_MODULE_LINES})"


def test_functions_are_short() -> None:
    long: list[str] = []
    for path in _sources():
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or fn.end_lineno is None:
                continue
            length = fn.end_lineno - fn.lineno + 1
            if length > MAX_FUNCTION_LINES and not _is_table(fn):
                long.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} ({length} lines)")
    assert not long, "functions over the limit:\n" + "\n".join(long)
