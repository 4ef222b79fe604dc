"""The attach generation (``Bus.attach`` / ``Bus.end_detached``), on InProcessBus and RedisBus
(a real redis-server): a gateway's grace expiry ends a session only while its attach is the
latest, so a session resumed through another gateway is not ended under it."""

from __future__ import annotations

import pytest

from tests.worker.test_bus import P, bus, chunk, make_bus  # noqa: F401 - fixtures
from worker.bus import Bus, BusError

pytestmark = pytest.mark.asyncio


async def test_each_attach_bumps_the_generation(bus: Bus) -> None:  # noqa: F811
    a, b = await bus.create_session(P), await bus.create_session(P)
    assert [await bus.attach(a) for _ in range(3)] == [1, 2, 3]
    assert await bus.attach(b) == 1  # per session
    with pytest.raises(BusError) as e:
        await bus.attach("nope")
    assert e.value.reason == "unknown_session"


async def test_only_the_latest_attach_ends_a_detached_session(bus: Bus) -> None:  # noqa: F811
    sid = await bus.create_session(P)
    on_a = await bus.attach(sid)
    await bus.push_audio(sid, chunk(0))
    on_b = await bus.attach(sid)  # the client resumed through another gateway
    assert not await bus.end_detached(sid, on_a)  # a's grace ran out: not a's to end
    await bus.push_audio(sid, chunk(1))  # still open: b's client goes on
    assert not (await bus.read_audio(sid, -1)).ended
    assert await bus.end_detached(sid, on_b)
    batch = await bus.read_audio(sid, -1)
    assert batch.ended and [c.seq for c in batch.chunks] == [0, 1]
    assert not await bus.end_detached(sid, on_b)  # ended already
    with pytest.raises(BusError) as e:
        await bus.push_audio(sid, chunk(2))
    assert e.value.reason == "ended"
    assert not await bus.end_detached("nope", 1)


async def test_a_b_a_the_middle_gateway_cannot_end_it(bus: Bus) -> None:  # noqa: F811
    sid = await bus.create_session(P)
    await bus.attach(sid)
    on_b = await bus.attach(sid)
    back_on_a = await bus.attach(sid)
    assert not await bus.end_detached(sid, on_b)
    assert not (await bus.read_audio(sid, -1)).ended
    await bus.end_session(sid)  # the client's stop ends it whatever the generation
    assert (await bus.read_audio(sid, -1)).ended
    assert not await bus.end_detached(sid, back_on_a)
