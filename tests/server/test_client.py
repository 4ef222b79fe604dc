"""``midimatch stream``'s client against a real gateway (stand-in worker behind it)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import soundfile as sf

from model.errors import AudioError
from server.app import create_app
from server.client import StreamClient, StreamError, format_message, read_audio_file
from server.settings import Settings
from tests.server.conftest import FakeWorker
from worker.bus import InProcessBus


def test_read_audio_file(tmp_path):
    stereo = np.random.default_rng(0).uniform(-0.5, 0.5, (22050, 2)).astype(np.float32)
    sf.write(tmp_path / "a.flac", stereo, 22050)
    x, rate = read_audio_file(tmp_path / "a.flac")
    assert rate == 22050 and x.shape == (22050, 2)
    sf.write(tmp_path / "low.wav", stereo[:, 0], 4000)
    with pytest.raises(AudioError, match="4000 Hz"):
        read_audio_file(tmp_path / "low.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF nonsense")
    with pytest.raises(AudioError):
        read_audio_file(tmp_path / "junk.wav")


def test_format_message():
    d = {"id": "x", "title": "Minuet", "confidence": 0.9, "position_s": 12.0}
    line = format_message({"type": "result", "audio_s": 5.0, "matches": [d], "decision": d,
                           "final": True})
    assert "Minuet" in line and "90%" in line and "final" in line
    assert "no confident match" in format_message({"type": "result", "audio_s": 5.0,
                                                   "matches": [], "decision": None,
                                                   "final": True})


@pytest.mark.asyncio
async def test_stream_a_file(aiohttp_client, tmp_path):
    bus = InProcessBus()
    client = await aiohttp_client(create_app(Settings(), bus, close_bus=False))
    x = 0.1 * np.sin(np.linspace(0, 2000, 33075)).astype(np.float32)  # 1.5 s at 22.05 kHz
    sf.write(tmp_path / "q.wav", np.stack([x, x], 1), 22050)
    seen = []
    async with FakeWorker(bus) as worker:
        final = await StreamClient(str(client.make_url("/v1/stream")), realtime=False,
                                   chunk_s=0.1).stream_file(tmp_path / "q.wav", seen.append)
    assert final is not None and final["final"] and final["audio_s"] == pytest.approx(1.5)
    assert seen[0]["type"] == "ready" and seen[-1] is final
    assert len(worker.seqs[seen[0]["session"]]) == 15


@pytest.mark.asyncio
async def test_stream_reports_the_service_error(aiohttp_client):
    client = await aiohttp_client(create_app(Settings(auth_token="k"), InProcessBus()))
    with pytest.raises(StreamError, match="unauthorized"):
        await StreamClient(str(client.make_url("/v1/stream")), realtime=False).stream_array(
            np.zeros((100, 1), np.float32), 16000, lambda m: None)


@pytest.mark.asyncio
async def test_the_client_resumes_after_the_gateway_drops_it(aiohttp_client):
    from server.app import HANDLER_KEY

    bus = InProcessBus()
    app = create_app(Settings(), bus, close_bus=False)
    client = await aiohttp_client(app)
    x = np.zeros((16000 * 2, 1), np.float32)  # 2 s at 16 kHz, sent in 0.1 s messages
    seen = []
    async with FakeWorker(bus) as worker:
        task = asyncio.create_task(StreamClient(
            str(client.make_url("/v1/stream")), realtime=True, chunk_s=0.1).stream_array(
                x, 16000, seen.append))
        while not any(m["type"] == "result" for m in seen):
            await asyncio.sleep(0.01)
        await app[HANDLER_KEY].close_all()  # 1001, as a gateway shutting down does
        final = await asyncio.wait_for(task, 20)
    readies = [m for m in seen if m["type"] == "ready"]
    assert [r["resumed"] for r in readies] == [False, True]
    assert readies[1]["audio_bytes"] > 0
    sid = readies[0]["session"]
    assert final["final"] and final["audio_s"] == pytest.approx(2.0)
    assert worker.seqs[sid] == list(range(len(worker.seqs[sid])))  # contiguous, no repeats
    results = [m["result_id"] for m in seen if m["type"] == "result"]
    assert len(results) == len(set(results))
