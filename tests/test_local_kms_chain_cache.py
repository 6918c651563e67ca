"""The stand-in's Recipient check remembers verified chains but checks every document."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from devtools.local_kms import recipient
from devtools.local_kms.recipient import RecipientError, verify_recipient
from enclave_agent.operator.attestation import ChainCache
from enclave_agent.operator.attestation import _verify_chain as verify_chain
from enclave_agent.runtime.recipient import RecipientKey
from enclave_agent.simulated.nsm import SimulatedNsm


def _raw(document: bytes) -> dict[str, str]:
    return {
        "AttestationDocument": base64.b64encode(document).decode(),
        "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
    }


def test_cached_chain_still_checks_each_signature_and_the_instant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nsm = SimulatedNsm.create()
    key = RecipientKey.generate()
    roots = [nsm.root_pem]
    full_checks: list[bytes] = []

    def counting(leaf: bytes, *args: object) -> object:
        full_checks.append(leaf)
        return verify_chain(leaf, *args)

    monkeypatch.setattr("enclave_agent.operator.attestation._verify_chain", counting)
    monkeypatch.setattr(recipient, "_CHAINS", ChainCache())
    now = datetime.now(UTC)

    first = nsm.attestation(public_key=key.public_key_der)
    assert verify_recipient(_raw(first), roots, now).public_key_der == key.public_key_der
    second = nsm.attestation(public_key=key.public_key_der, nonce=b"n")
    verify_recipient(_raw(second), roots, now)
    assert len(full_checks) == 1  # the second document reused the verified chain

    # Same chain, broken document signature: refused, cache or not.
    tampered = second[:-1] + bytes([second[-1] ^ 1])
    with pytest.raises(RecipientError, match="signature"):
        verify_recipient(_raw(tampered), roots, now)
    # Same chain, past the leaf's expiry: the full check runs again and refuses.
    with pytest.raises(RecipientError, match="not valid at"):
        verify_recipient(_raw(second), roots, now + timedelta(days=3650))
    # Another root: not trusted because a chain under the first one was.
    other = SimulatedNsm.create()
    with pytest.raises(RecipientError, match="root"):
        verify_recipient(_raw(first), [other.root_pem], now)
