"""Starting a worker: its engine from settings (:func:`build_engine`, used by ``midimatch
worker``), and one worker inside the gateway's process (:func:`run_embedded`, ``midimatch serve``
without Redis). The worker loop itself is :mod:`worker.runner`.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from worker.bus import Bus
from worker.metrics import WorkerMetrics
from worker.runner import Worker
from worker.settings import WorkerSettings


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
