"""Reading a sealed secret from its store: the request, and the answer read (pure, no I/O).

Rules of this module: it builds the one read request of each store and reads the
store's answer into a ``StoredSecret`` (the sealed bytes and the version the store
reports), a ``StoreFailure`` (the store's own error answer, a normal outcome) or a
``StoreAnswerError`` (an answer that cannot be used, saying why). It never signs,
sends or decrypts (``stores`` and ``secrets`` do), and it holds no value: sealed
bytes are ciphertext, opened only by KMS with the secret's name.

The reads (AWS API references: Secrets Manager GetSecretValue, SSM GetParameter,
S3 GetObject):

- Secrets Manager: ``POST /``, JSON 1.1, ``X-Amz-Target: secretsmanager.GetSecretValue``,
  ``{"SecretId": ARN}`` → ``{"ARN", "VersionId", "SecretBinary": base64, ...}``.
- SSM: ``POST /``, JSON 1.1, ``X-Amz-Target: AmazonSSM.GetParameter``,
  ``{"Name": ARN, "WithDecryption": false}`` → ``{"Parameter": {"ARN", "Type": "String",
  "Value": the sealed bytes in base64, "Version": n, ...}}``.
- S3: ``GET /BUCKET/KEY`` (path-style) with ``x-amz-expected-bucket-owner`` → the body;
  its version is ``x-amz-version-id`` (a versioned bucket) or else the ``ETag``.

What an answer must be before its bytes go anywhere: the ARN it names is exactly the
configured one (Secrets Manager's random suffix included): the parent chooses the
credentials, and with them which account answers; the sealed bytes are 1 to
``MAX_SEALED_BYTES``; the version is 1 to ``MAX_VERSION`` visible characters (it goes
into ``X-Secret-Version``). Every answer body is bounded before it is read
(``MAX_ANSWER``, per store), JSON objects that repeat a member are refused, and
whatever else the bytes are gives ``StoreAnswerError``, never another exception.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from enclave_agent.runtime.kms_protocol import read_failure
from enclave_agent.runtime.sealed import MAX_SEALED_BYTES
from enclave_agent.runtime.sigv4 import encode_path
from enclave_agent.runtime.store_location import (
    S3Location,
    SecretsManagerLocation,
    SsmLocation,
    StoreLocation,
)

JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
EXPECTED_OWNER = "x-amz-expected-bucket-owner"
MAX_VERSION = 1024  # S3's version ids are at most 1024 bytes; the others' far less
# A JSON answer holds the sealed bytes in base64 and a few short members.
MAX_JSON_ANSWER = 4 * ((MAX_SEALED_BYTES + 2) // 3) + 16 * 1024
MAX_ERROR_ANSWER = 16 * 1024
# The most an answer's body may be, per store (the transport stops reading there).
MAX_ANSWER = {"secretsmanager": MAX_JSON_ANSWER, "ssm": MAX_JSON_ANSWER, "s3": MAX_SEALED_BYTES}
STORE_NAMES = {"secretsmanager": "Secrets Manager", "ssm": "SSM", "s3": "S3"}
_MAX_MESSAGE = 300
# Visible ASCII without '"' and ',': safe in a header value, never split by a reader.
_VERSION = re.compile(rf"[!#-+\--~]{{1,{MAX_VERSION}}}")
_EXPIRED = frozenset({"ExpiredToken", "ExpiredTokenException"})
_S3_RETRYABLE = frozenset({"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"})


class StoreAnswerError(ValueError):
    """The store's answer cannot be used; the message says why (never its bytes)."""


@dataclass(frozen=True)
class StoreRequest:
    service: str  # the endpoint's service, and SigV4's
    operation: str  # the API's name for it, for messages
    method: str
    path: str  # canonical percent-encoding, as sent and signed
    headers: tuple[tuple[str, str], ...]  # signed, besides Host and the signer's own
    body: bytes


@dataclass(frozen=True, repr=False)
class StoredSecret:
    """What the store holds for the secret now: sealed bytes and their version."""

    version: str
    sealed: bytes

    def __repr__(self) -> str:
        return f"StoredSecret(version={self.version!r}, sealed=<{len(self.sealed)} bytes>)"


