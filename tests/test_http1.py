"""The client exchange (enclave_common.http1) against hostile servers on loopback.

Every answer a server can send ends in a ``Response`` or an ``ExchangeError`` of a
stated kind: oversized heads (one read or a trickle), malformed answers, endless
bodies, slow answers, closes before and during an answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_common.address import open_stream, parse_address
from enclave_common.http1 import ClientConnection, ErrorKind, ExchangeError, Response
from tests.support.raw_http import raw_server, read_head

Server = Callable[[trio.SocketStream], Awaitable[None]]
GET = [("Host", "x")]
LIMIT = 1024


def answering(*pieces: bytes, pause: float = 0, forever: bytes = b"") -> Server:
    """A server that reads a request head, sends ``pieces`` (``pause`` apart), then
    ``forever`` over and over (at most 10 MB), then closes."""

    async def server(stream: trio.SocketStream) -> None:
        await read_head(stream)
        try:
            for piece in pieces:
                await stream.send_all(piece)
                await trio.sleep(pause)
            for _ in range((10 << 20) // max(len(forever), 1) if forever else 0):
                await stream.send_all(forever)
        except trio.BrokenResourceError:
            pass

    return server


async def get(nursery: trio.Nursery, server: Server, max_body: int = LIMIT) -> Response:
    address = await raw_server(nursery, server)
    async with await open_stream(parse_address(address)) as stream:
        with trio.fail_after(20):
            return await ClientConnection(stream, max_head_bytes=LIMIT).exchange(
                "GET", "/", GET, max_body=max_body
            )


def head_of(size: int) -> bytes:
    start = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-pad: "
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


async def failure(nursery: trio.Nursery, server: Server, max_body: int = LIMIT) -> ExchangeError:
    with pytest.raises(ExchangeError) as caught:
        await get(nursery, server, max_body)
    return caught.value


async def test_head_limit_is_exact_in_one_read_and_in_a_trickle(nursery: trio.Nursery) -> None:
    assert (await get(nursery, answering(head_of(LIMIT)))).status == 200
    error = await failure(nursery, answering(head_of(LIMIT + 1)))
    assert (error.kind, error.detail) == ("malformed", "head too large")
    trickle = [head_of(LIMIT + 1)[i : i + 100] for i in range(0, LIMIT + 1, 100)]
    assert (await failure(nursery, answering(*trickle, pause=0.01))).kind == "malformed"
    endless = answering(b"HTTP/1.1 200 OK\r\n", forever=b"x-pad: " + b"a" * 100 + b"\r\n")
    assert (await failure(nursery, endless)).kind == "malformed"


@pytest.mark.parametrize(
    ("answer", "kind", "fragment"),
    [
        (b"", "no_answer", ""),
        (b"HTTP/1.1 200 OK\r\ncontent-le", "truncated", ""),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", "truncated", ""),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed", ""),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 99999999\r\n\r\n", "malformed", "exceeds 1024"),
    ],
)
async def test_closed_malformed_and_oversized_answers(
    nursery: trio.Nursery, answer: bytes, kind: ErrorKind, fragment: str
) -> None:
    error = await failure(nursery, answering(answer))
    assert error.kind == kind and fragment in error.detail


async def test_an_endless_body_stops_at_the_limit(nursery: trio.Nursery) -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    error = await failure(nursery, answering(chunked, forever=b"100\r\n" + b"a" * 256 + b"\r\n"))
    assert (error.kind, error.answered) == ("malformed", True)
    closed_framing = answering(b"HTTP/1.1 200 OK\r\n\r\n", forever=b"a" * 4096)
    assert "exceeds 1024 bytes" in (await failure(nursery, closed_framing)).detail


async def test_a_slow_answer_ends_with_the_callers_deadline(nursery: trio.Nursery) -> None:
    slow = answering(
        *[bytes([c]) for c in b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"], pause=1
    )
    address = await raw_server(nursery, slow)
    async with await open_stream(parse_address(address)) as stream:
        conn = ClientConnection(stream)
        with trio.move_on_after(0.5) as scope:
            await conn.exchange("GET", "/", GET, max_body=LIMIT)
        assert scope.cancelled_caught and not conn.reusable


async def test_kept_alive_until_the_server_says_close(nursery: trio.Nursery) -> None:
    async def server(stream: trio.SocketStream) -> None:
        for connection in (b"keep-alive", b"close"):
            await read_head(stream)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: %s\r\n\r\nok" % connection
            )

    address = await raw_server(nursery, server)
    async with await open_stream(parse_address(address)) as stream:
        conn = ClientConnection(stream)
        for reusable in (True, False):
            response = await conn.exchange("GET", "/", GET, max_body=LIMIT)
            assert (response.body, conn.reusable) == (b"ok", reusable)
        assert conn.requests == 2


async def test_a_request_h11_refuses_is_not_sent_nor_quoted(nursery: trio.Nursery) -> None:
    seen: list[bytes] = []

    async def server(stream: trio.SocketStream) -> None:
        seen.append(await stream.receive_some(65536))

    address = await raw_server(nursery, server)
    async with await open_stream(parse_address(address)) as stream:
        with pytest.raises(ExchangeError) as caught:
            await ClientConnection(stream).exchange(
                "GET", "/", [*GET, ("X-Token", "secret\r\nX-Injected: 1")], max_body=LIMIT
            )
    assert caught.value.kind == "unsent" and "secret" not in str(caught.value)
    with trio.fail_after(20):
        while not seen:
            await trio.sleep(0.01)
    assert seen == [b""]


answers = st.lists(
    st.one_of(
        st.binary(max_size=200),
        st.sampled_from(
            [
                b"HTTP/1.1 200 OK\r\n",
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"content-length: 3\r\n",
                b"transfer-encoding: chunked\r\n",
                b"\r\n",
                b"3\r\nabc\r\n0\r\n\r\n",
                b"x-pad: " + b"a" * 600 + b"\r\n",
            ]
        ),
    ),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(answers)
def test_any_answer_gives_a_response_or_an_exchange_error(pieces: list[bytes]) -> None:
    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            try:
                response = await get(nursery, answering(*pieces))
            except ExchangeError as exc:
                assert exc.detail.isprintable()
            else:
                assert len(response.body) <= LIMIT
            nursery.cancel_scope.cancel()

    trio.run(scenario)
