"""The stores' reads and answers (store_protocol): shapes checked against botocore, the
answers read as untrusted bytes (hypothesis), the ARN in every answer checked."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from hypothesis import given
from hypothesis import strategies as st

from enclave_agent.runtime.sealed import MAX_SEALED_BYTES
from enclave_agent.runtime.sigv4 import SigningKeyCache, sign
from enclave_agent.runtime.store_location import (
    S3Location,
    StoreLocation,
    parse_location,
    require_pinned,
)
from enclave_agent.runtime.store_protocol import (
    MAX_ANSWER,
    MAX_VERSION,
    StoreAnswerError,
    StoredSecret,
    StoreFailure,
    read_answer,
    read_request,
    service_of,
)
from tests.conftest import STORE_ACCOUNTS
from tests.support.botocore_oracle import AT, Creds, botocore_clock, botocore_sends, text

A, B = STORE_ACCOUNTS
SM_ARN = f"arn:aws:secretsmanager:eu-west-1:{A}:secret:prod/db-AbCdEf"
SSM_ARN = f"arn:aws:ssm:eu-west-1:{A}:parameter/prod/db"
SEALED = b"\x01\x02\x03 sealed bytes"
VERSION_ID = "EXAMPLE1-90ab-cdef-fedc-ba987EXAMPLE"


def located(text: str) -> StoreLocation:
    return require_pinned(parse_location(text))


SM = located(f"secretsmanager:{SM_ARN}")
SSM = located(f"ssm:{SSM_ARN}")
S3 = located("s3://my-bucket/prod/db key+1")
assert isinstance(S3, S3Location)


def sm_answer(**changes: Any) -> bytes:
    document = {
        "ARN": SM_ARN,
        "Name": "prod/db",
        "VersionId": VERSION_ID,
        "SecretBinary": base64.b64encode(SEALED).decode(),
        "VersionStages": ["AWSCURRENT"],
        "CreatedDate": 1.523477145713e9,
    }
    document.update(changes)
    return json.dumps({k: v for k, v in document.items() if v is not None}).encode()


def ssm_answer(**changes: Any) -> bytes:
    parameter = {
        "ARN": SSM_ARN,
        "DataType": "text",
        "LastModifiedDate": 1.582657288e9,
        "Name": "/prod/db",
        "Type": "String",
        "Value": base64.b64encode(SEALED).decode(),
        "Version": 3,
    }
    parameter.update(changes)
    return json.dumps({"Parameter": {k: v for k, v in parameter.items() if v is not None}}).encode()


# --- the requests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "operation", "args"),
    [
        (SM, "get_secret_value", {"SecretId": SM_ARN}),
        (SSM, "get_parameter", {"Name": SSM_ARN, "WithDecryption": False}),
        (
            S3,
            "get_object",
            {"Bucket": "my-bucket", "Key": "prod/db key+1", "ExpectedBucketOwner": A},
        ),
    ],
)
def test_each_read_is_the_request_botocore_sends_signed_alike(
    location: StoreLocation, operation: str, args: dict[str, Any]
) -> None:
    service = service_of(location)
    request = read_request(location, A if service == "s3" else None)
    creds = Creds()
    sent = botocore_sends(service, operation, args, creds)
    theirs = {k.lower(): text(v) for k, v in sent.headers.items()}
    assert (request.service, request.method) == (service, sent.method)
    assert request.path == sent.url.split("amazonaws.com", 1)[1]
    for name, value in request.headers:
        assert theirs[name.lower()] == value
    if request.body:
        assert json.loads(request.body) == json.loads(sent.body)
    else:
        assert not sent.body
    # Our request, signed by our signer and by botocore's, at the same instant.
    host = f"{service}.eu-west-1.amazonaws.com"
    ours = sign(
        method=request.method,
        host=host,
        path=request.path,
        headers=request.headers,
        payload=request.body,
        service=service,
        region="eu-west-1",
        credentials=creds,
        instant=AT,
        keys=SigningKeyCache(),
    )
    oracle = AWSRequest(
        method=request.method,
        url=f"https://{host}{request.path}",
        data=request.body,
        headers=dict(request.headers),
    )
    signer = S3SigV4Auth if service == "s3" else SigV4Auth
    with botocore_clock(AT):
        signer(ReadOnlyCredentials(*vars(creds).values()), service, "eu-west-1").add_auth(oracle)
    added = {name.lower(): value for name, value in ours}
    assert added["authorization"] == oracle.headers["Authorization"]
    if service == "s3":
        # S3's rules: the payload's hash sent and signed, the expected owner signed.
        assert added["x-amz-content-sha256"] == oracle.headers["X-Amz-Content-SHA256"]
        assert "x-amz-expected-bucket-owner" in added["authorization"]


def test_an_s3_read_always_names_the_bucket_owner() -> None:
    with pytest.raises(ValueError, match="expected owner"):
        read_request(S3)


# --- the answers ----------------------------------------------------------------------


def test_each_store_answer_gives_the_sealed_bytes_and_their_version() -> None:
    assert read_answer(SM, 200, [], sm_answer()) == StoredSecret(VERSION_ID, SEALED)
    assert read_answer(SSM, 200, [], ssm_answer()) == StoredSecret("3", SEALED)
    versioned = [("x-amz-version-id", "3/L4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY"), ("ETag", '"abc"')]
    assert read_answer(S3, 200, versioned, SEALED) == StoredSecret(
        "3/L4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY", SEALED
    )
    # An unversioned bucket (or one with versioning suspended): the ETag.
    for headers in ([("ETag", '"9b2cf535f27731c974343645a3985328"')], [("ETag", '"e"')]):
        unversioned = [*headers, ("x-amz-version-id", "null")]
        assert read_answer(S3, 200, unversioned, SEALED).version == headers[0][1].strip('"')  # type: ignore[union-attr]
    assert "sealed bytes" not in repr(read_answer(SM, 200, [], sm_answer()))


@pytest.mark.parametrize(
    ("location", "body", "reason"),
    [
        # Another account's secret of the same name, another secret's random suffix.
        (SM, sm_answer(ARN=SM_ARN.replace(A, B)), "not the configured " + SM_ARN),
        (SM, sm_answer(ARN=SM_ARN[:-6] + "ZzZzZz"), "another account's or another secret's"),
        (SM, sm_answer(ARN=None), "answered for None"),
        (SSM, ssm_answer(ARN=SSM_ARN.replace(A, B)), "not the configured " + SSM_ARN),
        (SSM, ssm_answer(ARN=SSM_ARN + "/other"), "not the configured"),
        (SM, sm_answer(SecretBinary=None, SecretString="hunter2"), "holds a SecretString"),
        (SM, sm_answer(SecretBinary=None), "holds no value"),
        (SM, sm_answer(SecretBinary="***"), "SecretBinary is not valid base64"),
        (SM, sm_answer(SecretBinary=""), "SecretBinary is empty"),
        (SM, sm_answer(SecretBinary=7), "SecretBinary is not a base64 string"),
        (SM, sm_answer(VersionId=None), "VersionId is not a version"),
        (SM, sm_answer(VersionId='a"b'), "VersionId is not a version"),
        (SM, sm_answer(VersionId="v" * (MAX_VERSION + 1)), "VersionId is not a version"),
        (SM, sm_answer().replace(b"{", b'{"ARN": "x", ', 1), "repeats a member"),
        (SM, b"[1, 2]", "not a JSON object"),
        (SM, b"<html>", "not JSON"),
        (SM, b"[" * 100_000, "not JSON"),
        (SSM, b"{}", "without a Parameter object"),
        (SSM, ssm_answer(Type="SecureString"), "type is 'SecureString', not String"),
        (SSM, ssm_answer(Version="3"), "without a positive integer Version"),
        (SSM, ssm_answer(Version=True), "without a positive integer Version"),
        (SSM, ssm_answer(Version=0), "without a positive integer Version"),
        (SSM, ssm_answer(Value=None), "Value is not a base64 string"),
        (S3, b"", "the S3 object is empty"),
        (S3, b"x" * (MAX_SEALED_BYTES + 1), f"over {MAX_SEALED_BYTES} bytes"),
    ],
)
def test_answers_that_cannot_be_used_say_why(
    location: StoreLocation, body: bytes, reason: str
) -> None:
    with pytest.raises(StoreAnswerError) as info:
        read_answer(location, 200, [("ETag", '"e"')], body)
    assert reason in str(info.value)


def test_oversized_answers_are_refused_before_decoding() -> None:
    huge = base64.b64encode(b"x" * (MAX_SEALED_BYTES + 3)).decode()
    with pytest.raises(StoreAnswerError, match=f"SecretBinary is over {MAX_SEALED_BYTES}"):
        read_answer(SM, 200, [], sm_answer(SecretBinary=huge))
    with pytest.raises(StoreAnswerError, match="answer is over"):
        read_answer(SM, 200, [], b" " * (MAX_ANSWER["secretsmanager"] + 1))
    # The largest sealed secret fits in each answer's bound.
    largest = sm_answer(SecretBinary=base64.b64encode(b"x" * MAX_SEALED_BYTES).decode())
    assert len(largest) <= MAX_ANSWER["secretsmanager"]
    assert len(read_answer(SM, 200, [], largest).sealed) == MAX_SEALED_BYTES  # type: ignore[union-attr]


def test_s3_needs_a_version_or_an_etag() -> None:
    with pytest.raises(StoreAnswerError, match="without x-amz-version-id or ETag"):
        read_answer(S3, 200, [], SEALED)
    with pytest.raises(StoreAnswerError, match="x-amz-version-id is not a version"):
        read_answer(S3, 200, [("x-amz-version-id", "a,b")], SEALED)


def test_store_errors_keep_their_type_and_say_whether_to_retry() -> None:
    def json_error(error_type: str, status: int, message: str = "m") -> StoreFailure:
        body = json.dumps({"__type": error_type, "message": message}).encode()
        answer = read_answer(SM, status, [], body)
        assert isinstance(answer, StoreFailure)
        return answer

    denied = json_error("AccessDeniedException", 400, "User: arn:... is not authorized")
    assert (denied.error_type, denied.status, denied.retryable) == (
        "AccessDeniedException",
        400,
        False,
    )
    assert json_error("InternalServiceError", 500).retryable
    assert json_error("ThrottlingException", 400).retryable
    assert json_error("ExpiredTokenException", 400).expired_token
    assert len(json_error("X", 400, "m" * 5000).message) <= 303
    ssm = read_answer(SSM, 400, [], b'{"__type": "ParameterNotFound"}')
    assert isinstance(ssm, StoreFailure) and ssm.error_type == "ParameterNotFound"

    def s3_error(body: bytes, status: int) -> StoreFailure:
        answer = read_answer(S3, status, [], body)
        assert isinstance(answer, StoreFailure)
        return answer

    owner = s3_error(b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message>", 403)
    assert (owner.error_type, owner.message, owner.retryable) == (
        "AccessDenied",
        "Access Denied",
        False,
    )
    assert s3_error(b"<Error><Code>SlowDown</Code></Error>", 503).retryable
    assert s3_error(b"<Error><Code>ExpiredToken</Code></Error>", 400).expired_token
    bare = s3_error(b"", 500)
    assert (bare.error_type, bare.message, bare.retryable) == (
        "InternalError",
        "S3 answered HTTP 500",
        True,
    )
    assert s3_error(b"\xff\x00<Code>\x1b[31mred</Code>", 404).error_type == "[31mred"


# --- untrusted bytes ------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
members = st.fixed_dictionaries(
    {},
    optional={
        "ARN": st.sampled_from([SM_ARN, SSM_ARN, SM_ARN.replace(A, B)]) | st.text(max_size=10),
        "VersionId": st.text(max_size=70) | st.integers(),
        "SecretBinary": st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())
        | json_values,
        "SecretString": json_values,
        "Parameter": st.fixed_dictionaries(
            {},
            optional={
                "ARN": st.sampled_from([SSM_ARN, SM_ARN]) | json_values,
                "Type": st.sampled_from(["String", "SecureString"]) | json_values,
                "Value": st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())
                | json_values,
                "Version": st.integers() | json_values,
            },
        )
        | json_values,
        "__type": st.text(max_size=20) | json_values,
        "message": json_values,
    },
)
bodies = st.one_of(
    st.binary(max_size=300),
    members.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
)
headers = st.lists(
    st.tuples(
        st.sampled_from(["ETag", "x-amz-version-id", "x-amzn-ErrorType", "Other"]),
        st.text(max_size=30),
    ),
    max_size=4,
)


@given(
    location=st.sampled_from([SM, SSM, S3]),
    status=st.sampled_from([200, 200, 200, 400, 403, 404, 500, 503]),
    answer_headers=headers,
    body=bodies,
)
def test_any_answer_reads_or_is_refused(
    location: StoreLocation, status: int, answer_headers: list[tuple[str, str]], body: bytes
) -> None:
    """Whatever the bytes: a usable secret (for the configured ARN only), the store's
    failure, or StoreAnswerError; never another exception."""
    try:
        answer = read_answer(location, status, answer_headers, body)
    except StoreAnswerError:
        return
    if isinstance(answer, StoredSecret):
        assert status == 200 and 1 <= len(answer.sealed) <= MAX_SEALED_BYTES
        assert 1 <= len(answer.version) <= MAX_VERSION
        assert not set(answer.version) & {'"', ",", " ", "\r", "\n"}
        if location is not S3:
            document = json.loads(body)
            arn = document.get("ARN") if location is SM else document["Parameter"]["ARN"]
            assert arn == (SM_ARN if location is SM else SSM_ARN)
    else:
        assert status != 200 and answer.error_type and len(answer.message) <= 303
