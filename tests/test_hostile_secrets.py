"""Key material and secrets stay out of every log, error message and exception text.

The agent runs in this process (``service.run_agent``) so the test can hold what no
other process ever sees: the recipient private key generated at start-up. The local
KMS and the proxy are real subprocesses (devstack). The run goes through the success
paths (named secrets inline and in Secrets Manager, one an envelope, one rotated and
long-polled, Decrypt, GenerateDataKey, GenerateDataKeyPair, GenerateRandom,
attestation) and the failure paths (policy denial, garbage ciphertext, bad input,
absent secret, a swapped ciphertext in the store, the secrets' reserved context, KMS
faults); then the agent's captured log, the KMS's and proxy's
log files, every error message the app got and the text and repr of every exception
raised are searched for each secret, data key, credential and the private key, raw,
base64 and hex.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from cryptography.hazmat.primitives import serialization

from devtools.devstack import DevStack, create_enclave_key, direct_kms_client, local_kms_client
from devtools.local_kms.admin_client import set_faults
from enclave_agent.client import AgentClient, AgentError
from enclave_agent.operator.seal import seal
from enclave_agent.runtime import service
from enclave_agent.runtime.config import load_config
from enclave_agent.runtime.recipient import RecipientKey
from enclave_common.logs import configure_logging
from tests.support.stack import find_leaks, temporary_stack

SECRET = b"named-secret-" + secrets.token_hex(16).encode()
PLAINTEXT = b"decrypted-" + secrets.token_hex(16).encode()
# A secret in Secrets Manager, its rotated value, and a large one (an envelope).
STORED = b"stored-secret-" + secrets.token_hex(16).encode()
ROTATED = b"rotated-secret-" + secrets.token_hex(16).encode()
ENVELOPED = b"enveloped-secret-" + secrets.token_hex(5000).encode()


@pytest.fixture(scope="module")
def dev() -> Iterator[DevStack]:
    with temporary_stack("hostile-secrets-", DevStack) as stack:
        stack.start(agent=False)
        yield stack


def _variants(label: str, value: bytes) -> dict[str, bytes]:
    return {
        label: value,
        f"{label} (base64)": base64.b64encode(value),
        f"{label} (hex)": value.hex().encode(),
    }


def _key_needles(key: RecipientKey) -> dict[str, bytes]:
    private = key._private_key
    numbers = private.private_numbers()
    needles: dict[str, bytes] = {}
    for name, number in (("d", numbers.d), ("p", numbers.p), ("q", numbers.q)):
        needles.update(_variants(f"private {name}", number.to_bytes(256, "big").lstrip(b"\0")))
        needles[f"private {name} (decimal)"] = str(number).encode()
    der = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    needles.update(_variants("private key DER", der))
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    needles["private key PEM body"] = pem.splitlines()[5]  # a line from inside the PEM
    return needles


async def test_no_key_or_secret_in_logs_errors_or_exceptions(
    dev: DevStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {**dev.state(), "agent_socket": ""}
    kms = direct_kms_client(state)
    key_id = create_enclave_key(kms, state["account_id"], dev.pcrs()["0"])
    denied_key = create_enclave_key(kms, state["account_id"], "ab" * 48)
    blob = kms.encrypt(KeyId=key_id, Plaintext=PLAINTEXT)["CiphertextBlob"]
    denied_blob = kms.encrypt(KeyId=denied_key, Plaintext=PLAINTEXT)["CiphertextBlob"]
    secret_blob = kms.encrypt(KeyId=key_id, Plaintext=SECRET)["CiphertextBlob"]
    store = local_kms_client(dev.kms, service="secretsmanager")
    stored = store.create_secret(Name="stored", SecretBinary=seal(kms, "stored", key_id, STORED)[0])
    big = store.create_secret(Name="big", SecretBinary=seal(kms, "big", key_id, ENVELOPED)[0])
    config_path = dev.write_agent_config(
        name="agent-inprocess",
        secrets_toml=(
            f'\n[secrets.db]\nciphertext = "{base64.b64encode(secret_blob).decode()}"\n'
            f'file = "{dev.work_dir / "tmpfs" / "db"}"\n'
            f'[secrets.stored]\nfrom = "secretsmanager:{stored["ARN"]}"\nrefresh = 1\n'
            f'file = "{dev.work_dir / "tmpfs" / "stored"}"\n'
            f'[secrets.big]\nfrom = "secretsmanager:{big["ARN"]}"\n'
        ),
    )
    config = load_config(config_path)

    keys: list[RecipientKey] = []
    generate = RecipientKey.generate.__func__  # type: ignore[attr-defined]

    def keep(cls: type[RecipientKey]) -> RecipientKey:
        key: RecipientKey = generate(cls)
        keys.append(key)
        return key

    monkeypatch.setattr(RecipientKey, "generate", classmethod(keep))
    captured = io.StringIO()
    saved = structlog.get_config(), structlog.contextvars.get_contextvars()
    configure_logging("debug", stream=captured, process="enclave-agent")
    handled: dict[str, bytes] = {}
    texts: list[str] = []  # every error message and exception text the run produced
    try:
        async with trio.open_nursery() as nursery:
            ready = await nursery.start(service.run_agent, config)
            await trio.to_thread.run_sync(
                _app_session,
                ready.socket,
                blob,
                denied_blob,
                key_id,
                dev,
                handled,
                texts,
                captured,
            )
            nursery.cancel_scope.cancel()
    finally:
        # Put back whatever logging set-up the rest of the suite runs with.
        structlog.configure(**saved[0])
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**saved[1])

    assert len(keys) == 1
    port = dev.proxy_address.rsplit(":", 1)[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/credentials", timeout=10) as answer:
        creds = json.loads(answer.read())
    needles = {
        **_key_needles(keys[0]),
        **_variants("named secret", SECRET),
        **_variants("decrypted plaintext", PLAINTEXT),
        **_variants("stored secret", STORED),
        **_variants("rotated secret", ROTATED),
        **_variants("enveloped secret", ENVELOPED[:64]),
        "root secret key": state["aws_secret_access_key"].encode(),
        "session secret key": creds["SecretAccessKey"].encode(),
        "session token": creds["Token"].encode(),
    }
    for label, value in handled.items():
        needles.update(_variants(label, value))
    logs = captured.getvalue().encode()
    assert b'"event": "ready"' in logs and b'"event": "kms_call"' in logs
    blobs = {
        "agent log (in process)": logs,
        "kms log": dev.log_path("kms").read_bytes(),
        "proxy log": dev.log_path("proxy").read_bytes(),
        "errors and exceptions": "\n".join(texts).encode(),
    }
    assert len(texts) >= 8
    assert find_leaks(needles, blobs) == []


def _app_session(
    socket_path: str,
    blob: bytes,
    denied_blob: bytes,
    key_id: str,
    dev: DevStack,
    handled: dict[str, bytes],
    texts: list[str],
    log: io.StringIO,
) -> None:
    """What an app does, successes and failures; runs in a worker thread."""

    def failing(call: Any) -> None:
        try:
            call()
        except AgentError as exc:
            texts.extend([exc.message, str(exc), repr(exc)])
        else:
            raise AssertionError("expected a failure")

    with AgentClient(socket_path, timeout=30) as client:
        assert client.secret("db") == SECRET
        # Secrets from a store: read, rotated (the long-poll wakes), a swapped ciphertext
        # refused (the refresh fails, logged), an app using the secrets' context refused.
        assert client.secret("big") == ENVELOPED
        first = client.secret_version("stored")
        assert first.value == STORED
        kms = direct_kms_client({**dev.state(), "agent_socket": ""})
        store = local_kms_client(dev.kms, service="secretsmanager")
        store.put_secret_value(
            SecretId="stored", SecretBinary=seal(kms, "stored", key_id, ROTATED)[0]
        )
        assert client.secret_version("stored", after=first.version, wait=20).value == ROTATED
        store.put_secret_value(SecretId="stored", SecretBinary=seal(kms, "big", key_id, STORED)[0])
        deadline = time.monotonic() + 20  # a refresh refused: the swap does not open
        while b"secret_refresh_failed" not in log.getvalue().encode():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert client.secret("stored") == ROTATED
        failing(
            lambda: client.generate_data_key(
                key_id, encryption_context={"enclave-kms:secret": "stored"}
            )
        )
        assert client.decrypt(blob) == PLAINTEXT
        data_key = client.generate_data_key(key_id)
        handled["data key"] = data_key.plaintext
        pair = client.kms("GenerateDataKeyPair", {"KeyId": key_id, "KeyPairSpec": "RSA_2048"})
        handled["data key pair private key"] = base64.b64decode(pair["PrivateKeyPlaintext"])
        handled["random"] = client.generate_random(32)
        document = client.attestation(nonce=b"n" * 16)
        assert len(document) > 1000
        failing(lambda: client.decrypt(denied_blob))
        failing(lambda: client.decrypt(b"\x01" * 64))
        failing(lambda: client.kms("Decrypt", {"CiphertextBlob": "!!"}))
        failing(lambda: client.kms("GenerateRandom", {"NumberOfBytes": 5000}))
        failing(lambda: client.secret("absent"))
        failing(lambda: client.attestation(nonce=b"x" * 2000))
        state_file = Path(dev.kms["state_file"])
        set_faults(state_file, "internal", count=50)
        try:
            failing(lambda: client.decrypt(blob))
        finally:
            set_faults(state_file, "internal", count=0)
        set_faults(state_file, "throttle", count=50)
        try:
            failing(lambda: client.generate_data_key(key_id))
        finally:
            set_faults(state_file, "internal", count=0)
