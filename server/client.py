"""A protocol v1 client: streams an audio file to ``/v1/stream`` and reports the results.

Used by ``midimatch stream FILE``. Audio is read with soundfile (WAV, FLAC, Ogg, MP3 with
libsndfile ≥ 1.1), mixed to mono when it has more than two channels, and sent as ``pcm_f32le``
at its own sample rate. A dropped connection is resumed (``start`` with the session id and the
last result id seen), and sending continues from the byte the gateway says it has.

Human output (:func:`format_message`): one line per result, stream time and positions as m:ss,
a marker saying how sure the service is (:data:`LEGEND`, also the first line printed). The final
line ends with the service's answer (the final result's ``answer``: identified, not in the
collection, or silent) in the words ``midimatch identify`` uses (:mod:`index.answers`).

An error the service marks retryable (``unavailable``: Redis is down, say; ``busy``) is retried
with exponential backoff from its ``retry_after_s``, resuming the session when one was started;
a refused token (HTTP 401 before the upgrade) is reported at once.

aiohttp, numpy and the bus are imported where they are used: ``server/cli.py`` imports this
module to describe ``midimatch stream`` in its help, and ``midimatch --help`` stays instant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from index.answers import ANSWERS, IDENTIFIED, NOT_IN_COLLECTION, SILENT, answer_line, clock
from index.cli import DefaultsHelpFormatter
from model.errors import AudioError, MidimatchError

if TYPE_CHECKING:
    import aiohttp
    import numpy as np

MARKERS = {
    "…": "no ranking yet (less audio than a search needs)",
    "?": "best guess so far, not confident: not a decision",
    "=": "identified: confident and stable (the decision)",
}
RETRYABLE = ("unavailable", "busy")  # error codes that say "try again later"
MAX_BACKOFF_S = 30.0
RETRY_503_S = 5.0  # first wait after the gateway refused the connection (its Retry-After)
TOO_LARGE_CLOSE = 1009  # websocket close code: message too big
log = logging.getLogger(__name__)
LEGEND = ("markers: " + "   ".join(f"{k} {v}" for k, v in MARKERS.items())
          + ";  times m:ss (stream time, then position in the piece)")


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
    import numpy as np
    import soundfile as sf

    from worker.bus import MAX_RATE, MIN_RATE

    if not Path(path).exists():
        raise AudioError(f"{path} does not exist", reason="missing")
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


class _Retry(Exception):
    """The service said "try again later" (``retry_after_s``); not an error yet."""

    def __init__(self, after_s: float, why: str) -> None:
        super().__init__(why)
        self.after_s = after_s


def chunk_seconds(text: str) -> float:
    """``--chunk-s``: a finite number of seconds above 0 (argparse ``type``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number of seconds above 0")
    return value


class StreamClient:
    """Parameters
    ----------
    url : str
        ``ws://host:port/v1/stream``.
    token : str, optional
        Sent as ``Authorization: Bearer``.
    chunk_s : float
        Audio per binary message, s (finite, > 0): at most what the server's
        ``ready.limits.max_message_bytes`` holds in whole sample frames.
    realtime : bool
        Pace the audio at its real duration (True) or send as fast as the socket takes it.
    max_resumes : int
        Reconnections tried after a dropped connection.
    max_retries : int
        Attempts after the service answered a retryable error (:data:`RETRYABLE`: it is
        temporarily unavailable, or busy), each after a backoff: the error's ``retry_after_s``,
        doubled at every attempt, at most :data:`MAX_BACKOFF_S`. A started session is resumed.
    """

    def __init__(self, url: str, *, token: str | None = None, chunk_s: float = 0.25,
                 realtime: bool = True, max_resumes: int = 5, max_retries: int = 6) -> None:
        if not (isinstance(chunk_s, (int, float)) and math.isfinite(chunk_s) and chunk_s > 0):
            raise StreamError(f"chunk_s must be a finite number of seconds above 0, got "
                              f"{chunk_s!r}", reason="bad_chunk")
        self.url, self.token, self.chunk_s = url, token, chunk_s
        self.realtime, self.max_resumes, self.max_retries = realtime, max_resumes, max_retries
        self.sleep = asyncio.sleep  # the backoff's wait (tests shorten it)

    async def stream_file(self, path: str | Path, on_message: Callable[[dict], None]
                          ) -> dict | None:
        """Stream a file; returns the final result (None if the service never sent one)."""
        x, rate = read_audio_file(path)
        return await self.stream_array(x, rate, on_message)

    async def stream_array(self, x: np.ndarray, rate: int, on_message: Callable[[dict], None]
                           ) -> dict | None:
        """Stream float samples of shape (n, channels) at ``rate`` Hz; returns the final
        result.

        ``on_message`` gets every server message, as sent.

        Raises
        ------
        StreamError
            The service sent an error that is not retryable (or still failed after
            ``max_retries``), refused the token, or every reconnection failed.
        """
        import aiohttp
        import numpy as np

        from worker.bus import PROTOCOL_VERSION

        pcm = np.ascontiguousarray(x, dtype="<f4").tobytes()
        channels = int(x.shape[1]) if x.ndim == 2 else 1
        frame = 4 * channels
        frames = max(1, int(min(self.chunk_s * rate, len(pcm) // frame + 1)))
        start = {"type": "start", "v": PROTOCOL_VERSION, "sample_rate": rate,
                 "channels": channels, "encoding": "pcm_f32le"}
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        session, after, final = None, None, None
        resumes = retries = 0
        async with aiohttp.ClientSession(headers=headers) as http:
            while final is None:
                try:
                    async with http.ws_connect(self.url, max_msg_size=1 << 22) as ws:
                        msg = dict(start, session=session, after=after) if session else start
                        await ws.send_str(json.dumps(msg))
                        ready = await self._expect_ready(ws, on_message)
                        session = ready["session"]
                        sent = int(ready.get("audio_bytes", 0))
                        step = _step_bytes(frames, frame, ready)
                        sender = asyncio.create_task(self._send(ws, pcm, sent, step,
                                                                rate * frame))
                        try:
                            async for m in ws:
                                if m.type != aiohttp.WSMsgType.TEXT:
                                    break
                                data = json.loads(m.data)
                                on_message(data)
                                if data.get("type") == "error":
                                    _raise_for(data)
                                if data.get("type") == "result":
                                    after = data.get("result_id", after)
                                    if data.get("final"):
                                        final = data
                        finally:
                            sender.cancel()
                            await asyncio.gather(sender, return_exceptions=True)
                        if final is None and ws.close_code == TOO_LARGE_CLOSE:
                            # The transport refused a message without an error message: sending
                            # it again would fail the same way (and the session has ended).
                            raise StreamError("too_large: the service closed the connection "
                                              "(1009: a message too large)", reason="too_large")
                except _Retry as r:
                    retries += 1
                    await self._backoff(r, retries)
                    continue
                except aiohttp.WSServerHandshakeError as e:
                    if e.status == 401:
                        raise StreamError("unauthorized: the service needs a token (--token), "
                                          "or this one is wrong", reason="unauthorized") from e
                    if e.status == 503:  # too many connections: as 'busy'
                        retries += 1
                        await self._backoff(_Retry(RETRY_503_S, "HTTP 503"), retries)
                        continue
                    if session is None or resumes >= self.max_resumes:
                        raise StreamError(f"cannot stream to {self.url}: HTTP {e.status}"
                                          ) from e
                except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as e:
                    if session is None or resumes >= self.max_resumes:
                        raise StreamError(f"cannot stream to {self.url}: {e}") from e
                if final is None:
                    if session is None or resumes >= self.max_resumes:
                        return None
                    resumes += 1
                    await asyncio.sleep(0.2 * resumes)
        return final

    async def _backoff(self, r: _Retry, attempt: int) -> None:
        """Wait before retry number ``attempt`` (from 1), or give up past ``max_retries``."""
        if attempt > self.max_retries:
            raise StreamError(f"{r} (gave up after {self.max_retries} retries)",
                              reason="gave_up")
        delay = min(MAX_BACKOFF_S, r.after_s * 2 ** (attempt - 1))
        log.warning("%s: retrying in %g s (%d of %d)", r, delay, attempt, self.max_retries)
        await self.sleep(delay)

    async def _expect_ready(self, ws: aiohttp.ClientWebSocketResponse,
                            on_message: Callable[[dict], None]) -> dict:
        import aiohttp

        m = await ws.receive(timeout=30.0)
        if m.type != aiohttp.WSMsgType.TEXT:
            raise aiohttp.ClientError(f"connection closed before ready ({ws.close_code})")
        data = json.loads(m.data)
        on_message(data)
        if data.get("type") == "error":
            _raise_for(data)
        return data

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, pcm: bytes, offset: int,
                    step: int, bytes_per_s: int) -> None:
        from worker.bus import PROTOCOL_VERSION

        t0 = time.monotonic() - offset / bytes_per_s
        for i in range(offset, len(pcm), step):
            if self.realtime:
                delay = t0 + i / bytes_per_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await ws.send_bytes(pcm[i:i + step])
        await ws.send_str(json.dumps({"type": "stop", "v": PROTOCOL_VERSION}))


def _step_bytes(frames: int, frame: int, ready: dict) -> int:
    """Bytes per audio message: ``frames`` whole frames of ``frame`` bytes, at most the
    server's ``ready.limits.max_message_bytes`` (when it says one)."""
    limits = ready.get("limits")
    cap = limits.get("max_message_bytes") if isinstance(limits, dict) else None
    if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0:
        if cap < frame:
            raise StreamError(f"the service takes at most {cap} bytes per message, less than "
                              f"one {frame}-byte sample frame", reason="too_large")
        frames = min(frames, cap // frame)
    return frames * frame


def _raise_for(error: dict) -> None:
    """Raise for an ``error`` message: :class:`_Retry` when it is retryable, else StreamError."""
    code = str(error.get("code"))
    why = f"{code}: {error.get('message', '')}"
    if code in RETRYABLE:
        after_s = error.get("retry_after_s")
        ok = isinstance(after_s, (int, float)) and 0 < after_s <= MAX_BACKOFF_S
        raise _Retry(float(after_s) if ok else 1.0, why)
    raise StreamError(why, reason=code)


def format_message(m: dict) -> str | None:
    """One human line for a server message (None for messages not worth a line); the first
    ``ready`` of a stream is preceded by the :data:`LEGEND` line."""
    kind = m.get("type")
    if kind == "ready":
        if m.get("resumed"):
            return f"session {m['session']} (resumed)"
        return f"{LEGEND}\nsession {m['session']}"
    if kind == "error":
        return f"error {m['code']}: {m['message']}"
    if kind != "result":
        return None
    head = f"{clock(float(m['audio_s'])):>7}  "
    d = m.get("decision")
    if d:
        head += f"= {d['title']}  ({d['confidence']:.0%}, at {clock(float(d['position_s']))})"
    elif m.get("matches"):
        best = m["matches"][0]
        head += (f"? {best['title']}  ({best['confidence']:.0%}, at "
                 f"{clock(float(best['position_s']))})")
    else:
        head += "…"
    if m.get("final"):
        err = m.get("error")
        if isinstance(err, dict):
            head += f"   [final]  error: {err.get('message', err.get('code', ''))}"
        else:
            kind = final_answer(m)
            head += "   [final]  " + (answer_line(kind, d["title"], float(d["position_s"]))
                                      if d else answer_line(kind))
    return head


def final_answer(m: dict) -> str:
    """The answer kind of a final result: its ``answer`` (the worker's, :mod:`index.answers`);
    from a service without one, identified or not in the collection by its decision."""
    a = m.get("answer")
    if isinstance(a, dict) and a.get("kind") in ANSWERS:
        return a["kind"]
    return IDENTIFIED if m.get("decision") else NOT_IN_COLLECTION


def print_message(m: dict, as_json: bool) -> None:
    """``--json``: the server's message as one line; else :func:`format_message`'s line."""
    if as_json:
        print(json.dumps(m), flush=True)
        return
    line = format_message(m)
    if line is not None:
        print(line, file=sys.stderr if m.get("type") == "error" else sys.stdout, flush=True)


def describe_stream_command(p: argparse.ArgumentParser) -> None:
    """The help of ``midimatch stream`` (registered in ``server/serve_cli.py``): what the
    output's markers mean, the silence wording, and every option's default."""
    p.formatter_class = DefaultsHelpFormatter
    p.description = (
        (p.description or "") + " One line per result: the stream time (m:ss), a marker, the "
        "piece, the confidence and the position in the piece (m:ss); --json prints the server's "
        "messages instead, times in seconds. The first line of output repeats the markers. "
        "The final line ends with the service's answer in `midimatch identify`'s words: "
        + ", ".join(f"'{w}'" for w in ANSWERS.values())
        + f" (the last 20 s under -60 dBFS: '{ANSWERS[SILENT]}').")
    p.epilog = ("markers: " + "; ".join(f"'{k}' {v}" for k, v in MARKERS.items())
                + ". Exit status 0 after the final result, 2 on an error.")
    for action in p._actions:
        if action.dest == "file" and not action.help:
            action.help = "audio file (WAV, FLAC, Ogg, MP3: anything libsndfile reads)"
        if action.dest == "chunk_s":  # nan, inf, 0 or less: a usage error, not a traceback
            action.type = chunk_seconds
            action.help = ((action.help or "seconds per message") + "; capped to the service's "
                           "max_message_bytes")
