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
    """docs/proxy.md: connect_timeout is the time for name resolution *plus* the connect."""

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


async def test_a_name_rebound_to_an_address_of_this_host_is_refused() -> None:
    """Rebinding a listed name to the parent's own VPC address (not loopback, not
    link-local) would reach every service the parent runs. A connection whose local and
    remote addresses are the same one is a connection to this host: refused unless
    that address is listed. (The connector lands on 127.0.0.1 whatever it is given,
    standing in for the parent's own 10.x address; no traffic leaves loopback.)"""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    async def lands_on_this_host(family: int, sockaddr: SockAddr) -> trio.SocketStream:
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        made.append(trio.SocketStream(sock))
        return made[-1]

    async def rebound(host: str, p: int) -> list[Resolved]:
        await trio.lowlevel.checkpoint()
        return [(socket.AF_INET, ("203.0.113.5", p))]

    made: list[trio.SocketStream] = []
    try:
        with pytest.raises(UpstreamError) as caught:
            await open_upstream(
                parse_target(f"listed.test:{port}"),
                Allowlist.from_strings([f"listed.test:{port}"]),
                resolver=rebound,
                connector=lands_on_this_host,
                connect_timeout=5.0,
            )
        assert caught.value.status == 403
        assert made[0].socket.fileno() == -1, "the refused connection was left open"
        # Listed verbatim (the development setup: --allow 127.0.0.1:PORT), it is used.
        stream, _ = await open_upstream(
            parse_target(f"127.0.0.1:{port}"),
            Allowlist.from_strings([f"127.0.0.1:{port}"]),
            resolver=rebound,
            connector=lands_on_this_host,
            connect_timeout=5.0,
        )
        await stream.aclose()
    finally:
        listener.close()
