"""Where the gateway listens: its aiohttp runner and a TCP site with connection caps.

Guards a client meets before any handler runs (the protocol's own limits are in server/ws.py):

* **Handshake timeout.** aiohttp's ``keepalive_timeout`` is armed when a connection opens and
  after each response, and closes the connection if no *complete* request arrived by then
  (partial data does not extend it); the runner sets it to ``handshake_timeout_s``, so a
  slowloris connection dribbling an HTTP request (or a websocket handshake) is closed on time.
  A running handler (a websocket) is not affected.
* **Connection caps.** :class:`GuardedTCPSite` counts open TCP connections, in all and per peer
  address, from the moment they are accepted, unfinished requests included; one over
  ``max_connections`` or ``max_connections_per_address`` gets ``503`` and is closed before
  aiohttp sees it. aiohttp has no such option: the site wraps each connection's protocol.

The access log is :class:`~server.auth.RedactingAccessLogger` (no token in it); aiohttp's error
log (``aiohttp.server``) gets :class:`~server.auth.RedactingServerLogFilter` from ``create_app``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web

from server.auth import RedactingAccessLogger
from server.settings import Settings

REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
           b"Retry-After: 5\r\nConnection: close\r\nContent-Length: 24\r\n\r\n"
           b"too many connections\r\n\r\n")


class ConnectionGuard:
    """Open TCP connections, in all and per address, against their caps."""

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total, self.max_per_address = max_total, max_per_address
        self.total = 0
        self.per_address: Counter[str] = Counter()
        self.refused = 0

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address``; False (not counted) over a cap."""
        if self.total >= self.max_total or self.per_address[address] >= self.max_per_address:
            self.refused += 1
            return False
        self.total += 1
        self.per_address[address] += 1
        return True

    def release(self, address: str) -> None:
        self.total -= 1
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]


class _GuardedProtocol(asyncio.Protocol):
    """Stands in front of aiohttp's protocol for one connection: admits it (or answers 503 and
    closes), then passes every event through, and gives its slot back when it closes."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], Any]) -> None:
        self.guard, self.factory = guard, factory
        self.inner: Any = None
        self.address = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self.guard.admit(self.address):
            transport.write(REFUSAL)  # type: ignore[attr-defined]
            transport.close()
            return
        self.inner = self.factory()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.guard.release(self.address)
            inner, self.inner = self.inner, None
            inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


class GuardedTCPSite(web.BaseSite):
    """``web.TCPSite`` whose connections pass a :class:`ConnectionGuard` first."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 guard: ConnectionGuard) -> None:
        super().__init__(runner)
        self._host, self._port, self.guard = host, port, guard
        self.bound_port: int | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.bound_port or self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _GuardedProtocol(self.guard, server),
                                                self._host, self._port)
        self.bound_port = self._server.sockets[0].getsockname()[1]


def make_runner(app: web.Application, settings: Settings) -> web.AppRunner:
    """The gateway's runner: handshake timeout, the redacting access log."""
    return web.AppRunner(app, handle_signals=False, access_log_class=RedactingAccessLogger,
                         keepalive_timeout=settings.handshake_timeout_s)


async def start_site(runner: web.AppRunner, settings: Settings) -> GuardedTCPSite:
    """Listen on ``settings.host``:``settings.port`` (0: any free port, see ``bound_port``)
    behind the connection caps; ``runner`` must be set up."""
    site = GuardedTCPSite(runner, settings.host, settings.port,
                          ConnectionGuard(settings.max_connections,
                                          settings.max_connections_per_address))
    await site.start()
    return site
