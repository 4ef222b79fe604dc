"""One connection's audio on its way in: binary messages checked, merged and pushed to the bus.

:class:`AudioIn` is owned by ``server.ws._Connection``, which handles the protocol around it
(start, stop, the idle deadline, results) and hands it every binary message of a started session.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import numpy as np

from server.metrics import GatewayMetrics
from server.protocol import ProtocolError
from server.sessions import SessionState
from server.settings import Settings
from worker.bus import AudioChunk, Bus, BusError

__all__ = ["MAX_ARRIVALS", "MAX_HOLD_S", "MIN_CHUNK_S", "AudioIn", "Replaced", "session_gone"]

# Audio messages shorter than this are merged, in order, into one bus chunk (and one entry of
# ``arrivals``) until this much audio has come, so a client sending a frame at a time costs the
# gateway and the bus per 40 ms of audio, not per message. The page's 4096-frame blocks (43 ms
# even at 96 kHz) and the usual 0.1-0.5 s messages go through as they are.
MIN_CHUNK_S = 0.04
# Merged audio waits at most this long (wall time) for more before it goes to the bus anyway: a
# client sending slower than real time, or pausing, still has all its audio analysed.
MAX_HOLD_S = 0.1
# Entries of ``arrivals`` (each at least MIN_CHUNK_S of audio but the last): 164 s of audio
# ahead of the results, far more than the worker retains (20 s); about 0.6 MB at most.
MAX_ARRIVALS = 4096


def session_gone() -> ProtocolError:
    """The session vanished from the bus under a live connection: it expired, or the bus lost
    it (Redis restarted without persistence, or was flushed). The same answer a resume of it
    gets (docs/protocol.md): there is nothing left to resume, start a new session."""
    return ProtocolError("bad_request", "the session expired or the service lost it (its bus "
                         "restarted); start a new session", reason="unknown_session")


class Replaced(Exception):
    """The bus already holds the audio ``seq`` this connection was about to push: the session
    was resumed on another connection, through another gateway, since this one read its
    position. This connection is stale and closes with ``CLOSE_REPLACED``."""

    def __init__(self, session_id: str, seq: int) -> None:
        super().__init__(f"session {session_id} was resumed elsewhere (its audio seq {seq} is "
                         "stored already)")


class AudioIn:
    """The audio one websocket (``conn``) brings to its session, from message to bus chunk.

    What it keeps, and why:

    - ``held``: short messages (under ``MIN_CHUNK_S`` of audio each) not yet on the bus, merged
      in order into one chunk once ``MIN_CHUNK_S`` of audio has come, so a client sending a
      frame per message costs the gateway and the bus per 40 ms of audio, not per message.
      ``held_since`` is when the first of them arrived (time.monotonic()); ``flush_at`` the loop
      time by which they go to the bus anyway (``MAX_HOLD_S``: a slow or pausing client still
      has all its audio analysed). A longer message first pushes what is held, then itself.
    - ``arrivals``: for the result lag metric, (stream time at the start and at the end of some
      audio, when its first message arrived: time.monotonic()) of the audio pushed that no
      result covers yet, at least ``MIN_CHUNK_S`` of audio per entry but the last. Bounded
      (``MAX_ARRIVALS``): past the cap the oldest go, and results they completed are not
      observed. ``stop_at`` is when the stop arrived, ``sent_at`` when the last result went out.

    Held audio is pushed only while the session is still served by ``conn``: once it has been
    resumed on another connection of this gateway, that connection's ``ready.audio_bytes`` left
    the held audio out and the client sends it again, so :meth:`flush` discards it (pushing it
    would put it on the bus twice). A resume through another gateway shows when the bus already
    holds the chunk's ``seq``: :class:`Replaced`.
    """

    def __init__(self, settings: Settings, bus: Bus, metrics: GatewayMetrics,
                 conn: object) -> None:
        self.settings, self.bus, self.metrics, self.conn = settings, bus, metrics, conn
        self.arrivals: deque[tuple[float, float, float]] = deque(maxlen=MAX_ARRIVALS)
        self.held = bytearray()
        self.held_since = 0.0
        self.flush_at = float("inf")
        self.stop_at: float | None = None
        self.sent_at = 0.0

    def check(self, st: SessionState, pcm: bytes) -> None:
        """Raise :class:`ProtocolError` unless ``pcm`` is a binary message the started, not yet
        stopped session ``st`` can take: its size, whole frames, finite samples, and the
        session's length with it (held audio included)."""
        s = self.settings
        if len(pcm) > s.max_message_bytes:
            raise ProtocolError("too_large", f"audio message of {len(pcm)} bytes; the limit is "
                                f"{s.max_message_bytes}", reason="message_too_large")
        if len(pcm) % st.params.bytes_per_frame:
            raise ProtocolError("bad_request", f"{len(pcm)} bytes is not a whole number of "
                                f"{st.params.bytes_per_frame}-byte sample frames "
                                f"({st.params.encoding}, {st.params.channels} ch)",
                                reason="odd_length")
        if st.params.seconds(st.audio_bytes + len(self.held) + len(pcm)) > s.max_session_s:
            raise ProtocolError("too_large", f"session longer than {s.max_session_s:g} s of audio",
                                reason="session_too_long")
        if st.params.encoding == "pcm_f32le" and not np.isfinite(np.frombuffer(pcm, "<f4")).all():
            raise ProtocolError("bad_request", "the audio contains NaN or infinite samples "
                                "(pcm_f32le must be finite, -1..1)", reason="bad_audio")

    async def add(self, st: SessionState, pcm: bytes, arrived: float) -> None:
        """Take ``pcm`` (checked by :meth:`check`, not empty; arrived at ``arrived``,
        time.monotonic()): counted, then pushed as a chunk of its own if it holds at least
        ``MIN_CHUNK_S`` of audio, else held (and pushed once enough is held)."""
        audio_s = st.params.seconds(len(pcm))
        self.metrics.audio_bytes_total.inc(len(pcm))
        self.metrics.audio_seconds_total.inc(audio_s)
        if audio_s >= MIN_CHUNK_S:  # long enough to be a chunk of its own
            await self.flush(st)  # after the short ones before it, in order
            await self._push(st, bytes(pcm), arrived)
            return
        if not self.held:
            self.held_since = arrived
            self.flush_at = asyncio.get_running_loop().time() + MAX_HOLD_S
        self.held += pcm
        if st.params.seconds(len(self.held)) >= MIN_CHUNK_S:
            await self.flush(st)

    def due(self, now: float) -> bool:
        """Held audio has waited ``MAX_HOLD_S`` by loop time ``now``: :meth:`flush` it."""
        return bool(self.held) and now >= self.flush_at

    async def flush(self, st: SessionState | None) -> None:
        """Push the held short messages as one chunk (nothing when none are held, or when the
        session has ended: then there is no stream left to take them; or has moved to another
        connection)."""
        if not self.held or st is None or st.ended:
            return
        if st.conn is not self.conn:  # resumed on another connection of this gateway, whose
            self.held.clear()  # ready.audio_bytes left this out: the client sends it again
            self.flush_at = float("inf")
            return
        pcm = bytes(self.held)
        self.held.clear()
        self.flush_at = float("inf")
        await self._push(st, pcm, self.held_since)

    async def stop(self, st: SessionState) -> None:
        """The stop arrived: what is held goes to the bus first (the stream ends after all of
        its audio), then the stop's arrival is noted for the final result's lag."""
        await self.flush(st)
        self.stop_at = time.monotonic()

    async def _push(self, st: SessionState, pcm: bytes, arrived: float) -> None:
        """Append ``pcm`` (validated, whole frames; its first message arrived at ``arrived``,
        time.monotonic()) to the session's audio on the bus as its next chunk."""
        begin_s = st.audio_s
        chunk = AudioChunk(st.next_seq, begin_s, pcm)
        try:
            # Shielded: aiohttp cancels the handler when the client's TCP goes, and a bus call
            # cut in the middle must not leave the bus half-updated (or its lock held).
            fresh = await asyncio.shield(self.bus.push_audio(st.session_id, chunk))
        except BusError as e:
            if e.reason == "ended":
                raise ProtocolError("bad_request", "audio after the stream ended (stop, or its "
                                    "resume grace period ran out)", reason="audio_after_stop"
                                    ) from e
            if e.reason == "unknown_session":
                raise session_gone() from e
            if e.reason == "bad_seq":  # the bus lost audio it had taken (Redis restarted)
                raise ProtocolError("unavailable", "the service lost the last audio it received "
                                    "(its bus restarted): resume the session and send again from "
                                    "ready.audio_bytes", reason="audio_lost") from e
            raise
        if not fresh:
            # The bus holds this seq already: since this connection read the session's position
            # (start or resume), another connection resumed it through another gateway (which
            # cannot close this one) and sent audio. This audio is not taken: close as replaced.
            raise Replaced(st.session_id, st.next_seq)
        st.next_seq += 1
        st.audio_bytes += len(pcm)
        self._arrived(begin_s, st.audio_s, arrived)

    def _arrived(self, begin_s: float, end_s: float, arrived: float) -> None:
        """Remember for the lag metric that the audio from ``begin_s`` to ``end_s`` (stream time,
        s) arrived at ``arrived``: merged into the last entry while that one holds less than
        MIN_CHUNK_S of audio (the entry keeps its first arrival), so the entries are bounded by
        audio time, not by how many messages brought it."""
        a = self.arrivals
        if a and a[-1][1] - a[-1][0] < MIN_CHUNK_S and a[-1][1] >= begin_s - 1e-9:
            a[-1] = (a[-1][0], end_s, a[-1][2])
        else:
            a.append((begin_s, end_s, arrived))

    def result_sent(self, result: dict) -> float | None:
        """``result`` has just been sent: its :meth:`service_lag`, and now is when the last
        result went out."""
        lag = self.service_lag(result)
        self.sent_at = time.monotonic()
        return lag

    def service_lag(self, result: dict) -> float | None:
        """Seconds from when ``result`` could be made to now, when it has just been sent: from
        the arrival of the audio message that completed it (for the final result: the
        ``stop``), or from when the previous result went out if that was later (a stream sent
        faster than real time waits for its own earlier results: its backlog, not the
        service's delay). None when this connection did not receive that audio (a result
        replayed after a resume) or the result reports an error. See :mod:`server.metrics`."""
        if result.get("error"):
            return None
        now = time.monotonic()
        if result.get("final"):
            return None if self.stop_at is None else max(0.0, now - max(self.stop_at,
                                                                        self.sent_at))
        try:
            audio_s = float(result.get("audio_s", 0.0))
        except (TypeError, ValueError):
            return None
        arrivals = self.arrivals
        while arrivals and arrivals[0][1] < audio_s - 1e-3:  # results' audio_s is rounded
            arrivals.popleft()  # results come in stream order: older messages are covered
        if not arrivals or arrivals[0][0] >= audio_s - 1e-3:
            return None  # completed by audio this connection did not receive (or forgot)
        return max(0.0, now - max(arrivals[0][2], self.sent_at))
