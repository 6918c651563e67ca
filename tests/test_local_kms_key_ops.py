"""The local KMS's own key operations (devtools/local_kms/key_ops.py), in process:
DeriveSharedSecret (moto lacks it) with and without Recipient, Sign/Verify,
GenerateMac/VerifyMac and GetPublicKey as KMS does them, every one of them and the
other pass-through operations under the key policy, and the listings' pages.

The oracles are independent of the stand-in: ``cryptography`` verifies the
signatures with GetPublicKey's key and derives the peer's side of the shared secret.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from devtools.local_kms.backend import MotoKms
from devtools.local_kms.credentials import CredentialStore
from devtools.local_kms.service import LocalKms
from enclave_agent.runtime.recipient import RecipientKey
from enclave_agent.simulated.nsm import SimulatedNsm
from tests.support.local_kms_calls import REGION, call

ACCOUNT = "111122223333"
MESSAGE = b"a message the app signs"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def nsm() -> SimulatedNsm:
    return SimulatedNsm.create()


@pytest.fixture
def kms(nsm: SimulatedNsm) -> LocalKms:
    return LocalKms(
        region=REGION,
        roots=[nsm.root_pem],
        credentials=CredentialStore([ACCOUNT]),
        moto=MotoKms(REGION, [ACCOUNT]),
    )


def create(kms: LocalKms, **members: Any) -> str:
    status, answer = call(kms, "CreateKey", members)
    assert status == 200, answer
    return str(answer["KeyMetadata"]["Arn"])


def ok(kms: LocalKms, operation: str, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = call(kms, operation, body)
    assert status == 200, answer
    return answer


def refused(kms: LocalKms, operation: str, body: dict[str, Any], error_type: str) -> str:
    status, answer = call(kms, operation, body)
    assert (status, answer["__type"]) == (400, error_type), answer
    return str(answer["message"])


def alias(kms: LocalKms, key: str) -> str:
    """A new alias for ``key`` (moto's state outlives each LocalKms: names must be new)."""
    name = f"alias/test-{uuid.uuid4()}"
    ok(kms, "CreateAlias", {"AliasName": name, "TargetKeyId": key})
    return name


def public_key(kms: LocalKms, key: str) -> Any:
    answer = ok(kms, "GetPublicKey", {"KeyId": key})
    return serialization.load_der_public_key(base64.b64decode(answer["PublicKey"]))


# --- DeriveSharedSecret ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "curve"),
    [("ECC_NIST_P256", ec.SECP256R1()), ("ECC_NIST_P384", ec.SECP384R1())],
)
def test_derive_shared_secret_is_ecdh_with_the_peer(
    kms: LocalKms, spec: str, curve: ec.EllipticCurve
) -> None:
    key = create(kms, KeySpec=spec, KeyUsage="KEY_AGREEMENT")
    name = alias(kms, key)
    peer = ec.generate_private_key(curve)
    peer_spki = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    answer = ok(
        kms,
        "DeriveSharedSecret",
        {"KeyId": name, "KeyAgreementAlgorithm": "ECDH", "PublicKey": b64(peer_spki)},
    )
    # The peer derives the same secret from the KMS key's public half.
    expected = peer.exchange(ec.ECDH(), public_key(kms, key))
    assert base64.b64decode(answer["SharedSecret"]) == expected
    assert answer == {
        "KeyId": key,
        "SharedSecret": b64(expected),
        "KeyAgreementAlgorithm": "ECDH",
        "KeyOrigin": "AWS_KMS",
    }
    described = ok(kms, "GetPublicKey", {"KeyId": key})
    assert described["KeyUsage"] == "KEY_AGREEMENT"
    assert described["KeyAgreementAlgorithms"] == ["ECDH"]


