"""HTTPS to KMS through the parent's proxy: CONNECT, TLS inside the tunnel, h11, a pool.

Why TLS starts here and not at the proxy: the parent instance is untrusted, and
``CiphertextForRecipient`` has no authenticity of its own, so the agent must verify
KMS's certificate chain and host name itself (DESIGN.md §2). The proxy only ever
sees the CONNECT line and TLS records.

Theory of operation: a connection is proxy stream → ``CONNECT host:port`` answered
200 → ``trio.SSLStream`` (CA bundle, host name checked) → an h11 client connection,
one request at a time. ``KmsConnectionPool`` keeps at most ``pool_size`` such
connections (busy plus idle); idle ones are reused last-in first-out so the warm ones
stay warm, and a connection is dropped on any error, when the server closes or asks
to close, or after ``idle_timeout``. Every failure is a ``TransportError`` saying
what broke and whether trying again may help.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass

import certifi
import h11
import trio

from enclave_common.address import Address, open_stream

_READ_CHUNK = 65536
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


@dataclass(frozen=True, repr=False)
class HttpResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def __repr__(self) -> str:  # never the body: it may be a secret's envelope
        return f"HttpResponse(status={self.status}, reason={self.reason!r})"


def make_ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Verify KMS against ``ca_bundle`` (a PEM file) or certifi's bundle."""
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


def authority(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}"


