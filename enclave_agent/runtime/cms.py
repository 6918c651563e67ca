"""Opening KMS ``CiphertextForRecipient`` envelopes (CMS EnvelopedData, RFC 5652).

KMS answers a call that carries a ``Recipient`` with a BER ContentInfo wrapping
EnvelopedData version 2: one KeyTransRecipientInfo (version 2) naming our key by
its subjectKeyIdentifier (SHA-256 of our DER SubjectPublicKeyInfo), the content key
wrapped with RSAES-OAEP (SHA-256, MGF1-SHA-256, empty label), and the content
encrypted with AES-256-CBC and PKCS#7 padding. `cryptography`'s PKCS#7 functions
take neither OAEP nor BER.

The envelope is opened on every KMS call, next to one RSA-2048 decryption, so it is
read in a single pass by a small BER reader (indefinite lengths, constructed
strings) that checks exactly the fields KMS sends; asn1crypto's typed model cost as
much as the RSA operation itself.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import NamedTuple

from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# KMS plaintexts are at most 4 KiB (a data key pair's private key a little less);
# 64 KiB leaves room for any encoding of that and bounds the parser's work.
MAX_ENVELOPE_BYTES = 64 * 1024
MAX_CHUNK_DEPTH = 4

# OID contents (DER value bytes) compared directly.
_OID_ENVELOPED_DATA = bytes.fromhex("2a864886f70d010703")  # 1.2.840.113549.1.7.3
_OID_DATA = bytes.fromhex("2a864886f70d010701")  # 1.2.840.113549.1.7.1
_OID_RSAES_OAEP = bytes.fromhex("2a864886f70d010107")  # 1.2.840.113549.1.1.7
_OID_MGF1 = bytes.fromhex("2a864886f70d010108")  # 1.2.840.113549.1.1.8
_OID_P_SPECIFIED = bytes.fromhex("2a864886f70d010109")  # 1.2.840.113549.1.1.9
_OID_SHA256 = bytes.fromhex("608648016503040201")  # 2.16.840.1.101.3.4.2.1
_OID_AES_256_CBC = bytes.fromhex("60864801650304012a")  # 2.16.840.1.101.3.4.1.42
_HASH_NAMES = {
    bytes.fromhex("2b0e03021a"): "sha1",
    bytes.fromhex("608648016503040204"): "sha224",
    _OID_SHA256: "sha256",
    bytes.fromhex("608648016503040202"): "sha384",
    bytes.fromhex("608648016503040203"): "sha512",
}

_UNIVERSAL, _CONTEXT = 0, 2
_INTEGER, _OCTET_STRING, _NULL, _OID, _SEQUENCE, _SET = 2, 4, 5, 6, 16, 17

_OAEP_SHA256 = OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


class CmsError(Exception):
    """A ``CiphertextForRecipient`` that cannot be opened; the message names the reason."""


class WrongRecipientError(CmsError):
    """The envelope is well formed but made for another key (no RSA operation was tried)."""


def key_identifier_for(private_key: rsa.RSAPrivateKey) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo: how KMS names the recipient key."""
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def decrypt_for_recipient(
    ciphertext_for_recipient: bytes,
    private_key: rsa.RSAPrivateKey,
    *,
    key_identifier: bytes | None = None,
) -> bytes:
    """Return the plaintext KMS sealed for ``private_key``; raise CmsError otherwise.

    ``key_identifier`` (SHA-256 of the SPKI) may be passed by callers that keep it,
    to save recomputing it per call. WrongRecipientError is raised before any RSA
    operation when the envelope names another key.
    """
    if not isinstance(ciphertext_for_recipient, bytes | bytearray | memoryview):
        raise CmsError("envelope must be bytes")
    envelope = parse_envelope(bytes(ciphertext_for_recipient))
    if key_identifier is None:
        key_identifier = key_identifier_for(private_key)
    if not hmac.compare_digest(envelope.key_identifier, key_identifier):
        raise WrongRecipientError(
            "envelope is for another key: subjectKeyIdentifier "
            f"{envelope.key_identifier.hex()} is not ours ({key_identifier.hex()})"
        )
    try:
        content_key = private_key.decrypt(envelope.encrypted_key, _OAEP_SHA256)
    except ValueError:
        raise CmsError("content key unwrap failed (RSAES-OAEP decryption error)") from None
    if len(content_key) != 32:
        raise CmsError(f"content key is {len(content_key)} bytes, AES-256 needs 32")
    decryptor = Cipher(algorithms.AES256(content_key), modes.CBC(envelope.iv)).decryptor()
    padded = decryptor.update(envelope.encrypted_content) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise CmsError("bad PKCS#7 padding after decryption") from None


