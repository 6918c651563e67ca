"""What apps may ask the agent, and how answers look: pure, no I/O.

Rules of this file: it sees one complete HTTP request (method, target, headers,
body) and returns a typed route or raises ``AppProtocolError``; it shapes answers
into bytes. It does not know which socket the request came from nor who sent it
(``server`` checks callers), and it never talks to KMS (``kms.KmsGateway`` does).

The app-facing protocol (docs/agent.md, "The app socket"):

- ``POST /`` with ``X-Amz-Target: TrentService.<Op>``: the KMS JSON 1.1 protocol, so
  an SDK pointed at the agent works unchanged. The agent adds ``Recipient`` itself,
  so a request that already carries one is refused.
- ``POST /v1/attestation`` with JSON ``{"nonce", "user_data", "public_key"}``
  (base64, each optional, at most 1024 bytes decoded): the raw attestation document.
- ``GET /v1/secrets/<name>``: a named secret from the configuration, raw bytes, with
  the version served in ``X-Secret-Version``; ``?after=VERSION&wait=SECONDS`` holds the
  request until a version other than VERSION is served or the wait ends
  (``MAX_SECRET_WAIT`` at most).
- ``GET /healthz``.

The encryption context key ``enclave-kms:secret`` is the agent's own (it binds sealed
secrets to their names): a KMS call that carries it in any encryption context is
refused. Why: Decrypt or GenerateDataKey under it would give an app data keys for any
secret name, and once disclosed they would let the parent forge that secret's envelope.

Errors are KMS's JSON error shape ``{"__type": ..., "message": ...}`` with content
type ``application/x-amz-json-1.1``, which botocore turns into the usual
``ClientError`` / ``client.exceptions.<Type>`` for apps on the TCP listener.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from enclave_agent.runtime.config import SECRET_NAME
from enclave_agent.runtime.kms_operations import OPERATION_TABLE
from enclave_agent.runtime.sealed import CONTEXT_KEY
from enclave_agent.runtime.store_protocol import MAX_VERSION
from enclave_common.errors import ShownError

KMS_CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_PREFIX = "TrentService."
ATTESTATION_FIELDS = ("nonce", "user_data", "public_key")
MAX_ATTESTATION_FIELD = 1024  # the NSM's limit on each of user_data, nonce, public_key
MAX_SECRET_WAIT = 300.0  # seconds a GET /v1/secrets/NAME?after=...&wait=... may be held
VERSION_HEADER = "X-Secret-Version"


class AppProtocolError(ShownError):
    """A request the agent will not serve, already in KMS's error vocabulary."""


@dataclass(frozen=True)
class KmsCall:
    operation: str
    request: dict[str, Any]


@dataclass(frozen=True)
class AttestationCall:
    nonce: bytes | None
    user_data: bytes | None
    public_key: bytes | None


@dataclass(frozen=True)
class SecretCall:
    name: str
    after: str | None = None  # answer once a version other than this is served
    wait: float = 0.0  # seconds to hold the request for that (with ``after``)


@dataclass(frozen=True)
class HealthCall:
    pass


@dataclass(frozen=True)
class MetricsCall:
    pass


Route = KmsCall | AttestationCall | SecretCall | HealthCall | MetricsCall


@dataclass(frozen=True)
class AppResponse:
    status: int
    content_type: str
    body: bytes
    headers: Sequence[tuple[str, str]] = ()


# The routes above, named to whoever asks for another (the agent's README it once
# pointed to is docs/agent.md now, and not in the image).
UNKNOWN_PATH = (
    "unknown path: the agent serves POST / (KMS, X-Amz-Target), POST /v1/attestation, "
    "GET /v1/secrets/NAME, GET /healthz and GET /metrics"
)


def route_request(method: str, target: str, headers: Mapping[str, str], body: bytes) -> Route:
    """Decide what a complete request asks for. ``headers`` keys are lower-case."""
    path = target.split("?", 1)[0]
    if path == "/healthz":
        _require_method(method, "GET", path)
        return HealthCall()
    if path == "/metrics":
        _require_method(method, "GET", path)
        return MetricsCall()
    if path.startswith("/v1/secrets/"):
        _require_method(method, "GET", path)
        name = path[len("/v1/secrets/") :]
        if not SECRET_NAME.match(name):
            raise AppProtocolError(
                "ValidationException", "secret names are 1-128 of [A-Za-z0-9_.-]"
            )
        return _secret(name, target.partition("?")[2])
    if path == "/v1/attestation":
        _require_method(method, "POST", path)
        return _attestation(body)
    if path == "/":
        _require_method(method, "POST", path)
        return _kms(headers, body)
    raise AppProtocolError("NotFoundException", UNKNOWN_PATH, 404)


