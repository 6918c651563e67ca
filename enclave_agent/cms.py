"""Opening KMS ``CiphertextForRecipient`` envelopes (CMS EnvelopedData, RFC 5652).

KMS answers a call that carries a ``Recipient`` with a BER ContentInfo wrapping
EnvelopedData version 2: one KeyTransRecipientInfo (version 2) naming our key by
its subjectKeyIdentifier (SHA-256 of our DER SubjectPublicKeyInfo), the content key
wrapped with RSAES-OAEP (SHA-256, MGF1-SHA-256, empty label), and the content
encrypted with AES-256-CBC and PKCS#7 padding. `cryptography`'s PKCS#7 functions
take neither OAEP nor BER, so the structure is read with asn1crypto.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from asn1crypto import cms as asn1_cms
from asn1crypto import parser as asn1_parser
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

RSAES_OAEP = "1.2.840.113549.1.1.7"
AES_256_CBC = "2.16.840.1.101.3.4.1.42"
MAX_ENVELOPE_BYTES = 1 << 20  # KMS plaintexts are at most 4 KiB; a megabyte is plenty.

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
    data = bytes(ciphertext_for_recipient)
    envelope = _parse(data)
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


class _Envelope:
    __slots__ = ("encrypted_content", "encrypted_key", "iv", "key_identifier")

    def __init__(
        self, key_identifier: bytes, encrypted_key: bytes, iv: bytes, encrypted_content: bytes
    ) -> None:
        self.key_identifier = key_identifier
        self.encrypted_key = encrypted_key
        self.iv = iv
        self.encrypted_content = encrypted_content


def _parse(data: bytes) -> _Envelope:
    if not data:
        raise CmsError("envelope is empty")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise CmsError(f"envelope is {len(data)} bytes, more than {MAX_ENVELOPE_BYTES}")
    try:
        return _read_envelope(data)
    except CmsError:
        raise
    except Exception as exc:  # noqa: BLE001 - asn1crypto raises many types on malformed BER
        raise CmsError(f"malformed envelope: {type(exc).__name__}: {exc}") from None


def _read_envelope(data: bytes) -> _Envelope:
    # Find where the outer structure ends: KMS pads its blobs with zero bytes, which
    # we accept; anything else after the structure is refused.
    _, _, _, header, contents, trailer = asn1_parser.parse(data)
    end = len(header) + len(contents) + len(trailer)
    if data[end:].strip(b"\x00"):
        raise CmsError(f"unexpected bytes after the envelope at offset {end}")
    content_info = asn1_cms.ContentInfo.load(data[:end], strict=True)
    if content_info["content_type"].dotted != "1.2.840.113549.1.7.3":
        raise CmsError(
            f"content type is {content_info['content_type'].dotted}, expected envelopedData"
        )
    enveloped: Any = content_info["content"]
    if enveloped["version"].native != "v2":
        raise CmsError(f"EnvelopedData version is {enveloped['version'].native}, expected v2")
    recipients = enveloped["recipient_infos"]
    if len(recipients) != 1:
        raise CmsError(f"envelope has {len(recipients)} recipients, expected exactly one")
    recipient = recipients[0]
    if recipient.name != "ktri":
        raise CmsError(f"recipient is {recipient.name}, expected KeyTransRecipientInfo")
    ktri = recipient.chosen
    if ktri["version"].native != "v2":
        raise CmsError(f"KeyTransRecipientInfo version is {ktri['version'].native}, expected v2")
    rid = ktri["rid"]
    if rid.name != "subject_key_identifier":
        raise CmsError("recipient is named by issuer and serial, expected subjectKeyIdentifier")
    key_identifier = rid.chosen.native
    if len(key_identifier) != 32:
        raise CmsError(f"subjectKeyIdentifier is {len(key_identifier)} bytes, expected 32")
    _check_key_encryption(ktri["key_encryption_algorithm"])
    encrypted_key = ktri["encrypted_key"].native

    content = enveloped["encrypted_content_info"]
    algorithm = content["content_encryption_algorithm"]
    if algorithm["algorithm"].dotted != AES_256_CBC:
        raise CmsError(
            f"content encryption is {algorithm['algorithm'].dotted}, expected AES-256-CBC"
        )
    iv = algorithm["parameters"].native
    if not isinstance(iv, bytes) or len(iv) != 16:
        raise CmsError("AES-256-CBC parameters must be a 16-byte IV")
    encrypted_content = content["encrypted_content"].native
    if not isinstance(encrypted_content, bytes) or not encrypted_content:
        raise CmsError("envelope carries no encrypted content")
    if len(encrypted_content) % 16:
        raise CmsError(f"encrypted content is {len(encrypted_content)} bytes, not a multiple of 16")
    return _Envelope(key_identifier, encrypted_key, iv, encrypted_content)


def _check_key_encryption(algorithm: Any) -> None:
    if algorithm["algorithm"].dotted != RSAES_OAEP:
        raise CmsError(f"key encryption is {algorithm['algorithm'].dotted}, expected RSAES-OAEP")
    params = algorithm["parameters"]
    # Absent fields take RFC 4055's defaults (SHA-1), which KMS never uses.
    hash_name = params["hash_algorithm"]["algorithm"].native
    mgf = params["mask_gen_algorithm"]
    mgf_name = mgf["algorithm"].native
    mgf_hash = mgf["parameters"]["algorithm"].native
    label_source = params["p_source_algorithm"]
    if hash_name != "sha256":
        raise CmsError(f"RSAES-OAEP hash is {hash_name}, expected sha256")
    if mgf_name != "mgf1" or mgf_hash != "sha256":
        raise CmsError(f"RSAES-OAEP mask generation is {mgf_name}/{mgf_hash}, expected mgf1/sha256")
    if label_source["algorithm"].native != "p_specified" or label_source["parameters"].native:
        raise CmsError("RSAES-OAEP label must be empty")