class Envelope(NamedTuple):
    """The fields of a KMS envelope, read but not decrypted."""

    key_identifier: bytes
    encrypted_key: bytes
    iv: bytes
    encrypted_content: bytes


def parse_envelope(data: bytes) -> Envelope:
    """Read and check an envelope's structure (raises CmsError); no key needed."""
    if not data:
        raise CmsError("envelope is empty")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise CmsError(f"envelope is {len(data)} bytes, more than {MAX_ENVELOPE_BYTES}")
    try:
        return _read_envelope(data)
    except CmsError:
        raise
    except Exception as exc:  # noqa: BLE001 - a safety net: every refusal is a CmsError
        raise CmsError(f"malformed envelope: {type(exc).__name__}") from None


# --- BER reader -----------------------------------------------------------------
# A single-pass reader for the BER subset CMS uses. asn1crypto's reader re-walks every
# nested indefinite-length value to find its end (KMS nests five of them), which made
# parsing cost a sixth of the RSA decryption; this one visits each byte once.

MAX_DEPTH = 16


class _Tlv(NamedTuple):
    cls: int
    constructed: bool
    tag: int
    contents: bytes  # value bytes; b"" for indefinite-length values
    children: tuple[_Tlv, ...] | None  # indefinite-length values only; others are lazy


# NamedTuple's generated __new__ is a Python-level call; building the tuple directly
# halves the cost per value.
_new_tlv: Callable[[type[_Tlv], tuple[int, bool, int, bytes, tuple[_Tlv, ...] | None]], _Tlv] = (
    tuple.__new__
)


def _read(data: bytes, pointer: int, limit: int, depth: int) -> tuple[_Tlv, int]:
    """Read one TLV starting at ``pointer``, not past ``limit``; return it and its end."""
    if depth > MAX_DEPTH:
        raise CmsError("envelope is nested too deeply")
    if pointer >= limit:
        raise CmsError("envelope is truncated")
    first = data[pointer]
    pointer += 1
    cls = first >> 6
    constructed = bool(first & 0x20)
    tag = first & 0x1F
    if tag == 0x1F:  # high tag number form, base 128
        tag = 0
        for _ in range(4):
            if pointer >= limit:
                raise CmsError("envelope is truncated in a tag")
            byte = data[pointer]
            pointer += 1
            tag = (tag << 7) | (byte & 0x7F)
            if not byte & 0x80:
                break
        else:
            raise CmsError("tag number too large")
    if pointer >= limit:
        raise CmsError("envelope is truncated in a length")
    length = data[pointer]
    pointer += 1
    if length == 0x80:  # indefinite: children up to the end-of-contents octets
        if not constructed:
            raise CmsError("indefinite length on a primitive value")
        children, end = _read_children(data, pointer, limit, depth, indefinite=True)
        return _new_tlv(_Tlv, (cls, True, tag, b"", children)), end
    if length & 0x80:
        count = length & 0x7F
        if count > 4 or pointer + count > limit:
            raise CmsError("bad or truncated length")
        length = int.from_bytes(data[pointer : pointer + count], "big")
        pointer += count
    end = pointer + length
    if end > limit:
        raise CmsError("envelope is truncated")
    # Definite-length values keep their bytes; constructed ones are read when visited
    # (the walk visits only the fields it checks).
    return _new_tlv(_Tlv, (cls, constructed, tag, data[pointer:end], None)), end


