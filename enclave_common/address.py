"""The address syntax both processes speak: vsock:CID:PORT, tcp:HOST:PORT, unix:PATH.

Parsing is pure (``parse_address`` / ``str(address)``); opening and listening are the
trio edges (``open_stream`` / ``open_listener``). Production uses vsock (the parent is
CID 3, listeners bind CID ANY); development and tests use tcp and unix through the very
same code paths, because on development machines an AF_VSOCK connect reaches the
hypervisor's host.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

import trio

VMADDR_CID_ANY = 0xFFFFFFFF
_MAX_CID = 0xFFFFFFFF
_MAX_PORT_VSOCK = 0xFFFFFFFF


class AddressError(ValueError):
    """An address string that does not follow the project's syntax."""


@dataclass(frozen=True)
class VsockAddress:
    cid: int
    port: int

    def __str__(self) -> str:
        cid = "ANY" if self.cid == VMADDR_CID_ANY else str(self.cid)
        return f"vsock:{cid}:{self.port}"


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


Address = VsockAddress | TcpAddress | UnixAddress

# The wire contract between the processes: enclave-proxy listens on this vsock port of
# the parent instance, which is always CID 3 as an enclave sees it.
PROXY_PORT = 8000
PARENT_CID = 3
DEFAULT_PROXY = VsockAddress(PARENT_CID, PROXY_PORT)  # where the agent finds the proxy


def _parse_int(text: str, what: str, maximum: int, original: str) -> int:
    if not text.isdigit():
        raise AddressError(f"{original!r}: {what} must be a decimal number, got {text!r}")
    value = int(text)
    if value > maximum:
        raise AddressError(f"{original!r}: {what} {value} is out of range (max {maximum})")
    return value


def _split_host_port(rest: str, original: str) -> tuple[str, str]:
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0 or rest[end + 1 : end + 2] != ":":
            raise AddressError(f"{original!r}: expected [IPv6]:PORT")
        return rest[1:end], rest[end + 2 :]
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise AddressError(f"{original!r}: expected HOST:PORT")
    if ":" in host:
        raise AddressError(f"{original!r}: write IPv6 hosts in brackets, [::1]:PORT")
    return host, port


def parse_address(text: str) -> Address:
    """Parse ``vsock:CID:PORT`` (CID may be ``ANY``), ``tcp:HOST:PORT`` or ``unix:PATH``."""
    scheme, sep, rest = text.partition(":")
    if not sep:
        raise AddressError(f"{text!r}: expected vsock:CID:PORT, tcp:HOST:PORT or unix:PATH")
    if scheme == "unix":
        if not rest or "\x00" in rest:
            raise AddressError(f"{text!r}: expected unix:PATH with a non-empty path")
        return UnixAddress(rest)
    if scheme == "tcp":
        host, port = _split_host_port(rest, text)
        return TcpAddress(host, _parse_int(port, "port", 65535, text))
    if scheme == "vsock":
        cid_text, sep, port = rest.partition(":")
        if not sep:
            raise AddressError(f"{text!r}: expected vsock:CID:PORT")
        cid = (
            VMADDR_CID_ANY
            if cid_text.upper() in ("ANY", "-1")
            else _parse_int(cid_text, "CID", _MAX_CID, text)
        )
        return VsockAddress(cid, _parse_int(port, "port", _MAX_PORT_VSOCK, text))
    raise AddressError(f"{text!r}: unknown scheme {scheme!r} (use vsock:, tcp: or unix:)")


def parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address an IP literal spells (zone id dropped, IPv4-mapped IPv6 read
    as the IPv4 address it carries); None for a name."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback_ip(host: str) -> bool:
    """Is ``host`` an IP literal on loopback (127.0.0.0/8, ::1)? False for names too:
    what a name resolves to is known once it is bound."""
    address = parse_ip(host)
    return address is not None and address.is_loopback


def is_loopback_host(host: str) -> bool:
    """A loopback IP literal, or the name ``localhost``: where a listener with no caller
    check may be put."""
    return host == "localhost" or is_loopback_ip(host)


def _vsock_family() -> int:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise OSError(errno.EAFNOSUPPORT, "AF_VSOCK is not available on this system")
    return int(family)


async def close_now(stream: trio.abc.Stream) -> None:
    """Close a stream we are done with, without further ado: a plain socket
    synchronously (no cancel scope, no Cancelled raised and caught, no schedule point:
    two such closes were a fifth of a short proxy tunnel's Python work), anything else
    (TLS) with ``trio.aclose_forcefully``."""
    if isinstance(stream, trio.SocketStream):
        stream.socket.close()
    else:
        await trio.aclose_forcefully(stream)


async def open_stream(address: Address) -> trio.SocketStream:
    """Connect to ``address``. TCP uses trio's happy-eyeballs connector."""
    if isinstance(address, TcpAddress):
        return await trio.open_tcp_stream(address.host, address.port)
    if isinstance(address, UnixAddress):
        return await trio.open_unix_socket(address.path)
    return await connect_socket(_vsock_family(), (address.cid, address.port))


async def connect_socket(family: int, sockaddr: tuple[Any, ...]) -> trio.SocketStream:
    """A stream socket of ``family`` connected to ``sockaddr``; closed if that fails."""
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def open_listener(
    address: Address, *, backlog: int = 1024, unix_mode: int | None = None
) -> trio.SocketListener:
    """Bind and listen on ``address``.

    A unix path left behind by a previous run is replaced only if it is a socket
    nobody answers on; anything else at that path is an error, never overwritten.
    """
    if isinstance(address, TcpAddress):
        listeners = await trio.open_tcp_listeners(address.port, host=address.host, backlog=backlog)
        if len(listeners) != 1:
            for extra in listeners[1:]:
                await extra.aclose()
        return listeners[0]
    if isinstance(address, UnixAddress):
        await _remove_stale_unix_socket(address.path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(address.path)
            if unix_mode is not None:
                os.chmod(address.path, unix_mode)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return trio.SocketListener(sock)
    sock = trio.socket.socket(_vsock_family(), socket.SOCK_STREAM)
    try:
        await sock.bind((address.cid, address.port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def _remove_stale_unix_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running process")


def listener_address(listener: trio.SocketListener, requested: Address) -> Address:
    """The address a listener actually bound (resolves ``tcp:HOST:0`` to the real port)."""
    if isinstance(requested, TcpAddress):
        name = listener.socket.getsockname()
        return TcpAddress(requested.host, int(name[1]))
    if isinstance(requested, VsockAddress):
        name = listener.socket.getsockname()
        return VsockAddress(requested.cid, int(name[1]))
    return requested


def describe_peer(stream: trio.SocketStream) -> str:
    """A short printable name for the other end of an accepted connection."""
    sock = stream.socket
    try:
        peer = sock.getpeername()
    except OSError:
        return "unknown"
    if sock.family == socket.AF_UNIX:
        return "unix"
    if sock.family == getattr(socket, "AF_VSOCK", -1):
        return f"vsock:{peer[0]}:{peer[1]}"
    host = peer[0]
    return f"tcp:[{host}]:{peer[1]}" if ":" in host else f"tcp:{host}:{peer[1]}"
