"""Attestation documents reused for KMS: the cache's rules alone, then the gateway's
refresh-once retry against a fake KMS that refuses documents (a strict or lying KMS)."""

from __future__ import annotations

import base64
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from enclave_agent.runtime.documents import (
    LEAF_MARGIN,
    AttestationDocuments,
    leaf_validity,
)
from enclave_agent.runtime.kms import KmsError, KmsGateway
from enclave_agent.simulated.nsm import LEAF_LIFETIME, SimulatedNsm
from enclave_common.logs import configure_logging
from tests.support.kms_fakes import (
    CIPHERTEXT,
    FakeRecipient,
    kms_error,
    start_kms_and_relay,
)
from tests.support.kms_fakes import GatewayStack as Stack


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """Documents from a simulated NSM (leaf lifetime chosen), counted, holdable."""

    def __init__(self, leaf_lifetime: timedelta = LEAF_LIFETIME) -> None:
        self.nsm = SimulatedNsm.create(leaf_lifetime=leaf_lifetime)
        self.calls = 0
        self.fail: Exception | None = None
        self.hold: trio.Event | None = None

    async def __call__(self) -> bytes:
        self.calls += 1
        if self.hold is not None:
            await self.hold.wait()
        if self.fail is not None:
            raise self.fail
        return self.nsm.attestation(public_key=b"spki")


def documents(source: Source, clock: Clock, reuse: float = 300.0) -> AttestationDocuments:
    return AttestationDocuments(source, reuse, shared=(KmsError,), clock=clock)


def test_leaf_validity_reads_the_simulated_nsm_documents() -> None:
    document = SimulatedNsm.create().attestation(public_key=b"k")
    validity = leaf_validity(document)
    # The simulated leaf starts 5 minutes in the past and lives 3 hours.
    assert validity is not None
    assert LEAF_LIFETIME.total_seconds() - 6 * 60 < validity <= LEAF_LIFETIME.total_seconds()


@given(st.binary(max_size=512))
def test_leaf_validity_of_any_bytes_is_a_number_or_none(data: bytes) -> None:
    assert leaf_validity(data) is None or isinstance(leaf_validity(data), float)


async def test_one_document_serves_calls_for_its_window() -> None:
    source, clock = Source(), Clock()
    docs = documents(source, clock)
    first = await docs.get()
    assert first.fresh
    for _ in range(10):
        clock.now += 20  # 200 s in all: under 80 % of 300 s
        lease = await docs.get()
        assert lease.document is first.document and not lease.fresh
    assert source.calls == 1
    clock.now += 50  # 250 s: past 80 %, so this call fetches a new one
    renewed = await docs.get()
    assert renewed.document is not first.document and renewed.fresh
    assert source.calls == 2


async def test_reuse_zero_fetches_a_document_per_call() -> None:
    source, clock = Source(), Clock()
    docs = documents(source, clock, reuse=0)
    leases = [await docs.get() for _ in range(3)]
    assert source.calls == 3 and all(lease.fresh for lease in leases)
    assert len({lease.document.data for lease in leases}) == 3


async def test_others_keep_the_current_document_while_one_refreshes() -> None:
    source, clock = Source(), Clock()
    docs = documents(source, clock)
    first = await docs.get()
    clock.now += 250  # past the refresh point, inside the window
    source.hold = trio.Event()
    got = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _append(docs, got))  # leads the refresh, held
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(3):  # meanwhile: the current one, at once
            lease = await docs.get()
            assert lease.document is first.document
        clock.now += 60  # the window has ended: callers now wait for the new one
        nursery.start_soon(lambda: _append(docs, got))
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        source.hold.set()
    assert source.calls == 2
    assert got[0].document is got[1].document is not first.document


async def _append(docs: AttestationDocuments, into: list[object]) -> None:
    into.append(await docs.get())


async def test_a_leaf_near_its_end_bounds_the_reuse() -> None:
    # 25 minutes of leaf: 20 left at the document's timestamp, 5 once the margin is off.
    source, clock = Source(leaf_lifetime=timedelta(minutes=25)), Clock()
    docs = documents(source, clock)
    first = await docs.get()
    assert first.document.usable_until - first.document.fetched_at == pytest.approx(
        20 * 60 - LEAF_MARGIN, abs=5
    )
    clock.now += 5 * 60 + 10
    assert (await docs.get()).document is not first.document


async def test_a_leaf_inside_the_margin_serves_only_its_own_call() -> None:
    source, clock = Source(leaf_lifetime=timedelta(minutes=15)), Clock()
    docs = documents(source, clock)
    for _ in range(3):
        assert (await docs.get()).fresh
    assert source.calls == 3


async def test_an_unreadable_document_is_not_reused() -> None:
    clock = Clock()
    calls = 0

    async def junk() -> bytes:
        nonlocal calls
        calls += 1
        return b"not a COSE document"

    docs = AttestationDocuments(junk, 300, shared=(KmsError,), clock=clock)
    await docs.get()
    await docs.get()
    assert calls == 2


