"""AWS credentials for signing, fetched from the proxy's ``GET /v1/credentials``.

The parent holds the instance role's credentials anyway (docs/architecture.md, "The
trust boundary"), so the agent asks the proxy for them instead of keeping any of its
own. They are cached and refreshed lazily, ahead of ``Expiration``: five minutes
before, or halfway through the remaining lifetime for credentials that live less than
ten minutes. One refresh
runs at a time (single flight): callers that arrive meanwhile wait for its result
instead of each asking the proxy. When KMS says the token has expired anyway (clock
skew, revoked session), ``refresh_after_expired`` forces one new fetch.

A refresh that fails while the cached credentials are still valid keeps using them;
once they have expired, the failure is the caller's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from enclave_agent.runtime.single_flight import SingleFlight
from enclave_agent.runtime.transport import TransportError, http_get, proxy_error_reason
from enclave_common.address import Address

CREDENTIALS_PATH = "/v1/credentials"
# AWS documents access key ids up to 128 characters; session tokens have no stated
# maximum (a few KiB with session tags), so the token's bound is generous.
_CREDENTIAL_LIMITS = {"AccessKeyId": 128, "SecretAccessKey": 256, "Token": 16384}
_HEADER_SAFE = re.compile(r"[!-~]+")
REFRESH_MARGIN = timedelta(minutes=5)


class CredentialsError(Exception):
    """No usable credentials: the proxy is unreachable, refused, or answered badly."""

    def __init__(self, message: str, *, retryable: bool = True):
        super().__init__(message)
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True, repr=False, eq=False)
class Credentials:
    access_key_id: str
    secret_access_key: str
    token: str | None
    expiration: datetime | None  # aware, UTC; None: does not expire
    region: str | None = None
    fetched_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __repr__(self) -> str:  # never the keys or the token
        return f"Credentials(expiration={self.expiration}, region={self.region!r})"

    def refresh_at(self) -> datetime | None:
        if self.expiration is None:
            return None
        lifetime = self.expiration - self.fetched_at
        return self.expiration - min(REFRESH_MARGIN, max(lifetime / 2, timedelta(0)))


def _parse_expiration(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise CredentialsError("credentials from the proxy: Expiration must be a string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CredentialsError(
            f"credentials from the proxy: Expiration {value[:40]!r} is not ISO-8601"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # AWS timestamps are UTC
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        # 9999-12-31T23:59:59-01:00 is year 10000 in UTC: as malformed as any other.
        raise CredentialsError(
            f"credentials from the proxy: Expiration {value[:40]!r} is out of range"
        ) from None


def parse_credentials(body: bytes, *, now: datetime | None = None) -> Credentials:
    """The proxy's JSON answer (docs/proxy.md, "The proxy port")."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CredentialsError("credentials from the proxy are not JSON") from None
    if not isinstance(document, dict):
        raise CredentialsError("credentials from the proxy are not a JSON object")
    for name in ("AccessKeyId", "SecretAccessKey"):
        if not isinstance(document.get(name), str) or not document[name]:
            raise CredentialsError(f"credentials from the proxy lack {name}")
    token = document.get("Token")
    if token is not None and not isinstance(token, str):
        raise CredentialsError("credentials from the proxy: Token must be a string or null")
    # The proxy is untrusted: these go into HTTP headers, so anything but visible ASCII
    # (CR/LF, spaces, non-ASCII) or an absurd size is refused here, by name and without
    # quoting the value, instead of failing later in the HTTP layer.
    for name, limit in _CREDENTIAL_LIMITS.items():
        value = document.get(name)
        if value and (len(value) > limit or not _HEADER_SAFE.fullmatch(value)):
            raise CredentialsError(
                f"credentials from the proxy: {name} is not 1..{limit} visible ASCII characters"
            )
    region = document.get("Region")
    return Credentials(
        access_key_id=document["AccessKeyId"],
        secret_access_key=document["SecretAccessKey"],
        token=token or None,
        expiration=_parse_expiration(document.get("Expiration")),
        region=region if isinstance(region, str) else None,
        fetched_at=now or datetime.now(UTC),
    )


def proxy_fetcher(proxy: Address) -> Callable[[], Awaitable[Credentials]]:
    """Fetch credentials from the proxy at ``proxy``."""

    async def fetch() -> Credentials:
        try:
            response = await http_get(proxy, CREDENTIALS_PATH)
        except TransportError as exc:
            raise CredentialsError(f"credentials: {exc.message}", retryable=exc.retryable) from None
        if response.status != 200:
            reason = proxy_error_reason(response.body, response.reason)
            raise CredentialsError(
                f"proxy has no credentials for us: {response.status} {reason}",
                retryable=response.status >= 500,
            )
        return parse_credentials(response.body)

    return fetch


class CredentialsProvider:
    """Cached credentials with lazy, single-flight refresh."""

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Credentials]],
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._current: Credentials | None = None
        self._flight = SingleFlight(self._fetch_checked, shared=(CredentialsError,))
        self.fetches = 0  # how many times the proxy was asked (tests check single flight)

    def _usable(self, creds: Credentials) -> bool:
        return creds.expiration is None or self._clock() < creds.expiration

    def _fresh(self, creds: Credentials) -> bool:
        refresh_at = creds.refresh_at()
        return refresh_at is None or self._clock() < refresh_at

    async def get(self) -> Credentials:
        current = self._current
        if current is not None and self._fresh(current):
            return current
        try:
            return await self._refresh()
        except CredentialsError:
            current = self._current
            if current is not None and self._usable(current):
                return current  # refresh ahead of time failed; these still work
            raise

    async def refresh_after_expired(self, stale: Credentials) -> Credentials:
        """KMS said ``stale`` has expired: fetch new ones unless someone already has."""
        current = self._current
        if current is not None and current is not stale:
            return current
        return await self._refresh()

    async def _refresh(self) -> Credentials:
        return await self._flight.run()

    async def _fetch_checked(self) -> Credentials:
        self.fetches += 1
        fetched = await self._fetch()
        creds = Credentials(
            access_key_id=fetched.access_key_id,
            secret_access_key=fetched.secret_access_key,
            token=fetched.token,
            expiration=fetched.expiration,
            region=fetched.region,
            fetched_at=self._clock(),
        )
        if not self._usable(creds):
            raise CredentialsError(
                f"credentials from the proxy expired already at {creds.expiration}"
            )
        self._current = creds
        return creds
