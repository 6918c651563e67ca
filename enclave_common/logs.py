"""structlog set-up shared by both processes: one JSON object per line.

Callers log events with fields, never payloads: no plaintext, key, credential or
body is ever passed to a logger (tests scan the logs for markers to prove it).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")


def configure_logging(level: str = "info", *, stream: TextIO | None = None, process: str) -> None:
    """Send JSON lines at ``level`` and above to ``stream`` (default stderr)."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(process=process)


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)
