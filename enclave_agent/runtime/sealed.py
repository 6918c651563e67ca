"""Sealed secrets: the bytes a store holds for a named secret (pure: no I/O, no clock).

A secret kept in an AWS store (Secrets Manager, SSM Parameter Store, S3) or a file is
sealed by ``enclave-agent seal`` under a KMS key, bound to its name by the encryption
context ``{"enclave-kms:secret": NAME}``, in one of two forms (docs/secrets.md):

- **plain**: a value of at most ``MAX_PLAIN_VALUE`` bytes is one KMS ``Encrypt``; the
  sealed bytes are its ``CiphertextBlob`` as KMS returned it.
- **envelope**: a larger value (at most ``MAX_VALUE`` bytes) is AES-256-GCM under a data
  key from KMS ``GenerateDataKey`` (same key, same context), the name's UTF-8 bytes as
  associated data:

      offset  size     field
      0       8        MAGIC = C5 45 4B 4D 53 45 4E 56 (0xC5, then ASCII "EKMSENV")
      8       1        version = 1
      9       2        K: length of the data key's CiphertextBlob, big-endian, 1..6144
      11      4        C: length of ciphertext plus tag, big-endian, 17..65552
      15      K        the data key's KMS CiphertextBlob
      15+K    12       the GCM nonce
      27+K    C        the ciphertext followed by the 16-byte GCM tag

  nothing after it (the total is exactly 27 + K + C bytes).

Which form a blob is, is decided by its first byte: the envelope's is 0xC5, while a KMS
ciphertext begins with its format version, 0x01 (undocumented by AWS but constant),
and the local stand-in's (moto's) with an ASCII key id. A blob that begins with MAGIC
is an envelope or an error, never a plain ciphertext.

Nothing here is authentic by itself: a plain blob and an envelope's data key are
KMS ciphertexts that KMS opens only with the right context, and GCM refuses any
change to the envelope's body or a name other than the one it was sealed under.
The parser bounds every length before it reads, so untrusted bytes cost nothing
beyond their own size, which is at most ``MAX_SEALED_BYTES``.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CONTEXT_KEY = "enclave-kms:secret"
MAX_VALUE = 64 * 1024  # the largest secret value
MAX_PLAIN_VALUE = 4096  # KMS Encrypt's plaintext limit; larger values are enveloped
MAX_KMS_CIPHERTEXT = 6144  # KMS's CiphertextBlob limit (API reference, CiphertextBlob)
MAGIC = b"\xc5EKMSENV"
VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
DATA_KEY_BYTES = 32  # AES-256: GenerateDataKey with KeySpec AES_256
_HEADER = struct.Struct(">8sBHI")  # magic, version, K, C
HEADER_BYTES = _HEADER.size
MAX_SEALED_BYTES = HEADER_BYTES + MAX_KMS_CIPHERTEXT + NONCE_BYTES + MAX_VALUE + TAG_BYTES


class SealedFormatError(ValueError):
    """The bytes are not a sealed secret of a form this version reads; says why."""


class SealedOpenError(ValueError):
    """An envelope that parsed does not open under this data key and name."""


@dataclass(frozen=True)
class Plain:
    """A value sealed by KMS Encrypt: Decrypt ``ciphertext_blob`` with the context."""

    ciphertext_blob: bytes


@dataclass(frozen=True)
class Envelope:
    """A value sealed under a data key: Decrypt ``data_key_blob`` with the context,
    then ``open_envelope`` with the 32-byte key it gives."""

    data_key_blob: bytes
    nonce: bytes
    ciphertext: bytes  # the GCM ciphertext followed by its tag


def encryption_context(name: str) -> dict[str, str]:
    """The encryption context every sealed secret called ``name`` is bound to."""
    return {CONTEXT_KEY: name}


def digest_version(blob: bytes) -> str:
    """The version of sealed bytes that carry none of their own (a file): ``sha256:``
    and the first 16 hex digits of their SHA-256, what ``sha256sum`` prints first."""
    return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]


def parse_sealed(blob: bytes) -> Plain | Envelope:
    """The form of a sealed secret; SealedFormatError if it cannot be one."""
    if not blob:
        raise SealedFormatError("empty: a sealed secret has at least one byte")
    if len(blob) > MAX_SEALED_BYTES:
        raise SealedFormatError(
            f"{len(blob)} bytes, more than a sealed secret can be ({MAX_SEALED_BYTES})"
        )
    if blob[:1] != MAGIC[:1]:
        if len(blob) > MAX_KMS_CIPHERTEXT:
            raise SealedFormatError(
                f"{len(blob)} bytes without the envelope's magic: too long for a KMS "
                f"ciphertext (at most {MAX_KMS_CIPHERTEXT})"
            )
        return Plain(bytes(blob))
    if len(blob) < HEADER_BYTES or blob[: len(MAGIC)] != MAGIC:
        raise SealedFormatError("begins like an envelope but its magic is incomplete or wrong")
    _magic, version, key_length, ciphertext_length = _HEADER.unpack_from(blob)
    if version != VERSION:
        raise SealedFormatError(f"envelope version {version}; this agent reads version {VERSION}")
    if not 1 <= key_length <= MAX_KMS_CIPHERTEXT:
        raise SealedFormatError(
            f"envelope data key length {key_length}, not 1..{MAX_KMS_CIPHERTEXT}"
        )
    if not TAG_BYTES < ciphertext_length <= MAX_VALUE + TAG_BYTES:
        raise SealedFormatError(
            f"envelope ciphertext length {ciphertext_length}, "
            f"not {TAG_BYTES + 1}..{MAX_VALUE + TAG_BYTES}"
        )
    expected = HEADER_BYTES + key_length + NONCE_BYTES + ciphertext_length
    if len(blob) != expected:
        raise SealedFormatError(
            f"envelope of {len(blob)} bytes, but its lengths say {expected}"
            + (" (truncated)" if len(blob) < expected else " (bytes after its end)")
        )
    nonce_at = HEADER_BYTES + key_length
    return Envelope(
        data_key_blob=bytes(blob[HEADER_BYTES:nonce_at]),
        nonce=bytes(blob[nonce_at : nonce_at + NONCE_BYTES]),
        ciphertext=bytes(blob[nonce_at + NONCE_BYTES :]),
    )


def build_envelope(envelope: Envelope) -> bytes:
    """The bytes of ``envelope``; ValueError if a part is out of the format's bounds."""
    key_length, ciphertext_length = len(envelope.data_key_blob), len(envelope.ciphertext)
    if not 1 <= key_length <= MAX_KMS_CIPHERTEXT:
        raise ValueError(f"data key blob of {key_length} bytes, not 1..{MAX_KMS_CIPHERTEXT}")
    if len(envelope.nonce) != NONCE_BYTES:
        raise ValueError(f"nonce of {len(envelope.nonce)} bytes, not {NONCE_BYTES}")
    if not TAG_BYTES < ciphertext_length <= MAX_VALUE + TAG_BYTES:
        raise ValueError(f"ciphertext of {ciphertext_length} bytes is out of bounds")
    header = _HEADER.pack(MAGIC, VERSION, key_length, ciphertext_length)
    return header + envelope.data_key_blob + envelope.nonce + envelope.ciphertext


