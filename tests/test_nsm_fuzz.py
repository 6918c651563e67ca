"""Hypothesis on the NSM response parsers: only NsmError escapes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_agent.runtime.nsm import (
    NsmError,
    read_attestation,
    read_describe_nsm,
    read_describe_pcr,
    read_random,
)
from enclave_agent.simulated.nsm import SimulatedNsm
from tests.support.fuzzing import parsed_or_refused

FUZZ = settings(max_examples=150, deadline=5000)
READERS: list[Callable[[bytes], Any]] = [
    read_attestation,
    read_random,
    read_describe_pcr,
    read_describe_nsm,
]

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.binary(max_size=32)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=16,
)
names = st.sampled_from(["Attestation", "GetRandom", "DescribePCR", "DescribeNSM", "Error"])


def _all_readers(raw: bytes) -> None:
    for reader in READERS:
        parsed_or_refused(reader, raw, NsmError)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes(raw: bytes) -> None:
    _all_readers(raw)


@FUZZ
@given(names | st.text(max_size=8), cbor_values)
def test_structured_responses(name: str, body: Any) -> None:
    _all_readers(cbor2.dumps({name: body}))
    _all_readers(cbor2.dumps(body))


SIMULATED = SimulatedNsm.create()


@settings(max_examples=60, deadline=5000)
@given(cbor_values.map(cbor2.dumps) | st.binary(max_size=64))
def test_simulated_nsm_answers_any_request(raw: bytes) -> None:
    """The simulated device answers garbage with an NSM error, never an exception."""
    answer = cbor2.loads(SIMULATED.handle(raw))
    assert isinstance(answer, dict) and len(answer) == 1
