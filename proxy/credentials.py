"""The parent's AWS credentials, handed to the enclave on ``GET /v1/credentials``.

botocore's own credential chain does the finding (environment, shared config and
credentials files including ``credential_process``, container provider, IMDSv2) and
the refreshing: its refreshable credentials re-fetch themselves when they come near
expiry, so calling ``get_frozen_credentials`` on every request is all it takes. With
``assume_role_arn`` the chain's credentials are only used to call STS AssumeRole, and
the narrower role's credentials are handed out instead, renewed 15 minutes before
they expire.

botocore is blocking (files, subprocesses, HTTP), so every call into it runs in
trio.to_thread; one lock keeps refreshes from running twice at the same time. Those
threads come from a limiter of their own: trio's default one is shared with
getaddrinfo, whose abandoned lookups may hold every token while DNS is down, and a DNS
outage must not also take the credentials away (nor a hung credential_process the DNS).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import botocore.exceptions
import botocore.session
import trio

from enclave_common.logs import get_logger

_RENEW_BEFORE = dt.timedelta(minutes=15)
# A failed renewal still hands out the cached role credentials while this much is left.
_STILL_USABLE = dt.timedelta(minutes=5)

log = get_logger()
_NEGATIVE_CACHE_SECONDS = 5.0
_ROLE_SESSION_NAME = "enclave-proxy"
# Calls into botocore are serialized by the lock; the spare tokens let a new lookup run
# while a few hung ones (abandoned after fetch_timeout) are still stuck in their threads.
_THREADS = 4


class CredentialsUnavailable(Exception):
    """No credentials can be handed out right now; the message says why (no secrets)."""


@dataclass(frozen=True)
class AwsCredentials:
    access_key_id: str
    secret_access_key: str
    token: str | None
    expiration: dt.datetime | None

    def to_json(self, region: str) -> dict[str, Any]:
        """The proxy port contract's shape."""
        expiration = None
        if self.expiration is not None:
            expiration = self.expiration.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Token": self.token,
            "Expiration": expiration,
            "Region": region,
        }

    def __repr__(self) -> str:
        # Keep secrets out of tracebacks and accidental log lines.
        return f"AwsCredentials(expiration={self.expiration!r})"


def _describe(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:300]


