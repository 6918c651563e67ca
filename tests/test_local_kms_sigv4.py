"""SigV4 checking, credentials and fault plans of the local KMS stand-in (pure)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.local_kms.credentials import CredentialStore
from devtools.local_kms.faults import FaultError, FaultInjector, FaultPlan, parse_plan
from devtools.local_kms.policy import Caller
from devtools.local_kms.sigv4 import Request, SignatureError, check_signature, parse_authorization

# Credential-store checks take the time as a parameter; signatures use the real clock
# because botocore signs with it.
NOW = datetime(2026, 11, 29, 0, 0, 0, tzinfo=UTC)
KEY_ID = "AKIAEXAMPLEEXAMPLE00"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ACCOUNT_A = "111122223333"
ACCOUNT_B = "444455556666"


def botocore_signed(
    body: bytes,
    *,
    target: str = "/",
    extra: dict[str, str] | None = None,
    region: str = "us-east-1",
    secret: str = SECRET,
    token: str | None = None,
) -> Request:
    """A request signed by botocore's own SigV4 signer, as received by the server."""
    headers = {
        "X-Amz-Target": "TrentService.Decrypt",
        "Content-Type": "application/x-amz-json-1.1",
        **(extra or {}),
    }
    aws = AWSRequest(
        method="POST", url=f"https://127.0.0.1:4443{target}", data=body, headers=headers
    )
    SigV4Auth(Credentials(KEY_ID, secret, token), "kms", region).add_auth(aws)
    prepared = aws.prepare()
    received = {k.lower(): v for k, v in prepared.headers.items()}
    received["host"] = "127.0.0.1:4443"
    return Request("POST", target, received, body)


def check(request: Request, now: datetime | None = None) -> None:
    check_signature(
        request,
        service="kms",
        region="us-east-1",
        secret_for=lambda key: SECRET if key == KEY_ID else None,
        now=now or datetime.now(UTC),
    )


header_values = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E) | st.just(" "), max_size=30
).map(str.strip)


@settings(max_examples=150, deadline=None)
@given(
    body=st.binary(max_size=300),
    value=header_values,
    query=st.dictionaries(
        st.text("abcXYZ-_.~%", min_size=1, max_size=5), st.text("ab c=/&", max_size=5), max_size=3
    ),
)
def test_botocore_signed_requests_verify(body: bytes, value: str, query: dict[str, str]) -> None:
    from urllib.parse import urlencode

    target = "/" + ("?" + urlencode(query) if query else "")
    request = botocore_signed(body, target=target, extra={"X-Custom": value})
    check(request)


@settings(max_examples=150, deadline=None)
@given(body=st.binary(min_size=1, max_size=200), data=st.data())
def test_any_changed_body_byte_is_refused(body: bytes, data: Any) -> None:
    request = botocore_signed(body)
    index = data.draw(st.integers(0, len(body) - 1))
    flip = data.draw(st.integers(1, 255))
    changed = bytearray(body)
    changed[index] ^= flip
    with pytest.raises(SignatureError) as caught:
        check(Request(request.method, request.target, request.headers, bytes(changed)))
    assert caught.value.error_type == "InvalidSignatureException"


def test_changed_signed_header_wrong_secret_and_unknown_key_are_refused() -> None:
    request = botocore_signed(b"{}")
    headers = dict(request.headers, **{"x-amz-target": "TrentService.Encrypt"})
    with pytest.raises(SignatureError, match="does not match"):
        check(Request("POST", "/", headers, b"{}"))
    with pytest.raises(SignatureError, match="does not match"):
        check(botocore_signed(b"{}", secret="not the secret"))
    with pytest.raises(SignatureError) as caught:
        check_signature(
            request,
            service="kms",
            region="us-east-1",
            secret_for=lambda _k: None,
            now=datetime.now(UTC),
        )
    assert caught.value.error_type == "UnrecognizedClientException"


