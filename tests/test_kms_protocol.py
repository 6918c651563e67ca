"""The pure KMS JSON 1.1 layer: request validation and building, answer reading."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_agent.runtime import kms_protocol as kp
from enclave_agent.runtime.trusted_keys import TrustedKeys

B64 = base64.b64encode(b"x" * 40).decode()
KEY_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
TRUSTED = TrustedKeys.parse(["arn:aws:kms:us-east-1:111122223333:key/*"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
member_names = st.sampled_from(
    [
        "KeyId",
        "CiphertextBlob",
        "NumberOfBytes",
        "KeySpec",
        "EncryptionContext",
        "GrantTokens",
        "EncryptionAlgorithm",
        "KeyPairSpec",
        "PublicKey",
        "KeyAgreementAlgorithm",
        "DryRun",
        "Recipient",
        "Plaintext",
        "Other",
    ]
)


def test_model_members_match_the_five_operations() -> None:
    model = kp.service_model()
    for op, member in kp.PLAINTEXT_MEMBER.items():
        operation = model.operation_model(op)
        assert "Recipient" in operation.input_shape.members
        assert "CiphertextForRecipient" in operation.output_shape.members
        assert member in operation.output_shape.members


def test_valid_requests_pass_and_build() -> None:
    request = kp.validate_request(
        "Decrypt",
        {
            "CiphertextBlob": B64,
            "EncryptionContext": {"app": "demo"},
            "GrantTokens": ["t1"],
            "KeyId": "alias/demo",
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "DryRun": None,
        },
        trusted=TRUSTED,
    )
    assert "DryRun" not in request.members
    body = json.loads(kp.build_request(request, b"document"))
    assert body["Recipient"] == {
        "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        "AttestationDocument": base64.b64encode(b"document").decode(),
    }
    assert body["CiphertextBlob"] == B64
    assert kp.request_headers("Decrypt") == [
        ("Content-Type", "application/x-amz-json-1.1"),
        ("X-Amz-Target", "TrentService.Decrypt"),
    ]


@pytest.mark.parametrize(
    ("operation", "body", "fragment"),
    [
        ("Decrypt", {"CiphertextBlob": "***"}, "CiphertextBlob: not valid base64"),
        ("Decrypt", {"CiphertextBlob": 5}, "CiphertextBlob: expected a base64 string"),
        ("Decrypt", {"CiphertextBlob": ""}, "CiphertextBlob: must be at least 1 bytes"),
        ("Decrypt", {"CiphertextBlob": B64, "Extra": 1}, "Extra: unknown member"),
        ("Decrypt", {"CiphertextBlob": B64, "EncryptionContext": {"a": 1}}, "expected a string"),
        ("Decrypt", {"CiphertextBlob": B64, "GrantTokens": "t"}, "expected a JSON array"),
        ("Decrypt", {"CiphertextBlob": B64, "EncryptionAlgorithm": "ROT13"}, "must be one of"),
        ("Decrypt", {"CiphertextBlob": B64, "Recipient": {"x": 1}}, "added by the enclave agent"),
        ("GenerateDataKey", {"KeySpec": "AES_256"}, "KeyId: required member is missing"),
        ("GenerateDataKey", {"KeyId": "k"}, "exactly one of KeySpec and NumberOfBytes"),
        ("GenerateDataKey", {"KeyId": "k", "KeySpec": "AES_256", "NumberOfBytes": 32}, "exactly"),
        ("GenerateRandom", {"NumberOfBytes": 0}, "between 1 and 1024"),
        ("GenerateRandom", {"NumberOfBytes": True}, "expected an integer"),
        ("GenerateRandom", {"NumberOfBytes": "16"}, "expected an integer"),
        ("GenerateDataKeyPair", {"KeyId": "k"}, "KeyPairSpec: required member is missing"),
        ("DeriveSharedSecret", {"KeyId": "k", "KeyAgreementAlgorithm": "ECDH"}, "PublicKey"),
    ],
)
def test_invalid_requests(operation: str, body: dict[str, Any], fragment: str) -> None:
    with pytest.raises(kp.KmsProtocolError) as info:
        kp.validate_request(operation, body, trusted=TRUSTED)
    assert info.value.error_type == "ValidationException"
    assert info.value.status == 400
    assert fragment in info.value.message


def test_unknown_operation() -> None:
    with pytest.raises(kp.KmsProtocolError) as info:
        kp.validate_request("Encrypt", {}, trusted=TRUSTED)
    assert info.value.error_type == "UnknownOperationException"


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(kp.OPERATIONS),
    st.dictionaries(member_names | st.text(max_size=8), json_values, max_size=6) | json_values,
)
def test_validator_accepts_or_raises_its_own_error(operation: str, body: Any) -> None:
    try:
        request = kp.validate_request(operation, body, trusted=TRUSTED)
    except kp.KmsProtocolError as exc:
        assert exc.status == 400 and exc.message
        return
    assert "Recipient" not in request.members
    json.loads(kp.build_request(request, b"doc"))


def test_answer_is_shaped_like_kms_without_recipient() -> None:
    cfr = base64.b64encode(b"envelope").decode()
    body = json.dumps(
        {
            "KeyId": KEY_ARN,
            "CiphertextForRecipient": cfr,
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "Plaintext": None,
        }
    ).encode()
    answer = kp.read_response("Decrypt", 200, [], body, trusted=TRUSTED)
    assert isinstance(answer, kp.RecipientAnswer)
    assert answer.ciphertext_for_recipient == b"envelope"
    assert "envelope" not in repr(answer)
    assert kp.finish_answer(answer, b"secret") == {
        "KeyId": KEY_ARN,
        "Plaintext": base64.b64encode(b"secret").decode(),
        "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
    }
    pair = kp.read_response(
        "GenerateDataKeyPair",
        200,
        [],
        json.dumps({"CiphertextForRecipient": cfr, "PublicKey": "cHVi", "KeyId": KEY_ARN}).encode(),
        trusted=TRUSTED,
    )
    assert isinstance(pair, kp.RecipientAnswer)
    assert kp.finish_answer(pair, b"p")["PrivateKeyPlaintext"] == "cA=="
    shared = kp.read_response(
        "DeriveSharedSecret",
        200,
        [],
        json.dumps({"CiphertextForRecipient": cfr, "KeyId": KEY_ARN}).encode(),
        trusted=TRUSTED,
    )
    assert isinstance(shared, kp.RecipientAnswer)
    assert kp.finish_answer(shared, b"s") == {"KeyId": KEY_ARN, "SharedSecret": "cw=="}
    random = kp.read_response(
        "GenerateRandom", 200, [], json.dumps({"CiphertextForRecipient": cfr}).encode(),
        trusted=TrustedKeys(),
    )  # fmt: skip
    assert isinstance(random, kp.RecipientAnswer)  # no key: allowed even with none trusted


@pytest.mark.parametrize("operation", kp.OPERATIONS)
@pytest.mark.parametrize("member", ["Plaintext", "PrivateKeyPlaintext", "SharedSecret"])
def test_plaintext_members_in_a_recipient_answer_are_refused(operation: str, member: str) -> None:
    body = json.dumps({"CiphertextForRecipient": "ZW52", member: "c2VjcmV0"}).encode()
    with pytest.raises(kp.KmsProtocolError) as info:
        kp.read_response(operation, 200, [], body, trusted=TRUSTED)
    assert member in info.value.message and "refused" in info.value.message
    assert "c2VjcmV0" not in info.value.message


@pytest.mark.parametrize("member", ["Plaintext", "PrivateKeyPlaintext", "SharedSecret"])
def test_a_plaintext_member_hidden_by_a_repeat_is_refused(member: str) -> None:
    body = b'{"CiphertextForRecipient":"ZW52","%s":"c2VjcmV0","%s":null}' % (
        member.encode(),
        member.encode(),
    )
    with pytest.raises(kp.KmsProtocolError, match="repeats a member") as info:
        kp.read_response("Decrypt", 200, [], body, trusted=TRUSTED)
    assert info.value.error_type == "KMSInternalException"


def test_deeply_nested_answers_are_protocol_errors() -> None:
    with pytest.raises(kp.KmsProtocolError, match="not a JSON object"):
        kp.read_response("Decrypt", 200, [], b"[" * 100000, trusted=TRUSTED)
    failure = kp.read_response("Decrypt", 500, [], b"[" * 100000, trusted=TRUSTED)
    assert isinstance(failure, kp.KmsFailure) and failure.error_type == "KMSInternalException"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b"{",
        b'{"KeyId": "%s"}' % KEY_ARN.encode(),
        b'{"KeyId": "%s", "CiphertextForRecipient": "@@"}' % KEY_ARN.encode(),
        b'{"KeyId": "%s", "CiphertextForRecipient": ""}' % KEY_ARN.encode(),
        b'{"KeyId": "%s", "CiphertextForRecipient": 7}' % KEY_ARN.encode(),
    ],
)
def test_unusable_success_answers(body: bytes) -> None:
    with pytest.raises(kp.KmsProtocolError) as info:
        kp.read_response("Decrypt", 200, [], body, trusted=TRUSTED)
    assert info.value.error_type == "KMSInternalException"


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected"),
    [
        (
            400,
            [],
            b'{"__type":"com.amazonaws.kms#AccessDeniedException","message":"no"}',
            ("AccessDeniedException", "no", 400),
        ),
        (
            400,
            [],
            b'{"__type":"NotFoundException","Message":"gone"}',
            ("NotFoundException", "gone", 400),
        ),
        (
            400,
            [("x-amzn-ErrorType", "ThrottlingException:http://internal.amazon.com/")],
            b"{}",
            ("ThrottlingException", "", 400),
        ),
        (
            500,
            [],
            b"<html/>",
            ("KMSInternalException", "KMS answered HTTP 500 without a KMS error body", 500),
        ),
        (403, [], b"", ("UnknownError", "KMS answered HTTP 403 without a KMS error body", 403)),
    ],
)
def test_error_answers(
    status: int, headers: list[tuple[str, str]], body: bytes, expected: tuple[str, str, int]
) -> None:
    failure = kp.read_response("GenerateRandom", status, headers, body, trusted=TRUSTED)
    assert isinstance(failure, kp.KmsFailure)
    assert (failure.error_type, failure.message, failure.status) == expected


def test_retry_and_expiry_classification() -> None:
    assert kp.KmsFailure("ThrottlingException", "", 400).retryable
    assert kp.KmsFailure("KMSInternalException", "", 500).retryable
    assert kp.KmsFailure("DependencyTimeoutException", "", 503).retryable
    assert not kp.KmsFailure("AccessDeniedException", "", 400).retryable
    assert not kp.KmsFailure("InvalidCiphertextException", "", 400).retryable
    assert kp.KmsFailure("ExpiredTokenException", "", 400).expired_token


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(kp.OPERATIONS),
    st.sampled_from([200, 200, 400, 500, 503]),
    st.binary(max_size=200)
    | st.dictionaries(
        st.sampled_from(
            [
                "CiphertextForRecipient",
                "Plaintext",
                "KeyId",
                "__type",
                "message",
                "Message",
                "SharedSecret",
            ]
        ),
        json_values
        | st.just(base64.b64encode(b"abc").decode())
        | st.sampled_from([KEY_ARN, KEY_ARN.replace("111122223333", "999988887777")]),
    ).map(lambda d: json.dumps(d).encode()),
)
def test_response_reader_never_fails_otherwise(operation: str, status: int, body: bytes) -> None:
    try:
        result = kp.read_response(operation, status, [], body, trusted=TRUSTED)
    except kp.KmsProtocolError as exc:
        assert status == 200
        assert (exc.error_type, exc.status) in {
            ("KMSInternalException", 502),
            ("AccessDeniedException", 400),
        }
        return
    if isinstance(result, kp.RecipientAnswer):
        assert status == 200 and result.ciphertext_for_recipient
        if kp.OPERATION_TABLE[operation].takes_key:
            assert result.members["KeyId"] == KEY_ARN
        assert not set(result.members) & {"Plaintext", "SharedSecret", "PrivateKeyPlaintext"}
        kp.finish_answer(result, b"p")
    else:
        assert status != 200 and result.error_type


def test_parse_error_type() -> None:
    assert kp.parse_error_type("com.amazonaws.kms#KMSInvalidStateException") == (
        "KMSInvalidStateException"
    )
    assert kp.parse_error_type("ThrottlingException:http://x/") == "ThrottlingException"


# --- trusted keys: the rule is the operation table's ---------------------------------

OTHER_ACCOUNT_ARN = KEY_ARN.replace("111122223333", "999988887777")


def test_every_operation_with_a_key_id_declares_it_takes_a_key() -> None:
    """A new operation whose request names a KeyId gets the trusted-keys check by
    declaring ``takes_key``; this fails if one is added without it."""
    model = kp.service_model()
    for name, operation in kp.OPERATION_TABLE.items():
        takes = "KeyId" in model.operation_model(name).input_shape.members
        assert operation.takes_key == takes, name
        assert "KeyId" in model.operation_model(name).output_shape.members or not takes


def _key_request(operation: str, key_id: str) -> dict[str, Any]:
    return {
        "Decrypt": {"CiphertextBlob": B64, "KeyId": key_id},
        "GenerateDataKey": {"KeyId": key_id, "KeySpec": "AES_256"},
        "GenerateDataKeyPair": {"KeyId": key_id, "KeyPairSpec": "RSA_2048"},
        "DeriveSharedSecret": {
            "KeyId": key_id,
            "KeyAgreementAlgorithm": "ECDH",
            "PublicKey": B64,
        },
    }[operation]


KEY_OPERATIONS = [name for name, op in kp.OPERATION_TABLE.items() if op.takes_key]


@pytest.mark.parametrize("operation", KEY_OPERATIONS)
def test_no_trusted_keys_refuses_every_key_operation_before_any_call(operation: str) -> None:
    with pytest.raises(kp.KmsProtocolError) as info:
        kp.validate_request(operation, _key_request(operation, "alias/app"), trusted=TrustedKeys())
    assert (info.value.error_type, info.value.status) == ("AccessDeniedException", 400)
    assert "trusted_keys" in info.value.message and "key operations are off" in info.value.message
    request = kp.validate_request("GenerateRandom", {"NumberOfBytes": 8}, trusted=TrustedKeys())
    assert request.operation == "GenerateRandom"


@pytest.mark.parametrize("operation", KEY_OPERATIONS)
def test_an_untrusted_exact_key_arn_is_refused_before_any_call(operation: str) -> None:
    with pytest.raises(kp.KmsProtocolError) as info:
        kp.validate_request(operation, _key_request(operation, OTHER_ACCOUNT_ARN), trusted=TRUSTED)
    assert (info.value.error_type, info.value.status) == ("AccessDeniedException", 400)
    assert OTHER_ACCOUNT_ARN in info.value.message and "trusted_keys" in info.value.message
    assert "before any call" in info.value.message
    # Aliases and bare ids can only be judged by KMS's answer: they are sent.
    for key_id in (KEY_ARN, "alias/app", "1234abcd-12ab-34cd-56ef-1234567890ab"):
        kp.validate_request(operation, _key_request(operation, key_id), trusted=TRUSTED)


@pytest.mark.parametrize("operation", KEY_OPERATIONS)
@pytest.mark.parametrize(
    ("key_id", "named"),
    [
        (None, "names no KeyId"),
        ("alias/app", "'alias/app' is not a full key ARN"),
        ("arn:aws:kms:us-east-1:111122223333:alias/app", "is not a full key ARN"),
        ("1234abcd-12ab-34cd-56ef-1234567890ab", "is not a full key ARN"),
        (OTHER_ACCOUNT_ARN, f"key {OTHER_ACCOUNT_ARN} answered"),
        (KEY_ARN.replace("us-east-1", "eu-west-1"), "key arn:aws:kms:eu-west-1:"),
        (KEY_ARN.replace("arn:aws:", "arn:aws-cn:"), "key arn:aws-cn:kms:"),
        (7, "7 is not a full key ARN"),
    ],
)
def test_an_answer_from_an_untrusted_key_is_refused(
    operation: str, key_id: object, named: str
) -> None:
    body = {"CiphertextForRecipient": base64.b64encode(b"envelope").decode()}
    if key_id is not None:
        body["KeyId"] = key_id  # type: ignore[assignment]
    with pytest.raises(kp.KmsProtocolError) as info:
        kp.read_response(operation, 200, [], json.dumps(body).encode(), trusted=TRUSTED)
    assert (info.value.error_type, info.value.status) == ("AccessDeniedException", 400)
    assert named in info.value.message
    assert "trusted_keys" in info.value.message and "not opened" in info.value.message
    assert "ZW52ZWxvcGU" not in info.value.message  # nothing of the envelope
