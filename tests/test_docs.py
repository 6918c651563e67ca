"""The documents and the code's comments point at things that exist.

- docs/security.md names the test proving each claim, other documents name tests too:
  a renamed test must not leave a claim pointing at nothing.
- Every repository path (``docs/agent.md``, ``enclave_agent/runtime/kms.py``), file
  name (``nsm.py``, ``README.md``) and module (``enclave_common.http_server``) cited in
  a document, a script, or a Python comment or docstring exists in the repository.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

_SKIPPED_DIRS = {"build", "dist", "__pycache__", "node_modules"}


def _repository_files() -> list[Path]:
    files = []
    for path in sorted(REPO_ROOT.rglob("*")):
        parts = path.relative_to(REPO_ROOT).parts
        if any((p.startswith(".") and p != ".ci") or p in _SKIPPED_DIRS for p in parts[:-1]):
            continue
        if any(p.endswith(".egg-info") for p in parts) or not path.is_file():
            continue
        files.append(path)
    return files


FILES = _repository_files()
DOCS = sorted(str(p.relative_to(REPO_ROOT)) for p in FILES if p.suffix == ".md")
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


# --- cited paths, file names and modules ------------------------------------------

TOP_LEVEL = sorted(p.name for p in REPO_ROOT.iterdir() if not p.name.startswith("."))
# A path: starts with a top-level entry of the repository, not inside a longer path
# (``/etc/enclave-proxy/proxy.toml``, ``../shared/vectors``, ``$root/scripts``).
_TOP_DIRS = "|".join(re.escape(name) for name in TOP_LEVEL if "." not in name)
CITED_PATH = re.compile(rf"(?<![\w./$~*<-])((?:{_TOP_DIRS})/[\w./<>*-]*[\w/>*])")
# A file name on its own: ``cms.py``, ``README.md``.
CITED_NAME = re.compile(r"(?<![\w./$*<>-])(\w+\.(?:py|md))\b")
CITED_MODULE = re.compile(
    r"(?<![\w./$-])((?:enclave_agent|enclave_common|proxy|devtools)(?:\.\w+)+)"
)
# Files a guide tells the reader to make; the repository never holds them.
MADE_BY_THE_READER = {"deploy/secrets/example.sealed"}
_FILE_SUFFIXES = {"py", "md", "toml", "pem", "json", "txt", "service", "eif", "sock", "log"}


def _cited_text(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line, text, prose) of what a file says: a Python file's comments and docstrings
    (prose), a document whole (prose), any other file whole (prose on comment lines:
    a script's code names variables and attributes, not modules)."""
    text = path.read_text(errors="replace")
    if path.suffix != ".py" and not text.startswith("#!/usr/bin/env python"):
        for number, line in enumerate(text.splitlines(), 1):
            yield number, line, path.suffix == ".md" or line.lstrip().startswith("#")
        return
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string, True
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        first = node.body[0] if node.body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            docstring = first.value.value
            if isinstance(docstring, str):
                yield first.lineno, docstring, True


def _text_files() -> list[Path]:
    suffixes = {".py", ".md", ".toml", ".service", ".txt", ".dockerignore", ""}
    chosen = []
    for path in FILES:
        if path.suffix not in suffixes or path.parent.name == "data":
            continue
        try:
            path.read_text()
        except UnicodeDecodeError:
            continue
        chosen.append(path)
    return chosen


def _placeholder(path: str) -> bool:
    """``tests/FILE``, ``scripts/<name>``, ``docs/*.md``: a pattern, not a citation."""
    return any(
        re.fullmatch(r"[A-Z_]+", segment) or any(c in segment for c in "<>*{}…") or segment == "..."
        for segment in path.split("/")
    )


@cache
def _basenames() -> set[str]:
    return {p.name for p in FILES}


