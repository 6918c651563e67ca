"""Reaching the upstream of a tunnel: resolve now, vet every address, then connect.

trio.open_tcp_stream would resolve and connect in one go, but every resolved address
must pass the allowlist's address rule *before* any connection is made (a listed name
may resolve to 127.0.0.1 or 169.254.169.254). So the name is resolved here, the
addresses filtered, and the survivors raced happy-eyeballs style (RFC 8305): families
interleaved, a new attempt every 250 ms or as soon as the previous one fails, the first
connection to succeed wins and the others are cancelled.

Resolution and connection are injectable (``Resolver``, ``Connector``) so tests can map
names to chosen addresses without touching /etc/hosts.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from enclave_common.address import connect_socket
from enclave_common.http_server import HttpError

from .allowlist import Allowlist, IPAddress, Target

SockAddr = tuple[Any, ...]
Resolved = tuple[int, SockAddr]  # (address family, sockaddr)
Resolver = Callable[[str, int], Awaitable[list[Resolved]]]
Connector = Callable[[int, SockAddr], Awaitable[trio.SocketStream]]

HAPPY_EYEBALLS_DELAY = 0.25


class UpstreamError(HttpError):
    """The tunnel cannot be opened; ``status`` is the HTTP answer for the client."""


async def system_resolver(host: str, port: int) -> list[Resolved]:
    """getaddrinfo at request time: no cache of our own, a failure fails one request."""
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [(int(family), tuple(sockaddr)) for family, _, _, _, sockaddr in infos]


# The Connector tunnels use: a TCP socket of the resolved address's family.
connect_tcp: Connector = connect_socket


def _ip_of(sockaddr: SockAddr) -> IPAddress:
    # IPv6 link-local results may carry a zone ("fe80::1%eth0"); the address is what matters.
    return ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])


def _interleave(addresses: Sequence[Resolved]) -> list[Resolved]:
    """RFC 8305 §4: alternate families, starting with the resolver's first choice."""
    unique = list(dict.fromkeys(addresses))
    if not unique:
        return []
    first = unique[0][0]
    preferred = [a for a in unique if a[0] == first]
    other = [a for a in unique if a[0] != first]
    out: list[Resolved] = []
    for i in range(max(len(preferred), len(other))):
        out.extend(group[i] for group in (preferred, other) if i < len(group))
    return out


def format_sockaddr(sockaddr: SockAddr) -> str:
    host = str(sockaddr[0])
    return f"[{host}]:{sockaddr[1]}" if ":" in host else f"{host}:{sockaddr[1]}"


async def _connect(
    addresses: Sequence[Resolved], connector: Connector
) -> tuple[trio.SocketStream, SockAddr]:
    """One address (an IP literal, a name with one address): connect, no race, so
    no nursery, task or timer of its own; several: race them."""
    if len(addresses) != 1:
        return await _race(addresses, connector)
    family, sockaddr = addresses[0]
    try:
        stream = await connector(family, sockaddr)
    except OSError as e:
        raise _connect_failed([e]) from None
    try:
        # Cancelled from outside just as the connection was made: nobody will use it.
        await trio.lowlevel.checkpoint_if_cancelled()
    except BaseException:
        stream.socket.close()
        raise
    return stream, sockaddr


def _connect_failed(errors: Sequence[OSError]) -> UpstreamError:
    if any(e.errno == errno.ECONNREFUSED for e in errors):
        return UpstreamError(502, "upstream refused the connection")
    detail = os.strerror(errors[0].errno) if errors and errors[0].errno else "connection failed"
    return UpstreamError(502, f"upstream unreachable: {detail}")


async def _race(
    addresses: Sequence[Resolved], connector: Connector
) -> tuple[trio.SocketStream, SockAddr]:
    winner: tuple[trio.SocketStream, SockAddr] | None = None
    errors: list[OSError] = []

    try:
        async with trio.open_nursery() as nursery:

            async def attempt(family: int, sockaddr: SockAddr, failed: trio.Event) -> None:
                nonlocal winner
                try:
                    stream = await connector(family, sockaddr)
                except OSError as e:
                    errors.append(e)
                    failed.set()
                    return
                if winner is None:
                    winner = (stream, sockaddr)
                    nursery.cancel_scope.cancel()
                else:
                    await trio.aclose_forcefully(stream)

            for family, sockaddr in addresses:
                failed = trio.Event()
                nursery.start_soon(attempt, family, sockaddr, failed)
                with trio.move_on_after(HAPPY_EYEBALLS_DELAY):
                    await failed.wait()
    except BaseException:
        # Cancelled from outside (deadline, drain) just as an attempt won: nobody will
        # ever use that connection, so it must not outlive this call.
        if winner is not None:
            winner[0].socket.close()
        raise

    if winner is not None:
        return winner
    raise _connect_failed(errors)


async def open_upstream(
    target: Target,
    allowlist: Allowlist,
    *,
    resolver: Resolver,
    connector: Connector,
    connect_timeout: float,
) -> tuple[trio.SocketStream, str]:
    """Connect to an allowlisted target; returns the stream and the address used.

    Raises UpstreamError: 502 unresolvable or refused, 403 when every resolved
    address is a guarded one, 504 when resolution and connect together took longer
    than ``connect_timeout``.
    """
    # One deadline for resolution and connect together, as connect_timeout promises.
    deadline = trio.current_time() + connect_timeout
    if target.ip is not None:
        family = socket.AF_INET6 if target.ip.version == 6 else socket.AF_INET
        sockaddr: SockAddr = (target.host, target.port)
        if family == socket.AF_INET6:
            sockaddr = (target.host, target.port, 0, 0)
        candidates: list[Resolved] = [(family, sockaddr)]
    else:
        try:
            with trio.fail_at(deadline):
                resolved = await resolver(target.host, target.port)
        except trio.TooSlowError:
            raise UpstreamError(504, "name resolution timed out") from None
        except (OSError, UnicodeError):
            raise UpstreamError(502, "upstream name could not be resolved") from None
        candidates = [
            (family, sockaddr)
            for family, sockaddr in resolved
            if family in (socket.AF_INET, socket.AF_INET6)
            and allowlist.permits_address(_ip_of(sockaddr), target.port)
        ]
        if not candidates:
            if resolved:
                raise UpstreamError(403, "target resolves only to addresses that are refused")
            raise UpstreamError(502, "upstream name could not be resolved")
    with trio.move_on_at(deadline):
        stream, used = await _connect(_interleave(candidates), connector)
        this_host = _address_of_this_host(stream)
        if this_host is not None and not allowlist.lists_address(*this_host):
            await trio.aclose_forcefully(stream)
            raise UpstreamError(403, "target resolves to an address of this host")
        return stream, format_sockaddr(used)
    raise UpstreamError(504, "upstream connect timed out")


def _address_of_this_host(stream: trio.SocketStream) -> tuple[IPAddress, int] | None:
    """The peer's address and port when the connection leads back to this host, else None.

    The guarded ranges cannot name the parent's own VPC addresses (they differ per
    instance), yet a listed name rebound to one would reach every service the parent
    runs. The kernel answers that for us: a connection to one of this host's own
    addresses is made *from* that same address. Checked on the live socket, so what is
    refused is exactly where the connection went.
    """
    try:
        local = _ip_of(tuple(stream.socket.getsockname()))
        peer_address = tuple(stream.socket.getpeername())
        peer = _ip_of(peer_address)
    except (OSError, ValueError):
        return None
    return (peer, int(peer_address[1])) if local == peer else None
