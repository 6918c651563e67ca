"""The app-facing server: routing and policy on the shared HTTP/1.1 driver.

Theory of operation: ``AppServer.serve`` accepts on a listener (the Unix socket,
and optionally a loopback TCP port) and runs every connection in its own task, so
a slow KMS call for one app never holds up another; nothing here takes a lock
around KMS calls (the gateway bounds its own pool). The driver
(enclave_common.http_server) reads requests and writes answers, with the limits of
the config: a request must arrive whole within ``header_timeout``, a kept-alive
connection may idle at most ``idle_timeout``, an answer must be taken within
``idle_timeout``, and a body above ``max_body_bytes`` gets 413 before it is read.
A failure in one connection ends that connection only.

On every connection, before any of its bytes are read or a connection slot is
taken, the kernel names the caller (``callers``: SO_PEERCRED on the Unix socket,
inet_diag on the loopback TCP listener, which exists for SDK apps that can only
speak TCP) and the ``[access]`` rules decide; a refused caller gets KMS's
``AccessDeniedException`` at once and a ``caller_refused`` log event. Each caller
(a uid) gets its own share of connections and of KMS calls in flight
(``admission``), so one caller at its cap never stops another.

Logs: one ``request`` event per request (method, path, operation, status, error
type, caller, duration; no status and ``outcome: client_gone`` for a long-poll whose
app left), or ``request_rejected`` for one that was not read whole;
bodies, plaintexts and secret values never reach a log.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Protocol

import trio

from enclave_agent.runtime import app_protocol
from enclave_agent.runtime.admission import Admission, Caller
from enclave_agent.runtime.app_protocol import (
    AppProtocolError,
    AppResponse,
    AttestationCall,
    HealthCall,
    KmsCall,
    MetricsCall,
    Route,
    SecretCall,
)
from enclave_agent.runtime.callers import Callers, identify
from enclave_agent.runtime.config import AccessConfig, Limits
from enclave_agent.runtime.metrics import AgentMetrics
from enclave_agent.runtime.nsm import NsmError
from enclave_agent.runtime.secrets import Served
from enclave_common import http_server
from enclave_common.errors import ShownError
from enclave_common.http_server import Answer, ClientGone, HttpServer, Report, Request
from enclave_common.logs import get_logger
from enclave_common.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from enclave_common.metrics import render
from enclave_common.tcp_peercred import Query, ask_kernel

MAX_HEADER_BYTES = 16 * 1024
_LOGGED_PATH = 200
# The driver's own errors, in KMS's vocabulary.
_HTTP_ERROR_TYPES = {
    400: "BadRequestException",
    408: "RequestTimeoutException",
    413: "RequestEntityTooLargeException",
    431: "RequestHeaderFieldsTooLarge",
}
_DENIED = AppProtocolError(
    "AccessDeniedException", "this process is not allowed to use the enclave agent", 403
)

log = get_logger()


class Gateway(Protocol):
    """What the server needs from ``kms.KmsGateway``."""

    async def call(self, operation: str, request: Mapping[str, Any]) -> dict[str, Any]: ...


class SecretLookup(Protocol):
    """What the server needs of ``secrets.SecretStore``."""

    async def wait_for(self, name: str, after: str | None, wait: float) -> Served | None: ...

    def health(self) -> dict[str, Any]: ...


# (nonce, user_data, public_key) -> the document; nsm.request_attestation in production.
Attester = Callable[[bytes | None, bytes | None, bytes | None], Awaitable[bytes]]


class AppServer:
    def __init__(
        self,
        *,
        gateway: Gateway,
        attest: Attester,
        secrets: SecretLookup,
        access: AccessConfig,
        limits: Limits,
        metrics: AgentMetrics | None = None,
        query: Query = ask_kernel,
    ) -> None:
        self._gateway = gateway
        self._metrics = metrics or AgentMetrics()
        self._query = query
        self._attest = attest
        self._secrets = secrets
        self._access = access
        self._limits = limits
        self._admission = Admission(limits, error_answer)
        self._http = HttpServer(
            http_server.Limits(
                max_head_bytes=MAX_HEADER_BYTES,
                max_body_bytes=limits.max_body_bytes,
                header_timeout=limits.header_timeout,
                idle_timeout=limits.idle_timeout,
            ),
            errors=_http_error,
        )

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
        """Serve one connection to its end; never raises for the client's doing (an
        exception would end trio.serve_listeners, so the server, for every app)."""
        # Who is calling is decided before a byte of the request is read or a
        # connection slot is taken: a refused caller's request is never parsed and
        # cannot hold slots that allowed apps need.
        try:
            who = await identify(stream, callers, self._access, self._query)
        except BaseException:  # cancelled (shutting down): the driver never got the stream
            await trio.aclose_forcefully(stream)
            raise
        denied = None if who.allowed else error_answer(_DENIED)
        kind = "unix" if callers is Callers.UNIX else "tcp"

        def report(ended: Report) -> None:
            _log(who.peer, ended)
            if ended.outcome == "refused" or ended.number == 0:  # once per connection
                self._metrics.connection(kind, accepted=ended.outcome != "refused")

        self._metrics.connections_open.inc(caller=kind)
        try:
            await self._http.serve(
                stream,
                partial(self._handle, who.peer, who.caller),
                admit=self._admission.admit(
                    who.caller, tcp=callers is not Callers.UNIX, denied=denied
                ),
                report=report,
            )
        finally:
            self._metrics.connections_open.dec(caller=kind)

    async def _handle(self, peer: str, caller: Caller, request: Request) -> Answer:
        body = await request.body()
        started = trio.current_time()
        # Logged: the path only (no query), cut short so a huge target cannot flood logs.
        path = request.target.split("?", 1)[0][:_LOGGED_PATH]
        operation: str | None = None
        route: Route | None = None
        error: ShownError | None = None
        try:
            route = app_protocol.route_request(
                request.method, request.target, dict(request.headers), body
            )
            operation = route.operation if isinstance(route, KmsCall) else None
            response = await self._respond(caller, route, request)
        except ClientGone:
            # The app left its long-poll: nothing is answered, the driver ends the
            # connection (its share is free again) and reports it as client_gone.
            self._finished(peer, request, path, route, operation, started, None)
            raise
        except Exception as exc:  # noqa: BLE001 - one failed request must not end the connection
            error = _shown(exc, path, operation)
            response = _error_response(error)
        # Logged before the answer goes out: a client that has its answer finds the event.
        self._finished(peer, request, path, route, operation, started, response.status, error)
        return _answer(response)

    def _finished(
        self,
        peer: str,
        request: Request,
        path: str,
        route: Route | None,
        operation: str | None,
        started: float,
        status: int | None,
        error: ShownError | None = None,
    ) -> None:
        """The request's ``request`` event and metrics. ``status`` None: not answered,
        its app left (a long-poll): ``outcome: client_gone`` instead of a status."""
        seconds = trio.current_time() - started
        error_type = error.error_type if error else None
        gone = status is None
        log.info(
            "request",
            caller=peer,
            method=request.method,
            path=path,
            operation=operation,
            status=status,
            error_type=error_type,
            **({"outcome": "client_gone"} if gone else {}),
            duration_ms=round(seconds * 1000, 2),
        )
        outcome = "client_gone" if gone else error_type or "ok"
        self._metrics.request(_route_name(route), outcome, seconds)

    async def _respond(self, caller: Caller, route: Route, request: Request) -> AppResponse:
        if isinstance(route, KmsCall):
            async with self._admission.kms_call(caller, route.operation):
                answer = await self._gateway.call(route.operation, route.request)
            return app_protocol.kms_response(answer)
        if isinstance(route, SecretCall):
            # A long-poll (after=, wait=) holds this connection, which counts against the
            # caller's connection share all along; the driver runs no deadline meanwhile,
            # but gives the wait up as soon as the app closes its end (ClientGone).
            watch = route.wait > 0
            async with request.cancelled_if_client_leaves() if watch else contextlib.nullcontext():
                served = await self._secrets.wait_for(route.name, route.after, route.wait)
            if served is None:
                raise AppProtocolError(
                    "NotFoundException", f"no secret named {route.name!r} is configured", 404
                )
            return app_protocol.secret_response(served.value, served.version)
        if isinstance(route, AttestationCall):
            # The NSM gets the deadline a KMS call's attestation has (within the call's).
            patience = self._limits.kms_call_timeout
            with trio.move_on_after(patience):
                document = await self._attest(route.nonce, route.user_data, route.public_key)
                return app_protocol.bytes_response(document)
            raise AppProtocolError(
                "DependencyTimeoutException", f"the NSM did not answer within {patience:g} s", 503
            )
        if isinstance(route, MetricsCall):
            text = render(self._metrics.collect())
            return AppResponse(200, METRICS_CONTENT_TYPE, text.encode())
        return app_protocol.json_response(self._secrets.health())


_ROUTE_NAMES: dict[type, str] = {
    SecretCall: "secret",
    AttestationCall: "attestation",
    HealthCall: "health",
    MetricsCall: "metrics",
}


def _route_name(route: Route | None) -> str | None:
    """A request's ``operation`` label: the KMS operation, or the route's name."""
    if isinstance(route, KmsCall):
        return route.operation
    return _ROUTE_NAMES.get(type(route))


def _shown(exc: Exception, path: str, operation: str | None) -> ShownError:
    """What the app is told of a failure."""
    if isinstance(exc, ShownError):
        return exc
    if isinstance(exc, NsmError):
        # The attestation route: name the NSM's error, as the KMS path does.
        log.warning("nsm_failed", path=path, error_name=exc.error_name)
        return ShownError("KMSInternalException", f"NSM error: {exc.error_name}", 500)
    # An agent bug: the log gets the type only, never the details, which could quote
    # request data; the app gets neither (no internals reach a client).
    log.error("request_failed", path=path, operation=operation, error=type(exc).__name__)
    return ShownError("KMSInternalException", "internal error in the agent (its log names it)", 500)


def error_answer(error: ShownError) -> Answer:
    """An error as the apps' SDKs read it (a raw refusal's too)."""
    return _answer(_error_response(error))


def _error_response(error: ShownError) -> AppResponse:
    return app_protocol.error_response(error.error_type, error.message, error.status)


def _http_error(status: int, message: str) -> Answer:
    error_type = _HTTP_ERROR_TYPES.get(status, "KMSInternalException")
    return error_answer(ShownError(error_type, message, status))


def _answer(response: AppResponse) -> Answer:
    headers = [("Content-Type", response.content_type), ("x-amzn-RequestId", str(uuid.uuid4()))]
    return Answer(response.status, [*headers, *response.headers], response.body)


def _log(peer: str, report: Report) -> None:
    """What the driver saw of a request not answered by ``_handle`` (which logs its
    own); a refused connection has its caller_refused or connection_refused already."""
    if report.outcome in ("rejected", "idle_closed"):
        reason = report.reason if report.outcome == "rejected" else "idle timeout"
        log.info("request_rejected", caller=peer, reason=reason)
    elif report.outcome == "failed":
        log.error("connection_failed", error=report.reason)