def _read_children(
    data: bytes, pointer: int, limit: int, depth: int, *, indefinite: bool
) -> tuple[tuple[_Tlv, ...], int]:
    children: list[_Tlv] = []
    while True:
        if indefinite:
            if pointer + 2 <= limit and data[pointer] == 0 and data[pointer + 1] == 0:
                return tuple(children), pointer + 2
        elif pointer >= limit:
            return tuple(children), pointer
        # Fast path for the common case, a primitive value with a short length
        # (OIDs, integers, IVs, short strings): no call, no tag or length decoding.
        if pointer + 1 < limit:
            first = data[pointer]
            length = data[pointer + 1]
            if not first & 0x20 and first & 0x1F != 0x1F and length < 0x80:
                end = pointer + 2 + length
                if end > limit:
                    raise CmsError("envelope is truncated")
                children.append(
                    _new_tlv(_Tlv, (first >> 6, False, first & 0x1F, data[pointer + 2 : end], None))
                )
                pointer = end
                continue
        child, pointer = _read(data, pointer, limit, depth + 1)
        children.append(child)


def _children(tlv: _Tlv, what: str) -> tuple[_Tlv, ...]:
    if not tlv.constructed:
        raise CmsError(f"{what} is not a constructed value")
    if tlv.children is not None:
        return tlv.children
    return _read_children(tlv.contents, 0, len(tlv.contents), 0, indefinite=False)[0]


def _expect(tlv: _Tlv, tag: int, what: str, cls: int = _UNIVERSAL) -> _Tlv:
    if tlv.cls != cls or tlv.tag != tag:
        raise CmsError(f"{what} has the wrong ASN.1 type")
    if tag in (_SEQUENCE, _SET) and not tlv.constructed:
        raise CmsError(f"{what} is not a constructed value")
    return tlv


def _fields(tlv: _Tlv, what: str, minimum: int, maximum: int) -> tuple[_Tlv, ...]:
    items = _children(_expect(tlv, _SEQUENCE, what), what)
    if not minimum <= len(items) <= maximum:
        raise CmsError(f"{what} has {len(items)} fields, expected {minimum}..{maximum}")
    return items


def _octets(tlv: _Tlv, what: str, depth: int = 0) -> bytes:
    """An OCTET STRING's value, primitive or BER-constructed from chunks."""
    if not tlv.constructed:
        return tlv.contents
    if depth >= MAX_CHUNK_DEPTH:
        raise CmsError(f"{what} is nested too deeply")
    chunks = _children(tlv, what)
    for chunk in chunks:
        _expect(chunk, _OCTET_STRING, f"a chunk of {what}")
    return b"".join(_octets(chunk, what, depth + 1) for chunk in chunks)


def _oid(tlv: _Tlv, what: str) -> bytes:
    if tlv.constructed:
        raise CmsError(f"{what} is not an OBJECT IDENTIFIER")
    return _expect(tlv, _OID, what).contents


def _dotted(oid: bytes) -> str:
    """An OBJECT IDENTIFIER's contents in dotted form (X.690 8.19), for error messages;
    hex when the contents do not decode."""
    arcs: list[int] = []
    value = 0
    for byte in oid:
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs or oid[-1] & 0x80:
        return oid.hex()
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


def _integer(tlv: _Tlv, what: str) -> int:
    if tlv.constructed or not 0 < len(tlv.contents) <= 8:
        raise CmsError(f"{what} is not a small INTEGER")
    return int.from_bytes(_expect(tlv, _INTEGER, what).contents, "big", signed=True)


def _algorithm(tlv: _Tlv, what: str) -> tuple[bytes, _Tlv | None]:
    items = _fields(tlv, what, 1, 2)
    return _oid(items[0], what), items[1] if len(items) == 2 else None