@dataclass(frozen=True)
class StoreFailure:
    """The store's error answer."""

    error_type: str
    message: str
    status: int
    retryable: bool  # 5xx or throttling: the same read may succeed later
    expired_token: bool  # the credentials expired: fetch new ones, once


def service_of(location: StoreLocation) -> str:
    """The store's service name: its endpoint prefix and SigV4 service."""
    if isinstance(location, SecretsManagerLocation):
        return "secretsmanager"
    if isinstance(location, SsmLocation):
        return "ssm"
    return "s3"


def read_request(location: StoreLocation, bucket_owner: str | None = None) -> StoreRequest:
    """The read of the sealed secret at ``location`` (``bucket_owner``: S3's, required)."""
    if isinstance(location, SecretsManagerLocation):
        return _json_request(
            "secretsmanager", "secretsmanager", "GetSecretValue", {"SecretId": location.secret_id}
        )
    if isinstance(location, SsmLocation):
        body = {"Name": _ssm_arn(location), "WithDecryption": False}
        return _json_request("ssm", "AmazonSSM", "GetParameter", body)
    if bucket_owner is None:
        raise ValueError("an S3 read needs the bucket's expected owner")
    return StoreRequest(
        service="s3",
        operation="GetObject",
        method="GET",
        path=encode_path(f"/{location.bucket}/{location.key}"),
        headers=((EXPECTED_OWNER, bucket_owner),),
        body=b"",
    )


def _ssm_arn(location: SsmLocation) -> str:
    if location.arn is None:  # require_pinned lets none through
        raise ValueError("the agent reads an SSM parameter by its ARN only")
    return str(location.arn)


def _json_request(service: str, prefix: str, operation: str, body: dict[str, Any]) -> StoreRequest:
    return StoreRequest(
        service=service,
        operation=operation,
        method="POST",
        path="/",
        headers=(("Content-Type", JSON_CONTENT_TYPE), ("X-Amz-Target", f"{prefix}.{operation}")),
        body=json.dumps(body, separators=(",", ":")).encode(),
    )


def read_answer(
    location: StoreLocation, status: int, headers: Sequence[tuple[str, str]], body: bytes
) -> StoredSecret | StoreFailure:
    """The store's answer to ``read_request(location)``; StoreAnswerError if unusable."""
    if status != 200:
        if isinstance(location, S3Location):
            return _s3_failure(status, body)
        return _failure(status, headers, body)
    if isinstance(location, SecretsManagerLocation):
        return _secrets_manager(location, body)
    if isinstance(location, SsmLocation):
        return _ssm(location, body)
    return _s3(headers, body)


# --- each store's answer ------------------------------------------------------------


def _secrets_manager(location: SecretsManagerLocation, body: bytes) -> StoredSecret:
    document = _json_object(body, "Secrets Manager")
    _same_arn(document.get("ARN"), location.secret_id, "Secrets Manager")
    if document.get("SecretBinary") is None:
        held = "a SecretString" if document.get("SecretString") is not None else "no value"
        raise StoreAnswerError(
            f"the secret holds {held}, not SecretBinary: it was not written by enclave-agent seal"
        )
    sealed = _sealed_base64(document["SecretBinary"], "SecretBinary")
    return StoredSecret(_version(document.get("VersionId"), "VersionId"), sealed)