def test_scope_clock_and_shape_errors() -> None:
    with pytest.raises(SignatureError, match="valid region"):
        check(botocore_signed(b"{}", region="eu-west-1"))
    with pytest.raises(SignatureError, match="Signature expired"):
        check(botocore_signed(b"{}"), now=datetime.now(UTC) + timedelta(minutes=16))
    request = botocore_signed(b"{}")
    no_auth = {k: v for k, v in request.headers.items() if k != "authorization"}
    with pytest.raises(SignatureError) as caught:
        check(Request("POST", "/", no_auth, b"{}"))
    assert caught.value.error_type == "MissingAuthenticationTokenException"


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_authorization_parser_raises_only_signature_error(value: str) -> None:
    try:
        auth = parse_authorization(value)
    except SignatureError as exc:
        assert exc.error_type == "IncompleteSignatureException"
    else:
        assert auth.signed_headers == tuple(sorted(auth.signed_headers))


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(["authorization", "x-amz-date", "host", "x-amz-target"]),
        st.text(max_size=120),
    ),
    st.binary(max_size=50),
)
def test_arbitrary_headers_raise_only_signature_error(headers: dict[str, str], body: bytes) -> None:
    try:
        check(Request("POST", "/", headers, body))
    except SignatureError:
        pass
    else:
        pytest.fail("an unsigned request was accepted")


def test_minted_credentials_expire_and_need_their_token() -> None:
    store = CredentialStore([ACCOUNT_A])
    assert store.credential_for(store.long_term.access_key_id, None, NOW) == store.long_term
    minted = store.mint(timedelta(seconds=60), NOW)
    assert minted.access_key_id.startswith("ASIA") and minted.session_token
    assert store.credential_for(minted.access_key_id, minted.session_token, NOW) == minted
    with pytest.raises(SignatureError) as caught:
        store.credential_for(
            minted.access_key_id, minted.session_token, NOW + timedelta(seconds=61)
        )
    assert caught.value.error_type == "ExpiredTokenException"
    for key, token in [
        (minted.access_key_id, None),
        (minted.access_key_id, "wrong"),
        ("ASIAUNKNOWN", minted.session_token),
        (store.long_term.access_key_id, "a token on a long-term key"),
    ]:
        with pytest.raises(SignatureError) as caught:
            store.credential_for(key, token, NOW)
        assert caught.value.error_type == "UnrecognizedClientException"
    with pytest.raises(ValueError):
        store.mint(timedelta(seconds=0), NOW)


def test_each_account_has_its_own_credentials_and_callers() -> None:
    store = CredentialStore([ACCOUNT_A, ACCOUNT_B])
    first, second = store.long_term_of(ACCOUNT_A), store.long_term_of(ACCOUNT_B)
    assert store.long_term == first and first.access_key_id != second.access_key_id
    assert store.credential_for(second.access_key_id, None, NOW).caller == Caller(ACCOUNT_B)
    assert store.mint(timedelta(seconds=60), NOW).caller == Caller(ACCOUNT_A)
    role = f"arn:aws:iam::{ACCOUNT_B}:role/parent"
    minted = store.mint_requested({"ttl": 60, "account": ACCOUNT_B, "principal": role}, NOW)
    assert minted.caller == Caller(ACCOUNT_B, role)
    assert minted.caller.arn == role and Caller(ACCOUNT_B).arn.startswith(
        f"arn:aws:iam::{ACCOUNT_B}:"
    )
    assert minted.process_document()["Expiration"] == "2026-11-29T00:01:00Z"
    for document, message in [
        ({"account": "999988887777"}, "not one of this stand-in's"),
        ({"account": ACCOUNT_A, "principal": role}, "not of account"),
        ({"principal": f"arn:aws:iam::{ACCOUNT_A}:root"}, "not an IAM user or role"),
        ({"principal": "alice"}, "not an IAM user or role"),
        ({"account": 111122223333}, "account must be a string"),
        ({"ttl": "60"}, "ttl must be a number"),
        ({"ttl": True}, "ttl must be a number"),
        ({"ttl": 1e300}, "ttl must be more than"),
        ({"ttl": float("inf")}, "ttl must be more than"),
        ([], "JSON object"),
    ]:
        with pytest.raises(ValueError, match=message):
            store.mint_requested(document, NOW)


def test_fault_plans_are_consumed_one_call_at_a_time() -> None:
    injector = FaultInjector()
    assert injector.next_call() is None
    injector.set(parse_plan({"kind": "throttle", "count": 2}))
    first, second, third = injector.next_call(), injector.next_call(), injector.next_call()
    assert first is not None and first.error() == (400, "ThrottlingException", first.error()[2])  # type: ignore[index]
    assert second is not None and third is None
    injector.set(parse_plan({"kind": "delay", "count": 1, "delay": 0.5}))
    fault = injector.next_call()
    assert fault is not None and fault.delay == 0.5 and fault.error() is None
    injector.set(FaultPlan("internal", 3))
    injector.set(parse_plan({"kind": "internal", "count": 0}))
    assert injector.pending == 0 and injector.next_call() is None


