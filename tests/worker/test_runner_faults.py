"""The worker loop when a bus call fails for one session, or the lease task meets a bug: nothing
is lost, the other sessions are not held up, the lease task lives on. The buses are the real
InProcessBus and RedisBus (a real redis-server), wrapped to fail one chosen call."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from tests.worker.test_runner import (
    P,
    RecordingEngine,
    Running,
    final_of,
    send,
    settings,
    wait_for,
)
from worker.bus import BusError, Claim
from worker.local_bus import InProcessBus
from worker.redis_bus import RedisBus
from worker.runner import Worker

pytestmark = pytest.mark.asyncio


def errors(engine: RecordingEngine, kind: str) -> float:
    return engine.metrics.errors_total.labels(kind)._value.get()


def flaky(base: type, fail: dict[str, int]) -> type:
    """``base`` with ``fail[name]`` failures of ``name`` to come (a final publish only, for
    ``publish_final``), each a ``BusError`` ``redis_unavailable``, or ``fail_reason``'s."""

    class Flaky(base):
        fail_reason = "redis_unavailable"

        def _fails(self, name: str) -> bool:
            if fail.get(name, 0) > 0:
                fail[name] -= 1
                return True
            return False

        async def publish_result(self, sid, result, owner=None):
            if result.get("final") and self._fails("publish_final"):
                raise BusError("Redis failed: a blip", reason=self.fail_reason)
            return await super().publish_result(sid, result, owner)

        async def finish(self, worker_id, sid):
            if self._fails("finish"):
                raise BusError("Redis failed: a blip", reason="redis_unavailable")
            return await super().finish(worker_id, sid)

    return Flaky


@pytest.mark.parametrize("reason", ["redis_unavailable", "redis_error"])
async def test_a_failed_final_publish_is_retried_and_the_other_finals_go_out(reason) -> None:
    """Review: one BusError in the publish loop dropped the rest of the tick's results, finals
    included, and those sessions never finished."""
    fail = {"publish_final": 1}
    bus, engine = flaky(InProcessBus, fail)(lease_s=0.6), RecordingEngine()
    bus.fail_reason = reason
    run = Running(Worker(bus, engine, settings()))
    try:
        a, b = await bus.create_session(P), await bus.create_session(P)
        await send(bus, a, range(12))
        await send(bus, b, range(12))
        await wait_for(lambda: engine.fed.get(a) == list(range(12))
                       and engine.fed.get(b) == list(range(12)))
        await bus.end_session(a)
        await bus.end_session(b)  # both finals in one tick, most likely
        for sid in (a, b):
            got = await final_of(bus, sid, timeout_s=5)
            assert [r["audio_s"] for r in got] == [1.0, 1.2]  # once each, in order
        assert fail["publish_final"] == 0
        await wait_for(lambda: not run.worker.owned)  # both finished
        assert all(bus._sessions[s].finished for s in (a, b))
        assert errors(engine, "bus") == 1
    finally:
        await run.stop()


async def test_a_failed_finish_is_retried() -> None:
    fail = {"finish": 2}
    bus, engine = flaky(InProcessBus, fail)(lease_s=0.6), RecordingEngine()
    run = Running(Worker(bus, engine, settings()))
    try:
        sid = await bus.create_session(P)
        await send(bus, sid, range(5), end=True)
        assert [r["final"] for r in await final_of(bus, sid, timeout_s=5)] == [True]
        await wait_for(lambda: bus._sessions[sid].finished and not run.worker.owned)
        assert fail["finish"] == 0
        assert len(await bus.read_results(sid, "0", timeout_s=0)) == 1  # published once
    finally:
        await run.stop()


async def test_a_failed_final_publish_is_retried_over_redis(redis_server) -> None:
    fail = {"publish_final": 1}
    gateway = RedisBus(redis_server.url, lease_ms=600)
    bus = flaky(RedisBus, fail)(redis_server.url, lease_ms=600)
    engine = RecordingEngine()
    run = Running(Worker(bus, engine, settings()))
    try:
        sids = [await gateway.create_session(P) for _ in range(3)]
        for sid in sids:
            await send(gateway, sid, range(8))
        await wait_for(lambda: all(engine.fed.get(s) == list(range(8)) for s in sids))
        for sid in sids:
            await gateway.end_session(sid)
        for sid in sids:
            assert [r["audio_s"] for r in await final_of(gateway, sid, 5)] == [0.8]
        await wait_for(lambda: not run.worker.owned)
        assert fail["publish_final"] == 0
        for sid in sids:  # finished: gone from the active set, its hand-out entry acked
            assert not await gateway.r.sismember(gateway.active_key, sid)
        assert await gateway.r.xlen(gateway.sessions_key) == 0
    finally:
        await run.stop()
        await bus.close()
        await gateway.close()


