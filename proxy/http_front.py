"""One client connection on the proxy port: HTTP/1.1 through h11, then maybe a tunnel.

Theory of operation: h11 parses requests (bring-your-own-I/O); this module feeds it
bytes and acts on the events. ``CONNECT host:port`` is checked against the allowlist,
the upstream connected (``upstream``), ``200`` sent, and h11 steps aside
(SWITCHED_PROTOCOL): bytes the client sent after its request head (h11's
``trailing_data``) go upstream first, then ``relay`` moves raw bytes. ``GET
/v1/credentials`` and ``GET /healthz`` answer JSON and keep the connection open for
the next request. Every error is a JSON ``{"error": ...}`` answer and a closed
connection; nothing a client sends can take the process down.

Each request ends in exactly one log event with its outcome. Payload bytes are never
looked at, and the credentials handed out are never logged.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import h11
import trio

from enclave_common.address import describe_peer
from enclave_common.logs import get_logger

from .allowlist import Allowlist, AllowlistError, parse_target
from .config import ProxyConfig
from .credentials import CredentialSource, CredentialsUnavailable
from .relay import RelayResult, close_now, relay
from .upstream import Connector, Resolver, UpstreamError, open_upstream

# h11 answers "Receive buffer too long" (hint 431) past this many bytes of request head.
MAX_REQUEST_HEAD = 16 * 1024
# A GET or CONNECT has no business sending a body; a little is read and dropped.
_MAX_IGNORED_BODY = 64 * 1024
_RECEIVE_SIZE = 64 * 1024
_HEAD_PIECE = 1024
# After an error answer, how long to read and drop what the client still sends, so
# closing does not reset the connection before the client has read the answer.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1 << 20

_LOGGED_TOKEN = 32
_LOGGED_TARGET = 300

_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

log = get_logger()


@dataclass
class ProxyContext:
    """What every connection handler shares; ``allowlist`` is swapped on reload."""

    config: ProxyConfig
    allowlist: Allowlist
    region: str
    credentials: CredentialSource
    resolver: Resolver
    connector: Connector
    active_connections: int = 0
    shutting_down: bool = False
    idle_connections: set[trio.CancelScope] = field(default_factory=set)


@dataclass
class _Record:
    """The fields of the one log event a request ends with."""

    peer: str
    started: float
    method: str | None = None
    target: str | None = None
    status: int | None = None
    outcome: str = "no_request"
    upstream: str | None = None
    relay: RelayResult | None = None
    reason: str | None = None

    def emit(self) -> None:
        # Method and target are client-chosen: cap them so one request cannot bloat the log.
        fields: dict[str, Any] = {
            "peer": self.peer,
            "method": self.method[:_LOGGED_TOKEN] if self.method else None,
            "target": self.target[:_LOGGED_TARGET] if self.target else None,
            "status": self.status,
            "outcome": self.outcome,
            "duration_s": round(trio.current_time() - self.started, 6),
        }
        if self.reason is not None:
            # Reasons may quote the client's target (a bad CONNECT target): capped too.
            fields["reason"] = self.reason[:_LOGGED_TARGET]
        if self.upstream is not None:
            fields["upstream"] = self.upstream
        if self.relay is not None:
            fields["bytes_up"] = self.relay.bytes_a_to_b
            fields["bytes_down"] = self.relay.bytes_b_to_a
            fields["spliced"] = self.relay.spliced
        log.info("request", **fields)


class _Close(Exception):
    """End this connection (after the answer, if any, was sent)."""


def json_body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def error_response(status: int, reason: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    """A complete HTTP/1.1 error answer that closes the connection (pure)."""
    body = json_body({"error": reason})
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{k}: {v}" for k, v in extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


class _Connection:
    def __init__(self, stream: trio.SocketStream, ctx: ProxyContext) -> None:
        self.stream = stream
        self.ctx = ctx
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.peer = describe_peer(stream)
        self.requests = 0

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            # While a request head is awaited, read in small pieces: h11 enforces its
            # size limit only on an incomplete head, so one big read holding a whole
            # oversized head would slip past it.
            waiting_for_head = self.h11.their_state is h11.IDLE
            data = await self.stream.receive_some(
                _HEAD_PIECE if waiting_for_head else _RECEIVE_SIZE
            )
            self.h11.receive_data(data)

    async def _fail(self, record: _Record, status: int, reason: str, **extra: str) -> NoReturn:
        record.status = status
        record.outcome = "refused" if status < 500 else "failed"
        record.reason = reason
        headers = [(k.replace("_", "-"), v) for k, v in extra.items()]
        await self._linger_close(error_response(status, reason, headers))
        raise _Close

    async def _linger_close(self, answer: bytes) -> None:
        await _answer_and_linger(self.stream, answer, linger=True)

    async def _send_json(self, status: int, value: Any) -> None:
        body = json_body(value)
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("cache-control", "no-store"),
        ]
        if self.ctx.shutting_down:
            headers.append(("connection", "close"))
        data = self.h11.send(
            h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, "OK"))
        )
        data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def _drain_body(self) -> bool:
        """Read and drop the request body; False when it is larger than we tolerate."""
        received = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.EndOfMessage):
                return True
            if isinstance(event, h11.Data):
                received += len(event.data)
                if received > _MAX_IGNORED_BODY:
                    return False

    async def serve(self) -> None:
        while True:
            record = _Record(self.peer, trio.current_time())
            try:
                await self._serve_one(record)
            except _Close:
                # A keep-alive client hanging up between requests is no event of its own.
                if self.requests == 0 or record.method is not None:
                    record.emit()
                return
            except trio.Cancelled:
                if record.outcome == "open":
                    record.outcome = "cancelled"
                record.emit()
                raise
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                record.outcome = "client_gone"
                record.emit()
                return
            record.emit()
            self.requests += 1
            if self.ctx.shutting_down or self.h11.our_state is not h11.DONE:
                return
            try:
                self.h11.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _serve_one(self, record: _Record) -> None:
        # While no request is in hand the connection is idle: a shutdown closes it at
        # once (through this scope) instead of waiting out the header timeout.
        idle = trio.CancelScope()
        self.ctx.idle_connections.add(idle)
        try:
            with idle, trio.fail_after(self.ctx.config.header_timeout):
                event = await self._next_event()
        except trio.TooSlowError:
            if self.h11.their_state is h11.IDLE and not self.h11.trailing_data[0]:
                record.outcome = "idle_closed"
                raise _Close from None
            await self._fail(record, 408, "request head not received in time")
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint if e.error_status_hint in (400, 431) else 400
            reason = "request head too large" if status == 431 else "malformed request"
            await self._fail(record, status, reason)
        finally:
            self.ctx.idle_connections.discard(idle)
        if idle.cancelled_caught:
            record.outcome = "closed_for_shutdown"
            raise _Close
        if isinstance(event, h11.ConnectionClosed):
            record.outcome = "client_closed"
            raise _Close
        assert isinstance(event, h11.Request)
        record.method = event.method.decode("ascii", "replace")
        record.target = event.target.decode("ascii", "replace")
        if event.method == b"CONNECT":
            await self._drain_body_or_fail(record)
            await self._tunnel(record)
            raise _Close
        if event.method != b"GET":
            await self._fail(record, 405, "only CONNECT and GET are served", allow="CONNECT, GET")
        await self._drain_body_or_fail(record)
        path = event.target.split(b"?", 1)[0]
        if path == b"/healthz":
            await self._send_json(200, {"status": "ok"})
            record.status, record.outcome = 200, "ok"
        elif path == b"/v1/credentials":
            await self._credentials(record)
        else:
            await self._fail(record, 404, "no such path")

    async def _drain_body_or_fail(self, record: _Record) -> None:
        # The head's time limit applies to the body too: a body trickled in byte by
        # byte must not hold the connection (and its place under max_tunnels) for ever.
        if record.method != "CONNECT" and self.h11.they_are_waiting_for_100_continue:
            # The client holds its body back until told to go on: tell it. (Not before a
            # CONNECT's answer: a tunnel client expects the 200 as the first line.)
            await self.stream.send_all(
                self.h11.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        try:
            with trio.fail_after(self.ctx.config.header_timeout):
                complete = await self._drain_body()
        except trio.TooSlowError:
            await self._fail(record, 408, "request body not received in time")
        except h11.RemoteProtocolError:
            await self._fail(record, 400, "malformed request body")
        if not complete:
            await self._fail(record, 400, "request body not expected")

    async def _credentials(self, record: _Record) -> None:
        try:
            credentials = await self.ctx.credentials.get()
        except CredentialsUnavailable as e:
            await self._fail(record, 503, str(e))
        await self._send_json(200, credentials.to_json(self.ctx.region))
        record.status, record.outcome = 200, "ok"

    async def _tunnel(self, record: _Record) -> None:
        try:
            target = parse_target(record.target or "")
        except AllowlistError as e:
            await self._fail(record, 400, f"bad CONNECT target: {e}")
        record.target = str(target)
        # The allowlist is read once, here: a reload changes new requests, never this one.
        allowlist = self.ctx.allowlist
        if not allowlist.permits_target(target):
            await self._fail(record, 403, "target is not on the allowlist")
        try:
            upstream, used = await open_upstream(
                target,
                allowlist,
                resolver=self.ctx.resolver,
                connector=self.ctx.connector,
                connect_timeout=self.ctx.config.connect_timeout,
            )
        except UpstreamError as e:
            await self._fail(record, e.status, e.reason)
        record.upstream = used
        result = record.relay = RelayResult()
        try:
            answer = self.h11.send(
                h11.Response(status_code=200, reason=b"Connection established", headers=[])
            )
            await self.stream.send_all(answer)
            record.status, record.outcome = 200, "open"
            early, _ = self.h11.trailing_data
            if early:
                await upstream.send_all(early)
                result.bytes_a_to_b += len(early)
            await relay(
                self.stream, upstream, idle_timeout=self.ctx.config.idle_timeout, result=result
            )
            record.outcome = result.outcome
        except trio.Cancelled:
            record.outcome = "cancelled"
            raise
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            record.outcome = "reset"
        finally:
            await close_now(upstream)


async def _answer_and_linger(stream: trio.SocketStream, answer: bytes, *, linger: bool) -> None:
    try:
        await stream.send_all(answer)
        if not linger:
            return
        stream.socket.shutdown(socket.SHUT_WR)
        with trio.move_on_after(_LINGER_SECONDS):
            dropped = 0
            while dropped < _LINGER_BYTES:
                chunk = await stream.receive_some(_RECEIVE_SIZE)
                if not chunk:
                    break
                dropped += len(chunk)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client is gone; nothing left to tell it


async def refuse_connection(
    stream: trio.SocketStream, status: int, reason: str, *, linger: bool
) -> None:
    """Answer a connection refused before any of its bytes is read (the caller closes it)."""
    await _answer_and_linger(stream, error_response(status, reason), linger=linger)


async def serve_connection(stream: trio.SocketStream, ctx: ProxyContext) -> None:
    """Serve one accepted connection to its end; never raises for the client's doing."""
    connection = _Connection(stream, ctx)
    try:
        await connection.serve()
    except trio.Cancelled:
        raise
    except Exception as e:  # noqa: BLE001 - one bad connection must not stop the others
        log.error("connection_failed", peer=connection.peer, error=type(e).__name__)
    finally:
        await close_now(stream)
