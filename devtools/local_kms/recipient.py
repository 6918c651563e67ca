"""The `Recipient` parameter: check the attestation document and the key it carries.

KMS accepts a Recipient only when its document is signed by the Nitro attestation PKI
(here: any of the roots the stand-in trusts, the simulated NSM's by default), carries an
RSA public key of at least 2048 bits, and the algorithm is RSAES_OAEP_SHA_256.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from devtools.local_kms.envelope import EnvelopeError, load_recipient_key
from enclave_agent.attestation import (
    AttestationDocument,
    AttestationError,
    _parse,
    _verify_signature,
    verify_attestation,
)

KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
# Distinct (root, cabundle, leaf) chains remembered; one enclave has one leaf at a time.
CHAIN_CACHE_SIZE = 64


class RecipientError(Exception):
    """The Recipient parameter is unacceptable; the message says why (ValidationException)."""


@dataclass(frozen=True)
class VerifiedRecipient:
    public_key_der: bytes
    pcrs: dict[int, bytes]


def verify_recipient(raw: Any, roots: Sequence[bytes], now: datetime) -> VerifiedRecipient:
    """Check a request's Recipient against the trusted roots, as of ``now``."""
    if not isinstance(raw, dict):
        raise RecipientError("Recipient must be an object")
    algorithm = raw.get("KeyEncryptionAlgorithm")
    if algorithm != KEY_ENCRYPTION_ALGORITHM:
        raise RecipientError(
            f"Recipient.KeyEncryptionAlgorithm must be {KEY_ENCRYPTION_ALGORITHM}, "
            f"got {algorithm!r}"
        )
    encoded = raw.get("AttestationDocument")
    if not isinstance(encoded, str) or not encoded:
        raise RecipientError("Recipient.AttestationDocument must be a base64 string")
    try:
        document = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RecipientError("Recipient.AttestationDocument is not valid base64") from exc
    if not roots:
        raise RecipientError("the local KMS trusts no attestation root")
    failures = []
    for root in roots:
        try:
            verified = _CHAINS.verify(document, root, now)
        except AttestationError as exc:
            failures.append(str(exc))
            continue
        break
    else:
        raise RecipientError(f"invalid attestation document: {failures[-1]}")
    if verified.public_key is None:
        raise RecipientError("the attestation document carries no public_key")
    try:
        load_recipient_key(verified.public_key)
    except EnvelopeError as exc:
        raise RecipientError(f"attestation document public_key: {exc}") from exc
    return VerifiedRecipient(verified.public_key, dict(verified.pcrs))


@dataclass(frozen=True)
class _VerifiedChain:
    leaf: x509.Certificate
    valid_from: datetime  # the latest not-before of the chain's certificates
    valid_until: datetime  # the earliest not-after


class _ChainCache:
    """Certificate chains already verified, by their exact DER bytes and root.

    A chain (the leaf, its cabundle and the root) is the same in every document an
    enclave sends for hours, and checking it is most of the cost of a Recipient: three
    P-384 certificate signatures. A chain met before is trusted again only inside the
    validity window of all its certificates, checked at each call; the document's own
    COSE signature, by the leaf's key, is checked every call. Anything else (a chain
    not met before, an instant outside the window) takes the full verification.
    """

    def __init__(self, size: int = CHAIN_CACHE_SIZE) -> None:
        self.size = size
        self._chains: dict[tuple[bytes, bytes, tuple[bytes, ...]], _VerifiedChain] = {}

    def verify(self, document: bytes, root: bytes, now: datetime) -> AttestationDocument:
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)  # naive means UTC, as verify_attestation takes it
        cose, parsed = _parse(document)
        key = (root, parsed.certificate, tuple(parsed.cabundle))
        chain = self._chains.get(key)
        if chain is not None and chain.valid_from <= now <= chain.valid_until:
            _verify_signature(cose, chain.leaf)
            return parsed
        verified = verify_attestation(document, root=root, at=now)
        certificates = [
            x509.load_der_x509_certificate(der)
            for der in [verified.certificate, *verified.cabundle]
        ]
        if len(self._chains) >= self.size:
            self._chains.clear()  # bounded: many distinct chains only cost re-verification
        self._chains[key] = _VerifiedChain(
            leaf=certificates[0],
            valid_from=max(c.not_valid_before_utc for c in certificates),
            valid_until=min(c.not_valid_after_utc for c in certificates),
        )
        return verified


# The stand-in serves on one thread; the cache needs no lock.
_CHAINS = _ChainCache()
