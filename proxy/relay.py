"""The tunnel's data path: move bytes both ways between two connected streams.

When both ends are sockets, each direction moves bytes with splice(2) through a pipe
(socket → pipe → socket), so payload never crosses into Python; trio only waits for
readiness on the file descriptors. Where splice is refused (EINVAL: a socket family
without splice support) that direction falls back to recv/send, and streams that are
not plain sockets (TLS-wrapped, in-memory) use receive_some/send_all.

What a tunnel costs while it waits, and per tunnel: one task per direction (this
one and one more) and one cancel scope (the nursery's), whose deadline is the idle
timeout, pushed forward as bytes move (no watcher task). A pipe or a copy buffer is
held only while bytes are moving: it is taken from a process-wide pool when the
source turns readable and given back, empty, before the direction waits again, so
an idle tunnel holds no pipe and no buffer, and short tunnels reuse pipes instead of
creating them.

Half-close is kept: EOF from one side becomes a write shutdown on the other, and the
opposite direction keeps flowing until it ends too. A tunnel with no bytes moving in
either direction for ``idle_timeout`` seconds is closed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from dataclasses import dataclass
from typing import Any

import trio

_SPLICE_FLAGS = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
_CHUNK = 1 << 20
# A bigger pipe than the default 64 KiB lets one splice move more per wake-up. Pipe
# pages are allocated when bytes arrive, so an idle tunnel does not pay for them.
_PIPE_SIZE = 1 << 20
_CYCLES_PER_YIELD = 16
# Idle pipes and copy buffers kept for the next tunnel; more are closed / dropped.
_POOL_PIPES = 64
_POOL_BUFFERS = 8
_BUFFER = 256 * 1024
# The idle deadline moves only when it would move by this much (of idle_timeout):
# a tunnel closes between idle_timeout and idle_timeout * (1 + _SLACK) of silence.
_SLACK = 1 / 64
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# Errors that mean "the other end went away", ending the tunnel as a reset.
_GONE = (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(slots=True)
class RelayResult:
    """What happened in one tunnel: bytes each way and how it ended."""

    bytes_a_to_b: int = 0
    bytes_b_to_a: int = 0
    outcome: str = "closed"  # closed | idle_timeout | reset | cancelled
    spliced: bool = False


class _Tunnel:
    __slots__ = ("ended", "finished", "idle_timeout", "result", "scope", "slack")

    def __init__(self, idle_timeout: float, result: RelayResult, scope: trio.CancelScope) -> None:
        self.idle_timeout = idle_timeout
        self.slack = idle_timeout * _SLACK
        self.result = result
        self.scope = scope
        self.finished = 0  # directions that reached their end
        self.ended = False  # ended by us (both done, or a reset), not by the deadline
        scope.deadline = trio.current_time() + idle_timeout + self.slack

    def touch(self) -> None:
        deadline = trio.current_time() + self.idle_timeout + self.slack
        if deadline - self.scope.deadline >= self.slack:
            self.scope.deadline = deadline

    def done(self) -> None:
        """One direction reached its end; both: the tunnel is over."""
        self.finished += 1
        if self.finished == 2:
            self.ended = True
            self.scope.cancel()

    def reset(self) -> None:
        """A side went away: the tunnel is over."""
        self.result.outcome = "reset"
        self.ended = True
        self.scope.cancel()


class _Pool:
    """Idle pipes and copy buffers of the whole process (trio runs one thread)."""

    def __init__(self) -> None:
        self.pipes: list[tuple[int, int]] = []
        self.buffers: list[bytearray] = []

    def pipe(self) -> tuple[int, int]:
        return self.pipes.pop() if self.pipes else _open_pipe()

    def give_pipe(self, pipe: tuple[int, int]) -> None:
        """Return an empty pipe; beyond the pool's size it is closed."""
        if len(self.pipes) < _POOL_PIPES:
            self.pipes.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def buffer(self) -> bytearray:
        return self.buffers.pop() if self.buffers else bytearray(_BUFFER)

    def give_buffer(self, buffer: bytearray) -> None:
        if len(self.buffers) < _POOL_BUFFERS:
            self.buffers.append(buffer)


_pool = _Pool()


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def _shutdown_write(sock: trio.socket.SocketType) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        # ENOTCONN: the peer is already gone; there is nobody left to tell.
        if e.errno != errno.ENOTCONN:
            raise


async def _send_all_socket(sock: trio.socket.SocketType, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


async def _copy_sockets(
    src: trio.socket.SocketType, dst: trio.socket.SocketType, tunnel: _Tunnel, forward: bool
) -> None:
    """recv/send until EOF (splice refused); the caller shuts ``dst``'s writing down."""
    while True:
        await trio.lowlevel.wait_readable(src)
        buffer = _pool.buffer()  # held only while bytes move
        try:
            n = os.readv(src.fileno(), [buffer])  # readable now: no wait, no checkpoint
            if n:
                await _send_all_socket(dst, memoryview(buffer)[:n])
        except BlockingIOError:
            continue
        finally:
            _pool.give_buffer(buffer)
        if not n:
            break
        _count(tunnel, forward, n)


async def _copy_streams(
    tunnel: _Tunnel, src: trio.abc.Stream, dst: trio.abc.Stream, forward: bool
) -> None:
    """One direction between streams that are not plain sockets (a task's entry:
    it ends the tunnel's direction itself, so no wrapper frame waits above it)."""
    try:
        while True:
            data = await src.receive_some(_CHUNK)
            if not data:
                break
            await dst.send_all(data)
            _count(tunnel, forward, len(data))
        if isinstance(dst, trio.abc.HalfCloseableStream):
            await dst.send_eof()
    except (*_GONE, OSError):
        tunnel.reset()
        return
    tunnel.done()


def _count(tunnel: _Tunnel, forward: bool, n: int) -> None:
    if forward:
        tunnel.result.bytes_a_to_b += n
    else:
        tunnel.result.bytes_b_to_a += n
    tunnel.touch()


def _open_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, _PIPE_SIZE)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size for this user: the default size works too
    return r, w


