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
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web

from server.auth import RedactingAccessLogger
from server.settings import Settings

log = logging.getLogger(__name__)

# A closed connection whose client is still sending: how long, and how many of its bytes, the
# socket keeps reading (and throwing away) before it is closed (see the module doc).
LINGER_S = 2.0
LINGER_BYTES = 4 << 20

REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
           b"Retry-After: 5\r\nConnection: close\r\nContent-Length: 24\r\n\r\n"
           b"too many connections\r\n\r\n")


class ConnectionGuard:
    """Open TCP connections, in all and per address, against their caps (a lingering one, see
    :class:`_Linger`, is still open); how a closed connection lingers."""

    def __init__(self, max_total: int, max_per_address: int, *, linger_s: float = LINGER_S,
                 linger_bytes: int = LINGER_BYTES) -> None:
        self.max_total, self.max_per_address = max_total, max_per_address
        self.linger_s, self.linger_bytes = linger_s, linger_bytes
        self.total = 0
        self.per_address: Counter[str] = Counter()
        self.refused = 0
        self.lingering: set[_Linger] = set()
        self.lingered = 0  # connections that lingered, in all
        self.stopping = False  # the site stops: close at once, and end every linger

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


class _Linger:
    """The lingering close of one connection (module doc): a duplicate of its socket, taken as
    the transport closes its own, keeps the connection open; sends a FIN after everything
    written so far, reads and discards until the client's FIN (or a reset), ``linger_s`` or
    ``linger_bytes``, then closes, and gives the connection's slot back."""

    def __init__(self, guard: ConnectionGuard, address: str, sock: socket.socket) -> None:
        self.guard, self.address, self.sock = guard, address, sock
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.discarded = 0
        self.ended = False
        self.timer: asyncio.TimerHandle | None = None
        guard.lingering.add(self)
        guard.lingered += 1
        try:
            sock.setblocking(False)
            sock.shutdown(socket.SHUT_WR)  # after what is already in the socket's send queue
            self.loop.add_reader(sock.fileno(), self._readable)
            self.timer = self.loop.call_later(guard.linger_s, self.end)
        except Exception as e:  # the client is already gone (OSError): close now
            log.debug("no lingering close for %s: %s", address, e)
            self.end()

    def _readable(self) -> None:
        try:
            while self.discarded <= self.guard.linger_bytes:
                data = self.sock.recv(1 << 16)
                if not data:  # the client closed its side: done
                    break
                self.discarded += len(data)
            # past linger_bytes: the client does not stop; closing now resets it
        except BlockingIOError:
            return
        except OSError:  # reset by the client
            pass
        self.end()

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.timer is not None:
            self.timer.cancel()
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.guard.lingering.discard(self)
        self.guard.release(self.address)


class _GuardedProtocol(asyncio.Protocol):
    """Stands in front of aiohttp's protocol for one connection: admits it (or answers 503 and
    closes), then passes every event through, and gives its slot back when it closes; when the
    gateway closed it before the client had finished, after a :class:`_Linger`."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], Any]) -> None:
        self.guard, self.factory = guard, factory
        self.inner: Any = None
        self.address = "?"
        self.transport: asyncio.BaseTransport | None = None
        self.client_done = False  # the client closed its side (it sends nothing more)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self.guard.admit(self.address):
            transport.write(REFUSAL)  # type: ignore[attr-defined]
            transport.close()
            return
        self.transport = transport
        self.inner = self.factory()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is None:
            return
        inner, self.inner = self.inner, None
        # The transport calls this before it closes its socket: a duplicate taken now keeps the
        # connection open (exc set: the connection failed or was reset, nothing to wait for).
        dup = None
        if exc is None and not self.client_done and not self.guard.stopping:
            dup = self._dup_socket()
        try:
            inner.connection_lost(exc)
        finally:
            if dup is None:
                self.guard.release(self.address)
            else:
                _Linger(self.guard, self.address, dup)

    def _dup_socket(self) -> socket.socket | None:
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None or sock.fileno() < 0:
            return None
        try:
            return sock.dup()
        except OSError as e:  # out of file descriptors: close at once, as before
            log.debug("no lingering close for %s: %s", self.address, e)
            return None

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        self.client_done = True
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

    async def stop(self) -> None:
        """Stop listening; connections closed from now on do not linger, and lingering ones
        are closed now."""
        self.guard.stopping = True
        for linger in list(self.guard.lingering):
            linger.end()
        await super().stop()


def make_runner(app: web.Application, settings: Settings) -> web.AppRunner:
    """The gateway's runner: handshake timeout, the redacting access log."""
    return web.AppRunner(app, handle_signals=False, access_log_class=RedactingAccessLogger,
                         keepalive_timeout=settings.handshake_timeout_s)


async def start_site(runner: web.AppRunner, settings: Settings) -> GuardedTCPSite:
    """Listen on ``settings.host``:``settings.port`` (0: any free port, see ``bound_port``)
    behind the connection caps; ``runner`` must be set up."""
    # Lingering reads up to a message at the transport's cap and as much again: the client
    # that sent it reads the answers once it has written it all.
    linger_bytes = max(LINGER_BYTES, 2 * settings.transport_max_message_bytes)
    guard = ConnectionGuard(settings.max_connections, settings.max_connections_per_address,
                            linger_bytes=linger_bytes)
    site = GuardedTCPSite(runner, settings.host, settings.port, guard)
    await site.start()
    return site
