"""HTTPS to AWS through the parent's proxy: CONNECT, TLS inside the tunnel, a pool.

Why TLS starts here and not at the proxy: the parent instance is untrusted, and
``CiphertextForRecipient`` has no authenticity of its own, so the agent must verify
KMS's certificate chain and host name itself (docs/architecture.md, "The trust
boundary"); the same holds for the secret stores, whose answers name the resource
the agent checks. The proxy only ever sees the CONNECT line and TLS records.

Theory of operation: a connection is proxy stream → ``CONNECT host:port`` answered
200 → ``trio.SSLStream`` (CA bundle, host name checked) → an HTTP/1.1 client
connection (``enclave_common.http1``), one request at a time. A ``ConnectionPool``
serves one endpoint (KMS, or one secret store: each has its own, so a slow store never
holds a KMS call back) and keeps at most ``pool_size`` such connections (busy plus
idle); idle ones are reused last-in first-out so the warm ones stay warm, and a
connection is dropped on any error, when the server closes or asks to close, or after
``idle_timeout``. Every
failure is a ``TransportError`` saying what broke and whether trying again may help.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import urlsplit

import certifi
import trio

from enclave_agent.runtime import sigv4
from enclave_common.address import Address, open_stream
from enclave_common.http1 import ClientConnection, ExchangeError, Response

_MAX_HEADER_BYTES = 16384
_MAX_ERROR_BODY = 4096


class TransportError(Exception):
    """The request did not get an HTTP answer. ``retryable``: a new connection may help."""

    def __init__(self, message: str, *, retryable: bool, stale: bool = False):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        # A reused connection broke before any byte of an answer came back: the
        # server most likely closed it while idle, so a fresh one is tried at once.
        self.stale = stale


def make_ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Verify KMS (and the stores) against ``ca_bundle`` (a PEM file) or certifi's bundle."""
    path = ca_bundle or certifi.where()
    try:
        context = ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        # a configuration mistake, reported at start-up rather than on the first call
        raise ValueError(f"cannot load the CA bundle {path}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # create_default_context already sets these; stated because they are the point.
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def https_host_port(endpoint: str, service: str) -> tuple[str, int]:
    """(host, port) of ``endpoint``, ``https://HOST[:PORT]``; ValueError naming
    ``service``'s endpoint otherwise."""
    parts = urlsplit(endpoint)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"{service} endpoint must be https://HOST[:PORT], got {endpoint!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{service} endpoint must be https://HOST[:PORT] only, got {endpoint!r}")
    try:
        port = parts.port or 443
    except ValueError:
        raise ValueError(f"{service} endpoint has a bad port: {endpoint!r}") from None
    return parts.hostname, port


def authority(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}"


def proxy_error_reason(body: bytes, fallback: str) -> str:
    """The proxy's `{"error": ...}` text, else ``fallback``; printable and cut short,
    as the proxy is not trusted to write our messages."""
    text = fallback
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        text = document["error"]
    return "".join(c for c in text if c.isprintable())[:200]


async def open_tunnel(proxy: Address, host: str, port: int) -> trio.abc.Stream:
    """A raw byte stream to ``host:port`` through the proxy's CONNECT."""
    return await establish_tunnel(await _open_proxy(proxy), str(proxy), host, port)


async def _open_proxy(proxy: Address) -> trio.abc.Stream:
    try:
        return await open_stream(proxy)
    except OSError as exc:
        raise TransportError(
            f"cannot reach the proxy at {proxy}: {exc.strerror or exc}", retryable=True
        ) from None


