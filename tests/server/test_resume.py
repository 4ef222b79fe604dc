"""Resuming a dropped session: missed results, continued numbering, grace expiry, takeover."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.app import create_app
from server.settings import Settings
from server.ws import CLOSE_CODES, CLOSE_REPLACED
from tests.server.conftest import FakeWorker, drain, receive_json, send_audio, start_msg
from worker.bus import InProcessBus, result_id_key

pytestmark = pytest.mark.asyncio
STOP = json.dumps({"type": "stop", "v": 1})


@pytest.fixture
def bus() -> InProcessBus:
    return InProcessBus()


async def results_until(ws, audio_s: float) -> list[dict]:
    out = []
    while not out or out[-1]["audio_s"] < audio_s:
        m = await receive_json(ws)
        assert m["type"] == "result", m
        out.append(m)
    return out


@pytest.mark.parametrize("send_after", [True, False])
async def test_resume_gets_missed_results_and_numbering_continues(aiohttp_client, bus,
                                                                   send_after):
    client = await aiohttp_client(create_app(Settings(resume_grace_s=10), bus, close_bus=False))
    async with FakeWorker(bus) as worker:
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        sid = (await receive_json(ws))["session"]
        await send_audio(ws, 1.0)
        seen = await results_until(ws, 0.5)  # the client has the 0.5 s result...
        await ws.close()  # ...and drops without stop
        while len(worker.seqs[sid]) < 4:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the worker publishes the 1.0 s result meanwhile

        ws = await client.ws_connect("/v1/stream")
        extra = {"after": seen[-1]["result_id"]} if send_after else {}
        await ws.send_str(start_msg(session=sid, **extra))
        ready = await receive_json(ws)
        assert ready["type"] == "ready" and ready["resumed"] is True and ready["session"] == sid
        assert ready["audio_s"] == pytest.approx(1.0) and ready["audio_bytes"] == 32000
        if send_after:  # exactly the results after the one the client names
            assert ready["after"] == seen[-1]["result_id"]
            missed = [await receive_json(ws)]
            assert missed[0]["type"] == "result" and missed[0]["audio_s"] == pytest.approx(1.0)
        else:  # after the last one the gateway sent (one in flight at the drop is not resent)
            assert result_id_key(ready["after"]) >= result_id_key(seen[-1]["result_id"])
            missed = []
        await send_audio(ws, 1.0)
        await ws.send_str(STOP)
        msgs, close = await drain(ws)
    assert close == 1000 and msgs[-1]["final"] and msgs[-1]["audio_s"] == pytest.approx(2.0)
    ids = [m["result_id"] for m in seen + missed + msgs]
    assert len(ids) == len(set(ids))  # nothing delivered twice
    assert all(result_id_key(i) > result_id_key(ready["after"]) for i in ids[len(seen):])
    assert worker.seqs[sid] == list(range(8))  # seq continues across the resume


async def test_grace_expiry_ends_the_stream_and_a_late_resume_gets_the_final(aiohttp_client,
                                                                             bus):
    client = await aiohttp_client(create_app(Settings(resume_grace_s=0.2), bus,
                                             close_bus=False))
    async with FakeWorker(bus):
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        sid = (await receive_json(ws))["session"]
        await send_audio(ws, 0.5)
        first = await results_until(ws, 0.5)
        await ws.close()
        for _ in range(300):
            if bus._sessions[sid].finished:
                break
            await asyncio.sleep(0.01)
        assert bus._sessions[sid].ended and bus._sessions[sid].finished

        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg(session=sid, after=first[-1]["result_id"]))
        assert (await receive_json(ws))["resumed"] is True
        msgs, close = await drain(ws)
    assert close == 1000 and [m["final"] for m in msgs] == [True]


async def test_resume_with_other_parameters_is_refused(aiohttp_client, bus):
    client = await aiohttp_client(create_app(Settings(), bus, close_bus=False))
    async with FakeWorker(bus):
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        sid = (await receive_json(ws))["session"]
        await ws.close()
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg(session=sid, sample_rate=44100))
        msgs, close = await drain(ws)
    assert msgs[-1]["reason"] == "params_mismatch" and close == CLOSE_CODES["bad_request"]


async def test_a_resume_takes_over_a_half_open_connection(aiohttp_client, bus):
    client = await aiohttp_client(create_app(Settings(), bus, close_bus=False))
    async with FakeWorker(bus):
        old = await client.ws_connect("/v1/stream")
        await old.send_str(start_msg())
        sid = (await receive_json(old))["session"]
        new = await client.ws_connect("/v1/stream")  # the old one still looks open
        await new.send_str(start_msg(session=sid))
        assert (await receive_json(new))["resumed"] is True
        _, close = await drain(old)
        assert close == CLOSE_REPLACED
        await send_audio(new, 1.0)
        await new.send_str(STOP)
        msgs, close = await drain(new)
    assert close == 1000 and msgs[-1]["final"] and msgs[-1]["audio_s"] == pytest.approx(1.0)


async def test_resume_through_another_gateway(aiohttp_client, bus):
    """A second gateway (another process in production) rebuilds the session from the bus."""
    one = await aiohttp_client(create_app(Settings(), bus, close_bus=False))
    two = await aiohttp_client(create_app(Settings(), bus, close_bus=False))
    async with FakeWorker(bus) as worker:
        ws = await one.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        sid = (await receive_json(ws))["session"]
        await send_audio(ws, 0.75)
        seen = await results_until(ws, 0.5)
        await ws.close()
        ws = await two.ws_connect("/v1/stream")
        await ws.send_str(start_msg(session=sid, after=seen[-1]["result_id"]))
        ready = await receive_json(ws)
        assert ready["resumed"] and ready["audio_bytes"] == 24000
        await send_audio(ws, 0.25)
        await ws.send_str(STOP)
        msgs, close = await drain(ws)
    assert close == 1000 and msgs[-1]["final"] and msgs[-1]["audio_s"] == pytest.approx(1.0)
    assert worker.seqs[sid] == [0, 1, 2, 3]
