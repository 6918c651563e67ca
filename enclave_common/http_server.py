"""The HTTP/1.1 server driver: the one h11 loop under every server of the project.

Rules of this file: mechanics, never policy. Who may connect, what a target means,
what an error looks like and what gets logged belong to the user: the driver asks
(``admit``), hands over (``handler``), renders through the user (``errors``) and
tells (``report``). Every limit of a server connection is applied here and nowhere
else. Nothing here logs; no byte of a request or an answer reaches a ``Report``.

Theory of operation. ``HttpServer.serve(stream, handler, admit=, report=)`` runs one
connection to its end and closes it:
1. ``admit``, an async context manager, is entered before any byte is read and left
   when the connection ends (per-caller shares are released exactly once). If it
   yields an ``Answer``, that is a raw refusal: written without reading the request,
   then the draining close unless the answer says ``linger=False``.
   ``admit_by_shares`` is that for per-caller shares (enclave_common.shares).
2. Waiting for a request the connection is idle: the first byte must come within
   ``idle_timeout`` (``header_timeout`` for a connection's first request), and
   ``close_idle()`` (a shutdown) ends it at once. From its first byte (from accept for
   the first request) the head, and a body read with ``body()``, must be in within
   ``header_timeout``. Heads follow http1's rule (``max_head_bytes``, then 431).
3. The handler gets the head as a ``Request``; the body is read only when it asks:
   whole (``body()``: at most ``max_body_bytes`` unless it says otherwise, 413 before
   a byte is read when Content-Length is larger), or piece by piece (``stream()``:
   its own limit or none, its own deadline per piece); a body cut short gets 400 (the
   client may have only half-closed). ``100 Continue`` goes out when it first reads,
   never for a CONNECT (whose client expects the 2xx as first line).
   While the handler works no deadline of the driver runs: an answer may be held,
   and is given up as soon as the client leaves if the handler holds it in
   ``async with request.cancelled_if_client_leaves():`` (opt-in, once the request is
   read whole: the client is read meanwhile, see there; outcome client_gone).
4. It returns an ``Answer`` (written; then the next request, unless either side asked
   to close, the body was left unread or the server is shutting down), a ``Switch`` (a
   CONNECT accepted: its 2xx is written and ``run`` owns the raw stream, given the
   bytes the client sent after its head; the connection ends when run returns), or
   raises a ``ShownError`` (enclave_common.errors; ``HttpError`` adds headers):
   ``errors(status, message)`` is written with Connection: close, then the draining
   close. The driver's own 400/408/413/431 take that path, and an unexpected
   exception in the handler becomes a 500. An answer must be taken by the client
   within ``idle_timeout``.
5. Draining close: after the answer, end our sending side, read and drop what the
   client still sends (``linger_seconds``, ``linger_bytes``), then close, so the
   client reads the answer instead of a reset.
6. ``report`` gets one ``Report`` per request (status, outcome, reason, bytes), and one
   for a connection that ends without a request; the user logs it in its own shape.

Its users: proxy/http_front.py (CONNECT as a ``Switch``, ``close_idle()`` on SIGTERM),
proxy/enclave_logs.py (streamed enclave logs: ``stream(limit=None, ...)``),
enclave_agent/runtime/server.py (SO_PEERCRED and per-uid shares in ``admit``; it logs
each answered request itself, before the answer goes out; its long-poll secret wait
is held in ``cancelled_if_client_leaves``) and devtools/local_kms/server.py (behind TLS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import h11
import trio

from enclave_common.address import close_now
from enclave_common.errors import ShownError
from enclave_common.http1 import RECEIVE_SIZE, Wire
from enclave_common.shares import ShareRefused, Shares


@dataclass(frozen=True)
class Limits:
    max_head_bytes: int = 16 * 1024
    max_body_bytes: int = 1 << 20
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    linger_seconds: float = 1.0
    linger_bytes: int = 4 << 20


@dataclass(frozen=True)
class Answer:
    """What the handler answers; the driver adds Content-Length (and Connection)."""

    status: int
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    reason: str | None = None  # the status line's phrase; default: the standard one
    note: Mapping[str, Any] = field(default_factory=dict)  # for the report, never sent
    linger: bool = True  # a raw refusal: drain what the client sends (False: close at once)


@dataclass(frozen=True)
class Switch:
    """A CONNECT accepted: ``answer`` (2xx, no body) is written, then ``run(stream,
    early)`` owns the raw stream. The report comes when run returns, with the answer's
    ``note`` (give a dict that run fills, e.g. with relay counts). ``close``, if given,
    is awaited at the end whether run ran or not (the client may be gone before the
    2xx is written): it releases what the handler opened for run, even when cancelled."""

    answer: Answer
    run: Callable[[trio.abc.Stream, bytes], Awaitable[None]]
    close: Callable[[], Awaitable[None]] | None = None


class HttpError(ShownError):
    """An error in HTTP's own words (its ``error_type`` is the status phrase), with
    ``headers`` to add to its answer. The driver's own errors are these; a handler
    raises them, or any ``ShownError``: ``errors(status, message)`` is answered, then
    the connection closed."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()):
        super().__init__(_phrase(status), message, status)
        self.headers = headers