class BadAdoptBus(InProcessBus):
    """Hands every claim out as a takeover (so adopting it reads its results) and fails that
    read (the worker's: ``timeout_s=0``) for the sessions in ``bad`` once each."""

    bad: set[str]

    async def claim(self, worker_id, max_n, block_s=0.0):
        got = await super().claim(worker_id, max_n, block_s)
        return [dataclasses.replace(c, reclaimed=True) for c in got]

    async def read_results(self, sid, after="0", timeout_s=1.0):
        if sid in self.bad and timeout_s == 0:
            self.bad.discard(sid)
            raise BusError("Redis failed: a blip", reason="redis_unavailable")
        return await super().read_results(sid, after, timeout_s)


async def test_one_failed_adoption_holds_up_no_other_claim() -> None:
    """Review: an exception adopting one claimed session left the rest of its batch claimed
    but unowned (not read, not renewed) until their leases lapsed."""
    bus, engine = BadAdoptBus(lease_s=30.0), RecordingEngine()  # a lapse would take 30 s
    sids = [await bus.create_session(P) for _ in range(3)]
    bus.bad = {sids[0]}
    for sid in sids:
        await send(bus, sid, range(5), end=True)
    run = Running(Worker(bus, engine, settings(lease_ms=30_000)))
    try:
        for sid in sids:  # all of them, the failed one too: it was released, claimed again
            assert [r["final"] for r in await final_of(bus, sid, timeout_s=5)] == [True]
            assert engine.fed[sid] == list(range(5))
        assert not bus.bad and errors(engine, "bus") == 1
    finally:
        await run.stop()


async def test_a_bad_claim_batch_entry_does_not_stop_the_rest() -> None:
    """A bug adopting one claim (not a bus error) is logged and counted as internal."""
    bus, engine = InProcessBus(lease_s=30.0), RecordingEngine()
    sids = [await bus.create_session(P) for _ in range(2)]
    for sid in sids:
        await send(bus, sid, range(5), end=True)
    worker = Worker(bus, engine, settings(lease_ms=30_000))
    adopt = worker._adopt
    calls = []

    async def first_fails(c: Claim) -> None:
        calls.append(c.session_id)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        await adopt(c)

    worker._adopt = first_fails
    run = Running(worker)
    try:
        for sid in sids:
            assert [r["final"] for r in await final_of(bus, sid, timeout_s=5)] == [True]
        assert errors(engine, "internal") == 1
    finally:
        await run.stop()


async def test_the_lease_task_survives_a_bug_and_is_restarted_if_it_ends() -> None:
    """Review: only BusError was caught in the lease task; anything else ended it silently, and
    every lease then lapsed."""
    bus, engine = InProcessBus(lease_s=0.6), RecordingEngine()
    worker = Worker(bus, engine, settings())
    heartbeat, bugs = bus.heartbeat, [3]

    async def buggy_heartbeat(*a, **kw):
        if bugs[0] > 0 and worker.ready.is_set():
            bugs[0] -= 1
            raise RuntimeError("a bug in the heartbeat")
        await heartbeat(*a, **kw)

    bus.heartbeat = buggy_heartbeat
    run = Running(worker)
    try:
        sid = await bus.create_session(P)
        await send(bus, sid, range(3))
        await wait_for(lambda: sid in worker.owned)
        await wait_for(lambda: bugs[0] == 0)
        first = worker._leases
        assert first is not None and not first.done()  # lived on
        assert errors(engine, "internal") == 3
        first.cancel()  # ended from outside: noticed, counted, started again
        await wait_for(lambda: worker._leases is not first and not worker._leases.done())
        assert errors(engine, "internal") == 4
        await asyncio.sleep(1.5)  # 2.5 leases: renewed all along
        assert sid in worker.owned and bus._sessions[sid].owner == worker.worker_id
        await send(bus, sid, range(3, 12), end=True)
        assert [r["audio_s"] for r in await final_of(bus, sid, timeout_s=5)] == [1.0, 1.2]
    finally:
        await run.stop()
    assert worker._leases is None  # stopped on purpose: not restarted
