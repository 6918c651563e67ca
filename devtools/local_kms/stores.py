"""The stand-in's Secrets Manager, SSM and S3: one call, from received request to answer.

Each store has its own endpoint, so a request's service is the endpoint it reached,
and its SigV4 credential scope must name that service (a signature made for KMS is
refused by SSM, as on AWS). Order, as for KMS: protocol checks → SigV4 (and session
token), which says who calls → the resources the call names, checked against the
caller's account → moto, in the caller's account.

Across accounts (no resource policies, bucket policies or RAM shares are modelled):
- Secrets Manager and SSM: a name is looked up in the caller's account; an ARN of
  another account, or of another region, is AccessDeniedException (moto would look
  its name up in the caller's account: the very confusion the agent's ARN check is
  there to catch, so the stand-in must not commit it).
- S3: bucket names are one namespace; a bucket of another account is 403 AccessDenied
  (creating one is moto's 409 BucketAlreadyExists), and a request whose
  ``x-amz-expected-bucket-owner`` is not the bucket's owner is 403 AccessDenied
  whoever asks, as S3 answers (moto ignores that header).
Sizes moto does not check: an SSM value is at most 4096 characters in the Standard
tier and 8192 in the Advanced tier; Secrets Manager's 65536-byte SecretBinary is
checked with botocore's model (shapes.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import unquote
from xml.sax.saxutils import escape

from moto.core.utils import camelcase_to_underscores
from moto.secretsmanager.responses import SecretsManagerResponse
from moto.ssm.responses import SimpleSystemManagerResponse

from devtools.local_kms.backend import MotoBackendError
from devtools.local_kms.credentials import CredentialStore
from devtools.local_kms.faults import ERRORS
from devtools.local_kms.policy import Caller
from devtools.local_kms.service import (
    Reply,
    ServiceError,
    error_reply,
    json_object,
    new_request_id,
    operation_of,
    target_operation,
)
from devtools.local_kms.shapes import check_request
from devtools.local_kms.sigv4 import Request, SignatureError
from devtools.local_kms.stores_backend import MotoAnswer, MotoStores
from enclave_agent.runtime.store_location import LocationError, parse_arn
from enclave_common.errors import ShownError

EXPECTED_OWNER = "x-amz-expected-bucket-owner"
SSM_STANDARD_LIMIT = 4096
SSM_ADVANCED_LIMIT = 8192
_S3_CONTENT_TYPE = "application/xml"


class JsonStore:
    """Secrets Manager or SSM: the JSON 1.1 protocol (``X-Amz-Target: PREFIX.Op``)."""

    # Request members that name the resource, per service: one name or ARN, or a list.
    _MEMBERS: Mapping[str, tuple[str, ...]] = {
        "secretsmanager": ("SecretId", "SecretIdList"),
        "ssm": ("Name", "Names"),
    }
    _PREFIXES: Mapping[str, str] = {"secretsmanager": "secretsmanager.", "ssm": "AmazonSSM."}
    _RESPONSES: Mapping[str, type] = {
        "secretsmanager": SecretsManagerResponse,
        "ssm": SimpleSystemManagerResponse,
    }

    def __init__(
        self, name: str, *, region: str, credentials: CredentialStore, moto: MotoStores
    ) -> None:
        self.name = name
        self.region = region
        self.credentials = credentials
        self.moto = moto

    def error(self, status: int, error_type: str, message: str, request: Request) -> Reply:
        return error_reply(status, error_type, message, operation_of(request))

    def handle(self, request: Request, now: datetime) -> Reply:
        operation: str | None = None
        try:
            operation = target_operation(request, self._PREFIXES[self.name], self.name)
            if not hasattr(self._RESPONSES[self.name], camelcase_to_underscores(operation)):
                raise ServiceError(
                    "UnsupportedOperationException",
                    f"the local stand-in does not implement {self.name} {operation}",
                    400,
                )
            caller = self.credentials.authenticate(
                request, service=self.name, region=self.region, now=now
            )
            body = check_request(operation, json_object(request), self.name)
            body = self._resources(operation, body, caller)
            if self.name == "ssm" and operation == "PutParameter":
                self._check_parameter_size(body, caller)
            answer = self.moto.call(
                self.name,
                caller.account,
                "POST",
                "/",
                request.headers,
                json.dumps(body).encode(),
            )
        except ShownError as exc:  # ServiceError, and the signature's and the shape's errors
            return error_reply(exc.status, exc.error_type, exc.message, operation)
        except MotoBackendError as exc:
            status, code = ERRORS[self.name]["internal"]
            return error_reply(status, code, str(exc), operation)
        error_type = answer.header("x-amzn-errortype") or (
            _json_error_type(answer.body) if answer.status >= 400 else None
        )
        headers = [("x-amzn-ErrorType", error_type)] if error_type else []
        return Reply(answer.status, answer.body, operation, error_type, headers)

    def _resources(self, operation: str, body: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """``body`` with each resource ARN of the caller's account and region replaced
        by what moto looks up; ServiceError for an ARN elsewhere or a malformed one."""
        for member in self._MEMBERS[self.name]:
            value = body.get(member)
            if isinstance(value, str):
                body[member] = self._resource(operation, value, caller)
            elif isinstance(value, list):
                body[member] = [
                    self._resource(operation, item, caller) if isinstance(item, str) else item
                    for item in value
                ]
        return body

    def _resource(self, operation: str, reference: str, caller: Caller) -> str:
        if not reference.startswith("arn:"):
            return reference
        if self.name == "ssm" and operation == "PutParameter":
            raise ServiceError(
                "ValidationException",
                "You can't enter the Amazon Resource Name (ARN) for a parameter, only the "
                "parameter name itself.",
                400,
            )
        try:
            arn = parse_arn(reference, self.name)
        except LocationError as exc:
            raise ServiceError("ValidationException", str(exc), 400) from exc
        if (arn.region, arn.account) != (self.region, caller.account):
            action = f"{self.name}:{operation}"
            raise ServiceError(
                "AccessDeniedException",
                f"User: {caller.arn} is not authorized to perform: {action} on resource: "
                f"{reference} because no resource-based policy allows the {action} action",
                400,
            )
        if self.name == "ssm":
            # moto finds its own parameters by ARN only for names that begin with "/".
            base, colon, selector = reference.rpartition(":")
            if not colon or "/" in selector:
                base, selector = reference, ""
            name = self.moto.parameter_named_by(caller.account, base)
            if name is not None:
                return name + (f":{selector}" if selector else "")
        return reference

    def _check_parameter_size(self, body: dict[str, Any], caller: Caller) -> None:
        value, tier = body.get("Value"), body.get("Tier")
        if not isinstance(value, str) or not isinstance(body.get("Name"), str):
            return  # moto answers the missing member
        existing = self.moto.parameter_tier(caller.account, body["Name"])
        size = len(value.encode())
        if tier == "Intelligent-Tiering":
            tier = "Advanced" if size > SSM_STANDARD_LIMIT else existing or "Standard"
            body["Tier"] = tier
        if existing == "Advanced" and tier == "Standard":
            raise ServiceError(
                "ValidationException",
                "This parameter uses the advanced-parameter tier. You can't downgrade a "
                "parameter from the advanced-parameter tier to the standard-parameter tier.",
                400,
            )
        effective = tier or existing or "Standard"
        limit = SSM_ADVANCED_LIMIT if effective == "Advanced" else SSM_STANDARD_LIMIT
        if size > limit:
            raise ServiceError(
                "ValidationException",
                f"{effective} tier parameters support a maximum parameter value of {limit} "
                "characters."
                + (
                    " To create a larger parameter value, upgrade the parameter to use the "
                    "advanced-parameter tier."
                    if effective == "Standard"
                    else ""
                ),
                400,
            )


def _json_error_type(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    value = document.get("__type") if isinstance(document, dict) else None
    return str(value).rpartition("#")[2] if value else None


class S3Store:
    """S3, path-style (``/BUCKET/KEY``): SigV4 with S3's rules, bucket ownership and
    the expected bucket owner checked here, everything else moto's."""

    name = "s3"

    def __init__(self, *, region: str, credentials: CredentialStore, moto: MotoStores) -> None:
        self.region = region
        self.credentials = credentials
        self.moto = moto

    def error(self, status: int, error_type: str, message: str, request: Request) -> Reply:
        return s3_error(status, error_type, message, _s3_operation(request))

    def handle(self, request: Request, now: datetime) -> Reply:
        operation = _s3_operation(request)
        try:
            caller = self.credentials.authenticate(
                request, service=self.name, region=self.region, now=now
            )
        except SignatureError as exc:
            status, code = exc.s3
            return s3_error(status, code, exc.message, operation)
        bucket = _bucket_of(request.target)
        if bucket:
            owner = self.moto.bucket_owner(bucket)
            creating = (
                request.method == "PUT" and operation == "bucket" and "?" not in request.target
            )
            expected = request.headers.get(EXPECTED_OWNER)
            if owner is not None and not creating and owner != caller.account:
                return s3_error(403, "AccessDenied", "Access Denied", operation)
            if owner is not None and expected is not None and expected != owner:
                return s3_error(403, "AccessDenied", "Access Denied", operation)
        try:
            answer = self.moto.call(
                self.name,
                caller.account,
                request.method,
                request.target,
                request.headers,
                request.body,
            )
        except MotoBackendError as exc:
            status, code = ERRORS[self.name]["internal"]
            return s3_error(status, code, str(exc), operation)
        return _s3_reply(answer, operation)


