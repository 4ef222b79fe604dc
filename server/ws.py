"""Protocol v1 at ``/v1/stream``: one websocket per stream (docs/protocol.md is the reference).

The handler validates everything a client sends (text messages by
:func:`server.protocol.parse_message`), turns PCM messages into numbered bus chunks
(:mod:`server.audio_in`), and forwards the worker's results. It never computes anything: the
worker does, behind the bus.
Every error is answered with an ``error`` message and a close code, and touches only its own
connection: the client's mistakes as ``bad_request``/``too_large``/``timeout``, an unreachable
or full bus as ``unavailable`` (retryable), anything else as ``internal`` with a reference to the
log.
The token was checked before the upgrade (``server.app.token_middleware``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter

from aiohttp import ClientConnectionResetError, WebSocketError, WSCloseCode, WSMsgType, web
from redis.exceptions import ResponseError

from server.audio_in import MAX_HOLD_S, MIN_CHUNK_S, AudioIn, Replaced, session_gone
from server.auth import authorized, unauthorized_response
from server.capacity import CapacityCache
from server.metrics import GatewayMetrics
from server.protocol import (
    CLOSE_CODES,
    MAX_TEXT_BYTES,
    ProtocolError,
    Start,
    Stop,
    parse_message,
)
from server.sessions import SessionState, SessionTable, bus_position
from server.settings import Settings
from worker.bus import PROTOCOL_VERSION, Bus, BusError, StreamParams

log = logging.getLogger(__name__)

# MAX_HOLD_S, MIN_CHUNK_S: server.audio_in's, importable from here as before it existed
__all__ = ["CLOSE_CODES", "MAX_HOLD_S", "MIN_CHUNK_S", "ProtocolError", "StreamHandler"]

CLOSE_NORMAL = 1000  # the final result was sent
CLOSE_REPLACED = 4409  # the session was resumed on another connection
CLOSE_GOING_AWAY = 1001  # the gateway is shutting down
# Audio keeps a session open only if enough of it comes: at least this share of the idle timeout
# (1.5 s of audio per 30 s), so a client trickling a sample at a time is closed as idle.
MIN_AUDIO_SHARE = 0.05
# BusError reasons that mean "the bus cannot serve now" (Redis down, the gateway closing its
# bus; Redis full: at maxmemory it refuses writes until memory is freed), not a fault of this
# request: answered ``unavailable``, and the session stays resumable.
UNAVAILABLE_REASONS = frozenset({"redis_unavailable", "closed", "redis_full"})
# Why a worker fails a session (its final result's ``error.code``) or the bus refuses its stored
# parameters, when the cause is the client's: its audio, or stream parameters a gateway before
# the strict checks stored (channels "1.0"). Answered ``bad_request`` with that reason, not
# ``internal``; any other code is the service's fault.
CLIENT_REASONS = frozenset({"bad_audio", "bad_params", "bad_sample_rate", "bad_channels",
                            "bad_encoding"})


def service_error(e: Exception, session_id: str | None) -> ProtocolError:
    """The error a client gets for a failure of the service (not of its input): ``unavailable``
    (retryable, nothing about the infrastructure in its words) when the bus cannot be reached,
    else ``internal`` with a reference that finds the traceback in the log. Logs either (an
    unavailable bus as one warning line, no traceback)."""
    if isinstance(e, BusError) and e.reason == "redis_full":
        log.warning("the bus is full (session %s): %s", session_id, e)
        return ProtocolError("unavailable", "the service is temporarily out of room; retry "
                             "(resume the session) shortly", reason="bus_full")
    if isinstance(e, (ConnectionError, OSError, asyncio.TimeoutError)) or (
            isinstance(e, BusError) and e.reason in UNAVAILABLE_REASONS
            and not isinstance(e.__cause__, ResponseError)):  # Redis refused a command: a bug
        closing = isinstance(e, BusError) and e.reason == "closed"  # this gateway stops
        log.log(logging.INFO if closing else logging.WARNING, "the bus is unavailable "
                "(session %s): %s: %s", session_id, type(e).__name__, e)
        return ProtocolError("unavailable", "the service is temporarily unavailable; retry "
                             "(resume the session) shortly", reason="bus_unavailable")
    ref = uuid.uuid4().hex[:8]
    log.error("internal error %s on session %s", ref, session_id, exc_info=e)
    return ProtocolError("internal", f"internal error (logged as {ref})")


class StreamHandler:
    """The ``/v1/stream`` route: one instance per app, one :meth:`handle` call per connection."""

    def __init__(self, settings: Settings, bus: Bus, metrics: GatewayMetrics,
                 table: SessionTable, capacity: CapacityCache | None = None) -> None:
        self.settings = settings
        self.bus = bus
        # the busy check of a new session (uncached when none is given)
        self.capacity = capacity or CapacityCache(bus.capacity, ttl_s=0.0)
        self.metrics = metrics
        self.table = table
        self.per_address: Counter[str] = Counter()
        self.connections: set[web.WebSocketResponse] = set()
        self.pumps: set[asyncio.Task] = set()  # result pumps still running (strong refs)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        s = self.settings
        if not authorized(s, request):  # token_middleware answered already; kept as a guard
            return unauthorized_response()
        # Above the protocol limit but bounded: messages up to this cap get a clear error from
        # us; past it aiohttp itself closes with 1009 (the same close code), and the connection
        # lingers (server/listen.py) so the client, still sending, reads that close.
        ws = web.WebSocketResponse(max_msg_size=s.transport_max_message_bytes, heartbeat=20.0)
        await ws.prepare(request)
        conn = _Connection(self, ws, request.remote or "?")
        self.connections.add(ws)
        self.metrics.connections_active.inc()
        try:
            await conn.run()
        finally:
            self.connections.discard(ws)
            self.metrics.connections_active.dec()
        return ws

    async def close_all(self) -> None:
        for ws in list(self.connections):
            with contextlib.suppress(Exception):
                await ws.close(code=CLOSE_GOING_AWAY, message=b"server shutting down")


class _Connection:
    """State of one websocket: at most one session, the result pump, the send lock, and its
    audio on the way in (``audio``: :class:`server.audio_in.AudioIn`)."""

    def __init__(self, h: StreamHandler, ws: web.WebSocketResponse, address: str) -> None:
        self.h, self.ws, self.address = h, ws, address
        self.state: SessionState | None = None
        self.stopped = False
        self.send_lock = asyncio.Lock()
        self.pump: asyncio.Task | None = None
        self.closing = False
        self.audio = AudioIn(h.settings, h.bus, h.metrics, ws)
        self.ended_by_error = False  # the session ended on an error: nothing to resume
        self.deadline = 0.0  # loop time by which audio must arrive (set by _receive_loop)
        self.audio_since_touch_s = 0.0  # audio received since the deadline last moved on
        self.replaced = False  # the session was resumed through another gateway: not ours

    # The audio state as it was named here before server.audio_in (tests look at it).
    arrivals = property(lambda self: self.audio.arrivals)
    held = property(lambda self: self.audio.held)

    async def run(self) -> None:
        h = self.h
        counted = False
        try:
            if h.per_address[self.address] >= h.settings.max_sessions_per_address:
                raise ProtocolError("busy", f"too many connections from {self.address} (limit "
                                    f"{h.settings.max_sessions_per_address})",
                                    reason="too_many_sessions")
            h.per_address[self.address] += 1
            counted = True
            await self._receive_loop()
        except Replaced as e:
            log.info("closing a stale connection: %s", e)
            self.replaced = True
            with contextlib.suppress(Exception):
                async with self.send_lock:
                    await self.ws.close(code=CLOSE_REPLACED, message=b"session resumed elsewhere")
        except ProtocolError as e:
            await self._fail(e)
        except Exception as e:  # never let one connection's failure take down others
            if not self._client_gone(e, "handler"):
                await self._fail(service_error(e, self._sid()))
        finally:
            if counted:
                h.per_address[self.address] -= 1
                if h.per_address[self.address] <= 0:
                    del h.per_address[self.address]
            await self._cleanup()

    def _sid(self) -> str | None:
        return self.state.session_id if self.state else None

    def _client_gone(self, e: Exception, where: str) -> bool:
        """``e`` is this websocket failing because the client went away (aiohttp's
        ``ClientConnectionResetError`` is only ever this connection's: the bus is not aiohttp;
        or a connection error once the websocket is closed or closing): nothing to tell anyone,
        and not the bus being unavailable. Logged at DEBUG."""
        gone = isinstance(e, ClientConnectionResetError) or (
            isinstance(e, (ConnectionError, OSError)) and (self.ws.closed or self.closing))
        if gone:
            log.debug("session %s: the client went away (%s): %s: %s", self._sid(), where,
                      type(e).__name__, e)
        return gone

    # ------------------------------------------------------------------ receiving
    async def _receive_loop(self) -> None:
        """Messages until the client goes. Idle means no *audio*: the deadline moves on at the
        start, at the stop and whenever ``MIN_AUDIO_SHARE`` of the idle timeout's worth of audio
        has arrived since it last moved, never for pings, pongs or anything else, so a client
        that only answers the heartbeat, or trickles a sample at a time, is closed on time."""
        s = self.h.settings
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + s.idle_timeout_s
        while True:
            try:
                # One timeout over the whole receive: aiohttp's own restarts at every ping/pong.
                async with asyncio.timeout_at(min(self.deadline, self.audio.flush_at)):
                    msg = await self.ws.receive()
            except TimeoutError:
                if self.audio.due(loop.time()):
                    await self.audio.flush(self.state)  # held audio waited long enough: to the bus
                    continue
                if self.state is not None and self.state.done:
                    return
                got = (f"{self.audio_since_touch_s:.3g} s of audio" if self.audio_since_touch_s
                       else "no audio")
                raise ProtocolError("timeout", f"{got} received in {s.idle_timeout_s:g} s (at "
                                    f"least {MIN_AUDIO_SHARE * s.idle_timeout_s:.3g} s keeps a "
                                    "session open)") from None
            if msg.type == WSMsgType.TEXT:
                await self._on_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await self._on_binary(msg.data)
            elif msg.type == WSMsgType.ERROR and isinstance(msg.data, WebSocketError) \
                    and msg.data.code == WSCloseCode.MESSAGE_TOO_BIG:
                # Past the transport's cap aiohttp has already closed with 1009 (no room for an
                # error message; ws.close_code then says how the close went, 1006 if the client
                # did not answer it): still the client's too_large, which ends the session.
                raise ProtocolError("too_large", "a message over twice the limit of "
                                    f"{s.max_message_bytes} bytes", reason="message_too_large")
            else:  # CLOSE, CLOSING, CLOSED, ERROR: the client went away
                await self.audio.flush(self.state)  # what it sent is the session's, for a resume
                return
            if self.audio.due(loop.time()):
                await self.audio.flush(self.state)

    def _touch(self, audio_s: float | None = None) -> None:
        """A start or a stop (``audio_s`` None), or ``audio_s`` of audio, arrived: the idle
        deadline starts again, for audio once enough of it has come since it last did."""
        if audio_s is not None:
            self.audio_since_touch_s += audio_s
            if self.audio_since_touch_s < MIN_AUDIO_SHARE * self.h.settings.idle_timeout_s:
                return
        self.audio_since_touch_s = 0.0
        self.deadline = asyncio.get_running_loop().time() + self.h.settings.idle_timeout_s

    async def _on_text(self, text: str) -> None:
        msg = parse_message(text)
        if isinstance(msg, Start):
            await self._on_start(msg)
            self._touch()
        elif isinstance(msg, Stop):
            if self.state is None:
                raise ProtocolError("bad_request", "stop before start", reason="stop_before_start")
            if self.stopped:  # a repeated stop changes nothing: above all not the idle wait
                return
            await self.audio.stop(self.state)  # after all of its audio
            self.stopped = True
            self._touch()
            await asyncio.shield(self.h.table.end(self.state))

    async def _on_binary(self, pcm: bytes) -> None:
        st = self.state
        if st is None:
            raise ProtocolError("bad_request", "audio before start: send a 'start' message first",
                                reason="binary_before_start")
        if self.stopped or st.ended:
            raise ProtocolError("bad_request", "audio after stop", reason="audio_after_stop")
        self.audio.check(st, pcm)
        if not pcm:
            return
        arrived = time.monotonic()
        self._touch(st.params.seconds(len(pcm)))
        await self.audio.add(st, pcm, arrived)

    async def _on_start(self, msg: Start) -> None:
        h = self.h
        if self.state is not None:
            raise ProtocolError("bad_request", "this connection already started a session",
                                reason="already_started")
        params, resume = msg.params, msg.session
        if resume is None:
            cap = await h.capacity.get()
            if cap.saturated:
                raise ProtocolError("busy", f"all workers are busy ({cap.sessions_active} "
                                    f"sessions, {cap.workers} workers); try again later",
                                    reason="saturated")
            sid = await asyncio.shield(h.bus.create_session(params))
            h.capacity.count_started()
            state = SessionState(sid, params)
            h.metrics.sessions_started_total.inc()
        else:
            state = await self._resume(resume, params, msg.after)
            h.metrics.sessions_resumed_total.inc()
        old = state.conn
        h.table.attach(state, self.ws)
        self.state = state
        if old is not None and old is not self.ws:
            with contextlib.suppress(Exception):
                await old.close(code=CLOSE_REPLACED, message=b"session resumed elsewhere")
        await self._send({"type": "ready", "v": PROTOCOL_VERSION, "session": state.session_id,
                          "resumed": resume is not None, "audio_s": round(state.audio_s, 3),
                          "audio_bytes": state.audio_bytes,
                          "after": state.last_result,
                          "limits": {"max_message_bytes": h.settings.max_message_bytes,
                                     "max_text_bytes": MAX_TEXT_BYTES,
                                     "max_session_s": h.settings.max_session_s,
                                     "idle_timeout_s": h.settings.idle_timeout_s}})
        self.pump = asyncio.create_task(self._pump_results())
        h.pumps.add(self.pump)
        self.pump.add_done_callback(h.pumps.discard)

    async def _resume(self, sid: str, params: StreamParams, after: str | None
                      ) -> SessionState:
        """The session ``sid`` to reattach (``sid`` and ``after`` were validated by
        :func:`~server.protocol.parse_message`)."""
        h = self.h
        state = h.table.get(sid)
        if state is not None and not state.ended:
            # The bus is the truth: a Redis restart may have lost the session, or the last audio
            # this gateway pushed (persistence that lags); then the client sends again from the
            # bus's position (ready.audio_bytes).
            try:
                seq, end_bytes = await bus_position(h.bus, sid, state.params)
            except BusError as e:
                if e.reason != "unknown_session":
                    raise
                h.table.forget(sid)
                state = None
            else:
                # Behind (a Redis restart lost audio) or ahead (another gateway served it since:
                # A -> B -> A): either way the bus's position. end_bytes is 0 when its audio is
                # gone (the stream finished): then ours stands.
                if seq != state.next_seq or end_bytes:
                    state.next_seq, state.audio_bytes = seq, end_bytes
        if state is None:  # served by another gateway, or before a restart: ask the bus
            try:
                known = await h.bus.session_params(sid)
            except BusError as e:
                if e.reason not in CLIENT_REASONS:
                    raise
                raise ProtocolError("bad_request", f"session {sid!r} has stream parameters "
                                    f"this service cannot use ({e}); start a new session",
                                    reason="bad_params") from None
            if known is None:
                raise ProtocolError("bad_request", f"unknown or expired session {sid!r}",
                                    reason="unknown_session")
            state = SessionState(sid, known)
            state.next_seq, state.audio_bytes = await bus_position(h.bus, sid, known)
        if state.params != params:
            raise ProtocolError("bad_request", f"resumed session has {state.params.to_dict()}, "
                                f"this start says {params.to_dict()}", reason="params_mismatch")
        if after is not None:
            state.last_result = after
        return state

    # ------------------------------------------------------------------ sending
    async def _send(self, obj: dict) -> None:
        async with self.send_lock:
            await self.ws.send_str(json.dumps(obj, separators=(",", ":")))

    async def _pump_results(self) -> None:
        h, st = self.h, self.state
        assert st is not None
        try:
            while not self.ws.closed and not self.closing:
                got = await h.bus.read_results(st.session_id, after=st.last_result,
                                               timeout_s=h.settings.result_poll_s)
                for rid, result in got:
                    if st.conn is not self.ws or self.closing or self.ws.closed:
                        return  # not delivered: a resume gets it
                    await self._send({"type": "result", "v": PROTOCOL_VERSION,
                                      "session": st.session_id, "result_id": rid, **result})
                    st.last_result = rid
                    h.metrics.results_total.inc()
                    lag = self.audio.result_sent(result)
                    if lag is not None:
                        h.metrics.result_lag_seconds.observe(lag)
                    if result.get("decision") and not st.decided:
                        st.decided = True
                        h.metrics.decision_audio_seconds.observe(float(result.get("audio_s", 0)))
                    if result.get("final"):
                        st.done = True
                        if isinstance(result.get("error"), dict):  # the worker gave up on it
                            err = result["error"]
                            code = ("bad_request" if err.get("code") in CLIENT_REASONS
                                    else "internal")
                            await self._fail(ProtocolError(code, str(err.get("message", "")),
                                                           reason=str(err.get("code", code))))
                            return
                        async with self.send_lock:
                            await self.ws.close(code=CLOSE_NORMAL, message=b"final")
                        return
        except asyncio.CancelledError:
            raise
        except BusError as e:
            if e.reason == "unknown_session":  # as for audio (AudioIn): not a bug of ours
                log.info("session %s vanished from the bus: %s", st.session_id, e)
                await self._fail(session_gone())
            elif not self._client_gone(e, "results"):
                await self._fail(service_error(e, st.session_id))
        except Exception as e:
            if not self._client_gone(e, "results"):
                await self._fail(service_error(e, st.session_id))

    async def _fail(self, e: ProtocolError) -> None:
        self.h.metrics.errors_total.labels(e.code).inc()
        if self.state is not None and e.code not in ("internal", "unavailable"):
            # The client broke the protocol (or timed out): its stream is over, and the session
            # is released when the connection goes (not kept for a resume). After a failure of
            # the service it stays resumable.
            self.ended_by_error = True
            with contextlib.suppress(Exception):
                await self.h.table.end(self.state)
        if self.ws.closed:
            return
        with contextlib.suppress(Exception):
            await self._send(e.to_message())
            async with self.send_lock:
                await self.ws.close(code=CLOSE_CODES[e.code], message=e.code.encode())

    async def _cleanup(self) -> None:
        # Bookkeeping first and without awaiting: aiohttp cancels the handler task when the
        # client's TCP connection goes, and this must still run. The pump is not cancelled
        # (a task cancelled while waiting on InProcessBus's asyncio.Condition can leave its
        # lock with a waiter nobody wakes, on CPython 3.11): it sees ``closing`` and ends
        # within ``result_poll_s``.
        self.closing = True
        if self.state is not None:
            if (self.ended_by_error or self.replaced) and self.state.conn is self.ws:
                self.h.table.forget(self.state.session_id)
            else:
                self.h.table.detach(self.state, self.ws)
        if not self.ws.closed:
            with contextlib.suppress(Exception):
                await self.ws.close()
