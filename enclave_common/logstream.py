"""The log channel's framing, both ends: the agent writes it, the proxy reads it. Pure.

The agent ships its log events (and, when the operator opts in, its app's output) to
the proxy as the body of one long ``POST /v1/logs`` on the proxy port, sent chunked
(``Transfer-Encoding: chunked``): newline-delimited JSON, one record per line.

- ``{"stream": "agent"|"stdout"|"stderr", "line": TEXT}``: one line (without its
  line feed), at most ``LINE_MAX`` characters; a longer one is sent in pieces.
- ``{"dropped": {STREAM: N, ...}}``: the enclave dropped N lines of STREAM since the
  last such record, as its buffer was full (the proxy slow, gone, or throttling).
- ``{"metrics": SNAPSHOT}``: the agent's metrics (``enclave_common.metrics.to_json``).
- An empty line: nothing (a keep-alive while the enclave is quiet).

The reader takes bytes as they come and never holds more than ``max_record`` of an
unfinished line: a longer record is refused whole (``Refused``) and skipped to the
next line feed, so an endless line costs it that much and no more.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

LOGS_PATH = "/v1/logs"
CONTENT_TYPE = "application/x-ndjson"
STREAMS = ("agent", "stdout", "stderr")
LINE_MAX = 8192  # characters of one line record
MAX_RECORD = 256 * 1024  # bytes of one encoded record, a metrics snapshot included


@dataclass(frozen=True)
class Line:
    stream: str
    text: str


@dataclass(frozen=True)
class Dropped:
    counts: Mapping[str, int]


@dataclass(frozen=True)
class Snapshot:
    data: Any  # for enclave_common.metrics.from_json, which checks it


@dataclass(frozen=True)
class Refused:
    """A record that was skipped, and why (never its content)."""

    reason: str


Record = Line | Dropped | Snapshot | Refused


def _encode(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def encode_lines(stream: str, text: str) -> Iterator[bytes]:
    """One line's records: pieces of at most ``LINE_MAX`` characters (an empty line
    is one empty piece)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}")
    for start in range(0, max(len(text), 1), LINE_MAX):
        yield _encode({"stream": stream, "line": text[start : start + LINE_MAX]})


def encode_dropped(counts: Mapping[str, int]) -> bytes:
    return _encode({"dropped": dict(counts)})


def encode_snapshot(snapshot: Any) -> bytes:
    return _encode({"metrics": snapshot})


KEEPALIVE = b"\n"


class RecordReader:
    """Bytes in, records out; holds at most ``max_record`` bytes of a partial line."""

    def __init__(self, max_record: int = MAX_RECORD) -> None:
        self.max_record = max_record
        self._partial = bytearray()
        self._skipping = False  # inside a refused, oversized record

    def feed(self, data: bytes) -> list[Record]:
        records: list[Record] = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            piece = data[start:end]
            start = end + 1
            if self._skipping:
                self._skipping = False
                continue
            if len(self._partial) + len(piece) > self.max_record:
                self._partial.clear()
                records.append(Refused(f"record longer than {self.max_record} bytes"))
                continue
            self._partial += piece
            line = bytes(self._partial)
            self._partial.clear()
            if line.strip():
                records.append(parse_record(line))
        rest = data[start:]
        if not self._skipping:
            if len(self._partial) + len(rest) > self.max_record:
                self._partial.clear()
                self._skipping = True
                records.append(Refused(f"record longer than {self.max_record} bytes"))
            else:
                self._partial += rest
        return records


def parse_record(line: bytes) -> Record:
    """One complete line (without its line feed) as a record, or ``Refused``."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return Refused("not a JSON line")
    if not isinstance(value, dict) or len(value) != (2 if "stream" in value else 1):
        return Refused("not a record")
    if "stream" in value:
        stream, text = value.get("stream"), value.get("line")
        if stream not in STREAMS or not isinstance(text, str) or len(text) > LINE_MAX:
            return Refused("a line record needs a known stream and a line")
        return Line(stream, text)
    if "dropped" in value:
        counts = value["dropped"]
        if not (
            isinstance(counts, dict)
            and all(
                name in STREAMS and isinstance(n, int) and not isinstance(n, bool) and n >= 0
                for name, n in counts.items()
            )
        ):
            return Refused("a dropped record counts lines per known stream")
        return Dropped(counts)
    if "metrics" in value:
        return Snapshot(value["metrics"])
    return Refused("not a record")
