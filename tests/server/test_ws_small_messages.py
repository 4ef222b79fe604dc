"""Tiny audio messages (one frame each) cost the gateway and the bus per 40 ms of audio, not per
message, and every frame of them still reaches the bus, in order (server/ws.py MIN_CHUNK_S).

They cost each connection ~12 MB before: ``arrivals`` kept one entry per message (65,536 at
most, 0.68 s of 96 kHz audio, never covered by a per-second result), and Redis one stream
entry per message within its 20 s window."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import server.ws as ws_mod
from server.app import create_app
from server.settings import Settings
from server.ws import MAX_HOLD_S, MIN_CHUNK_S
from tests.server.conftest import receive_json, start_msg
from worker.bus import InProcessBus
from worker.redis_bus import RedisBus

pytestmark = pytest.mark.asyncio
RATE = 96000
N_MESSAGES = 20000  # one frame each: 0.208 s of audio, five times the arrivals' cap of entries


@pytest.fixture
def connections(monkeypatch) -> list:
    """Every ``_Connection`` the gateway makes, to look at its per-connection state."""
    made: list = []
    init = ws_mod._Connection.__init__

    def recording_init(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(ws_mod._Connection, "__init__", recording_init)
    return made


def frames(n: int) -> np.ndarray:
    """``n`` distinct-looking int16 samples (a wrong order or a lost one shows)."""
    return ((np.arange(n) * 7919) % 65521 - 32760).astype("<i2")


async def bus_audio(bus, sid: str, want_bytes: int, timeout_s: float = 10.0) -> list:
    """The session's chunks on the bus once they hold ``want_bytes`` (held audio goes to the
    bus within MAX_HOLD_S even with no more messages and no stop)."""
    deadline = time.monotonic() + timeout_s
    while True:
        chunks = (await bus.read_audio(sid, after_seq=-1, max_chunks=100000)).chunks
        if sum(len(c.pcm) for c in chunks) >= want_bytes or time.monotonic() > deadline:
            return chunks
        await asyncio.sleep(0.02)


async def one_frame_messages(client, x: np.ndarray) -> tuple[str, float]:
    """Start a 96 kHz s16 session and send ``x`` one frame per message; its id and the
    monotonic time the sending began (the gateway reads the messages later than the client
    writes them: measure its span from there to when all the audio is on the bus)."""
    ws = await client.ws_connect("/v1/stream")
    await ws.send_str(start_msg(sample_rate=RATE))
    sid = (await receive_json(ws))["session"]
    t0 = time.monotonic()
    data = x.tobytes()
    for i in range(0, len(data), 2):
        await ws.send_bytes(data[i:i + 2])
    return sid, t0


def check_chunks(chunks: list, x: np.ndarray, took_s: float) -> None:
    """Every frame once, in order, numbered from 0 and stamped with its stream time; merged
    into chunks of at least MIN_CHUNK_S but those a wait of MAX_HOLD_S sent early (at most
    one per MAX_HOLD_S of ``took_s``, the span from the first message sent to the last
    chunk on the bus: the gateway may still be reading messages after the client has
    written them all, as CI once saw — 10 chunks for 0.2 s of sending)."""
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert b"".join(c.pcm for c in chunks) == x.tobytes()  # nothing lost, nothing reordered
    at = 0
    for c in chunks:
        assert c.t_s == pytest.approx(at / RATE)
        at += len(c.pcm) // 2
    audio_s = len(x) / RATE
    assert len(chunks) <= audio_s / MIN_CHUNK_S + took_s / MAX_HOLD_S + 2, len(chunks)
    assert len(chunks) < len(x) / 100  # merged: not one chunk per message


def check_arrivals(conn, audio_s: float) -> None:
    a = list(conn.arrivals)
    assert 1 <= len(a) <= int(audio_s / MIN_CHUNK_S) + 1, len(a)
    assert a[0][0] == 0.0 and a[-1][1] == pytest.approx(audio_s)
    for (b0, e0, t0), (b1, _, t1) in zip(a, a[1:], strict=False):
        assert e0 == pytest.approx(b1) and t0 <= t1  # contiguous, in arrival order
        assert e0 - b0 >= MIN_CHUNK_S - 1e-9  # each but the last: at least 40 ms of audio
    assert not conn.held  # all of it went to the bus


async def test_one_frame_messages_are_merged_and_all_delivered(aiohttp_client, connections):
    bus = InProcessBus()
    client = await aiohttp_client(create_app(Settings(), bus, close_bus=False))
    await bus.heartbeat("w1", 4)  # a worker alive (start needs one); nothing reads results
    x = frames(N_MESSAGES)
    sid, t0 = await one_frame_messages(client, x)
    chunks = await bus_audio(bus, sid, x.nbytes)
    check_chunks(chunks, x, time.monotonic() - t0)
    [conn] = connections
    check_arrivals(conn, len(x) / RATE)
    assert conn.state.audio_bytes == x.nbytes and conn.state.next_seq == len(chunks)


async def test_held_audio_goes_to_the_bus_before_the_stop(aiohttp_client, connections):
    """A few frames, then a stop at once: the stream ends after them, not without them."""
    bus = InProcessBus()
    client = await aiohttp_client(create_app(Settings(), bus, close_bus=False))
    await bus.heartbeat("w1", 4)
    ws = await client.ws_connect("/v1/stream")
    await ws.send_str(start_msg(sample_rate=RATE))
    sid = (await receive_json(ws))["session"]
    x = frames(10)
    for i in range(0, x.nbytes, 2):
        await ws.send_bytes(x.tobytes()[i:i + 2])
    await ws.send_str('{"type": "stop", "v": 1}')
    for _ in range(500):
        batch = await bus.read_audio(sid, after_seq=-1)
        if batch.ended:
            break
        await asyncio.sleep(0.01)
    assert batch.ended and b"".join(c.pcm for c in batch.chunks) == x.tobytes()
    await ws.close()


async def test_one_frame_messages_over_redis_are_few_entries(aiohttp_client, redis_server,
                                                             connections):
    """The same over a real Redis: the session's audio stream holds one entry per 40 ms of
    audio (or per MAX_HOLD_S of waiting), not one per message."""
    bus = RedisBus(redis_server.url, prefix="small")
    client = await aiohttp_client(create_app(Settings(redis_url=redis_server.url), bus))
    worker_bus = RedisBus(redis_server.url, prefix="small")
    try:
        await worker_bus.heartbeat("w1", 4)
        x = frames(N_MESSAGES)
        sid, t0 = await one_frame_messages(client, x)
        chunks = await bus_audio(worker_bus, sid, x.nbytes)
        check_chunks(chunks, x, time.monotonic() - t0)
        assert await worker_bus.r.xlen(worker_bus.audio_key(sid)) == len(chunks)
        [conn] = connections
        check_arrivals(conn, len(x) / RATE)
    finally:
        await worker_bus.close()


async def test_a_resume_on_this_gateway_does_not_get_the_old_connections_held_audio(
        aiohttp_client):
    """Short messages held on connection A when the client resumes on B (same gateway): B's
    ``ready.audio_bytes`` is what the bus has, and the client sends from there; A, closed as
    replaced, must not push what it held after that (the audio would be there twice)."""
    bus = InProcessBus()
    client = await aiohttp_client(create_app(Settings(), bus, close_bus=False))
    await bus.heartbeat("w1", 4)
    x = frames(RATE // 10)  # 0.1 s
    data = x.tobytes()
    a = await client.ws_connect("/v1/stream")
    await a.send_str(start_msg(sample_rate=RATE))
    sid = (await receive_json(a))["session"]
    for i in range(0, 40, 2):  # 20 frames: held (well under MIN_CHUNK_S)
        await a.send_bytes(data[i:i + 2])
    b = await client.ws_connect("/v1/stream")
    await b.send_str(start_msg(sample_rate=RATE, session=sid))
    ready = await receive_json(b)
    assert ready["resumed"]
    await b.send_bytes(data[ready["audio_bytes"]:])
    await b.send_str('{"type": "stop", "v": 1}')
    for _ in range(500):
        batch = await bus.read_audio(sid, after_seq=-1, max_chunks=100000)
        if batch.ended:
            break
        await asyncio.sleep(0.01)
    assert batch.ended and b"".join(c.pcm for c in batch.chunks) == data
    await a.close()
    await b.close()
