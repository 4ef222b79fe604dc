"""The worker process: moves audio and results between a :class:`~worker.bus.Bus` and an
:class:`~worker.engine.Engine`. Transport apart from compute: the engine never sees the bus.

One asyncio loop, two tasks:

* the **main loop**: claim sessions up to this worker's fair share (:func:`fair_share`: its part
  of every session waiting or held, by advertised capacity, so sessions that arrive together
  spread over the workers; new ones, and ones whose owner died); read
  each owned session's audio after the last chunk it applied and ``feed`` it (a session is
  opened at its first chunk, with ``t0_s`` = that chunk's stream time, so a takeover that
  rebuilds from the retained window keeps stream time); ``end`` it when the bus says the stream
  ended; run ``engine.tick()`` in a one-thread executor (never two at once, and the loop stays
  free meanwhile); publish the results; ``finish`` a session after its final result;
* the **lease task** (:mod:`worker.runner_leases`; it never dies of an error): every
  ``lease_ms / 3`` the heartbeat and ``renew``, on its own timer, so a long tick never lets
  leases lapse; sessions ``renew`` reports lost are dropped by the main loop
  between ticks. Publishing is fenced by the bus (only the owner's results are stored), so a
  result of a session lost meanwhile is never published either. A **watchdog** on the tick: one
  that made no progress (no round of the engine ended) for ``stall_s`` counts as hung, and the
  lease task stops renewing and advertises no capacity (``midimatch_worker_stalled``), so other
  workers take the sessions over; when the tick moves again, ``renew`` and the fence tell which
  sessions are still ours. Every fifth of ``reap_after_s`` it also reaps the consumers of
  long-dead workers.

After a takeover the new owner recomputes results for the retained audio; those at or before
the last result the client already has (``audio_s``) are not published again, so the client sees
a short gap, never a replay. A session whose final result is already published (its owner
stopped before finishing it) is finished by the new owner at once, without a second final.

A session with bad data (PCM that is not whole frames, NaN...) gets one final result carrying
``"error": {"code", "message"}``, is finished and counted in ``errors_total{kind}``; the other
sessions carry on. So does a session the worker cannot take on at all (stored parameters that do
not parse, ``bad_session``): the rest of its claim batch is adopted as usual; one whose adoption
fails (the bus, a bug) is released at once for another try.

Falling behind the retained audio: when the chunks after the last one applied were trimmed
before this worker read them (a client sending faster than real time while a tick ran long),
the session is rebuilt from what is retained, as after a takeover; its results from then on
carry ``audio_skipped_s`` (the stream time never analysed, in total), and
``errors_total{audio_gap}`` and ``audio_skipped_seconds_total`` count it.

A bus failure (Redis unreachable) is counted (``bus``) and retried with a back-off; the sessions
stay held as long as their leases do. Redis full (``redis_full``: at maxmemory it refuses writes)
is waited out the same way, but the leases are renewed and the heartbeat kept meanwhile (Redis
runs those), claiming stops while the sessions held are served, and it is logged as a warning
once a minute. Results wait on their session until published, in order, with its ``finish``
after the final: one failed publish delays that session's results to the next step and loses
nothing, and the other sessions' go out all the same.

Shutdown (:meth:`Worker.stop`, wired to SIGTERM by ``midimatch worker``): stop claiming, let the
running tick finish and publish, then ``release`` every session so another worker takes it at
once, ``retire`` (its heartbeat and its consumer in the group go), and return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from model.errors import MidimatchError
from worker.bus import AudioBatch, Bus, BusError, Claim, Workload
from worker.metrics import WorkerMetrics
from worker.owned import Owned
from worker.runner_leases import LeaseTask
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

MAX_CHUNKS_PER_READ = 512
# While Redis is full (maxmemory) every step's writes are refused: logged as a warning at most
# this often, at DEBUG between.
FULL_WARN_EVERY_S = 60.0


def fair_share(load: Workload, capacity: int) -> int:
    """Sessions a worker of ``capacity`` should hold: its part, by capacity, of every session
    waiting or held, rounded up (so the alive workers' shares cover them all), at most
    ``capacity``. All of ``capacity`` when no capacity is advertised (nothing to share with)."""
    if load.capacity <= 0:
        return capacity
    return min(capacity, math.ceil(load.sessions * capacity / load.capacity))


def error_result(code: str, message: str, audio_s: float = 0.0) -> dict:
    """The final result that ends a session on an error (the ``result`` body plus ``error``)."""
    return {"audio_s": round(audio_s, 4), "lag_s": 0.0, "final": True, "matches": [],
            "decision": None, "error": {"code": code, "message": message}}


class Worker(LeaseTask):
    """One worker: a bus, an engine, a loop (module docstring).

    Parameters
    ----------
    bus : Bus
    engine : Engine or callable
        The engine, or a zero-argument factory called once in the executor at the start of
        :meth:`run` (so loading the index and model never blocks the event loop).
    settings : WorkerSettings
        ``worker_id``, ``max_sessions``, ``lease_ms`` (renewal period) and ``poll_s`` are used.
    metrics : WorkerMetrics, optional
        Should be the engine's (a private set when omitted).
    """

    def __init__(self, bus: Bus, engine: object | Callable[[], object],
                 settings: WorkerSettings, metrics: WorkerMetrics | None = None) -> None:
        self.bus = bus
        self._engine_or_factory = engine
        self.engine = None if callable(engine) else engine
        self.settings = settings
        self.metrics = metrics or getattr(self.engine, "metrics", None) or WorkerMetrics()
        self.worker_id = settings.worker_id
        self.owned: dict[str, Owned] = {}
        self._lost: set[str] = set()
        self._claimed_at = 0.0
        self._tick_started: float | None = None  # time.monotonic() of the running tick's start
        self._reaped_at = time.monotonic()
        self._full_warned_at = -math.inf  # time.monotonic() of the last "Redis is full" warning
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()  # set once the engine is loaded and the first heartbeat sent
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    @property
    def capacity(self) -> int:
        engine_max = getattr(getattr(self.engine, "settings", None), "max_sessions", None)
        return min(self.settings.max_sessions, engine_max or self.settings.max_sessions)

    @property
    def notes(self) -> tuple[str, ...]:
        """What the operator should know about this worker's engine (an uncalibrated model)."""
        from index.calibration import uncalibrated_warning

        cal = getattr(getattr(self.engine, "cascade", None), "calibration", None)
        warning = uncalibrated_warning(cal) if cal is not None else None
        return (warning,) if warning else ()

    @property
    def calibration(self) -> dict | None:
        """The calibration this worker's engine decides with, for ``/readyz``: thresholds and
        provenance (:func:`index.calibration.describe`); None before the engine is loaded."""
        from index.calibration import describe

        cal = getattr(getattr(self.engine, "cascade", None), "calibration", None)
        return describe(cal) if cal is not None else None

    def stop(self) -> None:
        """Ask for a graceful shutdown (safe from a signal handler)."""
        self._stopping.set()

    # ------------------------------------------------------------------ main
    async def run(self) -> None:
        """Serve until :meth:`stop`; then hand every session back and return."""
        loop = asyncio.get_running_loop()
        if self.engine is None:
            self.engine = await loop.run_in_executor(self._executor, self._engine_or_factory)
            if getattr(self.engine, "metrics", None) is not None:
                self.metrics = self.engine.metrics
        await self._bus_call(self.bus.heartbeat(self.worker_id, self.capacity, self.notes,
                                                self.calibration))
        self.ready.set()
        self._start_leases()
        try:
            backoff = 0.0
            while not self._stopping.is_set():
                try:
                    busy = await self._step()
                    backoff = 0.0
                except BusError as e:
                    self.metrics.errors_total.labels("bus").inc()
                    backoff = min(2.0, max(0.1, backoff * 2))
                    logger.log(self._bus_log_level(e), "bus failed (%s); retrying in %.1f s",
                               e, backoff)
                    busy = False
                    await self._sleep(backoff)
                except Exception:  # a bug outside any one session: keep serving the others
                    self.metrics.errors_total.labels("internal").inc()
                    backoff = min(2.0, max(0.1, backoff * 2))
                    logger.exception("worker step failed; retrying in %.1f s", backoff)
                    busy = False
                    await self._sleep(backoff)
                if not busy:
                    await self._sleep(self.settings.poll_s)
        finally:
            await self._stop_leases()
            await self._hand_back()
            await self._bus_call(self.bus.retire(self.worker_id))
            self._executor.shutdown(wait=True)

    def _bus_log_level(self, e: BusError) -> int:
        """WARNING for a bus failure; but Redis refusing writes because it is full
        (``redis_full``), which comes back at every step while it lasts, only once in
        ``FULL_WARN_EVERY_S``, DEBUG between."""
        if e.reason != "redis_full":
            return logging.WARNING
        now = time.monotonic()
        if now - self._full_warned_at < FULL_WARN_EVERY_S:
            return logging.DEBUG
        self._full_warned_at = now
        return logging.WARNING

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _step(self) -> bool:
        """One pass: claim, read, tick, publish. True when there was work (loop again at once)."""
        self._apply_lost()
        now = time.monotonic()
        if (self.capacity > len(self.owned) and not self._stopping.is_set()
                and (not self.owned or now - self._claimed_at >= self.settings.claim_every_s)):
            self._claimed_at = now
            block_s = self.settings.claim_every_s if not self.owned else 0.0
            n = await self._claimable()
            try:
                claims = await self.bus.claim(self.worker_id, n, block_s=block_s)
            except BusError as e:
                if e.reason != "redis_full" or not self.owned:
                    raise
                # Redis is full: adopting a session writes, and is refused. The sessions held
                # are read, ticked and renewed all the same.
                self.metrics.errors_total.labels("bus").inc()
                logger.log(self._bus_log_level(e), "claiming failed (%s); serving the %d "
                           "sessions held", e, len(self.owned))
                claims = []
            await self._adopt_all(claims)
        fed = await self._read_all()
        results = await self._tick()
        self._apply_lost()
        self._queue(results)
        await self._publish_all()
        return fed or bool(results)

    async def _claimable(self) -> int:
        """How many sessions to claim now: up to the fair share, and at least one when idle (a
        worker with none always takes the next, so a burst starts on every idle worker)."""
        free = self.capacity - len(self.owned)
        share = fair_share(await self.bus.workload(), self.capacity)
        return min(free, max(share - len(self.owned), 0 if self.owned else 1))

    async def _adopt_all(self, claims: list[Claim]) -> None:
        """Adopt each claimed session on its own: one that fails (the bus, a bug) is released
        for another try at once, and the rest of the batch is adopted all the same."""
        failed = []
        for c in claims:
            try:
                await self._adopt(c)
            except Exception as e:  # noqa: BLE001 - counted and logged; the others go on
                failed.append(c.session_id)
                self.metrics.errors_total.labels(
                    "bus" if isinstance(e, BusError) else "internal").inc()
                logger.warning("session %s: adopting it failed (%s); releasing it",
                               c.session_id, e, exc_info=not isinstance(e, BusError))
        if failed:
            await self._bus_call(self.bus.release(self.worker_id, failed))

    async def _adopt(self, c: Claim) -> None:
        if c.error is not None:
            await self._reject(c)
            return
        if c.session_id in self.owned:  # its lease lapsed (a stall) and it came back to us
            self._lost.discard(c.session_id)
            return
        own = Owned(c.params, reclaimed=c.reclaimed)
        if c.reclaimed:
            self.metrics.sessions_reclaimed_total.inc()
            seen = await self.bus.read_results(c.session_id, "0", timeout_s=0)
            if await self._finish_if_final(c.session_id, seen):
                return
            own.resume_after_s = max((float(r.get("audio_s", 0.0)) for _, r in seen),
                                     default=-1.0)
        else:
            self.metrics.sessions_claimed_total.inc()
        self.owned[c.session_id] = own
        logger.info("claimed %s%s", c.session_id, " (taken over)" if c.reclaimed else "")

    async def _finish_if_final(self, sid: str, seen: list[tuple[str, dict]]) -> bool:
        """A session taken over whose final result is published already (its previous owner
        stopped between publishing it and finishing the session): finish it, with no second
        final. True when it was."""
        if not any(r.get("final") for _, r in seen):
            return False
        logger.info("session %s: its final result was published by its previous owner; "
                    "finishing it", sid)
        await self.bus.finish(self.worker_id, sid)
        return True

    async def _read_all(self) -> bool:
        sids = [s for s, o in self.owned.items() if not o.closing]
        batches = await asyncio.gather(*(self.bus.read_audio(s, self.owned[s].applied_seq,
                                                             MAX_CHUNKS_PER_READ)
                                          for s in sids), return_exceptions=True)
        fed = False
        for sid, batch in zip(sids, batches, strict=True):
            if isinstance(batch, BusError) and batch.reason == "unknown_session":
                self._forget(sid, "expired")  # its keys expired: nobody to answer
                continue
            if isinstance(batch, BaseException):
                raise batch
            fed |= await self._feed(sid, batch)
        return fed

    async def _reject(self, c: Claim) -> None:
        """A session this worker cannot take on: an error result to its client, and finish it
        (which acks its hand-out entry), so no worker claims it again."""
        if c.reclaimed and await self._finish_if_final(
                c.session_id, await self.bus.read_results(c.session_id, "0", timeout_s=0)):
            return  # failed already, by a worker that stopped before finishing it
        self.metrics.errors_total.labels("bad_session").inc()
        logger.warning("session %s cannot be served (%s); failing it", c.session_id, c.error)
        await self.bus.publish_result(c.session_id, error_result(c.error.reason, str(c.error)),
                                      owner=self.worker_id)
        await self.bus.finish(self.worker_id, c.session_id)

    def _skip_gap(self, sid: str, own: Owned, batch: AudioBatch) -> None:
        """When audio this session needs was trimmed before it was read, restart it from what is
        retained (as a takeover does) and count the stream time lost."""
        first = batch.chunks[0]
        if own.opened and batch.missing:
            gap_s, gone = first.t_s - own.audio_s, first.seq - batch.missing
        elif not own.opened and not own.reclaimed and first.seq > 0:
            gap_s, gone = first.t_s, 0  # trimmed before any worker took the session
        else:
            return
        gap_s = max(0.0, gap_s)
        own.skipped_s += gap_s
        self.metrics.errors_total.labels("audio_gap").inc()
        self.metrics.audio_skipped_seconds_total.inc(gap_s)
        logger.warning("session %s: %.2f s of audio (chunks %d-%d) trimmed before it was read;"
                       " going on from the retained audio", sid, gap_s, gone, first.seq - 1)
        if own.opened:
            self.engine.drop(sid)
            own.opened = False
            own.resume_after_s = max(own.resume_after_s, own.published_s)

    async def _feed(self, sid: str, batch: AudioBatch) -> bool:
        own, now = self.owned[sid], time.monotonic()
        try:
            if batch.chunks:
                self._skip_gap(sid, own, batch)
            if batch.chunks and not own.opened:
                self.engine.open(sid, own.params, t0_s=batch.chunks[0].t_s)
                own.opened = True
            for ch in batch.chunks:
                pcm = own.params.decode(ch.pcm)
                self.engine.feed(sid, pcm, received_at=now)
                own.applied_seq = ch.seq
                own.audio_s = ch.t_s + len(pcm) / own.params.sample_rate
            if batch.ended:
                if not own.opened:  # ended before any audio: an empty session
                    self.engine.open(sid, own.params, t0_s=0.0)
                    own.opened = True
                self.engine.end(sid)
                own.ended = True
        except MidimatchError as e:
            kind = "bad_audio" if e.reason in ("odd_length", "bad_audio") else "internal"
            self.metrics.errors_total.labels(kind).inc()
            logger.warning("session %s: %s; ending it", sid, e)
            await self._fail(sid, e.reason, str(e))
            return True
        except Exception as e:  # a bug with this session's data: end it, keep the others
            self.metrics.errors_total.labels("internal").inc()
            logger.exception("session %s failed; ending it", sid)
            await self._fail(sid, "internal", f"{type(e).__name__}: {e}")
            return True
        return bool(batch.chunks) or batch.ended

    async def _tick(self) -> list[tuple[str, dict]]:
        if not self.engine.sessions:
            return []
        loop = asyncio.get_running_loop()
        self._tick_started = time.monotonic()
        try:
            return await loop.run_in_executor(self._executor, self.engine.tick)
        finally:
            self._tick_started = None

    def _queue(self, results: list[tuple[str, dict]]) -> None:
        """Queue a tick's results on their sessions (publishing may fail: they wait there)."""
        for sid, result in results:
            own = self.owned.get(sid)
            if own is None or sid in self._lost:  # lost or failed meanwhile
                continue
            if not result.get("final") and result.get("audio_s", 0.0) <= own.resume_after_s:
                continue  # the client had this one from the previous owner
            if own.skipped_s:
                result = {**result, "audio_skipped_s": round(own.skipped_s, 3)}
            own.unsent.append(result)

    async def _publish_all(self) -> None:
        """Publish every session's queued results, then finish those whose final went out. Each
        session on its own: one whose publish fails keeps its results (and its finish) queued
        for the next step, and the others go on. Redis unavailable ends the pass (every call
        would wait out the same timeout) and is raised, for :meth:`run`'s back-off; nothing
        queued is lost."""
        for sid in [s for s, o in self.owned.items() if o.unsent or o.finishing]:
            try:
                await self._flush(sid)
            except BusError as e:
                if e.reason in ("redis_unavailable", "redis_full"):
                    raise
                self.metrics.errors_total.labels("bus").inc()
                logger.warning("session %s: publishing failed (%s); trying again next step",
                               sid, e)
            except Exception as e:  # a bug with this session's results: end it, keep the others
                self.metrics.errors_total.labels("internal").inc()
                logger.exception("session %s: publishing failed; ending it", sid)
                await self._fail(sid, "internal", f"{type(e).__name__}: {e}")

    async def _flush(self, sid: str) -> None:
        own = self.owned.get(sid)
        if own is None:  # lost meanwhile
            return
        while own.unsent:
            result = own.unsent[0]
            if await self.bus.publish_result(sid, result, owner=self.worker_id) is None:
                self._lost.add(sid)  # fenced: another worker owns it now
                self._apply_lost()
                return
            own.unsent.pop(0)
            own.published_s = float(result.get("audio_s", own.published_s))
            if result.get("final"):
                own.finishing, own.unsent = True, []
        if own.finishing:
            await self.bus.finish(self.worker_id, sid)
            self.owned.pop(sid, None)

    async def _fail(self, sid: str, code: str, message: str) -> None:
        """End a session on an error: out of the engine, an error final to its client, finish
        it (queued like any result, so a bus failure retries it at the next step)."""
        if self.engine is not None:
            self.engine.drop(sid)
        own = self.owned.get(sid)
        if own is None:
            return
        own.ended, own.finishing = True, False
        own.unsent = [error_result(code, message, own.audio_s)]
        await self._flush(sid)

    def _forget(self, sid: str, why: str) -> None:
        if self.owned.pop(sid, None) is not None:
            logger.info("dropping %s (%s)", sid, why)
        if self.engine is not None:
            self.engine.drop(sid)

    def _apply_lost(self) -> None:
        lost, self._lost = self._lost, set()
        for sid in lost:
            self.metrics.errors_total.labels("lease_lost").inc()
            self._forget(sid, "lease lost")

    async def _hand_back(self) -> None:
        held = list(self.owned)
        for sid in held:
            self._forget(sid, "shutting down")
        if held:
            await self._bus_call(self.bus.release(self.worker_id, held))
            logger.info("handed back %d sessions", len(held))

    async def _bus_call(self, coro) -> None:
        try:
            await coro
        except BusError as e:
            self.metrics.errors_total.labels("bus").inc()
            logger.warning("bus failed: %s", e)


def __getattr__(name: str) -> object:
    # Building an engine and the embedded worker live in worker/startup.py (one job per module);
    # importing them from here keeps working, lazily, because startup imports this module.
    if name in ("build_engine", "resolve_device", "run_embedded"):
        from worker import startup

        return getattr(startup, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
