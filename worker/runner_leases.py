"""The worker's lease task (:class:`~worker.runner.Worker`'s, as a mixin): every ``lease_ms / 3``
the heartbeat, ``renew`` of every held session, and now and then ``reap``; and the tick's
watchdog (module docstring of :mod:`worker.runner`).

The task never dies of an error: a bus failure is counted (``errors_total{bus}``), anything else
is logged with its traceback and counted (``internal``), and the next round goes on. Should it
end all the same (cancelled from outside, a ``BaseException``), it is logged, counted
(``internal``) and started again at once, so leases are never left to lapse unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from worker.bus import BusError

logger = logging.getLogger("worker.runner")


class LeaseTask:
    """Mixin of :class:`~worker.runner.Worker`: its lease task and the tick's watchdog. Uses the
    worker's ``bus``, ``settings``, ``metrics``, ``worker_id``, ``owned``, ``_lost``,
    ``capacity``, ``notes``, ``calibration``, ``engine``, ``_tick_started`` and
    ``_bus_log_level``."""

    _leases: asyncio.Task | None = None
    _was_stalled = False

    @property
    def stalled(self) -> bool:
        """A tick has made no progress for over ``stall_s`` (the engine looks hung): no round
        ended (``engine.progress_at``, when the engine says) since it started or the last."""
        started = self._tick_started
        if started is None:
            return False
        progress = max(started, getattr(self.engine, "progress_at", started))
        return time.monotonic() - progress > self.settings.stall_s

    def _start_leases(self) -> None:
        self._leases = asyncio.create_task(self._lease_loop(), name=f"leases-{self.worker_id}")
        self._leases.add_done_callback(self._leases_ended)

    async def _stop_leases(self) -> None:
        task, self._leases = self._leases, None  # so its end is not taken for a failure
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _leases_ended(self, task: asyncio.Task) -> None:
        if task is not self._leases:  # stopped on purpose
            return
        error = None if task.cancelled() else task.exception()
        self.metrics.errors_total.labels("internal").inc()
        logger.error("the lease task ended unexpectedly (%s); starting it again",
                     "cancelled" if error is None else repr(error), exc_info=error)
        self._start_leases()

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.renew_s)
            try:
                await self._lease_round()
            except BusError as e:
                self.metrics.errors_total.labels("bus").inc()
                logger.warning("lease renewal failed: %s", e)
            except Exception:  # a bug: say so, and keep the leases going
                self.metrics.errors_total.labels("internal").inc()
                logger.exception("lease round failed")

    async def _lease_round(self) -> None:
        stalled = self.stalled
        if stalled != self._was_stalled:
            self._watchdog(stalled)
            self._was_stalled = stalled
        try:
            await self.bus.heartbeat(self.worker_id, 0 if stalled else self.capacity,
                                     self.notes, self.calibration)
        except BusError as e:
            if e.reason != "redis_full":
                raise
            # Redis is full: it refused the heartbeat (the bus extended the last one instead)
            # but runs the renewal, so the leases are kept.
            self.metrics.errors_total.labels("bus").inc()
            logger.log(self._bus_log_level(e), "heartbeat refused, the last one kept: %s", e)
        held = list(self.owned)
        if held and not stalled:
            self._lost.update(await self.bus.renew(self.worker_id, held))
        if time.monotonic() - self._reaped_at > self.settings.reap_after_s / 5:
            self._reaped_at = time.monotonic()
            if n := await self.bus.reap(self.settings.reap_after_s):
                logger.info("reaped %d consumers of dead workers", n)

    def _watchdog(self, stalled: bool) -> None:
        """The tick passed ``stall_s`` (leases are left to lapse), or it returned."""
        self.metrics.stalled.set(int(stalled))
        if stalled:
            self.metrics.errors_total.labels("stalled").inc()
            logger.error("a tick has made no progress for %.0f s: the engine looks hung; no "
                         "longer renewing the leases of %d sessions, so other workers take them "
                         "over",
                         self.settings.stall_s, len(self.owned))
        else:
            logger.warning("the hung tick returned; renewing leases again")
