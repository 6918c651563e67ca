"""The proxy's answer shapes: JSON bodies, and one error shape for every error (the
HTTP driver's, a route's, a refusal's), ``{"error": MESSAGE}``."""

from __future__ import annotations

import json
from typing import Any

from enclave_common.http_server import Answer


def json_answer(status: int, value: Any) -> Answer:
    body = json.dumps(value, separators=(",", ":")).encode()
    headers = [("content-type", "application/json"), ("cache-control", "no-store")]
    return Answer(status, headers, body)


def error_answer(status: int, message: str) -> Answer:
    """The proxy's error shape, for every error (the driver's, ours, a refusal's)."""
    return json_answer(status, {"error": message})
