"""HTTP/1.1 over h11 for both ends: the byte pump with the head rule, and the client exchange.

h11 parses (bring your own I/O); ``Wire`` feeds it from a trio stream. The server
driver (``http_server``) and ``ClientConnection`` below are the only code that drives
h11, so a limit behaves the same at every end.

The head rule, one for requests and responses: a head is at most ``max_head_bytes`` on
the wire, counted exactly; an answer's interim (1xx) heads count toward its final head,
so a peer sending ``100 Continue`` for ever is cut off like one endless head. h11
counts a head that is still arriving (its buffer, ``max_incomplete_event_size``) but
parses one that arrives whole in a single read at any size; so ``Wire`` counts that one
itself, as the bytes it fed h11 since the head began minus the bytes h11 still holds.
Both give ``RemoteProtocolError`` with hint 431.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import h11
import trio

RECEIVE_SIZE = 64 * 1024


# What a Wire's h11 becomes once its stream has switched protocol (``Wire.forget``).
_SPENT = h11.Connection(h11.SERVER)


class Wire:
    """One h11 connection on one trio stream."""

    def __init__(
        self, stream: trio.abc.Stream, role: type[h11.CLIENT | h11.SERVER], max_head_bytes: int
    ) -> None:
        self.stream = stream
        self.h11 = h11.Connection(role, max_incomplete_event_size=max_head_bytes)
        self.max_head_bytes = max_head_bytes
        self.eof = False
        self._fed = 0  # bytes handed to h11 so far
        self._head_start = 0  # of those, where the current head begins

    def forget(self) -> None:
        """After a switch of protocol the stream carries other bytes: drop h11's state
        and buffers (an idle tunnel would hold them for its whole life). Nothing may use
        this Wire afterwards but to read ``eof``."""
        self.h11 = _SPENT

    @property
    def head_bytes(self) -> int:
        """Bytes of the next head already in hand (meaningful once a message has ended)."""
        return self._fed - self._head_start

    async def receive(self, max_bytes: int = RECEIVE_SIZE) -> None:
        data = await self.stream.receive_some(max_bytes)
        self.eof = not data
        self._fed += len(data)
        self.h11.receive_data(bytes(data))

    def event(self) -> Any:
        """h11's next event, without I/O (NEED_DATA when it needs bytes)."""
        event = self.h11.next_event()
        if isinstance(event, h11.Request | h11.InformationalResponse | h11.Response):
            consumed = self._fed - len(self.h11.trailing_data[0])
            if consumed - self._head_start > self.max_head_bytes:
                raise h11.RemoteProtocolError("head too large", error_status_hint=431)
            if not isinstance(event, h11.InformationalResponse):
                self._head_start = consumed
        elif isinstance(event, h11.EndOfMessage):
            self._head_start = self._fed - len(self.h11.trailing_data[0])
        return event

    async def next_event(self) -> Any:
        while (event := self.event()) is h11.NEED_DATA:
            await self.receive()
        return event

    async def next_event_by(self, deadline: float) -> Any:
        """``next_event``, its bytes in by ``deadline`` (else ``trio.TooSlowError``). An
        event already in hand (a body that came with its head) needs no cancel scope."""
        event = self.event()
        if event is h11.NEED_DATA:
            with trio.fail_at(deadline):
                event = await self.next_event()
        return event


@dataclass(frozen=True, repr=False)
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def __repr__(self) -> str:  # never the body: it may be a secret's envelope
        return f"Response(status={self.status}, reason={self.reason!r})"


ErrorKind = Literal["unsent", "no_answer", "truncated", "malformed", "broken"]


class ExchangeError(Exception):
    """No usable answer. ``kind``: ``unsent`` (the request is not valid HTTP; nothing
    went out), ``no_answer`` (closed before a byte of an answer), ``truncated`` (closed
    mid-answer), ``malformed`` (not HTTP, or over a limit), ``broken`` (the stream
    failed). ``answered``: a response head had arrived."""

    def __init__(self, kind: ErrorKind, detail: str, *, answered: bool = False) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.answered = answered


