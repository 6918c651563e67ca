"""AWS Signature Version 4 for the agent's requests (pure: no I/O, no clock, no logging).

The algorithm is AWS's published one: "Create a signed AWS API request"
(https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv-create-signed-request.html,
formerly "Signature Version 4 signing process" / "Create a canonical request" at
https://docs.aws.amazon.com/general/latest/gr/sigv4-create-canonical-request.html) and,
for Amazon S3, "Signature Calculations for the Authorization Header: Transferring
Payload in a Single Chunk"
(https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html):

    CanonicalRequest = Method \\n CanonicalURI \\n CanonicalQueryString \\n
                       CanonicalHeaders \\n SignedHeaders \\n HashedPayload
    StringToSign     = "AWS4-HMAC-SHA256" \\n YYYYMMDDTHHMMSSZ \\n Scope \\n
                       hex(SHA256(CanonicalRequest))
    Scope            = YYYYMMDD/region/service/aws4_request
    SigningKey       = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, YYYYMMDD), region), service),
                            "aws4_request")
    Signature        = hex(HMAC(SigningKey, StringToSign))

The rules this module applies, each checked against botocore's signers in
tests/test_sigv4.py:

- ``path`` is the request path exactly as sent, in canonical percent-encoding (build it
  with ``encode_path``). Every service but S3 signs it normalised (dot segments and
  empty segments removed) and URI-encoded a second time; S3 signs it as sent, encoded
  once and never normalised (an object key may hold ``//`` or ``..``).
- ``query`` is a list of (name, value) pairs, not encoded: the canonical query string
  URI-encodes both with RFC 3986's unreserved set (space is ``%20``, ``+`` is ``%2B``),
  keeps ``=`` for empty values, and sorts by encoded name, then value (repeated
  names). ``encode_query`` gives that same string to put on the wire.
- Header names are lower-cased and sorted; values lose leading and trailing
  whitespace and runs of inner whitespace become one space; a repeated name's values
  are joined with ``,`` in the order given. Every header passed in is signed (pass
  only those the request will carry unchanged); ``host`` and ``x-amz-date`` always are.
- The payload is hashed with SHA-256 (an empty body too). S3 also gets
  ``x-amz-content-sha256`` (it requires the header) and accepts ``UNSIGNED-PAYLOAD``
  in place of the hash; no other service does.
- A session token goes in ``X-Amz-Security-Token`` and is signed.

The signing key depends only on the secret key, the date, the region and the service,
so ``SigningKeyCache`` derives it once per day for each of them. It holds neither the
secret nor anything printable of it: entries are found by a keyed BLAKE2b fingerprint
of the secret under a random per-cache salt.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Services with S3's rules: path signed as sent, x-amz-content-sha256 sent and signed,
# UNSIGNED-PAYLOAD allowed.
S3_SERVICES = frozenset({"s3"})
# The headers the signer itself adds; a caller passing one is a mistake.
_SIGNER_HEADERS = frozenset(
    {"host", "authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"}
)

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 header name
_METHOD = re.compile(r"[A-Z]+")
_FIELD_VALUE = re.compile(r"[\t -~]*")  # visible ASCII, space and tab
_SCOPE_PART = re.compile(r"[a-z0-9-]+")
_ACCESS_KEY_ID = re.compile(r"[!-+\--.0-~]+")  # visible ASCII but "," and "/"
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


class SigningError(ValueError):
    """The request cannot be signed as given; the message names the part."""


class SigningCredentials(Protocol):
    """What signing needs of credentials (``runtime.credentials.Credentials`` fits)."""

    @property
    def access_key_id(self) -> str: ...

    @property
    def secret_access_key(self) -> str: ...

    @property
    def token(self) -> str | None: ...


def derive_signing_key(secret_access_key: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret_access_key).encode("utf-8")
    for part in (date, region, service, "aws4_request"):
        key = hmac.digest(key, part.encode("utf-8"), "sha256")
    return key


class SigningKeyCache:
    """Signing keys by (secret, date, region, service), the least recently used dropped.

    Never printable: its repr gives the entry count only, and the secret is kept
    only as a fingerprint that means nothing outside this object.
    """

    def __init__(self, size: int = 8) -> None:
        if size < 1:
            raise ValueError("a signing key cache needs room for at least one key")
        self._size = size
        self._salt = secrets.token_bytes(32)
        self._keys: OrderedDict[tuple[bytes, str, str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()  # signing may run in worker threads too
        self.derivations = 0  # keys derived so far (the cache's misses)

    def __repr__(self) -> str:
        return f"SigningKeyCache(entries={len(self._keys)}, size={self._size})"

    def __len__(self) -> int:
        return len(self._keys)

    def signing_key(self, secret_access_key: str, date: str, region: str, service: str) -> bytes:
        fingerprint = hashlib.blake2b(
            secret_access_key.encode("utf-8"), key=self._salt, digest_size=32
        ).digest()
        slot = (fingerprint, date, region, service)
        with self._lock:
            key = self._keys.get(slot)
            if key is not None:
                self._keys.move_to_end(slot)
                return key
        key = derive_signing_key(secret_access_key, date, region, service)
        with self._lock:
            self.derivations += 1
            self._keys[slot] = key
            self._keys.move_to_end(slot)
            while len(self._keys) > self._size:
                self._keys.popitem(last=False)
        return key


def encode_path(path: str) -> str:
    """``path`` (``/`` separated, not encoded) in the canonical encoding to send and sign."""
    if not path.startswith("/"):
        raise SigningError(f"a request path must start with '/', got {path[:40]!r}")
    try:
        return quote(path, safe="/")
    except UnicodeEncodeError:
        raise SigningError("a request path must be valid Unicode (no lone surrogates)") from None


def encode_query(query: Sequence[tuple[str, str]]) -> str:
    """The canonical query string, which is also a correct one to send."""
    try:
        pairs = sorted((quote(name, safe=""), quote(value, safe="")) for name, value in query)
    except UnicodeEncodeError:
        raise SigningError("a query string must be valid Unicode (no lone surrogates)") from None
    return "&".join(f"{name}={value}" for name, value in pairs)


def _canonical_uri(path: str, service: str) -> str:
    if path == "/":  # every JSON-protocol call (KMS, Secrets Manager, SSM)
        return path
    segments = path.split("/")
    if not path.startswith("/") or any(
        quote(unquote(segment, errors="strict"), safe="") != segment for segment in segments
    ):
        raise SigningError(
            f"the request path {path[:60]!r} is not in canonical percent-encoding "
            "(build it with encode_path)"
        )
    if service in S3_SERVICES:
        return path
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment not in ("", "."):
            kept.append(segment)
    normalised = "/" + "/".join(kept)
    if kept and path.endswith("/"):
        normalised += "/"
    return quote(normalised, safe="/")


def _canonical_headers(headers: Sequence[tuple[str, str]]) -> tuple[str, str]:
    values: dict[str, list[str]] = {}
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise SigningError(f"header name {name[:40]!r} is not a valid HTTP token")
        if not _FIELD_VALUE.fullmatch(value):
            raise SigningError(
                f"header {name!r}: value must be visible ASCII, spaces and tabs only"
            )
        values.setdefault(name.lower(), []).append(" ".join(value.split()))
    names = sorted(values)
    canonical = "".join(f"{name}:{','.join(values[name])}\n" for name in names)
    return canonical, ";".join(names)


def _payload_hash(payload: bytes | str, service: str) -> str:
    if isinstance(payload, bytes):
        return hashlib.sha256(payload).hexdigest() if payload else EMPTY_SHA256
    if payload == UNSIGNED_PAYLOAD:
        if service not in S3_SERVICES:
            raise SigningError(f"{UNSIGNED_PAYLOAD} is accepted by S3 only, not by {service!r}")
        return payload
    if not _HEX_SHA256.fullmatch(payload):
        raise SigningError(f"a payload hash must be 64 lower-case hex digits or {UNSIGNED_PAYLOAD}")
    return payload


def sign(
    *,
    method: str,
    host: str,
    path: str,
    query: Sequence[tuple[str, str]] = (),
    headers: Sequence[tuple[str, str]] = (),
    payload: bytes | str,
    service: str,
    region: str,
    credentials: SigningCredentials,
    instant: datetime,
    keys: SigningKeyCache,
) -> list[tuple[str, str]]:
    """The headers to add to the request: X-Amz-Date, X-Amz-Security-Token (with a
    session token), X-Amz-Content-SHA256 (S3) and Authorization.

    ``host`` is the Host header as sent; ``headers`` the other headers to sign;
    ``payload`` the body, or its SHA-256 in hex, or ``UNSIGNED_PAYLOAD`` (S3 only);
    ``instant`` an aware datetime (the signature is valid 15 minutes either side).
    """
    if not _METHOD.fullmatch(method):
        raise SigningError(f"method {method[:20]!r} must be an upper-case HTTP method")
    for part, value in (("region", region), ("service", service)):
        if not _SCOPE_PART.fullmatch(value):
            raise SigningError(f"{part} {value[:40]!r} must be lower-case letters, digits, '-'")
    if not _ACCESS_KEY_ID.fullmatch(credentials.access_key_id):
        raise SigningError("the access key id must be visible ASCII without ',' or '/'")
    if instant.tzinfo is None:
        raise SigningError("the signing instant must be timezone-aware")
    for name, _ in headers:
        if name.lower() in _SIGNER_HEADERS:
            raise SigningError(f"header {name!r} is set by the signer, do not pass it")

    amz_date = instant.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    added = [("X-Amz-Date", amz_date)]
    if credentials.token:
        added.append(("X-Amz-Security-Token", credentials.token))
    payload_hash = _payload_hash(payload, service)
    if service in S3_SERVICES:
        added.append(("X-Amz-Content-SHA256", payload_hash))
    canonical_headers, signed_headers = _canonical_headers([("host", host), *headers, *added])
    canonical_request = "\n".join(
        (
            method,
            _canonical_uri(path, service),
            encode_query(query),
            canonical_headers,
            signed_headers,
            payload_hash,
        )
    )
    date = amz_date[:8]
    scope = f"{date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        (
            ALGORITHM,
            amz_date,
            scope,
            hashlib.sha256(canonical_request.encode("utf-8")).hexdigest(),
        )
    )
    key = keys.signing_key(credentials.secret_access_key, date, region, service)
    signature = hmac.digest(key, string_to_sign.encode("utf-8"), "sha256").hex()
    added.append(
        (
            "Authorization",
            f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
            f"SignedHeaders={signed_headers}, Signature={signature}",
        )
    )
    return added
