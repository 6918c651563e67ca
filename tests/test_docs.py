"""The documents' claims point at tests that exist (docs/security.md names the test
proving each claim; a renamed test must not leave the claim pointing at nothing)."""

from __future__ import annotations

import ast
import re

import pytest

from tests.conftest import REPO_ROOT

DOCS = [
    "docs/security.md",
    "docs/operations.md",
    "docs/deploy.md",
    "docs/benchmarks.md",
    "README.md",
]
REFERENCE = re.compile(r"(test_\w+\.py)::(test_\w+)")


def _test_names(path_name: str) -> set[str]:
    tree = ast.parse((REPO_ROOT / "tests" / path_name).read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_test_exists(doc: str) -> None:
    missing = [
        f"{file}::{name}"
        for file, name in REFERENCE.findall((REPO_ROOT / doc).read_text())
        if not (REPO_ROOT / "tests" / file).is_file() or name not in _test_names(file)
    ]
    assert not missing, f"{doc} names tests that do not exist: {missing}"


def test_security_document_names_tests() -> None:
    assert len(REFERENCE.findall((REPO_ROOT / "docs/security.md").read_text())) > 30
