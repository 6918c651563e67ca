"""Our SigV4 signer against AWS's published examples and botocore's signers.

botocore (a test dependency here) is the oracle: every request shape the agent sends
is built by a real botocore client and captured before it leaves, then signed again
by ``enclave_agent.runtime.sigv4`` from the same parts at the same instant; the added
headers must be byte-identical. Hypothesis then does the same with AWSRequest and
SigV4Auth / S3SigV4Auth over generated paths, queries, headers and bodies.
"""

from __future__ import annotations

import string
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from botocore.auth import SIGNED_HEADERS_BLACKLIST, S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_agent.runtime.sigv4 import (
    UNSIGNED_PAYLOAD,
    SigningError,
    SigningKeyCache,
    encode_path,
    encode_query,
    sign,
)
from tests.support.botocore_oracle import AT, Creds, botocore_clock, botocore_sends, text

SIGNER_HEADERS = {"authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"}


def sign_kms(**changes: Any) -> list[tuple[str, str]]:
    """Our signer on a small KMS POST, with ``changes`` to any of ``sign``'s arguments."""
    request: dict[str, Any] = {
        "method": "POST",
        "host": "kms.eu-west-1.amazonaws.com",
        "path": "/",
        "payload": b"{}",
        "service": "kms",
        "region": "eu-west-1",
        "credentials": Creds(),
        "instant": AT,
        "keys": SigningKeyCache(),
    }
    request.update(changes)
    return sign(**request)


