"""The TCP listener checks its callers too: the kernel names the uid (inet_diag), the
[access] rules decide as on the Unix socket, and the uid's shares count.

Real sockets, clients of another uid (a child dropped to OTHER_UID: tests run as root
in CI), a kernel whose answers the test replaces (a lying or absent inet_diag), and
the agent's start-up rules for a kernel that cannot name callers (``service.open_tcp``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from enclave_agent.runtime import service
from enclave_agent.runtime.config import AccessConfig, Limits, parse_config
from enclave_agent.runtime.peercred import database_groups, is_uid_allowed
from enclave_common.inet_diag import Answer, Endpoint, FourTuple
from enclave_common.logs import configure_logging
from enclave_common.tcp_peercred import Query, ask_kernel
from tests.test_agent_server import (
    OTHER_UID,
    FakeGateway,
    kms,
    needs_root,
    request,
    send_and_read,
    shared_dir,
    start,
    unix_exchange,
)
from tests.test_inet_diag import SEQ, diag_msg, message

__all__ = ["shared_dir"]  # the fixture, used by name below

# One request from a process of another uid (group 0, so the socket's mode 0660 lets
# it in), to "unix:PATH" or "tcp:HOST:PORT"; prints the answer.
_CLIENT_AS = """
import os, socket, sys
os.setgroups([])
os.setgid(0)
os.setuid(int(sys.argv[1]))
kind, _, where = sys.argv[2].partition(":")
if kind == "unix":
    s = socket.socket(socket.AF_UNIX)
    s.connect(where)
else:
    host, _, port = where.rpartition(":")
    s = socket.socket()
    s.connect((host, int(port)))
s.settimeout(30)
s.sendall(sys.stdin.buffer.read())
while chunk := s.recv(65536):
    sys.stdout.buffer.write(chunk)
