"""KmsGateway against a fake KMS (TLS, h11) reached through a CONNECT relay."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
import trustme

from enclave_agent.runtime.kms import KmsError, KmsGateway, KmsSettings, endpoint_host_port
from enclave_agent.runtime.trusted_keys import TrustedKeys
from enclave_common.address import parse_address
from tests.support.kms_fakes import (
    CIPHERTEXT,
    FAKE_KEY_ARN,
    FakeKms,
    FakeNsm,
    FakeRecipient,
    Relay,
    kms_error,
    start_kms_and_relay,
)
from tests.support.kms_fakes import (
    GatewayStack as Stack,
)


@pytest.fixture
async def stack(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Stack]:
    kms, relay, ca_path = await start_kms_and_relay(tmp_path, nursery)
    nsm = FakeNsm()
    s = Stack(kms, relay, nsm, None, ca_path)  # type: ignore[arg-type]
    s.gateway = s.gateway_with()
    yield s
    await s.gateway.aclose()


async def test_decrypt_round_trip(stack: Stack) -> None:
    answer = await stack.gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    assert answer == {
        "KeyId": FAKE_KEY_ARN,
        "Plaintext": base64.b64encode(b"the secret").decode(),
        "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
    }
    seen = stack.kms.seen[0]
    assert seen.headers["x-amz-target"] == "TrentService.Decrypt"
    assert seen.headers["content-type"] == "application/x-amz-json-1.1"
    assert seen.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDFAKEFAKEFAKE/")
    assert "/us-east-1/kms/aws4_request" in seen.headers["authorization"]
    assert seen.headers["x-amz-security-token"] == "fake-session-token-do-not-log"
    assert seen.headers["host"] == f"127.0.0.1:{stack.kms.port}"
    body = seen.json
    assert body["CiphertextBlob"] == CIPHERTEXT
    assert body["Recipient"] == {
        "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        "AttestationDocument": base64.b64encode(b"ATTESTATION:fake-spki").decode(),
    }


async def test_all_five_operations_answer_as_without_recipient(stack: Stack) -> None:
    b64 = base64.b64encode
    answers = {
        op: await stack.gateway.call(op, body)
        for op, body in [
            ("GenerateDataKey", {"KeyId": "alias/k", "KeySpec": "AES_256"}),
            ("GenerateRandom", {"NumberOfBytes": 16}),
            ("GenerateDataKeyPair", {"KeyId": "alias/k", "KeyPairSpec": "ECC_NIST_P256"}),
            (
                "DeriveSharedSecret",
                {"KeyId": "alias/k", "KeyAgreementAlgorithm": "ECDH", "PublicKey": "cHVi"},
            ),
        ]
    }
    assert answers["GenerateDataKey"] == {
        "CiphertextBlob": b64(b"blob").decode(),
        "Plaintext": b64(b"k" * 32).decode(),
        "KeyId": FAKE_KEY_ARN,
    }
    assert answers["GenerateRandom"] == {"Plaintext": b64(b"r" * 16).decode()}
    assert answers["GenerateDataKeyPair"]["PrivateKeyPlaintext"] == b64(b"private key der").decode()
    assert "CiphertextForRecipient" not in answers["GenerateDataKeyPair"]
    assert answers["GenerateDataKeyPair"]["KeyPairSpec"] == "ECC_NIST_P256"
    assert answers["DeriveSharedSecret"]["SharedSecret"] == b64(b"shared").decode()
    assert stack.nsm.calls == 4  # the fake's documents cannot be read: none is reused
    assert stack.kms.connections == 1  # one kept-alive connection carried them all


async def test_plaintext_in_answer_is_refused(stack: Stack) -> None:
    stack.kms.script.append(
        (200, {"CiphertextForRecipient": "c2VhbGVkOnNlY3JldA==", "Plaintext": "bGVha2Vk"})
    )
    with pytest.raises(KmsError) as info:
        await stack.gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    assert info.value.error_type == "KMSInternalException"
    assert "carried Plaintext" in info.value.message
    assert len(stack.kms.seen) == 1  # refused, not retried


async def test_kms_error_passed_on_and_not_retried(stack: Stack) -> None:
    stack.kms.script.append(kms_error("AccessDeniedException", "PCR0 does not match"))
    with pytest.raises(KmsError) as info:
        await stack.gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    assert (info.value.error_type, info.value.message, info.value.status) == (
        "AccessDeniedException",
        "PCR0 does not match",
        400,
    )
    assert info.value.to_json() == {
        "__type": "AccessDeniedException",
        "message": "PCR0 does not match",
    }
    assert len(stack.kms.seen) == 1


async def test_retries_500_and_throttling_then_succeeds(stack: Stack) -> None:
    stack.kms.script += [
        kms_error("KMSInternalException", "try again", 500),
        kms_error("ThrottlingException", "slow down", 400),
        (502, b"<html>bad gateway</html>"),
    ]
    answer = await stack.gateway.call("GenerateRandom", {"NumberOfBytes": 16})
    assert answer["Plaintext"] == base64.b64encode(b"r" * 16).decode()
    assert len(stack.kms.seen) == 4
    assert stack.nsm.calls == 4  # every attempt carried its own document


async def test_retries_are_bounded(stack: Stack) -> None:
    stack.kms.script += [kms_error("ThrottlingException", f"slow down {i}") for i in range(5)]
    gateway = stack.gateway_with(max_attempts=3)
    with pytest.raises(KmsError) as info:
        await gateway.call("GenerateRandom", {"NumberOfBytes": 16})
    await gateway.aclose()
    assert (info.value.error_type, info.value.message) == ("ThrottlingException", "slow down 2")
    assert len(stack.kms.seen) == 3


async def test_deadline_covers_retries(stack: Stack) -> None:
    stack.kms.delay = 30.0
    gateway = stack.gateway_with(call_timeout=0.5)
    with pytest.raises(KmsError) as info:
        await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    await gateway.aclose()
    assert info.value.error_type == "DependencyTimeoutException"
    assert info.value.status == 503
    assert "0.5 s" in info.value.message
    assert gateway.pool.idle_connections == 0  # the abandoned connection was not kept


async def test_deadline_holds_while_the_nsm_hangs(stack: Stack) -> None:
    """A blocking NSM ioctl that never returns must not hold the app past its deadline."""
    import threading

    release = threading.Event()

    class HangingNsm(FakeNsm):
        def attestation(self, **fields: bytes | None) -> bytes:
            release.wait(15)
            return super().attestation(**fields)

    gateway = KmsGateway(stack.settings(call_timeout=0.3), HangingNsm(), FakeRecipient())
    try:
        with trio.fail_after(10):
            with pytest.raises(KmsError) as info:
                await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    finally:
        release.set()
        await gateway.aclose()
    assert info.value.error_type == "DependencyTimeoutException"
    assert stack.kms.seen == []


async def test_expired_token_refetches_credentials_once(stack: Stack) -> None:
    stack.kms.script.append(kms_error("ExpiredTokenException", "The security token expired"))
    answer = await stack.gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    assert "Plaintext" in answer
    assert stack.relay.credential_requests == 2
    stack.kms.script += [kms_error("ExpiredTokenException", "still expired")] * 2
    with pytest.raises(KmsError) as info:
        await stack.gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    assert info.value.error_type == "ExpiredTokenException"
    assert stack.relay.credential_requests == 3


async def test_invalid_request_is_not_sent(stack: Stack) -> None:
    for op, body in [
        ("Decrypt", {"CiphertextBlob": "not base64!"}),
        ("Decrypt", {"CiphertextBlob": CIPHERTEXT, "Bogus": 1}),
        ("GenerateDataKey", {"KeySpec": "AES_256"}),
        ("GenerateRandom", {"NumberOfBytes": 5000}),
        ("Decrypt", {"CiphertextBlob": CIPHERTEXT, "Recipient": {}}),
    ]:
        with pytest.raises(KmsError) as info:
            await stack.gateway.call(op, body)
        assert (info.value.error_type, info.value.status) == ("ValidationException", 400)
    with pytest.raises(KmsError) as info:
        await stack.gateway.call("CreateKey", {"Description": "k"})
    assert info.value.error_type == "UnknownOperationException"
    assert stack.kms.seen == [] and stack.nsm.calls == 0


async def test_tls_certificate_from_another_ca_fails_and_sends_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    gateway = stack.gateway_with(ca_bundle=str(other))
    with pytest.raises(KmsError) as info:
        await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    await gateway.aclose()
    assert "TLS certificate verification failed for 127.0.0.1" in info.value.message
    assert stack.kms.seen == []
    assert stack.kms.connections == 1  # a bad certificate is not retried


async def test_tls_host_name_is_checked(tmp_path: Path, nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    kms = FakeKms(ca, hostname="kms.other-region.example")
    await kms.serve(nursery)
    relay = Relay()
    await relay.serve(nursery)
    stack = Stack(kms, relay, FakeNsm(), None, ca_path)  # type: ignore[arg-type]
    gateway = stack.gateway_with()
    with pytest.raises(KmsError) as info:
        await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    await gateway.aclose()
    assert "TLS certificate verification failed for 127.0.0.1" in info.value.message
    assert "mismatch" in info.value.message.lower() or "match" in info.value.message.lower()
    assert kms.seen == []


async def test_proxy_refusal_is_named(stack: Stack) -> None:
    stack.relay.refuse_connect = (403, "not allowlisted")
    with pytest.raises(KmsError) as info:
        await stack.gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    assert info.value.message == (
        f"proxy refused CONNECT 127.0.0.1:{stack.kms.port}: 403 not allowlisted"
    )
    assert info.value.status == 502
    assert stack.kms.connections == 0


async def test_proxy_unreachable(stack: Stack) -> None:
    gateway = KmsGateway(
        KmsSettings(
            region="us-east-1", proxy=parse_address("unix:/nonexistent/proxy.sock"), max_attempts=2
        ),
        stack.nsm,
        FakeRecipient(),
    )
    with pytest.raises(KmsError) as info:
        await gateway.call("GenerateRandom", {"NumberOfBytes": 8})
    assert "cannot reach the proxy at unix:/nonexistent/proxy.sock" in info.value.message


async def test_no_credentials_at_the_proxy(stack: Stack) -> None:
    stack.relay.credentials_status = 503
    gateway = stack.gateway_with(max_attempts=2)
    with pytest.raises(KmsError) as info:
        await gateway.call("GenerateRandom", {"NumberOfBytes": 8})
    await gateway.aclose()
    assert info.value.message == "proxy has no credentials for us: 503 no credentials"
    assert stack.relay.credential_requests == 2
    assert stack.kms.seen == []


async def test_nsm_failure(stack: Stack) -> None:
    stack.nsm.fail_with = "InternalError"
    with pytest.raises(KmsError) as info:
        await stack.gateway.call("GenerateRandom", {"NumberOfBytes": 8})
    assert (info.value.error_type, info.value.message, info.value.status) == (
        "KMSInternalException",
        "NSM error: InternalError",
        500,
    )
    assert stack.kms.seen == []


async def test_envelope_that_does_not_open(stack: Stack) -> None:
    stack.kms.script.append((200, {"CiphertextForRecipient": "bm90IGZvciB1cw=="}))
    with pytest.raises(KmsError) as info:
        await stack.gateway.call("GenerateRandom", {"NumberOfBytes": 8})
    assert info.value.message == "could not open CiphertextForRecipient from KMS: ValueError"


async def test_many_calls_at_once_share_a_bounded_pool(stack: Stack) -> None:
    stack.kms.delay = 0.02
    gateway = stack.gateway_with(pool_size=4)
    results: list[dict[str, object]] = []

    async def one() -> None:
        results.append(await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT}))

    async with trio.open_nursery() as n:
        for _ in range(24):
            n.start_soon(one)
    assert len(results) == 24
    assert all(r["Plaintext"] == base64.b64encode(b"the secret").decode() for r in results)
    assert 1 < gateway.pool.connections_opened <= 4
    assert gateway.pool.idle_connections == gateway.pool.connections_opened
    assert stack.kms.connections == gateway.pool.connections_opened
    assert stack.relay.credential_requests == 1  # single flight across the 24 first calls
    await gateway.aclose()


async def test_a_cancelled_call_frees_its_slot(stack: Stack) -> None:
    gateway = stack.gateway_with(pool_size=1)
    stack.kms.delay = 5.0
    with trio.move_on_after(0.3):  # the app went away
        await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    stack.kms.delay = 0.0
    with trio.fail_after(5):
        answer = await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    assert "Plaintext" in answer
    assert gateway.pool.connections_opened == 2  # the cancelled one was not reused
    await gateway.aclose()


async def test_server_closing_connections_is_handled(stack: Stack) -> None:
    stack.kms.close_after_each = True
    for _ in range(3):
        await stack.gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    assert stack.kms.connections == 3
    assert stack.gateway.pool.idle_connections == 0


async def test_idle_connection_closed_by_server_is_replaced_at_once(stack: Stack) -> None:
    gateway = stack.gateway_with(max_attempts=1)  # so a retry could not hide it
    await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    stack.kms.drop_idle()  # the server times out the idle connection silently
    await trio.sleep(0.05)
    await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    await gateway.aclose()
    assert stack.kms.connections == 2
    assert len(stack.kms.seen) == 2  # the stale connection cost no KMS request


async def test_one_log_event_per_call_and_no_secrets_in_it(stack: Stack) -> None:
    import io
    import json

    import structlog

    from enclave_common.logs import configure_logging

    stream = io.StringIO()
    configure_logging("debug", stream=stream, process="test")
    try:
        await stack.gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
        stack.kms.script.append(kms_error("KMSInternalException", "boom", 500))
        await stack.gateway.call("GenerateDataKey", {"KeyId": "k", "NumberOfBytes": 32})
        stack.kms.script.append(kms_error("AccessDeniedException", "denied"))
        with pytest.raises(KmsError):
            await stack.gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    finally:
        structlog.reset_defaults()
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    calls = [e for e in events if e["event"] == "kms_call"]
    assert [(e["operation"], e["outcome"], e["attempts"]) for e in calls] == [
        ("Decrypt", "ok", 1),
        ("GenerateDataKey", "ok", 2),
        ("Decrypt", "error", 1),
    ]
    assert calls[2]["error_type"] == "AccessDeniedException"
    assert [e["request_id"] for e in calls] == ["req-1", "req-3", "req-4"]
    text = stream.getvalue()
    b64 = base64.b64encode
    for secret in [
        "the secret",
        b64(b"the secret").decode(),
        b64(b"sealed:the secret").decode(),
        b64(b"k" * 32).decode(),
        "kkkkkkkk",
        CIPHERTEXT,
        "fake-secret-key-do-not-log",
        "fake-session-token-do-not-log",
        "AKIDFAKEFAKEFAKE",
        b64(b"ATTESTATION:fake-spki").decode(),
    ]:
        assert secret not in text


def test_endpoints() -> None:
    def host_port(**fields: object) -> tuple[str, int]:
        return endpoint_host_port(KmsSettings(**fields))  # type: ignore[arg-type]

    assert host_port(region="eu-west-1") == ("kms.eu-west-1.amazonaws.com", 443)
    assert host_port(region="cn-north-1") == ("kms.cn-north-1.amazonaws.com.cn", 443)
    assert host_port(region="x", endpoint="https://127.0.0.1:4443") == ("127.0.0.1", 4443)
    assert host_port(region="x", endpoint="https://[::1]:4443/") == ("::1", 4443)
    for bad in ["http://kms.example", "https://", "https://h/path", "https://h:99999", "kms"]:
        with pytest.raises(ValueError, match="KMS endpoint"):
            host_port(region="x", endpoint=bad)


async def test_a_bug_still_reaches_the_app_as_a_kms_error(stack: Stack) -> None:
    stack.nsm.attestation = lambda **_: None  # type: ignore[method-assign,assignment,return-value]
    with pytest.raises(KmsError) as info:
        await stack.gateway.call("GenerateRandom", {"NumberOfBytes": 8})
    assert (info.value.error_type, info.value.status) == ("KMSInternalException", 500)
    assert info.value.message == "internal error in the agent (its log names it)"


async def test_real_kms_envelope_is_opened_into_the_answer(stack: Stack, vectors_dir: Path) -> None:
    """A CiphertextForRecipient that real AWS KMS produced (BER, indefinite lengths),
    answered by the fake KMS, comes out as the expected Plaintext."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from enclave_agent.runtime.recipient import RecipientKey

    cms = vectors_dir / "cms"
    private = load_pem_private_key((cms / "enclaver_recipient_key.pem").read_bytes(), None)
    recipient = RecipientKey(private)  # type: ignore[arg-type]
    envelope = base64.b64encode((cms / "enclaver_kms_response.ber").read_bytes()).decode()
    stack.kms.script.append(
        (200, {"KeyId": FAKE_KEY_ARN, "CiphertextForRecipient": envelope, "Plaintext": None})
    )
    settings = stack.settings()
    gateway = KmsGateway(settings, stack.nsm, recipient)
    answer = await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    await gateway.aclose()
    expected = (cms / "enclaver_expected_plaintext.bin").read_bytes()
    assert answer == {"KeyId": FAKE_KEY_ARN, "Plaintext": base64.b64encode(expected).decode()}
    # and another key cannot open it: a clear error, no plaintext
    stack.kms.script.append((200, {"KeyId": FAKE_KEY_ARN, "CiphertextForRecipient": envelope}))
    other = KmsGateway(settings, stack.nsm, RecipientKey.generate())
    with pytest.raises(KmsError) as info:
        await other.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    await other.aclose()
    assert info.value.message.startswith("could not open CiphertextForRecipient from KMS: ")