def _keep_urgent_inline(sock: trio.socket.SocketType) -> None:
    # TCP urgent (MSG_OOB) bytes would otherwise be cut out of the byte stream by
    # read(2); a byte relay passes them on in place like any other byte.
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    except OSError:
        pass  # a family without urgent data has nothing to keep inline


def _read_now(fd: int) -> bytes | None:
    """One non-blocking read(2): the bytes, b"" at EOF, None when nothing is there."""
    try:
        return os.read(fd, _CHUNK)
    except BlockingIOError:
        return None


async def _splice_streams(
    tunnel: _Tunnel, src_stream: trio.SocketStream, dst_stream: trio.SocketStream, forward: bool
) -> None:
    """One direction between two sockets; a task's entry that ends its direction
    itself (like ``_copy_streams``), so no wrapper frame waits above it."""
    src, dst = src_stream.socket, dst_stream.socket
    try:
        src_fd, dst_fd = src.fileno(), dst.fileno()
        _keep_urgent_inline(src)
        pipe: tuple[int, int] | None = None  # held only while bytes are in flight
        try:
            pending = 0
            cycles = 0
            woken = False
            while True:
                if pending == 0:
                    if pipe is None:
                        await trio.lowlevel.wait_readable(src_fd)
                        woken = True
                        pipe = _pool.pipe()
                    try:
                        n = os.splice(src_fd, pipe[1], _CHUNK, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        n = -1
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        _pool.give_pipe(pipe)
                        pipe = None
                        await _copy_sockets(src, dst, tunnel, forward)
                        break
                    if n == 0 or (n < 0 and woken):
                        # splice(2) stops at a TCP urgent mark: there it answers EAGAIN
                        # although the socket polls readable (waiting again would spin
                        # forever), or 0 once the peer has shut down (not yet the end).
                        # read(2) steps past the mark and tells a real EOF apart.
                        data = _read_now(src_fd)
                        if data == b"":
                            break
                        if data:
                            await _send_all_socket(dst, data)
                            _count(tunnel, forward, len(data))
                            woken = False
                            continue
                    if n <= 0:
                        # Nothing to move: the pipe is empty, so it goes back to the pool
                        # and the next readable event takes one again.
                        _pool.give_pipe(pipe)
                        pipe = None
                        continue
                    woken = False
                    pending = n
                    tunnel.result.spliced = True
                assert pipe is not None
                try:
                    m = os.splice(pipe[0], dst_fd, pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst_fd)
                    continue
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    # This destination refuses splice: hand over what the pipe holds, copy on.
                    await _send_all_socket(dst, os.read(pipe[0], pending))
                    _count(tunnel, forward, pending)
                    _pool.give_pipe(pipe)
                    pipe = None
                    await _copy_sockets(src, dst, tunnel, forward)
                    break
                pending -= m
                _count(tunnel, forward, m)
                if pending == 0:
                    cycles += 1
                    if cycles % _CYCLES_PER_YIELD == 0:
                        # Let other tunnels run now and then even when this one never blocks.
                        await trio.lowlevel.checkpoint()
        except BaseException:
            if pipe is not None:  # bytes may be left in it: it cannot be reused
                os.close(pipe[0])
                os.close(pipe[1])
                pipe = None
            raise
        finally:
            if pipe is not None:
                _pool.give_pipe(pipe)  # empty: the loop only ends with nothing pending
        _shutdown_write(dst)
    except (*_GONE, OSError):
        tunnel.reset()
        return
    tunnel.done()


async def relay(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    idle_timeout: float,
    result: RelayResult | None = None,
) -> RelayResult:
    """Relay until both directions reached EOF, a side resets, or the tunnel idles out.

    Byte counts (a→b, b→a) and the outcome go to ``result`` as they happen, so a
    caller that cancels the relay (shutdown drain) still knows what moved. Never
    raises for the peers' behaviour; the caller closes both streams.
    """
    result = result if result is not None else RelayResult()
    try:
        async with trio.open_nursery() as nursery:
            tunnel = _Tunnel(idle_timeout, result, nursery.cancel_scope)
            nursery.start_soon(_mover(b, a), tunnel, b, a, False)
            await _mover(a, b)(tunnel, a, b, True)
    except BaseExceptionGroup as group:
        # Cancelled from outside (a shutdown's drain): both directions were, and the
        # caller gets one Cancelled, as from any other await.
        cancelled, rest = group.split(trio.Cancelled)
        if rest is None and cancelled is not None:
            raise _first(cancelled) from None
        raise
    if nursery.cancel_scope.cancelled_caught and not tunnel.ended:
        result.outcome = "idle_timeout"
    return result


def _mover(src: trio.abc.Stream, dst: trio.abc.Stream) -> Any:
    """The function that moves one direction: splice between sockets, else copy."""
    if isinstance(src, trio.SocketStream) and isinstance(dst, trio.SocketStream):
        return _splice_streams
    return _copy_streams


def _first(group: BaseExceptionGroup[trio.Cancelled]) -> trio.Cancelled:
    first = group.exceptions[0]
    return first if isinstance(first, trio.Cancelled) else _first(first)
