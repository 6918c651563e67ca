"""Build `CiphertextForRecipient` envelopes byte for byte in the shape AWS KMS uses.

Every real KMS blob (see ../shared/vectors/cms/) is a BER ContentInfo whose outer
layers use indefinite lengths:

    ContentInfo            SEQUENCE (indefinite)
      contentType          id-envelopedData
      content [0]          (indefinite)
        EnvelopedData      SEQUENCE (indefinite)
          version          2
          recipientInfos   SET (definite) of one KeyTransRecipientInfo (definite, DER):
            version        2
            rid            [0] IMPLICIT subjectKeyIdentifier = SHA-256(SubjectPublicKeyInfo DER)
            keyEncAlg      rsaesOaep { [0] sha256 NULL, [1] mgf1 { sha256 NULL } }  (no pSource)
            encryptedKey   OCTET STRING
          encryptedContentInfo SEQUENCE (indefinite)
            contentType    id-data
            contentEncAlg  aes256-CBC, 16-byte IV
            encryptedContent [0] constructed (indefinite): OCTET STRINGs of at most 1000 bytes

No originatorInfo, no unprotectedAttrs. This module is pure: bytes in, bytes out.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# Chunk size of the constructed encrypted content, as in the real 4112-byte KMS blob.
CONTENT_CHUNK = 1000
MIN_RSA_BITS = 2048

_OID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
_OID_DATA = "1.2.840.113549.1.7.1"
_OID_RSAES_OAEP = "1.2.840.113549.1.1.7"
_OID_MGF1 = "1.2.840.113549.1.1.8"
_OID_SHA256 = "2.16.840.1.101.3.4.2.1"
_OID_AES256_CBC = "2.16.840.1.101.3.4.1.42"

_EOC = b"\x00\x00"


class EnvelopeError(Exception):
    """The recipient key cannot receive an envelope (not RSA, too small, not DER)."""


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _length(len(content)) + content


def _indefinite(tag: int, *parts: bytes) -> bytes:
    return bytes([tag, 0x80]) + b"".join(parts) + _EOC


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _tlv(0x06, bytes(body))


def _sha256_algorithm() -> bytes:
    return _tlv(0x30, _oid(_OID_SHA256) + b"\x05\x00")


def _oaep_algorithm() -> bytes:
    params = _tlv(
        0x30,
        _tlv(0xA0, _sha256_algorithm())
        + _tlv(0xA1, _tlv(0x30, _oid(_OID_MGF1) + _sha256_algorithm())),
    )
    return _tlv(0x30, _oid(_OID_RSAES_OAEP) + params)


def load_recipient_key(recipient_public_key_der: bytes) -> rsa.RSAPublicKey:
    """The RSA public key (>= 2048 bits) in a DER SubjectPublicKeyInfo, or EnvelopeError."""
    try:
        key = serialization.load_der_public_key(recipient_public_key_der)
    except ValueError as exc:
        raise EnvelopeError("recipient public key is not a DER SubjectPublicKeyInfo") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise EnvelopeError("recipient public key is not an RSA key")
    if key.key_size < MIN_RSA_BITS:
        raise EnvelopeError(
            f"recipient RSA key has {key.key_size} bits, at least {MIN_RSA_BITS} are required"
        )
    return key


def encrypt_for_recipient(plaintext: bytes, recipient_public_key_der: bytes) -> bytes:
    """Envelope ``plaintext`` for the holder of the private half of the given RSA key."""
    public_key = load_recipient_key(recipient_public_key_der)
    # Identify the recipient by SHA-256 of the SPKI as KMS does, re-encoded to DER so a
    # caller's non-canonical encoding cannot change the identifier.
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_identifier = hashlib.sha256(spki).digest()

    content_key = os.urandom(32)
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    encrypted_content = encryptor.update(padded) + encryptor.finalize()
    encrypted_key = public_key.encrypt(
        content_key,
        OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    )

    key_trans = _tlv(
        0x30,
        _tlv(0x02, b"\x02")
        + _tlv(0x80, key_identifier)
        + _oaep_algorithm()
        + _tlv(0x04, encrypted_key),
    )
    chunks = [
        _tlv(0x04, encrypted_content[i : i + CONTENT_CHUNK])
        for i in range(0, len(encrypted_content), CONTENT_CHUNK)
    ]
    encrypted_content_info = _indefinite(
        0x30,
        _oid(_OID_DATA),
        _tlv(0x30, _oid(_OID_AES256_CBC) + _tlv(0x04, iv)),
        _indefinite(0xA0, *chunks),
    )
    enveloped_data = _indefinite(
        0x30, _tlv(0x02, b"\x02"), _tlv(0x31, key_trans), encrypted_content_info
    )
    return _indefinite(0x30, _oid(_OID_ENVELOPED_DATA), _indefinite(0xA0, enveloped_data))