@cache
def _defined_names(module: Path) -> set[str]:
    names = set()
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _module_exists(dotted: str) -> bool:
    """``a.b.c.Name[.attr]``: the longest prefix that is a module or package, then (if
    anything follows) a name that module defines or imports."""
    parts = dotted.split(".")
    if parts[-1] in _FILE_SUFFIXES:  # proxy.toml, devtools.local_kms.py: a file, not a module
        return True
    for cut in range(len(parts), 0, -1):
        base = REPO_ROOT.joinpath(*parts[:cut])
        module = (
            base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        )
        if module.is_file():
            rest = parts[cut:]
            return (
                not rest or rest[0] in _defined_names(module) or (base / f"{rest[0]}.py").is_file()
            )
    return False


def _citations() -> Iterator[tuple[str, str]]:
    for path in _text_files():
        where = str(path.relative_to(REPO_ROOT))
        for line, text, prose in _cited_text(path):
            for cited in CITED_PATH.findall(text):
                yield f"{where}:{line}", "path:" + cited.rstrip(".")
            for name in CITED_NAME.findall(text):
                yield f"{where}:{line}", "name:" + name
            for dotted in CITED_MODULE.findall(text) if prose else ():
                yield f"{where}:{line}", "module:" + dotted


def _exists(citation: str) -> bool:
    kind, _, value = citation.partition(":")
    if kind == "path":
        return value in MADE_BY_THE_READER or _placeholder(value) or (REPO_ROOT / value).exists()
    if kind == "name":
        return value in _basenames()
    return _module_exists(value)


def test_every_cited_path_exists() -> None:
    missing = sorted(
        {(where, citation) for where, citation in _citations() if not _exists(citation)}
    )
    assert not missing, "cited, but not in the repository:\n" + "\n".join(
        f"  {where}: {citation}" for where, citation in missing
    )


def test_the_citation_check_sees_citations() -> None:
    """The check above finds what it looks for (and would find a missing file)."""
    found = {citation for _, citation in _citations()}
    assert {
        "path:docs/architecture.md",
        "name:test_faults.py",
        "module:enclave_common.http_server",
    } <= found
    assert not _exists("path:docs/DESIGN.md") and not _exists("name:DESIGN.md")
    assert not _exists("module:enclave_agent.nsm_sim") and _exists(
        "module:enclave_agent.runtime.kms.KmsGateway"
    )


# A section cited by name after its document: `docs/proxy.md`, "The proxy port" (the
# README also bare: README, "The demo").
CITED_SECTION = re.compile(r"((?:[\w/]+/)?[\w]+\.md|(?<![\w/.])README(?![\w.]))`?,\s+\"([^\"]+)\"")


def _headings(document: Path) -> list[str]:
    return [
        " ".join(line.lstrip("#").replace("`", "").split()).lower()
        for line in document.read_text().splitlines()
        if line.startswith("#")
    ]


def test_every_cited_section_exists() -> None:
    missing = []
    for path in _text_files():
        # Comment lines that continue one another read as one text.
        text = re.sub(r"\n[ \t]*#[ \t]*", " ", path.read_text(errors="replace"))
        for document, section in CITED_SECTION.findall(text):
            target = REPO_ROOT / ("README.md" if document == "README" else document)
            if not target.is_file():
                continue  # a path the check above reports
            wanted = " ".join(section.replace("`", "").split()).lower()
            if not any(wanted in heading for heading in _headings(target)):
                missing.append(f"{path.relative_to(REPO_ROOT)}: {document}, {section!r}")
    assert not missing, "cited sections that are no heading there:\n" + "\n".join(missing)


# A link to a document or a heading: [the format](#the-sealed-format),
# [reference](agent.md#configuration-reference-toml).
MARKDOWN_LINK = re.compile(r"\]\(([^()\s]*)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_linked_document_and_anchor_exists() -> None:
    broken = []
    for doc in DOCS:
        source = REPO_ROOT / doc
        for target in MARKDOWN_LINK.findall(source.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:: not ours to check
            file_part, _, anchor = target.partition("#")
            linked = (source.parent / file_part).resolve() if file_part else source
            if not linked.exists():
                broken.append(f"{doc}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                slugs = {
                    _slug(line) for line in linked.read_text().splitlines() if line.startswith("#")
                }
                if anchor not in slugs:
                    broken.append(f"{doc}: {target} (no such heading)")
    assert not broken, "links to nothing:\n" + "\n".join(broken)