# What a stream raises when the client broke or closed it (for our side: never here).
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class ClientGone(Exception):
    """The client closed or broke its side: while the handler read the body, or while
    it held its answer in ``Request.cancelled_if_client_leaves``. A handler lets it
    through (nothing can be answered any more): the request's outcome is client_gone."""


Outcome = Literal[
    "answered",  # the handler's Answer was written
    "switched",  # a Switch's run ended
    "rejected",  # a ShownError (the driver's or the handler's) was answered
    "failed",  # the handler (or a Switch's run) raised: 500 answered if still possible
    "refused",  # admit refused: the answer written raw, the request never read
    "idle_closed",  # no request came within the idle deadline
    "closed_for_shutdown",  # idle when close_idle() was called
    "client_closed",  # the client hung up between requests
    "client_gone",  # the client broke off mid-request, left while its answer was held
    # (``cancelled_if_client_leaves``) or did not take an answer in time
    "cancelled",  # the server was cancelled mid-request
]


@dataclass
class Report:
    number: int  # requests before this one on the connection
    started: float  # trio.current_time() at its first byte (or since waiting)
    outcome: Outcome = "client_closed"
    request: Request | None = None
    status: int | None = None
    reason: str | None = None
    received: int = 0  # request body bytes read
    sent: int = 0  # answer bytes written
    note: Mapping[str, Any] = field(default_factory=dict)


Handler = Callable[["Request"], Awaitable[Answer | Switch]]


class Request:
    """A request's head; its body is read when the handler asks for it."""

    def __init__(self, head: h11.Request, connection: _Connection, deadline: float) -> None:
        self.method = head.method.decode("ascii", "replace")
        self.target = head.target.decode("ascii", "replace")
        self.headers = [(k.decode("ascii"), v.decode("latin-1")) for k, v in head.headers]
        self.received = 0
        self._declared = next((int(v) for k, v in head.headers if k == b"content-length"), 0)
        self._connection = connection
        self._deadline = deadline
        self._done = False

    async def body(self, limit: int | None = None) -> bytes:
        """The whole body: at most ``limit`` (default max_body_bytes) bytes, in by the
        request's deadline."""
        if limit is None:
            limit = self._connection.server.limits.max_body_bytes
        pieces = []
        while (piece := await self._next(limit, self._deadline)) is not None:
            pieces.append(piece)
        return b"".join(pieces)

    async def stream(self, *, limit: int | None, piece_timeout: float) -> AsyncIterator[bytes]:
        """The body as it arrives, each piece within ``piece_timeout`` of the last, in
        all at most ``limit`` bytes (None: no limit)."""
        while (piece := await self._next(limit, trio.current_time() + piece_timeout)) is not None:
            yield piece

    async def _next(self, limit: int | None, deadline: float) -> bytes | None:
        if self._done:
            return None
        if limit is not None and max(self._declared, self.received) > limit:
            raise HttpError(413, f"request body larger than {limit} bytes")
        wire = self._connection.wire
        try:
            if wire.h11.they_are_waiting_for_100_continue and self.method != "CONNECT":
                continued = h11.InformationalResponse(status_code=100, headers=[])
                await self._connection.write(wire.h11.send(continued))
            event = await wire.next_event_by(deadline)
        except trio.TooSlowError:
            raise HttpError(408, "request body not received in time") from None
        except h11.RemoteProtocolError:
            # Cut short by the client's end too: it may still read the answer.
            raise HttpError(400, "malformed request body") from None
        except _BROKEN:
            raise ClientGone from None
        if isinstance(event, h11.EndOfMessage):
            self._done = True
            return None
        self.received += len(event.data)  # h11 yields only Data inside a body
        if limit is not None and self.received > limit:
            raise HttpError(413, f"request body larger than {limit} bytes")
        return bytes(event.data)

    @contextlib.asynccontextmanager
    async def cancelled_if_client_leaves(self) -> AsyncIterator[None]:
        """Hold the answer (a long-poll's wait) in this block while the client is
        watched: when it closes its connection or resets it, the block is cancelled at
        once and ``ClientGone`` raised, so nothing is written and the connection ends
        (``admit``'s shares are given back). Only once the request is read whole.

        Watching is reading: what the client sends meanwhile (a pipelined next request)
        is kept for the next exchange, at most ``max_head_bytes`` of it; beyond that the
        client is no longer read (back-pressured) until the block ends, and its leaving
        is then noticed only at the answer. EOF counts as leaving: a client that only
        half-closed after its request (rare in HTTP/1.1; nginx's proxied long-polls
        read it the same way) gets no answer. The watch's ``receive_some`` is cancelled
        when the block ends: trio's socket streams lose nothing by that, nor does a TLS
        stream past its handshake (but mid-renegotiation, trio says, it is broken)."""
        if not self._complete():
            raise RuntimeError("watch for the client leaving only once its request is read")
        watch = _Watch(self._connection.wire, self._connection.server.limits)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.run, nursery.cancel_scope)
                try:
                    yield
                finally:
                    nursery.cancel_scope.cancel()  # the block ended: so does the watch
        except BaseExceptionGroup as group:  # the block's own exception, not a group
            raise _sole(group) from None
        if watch.left is not None:
            raise ClientGone(watch.left)

    def _complete(self) -> bool:
        """Whether the request is all in, taking a bodiless request's end without I/O."""
        with contextlib.suppress(h11.RemoteProtocolError):
            self._done = self._done or isinstance(self._connection.wire.event(), h11.EndOfMessage)
        return self._done


