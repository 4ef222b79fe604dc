"""The aiohttp application: ``/v1/stream``, ``/v1/demo``, ``/metrics``, ``/healthz``, ``/readyz``
and the web page at ``/``.

With a token set, every route but ``/healthz``, ``/readyz`` (which shows its detail only with
the token), ``/favicon.ico`` and ``/static/`` answers 401 without it, the websocket before its
upgrade (:func:`token_middleware`, server/auth.py).

:func:`create_app` wires a :class:`~worker.bus.Bus` (in-process or Redis) to the protocol
handler. The workers' capacity (for ``/readyz`` and a ``start``'s ``busy`` check) is computed at
most once per ``capacity_cache_s`` per gateway (:class:`CapacityCache`): with Redis it costs a
command per active session, and ``/readyz`` is open without the token.

It imports neither torch nor numba (tests/server/test_light.py checks it in a fresh
interpreter): the embedded worker is started by ``server.serve_cli``, which hands in a readiness
predicate and the worker's metric registry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from urllib.parse import quote

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from server.auth import authorized, install_log_redaction, unauthorized_response
from server.capacity import CapacityCache
from server.demo import DemoCollection, DemoError
from server.metrics import GatewayMetrics
from server.sessions import SessionTable
from server.settings import Settings
from server.ws import StreamHandler
from worker.bus import Bus, Capacity

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")

SETTINGS_KEY = web.AppKey("settings", Settings)
BUS_KEY = web.AppKey("bus", Bus)
METRICS_KEY = web.AppKey("metrics", GatewayMetrics)
HANDLER_KEY = web.AppKey("stream_handler", StreamHandler)
TABLE_KEY = web.AppKey("sessions", SessionTable)
# Open without the token: liveness, readiness (its status only), the page's static files.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
_PAGE_401 = ("<!doctype html><html><head><meta charset=utf-8><title>midimatch: token needed"
             "</title></head><body><p>This midimatch service needs a token: open "
             "<code>/?token=&lt;token&gt;</code>.</p></body></html>")


def token_middleware(settings: Settings, metrics: GatewayMetrics) -> Callable:
    """401 for a request without the token on every route but the open ones; nothing at all
    when no token is set. Runs before any handler, so the websocket is refused before its
    upgrade."""

    @web.middleware
    async def check(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if (settings.auth_token is None or request.path in OPEN_PATHS
                or request.path.startswith(OPEN_PREFIXES) or authorized(settings, request)):
            return await handler(request)
        metrics.errors_total.labels("unauthorized").inc()
        if request.path == "/":
            return web.Response(text=_PAGE_401, status=401, content_type="text/html",
                                headers={"WWW-Authenticate": 'Bearer realm="midimatch"'})
        return unauthorized_response()

    return check


def create_app(settings: Settings, bus: Bus, *, local_ready: Callable[[], bool] | None = None,
               registries: Iterable[CollectorRegistry] = (),
               demo: DemoCollection | None = None, close_bus: bool = True) -> web.Application:
    """The gateway application.

    Parameters
    ----------
    settings : Settings
        Limits, auth token, grace period...
    bus : Bus
        The transport to the workers (``InProcessBus`` with an embedded worker, or ``RedisBus``).
    local_ready : callable, optional
        Extra readiness condition (the embedded worker: index and model loaded).
    registries : iterable of CollectorRegistry
        More metrics to expose on ``/metrics`` (the embedded worker's).
    demo : DemoCollection, optional
        Pieces for the page's "play a demo" button; ``/v1/demo`` answers 404 without one.
    close_bus : bool
        Close the bus when the app shuts down.
    """
    install_log_redaction()  # aiohttp logs a malformed request line, ?token= and all
    metrics = GatewayMetrics()
    app = web.Application(client_max_size=1 << 16,
                          middlewares=[token_middleware(settings, metrics)])
    table = SessionTable(bus, settings.resume_grace_s, metrics.sessions_detached.set)
    capacity = CapacityCache(lambda: bus.capacity(), settings.capacity_cache_s)
    handler = StreamHandler(settings, bus, metrics, table, capacity)
    app[SETTINGS_KEY], app[BUS_KEY], app[METRICS_KEY] = settings, bus, metrics
    app[HANDLER_KEY], app[TABLE_KEY] = handler, table
    all_registries = [metrics.registry, *registries]

    async def readyz(request: web.Request) -> web.Response:
        ok, why, cap = await _readiness(bus, capacity, local_ready)
        if not authorized(settings, request):  # a probe: the status, nothing about the service
            return web.json_response({"ready": ok}, status=200 if ok else 503)
        return web.json_response({"ready": ok, "detail": why,
                                  "warnings": list(cap.notes) if cap else [],
                                  "calibrations": list(cap.calibrations) if cap else []},
                                 status=200 if ok else 503)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def metrics_view(request: web.Request) -> web.Response:
        body = b"".join(generate_latest(r) for r in all_registries)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def demo_view(request: web.Request) -> web.Response:
        if demo is None or not len(demo):
            return web.json_response({"error": "no demo collection: start the server with "
                                      "--index"}, status=404)
        try:
            excerpt = await demo.random_excerpt(settings.demo_seconds)
        except DemoError as e:
            log.warning("demo render failed: %s", e)
            return web.json_response({"error": str(e)}, status=503)
        metrics.demo_renders_total.inc()
        return web.Response(body=excerpt.wav, content_type="audio/wav", headers={
            "X-Demo-Id": str(excerpt.ref_id), "X-Demo-Title": _header_safe(excerpt.title),
            "X-Demo-Start-S": f"{excerpt.start_s:.3f}", "X-Demo-Renderer": excerpt.renderer,
            "Cache-Control": "no-store"})

    async def piece_view(request: web.Request) -> web.Response:
        piece = demo.by_id.get(request.match_info["id"]) if demo is not None else None
        if piece is None:
            return web.json_response({"error": "unknown piece"}, status=404)
        return web.json_response({"id": piece.id, "title": piece.title,
                                  "duration_s": round(piece.duration_s, 3)})

    async def index_view(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def favicon_view(request: web.Request) -> web.Response:
        # browsers ask for /favicon.ico whatever the page links: the page's SVG icon
        return web.Response(body=(STATIC / "favicon.svg").read_bytes(),
                            content_type="image/svg+xml",
                            headers={"Cache-Control": "max-age=86400"})

    async def on_shutdown(app: web.Application) -> None:
        await handler.close_all()
        await table.close()

    async def on_cleanup(app: web.Application) -> None:
        if close_bus:
            await bus.close()

    app.router.add_get("/", index_view)
    app.router.add_get("/favicon.ico", favicon_view)
    app.router.add_get("/v1/stream", handler.handle)
    app.router.add_get("/v1/demo", demo_view)
    app.router.add_get("/v1/pieces/{id}", piece_view)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_static("/static/", STATIC, append_version=False)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


async def _readiness(bus: Bus, capacity: CapacityCache, local_ready: Callable[[], bool] | None
                     ) -> tuple[bool, str, Capacity | None]:
    """Ready when the bus answers, a worker is alive, and the local condition (if any) holds;
    with the alive workers' capacity: their warnings (an uncalibrated model), which do not make
    it unready, and the calibrations they decide with (thresholds and provenance)."""
    if local_ready is not None and not local_ready():
        return False, "the embedded worker is still loading its index and model", None
    try:
        ping = getattr(bus, "ping", None)
        if ping is not None and not await asyncio.wait_for(ping(), 2.0):
            return False, "redis does not answer", None
        cap = await asyncio.wait_for(capacity.get(), 2.0)
    except Exception as e:  # readiness must answer, whatever failed
        return False, f"the bus failed: {type(e).__name__}: {e}", None
    if cap.workers == 0:
        return False, "no worker is alive", cap
    detail = f"{cap.workers} workers, {cap.sessions_active}/{cap.sessions_max} sessions"
    if cap.notes:
        detail += "; WARNING: " + "; ".join(cap.notes)
    return True, detail, cap


def _header_safe(text: str) -> str:
    """HTTP header values are latin-1: percent-encode the title (the page decodes it)."""
    return quote(text, safe=" ,.;:()[]'!-_")