@pytest.mark.parametrize(
    ("member", "junk"),
    [
        ("Token", "tok\r\nX-Injected: 1"),
        ("Token", "t\u00f6ken"),
        ("SecretAccessKey", "s\u00e9cret"),
        ("AccessKeyId", "AKID/with/slash and space"),
        ("Token", "t" * 20000),
    ],
)
async def test_junk_credentials_from_the_proxy_are_refused_clearly(
    stack: Stack, member: str, junk: str
) -> None:
    """The proxy is untrusted: credentials that cannot go into an HTTP header are an
    answered error naming the member, never an internal error, never sent, never echoed."""
    stack.relay.credentials[member] = junk
    gateway = stack.gateway_with(max_attempts=1)
    try:
        with pytest.raises(KmsError) as info:
            await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    finally:
        await gateway.aclose()
    assert info.value.error_type == "KMSInternalException"
    assert member in info.value.message and "proxy" in info.value.message
    assert junk not in info.value.message
    assert stack.kms.seen == []


@pytest.mark.parametrize("key_id", ["AKID/20990101/us-east-1/kms", "AKID,SignedHeaders=host"])
async def test_access_key_id_that_would_rewrite_the_signature_is_refused(
    stack: Stack, key_id: str
) -> None:
    """Visible ASCII, so fine as a header, but "/" or "," would change the meaning of
    the Authorization header (its credential scope, its fields): refused, never sent."""
    stack.relay.credentials["AccessKeyId"] = key_id
    with pytest.raises(KmsError) as info:
        await stack.gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    assert info.value.error_type == "KMSInternalException"
    assert info.value.status == 502
    assert "cannot sign the KMS request with the proxy's credentials" in info.value.message
    assert key_id not in info.value.message
    assert stack.kms.seen == []