class HttpServer:
    """The driver for one kind of server: its limits and its error shape."""

    def __init__(self, limits: Limits, errors: Callable[[int, str], Answer]) -> None:
        self.limits = limits
        self.errors = errors
        self.closing = False
        self._idle: set[trio.CancelScope] = set()

    def close_idle(self) -> None:
        """Shutting down: idle connections close now, busy ones after their answer."""
        self.closing = True
        for scope in self._idle:
            scope.cancel()

    async def serve(
        self,
        stream: trio.abc.Stream,
        handler: Handler,
        *,
        admit: AbstractAsyncContextManager[Answer | None] | None = None,
        report: Callable[[Report], None] | None = None,
    ) -> None:
        """Serve one connection to its end and close it; never raises for the client's doing."""
        connection = _Connection(self, stream, handler, report or (lambda _: None))
        try:
            async with admit or contextlib.nullcontext() as refusal:
                if refusal is None:
                    while await connection.step(connection.exchange):
                        pass
                else:
                    await connection.step(lambda record: connection.refuse(record, refusal))
        finally:
            await close_now(stream)


class _Connection:
    def __init__(
        self,
        server: HttpServer,
        stream: trio.abc.Stream,
        handler: Handler,
        report: Callable[[Report], None],
    ) -> None:
        self.server = server
        self.stream = stream
        self.handler = handler
        self.report = report
        self.wire = Wire(stream, h11.SERVER, server.limits.max_head_bytes)
        self.opened = trio.current_time()
        self.number = 0
        self._record = Report(0, self.opened)

    async def step(self, action: Callable[[Report], Awaitable[bool]]) -> bool:
        """Run one exchange; report it; whether the connection goes on."""
        record = self._record = Report(self.number, trio.current_time())
        again = False
        try:
            again = await action(record)
        except trio.Cancelled:
            record.outcome = "cancelled"
            raise
        except (*_BROKEN, ClientGone) as exc:
            record.outcome, record.reason = "client_gone", str(exc) or None
        except Exception as exc:  # noqa: BLE001 - one connection's failure must not end the server
            record.outcome, record.reason = "failed", type(exc).__name__
        finally:
            self.report(record)
        self.number += 1
        return again

    async def write(self, data: bytes) -> None:
        # A client that sends requests but never reads the answers would block us here
        # for good, holding its connection.
        try:
            with trio.fail_after(self.server.limits.idle_timeout):
                await self.stream.send_all(data)
        except trio.TooSlowError:
            raise ClientGone("answer not taken in time") from None
        except _BROKEN:
            raise ClientGone from None
        self._record.sent += len(data)

    async def refuse(self, record: Report, answer: Answer) -> bool:
        record.outcome, record.status, record.note = "refused", answer.status, answer.note
        await self._answer(answer, close=True, conn=h11.Connection(h11.SERVER))
        if answer.linger:
            await self._linger()
        return False

    async def exchange(self, record: Report) -> bool:
        request: Request | None = None
        try:
            request = await self._request(record)
            if request is None:
                return False
            record.request = request
            try:
                answer = await self.handler(request)
            except (ShownError, ClientGone):
                raise
            except Exception as exc:  # noqa: BLE001 - a failed request still gets an answer
                await self._reject(HttpError(500, "internal error"), record)
                record.outcome, record.reason = "failed", type(exc).__name__
                return False
            if isinstance(answer, Switch):
                await self._switch(request, answer, record)
                return False
            complete = request._complete()
        except ShownError as exc:
            await self._reject(exc, record)
            return False
        finally:
            record.received = request.received if request else 0
        record.outcome, record.status, record.note = "answered", answer.status, answer.note
        close = self.server.closing or not complete
        await self._answer(answer, close=close, head_only=request.method == "HEAD")
        if close or self.wire.h11.our_state is not h11.DONE:
            # Whatever ends the connection here (our close, an HTTP/1.0 client, its
            # Connection: close), the client may still be sending: close draining.
            await self._linger()
            return False
        self.wire.h11.start_next_cycle()
        return True

    async def _request(self, record: Report) -> Request | None:
        limits, wire, first = self.server.limits, self.wire, self.number == 0
        if wire.head_bytes == 0:  # idle: nothing of a next request in hand
            if self.server.closing:
                record.outcome = "closed_for_shutdown"
                return None
            wait = limits.header_timeout if first else limits.idle_timeout
            idle = trio.CancelScope(deadline=record.started + wait)
            self.server._idle.add(idle)
            try:
                with idle:
                    await wire.receive()
            finally:
                self.server._idle.discard(idle)
            if idle.cancelled_caught:
                record.outcome = "closed_for_shutdown" if self.server.closing else "idle_closed"
                return None
            if wire.eof:
                return None  # client_closed
            record.started = trio.current_time()
        deadline = (self.opened if first else record.started) + limits.header_timeout
        try:
            event = await wire.next_event_by(deadline)
        except trio.TooSlowError:
            raise HttpError(408, "request head not received in time") from None
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                raise HttpError(431, "request head too large") from None
            raise HttpError(400, "malformed request") from None
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed, or PAUSED after a Connection: close: client_closed
        return Request(event, self, deadline)

    async def _switch(self, request: Request, switch: Switch, record: Report) -> None:
        try:
            await request.body()
            answer = switch.answer
            reason = answer.reason or _phrase(answer.status)
            await self.write(
                self.wire.h11.send(
                    h11.Response(
                        status_code=answer.status, headers=list(answer.headers), reason=reason
                    )
                )
            )
            if self.wire.h11.our_state is not h11.SWITCHED_PROTOCOL:
                raise RuntimeError("a Switch answers a CONNECT with a 2xx")
            record.outcome, record.status, record.note = "switched", answer.status, answer.note
            early = self.wire.h11.trailing_data[0]
            self.wire.forget()  # the run owns the stream: h11 is done with it
            await switch.run(self.stream, early)
        finally:
            if switch.close is not None:
                await switch.close()

    async def _reject(self, error: ShownError, record: Report) -> None:
        record.outcome, record.status, record.reason = "rejected", error.status, error.message
        answer = self.server.errors(error.status, error.message)
        extra = error.headers if isinstance(error, HttpError) else ()
        answer = Answer(answer.status, [*answer.headers, *extra], answer.body)
        if self.wire.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            request = record.request
            # A head refused before it was handed over (h11 may have parsed it, as one
            # over max_head_bytes in a single read) is answered as a raw refusal is.
            conn = None if request else h11.Connection(h11.SERVER)
            head_only = request is not None and request.method == "HEAD"
            await self._answer(answer, close=True, head_only=head_only, conn=conn)
        await self._linger()

    async def _answer(
        self,
        answer: Answer,
        *,
        close: bool,
        head_only: bool = False,
        conn: h11.Connection | None = None,
    ) -> None:
        conn = conn or self.wire.h11
        headers = [*answer.headers, ("content-length", str(len(answer.body)))]
        if close:
            headers.append(("connection", "close"))
        reason = answer.reason or _phrase(answer.status)
        data = conn.send(h11.Response(status_code=answer.status, headers=headers, reason=reason))
        if not head_only:  # a HEAD answer carries the headers of the GET answer, no body
            data += conn.send(h11.Data(data=answer.body))
        await self.write(data + conn.send(h11.EndOfMessage()))

    async def _linger(self) -> None:
        """Closing with unread input makes the kernel send a reset, which can destroy
        an answer the client has not read yet: end our side, drop what still comes."""
        limits = self.server.limits
        with trio.move_on_after(limits.linger_seconds):
            try:
                await _send_eof(self.stream)
                dropped = 0
                while dropped < limits.linger_bytes:
                    if not (piece := await self.stream.receive_some(RECEIVE_SIZE)):
                        break
                    dropped += len(piece)
            except _BROKEN:
                pass  # the client is gone; nothing left to tell it


