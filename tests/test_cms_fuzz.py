"""Hypothesis on the envelope parser: only CmsError escapes, for any bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave_agent.cms import CmsError, decrypt_for_recipient
from enclave_agent.recipient import RecipientKey

FUZZ = settings(
    max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FRESH = RecipientKey.generate()


def _vector(vectors_dir: Path) -> tuple[bytes, rsa.RSAPrivateKey]:
    cms = vectors_dir / "cms"
    key = serialization.load_pem_private_key(
        (cms / "enclaver_recipient_key.pem").read_bytes(), None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    return (cms / "enclaver_kms_response.ber").read_bytes(), key


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    try:
        FRESH.open(data)
    except CmsError:
        pass


@FUZZ
@given(data=st.data())
def test_mutated_real_envelope_with_its_key(vectors_dir: Path, data: st.DataObject) -> None:
    _, key = _vector(vectors_dir)
    # The enclaver blob reaches RSA and AES with its key; the chunked one stops at the
    # identifier check but exercises constructed content parsing.
    name = data.draw(st.sampled_from(["enclaver_kms_response.ber", "rustcrypto_kms_4_chunked.ber"]))
    envelope = bytearray((vectors_dir / "cms" / name).read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(envelope) - 1))
        action = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if action == "flip":
            envelope[position] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set":
            envelope[position] = data.draw(st.sampled_from([0x00, 0x80, 0xFF, 0x30, 0xA0, 0x24]))
        elif action == "cut":
            del envelope[position : position + data.draw(st.integers(1, 32))]
        else:
            envelope[position:position] = data.draw(st.binary(min_size=1, max_size=8))
        if not envelope:
            break
    try:
        decrypt_for_recipient(bytes(envelope), key)
    except CmsError:
        pass


@pytest.mark.parametrize(
    "envelope",
    [
        b"\x30\x80" * 50000,  # deep indefinite nesting
        b"\x30\x84\x7f\xff\xff\xff",  # announces 2 GiB
        b"\x24\x80" * 10000,
        b"\x30\x00",
        b"\x00\x00",
    ],
)
def test_nasty_inputs(envelope: bytes) -> None:
    with pytest.raises(CmsError):
        FRESH.open(envelope)
