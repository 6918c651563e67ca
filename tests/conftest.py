"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from devtools.devstack import running_local_kms

REPO_ROOT = Path(__file__).resolve().parent.parent


def vectors_path() -> Path:
    return Path(os.environ.get("ENCLAVE_KMS_VECTORS", REPO_ROOT.parent / "shared" / "vectors"))


def _vectors_absent() -> str | None:
    """Why the vectors cannot be read, or None when they can."""
    path = vectors_path()
    if (path / "expected.jsonl").is_file():
        return None
    return f"test vectors not found at {path} (set ENCLAVE_KMS_VECTORS=DIR)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without the vectors, say so once, at the top of the run, and leave their tests
    out (deselected), rather than a SKIPPED line each. Under CI=true they stay in and
    fail (``vectors_dir``): CI must have them."""
    reason = _vectors_absent()
    if reason is None or os.environ.get("CI") == "true":
        return
    needing = [item for item in items if "vectors_dir" in getattr(item, "fixturenames", ())]
    if not needing:
        return
    config.hook.pytest_deselected(items=needing)
    items[:] = [item for item in items if item not in needing]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"{reason}: the {len(needing)} tests that read them are not run")


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The real-world vectors in ../shared/vectors (or $ENCLAVE_KMS_VECTORS), read in place.

    Absent: their tests are deselected (pytest_collection_modifyitems), except under
    CI=true, where absence is a failure.
    """
    reason = _vectors_absent()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return vectors_path()


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


STORE_ACCOUNTS = ("111122223333", "444455556666")


@pytest.fixture(scope="module")
def local_stores(
    tmp_path_factory: pytest.TempPathFactory, enclave_ca: Path
) -> Iterator[dict[str, Any]]:
    """``local_kms`` with its Secrets Manager, SSM and S3 (``--stores``) and two accounts,
    ``STORE_ACCOUNTS`` (the first is the primary): the state adds
    ``secretsmanager_endpoint``, ``ssm_endpoint`` and ``s3_endpoint``."""
    work = tmp_path_factory.mktemp("local-stores")
    log = work / "local-kms.log"
    accounts = [argument for account in STORE_ACCOUNTS for argument in ("--account", account)]
    with running_local_kms(
        work / "state.json",
        "--simulated-nsm-ca",
        str(enclave_ca),
        "--stores",
        *accounts,
        log_path=log,
    ) as kms:
        yield {**kms.state, "log": log}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that set the logs up themselves: the suite's set-up back afterwards."""
    saved = structlog.get_config(), structlog.contextvars.get_contextvars()
    yield
    structlog.configure(**saved[0])
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**saved[1])
