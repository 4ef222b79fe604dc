"""Redis full: at ``maxmemory`` under ``noeviction`` (docs/deploy.md's setup) Redis refuses every
command that may grow its memory. On a real redis-server whose maxmemory is set below what it
uses: the bus says ``redis_full`` (retry later, not a bug), nothing half-done is left, the
workers keep their leases and heartbeats, and everything goes on once memory is freed."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from tests.worker.test_runner import (
    P,
    RecordingEngine,
    Running,
    chunk,
    final_of,
    settings,
    wait_for,
)
from worker.bus import BusError
from worker.redis_bus import RedisBus
from worker.redis_keys import GROUP
from worker.runner import Worker

pytestmark = pytest.mark.asyncio


async def fill(bus: RedisBus) -> None:
    """Redis is full from now on: maxmemory below what it uses, nothing to evict."""
    await bus.r.config_set("maxmemory-policy", "noeviction")
    await bus.r.config_set("maxmemory", 1)


async def free(bus: RedisBus) -> None:
    await bus.r.config_set("maxmemory", 0)


async def full(call) -> BusError:
    with pytest.raises(BusError) as e:
        await call
    assert e.value.reason == "redis_full", e.value
    assert "maxmemory" in str(e.value)
    return e.value


async def test_a_full_redis_is_redis_full_and_nothing_is_half_done(redis_server) -> None:
    """Review: every refusal was ``redis_error`` (a bug), so clients got ``internal``."""
    bus = RedisBus(redis_server.url, lease_ms=600)
    try:
        sid = await bus.create_session(P)
        await bus.push_audio(sid, chunk(0))
        await bus.heartbeat("w", 4)
        [c] = await bus.claim("w", 1)
        await fill(bus)
        await full(bus.create_session(P))
        await full(bus.push_audio(sid, chunk(1)))
        await full(bus.publish_result(sid, {"audio_s": 0.1, "final": False}, owner="w"))
        await full(bus.end_session(sid))
        await full(bus.heartbeat("w", 4))
        # what only acks, claims or expires still runs: the lease, reads, the heartbeat's expiry
        for _ in range(3):
            await asyncio.sleep(0.3)
            assert await bus.renew("w", [sid]) == []
            await full(bus.heartbeat("w", 4))
        assert (await bus.capacity()).workers == 1  # 0.9 s > lease_ms: the heartbeat was kept
        assert (await bus.read_audio(sid, -1)).chunks[0].seq == 0
        await free(bus)
        # nothing of the refused calls was stored: the same seq goes in, the stream goes on
        assert await bus.push_audio(sid, chunk(1)) is True
        await bus.end_session(sid)
        batch = await bus.read_audio(sid, -1)
        assert [x.seq for x in batch.chunks] == [0, 1] and batch.ended
        assert await bus.publish_result(sid, {"audio_s": 0.2, "final": True}, owner="w")
        await bus.finish("w", sid)
        assert [r["final"] for _, r in await bus.read_results(sid, "0", timeout_s=0)] == [True]
        assert c.session_id == sid and await bus.r.xlen(bus.sessions_key) == 0
    finally:
        await free(bus)
        await bus.close()


async def test_a_worker_keeps_its_sessions_while_redis_is_full(redis_server, caplog) -> None:
    """Review: the refused heartbeat ended the lease round before ``renew``, so the leases and
    the heartbeat lapsed (the worker looked dead, its sessions were claimed again), and every
    step warned. Now the leases are renewed and the heartbeat kept; the result refused while
    Redis was full goes out, once, when memory is freed."""
    caplog.set_level(logging.DEBUG, logger="worker.runner")
    gateway = RedisBus(redis_server.url, lease_ms=600)
    engine = RecordingEngine(tick_sleep_s=0.3)
    run = Running(Worker(RedisBus(redis_server.url, lease_ms=600), engine, settings()))
    try:
        await asyncio.wait_for(run.worker.ready.wait(), 10)
        sid = await gateway.create_session(P)
        for i in range(12):
            await gateway.push_audio(sid, chunk(i))
        await wait_for(lambda: engine.fed.get(sid) == list(range(12)))
        late = await gateway.create_session(P)  # its adoption (a write) is refused, likely
        await fill(gateway)  # while the tick that makes the 1.0 s result runs
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:  # > 4 leases
            assert (await gateway.capacity()).workers == 1
            await asyncio.sleep(0.1)
        assert sid in run.worker.owned
        # renewed all along: handed out once, never claimed again (by this worker or another)
        x = await gateway.r.hget(gateway.meta_key(sid), "x")
        [entry] = await gateway.r.xpending_range(gateway.sessions_key, GROUP, x, x, 1)
        assert entry["consumer"] == b"w1" and entry["times_delivered"] == 1, entry
        assert entry["time_since_delivered"] < 600, entry  # the lease: renewed within it
        assert await gateway.read_results(sid, "0", timeout_s=0) == []  # refused, waiting
        await free(gateway)
        await gateway.end_session(sid)
        assert [r["audio_s"] for r in await final_of(gateway, sid)] == [1.0, 1.2]
        for i in range(5):  # the session whose adoption was refused is served now
            await gateway.push_audio(late, chunk(i))
        await gateway.end_session(late)
        assert [r["audio_s"] for r in await final_of(gateway, late)] == [0.5]
        await wait_for(lambda: not run.worker.owned)
        m = engine.metrics
        assert m.sessions_reclaimed_total._value.get() == 0  # never lost its lease
        assert m.errors_total.labels("lease_lost")._value.get() == 0
        assert m.errors_total.labels("bus")._value.get() >= 3
        assert [o for o, _ in engine.opened] == [sid, late]  # once each: never taken over
        full_logs = [r for r in caplog.records if "maxmemory" in r.getMessage()]
        warned = [r for r in full_logs if r.levelno >= logging.WARNING]
        assert len(full_logs) >= 3 and len(warned) == 1, [r.getMessage() for r in warned]
        assert not any(r.exc_info for r in caplog.records)
        assert (await gateway.r.xpending(gateway.sessions_key, GROUP))["pending"] == 0
    finally:
        await free(gateway)
        await run.stop()
        await run.worker.bus.close()
        await gateway.close()
