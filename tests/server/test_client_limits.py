"""``midimatch stream`` with a large or senseless ``--chunk-s``, and a message over the transport's
cap: the client keeps its messages within ``ready.limits.max_message_bytes``, refuses a
non-finite or non-positive ``--chunk-s`` with a usage error, gives up at once on a 1009 close,
and the gateway ends a session whose message the transport refused (``too_large``)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from aiohttp import WSMsgType, web

from server.app import METRICS_KEY, TABLE_KEY, create_app
from server.cli import main
from server.client import StreamClient, StreamError
from server.settings import Settings
from server.ws import CLOSE_CODES
from tests.server.conftest import FakeWorker, drain, receive_json, start_msg
from worker.bus import InProcessBus

LIMIT = 4096  # max_message_bytes; the transport's cap is 2 * LIMIT + 65536


@pytest.mark.asyncio
async def test_a_large_chunk_is_cut_to_the_servers_message_limit(aiohttp_client):
    """1 s per message at 22.05 kHz f32 is 88,200 bytes: past the transport's cap (73,728) the
    gateway closed with 1009 and the client resumed and resent until it gave up."""
    bus = InProcessBus()
    client = await aiohttp_client(create_app(Settings(max_message_bytes=LIMIT), bus,
                                             close_bus=False))
    sizes: list[int] = []
    push = bus.push_audio

    async def recording_push(sid, chunk):
        sizes.append(len(chunk.pcm))
        return await push(sid, chunk)

    bus.push_audio = recording_push
    x = (0.1 * np.sin(np.arange(33075) * 0.05)).astype(np.float32)[:, None]  # 1.5 s
    seen: list[dict] = []
    async with FakeWorker(bus):
        final = await StreamClient(str(client.make_url("/v1/stream")), realtime=False,
                                   chunk_s=1.0).stream_array(x, 22050, seen.append)
    assert final is not None and final["final"] and "error" not in final
    assert [m["resumed"] for m in seen if m["type"] == "ready"] == [False]  # no drop, no resume
    assert sizes and max(sizes) <= LIMIT and all(n % 4 == 0 for n in sizes)  # whole frames
    assert sum(sizes) == x.nbytes


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "0", "-0.5", "abc"])
def test_chunk_s_must_be_finite_and_positive(bad, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["stream", str(tmp_path / "a.wav"), f"--chunk-s={bad}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--chunk-s" in err and "Traceback" not in err
    assert ("finite number of seconds above 0" in err) or ("not a number" in err), err


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_the_client_refuses_a_senseless_chunk_s(bad):
    with pytest.raises(StreamError, match="finite number of seconds above 0"):
        StreamClient("ws://127.0.0.1:1/v1/stream", chunk_s=bad)


@pytest.mark.asyncio
async def test_a_1009_close_is_an_error_not_a_drop_to_resume(aiohttp_client):
    """A gateway that closes with 1009 and no error message (its transport refused a message):
    the client stops there, with a clear error, instead of resuming and resending 5 times."""
    starts: list[dict] = []

    async def handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for m in ws:
            if m.type == WSMsgType.TEXT:
                starts.append(json.loads(m.data))
                await ws.send_str(json.dumps({"type": "ready", "v": 1, "session": "s1",
                                              "resumed": len(starts) > 1, "audio_s": 0.0,
                                              "audio_bytes": 0, "after": "0"}))
            else:
                await ws.close(code=1009, message=b"too big")
        return ws

    app = web.Application()
    app.router.add_get("/v1/stream", handler)
    client = await aiohttp_client(app)
    x = np.zeros((22050, 1), np.float32)
    with pytest.raises(StreamError, match="too_large") as e:
        await StreamClient(str(client.make_url("/v1/stream")), realtime=False).stream_array(
            x, 22050, lambda m: None)
    assert e.value.reason == "too_large"
    assert len(starts) == 1  # not resumed


@pytest.mark.asyncio
async def test_a_message_past_the_transport_cap_ends_the_session(aiohttp_client):
    bus = InProcessBus()
    app = create_app(Settings(max_message_bytes=LIMIT), bus, close_bus=False)
    client = await aiohttp_client(app)
    async with FakeWorker(bus):
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        sid = (await receive_json(ws))["session"]
        await ws.send_bytes(b"\x00" * (2 * LIMIT + 65536 + 2))
        _, close = await drain(ws)
        assert close == CLOSE_CODES["too_large"]
        for _ in range(500):  # the connection's cleanup runs a moment after the close
            if app[TABLE_KEY].get(sid) is None:
                break
            await asyncio.sleep(0.01)
        assert app[TABLE_KEY].get(sid) is None  # released: not kept for a resume
        assert bus._sessions[sid].ended  # its stream is over: no more audio for it
    reg = app[METRICS_KEY].registry
    assert reg.get_sample_value("midimatch_gateway_errors_total", {"code": "too_large"}) == 1
