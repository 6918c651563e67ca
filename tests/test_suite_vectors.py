"""Without ../shared/vectors the suite says so once, at the top, and leaves their tests
out; under CI=true their absence fails the run. Runs pytest itself on one file."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.support.stack import run_module


def _pytest(tmp_path: Path, **env: str) -> tuple[int, str]:
    """pytest on one file that reads the vectors, with none where they are looked for:
    (its exit status, its output)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("CI", "ENCLAVE_KMS_VECTORS")}
    environment.update(ENCLAVE_KMS_VECTORS=str(tmp_path / "no-vectors"), **env)
    args = ("-q", "-p", "no:cacheprovider", "tests/test_cms.py")
    result = run_module("pytest", *args, env=environment)
    return result.returncode, result.stdout.decode()


def test_absent_vectors_are_named_once_at_the_top(tmp_path: Path) -> None:
    returncode, stdout = _pytest(tmp_path)
    assert returncode == 0, stdout
    lines = stdout.splitlines()
    top = re.fullmatch(
        rf"test vectors not found at {re.escape(str(tmp_path / 'no-vectors'))} "
        r"\(set ENCLAVE_KMS_VECTORS=DIR\): the (\d+) tests that read them are not run",
        lines[0],
    )
    assert top, lines[0]
    assert stdout.count("test vectors not found") == 1
    assert "SKIPPED" not in stdout
    assert f"{top.group(1)} deselected" in lines[-1]


def test_absent_vectors_fail_under_ci(tmp_path: Path) -> None:
    returncode, stdout = _pytest(tmp_path, CI="true")
    assert returncode != 0
    assert "test vectors not found" in stdout
    assert "deselected" not in stdout.splitlines()[-1]