async def establish_tunnel(
    raw: trio.abc.Stream, proxy: str, host: str, port: int
) -> trio.abc.Stream:
    """Send CONNECT on ``raw`` (a stream to the proxy) and read the answer.

    On failure ``raw`` is closed and a ``TransportError`` names the proxy's answer.
    """
    target = authority(host, port)
    conn = ClientConnection(raw, max_head_bytes=_MAX_HEADER_BYTES)
    try:
        try:
            response = await conn.exchange(
                "CONNECT", target, [("Host", target)], max_body=_MAX_ERROR_BODY
            )
        except ExchangeError as exc:
            raise _failure(exc, f"proxy at {proxy}", f"CONNECT {target}") from None
        if not 200 <= response.status < 300:  # any 2xx opens the tunnel (RFC 9110)
            reason = proxy_error_reason(response.body, response.reason)
            raise TransportError(
                f"proxy refused CONNECT {target}: {response.status} {reason}",
                # 502/503/504 are the proxy's transient answers (upstream down, over
                # its connection limit, upstream timeout); 4xx will not change.
                retryable=response.status in (502, 503, 504),
            )
    except BaseException:
        await trio.aclose_forcefully(raw)
        raise
    return conn.detach()


def _failure(
    exc: ExchangeError, peer: str, request: str, *, reused: bool = False
) -> TransportError:
    """What a failed exchange of ``request`` with ``peer`` means for the caller."""
    if exc.kind == "unsent":
        # Never the value h11 refused: it may be a credential.
        return TransportError(
            f"the {request} to {peer} is not valid HTTP (a header value h11 refuses); "
            "nothing was sent",
            retryable=False,
        )
    if exc.kind == "no_answer":
        return TransportError(
            f"{peer} closed the connection before answering {request}",
            retryable=True,
            stale=reused,
        )
    if exc.kind == "truncated":
        return TransportError(
            f"{peer} closed the connection mid-answer to {request}", retryable=True
        )
    method = request.partition(" ")[0]
    return TransportError(
        f"{peer} broke the {method} exchange: {exc.detail}",
        retryable=True,
        stale=reused and exc.kind == "broken" and not exc.answered,
    )


def _describe_tls_failure(exc: BaseException, host: str) -> TransportError:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = cause.verify_message or str(cause)
        # A certificate that does not verify will not verify on the next try either:
        # it is a man in the middle or a wrong CA bundle, never a transient fault.
        return TransportError(
            f"TLS certificate verification failed for {host}: {detail}", retryable=False
        )
    if isinstance(cause, ssl.CertificateError):
        return TransportError(
            f"TLS certificate verification failed for {host}: {cause}", retryable=False
        )
    if isinstance(cause, ssl.SSLError):
        detail = cause.reason or str(cause)
        return TransportError(f"TLS handshake with {host} failed: {detail}", retryable=True)
    return TransportError(f"connection closed during the TLS handshake with {host}", retryable=True)


class _Connection:
    """One TLS connection to the endpoint carrying one request at a time."""

    def __init__(self, stream: trio.SSLStream[trio.abc.Stream], authority: str, label: str) -> None:
        self.stream = stream
        self.authority = authority
        self.label = label
        self.http = ClientConnection(stream, max_head_bytes=_MAX_HEADER_BYTES)
        self.last_used = trio.current_time()

    async def roundtrip(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes, limit: int
    ) -> tuple[Response, bool]:
        """The answer, and whether the connection may carry another request."""
        reused = self.http.requests > 0
        all_headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        if not any(k.lower() == "host" for k, _ in all_headers):
            all_headers.insert(0, ("Host", self.authority))
        all_headers.append(("Content-Length", str(len(body))))
        try:
            response = await self.http.exchange(method, target, all_headers, body, max_body=limit)
        except ExchangeError as exc:
            what = f"{method} {target}"
            peer = f"{self.label} at {self.authority}"
            raise _failure(exc, peer, what, reused=reused) from None
        self.last_used = trio.current_time()
        return response, self.http.reusable


