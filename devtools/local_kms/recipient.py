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
from datetime import datetime
from typing import Any

from devtools.local_kms.envelope import EnvelopeError, load_recipient_key
from enclave_agent.operator.attestation import AttestationError, ChainCache, verify_attestation

KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
# Distinct (root, cabundle, leaf) chains remembered; one enclave has one leaf at a time.
CHAIN_CACHE_SIZE = 64


class RecipientError(Exception):
    """The Recipient parameter is unacceptable; the message says why (ValidationException)."""


@dataclass(frozen=True)
class VerifiedRecipient:
    public_key_der: bytes
    pcrs: dict[int, bytes]
    timestamp: datetime  # when the NSM made the document (its own field)


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
            verified = verify_attestation(document, root=root, at=now, chains=_CHAINS)
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
    return VerifiedRecipient(verified.public_key, dict(verified.pcrs), verified.timestamp)


# The stand-in serves on one thread; the cache needs no lock.
_CHAINS = ChainCache(CHAIN_CACHE_SIZE)