@settings(max_examples=200)
@given(json_document=st.dictionaries(st.sampled_from(["kind", "count", "delay", "x"]), st.one_of(
    st.none(), st.booleans(), st.integers(-5, 20_000), st.floats(allow_nan=True),
    st.sampled_from(["internal", "throttle", "delay", "boom"]),
)) | st.integers() | st.none())  # fmt: skip
def test_fault_plan_parser_raises_only_fault_error(json_document: Any) -> None:
    try:
        plan = parse_plan(json_document)
    except FaultError:
        return
    assert plan.kind in ("internal", "throttle", "delay") and 0 <= plan.count <= 10_000


def _signed_over(request: Request, signed_headers: tuple[str, ...]) -> Request:
    """``request`` re-signed (correctly, with SECRET) over only ``signed_headers``."""
    import hashlib
    import hmac

    from devtools.local_kms.sigv4 import Authorization, canonical_request, signing_key

    when = request.headers["x-amz-date"]
    auth = Authorization(KEY_ID, when[:8], "us-east-1", "kms", signed_headers, "0" * 64)
    digest = hashlib.sha256(canonical_request(request, auth).encode()).hexdigest()
    to_sign = f"AWS4-HMAC-SHA256\n{when}\n{auth.scope}\n{digest}"
    signature = hmac.new(signing_key(SECRET, auth), to_sign.encode(), hashlib.sha256).hexdigest()
    value = (
        f"AWS4-HMAC-SHA256 Credential={KEY_ID}/{auth.scope}, "
        f"SignedHeaders={';'.join(signed_headers)}, Signature={signature}"
    )
    return Request("POST", "/", dict(request.headers, authorization=value), request.body)


def test_host_and_x_amz_date_must_be_signed() -> None:
    request = botocore_signed(b"{}")
    check(_signed_over(request, ("host", "x-amz-date")))  # the helper signs correctly
    with pytest.raises(SignatureError, match="'Host' must be a 'SignedHeader'"):
        check(_signed_over(request, ("x-amz-date",)))
    # AWS: a request dated by X-Amz-Date must list it in SignedHeaders.
    with pytest.raises(SignatureError, match="'X-Amz-Date' must be a 'SignedHeader'") as caught:
        check(_signed_over(request, ("host",)))
    assert caught.value.error_type == "InvalidSignatureException"


# --- S3's rules (the stand-in's S3 endpoint) --------------------------------------------


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def s3_signed(
    method: str,
    path: str,
    body: bytes = b"",
    *,
    headers: dict[str, str] | None = None,
    unsigned_payload: bool = False,
    auth_class: type[SigV4Auth] = S3SigV4Auth,
) -> Request:
    """A request signed by botocore's S3 signer (``path`` already URI-encoded)."""
    aws = AWSRequest(
        method=method, url=f"https://127.0.0.1:4443{path}", data=body, headers=headers or {}
    )
    if unsigned_payload:
        aws.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    auth_class(Credentials(KEY_ID, SECRET), "s3", "us-east-1").add_auth(aws)
    prepared = aws.prepare()
    received = {k.lower(): v for k, v in prepared.headers.items()}
    received["host"] = "127.0.0.1:4443"
    return Request(method, path, received, body)


def check_s3(request: Request) -> None:
    check_signature(
        request,
        service="s3",
        region="us-east-1",
        secret_for=lambda key: SECRET if key == KEY_ID else None,
        now=datetime.now(UTC),
    )


def s3_error(request: Request) -> tuple[int, str]:
    with pytest.raises(SignatureError) as caught:
        check_s3(request)
    return caught.value.s3


@settings(max_examples=150, deadline=None)
@given(key=st.text(min_size=1, max_size=40), body=st.binary(max_size=200))
def test_botocore_signed_s3_requests_verify(key: str, body: bytes) -> None:
    path = "/bucket/" + quote(key, safe="/~")  # how botocore's S3 client sends a key
    check_s3(s3_signed("PUT", path, body, headers={"x-amz-expected-bucket-owner": ACCOUNT_A}))


