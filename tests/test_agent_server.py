"""The app server on real sockets, with a stand-in gateway (the real chain is in test_e2e)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import structlog
import trio

from enclave_agent.runtime.config import AccessConfig, Limits
from enclave_agent.runtime.kms import KmsError, KmsGateway, KmsSettings
from enclave_agent.runtime.nsm import request_attestation
from enclave_agent.runtime.server import AppServer, Attester, Gateway
from enclave_agent.runtime.trusted_keys import TrustedKeys
from enclave_common.address import (
    TcpAddress,
    UnixAddress,
    listener_address,
    open_listener,
    parse_address,
)
from enclave_common.logs import configure_logging
from tests.test_kms_fakes import (
    FAKE_KEY_ARN,
    FakeKms,
    FakeNsm,
    FakeRecipient,
    start_kms_and_relay,
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """These tests capture the agent's logs; put back the suite's set-up afterwards."""
    saved = structlog.get_config(), structlog.contextvars.get_contextvars()
    yield
    structlog.configure(**saved[0])
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**saved[1])


@dataclass
class FakeGateway:
    """Same ``call`` signature as kms.KmsGateway."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    hold: trio.Event | None = None
    in_flight: int = 0
    peak: int = 0

    async def call(self, operation: str, request: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append((operation, dict(request)))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.hold is not None:
                await self.hold.wait()
            if request.get("CiphertextBlob") == "ZGVuaWVk":
                raise KmsError("AccessDeniedException", "PCR0 does not match", 400)
            return {"Plaintext": base64.b64encode(b"plain").decode(), "KeyId": "k"}
        finally:
            self.in_flight -= 1


class Secrets:
    def get(self, name: str) -> bytes | None:
        return b"s3cr3t" if name == "db" else None


async def fake_attest(nonce: bytes | None, user_data: bytes | None, pk: bytes | None) -> bytes:
    return b"DOC:" + (nonce or b"")


@dataclass
class Running:
    socket: str
    tcp_port: int
    gateway: FakeGateway
    logs: io.StringIO

    def events(self, name: str) -> list[dict[str, Any]]:
        events = [json.loads(line) for line in self.logs.getvalue().splitlines()]
        return [e for e in events if e["event"] == name]


async def start(
    nursery: trio.Nursery,
    tmp_path: Path,
    access: AccessConfig | None = None,
    limits: Limits | None = None,
    gateway: Gateway | None = None,
    attest: Attester = fake_attest,
) -> Running:
    logs = io.StringIO()
    configure_logging("info", stream=logs, process="test-agent")
    fake = FakeGateway()
    server = AppServer(
        gateway=gateway or fake,
        attest=attest,
        secrets=Secrets(),
        access=access or AccessConfig(),
        limits=limits or Limits(),
    )
    path = str(tmp_path / "agent.sock")
    unix = await open_listener(UnixAddress(path), unix_mode=0o660)
    tcp_requested = TcpAddress("127.0.0.1", 0)
    tcp = await open_listener(tcp_requested)
    port = listener_address(tcp, tcp_requested)
    assert isinstance(port, TcpAddress)
    await nursery.start(
        lambda task_status: server.serve(unix, check_peer=True, task_status=task_status)
    )
    await nursery.start(
        lambda task_status: server.serve(tcp, check_peer=False, task_status=task_status)
    )
    return Running(path, port.port, fake, logs)


@pytest.fixture
async def running(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Running]:
    yield await start(nursery, tmp_path)


async def send_and_read(
    stream: trio.abc.Stream, raw: bytes
) -> list[tuple[int, dict[str, str], bytes]]:
    """Send raw bytes, read responses until the server closes."""
    await stream.send_all(raw)
    client = h11.Connection(h11.CLIENT)
    # h11 needs to know requests were sent to parse responses; feed it a matching count.
    responses = []
    data = b""
    with trio.fail_after(10):
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    del client
    while data:
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        parser.send(h11.EndOfMessage())
        parser.receive_data(data)
        status, headers, body = 0, {}, b""
        while True:
            event = parser.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        responses.append((status, headers, body))
        data = parser.trailing_data[0]
    return responses


def request(
    method: str,
    target: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    close: bool = True,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: agent", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def kms(operation: str, body: dict[str, Any], close: bool = True) -> bytes:
    headers = {
        "X-Amz-Target": f"TrentService.{operation}",
        "Content-Type": "application/x-amz-json-1.1",
    }
    return request("POST", "/", json.dumps(body).encode(), headers, close)


async def unix_exchange(path: str, raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    stream = await trio.open_unix_socket(path)
    async with stream:
        return await send_and_read(stream, raw)


async def test_health_secret_attestation_and_kms(running: Running) -> None:
    [(status, _, body)] = await unix_exchange(running.socket, request("GET", "/healthz"))
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    [(status, _, body)] = await unix_exchange(running.socket, request("GET", "/v1/secrets/db"))
    assert (status, body) == (200, b"s3cr3t")
    [(status, _, body)] = await unix_exchange(running.socket, request("GET", "/v1/secrets/other"))
    assert status == 404 and json.loads(body)["__type"] == "NotFoundException"
    nonce = json.dumps({"nonce": base64.b64encode(b"n1").decode()}).encode()
    [(status, headers, body)] = await unix_exchange(
        running.socket, request("POST", "/v1/attestation", nonce)
    )
    assert (status, body, headers["content-type"]) == (200, b"DOC:n1", "application/octet-stream")
    [(status, headers, body)] = await unix_exchange(
        running.socket, kms("Decrypt", {"CiphertextBlob": "AAAA"})
    )
    assert status == 200
    assert headers["content-type"] == "application/x-amz-json-1.1"
    assert json.loads(body)["Plaintext"] == base64.b64encode(b"plain").decode()
    assert running.gateway.calls == [("Decrypt", {"CiphertextBlob": "AAAA"})]


async def test_kms_error_keeps_its_type_and_the_log_holds_no_secret(running: Running) -> None:
    [(status, _, body)] = await unix_exchange(
        running.socket, kms("Decrypt", {"CiphertextBlob": "ZGVuaWVk"})
    )
    assert status == 400
    assert json.loads(body) == {"__type": "AccessDeniedException", "message": "PCR0 does not match"}
    await unix_exchange(running.socket, request("GET", "/v1/secrets/db"))
    logs = running.logs.getvalue()
    assert '"event": "request"' in logs
    assert "s3cr3t" not in logs and "cGxhaW4" not in logs and "plain" not in logs


async def test_keep_alive_serves_several_requests(running: Running) -> None:
    raw = kms("Decrypt", {"CiphertextBlob": "AAAA"}, close=False) + request("GET", "/healthz")
    responses = await unix_exchange(running.socket, raw)
    assert [status for status, _, _ in responses] == [200, 200]


async def test_requests_are_served_concurrently(running: Running) -> None:
    running.gateway.hold = trio.Event()
    results: list[int] = []

    async def one() -> None:
        [(status, _, _)] = await unix_exchange(
            running.socket, kms("Decrypt", {"CiphertextBlob": "AAAA"})
        )
        results.append(status)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(one)
        with trio.fail_after(10):
            while running.gateway.in_flight < 8:
                await trio.sleep(0.01)
        running.gateway.hold.set()
    assert results == [200] * 8
    assert running.gateway.peak == 8


async def test_caller_not_allowed_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    other = os.getuid() + 4242
    running = await start(nursery, tmp_path, access=AccessConfig(allowed_uids=frozenset({other})))
    [(status, _, body)] = await unix_exchange(
        running.socket, kms("Decrypt", {"CiphertextBlob": "AAAA"})
    )
    assert status == 403
    assert json.loads(body)["__type"] == "AccessDeniedException"
    assert running.gateway.calls == []
    events = [json.loads(line) for line in running.logs.getvalue().splitlines()]
    refused = [e for e in events if e["event"] == "caller_refused"]
    assert refused and refused[0]["uid"] == os.getuid() and refused[0]["pid"] == os.getpid()
    # The TCP listener has no caller check (loopback only, opt-in).
    stream = await trio.open_tcp_stream("127.0.0.1", running.tcp_port)
    async with stream:
        [(status, _, _)] = await send_and_read(stream, request("GET", "/healthz"))
    assert status == 200


async def test_refused_caller_is_answered_before_its_request_and_holds_no_slot(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    other = os.getuid() + 4242
    running = await start(
        nursery,
        tmp_path,
        access=AccessConfig(allowed_uids=frozenset({other})),
        limits=Limits(max_connections=1, header_timeout=60, idle_timeout=60),
    )
    # A refused caller that sends nothing is answered at once (its request is never
    # read), and while it stays connected an allowed app still gets the one slot.
    silent = await trio.open_unix_socket(running.socket)
    async with silent:
        with trio.fail_after(10):
            answer = await silent.receive_some(65536)
        assert answer.startswith(b"HTTP/1.1 403 ")
        assert b"AccessDeniedException" in answer
        stream = await trio.open_tcp_stream("127.0.0.1", running.tcp_port)
        async with stream:
            [(status, _, _)] = await send_and_read(stream, request("GET", "/healthz"))
        assert status == 200


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a child other groups needs root")
async def test_a_callers_supplementary_group_is_allowed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The socket's mode lets a supplementary member of socket_group connect; the gid
    # rule must then admit it too (SO_PEERCRED alone names only the primary gid).
    running = await start(
        nursery,
        tmp_path,
        access=AccessConfig(
            allowed_uids=frozenset({os.getuid() + 4242}), allowed_gids=frozenset({4243})
        ),
    )
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "s.sendall(b'GET /healthz HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n')\n"
        "print(s.recv(100).split()[1].decode())\n"
    )

    async def status_with(groups: list[int]) -> str:
        result = await trio.run_process(
            [sys.executable, "-c", script, running.socket],
            capture_stdout=True,
            extra_groups=groups,
        )
        return str(result.stdout.decode().strip())

    assert await status_with([4244, 4243]) == "200"
    assert await status_with([4244]) == "403"


async def test_body_limit(nursery: trio.Nursery, tmp_path: Path) -> None:
    running = await start(nursery, tmp_path, limits=Limits(max_body_bytes=100))
    [(status, _, body)] = await unix_exchange(
        running.socket, kms("Decrypt", {"CiphertextBlob": "A" * 200})
    )
    assert status == 413
    assert json.loads(body)["__type"] == "RequestEntityTooLargeException"
    chunked = (
        b"POST / HTTP/1.1\r\nHost: a\r\nX-Amz-Target: TrentService.Decrypt\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"40\r\n"
        + b"x" * 64
        + b"\r\n"
        + b"40\r\n"
        + b"x" * 64
        + b"\r\n0\r\n\r\n"
    )
    [(status, _, _)] = await unix_exchange(running.socket, chunked)
    assert status == 413
    assert running.gateway.calls == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nNo-Host-Header: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: nope\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 20000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 20000, 431),
    ],
)
async def test_malformed_requests_get_4xx(running: Running, raw: bytes, expected: int) -> None:
    [(status, _, body)] = await unix_exchange(running.socket, raw)
    assert status == expected
    assert "__type" in json.loads(body)
    # ... and the server keeps serving others.
    [(status, _, _)] = await unix_exchange(running.socket, request("GET", "/healthz"))
    assert status == 200


