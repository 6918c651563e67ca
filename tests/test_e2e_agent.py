"""End to end with real processes: app → enclave-agent → enclave-proxy → local KMS.

One stack per module (devtools.devstack): simulated NSM CA, the local KMS, a
recording TCP hop in front of it (so the test holds every byte the proxy relayed),
the proxy allowing only that hop, and the agent (simulated NSM) with one named
secret. Keys are gated on PCR0 as in AWS's example policy.
"""

from __future__ import annotations

import base64
import os
import secrets
import select
import shutil
import signal
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from devtools.devstack import DevStack, create_enclave_key, direct_kms_client, log_events
from enclave_agent.client import AgentClient, AgentError

MARKER = b"e2e-secret-" + secrets.token_hex(16).encode()
OTHER_PCR0 = "ab" * 48


class RecordingHop:
    """A TCP forwarder that keeps a copy of every byte, both directions."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.recorded = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    self.recorded += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closing = True
        self._listener.close()


@dataclass
class Stack:
    dev: DevStack
    state: dict[str, Any]
    hop: RecordingHop
    key_id: str
    other_key_id: str
    ciphertext: bytes
    other_ciphertext: bytes
    plaintexts: list[bytes] = field(default_factory=list)  # every plaintext the tests saw

    def client(self) -> AgentClient:
        return AgentClient(self.state["agent_socket"])


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # Not under pytest's 0700 temp dirs: the uid test connects as another user, which
    # needs search permission on the socket's directories.
    work = Path(tempfile.mkdtemp(prefix="e2e-agent-"))
    work.chmod(0o711)
    dev = DevStack(work_dir=work, agent_tcp=True, credentials="process")
    hop: RecordingHop | None = None
    try:
        dev.make_ca()
        kms_state = dev.start_kms()
        hop = RecordingHop((kms_state["host"], kms_state["port"]))
        dev.start_proxy(allow=[f"127.0.0.1:{hop.port}"])
        state = {**dev.state(), "agent_socket": ""}
        pcr0 = dev.pcrs()["0"]
        kms = direct_kms_client(state)
        key_id = create_enclave_key(kms, state["account_id"], pcr0)
        other_key_id = create_enclave_key(kms, state["account_id"], OTHER_PCR0)
        ciphertext = kms.encrypt(KeyId=key_id, Plaintext=MARKER)["CiphertextBlob"]
        other = kms.encrypt(KeyId=other_key_id, Plaintext=MARKER)["CiphertextBlob"]
        secrets_toml = (
            "\n[secrets.marker]\n"
            f'ciphertext = "{base64.b64encode(ciphertext).decode()}"\n'
            f'key_id = "{key_id}"\n'
            f'file = "{work / "tmpfs" / "marker"}"\n'
        )
        config = dev.write_agent_config(
            kms_endpoint=f"https://127.0.0.1:{hop.port}", secrets_toml=secrets_toml
        )
        dev.start_agent(config)
        yield Stack(dev, dev.state(), hop, key_id, other_key_id, ciphertext, other)
    finally:
        dev.stop()
        if hop is not None:
            hop.close()
        shutil.rmtree(work, ignore_errors=True)


def test_decrypt_through_the_chain(stack: Stack) -> None:
    with stack.client() as client:
        assert client.decrypt(stack.ciphertext) == MARKER
        assert client.decrypt(stack.ciphertext, key_id=stack.key_id) == MARKER


def test_generate_data_key_and_random(stack: Stack) -> None:
    with stack.client() as client:
        data_key = client.generate_data_key(stack.key_id)
        assert len(data_key.plaintext) == 32
        stack.plaintexts.append(data_key.plaintext)
        assert client.decrypt(data_key.ciphertext_blob) == data_key.plaintext
        random = client.generate_random(32)
        assert len(random) == 32
        stack.plaintexts.append(random)


def test_generate_data_key_pair_through_the_chain(stack: Stack) -> None:
    with stack.client() as client:
        answer = client.kms(
            "GenerateDataKeyPair", {"KeyId": stack.key_id, "KeyPairSpec": "RSA_2048"}
        )
    private_der = base64.b64decode(answer["PrivateKeyPlaintext"])
    stack.plaintexts.append(private_der)
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_der_private_key(private_der, None)
    public = serialization.load_der_public_key(base64.b64decode(answer["PublicKey"]))
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]


def test_named_secret_served_from_memory_and_file(stack: Stack) -> None:
    with stack.client() as client:
        assert client.secret("marker") == MARKER
        with pytest.raises(AgentError) as info:
            client.secret("absent")
        assert info.value.error_type == "NotFoundException"
    path = stack.dev.work_dir / "tmpfs" / "marker"
    assert path.read_bytes() == MARKER
    assert path.stat().st_mode & 0o777 == 0o400


def test_pcr_mismatch_is_access_denied_to_the_app(stack: Stack) -> None:
    with stack.client() as client, pytest.raises(AgentError) as info:
        client.decrypt(stack.other_ciphertext)
    assert info.value.error_type == "AccessDeniedException"

    # The same through the TCP listener with an unmodified boto3 client.
    import boto3
    from botocore.exceptions import ClientError

    app = boto3.client(
        "kms",
        region_name="us-east-1",
        endpoint_url=stack.state["agent_tcp_endpoint"],
        aws_access_key_id="unused-by-the-agent",
        aws_secret_access_key="unused-by-the-agent",
    )
    assert app.decrypt(CiphertextBlob=stack.ciphertext)["Plaintext"] == MARKER
    with pytest.raises(ClientError) as error:
        app.decrypt(CiphertextBlob=stack.other_ciphertext)
    assert error.value.response["Error"]["Code"] == "AccessDeniedException"


def test_the_credentials_alone_cannot_decrypt(stack: Stack) -> None:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as error:
        direct_kms_client(stack.state).decrypt(CiphertextBlob=stack.ciphertext)
    assert error.value.response["Error"]["Code"] == "AccessDeniedException"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a caller as another uid")
def test_a_caller_uid_not_allowed_is_refused(stack: Stack) -> None:
    # uid 65534 in group 0 passes the socket's file mode (0660, group root) but is not
    # an allowed caller (default: the agent's own uid and root): SO_PEERCRED refuses it.
    # A forked child drops to that uid (the interpreter may not be readable by it).
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        outcome = b"unexpected"
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(0)
            os.setuid(65534)
            AgentClient(stack.state["agent_socket"]).secret("marker")
            outcome = b"served"
        except AgentError as exc:
            outcome = exc.error_type.encode()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            outcome = repr(exc).encode()
        finally:
            os.write(write_end, outcome)
            os._exit(0)
    os.close(write_end)
    try:
        outcome = b""
        # Bounded: a child forked from a threaded process could in theory hang.
        while select.select([read_end], [], [], 30)[0]:
            chunk = os.read(read_end, 1024)
            if not chunk:
                break
            outcome += chunk
    finally:
        os.close(read_end)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    assert outcome == b"AccessDeniedException"
    refused = [
        e for e in log_events(Path(stack.state["agent_log"])) if e["event"] == "caller_refused"
    ]
    assert refused and refused[-1]["uid"] == 65534


class MitmProxy:
    """In place of the proxy: answers credentials, accepts CONNECT, then offers TLS
    with a certificate from a CA the agent does not trust, recording what it decrypts."""

    def __init__(self, credentials: dict[str, str]) -> None:
        ca = trustme.CA()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(self.context)
        self.credentials = credentials
        self.decrypted = bytearray()
        self.raw = bytearray()
        self.handshakes_failed = 0
        self.connects = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp:127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        import json

        conn.settimeout(10)
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            self.raw += head
            if head.startswith(b"GET /v1/credentials"):
                body = json.dumps(self.credentials).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: "
                    + str(len(body)).encode()
                    + b"\r\nConnection: close\r\n\r\n"
                    + body
                )
                return
            self.connects += 1
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            try:
                tls = self.context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                self.handshakes_failed += 1
                return
            while data := tls.recv(65536):
                self.decrypted += data
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._listener.close()


def test_a_man_in_the_middle_proxy_gets_nothing(stack: Stack) -> None:
    mitm = MitmProxy(
        {
            "AccessKeyId": stack.state["aws_access_key_id"],
            "SecretAccessKey": stack.state["aws_secret_access_key"],
            "Token": None,
            "Expiration": None,
            "Region": "us-east-1",
        }
    )
    dev = stack.dev
    saved_proxy = dev.proxy_address
    try:
        dev.proxy_address = mitm.address
        config = dev.write_agent_config(kms_endpoint=stack.state["kms_endpoint"], name="agent-mitm")
        socket_path = dev.start_agent(config, name="agent-mitm")
    finally:
        dev.proxy_address = saved_proxy
    try:
        with AgentClient(socket_path) as client, pytest.raises(AgentError) as info:
            client.decrypt(stack.ciphertext)
        assert info.value.status >= 400
        assert mitm.connects >= 1
        assert mitm.handshakes_failed >= 1
        assert bytes(mitm.decrypted) == b""
        assert MARKER not in mitm.raw
    finally:
        dev.stop_process("agent-mitm")
        mitm.close()
    events = log_events(dev.log_path("agent-mitm"))
    failed = [e for e in events if e.get("event") == "kms_call" and e.get("outcome") == "error"]
    assert failed, "the agent should log the failed KMS call"


def test_no_secret_in_any_log_nor_in_any_relayed_byte(stack: Stack) -> None:
    """Runs last in this module: every earlier call has been logged and relayed."""
    needles = [MARKER, base64.b64encode(MARKER)]
    for plaintext in stack.plaintexts:
        needles += [plaintext, base64.b64encode(plaintext)]
    relayed = bytes(stack.hop.recorded)
    assert len(relayed) > 10_000, "the hop should have seen the TLS traffic"
    logs = {
        name: Path(path).read_bytes()
        for name, path in stack.dev.state().items()
        if name.endswith("_log")
    }
    logs["agent-mitm"] = stack.dev.log_path("agent-mitm").read_bytes()
    assert {"kms_log", "proxy_log", "agent_log"} <= set(logs)
    for needle in needles:
        assert needle not in relayed
        for name, content in logs.items():
            assert needle not in content, f"a secret reached {name}"
