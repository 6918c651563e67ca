"""A loopback server that speaks whatever bytes a test writes: for hostile answers."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import trio


async def raw_server(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> str:
    """Serve ``handler`` on 127.0.0.1:<ephemeral>; the address to give a client."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return f"tcp:127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def read_head(stream: trio.SocketStream) -> bytes:
    """Read up to the end of a head (and whatever came with it), or to EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data
