"""KMS CiphertextForRecipient envelopes: real vectors and hand-made damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclave_agent.runtime.cms import CmsError, WrongRecipientError, decrypt_for_recipient
from enclave_agent.runtime.recipient import RecipientKey

PARSE_ONLY = [
    "sdkc_kms_response_parse_only.ber",
    "rustcrypto_kms_1.ber",
    "rustcrypto_kms_3.ber",
    "rustcrypto_kms_4_chunked.ber",
]


def _enclaver(vectors_dir: Path) -> tuple[bytes, rsa.RSAPrivateKey, bytes]:
    cms = vectors_dir / "cms"
    key = serialization.load_pem_private_key(
        (cms / "enclaver_recipient_key.pem").read_bytes(), None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    return (
        (cms / "enclaver_kms_response.ber").read_bytes(),
        key,
        (cms / "enclaver_expected_plaintext.bin").read_bytes(),
    )


def test_real_kms_response_decrypts_to_expected_bytes(vectors_dir: Path) -> None:
    blob, key, expected = _enclaver(vectors_dir)
    assert blob.endswith(b"\x00")  # the trailing zero bytes KMS leaves are accepted
    assert decrypt_for_recipient(blob, key) == expected
    assert len(expected) == 32


def test_real_kms_response_via_recipient_key(vectors_dir: Path) -> None:
    blob, key, expected = _enclaver(vectors_dir)
    assert RecipientKey(key).open(blob) == expected


@pytest.mark.parametrize("name", PARSE_ONLY)
def test_parse_only_vectors_are_refused_as_another_key(vectors_dir: Path, name: str) -> None:
    blob = (vectors_dir / "cms" / name).read_bytes()
    expected = {
        row["file"]: row
        for row in map(json.loads, (vectors_dir / "expected.jsonl").read_text().splitlines())
    }[name]
    recipient = RecipientKey.generate()
    with pytest.raises(WrongRecipientError) as caught:
        recipient.open(blob)
    # The refusal names the envelope's identifier, which the independent decoder read too.
    assert expected["subject_key_identifier"] in str(caught.value)


def test_wrong_recipient_is_checked_before_any_rsa_operation(vectors_dir: Path) -> None:
    blob, _, _ = _enclaver(vectors_dir)

    class NoRsa:
        """A key whose private operations must not be reached."""

        def public_key(self) -> rsa.RSAPublicKey:
            return RecipientKey.generate()._private_key.public_key()

        def decrypt(self, *args: object) -> bytes:
            raise AssertionError("RSA decryption attempted for another key's envelope")

    with pytest.raises(WrongRecipientError):
        decrypt_for_recipient(blob, NoRsa())  # type: ignore[arg-type]


def test_trailing_garbage_is_refused(vectors_dir: Path) -> None:
    blob, key, _ = _enclaver(vectors_dir)
    with pytest.raises(CmsError, match="unexpected bytes after"):
        decrypt_for_recipient(blob + b"\x01", key)


def test_truncated_envelope_is_refused(vectors_dir: Path) -> None:
    blob, key, _ = _enclaver(vectors_dir)
    for cut in (0, 1, 10, 100, len(blob.rstrip(b"\x00")) - 3):
        with pytest.raises(CmsError):
            decrypt_for_recipient(blob[:cut], key)


def test_damaged_content_is_a_cms_error_not_wrong_recipient(vectors_dir: Path) -> None:
    blob, key, _ = _enclaver(vectors_dir)
    core = blob.rstrip(b"\x00")
    damaged = bytearray(core)
    damaged[-20] ^= 0x01  # inside the encrypted content: padding check fails
    with pytest.raises(CmsError) as caught:
        decrypt_for_recipient(bytes(damaged), key)
    assert not isinstance(caught.value, WrongRecipientError)


def test_damaged_wrapped_key_is_refused(vectors_dir: Path) -> None:
    blob, key, _ = _enclaver(vectors_dir)
    # The 256-byte wrapped key follows its OCTET STRING header (04 82 01 00).
    at = blob.index(b"\x04\x82\x01\x00") + 4 + 100
    damaged = bytearray(blob)
    damaged[at] ^= 0x80
    with pytest.raises(CmsError, match="unwrap"):
        decrypt_for_recipient(bytes(damaged), key)


def test_primitive_key_encryption_sequence_is_refused(vectors_dir: Path) -> None:
    """The fast path for known OAEP identifiers accepts only what the full check does:
    a SEQUENCE encoded as primitive (0x10) is malformed however its contents read."""
    blob, key, _ = _enclaver(vectors_dir)
    oaep = blob.index(bytes.fromhex("06092a864886f70d010107"))  # rsaes-oaep OID
    assert blob[oaep - 2] == 0x30
    damaged = bytearray(blob)
    damaged[oaep - 2] = 0x10
    with pytest.raises(CmsError, match="not a constructed value"):
        decrypt_for_recipient(bytes(damaged), key)


def test_not_bytes_is_refused() -> None:
    key = RecipientKey.generate()
    with pytest.raises(CmsError):
        key.open("not bytes")  # type: ignore[arg-type]
