"""Nitro Enclaves attestation documents: parsing and full verification.

A document is a COSE_Sign1 (tag 18 or, as real documents are, untagged) signed
with ES384 by a leaf certificate that chains through the document's ``cabundle``
(root first) to the AWS Nitro Enclaves root G1, which ships in this package.
Tolerant of what real documents do (null fields, indefinite-length maps), strict
about everything else. Every refusal is an AttestationError naming the reason.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

AWS_NITRO_ROOT_G1_PEM: bytes = (
    resources.files("enclave_agent").joinpath("data/aws_nitro_root_g1.pem").read_bytes()
)

MAX_DOCUMENT_BYTES = 16384  # the NSM's response buffer is 12288 bytes
MAX_FIELD_BYTES = 1024  # public_key, user_data, nonce
MAX_CERTIFICATE_BYTES = 4096
MAX_CABUNDLE = 8
MAX_PCRS = 32
PCR_LENGTHS = (32, 48, 64)
SIGNATURE_BYTES = 96  # ES384: r‖s, 48 bytes each
COSE_ALG_ES384 = -35
COSE_HEADER_CRIT = 2
COSE_SIGN1_TAG = 18
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The only extensions this verifier processes; a certificate that marks any other
# extension critical must be refused (RFC 5280 §4.2): we cannot honour its meaning.
_UNDERSTOOD_CRITICAL = (x509.BasicConstraints, x509.KeyUsage)


class AttestationError(Exception):
    """A document that is refused; the message names the reason."""


class MalformedDocumentError(AttestationError):
    """The bytes are not a well-formed attestation document."""


class SignatureError(AttestationError):
    """The COSE signature does not verify with the leaf certificate's key."""


class CertificateChainError(AttestationError):
    """The leaf does not chain to the trusted root at the chosen instant."""


@dataclass(frozen=True)
class AttestationDocument:
    module_id: str
    timestamp: datetime  # timezone-aware UTC
    digest: str
    pcrs: dict[int, bytes]
    certificate: bytes  # DER leaf
    cabundle: list[bytes]  # DER, root first
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None


@dataclass(frozen=True)
class _CoseSign1:
    protected: bytes
    payload: bytes
    signature: bytes


def parse_attestation(document: bytes) -> AttestationDocument:
    """Read a document's fields without verifying anything (raises AttestationError)."""
    return _parse(document)[1]