def ours_for(sent: Any, *, service: str, region: str, creds: Creds) -> dict[str, str]:
    """Sign what botocore sent, from its parts, with our signer: the headers we add."""
    received = {k.lower(): text(v) for k, v in sent.headers.items()}
    signed = received["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    parts = urlsplit(sent.url)
    added = sign(
        method=sent.method,
        host=parts.netloc,
        path=parts.path,
        query=parse_qsl(parts.query, keep_blank_values=True),
        headers=[(n, received[n]) for n in signed if n != "host" and n not in SIGNER_HEADERS],
        payload=sent.body or b"",
        service=service,
        region=region,
        credentials=creds,
        instant=AT,
        keys=SigningKeyCache(),
    )
    return {name.lower(): value for name, value in added}


S3_KEYS = [
    "plain.txt",
    "with space/and more spaces.txt",
    "unicode/ümlaut/日本語/😀.bin",
    "a+plus~tilde%percent",
    "100% sure=yes&no?#frag",
    "double//slash/./dot/../dotdot",
    "trailing/",
    "!$'()*,;:@[]",
]
SHAPES = [
    ("kms", "decrypt", {"CiphertextBlob": b"\x01\x02blob", "EncryptionContext": {"k": "v"}}),
    ("kms", "generate_random", {"NumberOfBytes": 32}),
    (
        "secretsmanager",
        "get_secret_value",
        {"SecretId": "prod/db password", "VersionStage": "AWSCURRENT"},
    ),
    ("ssm", "get_parameter", {"Name": "/app/db/password", "WithDecryption": True}),
    *(
        (
            "s3",
            "get_object",
            {"Bucket": "my-bucket", "Key": key, "ExpectedBucketOwner": "111122223333"},
        )
        for key in S3_KEYS
    ),
    (
        "s3",
        "get_object",
        {"Bucket": "my-bucket", "Key": "k", "VersionId": "v 1+2/=", "PartNumber": 1},
    ),
]


@pytest.mark.parametrize("token", ["IQoJb3JpZ2luX2VjEXAMPLE//session+token==", None])
@pytest.mark.parametrize(("service", "operation", "args"), SHAPES)
def test_every_request_shape_signs_as_botocore_does(
    service: str, operation: str, args: dict[str, Any], token: str | None
) -> None:
    creds = Creds(token=token)
    sent = botocore_sends(service, operation, args, creds)
    theirs = {k.lower(): text(v) for k, v in sent.headers.items() if k.lower() in SIGNER_HEADERS}
    assert ours_for(sent, service=service, region="eu-west-1", creds=creds) == theirs
    if service == "s3":
        # The wire path a caller builds with encode_path is what botocore sends.
        assert urlsplit(sent.url).path == encode_path(f"/my-bucket/{args['Key']}")
        assert "x-amz-content-sha256" in theirs


def test_kms_json_request_as_the_agent_builds_it() -> None:
    """The gateway's exact call: POST /, its two headers, a JSON body, a session token."""
    creds = Creds()
    body = b'{"CiphertextBlob":"AQID","Recipient":{"KeyEncryptionAlgorithm":"RSAES_OAEP_SHA_256"}}'
    headers = [
        ("Content-Type", "application/x-amz-json-1.1"),
        ("X-Amz-Target", "TrentService.Decrypt"),
    ]
    request = AWSRequest(
        method="POST", url="https://kms.eu-west-1.amazonaws.com/", data=body, headers=dict(headers)
    )
    with botocore_clock(AT):
        SigV4Auth(ReadOnlyCredentials(*vars(creds).values()), "kms", "eu-west-1").add_auth(request)
    added = sign(
        method="POST",
        host="kms.eu-west-1.amazonaws.com",
        path="/",
        headers=headers,
        payload=body,
        service="kms",
        region="eu-west-1",
        credentials=creds,
        instant=AT,
        keys=SigningKeyCache(),
    )
    assert added == [
        ("X-Amz-Date", "20260301T235959Z"),
        ("X-Amz-Security-Token", creds.token),
        ("Authorization", request.headers["Authorization"]),
    ]


def test_aws_published_examples() -> None:
    """AWS's own worked examples (values from the AWS documentation pages)."""
    # Amazon S3 API Reference, sig-v4-header-based-auth.html, "GET Object" example.
    s3 = sign(
        method="GET",
        host="examplebucket.s3.amazonaws.com",
        path="/test.txt",
        headers=[("Range", "bytes=0-9")],
        payload=b"",
        service="s3",
        region="us-east-1",
        credentials=Creds("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", None),
        instant=datetime(2013, 5, 24, tzinfo=UTC),
        keys=SigningKeyCache(),
    )
    assert dict(s3)["Authorization"].endswith(
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    # General Reference, "Signature Version 4 signing process" IAM ListUsers example.
    iam = sign(
        method="GET",
        host="iam.amazonaws.com",
        path="/",
        query=[("Version", "2010-05-08"), ("Action", "ListUsers")],
        headers=[("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")],
        payload=b"",
        service="iam",
        region="us-east-1",
        credentials=Creds("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None),
        instant=datetime(2015, 8, 30, 12, 36, tzinfo=UTC),
        keys=SigningKeyCache(),
    )
    assert dict(iam)["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, "
        "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
    )


# ------------------------------------------------------------- generated requests

_TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
_unicode = st.text(st.characters(blacklist_categories=("Cs",)), max_size=10)
header_names = st.text(_TOKEN_CHARS, min_size=1, max_size=12).filter(
    lambda n: n.lower() not in SIGNER_HEADERS | {"host", *SIGNED_HEADERS_BLACKLIST}
)
header_values = st.text(st.sampled_from([chr(c) for c in range(0x20, 0x7F)] + ["\t"]), max_size=24)
visible = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    service=st.sampled_from(["kms", "secretsmanager", "ssm", "iam", "s3"]),
    method=st.sampled_from(["GET", "POST", "PUT", "HEAD"]),
    host=st.sampled_from(["kms.eu-west-1.amazonaws.com", "127.0.0.1:4443", "[::1]:8443"]),
    segments=st.lists(_unicode | st.sampled_from([".", "..", ""]), max_size=6),
    query=st.lists(st.tuples(_unicode, _unicode), max_size=5),
    headers=st.lists(st.tuples(header_names, header_values), max_size=6),
    body=st.binary(max_size=64),
    token=st.none() | visible,
    secret=visible,
    unsigned=st.booleans(),
    instant=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(UTC)
    ),
)
def test_generated_requests_sign_as_botocore_does(
    service: str,
    method: str,
    host: str,
    segments: list[str],
    query: list[tuple[str, str]],
    headers: list[tuple[str, str]],
    body: bytes,
    token: str | None,
    secret: str,
    unsigned: bool,
    instant: datetime,
) -> None:
    path = encode_path("/" + "/".join(segments))
    creds = Creds(secret_access_key=secret, token=token)
    request = AWSRequest(method=method, url=f"https://{host}{path}", data=body, params=query)
    for name, value in headers:
        request.headers[name] = value  # appends: repeated names stay repeated
    s3 = service == "s3"
    unsigned = unsigned and s3
    if unsigned:
        request.context["client_config"] = SimpleNamespace(s3={"payload_signing_enabled": False})
    signer = (S3SigV4Auth if s3 else SigV4Auth)(
        ReadOnlyCredentials(*vars(creds).values()), service, "eu-west-1"
    )
    with botocore_clock(instant):
        signer.add_auth(request)
    added = sign(
        method=method,
        host=host,
        path=path,
        query=query,
        headers=headers,
        payload=UNSIGNED_PAYLOAD if unsigned else body,
        service=service,
        region="eu-west-1",
        credentials=creds,
        instant=instant,
        keys=SigningKeyCache(),
    )
    theirs = {k.lower(): v for k, v in request.headers.items() if k.lower() in SIGNER_HEADERS}
    assert {name.lower(): value for name, value in added} == theirs


@given(query=st.lists(st.tuples(_unicode, _unicode), max_size=6))
def test_encoded_query_round_trips_and_is_canonical(query: list[tuple[str, str]]) -> None:
    wire = encode_query(query)
    assert sorted(parse_qsl(wire, keep_blank_values=True)) == sorted(query)
    assert encode_query(parse_qsl(wire, keep_blank_values=True)) == wire
    assert " " not in wire and "+" not in wire.replace("%2B", "")


def test_query_string_rules() -> None:
    assert encode_query([]) == ""
    # Sorted by encoded name, then value; "=" kept for empty values; RFC 3986 encoding.
    assert encode_query([("b", ""), ("a", "2"), ("a", "1"), ("a b", "x+y~z/")]) == (
        "a=1&a=2&a%20b=x%2By~z%2F&b="
    )


def test_s3_path_is_signed_as_sent_and_other_paths_normalised() -> None:
    def authorization(service: str, path: str) -> str:
        return dict(sign_kms(method="GET", path=path, service=service))["Authorization"]

    # Outside S3, dot segments and empty segments do not change the signature...
    assert authorization("kms", "/a/./b//c/../c") == authorization("kms", "/a/b/c")
    # ... in S3 they are part of the object key.
    assert authorization("s3", "/a/./b//c/../c") != authorization("s3", "/a/b/c")


# ------------------------------------------------------------------ the key cache


def test_signing_key_derived_once_per_day_region_and_service() -> None:
    keys = SigningKeyCache()

    def sign_at(instant: datetime, region: str = "eu-west-1", service: str = "kms") -> None:
        sign_kms(instant=instant, region=region, service=service, keys=keys)

    midnight = datetime(2026, 3, 1, tzinfo=UTC)
    sign_at(midnight)
    sign_at(midnight + timedelta(hours=23, minutes=59, seconds=59))
    sign_at(datetime(2026, 3, 1, 12, 0, tzinfo=UTC).astimezone())  # same UTC date, local tz
    assert keys.derivations == 1
    sign_at(midnight + timedelta(days=1))
    assert keys.derivations == 2
    sign_at(midnight, region="us-east-1")
    sign_at(midnight, service="secretsmanager")
    assert keys.derivations == 4
    sign_at(midnight)
    assert keys.derivations == 4  # still cached


def test_different_credentials_never_share_a_signing_key() -> None:
    keys = SigningKeyCache()
    first, second = Creds(secret_access_key="secret-one"), Creds(secret_access_key="secret-two")
    signed = {}
    for creds in (first, second, first, second):
        added = sign_kms(credentials=creds, keys=keys)
        request = AWSRequest(method="POST", url="https://kms.eu-west-1.amazonaws.com/", data=b"{}")
        with botocore_clock(AT):
            SigV4Auth(ReadOnlyCredentials(*vars(creds).values()), "kms", "eu-west-1").add_auth(
                request
            )
        assert dict(added)["Authorization"] == request.headers["Authorization"]
        signed[creds.secret_access_key] = dict(added)["Authorization"]
    assert keys.derivations == 2
    assert signed["secret-one"] != signed["secret-two"]


def test_key_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    keys = SigningKeyCache(size=2)
    for region in ["r-1", "r-2", "r-1", "r-3"]:  # r-2 is then the least recently used
        keys.signing_key("s", "20260301", region, "kms")
    assert len(keys) == 2
    assert keys.derivations == 3
    keys.signing_key("s", "20260301", "r-1", "kms")
    assert keys.derivations == 3
    keys.signing_key("s", "20260301", "r-2", "kms")
    assert keys.derivations == 4
    with pytest.raises(ValueError):
        SigningKeyCache(size=0)


def test_key_cache_holds_nothing_printable_of_the_secret() -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    keys = SigningKeyCache()
    key = keys.signing_key(secret, "20260301", "eu-west-1", "kms")
    assert repr(keys) == str(keys) == "SigningKeyCache(entries=1, size=8)"
    state = repr(vars(keys))
    for leak in [secret, repr(secret.encode()), "AWS4" + secret]:
        assert leak not in state
    # The fingerprint is salted per cache: another cache files the same secret elsewhere.
    other = SigningKeyCache()
    other.signing_key(secret, "20260301", "eu-west-1", "kms")
    assert list(vars(keys)["_keys"]) != list(vars(other)["_keys"])
    assert key.hex() not in repr(keys)


# ------------------------------------------------ what a lying parent can send us


@pytest.mark.parametrize(
    ("creds", "complaint"),
    [
        # An access key id that would rewrite the credential scope.
        (Creds(access_key_id="AKID/20990101/us-east-1/kms"), "access key id"),
        (Creds(access_key_id="AKID, SignedHeaders=host"), "access key id"),
        # A session token smuggling a header or a second request.
        (Creds(token="tok\r\nX-Evil: 1"), "x-amz-security-token"),
        (Creds(token="tok\nGET / HTTP/1.1"), "x-amz-security-token"),
        (Creds(token="tök"), "x-amz-security-token"),
    ],
)
def test_credentials_that_would_forge_the_request_are_refused(creds: Creds, complaint: str) -> None:
    with pytest.raises(SigningError) as info:
        sign_kms(credentials=creds)
    assert complaint in info.value.args[0].lower()
    assert (creds.token or "\0") not in str(info.value)


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"path": "/a b"}, "canonical percent-encoding"),
        ({"path": "/%7e"}, "canonical percent-encoding"),
        ({"path": "/%c3%bc"}, "canonical percent-encoding"),
        ({"path": "/%zz"}, "canonical percent-encoding"),
        ({"path": "no-slash"}, "canonical percent-encoding"),
        ({"payload": UNSIGNED_PAYLOAD}, "s3 only"),
        ({"payload": "ABC"}, "64 lower-case hex"),
        ({"headers": [("Authorization", "x")]}, "set by the signer"),
        ({"headers": [("host", "x")]}, "set by the signer"),
        ({"headers": [("X-Amz-Date", "x")]}, "set by the signer"),
        ({"headers": [("bad name", "x")]}, "not a valid http token"),
        ({"headers": [("x-ok", "line\r\nbreak")]}, "visible ascii"),
        ({"method": "post"}, "upper-case"),
        ({"region": "EU-WEST-1"}, "region"),
        ({"service": "kms/x"}, "service"),
        ({"instant": datetime(2026, 3, 1)}, "timezone-aware"),
    ],
)
def test_unsignable_requests_get_a_clear_error(changes: dict[str, Any], complaint: str) -> None:
    with pytest.raises(SigningError, match="(?i)" + complaint.replace(" ", r"\s")):
        sign_kms(**changes)


def test_encode_path_refuses_what_cannot_be_encoded() -> None:
    with pytest.raises(SigningError, match="start with '/'"):
        encode_path("bucket/key")
    with pytest.raises(SigningError, match="surrogates"):
        encode_path("/\udc80")
    with pytest.raises(SigningError, match="surrogates"):
        encode_query([("\udc80", "")])
    assert encode_path("/b/a b+c~d%e/ü") == "/b/a%20b%2Bc~d%25e/%C3%BC"
