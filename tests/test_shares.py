"""enclave_common.shares: the per-key and overall caps both processes count with."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from enclave_common.shares import QueuedShares, ShareRefused, Shares


def test_a_key_at_its_share_leaves_the_others_theirs() -> None:
    shares: Shares[str] = Shares(per_key=2, total=3)
    shares.acquire("a")
    shares.acquire("a")
    with pytest.raises(ShareRefused) as refused:
        shares.acquire("a")
    assert (refused.value.whole, refused.value.limit) == (False, 2)
    shares.acquire("b")
    with pytest.raises(ShareRefused) as refused:
        shares.acquire("c")
    assert (refused.value.whole, refused.value.limit) == (True, 3)
    shares.release("a")
    shares.acquire("c")
    assert (shares.in_use, shares.held("a"), shares.held("b"), shares.held("c")) == (3, 1, 1, 1)


def test_share_and_share_if_free_give_back_what_they_took() -> None:
    shares: Shares[int] = Shares(per_key=1)
    with shares.share(7):
        with pytest.raises(ShareRefused):
            shares.acquire(7)
        with shares.share_if_free(7) as got:
            assert got is False
    with shares.share_if_free(7) as got:
        assert got is True and shares.held(7) == 1
    assert shares.in_use == 0 and shares.held(7) == 0
    with pytest.raises(KeyError):
        shares.release(7)  # never acquired: a bug, said loudly


def test_a_refusal_can_be_the_callers_own_error() -> None:
    shares: Shares[str] = Shares(per_key=1, total=1)

    def mine(refused: ShareRefused) -> LookupError:
        return LookupError(f"whole={refused.whole} limit={refused.limit}")

    with shares.share("a", refused=mine):
        with (
            pytest.raises(LookupError, match="whole=False limit=1"),
            shares.share("a", refused=mine),
        ):
            pass
        with (
            pytest.raises(LookupError, match="whole=True limit=1"),
            shares.share("b", refused=mine),
        ):
            pass
    assert shares.in_use == 0


def test_limits_below_one_are_refused() -> None:
    for per_key, total in ((0, None), (1, 0)):
        with pytest.raises(ValueError, match="at least 1"):
            Shares(per_key, total)


@given(
    st.integers(1, 4),
    st.integers(1, 8),
    st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=200),
)
def test_no_sequence_exceeds_a_cap_or_loses_count(
    per_key: int, total: int, steps: list[tuple[bool, int]]
) -> None:
    shares: Shares[int] = Shares(per_key, total)
    model: dict[int, int] = {}
    for take, key in steps:
        if take:
            try:
                shares.acquire(key)
                granted = True
            except ShareRefused:
                granted = False
            fits = model.get(key, 0) < per_key and sum(model.values()) < total
            assert granted is fits
            if granted:
                model[key] = model.get(key, 0) + 1
        elif model.get(key):
            shares.release(key)
            model[key] -= 1
        assert shares.in_use == sum(model.values()) <= total
        assert all(shares.held(k) == n <= per_key for k, n in model.items())
    for key, count in model.items():
        for _ in range(count):
            shares.release(key)
    assert shares.in_use == 0


async def test_queued_shares_make_only_the_busy_key_wait() -> None:
    shares: QueuedShares[str] = QueuedShares(1, patience=5)
    order: list[str] = []
    release = trio.Event()

    async def hold(key: str, name: str) -> None:
        async with shares.share(key):
            order.append(name)
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, "a", "a1")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold, "a", "a2")  # waits in a's own queue
        nursery.start_soon(hold, "b", "b1")  # never behind a
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a1", "b1"] and shares.held("a") == 1
        release.set()
    assert order == ["a1", "b1", "a2"]
    assert shares.held("a") == 0 and not shares._queues  # idle keys are forgotten


async def test_queued_shares_refuse_after_the_patience() -> None:
    shares: QueuedShares[str] = QueuedShares(1, patience=0.05)
    async with shares.share("a"):
        with pytest.raises(ShareRefused) as info:
            async with shares.share("a"):
                pytest.fail("a second share was granted")
        assert info.value.limit == 1 and not info.value.whole
        with pytest.raises(LookupError, match="refused"):
            async with shares.share("a", refused=lambda e: LookupError(f"refused: {e}")):
                pytest.fail("a second share was granted")
    assert not shares._queues
