"""The agent assembled (``service.run_agent``, in this process): its TCP listener and
a kernel that cannot name TCP callers (no inet_diag, simulated by the query the test
gives), per ``service.open_tcp``: refuse to start, start unchecked with
``[listen] tcp_open = true`` (a warning), or, under ``run``, leave TCP off and say why."""

from __future__ import annotations

import contextlib
import errno
import os
import textwrap
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from enclave_agent.runtime import service
from enclave_agent.runtime.config import parse_config
from enclave_common.inet_diag import Answer, FourTuple
from enclave_common.tcp_peercred import Query, ask_kernel


async def health_over_tcp(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        answer = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                answer += chunk
    return answer


# --- start-up: a kernel without inet_diag ----------------------------------------------


async def _no_inet_diag(asked: FourTuple) -> Answer:
    raise OSError(errno.EPROTONOSUPPORT, os.strerror(errno.EPROTONOSUPPORT))


def agent_config(tmp_path: Path, listen: str = "") -> str:
    return textwrap.dedent(
        f"""
        region = "us-east-1"
        proxy = "tcp:127.0.0.1:9"
        nsm = "simulated"
        [listen]
        socket = "{tmp_path / "agent.sock"}"
        """
    ) + textwrap.dedent(listen)


@contextlib.asynccontextmanager
async def agent(
    tmp_path: Path, listen: str = "", *, for_sdks: bool = False, kernel: Query = ask_kernel
) -> AsyncIterator[tuple[service.AgentReady, list[dict[str, Any]]]]:
    config = parse_config(agent_config(tmp_path, listen))
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            ready = await nursery.start(
                partial(service.run_agent, config, tcp_for_sdks=for_sdks, query=kernel)
            )
            yield ready, logs
            nursery.cancel_scope.cancel()


async def test_a_named_tcp_listener_without_inet_diag_refuses_to_start(tmp_path: Path) -> None:
    config = parse_config(agent_config(tmp_path, 'tcp = "tcp:127.0.0.1:0"\n'))
    async with trio.open_nursery() as nursery:
        with pytest.raises(service.CallerCheckUnavailable, match="tcp_open = true"):
            await nursery.start(partial(service.run_agent, config, query=_no_inet_diag))
    assert not (tmp_path / "agent.sock").exists()


async def test_tcp_open_starts_unchecked_with_a_warning(tmp_path: Path) -> None:
    listen = 'tcp = "tcp:127.0.0.1:0"\ntcp_open = true\n'
    async with agent(tmp_path, listen, kernel=_no_inet_diag) as (ready, logs):
        assert ready.tcp is not None and not ready.tcp_checked
        [warning] = [e for e in logs if e["event"] == "tcp_callers_unchecked"]
        assert warning["log_level"] == "warning" and "cannot ask" in str(warning["reason"])
        # Every local process may use it, as one caller.
        assert (await health_over_tcp(ready.tcp.port)).startswith(b"HTTP/1.1 200 ")


async def test_run_leaves_tcp_off_without_inet_diag_and_says_why(tmp_path: Path) -> None:
    async with agent(tmp_path, for_sdks=True, kernel=_no_inet_diag) as (ready, logs):
        assert ready.tcp is None
        [off] = [e for e in logs if e["event"] == "tcp_listener_off"]
        assert "cannot name TCP callers" in str(off["reason"])


async def test_run_turns_tcp_on_where_the_kernel_names_callers(tmp_path: Path) -> None:
    async with agent(tmp_path, for_sdks=True) as (ready, logs):
        assert ready.tcp is not None and ready.tcp_checked
        assert ready.tcp.host == "127.0.0.1" and ready.tcp.port > 0
        [ready_event] = [e for e in logs if e["event"] == "ready"]
        assert ready_event["tcp_callers"] == "checked"
    # Without run's wish and without [listen] tcp: no TCP listener.
    async with agent(tmp_path) as (ready, _):
        assert ready.tcp is None
