"""The HTTP/1.1 server driver against hostile clients, over real loopback sockets.

Each server in the project (the local KMS, the proxy front, the agent) runs
on this driver, so the hostile-input cases are played here once: heads too large in
one read or trickled, slow heads, bodies trickled past their deadline, idle clients,
bodies over the limit, garbage, pipelining, 100-continue, clients that never read or
leave mid-body, raw refusals, streamed bodies, answers held open, CONNECT hand-over
and shutdown.
"""

from __future__ import annotations

import functools
import re
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TypeVar

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from enclave_common.http_server import (
    Answer,
    HttpError,
    HttpServer,
    Limits,
    Report,
    Request,
    Switch,
    admit_by_shares,
)
from enclave_common.shares import Shares

LIMITS = Limits(max_head_bytes=1024, max_body_bytes=4096, header_timeout=1.0, idle_timeout=1.0)
MARKER = b"request-body-marker-5e1d"
T = TypeVar("T")
HOLD = 2.5  # longer than header_timeout and idle_timeout together


def error_answer(status: int, reason: str) -> Answer:
    return Answer(status, [("content-type", "text/plain")], reason.encode())


@dataclass
class App:
    """The handler, with what the tests look at."""

    pieces: list[int] = field(default_factory=list)  # sizes of streamed pieces, as consumed
    piece_seen: trio.Event = field(default_factory=trio.Event)
    early: list[bytes] = field(default_factory=list)
    calls: int = 0
    released: int = 0  # Switches closed
    watching: trio.Event = field(default_factory=trio.Event)  # a /watch answer is held
    answer_watched: trio.Event = field(default_factory=trio.Event)  # /watch may answer

    async def __call__(self, request: Request) -> Answer | Switch:
        self.calls += 1
        path = request.target.partition("?")[0]
        if request.method == "CONNECT":
            return Switch(Answer(200, reason="Connection established"), self.tunnel, self.release)
        if path == "/echo":
            return Answer(200, body=await request.body())
        if path == "/big":
            return Answer(200, body=b"x" * 65536)
        if path == "/hold":
            await trio.sleep(HOLD)
            return Answer(200, body=b"held")
        if path in ("/stream", "/stream-limited"):
            limit = None if path == "/stream" else 8192
            async for piece in request.stream(limit=limit, piece_timeout=1.0):
                self.pieces.append(len(piece))
                self.piece_seen.set()
            return Answer(200, body=str(sum(self.pieces)).encode())
        if path == "/watch":  # a long-poll: held until answer_watched, unless the client leaves
            if "unread" not in request.target:
                await request.body()
            async with request.cancelled_if_client_leaves():
                self.watching.set()
                if "teapot" in request.target:
                    raise HttpError(418, "no coffee while watching")
                await self.answer_watched.wait()
            return Answer(200, body=b"watched")
        if path == "/fail":
            raise ValueError("a handler bug")
        if path == "/teapot":
            raise HttpError(418, "no coffee", [("x-reason", "teapot")])
        return Answer(404)

    async def release(self) -> None:
        self.released += 1

    async def tunnel(self, stream: trio.abc.Stream, early: bytes) -> None:
        self.early.append(early)
        await stream.send_all(early)
        while data := await stream.receive_some(4096):
            await stream.send_all(data)


@dataclass
class Served:
    port: int
    server: HttpServer
    app: App
    reports: list[Report]
    admissions: list[str]

    async def connect(self, first: bytes) -> trio.SocketStream:
        """A connection to the server, with ``first`` sent on it."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        await stream.send_all(first)
        return stream


async def start(
    nursery: trio.Nursery, *, limits: Limits = LIMITS, refusal: Answer | None = None
) -> Served:
    server = HttpServer(limits, errors=error_answer)
    app = App()
    reports: list[Report] = []
    admissions: list[str] = []

    @asynccontextmanager
    async def admit() -> AsyncIterator[Answer | None]:
        admissions.append("in")
        try:
            yield refusal
        finally:
            admissions.append("out")

    async def connection(stream: trio.SocketStream) -> None:
        await server.serve(stream, app, admit=admit(), report=reports.append)

    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, connection, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    return Served(port, server, app, reports, admissions)


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    with trio.fail_after(20):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


@pytest.fixture
async def served(nursery: trio.Nursery) -> Served:
    """The driver with the default limits, serving ``App`` on loopback."""
    return await start(nursery)


async def exchange(port: int, *pieces: bytes, pause: float = 0) -> bytes:
    """Send ``pieces`` (``pause`` apart), then read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for piece in pieces:
            await stream.send_all(piece)
            await trio.sleep(pause)
        return await read_all(stream)


