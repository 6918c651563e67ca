"""Hypothesis on the envelope parser: only CmsError escapes, for any bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave_agent.runtime.cms import CmsError, decrypt_for_recipient
from enclave_agent.runtime.recipient import RecipientKey
from tests.support.fuzzing import mutate, parsed_or_refused

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
    parsed_or_refused(FRESH.open, data, CmsError)


@FUZZ
@given(data=st.data())
def test_mutated_real_envelope_with_its_key(vectors_dir: Path, data: st.DataObject) -> None:
    _, key = _vector(vectors_dir)
    # The enclaver blob reaches RSA and AES with its key; the chunked one stops at the
    # identifier check but exercises constructed content parsing.
    name = data.draw(st.sampled_from(["enclaver_kms_response.ber", "rustcrypto_kms_4_chunked.ber"]))
    envelope = mutate(
        data,
        (vectors_dir / "cms" / name).read_bytes(),
        edits=3,
        byte=st.sampled_from([0x00, 0x80, 0xFF, 0x30, 0xA0, 0x24]),
        cut=32,
        insert=8,
    )
    parsed_or_refused(lambda raw: decrypt_for_recipient(raw, key), envelope, CmsError)


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


# --- the BER reader against asn1crypto's, on generated trees ---------------------


def _encode_length(length: int, long_form: bool) -> bytes:
    if length < 0x80 and not long_form:
        return bytes([length])
    body = length.to_bytes(max(1, (length.bit_length() + 7) // 8), "big")
    return bytes([0x80 | len(body)]) + body


@st.composite
def ber_trees(draw: st.DrawFn, depth: int = 0) -> bytes:
    cls = draw(st.integers(0, 3))
    tag = draw(st.sampled_from([1, 2, 4, 5, 6, 16, 17, 30]))
    long_form = draw(st.booleans())
    if depth >= 4 or draw(st.booleans()):
        contents = draw(st.binary(max_size=40))
        return bytes([cls << 6 | tag]) + _encode_length(len(contents), long_form) + contents
    children = draw(st.lists(ber_trees(depth + 1), max_size=4))
    body = b"".join(children)
    if draw(st.booleans()):
        return bytes([cls << 6 | 0x20 | tag, 0x80]) + body + b"\x00\x00"
    return bytes([cls << 6 | 0x20 | tag]) + _encode_length(len(body), long_form) + body


def _ours(tlv: object) -> object:
    from enclave_agent.runtime import cms as cms_module

    assert isinstance(tlv, cms_module._Tlv)
    if not tlv.constructed:
        return (tlv.cls, tlv.tag, tlv.contents)
    return (tlv.cls, tlv.tag, [_ours(c) for c in cms_module._children(tlv, "x")])


def _theirs(encoded: bytes) -> tuple[object, int]:
    from asn1crypto import parser

    cls, method, tag, header, contents, trailer = parser.parse(encoded)
    size = len(header) + len(contents) + len(trailer)
    if not method:
        return (cls, tag, contents), size
    children, pointer = [], 0
    while pointer < len(contents):
        child, used = _theirs(contents[pointer:])
        children.append(child)
        pointer += used
    return (cls, tag, children), size


@FUZZ
@given(ber_trees(), st.binary(max_size=4))
def test_ber_reader_agrees_with_asn1crypto(encoded: bytes, trailing: bytes) -> None:
    from enclave_agent.runtime import cms as cms_module

    data = encoded + trailing
    tlv, end = cms_module._read(data, 0, len(data), 0)
    expected, size = _theirs(data)
    assert end == size == len(encoded)
    assert _ours(tlv) == expected


# --- OIDs in error messages: our decoder against asn1crypto's --------------------


@st.composite
def oid_contents(draw: st.DrawFn) -> bytes:
    """Any OBJECT IDENTIFIER's contents, or bytes cut short in the middle of an arc."""
    first = draw(st.integers(0, 2))
    arcs = [first * 40 + draw(st.integers(0, 39 if first < 2 else 10**6))]
    arcs += draw(st.lists(st.integers(0, 2**70), max_size=6))
    out = bytearray()
    for arc in arcs:
        groups = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            groups.append(arc & 0x7F | 0x80)
        out += bytes(reversed(groups))
    return bytes(out)


@FUZZ
@given(oid_contents())
def test_oid_names_in_errors_agree_with_asn1crypto(contents: bytes) -> None:
    from asn1crypto import core

    from enclave_agent.runtime import cms as cms_module

    assert cms_module._dotted(contents) == core.ObjectIdentifier(contents=contents).dotted


@FUZZ
@given(st.binary(max_size=12))
def test_oid_name_of_any_bytes_is_a_short_string(contents: bytes) -> None:
    from enclave_agent.runtime import cms as cms_module

    named = cms_module._dotted(contents)
    assert named == contents.hex() or named.count(".") >= 1