async def test_clients_that_vanish_before_their_answer_do_not_stop_the_server(
    running: Running,
) -> None:
    # The answer to each of these meets a closed socket (EPIPE); that once escaped the
    # connection's task and ended the whole server.
    for raw in (b"NOT HTTP AT ALL\r\n\r\n", request("GET", "/healthz", close=False)):
        for _ in range(20):
            stream = await trio.open_unix_socket(running.socket)
            await stream.send_all(raw)
            await stream.aclose()
    [(status, _, _)] = await unix_exchange(running.socket, request("GET", "/healthz"))
    assert status == 200


async def test_a_client_that_never_reads_its_answers_loses_its_slot(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    running = await start(nursery, tmp_path, limits=Limits(max_connections=1, idle_timeout=0.5))
    nonce = json.dumps({"nonce": base64.b64encode(b"n" * 1024).decode()}).encode()
    one = request("POST", "/v1/attestation", nonce, close=False)
    stuck = await trio.open_unix_socket(running.socket)
    async with stuck, trio.open_nursery() as pipeline:

        async def flood() -> None:
            # Far more answers than the socket buffers hold, never read.
            with contextlib.suppress(trio.BrokenResourceError):
                for _ in range(1000):
                    await stuck.send_all(one)

        pipeline.start_soon(flood)
        seen: list[int] = []
        with trio.fail_after(20):
            # First the stuck client holds the one slot (503), then it is cut off (200).
            while seen[-1:] != [200] or 503 not in seen:
                [(status, _, _)] = await unix_exchange(running.socket, request("GET", "/healthz"))
                if status == 503 or 503 in seen:
                    seen.append(status)
                await trio.sleep(0.05)
        pipeline.cancel_scope.cancel()


async def test_slow_and_idle_clients_are_cut_off(nursery: trio.Nursery, tmp_path: Path) -> None:
    running = await start(nursery, tmp_path, limits=Limits(header_timeout=0.3, idle_timeout=0.3))
    # A trickling client: headers started but never finished → 408, then closed.
    stream = await trio.open_unix_socket(running.socket)
    async with stream:
        [(status, _, _)] = await send_and_read(stream, b"GET /healthz HTTP/1.1\r\nHost:")
    assert status == 408
    # An idle client: nothing sent → closed without an answer.
    stream = await trio.open_unix_socket(running.socket)
    async with stream:
        with trio.fail_after(10):
            assert await stream.receive_some(100) == b""


async def test_connection_limit(nursery: trio.Nursery, tmp_path: Path) -> None:
    running = await start(nursery, tmp_path, limits=Limits(max_connections=1))
    holder = await trio.open_unix_socket(running.socket)
    async with holder:
        await holder.send_all(request("GET", "/healthz", close=False))
        assert b"200" in await holder.receive_some(1000)
        [(status, _, body)] = await unix_exchange(running.socket, request("GET", "/healthz"))
        assert status == 503
        assert json.loads(body)["__type"] == "ThrottlingException"


async def test_a_caller_over_its_share_is_refused_before_it_sends_a_byte(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    running = await start(nursery, tmp_path, limits=Limits(max_connections=1))
    holder = await trio.open_unix_socket(running.socket)
    async with holder:
        await holder.send_all(request("GET", "/healthz", close=False))
        assert b"200" in await holder.receive_some(1000)
        refused = await trio.open_unix_socket(running.socket)
        async with refused:  # sends nothing: the answer comes anyway, then the close
            data = b""
            with trio.fail_after(10):
                while chunk := await refused.receive_some(65536):
                    data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"connection: close" in head.lower()
    assert json.loads(body)["__type"] == "ThrottlingException"
    [event] = running.events("connection_refused")
    assert event["limit"] == "limits.max_connections"
    assert [e["path"] for e in running.events("request")] == ["/healthz"]


async def test_a_stuck_nsm_costs_the_attestation_its_deadline_and_nothing_more(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The NSM ioctl blocks: /v1/attestation answers at its deadline (kms_call_timeout),
    abandoning the call, and the agent keeps serving everything else."""
    release = threading.Event()

    class StuckNsm(FakeNsm):
        def attestation(self, **fields: bytes | None) -> bytes:
            release.wait(30)
            return super().attestation(**fields)

    nsm = StuckNsm()

    async def attest(nonce: bytes | None, user_data: bytes | None, pk: bytes | None) -> bytes:
        return await request_attestation(nsm, nonce=nonce, user_data=user_data, public_key=pk)

    running = await start(nursery, tmp_path, limits=Limits(kms_call_timeout=0.5), attest=attest)
    path = running.socket
    try:
        with trio.fail_after(20):
            [(status, _, body)] = await unix_exchange(
                path, request("POST", "/v1/attestation", b"{}")
            )
            assert (status, json.loads(body)) == (
                503,
                {
                    "__type": "DependencyTimeoutException",
                    "message": "the NSM did not answer within 0.5 s",
                },
            )
            [(status, _, _)] = await unix_exchange(path, request("GET", "/healthz"))
            assert status == 200
    finally:
        release.set()
    # Once the NSM returns, attestation works again.
    [(status, _, body)] = await unix_exchange(path, request("POST", "/v1/attestation", b"{}"))
    assert (status, body) == (200, b"ATTESTATION:")
    assert nsm.calls == 2


async def test_boto3_over_tcp_listener(running: Running) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    def use_boto3() -> tuple[bytes, str]:
        client = boto3.client(
            "kms",
            region_name="us-east-1",
            endpoint_url=f"http://127.0.0.1:{running.tcp_port}",
            aws_access_key_id="unused",
            aws_secret_access_key="unused",
            config=Config(retries={"max_attempts": 1}),
        )
        answer = client.decrypt(CiphertextBlob=b"\x00\x00\x00")
        try:
            client.decrypt(CiphertextBlob=b"denied")
        except ClientError as exc:
            assert exc.response["Error"]["Code"] == "AccessDeniedException"
            return answer["Plaintext"], exc.response["Error"]["Message"]
        raise AssertionError("expected AccessDeniedException")

    plaintext, message = await trio.to_thread.run_sync(use_boto3)
    assert plaintext == b"plain"
    assert message == "PCR0 does not match"


async def test_expect_100_continue(running: Running) -> None:
    body = json.dumps({"CiphertextBlob": "AAAA"}).encode()
    head = (
        "POST / HTTP/1.1\r\nHost: a\r\nX-Amz-Target: TrentService.Decrypt\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    stream = await trio.open_unix_socket(running.socket)
    async with stream:
        await stream.send_all(head)
        with trio.fail_after(10):
            interim = await stream.receive_some(1000)
        assert interim.startswith(b"HTTP/1.1 100 ")
        await stream.send_all(body)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")


# --- each caller's share: one at its cap never stops another -------------------------

OTHER_UID = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a caller of another uid needs root")
# Run as root, then drop to another uid (group 0, so the socket's mode 0660 lets it
# in): the interpreter is loaded before, so it need not be readable by that uid.
_AS_OTHER_UID = """
import os, socket, sys
os.setgroups([])
os.setgid(0)
os.setuid(int(sys.argv[1]))
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(sys.argv[2])
s.sendall(sys.stdin.buffer.read())
while chunk := s.recv(65536):
    sys.stdout.buffer.write(chunk)
"""


async def exchange_as_other_uid(path: str, raw: bytes) -> tuple[int, bytes]:
    """One request from a process of uid OTHER_UID: (status, body)."""
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-c", _AS_OTHER_UID, str(OTHER_UID), path],
            stdin=raw,
            capture_stdout=True,
        )
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A socket directory another uid in group 0 can reach (pytest's tmp_path is not)."""
    path = Path(tempfile.mkdtemp(prefix="agent-shares-"))
    path.chmod(0o750)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def hold_until_refused(
    connect: Callable[[], Awaitable[trio.SocketStream]], most: int
) -> tuple[list[trio.SocketStream], bytes]:
    """Open kept-alive connections, each answered, until one is refused: (held, refusal)."""
    held: list[trio.SocketStream] = []
    with trio.fail_after(20):
        while len(held) <= most:
            stream = await connect()
            await stream.send_all(request("GET", "/healthz", close=False))
            answer = await stream.receive_some(65536)
            if not answer.startswith(b"HTTP/1.1 200 "):
                await stream.aclose()
                return held, answer
            held.append(stream)
    raise AssertionError(f"{len(held)} connections held, none refused")


def refusal_message(answer: bytes) -> str:
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:100]
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["__type"] == "ThrottlingException"
    return str(body["message"])


@needs_root
async def test_one_uid_holding_its_connections_does_not_stop_another_uid(
    nursery: trio.Nursery, shared_dir: Path
) -> None:
    running = await start(
        nursery,
        shared_dir,
        access=AccessConfig(allowed_uids=frozenset({0, OTHER_UID})),
        limits=Limits(max_connections=8, max_connections_per_uid=4, idle_timeout=60),
    )
    held, refusal = await hold_until_refused(lambda: trio.open_unix_socket(running.socket), 8)
    try:
        # Root keeps every connection it got alive, and still another uid is served.
        status, _ = await exchange_as_other_uid(running.socket, request("GET", "/healthz"))
        assert status == 200
        assert len(held) == 4
        assert refusal_message(refusal) == (
            "uid 0 has 4 connections open, its whole share (limits.max_connections_per_uid)"
        )
        [event] = running.events("connection_refused")
        assert (event["caller"], event["limit"]) == ("uid=0", "limits.max_connections_per_uid")
        for stream in held:  # re-used within idle_timeout: still root's
            await stream.send_all(request("GET", "/healthz", close=False))
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
    finally:
        for stream in held:
            await stream.aclose()


async def test_the_tcp_listeners_callers_at_their_share_do_not_stop_the_unix_socket(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    running = await start(
        nursery, tmp_path, limits=Limits(max_connections=4, max_connections_per_uid=2)
    )
    held, refusal = await hold_until_refused(
        lambda: trio.open_tcp_stream("127.0.0.1", running.tcp_port), 4
    )
    try:
        # The TCP listener's budget is its own: every Unix socket connection is still there.
        unix, unix_refusal = await hold_until_refused(
            lambda: trio.open_unix_socket(running.socket), 4
        )
        assert (len(held), len(unix)) == (2, 2)
        for stream in unix:
            await stream.aclose()
        assert refusal_message(refusal) == (
            "the TCP listener's callers have 2 connections open, their whole share "
            "(limits.max_connections_per_uid)"
        )
        assert "limits.max_connections_per_uid" in refusal_message(unix_refusal)
        events = running.events("connection_refused")
        assert [e["caller"] for e in events] == ["tcp", f"uid={os.getuid()}"]
    finally:
        for stream in held:
            await stream.aclose()


async def held_kms(
    nursery: trio.Nursery, shared_dir: Path, limits: Limits, access: AccessConfig | None = None
) -> tuple[Running, FakeKms, KmsGateway]:
    """The agent over a real KmsGateway to a fake KMS that holds every Decrypt for as
    long as the test likes (``fake_kms.release``)."""
    fake_kms, relay, ca_path = await start_kms_and_relay(shared_dir, nursery)
    fake_kms.hold_if = lambda seen: seen.headers["x-amz-target"].endswith(".Decrypt")
    settings = KmsSettings(
        region="us-east-1",
        proxy=parse_address(relay.address),
        endpoint=f"https://127.0.0.1:{fake_kms.port}",
        ca_bundle=str(ca_path),
        pool_size=limits.kms_pool_size,
        trusted_keys=TrustedKeys.parse([FAKE_KEY_ARN]),
    )
    gateway = KmsGateway(settings, FakeNsm(), FakeRecipient())
    running = await start(nursery, shared_dir, access=access, limits=limits, gateway=gateway)
    return running, fake_kms, gateway


@needs_root
async def test_one_uid_at_its_share_of_kms_calls_does_not_stop_another_uid(
    nursery: trio.Nursery, shared_dir: Path
) -> None:
    running, fake_kms, gateway = await held_kms(
        nursery,
        shared_dir,
        Limits(kms_pool_size=4, max_kms_calls_per_uid=2),
        AccessConfig(allowed_uids=frozenset({0, OTHER_UID})),
    )
    answers: list[tuple[int, dict[str, str], bytes]] = []

    async def held_call() -> None:
        answers.extend(
            await unix_exchange(running.socket, kms("Decrypt", {"CiphertextBlob": "AAAA"}))
        )

    try:
        async with trio.open_nursery() as calls:
            for _ in range(6):  # more than the whole pool
                calls.start_soon(held_call)
            with trio.fail_after(20):
                while len(fake_kms.seen) < 2:
                    await trio.sleep(0.01)
            # Root's two calls hold two of the four pooled connections and its other
            # four wait in root's own queue; the other uid's call takes a free pooled
            # connection instead of queueing behind root's.
            status, body = await exchange_as_other_uid(
                running.socket, kms("GenerateRandom", {"NumberOfBytes": 16})
            )
            assert status == 200
            assert base64.b64decode(json.loads(body)["Plaintext"]) == b"r" * 16
            decrypts = [s for s in fake_kms.seen if s.headers["x-amz-target"].endswith("Decrypt")]
            assert len(decrypts) == 2 and answers == []
            fake_kms.release.set()
    finally:
        await gateway.aclose()
    # Nothing was lost: root's queued calls ran once its share freed up.
    assert sorted(status for status, _, _ in answers) == [200] * 6
    assert running.events("kms_call_refused") == []
    logs = running.logs.getvalue()
    for secret in (b"the secret", b"r" * 16):
        assert base64.b64encode(secret).decode() not in logs
    assert "fake-secret-key-do-not-log" not in logs and "fake-session-token" not in logs


async def test_a_kms_call_waits_for_its_callers_share_at_most_the_call_timeout(
    nursery: trio.Nursery, shared_dir: Path
) -> None:
    running, fake_kms, gateway = await held_kms(
        nursery,
        shared_dir,
        Limits(kms_pool_size=2, max_kms_calls_per_uid=1, kms_call_timeout=0.5),
    )
    answers: list[tuple[int, dict[str, str], bytes]] = []

    async def held_call() -> None:
        answers.extend(
            await unix_exchange(running.socket, kms("Decrypt", {"CiphertextBlob": "AAAA"}))
        )

    try:
        async with trio.open_nursery() as calls:
            calls.start_soon(held_call)
            with trio.fail_after(20):
                while not fake_kms.seen:
                    await trio.sleep(0.01)
            # The first call holds the caller's only share; the second waits for it
            # for kms_call_timeout, then is refused without being started.
            [(status, _, body)] = await unix_exchange(
                running.socket, kms("Decrypt", {"CiphertextBlob": "BBBB"})
            )
            assert status == 503
            assert json.loads(body) == {
                "__type": "ThrottlingException",
                "message": f"uid {os.getuid()} kept 1 KMS calls in flight, the whole share "
                "(limits.max_kms_calls_per_uid), for the 0.5 s this call waited: "
                "it was not started",
            }
            assert len(fake_kms.seen) == 1
            fake_kms.release.set()
    finally:
        await gateway.aclose()
    [event] = running.events("kms_call_refused")
    assert event["limit"] == "limits.max_kms_calls_per_uid" and event["operation"] == "Decrypt"