def statuses(answer: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


async def settled(items: list[T], count: int) -> list[T]:
    """``items`` once ``count`` have come (the server reports as a connection ends)."""
    with trio.fail_after(20):
        while len(items) < count:
            await trio.sleep(0.01)
    return items


def head_of(size: int, target: bytes = b"/echo") -> bytes:
    """A complete GET head of exactly ``size`` bytes."""
    start = b"GET " + target + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-pad: "
    head = start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == size
    return head


async def test_head_limit_is_exact_in_one_read_and_in_a_trickle(served: Served) -> None:
    limit = LIMITS.max_head_bytes
    assert statuses(await exchange(served.port, head_of(limit))) == [200]
    assert statuses(await exchange(served.port, head_of(limit + 1))) == [431]
    for size, status in [(limit + 1, 431), (limit, 200)]:
        trickle = [head_of(size)[i : i + 100] for i in range(0, size, 100)]
        assert statuses(await exchange(served.port, *trickle, pause=0.01)) == [status]
    # A head that never ends is refused once it passes the limit, not when it ends.
    endless = [b"GET /echo HTTP/1.1\r\nhost: x\r\n"] + [b"x-pad: " + b"a" * 93 + b"\r\n"] * 11
    assert statuses(await exchange(served.port, *endless, pause=0.01)) == [431]
    # A second head in the same read as the first one's end counts from where it starts.
    first = b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n"
    assert statuses(await exchange(served.port, first + head_of(limit + 1))) == [200, 431]
    reports = await settled(served.reports, 7)
    assert [r.reason for r in reports if r.status == 431] == ["request head too large"] * 4


async def test_slow_head_gets_408_and_idle_connections_close_silently(
    served: Served,
) -> None:
    answer = await exchange(served.port, b"GET /echo HTTP/1.1\r\nhost: x\r\n")
    assert statuses(answer) == [408]
    assert await exchange(served.port) == b""  # never sent a byte: closed, no answer
    # Kept alive after one answer, then idle: closed without an answer.
    answer = await exchange(served.port, b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n")
    assert statuses(answer) == [200]
    outcomes = [(r.number, r.outcome) for r in await settled(served.reports, 4)]
    assert sorted(outcomes) == [
        (0, "answered"),
        (0, "idle_closed"),
        (0, "rejected"),
        (1, "idle_closed"),
    ]


async def test_body_over_the_limit_is_refused_before_it_is_read(served: Served) -> None:
    head = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000000\r\n\r\n"
    answer = await exchange(served.port, head)  # the body is never sent
    assert statuses(answer) == [413]
    chunked = b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    answer = await exchange(served.port, chunked + b"1000\r\n" + b"a" * 4096 + b"\r\n1\r\nb\r\n")
    assert statuses(answer) == [413]
    reports = await settled(served.reports, 2)
    assert reports[0].received == 0 and reports[0].reason == "request body larger than 4096 bytes"


async def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    requests = b"".join(
        b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nbody" + str(i).encode()
        for i in range(3)
    )
    answer = await exchange(
        served.port, requests + b"GET /none HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    assert statuses(answer) == [200, 200, 200, 404]
    assert answer.index(b"body0") < answer.index(b"body1") < answer.index(b"body2")
    numbers = [r.number for r in await settled(served.reports, 4)]
    assert numbers == [0, 1, 2, 3]


async def test_100_continue_is_sent_when_the_body_is_read_never_before_connect(
    served: Served,
) -> None:
    head = (
        b"POST /echo HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
        b"content-length: 5\r\nconnection: close\r\n\r\n"
    )
    async with await served.connect(head) as stream:
        with trio.fail_after(20):
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 100 ")
        await stream.send_all(b"hello")
        assert statuses(await read_all(stream)) == [200]
    head = b"CONNECT x:1 HTTP/1.1\r\nhost: x:1\r\nexpect: 100-continue\r\n\r\n"
    async with await served.connect(head) as stream:
        with trio.fail_after(20):
            first = await stream.receive_some(65536)
        assert first.startswith(b"HTTP/1.1 200 Connection established\r\n")


async def test_a_client_that_never_reads_its_answers_is_cut_off(served: Served) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", served.port) as stream:
        # Far more answer bytes than the socket buffers hold; nothing is read back.
        await stream.send_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n" * 400)
        reports = await settled(served.reports, 1)
        while reports[-1].outcome == "answered":
            reports = await settled(served.reports, len(reports) + 1)
    assert reports[-1].outcome == "client_gone"
    assert reports[-1].reason == "answer not taken in time"


async def test_a_client_leaving_mid_body_ends_only_its_connection(served: Served) -> None:
    head = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n"
    client = await served.connect(head + b"12345")
    await client.aclose()  # 95 bytes of the body short
    (report,) = await settled(served.reports, 1)
    # A body cut short by the client's end is answered 400: the client may only have
    # half-closed and still read (the agent and the proxy answered so before the driver).
    assert (report.outcome, report.status, report.received) == ("rejected", 400, 5)
    assert statuses(await exchange(served.port, head_of(200))) == [200]


@pytest.mark.parametrize(
    ("first", "piece"),
    [
        (b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 200\r\n\r\nx", b"y"),
        (
            b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n1\r\nx\r\n",
            b"1\r\ny\r\n",
        ),
    ],
    ids=["content-length", "chunked"],
)
async def test_a_body_trickled_in_tiny_pieces_is_cut_off_at_the_requests_deadline(
    served: Served, first: bytes, piece: bytes
) -> None:
    """The whole body is due by the request's deadline (header_timeout from its start),
    however small and frequent its pieces, and a piece already in hand with the head
    (taken without waiting) does not move it: a byte every 50 ms for 10 s gets 408."""
    async with await served.connect(first) as stream:

        async def trickle() -> None:
            for _ in range(199):
                try:
                    await stream.send_all(piece)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            answer = await read_all(stream)
            nursery.cancel_scope.cancel()
    assert statuses(answer) == [408]
    (report,) = await settled(served.reports, 1)
    assert (report.outcome, report.reason) == ("rejected", "request body not received in time")
    assert 1 <= report.received < 200


async def test_raw_refusal_is_read_by_the_client_not_reset(nursery: trio.Nursery) -> None:
    refusal = Answer(403, [("content-type", "text/plain")], b"not you", note={"why": "uid"})
    served = await start(nursery, refusal=refusal)
    # The client sends a large request before it reads: the driver never parses it,
    # drains it after answering, and the client still gets the whole answer.
    big = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 400000\r\n\r\n" + b"a" * 400000
    answer = await exchange(served.port, big)
    assert statuses(answer) == [403] and answer.endswith(b"not you")
    (report,) = await settled(served.reports, 1)
    assert (report.outcome, report.status, report.note) == ("refused", 403, {"why": "uid"})
    assert await settled(served.admissions, 2) == ["in", "out"]
    assert served.app.calls == 0


async def test_streamed_body_is_consumed_piece_by_piece_without_a_total_limit(
    served: Served,
) -> None:
    first_piece = (
        b"POST /stream HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
        b"connection: close\r\n\r\n1000\r\n" + b"a" * 4096 + b"\r\n"
    )
    async with await served.connect(first_piece) as stream:
        with trio.fail_after(20):
            await served.app.piece_seen.wait()  # the handler has the first piece already
        for _ in range(3):  # in all, more than max_body_bytes
            await stream.send_all(b"1000\r\n" + b"b" * 4096 + b"\r\n")
        await stream.send_all(b"0\r\n\r\n")
        answer = await read_all(stream)
    assert statuses(answer) == [200] and answer.endswith(b"\r\n\r\n16384")
    assert len(served.app.pieces) >= 2
    chunked = b"POST /stream-limited HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    piece = b"1000\r\n" + b"c" * 4096 + b"\r\n"
    assert statuses(await exchange(served.port, chunked + piece * 3)) == [413]
    # A piece that does not come within the route's own deadline.
    assert statuses(await exchange(served.port, chunked + piece)) == [408]


async def test_an_answer_held_open_outlives_the_idle_and_header_deadlines(
    served: Served,
) -> None:
    answer = await exchange(
        served.port, b"GET /hold HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    assert statuses(answer) == [200] and answer.endswith(b"held")


WATCH = b"POST /watch HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"


async def held_watch(served: Served) -> trio.SocketStream:
    """A connection whose /watch request is being held."""
    stream = await served.connect(WATCH)
    with trio.fail_after(20):
        await served.app.watching.wait()
    return stream


async def test_a_held_answer_is_given_up_when_its_client_closes(served: Served) -> None:
    stream = await held_watch(served)
    await stream.aclose()  # the hold waits for an event nobody sets: only leaving ends it
    (report,) = await settled(served.reports, 1)
    assert (report.outcome, report.status, report.sent, report.received) == (
        "client_gone",
        None,
        0,
        3,
    )
    assert report.reason == "the client closed its connection while the answer was held"
    assert served.admissions == ["in", "out"]  # what admit holds is given back


async def test_a_held_answer_is_given_up_when_its_client_resets(served: Served) -> None:
    stream = await held_watch(served)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()  # linger 0: the close is a reset
    (report,) = await settled(served.reports, 1)
    assert (report.outcome, report.sent) == ("client_gone", 0)
    assert report.reason is not None and "reset" in report.reason.lower()


async def test_a_half_close_during_a_held_answer_counts_as_leaving(served: Served) -> None:
    stream = await held_watch(served)
    await stream.send_eof()
    assert await read_all(stream) == b""  # no answer: EOF is taken as the client leaving
    (report,) = await settled(served.reports, 1)
    assert report.outcome == "client_gone"
    await stream.aclose()


async def test_a_watched_answer_keeps_the_connection_alive_and_takes_pipelined_requests(
    served: Served,
) -> None:
    limit = LIMITS.max_head_bytes
    # Sent while the answer is held: read by the watch, answered after it, in order;
    # a next head of exactly the limit is fine, the head after it (one byte over) is not.
    keep_alive = b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n"
    stream = await held_watch(served)
    await stream.send_all(keep_alive + head_of(limit, b"/none"))
    served.app.answer_watched.set()
    answer = await read_all(stream)
    assert statuses(answer) == [200, 200, 404]
    assert answer.index(b"watched") < answer.index(b"HTTP/1.1 404")
    await stream.aclose()
    # Past the head limit, the next head is refused by the head rule as ever.
    served.app.watching = trio.Event()
    stream = await held_watch(served)
    await stream.send_all(head_of(limit + 1))
    answer = await read_all(stream)
    assert statuses(answer) == [200, 431]
    reports = await settled(served.reports, 5)
    assert [(r.number, r.outcome, r.status) for r in reports] == [
        (0, "answered", 200),
        (1, "answered", 200),
        (2, "answered", 404),
        (0, "answered", 200),
        (1, "rejected", 431),
    ]
    await stream.aclose()


async def test_garbage_or_half_a_head_sent_during_a_held_answer_waits_for_its_turn(
    served: Served,
) -> None:
    """What a hostile client pipelines while its answer is held is parsed only after the
    answer: garbage gets its 400 then, and half a head (whatever its bytes meet the
    answer's end) is completed and answered like any next request."""
    stream = await held_watch(served)
    await stream.send_all(b"\x00\x01 not http at all\r\n\r\n")
    served.app.answer_watched.set()
    assert statuses(await read_all(stream)) == [200, 400]
    await stream.aclose()
    served.app.watching, served.app.answer_watched = trio.Event(), trio.Event()
    stream = await held_watch(served)
    await stream.send_all(b"GET /echo HTTP/1.1\r\nho")
    served.app.answer_watched.set()
    answer = b""
    with trio.fail_after(20):
        while b"watched" not in answer:
            answer += await stream.receive_some(65536)
    await stream.send_all(b"st: x\r\nconnection: close\r\n\r\n")
    answer += await read_all(stream)
    assert statuses(answer) == [200, 200]
    await stream.aclose()
    reports = await settled(served.reports, 4)
    assert [(r.number, r.outcome, r.status) for r in reports] == [
        (0, "answered", 200),
        (1, "rejected", 400),
        (0, "answered", 200),
        (1, "answered", 200),
    ]
    assert served.admissions == ["in", "out", "in", "out"]


async def test_a_held_answer_is_cancelled_with_the_server_and_gives_its_share_back() -> None:
    """Shutting down (the agent cancels its nursery on SIGTERM) ends a held answer at
    once: nothing is written, the connection is closed and admit's share given back."""
    async with trio.open_nursery() as nursery:
        served = await start(nursery)
        stream = await held_watch(served)
        nursery.cancel_scope.cancel()
    assert [(r.outcome, r.status, r.sent) for r in served.reports] == [("cancelled", None, 0)]
    assert served.admissions == ["in", "out"]
    assert await read_all(stream) == b""
    await stream.aclose()


async def test_a_watched_block_raises_as_it_would_unwatched(served: Served) -> None:
    close = b"host: x\r\nconnection: close\r\n\r\n"
    answer = await exchange(served.port, b"GET /watch?teapot HTTP/1.1\r\n" + close)
    assert statuses(answer) == [418]
    # Watching before the body is read would read the body as a next request's bytes.
    unread = b"POST /watch?unread HTTP/1.1\r\ncontent-length: 3\r\n" + close + b"abc"
    assert statuses(await exchange(served.port, unread)) == [500]
    reports = await settled(served.reports, 2)
    assert [(r.outcome, r.reason) for r in reports] == [
        ("rejected", "no coffee while watching"),
        ("failed", "RuntimeError"),
    ]


async def test_connect_hands_over_the_stream_and_the_bytes_sent_after_the_head(
    served: Served,
) -> None:
    head = b"CONNECT kms:443 HTTP/1.1\r\nhost: kms:443\r\n\r\nEARLY"
    async with await served.connect(head) as stream:
        answer = b""
        with trio.fail_after(20):
            while not answer.endswith(b"EARLY"):
                answer += await stream.receive_some(65536)
        assert answer.startswith(b"HTTP/1.1 200 ") and b"content-length" not in answer.lower()
        await stream.send_all(b"later")
        with trio.fail_after(20):
            assert await stream.receive_some(65536) == b"later"
    assert served.app.early == [b"EARLY"]
    (report,) = await settled(served.reports, 1)
    assert (report.outcome, report.status) == ("switched", 200)
    assert served.app.released == 1


async def test_a_switch_that_cannot_happen_still_releases_what_it_holds(
    served: Served,
) -> None:
    head = b"CONNECT kms:443 HTTP/1.1\r\nhost: kms:443\r\ncontent-length: 5000\r\n\r\n"
    assert statuses(await exchange(served.port, head)) == [413]  # its body: over the limit
    (report,) = await settled(served.reports, 1)
    assert (report.outcome, served.app.early, served.app.released) == ("rejected", [], 1)


async def test_admit_by_shares_refuses_raw_and_bounds_the_lingering() -> None:
    connections: Shares[str] = Shares(1)
    lingering: Shares[str] = Shares(1)
    full = Answer(503, body=b"full")

    def admit(denied: Answer | None = None) -> AbstractAsyncContextManager[Answer | None]:
        return admit_by_shares("k", connections, lingering, lambda _: full, denied=denied)

    async with admit() as first:
        assert first is None and connections.held("k") == 1
        async with admit() as second, admit() as third:
            # Refused both; only the first of them may linger (one lingering share).
            assert (second, third) == (replace(full, linger=True), replace(full, linger=False))
        async with admit() as again:
            assert again == replace(full, linger=True)
    async with admit(denied=Answer(403)) as denied:
        assert denied == Answer(403) and connections.in_use == 0  # denied: no share taken
    assert connections.in_use == lingering.in_use == 0


async def test_close_idle_ends_idle_connections_now_and_busy_ones_after_their_answer(
    nursery: trio.Nursery,
) -> None:
    served = await start(nursery, limits=Limits(header_timeout=30, idle_timeout=30))
    idle = await trio.open_tcp_stream("127.0.0.1", served.port)
    busy = await trio.open_tcp_stream("127.0.0.1", served.port)
    await busy.send_all(b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n")
    with trio.fail_after(20):
        while served.app.calls == 0:  # the busy one's request is in the handler
            await trio.sleep(0.01)
    served.server.close_idle()
    assert await read_all(idle) == b""
    answer = await read_all(busy)
    assert statuses(answer) == [200] and b"connection: close" in answer
    outcomes = sorted(r.outcome for r in await settled(served.reports, 2))
    assert outcomes == ["answered", "closed_for_shutdown"]
    await idle.aclose()
    await busy.aclose()


async def test_handler_failures_and_errors_are_answered_and_reported(served: Served) -> None:
    close = b"host: x\r\nconnection: close\r\n\r\n"
    assert statuses(await exchange(served.port, b"GET /fail HTTP/1.1\r\n" + close)) == [500]
    answer = await exchange(served.port, b"GET /teapot HTTP/1.1\r\n" + close)
    assert statuses(answer) == [418] and b"x-reason: teapot" in answer
    assert statuses(await exchange(served.port, b"NOT HTTP\r\n\r\n")) == [400]
    reports = await settled(served.reports, 3)
    assert [(r.outcome, r.status, r.reason) for r in reports] == [
        ("failed", 500, "ValueError"),
        ("rejected", 418, "no coffee"),
        ("rejected", 400, "malformed request"),
    ]


async def test_errors_to_a_head_request_are_answered(served: Served) -> None:
    answer = await exchange(served.port, b"HEAD /teapot HTTP/1.1\r\nhost: x\r\n\r\n")
    assert statuses(answer) == [418] and answer.endswith(b"\r\n\r\n")  # no body
    # Over max_head_bytes in one read: h11 parsed it, the driver refuses it.
    big = b"HEAD /echo HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 1100 + b"\r\n\r\n"
    assert statuses(await exchange(served.port, big)) == [431]
    reports = await settled(served.reports, 2)
    assert sorted((r.outcome, r.status) for r in reports) == [("rejected", 418), ("rejected", 431)]


async def test_reports_carry_no_request_or_answer_bytes(nursery: trio.Nursery) -> None:
    served = await start(nursery)
    request = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
    answer = await exchange(served.port, request % len(MARKER) + MARKER)
    assert answer.endswith(MARKER)
    (report,) = await settled(served.reports, 1)
    assert (report.received, report.sent) == (len(MARKER), len(answer))
    assert MARKER.decode() not in repr(vars(report))


request_bytes = st.one_of(
    st.binary(max_size=2000),
    st.builds(
        lambda method, target, headers, body: (
            method + b" " + target + b" HTTP/1.1\r\n" + b"".join(headers) + b"\r\n" + body
        ),
        st.sampled_from([b"GET", b"POST", b"CONNECT", b"HEAD", b"G\x00T", b""]),
        st.sampled_from([b"/echo", b"/none", b"/stream", b"x:1", b"/%00", b"/" + b"a" * 1100]),
        st.lists(
            st.sampled_from(
                [
                    b"host: x\r\n",
                    b"content-length: 5\r\n",
                    b"content-length: -1\r\n",
                    b"content-length: 99999999\r\n",
                    b"transfer-encoding: chunked\r\n",
                    b"expect: 100-continue\r\n",
                    b"connection: close\r\n",
                    b"x: \xff\x00\r\n",
                    b" folded\r\n",
                ]
            ),
            max_size=5,
        ),
        st.binary(max_size=300) | st.just(b"5\r\nhello\r\n0\r\n\r\n"),
    ),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(request_bytes, min_size=1, max_size=3))
# An HTTP/1.0 request (answered, then closed) with a byte after it: the close must
# drain, or the unread byte makes the kernel reset the connection.
@example([b"! ! HTTP/0.0\n\n", b"\x00"])
def test_any_request_bytes_get_http_answers_or_a_close_never_a_failure(
    pieces: list[bytes],
) -> None:
    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            served = await start(nursery)
            async with await trio.open_tcp_stream("127.0.0.1", served.port) as stream:
                for piece in pieces:
                    await stream.send_all(piece)
                await stream.send_eof()
                answer = await read_all(stream)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 ")
            assert set(statuses(answer)) <= {100, 200, 400, 404, 408, 413, 431}
            await settled(served.reports, 1)
            assert all(r.outcome != "failed" for r in served.reports)
            # The server still serves a well-formed request afterwards.
            assert statuses(await exchange(served.port, head_of(100))) == [200]
            nursery.cancel_scope.cancel()

    trio.run(scenario)
