"""Real worker processes against a real redis-server: sharing, a crash, a restart, Redis lost.

The test plays the gateway with a RedisBus: it creates sessions, streams a synthesized piece at
real-time pace in 0.1 s chunks, and reads the results the way a client would.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from tests.integration.conftest import RATE
from tests.redis_server import free_port
from worker.bus import AudioChunk, BusError, StreamParams
from worker.redis_bus import RedisBus
from worker.redis_keys import GROUP

pytestmark = pytest.mark.asyncio
P = StreamParams(RATE)
CHUNK = RATE // 10  # 0.1 s


async def wait_workers(bus: RedisBus, n: int, workers: list, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (await bus.capacity()).workers < n:
        for w in workers:
            assert w.proc.poll() is None, f"worker {w.worker_id} exited:\n{w.tail()}"
        assert time.monotonic() < deadline, "workers did not come up"
        await asyncio.sleep(0.2)


async def stream(bus: RedisBus, sid: str, pcm: np.ndarray, first: int = 0, last: int | None = None,
                 speed: float = 1.0, end: bool = True) -> None:
    """Push chunks ``first..last-1`` of ``pcm`` at ``speed`` × real time."""
    n = -(-len(pcm) // CHUNK)
    last = n if last is None else last
    t_start = time.monotonic()
    for k in range(first, last):
        await bus.push_audio(sid, AudioChunk(k, k * CHUNK / RATE,
                                             pcm[k * CHUNK:(k + 1) * CHUNK].tobytes()))
        await asyncio.sleep(max(0.0, t_start + (k - first + 1) * 0.1 / speed - time.monotonic()))
    if end:
        await bus.end_session(sid)


async def collect(bus: RedisBus, sid: str, out: list[tuple[float, dict]],
                  timeout_s: float = 60.0) -> None:
    """Append (arrival time, result) until the final result."""
    after, deadline = "0", time.monotonic() + timeout_s
    while not (out and out[-1][1]["final"]):
        assert time.monotonic() < deadline, f"{sid}: no final result; got {out[-3:]}"
        for rid, r in await bus.read_results(sid, after, timeout_s=0.5):
            out.append((time.monotonic(), r))
            after = rid


async def owner(bus: RedisBus, sid: str) -> str:
    return (await bus.r.hget(bus.meta_key(sid), "o") or b"").decode()


def audio_of(results: list[tuple[float, dict]]) -> list[float]:
    return [r["audio_s"] for _, r in results]


def assert_no_replay(results: list[tuple[float, dict]]) -> None:
    """Periodic results strictly increasing in audio_s (none twice), then one final."""
    periodic = audio_of(results[:-1])
    assert periodic == sorted(set(periodic)), periodic
    assert [r["final"] for _, r in results] == [False] * len(periodic) + [True]


async def test_two_workers_share_sessions_and_survive_a_crash(redis_server, start_worker,
                                                              index_and_audio) -> None:
    pcm = index_and_audio[1][: 10 * RATE]  # 10 s per session
    bus = RedisBus(redis_server.url, lease_ms=1000)
    workers = [start_worker(redis_server.url, f"w{i}", metrics_port=free_port()) for i in (1, 2)]
    try:
        await wait_workers(bus, 2, workers)
        sids, feeds, results = [], [], {}
        for _ in range(4):
            sid = await bus.create_session(P)
            sids.append(sid)
            results[sid] = []
            feeds.append(asyncio.create_task(stream(bus, sid, pcm)))
            feeds.append(asyncio.create_task(collect(bus, sid, results[sid])))
            await asyncio.sleep(0.3)
        while min(len(r) for r in results.values()) < 2:  # everyone is being served
            await asyncio.sleep(0.1)
        owners = {sid: await owner(bus, sid) for sid in sids}
        assert set(owners.values()) == {"w1", "w2"}, owners  # shared
        victim = next(w for w in workers if w.worker_id == owners[sids[0]])
        survivor = next(w for w in workers if w is not victim)
        orphans = [s for s in sids if owners[s] == victim.worker_id]
        seen = {s: max(audio_of(results[s])) for s in orphans}
        victim.kill()
        t_kill = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*feeds), 60)
        for sid in orphans:
            after = [(t, r) for t, r in results[sid] if r["audio_s"] > seen[sid]]
            assert after, f"{sid} never resumed"
            assert after[0][0] - t_kill <= 3.0, f"{sid} resumed {after[0][0] - t_kill:.2f} s " \
                                                "after the crash"
            assert len(after) >= 3  # and keeps producing results
            assert await owner(bus, sid) == survivor.worker_id
        for sid in sids:
            assert_no_replay(results[sid])
            assert results[sid][-1][1]["audio_s"] == pytest.approx(10.0, abs=1e-3)  # all audio
        assert survivor.proc.poll() is None
        assert survivor.metric("midimatch_worker_sessions_reclaimed_total") == len(orphans)
        assert survivor.metric("midimatch_worker_sessions_claimed_total") == 4 - len(orphans)
    finally:
        await bus.close()


async def test_restart_loses_no_chunk(redis_server, start_worker, index_and_audio) -> None:
    pcm = index_and_audio[1][: 8 * RATE]
    bus = RedisBus(redis_server.url, lease_ms=1000)
    w = start_worker(redis_server.url, "w1")
    try:
        await wait_workers(bus, 1, [w])
        sid = await bus.create_session(P)
        results: list[tuple[float, dict]] = []
        reader = asyncio.create_task(collect(bus, sid, results))
        await stream(bus, sid, pcm, 0, 30, speed=2.0, end=False)  # 3 s
        while not results:
            await asyncio.sleep(0.05)
        assert w.terminate() == 0  # graceful: hands the session back...
        assert (await bus.capacity()).workers == 0  # ...and leaves at once (issue #20)
        consumers = await bus.r.xinfo_consumers(bus.sessions_key, GROUP)
        assert [c["name"] for c in consumers] == []  # its consumer held nothing: deleted
        assert (await bus.r.xpending(bus.sessions_key, GROUP))["pending"] == 0
        w = start_worker(redis_server.url, "w1")  # the same worker, started again
        await stream(bus, sid, pcm, 30, speed=2.0)  # the rest arrives meanwhile
        await asyncio.wait_for(reader, 60)
        assert results[-1][1]["audio_s"] == pytest.approx(8.0, abs=1e-3)  # nothing lost
        assert_no_replay(results)
        assert len(results) >= 8
    finally:
        await bus.close()


async def test_redis_restart_loses_sessions_but_the_worker_carries_on(
        redis_server, start_worker, index_and_audio) -> None:
    """Redis without persistence restarts empty: every live session is gone (the gateway gets
    ``unknown_session`` and tells its client), the worker drops its sessions, re-creates the
    consumer group and serves new sessions; it never exits."""
    pcm = index_and_audio[1][: 3 * RATE]
    bus = RedisBus(redis_server.url, lease_ms=1000)
    w = start_worker(redis_server.url, "w1")
    try:
        await wait_workers(bus, 1, [w])
        old = await bus.create_session(P)
        await stream(bus, old, pcm, 0, 10, speed=4.0, end=False)
        redis_server.restart()
        with pytest.raises(BusError) as e:
            await bus.push_audio(old, AudioChunk(10, 1.0, pcm[:CHUNK].tobytes()))
        assert e.value.reason == "unknown_session"
        await wait_workers(bus, 1, [w])  # its heartbeat is back
        new = await bus.create_session(P)
        results: list[tuple[float, dict]] = []
        await asyncio.gather(stream(bus, new, pcm, speed=4.0), collect(bus, new, results))
        assert audio_of(results)[-1] == pytest.approx(3.0, abs=1e-3)
        assert w.proc.poll() is None
    finally:
        await bus.close()
