"""The pure KMS JSON 1.1 layer: request validation and building, answer reading."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_agent.runtime import kms_protocol as kp
from enclave_agent.runtime.kms_operations import (
    OPERATION_TABLE,
    OPERATIONS,
    PASS_THROUGH_OPERATIONS,
    RECIPIENT_OPERATIONS,
)
from enclave_agent.runtime.trusted_keys import TrustedKeys
from tests.support.kms_model import KEY_ARN, answer_from, botocore_operation, sample_request

B64 = base64.b64encode(b"x" * 40).decode()
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


def test_model_members_match_the_recipient_operations() -> None:
    for op in RECIPIENT_OPERATIONS:
        member = OPERATION_TABLE[op].plaintext_member
        operation = botocore_operation(op)
        assert "Recipient" in operation.input_shape.members
        assert "CiphertextForRecipient" in operation.output_shape.members
        assert member in operation.output_shape.members


def test_a_validated_requests_repr_never_shows_its_members() -> None:
    """An Encrypt's Plaintext is among the members: a repr (a traceback, a debug line)
    must not carry it."""
    plaintext = base64.b64encode(b"the app's secret value").decode()
    request = kp.validate_request(
        "Encrypt", {"KeyId": KEY_ARN, "Plaintext": plaintext}, trusted=TRUSTED
    )
    assert request.members["Plaintext"] and plaintext not in repr(request)


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
    body = json.loads(kp.build_request(request, b"document").data)
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
        kp.validate_request("CreateKey", {}, trusted=TRUSTED)
    assert info.value.error_type == "UnknownOperationException"
    assert all(name in info.value.message for name in OPERATIONS)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(OPERATIONS),
    st.dictionaries(member_names | st.text(max_size=8), json_values, max_size=6) | json_values,
)
def test_validator_accepts_or_raises_its_own_error(operation: str, body: Any) -> None:
    try:
        request = kp.validate_request(operation, body, trusted=TRUSTED)
    except kp.KmsProtocolError as exc:
        assert exc.status == 400 and exc.message
        return
    assert "Recipient" not in request.members
    document = b"doc" if OPERATION_TABLE[operation].recipient else None
    # Byte for byte the members after Recipient as a first member, and their SHA-256
    # (build_request splices in a per-document encoding of Recipient and its hash).
    expected: dict[str, Any] = {}
    if document is not None:
        expected["Recipient"] = {
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            "AttestationDocument": base64.b64encode(document).decode(),
        }
    expected.update(request.members)
    built = kp.build_request(request, document)
    assert built.data == json.dumps(expected, separators=(",", ":")).encode()
    assert built.sha256 == hashlib.sha256(built.data).hexdigest()


def test_recipient_is_spliced_in_as_the_first_member_even_of_an_empty_object() -> None:
    empty = kp.build_request(kp.ValidatedRequest("Decrypt", {}), b"doc")
    assert empty.sha256 == hashlib.sha256(empty.data).hexdigest()
    assert json.loads(empty.data) == {
        "Recipient": {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": "ZG9j"}
    }
    # ValidatedRequest made by hand, past validate_request: never a second Recipient.
    with pytest.raises(ValueError, match="Recipient is the agent's"):
        kp.build_request(kp.ValidatedRequest("Decrypt", {"Recipient": {}}), b"doc")


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=4, unique=True),
    st.lists(st.integers(0, 3), min_size=1, max_size=12),
    st.lists(st.sampled_from(["", "a", "b\u00e9", "\ud800"]), min_size=1, max_size=12),
)
def test_each_body_carries_its_own_document_and_hash_however_documents_alternate(
    documents: list[bytes], order: list[int], contexts: list[str]
) -> None:
    """Recipient's opening and its hash state are cached per document (a few at once):
    a refreshed document, an older one coming back after the refresh-once retry, calls
    of several apps in turn. Each body names its own document once, under one Recipient,
    and its hash is its bytes'; no state of one call reaches the next."""
    for step, index in enumerate(order):
        document = documents[index % len(documents)]
        context = contexts[step % len(contexts)]
        members = {"CiphertextBlob": B64, "EncryptionContext": {"app": context}} if context else {}
        built = kp.build_request(kp.ValidatedRequest("Decrypt", members), document)
        b64 = base64.b64encode(document).decode()
        assert built.sha256 == hashlib.sha256(built.data).hexdigest()
        top = json.loads(built.data, object_pairs_hook=lambda pairs: pairs)
        assert [name for name, _ in top] == ["Recipient", *members]  # each member once
        recipient = {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": b64}
        assert json.loads(built.data) == {"Recipient": recipient, **members}


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


@pytest.mark.parametrize("operation", OPERATIONS)
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


listed_entries = (
    st.fixed_dictionaries(
        {},
        optional={
            "KeyArn": st.sampled_from([KEY_ARN, KEY_ARN.replace("111122223333", "999988887777")]),
            "KeyId": st.sampled_from([KEY_ARN[-36:], "x"]),
            "AliasArn": st.sampled_from(
                ["arn:aws:kms:us-east-1:111122223333:alias/a", "arn:aws:kms:us-east-1:9:alias/a"]
            ),
            "TargetKeyId": st.sampled_from([KEY_ARN[-36:], "99999999-12ab-34cd-56ef-1234567890ab"]),
        },
    )
    | json_values
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(OPERATIONS),
    st.sampled_from([200, 200, 400, 500, 503]),
    st.binary(max_size=200)
    | st.dictionaries(
        st.sampled_from(
            [
                "CiphertextForRecipient",
                "Plaintext",
                "KeyId",
                "SourceKeyId",
                "KeyMetadata",
                "Keys",
                "Aliases",
                "NextMarker",
                "__type",
                "message",
                "Message",
                "SharedSecret",
            ]
        ),
        json_values
        | st.just(base64.b64encode(b"abc").decode())
        | st.sampled_from([KEY_ARN, KEY_ARN.replace("111122223333", "999988887777")])
        | st.fixed_dictionaries({"Arn": st.sampled_from([KEY_ARN, "x"])})
        | st.lists(listed_entries, max_size=4),
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
        if OPERATION_TABLE[operation].takes_key:
            assert result.members["KeyId"] == KEY_ARN
        assert not set(result.members) & {"Plaintext", "SharedSecret", "PrivateKeyPlaintext"}
        kp.finish_answer(result, b"p")
    elif isinstance(result, kp.PassThroughAnswer):
        table = OPERATION_TABLE[operation]
        assert status == 200 and set(result.members) <= set(table.answer)
        for path in table.answer_keys:
            value: Any = result.members
            for name in path:
                value = value[name]
            assert value == KEY_ARN
        named_by = {"Keys": "KeyArn", "Aliases": "AliasArn"}.get(table.listing or "")
        for entry in result.members.get(table.listing or "", []):  # the trusted account's only
            assert ":111122223333:" in entry[named_by]
    else:
        assert status != 200 and result.error_type


def test_parse_error_type() -> None:
    assert kp.parse_error_type("com.amazonaws.kms#KMSInvalidStateException") == (
        "KMSInvalidStateException"
    )
    assert kp.parse_error_type("ThrottlingException:http://x/") == "ThrottlingException"


# --- trusted keys: the rule is the operation table's ---------------------------------

OTHER_ACCOUNT_ARN = KEY_ARN.replace("111122223333", "999988887777")


KEY_OPERATIONS = [name for name, op in OPERATION_TABLE.items() if op.takes_key]
NAMING_OPERATIONS = [name for name, op in OPERATION_TABLE.items() if op.key_members]
ANSWERING_OPERATIONS = [name for name, op in OPERATION_TABLE.items() if op.answer_keys]


def test_every_served_operation_has_a_sample_request() -> None:
    for operation in OPERATIONS:
        kp.validate_request(operation, sample_request(operation), trusted=TRUSTED)


@pytest.mark.parametrize("operation", KEY_OPERATIONS)
def test_no_trusted_keys_refuses_every_key_operation_before_any_call(operation: str) -> None:
    with pytest.raises(kp.KmsProtocolError) as info:
        kp.validate_request(
            operation, sample_request(operation, "alias/app"), trusted=TrustedKeys()
        )
    assert (info.value.error_type, info.value.status) == ("AccessDeniedException", 400)
    assert "trusted_keys" in info.value.message and "key operations are off" in info.value.message
    request = kp.validate_request("GenerateRandom", {"NumberOfBytes": 8}, trusted=TrustedKeys())
    assert request.operation == "GenerateRandom"


@pytest.mark.parametrize("operation", NAMING_OPERATIONS)
def test_an_untrusted_exact_key_arn_is_refused_before_any_call(operation: str) -> None:
    with pytest.raises(kp.KmsProtocolError) as info:
        kp.validate_request(
            operation, sample_request(operation, OTHER_ACCOUNT_ARN), trusted=TRUSTED
        )
    assert (info.value.error_type, info.value.status) == ("AccessDeniedException", 400)
    assert OTHER_ACCOUNT_ARN in info.value.message and "trusted_keys" in info.value.message
    assert "before any call" in info.value.message
    # Aliases and bare ids can only be judged by KMS's answer: they are sent.
    for key_id in (KEY_ARN, "alias/app", "1234abcd-12ab-34cd-56ef-1234567890ab"):
        kp.validate_request(operation, sample_request(operation, key_id), trusted=TRUSTED)


@pytest.mark.parametrize("untrusted", ["SourceKeyId", "DestinationKeyId"])
def test_re_encrypt_from_or_to_an_untrusted_key_arn_is_refused_before_any_call(
    untrusted: str,
) -> None:
    request = sample_request("ReEncrypt") | {untrusted: OTHER_ACCOUNT_ARN}
    with pytest.raises(kp.KmsProtocolError, match="before any call") as info:
        kp.validate_request("ReEncrypt", request, trusted=TRUSTED)
    assert OTHER_ACCOUNT_ARN in info.value.message


@pytest.mark.parametrize("operation", ANSWERING_OPERATIONS)
@pytest.mark.parametrize(
    ("key_id", "named"),
    [
        (None, "names no {member}"),
        ("alias/app", "'alias/app' is not a full key ARN"),
        ("arn:aws:kms:us-east-1:111122223333:alias/app", "is not a full key ARN"),
        ("1234abcd-12ab-34cd-56ef-1234567890ab", "is not a full key ARN"),
        (OTHER_ACCOUNT_ARN, f"key {OTHER_ACCOUNT_ARN} answered"),
        (KEY_ARN.replace("us-east-1", "eu-west-1"), "key arn:aws:kms:eu-west-1:"),
        (KEY_ARN.replace("arn:aws:", "arn:aws-cn:"), "key arn:aws-cn:kms:"),
        (7, "{member} 7 is not a full key ARN"),
    ],
)
def test_an_answer_from_an_untrusted_key_is_refused(
    operation: str, key_id: object, named: str
) -> None:
    table = OPERATION_TABLE[operation]
    body = answer_from(operation, key_id)
    with pytest.raises(kp.KmsProtocolError) as info:
        kp.read_response(operation, 200, [], json.dumps(body).encode(), trusted=TRUSTED)
    assert (info.value.error_type, info.value.status) == ("AccessDeniedException", 400)
    assert named.format(member=".".join(table.answer_keys[0])) in info.value.message
    assert "trusted_keys" in info.value.message
    assert ("not opened" in info.value.message) == table.recipient
    assert "ZW52ZWxvcGU" not in info.value.message  # nothing of the envelope
    answer = kp.read_response(
        operation, 200, [], json.dumps(answer_from(operation, KEY_ARN)).encode(), trusted=TRUSTED
    )
    assert isinstance(answer, kp.RecipientAnswer if table.recipient else kp.PassThroughAnswer)


@pytest.mark.parametrize("untrusted", ["SourceKeyId", "KeyId"])
def test_re_encrypt_answers_from_an_untrusted_source_or_destination_are_refused(
    untrusted: str,
) -> None:
    """ReEncrypt from a key the parent controls would launder a value it chose into a
    ciphertext of a trusted key; to one, it would hand the parent the data."""
    body = {"CiphertextBlob": B64, "SourceKeyId": KEY_ARN, "KeyId": KEY_ARN}
    body[untrusted] = OTHER_ACCOUNT_ARN
    with pytest.raises(kp.KmsProtocolError) as info:
        kp.read_response("ReEncrypt", 200, [], json.dumps(body).encode(), trusted=TRUSTED)
    assert info.value.error_type == "AccessDeniedException"
    assert OTHER_ACCOUNT_ARN in info.value.message


def test_describe_key_is_judged_by_its_metadata_arn() -> None:
    body = {"KeyMetadata": {"KeyId": "1234abcd-12ab-34cd-56ef-1234567890ab", "Arn": KEY_ARN}}
    answer = kp.read_response("DescribeKey", 200, [], json.dumps(body).encode(), trusted=TRUSTED)
    assert isinstance(answer, kp.PassThroughAnswer) and answer.members == body
    for metadata, named in [
        ({"KeyId": KEY_ARN}, "names no KeyMetadata.Arn"),
        ({"Arn": OTHER_ACCOUNT_ARN, "KeyId": KEY_ARN}, f"key {OTHER_ACCOUNT_ARN} answered"),
        ("x", "names no KeyMetadata.Arn"),
    ]:
        with pytest.raises(kp.KmsProtocolError) as info:
            kp.read_response(
                "DescribeKey",
                200,
                [],
                json.dumps({"KeyMetadata": metadata}).encode(),
                trusted=TRUSTED,
            )
        assert named in info.value.message and info.value.error_type == "AccessDeniedException"


def test_a_pass_through_answer_keeps_only_the_members_kms_documents() -> None:
    """KMS's answer is authentic (TLS), yet the app gets only what the table declares
    for the operation, in the model's order: nothing undeclared rides along."""
    body = {
        "Extra": "x",
        "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        "KeyId": KEY_ARN,
        "CiphertextBlob": B64,
        "NextMarker": None,
    }
    answer = kp.read_response("Encrypt", 200, [], json.dumps(body).encode(), trusted=TRUSTED)
    assert isinstance(answer, kp.PassThroughAnswer)
    assert list(answer.members) == ["CiphertextBlob", "KeyId", "EncryptionAlgorithm"]
    assert B64 not in repr(answer)  # names only


OTHER_KEY_ID = "99999999-12ab-34cd-56ef-1234567890ab"


def test_list_keys_keeps_only_trusted_keys_and_the_pagination() -> None:
    pinned = TrustedKeys.parse([KEY_ARN])
    keys = [
        {"KeyId": "1234abcd-12ab-34cd-56ef-1234567890ab", "KeyArn": KEY_ARN},
        {"KeyId": OTHER_KEY_ID, "KeyArn": KEY_ARN.replace("1234abcd", "99999999")},
        {"KeyId": "x", "KeyArn": OTHER_ACCOUNT_ARN},
        {"KeyId": "1234abcd-12ab-34cd-56ef-1234567890ab"},  # no ARN: cannot be told
        "junk",
        {"KeyArn": 7},
    ]
    body = {"Keys": keys, "NextMarker": "page-2", "Truncated": True}
    answer = kp.read_response("ListKeys", 200, [], json.dumps(body).encode(), trusted=pinned)
    assert isinstance(answer, kp.PassThroughAnswer)
    assert answer.members == {"Keys": [keys[0]], "NextMarker": "page-2", "Truncated": True}
    # A page with no trusted key is an empty page, and the app still reaches the next.
    body = {"Keys": keys[1:3], "NextMarker": "page-3", "Truncated": True}
    answer = kp.read_response("ListKeys", 200, [], json.dumps(body).encode(), trusted=pinned)
    assert isinstance(answer, kp.PassThroughAnswer)
    assert answer.members == {"Keys": [], "NextMarker": "page-3", "Truncated": True}
    with pytest.raises(kp.KmsProtocolError, match="not a list") as info:
        kp.read_response("ListKeys", 200, [], b'{"Keys": {"a": 1}}', trusted=pinned)
    assert info.value.error_type == "KMSInternalException"


def test_list_aliases_keeps_only_aliases_of_trusted_keys() -> None:
    pinned = TrustedKeys.parse([KEY_ARN])
    alias_arn = "arn:aws:kms:us-east-1:111122223333:alias/"
    aliases = [
        {"AliasName": "alias/app", "AliasArn": alias_arn + "app", "TargetKeyId": KEY_ARN[-36:]},
        {"AliasName": "alias/b", "AliasArn": alias_arn + "b", "TargetKeyId": OTHER_KEY_ID},
        # The same key id in another account is another key.
        {
            "AliasName": "alias/app",
            "AliasArn": "arn:aws:kms:us-east-1:999988887777:alias/app",
            "TargetKeyId": KEY_ARN[-36:],
        },
        {"AliasName": "alias/aws/s3", "AliasArn": alias_arn + "aws/s3"},  # no target yet
        {"AliasName": "alias/x", "AliasArn": KEY_ARN, "TargetKeyId": KEY_ARN[-36:]},
        {"AliasName": "alias/y", "AliasArn": alias_arn + "y", "TargetKeyId": "a:b"},
    ]
    body = {"Aliases": aliases, "Truncated": False}
    answer = kp.read_response("ListAliases", 200, [], json.dumps(body).encode(), trusted=pinned)
    assert isinstance(answer, kp.PassThroughAnswer)
    assert answer.members == {"Aliases": [aliases[0]], "Truncated": False}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_unknown_members_are_refused_for_every_operation(operation: str) -> None:
    with pytest.raises(kp.KmsProtocolError) as info:
        kp.validate_request(operation, sample_request(operation) | {"Other": 1}, trusted=TRUSTED)
    assert info.value.error_type == "ValidationException"
    assert f"Other: unknown member in {operation} request" in info.value.message


@pytest.mark.parametrize("operation", PASS_THROUGH_OPERATIONS)
def test_a_pass_through_request_is_sent_as_the_app_wrote_it(operation: str) -> None:
    request = kp.validate_request(operation, sample_request(operation), trusted=TRUSTED)
    assert json.loads(kp.build_request(request, None).data) == sample_request(operation)
    with pytest.raises(ValueError, match="Recipient only"):
        kp.build_request(request, b"document")
    with pytest.raises(kp.KmsProtocolError, match="Recipient: unknown member"):
        kp.validate_request(
            operation, sample_request(operation) | {"Recipient": {}}, trusted=TRUSTED
        )


def test_generate_data_key_without_plaintext_needs_one_of_key_spec_and_number_of_bytes() -> None:
    for body in ({"KeyId": KEY_ARN}, {"KeyId": KEY_ARN, "KeySpec": "AES_128", "NumberOfBytes": 1}):
        with pytest.raises(kp.KmsProtocolError, match="exactly one of KeySpec and NumberOfBytes"):
            kp.validate_request("GenerateDataKeyWithoutPlaintext", body, trusted=TRUSTED)