async def test_signing_key_is_derived_once_for_many_calls(stack: Stack) -> None:
    first_day = datetime.now(UTC).date()
    for _ in range(3):
        await stack.gateway.call("GenerateRandom", {"NumberOfBytes": 16})
    assert len(stack.kms.seen) == 3
    # One date, region, service and secret: one derivation (a second one only if the
    # calls straddled midnight UTC, when the new date needs its own key).
    new_day = datetime.now(UTC).date() != first_day
    assert stack.gateway.signing_keys.derivations == 1 + new_day


# --- trusted keys: a lying parent chooses the key; the agent checks who answered ------

OTHER_ACCOUNT_ARN = FAKE_KEY_ARN.replace("111122223333", "999988887777")
SAME_ACCOUNT_OTHER_KEY = FAKE_KEY_ARN.replace("1234abcd-12ab", "99999999-12ab")
KEY_REQUESTS = {
    "Decrypt": {"CiphertextBlob": CIPHERTEXT},
    "GenerateDataKey": {"KeyId": "alias/app", "KeySpec": "AES_256"},
    "GenerateDataKeyPair": {"KeyId": "alias/app", "KeyPairSpec": "ECC_NIST_P256"},
    "DeriveSharedSecret": {
        "KeyId": "alias/app",
        "KeyAgreementAlgorithm": "ECDH",
        "PublicKey": "cHVi",
    },
}


