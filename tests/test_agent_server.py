"""The app server on real sockets, with a stand-in gateway (the real chain is in test_e2e)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import pwd
import shutil
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from enclave_agent.runtime.callers import Callers
from enclave_agent.runtime.config import AccessConfig, Limits
from enclave_agent.runtime.kms import KmsError, KmsGateway, KmsSettings
from enclave_agent.runtime.nsm import request_attestation
from enclave_agent.runtime.peercred import database_groups, is_uid_allowed
from enclave_agent.runtime.secrets import Served
from enclave_agent.runtime.server import AppServer, Attester, Gateway
from enclave_agent.runtime.trusted_keys import TrustedKeys
from enclave_common.address import (
    TcpAddress,
    UnixAddress,
    listener_address,
    open_listener,
    parse_address,
)
from enclave_common.inet_diag import Answer, Endpoint, FourTuple
from enclave_common.logs import configure_logging
from enclave_common.tcp_peercred import Query, ask_kernel
from tests.support.inet_diag_answers import DONE, FIN_WAIT1, SEQ, socket_answer
from tests.support.kms_fakes import (
    FAKE_KEY_ARN,
    FakeKms,
    FakeNsm,
    FakeRecipient,
    start_kms_and_relay,
)

# These tests capture the agent's logs: the suite's set-up is put back after each.
pytestmark = pytest.mark.usefixtures("restore_logging")


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


@dataclass
class Secrets:
    """The server's view of secrets.SecretStore: one secret, at v1 until ``rotated``
    (then v2); a long-poll past v1 waits for that."""

    rotated: trio.Event = field(default_factory=trio.Event)
    waiting: int = 0  # long-polls held now

    async def wait_for(self, name: str, after: str | None, wait: float) -> Served | None:
        if name != "db":
            return None
        if after == "v1":
            self.waiting += 1
            try:
                with trio.move_on_after(wait):
                    await self.rotated.wait()
            finally:
                self.waiting -= 1
        return Served(b"s3cr3t", "v2" if self.rotated.is_set() else "v1")

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}


async def fake_attest(nonce: bytes | None, user_data: bytes | None, pk: bytes | None) -> bytes:
    return b"DOC:" + (nonce or b"")


@dataclass
class Running:
    socket: str
    tcp_port: int
    gateway: FakeGateway
    logs: io.StringIO
    secrets: Secrets

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
    tcp_callers: Callers = Callers.TCP,
    query: Query = ask_kernel,
) -> Running:
    logs = io.StringIO()
    configure_logging("info", stream=logs, process="test-agent")
    fake = FakeGateway()
    secrets = Secrets()
    server = AppServer(
        gateway=gateway or fake,
        attest=attest,
        secrets=secrets,
        access=access or AccessConfig(),
        limits=limits or Limits(),
        query=query,
    )
    path = str(tmp_path / "agent.sock")
    unix = await open_listener(UnixAddress(path), unix_mode=0o660)
    tcp_requested = TcpAddress("127.0.0.1", 0)
    tcp = await open_listener(tcp_requested)
    port = listener_address(tcp, tcp_requested)
    assert isinstance(port, TcpAddress)
    await nursery.start(
        lambda task_status: server.serve(unix, callers=Callers.UNIX, task_status=task_status)
    )
    await nursery.start(
        lambda task_status: server.serve(tcp, callers=tcp_callers, task_status=task_status)
    )
    return Running(path, port.port, fake, logs, secrets)


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
    [(status, headers, body)] = await unix_exchange(
        running.socket, request("GET", "/v1/secrets/db")
    )
    assert (status, body, headers["x-secret-version"]) == (200, b"s3cr3t", "v1")
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
    assert refused[0]["listener"] == "unix"
    # The TCP listener checks its callers too (inet_diag), with the same answer.
    stream = await trio.open_tcp_stream("127.0.0.1", running.tcp_port)
    async with stream:
        [(status, _, body)] = await send_and_read(stream, request("GET", "/healthz"))
    assert status == 403
    assert json.loads(body)["__type"] == "AccessDeniedException"
    assert running.events("caller_refused")[-1]["listener"] == "tcp"


async def test_refused_caller_is_answered_before_its_request_and_holds_no_slot(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    other = os.getuid() + 4242
    running = await start(
        nursery,
        tmp_path,
        access=AccessConfig(allowed_uids=frozenset({other})),
        limits=Limits(max_connections=2, header_timeout=60, idle_timeout=60),
        tcp_callers=Callers.TCP_OPEN,  # here: an app the rules cannot refuse
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
# in): the interpreter is loaded before, so it need not be readable by that uid. The
# target is a socket path or tcp:HOST:PORT.
_AS_OTHER_UID = """
import os, socket, sys
os.setgroups([])
os.setgid(0)
os.setuid(int(sys.argv[1]))
if sys.argv[2].startswith("tcp:"):
    host, _, port = sys.argv[2][len("tcp:"):].rpartition(":")
    s = socket.socket()
    address = (host, int(port))
