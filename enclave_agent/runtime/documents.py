"""The attestation documents the KMS gateway sends as ``Recipient``, each reused a while.

Why a document may be reused at all (docs/security.md says it in full): it carries
only our PCRs and our public key, and whatever KMS answers to it is encrypted to that
key, whose private half never leaves this process. KMS documents no age limit and
wants no nonce; the only expiry a document has is its certificate chain's (the leaf
lives about 3 hours). So a fresh document per call costs an NSM call each time and
buys nothing; one reused for minutes changes neither what a holder of the parent's
credentials can ask KMS for nor who can read the answer.

Rules (research and sources: the project's notes on attestation age):
- ``reuse_seconds`` (config ``[limits] attestation_reuse_seconds``, default 300; 0: a
  fresh document per call). A document's age is measured on the monotonic clock from
  the moment the NSM returned it, never on the enclave's wall clock (the parent
  influences the enclave's time sources).
- A document is also bounded by itself: it is used for at most its leaf
  certificate's ``notAfter`` minus its own ``timestamp`` (both written by the NSM, no
  clock of ours involved) minus ``LEAF_MARGIN``. When that leaves nothing, or the
  document cannot be read, it serves the calls that were waiting for it and is not
  kept.
- Refresh ahead, without a background task: the first call that finds the document
  older than ``REFRESH_AT`` of its span fetches a new one (single flight) while other
  calls keep using the current one until its span ends; after that they wait for the
  new one. A refresh that fails while the current one is still within its span
  leaves the current one in use.
- ``discard``: KMS rejected a reused document; the next call fetches a new one.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import cbor2
import trio
from cryptography import x509

from enclave_agent.runtime.single_flight import SingleFlight
from enclave_common.logs import get_logger

DEFAULT_REUSE_SECONDS = 300.0
MAX_REUSE_SECONDS = 3600.0
LEAF_MARGIN = 15 * 60.0  # seconds a reused document's leaf must still have left
REFRESH_AT = 0.8  # of a document's span: from then on the next call fetches a new one
_COSE_SIGN1_TAG = 18

_log = get_logger()


def leaf_validity(document: bytes) -> float | None:
    """Seconds from a document's ``timestamp`` to its leaf certificate's notAfter, or
    None when the document cannot be read. Our own NSM's output, so this reads, it
    does not verify (the operator tools verify)."""
    try:
        message = cbor2.loads(document)
        if isinstance(message, cbor2.CBORTag) and message.tag == _COSE_SIGN1_TAG:
            message = message.value
        payload = cbor2.loads(message[2])
        timestamp_ms = payload["timestamp"]
        leaf = x509.load_der_x509_certificate(payload["certificate"])
        if not isinstance(timestamp_ms, int) or isinstance(timestamp_ms, bool):
            return None
        at = datetime.datetime.fromtimestamp(timestamp_ms / 1000, datetime.UTC)
        return (leaf.not_valid_after_utc - at).total_seconds()
    except Exception:  # noqa: BLE001 - whatever is unreadable is simply not reused
        return None


@dataclass(frozen=True, eq=False, repr=False)
class Document:
    data: bytes
    fetched_at: float  # the monotonic clock when the NSM returned it
    usable_until: float  # fetched_at when it is not to be reused
    refresh_at: float

    def __repr__(self) -> str:
        return f"Document(fetched_at={self.fetched_at}, usable_until={self.usable_until})"


@dataclass(frozen=True)
class Lease:
    """A document for one KMS request. ``fresh``: fetched after this call asked for
    it, so KMS refusing it is a real refusal, never a stale document."""

    document: Document
    fresh: bool


class AttestationDocuments:
    def __init__(
        self,
        fetch: Callable[[], Awaitable[bytes]],
        reuse_seconds: float,
        *,
        shared: tuple[type[Exception], ...],
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if not 0 <= reuse_seconds <= MAX_REUSE_SECONDS:
            raise ValueError(f"reuse_seconds must be 0..{MAX_REUSE_SECONDS:g}")
        self._fetch = fetch
        self._reuse = reuse_seconds
        self._clock = clock
        self._shared = shared
        self._current: Document | None = None
        self._flight = SingleFlight(self._new, shared=shared)
        self.fetches = 0  # NSM calls made (tests)

    async def get(self) -> Lease:
        if self._reuse <= 0:
            return Lease(await self._new(), fresh=True)
        asked = self._clock()
        current = self._current
        if current is not None and (
            asked < current.refresh_at or (asked < current.usable_until and self._flight.running)
        ):
            return Lease(current, fresh=False)
        try:
            document = await self._flight.run()
        except self._shared:
            current = self._current
            if current is not None and self._clock() < current.usable_until:
                return Lease(current, fresh=False)  # the refresh ahead failed; this one holds
            raise
        return Lease(document, fresh=document.fetched_at >= asked)

    def discard(self, lease: Lease) -> None:
        """KMS rejected ``lease``'s document: never use it again."""
        if self._current is lease.document:
            self._current = None

    def age(self, lease: Lease) -> float:
        return self._clock() - lease.document.fetched_at

    async def _new(self) -> Document:
        data = await self._fetch()
        self.fetches += 1
        fetched = self._clock()
        if self._reuse <= 0:
            return Document(data, fetched, fetched, fetched)
        validity = leaf_validity(data)
        span = 0.0 if validity is None else max(0.0, min(self._reuse, validity - LEAF_MARGIN))
        document = Document(data, fetched, fetched + span, fetched + REFRESH_AT * span)
        if span > 0:
            self._current = document
        _log.info(
            "attestation_document",
            reuse_s=round(span, 1),
            leaf_left_s=None if validity is None else round(validity),
        )
        return document