class CredentialSource:
    def __init__(
        self,
        *,
        region: str,
        assume_role_arn: str | None = None,
        sts_endpoint: str | None = None,
        session_factory: Callable[[], Any] = botocore.session.Session,
        fetch_timeout: float = 20.0,
    ) -> None:
        self.region = region
        self.fetch_timeout = fetch_timeout
        self.assume_role_arn = assume_role_arn
        self.sts_endpoint = sts_endpoint
        self._session_factory = session_factory
        self._session: Any = None
        self._base: Any = None  # botocore Credentials / RefreshableCredentials
        self._failed_until = 0.0
        self._failure = ""
        self._role: AwsCredentials | None = None
        self._lock = trio.Lock()
        self._threads = trio.CapacityLimiter(_THREADS)
        # For the metrics: the access key last handed out, since when, until when.
        self._handed: tuple[str, float, dt.datetime | None] | None = None

    async def get(self) -> AwsCredentials:
        # botocore has no timeout of its own for e.g. a hung credential_process: give up
        # on the request (the thread is abandoned) rather than hold every caller.
        try:
            with trio.fail_after(self.fetch_timeout):
                credentials = await self._get()
        except trio.TooSlowError:
            raise CredentialsUnavailable(
                f"credential lookup did not finish within {self.fetch_timeout:g} s"
            ) from None
        if self._handed is None or self._handed[0] != credentials.access_key_id:
            self._handed = (credentials.access_key_id, trio.current_time(), None)
        self._handed = (*self._handed[:2], credentials.expiration)
        return credentials

    def age(self) -> float | None:
        """Seconds since the access key handed out last was first handed out."""
        return None if self._handed is None else trio.current_time() - self._handed[1]

    def expires_in(self) -> float | None:
        """Seconds until the credentials handed out last expire (None: no expiry)."""
        if self._handed is None or self._handed[2] is None:
            return None
        return (self._handed[2] - dt.datetime.now(dt.UTC)).total_seconds()

    async def _get(self) -> AwsCredentials:
        async with self._lock:
            base = await self._base_credentials()
            if self.assume_role_arn is None:
                return await trio.to_thread.run_sync(
                    self._freeze, base, abandon_on_cancel=True, limiter=self._threads
                )
            now = dt.datetime.now(dt.UTC)
            role = self._role
            if role is None or role.expiration is None or role.expiration - now < _RENEW_BEFORE:
                try:
                    role = self._role = await trio.to_thread.run_sync(
                        self._assume_role, base, abandon_on_cancel=True, limiter=self._threads
                    )
                except CredentialsUnavailable as e:
                    # Renewal starts early; until the old ones are nearly spent, an STS
                    # hiccup is no reason to leave the enclave without credentials.
                    if role is None or role.expiration is None:
                        raise
                    if role.expiration - now < _STILL_USABLE:
                        raise
                    log.warning("assume_role_renewal_failed", reason=str(e), kept=True)
            return role

    async def _base_credentials(self) -> Any:
        if self._base is not None:
            return self._base
        if trio.current_time() < self._failed_until:
            raise CredentialsUnavailable(self._failure)
        try:
            self._base = await trio.to_thread.run_sync(
                self._resolve, abandon_on_cancel=True, limiter=self._threads
            )
        except CredentialsUnavailable as e:
            # Remember the failure briefly: each lookup may wait on IMDS timeouts.
            self._failure = str(e)
            self._failed_until = trio.current_time() + _NEGATIVE_CACHE_SECONDS
            raise
        return self._base

    def _resolve(self) -> Any:
        try:
            if self._session is None:
                self._session = self._session_factory()
            credentials = self._session.get_credentials()
        except botocore.exceptions.BotoCoreError as e:
            raise CredentialsUnavailable(f"credential chain failed: {_describe(e)}") from None
        if credentials is None:
            raise CredentialsUnavailable(
                "no AWS credentials found: botocore looked in the environment, the shared "
                "config and credentials files (incl. credential_process), the container "
                "provider and the instance metadata service (IMDSv2)"
            )
        return credentials

    def _freeze(self, base: Any) -> AwsCredentials:
        try:
            frozen = base.get_frozen_credentials()
        except botocore.exceptions.BotoCoreError as e:
            raise CredentialsUnavailable(f"credential refresh failed: {_describe(e)}") from None
        # botocore keeps the expiry of refreshable credentials only in this attribute;
        # static credentials (environment, plain profile) have none.
        expiry = getattr(base, "_expiry_time", None)
        return AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token, expiry)

    def _assume_role(self, base: Any) -> AwsCredentials:
        frozen = self._freeze(base)
        try:
            sts = self._session.create_client(
                "sts",
                region_name=self.region,
                endpoint_url=self.sts_endpoint,
                aws_access_key_id=frozen.access_key_id,
                aws_secret_access_key=frozen.secret_access_key,
                aws_session_token=frozen.token,
            )
            answer = sts.assume_role(
                RoleArn=self.assume_role_arn, RoleSessionName=_ROLE_SESSION_NAME
            )
        except botocore.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "unknown")
            raise CredentialsUnavailable(
                f"AssumeRole {self.assume_role_arn} failed: {code}"
            ) from None
        except botocore.exceptions.BotoCoreError as e:
            raise CredentialsUnavailable(
                f"AssumeRole {self.assume_role_arn} failed: {_describe(e)}"
            ) from None
        c = answer["Credentials"]
        expiration = c["Expiration"]
        if expiration.tzinfo is None:
            expiration = expiration.replace(tzinfo=dt.UTC)
        return AwsCredentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"], expiration)