def _bucket_of(target: str) -> str:
    return unquote(target.partition("?")[0].lstrip("/").partition("/")[0])


def _s3_operation(request: Request) -> str:
    """What an S3 request is about, for logs: ``service``, ``bucket`` or ``object``."""
    path = request.target.partition("?")[0].lstrip("/")
    bucket, _, key = path.partition("/")
    return "object" if key else "bucket" if bucket else "service"


def s3_error(status: int, code: str, message: str, operation: str | None) -> Reply:
    """An S3 error answer: S3's XML error document."""
    request_id = new_request_id()
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<RequestId>{request_id}</RequestId></Error>"
    ).encode()
    return Reply(status, body, operation, code, [], _S3_CONTENT_TYPE)


def _s3_reply(answer: MotoAnswer, operation: str) -> Reply:
    error_type = None
    if answer.status >= 400:
        error_type = _xml_code(answer.body)
    content_type = answer.header("content-type") or _S3_CONTENT_TYPE
    headers = [(k, v) for k, v in answer.headers if k.lower() not in ("content-type",)]
    return Reply(answer.status, answer.body, operation, error_type, headers, content_type)


def _xml_code(body: bytes) -> str | None:
    start, end = body.find(b"<Code>"), body.find(b"</Code>")
    return body[start + 6 : end].decode(errors="replace") if 0 <= start < end else None


def build_stores(*, region: str, credentials: CredentialStore) -> list[JsonStore | S3Store]:
    """Secrets Manager, SSM and S3 for the credentials' accounts, moto behind them."""
    moto = MotoStores(region, credentials.accounts)
    return [
        JsonStore("secretsmanager", region=region, credentials=credentials, moto=moto),
        JsonStore("ssm", region=region, credentials=credentials, moto=moto),
        S3Store(region=region, credentials=credentials, moto=moto),
    ]
