"""The kernel names the owner of a loopback TCP connection's other end (inet_diag):
real sockets, a client of another uid, the lookup racing a closing client, and the
query replaced by answers a lying kernel could give."""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from collections.abc import Callable

import pytest
import trio

from enclave_common.inet_diag import Answer, Endpoint, FourTuple, NotAttributed
from enclave_common.tcp_peercred import (
    LOOKUP_TIMEOUT,
    ask_kernel,
    connection_of,
    loopback_connection,
    self_check,
    tcp_peer_uid,
)
from tests.support.inet_diag_answers import SEQ, diag_msg, error, message

OTHER_UID = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a client of another uid needs root")
HOSTS = ["127.0.0.1", "::1"]

# Connects as another uid and keeps the connection until its stdin closes.
_CLIENT_AS = """
import os, socket, sys
os.setgroups([])
os.setgid(int(sys.argv[1]))
os.setuid(int(sys.argv[1]))
family = socket.AF_INET6 if ":" in sys.argv[2] else socket.AF_INET
s = socket.socket(family)
s.connect((sys.argv[2], int(sys.argv[3])))
print("connected", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("host", HOSTS)
async def test_our_own_connection_is_ours(host: str) -> None:
    async with loopback_connection(host) as (_, accepted):
        assert await tcp_peer_uid(accepted) == os.geteuid()
    await self_check(host)


async def test_an_ipv6_client_of_an_ipv4_listener_is_named() -> None:
    with trio.socket.socket() as listener, trio.socket.socket(socket.AF_INET6) as client:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        await client.connect(("::ffff:127.0.0.1", listener.getsockname()[1]))
        accepted, _ = await listener.accept()
        with accepted:
            assert await tcp_peer_uid(accepted) == os.geteuid()


@needs_root
@pytest.mark.parametrize("host", HOSTS)
async def test_a_client_of_another_uid_is_named(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with trio.socket.socket(family) as listener:
        await listener.bind((host, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", _CLIENT_AS, str(OTHER_UID), host, str(port)],
            stdin=-1,
            stdout=-1,
        )
        try:
            assert process.stdout is not None and process.stdin is not None
            with trio.fail_after(30):
                said = b""
                while not said.endswith(b"\n"):
                    said += await process.stdout.receive_some(100) or b"(exited)\n"
                assert said == b"connected\n"
                accepted, _ = await listener.accept()
            with accepted:
                assert await tcp_peer_uid(accepted) == OTHER_UID
        finally:
            if process.stdin is not None:
                await process.stdin.aclose()
            with trio.fail_after(30):
                await process.wait()


# --- a client that is gone or going: refused, cleanly ----------------------------------


@pytest.mark.parametrize("host", HOSTS)
async def test_a_client_that_closed_before_the_lookup_is_refused(host: str) -> None:
    # Its socket lingers in FIN_WAIT, reported as uid 0 (root) with inode 0.
    async with loopback_connection(host) as (client, accepted):
        client.close()
        with pytest.raises(NotAttributed, match="FIN_WAIT|no such connection"):
            await tcp_peer_uid(accepted)


async def test_a_client_that_reset_before_the_lookup_is_refused() -> None:
    async with loopback_connection("127.0.0.1") as (client, accepted):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        with pytest.raises(NotAttributed, match="no such connection|no peer"):
            await tcp_peer_uid(accepted)


async def test_the_lookup_racing_the_clients_close_is_refused() -> None:
    async with loopback_connection("127.0.0.1") as (client, accepted):

        async def close_first(connection: FourTuple) -> Answer:
            # The client goes away between our question being built and the kernel's answer.
            client.close()
            await trio.sleep(0)
            return await ask_kernel(connection)

        with pytest.raises(NotAttributed, match="FIN_WAIT|no such connection"):
            await tcp_peer_uid(accepted, query=close_first)


# --- a kernel answering wrongly: refused, never guessed --------------------------------


def _answer(*datagrams: bytes) -> Answer:
    answer = Answer(SEQ)
    for datagram in datagrams:
        answer.feed(datagram)
    return answer


def _next_port(endpoint: Endpoint) -> Endpoint:
    return Endpoint.of(endpoint.address, endpoint.port ^ 1)


Craft = Callable[[FourTuple], bytes]


@pytest.mark.parametrize(
    ("craft", "reason"),
    [
        (lambda c: message(20, diag_msg(_next_port(c.source), c.destination)), "another socket"),
        # our own end instead of the client's
        (lambda c: message(20, diag_msg(c.destination, c.source, uid=0)), "another socket"),
        # the client's socket, twice, with different owners
        (
            lambda c: (
                message(20, diag_msg(c.source, c.destination, uid=0), flags=2)
                + message(20, diag_msg(c.source, c.destination, uid=1), flags=2)
                + message(3, bytes(4))
            ),
            "different sockets",
        ),
        (lambda c: message(3, bytes(4)), "named no socket"),
        (lambda c: error(-errno.ENOENT), "no such connection"),
    ],
)
async def test_a_wrong_answer_is_refused(craft: Craft, reason: str) -> None:
    async with loopback_connection("127.0.0.1") as (_, accepted):
        connection = connection_of(accepted)

        async def lying(asked: FourTuple) -> Answer:
            assert asked == connection
            return _answer(craft(asked))

        with pytest.raises(NotAttributed, match=reason):
            await tcp_peer_uid(accepted, query=lying)


async def test_a_malformed_answer_is_refused() -> None:
    async with loopback_connection("127.0.0.1") as (_, accepted):

        async def garbled(asked: FourTuple) -> Answer:
            return _answer(b"\x10\0\0\0garbage!")

        with pytest.raises(NotAttributed, match="malformed"):
            await tcp_peer_uid(accepted, query=garbled)


async def test_a_kernel_that_never_answers_is_refused_in_bounded_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with loopback_connection("127.0.0.1") as (_, accepted):

        async def silent(asked: FourTuple) -> Answer:
            await trio.sleep_forever()
            raise AssertionError

        started = trio.current_time()
        with pytest.raises(NotAttributed, match="did not answer"):
            await tcp_peer_uid(accepted, query=silent)
        assert trio.current_time() - started == pytest.approx(LOOKUP_TIMEOUT)


@pytest.mark.parametrize("code", [errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT, errno.EPERM])
async def test_no_inet_diag_fails_the_self_check(code: int) -> None:
    async def absent(asked: FourTuple) -> Answer:
        raise OSError(code, os.strerror(code))

    with pytest.raises(NotAttributed, match="cannot ask the kernel"):
        await self_check("127.0.0.1", query=absent)


async def test_a_kernel_naming_someone_else_fails_the_self_check() -> None:
    async def wrong(asked: FourTuple) -> Answer:
        return _answer(message(20, diag_msg(asked.source, asked.destination, uid=4321)))

    with pytest.raises(NotAttributed, match="uid 4321"):
        await self_check("127.0.0.1", query=wrong)
