"""The local KMS stand-in as a real subprocess, driven by unmodified boto3 over TLS."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from devtools.devstack import (
    local_kms_client,
    local_operator_arn,
    minted_kms_client,
    start_local_kms,
)
from devtools.local_kms.admin_client import mint_credentials, set_faults
from enclave_agent.operator.key_policy import Measurements, build_key_policy
from enclave_agent.runtime.cms import decrypt_for_recipient
from enclave_agent.runtime.recipient import RecipientKey
from enclave_agent.simulated.nsm import DEFAULT_SIMULATED_PCRS, SimulatedNsm
from tests.conftest import REPO_ROOT
from tests.support.openssl_cms import openssl_decrypt

MARKER = b"local-kms-plaintext-marker-7f3a"


@pytest.fixture(scope="module")
def nsm(enclave_ca: Path) -> SimulatedNsm:
    """A simulated enclave (default PCRs) under the CA the stand-in trusts."""
    return SimulatedNsm.load(enclave_ca)


@pytest.fixture(scope="module")
def kms(local_kms: dict[str, Any]) -> Any:
    return local_kms_client(local_kms)


@dataclass(frozen=True)
class Enclave:
    """The simulated enclave (default PCRs) and the RSA key it asks KMS to encrypt to."""

    nsm: SimulatedNsm
    private: rsa.RSAPrivateKey
    key: RecipientKey

    def recipient(self, nsm: SimulatedNsm | None = None) -> dict[str, Any]:
        """KMS's Recipient: a fresh attestation document (from ``nsm``, another
        enclave, if given) carrying the key."""
        document = (nsm or self.nsm).attestation(public_key=self.key.public_key_der)
        return {"AttestationDocument": document, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}


@pytest.fixture(scope="module")
def enclave(nsm: SimulatedNsm) -> Enclave:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Enclave(nsm, private, RecipientKey(private))


def error_code(caught: pytest.ExceptionInfo[ClientError]) -> str:
    return str(caught.value.response["Error"]["Code"])


@pytest.fixture(scope="module")
def attested_key(kms: Any) -> str:
    """A key whose policy (AWS's example shape, operator.key_policy) needs attestation."""
    pcrs = {i: DEFAULT_SIMULATED_PCRS[i].hex() for i in (0, 1, 2)}
    document = build_key_policy(
        Measurements(pcrs),
        "arn:aws:iam::111122223333:role/enclave-parent",
        operations=["Decrypt", "GenerateDataKey", "GenerateDataKeyPair"],
        encrypt_principal=local_operator_arn("111122223333"),
    )
    # The operator (the stand-in's caller) may encrypt; nobody may decrypt unattested.
    return str(kms.create_key(Policy=json.dumps(document))["KeyMetadata"]["KeyId"])


def test_decrypt_needs_a_matching_attestation(
    kms: Any,
    attested_key: str,
    enclave: Enclave,
) -> None:
    blob = kms.encrypt(KeyId=attested_key, Plaintext=MARKER)["CiphertextBlob"]
    with pytest.raises(ClientError) as caught:
        kms.decrypt(CiphertextBlob=blob)
    assert error_code(caught) == "AccessDeniedException"

    key = enclave.key
    answer = kms.decrypt(CiphertextBlob=blob, Recipient=enclave.recipient())
    assert "Plaintext" not in answer
    assert answer["KeyId"].endswith(attested_key)
    assert answer["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    assert key.open(answer["CiphertextForRecipient"]) == MARKER


def test_openssl_and_crypto_core_open_the_answer(
    kms: Any,
    attested_key: str,
    enclave: Enclave,
    tmp_path: Path,
) -> None:
    private = enclave.private
    blob = kms.encrypt(KeyId=attested_key, Plaintext=MARKER * 3)["CiphertextBlob"]
    envelope = kms.decrypt(
        CiphertextBlob=blob,
        KeyId=attested_key,
        Recipient=enclave.recipient(),
    )["CiphertextForRecipient"]
    assert openssl_decrypt(tmp_path, envelope, private) == MARKER * 3
    assert decrypt_for_recipient(envelope, private) == MARKER * 3


def test_pcr_mismatch_is_denied(
    kms: Any,
    attested_key: str,
    enclave_ca: Path,
    enclave: Enclave,
) -> None:
    blob = kms.encrypt(KeyId=attested_key, Plaintext=b"x")["CiphertextBlob"]
    other_image = {**DEFAULT_SIMULATED_PCRS, 1: bytes.fromhex("11" * 48)}
    nsm = SimulatedNsm.load(enclave_ca, pcrs=other_image)
    with pytest.raises(ClientError) as caught:
        kms.decrypt(CiphertextBlob=blob, Recipient=enclave.recipient(nsm))
    assert error_code(caught) == "AccessDeniedException"
    assert "kms:Decrypt" in caught.value.response["Error"]["Message"]


def test_document_from_another_root_is_refused(
    kms: Any, attested_key: str, enclave: Enclave
) -> None:
    blob = kms.encrypt(KeyId=attested_key, Plaintext=b"x")["CiphertextBlob"]
    with pytest.raises(ClientError) as caught:
        kms.decrypt(CiphertextBlob=blob, Recipient=enclave.recipient(SimulatedNsm.create()))
    assert error_code(caught) == "ValidationException"
    assert "attestation" in caught.value.response["Error"]["Message"]


def test_recipient_without_a_usable_key_or_algorithm_is_refused(
    kms: Any,
    attested_key: str,
    enclave: Enclave,
) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    small_der = small.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cases = [
        {
            "AttestationDocument": enclave.nsm.attestation(),
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        },
        {
            "AttestationDocument": enclave.nsm.attestation(public_key=small_der),
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        },
        {
            "AttestationDocument": enclave.nsm.attestation(public_key=enclave.key.public_key_der),
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_1",
        },
        {"AttestationDocument": b"\x84junk", "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
    ]
    for case in cases:
        with pytest.raises(ClientError) as caught:
            kms.generate_random(NumberOfBytes=8, Recipient=case)
        assert error_code(caught) == "ValidationException"


def test_bad_signature_and_unknown_key_are_refused(local_kms: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as caught:
        local_kms_client(local_kms, aws_secret_access_key="not-the-secret").list_keys()
    assert error_code(caught) == "InvalidSignatureException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as caught:
        local_kms_client(local_kms, aws_access_key_id="AKIAUNKNOWNUNKNOWN00").list_keys()
    assert error_code(caught) == "UnrecognizedClientException"


def test_generate_data_key_for_recipient_round_trips(
    local_kms: dict[str, Any],
    kms: Any,
    attested_key: str,
    enclave: Enclave,
) -> None:
    key = enclave.key
    answer = kms.generate_data_key(
        KeyId=attested_key, KeySpec="AES_256", Recipient=enclave.recipient()
    )
    assert "Plaintext" not in answer
    data_key = key.open(answer["CiphertextForRecipient"])
    assert len(data_key) == 32
    again = kms.decrypt(CiphertextBlob=answer["CiphertextBlob"], Recipient=enclave.recipient())
    assert key.open(again["CiphertextForRecipient"]) == data_key
    # The enclave's role gets a data key only with attestation (the operator, who
    # seals secrets, may have one without: enclave-agent seal's envelopes).
    role = minted_kms_client(local_kms, principal="arn:aws:iam::111122223333:role/enclave-parent")
    with pytest.raises(ClientError) as caught:
        role.generate_data_key(KeyId=attested_key, KeySpec="AES_256")
    assert error_code(caught) == "AccessDeniedException"


def test_generate_random_and_key_pair_for_recipient(
    kms: Any,
    attested_key: str,
    enclave: Enclave,
) -> None:
    key = enclave.key
    answer = kms.generate_random(NumberOfBytes=48, Recipient=enclave.recipient())
    assert "Plaintext" not in answer
    assert len(key.open(answer["CiphertextForRecipient"])) == 48

    pair = kms.generate_data_key_pair(
        KeyId=attested_key, KeyPairSpec="ECC_NIST_P256", Recipient=enclave.recipient()
    )
    assert "PrivateKeyPlaintext" not in pair
    private = serialization.load_der_private_key(key.open(pair["CiphertextForRecipient"]), None)
    assert (
        private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == pair["PublicKey"]
    )
    again = kms.decrypt(
        CiphertextBlob=pair["PrivateKeyCiphertextBlob"], Recipient=enclave.recipient()
    )
    assert key.open(again["CiphertextForRecipient"]) == key.open(pair["CiphertextForRecipient"])
    # Not in the attested key's policy; a key with the default policy allows it.
    with pytest.raises(ClientError) as caught:
        kms.generate_data_key_pair_without_plaintext(KeyId=attested_key, KeyPairSpec="RSA_2048")
    assert error_code(caught) == "AccessDeniedException"
    plain = kms.create_key()["KeyMetadata"]["KeyId"]
    bare = kms.generate_data_key_pair_without_plaintext(KeyId=plain, KeyPairSpec="RSA_2048")
    assert "PrivateKeyPlaintext" not in bare and bare["PrivateKeyCiphertextBlob"]


def test_plain_kms_without_recipient_still_works(kms: Any) -> None:
    key_id = kms.create_key(Description="plain")["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/plain-local", TargetKeyId=key_id)
    blob = kms.encrypt(KeyId="alias/plain-local", Plaintext=b"hello")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"hello"
    moved = kms.re_encrypt(CiphertextBlob=blob, DestinationKeyId=key_id)["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=moved)["Plaintext"] == b"hello"
    assert len(kms.generate_random(NumberOfBytes=17)["Plaintext"]) == 17
    with pytest.raises(ClientError) as caught:
        kms.describe_key(KeyId="alias/does-not-exist")
    assert error_code(caught) == "NotFoundException"


def test_explicit_deny_and_malformed_policies(kms: Any, enclave: Enclave) -> None:
    image = DEFAULT_SIMULATED_PCRS[0].hex()
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.put_key_policy(
        KeyId=key_id,
        PolicyName="default",
        Policy=json.dumps(
            {
                "Statement": [
                    {"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"},
                    {
                        "Effect": "Deny",
                        "Principal": "*",
                        "Action": "kms:Decrypt",
                        "Resource": "*",
                        "Condition": {
                            "StringNotEquals": {"kms:RecipientAttestation:ImageSha384": image}
                        },
                    },
                ]
            }
        ),
    )
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"deny wins")["CiphertextBlob"]
    with pytest.raises(ClientError) as caught:
        kms.decrypt(CiphertextBlob=blob)
    assert "explicit deny" in caught.value.response["Error"]["Message"]
    answer = kms.decrypt(CiphertextBlob=blob, Recipient=enclave.recipient())
    assert enclave.key.open(answer["CiphertextForRecipient"]) == b"deny wins"
    with pytest.raises(ClientError) as caught:
        kms.create_key(Policy=json.dumps({"Statement": [{"Effect": "Allow"}]}))
    assert error_code(caught) == "MalformedPolicyDocumentException"


def test_minted_credentials_via_credential_process_and_expiry(
    local_kms: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_file = Path(local_kms["state_file"])
    command = f"{sys.executable} -m devtools.local_kms.credential_process --state-file {state_file}"
    config = tmp_path / "config"
    config.write_text(
        f"[profile local]\nregion = {local_kms['region']}\n"
        f"credential_process = {command} --ttl 900\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    cfg = Config(retries={"total_max_attempts": 1})
    session = boto3.Session(profile_name="local")
    kms = session.client(
        "kms", endpoint_url=local_kms["endpoint"], verify=local_kms["ca_bundle"], config=cfg
    )
    kms.list_keys()
    assert session.get_credentials().get_frozen_credentials().token

    # Minted directly, not through botocore: Expiration is cut to whole seconds, so a
    # 1 s credential may be expired before a credential_process even returns it (and
    # botocore then refuses it before any request is sent).
    short = json.loads(mint_credentials(state_file, ttl=1))
    expiring = local_kms_client(
        local_kms,
        aws_access_key_id=short["AccessKeyId"],
        aws_secret_access_key=short["SecretAccessKey"],
        aws_session_token=short["SessionToken"],
    )
    time.sleep(1.5)  # past the Expiration, which is at most 1 s after minting
    with pytest.raises(ClientError) as caught:
        expiring.list_keys()
    assert error_code(caught) == "ExpiredTokenException"


def test_injected_faults(local_kms: dict[str, Any], kms: Any) -> None:
    state_file = Path(local_kms["state_file"])
    assert set_faults(state_file, "internal", count=1) == 1
    with pytest.raises(ClientError) as caught:
        kms.list_keys()
    assert error_code(caught) == "KMSInternalException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    kms.list_keys()
    set_faults(state_file, "throttle", count=1)
    with pytest.raises(ClientError) as caught:
        kms.list_keys()
    assert error_code(caught) == "ThrottlingException"
    set_faults(state_file, "delay", count=1, delay=0.2)
    kms.list_keys()
    # botocore's own retries ride over throttling, as they do on AWS.
    set_faults(state_file, "throttle", count=2)
    retrying = local_kms_client(
        local_kms, config=Config(retries={"total_max_attempts": 3, "mode": "standard"})
    )
    retrying.list_keys()


def test_admin_routes_need_the_token(local_kms: dict[str, Any]) -> None:
    import http.client
    import ssl

    context = ssl.create_default_context(cafile=local_kms["ca_bundle"])
    conn = http.client.HTTPSConnection(local_kms["host"], local_kms["port"], context=context)
    try:
        conn.request("POST", "/_local_kms/faults", body=json.dumps({"kind": "internal"}))
        response = conn.getresponse()
        assert response.status == 403
        response.read()
        token = {"X-Local-Kms-Admin-Token": local_kms["admin_token"]}
        for bad in ({"ttl": 1e300}, {"ttl": 0}, {"ttl": "soon"}):
            conn.request("POST", "/_local_kms/credentials", body=json.dumps(bad), headers=token)
            response = conn.getresponse()
            assert response.status == 400, bad
            response.read()
        conn.request("POST", "/_local_kms/faults", body=b'{"kind": "boom"}', headers=token)
        response = conn.getresponse()
        assert response.status == 400
        response.read()
        nested = b"[" * 100_000  # deeper than json can parse: RecursionError
        conn.request("POST", "/_local_kms/faults", body=nested, headers=token)
        response = conn.getresponse()
        assert response.status == 400
        response.read()
        conn.request("POST", "/", body=b"{}", headers={"X-Amz-Target": "Nope"})
        response = conn.getresponse()
        assert response.status == 400
        assert json.loads(response.read())["__type"] == "UnknownOperationException"
    finally:
        conn.close()


@pytest.mark.skipif(shutil.which("aws") is None, reason="AWS CLI not installed")
def test_aws_cli_works_against_it(local_kms: dict[str, Any]) -> None:
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=local_kms["aws_access_key_id"],
        AWS_SECRET_ACCESS_KEY=local_kms["aws_secret_access_key"],
        AWS_DEFAULT_REGION=local_kms["region"],
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
    )
    env.pop("AWS_PROFILE", None)
    env.pop("AWS_SESSION_TOKEN", None)
    args = ["aws", "--endpoint-url", local_kms["endpoint"], "--ca-bundle", local_kms["ca_bundle"]]
    try:
        result = subprocess.run(
            [*args, "kms", "generate-random", "--number-of-bytes", "16", "--output", "json"],
            env=env,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"aws CLI not runnable here: {exc}")
    if result.returncode != 0 and b"kms" not in result.stderr:
        pytest.skip(f"aws CLI not runnable here: {result.stderr[-300:]!r}")
    assert result.returncode == 0, result.stderr
    assert len(base64.b64decode(json.loads(result.stdout)["Plaintext"])) == 16


def test_logs_hold_no_secret(local_kms: dict[str, Any], kms: Any, attested_key: str) -> None:
    kms.encrypt(KeyId=attested_key, Plaintext=MARKER)
    text = local_kms["log"].read_bytes()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert any(line.get("event") == "request" and line.get("operation") for line in lines)
    for secret in (
        MARKER,
        base64.b64encode(MARKER),
        local_kms["aws_secret_access_key"].encode(),
        local_kms["admin_token"].encode(),
    ):
        assert secret not in text


def test_second_instance_other_region_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    kms = start_local_kms(state_file, "--region", "eu-west-1", log_path=tmp_path / "log")
    state = kms.state
    try:
        assert state["pid"] == kms.popen.pid and state["region"] == "eu-west-1"
        assert Path(state["ca_bundle"]).read_text().startswith("-----BEGIN CERTIFICATE-----")
        listed = local_kms_client(state).list_keys()
        assert listed["ResponseMetadata"]["HTTPStatusCode"] == 200
    finally:
        assert kms.stop() == 0
    assert not state_file.exists()
    assert not Path(state["ca_bundle"]).exists()


def test_malformed_http_is_answered_and_the_server_keeps_serving(
    local_kms: dict[str, Any], kms: Any
) -> None:
    import socket
    import ssl

    context = ssl.create_default_context(cafile=local_kms["ca_bundle"])

    def exchange(payload: bytes) -> bytes:
        address = (local_kms["host"], local_kms["port"])
        with (
            socket.create_connection(address, timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=local_kms["host"]) as tls,
        ):
            tls.sendall(payload)
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    assert exchange(b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    # HEAD gets the status and headers a GET would, and no body (h11 refuses one).
    answer = exchange(b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ") and answer.endswith(b"\r\n\r\n")
    assert b'"connection_failed"' not in local_kms["log"].read_bytes()
    huge = b"x" * (1 << 20 | 1)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(huge)
    assert exchange(head + huge).startswith(b"HTTP/1.1 413 ")
    # Plain HTTP on the TLS port: the handshake fails, nothing is served.
    with socket.create_connection((local_kms["host"], local_kms["port"]), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not raw.recv(65536).startswith(b"HTTP/1.1 200")
    assert kms.list_keys()["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_bad_command_lines_fail_with_a_reason(tmp_path: Path) -> None:
    not_pem = tmp_path / "root.pem"
    not_pem.write_text("not a certificate")
    cases = [
        (["--state-file", str(tmp_path / "missing" / "s.json")], "no directory"),
        (["--state-file", str(tmp_path / "s.json"), "--trust-root", str(not_pem)], "not a PEM"),
        (["--state-file", str(tmp_path / "s.json"), "--host", "0.0.0.0"], "loopback"),
        (["--state-file", str(tmp_path / "s.json"), "--account", "12345"], "12 digits"),
        (
            ["--state-file", str(tmp_path / "s.json"), *["--account", "444455556666"] * 2],
            "all different",
        ),
    ]
    for args, reason in cases:
        result = subprocess.run(
            [sys.executable, "-m", "devtools.local_kms", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert reason in result.stderr.decode()
    assert not (tmp_path / "s.json").exists()


async def test_a_body_that_never_arrives_does_not_hold_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ssl

    import trio
    import trustme

    from devtools.local_kms import server as server_module
    from devtools.local_kms.credentials import CredentialStore
    from devtools.local_kms.faults import FaultInjector
    from devtools.local_kms.service import LocalKms

    monkeypatch.setattr(server_module, "IDLE_TIMEOUT", 0.3)
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    credentials = CredentialStore(["111122223333"])
    kms = LocalKms(region="us-east-1", roots=[], credentials=credentials)
    admin = server_module.Admin("token", FaultInjector(), credentials)
    http = server_module.StandInServer(admin, server_context)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(http.serve, kms, listeners)
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=client_context, https_compatible=True
        )
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        with trio.fail_after(30):  # without the limit the server waits for ever
            while await stream.receive_some(65536):
                pass
        await stream.aclose()
        nursery.cancel_scope.cancel()
