"""Sessions this gateway serves: what survives a dropped connection, and the resume grace timer.

A session outlives its websocket. When a connection drops without ``stop``, the session is
*detached*: its stream stays open on the bus for ``resume_grace_s``; a ``start`` with its id
reattaches it (same gateway: from this table; another gateway or after a restart: rebuilt from
the bus). When the grace period runs out the stream is ended, so the worker publishes its final
result and forgets it.

Several gateways may hold the same session detached: the client went from gateway A to B (and
perhaps back). Each attach is recorded on the bus (``Bus.attach``, an atomic counter per
session), and a grace timer ends the stream only if its gateway's attach is still the latest
(``Bus.end_detached``, checked and done in one step): a client resumed elsewhere, silent for a
while (a pause, a resume only to collect results), keeps its session.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from worker.bus import AudioChunk, Bus, BusError, StreamParams

log = logging.getLogger(__name__)


@dataclass
class SessionState:
    """One session as the gateway sees it.

    Attributes
    ----------
    next_seq : int
        ``seq`` of the next audio chunk to push (numbering continues across resumes).
    audio_bytes : int
        PCM received so far, bytes (``params.seconds(audio_bytes)`` is the stream time).
    last_result : str
        Id of the last result delivered to a client, ``"0"`` before the first.
    ended : bool
        ``end_session`` was called (stop, error, timeout or grace expiry): no more audio.
    done : bool
        The final result was delivered; nothing left to resume.
    conn : Any
        The websocket serving it now, ``None`` while detached.
    attach : int | None
        The bus's attach generation of this gateway's last attach (``Bus.attach``); None until
        recorded, or when recording it failed.
    """

    session_id: str
    params: StreamParams
    next_seq: int = 0
    audio_bytes: int = 0
    last_result: str = "0"
    ended: bool = False
    done: bool = False
    decided: bool = False
    conn: Any = None
    attach: int | None = None
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)
    attaching: asyncio.Task | None = field(default=None, repr=False)  # recording ``attach``

    @property
    def audio_s(self) -> float:
        return self.params.seconds(self.audio_bytes)


async def bus_position(bus: Bus, session_id: str, params: StreamParams) -> tuple[int, int]:
    """``(next_seq, audio_bytes)`` of a session as the bus holds it, for a session this gateway
    did not serve (resume through another gateway, or after a gateway restart).

    Uses ``bus.last_seq(session_id)`` when the transport has it (then reads only the last
    chunk), else reads the retained audio once (bounded by the transport's retention).
    """
    last_seq, end_bytes = -1, 0
    fast = getattr(bus, "last_seq", None)
    if fast is not None:
        last_seq = int(await fast(session_id))
        if last_seq < 0:
            return 0, 0
        batch = await bus.read_audio(session_id, after_seq=last_seq - 1, max_chunks=1)
        if batch.chunks and batch.chunks[-1].seq == last_seq:
            return last_seq + 1, _end_bytes(batch.chunks[-1], params)
        return last_seq + 1, 0  # its audio is gone (finished): no more will be accepted anyway
    while True:
        batch = await bus.read_audio(session_id, after_seq=last_seq, max_chunks=1024)
        if not batch.chunks:
            break
        last_seq = batch.chunks[-1].seq
        end_bytes = _end_bytes(batch.chunks[-1], params)
    return last_seq + 1, end_bytes


def _end_bytes(chunk: AudioChunk, params: StreamParams) -> int:
    """Bytes of stream received up to the end of ``chunk``."""
    return round(chunk.t_s * params.sample_rate) * params.bytes_per_frame + len(chunk.pcm)


class SessionTable:
    """The sessions of this gateway process, keyed by id.

    Parameters
    ----------
    bus : Bus
        Where streams are ended when their grace period runs out.
    grace_s : float
        How long a detached session stays resumable, s (0: ended at once).
    on_detached : callable, optional
        Called with the number of detached sessions whenever it changes (a metrics gauge).
    """

    def __init__(self, bus: Bus, grace_s: float, on_detached: Any = None) -> None:
        self.bus = bus
        self.grace_s = grace_s
        self._on_detached = on_detached or (lambda n: None)
        self._sessions: dict[str, SessionState] = {}
        self._tasks: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> SessionState | None:
        return self._sessions.get(session_id)

    def add(self, state: SessionState) -> None:
        self._sessions[state.session_id] = state

    def attach(self, state: SessionState, conn: Any) -> None:
        """Make ``conn`` the connection of ``state`` (stops its grace timer) and record the
        attach on the bus (in the background; a grace expiry waits for it)."""
        if state.expiry is not None:
            state.expiry.cancel()
            state.expiry = None
        state.conn = conn
        state.attach = None
        self._sessions[state.session_id] = state
        state.attaching = self._spawn(self._record_attach(state))
        self._report()

    async def _record_attach(self, state: SessionState) -> None:
        me = asyncio.current_task()
        try:
            gen = await self.bus.attach(state.session_id)
        except Exception as e:  # noqa: BLE001 - then the expiry falls back on the audio check
            log.info("could not record the attach of session %s: %s", state.session_id, e)
            return
        if state.attaching is me:  # not overtaken by a later attach on this gateway
            state.attach = gen

    def detach(self, state: SessionState, conn: Any) -> None:
        """``conn`` is gone. Keep ``state`` resumable for the grace period, then end it."""
        if state.conn is not conn:  # another connection took the session over
            return
        state.conn = None
        if state.done:
            self.forget(state.session_id)
            return
        if self.grace_s <= 0:
            self._spawn(self._expire(state))
            return
        loop = asyncio.get_running_loop()
        state.expiry = loop.call_later(self.grace_s, lambda: self._spawn(self._expire(state)))
        self._report()

    def forget(self, session_id: str) -> None:
        state = self._sessions.pop(session_id, None)
        if state is not None and state.expiry is not None:
            state.expiry.cancel()
        self._report()

    async def end(self, state: SessionState) -> None:
        """End the session's stream on the bus (idempotent). When the bus fails (Redis down or
        full) the session is not marked ended, so a resume can send its stop again."""
        if not state.ended:
            state.ended = True
            try:
                await self.bus.end_session(state.session_id)
            except BaseException:
                state.ended = False
                raise

    async def _expire(self, state: SessionState) -> None:
        if self._sessions.get(state.session_id) is not state or state.conn is not None:
            return
        state.expiry = None
        self.forget(state.session_id)
        try:
            if state.attaching is not None and not state.attaching.done():
                await asyncio.shield(state.attaching)  # grace 0: the attach is still on its way
            if state.ended:
                return
            # Another gateway may have resumed it since: then it is not ours to end. A gateway
            # of an older version records no attach, but the audio it pushed shows.
            seq, _ = await bus_position(self.bus, state.session_id, state.params)
            if seq > state.next_seq:
                return
            if state.attach is None:  # the attach was not recorded (the bus failed then)
                await self.end(state)
            elif await self.bus.end_detached(state.session_id, state.attach):
                state.ended = True
            else:
                log.info("session %s was resumed elsewhere: its grace period here ends without"
                         " ending it", state.session_id)
        except BusError as e:  # already expired on the bus, or the bus is down: its own
            log.info("could not end expired session %s: %s", state.session_id, e)  # expiry
        except Exception:  # cleans up either way
            log.exception("could not end expired session %s", state.session_id)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _report(self) -> None:
        self._on_detached(sum(1 for s in self._sessions.values() if s.conn is None))

    async def close(self) -> None:
        """Stop every timer (process shutdown); detached streams are left to the bus."""
        for s in self._sessions.values():
            if s.expiry is not None:
                s.expiry.cancel()
        for t in list(self._tasks):
            t.cancel()
        self._sessions.clear()
