"""Signed calls to the local KMS in process (``devtools.local_kms.service.LocalKms``),
no server: a request signed with botocore's SigV4, as an SDK sends it, and the answer."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from devtools.local_kms.service import LocalKms
from devtools.local_kms.sigv4 import Request

REGION = "us-east-1"


def signed(kms: LocalKms, operation: str, body: bytes) -> Request:
    cred = kms.credentials.long_term
    aws = AWSRequest(
        method="POST",
        url="https://127.0.0.1:1/",
        data=body,
        headers={
            "X-Amz-Target": f"TrentService.{operation}",
            "Content-Type": "application/x-amz-json-1.1",
        },
    )
    SigV4Auth(Credentials(cred.access_key_id, cred.secret_access_key), "kms", REGION).add_auth(aws)
    headers = {k.lower(): v for k, v in aws.prepare().headers.items()}
    headers["host"] = "127.0.0.1:1"
    return Request("POST", "/", headers, body)


def call(kms: LocalKms, operation: str, body: Any) -> tuple[int, dict[str, Any]]:
    """``body`` (JSON-encoded unless bytes) signed by the long-term credentials →
    (status, the answer's JSON object)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = kms.handle(signed(kms, operation, raw), datetime.now(UTC))
    answer = json.loads(reply.body)
    assert isinstance(answer, dict)
    return reply.status, answer