else:
    s = socket.socket(socket.AF_UNIX)
    address = sys.argv[2]
s.settimeout(30)
s.connect(address)
s.sendall(sys.stdin.buffer.read())
while chunk := s.recv(65536):
    sys.stdout.buffer.write(chunk)
"""


async def exchange_as_other_uid(target: str, raw: bytes, uid: int = OTHER_UID) -> tuple[int, bytes]:
    """One request from a process of ``uid``: (status, body)."""
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-c", _AS_OTHER_UID, str(uid), target],
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


@pytest.mark.parametrize(
    ("tcp_callers", "holder", "whose"),
    [
        # Checked: the uid's share of the TCP listener's own budget.
        (Callers.TCP, f"uid={os.getuid()}", f"uid {os.getuid()} has 2 connections open, its"),
        # tcp_open: all TCP callers are one caller.
        (Callers.TCP_OPEN, "tcp", "the TCP listener's callers have 2 connections open, their"),
    ],
)
async def test_the_tcp_listeners_callers_at_their_share_do_not_stop_the_unix_socket(
    nursery: trio.Nursery, tmp_path: Path, tcp_callers: Callers, holder: str, whose: str
) -> None:
    running = await start(
        nursery,
        tmp_path,
        limits=Limits(max_connections=4, max_connections_per_uid=2),
        tcp_callers=tcp_callers,
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
        assert refusal_message(refusal) == f"{whose} whole share (limits.max_connections_per_uid)"
        assert "limits.max_connections_per_uid" in refusal_message(unix_refusal)
        events = running.events("connection_refused")
        assert [e["caller"] for e in events] == [holder, f"uid={os.getuid()}"]
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


async def held_decrypt(socket: str, answers: list[tuple[int, dict[str, str], bytes]]) -> None:
    """One Decrypt (the fake KMS holds it until released); its answer goes to ``answers``."""
    answers.extend(await unix_exchange(socket, kms("Decrypt", {"CiphertextBlob": "AAAA"})))


async def until_seen(fake_kms: FakeKms, count: int) -> None:
    """Wait until the fake KMS has seen ``count`` requests."""
    with trio.fail_after(20):
        while len(fake_kms.seen) < count:
            await trio.sleep(0.01)


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
    try:
        async with trio.open_nursery() as calls:
            for _ in range(6):  # more than the whole pool
                calls.start_soon(held_decrypt, running.socket, answers)
            await until_seen(fake_kms, 2)
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
    try:
        async with trio.open_nursery() as calls:
            calls.start_soon(held_decrypt, running.socket, answers)
            await until_seen(fake_kms, 1)
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


# --- the TCP listener checks its callers too (inet_diag) ------------------------------


DENIED = {
    "__type": "AccessDeniedException",
    "message": "this process is not allowed to use the enclave agent",
}


async def as_uid(target: str, raw: bytes, uid: int = OTHER_UID) -> tuple[int, Any]:
    """(status, JSON body) of one request from a process of ``uid``."""
    status, body = await exchange_as_other_uid(target, raw, uid)
    return status, json.loads(body)


async def tcp_exchange(port: int, raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        return await send_and_read(stream, raw)


@needs_root
async def test_an_allowed_and_a_refused_uid_on_both_listeners(
    nursery: trio.Nursery, shared_dir: Path
) -> None:
    running = await start(nursery, shared_dir, access=AccessConfig(allowed_uids=frozenset({0})))
    for target in (running.socket, f"tcp:127.0.0.1:{running.tcp_port}"):
        assert await as_uid(target, request("GET", "/healthz"), uid=0) == (200, {"status": "ok"})
        # Refused before its request is read, with the same answer on either listener.
        raw = kms("Decrypt", {"CiphertextBlob": "AAAA"})
        assert await as_uid(target, raw) == (403, DENIED)
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
    tcp = f"tcp:127.0.0.1:{running.tcp_port}"
    assert await as_uid(tcp, health) == (200, {"status": "ok"})
    assert await as_uid(running.socket, health) == (403, DENIED)


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
        lambda c: socket_answer(c.destination, c.source, uid=0),
        # The client's socket, twice, different owners.
        lambda c: (
            socket_answer(c.source, c.destination, uid=0, multi=True)
            + socket_answer(c.source, c.destination, uid=1, multi=True)
            + DONE
        ),
        # No match at all.
        lambda c: DONE,
        # The client's socket closing: uid 0 (as if root) in FIN_WAIT1.
        lambda c: socket_answer(c.source, c.destination, uid=0, state=FIN_WAIT1, inode=0),
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


LONG_POLL = request("GET", "/v1/secrets/db?after=v1&wait=300", close=False)


async def held_long_poll(running: Running, stream: trio.abc.Stream) -> None:
    """Start a long-poll on ``stream`` (300 s: only a rotation or leaving ends it)."""
    await stream.send_all(LONG_POLL)
    with trio.fail_after(10):  # a hang guard
        while running.secrets.waiting == 0:
            await trio.sleep(0.01)


async def logged(running: Running, name: str, count: int) -> list[dict[str, Any]]:
    with trio.fail_after(10):  # a hang guard
        while len(events := running.events(name)) < count:
            await trio.sleep(0.01)
    return events


async def test_a_long_poll_its_app_left_gives_its_connection_share_back_at_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """An app whose HTTP client gives up on a long-poll (and re-polls) does not lock
    itself out: the agent notices the close, ends the 300 s wait and frees the
    connection share for the uid's next request."""
    running = await start(nursery, tmp_path, limits=Limits(max_connections_per_uid=1))
    for _ in range(3):  # re-polls, each abandoned
        stream = await trio.open_unix_socket(running.socket)
        await held_long_poll(running, stream)
        await stream.aclose()
        await logged(running, "request", 1)
        assert running.secrets.waiting == 0  # the wait itself was given up
        # Logged as the connection ended: its share is free, long before the 300 s.
        [(status, _, body)] = await unix_exchange(
            running.socket, kms("Decrypt", {"CiphertextBlob": "YWJj"})
        )
        assert status == 200, body
        events = running.events("request")
        gone, answered = events[-2:]
        assert (gone["path"], gone["status"], gone["outcome"]) == (
            "/v1/secrets/db",
            None,
            "client_gone",
        )
        assert (answered["operation"], answered["status"]) == ("Decrypt", 200)
        running.logs.truncate(0)
        running.logs.seek(0)
    assert running.events("request_rejected") == []


