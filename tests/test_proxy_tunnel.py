"""The proxy port over real loopback sockets, proxy in-process: tunnels and every error."""

from __future__ import annotations

import json
import os
import socket
import ssl
from typing import Any

import pytest
import trio
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave_common.address import TcpAddress
from proxy.allowlist import Allowlist
from proxy.upstream import SockAddr
from tests.support.proxy_harness import (
    capture_logs,
    echo_handler,
    log_events,
    open_tunnel,
    read_head,
    read_to_eof,
    request,
    running_proxy,
    tcp_server,
    tunnel_to,
)

MARKER = b"MARKER-7f3c9a-must-never-be-logged"


async def test_tls_through_tunnel_client_verifies_server() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("echo.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def tls_echo(stream: trio.SocketStream) -> None:
        await echo_handler(trio.SSLStream(stream, server_ctx, server_side=True))

    logs = capture_logs()
    async with tcp_server(tls_echo) as port:
        # The name resolves to loopback, so the exact address must be listed as well.
        allow = (f"echo.test:{port}", f"127.0.0.1:{port}")
        async with running_proxy(allow, names={"echo.test": ["127.0.0.1"]}) as proxy:
            status, raw, rest = await open_tunnel(proxy.port, f"echo.test:{port}")
            assert status == 200 and rest == b""
            tls = trio.SSLStream(raw, client_ctx, server_hostname="echo.test")
            await tls.do_handshake()
            await tls.send_all(MARKER)
            got = b""
            while len(got) < len(MARKER):
                got += await tls.receive_some(65536)
            assert got == MARKER
            await tls.aclose()

            # The same server under a name it has no certificate for: verification fails.
            status, raw, _ = await open_tunnel(proxy.port, f"127.0.0.1:{port}")
            assert status == 200
            wrong = trio.SSLStream(raw, client_ctx, server_hostname="other.test")
            with pytest.raises(trio.BrokenResourceError):
                await wrong.do_handshake()
            await trio.aclose_forcefully(wrong)
    events = [e for e in log_events(logs) if e.get("method") == "CONNECT"]
    assert events[0]["status"] == 200 and events[0]["bytes_up"] > len(MARKER)


async def test_plain_tunnel_forwards_early_bytes_and_marker_never_logged() -> None:
    logs = capture_logs()
    # Bytes sent right behind the request head (h11's trailing_data) must arrive first.
    async with tunnel_to(echo_handler, early=MARKER) as tunnel:
        await tunnel.stream.send_all(b"|" + MARKER)
        await tunnel.stream.send_eof()
        assert await read_to_eof(tunnel.stream, tunnel.rest) == MARKER + b"|" + MARKER
        await tunnel.stream.aclose()
    text = logs.getvalue()
    assert MARKER.decode() not in text
    (event,) = [e for e in log_events(logs) if e.get("method") == "CONNECT"]
    assert event["outcome"] == "closed"
    assert event["bytes_up"] == event["bytes_down"] == 2 * len(MARKER) + 1
    upstream = f"127.0.0.1:{tunnel.port}"
    assert event["peer"].startswith("tcp:127.0.0.1:") and event["target"] == upstream
    assert "duration_s" in event and event["upstream"] == upstream
    assert event["spliced"] is True  # socket to socket: bytes moved by splice(2)


async def test_half_close_keeps_the_other_direction_flowing() -> None:
    """The client shuts its write side; the upstream still answers after seeing EOF."""

    async def count_then_answer(stream: trio.SocketStream) -> None:
        total = 0
        async for chunk in stream:
            total += len(chunk)
        # Only after EOF from the client (through the proxy) does the answer go back.
        await trio.sleep(0.05)
        await stream.send_all(f"got {total}".encode())
        await stream.aclose()

    async with tunnel_to(count_then_answer) as tunnel:
        payload = b"x" * 3_000_000
        await tunnel.stream.send_all(payload)
        await tunnel.stream.send_eof()
        assert await read_to_eof(tunnel.stream, tunnel.rest) == b"got 3000000"
        await tunnel.stream.aclose()


async def test_upstream_half_close_reaches_client() -> None:
    """The upstream shuts its write side first; the client can still send afterwards."""

    async def greet_then_read(stream: trio.SocketStream) -> None:
        await stream.send_all(b"hello")
        await stream.send_eof()
        data = await read_to_eof(stream)
        assert data == b"late data"
        await stream.aclose()

    async with tunnel_to(greet_then_read) as tunnel:
        assert await read_to_eof(tunnel.stream, tunnel.rest) == b"hello"
        await tunnel.stream.send_all(b"late data")
        await tunnel.stream.send_eof()
        await tunnel.stream.aclose()


async def test_idle_timeout_closes_tunnel() -> None:
    logs = capture_logs()
    async with tunnel_to(echo_handler, idle_timeout=0.3) as tunnel:
        with trio.fail_after(10):
            assert await read_to_eof(tunnel.stream, tunnel.rest) == b""
        await tunnel.stream.aclose()
    (event,) = [e for e in log_events(logs) if e.get("method") == "CONNECT"]
    assert event["outcome"] == "idle_timeout"


async def test_500_concurrent_tunnels() -> None:
    n = 500
    opened = 0
    all_open = trio.Event()

    async with (
        tcp_server(echo_handler) as port,
        # All from one peer (127.0.0.1): its share must hold them all.
        running_proxy((f"127.0.0.1:{port}",), max_tunnels_per_peer=n) as proxy,
    ):

        async def one(i: int) -> None:
            nonlocal opened
            status, stream, rest = await open_tunnel(proxy.port, f"127.0.0.1:{port}")
            assert status == 200
            message = f"tunnel {i}".encode()
            await stream.send_all(message)
            got = rest
            while len(got) < len(message):
                got += await stream.receive_some(100)
            assert got == message
            opened += 1
            if opened == n:
                all_open.set()
            await all_open.wait()
            assert proxy.server.active_connections >= n
            await stream.aclose()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
    assert opened == n


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"NOT A REQUEST\r\n\r\n", 400),
        (b"CONNECT echo.test:443 HTTP/1.1\r\n\r\n", 400),  # no Host header
        (b"CONNECT no-port HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"CONNECT bad_name!:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"CONNECT [::1:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405),
        (b"DELETE /v1/credentials HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"CONNECT other.test:443 HTTP/1.1\r\nHost: x\r\n\r\n", 403),
        (b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: x\r\n\r\n", 403),  # IP literal not listed
        (b"CONNECT echo.test:444 HTTP/1.1\r\nHost: x\r\n\r\n", 403),  # wrong port
        (b"CONNECT kms.us-east-1.amazonaws.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", 403),
    ],
)
async def test_error_answers(raw: bytes, status: int) -> None:
    async with running_proxy(("echo.test:443",)) as proxy:
        got, head, body = await request(proxy.port, raw)
        assert got == status, head
        assert isinstance(body["error"], str) and body["error"]
        assert b"content-type: application/json" in head.lower()


@pytest.mark.parametrize(
    ("name", "addresses"),
    [
        ("loop.test", ["127.0.0.1"]),
        ("imds.test", ["169.254.169.254"]),
        ("imds6.test", ["fd00:ec2::254"]),
        ("mapped.test", ["::ffff:169.254.169.254"]),
        ("local6.test", ["::1"]),
    ],
)
async def test_403_for_names_resolving_to_guarded_addresses(
    name: str, addresses: list[str]
) -> None:
    attempted: list[SockAddr] = []

    async def must_not_connect(family: int, sockaddr: SockAddr) -> trio.SocketStream:
        attempted.append(sockaddr)
        raise AssertionError("no connection may be attempted")

    async with running_proxy(
        (f"{name}:443", "*.wild.test:443"),
        names={name: addresses, "x.wild.test": addresses},
        connector=must_not_connect,
    ) as proxy:
        for target in (f"{name}:443", "x.wild.test:443"):
            status, _, body = await request(
                proxy.port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
            )
            assert status == 403, body
            assert "refused" in body["error"]
    assert attempted == []


async def test_guarded_addresses_are_skipped_but_others_used() -> None:
    """A name resolving to IMDS *and* a permitted address connects only to the latter."""
    used: list[SockAddr] = []
    async with tcp_server(echo_handler) as port:

        async def record(family: int, sockaddr: SockAddr) -> trio.SocketStream:
            used.append(sockaddr)
            return await trio.open_tcp_stream("127.0.0.1", port)

        async with running_proxy(
            # The connector lands on this host's loopback: that address must be listed.
            ("mixed.test:443", f"127.0.0.1:{port}"),
            names={"mixed.test": ["169.254.169.254", "192.0.2.10"]},
            connector=record,
        ) as proxy:
            status, stream, _ = await open_tunnel(proxy.port, "mixed.test:443")
            assert status == 200
            await stream.aclose()
    assert used == [("192.0.2.10", 443)]


async def test_502_unresolvable_and_refused() -> None:
    # A port that was just free: nothing listens there, so the connect is refused.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    async with running_proxy(("nowhere.test:443", f"127.0.0.1:{closed_port}")) as proxy:
        status, _, body = await request(
            proxy.port, b"CONNECT nowhere.test:443 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert status == 502 and "resolved" in body["error"]
        target = f"127.0.0.1:{closed_port}"
        status, _, body = await request(
            proxy.port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
        )
        assert status == 502 and "refused" in body["error"]


async def test_504_connect_timeout_against_full_backlog() -> None:
    """A listener whose accept queue is full drops SYNs: the connect hangs, over loopback."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        target = f"127.0.0.1:{port}"
        async with running_proxy((target,), connect_timeout=0.5) as proxy:
            status, _, body = await request(
                proxy.port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
            )
            assert status == 504 and "timed out" in body["error"]
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_504_when_every_connect_hangs() -> None:
    """The same through the connector seam, with two addresses raced happy-eyeballs style."""
    attempts: list[SockAddr] = []

    async def hang(family: int, sockaddr: SockAddr) -> trio.SocketStream:
        attempts.append(sockaddr)
        await trio.sleep_forever()
        raise AssertionError

    async with running_proxy(
        ("slow.test:443",),
        names={"slow.test": ["192.0.2.1", "2001:db8::1"]},
        connector=hang,
        connect_timeout=0.6,
    ) as proxy:
        status, _, _ = await request(
            proxy.port, b"CONNECT slow.test:443 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert status == 504
    # Both families were tried (IPv4 first as resolved, then IPv6 after the stagger).
    assert [a[0] for a in attempts] == ["192.0.2.1", "2001:db8::1"]


async def test_503_over_the_connection_limit() -> None:
    async with tcp_server(echo_handler) as port:
        target = f"127.0.0.1:{port}"
        async with running_proxy((target,), max_tunnels=2) as proxy:
            tunnels = []
            for _ in range(2):
                status, stream, _ = await open_tunnel(proxy.port, target)
                assert status == 200
                tunnels.append(stream)
            status, _, body = await request(
                proxy.port, f"CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            assert status == 503 and "limit" in body["error"]
            for stream in tunnels:
                await stream.aclose()
            # Once the tunnels are gone, new ones are accepted again.
            with trio.fail_after(10):
                while proxy.server.active_connections:
                    await trio.sleep(0.01)
            status, stream, _ = await open_tunnel(proxy.port, target)
            assert status == 200
            await stream.aclose()


async def _echo_once(stream: trio.SocketStream, rest: bytes) -> None:
    await stream.send_all(b"ping")
    got = rest
    while len(got) < 4:
        got += await stream.receive_some(100)
    assert got == b"ping"


async def test_idle_connections_reopened_by_one_peer_do_not_lock_out_another() -> None:
    """Many connections that never send a request head, re-opened as the proxy closes
    them, once held max_tunnels so that every other client's CONNECT got 503."""
    logs = capture_logs()
    most = 16
    async with tcp_server(echo_handler) as port:
        target = f"127.0.0.1:{port}"
        async with running_proxy(
            (target,), max_tunnels=most, max_tunnels_per_peer=4, header_timeout=0.2
        ) as proxy:
            refused = 0

            async def idle_client() -> None:
                nonlocal refused
                while True:
                    stream = await trio.open_tcp_stream(
                        "127.0.0.1", proxy.port, local_address="127.0.0.2"
                    )
                    async with stream:  # sends nothing; waits for the proxy to close it
                        if (await read_to_eof(stream)).startswith(b"HTTP/1.1 503 "):
                            refused += 1
                            await trio.sleep(0.01)

            async with trio.open_nursery() as attack:
                for _ in range(most + 8):  # more than the whole table
                    attack.start_soon(idle_client)
                with trio.fail_after(20):
                    # Until the table would be full if 127.0.0.2 were not held to its share.
                    while not refused and proxy.server.active_connections <= most:
                        await trio.sleep(0.01)
                    for _ in range(3):  # while the idle ones are cut off and re-opened
                        status, stream, rest = await open_tunnel(
                            proxy.port, target, peer="127.0.0.3"
                        )
                        assert status == 200
                        await _echo_once(stream, rest)
                        await stream.aclose()
                        await trio.sleep(0.2)
                attack.cancel_scope.cancel()
    refusals = [e for e in log_events(logs) if e.get("event") == "connection_refused"]
    assert refusals and {(e["peer"], e["limit"]) for e in refusals} == {
        ("peer 127.0.0.2", "max_tunnels_per_peer")
    }


async def test_each_peer_has_its_own_share_of_tunnels() -> None:
    async with tcp_server(echo_handler) as port:
        target = f"127.0.0.1:{port}"
        async with running_proxy((target,), max_tunnels=8, max_tunnels_per_peer=3) as proxy:
            mine = []
            for _ in range(3):
                status, stream, _ = await open_tunnel(proxy.port, target, peer="127.0.0.2")
                assert status == 200
                mine.append(stream)
            status, refused, rest = await open_tunnel(proxy.port, target, peer="127.0.0.2")
            assert status == 503
            assert json.loads(await read_to_eof(refused, rest)) == {
                "error": "over the connection limit: peer 127.0.0.2 has 3 connections "
                "open, its whole share (max_tunnels_per_peer)"
            }
            await refused.aclose()
            # Another peer gets its own share, whole.
            others = []
            for _ in range(3):
                status, stream, rest = await open_tunnel(proxy.port, target, peer="127.0.0.3")
                assert status == 200
                await _echo_once(stream, rest)
                others.append(stream)
            for stream in mine:
                await _echo_once(stream, b"")  # still open, still relaying
            # A tunnel closed gives its peer its place back.
            await mine.pop().aclose()
            with trio.fail_after(10):
                while True:
                    status, again, _ = await open_tunnel(proxy.port, target, peer="127.0.0.2")
                    if status == 200:
                        break
                    await again.aclose()
                    await trio.sleep(0.01)
            for stream in [*mine, *others, again]:
                await stream.aclose()


def test_peers_are_keyed_by_address_uid_and_cid() -> None:
    from types import SimpleNamespace

    from proxy.admission import peer_key

    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert peer_key(left) == ("uid", os.getuid())  # SO_PEERCRED
    server = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    with server:
        port = server.getsockname()[1]
        for source, expected in (("127.0.0.2", "127.0.0.2"), ("::1", "::1")):
            family = socket.AF_INET6 if ":" in source else socket.AF_INET
            with socket.socket(family) as client:
                client.bind((source, 0))
                client.connect(("::1" if ":" in source else "127.0.0.1", port))
                accepted, peer = server.accept()
                with accepted:
                    if family == socket.AF_INET:
                        assert peer[0] == "::ffff:127.0.0.2"  # one peer, however it is spelt
                    assert peer_key(accepted) == ("address", expected)
    vsock = getattr(socket, "AF_VSOCK", None)
    if vsock is not None:  # never connected: a stand-in with the family and the peer's CID
        stand_in = SimpleNamespace(family=vsock, getpeername=lambda: (16, 1234))
        assert peer_key(stand_in) == ("cid", 16)  # type: ignore[arg-type]


async def test_healthz_and_keep_alive() -> None:
    async with running_proxy(()) as proxy:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        for _ in range(2):
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, rest = await read_head(stream)
            while len(rest) < len(b'{"status":"ok"}'):
                rest += await stream.receive_some(100)
            assert status == 200 and rest == b'{"status":"ok"}'
        await stream.aclose()


async def test_reload_swaps_allowlist_without_touching_open_tunnels() -> None:
    async with tcp_server(echo_handler) as port:
        target = f"127.0.0.1:{port}"
        async with running_proxy((target,)) as proxy:
            status, stream, _ = await open_tunnel(proxy.port, target)
            assert status == 200
            proxy.server.reload(Allowlist.from_strings(["other.test:443"]))
            status, _, _ = await request(
                proxy.port, f"CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            assert status == 403
            await stream.send_all(b"still here")
            assert await stream.receive_some(100) == b"still here"
            await stream.aclose()


async def test_408_for_a_slow_head_and_quiet_close_when_idle() -> None:
    async with running_proxy((), header_timeout=0.3) as proxy:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost:")
        with trio.fail_after(10):
            status, _, _ = await read_head(stream)
        assert status == 408
        await stream.aclose()
        quiet = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        with trio.fail_after(10):
            assert await read_to_eof(quiet) == b""
        await quiet.aclose()


@pytest.mark.parametrize("method", [b"GET /healthz", b"CONNECT echo.test:443"])
async def test_408_for_a_request_body_that_never_ends(method: bytes) -> None:
    """header_timeout covers the whole request: a body trickled in (or never sent)
    must not hold a connection, and a place under max_tunnels, for ever."""
    async with running_proxy(("echo.test:443",), header_timeout=0.3) as proxy:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await stream.send_all(method + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        with trio.fail_after(10):
            status, _, _ = await read_head(stream)
        assert status == 408
        await stream.aclose()


async def test_shutdown_closes_idle_keep_alive_connections_at_once() -> None:
    async with running_proxy((), header_timeout=60, drain_timeout=60) as proxy:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, rest = await read_head(stream)
        assert status == 200
        proxy.server.shutdown()
        with trio.fail_after(10):  # well before either 60 s timeout
            await read_to_eof(stream, rest)
            while proxy.server.active_connections:
                await trio.sleep(0.01)
        await stream.aclose()


def test_vsock_peer_cid_allowlist() -> None:
    """Only the check itself: no AF_VSOCK socket is ever connected on this machine."""
    from types import SimpleNamespace

    from proxy.config import ProxyConfig
    from proxy.server import ProxyServer

    vsock = getattr(socket, "AF_VSOCK", None)
    if vsock is None:
        pytest.skip("no AF_VSOCK in this Python")
    config = ProxyConfig(listen=TcpAddress("127.0.0.1", 0), allowed_cids=frozenset({16}))
    server = ProxyServer(
        config,
        Allowlist(()),
        region="us-east-1",
        credentials=None,  # type: ignore[arg-type]
    )

    def peer(family: int, cid: int) -> Any:
        sock = SimpleNamespace(family=family, getpeername=lambda: (cid, 1234))
        return SimpleNamespace(socket=sock)

    assert server._peer_allowed(peer(vsock, 16))
    assert not server._peer_allowed(peer(vsock, 17))
    assert server._peer_allowed(peer(socket.AF_INET, 17))  # the list applies to vsock only


def test_vsock_peers_that_are_not_enclaves_are_refused_by_default() -> None:
    """CIDs 0-3 (hypervisor, local loopback, host, the parent itself) are not enclaves:
    a local user of the parent connecting over vsock loopback gets nothing, unless an
    explicit allowed_cids names the CID."""
    from proxy.server import vsock_peer_allowed

    for cid in (0, 1, 2, 3):
        assert not vsock_peer_allowed(cid, None)
    for cid in (4, 16, 0xFFFFFFFE):
        assert vsock_peer_allowed(cid, None)
    assert vsock_peer_allowed(1, frozenset({1}))
    assert not vsock_peer_allowed(16, frozenset({1}))


def _answer_for(raw: bytes) -> tuple[int | None, bool]:
    """Run a fresh proxy, send ``raw``, return (status or None if closed, still serving)."""

    async def main() -> tuple[int | None, bool]:
        async with running_proxy(("echo.test:443",), header_timeout=0.5) as proxy:
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            status: int | None = None
            with trio.fail_after(10):
                try:
                    await stream.send_all(raw)
                    await stream.send_eof()
                    answer = await read_to_eof(stream)
                except (trio.BrokenResourceError, OSError):
                    answer = b""
            await stream.aclose()
            if answer.startswith(b"HTTP/1.1 "):
                status = int(answer[9:12])
            healthy, _, _ = await request(proxy.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return status, healthy == 200

    return trio.run(main)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=3000),
        st.text(max_size=300).map(lambda t: f"CONNECT {t} HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
        st.lists(
            st.sampled_from(
                [
                    b"GET ",
                    b"CONNECT ",
                    b"/",
                    b":",
                    b"\r\n",
                    b"Host: x",
                    b" ",
                    b"HTTP/1.1",
                    b"HTTP/1.0",
                    b"echo.test:443",
                    b"[",
                    b"]",
                    b"Content-Length: 5",
                    b"Transfer-Encoding: chunked",
                    b"\x00",
                ]
            ),
            max_size=30,
        ).map(b"".join),
    )
)
def test_any_bytes_get_a_clear_answer_and_the_proxy_keeps_serving(raw: bytes) -> None:
    status, healthy = _answer_for(raw)
    assert healthy
    # Never a crash (500) and never a tunnel: echo.test resolves to nothing here.
    assert status is None or status in (200, 400, 403, 404, 405, 408, 431, 502), status


async def test_client_chosen_text_is_capped_in_the_log_event() -> None:
    """A 12 KB CONNECT target must not become a 12 KB log line (target nor reason)."""
    logs = capture_logs()
    long_name = ".".join(["a" * 60] * 200)
    async with running_proxy(("echo.test:443",)) as proxy:
        status, _, _ = await request(
            proxy.port, f"CONNECT {long_name}:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
    assert status == 400
    (event,) = [e for e in log_events(logs) if e.get("event") == "request"]
    assert len(event["target"]) <= 300
    assert len(event["reason"]) <= 300


async def test_expect_100_continue_is_answered() -> None:
    """A client that sends Expect: 100-continue waits for the 100 before its body."""
    async with running_proxy((), header_timeout=2.0) as proxy:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await stream.send_all(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        with trio.fail_after(10):
            status, _, rest = await read_head(stream)
            assert status == 100 and rest == b""
            await stream.send_all(b"{}")
            status, _, _ = await read_head(stream)
        assert status == 200
        await stream.aclose()


async def test_a_peer_over_its_share_is_refused_before_it_sends_a_byte() -> None:
    logs = capture_logs()
    async with running_proxy((), max_tunnels=4, max_tunnels_per_peer=1, header_timeout=60) as proxy:
        held = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        async with held:
            with trio.fail_after(10):
                while proxy.server.active_connections < 1:
                    await trio.sleep(0.01)
            refused = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            async with refused:  # sends nothing: the answer comes anyway, then the close
                with trio.fail_after(10):
                    answer = await read_to_eof(refused)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"connection: close" in head.lower()
    assert json.loads(body) == {
        "error": "over the connection limit: peer 127.0.0.1 has 1 connections open, "
        "its whole share (max_tunnels_per_peer)"
    }
    events = log_events(logs)
    assert len([e for e in events if e["event"] == "connection_refused"]) == 1
    # The refused connection has no request event; the held one, closed unused, has.
    assert [e["outcome"] for e in events if e["event"] == "request"] == ["client_closed"]


async def test_request_events_keep_their_shape() -> None:
    """One ``request`` event per request, with the fields it always had; a kept-alive
    connection's hang-up and a refused connection are none."""
    logs = capture_logs()
    async with tcp_server(echo_handler) as port:
        target = f"127.0.0.1:{port}"
        async with running_proxy((target,)) as proxy:
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            async with stream:
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await read_head(stream))[0] == 200
            assert (await request(proxy.port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 404
            status, tunnel, rest = await open_tunnel(proxy.port, target, early=b"hi")
            assert status == 200
            await tunnel.send_eof()
            assert await read_to_eof(tunnel, rest) == b"hi"
            await tunnel.aclose()
            with trio.fail_after(10):
                while proxy.server.active_connections:
                    await trio.sleep(0.01)
    events = {e["target"]: e for e in log_events(logs) if e["event"] == "request"}
    assert len([e for e in log_events(logs) if e["event"] == "request"]) == 3
    ok, error, connect = events["/healthz"], events["/nope"], events[target]
    assert (ok["target"], ok["status"], ok["outcome"]) == ("/healthz", 200, "ok")
    assert (error["status"], error["outcome"], error["reason"]) == (404, "refused", "no such path")
    assert (connect["method"], connect["status"], connect["outcome"]) == ("CONNECT", 200, "closed")
    assert (connect["upstream"], connect["bytes_up"], connect["bytes_down"]) == (target, 2, 2)
    assert isinstance(connect["spliced"], bool)
    assert {"peer", "method", "target", "status", "outcome", "duration_s"} <= set(ok)
    assert set(error) == set(ok) | {"reason"}
    assert set(connect) == set(ok) | {"upstream", "bytes_up", "bytes_down", "spliced"}
