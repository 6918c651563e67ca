"""structlog set-up shared by both processes: one JSON object per line.

Callers log events with fields, never payloads: no plaintext, key, credential or
body is ever passed to a logger (tests scan the logs for markers to prove it).

Under systemd, when stderr is the journal (``JOURNAL_STREAM`` names its device and
inode, systemd.exec(5)), each line starts with its syslog priority, ``<3>`` for an
error and so on (the prefixes of sd-daemon(3)), so ``journalctl -p err`` finds the
errors. Records of the standard ``logging`` module (botocore, ...) go through the same
pipeline as ``library`` events, from WARNING up only: below that, libraries log
request and response bodies, and an STS answer's body holds credentials.

``tee``: a callable given every line as written (without a priority prefix), e.g. the
agent's log shipper; it must never block.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")
# sd-daemon(3): SD_CRIT <2>, SD_ERR <3>, SD_WARNING <4>, SD_INFO <6>, SD_DEBUG <7>.
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
# Library records below this never reach a log (see above).
LIBRARY_FLOOR = logging.WARNING
_MAX_LIBRARY_MESSAGE = 1000


def writes_to_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Is ``stream`` the journal's stream connection, as ``JOURNAL_STREAM`` says?"""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not (sep and device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def _level(level: str) -> Callable[[_LineLogger, str], None]:
    """``_LineLogger``'s method for ``level`` (a plain function: as fast as a ``def``)."""

    def write(self: _LineLogger, line: str) -> None:
        self._write(level, line)

    return write


class _LineLogger:
    """Writes each rendered event as one line; structlog calls the level's method."""

    def __init__(self, stream: TextIO, journal: bool, tee: Callable[[str], None] | None) -> None:
        self._stream = stream
        self._journal = journal
        self._tee = tee
        self._lock = threading.Lock()  # library records may come from worker threads

    def _write(self, level: str, line: str) -> None:
        text = f"<{PRIORITIES[level]}>{line}\n" if self._journal else f"{line}\n"
        with self._lock:
            self._stream.write(text)
            self._stream.flush()
            if self._tee is not None:
                self._tee(line)

    debug = _level("debug")
    info = msg = _level("info")
    warning = warn = _level("warning")
    error = exception = _level("error")
    critical = fatal = _level("critical")


class _LibraryRecords(logging.Handler):
    """Standard ``logging`` records into our events: level, logger name, message."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a library's bad format string
            message = str(record.msg)
        fields: dict[str, Any] = {"logger": record.name, "message": message[:_MAX_LIBRARY_MESSAGE]}
        if record.exc_info and record.exc_info[0] is not None:
            fields["error"] = record.exc_info[0].__name__  # the type only, never its text
        level = min(logging.CRITICAL, record.levelno // 10 * 10)  # a custom level: its decade
        get_logger().log(level, "library", **fields)


def configure_logging(
    level: str = "info",
    *,
    stream: TextIO | None = None,
    process: str,
    tee: Callable[[str], None] | None = None,
) -> None:
    """Send JSON lines at ``level`` and above to ``stream`` (default stderr)."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    out = stream or sys.stderr
    line_logger = _LineLogger(out, writes_to_journal(out), tee)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *_: line_logger,
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(process=process)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _LibraryRecords)]:
        root.removeHandler(handler)
    # On the handler too: a library's own logger set to DEBUG still passes records up.
    floor = max(LIBRARY_FLOOR, getattr(logging, level.upper()))
    root.addHandler(_LibraryRecords(floor))
    root.setLevel(floor)


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)
