"""The proxy port's routes and policy, on the shared HTTP/1.1 driver (enclave_common.http_server).

``CONNECT host:port`` is checked against the allowlist and the upstream connected
(``upstream``); then the driver answers ``200`` and hands the stream over: the bytes
the client sent after its request head go upstream first, then ``relay`` moves raw
bytes. ``GET /v1/credentials`` and ``GET /healthz`` answer JSON and keep the
connection open for the next request. ``POST /v1/logs`` is an enclave's log stream
(``enclave_logs``). There is no ``/metrics`` here: the metrics are for the parent only
(``metrics_listen``). Every error is a JSON ``{"error": ...}`` answer
and a closed connection; nothing a client sends can take the process down.

Each request ends in exactly one ``request`` log event with its outcome. Payload bytes
are never looked at, and the credentials handed out are never logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from enclave_common.address import close_now
from enclave_common.http_server import Answer, HttpError, Limits, Report, Request, Switch
from enclave_common.logs import get_logger
from enclave_common.logstream import LOGS_PATH

from .admission import PeerKey
from .allowlist import Allowlist, AllowlistError, parse_target
from .answers import json_answer
from .config import ProxyConfig
from .credentials import CredentialSource, CredentialsUnavailable
from .enclave_logs import EnclaveLogs
from .relay import RelayResult, relay
from .upstream import Connector, Resolver, open_upstream

if TYPE_CHECKING:
    from enclave_common.metrics import Gauge

    from .metrics import ProxyMetrics

MAX_REQUEST_HEAD = 16 * 1024
# A GET or CONNECT has no business sending a body; a little is read and dropped.
_MAX_IGNORED_BODY = 64 * 1024

_LOGGED_TOKEN = 32
_LOGGED_TARGET = 300
# A kept-alive connection ending between requests is no event of its own.
_BETWEEN_REQUESTS = ("client_closed", "idle_closed", "closed_for_shutdown")

log = get_logger()


@dataclass
class ProxyContext:
    """What every request shares; ``allowlist`` is swapped on reload."""

    config: ProxyConfig
    allowlist: Allowlist
    region: str
    credentials: CredentialSource
    resolver: Resolver
    connector: Connector
    metrics: ProxyMetrics
    logs: EnclaveLogs


def limits(config: ProxyConfig) -> Limits:
    # One deadline for a request: its head and body within header_timeout, and as long
    # for a kept-alive connection's next request to begin.
    timeout = config.header_timeout
    return Limits(
        max_head_bytes=MAX_REQUEST_HEAD,
        max_body_bytes=_MAX_IGNORED_BODY,
        header_timeout=timeout,
        idle_timeout=timeout,
    )


async def handle(ctx: ProxyContext, peer: PeerKey, request: Request) -> Answer | Switch:
    """One request of the peer ``peer`` (its CID on vsock, ...)."""
    if request.method == "CONNECT":
        await _ignore_body(request)
        return await _tunnel(ctx, request.target)
    path = request.target.split("?", 1)[0]
    if request.method == "POST" and path == LOGS_PATH:
        return await ctx.logs.receive(peer, request)
    if request.method != "GET":
        raise HttpError(
            405,
            f"only CONNECT, GET and POST {LOGS_PATH} are served",
            [("allow", "CONNECT, GET, POST")],
        )
    await _ignore_body(request)
    if path == "/healthz":
        return json_answer(200, {"status": "ok"})
    if path == "/v1/credentials":
        try:
            credentials = await ctx.credentials.get()
        except CredentialsUnavailable as e:
            ctx.metrics.credential_failures.inc()
            raise HttpError(503, str(e)) from None
        return json_answer(200, credentials.to_json(ctx.region))
    raise HttpError(404, "no such path")


async def _ignore_body(request: Request) -> None:
    try:
        await request.body()
    except HttpError as e:
        if e.status != 413:
            raise
        raise HttpError(400, "request body not expected") from None


async def _tunnel(ctx: ProxyContext, raw_target: str) -> Switch:
    try:
        target = parse_target(raw_target)
    except AllowlistError as e:
        raise HttpError(400, f"bad CONNECT target: {e}") from None
    # The allowlist is read once, here: a reload changes new requests, never this one.
    allowlist = ctx.allowlist
    if not allowlist.permits_target(target):
        raise HttpError(403, "target is not on the allowlist")
    # Its UpstreamError (403, 502, 504) is answered as it is.
    upstream, used = await open_upstream(
        target,
        allowlist,
        resolver=ctx.resolver,
        connector=ctx.connector,
        connect_timeout=ctx.config.connect_timeout,
    )
    tunnel = _Tunnel(upstream, ctx.config.idle_timeout, str(target), used, ctx.metrics.tunnels_open)
    answer = Answer(200, reason="Connection established", note=tunnel.note)
    return Switch(answer, tunnel.run, tunnel.close)


class _Tunnel:
    """What an accepted CONNECT hands the driver: one object, no closures, as an idle
    tunnel holds it for its whole life."""

    __slots__ = ("idle_timeout", "note", "open", "result", "upstream")

    def __init__(
        self,
        upstream: trio.SocketStream,
        idle_timeout: float,
        target: str,
        used: str,
        open_now: Gauge,
    ) -> None:
        self.upstream = upstream
        self.open = open_now  # the tunnels-open gauge
        self.idle_timeout = idle_timeout
        self.result = RelayResult()
        self.note: dict[str, Any] = {"target": target, "upstream": used, "relay": self.result}

    async def run(self, stream: trio.abc.Stream, early: bytes) -> None:
        result = self.result
        self.open.inc()
        try:
            if early:
                await self.upstream.send_all(early)
                result.bytes_a_to_b += len(early)
            await relay(stream, self.upstream, idle_timeout=self.idle_timeout, result=result)
            self.note["outcome"] = result.outcome
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.note["outcome"] = "reset"
        finally:
            self.open.dec()

    async def close(self) -> None:
        await close_now(self.upstream)


def log_request(peer: str, report: Report) -> None:
    """The one ``request`` event of a request (a refused connection has its
    ``connection_refused`` already)."""
    if report.outcome == "refused":
        return
    if report.request is None and report.number > 0 and report.outcome in _BETWEEN_REQUESTS:
        return
    note, request = report.note, report.request
    outcome: str = report.outcome
    if outcome == "answered":
        outcome = "ok"
    elif outcome == "rejected":
        outcome = "refused" if (report.status or 0) < 500 else "failed"
    elif outcome == "switched":
        outcome = note.get("outcome", outcome)
    target = note.get("target") or (request.target if request else None)
    # Method, target and reason are client-chosen (a reason may quote a bad CONNECT
    # target): capped, so one request cannot bloat the log.
    fields: dict[str, Any] = {
        "peer": peer,
        "method": request.method[:_LOGGED_TOKEN] if request else None,
        "target": target[:_LOGGED_TARGET] if target else None,
        "status": report.status,
        "outcome": outcome,
        "duration_s": round(trio.current_time() - report.started, 6),
    }
    if report.reason is not None:
        fields["reason"] = report.reason[:_LOGGED_TARGET]
    if "upstream" in note:
        fields["upstream"] = note["upstream"]
    if "relay" in note and report.outcome in ("switched", "cancelled"):
        relayed: RelayResult = note["relay"]
        fields.update(
            bytes_up=relayed.bytes_a_to_b, bytes_down=relayed.bytes_b_to_a, spliced=relayed.spliced
        )
    (log.error if report.outcome == "failed" else log.info)("request", **fields)
