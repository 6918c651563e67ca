"""enclave_common.logs: syslog priorities when stderr is the journal, library records
through the same pipeline (from WARNING up only), the tee."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclave_common.logs import configure_logging, get_logger, writes_to_journal
from tests.conftest import REPO_ROOT


@pytest.fixture(autouse=True)
def _restore_root_logger(restore_logging: None) -> Iterator[None]:
    root_level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(root_level)


def identity(path: Path) -> str:
    info = os.stat(path)
    return f"{info.st_dev}:{info.st_ino}"


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file JOURNAL_STREAM names: what is written there goes to "the journal"."""
    out = tmp_path / "journal"
    out.touch()
    monkeypatch.setenv("JOURNAL_STREAM", identity(out))
    return out


def log_every_level(path: Path) -> list[str]:
    with path.open("w") as stream:
        configure_logging("debug", stream=stream, process="test")
        log = get_logger()
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
    return path.read_text().splitlines()


def test_each_line_carries_its_priority_when_stderr_is_the_journal(journal: Path) -> None:
    lines = log_every_level(journal)
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["d", "i", "w", "e", "c"]


@pytest.mark.parametrize("value", [None, "1:2", "garbage", "", "12:"])
def test_no_prefix_when_stderr_is_not_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    """JOURNAL_STREAM absent, naming another file (stderr redirected after systemd
    started us), or malformed: plain JSON lines."""
    if value is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", value)
    lines = log_every_level(tmp_path / "log")
    assert [json.loads(line)["event"] for line in lines] == ["d", "i", "w", "e", "c"]


def test_a_stream_without_a_descriptor_is_not_the_journal() -> None:
    import io

    assert not writes_to_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_the_proxy_under_the_journal_marks_its_error_lines(tmp_path: Path) -> None:
    """The real process: a config error is logged at error priority, ``<3>``."""
    err = tmp_path / "stderr"
    err.touch()
    env = {**os.environ, "JOURNAL_STREAM": identity(err), "PYTHONPATH": str(REPO_ROOT)}
    with err.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "--listen", "tcp:10.0.0.1:8000"],
            stderr=stderr,
            env=env,
            timeout=60,
        )
    assert done.returncode == 2
    first = err.read_text().splitlines()[0]
    assert first.startswith("<3>{")
    assert json.loads(first[3:])["event"] == "config_invalid"


def test_library_records_become_events_from_warning_up(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with path.open("w") as stream:
        configure_logging("debug", stream=stream, process="test")
        configure_logging("debug", stream=stream, process="test")  # twice: one bridge
        library = logging.getLogger("botocore.credentials")
        # A library turning its own logger up to DEBUG does not open the floor.
        logging.getLogger("botocore").setLevel(logging.DEBUG)
        try:
            library.debug("Response body: SECRET-DEBUG-MARKER")
            library.info("SECRET-INFO-MARKER")
            library.warning("Refreshing %s credentials", "temporary")
            try:
                raise ValueError("SECRET-EXCEPTION-TEXT")
            except ValueError:
                library.exception("failed")
            logging.getLogger("x").log(45, "custom level")
        finally:
            logging.getLogger("botocore").setLevel(logging.NOTSET)
    text = path.read_text()
    assert "SECRET" not in text
    events = [json.loads(line) for line in text.splitlines()]
    assert [(e["event"], e["level"], e["logger"], e["message"]) for e in events] == [
        ("library", "warning", "botocore.credentials", "Refreshing temporary credentials"),
        ("library", "error", "botocore.credentials", "failed"),
        ("library", "error", "x", "custom level"),
    ]
    assert events[1]["error"] == "ValueError"


def test_the_tee_gets_each_line_without_the_prefix(journal: Path) -> None:
    teed: list[str] = []
    with journal.open("w") as stream:
        configure_logging("info", stream=stream, process="test", tee=teed.append)
        get_logger().debug("filtered")
        get_logger().error("boom", n=1)
    assert len(teed) == 1
    assert json.loads(teed[0])["event"] == "boom"
    assert journal.read_text() == f"<3>{teed[0]}\n"
