"""The stand-in's HTTPS edge: TLS, HTTP/1.1 (h11, keep-alive), routing, faults, logs.

Routes:
- ``POST /`` with ``X-Amz-Target: TrentService.<Op>``: a KMS call (service.LocalKms);
- ``POST /_local_kms/faults``: set a fault plan (faults.parse_plan);
- ``POST /_local_kms/credentials``: mint short-lived credentials
  ``{"ttl": seconds, "account": id, "principal": arn}`` (credentials.mint_requested);
- ``GET /_local_kms/healthz``.
The two admin routes need ``X-Local-Kms-Admin-Token`` equal to the state file's
``admin_token``. One log event per request, with its outcome and never a body.
"""

from __future__ import annotations

import hmac
import json
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import h11
import trio

from devtools.local_kms.credentials import CredentialStore
from devtools.local_kms.faults import FaultError, FaultInjector, parse_plan
from devtools.local_kms.service import (
    JSON_CONTENT_TYPE,
    LocalKms,
    Reply,
    error_reply,
    new_request_id,
)
from devtools.local_kms.sigv4 import Request
from enclave_common.logs import get_logger

MAX_BODY = 1 << 20
MAX_HEADERS = 64 * 1024
IDLE_TIMEOUT = 120.0
HANDSHAKE_TIMEOUT = 10.0
ADMIN_TOKEN_HEADER = "x-local-kms-admin-token"
ADMIN_PREFIX = "/_local_kms/"

log = get_logger()


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Admin:
    token: str
    faults: FaultInjector
    credentials: CredentialStore


def _json_reply(status: int, document: dict[str, Any]) -> Reply:
    return Reply(status, json.dumps(document).encode())


class KmsHttpServer:
    def __init__(self, kms: LocalKms, admin: Admin, ssl_context: ssl.SSLContext) -> None:
        self.kms = kms
        self.admin = admin
        self.ssl_context = ssl_context

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        ssl_listeners = [
            trio.SSLListener(listener, self.ssl_context, https_compatible=True)
            for listener in listeners
        ]
        await trio.serve_listeners(self._connection, ssl_listeners)

    async def _connection(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        peer = "?"
        try:
            address = stream.transport_stream.socket.getpeername()
            peer = f"{address[0]}:{address[1]}"
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
            await self._requests(stream, peer)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            ssl.SSLError,
        ) as exc:
            log.debug("connection_closed", peer=peer, reason=type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - one broken connection must not stop the server
            log.error("connection_failed", peer=peer, error=type(exc).__name__)
        finally:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await stream.aclose()

    async def _requests(self, stream: trio.SSLStream[trio.SocketStream], peer: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        try:
            await self._cycle(conn, stream, peer)
        except _BadRequest as exc:
            # The reason may quote received bytes: it goes to the client, not to the log.
            log.info("bad_http", peer=peer, status=exc.status)
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                body = json.dumps({"error": exc.reason}).encode()
                response = h11.Response(
                    status_code=exc.status,
                    headers=[
                        ("Content-Type", "application/json"),
                        ("Content-Length", str(len(body))),
                        ("Connection", "close"),
                    ],
                )
                await stream.send_all(
                    conn.send(response)
                    + conn.send(h11.Data(data=body))
                    + conn.send(h11.EndOfMessage())
                )

    async def _cycle(
        self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream], peer: str
    ) -> None:
        while True:
            with trio.move_on_after(IDLE_TIMEOUT) as idle:
                event = await self._next_event(conn, stream)
            if idle.cancelled_caught or isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                return
            started = time.monotonic()
            # A client that announces a body and never sends it must not hold the
            # connection (and its task) forever.
            with trio.fail_after(IDLE_TIMEOUT):
                body = await self._body(conn, stream)
            request = Request(
                method=event.method.decode("ascii", "replace"),
                target=event.target.decode("ascii", "replace"),
                headers=_headers(event.headers),
                body=body,
            )
            reply = await self._dispatch(request)
            await self._send(conn, stream, reply, head=request.method == "HEAD")
            log.info(
                "request",
                peer=peer,
                method=request.method,
                path=request.target.partition("?")[0],
                operation=reply.operation,
                status=reply.status,
                error=reply.error_type,
                ms=round((time.monotonic() - started) * 1000, 1),
            )
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _next_event(
        self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream]
    ) -> Any:
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _BadRequest(exc.error_status_hint, str(exc)) from exc
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(bytes(data))
                continue
            return event

    async def _body(self, conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream]) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event(conn, stream)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    raise _BadRequest(413, "request body too large")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise _BadRequest(400, "connection ended inside a request body")

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.SSLStream[trio.SocketStream],
        reply: Reply,
        *,
        head: bool = False,
    ) -> None:
        headers = [
            ("Content-Type", JSON_CONTENT_TYPE),
            ("Content-Length", str(len(reply.body))),
            ("x-amzn-RequestId", new_request_id()),
            *reply.headers,
        ]
        data = conn.send(h11.Response(status_code=reply.status, headers=headers))
        if not head:  # a HEAD answer carries the headers of the GET answer, no body
            data += conn.send(h11.Data(data=reply.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data or b"")

    async def _dispatch(self, request: Request) -> Reply:
        if request.target.startswith(ADMIN_PREFIX):
            return self._admin(request)
        fault = self.admin.faults.next_call()
        if fault is not None:
            if fault.delay:
                await trio.sleep(fault.delay)
            error = fault.error()
            if error is not None:
                return error_reply(*error, operation=_operation_of(request))
        try:
            return self.kms.handle(request, datetime.now(UTC))
        except Exception as exc:  # noqa: BLE001 - a bug here answers 500, as KMS would
            log.error("internal_error", operation=_operation_of(request), error=type(exc).__name__)
            return error_reply(
                500, "KMSInternalException", "local KMS internal error", _operation_of(request)
            )

    def _admin(self, request: Request) -> Reply:
        path = request.target.partition("?")[0]
        if path == ADMIN_PREFIX + "healthz" and request.method == "GET":
            return _json_reply(200, {"status": "ok"})
        token = request.headers.get(ADMIN_TOKEN_HEADER, "")
        if not hmac.compare_digest(token.encode(), self.admin.token.encode()):
            return _json_reply(403, {"error": "admin token missing or wrong"})
        if request.method != "POST":
            return _json_reply(405, {"error": "admin routes take POST"})
        try:
            document = json.loads(request.body or b"{}")
        except (ValueError, RecursionError):
            return _json_reply(400, {"error": "body is not JSON"})
        if path == ADMIN_PREFIX + "faults":
            try:
                plan = parse_plan(document)
            except FaultError as exc:
                return _json_reply(400, {"error": str(exc)})
            self.admin.faults.set(plan)
            log.info("faults_set", kind=plan.kind, count=plan.count, delay=plan.delay)
            return _json_reply(200, {"pending": self.admin.faults.pending})
        if path == ADMIN_PREFIX + "credentials":
            try:
                credential = self.admin.credentials.mint_requested(document, datetime.now(UTC))
            except ValueError as exc:
                return _json_reply(400, {"error": str(exc)})
            log.info("credentials_minted", account=credential.caller.account)
            return _json_reply(200, credential.process_document())
        return _json_reply(404, {"error": "no such admin route"})


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("ascii", "replace").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]},{text}" if key in headers else text
    return headers


def _operation_of(request: Request) -> str | None:
    target = request.headers.get("x-amz-target", "")
    return target.partition(".")[2] or None
