"""A protocol v1 client: streams an audio file to ``/v1/stream`` and reports the results.

Used by ``midimatch stream FILE``. Audio is read with soundfile (WAV, FLAC, Ogg, MP3 with
libsndfile ≥ 1.1), mixed to mono when it has more than two channels, and sent as ``pcm_f32le``
at its own sample rate. A dropped connection is resumed (``start`` with the session id and the
last result id seen), and sending continues from the byte the gateway says it has.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np

from model.errors import AudioError, MidimatchError
from worker.bus import MAX_RATE, MIN_RATE, PROTOCOL_VERSION


class StreamError(MidimatchError):
    """The service answered with an ``error`` message, or could not be reached."""

    reason = "stream_failed"


def read_audio_file(path: str | Path) -> tuple[np.ndarray, int]:
    """``(samples, sample_rate)``: float32 of shape (n, channels), channels 1 or 2.

    Raises
    ------
    AudioError
        Unreadable file, or a sample rate the protocol does not take (8–96 kHz).
    """
    import soundfile as sf

    try:
        x, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises RuntimeError/LibsndfileError on bad input
        raise AudioError(f"cannot read {path}: {e}") from e
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"{path}: sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE}; "
                         "resample it first (e.g. ffmpeg -ar 22050)", reason="bad_sample_rate")
    if x.shape[1] > 2:
        x = x.mean(axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype="<f4"), int(rate)


class StreamClient:
    """Parameters
    ----------
    url : str
        ``ws://host:port/v1/stream``.
    token : str, optional
        Sent as ``Authorization: Bearer``.
    chunk_s : float
        Audio per binary message, s.
    realtime : bool
        Pace the audio at its real duration (True) or send as fast as the socket takes it.
    max_resumes : int
        Reconnections tried after a dropped connection.
    """

    def __init__(self, url: str, *, token: str | None = None, chunk_s: float = 0.25,
                 realtime: bool = True, max_resumes: int = 5) -> None:
        self.url, self.token, self.chunk_s = url, token, chunk_s
        self.realtime, self.max_resumes = realtime, max_resumes

    async def stream_file(self, path: str | Path, on_message: Callable[[dict], None]
                          ) -> dict | None:
        """Stream a file; returns the final result (None if the service never sent one)."""
        x, rate = read_audio_file(path)
        return await self.stream_array(x, rate, on_message)

    async def stream_array(self, x: np.ndarray, rate: int, on_message: Callable[[dict], None]
                           ) -> dict | None:
        """Stream float samples of shape (n, channels) at ``rate`` Hz; returns the final
        result.

        Raises
        ------
        StreamError
            The service sent an ``error`` message, or every reconnection failed.
        """
        pcm = np.ascontiguousarray(x, dtype="<f4").tobytes()
        channels = int(x.shape[1]) if x.ndim == 2 else 1
        frame = 4 * channels
        step = max(1, int(self.chunk_s * rate)) * frame
        start = {"type": "start", "v": PROTOCOL_VERSION, "sample_rate": rate,
                 "channels": channels, "encoding": "pcm_f32le"}
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        session, after, final = None, None, None
        resumes = 0
        async with aiohttp.ClientSession(headers=headers) as http:
            while final is None:
                try:
                    async with http.ws_connect(self.url, max_msg_size=1 << 22) as ws:
                        msg = dict(start, session=session, after=after) if session else start
                        await ws.send_str(json.dumps(msg))
                        ready = await self._expect_ready(ws, on_message)
                        session = ready["session"]
                        sent = int(ready.get("audio_bytes", 0))
                        sender = asyncio.create_task(self._send(ws, pcm, sent, step,
                                                                rate * frame))
                        try:
                            async for m in ws:
                                if m.type != aiohttp.WSMsgType.TEXT:
                                    break
                                data = json.loads(m.data)
                                on_message(data)
                                if data.get("type") == "error":
                                    raise StreamError(f"{data['code']}: {data['message']}",
                                                      reason=data["code"])
                                if data.get("type") == "result":
                                    after = data.get("result_id", after)
                                    if data.get("final"):
                                        final = data
                        finally:
                            sender.cancel()
                            await asyncio.gather(sender, return_exceptions=True)
                except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as e:
                    if session is None or resumes >= self.max_resumes:
                        raise StreamError(f"cannot stream to {self.url}: {e}") from e
                if final is None:
                    if session is None or resumes >= self.max_resumes:
                        return None
                    resumes += 1
                    await asyncio.sleep(0.2 * resumes)
        return final

    async def _expect_ready(self, ws: aiohttp.ClientWebSocketResponse,
                            on_message: Callable[[dict], None]) -> dict:
        m = await ws.receive(timeout=30.0)
        if m.type != aiohttp.WSMsgType.TEXT:
            raise aiohttp.ClientError(f"connection closed before ready ({ws.close_code})")
        data = json.loads(m.data)
        on_message(data)
        if data.get("type") == "error":
            raise StreamError(f"{data['code']}: {data['message']}", reason=data["code"])
        return data

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, pcm: bytes, offset: int,
                    step: int, bytes_per_s: int) -> None:
        t0 = time.monotonic() - offset / bytes_per_s
        for i in range(offset, len(pcm), step):
            if self.realtime:
                delay = t0 + i / bytes_per_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await ws.send_bytes(pcm[i:i + step])
        await ws.send_str(json.dumps({"type": "stop", "v": PROTOCOL_VERSION}))


def format_message(m: dict) -> str | None:
    """One human line for a server message (None for messages not worth a line)."""
    kind = m.get("type")
    if kind == "ready":
        return f"session {m['session']}" + (" (resumed)" if m.get("resumed") else "")
    if kind == "error":
        return f"error {m['code']}: {m['message']}"
    if kind != "result":
        return None
    head = f"{m['audio_s']:7.1f} s  "
    d = m.get("decision")
    if d:
        head += f"= {d['title']}  ({d['confidence']:.0%}, at {d['position_s']:.1f} s)"
    elif m.get("matches"):
        best = m["matches"][0]
        head += f"? {best['title']}  ({best['confidence']:.0%})"
    else:
        head += "…"
    if m.get("final"):
        head += "   [final]" + ("" if d else "  no confident match in the collection")
    return head


def print_message(m: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(m), flush=True)
        return
    line = format_message(m)
    if line is not None:
        print(line, file=sys.stderr if m.get("type") == "error" else sys.stdout, flush=True)
