"""Test doubles for the agent's KMS client (gateway, transport, credentials, app server).

- ``FakeKms``: an HTTPS server (trustme certificate, h11) that answers each request
  from a script, records what it got, can hold connections open and hold chosen
  requests unanswered until released. It plays the secret stores too: a ``Streamed``
  answer has the headers it is given (S3's ETag, a lying Content-Length) and a body
  written piece by piece (slow, or endless and chunked).
- ``Relay``: a minimal CONNECT proxy that also serves ``GET /v1/credentials``, used
  where the real proxy's behaviour is not the point of the test (the end-to-end
  tests use the real ``enclave-proxy``).
- ``FakeNsm`` / ``FakeRecipient``: attestation and envelope without cryptography,
  so these tests exercise the gateway alone. The envelope is ``b"sealed:" + plaintext``.
"""

from __future__ import annotations

import base64
import functools
import json
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio
import trustme

from enclave_agent.runtime.kms import KmsGateway, KmsSettings
from enclave_agent.runtime.trusted_keys import TrustedKeys
from enclave_common.address import parse_address

SEAL = b"sealed:"
FAKE_ACCOUNT = "111122223333"
FAKE_KEY_ARN = f"arn:aws:kms:us-east-1:{FAKE_ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
FAKE_TRUSTED = f"arn:aws:kms:us-east-1:{FAKE_ACCOUNT}:key/*"  # the trusted_keys entry


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Streamed:
    """An answer with exactly ``headers`` (none added: without Content-Length it is
    chunked) and the body ``pieces()`` yields, each written as it comes, then its end;
    the connection is closed after it."""

    status: int
    headers: list[tuple[str, str]]
    pieces: Callable[[], AsyncIterator[bytes]]


def streamed(status: int, body: bytes, headers: list[tuple[str, str]]) -> Streamed:
    """``body`` in one piece, with ``headers`` and its Content-Length (an S3 answer)."""

    async def pieces() -> AsyncIterator[bytes]:
        yield body

    return Streamed(status, [*headers, ("Content-Length", str(len(body)))], pieces)


async def endless() -> AsyncIterator[bytes]:
    """A body that does not end (bounded at 256 MiB, so a broken test still ends)."""
    for _ in range(4096):
        yield b"x" * 65536
        await trio.sleep(0)


def dribbled(body: bytes, pause: float) -> Callable[[], AsyncIterator[bytes]]:
    """``body`` a byte at a time, ``pause`` seconds apart."""

    async def pieces() -> AsyncIterator[bytes]:
        for byte in body:
            yield bytes([byte])
            await trio.sleep(pause)

    return pieces


Reply = tuple[int, dict[str, Any] | bytes]
Handler = Callable[[Seen], Reply | Streamed]


def decrypt_ok(seen: Seen) -> Reply:
    """A KMS-shaped Recipient answer for any of the five operations."""
    target = seen.headers.get("x-amz-target", "")
    op = target.split(".", 1)[-1]
    secret = {
        "Decrypt": b"the secret",
        "GenerateDataKey": b"k" * 32,
        "GenerateRandom": b"r" * 16,
        "GenerateDataKeyPair": b"private key der",
        "DeriveSharedSecret": b"shared",
    }[op]
    body: dict[str, Any] = {"CiphertextForRecipient": base64.b64encode(SEAL + secret).decode()}
    if op == "Decrypt":
        body.update(KeyId=FAKE_KEY_ARN)
        body.update(EncryptionAlgorithm="SYMMETRIC_DEFAULT", Plaintext=None)
    elif op == "GenerateDataKey":
        body.update(KeyId=FAKE_KEY_ARN, CiphertextBlob=base64.b64encode(b"blob").decode())
    elif op == "GenerateDataKeyPair":
        body.update(
            KeyId=FAKE_KEY_ARN,
            KeyPairSpec="ECC_NIST_P256",
            PublicKey=base64.b64encode(b"pub").decode(),
            PrivateKeyCiphertextBlob=base64.b64encode(b"blob").decode(),
        )
    elif op == "DeriveSharedSecret":
        body.update(KeyId=FAKE_KEY_ARN, KeyAgreementAlgorithm="ECDH", KeyOrigin="AWS_KMS")
    return 200, body