def seal_envelope(
    name: str, value: bytes, data_key: bytes, data_key_blob: bytes, nonce: bytes
) -> bytes:
    """``value`` sealed under ``data_key`` (whose KMS ciphertext is ``data_key_blob``) for
    the secret ``name``. ``nonce``: 12 fresh random bytes, never reused with this key."""
    if not 1 <= len(value) <= MAX_VALUE:
        raise ValueError(f"a value of {len(value)} bytes cannot be sealed (1..{MAX_VALUE})")
    ciphertext = _aead(data_key).encrypt(nonce, value, name.encode())
    return build_envelope(Envelope(data_key_blob, nonce, ciphertext))


def open_envelope(name: str, envelope: Envelope, data_key: bytes) -> bytes:
    """The value in ``envelope``; SealedOpenError unless it was sealed for ``name``
    under ``data_key`` and is unchanged."""
    try:
        return _aead(data_key).decrypt(envelope.nonce, envelope.ciphertext, name.encode())
    except InvalidTag:
        raise SealedOpenError(
            "the envelope does not open: sealed for another secret name or changed"
        ) from None


def _aead(data_key: bytes) -> AESGCM:
    if len(data_key) != DATA_KEY_BYTES:
        raise SealedOpenError(f"a data key of {len(data_key)} bytes, not {DATA_KEY_BYTES}")
    return AESGCM(data_key)