def _ssm(location: SsmLocation, body: bytes) -> StoredSecret:
    parameter = _json_object(body, "SSM").get("Parameter")
    if not isinstance(parameter, dict):
        raise StoreAnswerError("SSM answered without a Parameter object")
    _same_arn(parameter.get("ARN"), _ssm_arn(location), "SSM")
    if parameter.get("Type") != "String":
        raise StoreAnswerError(
            f"the parameter's type is {_shown(parameter.get('Type'))}, not String: it was "
            "not written by enclave-agent seal"
        )
    version = parameter.get("Version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StoreAnswerError("SSM answered without a positive integer Version")
    return StoredSecret(str(version), _sealed_base64(parameter.get("Value"), "Value"))


def _s3(headers: Sequence[tuple[str, str]], body: bytes) -> StoredSecret:
    if not body:
        raise StoreAnswerError("the S3 object is empty")
    if len(body) > MAX_SEALED_BYTES:
        raise StoreAnswerError(f"the S3 object is over {MAX_SEALED_BYTES} bytes")
    version_id = _header(headers, "x-amz-version-id")
    if version_id is not None and version_id != "null":  # "null": versioning suspended
        return StoredSecret(_version(version_id, "x-amz-version-id"), body)
    etag = _header(headers, "etag")
    if etag is None:
        raise StoreAnswerError("S3 answered without x-amz-version-id or ETag")
    return StoredSecret(_version(etag.strip().strip('"'), "ETag"), body)


# --- failures -----------------------------------------------------------------------


def _failure(status: int, headers: Sequence[tuple[str, str]], body: bytes) -> StoreFailure:
    """A JSON 1.1 error answer (Secrets Manager, SSM): the shape KMS's has."""
    failure = read_failure(status, headers, body)
    return StoreFailure(
        failure.error_type[:_MAX_MESSAGE],
        _short(failure.message),
        status,
        retryable=failure.retryable,
        expired_token=failure.expired_token,
    )


def _s3_failure(status: int, body: bytes) -> StoreFailure:
    """S3's XML error document: ``<Error><Code>…</Code><Message>…</Message>…``."""
    text = body[:MAX_ERROR_ANSWER].decode("utf-8", "replace")
    code = _element(text, "Code") or ("InternalError" if status >= 500 else f"HTTP{status}")
    message = _element(text, "Message") or f"S3 answered HTTP {status}"
    return StoreFailure(
        code,
        message,
        status,
        retryable=status >= 500 or code in _S3_RETRYABLE,
        expired_token=code in _EXPIRED,
    )


def _element(text: str, name: str) -> str | None:
    match = re.search(rf"<{name}>([^<]{{0,{4 * _MAX_MESSAGE}}})</{name}>", text)
    return _short(match.group(1)) if match and match.group(1) else None


# --- the parts ----------------------------------------------------------------------


def _json_object(body: bytes, store: str) -> dict[str, Any]:
    if len(body) > MAX_JSON_ANSWER:
        raise StoreAnswerError(f"{store}'s answer is over {MAX_JSON_ANSWER} bytes")
    try:
        document = json.loads(body, object_pairs_hook=_unique_members)
    except _RepeatedMember:
        raise StoreAnswerError(f"{store} answered a JSON object that repeats a member") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise StoreAnswerError(f"{store}'s answer is not JSON") from None
    if not isinstance(document, dict):
        raise StoreAnswerError(f"{store}'s answer is not a JSON object")
    return document


class _RepeatedMember(ValueError):
    pass


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of repeated members: {"ARN": ours, "ARN": theirs} must not
    # mean whichever a reader happens to take.
    if len({name for name, _ in pairs}) != len(pairs):
        raise _RepeatedMember
    return dict(pairs)


def _same_arn(answered: Any, configured: str, store: str) -> None:
    if answered != configured:
        raise StoreAnswerError(
            f"{store} answered for {_shown(answered)}, not the configured {configured}: "
            "another account's or another secret's value is never opened"
        )


def _sealed_base64(value: Any, member: str) -> bytes:
    if not isinstance(value, str):
        raise StoreAnswerError(f"{member} is not a base64 string")
    if len(value) > 4 * ((MAX_SEALED_BYTES + 2) // 3):
        raise StoreAnswerError(f"{member} is over {MAX_SEALED_BYTES} bytes")
    try:
        sealed = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise StoreAnswerError(f"{member} is not valid base64") from None
    if not sealed:
        raise StoreAnswerError(f"{member} is empty")
    return sealed


def _version(value: Any, member: str) -> str:
    if not isinstance(value, str) or not _VERSION.fullmatch(value):
        raise StoreAnswerError(
            f"{member} is not a version (1 to {MAX_VERSION} visible characters, no quote or comma)"
        )
    return value


def _header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    return next((value for key, value in headers if key.lower() == name), None)


def _shown(value: Any) -> str:
    """A value from the answer as a message may quote it: printable, cut short."""
    return _short(repr(value))


def _short(text: str) -> str:
    printable = "".join(c for c in text if c.isprintable())
    return printable if len(printable) <= _MAX_MESSAGE else printable[:_MAX_MESSAGE] + "..."
