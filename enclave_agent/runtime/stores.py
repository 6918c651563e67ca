"""The secret stores, read through the parent's proxy: one signed read per call (an edge).

``StoreReader.read(name, location, bucket_owner)`` builds the store's read
(``store_protocol``), signs it with SigV4 for that store's service with the proxy's
credentials (the KMS gateway's provider and signing-key cache: one of each in the
agent), sends it on that store's own pool (``transport.ConnectionPool``: CONNECT, TLS
inside the tunnel checked against the CA bundle, as for KMS) and reads the answer:
the sealed bytes and their version, after the ARN the store names was checked
against the configured one. Nothing here decrypts (``secrets`` does, with KMS).

One read per call, within ``timeout`` (a slow or endless answer is cut there), plus
one more with fresh credentials when the store says the token expired; the pool
itself retries a kept-alive connection the store had closed. Every other failure is
a ``StoreError`` saying what broke and whether trying again may help: the caller
retries with backoff. One ``store_read`` event per read (the store, its outcome, the
version: never a byte of the answer).
"""

from __future__ import annotations

from collections.abc import Mapping

import trio

from enclave_agent.runtime import sigv4
from enclave_agent.runtime.credentials import Credentials, CredentialsError, CredentialsProvider
from enclave_agent.runtime.store_location import StoreLocation
from enclave_agent.runtime.store_protocol import (
    MAX_ANSWER,
    STORE_NAMES,
    StoreAnswerError,
    StoredSecret,
    StoreFailure,
    StoreRequest,
    read_answer,
    read_request,
    service_of,
)
from enclave_agent.runtime.transport import (
    ConnectionPool,
    TransportError,
    https_host_port,
    make_ssl_context,
)
from enclave_common.address import Address
from enclave_common.logs import get_logger

POOL_SIZE = 4  # kept-alive connections to each store: reads are few and small

_log = get_logger()


class StoreError(Exception):
    """A read of a store did not give the sealed secret; ``retryable``: it may later."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class StoreReader:
    def __init__(
        self,
        *,
        region: str,
        proxy: Address,
        endpoints: Mapping[str, str],
        ca_bundle: str | None,
        credentials: CredentialsProvider,
        keys: sigv4.SigningKeyCache,
        timeout: float,
    ) -> None:
        """``endpoints``: ``https://HOST[:PORT]`` of each store, by service name."""
        context = make_ssl_context(ca_bundle)
        self._pools: dict[str, ConnectionPool] = {}
        for service, endpoint in endpoints.items():
            host, port = https_host_port(endpoint, STORE_NAMES[service])
            self._pools[service] = ConnectionPool(
                proxy,
                host,
                port,
                context,
                label=STORE_NAMES[service],
                pool_size=POOL_SIZE,
                max_response_bytes=MAX_ANSWER[service],
            )
        self._region = region
        self._credentials = credentials
        self._keys = keys
        self._timeout = timeout

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()

    async def read(
        self, name: str, location: StoreLocation, bucket_owner: str | None
    ) -> StoredSecret:
        """What the store holds for the secret ``name`` now; StoreError if not that."""
        request = read_request(location, bucket_owner)
        store = STORE_NAMES[service_of(location)]
        started = trio.current_time()
        outcome: dict[str, object] = {"outcome": "cancelled"}
        try:
            with trio.move_on_after(self._timeout):
                stored = await self._read(location, request)
                outcome = {"outcome": "ok", "version": stored.version}
                return stored
            raise StoreError(
                f"{store} {request.operation} did not complete within {self._timeout:g} s",
                retryable=True,
            )
        except StoreError as exc:
            outcome = {"outcome": "error", "reason": exc.message}
            raise
        finally:
            (_log.info if outcome["outcome"] == "ok" else _log.warning)(
                "store_read",
                name=name,
                store=service_of(location),
                operation=request.operation,
                duration_ms=round((trio.current_time() - started) * 1000, 1),
                **outcome,
            )

    async def _read(self, location: StoreLocation, request: StoreRequest) -> StoredSecret:
        pool = self._pools[request.service]
        refreshed = False
        while True:
            creds = await self._current_credentials()
            try:
                response = await pool.request(
                    request.method, request.path, self._sign(pool, request, creds), request.body
                )
            except TransportError as exc:
                raise StoreError(exc.message, retryable=exc.retryable) from None
            try:
                answer = read_answer(location, response.status, response.headers, response.body)
            except StoreAnswerError as exc:
                message = f"{pool.label} {request.operation}: {exc}"
                raise StoreError(message, retryable=False) from None
            if isinstance(answer, StoredSecret):
                return answer
            if answer.expired_token and not refreshed:
                refreshed = True  # once: a second expiry is the store's answer
                await self._fresh_credentials(creds)
                continue
            raise _refused(pool.label, request.operation, answer)

    async def _current_credentials(self) -> Credentials:
        try:
            return await self._credentials.get()
        except CredentialsError as exc:
            raise StoreError(exc.message, retryable=exc.retryable) from None

    async def _fresh_credentials(self, stale: Credentials) -> None:
        try:
            await self._credentials.refresh_after_expired(stale)
        except CredentialsError as exc:
            raise StoreError(exc.message, retryable=exc.retryable) from None

    def _sign(
        self, pool: ConnectionPool, request: StoreRequest, creds: Credentials
    ) -> list[tuple[str, str]]:
        try:
            return pool.signed_headers(
                request.method,
                request.path,
                request.headers,
                request.body,
                service=request.service,
                region=self._region,
                credentials=creds,
                keys=self._keys,
            )
        except sigv4.SigningError as exc:
            raise StoreError(str(exc), retryable=False) from None


def _refused(store: str, operation: str, failure: StoreFailure) -> StoreError:
    return StoreError(
        f"{store} {operation}: {failure.error_type}: {failure.message}",
        retryable=failure.retryable,
    )
