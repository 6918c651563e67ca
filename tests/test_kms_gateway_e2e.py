"""KmsGateway → real enclave-proxy subprocess → real local KMS subprocess, and back.

The agent side runs in the test process: a SimulatedNsm whose CA the local KMS
trusts, a fresh RecipientKey, the gateway. The proxy gets its credentials the way
it does on EC2 with a ``credential_process``: short-lived session credentials
minted by the stand-in, so SigV4 with ``X-Amz-Security-Token`` is checked for real.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from devtools.devstack import (
    first_event,
    local_kms_client,
    python_env,
    spawn,
    stop_process,
    wait_for,
)
from devtools.local_kms.admin_client import set_document_age, set_faults
from enclave_agent.runtime.kms import KmsError, KmsGateway, KmsSettings
from enclave_agent.runtime.recipient import RecipientKey
from enclave_agent.runtime.trusted_keys import TrustedKeys, account_entry
from enclave_agent.simulated.nsm import SimulatedNsm
from enclave_common.address import parse_address


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, local_kms: dict[str, Any]) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("proxy")
    config = workdir / "aws-config"
    config.write_text(
        "[default]\n"
        f"region = {local_kms['region']}\n"
        f"credential_process = {sys.executable} -m devtools.local_kms.credential_process "
        f"--state-file {local_kms['state_file']} --ttl 900\n"
    )
    env = python_env(
        {
            "AWS_CONFIG_FILE": str(config),
            "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "no-credentials"),
        }
    )
    log_path = workdir / "proxy.log"
    process = spawn(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "--listen",
            "tcp:127.0.0.1:0",
            "--allow",
            f"127.0.0.1:{local_kms['port']}",
            "--region",
            local_kms["region"],
        ],
        log_path,
        env,
    )
    try:
        event = wait_for(
            process,
            lambda: first_event(log_path, "listening"),
            name="enclave-proxy",
            what="'listening' event",
            log_path=log_path,
        )
        yield str(event["address"])
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def kms_client(local_kms: dict[str, Any]) -> Any:
    """boto3 straight to the stand-in, as the key's administrator (no enclave)."""
    return local_kms_client(local_kms)


def make_gateway(
    local_kms: dict[str, Any], proxy: str, enclave_ca: Path, **settings: Any
) -> KmsGateway:
    """A gateway to the stand-in through ``proxy``, as a simulated enclave under
    ``enclave_ca``; ``settings`` override KmsSettings fields."""
    fields: dict[str, Any] = {
        "region": local_kms["region"],
        "proxy": parse_address(proxy),
        "endpoint": local_kms["endpoint"],
        "ca_bundle": local_kms["ca_bundle"],
        # The stand-in's account, as devtools.devstack writes it into the agent config.
        "trusted_keys": TrustedKeys(
            (account_entry("aws", local_kms["region"], local_kms["account_id"]),)
        ),
        **settings,
    }
    return KmsGateway(KmsSettings(**fields), SimulatedNsm.load(enclave_ca), RecipientKey.generate())


@pytest.fixture
async def gateway(
    local_kms: dict[str, Any], proxy: str, enclave_ca: Path
) -> AsyncIterator[KmsGateway]:
    gateway = make_gateway(local_kms, proxy, enclave_ca, call_timeout=20.0)
    yield gateway
    await gateway.aclose()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_seed_operations_end_to_end(gateway: KmsGateway, kms_client: Any) -> None:
    key_id = kms_client.create_key(Description="e2e")["KeyMetadata"]["KeyId"]
    secret = os.urandom(24)
    blob = kms_client.encrypt(KeyId=key_id, Plaintext=secret, EncryptionContext={"app": "e2e"})[
        "CiphertextBlob"
    ]

    answer = await gateway.call(
        "Decrypt", {"CiphertextBlob": b64(blob), "EncryptionContext": {"app": "e2e"}}
    )
    assert base64.b64decode(answer["Plaintext"]) == secret
    assert answer["KeyId"].endswith(key_id)
    assert "CiphertextForRecipient" not in answer

    data_key = await gateway.call("GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256"})
    plaintext_key = base64.b64decode(data_key["Plaintext"])
    assert len(plaintext_key) == 32
    again = await gateway.call("Decrypt", {"CiphertextBlob": data_key["CiphertextBlob"]})
    assert base64.b64decode(again["Plaintext"]) == plaintext_key

    random = await gateway.call("GenerateRandom", {"NumberOfBytes": 48})
    assert len(base64.b64decode(random["Plaintext"])) == 48
    assert set(random) == {"Plaintext"}

    # four calls, one kept-alive TLS connection through one tunnel
    assert gateway.pool.connections_opened == 1
    assert gateway.credentials.fetches == 1


