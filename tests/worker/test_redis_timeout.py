"""A frozen Redis (SIGSTOP: its connections stay open, nothing answers) fails every bus call within
the bus's ``timeout_s`` as ``BusError`` ``redis_unavailable``, gateway side and worker side; once
it runs again the same bus works. Blocking reads never time out while Redis is well. A real
redis-server throughout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator

import pytest

from worker.bus import BusError
from worker.redis_bus import RedisBus
from worker.settings import BusSettings, WorkerSettings

from .test_bus import P, chunk

pytestmark = pytest.mark.asyncio
TIMEOUT_S = 1.0


@contextlib.contextmanager
def frozen(redis_server) -> Iterator[None]:
    """The test's redis-server stopped (SIGSTOP) for the block; continued (SIGCONT) after."""
    pid = redis_server._proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def fails_in_time(call) -> float:
    """Await ``call()``: it must raise ``redis_unavailable`` within the timeout + 2 s."""
    t0 = time.monotonic()
    with pytest.raises(BusError) as e:
        await asyncio.wait_for(call(), TIMEOUT_S + 2.0)
    took = time.monotonic() - t0
    assert e.value.reason == "redis_unavailable", e.value
    assert took < TIMEOUT_S + 2.0
    return took


async def test_a_frozen_redis_fails_every_call_in_time_then_recovers(redis_server) -> None:
    gateway = RedisBus(redis_server.url, lease_ms=1000, timeout_s=TIMEOUT_S)
    worker = RedisBus(redis_server.url, lease_ms=1000, timeout_s=TIMEOUT_S)
    try:
        sid = await gateway.create_session(P)
        assert await gateway.push_audio(sid, chunk(0))
        await worker.heartbeat("w", 4)
        with frozen(redis_server):
            for call in (lambda: gateway.push_audio(sid, chunk(1)),
                         lambda: gateway.read_results(sid, "0", timeout_s=0.5),
                         lambda: gateway.create_session(P),
                         lambda: gateway.capacity(),
                         lambda: worker.claim("w", 4, block_s=0.5),
                         lambda: worker.heartbeat("w", 4),
                         lambda: worker.renew("w", [sid]),
                         lambda: worker.read_audio(sid, -1),
                         lambda: worker.publish_result(sid, {"audio_s": 1.0}, owner="w")):
                took = await fails_in_time(call)
                assert took >= TIMEOUT_S * 0.8  # it waited for Redis, then gave up
        # Running again: the same buses work (redis-py reconnects). Redis still ran what it had
        # been sent (the push of chunk 1, a session, a claim whose reply was lost: its entry
        # lapses after the lease), as after any lost reply.
        assert await gateway.push_audio(sid, chunk(2))
        await asyncio.sleep(1.2)  # the lost claim's lease lapses
        assert sid in [c.session_id for c in await worker.claim("w", 4)]
        batch = await worker.read_audio(sid, -1)
        assert [c.seq for c in batch.chunks] == [0, 1, 2]
        assert await worker.publish_result(sid, {"audio_s": 2.0}, owner="w")
        assert {"audio_s": 2.0} in [r for _, r in await gateway.read_results(sid, "0",
                                                                                timeout_s=0)]
    finally:
        await gateway.close()
        await worker.close()


async def test_a_wait_on_results_fails_when_redis_freezes_during_it(redis_server) -> None:
    bus = RedisBus(redis_server.url, timeout_s=TIMEOUT_S)
    try:
        sid = await bus.create_session(P)
        waiting = asyncio.create_task(bus.read_results(sid, "0", timeout_s=10.0))
        await asyncio.sleep(0.3)  # in the dispatcher's XREAD BLOCK loop
        with frozen(redis_server):
            t0 = time.monotonic()
            with pytest.raises(BusError) as e:
                await asyncio.wait_for(waiting, TIMEOUT_S + 2.0)
            assert e.value.reason == "redis_unavailable"
            assert time.monotonic() - t0 < TIMEOUT_S + 2.0
        assert await bus.read_results(sid, "0", timeout_s=0.2) == []
    finally:
        await bus.close()


async def test_blocking_reads_longer_than_the_timeout_do_not_time_out(redis_server) -> None:
    bus = RedisBus(redis_server.url, lease_ms=60_000, timeout_s=0.4)
    try:
        sid = await bus.create_session(P)
        assert [c.session_id for c in await bus.claim("w", 4)] == [sid]
        t0 = time.monotonic()
        assert await bus.claim("w", 4, block_s=3.0) == []  # blocks ≤ half the timeout, no error
        assert time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        assert await bus.read_results(sid, "0", timeout_s=1.5) == []  # many short XREADs
        assert time.monotonic() - t0 >= 1.4
        other = await bus.create_session(P)  # a blocking claim still wakes on a new session
        assert [c.session_id for c in await bus.claim("w", 4, block_s=3.0)] == [other]
    finally:
        await bus.close()


async def test_the_timeout_is_a_bus_setting(redis_server) -> None:
    s = BusSettings.from_env({"MIDIMATCH_REDIS_TIMEOUT_S": "2.5"}, redis_url=redis_server.url)
    assert s.redis_timeout_s == 2.5 and BusSettings().redis_timeout_s == 5.0
    bus = RedisBus.from_settings(s)
    try:
        kw = bus.r.connection_pool.connection_kwargs
        assert (bus.timeout_s, kw["socket_timeout"], kw["socket_connect_timeout"]) == (
            2.5, 2.5, 2.5)
        assert bus.dispatcher.block_ms < 2500
    finally:
        await bus.close()
    assert WorkerSettings(redis_timeout_s=3.0).bus.redis_timeout_s == 3.0
    with pytest.raises(Exception, match="redis_timeout_s"):
        BusSettings(redis_timeout_s=0)
    with pytest.raises(BusError):
        RedisBus(redis_server.url, timeout_s=0)
