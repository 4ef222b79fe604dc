"""Workers (the real loop, a recording engine) over RedisBus on a real redis-server (issue #20):
a poison session fails alone, sessions that arrive together spread over the workers, a stopped
worker hands its sessions back and leaves the consumer group."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from tests.worker.test_runner import P, RecordingEngine, Running, chunk, final_of, settings
from worker.redis_bus import RedisBus
from worker.redis_keys import GROUP
from worker.runner import Worker, error_result

pytestmark = pytest.mark.asyncio


async def test_a_poison_session_fails_alone_and_the_others_are_served(redis_server) -> None:
    """Issue #20, found: a session stored with channels "1.0" made every claim batch raise, so
    the sessions created after it got no result in 40 s, and the poison client no answer."""
    bus = RedisBus(redis_server.url, lease_ms=600)
    poison = await bus.create_session(P)
    await bus.r.hset(bus.meta_key(poison), "ch", "1.0")  # as the lax gateway stored it
    good = await bus.create_session(P)  # created together: the same claim batch
    for i in range(20):
        await bus.push_audio(good, chunk(i))
    await bus.end_session(good)
    engine = RecordingEngine()
    run = Running(Worker(RedisBus(redis_server.url, lease_ms=600), engine, settings()))
    try:
        t0 = time.monotonic()
        assert [r["audio_s"] for r in await final_of(bus, good)] == [1.0, 2.0, 2.0]
        assert time.monotonic() - t0 < 5.0  # on time (it used to get nothing for minutes)
        [err] = await final_of(bus, poison)
        assert err["final"] and err["error"]["code"] == "bad_params"
        assert "channels" in err["error"]["message"]
        assert engine.metrics.errors_total.labels("bad_session")._value.get() == 1
        assert poison not in engine.opened and engine.fed[good] == list(range(20))
        # its claim entry is acked and gone: nobody is handed it again
        assert (await bus.r.xpending(bus.sessions_key, GROUP))["pending"] == 0
        assert await bus.r.xlen(bus.sessions_key) == 0
    finally:
        await run.stop()
        await run.worker.bus.close()
        await bus.close()


async def test_sessions_that_arrive_together_spread_over_the_workers(redis_server) -> None:
    """Issue #20, found: 9/1, 9/1 and 20/0 over two workers. Each worker now claims up to its
    fair share (its part, by capacity, of the sessions waiting or held)."""
    bus = RedisBus(redis_server.url, lease_ms=600)
    workers = [Worker(RedisBus(redis_server.url, lease_ms=600), RecordingEngine(max_sessions=64),
                      settings(worker_id=f"w{i}", max_sessions=64)) for i in range(3)]
    runs = [Running(w) for w in workers]
    try:
        for w in workers:
            await asyncio.wait_for(w.ready.wait(), 10)
        sids = await asyncio.gather(*(bus.create_session(P) for _ in range(20)))
        deadline = time.monotonic() + 10
        while sum(len(w.owned) for w in workers) < 20:
            assert time.monotonic() < deadline, [len(w.owned) for w in workers]
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a few more claim rounds: nothing moves
        held = Counter({w.worker_id: len(w.owned) for w in workers})
        assert sum(held.values()) == 20 and set().union(*(w.owned for w in workers)) == set(sids)
        assert max(held.values()) <= 12, held  # no worker over 60 %
        assert min(held.values()) >= 1, held  # every worker has a part
    finally:
        for r in runs:
            await r.stop()
            await r.worker.bus.close()
        await bus.close()


async def test_a_stopped_worker_hands_back_and_leaves_the_group(redis_server) -> None:
    bus = RedisBus(redis_server.url, lease_ms=5000)
    engine = RecordingEngine()
    run = Running(Worker(RedisBus(redis_server.url, lease_ms=5000), engine,
                         settings(lease_ms=5000)))
    sid = await bus.create_session(P)
    await bus.push_audio(sid, chunk(0))
    try:
        while not engine.fed.get(sid):
            await asyncio.sleep(0.02)
        assert (await bus.capacity()).workers == 1
    finally:
        await run.stop()
        await run.worker.bus.close()
    try:
        [c] = await bus.claim("other", 4)  # at once, not after the 5 s lease
        assert c.session_id == sid and c.reclaimed
        names = [c["name"] for c in await bus.r.xinfo_consumers(bus.sessions_key, GROUP)]
        assert names == [b"other"]  # "w1" is gone from the group...
        assert (await bus.capacity()).workers == 0  # ...and from the workers at once
    finally:
        await bus.close()


async def test_a_session_whose_final_is_out_is_finished_with_no_second_final(redis_server
                                                                              ) -> None:
    """Review: a worker that died after publishing a session's final but before ``finish`` left
    it to be claimed again; the next owner rebuilt it from the retained audio and published a
    second final (``_adopt`` ignored the final it read). Now it finishes the session at once,
    computing nothing; the same for a session the dead worker had failed (an error final)."""
    bus = RedisBus(redis_server.url, lease_ms=600)
    sid = await bus.create_session(P)
    for i in range(12):
        await bus.push_audio(sid, chunk(i))
    await bus.end_session(sid)
    poison = await bus.create_session(P)
    await bus.r.hset(bus.meta_key(poison), "ch", "1.0")  # its params do not parse
    # the worker that dies: claims both, publishes their finals, never finishes them
    assert {c.session_id for c in await bus.claim("dead", 2)} == {sid, poison}
    final = await bus.publish_result(sid, {"audio_s": 1.2, "lag_s": 0.0, "final": True,
                                           "matches": [], "decision": None}, owner="dead")
    failed = await bus.publish_result(poison, error_result("bad_params", "channels"),
                                      owner="dead")
    engine = RecordingEngine()
    run = Running(Worker(RedisBus(redis_server.url, lease_ms=600), engine, settings()))
    try:
        deadline = time.monotonic() + 10
        while await bus.r.xlen(bus.sessions_key):  # both finished: their entries acked, gone
            assert time.monotonic() < deadline, "not finished"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a few more steps: nothing more is published
        assert [rid for rid, _ in await bus.read_results(sid, "0", timeout_s=0)] == [final]
        assert [rid for rid, _ in await bus.read_results(poison, "0", timeout_s=0)] == [failed]
        assert engine.opened == [] and not run.worker.owned  # nothing computed again
        m = engine.metrics
        assert m.sessions_reclaimed_total._value.get() == 1  # (the poison one is not adopted)
        assert m.errors_total.labels("bad_session")._value.get() == 0  # failed once, before
        assert not await bus.r.smembers(bus.active_key)
    finally:
        await run.stop()
        await run.worker.bus.close()
        await bus.close()
