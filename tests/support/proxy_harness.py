"""Helpers for the proxy tests: an in-process proxy on loopback,
a CONNECT client, small upstream servers, and a resolver seam mapping test names to
chosen addresses."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import trio

from enclave_common.address import TcpAddress, open_listener
from enclave_common.logs import configure_logging
from proxy.config import ProxyConfig, effective_allowlist
from proxy.credentials import CredentialSource
from proxy.server import ProxyServer
from proxy.upstream import Connector, Resolved, connect_tcp


def capture_logs() -> io.StringIO:
    stream = io.StringIO()
    configure_logging("debug", stream=stream, process="enclave-proxy")
    return stream


def log_events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def mapping_resolver(names: Mapping[str, list[str]]) -> Any:
    """A resolver seam: test names → chosen addresses; anything else fails to resolve."""

    async def resolve(host: str, port: int) -> list[Resolved]:
        await trio.lowlevel.checkpoint()
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out: list[Resolved] = []
        for addr in names[host]:
            if ":" in addr:
                out.append((socket.AF_INET6, (addr, port, 0, 0)))
            else:
                out.append((socket.AF_INET, (addr, port)))
        return out

    return resolve


class StaticSession:
    """A botocore-session stand-in for tests that do not exercise the real chain."""

    def get_credentials(self) -> None:
        return None


@dataclass
class RunningProxy:
    server: ProxyServer
    port: int


@asynccontextmanager
async def running_proxy(
    allow: tuple[str, ...],
    *,
    names: Mapping[str, list[str]] | None = None,
    connector: Connector = connect_tcp,
    credentials: CredentialSource | None = None,
    **overrides: Any,
) -> AsyncIterator[RunningProxy]:
    config = replace(
        ProxyConfig(listen=TcpAddress("127.0.0.1", 0), allow=allow, region="us-east-1"),
        **{"drain_timeout": 2.0, **overrides},
    )
    server = ProxyServer(
        config,
        effective_allowlist(config, "us-east-1"),
        region="us-east-1",
        credentials=credentials
        or CredentialSource(region="us-east-1", session_factory=StaticSession),
        resolver=mapping_resolver(names or {}),
        connector=connector,
    )
    listener = await open_listener(config.listen)
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run, listener)
        try:
            yield RunningProxy(server, port)
        finally:
            server.shutdown()


async def read_head(stream: trio.abc.Stream) -> tuple[int, bytes, bytes]:
    """Read an HTTP response head; returns (status, head, bytes after the head)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError(f"connection closed after {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, rest


async def read_to_eof(stream: trio.abc.Stream, initial: bytes = b"") -> bytes:
    buf = initial
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return buf
        buf += chunk


async def request(port: int, raw: bytes) -> tuple[int, bytes, Any]:
    """Send raw request bytes, return (status, head, parsed JSON body) of the answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        status, head, rest = await read_head(stream)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            rest += chunk
        return status, head, json.loads(rest[:length]) if length else None


async def open_tunnel(
    port: int, target: str, early: bytes = b"", *, peer: str | None = None
) -> tuple[int, trio.SocketStream, bytes]:
    """CONNECT through the proxy (from the loopback address ``peer`` if given); returns
    (status, stream, bytes already past the head)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=peer)
    await stream.send_all(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + early)
    status, _, rest = await read_head(stream)
    return status, stream, rest


async def echo_handler(stream: trio.abc.Stream) -> None:
    """Echo until EOF, then close: the simplest upstream."""
    try:
        async for chunk in stream:
            await stream.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def tcp_server(handler: Any) -> AsyncIterator[int]:
    """Serve ``handler`` on 127.0.0.1:<ephemeral>; yields the port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=1024)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, listeners)
        try:
            yield port
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class Tunnel:
    port: int  # the upstream's
    proxy: RunningProxy
    stream: trio.SocketStream
    rest: bytes  # what came past the CONNECT answer's head


@asynccontextmanager
async def tunnel_to(
    handler: Any, early: bytes = b"", **proxy_settings: Any
) -> AsyncIterator[Tunnel]:
    """An upstream serving ``handler`` on loopback, the proxy allowing just it (and
    ``proxy_settings``), and one tunnel opened to it: its CONNECT answered 200."""
    async with (
        tcp_server(handler) as port,
        running_proxy((f"127.0.0.1:{port}",), **proxy_settings) as proxy,
    ):
        status, stream, rest = await open_tunnel(proxy.port, f"127.0.0.1:{port}", early)
        assert status == 200
        yield Tunnel(port, proxy, stream, rest)