def test_derive_shared_secret_with_recipient_answers_only_the_envelope(
    kms: LocalKms, nsm: SimulatedNsm
) -> None:
    key = create(kms, KeySpec="ECC_NIST_P256", KeyUsage="KEY_AGREEMENT")
    peer = ec.generate_private_key(ec.SECP256R1())
    spki = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    recipient = RecipientKey.generate()
    document = nsm.attestation(public_key=recipient.public_key_der)
    answer = ok(
        kms,
        "DeriveSharedSecret",
        {
            "KeyId": key,
            "KeyAgreementAlgorithm": "ECDH",
            "PublicKey": b64(spki),
            "Recipient": {
                "AttestationDocument": b64(document),
                "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            },
        },
    )
    assert "SharedSecret" not in answer and answer["KeyId"] == key
    opened = recipient.open(base64.b64decode(answer["CiphertextForRecipient"]))
    assert opened == peer.exchange(ec.ECDH(), public_key(kms, key))


def test_derive_shared_secret_refuses_what_kms_refuses(kms: LocalKms) -> None:
    agreement = create(kms, KeySpec="ECC_NIST_P256", KeyUsage="KEY_AGREEMENT")
    signing = create(kms, KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
    other_curve = ec.generate_private_key(ec.SECP384R1()).public_key()
    spki = other_curve.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = {"KeyAgreementAlgorithm": "ECDH", "PublicKey": b64(spki)}
    assert "curve" in refused(
        kms, "DeriveSharedSecret", body | {"KeyId": agreement}, "ValidationException"
    )
    refused(
        kms,
        "DeriveSharedSecret",
        body | {"KeyId": agreement, "PublicKey": b64(b"not a key")},
        "ValidationException",
    )
    refused(kms, "DeriveSharedSecret", body | {"KeyId": signing}, "InvalidKeyUsageException")
    refused(kms, "DeriveSharedSecret", body | {"KeyId": "alias/none"}, "NotFoundException")
    refused(
        kms,
        "CreateKey",
        {"KeySpec": "RSA_2048", "KeyUsage": "KEY_AGREEMENT"},
        "ValidationException",
    )


# --- Sign / Verify -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "algorithm"),
    [
        ("ECC_NIST_P256", "ECDSA_SHA_256"),
        ("ECC_NIST_P384", "ECDSA_SHA_384"),
        ("RSA_2048", "RSASSA_PSS_SHA_256"),
        ("RSA_2048", "RSASSA_PKCS1_V1_5_SHA_384"),
    ],
)
@pytest.mark.parametrize("message_type", ["RAW", "DIGEST"])
def test_a_signature_verifies_with_the_public_key_and_with_verify(
    kms: LocalKms, spec: str, algorithm: str, message_type: str
) -> None:
    key = create(kms, KeySpec=spec, KeyUsage="SIGN_VERIFY")
    name = alias(kms, key)
    digest = {"256": hashes.SHA256(), "384": hashes.SHA384()}[algorithm[-3:]]
    hasher = hashes.Hash(digest)
    hasher.update(MESSAGE)
    message = hasher.finalize() if message_type == "DIGEST" else MESSAGE
    body = {
        "KeyId": name,
        "Message": b64(message),
        "MessageType": message_type,
        "SigningAlgorithm": algorithm,
    }
    answer = ok(kms, "Sign", body)
    assert answer["KeyId"] == key and answer["SigningAlgorithm"] == algorithm
    signature = base64.b64decode(answer["Signature"])
    public = public_key(kms, key)
    if algorithm.startswith("ECDSA"):
        public.verify(signature, MESSAGE, ec.ECDSA(digest))
    elif "PSS" in algorithm:
        pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        public.verify(signature, MESSAGE, pss, digest)
    else:
        public.verify(signature, MESSAGE, padding.PKCS1v15(), digest)
    verified = ok(kms, "Verify", body | {"Signature": answer["Signature"]})
    assert verified == {"KeyId": key, "SignatureValid": True, "SigningAlgorithm": algorithm}
    forged = b64(signature[:-1] + bytes([signature[-1] ^ 1]))
    refused(kms, "Verify", body | {"Signature": forged}, "KMSInvalidSignatureException")


def test_sign_refuses_what_kms_refuses(kms: LocalKms) -> None:
    signing = create(kms, KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
    symmetric = create(kms)
    body = {"Message": b64(MESSAGE), "SigningAlgorithm": "ECDSA_SHA_256"}
    refused(kms, "Sign", body | {"KeyId": symmetric}, "InvalidKeyUsageException")
    refused(
        kms,
        "Sign",
        body | {"KeyId": signing, "SigningAlgorithm": "ECDSA_SHA_384"},
        "InvalidKeyUsageException",
    )
    refused(
        kms,
        "Sign",
        body | {"KeyId": signing, "MessageType": "DIGEST"},  # not 32 bytes
        "ValidationException",
    )
    refused(kms, "GetPublicKey", {"KeyId": symmetric}, "UnsupportedOperationException")


# --- GenerateMac / VerifyMac ---------------------------------------------------------


def test_a_mac_verifies_and_names_the_key_arn(kms: LocalKms) -> None:
    key = create(kms, KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")
    body = {"KeyId": alias(kms, key), "Message": b64(MESSAGE), "MacAlgorithm": "HMAC_SHA_256"}
    answer = ok(kms, "GenerateMac", body)
    assert answer["KeyId"] == key and len(base64.b64decode(answer["Mac"])) == 32
    # The MAC is over the message's bytes: another message (same base64 length) differs.
    other = ok(kms, "GenerateMac", body | {"Message": b64(MESSAGE.upper())})
    assert other["Mac"] != answer["Mac"]
    verified = ok(kms, "VerifyMac", body | {"Mac": answer["Mac"]})
    assert verified == {"KeyId": key, "MacValid": True, "MacAlgorithm": "HMAC_SHA_256"}
    refused(kms, "VerifyMac", body | {"Mac": other["Mac"]}, "KMSInvalidMacException")
    refused(kms, "GenerateMac", body | {"MacAlgorithm": "HMAC_SHA_512"}, "InvalidKeyUsageException")
    refused(kms, "GenerateMac", body | {"KeyId": create(kms)}, "InvalidKeyUsageException")
    assert hashlib.sha256(MESSAGE).digest() != base64.b64decode(answer["Mac"])  # keyed


# --- the key policy decides every pass-through operation -------------------------------


def _policy(account: str, actions: list[str]) -> str:
    root = f"arn:aws:iam::{account}:root"
    statements = [
        {"Effect": "Allow", "Principal": {"AWS": root}, "Action": ["kms:CreateAlias"]},
    ]
    if actions:
        statements.append({"Effect": "Allow", "Principal": {"AWS": root}, "Action": actions})
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


POLICY_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    # (operation, body, key spec, key usage); KeyId added
    ("Encrypt", {"Plaintext": b64(b"x")}, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"),
    (
        "GenerateDataKeyWithoutPlaintext",
        {"NumberOfBytes": 16},
        "SYMMETRIC_DEFAULT",
        "ENCRYPT_DECRYPT",
    ),
    (
        "GenerateDataKeyPairWithoutPlaintext",
        {"KeyPairSpec": "ECC_NIST_P256"},
        "SYMMETRIC_DEFAULT",
        "ENCRYPT_DECRYPT",
    ),
    ("DescribeKey", {}, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"),
    ("GetPublicKey", {}, "ECC_NIST_P256", "SIGN_VERIFY"),
    (
        "Sign",
        {"Message": b64(MESSAGE), "SigningAlgorithm": "ECDSA_SHA_256"},
        "ECC_NIST_P256",
        "SIGN_VERIFY",
    ),
    (
        "GenerateMac",
        {"Message": b64(MESSAGE), "MacAlgorithm": "HMAC_SHA_256"},
        "HMAC_256",
        "GENERATE_VERIFY_MAC",
    ),
    (
        "DeriveSharedSecret",
        {
            "KeyAgreementAlgorithm": "ECDH",
            "PublicKey": b64(
                ec.generate_private_key(ec.SECP256R1())
                .public_key()
                .public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            ),
        },
        "ECC_NIST_P256",
        "KEY_AGREEMENT",
    ),
]


@pytest.mark.parametrize(("operation", "body", "spec", "usage"), POLICY_CASES)
def test_each_operation_needs_its_own_action_in_the_key_policy(
    kms: LocalKms, operation: str, body: dict[str, Any], spec: str, usage: str
) -> None:
    def key(actions: list[str]) -> str:
        return create(kms, KeySpec=spec, KeyUsage=usage, Policy=_policy(ACCOUNT, actions))

    denied = key(["kms:Decrypt", "kms:ReEncrypt*"])  # other actions only
    message = refused(kms, operation, body | {"KeyId": denied}, "AccessDeniedException")
    assert f"kms:{operation} on resource: {denied}" in message
    allowed = key([f"kms:{operation}"])
    ok(kms, operation, body | {"KeyId": allowed})


def test_re_encrypt_needs_from_on_the_source_and_to_on_the_destination(kms: LocalKms) -> None:
    def key(actions: list[str]) -> str:
        return create(kms, Policy=_policy(ACCOUNT, ["kms:Encrypt", *actions]))

    source, destination = key(["kms:ReEncryptFrom"]), key(["kms:ReEncryptTo"])
    blob = ok(kms, "Encrypt", {"KeyId": source, "Plaintext": b64(b"data")})["CiphertextBlob"]
    answer = ok(kms, "ReEncrypt", {"CiphertextBlob": blob, "DestinationKeyId": destination})
    assert (answer["SourceKeyId"], answer["KeyId"]) == (source, destination)
    # To the source (no ReEncryptTo there), and onward from the destination (no
    # ReEncryptFrom there): each refused for the action its key's policy lacks.
    for ciphertext, to, action in (
        (blob, source, "kms:ReEncryptTo"),
        (answer["CiphertextBlob"], destination, "kms:ReEncryptFrom"),
    ):
        request = {"CiphertextBlob": ciphertext, "DestinationKeyId": to}
        assert action in refused(kms, "ReEncrypt", request, "AccessDeniedException")


# --- the listings page as KMS does --------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "member"), [("ListKeys", "Keys"), ("ListAliases", "Aliases")]
)
def test_listings_come_in_pages_that_add_up(kms: LocalKms, operation: str, member: str) -> None:
    for _ in range(5):
        alias(kms, create(kms))
    everything = ok(kms, operation, {})[member]
    assert ok(kms, operation, {})["Truncated"] is False
    pages, body = [], {"Limit": 2}
    while True:
        page = ok(kms, operation, body)
        assert len(page[member]) <= 2
        pages += page[member]
        if not page["Truncated"]:
            assert "NextMarker" not in page
            break
        body = {"Limit": 2, "Marker": page["NextMarker"]}
    assert pages == everything and len(everything) >= 5
    refused(kms, operation, {"Marker": "not-a-marker"}, "InvalidMarkerException")
