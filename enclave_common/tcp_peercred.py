"""Who is on the other end of a loopback TCP connection: one question to the kernel.

The TCP counterpart of ``enclave_common.peercred`` (SO_PEERCRED): it names the uid
owning the client's socket, asked of the kernel over NETLINK_SOCK_DIAG (the codec
and the attribution rules are ``enclave_common.inet_diag``). Unlike SO_PEERCRED the
kernel gives no gid, no groups and no pid here; callers look groups up themselves.

Each question opens its own netlink socket (so no answer can belong to another
question), waits for the answer without blocking the event loop, and is bounded in
time (``LOOKUP_TIMEOUT``) and in size (``_MAX_DATAGRAMS``). Whatever goes wrong,
the connection is ``NotAttributed``, never attributed by guess. Mechanics only: who
may call is the agent's policy.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from enclave_common.inet_diag import (
    NETLINK_SOCK_DIAG,
    Answer,
    DiagError,
    Endpoint,
    FourTuple,
    NotAttributed,
    owner_uid,
    request,
)

# The kernel answers from memory in microseconds; this only bounds a wedged lookup.
LOOKUP_TIMEOUT = 2.0
_RECEIVE_SIZE = 64 * 1024
_MAX_DATAGRAMS = 16  # the exact lookup answers in one; a dump of one socket in two
_SEQUENCE = itertools.count(1)

Query = Callable[[FourTuple], Awaitable[Answer]]


async def ask_kernel(connection: FourTuple) -> Answer:
    """Send the exact-lookup question for ``connection``; the kernel's whole answer.
    ``OSError`` when there is no NETLINK_SOCK_DIAG, ``DiagError`` for a bad answer."""
    seq = next(_SEQUENCE) & 0xFFFFFFFF
    answer = Answer(seq)
    with trio.socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    ) as sock:
        await sock.send(request(connection, seq))
        for _ in range(_MAX_DATAGRAMS):
            data, _ancillary, flags, sender = await sock.recvmsg(_RECEIVE_SIZE)
            if flags & socket.MSG_TRUNC:
                raise DiagError(f"a datagram larger than {_RECEIVE_SIZE} bytes")
            if not (isinstance(sender, tuple) and sender[0] == 0):  # port 0: the kernel
                raise DiagError(f"a datagram from netlink address {sender!r}, not the kernel")
            answer.feed(data)
            if answer.done:
                return answer
    raise DiagError(f"no end of the answer after {_MAX_DATAGRAMS} datagrams")


def connection_of(sock: trio.socket.SocketType) -> FourTuple:
    """The 4-tuple of the client's socket for our accepted end ``sock``."""
    return FourTuple(_endpoint(sock.getpeername()), _endpoint(sock.getsockname()))


def _endpoint(address: object) -> Endpoint:
    # (host, port) for AF_INET; (host, port, flowinfo, scope_id) for AF_INET6.
    if not isinstance(address, tuple) or len(address) < 2:
        raise OSError(f"not an IP socket address: {address!r}")
    return Endpoint.of(address[0], address[1])


async def tcp_peer_uid(sock: trio.socket.SocketType, *, query: Query = ask_kernel) -> int:
    """The uid owning the other end of the accepted TCP connection ``sock``, or
    ``NotAttributed`` with the reason."""
    try:
        connection = connection_of(sock)
    except OSError as exc:  # ENOTCONN: the client reset the connection already
        raise NotAttributed(f"the connection has no peer any more ({exc.strerror})") from None
    try:
        with trio.fail_after(LOOKUP_TIMEOUT):
            answer = await query(connection)
    except trio.TooSlowError:
        raise NotAttributed(f"the kernel did not answer within {LOOKUP_TIMEOUT:g} s") from None
    except DiagError as exc:
        raise NotAttributed(f"the kernel's answer is malformed: {exc}") from None
    except OSError as exc:
        raise NotAttributed(f"cannot ask the kernel: {exc.strerror or exc}") from None
    return owner_uid(connection, answer)


@asynccontextmanager
async def loopback_connection(
    host: str,
) -> AsyncIterator[tuple[trio.socket.SocketType, trio.socket.SocketType]]:
    """A TCP connection of our own on ``host`` (a loopback address): (the client's
    end, the accepted end), closed afterwards."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with trio.socket.socket(family) as listener, trio.socket.socket(family) as client:
        await listener.bind((host, 0))
        listener.listen(1)
        await client.connect(listener.getsockname()[:2])
        accepted, _ = await listener.accept()
        with accepted:
            yield client, accepted


async def self_check(host: str, *, query: Query = ask_kernel) -> None:
    """Whether this kernel can name TCP callers: a throwaway connection of our own on
    ``host`` must come back as our own uid. ``NotAttributed`` (with the reason) if not."""
    try:
        async with loopback_connection(host) as (_, accepted):
            uid = await tcp_peer_uid(accepted, query=query)
    except OSError as exc:
        raise NotAttributed(f"cannot open a test connection on {host}: {exc.strerror}") from None
    if uid != os.geteuid():
        raise NotAttributed(f"the kernel named uid {uid} for a connection of uid {os.geteuid()}")