def _read_envelope(data: bytes) -> Envelope:
    top, end = _read(data, 0, len(data), 0)
    # KMS pads its blobs with zero bytes, which we accept; nothing else may follow.
    if data.count(0, end) != len(data) - end:
        raise CmsError(f"unexpected bytes after the envelope at offset {end}")
    content_type, content = _fields(top, "ContentInfo", 2, 2)
    if (oid := _oid(content_type, "ContentInfo contentType")) != _OID_ENVELOPED_DATA:
        raise CmsError(f"content type is {_dotted(oid)}, expected envelopedData")
    _expect(content, 0, "ContentInfo content", cls=_CONTEXT)
    wrapped = _children(content, "ContentInfo content")
    if len(wrapped) != 1:
        raise CmsError("ContentInfo content must hold exactly one value")
    enveloped = _fields(wrapped[0], "EnvelopedData", 3, 5)

    if (version := _integer(enveloped[0], "EnvelopedData version")) != 2:
        raise CmsError(f"EnvelopedData version is {version}, expected 2")
    rest = enveloped[1:]
    if rest[0].cls == _CONTEXT and rest[0].tag == 0:
        rest = rest[1:]  # originatorInfo (certificates, CRLs): not used by KMS, no meaning here
    if not 2 <= len(rest) <= 3:
        raise CmsError("EnvelopedData lacks recipientInfos or encryptedContentInfo")
    recipient_infos, content_info = rest[0], rest[1]
    if len(rest) == 3 and not (rest[2].cls == _CONTEXT and rest[2].tag == 1):
        raise CmsError("unexpected field after EnvelopedData encryptedContentInfo")

    recipients = _children(_expect(recipient_infos, _SET, "recipientInfos"), "recipientInfos")
    if len(recipients) != 1:
        raise CmsError(f"envelope has {len(recipients)} recipients, expected exactly one")
    if recipients[0].cls != _UNIVERSAL or recipients[0].tag != _SEQUENCE:
        raise CmsError("recipient is not a KeyTransRecipientInfo")
    ktri = _fields(recipients[0], "KeyTransRecipientInfo", 4, 4)
    if (version := _integer(ktri[0], "KeyTransRecipientInfo version")) != 2:
        raise CmsError(f"KeyTransRecipientInfo version is {version}, expected 2")
    rid = ktri[1]
    if rid.cls != _CONTEXT or rid.tag != 0:
        raise CmsError("recipient is named by issuer and serial, expected subjectKeyIdentifier")
    key_identifier = _octets(rid, "subjectKeyIdentifier")
    if len(key_identifier) != 32:
        raise CmsError(f"subjectKeyIdentifier is {len(key_identifier)} bytes, expected 32")
    _check_key_encryption(ktri[2])
    encrypted_key = _octets(_expect(ktri[3], _OCTET_STRING, "encryptedKey"), "encryptedKey")

    encrypted = _fields(content_info, "EncryptedContentInfo", 2, 3)
    if (oid := _oid(encrypted[0], "encrypted content type")) != _OID_DATA:
        raise CmsError(f"encrypted content type is {_dotted(oid)}, expected id-data")
    algorithm, parameters = _algorithm(encrypted[1], "contentEncryptionAlgorithm")
    if algorithm != _OID_AES_256_CBC:
        raise CmsError(f"content encryption is {_dotted(algorithm)}, expected AES-256-CBC")
    if parameters is None or parameters.cls != _UNIVERSAL or parameters.tag != _OCTET_STRING:
        raise CmsError("AES-256-CBC parameters must be a 16-byte IV")
    iv = _octets(parameters, "AES-256-CBC IV")
    if len(iv) != 16:
        raise CmsError("AES-256-CBC parameters must be a 16-byte IV")
    if len(encrypted) != 3:
        raise CmsError("envelope carries no encrypted content")
    _expect(encrypted[2], 0, "encryptedContent", cls=_CONTEXT)
    encrypted_content = _octets(encrypted[2], "encryptedContent")
    if not encrypted_content:
        raise CmsError("envelope carries no encrypted content")
    if len(encrypted_content) % 16:
        raise CmsError(f"encrypted content is {len(encrypted_content)} bytes, not a multiple of 16")
    return Envelope(key_identifier, encrypted_key, iv, encrypted_content)


def _hash_parameters_ok(parameters: _Tlv | None) -> bool:
    # AlgorithmIdentifier parameters for SHA-2: absent or NULL (both seen in the wild).
    return parameters is None or (
        parameters.cls == _UNIVERSAL and parameters.tag == _NULL and not parameters.contents
    )


def _short_der(tag: int, contents: bytes) -> bytes:
    assert len(contents) < 0x80
    return bytes((tag, len(contents))) + contents


