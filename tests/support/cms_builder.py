"""KMS-shaped CiphertextForRecipient envelopes built field by field with asn1crypto.

``build(recipient)`` makes the envelope KMS sends (EnvelopedData v2, one
KeyTransRecipientInfo named by SHA-256 of the SPKI, RSAES-OAEP-SHA-256, AES-256-CBC);
each keyword changes one field, so a test can break exactly one thing.
"""

from __future__ import annotations

import os
from typing import Any

from asn1crypto import algos, cms, core
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from enclave_agent.runtime.recipient import RecipientKey


def oaep_params(hash_name: str = "sha256", label: bytes = b"") -> dict[str, Any]:
    return {
        "hash_algorithm": {"algorithm": hash_name},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": hash_name}},
        "p_source_algorithm": {"algorithm": "p_specified", "parameters": label},
    }


def build(
    recipient: RecipientKey,
    plaintext: bytes = b"the secret",
    *,
    version: str = "v2",
    ktri_version: str = "v2",
    key_identifier: bytes | None = None,
    oaep_hash: str = "sha256",
    label: bytes = b"",
    content_algorithm: str = "aes256_cbc",
    iv: bytes | None = None,
    content_key: bytes | None = None,
    recipients: int = 1,
    pad: bool = True,
    content_type: str = "enveloped_data",
) -> bytes:
    content_key = content_key if content_key is not None else os.urandom(32)
    iv = iv if iv is not None else os.urandom(16)
    wrapped = recipient._private_key.public_key().encrypt(
        content_key,
        OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=label or None),
    )
    if pad:
        padder = padding.PKCS7(128).padder()
        plaintext = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(
        algorithms.AES(content_key[:32]), modes.CBC((iv + bytes(16))[:16])
    ).encryptor()
    encrypted = encryptor.update(plaintext) + encryptor.finalize()
    ktri = cms.KeyTransRecipientInfo(
        {
            "version": ktri_version,
            "rid": cms.RecipientIdentifier(
                name="subject_key_identifier",
                value=key_identifier if key_identifier is not None else recipient.key_identifier,
            ),
            "key_encryption_algorithm": {
                "algorithm": "rsaes_oaep",
                "parameters": oaep_params(oaep_hash, label),
            },
            "encrypted_key": wrapped,
        }
    )
    enveloped = cms.EnvelopedData(
        {
            "version": version,
            "recipient_infos": [cms.RecipientInfo(name="ktri", value=ktri)] * recipients,
            "encrypted_content_info": {
                "content_type": "data",
                "content_encryption_algorithm": algos.EncryptionAlgorithm(
                    {"algorithm": content_algorithm, "parameters": core.OctetString(iv)}
                ),
                "encrypted_content": encrypted,
            },
        }
    )
    return cms.ContentInfo({"content_type": content_type, "content": enveloped}).dump()
