"""moto's Secrets Manager, SSM and S3, in process: the stores behind the stand-in.

moto is called through its own URL routing (each service's ``urls`` table, what its
in-process mock mode does), with the request the stand-in received: moto parses it,
validates it and shapes its answers and errors as AWS does. moto keeps one backend per
account (chosen per call by the ``x-moto-account-id`` header), so each account of the
stand-in has its own secrets, parameters and buckets; S3 bucket names are one
namespace across accounts, as on AWS. The stand-in decides who may touch what before
moto runs (stores.py); this module also reads the little it needs for that from
moto's backends (a bucket's owner, a parameter's tier and name).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from moto import backends
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.core.request import Request as MotoRequest
from moto.s3.models import s3_backends
from moto.ssm.utils import parameter_arn
from werkzeug.exceptions import HTTPException

from devtools.local_kms.backend import MotoBackendError

# Headers of a received request moto must not see: the driver removed the transfer
# encoding, and the Authorization is the stand-in's to check (moto gets a placeholder
# that names only the service and region).
_DROPPED = frozenset({"authorization", "content-length", "host", "transfer-encoding"})
# Headers of moto's answer that the HTTP driver or the stand-in's edge set themselves.
_HOP_BY_HOP = frozenset({"content-length", "transfer-encoding", "connection", "x-amzn-requestid"})

Handler = Callable[[Any, str, Any], Any]


@dataclass(frozen=True)
class MotoAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


def host_of(service: str, region: str) -> str:
    """The AWS host name moto routes ``service`` by."""
    return f"{service}.{region}.amazonaws.com"


@cache
def _routes(service: str) -> tuple[tuple[re.Pattern[str], Handler], ...]:
    backend_dict = backends.get_backend(service)  # type: ignore[call-overload]
    regions = backend_dict[DEFAULT_ACCOUNT_ID]
    backend = regions["us-east-1"] if "us-east-1" in regions else regions["aws"]
    return tuple((re.compile(url), handler) for url, handler in backend.urls.items())


class MotoStores:
    def __init__(self, region: str, accounts: Sequence[str]) -> None:
        self.region = region
        self.accounts = tuple(accounts)
        # moto's backends are plain dicts; the stand-in calls them from one thread at a
        # time, the lock only makes that assumption safe.
        self._lock = threading.Lock()

    def call(
        self,
        service: str,
        account: str,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> MotoAnswer:
        """moto's answer to a request of ``service`` in ``account``; MotoBackendError if
        moto itself breaks or has no route for it."""
        host = host_of(service, self.region)
        url = f"https://{host}{target}"
        clean = url.partition("?")[0]
        sent = {k: v for k, v in headers.items() if k not in _DROPPED}
        sent.update(
            {
                "Host": host,
                "x-moto-account-id": account,
                "Authorization": (
                    f"AWS4-HMAC-SHA256 Credential=LOCALSTORES/20000101/{self.region}/"
                    f"{service}/aws4_request, SignedHeaders=host, Signature=0"
                ),
            }
        )
        handler = next((h for pattern, h in _routes(service) if pattern.match(clean)), None)
        if handler is None:
            raise MotoBackendError(f"moto has no route for {method} {service}")
        with self._lock:
            try:
                request = MotoRequest.from_primitives(method, url, sent, body)
                try:
                    status, answer_headers, raw = handler(request, url, request.headers)
                except HTTPException as exc:  # moto's errors
                    status = exc.code or 500
                    answer_headers, raw = exc.get_headers(), exc.get_body()
            except Exception as exc:  # moto bugs and gaps surface as any exception type
                raise MotoBackendError(
                    f"moto failed on {method} {service}: {type(exc).__name__}"
                ) from exc
        items = answer_headers.items() if isinstance(answer_headers, Mapping) else answer_headers
        kept = [(str(k), str(v)) for k, v in items if str(k).lower() not in _HOP_BY_HOP]
        data = raw.encode() if isinstance(raw, str) else bytes(raw or b"")
        return MotoAnswer(int(status), kept, data)

    def bucket_owner(self, bucket: str) -> str | None:
        """The account that owns ``bucket``, or None if no account has it."""
        with self._lock:
            owner = s3_backends.bucket_accounts.get(bucket)
        return None if owner is None else owner[1]

    def _parameters(self, account: str) -> dict[str, list[Any]]:
        parameters: dict[str, list[Any]] = backends.get_backend("ssm")[account][
            self.region
        ]._parameters
        return parameters

    def parameter_tier(self, account: str, name: str) -> str | None:
        """The tier of the parameter ``name`` of ``account`` (None if there is none)."""
        with self._lock:
            versions = self._parameters(account).get(name)
            return str(versions[-1].tier) if versions else None

    def parameter_named_by(self, account: str, arn: str) -> str | None:
        """The name of ``account``'s parameter whose ARN is ``arn`` (None if none)."""
        with self._lock:
            names = [n for n, v in self._parameters(account).items() if v]
        return next((n for n in names if parameter_arn(account, self.region, n) == arn), None)
