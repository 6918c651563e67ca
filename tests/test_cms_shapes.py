"""Envelopes built here field by field: each deviation from KMS's shape is refused."""

from __future__ import annotations

import os
from typing import Any

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP

from enclave_agent.runtime.cms import CmsError, WrongRecipientError, decrypt_for_recipient
from enclave_agent.runtime.recipient import RecipientKey
from tests.support.cms_builder import build


@pytest.fixture(scope="module")
def recipient() -> RecipientKey:
    return RecipientKey.generate()


def test_builder_baseline_opens(recipient: RecipientKey) -> None:
    assert recipient.open(build(recipient)) == b"the secret"
    assert recipient.open(build(recipient, b"")) == b""


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"version": "v0"}, "version"),
        ({"ktri_version": "v0"}, "KeyTransRecipientInfo version"),
        ({"recipients": 2}, "exactly one"),
        ({"key_identifier": b"\x01" * 20}, "20 bytes, expected 32"),
        ({"oaep_hash": "sha1"}, "sha1"),
        ({"label": b"label"}, "label"),
        ({"content_algorithm": "aes128_cbc"}, "AES-256-CBC"),
        ({"iv": b"\x00" * 8}, "16-byte IV"),
        ({"content_key": os.urandom(16)}, "16 bytes"),
        ({"pad": False, "plaintext": b"x" * 32}, "padding"),
    ],
)
def test_deviations_are_refused(
    recipient: RecipientKey, changes: dict[str, Any], reason: str
) -> None:
    arguments = {k: v for k, v in changes.items() if k != "plaintext"}
    plaintext = changes.get("plaintext", b"the secret")
    if "content_key" in changes:
        envelope = _build_with_short_key(recipient, changes["content_key"])
    else:
        envelope = build(recipient, plaintext, **arguments)
    with pytest.raises(CmsError, match=reason) as caught:
        recipient.open(envelope)
    assert not isinstance(caught.value, WrongRecipientError)


def _build_with_short_key(recipient: RecipientKey, key: bytes) -> bytes:
    envelope = build(recipient, content_key=os.urandom(32))
    # Re-wrap a short key in place of the real one: same structure, wrong key length.
    info = cms.ContentInfo.load(envelope)
    ktri = info["content"]["recipient_infos"][0].chosen
    ktri["encrypted_key"] = recipient._private_key.public_key().encrypt(
        key, OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    )
    return bytes(info.dump(force=True))


def test_wrong_identifier_is_wrong_recipient(recipient: RecipientKey) -> None:
    with pytest.raises(WrongRecipientError, match="another key"):
        recipient.open(build(recipient, key_identifier=b"\x00" * 32))


def test_not_enveloped_data_is_refused(recipient: RecipientKey) -> None:
    signed = cms.ContentInfo({"content_type": "data", "content": b"plain"}).dump()
    with pytest.raises(CmsError, match="envelopedData"):
        recipient.open(signed)


def test_plain_function_computes_the_identifier(recipient: RecipientKey) -> None:
    assert decrypt_for_recipient(build(recipient), recipient._private_key) == b"the secret"


def test_oversized_envelope_is_refused(recipient: RecipientKey) -> None:
    with pytest.raises(CmsError, match="more than"):
        recipient.open(b"\x30" + b"\x00" * (2 << 20))


def test_every_fast_path_oaep_form_passes_the_full_check() -> None:
    from enclave_agent.runtime import cms as cms_module

    assert len(cms_module._ACCEPTED_OAEP) == 8
    for contents in cms_module._ACCEPTED_OAEP:
        encoded = b"\x30" + bytes([len(contents)]) + contents
        tlv, end = cms_module._read(encoded, 0, len(encoded), 0)
        assert end == len(encoded)
        cms_module._check_oaep_structure(tlv)  # raises CmsError on disagreement


def test_ber_forms_take_the_full_check_and_open(recipient: RecipientKey) -> None:
    """The same envelope with every definite length rewritten as indefinite (BER) opens."""
    envelope = build(recipient)

    def indefinite(data: bytes) -> bytes:
        out = bytearray()
        pointer = 0
        while pointer < len(data):
            first, length_byte = data[pointer], data[pointer + 1]
            header = 2
            length = length_byte
            if length_byte & 0x80:
                count = length_byte & 0x7F
                length = int.from_bytes(data[pointer + 2 : pointer + 2 + count], "big")
                header += count
            body = data[pointer + header : pointer + header + length]
            if first & 0x20:
                out += bytes([first, 0x80]) + indefinite(body) + b"\x00\x00"
            else:
                out += data[pointer : pointer + header + length]
            pointer += header + length
        return bytes(out)

    converted = indefinite(envelope)
    assert converted != envelope and converted[1] == 0x80
    assert recipient.open(converted) == b"the secret"
