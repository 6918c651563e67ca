"""relay(): splice between sockets, its recv/send fallback, and non-socket streams."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from typing import Any

import pytest
import trio
import trio.testing

from proxy import relay as relay_module
from proxy.relay import RelayResult, relay


async def _socket_pairs() -> tuple[
    trio.SocketStream, trio.SocketStream, trio.SocketStream, trio.SocketStream
]:
    """client <-> (a  relay  b) <-> upstream, all real connected sockets."""
    c, a = trio.socket.socketpair()
    b, u = trio.socket.socketpair()
    return (trio.SocketStream(c), trio.SocketStream(a), trio.SocketStream(b), trio.SocketStream(u))


async def _exercise(client: Any, a: Any, b: Any, upstream: Any) -> RelayResult:
    """Client sends 2 MB and half-closes; upstream answers after EOF; returns the result."""
    payload = os.urandom(2_000_000)
    result = RelayResult()

    async def client_side() -> None:
        await client.send_all(payload)
        await client.send_eof()
        got = b""
        while chunk := await client.receive_some(65536):
            got += chunk
        assert got == b"done:" + payload[:1000]

    async def upstream_side() -> None:
        got = b""
        while chunk := await upstream.receive_some(65536):
            got += chunk
        assert got == payload
        await upstream.send_all(b"done:" + payload[:1000])
        await upstream.send_eof()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            nursery.start_soon(upstream_side)
            await relay(a, b, idle_timeout=30, result=result)
    assert result.bytes_a_to_b == len(payload)
    assert result.bytes_b_to_a == 1005
    assert result.outcome == "closed"
    return result


async def test_splice_between_sockets() -> None:
    result = await _exercise(*await _socket_pairs())
    assert result.spliced


async def test_fallback_when_splice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(relay_module.os, "splice", refuse)
    result = await _exercise(*await _socket_pairs())
    assert not result.spliced


async def test_fallback_when_only_the_destination_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes already in the pipe are handed over before switching to recv/send."""
    real_splice = os.splice

    def refuse_from_pipe(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        if stat.S_ISFIFO(os.fstat(src).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_splice(src, dst, count, *args, **kwargs)

    monkeypatch.setattr(relay_module.os, "splice", refuse_from_pipe)
    await _exercise(*await _socket_pairs())


async def test_non_socket_streams_use_receive_and_send() -> None:
    client, a = trio.testing.memory_stream_pair()
    b, upstream = trio.testing.memory_stream_pair()
    result = await _exercise(client, a, b, upstream)
    assert not result.spliced


async def test_reset_ends_the_tunnel() -> None:
    client, a, b, upstream = await _socket_pairs()
    result = RelayResult()

    async def reset_upstream() -> None:
        await client.send_all(b"x")
        assert await upstream.receive_some(10) == b"x"
        await client.send_all(b"more")
        # Close with unread data pending: the kernel answers with a reset, not a FIN.
        upstream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        upstream.socket.close()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reset_upstream)
            await relay(a, b, idle_timeout=30, result=result)
    assert result.outcome == "reset"
    await client.aclose()


async def _tcp_pairs() -> tuple[
    trio.SocketStream, trio.SocketStream, trio.SocketStream, trio.SocketStream
]:
    """Like _socket_pairs, but TCP over loopback (urgent data exists only in TCP)."""

    async def pair() -> tuple[trio.SocketStream, trio.SocketStream]:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = trio.socket.socket()
        await near.connect(listener.getsockname())
        far, _ = await listener.accept()
        listener.close()
        return trio.SocketStream(near), trio.SocketStream(far)

    c, a = await pair()
    b, u = await pair()
    return c, a, b, u


@pytest.mark.parametrize("eof_after", [False, True])
async def test_tcp_urgent_data_is_relayed_inline(eof_after: bool) -> None:
    """splice(2) stops at a TCP urgent mark: it answers EAGAIN while the socket stays
    readable (a busy loop that never moves another byte) or 0 once the peer has shut
    down (a false EOF that drops the rest). Every byte, the urgent ones included, must
    still arrive in order."""
    client, a, b, upstream = await _tcp_pairs()
    result = RelayResult()
    expected = b"abc!defXghi"

    async def client_side() -> None:
        await client.send_all(b"abc")
        await client.socket.send(b"!", socket.MSG_OOB)
        await client.send_all(b"def")
        await client.socket.send(b"X", socket.MSG_OOB)
        await client.send_all(b"ghi")
        got = b""
        while len(got) < len(expected):
            got += await upstream.receive_some(65536)
        assert got == expected
        if eof_after:
            await client.send_eof()
            assert await upstream.receive_some(10) == b""
            await upstream.send_eof()
            assert await client.receive_some(10) == b""
        else:
            await client.aclose()
            await upstream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            await relay(a, b, idle_timeout=30, result=result)
    assert result.bytes_a_to_b == len(expected)


class _Spawns(trio.abc.Instrument):
    def __init__(self) -> None:
        self.count = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.count += 1


def _pipe_fds() -> int:
    return sum(
        stat.S_ISFIFO(os.stat(f"/proc/self/fd/{fd}").st_mode)
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    )


async def test_a_tunnel_costs_one_task_per_direction_and_holds_no_pipe_while_idle() -> None:
    """One more task than the caller's, and pipes only while bytes move: an idle
    tunnel's pipes are back in the pool (and the next tunnel reuses them)."""
    client, a, b, upstream = await _socket_pairs()
    spawns = _Spawns()
    result = RelayResult()
    others = _pipe_fds() - 2 * len(relay_module._pool.pipes)  # pipes not the relay's

    async def traffic_then_idle() -> None:
        for _ in range(3):
            await client.send_all(b"ping")
            assert await upstream.receive_some(10) == b"ping"
            await upstream.send_all(b"pong")
            assert await client.receive_some(10) == b"pong"
        await trio.testing.wait_all_tasks_blocked()
        # Idle now: every pipe the relay made is back in the pool.
        assert _pipe_fds() - others == 2 * len(relay_module._pool.pipes)
        assert len(relay_module._pool.pipes) >= 1
        await client.send_eof()
        await upstream.send_eof()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic_then_idle)
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.add_instrument(spawns)
            try:
                await relay(a, b, idle_timeout=30, result=result)
            finally:
                trio.lowlevel.remove_instrument(spawns)
    assert spawns.count == 1
    assert (result.bytes_a_to_b, result.bytes_b_to_a, result.outcome) == (12, 12, "closed")
    pooled = len(relay_module._pool.pipes)
    await _exercise(*await _socket_pairs())  # the next tunnel takes pipes from the pool
    assert len(relay_module._pool.pipes) == pooled


async def test_cancelled_from_outside_raises_one_cancelled() -> None:
    """A shutdown's drain cancels the tunnel: the caller's ``except trio.Cancelled``
    (which logs the tunnel's end) must see a Cancelled, not a group of two."""
    _client, a, b, _upstream = await _socket_pairs()
    result = RelayResult()
    seen: list[BaseException] = []
    with trio.move_on_after(0.2) as outer:
        try:
            await relay(a, b, idle_timeout=30, result=result)
        except BaseException as exc:
            seen.append(exc)
            raise
    assert outer.cancelled_caught
    assert len(seen) == 1 and isinstance(seen[0], trio.Cancelled)
    assert result.outcome == "closed"  # not an idle timeout: the caller decides
