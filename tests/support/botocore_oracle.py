"""botocore as the oracle for request shapes and signatures (no network).

- ``botocore_sends``: the request a real botocore client sends for an operation,
  stopped before it leaves, signed at a pinned instant (``botocore_clock``).
- ``Creds``: credentials of the shape our signer takes (``sigv4.SigningCredentials``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from unittest import mock

import botocore.auth
import botocore.session
import pytest
from botocore.config import Config

AT = datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC)  # one second before the date changes


@dataclass(frozen=True)
class Creds:
    access_key_id: str = "AKIAEXAMPLEEXAMPLE00"
    secret_access_key: str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    token: str | None = "IQoJb3JpZ2luX2VjEXAMPLE//session+token=="


@contextmanager
def botocore_clock(instant: datetime) -> Iterator[None]:
    """botocore signs at its own clock's time; pin it (the oracle's clock, not ours)."""
    naive = instant.astimezone(UTC).replace(tzinfo=None)
    with mock.patch.object(botocore.auth, "get_current_datetime", lambda: naive):
        yield


def text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Sent(Exception):
    def __init__(self, request: Any) -> None:
        self.request = request


def botocore_sends(
    service: str,
    operation: str,
    args: dict[str, Any],
    creds: Creds,
    region: str = "eu-west-1",
    *,
    instant: datetime = AT,
) -> Any:
    """The request a real botocore client sends for ``operation`` (stopped before the wire)."""

    def stop(request: Any, **_: Any) -> None:
        raise _Sent(request)

    client = botocore.session.get_session().create_client(
        service,  # type: ignore[call-overload]
        region_name=region,
        aws_access_key_id=creds.access_key_id,
        aws_secret_access_key=creds.secret_access_key,
        aws_session_token=creds.token,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 0}),
    )
    client.meta.events.register("before-send", stop)
    with botocore_clock(instant), pytest.raises(_Sent) as sent:
        getattr(client, operation)(**args)
    return sent.value.request
