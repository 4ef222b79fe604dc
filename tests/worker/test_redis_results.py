"""RedisBus.read_results through its ResultsDispatcher (worker/redis_results.py), on a real
redis-server: batched looks and one shared XREAD instead of a connection per waiting session,
cancellation, several waiters per session, an outage and a restart, ordering, close."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
import redis

from worker.bus import BusError, StreamParams
from worker.redis_bus import RedisBus

pytestmark = pytest.mark.asyncio
P = StreamParams(16000)
FAR = "9999999999999-0"  # an id after every real one


@pytest_asyncio.fixture
async def buses(redis_server) -> AsyncIterator[Callable[[], RedisBus]]:
    """Factory of RedisBus clients on the test server (a gateway's, a worker's...)."""
    made: list[RedisBus] = []

    def make() -> RedisBus:
        made.append(RedisBus(redis_server.url))
        return made[-1]

    yield make
    for b in made:
        await b.close()


def clients(redis_server) -> tuple[int, int]:
    """(connected_clients, blocked_clients) of the server, this probe's connection included."""
    r = redis.Redis.from_url(redis_server.url)
    try:
        info = r.info("clients")
        return int(info["connected_clients"]), int(info["blocked_clients"])
    finally:
        r.close()


async def until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_200_waiters_share_a_few_connections(redis_server, buses) -> None:
    gateway, worker = buses(), buses()
    sids = [await gateway.create_session(P) for _ in range(200)]
    readers = {sid: asyncio.create_task(gateway.read_results(sid, "0", timeout_s=60.0))
               for sid in sids}
    await until(lambda: gateway.dispatcher.watched == 200)
    for _ in range(5):  # over a few XREAD rounds
        connected, blocked = clients(redis_server)
        # the gateway's look/XREAD connections, the worker's, this probe: was ~200 before
        assert connected <= 6, connected
        assert blocked <= 1, blocked
        await asyncio.sleep(0.1)
    assert not any(t.done() for t in readers.values())
    order = list(sids)
    random.Random(0).shuffle(order)
    rids = {sid: await worker.publish_result(sid, {"audio_s": 1.0, "for": sid}) for sid in order}
    done, pending = await asyncio.wait(readers.values(), timeout=10.0)
    assert not pending
    for sid, t in readers.items():
        assert t.result() == [(rids[sid], {"audio_s": 1.0, "for": sid})]
    assert clients(redis_server)[0] <= 6
    await until(lambda: not gateway.dispatcher.running, 2.0)  # nothing watched: it stops


async def test_concurrent_looks_share_one_pipeline(redis_server, buses) -> None:
    bus = buses()
    sids = [await bus.create_session(P) for _ in range(300)]
    rids = [await bus.publish_result(sid, {"n": i}) for i, sid in enumerate(sids)]
    got = await asyncio.gather(*(bus.read_results(sid, "0", timeout_s=0) for sid in sids))
    assert got == [[(rid, {"n": i})] for i, rid in enumerate(rids)]
    assert clients(redis_server)[0] <= 4
    assert not bus.dispatcher.running  # timeout_s=0 never registers a waiter


async def test_a_cancelled_waiter_delays_no_one(redis_server, buses) -> None:
    gateway, worker = buses(), buses()
    s1, s2 = await gateway.create_session(P), await gateway.create_session(P)
    gone = [asyncio.create_task(gateway.read_results(s1, "0", timeout_s=60.0))
            for _ in range(50)]
    stays1 = asyncio.create_task(gateway.read_results(s1, "0", timeout_s=60.0))
    stays2 = asyncio.create_task(gateway.read_results(s2, "0", timeout_s=60.0))
    await until(lambda: gateway.dispatcher.watched == 2)
    t0 = time.monotonic()
    for t in gone:
        t.cancel()
    done, pending = await asyncio.wait(gone, timeout=1.0)
    assert not pending and all(t.cancelled() for t in gone)
    assert time.monotonic() - t0 < 1.0
    r1 = await worker.publish_result(s1, {"n": 1})
    t1 = time.monotonic()
    assert await asyncio.wait_for(stays1, 2.0) == [(r1, {"n": 1})]
    assert time.monotonic() - t1 < 1.0
    # a timeout (asyncio.wait_for) cancels too, and leaves the table
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(gateway.read_results(s1, r1, timeout_s=60.0), 0.2)
    # ...a cancel racing with the delivery
    racing = asyncio.create_task(gateway.read_results(s2, "0", timeout_s=60.0))
    await asyncio.sleep(0.05)
    r2 = asyncio.create_task(worker.publish_result(s2, {"n": 2}))
    await asyncio.sleep(0)
    racing.cancel()
    r2 = await r2
    assert await asyncio.wait_for(stays2, 2.0) == [(r2, {"n": 2})]
    await asyncio.wait([racing], timeout=1.0)
    assert racing.done()
    await until(lambda: gateway.dispatcher.watched == 0 and not gateway.dispatcher.running, 2.0)
    # and a later waiter is served as usual
    later = asyncio.create_task(gateway.read_results(s2, r2, timeout_s=5.0))
    await asyncio.sleep(0.05)
    r3 = await worker.publish_result(s2, {"n": 3})
    assert await asyncio.wait_for(later, 2.0) == [(r3, {"n": 3})]


