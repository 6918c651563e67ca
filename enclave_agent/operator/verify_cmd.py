"""``enclave-agent verify-attestation``: check an attestation document and print its fields.

Operators use it to read an enclave's PCRs (for key policies) from a document they
trust only after this check. Prints JSON on success; exit 1 with the reason when the
document is refused, 2 when an input cannot be read.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from enclave_agent.operator.attestation import (
    AWS_NITRO_ROOT_G1_PEM,
    MAX_DOCUMENT_BYTES,
    AttestationDocument,
    AttestationError,
    verify_attestation,
)
from enclave_common.cli import CommandFailed, UsageError

# Base64 text of the largest document, with room for line breaks.
_MAX_INPUT_BYTES = MAX_DOCUMENT_BYTES * 2


class _InputError(Exception):
    pass


def _parse_instant(text: str) -> datetime:
    try:
        instant = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO-8601 instant: {text!r} (e.g. 2024-09-07T14:37:39Z)"
        ) from None
    return instant if instant.tzinfo else instant.replace(tzinfo=UTC)


def _read(path: str) -> bytes:
    try:
        if path == "-":
            data = sys.stdin.buffer.read(_MAX_INPUT_BYTES + 1)
        else:
            with Path(path).open("rb") as handle:
                data = handle.read(_MAX_INPUT_BYTES + 1)
    except OSError as error:
        raise _InputError(f"cannot read {path}: {error.strerror}") from None
    if len(data) > _MAX_INPUT_BYTES:
        raise _InputError(f"{path} is larger than any attestation document")
    return data


def _document_bytes(data: bytes) -> bytes:
    """Raw CBOR as the NSM gives it, or the base64 text KMS requests and logs carry."""
    if data[:1] in (b"\x84", b"\xd2"):
        return data
    try:
        decoded = base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        return data
    return decoded if decoded[:1] in (b"\x84", b"\xd2") else data


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def describe(document: AttestationDocument) -> dict[str, Any]:
    leaf = x509.load_der_x509_certificate(document.certificate)
    return {
        "module_id": document.module_id,
        "timestamp": document.timestamp.isoformat().replace("+00:00", "Z"),
        "digest": document.digest,
        "pcrs": {str(index): value.hex() for index, value in document.pcrs.items()},
        "public_key": _hex(document.public_key),
        "user_data": _hex(document.user_data),
        "nonce": _hex(document.nonce),
        "certificate": {
            "subject": leaf.subject.rfc4514_string(),
            "sha256": hashlib.sha256(document.certificate).hexdigest(),
            "not_valid_before": leaf.not_valid_before_utc.isoformat().replace("+00:00", "Z"),
            "not_valid_after": leaf.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
        },
        "cabundle_length": len(document.cabundle),
    }


def run(args: argparse.Namespace) -> int:
    try:
        document = _document_bytes(_read(args.file))
        root = AWS_NITRO_ROOT_G1_PEM if args.root is None else _read(args.root)
    except _InputError as error:
        raise UsageError(str(error)) from None
    try:
        verified = verify_attestation(document, root=root, at=args.at)
    except AttestationError as error:
        raise CommandFailed(f"refused: {error}") from None
    json.dump(describe(verified), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "verify-attestation",
        help="verify a Nitro attestation document and print its fields (PCRs in hex)",
        description="Verify a Nitro Enclaves attestation document (signature, certificate "
        "chain to the root, validity at --at) and print its fields as JSON. FILE holds the "
        "raw CBOR document or its base64 text; '-' reads stdin. Exit 1 with the reason when "
        "the document is refused.",
    )
    parser.add_argument("file", metavar="FILE")
    parser.add_argument(
        "--root",
        metavar="PEM",
        help="trusted root certificate (PEM or DER); default: the AWS Nitro Enclaves root G1",
    )
    parser.add_argument(
        "--at",
        type=_parse_instant,
        metavar="ISO-8601",
        help="check the certificates as of this instant (default: now; no zone means UTC)",
    )
    parser.set_defaults(func=run)
