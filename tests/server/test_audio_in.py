"""server.audio_in.AudioIn on its own: tiny messages merged into 40 ms chunks, bounded arrivals,
held audio pushed at the stop and discarded once the session moved to another connection."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from server.audio_in import MAX_ARRIVALS, MAX_HOLD_S, AudioIn
from server.metrics import GatewayMetrics
from server.protocol import ProtocolError
from server.sessions import SessionState
from server.settings import Settings
from worker.bus import InProcessBus, StreamParams

pytestmark = pytest.mark.asyncio
RATE = 16000  # s16 mono: MIN_CHUNK_S is 640 frames, 1280 bytes
PARAMS = StreamParams(sample_rate=RATE)


def pcm(n: int, start: int = 0) -> bytes:
    """``n`` frames of distinct-looking int16 samples (a wrong order or a lost one shows)."""
    return (((np.arange(n) + start) * 7919) % 65521 - 32760).astype("<i2").tobytes()


async def setup(settings: Settings | None = None) -> tuple[InProcessBus, SessionState, AudioIn]:
    bus = InProcessBus()
    st = SessionState(await bus.create_session(PARAMS), PARAMS)
    conn = object()  # stands for the websocket: only compared with ``st.conn``
    st.conn = conn
    return bus, st, AudioIn(settings or Settings(), bus, GatewayMetrics(), conn)


async def chunks(bus: InProcessBus, st: SessionState) -> list:
    return (await bus.read_audio(st.session_id, after_seq=-1, max_chunks=100000)).chunks


async def test_tiny_messages_are_merged_into_40_ms_chunks_in_order():
    bus, st, audio = await setup()
    tiny = [pcm(80, 80 * i) for i in range(11)]  # 5 ms each
    t0 = time.monotonic()
    for m in tiny[:7]:  # 35 ms: held
        await audio.add(st, m, time.monotonic())
    assert await chunks(bus, st) == [] and len(audio.held) == 7 * 160
    assert audio.held_since >= t0 and audio.flush_at < float("inf")
    await audio.add(st, tiny[7], time.monotonic())  # 40 ms: one chunk
    [c] = await chunks(bus, st)
    assert (c.seq, c.t_s, c.pcm) == (0, 0.0, b"".join(tiny[:8]))
    assert not audio.held and audio.flush_at == float("inf")
    assert (st.next_seq, st.audio_bytes) == (1, 8 * 160)

    # A long message first pushes what is held before it, then itself: two chunks, in order.
    for m in tiny[8:]:
        await audio.add(st, m, time.monotonic())
    long = pcm(1600, 5000)  # 0.1 s
    await audio.add(st, long, time.monotonic())
    got = await chunks(bus, st)
    assert [c.seq for c in got] == [0, 1, 2]
    assert got[1].pcm == b"".join(tiny[8:]) and got[1].t_s == pytest.approx(0.04)
    assert got[2].pcm == long and got[2].t_s == pytest.approx(0.055)
    assert st.audio_s == pytest.approx(0.155)
    # Arrivals: the first 40 ms, then the 15 ms merged with the 0.1 s that completed it.
    a = list(audio.arrivals)
    assert [(b, e) for b, e, _ in a] == [(0.0, pytest.approx(0.04)),
                                         (pytest.approx(0.04), pytest.approx(0.155))]
    assert t0 <= a[0][2] <= a[1][2]


async def test_held_audio_is_due_after_max_hold_s():
    bus, st, audio = await setup()
    loop = asyncio.get_running_loop()
    assert not audio.due(loop.time() + 3600)  # nothing held: never due
    before = loop.time()
    await audio.add(st, pcm(16), time.monotonic())  # 1 ms
    assert not audio.due(before)
    assert audio.due(before + MAX_HOLD_S + 0.05) and audio.flush_at <= before + MAX_HOLD_S + 0.05
    await audio.flush(st)
    [c] = await chunks(bus, st)
    assert c.pcm == pcm(16) and not audio.held and not audio.due(loop.time() + 3600)


async def test_arrivals_are_bounded():
    bus, st, audio = await setup(Settings(max_session_s=3600))
    n = MAX_ARRIVALS + 50
    msg_s = 0.05  # above MIN_CHUNK_S: one chunk and one arrivals entry each
    for i in range(n):
        await audio.add(st, pcm(int(msg_s * RATE), i), float(i))
    assert st.next_seq == n
    assert len(audio.arrivals) == MAX_ARRIVALS  # the oldest 50 went
    first, last = audio.arrivals[0], audio.arrivals[-1]
    assert first == (pytest.approx(50 * msg_s), pytest.approx(51 * msg_s), 50.0)
    assert last == (pytest.approx((n - 1) * msg_s), pytest.approx(n * msg_s), float(n - 1))
    # A result the forgotten audio completed is not observed; one the kept audio did is.
    assert audio.service_lag({"audio_s": 10 * msg_s}) is None
    assert audio.service_lag({"audio_s": round(60 * msg_s, 3)}) is not None
    assert audio.arrivals[0][0] == pytest.approx(59 * msg_s)  # covered entries dropped


async def test_stop_pushes_held_audio_first():
    bus, st, audio = await setup()
    held = [pcm(80, 80 * i) for i in range(3)]
    for m in held:
        await audio.add(st, m, time.monotonic())
    assert await chunks(bus, st) == []
    assert audio.service_lag({"final": True, "audio_s": 0.015}) is None  # no stop yet
    await audio.stop(st)
    [c] = await chunks(bus, st)
    assert c.pcm == b"".join(held) and not audio.held
    assert audio.stop_at is not None and audio.stop_at <= time.monotonic()
    lag = audio.result_sent({"final": True, "audio_s": 0.015})
    assert lag is not None and 0.0 <= lag < 60
    assert audio.sent_at >= audio.stop_at


async def test_held_audio_is_discarded_once_the_session_moved_to_another_connection():
    """A resume on this gateway: the new connection's ready.audio_bytes left the held audio out
    and the client sends it again there, so this connection must not push it."""
    bus, st, audio = await setup()
    await audio.add(st, pcm(80), time.monotonic())
    st.conn = object()  # resumed on another connection
    await audio.flush(st)
    assert await chunks(bus, st) == []
    assert not audio.held and audio.flush_at == float("inf")
    assert (st.next_seq, st.audio_bytes) == (0, 0) and not audio.arrivals


async def test_check_counts_held_audio_in_the_session_length():
    bus, st, audio = await setup(Settings(max_session_s=1.0))
    for _ in range(199):  # 0.995 s: 24 chunks of 40 ms pushed, 35 ms held
        audio.check(st, pcm(80))
        await audio.add(st, pcm(80), time.monotonic())
    assert st.audio_bytes == 24 * 1280 and len(audio.held) == 7 * 160
    audio.check(st, pcm(80))  # 1.0 s in all: allowed
    with pytest.raises(ProtocolError) as e:
        audio.check(st, pcm(96))  # 1.001 s
    assert e.value.code == "too_large" and e.value.reason == "session_too_long"
    with pytest.raises(ProtocolError) as e:
        audio.check(st, b"\x00")  # half a frame
    assert e.value.reason == "odd_length"