class _PrefixedStream(trio.abc.Stream):
    """A stream that first returns bytes already read past the CONNECT answer."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            chunk, self._prefix = self._prefix[:size], self._prefix[size:]
            return chunk
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _receive_event(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Event | type:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(_READ_CHUNK)
        if not data and conn.their_state is h11.SEND_RESPONSE:
            # closed before the status line: h11 would call it a protocol error,
            # but for a kept-alive connection it is the ordinary idle close
            return h11.ConnectionClosed()
        conn.receive_data(bytes(data))


async def _read_body(
    conn: h11.Connection, stream: trio.abc.Stream, limit: int, what: str
) -> tuple[bytes, bool]:
    """Body up to ``limit`` bytes; (body, complete)."""
    body = bytearray()
    while True:
        event = await _receive_event(conn, stream)
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:
                raise h11.RemoteProtocolError(f"{what} answer body exceeds {limit} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body), True
        elif isinstance(event, h11.ConnectionClosed):
            return bytes(body), False
        else:
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in {what} answer")


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
    try:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEADER_BYTES)
        request = h11.Request(method="CONNECT", target=target, headers=[("Host", target)])
        await raw.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
        event = await _receive_event(conn, raw)
        while isinstance(event, h11.InformationalResponse):
            event = await _receive_event(conn, raw)
        if isinstance(event, h11.ConnectionClosed):
            raise TransportError(
                f"proxy at {proxy} closed the connection before answering CONNECT {target}",
                retryable=True,
            )
        if not isinstance(event, h11.Response):
            raise TransportError(f"proxy at {proxy} answered CONNECT oddly", retryable=True)
        if not 200 <= event.status_code < 300:  # any 2xx opens the tunnel (RFC 9110)
            body, _ = await _read_body(conn, raw, _MAX_ERROR_BODY, "proxy CONNECT")
            reason = proxy_error_reason(body, event.reason.decode("latin-1"))
            raise TransportError(
                f"proxy refused CONNECT {target}: {event.status_code} {reason}",
                # 502/503/504 are the proxy's transient answers (upstream down, over
                # its connection limit, upstream timeout); 4xx will not change.
                retryable=event.status_code in (502, 503, 504),
            )
        leftover, _closed = conn.trailing_data
    except TransportError:
        await trio.aclose_forcefully(raw)
        raise
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
        await trio.aclose_forcefully(raw)
        raise TransportError(
            f"proxy at {proxy} broke the CONNECT exchange: {exc}", retryable=True
        ) from None
    except BaseException:
        await trio.aclose_forcefully(raw)
        raise
    return _PrefixedStream(raw, bytes(leftover)) if leftover else raw


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
    """One TLS connection to KMS carrying one h11 request at a time."""

    def __init__(self, stream: trio.SSLStream[trio.abc.Stream], authority: str) -> None:
        self.stream = stream
        self.authority = authority
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEADER_BYTES)
        self.last_used = trio.current_time()
        self.requests = 0

    async def roundtrip(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes, limit: int
    ) -> tuple[HttpResponse, bool]:
        """The answer, and whether the connection may carry another request."""
        reused = self.requests > 0
        self.requests += 1
        got_answer = False
        try:
            all_headers = [(k, v) for k, v in headers if k.lower() not in ("content-length",)]
            if not any(k.lower() == "host" for k, _ in all_headers):
                all_headers.insert(0, ("Host", self.authority))
            all_headers.append(("Content-Length", str(len(body))))
            data = self.h11.send(h11.Request(method=method, target=target, headers=all_headers))
            data = (data or b"") + (self.h11.send(h11.Data(data=body)) or b"")
            data += self.h11.send(h11.EndOfMessage()) or b""
            await self.stream.send_all(data)
            event = await _receive_event(self.h11, self.stream)
            while isinstance(event, h11.InformationalResponse):
                event = await _receive_event(self.h11, self.stream)
            if isinstance(event, h11.ConnectionClosed):
                raise TransportError(
                    f"KMS at {self.authority} closed the connection without answering",
                    retryable=True,
                    stale=reused,
                )
            if not isinstance(event, h11.Response):
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")
            got_answer = True
            response_body, complete = await _read_body(self.h11, self.stream, limit, "KMS")
            if not complete:
                raise TransportError(
                    f"KMS at {self.authority} closed the connection mid-answer", retryable=True
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise TransportError(
                f"connection to KMS at {self.authority} broke: {exc or type(exc).__name__}",
                retryable=True,
                stale=reused and not got_answer,
            ) from None
        except (h11.LocalProtocolError, UnicodeEncodeError):
            # Our own request could not be written (a header value h11 refuses). Its
            # text would quote the value, which may be a credential: never repeat it.
            raise TransportError(
                f"the request to KMS at {self.authority} is not valid HTTP (a header value "
                "h11 refuses); nothing was sent",
                retryable=False,
            ) from None
        except h11.ProtocolError as exc:
            raise TransportError(
                f"KMS at {self.authority} sent a malformed HTTP answer: {exc}", retryable=True
            ) from None
        self.last_used = trio.current_time()
        reusable = self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE
        if reusable:
            self.h11.start_next_cycle()
        response = HttpResponse(
            status=event.status_code,
            reason=event.reason.decode("latin-1", "replace"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
            body=response_body,
        )
        return response, reusable


class KmsConnectionPool:
    """At most ``pool_size`` kept-alive TLS connections to one endpoint via the proxy."""

    def __init__(
        self,
        proxy: Address,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        pool_size: int = 16,
        idle_timeout: float = 30.0,
        max_response_bytes: int = 1 << 20,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
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
        return _Connection(stream, self.authority)

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
    ) -> HttpResponse:
        if self._closed:
            raise TransportError("the KMS connection pool is closed", retryable=False)
        async with self._slots:
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

    async def aclose(self) -> None:
        self._closed = True
        while self._idle or self._expired:
            await _drop((self._idle or self._expired).pop())


async def _drop(conn: _Connection) -> None:
    """Close at once, without a TLS close_notify exchange: we are abandoning it."""
    await trio.aclose_forcefully(conn.stream)


async def http_get(address: Address, target: str, *, max_body: int = 65536) -> HttpResponse:
    """One plain-HTTP GET on a fresh connection (the proxy's /v1/credentials)."""
    stream = await _open_proxy(address)
    try:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEADER_BYTES)
        headers = [
            ("Host", "enclave-proxy"),
            ("Connection", "close"),
            ("Accept", "application/json"),
        ]
        data = conn.send(h11.Request(method="GET", target=target, headers=headers)) or b""
        await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))
        event = await _receive_event(conn, stream)
        while isinstance(event, h11.InformationalResponse):
            event = await _receive_event(conn, stream)
        if not isinstance(event, h11.Response):
            raise TransportError(
                f"proxy at {address} closed the connection before answering GET {target}",
                retryable=True,
            )
        body, complete = await _read_body(conn, stream, max_body, f"GET {target}")
        if not complete:
            raise TransportError(
                f"proxy at {address} closed the connection mid-answer to GET {target}",
                retryable=True,
            )
        return HttpResponse(
            status=event.status_code,
            reason=event.reason.decode("latin-1", "replace"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
            body=body,
        )
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
        raise TransportError(
            f"GET {target} from the proxy at {address} failed: {exc}", retryable=True
        ) from None
    finally:
        await trio.aclose_forcefully(stream)
