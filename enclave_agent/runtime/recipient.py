"""The enclave's KMS recipient keypair: RSA-2048, generated in memory, never written anywhere."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclave_agent.runtime.cms import decrypt_for_recipient

KEY_SIZE = 2048
PUBLIC_EXPONENT = 65537


class RecipientKey:
    """An RSA-2048 keypair whose public half goes into attestation documents for KMS."""

    __slots__ = ("_private_key", "key_identifier", "public_key_der")

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        numbers = private_key.public_key().public_numbers()
        if private_key.key_size != KEY_SIZE or numbers.e != PUBLIC_EXPONENT:
            raise ValueError("the recipient key must be RSA-2048 with e = 65537")
        self._private_key = private_key
        self.public_key_der: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # KMS names the recipient by SHA-256 of the DER SubjectPublicKeyInfo.
        self.key_identifier: bytes = hashlib.sha256(self.public_key_der).digest()

    @classmethod
    def generate(cls) -> RecipientKey:
        return cls(rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=KEY_SIZE))

    def open(self, ciphertext_for_recipient: bytes) -> bytes:
        """Decrypt a KMS ``CiphertextForRecipient`` made for this key (raises CmsError)."""
        return decrypt_for_recipient(
            ciphertext_for_recipient, self._private_key, key_identifier=self.key_identifier
        )

    def __repr__(self) -> str:
        # Never show key material; the identifier is public.
        return f"RecipientKey(key_identifier={self.key_identifier.hex()})"
