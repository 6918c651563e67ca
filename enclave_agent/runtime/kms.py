"""The agent's KMS client: one ``KmsGateway.call`` per app request, many at once.

Each call: validate the app's body → for a Recipient operation, an attestation
document carrying our public key (``documents``: one is reused for
``attestation_reuse`` seconds, bounded by its own certificate; a new one comes from
the NSM in a worker thread, as it is a blocking ioctl) and ``Recipient`` added →
SigV4 (``sigv4``) with the proxy's credentials → HTTPS through the proxy's CONNECT
tunnel on a pooled connection → KMS's answer read → ``CiphertextForRecipient``
opened with our private key → the answer KMS gives the same call without
``Recipient``. A pass-through operation (``kms_operations``: one that returns no
secret) is the same call without the document and the envelope. Before the envelope
is opened or a pass-through answer returned, every key the answer names must be one
of ``KmsSettings.trusted_keys`` (``kms_protocol`` checks it); a refusal of an
untrusted key is final, never retried.

Failures keep KMS's shape (``KmsError``: type, message, HTTP status) so an SDK on
the app side raises what it would raise against KMS. KMS's own errors pass through
unchanged; failures of our own path (proxy, TLS, NSM, envelope, deadline) get
KMS-style type names and a message naming the cause. Retries: throttling, 5xx and
broken connections, with full-jitter exponential backoff, all inside the call's
deadline; one extra try with new credentials when KMS says the token expired, and
one with a new attestation document when KMS refuses a call that carried a reused
one in a way that may mean the document (``KmsFailure.may_reject_document``).

No background tasks and no global lock: the pool, credentials and documents refresh
lazily, the pool's size bounds how many requests are on the wire at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from enclave_agent.runtime import kms_protocol, sigv4
from enclave_agent.runtime.backoff import full_jitter
from enclave_agent.runtime.credentials import (
    Credentials,
    CredentialsError,
    CredentialsProvider,
    proxy_fetcher,
)
from enclave_agent.runtime.documents import (
    DEFAULT_REUSE_SECONDS,
    AttestationDocuments,
    Lease,
)
from enclave_agent.runtime.kms_operations import OPERATION_TABLE
from enclave_agent.runtime.metrics import AgentMetrics
from enclave_agent.runtime.nsm import Attester, NsmError, request_attestation
from enclave_agent.runtime.transport import (
    ConnectionPool,
    TransportError,
    https_host_port,
    make_ssl_context,
)
from enclave_agent.runtime.trusted_keys import TrustedKeys
from enclave_common.address import DEFAULT_PROXY, Address
from enclave_common.aws import kms_host
from enclave_common.errors import ShownError
from enclave_common.logs import get_logger

_BACKOFF_BASE = 0.05  # seconds; full jitter: sleep uniform(0, min(cap, base * 2**n))
_BACKOFF_CAP = 2.0
_MAX_MESSAGE = 300  # error messages from elsewhere are cut, so nothing large is echoed

_log = get_logger()


class Recipient(Protocol):
    """What the gateway needs from our key (``enclave_agent.runtime.recipient.RecipientKey``)."""

    @property
    def public_key_der(self) -> bytes: ...

    def open(self, ciphertext_for_recipient: bytes) -> bytes: ...


@dataclass(frozen=True)
class KmsSettings:
    region: str
    proxy: Address = DEFAULT_PROXY
    endpoint: str | None = None  # "https://host[:port]"; default: the region's KMS
    ca_bundle: str | None = None  # PEM file; default certifi's bundle
    pool_size: int = 16  # most kept-alive TLS connections (and requests in flight)
    call_timeout: float = 10.0  # deadline per app call, retries included
    max_attempts: int = 4
    # Seconds one attestation document is reused (0: a fresh one per call); ``documents``.
    attestation_reuse: float = DEFAULT_REUSE_SECONDS
    # The keys whose answers may be opened; empty (the default): no key operation at all.
    trusted_keys: TrustedKeys = field(default_factory=TrustedKeys)


class KmsError(ShownError):
    """What the app gets from a KMS call, in KMS's error shape."""


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


def endpoint_host_port(settings: KmsSettings) -> tuple[str, int]:
    return https_host_port(settings.endpoint or f"https://{kms_host(settings.region)}", "KMS")


