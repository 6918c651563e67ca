"""The stand-in's HTTPS edge: TLS, HTTP/1.1 (enclave_common.http_server), faults, logs.

Routes:
- ``POST /`` with ``X-Amz-Target: TrentService.<Op>``: a KMS call (service.LocalKms);
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
from typing import Any

import trio

from devtools.local_kms.credentials import CredentialStore
from devtools.local_kms.faults import (
    FaultError,
    FaultInjector,
    parse_document_age_rule,
    parse_plan,
)
from devtools.local_kms.service import (
    JSON_CONTENT_TYPE,
    LocalKms,
    Reply,
    error_reply,
    new_request_id,
)
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


def _json_reply(status: int, document: dict[str, Any]) -> Reply:
    return Reply(status, json.dumps(document).encode())


class KmsHttpServer:
    def __init__(self, kms: LocalKms, admin: Admin, ssl_context: ssl.SSLContext) -> None:
        self.kms = kms
        self.admin = admin
        self.ssl_context = ssl_context

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
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
        await trio.serve_listeners(functools.partial(self._connection, http), ssl_listeners)

    async def _connection(
        self, http: HttpServer, stream: trio.SSLStream[trio.SocketStream]
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
        await http.serve(stream, self._handle, report=functools.partial(_log, peer))

    async def _handle(self, http_request: http_server.Request) -> Answer:
        request = Request(
            method=http_request.method,
            target=http_request.target,
            headers=_headers(http_request.headers),
            body=await http_request.body(),
        )
        return _answer(await self._dispatch(request))

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
        if path == ADMIN_PREFIX + "document_age":
            try:
                rule = parse_document_age_rule(document)
            except FaultError as exc:
                return _json_reply(400, {"error": str(exc)})
            self.kms.document_age = rule
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
        ("Content-Type", JSON_CONTENT_TYPE),
        ("x-amzn-RequestId", new_request_id()),
        *reply.headers,
    ]
    note = {"operation": reply.operation, "error": reply.error_type}
    return Answer(reply.status, headers, reply.body, note=note)


def _bad_http(status: int, reason: str) -> Answer:
    # The reason may quote received bytes: it goes to the client, not to the log.
    body = json.dumps({"error": reason}).encode()
    return Answer(status, [("Content-Type", "application/json")], body)


def _log(peer: str, report: Report) -> None:
    """One event per request, with its outcome and never a body."""
    if report.outcome == "answered" and report.request is not None:
        log.info(
            "request",
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


def _operation_of(request: Request) -> str | None:
    target = request.headers.get("x-amz-target", "")
    return target.partition(".")[2] or None