class _Watch:
    """Reads the client while a handler holds its answer, until it leaves."""

    def __init__(self, wire: Wire, limits: Limits) -> None:
        self.wire = wire
        self.limit = limits.max_head_bytes
        self.left: str | None = None  # why the client is gone, once it is

    async def run(self, held: trio.CancelScope) -> None:
        wire = self.wire
        try:
            while not wire.eof:
                if (room := self.limit - wire.head_bytes) <= 0:
                    await trio.sleep_forever()  # a next head's worth in hand: read no more
                await wire.receive(room)  # h11 keeps it for the next exchange
            self.left = "the client closed its connection while the answer was held"
        except _BROKEN as exc:
            self.left = str(exc) or type(exc).__name__
        held.cancel()


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What the held block raised, unwrapped from the nursery's group: the watch raises
    nothing but a Cancelled, so it is the one exception other than those, else (the
    block was cancelled from outside, as the watch was) the block's Cancelled."""
    cancelled, rest = group.split(trio.Cancelled)
    if rest is not None:
        return rest.exceptions[0] if len(rest.exceptions) == 1 else group
    assert cancelled is not None
    return cancelled.exceptions[0]


K = TypeVar("K", bound=Hashable)


def admit_by_shares(
    key: K,
    connections: Shares[K],
    lingering: Shares[K],
    refusal: Callable[[ShareRefused], Answer],
    *,
    denied: Answer | None = None,
) -> AbstractAsyncContextManager[Answer | None]:
    """An ``admit`` for per-caller shares: the connection holds one of ``key``'s
    ``connections`` from before its first byte to its end. Without one, or ``denied``,
    it is refused raw (``refusal`` says how), and drains what its client still sends
    only while one of ``lingering``'s shares for ``key`` is free: a flood of refused
    connections holds a bounded number of descriptors."""
    return _SharesAdmit(key, connections, lingering, refusal, denied)


