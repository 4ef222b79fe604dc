"""The workers' capacity as a gateway reads it: cached, so ``/readyz`` (open without the token)
and every ``start``'s ``busy`` check cost the bus one computation per ``capacity_cache_s`` (with
Redis, a command per active session) instead of one each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from worker.bus import Capacity

__all__ = ["CapacityCache"]


class CapacityCache:
    """The workers' capacity, computed at most once per ``ttl_s``; concurrent callers share the
    one computation in flight (cancelling a caller does not cancel it). A failure is not kept:
    the next caller computes again.

    Parameters
    ----------
    compute : callable
        The computation (``bus.capacity``, looked up on every call).
    ttl_s : float
        How long an answer is reused, from when it was computed, s (0: never reused).
    clock : callable
        Seconds, monotonic (tests may step it).
    """

    def __init__(self, compute: Callable[[], Awaitable[Capacity]], ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.compute, self.ttl_s, self.clock = compute, ttl_s, clock
        self._value: Capacity | None = None
        self._at = 0.0
        self._pending: asyncio.Future[Capacity] | None = None

    async def get(self) -> Capacity:
        if self._value is not None and self.clock() - self._at < self.ttl_s:
            return self._value
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._refresh())
            # retrieved even when every caller was cancelled (no "never retrieved" warning)
            self._pending.add_done_callback(
                lambda f: None if f.cancelled() else f.exception())
        return await asyncio.shield(self._pending)

    async def _refresh(self) -> Capacity:
        try:
            value = await self.compute()
            self._value, self._at = value, self.clock()
            return value
        finally:
            self._pending = None

    def count_started(self) -> None:
        """This gateway created a session: count it in the answer kept, so that starts within
        one period cannot all be admitted past the workers' capacity."""
        if self._value is not None:
            self._value = replace(self._value, sessions_active=self._value.sessions_active + 1)
