"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The real-world vectors in ../shared/vectors (or $ENCLAVE_KMS_VECTORS), read in place.

    Absent: skip with a reason, except under CI=true, where absence is a failure.
    """
    path = Path(os.environ.get("ENCLAVE_KMS_VECTORS", REPO_ROOT.parent / "shared" / "vectors"))
    if not (path / "expected.jsonl").is_file():
        message = f"test vectors not found at {path} (set ENCLAVE_KMS_VECTORS)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
