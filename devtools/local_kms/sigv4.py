"""Check AWS Signature Version 4 on a received request, as AWS does (pure, no I/O).

The canonical request is rebuilt from what arrived (method, raw path, raw query, the
headers named in SignedHeaders, the body), so a request is accepted exactly when its
signer used the secret key the stand-in knows for the access key id it names. Errors
carry the AWS error type the caller would get from AWS (all HTTP 400).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

from enclave_common.errors import ShownError

ALGORITHM = "AWS4-HMAC-SHA256"
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
    """The request is not correctly signed; ``error_type`` is what AWS answers (400)."""


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
            raise SignatureError(
                "IncompleteSignatureException",
                f"Authorization header requires the {ALGORITHM} algorithm.",
            )
        raise SignatureError(
            "IncompleteSignatureException",
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature'.",
        )
    credential, signed, signature = match.groups()
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or not re.fullmatch(r"\d{8}", parts[1]):
        raise SignatureError(
            "IncompleteSignatureException",
            "Credential must have the form <key id>/<YYYYMMDD>/<region>/<service>/aws4_request.",
        )
    headers = tuple(signed.split(";"))
    if any(h != h.lower() or not h for h in headers) or list(headers) != sorted(headers):
        raise SignatureError(
            "IncompleteSignatureException", "SignedHeaders must be sorted lower-case names."
        )
    return Authorization(parts[0], parts[1], parts[2], parts[3], headers, signature)


def _canonical_query(query: str) -> str:
    # Pairs as sent, sorted: what botocore signs (it takes an already-encoded query).
    # KMS itself never uses a query string.
    pairs = [item.partition("=")[::2] for item in query.split("&")] if query else []
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def canonical_request(request: Request, auth: Authorization) -> str:
    path, _, query = request.target.partition("?")
    headers = []
    for name in auth.signed_headers:
        value = request.headers.get(name)
        if value is None:
            raise SignatureError(
                "IncompleteSignatureException", f"signed header {name!r} is missing"
            )
        headers.append(f"{name}:{' '.join(value.split())}\n")
    payload_hash = hashlib.sha256(request.body).hexdigest()
    return "\n".join(
        [
            request.method,
            quote(path or "/", safe="/~"),
            _canonical_query(query),
            "".join(headers),
            ";".join(auth.signed_headers),
            payload_hash,
        ]
    )


def signing_key(secret_key: str, auth: Authorization) -> bytes:
    key = ("AWS4" + secret_key).encode()
    for part in (auth.date, auth.region, auth.service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def request_time(request: Request) -> datetime:
    value = request.headers.get("x-amz-date")
    if value is None:
        raise SignatureError(
            "IncompleteSignatureException", "the request must carry an X-Amz-Date header"
        )
    try:
        return datetime.strptime(value, _AMZ_DATE).replace(tzinfo=UTC)
    except ValueError as exc:
        raise SignatureError(
            "IncompleteSignatureException", "X-Amz-Date must have the form YYYYMMDDTHHMMSSZ"
        ) from exc


def check_signature(
    request: Request,
    *,
    service: str,
    region: str,
    secret_for: Callable[[str], str | None],
    now: datetime,
) -> Authorization:
    """Verify ``request``'s SigV4 signature; return its Authorization or raise SignatureError.

    ``secret_for(access_key_id)`` gives the secret key, or None for an unknown key id.
    """
    value = request.headers.get("authorization")
    if value is None:
        raise SignatureError("MissingAuthenticationTokenException", "Missing Authentication Token")
    auth = parse_authorization(value)
    when = request_time(request)
    if auth.date != when.strftime("%Y%m%d"):
        raise SignatureError(
            "InvalidSignatureException",
            f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
            f"from HTTP: '{auth.date}' != '{when:%Y%m%d}'",
        )
    if auth.service != service:
        raise SignatureError(
            "InvalidSignatureException",
            f"Credential should be scoped to correct service: '{service}'.",
        )
    if auth.region != region:
        raise SignatureError(
            "InvalidSignatureException",
            f"Credential should be scoped to a valid region, not '{auth.region}'.",
        )
    if "host" not in auth.signed_headers:
        raise SignatureError(
            "InvalidSignatureException", "'Host' must be a 'SignedHeader' in the AWS Authorization."
        )
    if "x-amz-date" not in auth.signed_headers:
        raise SignatureError(
            "InvalidSignatureException",
            "'X-Amz-Date' must be a 'SignedHeader' in the AWS Authorization.",
        )
    if abs(now - when) > MAX_CLOCK_SKEW:
        raise SignatureError(
            "InvalidSignatureException",
            f"Signature expired: {when:%Y%m%dT%H%M%SZ} is now earlier or later than "
            f"{now:%Y%m%dT%H%M%SZ} by more than 15 minutes.",
        )
    secret = secret_for(auth.access_key_id)
    if secret is None:
        raise SignatureError(
            "UnrecognizedClientException", "The security token included in the request is invalid."
        )
    string_to_sign = "\n".join(
        [
            ALGORITHM,
            request.headers["x-amz-date"],
            auth.scope,
            hashlib.sha256(canonical_request(request, auth).encode()).hexdigest(),
        ]
    )
    expected = hmac.new(
        signing_key(secret, auth), string_to_sign.encode(), hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest(expected, auth.signature):
        raise SignatureError("InvalidSignatureException", BAD_SIGNATURE_MESSAGE)
    return auth