def test_s3_paths_are_encoded_once_the_others_twice() -> None:
    path = "/bucket/a%20b%2Bc"
    check_s3(s3_signed("GET", path))
    # botocore's generic signer encodes the path a second time, as KMS expects: not S3.
    empty = {"x-amz-content-sha256": EMPTY_SHA256}
    assert s3_error(s3_signed("GET", path, headers=empty, auth_class=SigV4Auth)) == (
        403,
        "SignatureDoesNotMatch",
    )
    check_s3(
        s3_signed("GET", "/bucket/plain-key", headers=empty, auth_class=SigV4Auth)
    )  # nothing to encode


def test_unsigned_payload_is_accepted_and_a_wrong_hash_is_refused() -> None:
    request = s3_signed("PUT", "/bucket/k", b"hello", unsigned_payload=True)
    assert request.headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    check_s3(request)
    check_s3(Request("PUT", "/bucket/k", request.headers, b"another body"))
    signed = s3_signed("PUT", "/bucket/k", b"hello")
    assert s3_error(Request("PUT", "/bucket/k", signed.headers, b"hellO")) == (
        400,
        "XAmzContentSHA256Mismatch",
    )


def test_s3_requires_a_usable_content_sha256() -> None:
    signed = s3_signed("GET", "/bucket/k")
    without = {k: v for k, v in signed.headers.items() if k != "x-amz-content-sha256"}
    assert s3_error(Request("GET", "/bucket/k", without, b"")) == (400, "InvalidRequest")
    for value, expected in [
        ("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", (501, "NotImplemented")),
        ("sha256 please", (400, "InvalidArgument")),
        (
            "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            (400, "InvalidArgument"),
        ),
    ]:
        headers = dict(signed.headers, **{"x-amz-content-sha256": value})
        assert s3_error(Request("GET", "/bucket/k", headers, b"")) == expected


def test_every_x_amz_header_must_be_signed_for_s3() -> None:
    signed = s3_signed("GET", "/bucket/k", headers={"x-amz-expected-bucket-owner": ACCOUNT_A})
    check_s3(signed)
    added = dict(signed.headers, **{"x-amz-expected-bucket-owner": ACCOUNT_B})
    assert s3_error(Request("GET", "/bucket/k", added, b"")) == (403, "SignatureDoesNotMatch")
    extra = dict(signed.headers, **{"x-amz-acl": "public-read"})
    with pytest.raises(SignatureError, match="not signed: x-amz-acl") as caught:
        check_s3(Request("GET", "/bucket/k", extra, b""))
    assert caught.value.s3 == (403, "AccessDenied")
    # KMS has no such rule: an unsigned x-amz-* header there changes nothing.
    request = botocore_signed(b"{}")
    check(Request("POST", "/", dict(request.headers, **{"x-amz-acl": "x"}), b"{}"))


def test_a_signature_scoped_to_another_service_is_refused_by_each() -> None:
    kms_request = botocore_signed(b"{}")
    with pytest.raises(SignatureError, match="correct service: 's3'") as caught:
        check_s3(
            Request(
                "POST",
                "/",
                dict(kms_request.headers, **{"x-amz-content-sha256": "UNSIGNED-PAYLOAD"}),
                b"{}",
            )
        )
    assert caught.value.s3 == (400, "AuthorizationHeaderMalformed")
    for service in ("ssm", "secretsmanager"):
        with pytest.raises(SignatureError, match=f"correct service: '{service}'") as caught:
            check_signature(
                kms_request,
                service=service,
                region="us-east-1",
                secret_for=lambda _key: SECRET,
                now=datetime.now(UTC),
            )
        assert caught.value.error_type == "InvalidSignatureException"


def test_s3_error_codes_for_credentials() -> None:
    store = CredentialStore([ACCOUNT_A])
    minted = store.mint(timedelta(seconds=60), NOW)
    cases = [
        ((minted.access_key_id, "wrong"), (400, "InvalidToken")),
        (("ASIAUNKNOWN", "token"), (403, "InvalidAccessKeyId")),
        (("AKIAUNKNOWN", None), (403, "InvalidAccessKeyId")),
        ((minted.access_key_id, minted.session_token), (400, "ExpiredToken")),
    ]
    for (key, token), expected in cases:
        with pytest.raises(SignatureError) as caught:
            store.credential_for(key, token, NOW + timedelta(seconds=61))
        assert caught.value.s3 == expected