def _answering_as(key_id: str | None) -> object:
    """The fake's normal answer (a sealed envelope that would open), from ``key_id``."""
    from tests.support.kms_fakes import Seen, decrypt_ok

    def reply(seen: Seen) -> tuple[int, dict[str, object]]:
        status, body = decrypt_ok(seen)
        assert isinstance(body, dict)
        body.pop("KeyId", None)
        if key_id is not None:
            body["KeyId"] = key_id
        return status, body

    return reply


@pytest.mark.parametrize("operation", sorted(KEY_REQUESTS))
@pytest.mark.parametrize(
    ("key_id", "named"),
    [
        (OTHER_ACCOUNT_ARN, OTHER_ACCOUNT_ARN),  # the parent served another account's credentials
        (SAME_ACCOUNT_OTHER_KEY, SAME_ACCOUNT_OTHER_KEY),  # UpdateAlias to a key of its own
        ("alias/app", "'alias/app' is not a full key ARN"),
        (None, "names no KeyId"),
    ],
)
async def test_an_answer_from_an_untrusted_key_is_never_opened(
    stack: Stack, operation: str, key_id: str | None, named: str
) -> None:
    gateway = stack.gateway_with(trusted_keys=TrustedKeys.parse([FAKE_KEY_ARN]))
    stack.kms.script.append(_answering_as(key_id))  # type: ignore[arg-type]
    try:
        with pytest.raises(KmsError) as info:
            await gateway.call(operation, KEY_REQUESTS[operation])
    finally:
        await gateway.aclose()
    assert (info.value.error_type, info.value.status) == ("AccessDeniedException", 400)
    assert named in info.value.message and "trusted_keys" in info.value.message
    assert stack.recipient.opened == 0  # the envelope was never opened
    assert len(stack.kms.seen) == 1  # and the refusal was not retried
    # The same answer from the trusted key is opened as usual.
    gateway = stack.gateway_with(trusted_keys=TrustedKeys.parse([FAKE_KEY_ARN]))
    answer = await gateway.call(operation, KEY_REQUESTS[operation])
    await gateway.aclose()
    assert answer["KeyId"] == FAKE_KEY_ARN and stack.recipient.opened == 1