def kms_error(error_type: str, message: str, status: int = 400) -> Reply:
    return status, {"__type": f"com.amazonaws.kms#{error_type}", "message": message}


class FakeKms:
    """HTTPS on 127.0.0.1 with a trustme certificate; answers from ``script`` then ``default``."""

    def __init__(self, ca: trustme.CA, *, hostname: str = "127.0.0.1") -> None:
        self.ca = ca
        cert = ca.issue_cert(hostname, "localhost")
        self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.ssl_context)
        self.script: list[Reply | Streamed | Handler] = []
        self.default: Handler = decrypt_ok
        self.seen: list[Seen] = []
        self.connections = 0
        self.handshakes_failed = 0
        self.close_after_each = False
        self.delay = 0.0
        # Requests for which hold_if is true wait for ``release`` before they are answered.
        self.hold_if: Callable[[Seen], bool] | None = None
        self.release = trio.Event()
        self.port = 0
        self._idle_scopes: dict[int, trio.CancelScope] = {}

    def drop_idle(self) -> None:
        """Close every connection waiting for its next request (an idle timeout)."""
        for scope in self._idle_scopes.values():
            scope.cancel()

    def reply(self, seen: Seen) -> Reply | Streamed:
        if self.script:
            step = self.script.pop(0)
            return step(seen) if callable(step) else step
        return self.default(seen)

    async def serve(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
        )
        self.port = listeners[0].socket.getsockname()[1]

    async def _handle(self, raw: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        stream = trio.SSLStream(raw, self.ssl_context, server_side=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            self.handshakes_failed += 1
            return
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request: h11.Request | None = None
                body = bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        idle = request is None and not body
                        with trio.CancelScope() as scope:
                            if idle:
                                self._idle_scopes[number] = scope
                            data = await stream.receive_some(65536)
                        self._idle_scopes.pop(number, None)
                        if scope.cancelled_caught:
                            return
                        conn.receive_data(bytes(data))
                        continue
                    if isinstance(event, h11.ConnectionClosed):
                        return
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                assert request is not None
                seen = Seen(
                    request.method.decode(),
                    request.target.decode(),
                    {k.decode().lower(): v.decode() for k, v in request.headers},
                    bytes(body),
                    number,
                )
                self.seen.append(seen)
                if self.delay:
                    await trio.sleep(self.delay)
                if self.hold_if is not None and self.hold_if(seen):
                    await self.release.wait()
                answer = self.reply(seen)
                if isinstance(answer, Streamed):
                    await self._stream(stream, conn, answer)
                    return
                status, payload = answer
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                headers = [
                    ("Content-Type", "application/x-amz-json-1.1"),
                    ("Content-Length", str(len(data))),
                    ("x-amzn-RequestId", f"req-{len(self.seen)}"),
                ]
                if self.close_after_each:
                    headers.append(("Connection", "close"))
                out = conn.send(h11.Response(status_code=status, headers=headers))
                out += conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _stream(
        stream: trio.SSLStream[trio.SocketStream], conn: h11.Connection, answer: Streamed
    ) -> None:
        await stream.send_all(
            conn.send(h11.Response(status_code=answer.status, headers=answer.headers))
        )
        async for piece in answer.pieces():
            await stream.send_all(conn.send(h11.Data(data=piece)))
        # A body shorter than its Content-Length cannot end: h11 refuses, the
        # connection closes (the handler's except).
        await stream.send_all(conn.send(h11.EndOfMessage()))


@dataclass
class Relay:
    """A minimal CONNECT relay + credentials endpoint on 127.0.0.1."""

    credentials: dict[str, Any] = field(
        default_factory=lambda: {
            "AccessKeyId": "AKIDFAKEFAKEFAKE",
            "SecretAccessKey": "fake-secret-key-do-not-log",
            "Token": "fake-session-token-do-not-log",
            "Expiration": None,
            "Region": "us-east-1",
        }
    )
    credentials_status: int = 200
    credentials_body: bytes | None = None  # sent as is (with credentials_status) when set
    refuse_connect: tuple[int, str] | None = None
    credential_requests: int = 0
    tunnels: int = 0
    redirect: tuple[str, int] | None = None  # connect here whatever the CONNECT says
    port: int = 0
    relayed: bytearray = field(default_factory=bytearray)

    async def serve(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
        )
        self.port = listeners[0].socket.getsockname()[1]

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    async def _answer(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        status: int,
        body: dict[str, Any] | bytes,
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        out = conn.send(
            h11.Response(
                status_code=status,
                headers=[("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
            )
        )
        out += conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage())
        await stream.send_all(out)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                    continue
                break
            if not isinstance(event, h11.Request):
                return
            while not isinstance(conn.next_event(), h11.EndOfMessage):
                pass
            if event.method == b"GET" and event.target == b"/v1/credentials":
                self.credential_requests += 1
                if self.credentials_body is not None:
                    await self._answer(stream, conn, self.credentials_status, self.credentials_body)
                elif self.credentials_status != 200:
                    await self._answer(
                        stream, conn, self.credentials_status, {"error": "no credentials"}
                    )
                else:
                    await self._answer(stream, conn, 200, self.credentials)
                return
            if event.method != b"CONNECT":
                await self._answer(stream, conn, 405, {"error": "method not allowed"})
                return
            if self.refuse_connect is not None:
                status, reason = self.refuse_connect
                await self._answer(stream, conn, status, {"error": reason})
                return
            host, _, port = event.target.decode().rpartition(":")
            if self.redirect:
                host, port = self.redirect[0], str(self.redirect[1])
            upstream = await trio.open_tcp_stream(host.strip("[]"), int(port))
            self.tunnels += 1
            await stream.send_all(
                conn.send(
                    h11.Response(status_code=200, reason=b"Connection established", headers=[])
                )
            )
            leftover, _ = conn.trailing_data
            if leftover:
                await upstream.send_all(leftover)
            async with upstream, trio.open_nursery() as nursery:

                async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                    try:
                        while data := await src.receive_some(65536):
                            self.relayed += data
                            await dst.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump, stream, upstream)
                nursery.start_soon(pump, upstream, stream)
        except (trio.BrokenResourceError, h11.ProtocolError, OSError):
            return
        finally:
            await trio.aclose_forcefully(stream)


async def start_kms_and_relay(tmp_path: Path, nursery: trio.Nursery) -> tuple[FakeKms, Relay, Path]:
    """A FakeKms with a fresh trustme CA (its PEM written under ``tmp_path``) and a Relay."""
    ca = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    kms = FakeKms(ca)
    await kms.serve(nursery)
    relay = Relay()
    await relay.serve(nursery)
    return kms, relay, ca_path


class FakeNsm:
    def __init__(self) -> None:
        self.calls = 0
        self.fail_with: str | None = None

    def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        self.calls += 1
        if self.fail_with:
            error = RuntimeError(self.fail_with)
            error.error_name = self.fail_with  # type: ignore[attr-defined]
            raise error
        return b"ATTESTATION:" + (public_key or b"")


class FakeRecipient:
    public_key_der = b"fake-spki"

    def __init__(self) -> None:
        self.opened = 0  # envelopes it was asked to open (refused answers must add none)

    def open(self, ciphertext_for_recipient: bytes) -> bytes:
        self.opened += 1
        if not ciphertext_for_recipient.startswith(SEAL):
            raise ValueError("not sealed for us")
        return ciphertext_for_recipient[len(SEAL) :]


CIPHERTEXT = base64.b64encode(b"ciphertext blob").decode()


@dataclass
class GatewayStack:
    """A KmsGateway to a FakeKms through a Relay (the gateway tests' stack)."""

    kms: FakeKms
    relay: Relay
    nsm: FakeNsm
    gateway: KmsGateway
    ca_path: Path

    recipient: FakeRecipient = field(default_factory=FakeRecipient)

    def gateway_with(self, **changes: object) -> KmsGateway:
        return KmsGateway(self.settings(**changes), self.nsm, self.recipient)

    def settings(self, **changes: object) -> KmsSettings:
        fields: dict[str, object] = {
            "region": "us-east-1",
            "proxy": parse_address(self.relay.address),
            "endpoint": f"https://127.0.0.1:{self.kms.port}",
            "ca_bundle": str(self.ca_path),
            "trusted_keys": TrustedKeys.parse([FAKE_TRUSTED]),
        }
        fields.update(changes)
        return KmsSettings(**fields)  # type: ignore[arg-type]
