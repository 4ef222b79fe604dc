"""Gateway test helpers: a stand-in *worker* (claims sessions through the real bus, reads their
audio, publishes results) and small websocket helpers. The bus itself is always a real one
(``InProcessBus``, or ``RedisBus`` on the real redis-server fixture)."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

import numpy as np
from aiohttp import WSMsgType

from index.answers import answer, stream_answer
from worker.bus import Bus


class FakeWorker:
    """Plays the worker's role on a bus with a trivial "engine": one result per
    ``result_every_s`` of audio, ranking a fixed piece, a decision from ``decide_after_s``; the
    final result's ``answer`` is identified, silent (every sample was zero) or not in the
    collection, as the real engine's.

    Records every chunk it applied (``seqs[session]``) so tests can check numbering.
    """

    def __init__(self, bus: Bus, *, worker_id: str = "fake-1", max_sessions: int = 8,
                 result_every_s: float = 0.5, decide_after_s: float = 1.0) -> None:
        self.bus, self.worker_id, self.max_sessions = bus, worker_id, max_sessions
        self.result_every_s, self.decide_after_s = result_every_s, decide_after_s
        self.seqs: dict[str, list[int]] = defaultdict(list)
        self.audio_s: dict[str, float] = defaultdict(float)
        self.sounding: dict[str, bool] = defaultdict(bool)  # a non-zero sample came
        self.params: dict[str, Any] = {}
        self._next_result: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self.running = True  # False: claims nothing more (stands for a stalled worker)
        self._stop = False

    def result(self, sid: str, final: bool) -> dict:
        a = self.audio_s[sid]
        match = {"id": "piece-1", "title": "Test Piece", "confidence": min(1.0, a / 2),
                 "score": 3.5, "position_s": a}
        decided = a >= self.decide_after_s
        out = {"audio_s": round(a, 3), "lag_s": 0.01, "final": final,
               "matches": [match, {**match, "id": "piece-2", "title": "Other", "confidence": 0.1}],
               "decision": {k: match[k] for k in ("id", "title", "confidence", "position_s")}
               if decided else None}
        if final:
            out["answer"] = answer(stream_answer(decided, not self.sounding[sid]))
        return out

    async def step(self) -> None:
        await self.bus.heartbeat(self.worker_id, self.max_sessions)
        if self.running:
            for c in await self.bus.claim(self.worker_id, self.max_sessions - len(self.params),
                                          block_s=0.02):
                self.params[c.session_id] = c.params
                self._next_result[c.session_id] = self.result_every_s
        for sid, params in list(self.params.items()):
            last = self.seqs[sid][-1] if self.seqs[sid] else -1
            batch = await self.bus.read_audio(sid, after_seq=last)
            for ch in batch.chunks:
                assert ch.seq == last + 1, f"chunk {ch.seq} after {last}"
                last = ch.seq
                self.seqs[sid].append(ch.seq)
                self.sounding[sid] |= any(ch.pcm)
                self.audio_s[sid] += params.seconds(len(ch.pcm))
                while self.audio_s[sid] >= self._next_result[sid]:
                    await self.bus.publish_result(sid, self.result(sid, False))
                    self._next_result[sid] += self.result_every_s
            if batch.ended:
                await self.bus.publish_result(sid, self.result(sid, True))
                await self.bus.finish(self.worker_id, sid)
                del self.params[sid]
        await self.bus.renew(self.worker_id, list(self.params))
        await asyncio.sleep(0.01)

    async def _loop(self) -> None:
        while not self._stop:
            await self.step()

    async def __aenter__(self) -> FakeWorker:
        await self.bus.heartbeat(self.worker_id, self.max_sessions)
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Stopped by a flag, not cancelled: see server/ws.py _cleanup on cancelling waiters
        # of InProcessBus.
        assert self._task is not None
        self._stop = True
        await asyncio.wait_for(self._task, 5.0)


def pcm_s16(seconds: float, rate: int = 16000, channels: int = 1) -> bytes:
    """A quiet sine, little-endian int16."""
    t = np.arange(int(seconds * rate)) / rate
    x = (0.2 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    return np.repeat(x[:, None], channels, axis=1).tobytes()


def start_msg(**kw: Any) -> str:
    return json.dumps({"type": "start", "v": 1, "sample_rate": 16000, "channels": 1,
                       "encoding": "pcm_s16le", **kw})


async def receive_json(ws, timeout: float = 5.0) -> dict:
    msg = await ws.receive(timeout=timeout)
    assert msg.type == WSMsgType.TEXT, f"expected a text message, got {msg.type} {msg.data!r}"
    return json.loads(msg.data)


async def drain(ws, timeout: float = 10.0) -> tuple[list[dict], int | None]:
    """Every JSON message until the server closes; and the close code."""
    out = []
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type == WSMsgType.TEXT:
            out.append(json.loads(msg.data))
        elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            return out, ws.close_code
        elif msg.type == WSMsgType.ERROR:
            return out, ws.close_code


async def send_audio(ws, seconds: float, chunk_s: float = 0.25, rate: int = 16000) -> None:
    data = pcm_s16(seconds, rate)
    step = int(chunk_s * rate) * 2
    for i in range(0, len(data), step):
        await ws.send_bytes(data[i:i + step])
