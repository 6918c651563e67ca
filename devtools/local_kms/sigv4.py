"""Check AWS Signature Version 4 on a received request, as AWS does (pure, no I/O).

The canonical request is rebuilt from what arrived (method, raw path, raw query, the
headers named in SignedHeaders, the body), so a request is accepted exactly when its
signer used the secret key the stand-in knows for the access key id it names, for the
service and region of the endpoint it reached. Errors carry the error the caller would
get from AWS: ``error_type`` for the JSON services (KMS, Secrets Manager, SSM; HTTP
400), ``s3`` (status, code) for S3.

S3's own rules, from "Signature Calculations for the Authorization Header: Transferring
Payload in a Single Chunk" (https://docs.aws.amazon.com/AmazonS3/latest/API/
sig-v4-header-based-auth.html) and S3's error answers; written here from those
documents, not from the agent's signer, so that this check is an independent oracle:

- the canonical URI is the path URI-encoded once (every byte but A-Z a-z 0-9 - . _ ~
  and "/"), never normalised; the other services encode the path a second time;
- ``x-amz-content-sha256`` is required (400 InvalidRequest) and is the payload hash of
  the canonical request: the body's hex SHA-256 (a body that does not match it is 400
  XAmzContentSHA256Mismatch), ``UNSIGNED-PAYLOAD``, or
  ``STREAMING-UNSIGNED-PAYLOAD-TRAILER`` (an aws-chunked body with a trailing
  checksum, which the SDKs send for uploads); chunk signatures
  (``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``...) are not verified here and are refused
  (501 NotImplemented);
- every ``x-amz-*`` header the request carries must be signed, but for
  ``x-amz-content-sha256`` (403 AccessDenied, "There were headers present in the
  request which were not signed").
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, unquote

from enclave_common.errors import ShownError

ALGORITHM = "AWS4-HMAC-SHA256"
S3_SERVICE = "s3"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
CONTENT_SHA256 = "x-amz-content-sha256"
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_CLOCK_SKEW = timedelta(minutes=15)
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=([^,\s]+),\s*SignedHeaders=([^,\s]+),\s*Signature=([0-9a-f]{64})\s*"
)
_AMZ_DATE = "%Y%m%dT%H%M%SZ"

BAD_SIGNATURE_MESSAGE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details."
)


class SignatureError(ShownError):
    """The request is not correctly signed: ``error_type`` is what a JSON service of
    AWS answers (HTTP 400), ``s3`` the (status, code) S3 answers."""

    def __init__(self, error_type: str, message: str, s3: tuple[int, str]) -> None:
        super().__init__(error_type, message, 400)
        self.s3 = s3


def _incomplete(message: str) -> SignatureError:
    return SignatureError(
        "IncompleteSignatureException", message, (400, "AuthorizationHeaderMalformed")
    )


def _malformed_scope(message: str) -> SignatureError:
    return SignatureError(
        "InvalidSignatureException", message, (400, "AuthorizationHeaderMalformed")
    )


def _bad_date(message: str) -> SignatureError:
    return SignatureError("IncompleteSignatureException", message, (403, "AccessDenied"))


@dataclass(frozen=True)
class Authorization:
    access_key_id: str
    date: str  # YYYYMMDD of the credential scope
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


@dataclass(frozen=True)
class Request:
    """A received request. ``headers`` keys are lower case; repeated headers joined by ','."""

    method: str
    target: str  # raw request target, path plus optional "?query"
    headers: Mapping[str, str]
    body: bytes


def parse_authorization(value: str) -> Authorization:
    match = _AUTH.fullmatch(value)
    if match is None:
        if not value.startswith(ALGORITHM):
            raise _incomplete(f"Authorization header requires the {ALGORITHM} algorithm.")
        raise _incomplete(
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature'."
        )
    credential, signed, signature = match.groups()
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or not re.fullmatch(r"\d{8}", parts[1]):
        raise _incomplete(
            "Credential must have the form <key id>/<YYYYMMDD>/<region>/<service>/aws4_request."
        )
    headers = tuple(signed.split(";"))
    if any(h != h.lower() or not h for h in headers) or list(headers) != sorted(headers):
        raise _incomplete("SignedHeaders must be sorted lower-case names.")
    return Authorization(parts[0], parts[1], parts[2], parts[3], headers, signature)


def _canonical_query(query: str) -> str:
    # Pairs as sent, sorted: what botocore signs (it takes an already-encoded query).
    # KMS itself never uses a query string.
    pairs = [item.partition("=")[::2] for item in query.split("&")] if query else []
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def canonical_uri(path: str, service: str) -> str:
    """The path as the canonical request has it: S3 encodes it once (the path as the
    object key's bytes, each byte but the unreserved ones and "/" percent-encoded);
    the other services encode the path as sent a second time."""
    if service == S3_SERVICE:
        return quote(unquote(path or "/"), safe="/~")
    return quote(path or "/", safe="/~")


def canonical_request(
    request: Request, auth: Authorization, payload_hash: str | None = None
) -> str:
    """The canonical request; ``payload_hash`` default: the body's SHA-256 (S3 signs
    the x-amz-content-sha256 header's value instead)."""
    if payload_hash is None:
        payload_hash = hashlib.sha256(request.body).hexdigest()
    path, _, query = request.target.partition("?")
    headers = []
    for name in auth.signed_headers:
        value = request.headers.get(name)
        if value is None:
            raise _incomplete(f"signed header {name!r} is missing")
        headers.append(f"{name}:{' '.join(value.split())}\n")
    return "\n".join(
        [
            request.method,
            canonical_uri(path, auth.service),
            _canonical_query(query),
            "".join(headers),
            ";".join(auth.signed_headers),
            payload_hash,
        ]
    )


def s3_payload_hash(request: Request) -> str:
    """The payload hash an S3 request's signature covers: its x-amz-content-sha256
    header, which must be present and one of the values S3 takes."""
    value = request.headers.get(CONTENT_SHA256)
    if value is None:
        raise SignatureError(
            "IncompleteSignatureException",
            f"Missing required header for this request: {CONTENT_SHA256}",
            (400, "InvalidRequest"),
        )
    if value in (UNSIGNED_PAYLOAD, STREAMING_UNSIGNED_TRAILER) or _HEX_SHA256.fullmatch(value):
        return value
    if value.startswith("STREAMING-"):
        raise SignatureError(
            "IncompleteSignatureException",
            f"{CONTENT_SHA256}: {value}: chunk signatures are not verified by the local "
            f"stand-in; send the body in one piece, {UNSIGNED_PAYLOAD} or "
            f"{STREAMING_UNSIGNED_TRAILER}",
            (501, "NotImplemented"),
        )
    raise SignatureError(
        "IncompleteSignatureException",
        f"{CONTENT_SHA256} must be {UNSIGNED_PAYLOAD}, {STREAMING_UNSIGNED_TRAILER} or a "
        "valid sha256 value.",
        (400, "InvalidArgument"),
    )


def _check_s3_rules(request: Request, auth: Authorization, payload_hash: str) -> None:
    """After the signature: every x-amz-* header signed, the body hashing as declared."""
    unsigned = sorted(
        name
        for name in request.headers
        if name.startswith("x-amz-") and name != CONTENT_SHA256 and name not in auth.signed_headers
    )
    if unsigned:
        raise SignatureError(
            "InvalidSignatureException",
            "There were headers present in the request which were not signed: "
            + ", ".join(unsigned),
            (403, "AccessDenied"),
        )
    if _HEX_SHA256.fullmatch(payload_hash) and not hmac.compare_digest(
        payload_hash, hashlib.sha256(request.body).hexdigest()
    ):
        raise SignatureError(
            "InvalidSignatureException",
            f"The provided '{CONTENT_SHA256}' header does not match what was computed.",
            (400, "XAmzContentSHA256Mismatch"),
        )


def signing_key(secret_key: str, auth: Authorization) -> bytes:
    key = ("AWS4" + secret_key).encode()
    for part in (auth.date, auth.region, auth.service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def request_time(request: Request) -> datetime:
    value = request.headers.get("x-amz-date")
    if value is None:
        raise _bad_date("the request must carry an X-Amz-Date header")
    try:
        return datetime.strptime(value, _AMZ_DATE).replace(tzinfo=UTC)
    except ValueError as exc:
        raise _bad_date("X-Amz-Date must have the form YYYYMMDDTHHMMSSZ") from exc


def check_signature(
    request: Request,
    *,
    service: str,
    region: str,
    secret_for: Callable[[str], str | None],
    now: datetime,
) -> Authorization:
    """Verify ``request``'s SigV4 signature for ``service`` in ``region`` (the endpoint
    it reached); return its Authorization or raise SignatureError.

    ``secret_for(access_key_id)`` gives the secret key, or None for an unknown key id.
    """
    value = request.headers.get("authorization")
    if value is None:
        raise SignatureError(
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
            (403, "AccessDenied"),
        )
    auth = parse_authorization(value)
    when = request_time(request)
    if auth.date != when.strftime("%Y%m%d"):
        raise _malformed_scope(
            f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
            f"from HTTP: '{auth.date}' != '{when:%Y%m%d}'"
        )
    if auth.service != service:
        raise _malformed_scope(f"Credential should be scoped to correct service: '{service}'.")
    if auth.region != region:
        raise _malformed_scope(
            f"Credential should be scoped to a valid region, not '{auth.region}'."
        )
    if "host" not in auth.signed_headers:
        raise _malformed_scope("'Host' must be a 'SignedHeader' in the AWS Authorization.")
    if "x-amz-date" not in auth.signed_headers:
        raise _malformed_scope("'X-Amz-Date' must be a 'SignedHeader' in the AWS Authorization.")
    if abs(now - when) > MAX_CLOCK_SKEW:
        raise SignatureError(
            "InvalidSignatureException",
            f"Signature expired: {when:%Y%m%dT%H%M%SZ} is now earlier or later than "
            f"{now:%Y%m%dT%H%M%SZ} by more than 15 minutes.",
            (403, "RequestTimeTooSkewed"),
        )
    payload_hash = s3_payload_hash(request) if service == S3_SERVICE else None
    secret = secret_for(auth.access_key_id)
    if secret is None:
        raise SignatureError(
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
            (403, "InvalidAccessKeyId"),
        )
    string_to_sign = "\n".join(
        [
            ALGORITHM,
            request.headers["x-amz-date"],
            auth.scope,
            hashlib.sha256(canonical_request(request, auth, payload_hash).encode()).hexdigest(),
        ]
    )
    expected = hmac.new(
        signing_key(secret, auth), string_to_sign.encode(), hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest(expected, auth.signature):
        raise SignatureError(
            "InvalidSignatureException", BAD_SIGNATURE_MESSAGE, (403, "SignatureDoesNotMatch")
        )
    if payload_hash is not None:
        _check_s3_rules(request, auth, payload_hash)
    return auth
