"""``midimatch worker``: one streaming worker process against Redis.

Settings come from ``MIDIMATCH_*`` environment variables (:mod:`worker.settings`); the flags
here override them. SIGTERM (and Ctrl-C) stop it gracefully: it stops claiming, finishes the
running tick, hands its sessions back so another worker takes them at once, and exits 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from model.errors import MidimatchError


class MetricsPortError(MidimatchError):
    """The worker cannot serve ``/metrics`` on its port (taken, privileged, not a port here)."""

    reason = "cannot_listen"


def cannot_serve_metrics(port: int, e: OSError | OverflowError) -> str:
    """One line saying why ``/metrics`` cannot listen on ``port``, and what to do about it."""
    from model.errors import why_cannot_bind

    kind, why = why_cannot_bind(e)
    hint = "is another midimatch worker running? Give" if kind == "in_use" else "give"
    return (f"cannot serve /metrics on port {port}: {why}; {hint} another --metrics-port "
            "(0 for none)")


def serve_metrics(port: int, registry: Any) -> None:
    """Serve ``registry`` on ``http://0.0.0.0:port/metrics`` from a daemon thread.

    Raises
    ------
    MetricsPortError
        The port cannot be bound (in use, privileged...).
    """
    from prometheus_client import start_http_server

    try:
        start_http_server(port, registry=registry)
    except (OSError, OverflowError) as e:
        raise MetricsPortError(cannot_serve_metrics(port, e)) from e


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a streaming worker against Redis",
                       description="Claim live sessions from Redis, identify their audio and "
                       "publish results. Every flag can also be set by its MIDIMATCH_* "
                       "environment variable (e.g. MIDIMATCH_REDIS_URL).")
    p.add_argument("--index", type=Path, help="index folder (MIDIMATCH_INDEX)")
    p.add_argument("--redis", dest="redis_url", metavar="URL",
                   help="redis://host:port/db (MIDIMATCH_REDIS_URL)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="compute device (MIDIMATCH_DEVICE, default auto)")
    p.add_argument("--weights", type=Path, help="model weights (default: the shipped model)")
    p.add_argument("--metrics-port", type=int, metavar="N",
                   help="Prometheus /metrics port, 0 for none (MIDIMATCH_METRICS_PORT, "
                   "default 9101)")
    p.add_argument("--max-sessions", type=int, metavar="N",
                   help="sessions held at once (MIDIMATCH_MAX_SESSIONS, default 64)")
    p.add_argument("--worker-id", help="consumer name, unique per process "
                   "(MIDIMATCH_WORKER_ID, default host-pid-random)")
    p.add_argument("--lease-ms", type=int, metavar="MS",
                   help="lease of a session, ms (MIDIMATCH_LEASE_MS, default 5000)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from worker.metrics import WorkerMetrics
    from worker.settings import WorkerSettings, WorkerSettingsError, url_for_log

    settings = WorkerSettings.from_env(
        index=args.index, redis_url=args.redis_url, device=args.device, weights=args.weights,
        metrics_port=args.metrics_port, max_sessions=args.max_sessions,
        worker_id=args.worker_id, lease_ms=args.lease_ms)
    if settings.index is None:
        raise WorkerSettingsError("no index: give --index DIR or set MIDIMATCH_INDEX")
    if settings.redis_url is None:
        raise WorkerSettingsError("no Redis: give --redis URL or set MIDIMATCH_REDIS_URL "
                                  "(without Redis, `midimatch serve` runs a worker itself)")
    log = logging.getLogger("worker")  # INFO lines show with `midimatch -v worker`
    metrics = WorkerMetrics()
    if settings.metrics_port:  # first: a port it cannot have stops it before anything loads
        serve_metrics(settings.metrics_port, metrics.registry)

    from worker.redis_bus import RedisBus
    from worker.runner import Worker
    from worker.startup import build_engine

    async def main() -> None:
        bus = RedisBus.from_settings(settings.bus)  # the gateways build theirs the same way
        worker = Worker(bus, lambda: build_engine(settings, metrics), settings, metrics)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        log.info("worker %s: index %s, redis %s, up to %d sessions, metrics on :%s",
                 settings.worker_id, settings.index, url_for_log(settings.redis_url),
                 settings.max_sessions,
                 settings.metrics_port or "-")
        try:
            await worker.run()
        finally:
            await bus.close()
        log.info("worker %s stopped", settings.worker_id)

    asyncio.run(main())
    return 0
