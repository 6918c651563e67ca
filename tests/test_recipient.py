"""The in-memory recipient keypair."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclave_agent.recipient import RecipientKey


def test_generate_is_rsa_2048_with_standard_exponent() -> None:
    key = RecipientKey.generate()
    public = serialization.load_der_public_key(key.public_key_der)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048
    assert public.public_numbers().e == 65537


def test_key_identifier_is_sha256_of_spki() -> None:
    key = RecipientKey.generate()
    assert key.key_identifier == hashlib.sha256(key.public_key_der).digest()


def test_each_generation_is_fresh() -> None:
    assert RecipientKey.generate().public_key_der != RecipientKey.generate().public_key_der


def test_repr_shows_no_key_material() -> None:
    key = RecipientKey.generate()
    text = repr(key) + str(key)
    assert key.key_identifier.hex() in text
    assert "PRIVATE" not in text
    assert key.public_key_der.hex() not in text
