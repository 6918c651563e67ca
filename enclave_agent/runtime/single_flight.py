"""One refresh at a time of a lazily refreshed value (credentials, attestation documents).

``SingleFlight.run()`` starts ``fetch`` unless one is already running; callers that
arrive meanwhile wait for that one's result instead of fetching again. A failure of
one of the ``shared`` exception types is every waiter's failure too (they would only
fail the same way); when the leader ends any other way (it was cancelled by its own
deadline, or hit a bug) a waiter takes over and fetches itself. No background task:
the caller that needs the value pays for fetching it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class _Flight(Generic[T]):
    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: T | None = None
        self.error: Exception | None = None


class SingleFlight(Generic[T]):
    def __init__(
        self, fetch: Callable[[], Awaitable[T]], *, shared: tuple[type[Exception], ...]
    ) -> None:
        self._fetch = fetch
        self._shared = shared
        self._flight: _Flight[T] | None = None

    @property
    def running(self) -> bool:
        return self._flight is not None

    async def run(self) -> T:
        while True:
            flight = self._flight
            if flight is None:
                return await self._lead()
            await flight.done.wait()
            if flight.result is not None:
                return flight.result
            if flight.error is not None:
                raise flight.error
            # the leader was cancelled (its own deadline) or failed oddly: take over

    async def _lead(self) -> T:
        flight: _Flight[T] = _Flight()
        self._flight = flight
        try:
            flight.result = await self._fetch()
            return flight.result
        except self._shared as exc:
            flight.error = exc
            raise
        finally:
            self._flight = None
            flight.done.set()