async def test_a_long_poll_its_app_resets_is_given_up(running: Running) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", running.tcp_port)
    await held_long_poll(running, stream)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()  # linger 0: a reset
    [event] = await logged(running, "request", 1)
    assert (event["status"], event["outcome"]) == (None, "client_gone")
    assert running.secrets.waiting == 0


async def test_a_long_poll_answered_keeps_its_connection_and_serves_what_came_meanwhile(
    running: Running,
) -> None:
    """The wait ends with a new version: answered, and the connection goes on; a
    request pipelined behind the poll while it was held is answered after it."""
    stream = await trio.open_unix_socket(running.socket)
    async with stream:
        await held_long_poll(running, stream)
        await stream.send_all(request("GET", "/healthz", close=False))  # during the hold
        running.secrets.rotated.set()
        data = b""
        with trio.fail_after(10):
            while data.count(b"HTTP/1.1 200 ") < 2:
                data += await stream.receive_some(65536)
        assert b"X-Secret-Version: v2" in data.split(b"HTTP/1.1 200 ")[1]
        assert data.index(b"s3cr3t") < data.index(b'{"status": "ok"}')
        # Kept alive: the next long-poll (past v2 now) is served on the same connection.
        answers = await send_and_read(stream, request("GET", "/v1/secrets/db?after=v1&wait=300"))
    assert [(status, headers["x-secret-version"]) for status, headers, _ in answers] == [
        (200, "v2")
    ]
    events = running.events("request")
    assert [(e["path"], e["status"]) for e in events] == [
        ("/v1/secrets/db", 200),
        ("/healthz", 200),
        ("/v1/secrets/db", 200),
    ]
    assert all("outcome" not in e for e in events)
    assert "s3cr3t" not in running.logs.getvalue()
