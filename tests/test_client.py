"""enclave_agent.client and the CLI verbs, against the real server with a stand-in gateway."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from enclave_agent.client import AgentClient, AgentError, SecretVersion
from enclave_agent.runtime.callers import Callers
from enclave_agent.runtime.config import AccessConfig, Limits, SecretConfig
from enclave_agent.runtime.kms import KmsError
from enclave_agent.runtime.secrets import SecretStore
from enclave_agent.runtime.server import AppServer
from enclave_common.address import UnixAddress, open_listener
from tests.conftest import REPO_ROOT
from tests.support.raw_http import read_head


class Gateway:
    async def call(self, operation: str, request: Mapping[str, Any]) -> dict[str, Any]:
        if operation == "Decrypt":
            blob = base64.b64decode(request["CiphertextBlob"])
            if blob == b"denied":
                raise KmsError("AccessDeniedException", "PCR0 mismatch", 400)
            if blob == b"wrong context":  # as KMS answers it: no message at all
                raise KmsError("InvalidCiphertextException", "", 400)
            context = request.get("EncryptionContext", {})
            return {
                "Plaintext": base64.b64encode(b"plain:" + blob).decode(),
                "KeyId": "k",
                **({"Context": context} if context else {}),
            }
        if operation == "GenerateDataKey":
            size = request.get("NumberOfBytes", 32)
            return {
                "Plaintext": base64.b64encode(b"k" * size).decode(),
                "CiphertextBlob": base64.b64encode(b"wrapped").decode(),
                "KeyId": "arn:key",
            }
        if operation == "GenerateRandom":
            return {"Plaintext": base64.b64encode(b"r" * request["NumberOfBytes"]).decode()}
        raise KmsError("UnsupportedOperationException", operation, 400)


SECRET = b"plain:\x00binary secret\xff"  # what Gateway decrypts db's ciphertext to


async def secrets() -> SecretStore:
    """A real store holding one inline secret, "db", decrypted by ``Gateway``."""
    store = SecretStore({"db": SecretConfig("db", b"\x00binary secret\xff")}, Gateway())
    await store.load()
    return store


async def attest(nonce: bytes | None, user_data: bytes | None, key: bytes | None) -> bytes:
    return b"DOC" + (nonce or b"") + (user_data or b"") + (key or b"")


async def serve(nursery: trio.Nursery, path: str, limits: Limits) -> str:
    server = AppServer(
        gateway=Gateway(),
        attest=attest,
        secrets=await secrets(),
        access=AccessConfig(),
        limits=limits,
    )
    listener = await open_listener(UnixAddress(path))
    await nursery.start(
        lambda task_status: server.serve(listener, callers=Callers.UNIX, task_status=task_status)
    )
    return path


@pytest.fixture
async def socket_path(nursery: trio.Nursery, tmp_path: Path) -> str:
    return await serve(nursery, str(tmp_path / "agent.sock"), Limits(idle_timeout=0.2))


async def test_client_verbs(socket_path: str) -> None:
    def use() -> None:
        with AgentClient(socket_path) as client:
            assert client.secret("db") == SECRET
            assert client.decrypt(b"blob") == b"plain:blob"
            key = client.generate_data_key("alias/x")
            assert (key.plaintext, key.ciphertext_blob, key.key_id) == (
                b"k" * 32,
                b"wrapped",
                "arn:key",
            )
            assert "kkkk" not in repr(key)
            assert client.generate_random(5) == b"rrrrr"
            assert client.attestation(nonce=b"n", user_data=b"u") == b"DOCnu"
            assert client.health() == {"status": "ok", "secrets": {"db": {"version": "config"}}}
            with pytest.raises(AgentError) as info:
                client.decrypt(b"denied")
            assert info.value.error_type == "AccessDeniedException"
            assert info.value.message == "PCR0 mismatch"
            with pytest.raises(AgentError) as info:
                client.secret("absent")
            assert info.value.error_type == "NotFoundException"
            assert info.value.status == 404
            for name in ("db?x", "db#x", "../healthz"):
                with pytest.raises(AgentError) as info:
                    client.secret(name)
                assert info.value.error_type == "ValidationException"

    await trio.to_thread.run_sync(use)


async def test_the_version_and_the_wait_for_another(socket_path: str) -> None:
    def use() -> None:
        with AgentClient(socket_path, timeout=5) as client:
            current = client.secret_version("db")
            assert (current.value, current.version) == (SECRET, "config")
            assert "binary" not in repr(current)
            # Another version than the one served: at once. The same: held for the wait
            # (an inline secret never changes), then answered with it.
            assert client.secret_version("db", after="v0", wait=60).version == "config"
            started = time.monotonic()
            held = client.secret_version("db", after="config", wait=0.3)
            assert time.monotonic() - started >= 0.3
            assert (held.value, held.version) == (SECRET, "config")
            with pytest.raises(ValueError, match="wait needs after"):
                client.secret_version("db", wait=1)
            with pytest.raises(AgentError) as info:
                client.secret_version("db", after="config", wait=301)
            assert info.value.error_type == "ValidationException"
            assert "wait is a number of seconds from 0 to 300" in info.value.message

    await trio.to_thread.run_sync(use)


async def test_a_held_wait_counts_against_the_callers_connections(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Three long-polls from one uid whose share is two connections: two are held (past
    idle_timeout: no deadline runs while the answer is held), the third is refused at
    once; the held ones end with the version they waited past."""
    limits = Limits(max_connections=4, max_connections_per_uid=2, idle_timeout=0.2)
    path = await serve(nursery, str(tmp_path / "tight.sock"), limits)
    answers: list[SecretVersion | AgentError] = []

    def poll() -> None:
        try:
            answers.append(AgentClient(path).secret_version("db", after="config", wait=1))
        except AgentError as exc:
            answers.append(exc)

    async with trio.open_nursery() as polls:
        for _ in range(3):
            polls.start_soon(trio.to_thread.run_sync, poll)
    refused = [a for a in answers if isinstance(a, AgentError)]
    assert [(e.error_type, e.status) for e in refused] == [("ThrottlingException", 503)]
    assert "its whole share (limits.max_connections_per_uid)" in refused[0].message
    assert answers[0] is refused[0]  # refused at once, before the held ones ended
    assert [a for a in answers if not isinstance(a, AgentError)] == [
        SecretVersion(SECRET, "config")
    ] * 2