async def test_an_untrusted_key_arn_is_refused_before_any_call(stack: Stack) -> None:
    with pytest.raises(KmsError) as info:
        await stack.gateway.call(
            "GenerateDataKey", {"KeyId": OTHER_ACCOUNT_ARN, "NumberOfBytes": 32}
        )
    assert (info.value.error_type, info.value.status) == ("AccessDeniedException", 400)
    assert OTHER_ACCOUNT_ARN in info.value.message and "trusted_keys" in info.value.message
    # no attestation, no credentials, no network
    assert (stack.nsm.calls, stack.relay.credential_requests, stack.kms.seen) == (0, 0, [])


async def test_no_trusted_keys_refuses_key_operations_but_not_generate_random(
    stack: Stack,
) -> None:
    gateway = stack.gateway_with(trusted_keys=TrustedKeys())
    try:
        for operation, request in KEY_REQUESTS.items():
            with pytest.raises(KmsError) as info:
                await gateway.call(operation, request)
            assert (info.value.error_type, info.value.status) == ("AccessDeniedException", 400)
            assert "key operations are off" in info.value.message
            assert "trusted_keys" in info.value.message
        assert stack.kms.seen == [] and stack.nsm.calls == 0
        answer = await gateway.call("GenerateRandom", {"NumberOfBytes": 16})
    finally:
        await gateway.aclose()
    assert answer["Plaintext"] == base64.b64encode(b"r" * 16).decode()


