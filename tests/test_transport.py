"""CONNECT tunnel, TLS inside it, and the kept-alive connection pool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_agent.runtime.transport import (
    ConnectionPool,
    TransportError,
    establish_tunnel,
    http_get,
    make_ssl_context,
    open_tunnel,
)
from enclave_common.address import parse_address
from tests.support.kms_fakes import FakeKms, Relay, start_kms_and_relay
from tests.support.raw_http import raw_server, read_head

HEADERS = [("X-Amz-Target", "TrentService.GenerateRandom")]


async def test_tunnel_keeps_bytes_that_came_with_the_connect_answer(nursery: trio.Nursery) -> None:
    async def proxy(stream: trio.SocketStream) -> None:
        head = await read_head(stream)
        assert head.startswith(b"CONNECT kms.example:443 HTTP/1.1\r\n")
        assert b"host: kms.example:443" in head.lower()
        await stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\nEARLY")
        while data := await stream.receive_some(4096):
            await stream.send_all(data)

    address = await raw_server(nursery, proxy)
    tunnel = await open_tunnel(parse_address(address), "kms.example", 443)
    received = b""
    while len(received) < 5:
        received += await tunnel.receive_some(2)
    assert received == b"EARLY"
    await tunnel.send_all(b"ping")
    assert await tunnel.receive_some(10) == b"ping"
    await tunnel.aclose()


@pytest.mark.parametrize(
    ("answer", "fragment", "retryable"),
    [
        (b"", "closed the connection before answering CONNECT", True),
        (b"garbage\r\n\r\n", "broke the CONNECT exchange", True),
        (
            b'HTTP/1.1 403 Forbidden\r\nContent-Length: 28\r\n\r\n{"error": "not allowlisted"}',
            "proxy refused CONNECT kms.example:443: 403 not allowlisted",
            False,
        ),
        (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
            "proxy refused CONNECT kms.example:443: 503 Service Unavailable",
            True,
        ),
        (
            b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 5\r\n\r\n<bad>",
            "504 Gateway Timeout",
            True,
        ),
        (
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 4000\r\n\r\n" + b"[" * 4000,
            "502 Bad Gateway",
            True,
        ),
        (
            b"HTTP/1.1 403 \x85Forbidden\r\nContent-Length: 0\r\n\r\n",
            "403 Forbidden",
            False,
        ),
    ],
)
async def test_connect_failures(
    nursery: trio.Nursery, answer: bytes, fragment: str, retryable: bool
) -> None:
    async def proxy(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(answer)
        await stream.aclose()

    address = await raw_server(nursery, proxy)
    with pytest.raises(TransportError) as info:
        await open_tunnel(parse_address(address), "kms.example", 443)
    assert fragment in info.value.message
    assert info.value.retryable is retryable


async def test_ipv6_connect_target(nursery: trio.Nursery) -> None:
    heads: list[bytes] = []

    async def proxy(stream: trio.SocketStream) -> None:
        heads.append(await read_head(stream))
        await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    address = await raw_server(nursery, proxy)
    with pytest.raises(TransportError):
        await open_tunnel(parse_address(address), "::1", 8443)
    assert heads[0].startswith(b"CONNECT [::1]:8443 HTTP/1.1")


@pytest.fixture
async def kms_and_relay(tmp_path: Path, nursery: trio.Nursery) -> tuple[FakeKms, Relay, str]:
    kms, relay, ca_path = await start_kms_and_relay(tmp_path, nursery)
    return kms, relay, str(ca_path)


def pool_for(setup: tuple[FakeKms, Relay, str], **options: float) -> ConnectionPool:
    kms, relay, ca = setup
    return ConnectionPool(
        parse_address(relay.address),
        "127.0.0.1",
        kms.port,
        make_ssl_context(ca),
        label="KMS",
        **options,  # type: ignore[arg-type]
    )


async def test_pool_reuses_last_in_first_out_and_stays_bounded(
    kms_and_relay: tuple[FakeKms, Relay, str],
) -> None:
    kms, relay, _ = kms_and_relay
    kms.delay = 0.05
    pool = pool_for(kms_and_relay, pool_size=3)

    async def one() -> None:
        response = await pool.request("POST", "/", HEADERS, b"{}")
        assert response.status == 200

    async with trio.open_nursery() as nursery:
        for _ in range(9):
            nursery.start_soon(one)
    assert pool.connections_opened == 3 == kms.connections == relay.tunnels
    assert pool.idle_connections == 3
    kms.delay = 0
    before = len(kms.seen)
    for _ in range(4):
        await pool.request("POST", "/", HEADERS, b"{}")
    used = {seen.connection for seen in kms.seen[before:]}
    assert len(used) == 1  # the warmest connection, again and again
    assert kms.seen[-1].headers["host"] == f"127.0.0.1:{kms.port}"
    assert kms.seen[-1].headers["content-length"] == "2"
    await pool.aclose()
    assert pool.idle_connections == 0
    with pytest.raises(TransportError, match="closed"):
        await pool.request("POST", "/", HEADERS, b"{}")


async def test_idle_connections_expire(kms_and_relay: tuple[FakeKms, Relay, str]) -> None:
    kms, _, _ = kms_and_relay
    pool = pool_for(kms_and_relay, idle_timeout=0.05)
    await pool.request("POST", "/", HEADERS, b"{}")
    await trio.sleep(0.1)
    await pool.request("POST", "/", HEADERS, b"{}")
    assert kms.connections == 2 and pool.connections_opened == 2
    await pool.aclose()


async def test_oversized_answer_is_an_error(kms_and_relay: tuple[FakeKms, Relay, str]) -> None:
    kms, _, _ = kms_and_relay
    kms.script.append((200, b"x" * 5000))
    pool = pool_for(kms_and_relay, max_response_bytes=4096)
    with pytest.raises(TransportError, match="exceeds 4096 bytes"):
        await pool.request("POST", "/", HEADERS, b"{}")
    assert pool.idle_connections == 0
    await pool.aclose()


@pytest.mark.parametrize("value", ["secret-token\r\nX-Injected: 1", "secr\u00e9t-token"])
async def test_a_header_h11_refuses_is_not_echoed(
    kms_and_relay: tuple[FakeKms, Relay, str], value: str
) -> None:
    """A header value that cannot be sent (e.g. a junk session token) fails without
    quoting the value: the message goes to the app and the log."""
    kms, _, _ = kms_and_relay
    pool = pool_for(kms_and_relay)
    with pytest.raises(TransportError) as info:
        await pool.request("POST", "/", [*HEADERS, ("X-Amz-Security-Token", value)], b"{}")
    assert "secr" not in info.value.message and not info.value.retryable
    assert kms.seen == [] and pool.idle_connections == 0
    await pool.aclose()


async def test_wrong_ca_fails_before_any_byte_is_sent(
    kms_and_relay: tuple[FakeKms, Relay, str], tmp_path: Path
) -> None:
    kms, relay, _ = kms_and_relay
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    pool = ConnectionPool(
        parse_address(relay.address),
        "127.0.0.1",
        kms.port,
        make_ssl_context(str(other)),
        label="KMS",
    )
    with pytest.raises(TransportError) as info:
        await pool.request("POST", "/", HEADERS, b'{"secret": "never sent"}')
    assert info.value.message.startswith("TLS certificate verification failed for 127.0.0.1:")
    assert not info.value.retryable
    assert kms.seen == []
    assert b"never sent" not in relay.relayed


async def test_http_get(nursery: trio.Nursery) -> None:
    relay = Relay()
    await relay.serve(nursery)
    response = await http_get(parse_address(relay.address), "/v1/credentials")
    assert response.status == 200
    assert json.loads(response.body)["AccessKeyId"] == "AKIDFAKEFAKEFAKE"
    assert "AKID" not in repr(response)
    response = await http_get(parse_address(relay.address), "/other")
    assert response.status == 405

    async def silent(stream: trio.SocketStream) -> None:
        await read_head(stream)

    address = await raw_server(nursery, silent)
    with pytest.raises(TransportError, match="closed the connection before answering GET"):
        await http_get(parse_address(address), "/v1/credentials")


def test_ca_bundle_errors_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot load the CA bundle"):
        make_ssl_context(str(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ValueError, match="cannot load the CA bundle"):
        make_ssl_context(str(junk))
    assert make_ssl_context(None).check_hostname


answers = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda status, reason, headers, body: (
            b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (status, reason, headers, body)
        ),
        st.integers(100, 599),
        st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b),
        st.sampled_from(
            [
                b"",
                b"Content-Length: 5\r\n",
                b"Transfer-Encoding: chunked\r\n",
                b"Content-Length: x\r\n",
                b"Connection: close\r\n",
            ]
        ),
        st.binary(max_size=60) | st.just(b'{"error": "no\\nway\\u0000"}'),
    ),
)


@settings(max_examples=200, deadline=None)
@given(answers)
def test_any_connect_answer_gives_a_tunnel_or_a_transport_error(answer: bytes) -> None:
    async def scenario() -> None:
        client, proxy_side = trio.testing.memory_stream_pair()

        async def proxy() -> None:
            await proxy_side.receive_some()
            await proxy_side.send_all(answer)
            await proxy_side.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy)
            try:
                tunnel = await establish_tunnel(client, "test-proxy", "kms.example", 443)
            except TransportError as exc:
                assert exc.message.isprintable()
                return
            await tunnel.aclose()

    trio.run(scenario)


def test_host_header_authority() -> None:
    proxy = parse_address("tcp:127.0.0.1:1")
    context = make_ssl_context(None)
    assert [
        ConnectionPool(proxy, host, port, context, label="KMS").authority
        for host, port in [("kms.eu-west-1.amazonaws.com", 443), ("::1", 443), ("::1", 8443)]
    ] == ["kms.eu-west-1.amazonaws.com", "[::1]", "[::1]:8443"]
