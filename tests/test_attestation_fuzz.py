"""Hypothesis on the attestation document parser: only AttestationError escapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave_agent.operator.attestation import (
    AttestationError,
    parse_attestation,
    verify_attestation,
)
from tests.support.fuzzing import mutate, parsed_or_refused

# Generous deadline: it only catches a hang, never a slow shared machine.
FUZZ = settings(
    max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.binary(max_size=64)
    | st.text(max_size=16),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12) | st.integers(-3, 40), children, max_size=6)
    ),
    max_leaves=20,
)

payload_keys = st.sampled_from(
    ["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key",
     "user_data", "nonce"]
)  # fmt: skip


def _production(vectors_dir: Path) -> bytes:
    return (vectors_dir / "attestation" / "nitrite_production_2024-09-07.cbor").read_bytes()


def _outcome(document: bytes, *, verify: bool = False) -> None:
    if verify:
        parsed_or_refused(lambda raw: verify_attestation(raw, at=None), document, AttestationError)
    else:
        parsed_or_refused(parse_attestation, document, AttestationError)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    _outcome(data)
    _outcome(data, verify=True)


@FUZZ
@given(st.dictionaries(payload_keys | st.text(max_size=8), cbor_values, max_size=10), cbor_values)
def test_structured_payloads(fields: dict[str, Any], unprotected: Any) -> None:
    payload = cbor2.dumps(fields)
    for document in (
        cbor2.dumps([cbor2.dumps({1: -35}), {}, payload, bytes(96)]),
        cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: -35}), unprotected, payload, bytes(96)])),
    ):
        _outcome(document)
        _outcome(document, verify=True)


@FUZZ
@given(data=st.data())
def test_mutated_real_document(vectors_dir: Path, data: st.DataObject) -> None:
    mutated = mutate(
        data, _production(vectors_dir), edits=4, byte=st.integers(0, 255), cut=64, insert=16
    )
    parsed = parsed_or_refused(parse_attestation, mutated, AttestationError)
    if parsed is None:
        return
    _outcome(mutated, verify=True)
    at = parsed.timestamp
    parsed_or_refused(lambda raw: verify_attestation(raw, at=at), mutated, AttestationError)


@pytest.mark.parametrize(
    "document",
    [
        b"\x84" + b"\x81" * 20000,  # deep nesting
        b"\x5b\x00\x00\x00\x10\x00\x00\x00\x00",  # a 64 GiB byte string announced
        b"\xbf" * 5000,
        cbor2.dumps([b"\xa1\x01\x38\x22", {}, b"\xbf\xff", bytes(96)]),
    ],
)
def test_nasty_inputs(document: bytes) -> None:
    with pytest.raises(AttestationError):
        parse_attestation(document)
