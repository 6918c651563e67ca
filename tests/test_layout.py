"""The tests' own layout: helpers live in tests/support/, test files only hold tests.

A helper imported from a test module drags that module's tests into the importer's
namespace and breaks when the test file is renamed; ``tests/support/`` is where shared
helpers go (its ``__init__`` says what each module holds).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

TESTS = REPO_ROOT / "tests"


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_no_module_imports_a_test_module() -> None:
    wrong = {
        str(path.relative_to(REPO_ROOT)): name
        for path in sorted(TESTS.rglob("*.py"))
        for name in _imported_modules(path)
        if name.split(".")[-1].startswith("test_") and name.split(".")[0] in ("tests", name)
    }
    assert not wrong, f"imports from test modules (move the helper to tests/support/): {wrong}"


def test_support_modules_hold_no_tests() -> None:
    for path in sorted((TESTS / "support").glob("*.py")):
        tree = ast.parse(path.read_text())
        tests = [
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")
        ]
        assert not tests, f"{path.relative_to(REPO_ROOT)} defines tests: {tests}"


def test_every_test_file_is_named_like_one() -> None:
    """Nothing but conftest.py and the support package sits beside the test files."""
    others = [
        path.name
        for path in TESTS.glob("*.py")
        if not path.name.startswith("test_") and path.name != "conftest.py"
    ]
    assert not others, f"helpers belong in tests/support/: {others}"
