"""The worker process: moves audio and results between a :class:`~worker.bus.Bus` and an
:class:`~worker.engine.Engine`. Transport apart from compute: the engine never sees the bus.

One asyncio loop, two tasks:

* the **main loop**: claim sessions up to capacity (new ones, and ones whose owner died); read
  each owned session's audio after the last chunk it applied and ``feed`` it (a session is
  opened at its first chunk, with ``t0_s`` = that chunk's stream time, so a takeover that
  rebuilds from the retained window keeps stream time); ``end`` it when the bus says the stream
  ended; run ``engine.tick()`` in a one-thread executor (never two at once, and the loop stays
  free meanwhile); publish the results; ``finish`` a session after its final result;
* the **lease task**: every ``lease_ms / 3`` the heartbeat and ``renew``, on its own timer, so a
  long tick never lets leases lapse; sessions ``renew`` reports lost are dropped by the main loop
  between ticks, and no result of theirs is published after that.

After a takeover the new owner recomputes results for the retained audio; those at or before
the last result the client already has (``audio_s``) are not published again, so the client sees
a short gap, never a replay.

A session with bad data (PCM that is not whole frames, NaN...) gets one final result carrying
``"error": {"code", "message"}``, is finished and counted in ``errors_total{kind}``; the other
sessions carry on. A bus failure (Redis unreachable) is counted (``bus``) and retried with a
back-off; the sessions stay held as long as their leases do.

Shutdown (:meth:`Worker.stop`, wired to SIGTERM by ``midimatch worker``): stop claiming, let the
running tick finish and publish, then ``release`` every session so another worker takes it at
once, and return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from model.errors import MidimatchError
from worker.bus import AudioBatch, Bus, BusError, Claim, StreamParams
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

MAX_CHUNKS_PER_READ = 512


@dataclass
class _Owned:
    """What the runner knows of one session it holds."""

    params: StreamParams
    applied_seq: int = -1  # last chunk fed to the engine
    opened: bool = False
    ended: bool = False  # engine.end() called
    resume_after_s: float = -1.0  # results up to this audio_s were published by a previous owner
    audio_s: float = 0.0  # stream time after the last chunk read


def error_result(code: str, message: str, audio_s: float = 0.0) -> dict:
    """The final result that ends a session on an error (the ``result`` body plus ``error``)."""
    return {"audio_s": round(audio_s, 4), "lag_s": 0.0, "final": True, "matches": [],
            "decision": None, "error": {"code": code, "message": message}}


class Worker:
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
        self.owned: dict[str, _Owned] = {}
        self._lost: set[str] = set()
        self._claimed_at = 0.0
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
        leases = asyncio.create_task(self._lease_loop(), name=f"leases-{self.worker_id}")
        try:
            backoff = 0.0
            while not self._stopping.is_set():
                try:
                    busy = await self._step()
                    backoff = 0.0
                except BusError as e:
                    self.metrics.errors_total.labels("bus").inc()
                    backoff = min(2.0, max(0.1, backoff * 2))
                    logger.warning("bus failed (%s); retrying in %.1f s", e, backoff)
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
            leases.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leases
            await self._hand_back()
            self._executor.shutdown(wait=True)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _step(self) -> bool:
        """One pass: claim, read, tick, publish. True when there was work (loop again at once)."""
        self._apply_lost()
        free = self.capacity - len(self.owned)
        now = time.monotonic()
        if free > 0 and not self._stopping.is_set() and (
                not self.owned or now - self._claimed_at >= self.settings.claim_every_s):
            self._claimed_at = now
            block_s = self.settings.claim_every_s if not self.owned else 0.0
            for c in await self.bus.claim(self.worker_id, free, block_s=block_s):
                await self._adopt(c)
        fed = await self._read_all()
        results = await self._tick()
        self._apply_lost()
        for sid, result in results:
            await self._publish(sid, result)
        return fed or bool(results)

    async def _adopt(self, c: Claim) -> None:
        if c.session_id in self.owned:  # its lease lapsed (a stall) and it came back to us
            self._lost.discard(c.session_id)
            return
        own = _Owned(c.params)
        if c.reclaimed:
            self.metrics.sessions_reclaimed_total.inc()
            seen = await self.bus.read_results(c.session_id, "0", timeout_s=0)
            own.resume_after_s = max((float(r.get("audio_s", 0.0)) for _, r in seen
                                      if not r.get("final")), default=-1.0)
        else:
            self.metrics.sessions_claimed_total.inc()
        self.owned[c.session_id] = own
        logger.info("claimed %s%s", c.session_id, " (taken over)" if c.reclaimed else "")

    async def _read_all(self) -> bool:
        sids = [s for s, o in self.owned.items() if not o.ended]
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

    async def _feed(self, sid: str, batch: AudioBatch) -> bool:
        own, now = self.owned[sid], time.monotonic()
        try:
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
        return await loop.run_in_executor(self._executor, self.engine.tick)

    async def _publish(self, sid: str, result: dict) -> None:
        own = self.owned.get(sid)
        if own is None or sid in self._lost:  # lost or failed meanwhile
            return
        if not result.get("final") and result.get("audio_s", 0.0) <= own.resume_after_s:
            return  # the client had this one from the previous owner
        await self.bus.publish_result(sid, result)
        if result.get("final"):
            await self.bus.finish(self.worker_id, sid)
            self.owned.pop(sid, None)

    async def _fail(self, sid: str, code: str, message: str) -> None:
        own = self.owned.pop(sid, None)
        if self.engine is not None:
            self.engine.drop(sid)
        await self.bus.publish_result(sid, error_result(code, message,
                                                        own.audio_s if own else 0.0))
        await self.bus.finish(self.worker_id, sid)

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

    # ------------------------------------------------------------------ leases
    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.renew_s)
            try:
                await self.bus.heartbeat(self.worker_id, self.capacity, self.notes,
                                         self.calibration)
                held = list(self.owned)
                if held:
                    self._lost.update(await self.bus.renew(self.worker_id, held))
            except BusError as e:
                self.metrics.errors_total.labels("bus").inc()
                logger.warning("lease renewal failed: %s", e)

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


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; others unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_engine(settings: WorkerSettings, metrics: WorkerMetrics):
    """Load the index and model named by ``settings`` and make the engine (blocking: seconds).

    Raises
    ------
    WorkerSettingsError
        No index given. Loading errors (``IndexError_``, ``ModelMismatchError``...) pass through.
    """
    from index.search import Cascade
    from worker.engine import Engine
    from worker.engine_settings import EngineSettings
    from worker.settings import WorkerSettingsError

    if settings.index is None:
        raise WorkerSettingsError("no index: give --index DIR or MIDIMATCH_INDEX")
    cascade = Cascade.open(settings.index, settings.weights,
                           device=resolve_device(settings.device))
    engine_settings = EngineSettings(window_s=settings.window_s,
                                     result_every_s=settings.result_every_s,
                                     max_sessions=settings.max_sessions,
                                     tick_budget_s=settings.tick_budget_s,
                                     prune_parts=settings.prune_parts,
                                     max_pending_s=max(30.0, settings.retain_s))
    return Engine(cascade, engine_settings, metrics)


async def run_embedded(bus: Bus, index_dir: str | Path, *,
                       settings: WorkerSettings | None = None,
                       metrics: WorkerMetrics | None = None,
                       ready: asyncio.Event | None = None) -> None:
    """Run one worker in this process against ``bus`` (an InProcessBus) until cancelled or
    stopped; the gateway's ``midimatch serve`` without Redis runs it as a task.

    Parameters
    ----------
    bus : Bus
    index_dir : str or Path
    settings : WorkerSettings, optional
        Default: ``WorkerSettings(worker_id="embedded", metrics_port=0)``; ``index`` is set to
        ``index_dir``. No metrics server is started here (the gateway serves ``/metrics``).
    metrics : WorkerMetrics, optional
        Register them in the gateway's registry to expose them there.
    ready : asyncio.Event, optional
        Set once the engine is loaded and the worker has announced itself on the bus.
    """
    settings = (settings or WorkerSettings(worker_id="embedded", metrics_port=0)).with_(
        index=Path(index_dir))
    metrics = metrics or WorkerMetrics()
    worker = Worker(bus, lambda: build_engine(settings, metrics), settings, metrics)
    task = asyncio.create_task(worker.run(), name="embedded-worker")
    if ready is not None:
        waiter = asyncio.create_task(worker.ready.wait())
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            ready.set()
        else:
            waiter.cancel()
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        worker.stop()  # hand sessions back, then let the cancellation through
        with contextlib.suppress(Exception):
            await task
        raise
