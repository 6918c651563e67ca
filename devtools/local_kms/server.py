"""The stand-in's HTTPS edge: TLS, HTTP/1.1 (enclave_common.http_server), faults, logs.

Each service has its own endpoint (listeners), as each AWS service has its own host:
KMS (service.LocalKms) and, with ``--stores``, Secrets Manager, SSM and S3
(stores.py). A request is the service's whose endpoint it reached; the service checks
that its signature was made for it. On the KMS endpoint, routes:
- ``POST /`` with ``X-Amz-Target: TrentService.<Op>``: a KMS call;
- ``POST /_local_kms/faults``: set a fault plan (faults.parse_plan);
- ``POST /_local_kms/document_age``: refuse attestation documents older than
  ``{"max_age": seconds, "answer": ...}`` from now on (faults.parse_document_age_rule);
- ``POST /_local_kms/credentials``: mint short-lived credentials
  ``{"ttl": seconds, "account": id, "principal": arn}`` (credentials.mint_requested);
- ``GET /_local_kms/healthz``.
The two admin routes need ``X-Local-Kms-Admin-Token`` equal to the state file's
``admin_token``. One log event per request, with its outcome and never a body.
"""

from __future__ import annotations

import functools
import hmac
import json
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import trio

from devtools.local_kms.credentials import CredentialStore
from devtools.local_kms.faults import (
    ERRORS,
    FaultError,
    FaultInjector,
    parse_document_age_rule,
    parse_plan,
)
from devtools.local_kms.service import LocalKms, Reply, new_request_id
from devtools.local_kms.sigv4 import Request
from enclave_common import http_server
from enclave_common.http_server import Answer, HttpServer, Limits, Report
from enclave_common.logs import get_logger

MAX_BODY = 1 << 20
MAX_HEADERS = 64 * 1024
IDLE_TIMEOUT = 120.0
HANDSHAKE_TIMEOUT = 10.0
ADMIN_TOKEN_HEADER = "x-local-kms-admin-token"
ADMIN_PREFIX = "/_local_kms/"

log = get_logger()


@dataclass
class Admin:
    token: str
    faults: FaultInjector
    credentials: CredentialStore


class Service(Protocol):
    """One AWS service of the stand-in (service.LocalKms, stores.JsonStore, stores.S3Store)."""

    name: str

    def handle(self, request: Request, now: datetime) -> Reply:
        """The answer to a request that reached this service's endpoint."""

    def error(self, status: int, error_type: str, message: str, request: Request) -> Reply:
        """An error answer in this service's shape."""


def _json_reply(status: int, document: dict[str, Any]) -> Reply:
    return Reply(status, json.dumps(document).encode())


class StandInServer:
    def __init__(self, admin: Admin, ssl_context: ssl.SSLContext) -> None:
        self.admin = admin
        self.ssl_context = ssl_context

    async def serve(self, service: Service, listeners: list[trio.SocketListener]) -> None:
        """Serve ``service`` on ``listeners`` (the admin routes with KMS)."""
        limits = Limits(
            max_head_bytes=MAX_HEADERS,
            max_body_bytes=MAX_BODY,
            header_timeout=IDLE_TIMEOUT,
            idle_timeout=IDLE_TIMEOUT,
        )
        http = HttpServer(limits, errors=_bad_http)
        ssl_listeners = [
            trio.SSLListener(listener, self.ssl_context, https_compatible=True)
            for listener in listeners
        ]
        await trio.serve_listeners(
            functools.partial(self._connection, http, service), ssl_listeners
        )

    async def _connection(
        self, http: HttpServer, service: Service, stream: trio.SSLStream[trio.SocketStream]
    ) -> None:
        peer = "?"
        try:
            address = stream.transport_stream.socket.getpeername()
            peer = f"{address[0]}:{address[1]}"
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
            log.debug("connection_closed", peer=peer, reason=type(exc).__name__)
            await trio.aclose_forcefully(stream)
            return
        handler = functools.partial(self._handle, service)
        await http.serve(stream, handler, report=functools.partial(_log, service.name, peer))

    async def _handle(self, service: Service, http_request: http_server.Request) -> Answer:
        request = Request(
            method=http_request.method,
            target=http_request.target,
            headers=_headers(http_request.headers),
            body=await http_request.body(),
        )
        return _answer(await self._dispatch(service, request))

    async def _dispatch(self, service: Service, request: Request) -> Reply:
        if service.name == "kms" and request.target.startswith(ADMIN_PREFIX):
            assert isinstance(service, LocalKms)
            return self._admin(request, service)
        fault = self.admin.faults.next_call(service.name)
        if fault is not None:
            if fault.delay:
                await trio.sleep(fault.delay)
            error = fault.error()
            if error is not None:
                return service.error(*error, request)
        try:
            return service.handle(request, datetime.now(UTC))
        except Exception as exc:  # noqa: BLE001 - a bug here answers 500, as AWS would
            log.error("internal_error", service=service.name, error=type(exc).__name__)
            status, error_type = ERRORS[service.name]["internal"]
            return service.error(status, error_type, "local stand-in internal error", request)

    def _admin(self, request: Request, kms: LocalKms) -> Reply:
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
            log.info(
                "faults_set",
                service=plan.service,
                kind=plan.kind,
                count=plan.count,
                delay=plan.delay,
            )
            return _json_reply(200, {"pending": self.admin.faults.pending})
        if path == ADMIN_PREFIX + "document_age":
            try:
                rule = parse_document_age_rule(document)
            except FaultError as exc:
                return _json_reply(400, {"error": str(exc)})
            kms.document_age = rule
            log.info(
                "document_age_set",
                max_age=rule.max_age if rule else None,
                answer=rule.answer if rule else None,
            )
            return _json_reply(200, {"max_age": rule.max_age if rule else None})
        if path == ADMIN_PREFIX + "credentials":
            try:
                credential = self.admin.credentials.mint_requested(document, datetime.now(UTC))
            except ValueError as exc:
                return _json_reply(400, {"error": str(exc)})
            log.info("credentials_minted", account=credential.caller.account)
            return _json_reply(200, credential.process_document())
        return _json_reply(404, {"error": "no such admin route"})


def _answer(reply: Reply) -> Answer:
    headers = [
        ("Content-Type", reply.content_type),
        ("x-amzn-RequestId", new_request_id()),
        *reply.headers,
    ]
    note = {"operation": reply.operation, "error": reply.error_type}
    return Answer(reply.status, headers, reply.body, note=note)


def _bad_http(status: int, reason: str) -> Answer:
    # The reason may quote received bytes: it goes to the client, not to the log.
    body = json.dumps({"error": reason}).encode()
    return Answer(status, [("Content-Type", "application/json")], body)


def _log(service: str, peer: str, report: Report) -> None:
    """One event per request, with its outcome and never a body."""
    if report.outcome == "answered" and report.request is not None:
        log.info(
            "request",
            service=service,
            peer=peer,
            method=report.request.method,
            path=report.request.target.partition("?")[0],
            operation=report.note.get("operation"),
            status=report.status,
            error=report.note.get("error"),
            ms=round((trio.current_time() - report.started) * 1000, 1),
        )
    elif report.outcome == "rejected":
        log.info("bad_http", peer=peer, status=report.status)
    elif report.outcome == "failed":
        log.error("connection_failed", peer=peer, error=report.reason)
    else:
        log.debug("connection_closed", peer=peer, reason=report.outcome)


def _headers(raw: Iterable[tuple[str, str]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for key, text in raw:
        headers[key] = f"{headers[key]},{text}" if key in headers else text
    return headers