def _accepted_oaep_identifiers() -> frozenset[bytes]:
    """The DER contents of every RSAES-OAEP-SHA-256 AlgorithmIdentifier we accept:
    SHA-256 parameters absent or NULL, label source absent or an empty pSpecified."""
    oid = 0x06
    accepted = set()
    for hash_null in (False, True):
        for mgf_hash_null in (False, True):
            for label in (False, True):
                sha256 = _short_der(oid, _OID_SHA256) + (b"\x05\x00" if hash_null else b"")
                mgf_sha256 = _short_der(oid, _OID_SHA256) + (b"\x05\x00" if mgf_hash_null else b"")
                mgf = _short_der(oid, _OID_MGF1) + _short_der(0x30, mgf_sha256)
                params = _short_der(0xA0, _short_der(0x30, sha256)) + _short_der(
                    0xA1, _short_der(0x30, mgf)
                )
                if label:
                    source = _short_der(oid, _OID_P_SPECIFIED) + b"\x04\x00"
                    params += _short_der(0xA2, _short_der(0x30, source))
                accepted.add(_short_der(oid, _OID_RSAES_OAEP) + _short_der(0x30, params))
    return frozenset(accepted)


_ACCEPTED_OAEP = _accepted_oaep_identifiers()


def _check_key_encryption(tlv: _Tlv) -> None:
    # Fast path: the exact DER forms KMS and OpenSSL write; anything else (other
    # parameters, BER forms) goes through the full check below.
    if (
        tlv.cls == _UNIVERSAL
        and tlv.tag == _SEQUENCE
        and tlv.constructed
        and tlv.contents in _ACCEPTED_OAEP
    ):
        return
    _check_oaep_structure(tlv)


def _check_oaep_structure(tlv: _Tlv) -> None:
    algorithm, parameters = _algorithm(tlv, "keyEncryptionAlgorithm")
    if algorithm != _OID_RSAES_OAEP:
        raise CmsError(f"key encryption is {_dotted(algorithm)}, expected RSAES-OAEP")
    if parameters is None:
        raise CmsError("RSAES-OAEP hash is sha1 (parameters absent), expected sha256")
    # RSAES-OAEP-params: [0] hash, [1] mask generation, [2] label source, each optional
    # with RFC 4055 defaults (SHA-1, MGF1-SHA-1, empty label).
    explicit: dict[int, _Tlv] = {}
    for item in _children(_expect(parameters, _SEQUENCE, "RSAES-OAEP parameters"), "params"):
        if item.cls != _CONTEXT or item.tag in explicit or item.tag > 2:
            raise CmsError("RSAES-OAEP parameters are malformed")
        inner = _children(item, "RSAES-OAEP parameter")
        if len(inner) != 1:
            raise CmsError("RSAES-OAEP parameters are malformed")
        explicit[item.tag] = inner[0]

    hash_oid, hash_parameters = (
        _algorithm(explicit[0], "OAEP hash") if 0 in explicit else (b"\x2b\x0e\x03\x02\x1a", None)
    )
    if hash_oid != _OID_SHA256 or not _hash_parameters_ok(hash_parameters):
        name = _HASH_NAMES.get(hash_oid, _dotted(hash_oid))
        raise CmsError(f"RSAES-OAEP hash is {name}, expected sha256")

    if 1 not in explicit:
        raise CmsError("RSAES-OAEP mask generation is mgf1/sha1 (default), expected mgf1/sha256")
    mgf_oid, mgf_parameters = _algorithm(explicit[1], "OAEP mask generation")
    mgf_hash = _algorithm(mgf_parameters, "MGF1 hash") if mgf_parameters else None
    if (
        mgf_oid != _OID_MGF1
        or mgf_hash is None
        or mgf_hash[0] != _OID_SHA256
        or not _hash_parameters_ok(mgf_hash[1])
    ):
        described = _HASH_NAMES.get(mgf_hash[0], _dotted(mgf_hash[0])) if mgf_hash else "?"
        raise CmsError(
            f"RSAES-OAEP mask generation is {_dotted(mgf_oid)}/{described}, expected mgf1/sha256"
        )

    if 2 in explicit:
        source_oid, label = _algorithm(explicit[2], "OAEP label source")
        if (
            source_oid != _OID_P_SPECIFIED
            or label is None
            or label.cls != _UNIVERSAL
            or label.tag != _OCTET_STRING
            or _octets(label, "OAEP label")
        ):
            raise CmsError("RSAES-OAEP label must be empty")
