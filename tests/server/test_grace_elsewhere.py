"""A gateway's resume grace timer must not end a session that now lives on another gateway.

Gateway one keeps a dropped session for ``resume_grace_s``. It used to decide whether the
session had moved only by the bus's audio position, so a client that resumed on gateway two and
was silent when one's timer ran out (a pause; a resume only to collect results) had its live
session ended under it: an unrequested final result, and its next audio refused. Each attach is
now recorded on the bus, and a timer ends the session only while its own attach is the latest.
Run over both buses: in process (two gateways of one process) and a real redis-server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from server.app import TABLE_KEY, create_app
from server.settings import Settings
from tests.server.conftest import FakeWorker, drain, receive_json, send_audio, start_msg
from worker.bus import Bus
from worker.local_bus import InProcessBus
from worker.redis_bus import RedisBus

pytestmark = pytest.mark.asyncio
STOP = json.dumps({"type": "stop", "v": 1})


@pytest_asyncio.fixture(params=["inprocess", "redis"])
async def buses(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Bus, Bus, Bus]]:
    """(gateway one's bus, gateway two's bus, the worker's bus): one shared bus in process,
    three connections to one redis-server otherwise."""
    if request.param == "inprocess":
        bus = InProcessBus()
        yield bus, bus, bus
        return
    server = request.getfixturevalue("redis_server")
    prefix = f"t{uuid.uuid4().hex[:8]}"
    made = [RedisBus(server.url, prefix=prefix) for _ in range(3)]
    yield made[0], made[1], made[2]
    for b in made:
        await b.close()


async def gateway(aiohttp_client, bus: Bus, grace_s: float):
    return await aiohttp_client(create_app(Settings(resume_grace_s=grace_s), bus,
                                           close_bus=False))


async def grace_ran_out(client, sid: str) -> None:
    """Until the gateway's grace timer for ``sid`` has fired and its expiry has finished."""
    table = client.server.app[TABLE_KEY]
    for _ in range(1000):
        if table.get(sid) is None and not table._tasks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the grace period of {sid} did not run out")


async def first_result(ws) -> dict:
    msg = await receive_json(ws)
    assert msg["type"] == "result" and not msg["final"], msg
    return msg


async def started(client) -> tuple[object, str, dict]:
    """A new session on ``client``'s gateway with 0.5 s sent: (ws, session id, its first result)."""
    ws = await client.ws_connect("/v1/stream")
    await ws.send_str(start_msg())
    sid = (await receive_json(ws))["session"]
    await send_audio(ws, 0.5)
    return ws, sid, await first_result(ws)


async def resumed(client, sid: str, seen: dict) -> tuple[object, dict]:
    """``sid`` resumed on ``client``'s gateway after result ``seen``: (ws, its ready message)."""
    ws = await client.ws_connect("/v1/stream")
    await ws.send_str(start_msg(session=sid, after=seen["result_id"]))
    return ws, await receive_json(ws)


async def stopped_with_one_final(ws, audio_s: float) -> None:
    """Send 0.5 s more and stop: the stream ends normally with exactly one final result, the
    last message, covering ``audio_s`` seconds."""
    await send_audio(ws, 0.5)
    await ws.send_str(STOP)
    msgs, close = await drain(ws)
    finals = [m for m in msgs if m.get("final")]
    assert close == 1000 and [m["type"] for m in msgs if m["type"] != "result"] == []
    assert len(finals) == 1 and finals[0] is msgs[-1]
    assert finals[0]["audio_s"] == pytest.approx(audio_s)


async def assert_still_open(worker_bus: Bus, sid: str) -> None:
    assert not (await worker_bus.read_audio(sid, after_seq=-1)).ended, \
        "the session was ended by a grace timer of a gateway it had left"


async def test_a_silent_resume_elsewhere_outlives_the_old_gateways_grace(aiohttp_client,
                                                                         buses) -> None:
    bus_one, bus_two, worker_bus = buses
    one = await gateway(aiohttp_client, bus_one, grace_s=0.3)
    two = await gateway(aiohttp_client, bus_two, grace_s=0.3)
    async with FakeWorker(worker_bus) as worker:
        ws, sid, seen = await started(one)
        await ws.close()  # one keeps it for its grace period
        ws, ready = await resumed(two, sid, seen)
        assert ready["resumed"] and ready["audio_bytes"] == 16000
        await grace_ran_out(one, sid)  # the client is silent on two meanwhile
        await assert_still_open(worker_bus, sid)
        await stopped_with_one_final(ws, audio_s=1.0)
    assert worker.seqs[sid] == [0, 1, 2, 3]


async def test_back_on_the_first_gateway_the_second_ones_grace_ends_nothing(aiohttp_client,
                                                                            buses) -> None:
    """A -> B -> A: B's timer runs out while the client, back on A, is silent."""
    bus_one, bus_two, worker_bus = buses
    one = await gateway(aiohttp_client, bus_one, grace_s=0.5)
    two = await gateway(aiohttp_client, bus_two, grace_s=0.5)
    async with FakeWorker(worker_bus) as worker:
        ws, sid, seen = await started(one)
        await ws.close()
        ws, ready = await resumed(two, sid, seen)
        assert ready["audio_bytes"] == 16000
        await send_audio(ws, 0.5)  # served on two for a while
        seen = await first_result(ws)
        assert seen["audio_s"] == pytest.approx(1.0)
        await ws.close()
        ws, ready = await resumed(one, sid, seen)  # one's table may still hold it: either way
        assert ready["resumed"] and ready["audio_bytes"] == 32000
        await grace_ran_out(two, sid)
        await assert_still_open(worker_bus, sid)
        await stopped_with_one_final(ws, audio_s=1.5)
    assert worker.seqs[sid] == [0, 1, 2, 3, 4, 5]


async def test_a_gateways_grace_still_ends_a_session_nobody_resumed(aiohttp_client,
                                                                    buses) -> None:
    """The check does not keep abandoned sessions open: a late resume gets the final."""
    bus_one, bus_two, worker_bus = buses
    one = await gateway(aiohttp_client, bus_one, grace_s=0.2)
    async with FakeWorker(worker_bus):
        ws, sid, seen = await started(one)
        await ws.close()
        await grace_ran_out(one, sid)
        two = await gateway(aiohttp_client, bus_two, grace_s=0.2)
        ws = await two.ws_connect("/v1/stream")
        await ws.send_str(start_msg(session=sid, after=seen["result_id"]))
        msgs, close = await drain(ws)
    finals = [m for m in msgs if m.get("final")]
    assert close == 1000 and len(finals) == 1 and finals[0]["audio_s"] == pytest.approx(0.5)