async def test_client_reconnects_after_the_agent_closed_an_idle_connection(
    socket_path: str,
) -> None:
    def use() -> None:
        client = AgentClient(socket_path)
        assert client.secret("db")
        time.sleep(0.5)  # longer than the server's idle timeout: it closes our connection
        assert client.secret("db")
        client.close()

    await trio.to_thread.run_sync(use)


async def test_client_uses_the_environment_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCLAVE_AGENT_SOCKET", "/nonexistent/agent.sock")
    client = AgentClient()
    assert client.socket_path == "/nonexistent/agent.sock"
    with pytest.raises(OSError):
        client.secret("x")


@pytest.mark.parametrize(
    "body", [b"not json", b"[1]", b'{"KeyId": "k"}', b'{"Plaintext": "!!"}', b'{"Plaintext": 1}']
)
async def test_a_garbled_answer_is_an_agent_error(
    nursery: trio.Nursery, tmp_path: Path, body: bytes
) -> None:
    path = str(tmp_path / "fake.sock")
    listener = await open_listener(UnixAddress(path))

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            # The whole request first: closing with some of it unread would reset the
            # connection under the client (BrokenPipe instead of the garbled answer).
            request = await read_head(stream)
            head_end = request.index(b"\r\n\r\n") + 4
            length = int(re.search(rb"(?i)content-length: *(\d+)", request[:head_end])[1])
            while len(request) < head_end + length:
                request += await stream.receive_some(65536)
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n"
            await stream.send_all(head.encode() + body)

    await nursery.start(trio.serve_listeners, answer, [listener])

    def use() -> str:
        with AgentClient(path) as client, pytest.raises(AgentError) as info:
            client.decrypt(b"x")
        return info.value.error_type

    assert await trio.to_thread.run_sync(use) == "InvalidResponse"


async def cli(
    socket_path: str, *argv: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "enclave_agent.cli", *argv, "--socket", socket_path],
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


async def test_cli_verbs(socket_path: str, tmp_path: Path) -> None:
    result = await cli(socket_path, "secret", "db")
    assert (result.returncode, result.stdout) == (0, SECRET)

    blob = tmp_path / "blob"
    blob.write_bytes(b"xyz")
    result = await cli(socket_path, "decrypt", "--ciphertext-file", str(blob))
    assert (result.returncode, result.stdout) == (0, b"plain:xyz")
    result = await cli(socket_path, "decrypt", "--ciphertext-file", "-", stdin=b"abc")
    assert result.stdout == b"plain:abc"
    out = tmp_path / "out"
    result = await cli(
        socket_path,
        "decrypt",
        "--ciphertext-base64",
        base64.b64encode(b"q").decode(),
        "--output",
        str(out),
    )
    assert result.returncode == 0 and out.read_bytes() == b"plain:q"
    assert out.stat().st_mode & 0o777 == 0o600
    # An existing world-readable file is narrowed before the plaintext goes in; a
    # symlink at the path is not followed.
    out.chmod(0o644)
    result = await cli(socket_path, "decrypt", "--ciphertext-base64", "cg==", "--output", str(out))
    assert result.returncode == 0 and out.read_bytes() == b"plain:r"
    assert out.stat().st_mode & 0o777 == 0o600
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    link = tmp_path / "link"
    link.symlink_to(target)
    result = await cli(socket_path, "decrypt", "--ciphertext-base64", "cg==", "--output", str(link))
    assert result.returncode == 1 and target.read_bytes() == b""
    assert b"cannot write" in result.stderr
    result = await cli(socket_path, "decrypt", "--ciphertext-base64", "not base64!")
    assert result.returncode == 2 and b"not valid base64" in result.stderr
    result = await cli(socket_path, "decrypt", "--ciphertext-file", str(tmp_path / "absent"))
    assert result.returncode == 2 and b"cannot read the ciphertext" in result.stderr

    result = await cli(
        socket_path, "generate-data-key", "--key-id", "alias/x", "--number-of-bytes", "16"
    )
    answer = json.loads(result.stdout)
    assert base64.b64decode(answer["Plaintext"]) == b"k" * 16

    result = await cli(socket_path, "generate-random", "--number-of-bytes", "4", "--base64")
    assert base64.b64decode(result.stdout) == b"rrrr"

    result = await cli(
        socket_path, "decrypt", "--ciphertext-base64", base64.b64encode(b"denied").decode()
    )
    assert result.returncode == 1
    assert b"AccessDeniedException: PCR0 mismatch" in result.stderr
    result = await cli(socket_path, "secret", "absent")
    assert result.returncode == 1 and b"NotFoundException" in result.stderr


async def test_cli_explains_a_kms_error_that_has_no_message(socket_path: str) -> None:
    blob = base64.b64encode(b"wrong context").decode()
    result = await cli(socket_path, "decrypt", "--ciphertext-base64", blob)
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "enclave-agent decrypt: InvalidCiphertextException (KMS gave no message; usually "
        "the encryption context differs from the one the ciphertext was made with (give "
        "it with --encryption-context K=V), or the ciphertext is damaged)\n"
    )