async def test_several_waiters_on_one_session_each_get_the_entries(buses) -> None:
    gateway, worker = buses(), buses()
    sid = await gateway.create_session(P)
    r1 = await worker.publish_result(sid, {"n": 1})
    r2 = await worker.publish_result(sid, {"n": 2})
    assert await gateway.read_results(sid, r1, timeout_s=5.0) == [(r2, {"n": 2})]  # no wait
    ms2 = int(r2.split("-")[0])
    a = asyncio.create_task(gateway.read_results(sid, r2, timeout_s=10.0))  # an old websocket
    b = asyncio.create_task(gateway.read_results(sid, r2, timeout_s=10.0))  # its resume
    c = asyncio.create_task(gateway.read_results(sid, f"{ms2 + 1}-0", timeout_s=10.0))
    far = asyncio.create_task(gateway.read_results(sid, FAR, timeout_s=0.6))
    await until(lambda: gateway.dispatcher.watched == 1)
    await asyncio.sleep(0.05)  # the next id is past ms2 + 1
    r3 = await worker.publish_result(sid, {"n": 3})
    for t in (a, b, c):
        assert await asyncio.wait_for(t, 2.0) == [(r3, {"n": 3})]
    assert await asyncio.wait_for(far, 3.0) == []  # nothing after its own ``after``


async def test_redis_killed_then_back(redis_server, buses) -> None:
    gateway, worker = buses(), buses()
    sids = [await gateway.create_session(P) for _ in range(20)]
    readers = [asyncio.create_task(gateway.read_results(sid, "0", timeout_s=60.0))
               for sid in sids]
    await until(lambda: gateway.dispatcher.watched == 20)
    redis_server.kill()
    t0 = time.monotonic()
    done, pending = await asyncio.wait(readers, timeout=10.0)
    assert not pending, "a waiter hung after Redis died"
    assert time.monotonic() - t0 < 5.0
    for t in readers:
        assert isinstance(t.exception(), BusError)
        assert t.exception().reason == "redis_unavailable"
    await until(lambda: not gateway.dispatcher.running, 2.0)
    with pytest.raises(BusError) as e:  # while it is down, a new call fails too
        await gateway.read_results(sids[0], "0", timeout_s=1.0)
    assert e.value.reason == "redis_unavailable"
    redis_server.start()  # empty, same port
    with pytest.raises(BusError) as e:
        await gateway.read_results(sids[0], "0", timeout_s=1.0)
    assert e.value.reason == "unknown_session"
    sid = await gateway.create_session(P)
    waiter = asyncio.create_task(gateway.read_results(sid, "0", timeout_s=10.0))
    await until(lambda: gateway.dispatcher.watched == 1)
    rid = await worker.publish_result(sid, {"n": 1})
    assert await asyncio.wait_for(waiter, 3.0) == [(rid, {"n": 1})]


async def test_order_and_after_unchanged(buses) -> None:
    gateway, worker = buses(), buses()
    sid = await gateway.create_session(P)
    assert await gateway.read_results(sid, "0", timeout_s=0) == []
    t0 = time.monotonic()
    assert await gateway.read_results(sid, "0", timeout_s=0.3) == []  # a timeout: []
    assert 0.25 <= time.monotonic() - t0 < 3.0
    ids = [await worker.publish_result(sid, {"n": i}) for i in range(5)]
    assert await gateway.read_results(sid, "0") == [(r, {"n": i}) for i, r in enumerate(ids)]
    for k in range(5):
        assert [r["n"] for _, r in await gateway.read_results(sid, ids[k])] == list(
            range(k + 1, 5))
    t0 = time.monotonic()
    assert await gateway.read_results(sid, ids[-1], timeout_s=0) == []  # never blocks
    assert time.monotonic() - t0 < 0.5
    waiter = asyncio.create_task(gateway.read_results(sid, ids[-1], timeout_s=10.0))
    await until(lambda: gateway.dispatcher.watched == 1)
    more = [await worker.publish_result(sid, {"n": i}) for i in range(5, 8)]
    got = await asyncio.wait_for(waiter, 3.0)
    while len(got) < 3:  # one XREAD may return the first ones only
        got += await gateway.read_results(sid, got[-1][0], timeout_s=3.0)
    assert got == [(r, {"n": i}) for i, r in zip(range(5, 8), more, strict=True)]
    with pytest.raises(BusError) as e:
        await gateway.read_results("nope", "0", timeout_s=1.0)
    assert e.value.reason == "unknown_session"
    with pytest.raises(BusError) as e:
        await gateway.read_results(sid, "x-1", timeout_s=1.0)
    assert e.value.reason == "bad_result_id"


async def test_many_keys_are_read_in_chunks(redis_server, buses) -> None:
    gateway, worker = buses(), buses()
    gateway.dispatcher.max_keys = 7
    sids = [await gateway.create_session(P) for _ in range(30)]
    readers = {sid: asyncio.create_task(gateway.read_results(sid, "0", timeout_s=60.0))
               for sid in sids}
    await until(lambda: gateway.dispatcher.watched == 30)
    await asyncio.sleep(0.3)
    assert clients(redis_server)[0] <= 5 + 4  # 5 chunks, a look, the worker's, the probe
    rids = {sid: await worker.publish_result(sid, {"for": sid}) for sid in reversed(sids)}
    for sid, t in readers.items():
        assert await asyncio.wait_for(t, 3.0) == [(rids[sid], {"for": sid})]


async def test_close_ends_waiters_and_the_dispatcher(redis_server) -> None:
    bus = RedisBus(redis_server.url)
    sid = await bus.create_session(P)
    waiters = [asyncio.create_task(bus.read_results(sid, "0", timeout_s=60.0)) for _ in range(3)]
    await until(lambda: bus.dispatcher.running and bus.dispatcher.watched == 1)
    await asyncio.wait_for(bus.close(), 2.0)
    done, pending = await asyncio.wait(waiters, timeout=2.0)
    assert not pending
    assert all(isinstance(t.exception(), BusError) and t.exception().reason == "closed"
               for t in waiters)
    assert not bus.dispatcher.running and bus.dispatcher.watched == 0