async def test_a_refused_answer_leaves_no_plaintext_in_the_log(stack: Stack) -> None:
    import io
    import json

    import structlog

    from enclave_common.logs import configure_logging

    stream = io.StringIO()
    configure_logging("debug", stream=stream, process="test")
    stack.kms.script.append(_answering_as(OTHER_ACCOUNT_ARN))  # type: ignore[arg-type]
    try:
        with pytest.raises(KmsError) as info:
            await stack.gateway.call("GenerateDataKey", KEY_REQUESTS["GenerateDataKey"])
    finally:
        structlog.reset_defaults()
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    (call,) = [e for e in events if e["event"] == "kms_call"]
    assert (call["outcome"], call["error_type"], call["attempts"]) == (
        "error",
        "AccessDeniedException",
        1,
    )
    assert OTHER_ACCOUNT_ARN in call["reason"]  # the log names the key that answered
    b64 = base64.b64encode
    for secret in ["k" * 32, b64(b"k" * 32).decode(), b64(b"sealed:" + b"k" * 32).decode()]:
        assert secret not in stream.getvalue() and secret not in info.value.message


async def test_an_extreme_expiration_is_a_credentials_error_and_retried(stack: Stack) -> None:
    """9999-12-31T23:59:59-01:00 is past year 9999 in UTC: a malformed answer like any
    other (named, retried), not an internal error of the agent."""
    stack.relay.credentials["Expiration"] = "9999-12-31T23:59:59-01:00"
    gateway = stack.gateway_with(max_attempts=3)
    try:
        with pytest.raises(KmsError) as info:
            await gateway.call("GenerateRandom", {"NumberOfBytes": 8})
    finally:
        await gateway.aclose()
    assert (info.value.error_type, info.value.status) == ("KMSInternalException", 502)
    assert "Expiration" in info.value.message and "out of range" in info.value.message
    assert stack.relay.credential_requests == 3 and stack.kms.seen == []