class _SharesAdmit(Generic[K]):
    """``admit_by_shares`` as a plain object, not generator-based context managers: a
    connection (a proxy tunnel, however long it idles) holds it for its whole life,
    and their frames cost every connection about 1.5 KiB."""

    def __init__(
        self,
        key: K,
        connections: Shares[K],
        lingering: Shares[K],
        refusal: Callable[[ShareRefused], Answer],
        denied: Answer | None,
    ) -> None:
        self.key = key
        self.connections = connections
        self.lingering = lingering
        self.refusal = refusal
        self.denied = denied
        self.held = self.lingers = False

    async def __aenter__(self) -> Answer | None:
        answer = self.denied
        if answer is None:
            try:
                self.connections.acquire(self.key)
                self.held = True
            except ShareRefused as refused:
                answer = self.refusal(refused)
        if answer is not None:
            try:
                self.lingering.acquire(self.key)
                self.lingers = True
            except ShareRefused:
                pass
            answer = dataclasses.replace(answer, linger=self.lingers)
        return answer

    async def __aexit__(self, *exc_info: object) -> None:
        if self.lingers:
            self.lingering.release(self.key)
        if self.held:
            self.connections.release(self.key)


async def _send_eof(stream: trio.abc.Stream) -> None:
    # TLS has no half-close of its own, and trio closes an https_compatible TLS stream
    # with a bare FIN anyway: so the FIN goes out under it (our answer is self-delimited).
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""