class ConnectionPool:
    """At most ``pool_size`` kept-alive TLS connections to one endpoint via the proxy.
    ``label`` names the endpoint's service in errors ("KMS", "Secrets Manager", ...)."""

    def __init__(
        self,
        proxy: Address,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        label: str,
        pool_size: int = 16,
        idle_timeout: float = 30.0,
        max_response_bytes: int = 1 << 20,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.label = label
        self.proxy = proxy
        self.host = host
        self.port = port
        # the Host header (and SigV4's host): the port only when it is not HTTPS's
        self.authority = authority(host, port).removesuffix(":443")
        self._ssl_context = ssl_context
        self._idle_timeout = idle_timeout
        self._max_response_bytes = max_response_bytes
        self._slots = trio.Semaphore(pool_size)
        self._idle: list[_Connection] = []
        self._expired: list[_Connection] = []
        self._closed = False
        self.pool_size = pool_size
        self.connections_opened = 0  # for tests and benchmarks: how often we paid a handshake

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def signed_headers(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        payload: bytes | str,
        *,
        service: str,
        region: str,
        credentials: sigv4.SigningCredentials,
        keys: sigv4.SigningKeyCache,
    ) -> list[tuple[str, str]]:
        """A request's headers for this endpoint, signed now with SigV4: Host, ``headers``,
        then the signer's own (``payload``: the body, or its SHA-256 in hex). Only what the
        proxy sent can be unsignable (an access key id with "/" or ","):
        ``sigv4.SigningError`` then says so, naming the service."""
        try:
            added = sigv4.sign(
                method=method,
                host=self.authority,
                path=path,
                headers=headers,
                payload=payload,
                service=service,
                region=region,
                credentials=credentials,
                instant=datetime.now(UTC),
                keys=keys,
            )
        except sigv4.SigningError as exc:
            raise sigv4.SigningError(
                f"cannot sign the {self.label} request with the proxy's credentials: {exc}"
            ) from None
        return [("Host", self.authority), *headers, *added]

    async def _open(self) -> _Connection:
        tunnel = await open_tunnel(self.proxy, self.host, self.port)
        stream = trio.SSLStream(
            tunnel, self._ssl_context, server_hostname=self.host, https_compatible=True
        )
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError, ssl.CertificateError) as exc:
            await trio.aclose_forcefully(stream)
            raise _describe_tls_failure(exc, self.host) from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        self.connections_opened += 1
        return _Connection(stream, self.authority, self.label)

    def _take_idle(self) -> _Connection | None:
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()  # LIFO: the most recently used is the most likely alive
            if now - conn.last_used < self._idle_timeout:
                return conn
            self._expired.append(conn)
        return None

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> Response:
        if self._closed:
            raise TransportError(f"the {self.label} connection pool is closed", retryable=False)
        try:
            self._slots.acquire_nowait()  # usually free: no trip through the scheduler
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            conn = self._take_idle()
            while self._expired:
                await _drop(self._expired.pop())
            fresh = conn is None
            if conn is None:
                conn = await self._open()
            while True:
                try:
                    response, reusable = await conn.roundtrip(
                        method, target, headers, body, self._max_response_bytes
                    )
                except TransportError as exc:
                    await _drop(conn)
                    if exc.stale and not fresh:
                        conn, fresh = await self._open(), True
                        continue
                    raise
                except BaseException:
                    await _drop(conn)  # cancelled mid-request: its state is unknown
                    raise
                break
            if reusable and not self._closed:
                self._idle.append(conn)
            else:
                await _drop(conn)
            return response
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        self._closed = True
        while self._idle or self._expired:
            await _drop((self._idle or self._expired).pop())


async def _drop(conn: _Connection) -> None:
    """Close at once, without a TLS close_notify exchange: we are abandoning it."""
    await trio.aclose_forcefully(conn.stream)


async def http_get(address: Address, target: str, *, max_body: int = 65536) -> Response:
    """One plain-HTTP GET on a fresh connection (the proxy's /v1/credentials)."""
    stream = await _open_proxy(address)
    headers = [("Host", "enclave-proxy"), ("Connection", "close"), ("Accept", "application/json")]
    try:
        return await ClientConnection(stream, max_head_bytes=_MAX_HEADER_BYTES).exchange(
            "GET", target, headers, max_body=max_body
        )
    except ExchangeError as exc:
        raise _failure(exc, f"proxy at {address}", f"GET {target}") from None
    finally:
        await trio.aclose_forcefully(stream)