"""


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    saved = structlog.get_config(), structlog.contextvars.get_contextvars()
    yield
    structlog.configure(**saved[0])
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**saved[1])


async def exchange_as(uid: int, target: str, raw: bytes) -> tuple[int, dict[str, str]]:
    """One request from a process of ``uid``: (status, JSON body)."""
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-c", _CLIENT_AS, str(uid), target], stdin=raw, capture_stdout=True
        )
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def tcp_exchange(port: int, raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        return await send_and_read(stream, raw)


DENIED = {
    "__type": "AccessDeniedException",
    "message": "this process is not allowed to use the enclave agent",
}


@needs_root
async def test_an_allowed_and_a_refused_uid_on_both_listeners(
    nursery: trio.Nursery, shared_dir: Path
) -> None:
    running = await start(nursery, shared_dir, access=AccessConfig(allowed_uids=frozenset({0})))
    for target in (f"unix:{running.socket}", f"tcp:127.0.0.1:{running.tcp_port}"):
        assert await exchange_as(0, target, request("GET", "/healthz")) == (200, {"status": "ok"})
        # Refused before its request is read, with the same answer on either listener.
        raw = kms("Decrypt", {"CiphertextBlob": "AAAA"})
        assert await exchange_as(OTHER_UID, target, raw) == (403, DENIED)
    assert running.gateway.calls == []
    refused = running.events("caller_refused")
    assert [(e["listener"], e["uid"]) for e in refused] == [
        ("unix", OTHER_UID),
        ("tcp", OTHER_UID),
    ]
    # The refused requests never reached the request log.
    assert all(e["caller"].startswith("uid=0") for e in running.events("request"))


@needs_root
async def test_tcp_callers_groups_come_from_the_group_database(
    nursery: trio.Nursery, shared_dir: Path
) -> None:
    # The kernel names only a uid on TCP: its groups are the database's, not the
    # process's. OTHER_UID's child runs with gid 0 and no other group, yet its passwd
    # gid admits it on TCP; on the Unix socket its process's groups (0) are judged.
    try:
        primary = pwd.getpwuid(OTHER_UID).pw_gid
    except KeyError:
        pytest.skip(f"uid {OTHER_UID} has no passwd entry here")
    running = await start(
        nursery, shared_dir, access=AccessConfig(allowed_gids=frozenset({primary}))
    )
    health = request("GET", "/healthz")
    assert await exchange_as(OTHER_UID, f"tcp:127.0.0.1:{running.tcp_port}", health) == (
        200,
        {"status": "ok"},
    )
    assert (await exchange_as(OTHER_UID, f"unix:{running.socket}", health))[0] == 403


def test_the_group_database_rule() -> None:
    assert 0 in database_groups(0)
    unknown = next(uid for uid in range(54321, 60000) if not _has_passwd_entry(uid))
    assert database_groups(unknown) == frozenset()
    # A uid without a passwd entry has no groups: only a uid rule admits it.
    assert not is_uid_allowed(unknown, AccessConfig(allowed_gids=frozenset({0, unknown})))
    assert is_uid_allowed(unknown, AccessConfig(allowed_uids=frozenset({unknown})))
    # No rule: the agent's own uid and root, as on the socket.
    assert is_uid_allowed(0, AccessConfig()) and not is_uid_allowed(unknown, AccessConfig())


def _has_passwd_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


async def test_a_tcp_callers_kms_calls_count_against_its_uids_share(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    gateway = FakeGateway(hold=trio.Event())
    running = await start(
        nursery,
        tmp_path,
        limits=Limits(max_kms_calls_per_uid=2, kms_pool_size=4, kms_call_timeout=0.5),
        gateway=gateway,
    )
    decrypt = kms("Decrypt", {"CiphertextBlob": "AAAA"})
    async with trio.open_nursery() as held:
        for _ in range(2):  # our uid's whole share, by the Unix socket
            held.start_soon(unix_exchange, running.socket, decrypt)
        with trio.fail_after(10):
            while gateway.in_flight < 2:
                await trio.sleep(0.01)
        # The same uid by TCP waits in the same queue, and is refused when it is not served.
        [(status, _, body)] = await tcp_exchange(running.tcp_port, decrypt)
        assert status == 503
        assert json.loads(body)["message"].startswith(f"uid {os.getuid()} kept 2 KMS calls")
        gateway.hold.set()
    [(status, _, _)] = await tcp_exchange(running.tcp_port, decrypt)
    assert status == 200


# --- a kernel that cannot, or will not, name the caller --------------------------------


async def test_a_connection_the_kernel_does_not_attribute_is_refused_and_others_are_served(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    lies: list[bytes] = []

    async def lying(asked: FourTuple) -> Answer:
        if not lies:
            return await ask_kernel(asked)
        answer = Answer(SEQ)
        answer.feed(lies.pop())
        return answer

    running = await start(nursery, tmp_path, query=lying)
    health = request("GET", "/healthz")
    wrong: list[Callable[[FourTuple], bytes]] = [
        # Another socket (the agent's own end, uid 0): a mismatched answer.
        lambda c: message(20, diag_msg(c.destination, c.source, uid=0)),
        # The client's socket, twice, different owners.
        lambda c: (
            message(20, diag_msg(c.source, c.destination, uid=0), flags=2)
            + message(20, diag_msg(c.source, c.destination, uid=1), flags=2)
            + message(3, bytes(4))
        ),
        # No match at all.
        lambda c: message(3, bytes(4)),
        # The client's socket closing: uid 0 (as if root) in FIN_WAIT1.
        lambda c: message(20, diag_msg(c.source, c.destination, uid=0, state=4, inode=0)),
    ]
    for craft in wrong:
        # The client's port is known before it connects: the lie is ready when asked.
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        ours = Endpoint.of("127.0.0.1", sock.getsockname()[1])
        lies.append(craft(FourTuple(ours, Endpoint.of("127.0.0.1", running.tcp_port))))
        await sock.connect(("127.0.0.1", running.tcp_port))
        async with trio.SocketStream(sock) as stream:
            [(status, _, body)] = await send_and_read(stream, health)
        assert (status, json.loads(body)) == (403, DENIED)
        # The kernel's true answer, next: served.
        [(status, _, _)] = await tcp_exchange(running.tcp_port, health)
        assert status == 200
    reasons = [e["reason"] for e in running.events("caller_refused")]
    assert len(reasons) == 4
    assert "another socket" in reasons[0] and "2 different sockets" in reasons[1]
    assert "named no socket" in reasons[2] and "FIN_WAIT1, not ESTABLISHED" in reasons[3]


async def test_a_client_gone_before_it_is_named_is_refused_cleanly(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    closed = trio.Event()

    async def after_the_client_left(asked: FourTuple) -> Answer:
        await closed.wait()  # the lookup races the client's close, and loses
        return await ask_kernel(asked)

    running = await start(nursery, tmp_path, query=after_the_client_left)
    stream = await trio.open_tcp_stream("127.0.0.1", running.tcp_port)
    await stream.send_all(request("GET", "/healthz"))
    await stream.aclose()
    closed.set()
    with trio.fail_after(10):
        while not running.events("caller_refused"):
            await trio.sleep(0.01)
    [event] = running.events("caller_refused")
    assert event["listener"] == "tcp"
    assert "not ESTABLISHED" in event["reason"] or "no such connection" in event["reason"]
    assert running.events("request") == []


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
    configure_logging("info", process="test-agent")
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
        [(status, _, _)] = await tcp_exchange(ready.tcp.port, request("GET", "/healthz"))
        assert status == 200


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
