"""Shares of a bounded resource: at most ``per_key`` held by any one key, ``total`` by all.

Mechanics only, shared by both processes. What a key is (a uid, a vsock CID, a peer
address) and which limits apply is each process's own policy.

Two kinds. ``Shares`` never waits: a share is granted or refused at once (connections:
a caller over its share is told so at once instead of queueing behind the caller that
took everything). ``QueuedShares`` makes a key over its share wait in that key's own
queue (work a caller asked for and will wait for, such as KMS calls). Either way a key
at its share never keeps another key from getting one (as long as the whole leaves
room, which is why the processes check ``per_key < total`` in their config). Keys
holding no share are forgotten, so memory follows the keys active now.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)


class ShareRefused(Exception):
    """No share for this key: ``whole`` says the overall cap was reached, else the
    key's own; ``limit`` is the cap that was reached."""

    def __init__(self, *, whole: bool, limit: int) -> None:
        super().__init__(f"{'total' if whole else 'per-key'} limit of {limit} reached")
        self.whole = whole
        self.limit = limit


class Shares(Generic[K]):
    def __init__(self, per_key: int, total: int | None = None) -> None:
        if per_key < 1 or (total is not None and total < 1):
            raise ValueError("share limits must be at least 1")
        self.per_key = per_key
        self.total = total
        self._held: dict[K, int] = {}
        self._in_use = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    def held(self, key: K) -> int:
        return self._held.get(key, 0)

    def acquire(self, key: K) -> None:
        """Take one share for ``key`` or raise ``ShareRefused`` (the key's own limit
        is named first: it is the one the caller can do something about)."""
        held = self._held.get(key, 0)
        if held >= self.per_key:
            raise ShareRefused(whole=False, limit=self.per_key)
        if self.total is not None and self._in_use >= self.total:
            raise ShareRefused(whole=True, limit=self.total)
        self._held[key] = held + 1
        self._in_use += 1

    def release(self, key: K) -> None:
        """Give back one share ``key`` holds (a release without an acquire is a bug:
        ``KeyError``)."""
        held = self._held[key]
        if held == 1:
            del self._held[key]
        else:
            self._held[key] = held - 1
        self._in_use -= 1

    @contextmanager
    def share(
        self, key: K, *, refused: Callable[[ShareRefused], Exception] | None = None
    ) -> Iterator[None]:
        """Hold one share for the block. When there is none, ``ShareRefused`` is raised
        before the block, or what ``refused`` makes of it (the process's own error)."""
        try:
            self.acquire(key)
        except ShareRefused as exc:
            if refused is None:
                raise
            raise refused(exc) from None
        try:
            yield
        finally:
            self.release(key)

    @contextmanager
    def share_if_free(self, key: K) -> Iterator[bool]:
        """Hold one share for the block if there is one; yields whether there was."""
        try:
            self.acquire(key)
        except ShareRefused:
            yield False
            return
        try:
            yield True
        finally:
            self.release(key)


class QueuedShares(Generic[K]):
    """At most ``per_key`` held by any one key at once; a key over it waits in its own
    first-come queue, so a busy key delays only itself, for at most ``patience``
    seconds."""

    def __init__(self, per_key: int, *, patience: float) -> None:
        if per_key < 1 or patience <= 0:
            raise ValueError("share limits must be at least 1, patience positive")
        self.per_key = per_key
        self.patience = patience
        self._queues: dict[K, trio.CapacityLimiter] = {}

    def held(self, key: K) -> int:
        queue = self._queues.get(key)
        return queue.borrowed_tokens if queue is not None else 0

    @asynccontextmanager
    async def share(
        self, key: K, *, refused: Callable[[ShareRefused], Exception] | None = None
    ) -> AsyncIterator[None]:
        """Hold one share for the block, waiting for it up to ``patience``; past that,
        ``ShareRefused`` is raised before the block, or what ``refused`` makes of it."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = trio.CapacityLimiter(self.per_key)
        token = object()
        acquired = False
        try:
            try:
                # The usual case, a share free at once: no timer, no trip through the
                # scheduler (the caller's own awaits are checkpoints enough).
                queue.acquire_on_behalf_of_nowait(token)
                acquired = True
            except trio.WouldBlock:
                with trio.move_on_after(self.patience):
                    await queue.acquire_on_behalf_of(token)
                    acquired = True
            if not acquired:
                exc = ShareRefused(whole=False, limit=self.per_key)
                if refused is None:
                    raise exc
                raise refused(exc) from None
            try:
                yield
            finally:
                queue.release_on_behalf_of(token)
        finally:
            if not queue.borrowed_tokens and not queue.statistics().tasks_waiting:
                del self._queues[key]
