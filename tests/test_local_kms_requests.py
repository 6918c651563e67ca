"""Whatever a signed caller sends, the local KMS answers in KMS's error shapes (in process)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.local_kms.backend import MotoKms
from devtools.local_kms.credentials import CredentialStore
from devtools.local_kms.recipient import RecipientError, verify_recipient
from devtools.local_kms.service import LocalKms
from enclave_agent.runtime.recipient import RecipientKey
from enclave_agent.simulated.nsm import SimulatedNsm
from tests.support.local_kms_calls import REGION, call

ACCOUNTS = ["111122223333", "444455556666"]


@pytest.fixture(scope="module")
def nsm() -> SimulatedNsm:
    return SimulatedNsm.create()


@pytest.fixture(scope="module")
def kms(nsm: SimulatedNsm) -> LocalKms:
    return LocalKms(
        region=REGION,
        roots=[nsm.root_pem],
        credentials=CredentialStore(ACCOUNTS),
        moto=MotoKms(REGION, ACCOUNTS),
    )


OPERATIONS = [
    "CreateKey", "Decrypt", "DescribeKey", "Encrypt", "GenerateDataKey", "GenerateDataKeyPair",
    "GenerateRandom", "GetKeyPolicy", "ListKeys", "PutKeyPolicy", "ReEncrypt", "CreateAlias",
    "GenerateDataKeyWithoutPlaintext", "DeriveSharedSecret", "NotAnOperation", "Sign", "Verify",
    "GenerateMac", "VerifyMac", "GetPublicKey", "ListAliases",
]  # fmt: skip
MEMBERS = [
    "KeyId", "CiphertextBlob", "Plaintext", "NumberOfBytes", "KeySpec", "KeyPairSpec",
    "Recipient", "Policy", "PolicyName", "EncryptionContext", "DestinationKeyId", "AliasName",
    "TargetKeyId", "GrantTokens", "Message", "SigningAlgorithm", "MacAlgorithm", "Mac",
    "Signature", "PublicKey", "KeyAgreementAlgorithm", "MessageType", "Limit", "Marker",
]  # fmt: skip
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "AES_256",
            "RSA_2048",
            "alias/x",
            "AAAA",
            "not base64!",
            "kms:*",
            "arn:aws:kms:us-east-1:444455556666:alias/x",
            "arn:aws:kms:us-east-1:1:key/x",
            "arn:aws:kms:eu-west-1:111122223333:key/x",
            "arn:",
            "alias/aws/ebs",
            "ECDSA_SHA_256",
            "HMAC_SHA_256",
            "ECDH",
            "DIGEST",
            "1",
        ]
    )
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from([*MEMBERS, "AttestationDocument"]), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    operation=st.sampled_from(OPERATIONS),
    body=st.dictionaries(st.sampled_from(MEMBERS), values, max_size=5) | values,
    use_key=st.booleans(),
)
def test_any_signed_body_gets_a_kms_answer(
    kms: LocalKms, operation: str, body: Any, use_key: bool
) -> None:
    if use_key and isinstance(body, dict):
        body["KeyId"] = KEY_ID_HOLDER.setdefault("id", _make_key(kms))
    status, answer = call(kms, operation, body)
    assert status in (200, 400, 404), answer
    if status != 200:
        assert isinstance(answer["__type"], str) and isinstance(answer["message"], str)


KEY_ID_HOLDER: dict[str, str] = {}


def _make_key(kms: LocalKms) -> str:
    status, answer = call(kms, "CreateKey", {})
    assert status == 200
    return str(answer["KeyMetadata"]["KeyId"])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=200))
def test_any_body_bytes_get_a_kms_answer(kms: LocalKms, body: bytes) -> None:
    status, _answer = call(kms, "GenerateRandom", body)
    assert status in (200, 400)


def test_wrong_types_and_missing_members_are_refused_as_aws_does(kms: LocalKms) -> None:
    status, answer = call(kms, "GenerateRandom", {"NumberOfBytes": "16"})
    assert (status, answer["__type"]) == (400, "SerializationException")
    status, answer = call(kms, "GenerateRandom", {"NumberOfBytes": 0})
    assert (status, answer["__type"]) == (400, "ValidationException")
    status, answer = call(kms, "Encrypt", {"Plaintext": "aGk="})
    assert (status, answer["__type"]) == (400, "ValidationException")
    assert "keyId" in answer["message"]
    status, answer = call(kms, "Decrypt", {"CiphertextBlob": "%%%"})
    assert (status, answer["__type"]) == (400, "SerializationException")
    status, answer = call(kms, "DeriveSharedSecret", {})
    assert (status, answer["__type"]) == (400, "ValidationException")
    status, answer = call(kms, "CreateCustomKeyStore", {"CustomKeyStoreName": "x"})
    assert (status, answer["__type"]) == (400, "UnsupportedOperationException")


def test_recipient_is_honoured_where_modelled_and_ignored_elsewhere(
    kms: LocalKms, nsm: SimulatedNsm
) -> None:
    document = nsm.attestation(public_key=RecipientKey.generate().public_key_der)
    recipient = {
        "AttestationDocument": base64.b64encode(document).decode(),
        "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
    }
    status, answer = call(kms, "GenerateRandom", {"NumberOfBytes": 8, "Recipient": recipient})
    assert status == 200 and "Plaintext" not in answer and answer["CiphertextForRecipient"]
    # Unknown members are ignored, as AWS's JSON protocol does.
    status, answer = call(kms, "ListKeys", {"Recipient": recipient})
    assert status == 200 and "Keys" in answer


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    document=st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
    | st.text(max_size=40)
    | values,
    algorithm=st.sampled_from(["RSAES_OAEP_SHA_256", "RSAES_OAEP_SHA_1", None, 7]),
)
def test_recipient_checker_raises_only_recipient_error(
    nsm: SimulatedNsm, document: Any, algorithm: Any
) -> None:
    raw = {"AttestationDocument": document, "KeyEncryptionAlgorithm": algorithm}
    with pytest.raises(RecipientError):
        verify_recipient(raw, [nsm.root_pem], datetime.now(UTC))


def _key_with_policy(kms: LocalKms, policy: dict[str, Any]) -> str:
    status, answer = call(kms, "CreateKey", {"Policy": json.dumps(policy)})
    assert status == 200, answer
    return str(answer["KeyMetadata"]["KeyId"])


def test_reencrypt_is_decided_by_the_ciphertexts_key_not_a_named_source(kms: LocalKms) -> None:
    # The attested key lets the account Encrypt and ReEncryptTo but never take its
    # ciphertext out; the open key allows everything.
    locked = _key_with_policy(
        kms,
        {
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": ["kms:Encrypt", "kms:ReEncryptTo"],
                }
            ]
        },
    )
    opened = _make_key(kms)
    status, answer = call(kms, "Encrypt", {"KeyId": locked, "Plaintext": "c2VjcmV0"})
    assert status == 200, answer
    blob = answer["CiphertextBlob"]
    # Naming the open key as the source must not let the locked key's ciphertext move
    # to the open key (from where Decrypt would give it to anyone).
    status, answer = call(
        kms,
        "ReEncrypt",
        {"CiphertextBlob": blob, "SourceKeyId": opened, "DestinationKeyId": opened},
    )
    assert (status, answer["__type"]) == (400, "IncorrectKeyException")
    status, answer = call(kms, "ReEncrypt", {"CiphertextBlob": blob, "DestinationKeyId": opened})
    assert (status, answer["__type"]) == (400, "AccessDeniedException")
