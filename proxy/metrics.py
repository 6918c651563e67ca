"""The proxy's metrics, and the loopback-only port that serves them.

``ProxyMetrics`` holds what the proxy counts (tunnels, refusals, bytes, credentials,
name resolution, the enclaves' log lines) and the latest metrics snapshot each
connected enclave pushed over its log channel; ``render`` writes them all in the
Prometheus text format (``enclave_common.metrics``), the enclaves' families labelled
``enclave`` (``cid:16``; ``tcp:ADDRESS`` or ``uid:N`` for development peers).

``serve_metrics`` answers ``GET /metrics`` on the ``metrics_listen`` port, a TCP port
on the parent's loopback: never on the enclave-facing port, and never to an enclave.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Protocol

import trio

from enclave_common.http_server import Answer, HttpError, HttpServer, Limits, Report, Request
from enclave_common.logstream import STREAMS
from enclave_common.metrics import CONTENT_TYPE, Family, Registry, relabel, render

from .relay import RelayResult
from .upstream import Resolved, Resolver

# The label values a hostile or merely restarting enclave population can add: the
# first this many enclaves have their own series, later ones count as "other".
MAX_ENCLAVES = 256
ENCLAVE_LABEL = "enclave"
TUNNEL_OUTCOMES = ("closed", "idle_timeout", "reset", "cancelled")
REFUSALS = {
    400: "malformed",
    403: "not_allowed",
    405: "malformed",
    408: "slow_request",
    431: "malformed",
    502: "upstream_unreachable",
    503: "over_limit",
    504: "upstream_timeout",
}


class CredentialClocks(Protocol):
    """What the credentials gauges read (``credentials.CredentialSource``)."""

    def age(self) -> float | None: ...

    def expires_in(self) -> float | None: ...


class ProxyMetrics:
    def __init__(self, credentials: CredentialClocks | None = None) -> None:
        r = self.registry = Registry()
        self.tunnels_open = r.gauge("enclave_proxy_tunnels_open", "Tunnels open now.")
        self.tunnels = r.counter(
            "enclave_proxy_tunnels_total",
            "Tunnels ended, by how: closed, idle_timeout, reset, cancelled.",
            {"outcome": TUNNEL_OUTCOMES},
        )
        self.refused = r.counter(
            "enclave_proxy_tunnels_refused_total",
            "Requests and connections refused, by reason: malformed, not_allowed, "
            "slow_request, upstream_unreachable, over_limit, upstream_timeout.",
            {"reason": sorted(set(REFUSALS.values()))},
        )
        self.bytes = r.counter(
            "enclave_proxy_tunnel_bytes_total",
            "Bytes relayed through tunnels: up (enclave to upstream) and down.",
            {"direction": ("up", "down")},
        )
        r.gauge(
            "enclave_proxy_credentials_age_seconds",
            "Seconds since the access key handed out last was first handed out.",
            read=lambda: _present(credentials.age() if credentials else None),
        )
        r.gauge(
            "enclave_proxy_credentials_expiry_seconds",
            "Seconds until the credentials handed out last expire.",
            read=lambda: _present(credentials.expires_in() if credentials else None),
        )
        self.credential_failures = r.counter(
            "enclave_proxy_credentials_failures_total",
            "Credential requests answered 503 (no credentials to hand out).",
        )
        self.dns_failures = r.counter(
            "enclave_proxy_dns_failures_total",
            "Name resolutions of CONNECT targets that failed.",
        )
        self.log_lines = r.counter(
            "enclave_proxy_enclave_log_lines_total",
            "Log lines each enclave shipped, by stream.",
            {ENCLAVE_LABEL: MAX_ENCLAVES, "stream": STREAMS},
        )
        self.log_lines_dropped = r.counter(
            "enclave_proxy_enclave_log_lines_dropped_total",
            "Log lines lost: in the enclave (as it reported: its buffer was full) or "
            "refused here (malformed or too long).",
            {ENCLAVE_LABEL: MAX_ENCLAVES, "where": ("enclave", "proxy")},
        )
        self._snapshots: dict[str, list[Family]] = {}

    def snapshot(self, enclave: str, families: list[Family] | None) -> None:
        """The enclave's latest snapshot (None: it is gone, so is its snapshot)."""
        if families is None:
            self._snapshots.pop(enclave, None)
        else:
            self._snapshots[enclave] = families

    def request_ended(self, report: Report) -> None:
        """Count what a request's report says: a tunnel that ended (how, and its bytes),
        or a tunnel or connection refused (why)."""
        if report.outcome == "refused":  # over a connection limit: nothing was read
            self.refused.inc(reason="over_limit")
            return
        if report.request is None or report.request.method != "CONNECT":
            return
        relayed = report.note.get("relay")
        if isinstance(relayed, RelayResult):
            cancelled = report.outcome == "cancelled"
            self.tunnels.inc(outcome="cancelled" if cancelled else report.note.get("outcome", ""))
            self.bytes.inc(relayed.bytes_a_to_b, direction="up")
            self.bytes.inc(relayed.bytes_b_to_a, direction="down")
        elif report.outcome == "rejected" and report.status is not None:
            self.refused.inc(reason=REFUSALS.get(report.status, "malformed"))

    def render(self) -> str:
        families = self.registry.collect()
        for enclave, snapshot in self._snapshots.items():
            families += relabel(snapshot, {ENCLAVE_LABEL: enclave})
        return render(families)


def counting_failures(resolver: Resolver, metrics: ProxyMetrics) -> Resolver:
    """``resolver``, each failed lookup counted in ``enclave_proxy_dns_failures_total``."""

    async def resolve(host: str, port: int) -> list[Resolved]:
        try:
            return await resolver(host, port)
        except (OSError, UnicodeError):
            metrics.dns_failures.inc()
            raise

    return resolve


def _present(value: float | None) -> list[tuple[dict[str, str], float]]:
    """A label-less gauge's reading: no sample at all while there is no value."""
    return [] if value is None or not math.isfinite(value) else [({}, value)]


async def _metrics_route(metrics: ProxyMetrics, request: Request) -> Answer:
    if request.target.split("?", 1)[0] != "/metrics":
        raise HttpError(404, "no such path: the metrics are at /metrics")
    if request.method not in ("GET", "HEAD"):
        raise HttpError(405, "only GET", [("allow", "GET")])
    await request.body(limit=0)
    body = metrics.render().encode()
    return Answer(200, [("content-type", CONTENT_TYPE), ("cache-control", "no-store")], body)


def _error(status: int, reason: str) -> Answer:
    return Answer(status, [("content-type", "text/plain; charset=utf-8")], f"{reason}\n".encode())


async def serve_metrics(
    listener: trio.SocketListener,
    metrics: ProxyMetrics,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on ``listener`` (loopback: the caller checked) until cancelled."""
    http = HttpServer(Limits(max_body_bytes=0, header_timeout=10.0, idle_timeout=30.0), _error)
    handler = partial(_metrics_route, metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, lambda s: http.serve(s, handler), [listener])
        task_status.started()
