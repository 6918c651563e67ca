"""The local KMS envelope has the real KMS blobs' structure and opens with independent tools."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.local_kms.envelope import CONTENT_CHUNK, EnvelopeError, encrypt_for_recipient
from enclave_agent.runtime.cms import decrypt_for_recipient
from tests.support.openssl_cms import openssl_decrypt, spki

# Real KMS blob → (its encrypted content length, whether it is chunked-constructed).
REAL_BLOBS = {
    "enclaver_kms_response.ber": 48,
    "sdkc_kms_response_parse_only.ber": 48,
    "rustcrypto_kms_1.ber": 16,
    "rustcrypto_kms_4_chunked.ber": 4112,
}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def skeleton(data: bytes) -> list[tuple[int, int, str]]:
    """(depth, tag byte, length | 'inf' | 'eoc') of every TLV, walking BER in order."""
    out: list[tuple[int, int, str]] = []

    def element(pos: int, depth: int) -> int:
        tag, first = data[pos], data[pos + 1]
        pos += 2
        if first == 0x80:
            out.append((depth, tag, "inf"))
            while data[pos : pos + 2] != b"\x00\x00":
                pos = element(pos, depth + 1)
            out.append((depth + 1, 0, "eoc"))
            return pos + 2
        length = first
        if first & 0x80:
            length = int.from_bytes(data[pos : pos + (first & 0x7F)], "big")
            pos += first & 0x7F
        out.append((depth, tag, str(length)))
        if tag & 0x20:
            child = pos
            while child < pos + length:
                child = element(child, depth + 1)
        return pos + length

    end = element(0, 0)
    assert data[end:] == b"", "bytes after the outer ContentInfo"
    return out


@pytest.mark.parametrize("name", sorted(REAL_BLOBS))
def test_envelope_has_the_real_blobs_byte_structure(
    vectors_dir: Path, rsa_key: rsa.RSAPrivateKey, name: str
) -> None:
    real = (vectors_dir / "cms" / name).read_bytes()
    ours = encrypt_for_recipient(b"s" * (REAL_BLOBS[name] - 1), spki(rsa_key))
    # Same tags, same lengths, indefinite in the same places, EOCs in the same places.
    assert skeleton(ours) == skeleton(real)
    assert len(ours) == len(real)


def test_primitive_content_blob_differs_only_in_content_encoding(
    vectors_dir: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    # rustcrypto_kms_3 carries its 16 content bytes in a primitive [0]; ours (like the
    # other four real blobs) uses a constructed indefinite [0]. Everything before agrees.
    real = skeleton((vectors_dir / "cms" / "rustcrypto_kms_3.ber").read_bytes())
    ours = skeleton(encrypt_for_recipient(b"s" * 15, spki(rsa_key)))
    content_at = real.index((4, 0x80, "16"))
    assert ours[:content_at] == real[:content_at]
    assert ours[content_at : content_at + 3] == [(4, 0xA0, "inf"), (5, 0x04, "16"), (5, 0, "eoc")]


@pytest.mark.parametrize("name", [*sorted(REAL_BLOBS), "rustcrypto_kms_3.ber"])
def test_envelope_fields_match_real_blob_with_asn1crypto(
    vectors_dir: Path, rsa_key: rsa.RSAPrivateKey, name: str
) -> None:
    real = cms.ContentInfo.load((vectors_dir / "cms" / name).read_bytes())
    ours = cms.ContentInfo.load(encrypt_for_recipient(b"payload", spki(rsa_key)))
    for info in (real, ours):
        assert info["content_type"].native == "enveloped_data"
        env = info["content"]
        assert env["version"].native == "v2"
        assert env["originator_info"].native is None
        assert env["unprotected_attrs"].native is None
        assert len(env["recipient_infos"]) == 1
        recipient = env["recipient_infos"][0]
        assert recipient.name == "ktri"
        ktri = recipient.chosen
        assert ktri["version"].native == "v2"
        assert ktri["rid"].name == "subject_key_identifier"
        assert len(ktri["rid"].chosen.native) == 32
        assert len(ktri["encrypted_key"].native) == 256
        eci = env["encrypted_content_info"]
        assert eci["content_type"].native == "data"
        assert eci["content_encryption_algorithm"]["algorithm"].native == "aes256_cbc"
        assert len(eci["content_encryption_algorithm"]["parameters"].native) == 16
        assert len(eci["encrypted_content"].native) % 16 == 0
    real_ktri = real["content"]["recipient_infos"][0].chosen
    ours_ktri = ours["content"]["recipient_infos"][0].chosen
    assert (
        ours_ktri["key_encryption_algorithm"].dump() == real_ktri["key_encryption_algorithm"].dump()
    )
    assert ours_ktri["key_encryption_algorithm"].native == {
        "algorithm": "rsaes_oaep",
        "parameters": {
            "hash_algorithm": {"algorithm": "sha256", "parameters": None},
            "mask_gen_algorithm": {
                "algorithm": "mgf1",
                "parameters": {"algorithm": "sha256", "parameters": None},
            },
            "p_source_algorithm": {"algorithm": "p_specified", "parameters": b""},
        },
    }
    assert ours_ktri["rid"].chosen.native == hashlib.sha256(spki(rsa_key)).digest()


def test_real_blob_identifier_is_sha256_of_its_recipients_spki(vectors_dir: Path) -> None:
    # The rule our builder follows, checked on the one real blob with a known key.
    key = serialization.load_pem_private_key(
        (vectors_dir / "cms" / "enclaver_recipient_key.pem").read_bytes(), None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    real = cms.ContentInfo.load((vectors_dir / "cms" / "enclaver_kms_response.ber").read_bytes())
    rid = real["content"]["recipient_infos"][0].chosen["rid"].chosen.native
    assert rid == hashlib.sha256(spki(key)).digest()


@settings(max_examples=25, deadline=None)
@given(plaintext=st.binary(max_size=5000))
def test_crypto_core_opens_every_envelope(rsa_key: rsa.RSAPrivateKey, plaintext: bytes) -> None:
    envelope = encrypt_for_recipient(plaintext, spki(rsa_key))
    assert decrypt_for_recipient(envelope, rsa_key) == plaintext
    chunks = cms.ContentInfo.load(envelope)["content"]["encrypted_content_info"]
    assert len(chunks["encrypted_content"].native) == (len(plaintext) // 16 + 1) * 16
    assert CONTENT_CHUNK == 1000


def test_openssl_opens_the_envelope(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    plaintext = bytes(range(256)) * 10
    assert openssl_decrypt(tmp_path, encrypt_for_recipient(plaintext, spki(rsa_key)), rsa_key) == (
        plaintext
    )


def test_openssl_refuses_another_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    envelope = encrypt_for_recipient(b"for someone else", spki(rsa_key))
    with pytest.raises(RuntimeError):
        openssl_decrypt(tmp_path, envelope, other)


def test_builder_rejects_unusable_keys() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(EnvelopeError, match="at least 2048"):
        encrypt_for_recipient(b"x", spki(small))  # type: ignore[arg-type]
    ecc = ec.generate_private_key(ec.SECP256R1()).public_key()
    ecc_der = ecc.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(EnvelopeError, match="not an RSA key"):
        encrypt_for_recipient(b"x", ecc_der)
    with pytest.raises(EnvelopeError, match="not a DER"):
        encrypt_for_recipient(b"x", b"\x30\x03junk")