class ChainCache:
    """Certificate chains already verified, by their exact DER bytes and root.

    For a verifier that sees many documents (the local KMS stand-in): a chain (the
    leaf, its cabundle and the root) is the same in every document an enclave sends
    for hours, and checking it is most of the cost of a verification: three P-384
    certificate signatures. A chain met before is trusted again only inside the
    validity window of all its certificates, checked at each call; the document's own
    COSE signature, by the leaf's key, is checked every call. Anything else (a chain
    not met before, an instant outside the window) takes the full verification.
    Not thread-safe: one per thread or event loop.
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._chains: dict[tuple[bytes, bytes, tuple[bytes, ...]], _VerifiedChain] = {}

    def leaf(
        self, root_der: bytes, leaf_der: bytes, cabundle: list[bytes], at: datetime
    ) -> x509.Certificate | None:
        chain = self._chains.get((root_der, leaf_der, tuple(cabundle)))
        if chain is not None and chain.valid_from <= at <= chain.valid_until:
            return chain.leaf
        return None

    def remember(
        self, root_der: bytes, leaf_der: bytes, cabundle: list[bytes], chain: list[x509.Certificate]
    ) -> None:
        if len(self._chains) >= self.size:
            self._chains.clear()  # bounded: many distinct chains only cost re-verification
        self._chains[(root_der, leaf_der, tuple(cabundle))] = _VerifiedChain(
            leaf=chain[0],
            valid_from=max(c.not_valid_before_utc for c in chain),
            valid_until=min(c.not_valid_after_utc for c in chain),
        )


@dataclass(frozen=True)
class _VerifiedChain:
    leaf: x509.Certificate
    valid_from: datetime  # the latest not-before of the chain's certificates
    valid_until: datetime  # the earliest not-after


def verify_attestation(
    document: bytes,
    *,
    root: bytes = AWS_NITRO_ROOT_G1_PEM,
    at: datetime | None = None,
    chains: ChainCache | None = None,
) -> AttestationDocument:
    """Parse ``document`` and check it fully; return its fields.

    ``root`` is the trusted root certificate, PEM or DER (default: AWS Nitro root G1).
    ``at`` is the instant the chain must be valid at (default now; naive means UTC).
    ``chains``: remember verified certificate chains there (see ChainCache).
    """
    cose, parsed = _parse(document)
    instant = datetime.now(UTC) if at is None else at
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    try:
        root_der = _load_root(root)
        leaf = (
            None
            if chains is None
            else chains.leaf(root_der, parsed.certificate, parsed.cabundle, instant)
        )
        if leaf is None:
            chain = _verify_chain(parsed.certificate, parsed.cabundle, root_der, instant)
            if chains is not None:
                chains.remember(root_der, parsed.certificate, parsed.cabundle, chain)
            leaf = chain[0]
        _verify_signature(cose, leaf)
    except AttestationError:
        raise
    except Exception as exc:  # noqa: BLE001 - x509 parsing raises many types on bad input
        raise CertificateChainError(
            f"certificate chain unusable: {type(exc).__name__}: {exc}"
        ) from None
    return parsed


# --- parsing --------------------------------------------------------------------


def _parse(document: bytes) -> tuple[_CoseSign1, AttestationDocument]:
    if not isinstance(document, bytes | bytearray | memoryview):
        raise MalformedDocumentError("document must be bytes")
    data = bytes(document)
    if not data:
        raise MalformedDocumentError("document is empty")
    if len(data) > MAX_DOCUMENT_BYTES:
        raise MalformedDocumentError(
            f"document is {len(data)} bytes, more than {MAX_DOCUMENT_BYTES}"
        )
    try:
        cose = _read_cose(data)
        return cose, _read_payload(cose.payload)
    except AttestationError:
        raise
    except Exception as exc:  # noqa: BLE001 - cbor2 raises many types on malformed input
        raise MalformedDocumentError(f"malformed document: {type(exc).__name__}") from None


def _decode_one(data: bytes, what: str, *, plain: bool = False) -> Any:
    """Decode exactly one CBOR item. ``plain``: the signed parts (protected header,
    payload), which must carry no CBOR tags and no map with a repeated key."""
    decoder = cbor2.CBORDecoder(io.BytesIO(data))
    value = decoder.decode()
    if decoder.fp.tell() != len(data):
        raise MalformedDocumentError(f"unexpected bytes after the {what}")
    # cbor2 keeps the last of repeated keys; another reader may keep the first, so a
    # repeated key would let two verifiers read different fields from one signed text.
    if plain and _encoded_map_sizes(data) != _decoded_map_sizes(value, []):
        raise MalformedDocumentError(f"the {what} repeats a map key")
    return value


def _encoded_map_sizes(data: bytes) -> list[int]:
    """Entry counts of every map in ``data`` (one well-formed CBOR item), in pre-order.
    Refuses tags: nothing in the signed parts of a document is tagged."""
    sizes: list[int] = []

    def item(pointer: int, depth: int) -> int:
        if depth > 16:
            raise MalformedDocumentError("CBOR nested too deeply")
        initial = data[pointer]
        major, info = initial >> 5, initial & 0x1F
        pointer += 1
        argument = info
        if 24 <= info <= 27:
            width = 1 << (info - 24)
            argument = int.from_bytes(data[pointer : pointer + width], "big")
            pointer += width
        indefinite = info == 31
        if major == 6:
            raise MalformedDocumentError("CBOR tag inside a signed part of the document")
        if major in (0, 1, 7):
            return pointer
        if major in (2, 3):
            if not indefinite:
                return pointer + argument
            while data[pointer] != 0xFF:
                pointer = item(pointer, depth + 1)
            return pointer + 1
        slot = len(sizes)
        if major == 5:
            sizes.append(0)
        count = 0
        while (data[pointer] != 0xFF) if indefinite else count < argument:
            pointer = item(pointer, depth + 1)
            if major == 5:
                pointer = item(pointer, depth + 1)
            count += 1
        if major == 5:
            sizes[slot] = count
        return pointer + 1 if indefinite else pointer

    item(0, 0)
    return sizes


def _decoded_map_sizes(value: Any, sizes: list[int]) -> list[int]:
    if isinstance(value, Mapping):
        sizes.append(len(value))
        for key, entry in value.items():
            _decoded_map_sizes(key, sizes)
            _decoded_map_sizes(entry, sizes)
    elif isinstance(value, list | tuple):
        for entry in value:
            _decoded_map_sizes(entry, sizes)
    return sizes


def _read_cose(data: bytes) -> _CoseSign1:
    message = _decode_one(data, "COSE_Sign1")
    if isinstance(message, cbor2.CBORTag):
        if message.tag != COSE_SIGN1_TAG:
            raise MalformedDocumentError(f"document has CBOR tag {message.tag}, expected 18")
        message = message.value
    # cbor2 hands a tagged array back as a tuple.
    if not isinstance(message, list | tuple) or len(message) != 4:
        raise MalformedDocumentError("document is not a COSE_Sign1 array of four items")
    protected, unprotected, payload, signature = message
    if not isinstance(protected, bytes):
        raise MalformedDocumentError("COSE protected header is not a byte string")
    # Some producers write the empty unprotected header as null; inside tag 18 cbor2
    # gives a read-only mapping.
    if unprotected is not None and not isinstance(unprotected, Mapping):
        raise MalformedDocumentError("COSE unprotected header is not a map")
    if not isinstance(payload, bytes) or not payload:
        raise MalformedDocumentError("COSE payload is not a byte string")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise MalformedDocumentError(f"COSE signature is not {SIGNATURE_BYTES} bytes (ES384)")
    header = _decode_one(protected, "protected header", plain=True) if protected else {}
    if not isinstance(header, dict) or header.get(1) != COSE_ALG_ES384:
        raise MalformedDocumentError("COSE protected header does not name ES384 (alg -35)")
    if COSE_HEADER_CRIT in header:
        # crit names parameters the verifier must understand; it understands only alg
        raise MalformedDocumentError("COSE protected header has critical parameters (crit)")
    return _CoseSign1(protected, payload, signature)


def _read_payload(payload: bytes) -> AttestationDocument:
    fields = _decode_one(payload, "payload", plain=True)
    if not isinstance(fields, dict) or not all(isinstance(key, str) for key in fields):
        raise MalformedDocumentError("payload is not a map with text keys")

    module_id = fields.get("module_id")
    if not isinstance(module_id, str) or not module_id or len(module_id) > 256:
        raise MalformedDocumentError("payload field module_id is not a non-empty text string")
    digest = fields.get("digest")
    if digest != "SHA384":
        raise MalformedDocumentError(f"payload field digest is {digest!r}, expected 'SHA384'")
    timestamp_ms = fields.get("timestamp")
    if (
        isinstance(timestamp_ms, bool)
        or not isinstance(timestamp_ms, int)
        or not 0 < timestamp_ms < 253402300800000  # before year 10000
    ):
        raise MalformedDocumentError("payload field timestamp is not a positive integer (ms)")
    timestamp = _EPOCH + timedelta(milliseconds=timestamp_ms)

    pcrs = fields.get("pcrs")
    if not isinstance(pcrs, dict) or not 0 < len(pcrs) <= MAX_PCRS:
        raise MalformedDocumentError(f"payload field pcrs is not a map of 1..{MAX_PCRS} entries")
    for index, value in pcrs.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_PCRS:
            raise MalformedDocumentError(f"PCR index {index!r} is not an integer 0..31")
        if not isinstance(value, bytes) or len(value) not in PCR_LENGTHS:
            raise MalformedDocumentError(f"PCR{index} is not a 32, 48 or 64-byte string")

    certificate = fields.get("certificate")
    if not isinstance(certificate, bytes) or not 0 < len(certificate) <= MAX_CERTIFICATE_BYTES:
        raise MalformedDocumentError("payload field certificate is not a DER byte string")
    # Parsing reads a null cabundle as empty (self-made documents do that); verification
    # then refuses it, as the leaf cannot chain to any root.
    cabundle = fields.get("cabundle")
    if cabundle is None:
        cabundle = []
    if not isinstance(cabundle, list) or len(cabundle) > MAX_CABUNDLE:
        raise MalformedDocumentError(f"payload field cabundle is not a list of 0..{MAX_CABUNDLE}")
    for entry in cabundle:
        if not isinstance(entry, bytes) or not 0 < len(entry) <= MAX_CERTIFICATE_BYTES:
            raise MalformedDocumentError("cabundle entry is not a DER byte string")

    return AttestationDocument(
        module_id=module_id,
        timestamp=timestamp,
        digest=digest,
        pcrs=dict(sorted(pcrs.items())),
        certificate=certificate,
        cabundle=list(cabundle),
        public_key=_optional_bytes(fields, "public_key"),
        user_data=_optional_bytes(fields, "user_data"),
        nonce=_optional_bytes(fields, "nonce"),
    )


def _optional_bytes(fields: dict[str, Any], name: str) -> bytes | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, bytes) or len(value) > MAX_FIELD_BYTES:
        raise MalformedDocumentError(
            f"payload field {name} is not null or a byte string of at most {MAX_FIELD_BYTES}"
        )
    return value


# --- verification ---------------------------------------------------------------


def _load_root(root: bytes) -> bytes:
    try:
        if root.lstrip().startswith(b"-----BEGIN"):
            certificate = x509.load_pem_x509_certificate(root)
        else:
            certificate = x509.load_der_x509_certificate(root)
    except ValueError:
        raise CertificateChainError("the trusted root is not a PEM or DER certificate") from None
    return certificate.public_bytes(serialization.Encoding.DER)


def _describe(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string() or "(empty subject)"


def _verify_chain(
    leaf_der: bytes, cabundle: list[bytes], root_der: bytes, at: datetime
) -> list[x509.Certificate]:
    """The verified chain, leaf first."""
    if not cabundle:
        raise CertificateChainError("the document has no cabundle: nothing chains to the root")
    if cabundle[0] != root_der:
        raise CertificateChainError("the cabundle's root is not the trusted root")
    chain: list[x509.Certificate] = []
    for position, der in enumerate([leaf_der, *reversed(cabundle)]):
        try:
            chain.append(x509.load_der_x509_certificate(der))
        except ValueError:
            what = "leaf certificate" if position == 0 else "cabundle certificate"
            raise CertificateChainError(f"{what} is not valid DER") from None

    for position, certificate in enumerate(chain):
        _check_critical_extensions(certificate)
        if not certificate.not_valid_before_utc <= at <= certificate.not_valid_after_utc:
            raise CertificateChainError(
                f"certificate {_describe(certificate)!r} is not valid at {at.isoformat()} "
                f"(valid {certificate.not_valid_before_utc.isoformat()} to "
                f"{certificate.not_valid_after_utc.isoformat()})"
            )
        if position == 0:
            _check_leaf(certificate)
            continue
        # ``position - 1`` CA certificates sit between this issuer and the leaf.
        _check_issuer(certificate, intermediates_below=position - 1)
        child = chain[position - 1]
        try:
            child.verify_directly_issued_by(certificate)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CertificateChainError(
                f"certificate {_describe(child)!r} is not issued by "
                f"{_describe(certificate)!r}: {exc or type(exc).__name__}"
            ) from None
    return chain


def _extension(certificate: x509.Certificate, kind: type[Any]) -> Any:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_critical_extensions(certificate: x509.Certificate) -> None:
    for extension in certificate.extensions:
        if extension.critical and not isinstance(extension.value, _UNDERSTOOD_CRITICAL):
            raise CertificateChainError(
                f"certificate {_describe(certificate)!r} has a critical extension this "
                f"verifier does not process ({extension.oid.dotted_string})"
            )


def _check_leaf(leaf: x509.Certificate) -> None:
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise CertificateChainError("the leaf certificate is a CA certificate")
    usage = _extension(leaf, x509.KeyUsage)
    if usage is None or not usage.digital_signature:
        raise CertificateChainError("the leaf certificate's key usage lacks digitalSignature")


def _check_issuer(issuer: x509.Certificate, *, intermediates_below: int) -> None:
    constraints = _extension(issuer, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise CertificateChainError(f"issuer {_describe(issuer)!r} is not a CA certificate")
    if constraints.path_length is not None and intermediates_below > constraints.path_length:
        raise CertificateChainError(
            f"issuer {_describe(issuer)!r} allows a path length of {constraints.path_length}, "
            f"the chain has {intermediates_below}"
        )
    usage = _extension(issuer, x509.KeyUsage)
    if usage is None or not usage.key_cert_sign:
        raise CertificateChainError(f"issuer {_describe(issuer)!r} lacks keyCertSign usage")


def _verify_signature(cose: _CoseSign1, leaf: x509.Certificate) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise SignatureError("the leaf certificate's key is not a P-384 key (ES384)")
    half = SIGNATURE_BYTES // 2
    der_signature = encode_dss_signature(
        int.from_bytes(cose.signature[:half], "big"), int.from_bytes(cose.signature[half:], "big")
    )
    signed = cbor2.dumps(["Signature1", cose.protected, b"", cose.payload])
    try:
        key.verify(der_signature, signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise SignatureError("the document's signature does not verify") from None