# --- pass-through operations: signed and sent as written, no Recipient, no envelope ---

MESSAGE = b"pass-through message, never logged " + b"m" * 16
SIGNATURE = b"pass-through signature, never logged " + b"s" * 16


async def test_a_pass_through_call_takes_no_attestation_and_answers_as_kms(stack: Stack) -> None:
    b64 = base64.b64encode
    stack.kms.script.append(
        (200, {"KeyId": FAKE_KEY_ARN, "Signature": b64(SIGNATURE).decode(), "Extra": 1})
    )
    request = {
        "KeyId": "alias/app",
        "Message": b64(MESSAGE).decode(),
        "SigningAlgorithm": "ECDSA_SHA_256",
    }
    answer = await stack.gateway.call("Sign", request)
    assert answer == {"KeyId": FAKE_KEY_ARN, "Signature": b64(SIGNATURE).decode()}
    (seen,) = stack.kms.seen
    assert seen.headers["x-amz-target"] == "TrentService.Sign"
    assert seen.json == request  # exactly what the app wrote: no Recipient
    assert "authorization" in seen.headers  # signed by the agent
    assert stack.nsm.calls == 0 and stack.recipient.opened == 0


async def test_a_pass_through_answer_from_an_untrusted_key_is_refused_not_retried(
    stack: Stack,
) -> None:
    """The parent re-pointed alias/app to its own key: Encrypt answers honestly under
    it, and an app storing that ciphertext would store data the parent can decrypt."""
    gateway = stack.gateway_with(trusted_keys=TrustedKeys.parse([FAKE_KEY_ARN]))
    stack.kms.script.append((200, {"KeyId": SAME_ACCOUNT_OTHER_KEY, "CiphertextBlob": CIPHERTEXT}))
    try:
        with pytest.raises(KmsError) as info:
            await gateway.call("Encrypt", {"KeyId": "alias/app", "Plaintext": "c2VjcmV0"})
    finally:
        await gateway.aclose()
    assert (info.value.error_type, info.value.status) == ("AccessDeniedException", 400)
    assert SAME_ACCOUNT_OTHER_KEY in info.value.message and CIPHERTEXT not in info.value.message
    assert len(stack.kms.seen) == 1 and stack.nsm.calls == 0


