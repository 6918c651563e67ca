"""open_upstream() directly, on trio's virtual clock: one deadline, no leaked socket."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from proxy.allowlist import Allowlist, parse_target
from proxy.upstream import Resolved, SockAddr, UpstreamError, open_upstream


async def test_connect_timeout_covers_resolution_and_connect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """README: connect_timeout is the time for name resolution *plus* the connect."""

    async def slow_resolver(host: str, port: int) -> list[Resolved]:
        await trio.sleep(0.7)
        return [(socket.AF_INET, ("192.0.2.1", port))]

    async def hang(family: int, sockaddr: SockAddr) -> trio.SocketStream:
        await trio.sleep_forever()
        raise AssertionError

    started = trio.current_time()
    with pytest.raises(UpstreamError) as caught:
        await open_upstream(
            parse_target("slow.test:443"),
            Allowlist.from_strings(["slow.test:443"]),
            resolver=slow_resolver,
            connector=hang,
            connect_timeout=1.0,
        )
    assert caught.value.status == 504
    # Virtual time: the answer comes at the one deadline, not 0.7 s + another full second.
    assert trio.current_time() - started == pytest.approx(1.0)


async def test_a_connection_won_as_the_caller_is_cancelled_is_closed() -> None:
    """The winner of the race must not leak when the caller's own scope is cancelled."""
    made: list[trio.SocketStream] = []

    with trio.CancelScope() as outer:

        async def connect_then_caller_cancelled(
            family: int, sockaddr: SockAddr
        ) -> trio.SocketStream:
            a, b = trio.socket.socketpair()
            b.close()
            made.append(trio.SocketStream(a))
            outer.cancel()  # e.g. the drain timeout cuts this request right now
            return made[-1]

        await open_upstream(
            parse_target("127.0.0.1:443"),
            Allowlist.from_strings(["127.0.0.1:443"]),
            resolver=None,  # type: ignore[arg-type]  # IP literal: no resolution
            connector=connect_then_caller_cancelled,
            connect_timeout=5.0,
        )
    assert outer.cancelled_caught
    assert len(made) == 1
    assert made[0].socket.fileno() == -1, "the won connection was left open"
