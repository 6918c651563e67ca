"""Without ../shared/vectors the suite says so once, at the top, and leaves their tests
out; under CI=true their absence fails the run. Runs pytest itself on one file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def _pytest(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("CI", "ENCLAVE_KMS_VECTORS")}
    environment.update(ENCLAVE_KMS_VECTORS=str(tmp_path / "no-vectors"), **env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cms.py"],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_absent_vectors_are_named_once_at_the_top(tmp_path: Path) -> None:
    result = _pytest(tmp_path)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    top = re.fullmatch(
        rf"test vectors not found at {re.escape(str(tmp_path / 'no-vectors'))} "
        r"\(set ENCLAVE_KMS_VECTORS=DIR\): the (\d+) tests that read them are not run",
        lines[0],
    )
    assert top, lines[0]
    assert result.stdout.count("test vectors not found") == 1
    assert "SKIPPED" not in result.stdout
    assert f"{top.group(1)} deselected" in lines[-1]


def test_absent_vectors_fail_under_ci(tmp_path: Path) -> None:
    result = _pytest(tmp_path, CI="true")
    assert result.returncode != 0
    assert "test vectors not found" in result.stdout
    assert "deselected" not in result.stdout.splitlines()[-1]
