"""The Bus contract, run against InProcessBus and RedisBus (a real redis-server): the same test,
the same expected behaviour. Redis-only behaviour (restart, outage) at the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
import pytest_asyncio

from worker.bus import (
    AudioBatch,
    AudioChunk,
    Bus,
    BusError,
    StreamParams,
    Workload,
    result_id_key,
)
from worker.local_bus import InProcessBus
from worker.redis_bus import RedisBus
from worker.redis_keys import GROUP

pytestmark = pytest.mark.asyncio
P = StreamParams(16000)
LEASE_S = 0.5


def chunk(seq: int, dur_s: float = 0.02, rate: int = 16000) -> AudioChunk:
    """A chunk of ``dur_s`` of s16 silence-with-a-marker: its first sample holds ``seq``."""
    x = np.zeros(int(dur_s * rate), np.int16)
    x[0] = seq % 30000
    return AudioChunk(seq, round(seq * dur_s, 6), x.tobytes())


@pytest_asyncio.fixture(params=["inprocess", "redis"])
async def make_bus(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Bus]]:
    """Factory of buses of one kind with the given settings (seconds for every duration)."""
    made: list[Bus] = []

    def make(lease_s: float = LEASE_S, retain_s: float = 30.0, session_ttl_s: float = 60.0,
             result_ttl_s: float = 60.0, max_results: int = 1000) -> Bus:
        if request.param == "inprocess":
            bus: Bus = InProcessBus(lease_s=lease_s, retain_s=retain_s, max_results=max_results,
                                    session_ttl_s=session_ttl_s, result_ttl_s=result_ttl_s)
        else:
            server = request.getfixturevalue("redis_server")
            bus = RedisBus(server.url, lease_ms=int(lease_s * 1000), retain_s=retain_s,
                           max_results=max_results, session_ttl_s=session_ttl_s,
                           result_ttl_s=result_ttl_s)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        await bus.close()


@pytest_asyncio.fixture
async def bus(make_bus: Callable[..., Bus]) -> Bus:
    return make_bus()


@pytest.mark.parametrize("bad", [
    dict(sample_rate=16000.0), dict(sample_rate=True), dict(sample_rate=7999),
    dict(sample_rate=16000, channels=1.0), dict(sample_rate=16000, channels=True),
    dict(sample_rate=16000, channels=3), dict(sample_rate=16000, encoding=["pcm_s16le"]),
    dict(sample_rate=16000, encoding="mp3")])
async def test_stream_params_take_exact_types_only(bad: dict) -> None:
    # channels=1.0 was stored as "1.0" and then failed every worker's claim (issue #20)
    with pytest.raises(BusError) as e:
        StreamParams(**bad)
    assert e.value.reason.startswith("bad_")


async def test_create_and_params(bus: Bus) -> None:
    sid = await bus.create_session(StreamParams(44100, 2, "pcm_f32le"))
    assert await bus.session_params(sid) == StreamParams(44100, 2, "pcm_f32le")
    assert await bus.session_params("nope") is None
    assert await bus.create_session(P, session_id="mine") == "mine"
    with pytest.raises(BusError) as e:
        await bus.create_session(P, session_id="mine")
    assert e.value.reason == "session_exists"
    assert (await bus.capacity()).sessions_active == 2


async def test_audio_in_order_with_sequence_checks(bus: Bus) -> None:
    sid = await bus.create_session(P)
    assert await bus.last_seq(sid) == -1
    for i in range(5):
        assert await bus.push_audio(sid, chunk(i)) is True
    assert await bus.push_audio(sid, chunk(3)) is False  # duplicate: ignored
    with pytest.raises(BusError) as e:
        await bus.push_audio(sid, chunk(7))
    assert e.value.reason == "bad_seq"
    assert await bus.last_seq(sid) == 4
    batch = await bus.read_audio(sid, after_seq=-1)
    assert [c.seq for c in batch.chunks] == [0, 1, 2, 3, 4] and not batch.ended
    assert [c.pcm for c in batch.chunks] == [chunk(i).pcm for i in range(5)]
    assert [c.t_s for c in batch.chunks] == [chunk(i).t_s for i in range(5)]
    assert [c.seq for c in (await bus.read_audio(sid, after_seq=2)).chunks] == [3, 4]
    assert [c.seq for c in (await bus.read_audio(sid, after_seq=0, max_chunks=2)).chunks] == [1, 2]
    assert (await bus.read_audio(sid, after_seq=4)).chunks == []
    with pytest.raises(BusError) as e:
        await bus.push_audio("nope", chunk(0))
    assert e.value.reason == "unknown_session"


async def test_end_marker_after_the_last_chunk(bus: Bus) -> None:
    sid = await bus.create_session(P)
    for i in range(3):
        await bus.push_audio(sid, chunk(i))
    await bus.end_session(sid)
    await bus.end_session(sid)  # twice is harmless
    first = await bus.read_audio(sid, after_seq=-1, max_chunks=2)
    assert [c.seq for c in first.chunks] == [0, 1] and not first.ended
    rest = await bus.read_audio(sid, after_seq=1, max_chunks=2)
    assert [c.seq for c in rest.chunks] == [2] and rest.ended
    assert (await bus.read_audio(sid, after_seq=2)).ended
    assert await bus.last_seq(sid) == 2
    with pytest.raises(BusError) as e:
        await bus.push_audio(sid, chunk(3))
    assert e.value.reason == "ended"


async def test_any_reader_finds_chunks_after_a_seq(bus: Bus) -> None:
    """A reader that did not read before (a gateway resuming a session, another process)."""
    other = RedisBus(bus.url) if isinstance(bus, RedisBus) else bus
    try:
        sid = await bus.create_session(P)
        assert (await other.read_audio(sid, 5)).chunks == []
        for i in range(10):
            await bus.push_audio(sid, chunk(i))
        assert [c.seq for c in (await other.read_audio(sid, 3, max_chunks=2)).chunks] == [4, 5]
        last = await other.read_audio(sid, 8, max_chunks=1)
        assert [c.seq for c in last.chunks] == [9] and not last.ended
        assert (await other.read_audio(sid, 9)) == AudioBatch([], False)
        await bus.end_session(sid)
        last = await other.read_audio(sid, 8, max_chunks=1)
        assert [c.seq for c in last.chunks] == [9] and last.ended
        assert (await other.read_audio(sid, 9)) == AudioBatch([], True)
        assert [c.seq for c in (await other.read_audio(sid, 6)).chunks] == [7, 8, 9]
    finally:
        if other is not bus:
            await other.close()


async def test_claim_once_then_lease_lapse_then_reclaim(bus: Bus) -> None:
    sid = await bus.create_session(P)
    [c] = await bus.claim("a", 4)
    assert (c.session_id, c.params, c.reclaimed) == (sid, P, False)
    assert await bus.claim("b", 4) == []
    for _ in range(4):  # renewing keeps it, well past one lease
        await asyncio.sleep(LEASE_S / 3)
        assert await bus.renew("a", [sid]) == []
    assert await bus.claim("b", 4) == []
    await asyncio.sleep(LEASE_S * 1.5)  # "a" stopped renewing
    [c] = await bus.claim("b", 4)
    assert (c.session_id, c.reclaimed) == (sid, True)
    assert await bus.renew("a", [sid]) == [sid]
    assert await bus.renew("b", [sid]) == []


async def test_blocking_claim_wakes_on_create(bus: Bus) -> None:
    waiter = asyncio.create_task(bus.claim("a", 2, block_s=5.0))
    await asyncio.sleep(0.1)
    sid = await bus.create_session(P)
    claims = await asyncio.wait_for(waiter, 5.0)
    assert [c.session_id for c in claims] == [sid]


async def test_release_hands_back_at_once(bus: Bus) -> None:
    sids = [await bus.create_session(P) for _ in range(3)]
    assert len(await bus.claim("a", 2)) == 2
    [third] = await bus.claim("b", 5)
    assert third.session_id == sids[2] and not third.reclaimed
    await bus.release("a", sids[:2])
    taken = await bus.claim("b", 5)
    assert sorted(c.session_id for c in taken) == sorted(sids[:2])
    assert all(c.reclaimed for c in taken)
    assert sorted(await bus.renew("a", sids[:2])) == sorted(sids[:2])
    await bus.release("a", [sids[2]])  # not its own: nothing happens
    assert await bus.renew("b", sids) == []


async def test_finish_forgets_the_session_but_keeps_results(bus: Bus) -> None:
    sid = await bus.create_session(P)
    await bus.push_audio(sid, chunk(0))
    await bus.claim("a", 1)
    await bus.finish("b", sid)  # not the owner: ignored
    assert await bus.renew("a", [sid]) == []
    rid = await bus.publish_result(sid, {"audio_s": 0.02, "final": True})
    await bus.finish("a", sid)
    assert await bus.renew("a", [sid]) == [sid]
    assert (await bus.capacity()).sessions_active == 0
    await asyncio.sleep(LEASE_S * 1.5)
    assert await bus.claim("b", 5) == []
    assert await bus.read_results(sid, "0", timeout_s=0) == [(rid, {"audio_s": 0.02,
                                                                      "final": True})]
    with pytest.raises(BusError):
        await bus.push_audio(sid, chunk(1))


async def test_results_order_resume_and_wait(bus: Bus) -> None:
    sid = await bus.create_session(P)
    assert await bus.read_results(sid, "0", timeout_s=0.05) == []
    ids = [await bus.publish_result(sid, {"audio_s": float(i)}) for i in range(4)]
    assert [result_id_key(i) for i in ids] == sorted(result_id_key(i) for i in ids)
    assert len(set(ids)) == 4
    got = await bus.read_results(sid, "0")
    assert [(i, r["audio_s"]) for i, r in got] == list(zip(ids, [0.0, 1.0, 2.0, 3.0],
                                                           strict=True))
    assert [r["audio_s"] for _, r in await bus.read_results(sid, ids[1])] == [2.0, 3.0]
    waiter = asyncio.create_task(bus.read_results(sid, ids[3], timeout_s=5.0))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    later = await bus.publish_result(sid, {"audio_s": 4.0, "matches": [{"id": "x"}]})
    assert await asyncio.wait_for(waiter, 5.0) == [(later, {"audio_s": 4.0,
                                                            "matches": [{"id": "x"}]})]
    with pytest.raises(BusError):
        await bus.read_results("nope", "0", timeout_s=0)


async def test_cancelled_waiters_end_at_once_and_stall_no_one(bus: Bus) -> None:
    # A client that goes away cancels its reader, often just as a result arrives. The cancelled
    # readers must end at once (a first version of the lock-free wait, an Event under
    # asyncio.wait_for, swallowed such cancellations on CPython 3.11 and waited out the full
    # timeout) and later readers must still be woken.
    sid = await bus.create_session(P)
    for i in range(3):
        readers = [asyncio.create_task(bus.read_results(sid, "9999999999999-0", timeout_s=30.0))
                   for _ in range(3)]
        claimer = asyncio.create_task(bus.claim("x", 1, block_s=30.0))
        await asyncio.sleep(0.05)
        # distinct results: one equal to the last one stored is a repeat, stored once
        publish = asyncio.create_task(bus.publish_result(sid, {"audio_s": 1.0 + i / 10}))
        await asyncio.sleep(0)  # the publish runs up to its wake-up, then the cancellations land
        for t in [*readers, claimer]:
            t.cancel()
        # Redis waiters end when their blocking command returns (a round trip on a busy
        # machine, rarely over 2 s); in process they end at once.
        limit = 2.0 if isinstance(bus, InProcessBus) else 10.0
        done, pending = await asyncio.wait([*readers, claimer], timeout=limit)
        assert not pending, "a cancelled waiter kept waiting"
        await publish
    waiter = asyncio.create_task(bus.read_results(sid, "0", timeout_s=5.0))
    assert len(await asyncio.wait_for(waiter, 2.0)) == 3
    late = asyncio.create_task(bus.read_results(sid, (await bus.read_results(sid, "0"))[-1][0],
                                                timeout_s=5.0))
    await asyncio.sleep(0.05)
    rid = await bus.publish_result(sid, {"audio_s": 2.0})
    assert await asyncio.wait_for(late, 2.0) == [(rid, {"audio_s": 2.0})]


async def test_retention_keeps_the_newest_window(make_bus: Callable[..., Bus]) -> None:
    bus = make_bus(retain_s=1.0, max_results=20)
    sid = await bus.create_session(P)
    n, dur = 500, 0.02  # 10 s of audio, 1 s retained (50 chunks)
    for i in range(n):
        await bus.push_audio(sid, chunk(i, dur))
    kept = (await bus.read_audio(sid, after_seq=-1, max_chunks=10_000)).chunks
    seqs = [c.seq for c in kept]
    assert seqs == list(range(seqs[0], n))  # contiguous, newest last
    assert kept[0].t_s <= kept[-1].t_s - 1.0 + 1e-9  # at least the window...
    assert len(kept) <= 50 + 101  # ...and at most one Redis stream node (100 entries) more
    assert (await bus.read_audio(sid, after_seq=-1)).missing == 0  # the window, as asked
    # A reader at chunk 10 fell behind: what follows 10 is gone up to the retained window, and
    # the batch says so (it used to come back as if nothing were missing).
    later = await bus.read_audio(sid, after_seq=10, max_chunks=10_000)
    assert later.chunks == kept and later.missing == kept[0].seq - 11 > 0
    assert (await bus.read_audio(sid, after_seq=kept[0].seq - 1)).missing == 0
    assert (await bus.read_audio(sid, after_seq=kept[3].seq)).missing == 0
    for i in range(200):
        await bus.publish_result(sid, {"i": i})
    res = await bus.read_results(sid, "0", timeout_s=0)
    assert 20 <= len(res) <= 20 + 101 and res[-1][1] == {"i": 199}


async def test_no_chunk_lost_or_repeated_across_a_takeover(bus: Bus) -> None:
    sid = await bus.create_session(P)
    applied: list[int] = []
    for i in range(10):
        await bus.push_audio(sid, chunk(i))
    await bus.claim("a", 1)
    applied += [c.seq for c in (await bus.read_audio(sid, -1, max_chunks=6)).chunks]
    await asyncio.sleep(LEASE_S * 1.5)  # "a" dies
    [c] = await bus.claim("b", 1)
    assert c.reclaimed
    retained = (await bus.read_audio(sid, -1)).chunks  # what "b" rebuilds from
    assert [x.seq for x in retained] == list(range(10))
    for i in range(10, 15):
        await bus.push_audio(sid, chunk(i))
    await bus.end_session(sid)
    batch = await bus.read_audio(sid, applied[-1])
    applied += [x.seq for x in batch.chunks]
    assert applied == list(range(15)) and batch.ended


async def test_publishing_is_fenced_by_ownership(bus: Bus) -> None:
    sid = await bus.create_session(P)
    await bus.claim("a", 1)
    first = await bus.publish_result(sid, {"audio_s": 1.0}, owner="a")
    assert first is not None
    assert await bus.publish_result(sid, {"audio_s": 1.5}, owner="b") is None  # not its own
    await asyncio.sleep(LEASE_S * 1.5)  # "a" hangs; "b" takes the session over
    [c] = await bus.claim("b", 1)
    assert c.reclaimed
    # "a" has not renewed since, so it does not know yet: the fence stops it all the same
    assert await bus.publish_result(sid, {"audio_s": 2.0, "by": "a"}, owner="a") is None
    assert await bus.publish_result(sid, {"audio_s": 2.0, "by": "b"}, owner="b") is not None
    await bus.finish("b", sid)
    assert await bus.publish_result(sid, {"audio_s": 3.0}, owner="b") is None  # finished
    got = [r for _, r in await bus.read_results(sid, "0", timeout_s=0)]
    assert got == [{"audio_s": 1.0}, {"audio_s": 2.0, "by": "b"}]


async def test_a_final_is_stored_once_and_a_repeat_once(bus: Bus) -> None:
    """Review: a worker that died between publishing a final and finishing the session left
    the next owner free to publish a second final; and a publish repeated because its reply was
    lost (redis-py retries a dropped connection) stored the same result twice."""
    sid = await bus.create_session(P)
    await bus.claim("a", 1)
    one = await bus.publish_result(sid, {"audio_s": 1.0, "final": False}, owner="a")
    assert await bus.publish_result(sid, {"audio_s": 1.0, "final": False}, owner="a") == one
    final = await bus.publish_result(sid, {"audio_s": 1.2, "final": True}, owner="a")
    assert final not in (None, one)
    assert await bus.publish_result(sid, {"audio_s": 1.2, "final": True}, owner="a") == final
    await asyncio.sleep(LEASE_S * 1.5)  # "a" dies before finishing; "b" takes the session over
    [c] = await bus.claim("b", 1)
    assert c.reclaimed
    assert await bus.publish_result(sid, {"audio_s": 1.4, "final": False}, owner="b") == final
    assert await bus.publish_result(sid, {"audio_s": 1.6, "final": True}, owner="b") == final
    assert await bus.publish_result(sid, {"audio_s": 1.6, "final": True}, owner="a") is None
    got = await bus.read_results(sid, "0", timeout_s=0)
    assert got == [(one, {"audio_s": 1.0, "final": False}),
                   (final, {"audio_s": 1.2, "final": True})]
    # a result equal to one before the last is not a repeat: stored (only a takeover's own
    # bookkeeping keeps a worker from sending it)
    other = await bus.create_session(P)
    ids = [await bus.publish_result(other, {"audio_s": a}) for a in (1.0, 2.0, 1.0)]
    assert len(set(ids)) == 3


async def test_workload_counts_sessions_and_live_capacity(bus: Bus) -> None:
    assert await bus.workload() == Workload(0, 0)
    await bus.heartbeat("a", 8)
    await bus.heartbeat("b", 4)
    sids = [await bus.create_session(P) for _ in range(3)]
    await bus.claim("a", 2)
    assert await bus.workload() == Workload(3, 12)  # claimed or waiting alike
    await bus.publish_result(sids[0], {"final": True}, owner="a")
    await bus.finish("a", sids[0])
    await asyncio.sleep(LEASE_S * 1.5)
    await bus.heartbeat("b", 4)
    assert await bus.workload() == Workload(2, 4)  # "a" is dead


async def test_abandoned_sessions_expire(make_bus: Callable[..., Bus]) -> None:
    bus = make_bus(session_ttl_s=0.3, result_ttl_s=0.3)
    sid = await bus.create_session(P)
    await bus.claim("a", 1)
    done = await bus.create_session(P)
    [_] = await bus.claim("a", 1)
    await bus.publish_result(done, {"final": True})
    await bus.finish("a", done)
    assert await bus.read_results(done, "0", timeout_s=0) != []
    await asyncio.sleep(0.6)
    assert await bus.session_params(sid) is None
    assert await bus.renew("a", [sid]) == [sid]
    assert (await bus.capacity()).sessions_active == 0
    with pytest.raises(BusError):
        await bus.read_results(done, "0", timeout_s=0)
    assert await bus.claim("b", 5) == []


async def test_capacity_counts_live_workers(bus: Bus) -> None:
    assert (await bus.capacity()).saturated
    await bus.heartbeat("a", 8)
    await bus.heartbeat("b", 4)
    await bus.create_session(P)
    cap = await bus.capacity()
    assert (cap.workers, cap.sessions_active, cap.sessions_max) == (2, 1, 12)
    assert not cap.saturated
    await asyncio.sleep(LEASE_S * 1.5)
    await bus.heartbeat("b", 4)
    cap = await bus.capacity()
    assert (cap.workers, cap.sessions_max) == (1, 4)


async def test_worker_notes_reach_the_gateway_while_it_is_alive(bus: Bus) -> None:
    await bus.heartbeat("a", 8, ("model m is not calibrated",))
    await bus.heartbeat("b", 8, ("model m is not calibrated",))
    await bus.heartbeat("c", 8)
    assert (await bus.capacity()).notes == ("model m is not calibrated",)  # said once
    await asyncio.sleep(LEASE_S * 1.5)
    await bus.heartbeat("c", 8)
    assert (await bus.capacity()).notes == ()  # gone with the workers that said it


async def test_worker_calibrations_reach_the_gateway_while_it_is_alive(bus: Bus) -> None:
    shipped = {"model_id": "m", "threshold": 0.6, "provenance": {
        "queries": {"renderers": ["timidity-freepats"], "n_in": 992, "n_out": 1100},
        "streams": "unknown"}}
    await bus.heartbeat("a", 8, (), shipped)
    await bus.heartbeat("b", 8, (), dict(shipped))  # the same calibration: listed once
    await bus.heartbeat("c", 8, (), {"model_id": "m2", "threshold": 0.5})
    await bus.heartbeat("d", 8)  # says none
    cap = await bus.capacity()
    assert len(cap.calibrations) == 2  # in no particular order (Redis keeps workers in a set)
    assert shipped in cap.calibrations and {"model_id": "m2", "threshold": 0.5} in cap.calibrations
    await asyncio.sleep(LEASE_S * 1.5)
    await bus.heartbeat("d", 8)
    assert (await bus.capacity()).calibrations == ()  # gone with the workers that said it


# ---------------------------------------------------------------------- Redis only
async def test_redis_restart_loses_sessions_and_recovers(redis_server) -> None:
    bus = RedisBus(redis_server.url, lease_ms=300)
    try:
        sid = await bus.create_session(P)
        await bus.push_audio(sid, chunk(0))
        await bus.claim("a", 1)
        redis_server.kill()
        with pytest.raises(BusError) as e:
            await bus.push_audio(sid, chunk(1))
        assert e.value.reason == "redis_unavailable"
        redis_server.start()
        with pytest.raises(BusError) as e:  # everything is gone: the gateway sees it
            await bus.push_audio(sid, chunk(1))
        assert e.value.reason == "unknown_session"
        assert await bus.renew("a", [sid]) == [sid]  # ...and so does the worker
        new = await bus.create_session(P)  # the group is re-created on the next claim
        assert [c.session_id for c in await bus.claim("a", 1)] == [new]
    finally:
        await bus.close()


async def test_a_refused_command_is_not_an_outage(redis_server) -> None:
    # Redis answering with an error (here WRONGTYPE) is a bug to log, not "unavailable, retry"
    bus = RedisBus(redis_server.url)
    try:
        sid = await bus.create_session(P)
        await bus.r.delete(bus.meta_key(sid))
        await bus.r.set(bus.meta_key(sid), "not a hash")
        with pytest.raises(BusError) as e:
            await bus.session_params(sid)
        assert e.value.reason == "redis_error" and "WRONGTYPE" in str(e.value)
    finally:
        await bus.close()


async def test_a_session_with_unparsable_params_is_claimed_alone(redis_server) -> None:
    """Issue #20: channels stored as "1.0" made int() raise inside claim, which lost the whole
    batch (the other sessions starved) and left the entry to be redelivered forever."""
    bus = RedisBus(redis_server.url, lease_ms=300)
    try:
        poison = await bus.create_session(P)
        await bus.r.hset(bus.meta_key(poison), "ch", "1.0")
        good = await bus.create_session(P)
        claims = {c.session_id: c for c in await bus.claim("a", 5)}
        assert claims[good].params == P and claims[good].error is None
        assert claims[poison].params is None and claims[poison].error.reason == "bad_params"
        assert await bus.publish_result(poison, {"final": True, "error": {}}, owner="a")
        await bus.finish("a", poison)  # acks its hand-out entry: nobody gets it again
        pending = await bus.r.xpending(bus.sessions_key, GROUP)
        assert pending["pending"] == 1  # the good one only
        await asyncio.sleep(0.5)  # "a" stops renewing: only the good one is handed out again
        assert [c.session_id for c in await bus.claim("b", 5)] == [good]
    finally:
        await bus.close()


async def test_a_session_whose_meta_is_not_a_hash_is_dropped(redis_server) -> None:
    bus = RedisBus(redis_server.url, lease_ms=300)
    try:
        broken = await bus.create_session(P)
        await bus.r.delete(bus.meta_key(broken))
        await bus.r.set(bus.meta_key(broken), "junk")
        good = await bus.create_session(P)
        assert [c.session_id for c in await bus.claim("a", 5)] == [good]
        assert await bus.r.xlen(bus.sessions_key) == 1  # its entry is gone
    finally:
        await bus.close()


async def test_consumers_are_retired_and_reaped(redis_server) -> None:
    bus = RedisBus(redis_server.url, lease_ms=300)

    async def consumers() -> dict[str, int]:
        return {c["name"].decode(): c["pending"]
                for c in await bus.r.xinfo_consumers(bus.sessions_key, GROUP)}

    try:
        await bus.retire("nobody")  # no group yet: nothing to do, no error
        assert await bus.reap(0) == 0
        sid, *others = [await bus.create_session(P) for _ in range(3)]
        for w in ("a", "b", "c"):  # a consumer is made when it is first handed something
            await bus.heartbeat(w, 4)
            await bus.claim(w, 1)
        for w, other in zip("bc", others, strict=True):
            await bus.release(w, [other])
        await bus.claim("d", 2)  # "d" takes them (it has no heartbeat: it is dead)
        assert await consumers() == {"a": 1, "b": 0, "c": 0, "d": 2}
        await bus.retire("a")  # it still holds a session: its consumer stays (the PEL is the lease)
        assert await consumers() == {"a": 1, "b": 0, "c": 0, "d": 2}
        assert (await bus.capacity()).workers == 2  # but its heartbeat went at once
        await bus.release("a", [sid])
        await bus.retire("a")
        assert "a" not in await consumers()
        await asyncio.sleep(0.4)  # "b" and "c" die (heartbeats expire); "c" comes back
        await bus.heartbeat("c", 4)
        assert await bus.reap(10.0) == 0  # not idle for long enough
        assert await bus.reap(0.2) == 1
        assert await consumers() == {"c": 0, "d": 2}  # alive, or holding sessions: kept
    finally:
        await bus.close()


async def test_bus_settings_reach_the_bus(redis_server) -> None:
    from worker.settings import BusSettings, WorkerSettings

    s = BusSettings.from_env({"MIDIMATCH_RETAIN_S": "2.5", "MIDIMATCH_SESSION_TTL_S": "40",
                              "MIDIMATCH_REDIS_PREFIX": "t9"}, redis_url=redis_server.url)
    bus = RedisBus.from_settings(s)
    try:
        assert (bus.retain_s, bus.session_ttl_ms, bus.prefix, bus.max_results) == (
            2.5, 40_000, "t9", BusSettings().max_results)
        sid = await bus.create_session(P)
        assert 30_000 < await bus.r.pttl(bus.meta_key(sid)) <= 40_000
    finally:
        await bus.close()
    assert WorkerSettings(retain_s=7.0, redis_url="redis://x").bus == BusSettings(
        redis_url="redis://x", retain_s=7.0)
    with pytest.raises(BusError):
        RedisBus.from_settings(BusSettings())  # no URL
    local = InProcessBus.from_settings(s)
    assert (local.retain_s, local.session_ttl_s, local.lease_s, local.max_results) == (
        2.5, 40.0, 5.0, 120)


async def test_redis_keys_are_prefixed_and_bounded(redis_server) -> None:
    bus = RedisBus(redis_server.url, prefix="t1", session_ttl_s=30)
    try:
        sid = await bus.create_session(P)
        await bus.push_audio(sid, chunk(0))
        await bus.publish_result(sid, {})
        keys = sorted(k.decode() for k in await bus.r.keys("*"))
        assert keys == sorted([bus.sessions_key, bus.active_key, *bus.session_keys(sid)])
        assert all(k.startswith("t1:") for k in keys)
        for k in bus.session_keys(sid):
            assert 0 < await bus.r.pttl(k) <= 30_000
    finally:
        await bus.close()


async def test_fixture_kill_and_restart(redis_server) -> None:
    import redis

    r = redis.Redis.from_url(redis_server.url)
    r.set("k", "v")
    redis_server.restart()  # a fresh, empty server on the same port
    assert redis.Redis.from_url(redis_server.url).get("k") is None
    redis_server.kill()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_server.url).ping()
