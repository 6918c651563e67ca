"""StoreReader against a fake store endpoint (HTTPS, through a CONNECT relay): the signed
reads, and hostile answers (huge, endless, slow, malformed, for another resource)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import trio
import trustme

from enclave_agent.runtime.credentials import CredentialsProvider, proxy_fetcher
from enclave_agent.runtime.sealed import MAX_SEALED_BYTES
from enclave_agent.runtime.sigv4 import EMPTY_SHA256, SigningKeyCache
from enclave_agent.runtime.store_location import StoreLocation, parse_location, require_pinned
from enclave_agent.runtime.store_protocol import MAX_JSON_ANSWER, StoredSecret
from enclave_agent.runtime.stores import StoreError, StoreReader
from enclave_common.address import parse_address
from enclave_common.aws import STORE_SERVICES
from tests.conftest import STORE_ACCOUNTS
from tests.support.kms_fakes import (
    FakeKms,
    Relay,
    Seen,
    Streamed,
    dribbled,
    endless,
    kms_error,
    start_kms_and_relay,
    streamed,
)

A, B = STORE_ACCOUNTS
SM_ARN = f"arn:aws:secretsmanager:us-east-1:{A}:secret:app/db-AbCdEf"
SSM_ARN = f"arn:aws:ssm:us-east-1:{A}:parameter/app/db"
SEALED = b"\x01sealed-bytes-of-the-secret"
VERSION = "11111111-2222-3333-4444-555555555555"
TIMEOUT = 1.0


def located(text: str) -> StoreLocation:
    return require_pinned(parse_location(text))


SM, SSM, S3 = (
    located(f"secretsmanager:{SM_ARN}"),
    located(f"ssm:{SSM_ARN}"),
    located("s3://bucket/app/db"),
)


def sm_body(arn: str = SM_ARN) -> dict[str, object]:
    return {"ARN": arn, "VersionId": VERSION, "SecretBinary": base64.b64encode(SEALED).decode()}


def ssm_body(arn: str = SSM_ARN) -> dict[str, object]:
    value = base64.b64encode(SEALED).decode()
    return {"Parameter": {"ARN": arn, "Type": "String", "Value": value, "Version": 2}}


def s3_object(body: bytes = SEALED) -> Streamed:
    return streamed(200, body, [("ETag", '"0123abcd"'), ("Content-Type", "binary/octet-stream")])


class Stack:
    def __init__(self, store: FakeKms, relay: Relay, ca_path: Path) -> None:
        self.store = store
        self.relay = relay
        self.reader = StoreReader(
            region="us-east-1",
            proxy=parse_address(relay.address),
            endpoints={service: f"https://127.0.0.1:{store.port}" for service in STORE_SERVICES},
            ca_bundle=str(ca_path),
            credentials=CredentialsProvider(proxy_fetcher(parse_address(relay.address))),
            keys=SigningKeyCache(),
            timeout=TIMEOUT,
        )

    async def read(self, location: StoreLocation) -> StoredSecret:
        owner = A if location is S3 else None
        return await self.reader.read("db", location, owner)

    async def refused(self, location: StoreLocation) -> StoreError:
        with pytest.raises(StoreError) as info:
            await self.read(location)
        return info.value

    async def refused_within(self, location: StoreLocation, answer: Streamed, bound: int) -> str:
        """Why the store's one hostile ``answer`` was refused; whatever it sent, what
        crossed the relay stayed within ``bound`` (and its TLS)."""
        self.store.script = [answer]
        message = (await self.refused(location)).message
        assert len(self.relay.relayed) < bound + 256 * 1024
        return message


@pytest.fixture
async def stack(nursery: trio.Nursery, tmp_path: Path) -> Stack:
    store, relay, ca_path = await start_kms_and_relay(tmp_path, nursery)
    return Stack(store, relay, ca_path)


def scope_of(seen: Seen) -> str:
    return seen.headers["authorization"].split("Credential=")[1].split(",")[0]


async def test_each_store_is_read_with_a_request_signed_for_it(stack: Stack) -> None:
    stack.store.script = [(200, sm_body()), (200, ssm_body()), s3_object()]
    assert await stack.read(SM) == StoredSecret(VERSION, SEALED)
    assert await stack.read(SSM) == StoredSecret("2", SEALED)
    assert await stack.read(S3) == StoredSecret("0123abcd", SEALED)
    sm, ssm, s3 = stack.store.seen
    assert (sm.method, sm.target, sm.headers["x-amz-target"]) == (
        "POST",
        "/",
        "secretsmanager.GetSecretValue",
    )
    assert sm.json == {"SecretId": SM_ARN}
    assert scope_of(sm).endswith("/us-east-1/secretsmanager/aws4_request")
    assert ssm.headers["x-amz-target"] == "AmazonSSM.GetParameter"
    assert ssm.json == {"Name": SSM_ARN, "WithDecryption": False}
    assert scope_of(ssm).endswith("/us-east-1/ssm/aws4_request")
    assert (s3.method, s3.target, s3.body) == ("GET", "/bucket/app/db", b"")
    assert s3.headers["x-amz-expected-bucket-owner"] == A
    assert s3.headers["x-amz-content-sha256"] == EMPTY_SHA256
    assert scope_of(s3).endswith("/us-east-1/s3/aws4_request")
    signed = s3.headers["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    assert {"host", "x-amz-content-sha256", "x-amz-expected-bucket-owner"} <= set(signed)
    assert all(seen.headers["x-amz-security-token"] for seen in stack.store.seen)


async def test_an_answer_for_another_resource_is_refused_for_good(stack: Stack) -> None:
    # Another account's secret of the same name: the parent chose the credentials.
    stack.store.script = [(200, sm_body(SM_ARN.replace(A, B))), (200, ssm_body(SSM_ARN + "x"))]
    error = await stack.refused(SM)
    assert not error.retryable
    assert error.message.startswith("Secrets Manager GetSecretValue: Secrets Manager answered for")
    assert f"not the configured {SM_ARN}" in error.message
    assert "not the configured" in (await stack.refused(SSM)).message


async def test_the_stores_errors_say_what_and_whether_to_retry(stack: Stack) -> None:
    stack.store.script = [
        kms_error("ResourceNotFoundException", "Secrets Manager can't find the secret"),
        kms_error("InternalServiceError", "oops", 500),
        streamed(403, b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message>", []),
    ]
    missing = await stack.refused(SM)
    assert missing.message == (
        "Secrets Manager GetSecretValue: ResourceNotFoundException: "
        "Secrets Manager can't find the secret"
    )
    assert not missing.retryable
    assert (await stack.refused(SSM)).retryable
    owner = await stack.refused(S3)
    assert owner.message == "S3 GetObject: AccessDenied: Access Denied" and not owner.retryable


async def test_an_expired_token_is_fetched_again_once(stack: Stack) -> None:
    stack.store.script = [kms_error("ExpiredTokenException", "expired"), (200, sm_body())]
    assert await stack.read(SM) == StoredSecret(VERSION, SEALED)
    assert stack.relay.credential_requests == 2
    stack.store.script = [kms_error("ExpiredTokenException", "expired")] * 2
    assert "ExpiredTokenException" in (await stack.refused(SM)).message
    assert stack.relay.credential_requests == 3


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        # Declares more than any sealed secret can be: refused before a byte is read.
        (
            Streamed(200, [("Content-Length", str(10**12)), ("ETag", '"e"')], endless),
            f"answer body exceeds {MAX_SEALED_BYTES} bytes",
        ),
        # Chunked and endless: cut where the bound is reached.
        (
            Streamed(200, [("ETag", '"e"')], endless),
            f"answer body exceeds {MAX_SEALED_BYTES} bytes",
        ),
        # Slow: a byte every 0.2 s never completes within the read's deadline.
        (
            Streamed(200, [("Content-Length", "100"), ("ETag", '"e"')], dribbled(b"x" * 100, 0.2)),
            f"S3 GetObject did not complete within {TIMEOUT:g} s",
        ),
        (
            streamed(200, b"", [("ETag", '"e"')]),
            "S3 GetObject: the S3 object is empty",
        ),
    ],
)
async def test_hostile_s3_answers_are_bounded_and_refused(
    stack: Stack, answer: Streamed, reason: str
) -> None:
    assert reason in await stack.refused_within(S3, answer, MAX_SEALED_BYTES)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            Streamed(200, [("Content-Type", "application/x-amz-json-1.1")], endless),
            f"answer body exceeds {MAX_JSON_ANSWER} bytes",
        ),
        (
            streamed(200, b'{"ARN": "' + b"a" * 60000 + b'"', []),
            "Secrets Manager's answer is not JSON",
        ),
        (
            streamed(200, json.dumps({**sm_body(), "SecretBinary": "@@@"}).encode(), []),
            "SecretBinary is not valid base64",
        ),
        (
            streamed(200, b'{"ARN": "' + SM_ARN.encode() + b'", "ARN": "x"}', []),
            "repeats a member",
        ),
        (
            Streamed(200, [("Content-Length", "40")], dribbled(b"{" * 40, 0.2)),
            f"Secrets Manager GetSecretValue did not complete within {TIMEOUT:g} s",
        ),
    ],
)
async def test_hostile_json_answers_are_bounded_and_refused(
    stack: Stack, answer: Streamed, reason: str
) -> None:
    assert reason in await stack.refused_within(SM, answer, MAX_JSON_ANSWER)


async def test_a_store_whose_certificate_does_not_verify_is_never_asked(
    stack: Stack, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    reader = StoreReader(
        region="us-east-1",
        proxy=parse_address(stack.relay.address),
        endpoints={"secretsmanager": f"https://127.0.0.1:{stack.store.port}"},
        ca_bundle=str(other),
        credentials=CredentialsProvider(proxy_fetcher(parse_address(stack.relay.address))),
        keys=SigningKeyCache(),
        timeout=TIMEOUT,
    )
    with pytest.raises(StoreError) as info:
        await reader.read("db", SM, None)
    assert info.value.message.startswith("TLS certificate verification failed")
    assert not info.value.retryable and stack.store.seen == []
