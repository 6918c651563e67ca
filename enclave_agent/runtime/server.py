"""The app-facing HTTP/1.1 server: trio streams in, h11 for framing, one task each.

Theory of operation: ``AppServer.serve`` accepts on a listener (the Unix socket,
and optionally a loopback TCP port) and runs every connection in its own task, so
a slow KMS call for one app never holds up another; nothing here takes a lock
around KMS calls (the gateway bounds its own pool). A connection is kept alive
for further requests. Each request must arrive whole within ``header_timeout``
once its first byte has come, and a kept-alive connection may idle at most
``idle_timeout``, so idle or trickling clients are cut off instead of pinning
tasks; an answer the client does not take within ``idle_timeout`` ends the
connection too. Bodies above ``max_body_bytes`` get 413 before they are read. A
failure in one connection ends that connection only (``trio.serve_listeners``
would otherwise let it end the whole server).

On every connection, before any of its bytes are read or a connection slot is
taken, the kernel names the caller (``callers``: SO_PEERCRED on the Unix socket,
inet_diag on the loopback TCP listener, which exists for SDK apps that can only
speak TCP) and the ``[access]`` rules decide; a refused caller gets KMS's
``AccessDeniedException`` at once and a ``caller_refused`` log event. Each caller
(a uid) gets its own share of connections and of KMS calls in flight
(``admission``), so one caller at its cap never stops another.

Logs: one ``request`` event per request (method, path, operation, status, error
type, caller, duration); bodies, plaintexts and secret values never reach a log.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import h11
import trio

from enclave_agent.runtime import app_protocol
from enclave_agent.runtime.admission import Admission, Caller
from enclave_agent.runtime.app_protocol import (
    AppProtocolError,
    AppResponse,
    AttestationCall,
    HealthCall,
    KmsCall,
    SecretCall,
)
from enclave_agent.runtime.callers import Callers, identify
from enclave_agent.runtime.config import AccessConfig, Limits
from enclave_agent.runtime.kms import KmsError
from enclave_agent.runtime.nsm import NsmError
from enclave_common.logs import get_logger
from enclave_common.tcp_peercred import Query, ask_kernel

MAX_HEADER_BYTES = 16 * 1024
_RECEIVE_SIZE = 64 * 1024

log = get_logger()


class Gateway(Protocol):
    """What the server needs from ``kms.KmsGateway``."""

    async def call(self, operation: str, request: Mapping[str, Any]) -> dict[str, Any]: ...


class SecretLookup(Protocol):
    def get(self, name: str) -> bytes | None: ...


Attester = Callable[[bytes | None, bytes | None, bytes | None], Awaitable[bytes]]


class _ReadError(Exception):
    """The request could not be read; answer ``response`` (if any) and close."""

    def __init__(self, response: AppResponse | None, reason: str) -> None:
        super().__init__(reason)
        self.response = response
        self.reason = reason


class AppServer:
    def __init__(
        self,
        *,
        gateway: Gateway,
        attest: Attester,
        secrets: SecretLookup,
        access: AccessConfig,
        limits: Limits,
        query: Query = ask_kernel,
    ) -> None:
        self._gateway = gateway
        self._query = query
        self._attest = attest
        self._secrets = secrets
        self._access = access
        self._limits = limits
        self._admission = Admission(limits)

    async def serve(
        self,
        listener: trio.SocketListener,
        *,
        callers: Callers,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def handler(stream: trio.SocketStream) -> None:
            await self.handle_connection(stream, callers=callers)

        async with trio.open_nursery() as nursery:
            # serve_listeners copes with EMFILE and friends by pausing accept.
            await nursery.start(trio.serve_listeners, handler, [listener])
            task_status.started()

    async def handle_connection(self, stream: trio.SocketStream, *, callers: Callers) -> None:
        async with stream:
            # Who is calling is decided before a byte of the request is read or a
            # connection slot is taken: a refused caller's request is never parsed
            # and cannot hold slots that allowed apps need.
            who = await identify(stream, callers, self._access, self._query)
            caller = who.caller
            if not who.allowed:
                await self._refuse(
                    stream,
                    caller,
                    AppProtocolError(
                        "AccessDeniedException",
                        "this process is not allowed to use the enclave agent",
                        403,
                    ),
                )
                return
            with contextlib.ExitStack() as share:
                try:
                    share.enter_context(
                        self._admission.connection(caller, tcp=callers is not Callers.UNIX)
                    )
                except AppProtocolError as exc:
                    await self._refuse(stream, caller, exc)
                    return
                try:
                    await self._connection(stream, who.peer, caller)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                    # The client went away or stopped reading: its connection ends here.
                    pass
                except Exception as exc:  # noqa: BLE001
                    # trio.serve_listeners lets a handler's exception end the whole
                    # server: one connection's failure must never stop it for every app.
                    log.error("connection_failed", error=type(exc).__name__)

    async def _refuse(
        self, stream: trio.SocketStream, caller: Caller, refusal: AppProtocolError
    ) -> None:
        response = app_protocol.error_response(refusal.error_type, refusal.message, refusal.status)
        with self._admission.refusal(caller) as linger:
            await _send_raw(stream, response, linger=linger)

    async def _connection(self, stream: trio.SocketStream, peer: str, caller: Caller) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        first = True
        while True:
            try:
                read = await self._read_request(conn, stream, first)
            except _ReadError as exc:
                log.info("request_rejected", caller=peer, reason=exc.reason)
                if exc.response is not None:
                    await self._send(conn, stream, exc.response, close=True)
                    await _drain_and_close(stream)
                return
            if read is None:
                return
            first = False
            request, body = read
            started = time.monotonic()
            method = request.method.decode("ascii", "replace")
            # Logged: the path only (no query), cut short so a huge target cannot flood logs.
            path = request.target.decode("ascii", "replace").split("?", 1)[0][:200]
            headers = {
                name.decode("ascii").lower(): value.decode("latin-1")
                for name, value in request.headers
            }
            response, operation = await self._respond(caller, method, path, request, headers, body)
            error_type = None
            if response.status >= 400:
                error_type = _error_type(response)
            log.info(
                "request",
                caller=peer,
                method=method,
                path=path,
                operation=operation,
                status=response.status,
                error_type=error_type,
                duration_ms=round((time.monotonic() - started) * 1000, 2),
            )
            await self._send(conn, stream, response, close=False)
            if conn.our_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _respond(
        self,
        caller: Caller,
        method: str,
        path: str,
        request: h11.Request,
        headers: Mapping[str, str],
        body: bytes,
    ) -> tuple[AppResponse, str | None]:
        operation: str | None = None
        try:
            route = app_protocol.route_request(
                method, request.target.decode("ascii", "replace"), headers, body
            )
            if isinstance(route, KmsCall):
                operation = route.operation
                async with self._admission.kms_call(caller, operation):
                    answer = await self._gateway.call(route.operation, route.request)
                return app_protocol.kms_response(answer), operation
            if isinstance(route, SecretCall):
                value = self._secrets.get(route.name)
                if value is None:
                    raise AppProtocolError(
                        "NotFoundException", f"no secret named {route.name!r} is configured", 404
                    )
                return app_protocol.bytes_response(value), operation
            if isinstance(route, AttestationCall):
                document = await self._attest(route.nonce, route.user_data, route.public_key)
                return app_protocol.bytes_response(document), operation
            assert isinstance(route, HealthCall)
            return app_protocol.json_response({"status": "ok"}), operation
        except AppProtocolError as exc:
            return app_protocol.error_response(exc.error_type, exc.message, exc.status), operation
        except KmsError as exc:
            return app_protocol.error_response(exc.error_type, exc.message, exc.status), operation
        except NsmError as exc:
            # The attestation route: name the NSM's error, as the KMS path does.
            log.warning("nsm_failed", path=path, error_name=exc.error_name)
            return (
                app_protocol.error_response(
                    "KMSInternalException", f"NSM error: {exc.error_name}", 500
                ),
                operation,
            )
        except Exception as exc:  # noqa: BLE001 - one failed request must not end the connection
            # An agent bug: the log gets the type only, never the details, which could
            # quote request data; the app gets neither (no internals reach a client).
            log.error("request_failed", path=path, operation=operation, error=type(exc).__name__)
            return (
                app_protocol.error_response(
                    "KMSInternalException", "internal error in the agent (its log names it)", 500
                ),
                operation,
            )

    async def _read_request(
        self, conn: h11.Connection, stream: trio.SocketStream, first: bool
    ) -> tuple[h11.Request, bytes] | None:
        limits = self._limits
        idle_deadline = trio.current_time() + (
            limits.header_timeout if first else limits.idle_timeout
        )
        request_deadline: float | None = None
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _malformed(exc.error_status_hint, str(exc)) from exc
            if event is h11.NEED_DATA:
                if request_deadline is None and conn.their_state is not h11.IDLE:
                    request_deadline = trio.current_time() + limits.header_timeout
                if conn.they_are_waiting_for_100_continue:
                    # curl sends "Expect: 100-continue" for larger bodies and would
                    # otherwise wait a second before sending them.
                    await stream.send_all(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
                deadline = request_deadline if request_deadline is not None else idle_deadline
                with trio.move_on_at(deadline):
                    data = await stream.receive_some(_RECEIVE_SIZE)
                    if data and request_deadline is None:
                        request_deadline = trio.current_time() + limits.header_timeout
                    conn.receive_data(data)
                    continue
                if request_deadline is None:
                    raise _ReadError(None, "idle timeout")
                raise _ReadError(
                    app_protocol.error_response(
                        "RequestTimeoutException", "the request did not arrive in time", 408
                    ),
                    "request timeout",
                )
            if isinstance(event, h11.Request):
                request = event
                if _head_size(event) > MAX_HEADER_BYTES:
                    raise _malformed(431, "the request head is too large")
                length = _content_length(event)
                if length is not None and length > limits.max_body_bytes:
                    raise _ReadError(_too_large(limits.max_body_bytes), "body too large")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limits.max_body_bytes:
                    raise _ReadError(_too_large(limits.max_body_bytes), "body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None
            elif event is h11.PAUSED:
                # A client that sent a request after a Connection: close; nothing more to read.
                return None

    async def _send(
        self, conn: h11.Connection, stream: trio.SocketStream, response: AppResponse, *, close: bool
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("x-amzn-RequestId", str(uuid.uuid4())),
        ]
        if close:
            headers.append(("Connection", "close"))
        try:
            data = conn.send(h11.Response(status_code=response.status, headers=headers))
            data = (data or b"") + (conn.send(h11.Data(data=response.body)) or b"")
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return
        # A client that sends requests but never reads the answers would otherwise
        # block here for good, holding its connection slot.
        with trio.fail_after(self._limits.idle_timeout):
            await stream.send_all(data)


def _malformed(status: int, reason: str) -> _ReadError:
    error_type = "RequestHeaderFieldsTooLarge" if status == 431 else "BadRequestException"
    return _ReadError(
        app_protocol.error_response(error_type, f"malformed HTTP request: {reason}", status),
        "malformed",
    )


def _head_size(request: h11.Request) -> int:
    # h11 bounds a head that trickles in (max_incomplete_event_size) but parses a
    # complete one of any size when it arrives at once; this bounds that case too.
    return len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)


async def _drain_and_close(stream: trio.SocketStream) -> None:
    """Close after an error answer without a TCP/Unix reset eating that answer:
    closing with unread input makes the kernel send RST, and the client may then
    lose the response it has not read yet. So: end our side, then read (briefly,
    boundedly) whatever the client still sends."""
    with trio.move_on_after(1.0):
        try:
            await stream.send_eof()
            for _ in range(64):
                if not await stream.receive_some(_RECEIVE_SIZE):
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return None


def _too_large(limit: int) -> AppResponse:
    return app_protocol.error_response(
        "RequestEntityTooLargeException", f"the body is larger than {limit} bytes", 413
    )


def _error_type(response: AppResponse) -> str | None:
    try:
        value = json.loads(response.body)
    except ValueError:
        return None
    error_type = value.get("__type") if isinstance(value, dict) else None
    return error_type if isinstance(error_type, str) else None


async def _send_raw(stream: trio.SocketStream, response: AppResponse, *, linger: bool) -> None:
    """Answer without reading the request (the connection is refused outright)."""
    head = (
        f"HTTP/1.1 {response.status} Error\r\nContent-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        await stream.send_all(head + response.body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    if linger:
        await _drain_and_close(stream)
