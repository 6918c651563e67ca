"""The tunnel's data path: move bytes both ways between two connected streams.

When both ends are sockets, each direction moves bytes with splice(2) through a pipe
of its own (socket → pipe → socket), so payload never crosses into Python; trio only
waits for readiness on the file descriptors. Where splice is refused (EINVAL: a
socket family without splice support) that direction falls back to recv/send, and
streams that are not plain sockets (TLS-wrapped, in-memory) use receive_some/send_all.

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

import trio

_SPLICE_FLAGS = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
_CHUNK = 1 << 20
# A bigger pipe than the default 64 KiB lets one splice move more per wake-up. Pipe
# pages are allocated when bytes arrive, so an idle tunnel does not pay for them.
_PIPE_SIZE = 1 << 20
_CYCLES_PER_YIELD = 16
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# Errors that mean "the other end went away", ending the tunnel as a reset.
_GONE = (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass
class RelayResult:
    """What happened in one tunnel: bytes each way and how it ended."""

    bytes_a_to_b: int = 0
    bytes_b_to_a: int = 0
    outcome: str = "closed"  # closed | idle_timeout | reset | cancelled
    spliced: bool = False


class _Tunnel:
    def __init__(self, idle_timeout: float, result: RelayResult) -> None:
        self.idle_timeout = idle_timeout
        self.last_activity = trio.current_time()
        self.result = result

    def touch(self) -> None:
        self.last_activity = trio.current_time()


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
    while True:
        data = await src.recv(_CHUNK)
        if not data:
            break
        await _send_all_socket(dst, data)
        _count(tunnel, forward, len(data))
    _shutdown_write(dst)


async def _copy_streams(
    src: trio.abc.Stream, dst: trio.abc.Stream, tunnel: _Tunnel, forward: bool
) -> None:
    while True:
        data = await src.receive_some(_CHUNK)
        if not data:
            break
        await dst.send_all(data)
        _count(tunnel, forward, len(data))
    if isinstance(dst, trio.abc.HalfCloseableStream):
        await dst.send_eof()


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


async def _splice_sockets(
    src: trio.socket.SocketType, dst: trio.socket.SocketType, tunnel: _Tunnel, forward: bool
) -> None:
    src_fd, dst_fd = src.fileno(), dst.fileno()
    _keep_urgent_inline(src)
    # The pipe is created on the first readable event, so idle tunnels hold no pipes.
    await trio.lowlevel.wait_readable(src_fd)
    r, w = _open_pipe()
    try:
        pending = 0
        cycles = 0
        woken = True  # src was just reported readable
        while True:
            if pending == 0:
                try:
                    n = os.splice(src_fd, w, _CHUNK, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    n = -1
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    await _copy_sockets(src, dst, tunnel, forward)
                    return
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
                    await trio.lowlevel.wait_readable(src_fd)
                    woken = True
                    continue
                woken = False
                pending = n
                tunnel.result.spliced = True
            try:
                m = os.splice(r, dst_fd, pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(dst_fd)
                continue
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # This destination refuses splice: hand over what the pipe holds, copy on.
                await _send_all_socket(dst, os.read(r, pending))
                _count(tunnel, forward, pending)
                await _copy_sockets(src, dst, tunnel, forward)
                return
            pending -= m
            _count(tunnel, forward, m)
            if pending == 0:
                cycles += 1
                if cycles % _CYCLES_PER_YIELD == 0:
                    # Let other tunnels run now and then even when this one never blocks.
                    await trio.lowlevel.checkpoint()
    finally:
        os.close(r)
        os.close(w)
    _shutdown_write(dst)


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
    tunnel = _Tunnel(idle_timeout, result if result is not None else RelayResult())
    finished = 0

    async with trio.open_nursery() as nursery:

        async def direction(src: trio.abc.Stream, dst: trio.abc.Stream, forward: bool) -> None:
            nonlocal finished
            src_sock, dst_sock = _socket_of(src), _socket_of(dst)
            try:
                if src_sock is not None and dst_sock is not None:
                    await _splice_sockets(src_sock, dst_sock, tunnel, forward)
                else:
                    await _copy_streams(src, dst, tunnel, forward)
            except (*_GONE, OSError):
                tunnel.result.outcome = "reset"
                nursery.cancel_scope.cancel()
                return
            finished += 1
            if finished == 2:
                nursery.cancel_scope.cancel()

        async def idle_watch() -> None:
            while True:
                deadline = tunnel.last_activity + tunnel.idle_timeout
                if trio.current_time() >= deadline:
                    tunnel.result.outcome = "idle_timeout"
                    nursery.cancel_scope.cancel()
                    return
                await trio.sleep_until(deadline)

        nursery.start_soon(direction, a, b, True)
        nursery.start_soon(direction, b, a, False)
        nursery.start_soon(idle_watch)
    return tunnel.result