async def test_pass_through_calls_leave_no_plaintext_message_or_signature_in_the_log(
    stack: Stack,
) -> None:
    import io

    import structlog

    from enclave_common.logs import configure_logging

    b64 = base64.b64encode
    mac = b"pass-through mac, never logged " + b"c" * 16
    blob = b"pass-through ciphertext, never logged"
    stream = io.StringIO()
    configure_logging("debug", stream=stream, process="test")
    try:
        stack.kms.script.append(
            (200, {"KeyId": FAKE_KEY_ARN, "CiphertextBlob": b64(blob).decode()})
        )
        await stack.gateway.call("Encrypt", {"KeyId": "k", "Plaintext": b64(MESSAGE).decode()})
        stack.kms.script.append(
            (200, {"KeyId": FAKE_KEY_ARN, "Signature": b64(SIGNATURE).decode()})
        )
        await stack.gateway.call(
            "Sign",
            {"KeyId": "k", "Message": b64(MESSAGE).decode(), "SigningAlgorithm": "ECDSA_SHA_256"},
        )
        stack.kms.script.append((200, {"KeyId": FAKE_KEY_ARN, "Mac": b64(mac).decode()}))
        await stack.gateway.call(
            "GenerateMac",
            {"KeyId": "k", "Message": b64(MESSAGE).decode(), "MacAlgorithm": "HMAC_SHA_256"},
        )
        # Refused paths: an untrusted key answering, and KMS's own error.
        stack.kms.script.append((200, {"KeyId": OTHER_ACCOUNT_ARN, "Mac": b64(mac).decode()}))
        stack.kms.script.append(kms_error("KMSInvalidSignatureException", ""))
        with pytest.raises(KmsError):
            await stack.gateway.call(
                "GenerateMac",
                {"KeyId": "k", "Message": b64(MESSAGE).decode(), "MacAlgorithm": "HMAC_SHA_256"},
            )
        with pytest.raises(KmsError):
            await stack.gateway.call(
                "Verify",
                {
                    "KeyId": "k",
                    "Message": b64(MESSAGE).decode(),
                    "Signature": b64(SIGNATURE).decode(),
                    "SigningAlgorithm": "ECDSA_SHA_256",
                },
            )
    finally:
        structlog.reset_defaults()
    text = stream.getvalue()
    calls = [e for e in map(json.loads, text.splitlines()) if e["event"] == "kms_call"]
    assert [(e["operation"], e["outcome"]) for e in calls] == [
        ("Encrypt", "ok"),
        ("Sign", "ok"),
        ("GenerateMac", "ok"),
        ("GenerateMac", "error"),
        ("Verify", "error"),
    ]
    for value in (MESSAGE, SIGNATURE, mac, blob):
        for form in (value, b64(value), value[:20]):
            assert form.decode() not in text
