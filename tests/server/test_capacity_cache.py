"""The gateway computes the workers' capacity at most once per ``capacity_cache_s``: ``/readyz`` is
open without the token, and with Redis the computation costs a command per active session
(server/capacity.py ``CapacityCache``). Counted with a wrapper on the real bus, over a real
redis-server; the cache itself with a stepped clock."""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import pytest

from server.app import create_app
from server.capacity import CapacityCache
from server.settings import Settings
from tests.server.conftest import drain, receive_json, start_msg
from worker.bus import Capacity, StreamParams
from worker.redis_bus import RedisBus

pytestmark = pytest.mark.asyncio
SESSIONS = 300


def count_capacity_calls(bus: RedisBus) -> list[float]:
    """Wrap ``bus.capacity``: the returned list gets one entry (the time) per computation."""
    calls: list[float] = []
    real = bus.capacity

    async def counted() -> Capacity:
        calls.append(time.monotonic())
        return await real()

    bus.capacity = counted  # type: ignore[method-assign]
    return calls


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


async def test_readyz_does_not_cost_redis_work_per_request(aiohttp_client, redis_server, prefix):
    bus = RedisBus(redis_server.url, prefix=prefix)
    calls = count_capacity_calls(bus)
    settings = Settings(redis_url=redis_server.url)
    ttl = settings.capacity_cache_s
    assert ttl == pytest.approx(1.0)
    client = await aiohttp_client(create_app(settings, bus))
    worker_bus = RedisBus(redis_server.url, prefix=prefix)
    try:
        await worker_bus.heartbeat("w1", 10_000)
        for _ in range(SESSIONS):
            await worker_bus.create_session(StreamParams(16000))

        async def readyz() -> dict:
            r = await client.get("/readyz")
            assert r.status == 200
            return await r.json()

        began = time.monotonic()
        bodies = list(await asyncio.gather(*(readyz() for _ in range(50))))  # concurrent
        bodies += [await readyz() for _ in range(50)]  # one after another
        elapsed = time.monotonic() - began
        assert all(f"{SESSIONS}/10000 sessions" in b["detail"] for b in bodies), bodies[0]
        # Computations are at least one period apart: one, plus one per period that went by
        # (without the cache: 100, each a command per active session).
        assert 1 <= len(calls) <= 1 + math.ceil(elapsed / ttl), (len(calls), elapsed)

        # The answer follows the sessions once the period has passed.
        for _ in range(5):
            await worker_bus.create_session(StreamParams(16000))
        await asyncio.sleep(ttl + 0.1)
        before = len(calls)
        assert f"{SESSIONS + 5}/10000 sessions" in (await readyz())["detail"]
        assert len(calls) == before + 1
    finally:
        await worker_bus.close()


async def test_start_admission_uses_the_cache_and_counts_its_own_starts(
        aiohttp_client, redis_server, prefix):
    """A ``start`` asks for the capacity too (answering ``busy``): from the same cache, and a
    session this gateway just created counts in it, so two starts within one period are not
    both admitted to a worker with room for one."""
    bus = RedisBus(redis_server.url, prefix=prefix)
    calls = count_capacity_calls(bus)
    client = await aiohttp_client(create_app(
        Settings(redis_url=redis_server.url, capacity_cache_s=60.0), bus))
    worker_bus = RedisBus(redis_server.url, prefix=prefix)
    try:
        await worker_bus.heartbeat("w1", 1)
        assert (await client.get("/readyz")).status == 200  # computes: 0/1 sessions
        first = await client.ws_connect("/v1/stream")
        await first.send_str(start_msg())
        assert (await receive_json(first))["type"] == "ready"
        second = await client.ws_connect("/v1/stream")
        await second.send_str(start_msg())
        msgs, _ = await drain(second)
        assert [(m["code"], m["reason"]) for m in msgs] == [("busy", "saturated")]
        assert "1 sessions" in msgs[0]["message"]
        assert "1/1 sessions" in (await (await client.get("/readyz")).json())["detail"]
        assert len(calls) == 1  # /readyz, two starts, /readyz: one computation
        await first.close()
    finally:
        await worker_bus.close()


# ------------------------------------------------------------------------- the cache itself
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def cap(active: int) -> Capacity:
    return Capacity(workers=1, sessions_active=active, sessions_max=4)


async def test_concurrent_callers_share_one_computation_and_it_expires():
    clock, calls, gate = Clock(), [], asyncio.Event()

    async def compute() -> Capacity:
        calls.append(clock.now)
        await gate.wait()
        return cap(len(calls))

    cache = CapacityCache(compute, ttl_s=1.0, clock=clock)
    waiters = [asyncio.create_task(cache.get()) for _ in range(20)]
    await asyncio.sleep(0)
    waiters[0].cancel()  # a caller that gives up (a client gone) cancels only itself
    gate.set()
    got = await asyncio.gather(*waiters[1:])
    assert calls == [100.0] and {c.sessions_active for c in got} == {1}
    clock.now += 0.99
    assert (await cache.get()).sessions_active == 1 and len(calls) == 1
    clock.now += 0.02
    assert (await cache.get()).sessions_active == 2 and len(calls) == 2


async def test_a_failure_is_not_kept():
    clock, outcomes = Clock(), [ConnectionError("redis down"), cap(3)]

    async def compute() -> Capacity:
        out = outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out

    cache = CapacityCache(compute, ttl_s=1.0, clock=clock)
    with pytest.raises(ConnectionError):
        await cache.get()
    assert (await cache.get()).sessions_active == 3  # at once, not a period later


async def test_no_period_computes_every_time_and_started_sessions_count():
    calls = []

    async def compute() -> Capacity:
        calls.append(1)
        return cap(0)

    fresh = CapacityCache(compute, ttl_s=0.0, clock=Clock())
    await fresh.get()
    await fresh.get()
    assert len(calls) == 2
    kept = CapacityCache(compute, ttl_s=1.0, clock=Clock())
    kept.count_started()  # nothing kept yet: nothing to count in
    assert (await kept.get()).sessions_active == 0
    kept.count_started()
    kept.count_started()
    assert (await kept.get()).sessions_active == 2 and len(calls) == 3