def _secret(name: str, query: str) -> SecretCall:
    """``after`` and ``wait`` from the query string, each at most once."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise AppProtocolError("ValidationException", "malformed query string") from None
    names = [key for key, _ in pairs]
    unknown = sorted(set(names) - {"after", "wait"})
    if unknown or len(set(names)) != len(names):
        raise AppProtocolError(
            "ValidationException",
            "a secret's query takes after=VERSION and wait=SECONDS, each at most once",
        )
    values = dict(pairs)
    after = values.get("after")
    if after is not None and not 1 <= len(after) <= MAX_VERSION:
        raise AppProtocolError("ValidationException", f"after is 1 to {MAX_VERSION} characters")
    if "wait" not in values:
        return SecretCall(name, after)
    if after is None:
        raise AppProtocolError(
            "ValidationException", "wait needs after=VERSION: the version to wait past"
        )
    try:
        wait = float(values["wait"])
    except ValueError:
        wait = math.nan
    if not 0 <= wait <= MAX_SECRET_WAIT:  # nan fails too
        raise AppProtocolError(
            "ValidationException", f"wait is a number of seconds from 0 to {MAX_SECRET_WAIT:g}"
        )
    return SecretCall(name, after, wait)


def _require_method(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise AppProtocolError(
            "MethodNotAllowedException", f"{path} accepts {allowed} only, not {method}", 405
        )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body.decode("utf-8")) if body.strip() else {}
    # RecursionError: nesting deeper than the interpreter's stack (e.g. 50,000 "["),
    # which json raises instead of ValueError.
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AppProtocolError("SerializationException", "the body is not valid JSON") from exc
    if not isinstance(value, dict):
        raise AppProtocolError("SerializationException", "the body must be a JSON object")
    return value


def _kms(headers: Mapping[str, str], body: bytes) -> KmsCall:
    target = headers.get("x-amz-target")
    if target is None:
        raise AppProtocolError("UnknownOperationException", "missing X-Amz-Target header")
    service, _, operation = target.partition(".")
    if f"{service}." != TARGET_PREFIX or operation not in OPERATION_TABLE:
        raise AppProtocolError(
            "UnknownOperationException",
            f"the agent serves {', '.join(sorted(OPERATION_TABLE))} only (X-Amz-Target "
            f"{TARGET_PREFIX}<Operation>)",
        )
    content_type = headers.get("content-type", KMS_CONTENT_TYPE).split(";")[0].strip()
    if content_type not in (KMS_CONTENT_TYPE, "application/json"):
        raise AppProtocolError("SerializationException", f"content type must be {KMS_CONTENT_TYPE}")
    request = _json_object(body)
    if "Recipient" in request:
        raise AppProtocolError(
            "ValidationException", "do not send Recipient: the agent attests and adds it itself"
        )
    for member, context in request.items():
        # EncryptionContext, and ReEncrypt's Source- and DestinationEncryptionContext.
        reserved = isinstance(context, dict) and CONTEXT_KEY in context
        if member.endswith("EncryptionContext") and reserved:
            raise AppProtocolError(
                "ValidationException",
                f"{member}: the key {CONTEXT_KEY!r} is reserved for the agent's named "
                "secrets; apps may not use it (docs/secrets.md)",
            )
    return KmsCall(operation, request)


def _attestation(body: bytes) -> AttestationCall:
    request = _json_object(body)
    unknown = sorted(set(request) - set(ATTESTATION_FIELDS))
    if unknown:
        raise AppProtocolError("ValidationException", f"unknown fields: {', '.join(unknown)}")
    values: dict[str, bytes | None] = {}
    for name in ATTESTATION_FIELDS:
        item = request.get(name)
        if item is None:
            values[name] = None
            continue
        if not isinstance(item, str):
            raise AppProtocolError("ValidationException", f"{name} must be a base64 string")
        try:
            raw = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise AppProtocolError("ValidationException", f"{name} is not valid base64") from exc
        if len(raw) > MAX_ATTESTATION_FIELD:
            raise AppProtocolError(
                "ValidationException", f"{name} is longer than {MAX_ATTESTATION_FIELD} bytes"
            )
        values[name] = raw
    return AttestationCall(values["nonce"], values["user_data"], values["public_key"])


def kms_response(answer: Mapping[str, Any]) -> AppResponse:
    return AppResponse(200, KMS_CONTENT_TYPE, json.dumps(answer).encode())


def error_response(error_type: str, message: str, status: int) -> AppResponse:
    body = json.dumps({"__type": error_type, "message": message}).encode()
    return AppResponse(status, KMS_CONTENT_TYPE, body)


def bytes_response(data: bytes, headers: Sequence[tuple[str, str]] = ()) -> AppResponse:
    return AppResponse(200, "application/octet-stream", data, headers)


def secret_response(value: bytes, version: str) -> AppResponse:
    return bytes_response(value, [(VERSION_HEADER, version)])


def json_response(value: Mapping[str, Any], status: int = 200) -> AppResponse:
    return AppResponse(status, "application/json", json.dumps(value).encode())
