"""Attestation documents: the real AWS vectors, refusals, the shipped root."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclave_agent.operator.attestation import (
    AWS_NITRO_ROOT_G1_PEM,
    AttestationError,
    CertificateChainError,
    SignatureError,
    parse_attestation,
    verify_attestation,
)

AWS_ROOT_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
AWS_DOCUMENTS = [
    "nitrite_production_2024-09-07.cbor",
    "nitrite_debug_2024-09-07.cbor",
    "evervault_debug_2022-10-12.cbor",
    "evervault_production_2022-10-13.cbor",
    "evervault_debug_2023-09-18.cbor",
]
PRODUCTION = "nitrite_production_2024-09-07.cbor"


def _expected(vectors_dir: Path) -> dict[str, dict[str, Any]]:
    rows = map(json.loads, (vectors_dir / "expected.jsonl").read_text().splitlines())
    return {row["file"]: row for row in rows}


def _document(vectors_dir: Path, name: str) -> bytes:
    return (vectors_dir / "attestation" / name).read_bytes()


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def test_shipped_root_is_aws_nitro_root_g1() -> None:
    # The fingerprint AWS publishes for its Nitro Enclaves root G1 (no vectors needed).
    assert hashlib.sha256(_der(AWS_NITRO_ROOT_G1_PEM)).hexdigest() == AWS_ROOT_SHA256
    root = x509.load_pem_x509_certificate(AWS_NITRO_ROOT_G1_PEM)
    assert root.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"


def test_shipped_root_equals_the_vectors_root(vectors_dir: Path) -> None:
    assert _der(AWS_NITRO_ROOT_G1_PEM) == _der((vectors_dir / "aws_nitro_root_g1.pem").read_bytes())


@pytest.mark.parametrize("name", AWS_DOCUMENTS)
def test_real_documents_verify_at_their_own_timestamp(vectors_dir: Path, name: str) -> None:
    expected = _expected(vectors_dir)[name]
    document = _document(vectors_dir, name)
    parsed = parse_attestation(document)
    verified = verify_attestation(document, at=parsed.timestamp)  # default root: AWS G1
    assert verified == parsed
    assert verified.module_id == expected["module_id"]
    assert verified.timestamp == datetime.fromisoformat(expected["timestamp"])
    assert verified.timestamp.tzinfo is not None
    assert verified.digest == expected["digest"] == "SHA384"
    assert verified.pcrs[0].hex() == expected["pcr0"]
    assert len(verified.pcrs) == expected["pcr_count"]
    for field in ("public_key", "user_data", "nonce"):
        value = getattr(verified, field)
        assert (None if value is None else len(value)) == expected[f"{field}_len"]
    assert verified.cabundle[0] == _der(AWS_NITRO_ROOT_G1_PEM)


def test_production_pcr0_matches_expected(vectors_dir: Path) -> None:
    expected = _expected(vectors_dir)[PRODUCTION]
    document = _document(vectors_dir, PRODUCTION)
    verified = verify_attestation(document, at=parse_attestation(document).timestamp)
    assert verified.pcrs[0].hex() == expected["pcr0"]
    assert verified.pcrs[0] != bytes(48)


def test_debug_document_with_non_der_public_key_parses(vectors_dir: Path) -> None:
    parsed = parse_attestation(_document(vectors_dir, "evervault_debug_2022-10-12.cbor"))
    assert parsed.public_key is not None and len(parsed.public_key) == 19
    with pytest.raises(ValueError):
        serialization.load_der_public_key(parsed.public_key)
    assert parsed.pcrs[0] == bytes(48)


def test_self_signed_document_is_refused(vectors_dir: Path) -> None:
    document = _document(vectors_dir, "nitrite_selfsigned_not_aws.cbor")
    parsed = parse_attestation(document)
    with pytest.raises(CertificateChainError):
        verify_attestation(document, at=parsed.timestamp)
    with pytest.raises(AttestationError):
        verify_attestation(document)


def test_tagged_document_is_accepted(vectors_dir: Path) -> None:
    untagged = _document(vectors_dir, PRODUCTION)
    tagged = cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(untagged)))
    assert tagged[0] == 0xD2
    at = parse_attestation(untagged).timestamp
    assert verify_attestation(tagged, at=at) == verify_attestation(untagged, at=at)


def test_other_tag_is_refused(vectors_dir: Path) -> None:
    document = cbor2.dumps(cbor2.CBORTag(98, cbor2.loads(_document(vectors_dir, PRODUCTION))))
    with pytest.raises(AttestationError, match="tag 98"):
        parse_attestation(document)


# --- refusals -------------------------------------------------------------------


def _flip(data: bytes, at: int) -> bytes:
    damaged = bytearray(data)
    damaged[at] ^= 0x01
    return bytes(damaged)


def test_flipped_byte_in_signature_is_refused(vectors_dir: Path) -> None:
    document = _document(vectors_dir, PRODUCTION)
    at = parse_attestation(document).timestamp
    with pytest.raises(SignatureError, match="signature"):
        verify_attestation(_flip(document, len(document) - 10), at=at)


def test_flipped_byte_in_payload_is_refused(vectors_dir: Path) -> None:
    document = _document(vectors_dir, PRODUCTION)
    parsed = parse_attestation(document)
    # Flip a byte inside PCR0's value: still well formed, no longer what was signed.
    offset = document.index(parsed.pcrs[0]) + 5
    damaged = _flip(document, offset)
    assert parse_attestation(damaged).pcrs[0] != parsed.pcrs[0]
    with pytest.raises(SignatureError):
        verify_attestation(damaged, at=parsed.timestamp)


@pytest.mark.parametrize("which", ["leaf", "intermediate"])
def test_flipped_byte_in_a_certificate_is_refused(vectors_dir: Path, which: str) -> None:
    document = _document(vectors_dir, PRODUCTION)
    parsed = parse_attestation(document)
    certificate = parsed.certificate if which == "leaf" else parsed.cabundle[-1]
    # Flip a byte in the certificate's signature (its last bytes): it stays parseable.
    offset = document.index(certificate) + len(certificate) - 3
    with pytest.raises(CertificateChainError):
        verify_attestation(_flip(document, offset), at=parsed.timestamp)


def test_one_day_after_timestamp_the_leaf_has_expired(vectors_dir: Path) -> None:
    document = _document(vectors_dir, PRODUCTION)
    at = parse_attestation(document).timestamp + timedelta(days=1)
    with pytest.raises(CertificateChainError, match="not valid at"):
        verify_attestation(document, at=at)


def test_today_the_real_documents_have_expired(vectors_dir: Path) -> None:
    with pytest.raises(CertificateChainError, match="not valid at"):
        verify_attestation(_document(vectors_dir, PRODUCTION))


def test_wrong_root_is_refused(vectors_dir: Path) -> None:
    document = _document(vectors_dir, PRODUCTION)
    parsed = parse_attestation(document)
    # An intermediate is a perfectly good certificate, but not the pinned root.
    with pytest.raises(CertificateChainError, match="trusted root"):
        verify_attestation(document, root=parsed.cabundle[1], at=parsed.timestamp)


def test_root_given_as_der_or_pem(vectors_dir: Path) -> None:
    document = _document(vectors_dir, PRODUCTION)
    at = parse_attestation(document).timestamp
    verify_attestation(document, root=_der(AWS_NITRO_ROOT_G1_PEM), at=at)
    verify_attestation(document, root=AWS_NITRO_ROOT_G1_PEM, at=at)
    with pytest.raises(AttestationError, match="trusted root"):
        verify_attestation(document, root=b"not a certificate", at=at)


def test_naive_instant_means_utc(vectors_dir: Path) -> None:
    document = _document(vectors_dir, PRODUCTION)
    at = parse_attestation(document).timestamp
    verify_attestation(document, at=at.replace(tzinfo=None))
    assert at.tzinfo == UTC
