"""What one message costs the other sessions of InProcessBus (the one-process mode, where every
gateway connection waits on the bus for its results).

Every change used to wake every waiter of the process, and each woken result reader re-read its
session: a scan of all sessions for expiry, then a parse of every kept result id. With 50
sessions of 120 results waiting, one 2-byte audio message cost the event loop 6-7.6 ms, so ~130
tiny messages a second from one client stalled all the others. Checked here by what is woken and
what is parsed or scanned (never by wall-clock time)."""

from __future__ import annotations

import asyncio

import pytest

import worker.local_bus as local_bus
from worker.bus import AudioChunk, BusError, StreamParams, result_id_key
from worker.local_bus import InProcessBus

pytestmark = pytest.mark.asyncio
P = StreamParams(16000)
N_SESSIONS, N_RESULTS = 50, 120


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def counted_keys(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the result ids InProcessBus parses."""
    calls = [0]

    def counting(rid: str) -> tuple[int, int]:
        calls[0] += 1
        return result_id_key(rid)

    monkeypatch.setattr(local_bus, "result_id_key", counting)
    return calls


async def full_bus() -> tuple[InProcessBus, list[str], list[str]]:
    """50 sessions of 120 results each; their ids and each one's last result id."""
    bus = InProcessBus(max_results=N_RESULTS)
    sids = [await bus.create_session(P) for _ in range(N_SESSIONS)]
    last = []
    for sid in sids:
        for i in range(N_RESULTS):
            rid = await bus.publish_result(sid, {"audio_s": float(i)})
        last.append(rid)
    return bus, sids, last


async def test_audio_on_one_session_wakes_no_other_reader(counted_keys: list[int]) -> None:
    bus, sids, last = await full_bus()
    readers = [asyncio.create_task(bus.read_results(sid, rid, timeout_s=60.0))
               for sid, rid in zip(sids, last, strict=True)]
    await settle()
    woken, parsed = bus.wakeups, counted_keys[0]
    try:
        for seq in range(200):  # tiny messages on one session
            await bus.push_audio(sids[0], AudioChunk(seq, seq * 1e-4, b"\0\0"))
            await settle()
        assert bus.wakeups == woken, "audio woke result readers"
        assert counted_keys[0] == parsed, "audio made readers parse result ids"
        assert not any(r.done() for r in readers)

        got = await bus.publish_result(sids[7], {"audio_s": 120.0})
        await settle()
        assert bus.wakeups == woken + 1  # its own reader, no one else's
        assert readers[7].done() and readers[7].result() == [(got, {"audio_s": 120.0})]
        assert [i for i, r in enumerate(readers) if r.done()] == [7]
        assert counted_keys[0] == parsed  # the reader had parsed its `after` once, already

        await bus.end_session(sids[3])  # wakes its reader, which has nothing new: waits on
        await settle()
        assert bus.wakeups == woken + 2
        assert [i for i, r in enumerate(readers) if r.done()] == [7]
    finally:
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def test_a_read_parses_only_its_after(counted_keys: list[int]) -> None:
    """Results after ``after`` by bisection: same answer as a comparison with each id, with
    one id parsed per read (the reader's ``after``), not one per kept result."""
    bus = InProcessBus(max_results=40)
    a, b = await bus.create_session(P), await bus.create_session(P)
    ids: dict[str, list[str]] = {a: [], b: []}
    for i in range(100):  # interleaved: a's ids skip b's
        sid = a if i % 3 else b
        ids[sid].append(await bus.publish_result(sid, {"i": i}))
    kept = ids[a][-40:]
    for after in ["0", ids[a][0], ids[a][-41], ids[a][-40], ids[a][50], ids[b][20],
                  ids[a][-1], "99999-0"]:
        before = counted_keys[0]
        got = await bus.read_results(a, after, timeout_s=0)
        assert counted_keys[0] - before == 1
        assert [rid for rid, _ in got] == [r for r in kept
                                           if result_id_key(r) > result_id_key(after)]


async def test_reads_do_not_scan_every_session_for_expiry() -> None:
    clock = Clock()
    bus = InProcessBus(session_ttl_s=30.0, sweep_every_s=1.0, clock=clock)
    sids = [await bus.create_session(P) for _ in range(N_SESSIONS)]
    checked = [0]
    expired = bus._expired

    def counting(s, now):  # noqa: ANN001, ANN202
        checked[0] += 1
        return expired(s, now)

    bus._expired = counting  # type: ignore[method-assign]
    for seq in range(100):
        clock.now += 0.05  # 5 s in all: at most 5 scans, not one per call
        await bus.push_audio(sids[0], AudioChunk(seq, seq * 0.01, b"\0\0"))
        await bus.read_results(sids[0], "0", timeout_s=0)
        await bus.read_audio(sids[0], seq - 1)
    assert checked[0] <= 300 + 5 * N_SESSIONS  # each call its own session, plus the scans
    assert checked[0] >= 300  # (the count counts)


async def test_an_expired_session_is_gone_before_any_scan() -> None:
    clock = Clock()
    bus = InProcessBus(session_ttl_s=30.0, result_ttl_s=10.0, sweep_every_s=1e9, clock=clock)
    old, live = await bus.create_session(P), await bus.create_session(P)
    await bus.claim("w", 2)
    clock.now += 20.0
    await bus.push_audio(live, AudioChunk(0, 0.0, b"\0\0"))
    clock.now += 15.0  # old: 35 s untouched; live: 15 s
    assert await bus.session_params(old) is None
    for call in (bus.read_results(old, "0", timeout_s=0), bus.push_audio(old, AudioChunk(0, 0.0,
                                                                                       b"")),
                 bus.read_audio(old, -1), bus.last_seq(old)):
        with pytest.raises(BusError) as e:
            await call
        assert e.value.reason == "unknown_session"
    assert await bus.renew("w", [old, live]) == [old]
    assert await bus.last_seq(live) == 0
    assert (await bus.capacity()).sessions_active == 1
    await bus.publish_result(live, {"final": True}, owner="w")
    await bus.finish("w", live)
    clock.now += 11.0  # a finished session's results are kept result_ttl_s
    with pytest.raises(BusError):
        await bus.read_results(live, "0", timeout_s=0)
    assert await bus.create_session(P, session_id=old) == old  # its id is free again


async def test_a_blocked_claim_takes_a_lapsed_lease_without_any_other_call() -> None:
    """Waiters are no longer woken by every change, so a claim waits for a lease to lapse on
    its own timer (it used to be woken by whatever happened meanwhile)."""
    bus = InProcessBus(lease_s=0.2)
    sid = await bus.create_session(P)
    assert [c.session_id for c in await bus.claim("a", 1)] == [sid]
    claims = await asyncio.wait_for(bus.claim("b", 1, block_s=30.0), 10.0)
    assert [(c.session_id, c.reclaimed) for c in claims] == [(sid, True)]


async def test_a_blocked_claim_wakes_for_a_new_or_released_session() -> None:
    bus = InProcessBus(lease_s=30.0)
    waiting = asyncio.create_task(bus.claim("a", 1, block_s=30.0))
    await settle()
    sid = await bus.create_session(P)
    assert [c.session_id for c in await asyncio.wait_for(waiting, 10.0)] == [sid]
    waiting = asyncio.create_task(bus.claim("b", 1, block_s=30.0))
    await settle()
    await bus.push_audio(sid, AudioChunk(0, 0.0, b"\0\0"))
    await bus.publish_result(sid, {"audio_s": 0.0})
    await settle()
    assert not waiting.done()  # neither made anything claimable
    await bus.release("a", [sid])
    assert [c.session_id for c in await asyncio.wait_for(waiting, 10.0)] == [sid]