async def test_generate_data_key_pair_end_to_end(gateway: KmsGateway, kms_client: Any) -> None:
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    key_id = kms_client.create_key(Description="e2e pair")["KeyMetadata"]["KeyId"]
    answer = await gateway.call(
        "GenerateDataKeyPair", {"KeyId": key_id, "KeyPairSpec": "ECC_NIST_P256"}
    )
    private = load_der_private_key(base64.b64decode(answer["PrivateKeyPlaintext"]), None)
    assert private.public_key() is not None
    assert {"PrivateKeyCiphertextBlob", "PublicKey", "KeyId", "KeyPairSpec"} <= set(answer)
    assert "CiphertextForRecipient" not in answer


async def test_derive_shared_secret_end_to_end(gateway: KmsGateway, kms_client: Any) -> None:
    """The stand-in derives the ECDH secret and answers it as CiphertextForRecipient
    only; the gateway opens it; the peer's side gives the same secret. KMS's own
    refusals pass on unchanged."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key_id = kms_client.create_key(KeySpec="ECC_NIST_P384", KeyUsage="KEY_AGREEMENT")[
        "KeyMetadata"
    ]["KeyId"]
    peer = ec.generate_private_key(ec.SECP384R1())
    spki = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    request = {"KeyId": key_id, "KeyAgreementAlgorithm": "ECDH", "PublicKey": b64(spki)}
    answer = await gateway.call("DeriveSharedSecret", request)
    kms_public = serialization.load_der_public_key(
        kms_client.get_public_key(KeyId=key_id)["PublicKey"]
    )
    assert isinstance(kms_public, ec.EllipticCurvePublicKey)
    assert base64.b64decode(answer["SharedSecret"]) == peer.exchange(ec.ECDH(), kms_public)
    assert answer["KeyId"].endswith(key_id) and answer["KeyAgreementAlgorithm"] == "ECDH"
    assert "CiphertextForRecipient" not in answer
    with pytest.raises(KmsError) as info:
        await gateway.call("DeriveSharedSecret", {**request, "KeyId": "alias/none"})
    assert info.value.error_type == "NotFoundException"


async def test_policy_mismatch_is_access_denied(
    gateway: KmsGateway, kms_client: Any, local_kms: dict[str, Any]
) -> None:
    account = local_kms["account_id"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                "Action": ["kms:Encrypt", "kms:CreateKey", "kms:PutKeyPolicy", "kms:DescribeKey"],
                "Resource": "*",
            },
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {
                    "StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": "00" * 48}
                },
            },
        ],
    }
    key_id = kms_client.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"]
    blob = kms_client.encrypt(KeyId=key_id, Plaintext=b"not for this image")["CiphertextBlob"]
    with pytest.raises(KmsError) as info:
        await gateway.call("Decrypt", {"CiphertextBlob": b64(blob)})
    assert info.value.error_type == "AccessDeniedException"
    assert info.value.status == 400


async def test_retries_through_injected_faults(
    gateway: KmsGateway, local_kms: dict[str, Any]
) -> None:
    state_file = Path(local_kms["state_file"])
    set_faults(state_file, "internal", count=2)
    answer = await gateway.call("GenerateRandom", {"NumberOfBytes": 8})
    assert len(base64.b64decode(answer["Plaintext"])) == 8
    set_faults(state_file, "throttle", count=1)
    answer = await gateway.call("GenerateRandom", {"NumberOfBytes": 8})
    assert len(base64.b64decode(answer["Plaintext"])) == 8


async def test_endpoint_not_on_the_allowlist_is_refused_by_the_proxy(
    local_kms: dict[str, Any], proxy: str, enclave_ca: Path
) -> None:
    gateway = make_gateway(
        local_kms, proxy, enclave_ca, endpoint=f"https://localhost:{local_kms['port']}"
    )
    with pytest.raises(KmsError) as info:
        await gateway.call("GenerateRandom", {"NumberOfBytes": 8})
    await gateway.aclose()
    assert info.value.message.startswith(
        f"proxy refused CONNECT localhost:{local_kms['port']}: 403"
    )


async def test_many_concurrent_calls(gateway: KmsGateway, kms_client: Any) -> None:
    import trio

    key_id = kms_client.create_key(Description="e2e concurrent")["KeyMetadata"]["KeyId"]
    secrets = [os.urandom(16) for _ in range(24)]
    blobs = [kms_client.encrypt(KeyId=key_id, Plaintext=s)["CiphertextBlob"] for s in secrets]
    got: dict[int, bytes] = {}

    async def one(index: int) -> None:
        answer = await gateway.call("Decrypt", {"CiphertextBlob": b64(blobs[index])})
        got[index] = base64.b64decode(answer["Plaintext"])

    async with trio.open_nursery() as nursery:
        for index in range(len(blobs)):
            nursery.start_soon(one, index)
    assert [got[i] for i in range(len(blobs))] == secrets
    assert 1 <= gateway.pool.connections_opened <= gateway.pool.pool_size


async def test_deadline_with_a_stalled_kms(
    local_kms: dict[str, Any], proxy: str, enclave_ca: Path
) -> None:
    gateway = make_gateway(local_kms, proxy, enclave_ca, call_timeout=1.0)
    set_faults(Path(local_kms["state_file"]), "delay", count=1, delay=3.0)
    with pytest.raises(KmsError) as info:
        await gateway.call("GenerateRandom", {"NumberOfBytes": 8})
    await gateway.aclose()
    assert info.value.error_type == "DependencyTimeoutException"


async def test_kms_certificate_not_trusted_by_the_bundle(
    local_kms: dict[str, Any], proxy: str, enclave_ca: Path
) -> None:
    # certifi's bundle does not hold the stand-in's trustme CA: exactly what a man in
    # the middle with a certificate from any other CA looks like to the agent.
    gateway = make_gateway(local_kms, proxy, enclave_ca, ca_bundle=None)
    with pytest.raises(KmsError) as info:
        await gateway.call("GenerateRandom", {"NumberOfBytes": 8})
    await gateway.aclose()
    assert info.value.message.startswith("TLS certificate verification failed for 127.0.0.1")


async def test_expired_session_credentials_are_replaced_once(
    local_kms: dict[str, Any], enclave_ca: Path
) -> None:
    # The proxy role is played by the test relay so the test decides which
    # credentials it hands out; the expiry verdict is the stand-in's own.
    from datetime import UTC, datetime

    import trio

    from devtools.local_kms.admin_client import mint_credentials
    from enclave_agent.runtime.credentials import CredentialsProvider, proxy_fetcher
    from tests.support.kms_fakes import Relay

    def proxy_shape(minted: str) -> dict[str, Any]:
        document = json.loads(minted)
        return {
            "AccessKeyId": document["AccessKeyId"],
            "SecretAccessKey": document["SecretAccessKey"],
            "Token": document["SessionToken"],
            "Expiration": document["Expiration"],
            "Region": local_kms["region"],
        }

    state_file = Path(local_kms["state_file"])
    # Read the clock before minting: Expiration is written in whole seconds (cut, not
    # rounded), so a clock read after minting may already be past it.
    frozen = datetime.now(UTC)
    async with trio.open_nursery() as nursery:
        relay = Relay(credentials=proxy_shape(mint_credentials(state_file, ttl=1)))
        await relay.serve(nursery)
        gateway = make_gateway(local_kms, relay.address, enclave_ca)
        # an agent whose clock says the credentials are still good (skew)
        gateway.credentials = CredentialsProvider(
            proxy_fetcher(parse_address(relay.address)), clock=lambda: frozen
        )
        await gateway.credentials.get()
        await trio.sleep(1.5)
        relay.credentials = proxy_shape(mint_credentials(state_file, ttl=600))
        answer = await gateway.call("GenerateRandom", {"NumberOfBytes": 8})
        await gateway.aclose()
        nursery.cancel_scope.cancel()
    assert len(base64.b64decode(answer["Plaintext"])) == 8
    assert relay.credential_requests == 2


@pytest.mark.parametrize("answer", ["ValidationException", "AccessDeniedException"])
async def test_a_kms_refusing_old_documents_gets_a_new_one_once(
    local_kms: dict[str, Any], proxy: str, enclave_ca: Path, kms_client: Any, answer: str
) -> None:
    """The stand-in refuses documents older than 1 s: a reused one is refused, the
    gateway fetches a new one and the call succeeds; with every document refused
    (max_age 0) the refusal reaches the caller after one retry, never a loop."""
    state_file = Path(local_kms["state_file"])
    key_id = kms_client.create_key(Description="e2e reuse")["KeyMetadata"]["KeyId"]
    blob = b64(kms_client.encrypt(KeyId=key_id, Plaintext=b"reused")["CiphertextBlob"])
    gateway = make_gateway(local_kms, proxy, enclave_ca, attestation_reuse=60.0)
    set_document_age(state_file, 1.0, answer=answer)
    try:
        await gateway.call("Decrypt", {"CiphertextBlob": blob})
        await gateway.call("Decrypt", {"CiphertextBlob": blob})
        assert gateway.documents.fetches == 1  # reused while young enough
        await trio.sleep(1.5)
        answer_now = await gateway.call("Decrypt", {"CiphertextBlob": blob})
        assert base64.b64decode(answer_now["Plaintext"]) == b"reused"
        assert gateway.documents.fetches == 2  # refused once, refreshed, retried
        set_document_age(state_file, 0.0, answer=answer)
        await trio.sleep(0.1)
        with pytest.raises(KmsError) as info:
            await gateway.call("Decrypt", {"CiphertextBlob": blob})
        assert info.value.error_type == answer
        assert gateway.documents.fetches == 3  # one retry with a new one, then final
    finally:
        set_document_age(state_file, None)
        await gateway.aclose()
