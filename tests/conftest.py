"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.devstack import running_local_kms

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


@pytest.fixture(scope="module")
def enclave_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh simulated-NSM CA directory (one per test module), which ``local_kms`` trusts."""
    from enclave_agent.simulated.nsm import SimulatedNsm

    ca_dir = tmp_path_factory.mktemp("simulated-nsm-ca")
    SimulatedNsm.create().save_ca(ca_dir)
    return ca_dir


@pytest.fixture(scope="module")
def local_kms(
    tmp_path_factory: pytest.TempPathFactory, enclave_ca: Path
) -> Iterator[dict[str, Any]]:
    """The local KMS stand-in as a subprocess (one per test module) trusting ``enclave_ca``:
    its state file's content plus ``state_file`` (path) and ``log`` (Path of its log)."""
    work = tmp_path_factory.mktemp("local-kms")
    log = work / "local-kms.log"
    with running_local_kms(
        work / "state.json", "--simulated-nsm-ca", str(enclave_ca), log_path=log
    ) as kms:
        yield {**kms.state, "log": log}