class ClientConnection:
    """Requests one at a time on one stream, kept alive while both sides allow it."""

    def __init__(self, stream: trio.abc.Stream, *, max_head_bytes: int = 16 * 1024) -> None:
        self._wire = Wire(stream, h11.CLIENT, max_head_bytes)
        self.requests = 0

    @property
    def reusable(self) -> bool:
        return self._wire.h11.our_state is h11.IDLE

    async def exchange(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes = b"",
        *,
        max_body: int,
    ) -> Response:
        """Send one request (``headers`` as given: Host, Content-Length are the caller's)
        and read its answer, with a body of at most ``max_body`` bytes. A 2xx to CONNECT
        has no body: the stream is then ``detach()``'s. The deadline is the caller's
        cancel scope; an exchange cut short leaves the connection not ``reusable``."""
        data = self._encode(method, target, headers)
        data += self._encode_body(body) + self._encode_end()
        await self._send(data)
        return await self.answer(max_body=max_body)

    async def begin(self, method: str, target: str, headers: Sequence[tuple[str, str]]) -> None:
        """Send a request head whose body follows piece by piece (``send``), e.g. with
        ``Transfer-Encoding: chunked`` among ``headers``; ``answer`` may be awaited
        meanwhile, by another task, for a server that answers early."""
        await self._send(self._encode(method, target, headers))

    async def send(self, data: bytes) -> None:
        """The next piece of a body ``begin`` started."""
        await self._send(self._encode_body(data))

    async def end(self) -> None:
        """End a body ``begin`` started."""
        await self._send(self._encode_end())

    def _encode(self, method: str, target: str, headers: Sequence[tuple[str, str]]) -> bytes:
        self.requests += 1
        try:
            request = h11.Request(method=method, target=target, headers=list(headers))
            return self._wire.h11.send(request)
        except (h11.LocalProtocolError, UnicodeEncodeError):
            # Its text would quote the value, which may be a credential: never repeat it.
            raise ExchangeError("unsent", "the request is not valid HTTP") from None

    def _encode_body(self, data: bytes) -> bytes:
        return self._wire.h11.send(h11.Data(data=data)) if data else b""

    def _encode_end(self) -> bytes:
        return self._wire.h11.send(h11.EndOfMessage())

    async def _send(self, data: bytes) -> None:
        try:
            await self._wire.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ExchangeError("broken", str(exc) or type(exc).__name__) from None

    async def answer(self, *, max_body: int) -> Response:
        """Read the answer to the request sent, with a body of at most ``max_body``."""
        wire = self._wire
        answered = False
        try:
            while isinstance(head := await wire.next_event(), h11.InformationalResponse):
                pass
            if not isinstance(head, h11.Response):
                raise ExchangeError("no_answer", "closed before answering")
            answered = True
            declared = next((int(v) for k, v in head.headers if k == b"content-length"), 0)
            received = bytearray()
            while wire.h11.their_state is h11.SEND_BODY:
                if max(declared, len(received)) > max_body:
                    detail = f"answer body exceeds {max_body} bytes"
                    raise ExchangeError("malformed", detail, answered=True)
                if isinstance(event := await wire.next_event(), h11.Data):
                    received += event.data
        except h11.RemoteProtocolError as exc:
            kind: ErrorKind = "malformed"
            if wire.eof:
                kind = "truncated" if answered or wire.head_bytes else "no_answer"
            raise ExchangeError(kind, str(exc), answered=answered) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise ExchangeError("broken", detail, answered=answered) from None
        if wire.h11.our_state is h11.DONE and wire.h11.their_state is h11.DONE:
            wire.h11.start_next_cycle()
        return Response(
            status=head.status_code,
            reason=head.reason.decode("latin-1", "replace"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers],
            body=bytes(received),
        )

    def detach(self) -> trio.abc.Stream:
        """After a 2xx to CONNECT: the raw stream, first replaying the bytes that came
        with the answer."""
        assert self._wire.h11.their_state is h11.SWITCHED_PROTOCOL
        early = self._wire.h11.trailing_data[0]
        return _PrefixedStream(self._wire.stream, early) if early else self._wire.stream


class _PrefixedStream(trio.abc.Stream):
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
