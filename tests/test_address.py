import socket

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from enclave_common.address import (
    VMADDR_CID_ANY,
    AddressError,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    is_loopback_host,
    listener_address,
    open_listener,
    open_stream,
    parse_address,
)
from tests.support.fuzzing import parsed_or_refused


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vsock:3:8000", VsockAddress(3, 8000)),
        ("vsock:ANY:8000", VsockAddress(VMADDR_CID_ANY, 8000)),
        ("vsock:any:1", VsockAddress(VMADDR_CID_ANY, 1)),
        ("tcp:127.0.0.1:0", TcpAddress("127.0.0.1", 0)),
        ("tcp:[::1]:443", TcpAddress("::1", 443)),
        ("tcp:localhost:8000", TcpAddress("localhost", 8000)),
        ("unix:/run/x.sock", UnixAddress("/run/x.sock")),
    ],
)
def test_parse_and_format_round_trip(text: str, expected: object) -> None:
    parsed = parse_address(text)
    assert parsed == expected
    assert parse_address(str(parsed)) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "8000",
        "http://x",
        "tcp:host",
        "tcp::80",
        "tcp:::1:80",
        "tcp:h:99999",
        "tcp:h:-1",
        "vsock:3",
        "vsock:x:1",
        "unix:",
        "udp:1.2.3.4:5",
    ],
)
def test_bad_addresses_are_refused_with_a_clear_error(text: str) -> None:
    with pytest.raises(AddressError, match="expected|must|out of range|unknown|brackets"):
        parse_address(text)


@given(st.text(max_size=60))
def test_parser_raises_only_address_error(text: str) -> None:
    parsed_or_refused(parse_address, text, AddressError)


async def test_tcp_and_unix_listen_and_connect(tmp_path) -> None:
    for requested in (TcpAddress("127.0.0.1", 0), UnixAddress(str(tmp_path / "s.sock"))):
        listener = await open_listener(requested)
        bound = listener_address(listener, requested)
        async with listener:
            with trio.fail_after(5):
                client = await open_stream(bound)
                server = await listener.accept()
                await client.send_all(b"ping")
                assert await server.receive_some(4) == b"ping"
                await client.aclose()
                await server.aclose()


async def test_stale_unix_socket_is_replaced_but_a_live_one_is_not(tmp_path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    listener = await open_listener(UnixAddress(str(path)))
    async with listener:
        with pytest.raises(OSError, match="in use"):
            await open_listener(UnixAddress(str(path)))
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(OSError, match="not a socket"):
        await open_listener(UnixAddress(str(regular)))


@pytest.mark.skipif(not hasattr(socket, "AF_VSOCK"), reason="no AF_VSOCK on this system")
async def test_vsock_listener_binds_without_connecting() -> None:
    # Binding is the most a test may do with vsock on development machines.
    try:
        listener = await open_listener(VsockAddress(VMADDR_CID_ANY, 0))
    except OSError as exc:
        pytest.skip(f"vsock bind unavailable here: {exc}")
    async with listener:
        assert isinstance(listener_address(listener, VsockAddress(VMADDR_CID_ANY, 0)), VsockAddress)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),  # a name: the agent checks what it resolved to once bound
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_the_one_loopback_rule_for_listeners_without_a_caller_check(
    host: str, loopback: bool
) -> None:
    # The agent's listen.tcp and local-kms --host (enclave_common.address).
    assert is_loopback_host(host) is loopback
