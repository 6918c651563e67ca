"""The proxy's end of the enclaves' log channel: ``POST /v1/logs`` on the proxy port.

Each record an enclave ships (framing: ``enclave_common.logstream``) becomes one event
in the proxy's own log, so ``journalctl -u enclave-proxy`` shows the enclave too:
``enclave_log`` with ``enclave`` (``cid:16``; ``tcp:ADDRESS`` or ``uid:N`` for the
development peers), ``stream`` (``agent``, ``stdout``, ``stderr``) and ``line``. An
agent event keeps its level (``journalctl -p err`` finds the enclave's errors too);
app output is logged at info. The enclave's news of lines it had to drop becomes an
``enclave_log_dropped`` warning; its metrics snapshot is kept for ``/metrics``.

What an enclave can cost the proxy, whatever it sends (each bound tested):
- One stream at a time per enclave: a newer one (the agent reconnecting) replaces the
  older, which is answered 409. Many connections from one enclave are one stream.
- ``rate`` records a second, and ``rate * line_bytes`` bytes a second of anything
  (refused records and skipped bytes included): past that the proxy stops reading
  for a while, so the enclave's own bounded buffer fills and drops (and says so).
- ``logstream.MAX_RECORD`` bytes held of one record: a longer one is refused whole
  and skipped. A line is logged cut at ``line_bytes`` characters (``truncated``).
- A piece of the body within ``piece_timeout`` (the agent sends a keep-alive).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import trio

from enclave_common.http_server import Answer, HttpError, Request
from enclave_common.logs import PRIORITIES, get_logger
from enclave_common.logstream import Dropped, Line, Record, RecordReader, Refused, Snapshot
from enclave_common.metrics import MetricsError, from_json

from .admission import PeerKey, enclave_name
from .metrics import MAX_ENCLAVES, ProxyMetrics

MAX_SNAPSHOT_SAMPLES = 5000
SNAPSHOT_PREFIX = "enclave_agent_"
_LOGGED_REASON = 200

log = get_logger()


class _Gate:
    """A token bucket: ``rate`` tokens a second, at most one second's worth in hand; a
    cost beyond what is in hand is paid by waiting."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = trio.current_time()

    async def take(self, cost: float) -> None:
        now = trio.current_time()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate) - cost
        self.at = now
        if self.tokens < 0:
            await trio.sleep(-self.tokens / self.rate)


class EnclaveLogs:
    def __init__(
        self, metrics: ProxyMetrics, *, rate: float, line_bytes: int, piece_timeout: float
    ) -> None:
        self.metrics = metrics
        self.rate = rate
        self.line_bytes = line_bytes
        self.piece_timeout = piece_timeout
        self.closing = False
        self._streams: dict[str, trio.CancelScope] = {}
        self._gates: OrderedDict[str, _Gate] = OrderedDict()

    def close(self) -> None:
        """Shutting down: every stream is answered 503 and closed now."""
        self.closing = True
        for scope in self._streams.values():
            scope.cancel()

    def _gate(self, enclave: str) -> _Gate:
        # Kept after a stream ends, so reconnecting never refills the bucket; the least
        # recently used go first past MAX_ENCLAVES.
        gate = self._gates.pop(enclave, None) or _Gate(self.rate)
        self._gates[enclave] = gate
        while len(self._gates) > MAX_ENCLAVES:
            self._gates.popitem(last=False)
        return gate

    async def receive(self, key: PeerKey, request: Request) -> Answer:
        """Serve one ``POST /v1/logs`` from the peer ``key`` until it ends."""
        if self.closing:
            raise HttpError(503, "the proxy is stopping")
        enclave = enclave_name(key)
        previous = self._streams.get(enclave)
        if previous is not None:
            previous.cancel()
        scope = self._streams[enclave] = trio.CancelScope()
        gate = self._gate(enclave)
        reader = RecordReader()
        try:
            with scope:
                async for piece in request.stream(limit=None, piece_timeout=self.piece_timeout):
                    records = reader.feed(piece)
                    await gate.take(max(len(records), len(piece) / self.line_bytes))
                    for record in records:
                        self._record(enclave, record)
        finally:
            if self._streams.get(enclave) is scope:
                del self._streams[enclave]
                self.metrics.snapshot(enclave, None)
        if scope.cancelled_caught:
            if self.closing:
                raise HttpError(503, "the proxy is stopping")
            raise HttpError(409, "a newer log stream of this enclave replaced this one")
        return Answer(204)

    def _record(self, enclave: str, record: Record) -> None:
        if isinstance(record, Line):
            self.metrics.log_lines.inc(enclave=enclave, stream=record.stream)
            fields: dict[str, Any] = {
                "enclave": enclave,
                "stream": record.stream,
                "line": record.text[: self.line_bytes],
            }
            if len(record.text) > self.line_bytes:
                fields["truncated"] = True
            level = _agent_level(record.text) if record.stream == "agent" else "info"
            getattr(log, level)("enclave_log", **fields)
        elif isinstance(record, Dropped):
            counts = {stream: n for stream, n in record.counts.items() if n}
            if counts:
                for n in counts.values():
                    self.metrics.log_lines_dropped.inc(n, enclave=enclave, where="enclave")
                log.warning("enclave_log_dropped", enclave=enclave, dropped=counts)
        elif isinstance(record, Snapshot):
            try:
                families = from_json(
                    record.data, prefix=SNAPSHOT_PREFIX, max_samples=MAX_SNAPSHOT_SAMPLES
                )
            except MetricsError as exc:
                log.warning(
                    "enclave_metrics_refused", enclave=enclave, reason=str(exc)[:_LOGGED_REASON]
                )
            else:
                self.metrics.snapshot(enclave, families)
        else:
            assert isinstance(record, Refused)
            self.metrics.log_lines_dropped.inc(enclave=enclave, where="proxy")
            log.warning("enclave_log_refused", enclave=enclave, reason=record.reason)


def _agent_level(text: str) -> str:
    """The level of an agent event (a JSON line of its log), else info."""
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        return "info"
    level = event.get("level") if isinstance(event, dict) else None
    return level if level in PRIORITIES else "info"