async def test_a_failed_refresh_keeps_the_current_document_inside_its_window() -> None:
    source, clock = Source(), Clock()
    docs = documents(source, clock)
    first = await docs.get()
    source.fail = KmsError("KMSInternalException", "NSM error: InternalError", 500)
    clock.now += 250
    assert (await docs.get()).document is first.document
    clock.now += 60
    with pytest.raises(KmsError):
        await docs.get()


async def test_discard_makes_the_next_call_fetch() -> None:
    source, clock = Source(), Clock()
    docs = documents(source, clock)
    lease = await docs.get()
    docs.discard(lease)
    again = await docs.get()
    assert again.document is not lease.document and source.calls == 2


def test_reuse_window_is_bounded() -> None:
    with pytest.raises(ValueError):
        AttestationDocuments(Source(), 3601, shared=(KmsError,))


# --- the gateway: a KMS that refuses documents ------------------------------------


@pytest.fixture
async def reuse_stack(tmp_path: Path, nursery: trio.Nursery) -> Stack:
    kms, relay, ca_path = await start_kms_and_relay(tmp_path, nursery)
    stack = Stack(kms, relay, SimulatedNsm.create(), None, ca_path)  # type: ignore[arg-type]
    stack.recipient = FakeRecipient()
    stack.gateway = KmsGateway(stack.settings(), stack.nsm, stack.recipient)
    return stack


def _document_of(seen: object) -> str:
    return str(seen.json["Recipient"]["AttestationDocument"])  # type: ignore[attr-defined]


async def test_calls_share_one_document(reuse_stack: Stack) -> None:
    for _ in range(5):
        await reuse_stack.gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    assert reuse_stack.gateway.documents.fetches == 1
    assert len({_document_of(seen) for seen in reuse_stack.kms.seen}) == 1


@pytest.mark.parametrize(
    ("error_type", "message"),
    [
        ("ValidationException", "invalid attestation document: expired"),
        ("ValidationError", "Recipient is not acceptable"),
        ("AccessDeniedException", "not authorized: kms:RecipientAttestation:ImageSha384"),
    ],
)
async def test_a_refused_reused_document_is_refreshed_once_and_the_call_retried(
    reuse_stack: Stack, error_type: str, message: str
) -> None:
    gateway = reuse_stack.gateway
    await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    stream = io.StringIO()
    configure_logging("info", stream=stream, process="test")
    try:
        reuse_stack.kms.script.append(kms_error(error_type, message))
        answer = await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    finally:
        structlog.reset_defaults()
    assert answer["Plaintext"] == base64.b64encode(b"the secret").decode()
    first, refused, retried = reuse_stack.kms.seen
    assert _document_of(refused) == _document_of(first)  # the reused one
    assert _document_of(retried) != _document_of(refused)  # a new one
    assert gateway.documents.fetches == 2
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    refreshed = [e for e in events if e["event"] == "attestation_refreshed"]
    assert len(refreshed) == 1 and refreshed[0]["error_type"] == error_type
    assert refreshed[0]["document_age_s"] >= 0
    assert message not in stream.getvalue()  # KMS's text may name principals: not logged
    call = next(e for e in events if e["event"] == "kms_call")
    assert (call["outcome"], call["attempts"]) == ("ok", 2)


async def test_a_fresh_document_refused_is_a_real_refusal(reuse_stack: Stack) -> None:
    reuse_stack.kms.script.append(kms_error("AccessDeniedException", "PCR0 does not match"))
    with pytest.raises(KmsError) as info:
        await reuse_stack.gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    assert info.value.error_type == "AccessDeniedException"
    assert len(reuse_stack.kms.seen) == 1 and reuse_stack.gateway.documents.fetches == 1


async def test_a_kms_that_refuses_every_document_costs_one_retry_per_call(
    reuse_stack: Stack,
) -> None:
    """A strict or lying KMS (or a parent serving credentials that KMS denies) cannot
    make the agent loop: one extra request and one extra document per call at most."""
    gateway = reuse_stack.gateway
    await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    denied = kms_error("ValidationException", "invalid attestation document")
    for _ in range(3):
        reuse_stack.kms.script += [denied, denied]
        before = len(reuse_stack.kms.seen)
        with pytest.raises(KmsError) as info:
            await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
        assert info.value.error_type == "ValidationException"
        # The retry's document was fresh, so its refusal is final; the next call reuses it.
        assert len(reuse_stack.kms.seen) - before == 2
    assert gateway.documents.fetches == 4


async def test_other_refusals_are_not_blamed_on_the_document(reuse_stack: Stack) -> None:
    gateway = reuse_stack.gateway
    await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    for error in (
        kms_error("NotFoundException", "no such key"),
        kms_error("ValidationException", "CiphertextBlob is too long"),
        kms_error("InvalidCiphertextException", "attestation"),
    ):
        reuse_stack.kms.script.append(error)
        with pytest.raises(KmsError):
            await gateway.call("Decrypt", {"CiphertextBlob": CIPHERTEXT})
    assert len(reuse_stack.kms.seen) == 4 and gateway.documents.fetches == 1