class _AttemptFailed(Exception):
    def __init__(
        self,
        error: KmsError,
        *,
        retryable: bool,
        expired: Credentials | None = None,
        rejected: Lease | None = None,
    ):
        super().__init__(str(error))
        self.error = error
        self.retryable = retryable
        self.expired = expired  # credentials KMS called expired
        self.rejected = rejected  # a reused attestation document KMS may have refused


def _on_the_way(message: str, *, retryable: bool) -> _AttemptFailed:
    """A failure before KMS could answer (credentials, signing, the connection): the
    app gets KMSInternalException, 502, with the message capped."""
    return _AttemptFailed(
        KmsError("KMSInternalException", _short(message), 502), retryable=retryable
    )


@dataclass
class _CallRecord:
    attempts: int = 0
    last_error: KmsError | None = None
    request_id: str | None = None  # KMS's x-amzn-RequestId of the last answer, for support


class KmsGateway:
    def __init__(
        self,
        settings: KmsSettings,
        nsm: Attester,
        recipient: Recipient,
        metrics: AgentMetrics | None = None,
    ) -> None:
        if settings.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if settings.call_timeout <= 0:
            raise ValueError("call_timeout must be positive")
        self._settings = settings
        self._nsm = nsm
        self._recipient = recipient
        host, port = endpoint_host_port(settings)
        self.pool = ConnectionPool(
            settings.proxy,
            host,
            port,
            make_ssl_context(settings.ca_bundle),
            label="KMS",
            pool_size=settings.pool_size,
        )
        self.credentials = CredentialsProvider(proxy_fetcher(settings.proxy))
        self.documents = AttestationDocuments(
            self._attestation, settings.attestation_reuse, shared=(KmsError,)
        )
        self.signing_keys = sigv4.SigningKeyCache()
        self.metrics = metrics or AgentMetrics()

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def call(self, operation: str, request: Mapping[str, Any]) -> dict[str, Any]:
        started = trio.current_time()
        record = _CallRecord()
        outcome: dict[str, Any] = {"outcome": "cancelled"}
        try:
            answer = await self._call(operation, request, record)
        except KmsError as exc:
            outcome = {"outcome": "error", "error_type": exc.error_type, "status": exc.status}
            # Capped: a validation message quotes names the app chose (member names,
            # context keys), and this event is shipped to the parent.
            outcome["reason"] = _short(exc.message)
            raise
        # A bug of ours must still reach the app in KMS's shape (``call`` raises KmsError
        # and nothing else). The log gets the class name only, as its text could quote
        # request data; the app not even that (no internals reach a client).
        except Exception as exc:
            name = type(exc).__name__
            outcome = {"outcome": "error", "error_type": "KMSInternalException", "bug": name}
            raise KmsError(
                "KMSInternalException", "internal error in the agent (its log names it)", 500
            ) from exc
        else:
            outcome = {"outcome": "ok"}
            return answer
        finally:
            seconds = trio.current_time() - started
            # One event per call; fields only, never a body, key or credential.
            (_log.info if outcome["outcome"] == "ok" else _log.warning)(
                "kms_call",
                operation=operation,
                attempts=record.attempts,
                request_id=record.request_id,
                duration_ms=round(seconds * 1000, 1),
                **outcome,
            )
            label = outcome.get("error_type", outcome["outcome"])
            self.metrics.kms_call(operation, label, seconds, record.attempts)

    async def _call(
        self, operation: str, request: Mapping[str, Any], record: _CallRecord
    ) -> dict[str, Any]:
        try:
            validated = kms_protocol.validate_request(
                operation, request, trusted=self._settings.trusted_keys
            )
        except kms_protocol.KmsProtocolError as exc:
            raise KmsError(exc.error_type, exc.message, exc.status) from None
        timeout = self._settings.call_timeout
        with trio.move_on_after(timeout):
            return await self._with_retries(validated, record)
        cause = f"; last error: {record.last_error.message}" if record.last_error else ""
        raise KmsError(
            "DependencyTimeoutException",
            f"KMS {operation} did not complete within {timeout:g} s "
            f"({record.attempts} attempt(s)){cause}",
            503,
        )

    async def _with_retries(
        self, validated: kms_protocol.ValidatedRequest, record: _CallRecord
    ) -> dict[str, Any]:
        refreshed_for_expiry = False
        refreshed_document = False
        failures = 0
        while True:
            record.attempts += 1
            try:
                return await self._attempt(validated, record)
            except _AttemptFailed as failed:
                record.last_error = failed.error
                if failed.expired is not None and not refreshed_for_expiry:
                    refreshed_for_expiry = True  # once only: a second expiry is an error
                    await self._refresh_expired(failed.expired)
                    continue
                if failed.rejected is not None and not refreshed_document:
                    refreshed_document = True  # once only: the next one is fetched fresh
                    self._discard_document(failed.rejected, failed.error)
                    continue
                failures += 1
                if not failed.retryable or failures >= self._settings.max_attempts:
                    raise failed.error from None
                await trio.sleep(full_jitter(failures, base=_BACKOFF_BASE, cap=_BACKOFF_CAP))

    async def _refresh_expired(self, stale: Credentials) -> None:
        try:
            await self.credentials.refresh_after_expired(stale)
        except CredentialsError as exc:
            raise KmsError("ExpiredTokenException", _short(exc.message), 400) from None

    def _discard_document(self, rejected: Lease, error: KmsError) -> None:
        self.documents.discard(rejected)
        # What KMS answers to a document it will not take is undocumented: this event
        # is how the real behaviour gets known (error type only; its message names
        # principals and keys).
        _log.warning(
            "attestation_refreshed",
            reason="kms_refused_reused_document",
            error_type=error.error_type,
            status=error.status,
            document_age_s=round(self.documents.age(rejected), 1),
        )

    async def _credentials(self) -> Credentials:
        try:
            return await self.credentials.get()
        except CredentialsError as exc:
            raise _on_the_way(exc.message, retryable=exc.retryable) from None

    async def _attestation(self) -> bytes:
        try:
            # Cancellable: a hung ioctl cannot hold the call past its deadline.
            return await request_attestation(self._nsm, public_key=self._recipient.public_key_der)
        except NsmError as exc:
            raise KmsError("KMSInternalException", f"NSM error: {exc.error_name}", 500) from None

    def _sign(self, creds: Credentials, operation: str, body_sha256: str) -> list[tuple[str, str]]:
        headers = kms_protocol.request_headers(operation)
        try:
            return self.pool.signed_headers(
                "POST",
                "/",
                headers,
                body_sha256,
                service="kms",
                region=self._settings.region,
                credentials=creds,
                keys=self.signing_keys,
            )
        except sigv4.SigningError as exc:
            raise _on_the_way(str(exc), retryable=False) from None

    async def _attempt(
        self, validated: kms_protocol.ValidatedRequest, record: _CallRecord
    ) -> dict[str, Any]:
        operation = validated.operation
        creds = await self._credentials()
        recipient = OPERATION_TABLE[operation].recipient
        lease = await self.documents.get() if recipient else None
        body = kms_protocol.build_request(validated, lease.document.data if lease else None)
        headers = self._sign(creds, operation, body.sha256)
        try:
            response = await self.pool.request("POST", "/", headers, body.data)
        except TransportError as exc:
            raise _on_the_way(exc.message, retryable=exc.retryable) from None
        record.request_id = next(
            (v for k, v in response.headers if k.lower() == "x-amzn-requestid"), None
        )
        try:
            result = kms_protocol.read_response(
                operation,
                response.status,
                response.headers,
                response.body,
                trusted=self._settings.trusted_keys,
            )
        except kms_protocol.KmsProtocolError as exc:
            raise KmsError(exc.error_type, exc.message, exc.status) from None
        if isinstance(result, kms_protocol.KmsFailure):
            raise _AttemptFailed(
                KmsError(result.error_type, _short(result.message), result.status),
                retryable=result.retryable,
                expired=creds if result.expired_token else None,
                rejected=lease
                if lease is not None and result.may_reject_document and not lease.fresh
                else None,
            )
        if isinstance(result, kms_protocol.PassThroughAnswer):
            return result.members
        try:
            plaintext = self._recipient.open(result.ciphertext_for_recipient)
        # Whatever the envelope's decoder raises (malformed CMS, another recipient's
        # key), the answer cannot be used; its class name says which, never its bytes.
        except Exception as exc:  # noqa: BLE001
            raise KmsError(
                "KMSInternalException",
                f"could not open CiphertextForRecipient from KMS: {type(exc).__name__}",
                502,
            ) from None
        return kms_protocol.finish_answer(result, plaintext)
