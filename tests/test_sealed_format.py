"""The sealed-secret format (enclave_agent/runtime/sealed.py): a parser of untrusted bytes."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_agent.runtime.sealed import (
    HEADER_BYTES,
    MAGIC,
    MAX_KMS_CIPHERTEXT,
    MAX_SEALED_BYTES,
    MAX_VALUE,
    NONCE_BYTES,
    TAG_BYTES,
    Envelope,
    Plain,
    SealedFormatError,
    SealedOpenError,
    build_envelope,
    encryption_context,
    open_envelope,
    parse_sealed,
    seal_envelope,
)
from tests.support.fuzzing import parsed_or_refused

KEY = bytes(range(32))
BLOB = b"\x01\x02\x02\x00x" + b"k" * 180  # shaped like a KMS CiphertextBlob


def sealed(name: str = "db", value: bytes = b"v" * 5000, blob: bytes = BLOB) -> bytes:
    return seal_envelope(name, value, KEY, blob, os.urandom(NONCE_BYTES))


def test_the_context_binds_the_name() -> None:
    assert encryption_context("db_password") == {"enclave-kms:secret": "db_password"}


def test_the_documented_layout() -> None:
    nonce = bytes(range(12))
    blob = seal_envelope("db", b"hello", KEY, b"DATAKEY", nonce)
    assert blob[:8] == bytes.fromhex("c5454b4d53454e56") == MAGIC
    assert blob[8] == 1
    assert struct.unpack(">H", blob[9:11]) == (7,)
    assert struct.unpack(">I", blob[11:15]) == (5 + TAG_BYTES,)
    assert blob[15:22] == b"DATAKEY"
    assert blob[22:34] == nonce
    # AES-256-GCM with the name as associated data, checked with the library directly.
    assert AESGCM(KEY).decrypt(nonce, blob[34:], b"db") == b"hello"
    assert len(blob) == HEADER_BYTES + 7 + NONCE_BYTES + 5 + TAG_BYTES


@settings(max_examples=60, deadline=None)
@given(
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True),
    value=st.binary(min_size=1, max_size=3000),
    blob=st.binary(min_size=1, max_size=300),
)
def test_an_envelope_round_trips(name: str, value: bytes, blob: bytes) -> None:
    parsed = parse_sealed(seal_envelope(name, value, KEY, blob, os.urandom(NONCE_BYTES)))
    assert isinstance(parsed, Envelope)
    assert parsed.data_key_blob == blob
    assert open_envelope(name, parsed, KEY) == value


def test_the_largest_value_and_data_key_round_trip() -> None:
    value, blob = os.urandom(MAX_VALUE), os.urandom(MAX_KMS_CIPHERTEXT)
    raw = seal_envelope("big", value, KEY, blob, os.urandom(NONCE_BYTES))
    assert len(raw) == MAX_SEALED_BYTES
    parsed = parse_sealed(raw)
    assert isinstance(parsed, Envelope)
    assert open_envelope("big", parsed, KEY) == value


def test_a_plain_kms_ciphertext_is_taken_as_is() -> None:
    assert parse_sealed(BLOB) == Plain(BLOB)
    assert parse_sealed(b"0f1e2d3c-" + b"x" * 100) == Plain(b"0f1e2d3c-" + b"x" * 100)  # moto's
    assert parse_sealed(b"\x01" * MAX_KMS_CIPHERTEXT) == Plain(b"\x01" * MAX_KMS_CIPHERTEXT)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty"),
        (b"\x01" * (MAX_KMS_CIPHERTEXT + 1), "too long for a KMS ciphertext"),
        (b"\x00" * (MAX_SEALED_BYTES + 1), "more than a sealed secret"),
        (b"\xc5", "magic is incomplete or wrong"),
        (b"\xc5EKMSENW" + bytes(20), "magic is incomplete or wrong"),
        (MAGIC + b"\x02" + bytes(20), "version 2"),
        (MAGIC + b"\x01" + struct.pack(">HI", 0, 40) + bytes(52), "data key length 0"),
        (
            MAGIC + b"\x01" + struct.pack(">HI", MAX_KMS_CIPHERTEXT + 1, 40),
            "data key length 6145",
        ),
        (MAGIC + b"\x01" + struct.pack(">HI", 5, TAG_BYTES) + bytes(33), "ciphertext length 16"),
        (
            MAGIC + b"\x01" + struct.pack(">HI", 5, MAX_VALUE + TAG_BYTES + 1),
            "ciphertext length 65553",
        ),
    ],
)
def test_malformed_blobs_are_refused_with_the_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(SealedFormatError, match=reason):
        parse_sealed(raw)


def test_every_truncation_and_any_extra_byte_is_refused() -> None:
    raw = sealed(value=b"v" * 40, blob=b"k" * 30)
    for end in range(1, len(raw)):
        with pytest.raises(SealedFormatError):
            parse_sealed(raw[:end])
    with pytest.raises(SealedFormatError, match="bytes after its end"):
        parse_sealed(raw + b"\x00")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_parse_or_are_refused_cleanly(raw: bytes) -> None:
    parsed = parsed_or_refused(parse_sealed, raw, SealedFormatError)
    if parsed is None:
        return
    if isinstance(parsed, Plain):
        assert parsed.ciphertext_blob == raw and raw[:1] != MAGIC[:1]
    else:
        assert build_envelope(parsed) == raw


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_bytes_after_the_magic_parse_or_are_refused_cleanly(data: st.DataObject) -> None:
    # The interesting half of the input space: past the magic, every length field.
    version = data.draw(st.sampled_from([1, 1, 1, 0, 2, 255]))
    key_length = data.draw(st.integers(0, 0xFFFF))
    ciphertext_length = data.draw(st.integers(0, 0xFFFFFFFF))
    rest = data.draw(st.binary(max_size=400))
    raw = MAGIC + struct.pack(">BHI", version, key_length, ciphertext_length) + rest
    try:
        parsed = parse_sealed(raw)
    except SealedFormatError:
        return
    assert isinstance(parsed, Envelope)
    assert (len(parsed.data_key_blob), len(parsed.ciphertext)) == (key_length, ciphertext_length)


def test_an_envelope_opens_only_for_its_name_key_and_bytes() -> None:
    raw = sealed("db")
    parsed = parse_sealed(raw)
    assert isinstance(parsed, Envelope)
    with pytest.raises(SealedOpenError, match="another secret name or changed"):
        open_envelope("api", parsed, KEY)
    with pytest.raises(SealedOpenError):
        open_envelope("db", parsed, bytes(32))
    with pytest.raises(SealedOpenError, match="32"):
        open_envelope("db", parsed, KEY[:16])
    for position in (HEADER_BYTES + len(BLOB), len(raw) - 1, len(raw) - TAG_BYTES - 1):
        changed = bytearray(raw)
        changed[position] ^= 1
        tampered = parse_sealed(bytes(changed))
        assert isinstance(tampered, Envelope)
        with pytest.raises(SealedOpenError):
            open_envelope("db", tampered, KEY)


@pytest.mark.parametrize("size", [0, MAX_VALUE + 1])
def test_values_out_of_bounds_are_not_sealed(size: int) -> None:
    with pytest.raises(ValueError, match="cannot be sealed"):
        seal_envelope("db", b"v" * size, KEY, BLOB, os.urandom(NONCE_BYTES))


def test_build_refuses_parts_out_of_bounds() -> None:
    good = Envelope(BLOB, bytes(NONCE_BYTES), bytes(TAG_BYTES + 1))
    assert parse_sealed(build_envelope(good)) == good
    for bad in (
        Envelope(b"", good.nonce, good.ciphertext),
        Envelope(bytes(MAX_KMS_CIPHERTEXT + 1), good.nonce, good.ciphertext),
        Envelope(BLOB, bytes(11), good.ciphertext),
        Envelope(BLOB, good.nonce, bytes(TAG_BYTES)),
    ):
        with pytest.raises(ValueError):
            build_envelope(bad)
