"""``midimatch stream``'s client against a real gateway (stand-in worker behind it)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import soundfile as sf

from index.answers import IDENTIFIED, NOT_IN_COLLECTION, SILENT, answer
from model.errors import AudioError
from server.app import create_app
from server.cli import main
from server.client import (
    LEGEND,
    StreamClient,
    StreamError,
    format_message,
    print_message,
    read_audio_file,
)
from server.settings import Settings
from tests.server.conftest import FakeWorker
from worker.bus import BusError, InProcessBus


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
    with pytest.raises(AudioError, match=r"^/nonexistent\.wav does not exist$"):
        read_audio_file("/nonexistent.wav")


def test_format_message():
    d = {"id": "x", "title": "Minuet", "confidence": 0.9, "position_s": 72.4}
    guess = {**d, "confidence": 0.41, "position_s": 3.0}

    def result(**kw):
        return format_message({"type": "result", "audio_s": 65.0, "matches": [d],
                               "decision": None, "final": False, **kw})

    assert result(decision=d, final=True, answer=answer(IDENTIFIED)) == \
        "   1:05  = Minuet  (90%, at 1:12)   [final]  identified: Minuet at 1:12"
    assert result(matches=[guess]) == "   1:05  ? Minuet  (41%, at 0:03)"
    assert result(matches=[]) == "   1:05  …"
    assert result(matches=[], final=True, answer=answer(NOT_IN_COLLECTION)) == \
        "   1:05  …   [final]  not in the collection"
    assert result(matches=[], final=True, answer=answer(SILENT)) == \
        "   1:05  …   [final]  silent: nothing to identify"
    # a service without `answer`: the kind follows the decision
    assert result(matches=[], final=True).endswith("…   [final]  not in the collection")
    assert result(decision=d, final=True).endswith("[final]  identified: Minuet at 1:12")
    assert result(matches=[], final=True, error={"code": "bad_audio", "message": "NaN"}
                  ).endswith("[final]  error: NaN")
    first = format_message({"type": "ready", "session": "abc", "resumed": False})
    assert first.splitlines() == [LEGEND, "session abc"]
    for marker in ("… no ranking yet", "? best guess", "= identified", "m:ss"):
        assert marker in LEGEND
    assert format_message({"type": "ready", "session": "abc", "resumed": True}) == \
        "session abc (resumed)"


def test_print_message_json_is_the_server_message(capsys):
    m = {"type": "result", "audio_s": 65.0, "final": True, "decision": None,
         "answer": answer(SILENT)}
    print_message(m, as_json=True)
    assert json.loads(capsys.readouterr().out) == m


def test_stream_help_explains_the_markers_and_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["stream", "--help"])
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    for said in ("'…' no ranking yet", "'?' best guess", "'=' identified",
                 "'identified', 'not in the collection', 'silent: nothing to identify'",
                 "m:ss"):
        assert said in flat, said
    options = flat[flat.index("options:"):flat.index("markers:")].split(" --")[2:]  # not -h
    assert [o.split()[0] for o in options] == ["url", "speed", "json", "token", "chunk-s"]
    for o in options:
        assert "default" in o, o


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
async def test_stream_reports_a_refused_token(aiohttp_client):
    client = await aiohttp_client(create_app(Settings(auth_token="k"), InProcessBus()))
    with pytest.raises(StreamError, match="unauthorized: the service needs a token") as e:
        await StreamClient(str(client.make_url("/v1/stream")), realtime=False).stream_array(
            np.zeros((100, 1), np.float32), 16000, lambda m: None)
    assert e.value.reason == "unauthorized"


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


@pytest.mark.asyncio
@pytest.mark.parametrize("silent", [True, False])
async def test_a_silent_file_says_so_like_identify(aiohttp_client, tmp_path, capsys, silent):
    bus = InProcessBus()
    client = await aiohttp_client(create_app(Settings(), bus, close_bus=False))
    x = np.zeros(11025, np.float32) if silent else \
        0.1 * np.sin(np.arange(11025) * 0.05).astype(np.float32)  # 0.5 s: no decision
    sf.write(tmp_path / "q.wav", x, 22050)
    async with FakeWorker(bus):
        final = await StreamClient(str(client.make_url("/v1/stream")), realtime=False
                                   ).stream_file(tmp_path / "q.wav",
                                                 lambda m: print_message(m, False))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == LEGEND and lines[1].startswith("session ")
    assert lines[-1].startswith("   0:00  ") and "[final]" in lines[-1]
    assert lines[-1].endswith("silent: nothing to identify" if silent
                              else "not in the collection")
    assert final["answer"]["kind"] == (SILENT if silent else NOT_IN_COLLECTION)


def unavailable() -> BusError:
    return BusError("Redis failed: ConnectionError: Error 111 connecting to 127.0.0.1:1",
                    reason="redis_unavailable")


@pytest.mark.asyncio
async def test_the_client_retries_with_backoff_when_the_service_is_unavailable(aiohttp_client,
                                                                               monkeypatch):
    """Redis down at the start (twice) and once in the middle of the stream: the client waits
    the error's retry_after_s, doubled each time, then starts, later resumes, and the stream
    completes with every chunk once."""
    bus = InProcessBus()
    client = await aiohttp_client(create_app(Settings(), bus, close_bus=False))
    fails = {"create": 2, "push": 1}
    create, push = bus.create_session, bus.push_audio

    async def flaky_create(*a, **k):
        if fails["create"]:
            fails["create"] -= 1
            raise unavailable()
        return await create(*a, **k)

    async def flaky_push(sid, chunk):
        if chunk.seq == 5 and fails["push"]:
            fails["push"] -= 1
            raise unavailable()
        return await push(sid, chunk)

    monkeypatch.setattr(bus, "create_session", flaky_create)
    monkeypatch.setattr(bus, "push_audio", flaky_push)
    waits: list[float] = []

    async def no_wait(s: float) -> None:
        waits.append(s)

    seen: list[dict] = []
    streamer = StreamClient(str(client.make_url("/v1/stream")), realtime=False, chunk_s=0.1)
    streamer.sleep = no_wait
    async with FakeWorker(bus) as worker:
        final = await streamer.stream_array(np.full((16000, 1), 0.1, np.float32), 16000,
                                            seen.append)
    assert final is not None and final["final"] and final["audio_s"] == pytest.approx(1.0)
    assert [m["code"] for m in seen if m["type"] == "error"] == ["unavailable"] * 3
    assert waits == [2.0, 4.0, 8.0]
    readies = [m for m in seen if m["type"] == "ready"]
    assert [r["resumed"] for r in readies] == [False, True]
    assert worker.seqs[readies[0]["session"]] == list(range(10))


@pytest.mark.asyncio
async def test_the_client_gives_up_after_its_retries(aiohttp_client, monkeypatch):
    bus = InProcessBus()
    client = await aiohttp_client(create_app(Settings(), bus, close_bus=False))

    async def down(*a, **k):
        raise unavailable()

    monkeypatch.setattr(bus, "create_session", down)
    streamer = StreamClient(str(client.make_url("/v1/stream")), realtime=False, max_retries=2)
    waits: list[float] = []

    async def no_wait(s: float) -> None:
        waits.append(s)

    streamer.sleep = no_wait
    async with FakeWorker(bus):
        with pytest.raises(StreamError, match="unavailable.*gave up after 2") as e:
            await streamer.stream_array(np.zeros((1600, 1), np.float32), 16000, lambda m: None)
    assert e.value.reason == "gave_up" and waits == [2.0, 4.0]
