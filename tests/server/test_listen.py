"""Where the gateway listens (server/listen.py), over real TCP: unfinished HTTP requests are
closed on time, connections are capped in all and per address (unfinished ones counted), and
a websocket is not cut by the handshake timeout."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.app import create_app
from server.listen import make_runner, start_site
from server.settings import Settings
from tests.redis_server import free_port
from tests.server.conftest import FakeWorker, drain, receive_json, send_audio, start_msg
from worker.bus import InProcessBus

pytestmark = pytest.mark.asyncio


class Gateway:
    def __init__(self, **kw) -> None:
        self.bus = InProcessBus()
        self.settings = Settings(port=free_port(), **kw)

    async def __aenter__(self) -> Gateway:
        self.runner = make_runner(create_app(self.settings, self.bus, close_bus=False),
                                  self.settings)
        await self.runner.setup()
        self.site = await start_site(self.runner, self.settings)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    async def raw(self, source: str = "127.0.0.1", data: bytes = b""
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw TCP connection from ``source`` (Linux answers all of 127/8 on lo)."""
        r, w = await asyncio.open_connection("127.0.0.1", self.settings.port,
                                             local_addr=(source, 0))
        if data:
            w.write(data)
            await w.drain()
        return r, w


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before closing; fails if it has not closed within ``seconds``."""
    return await asyncio.wait_for(reader.read(), seconds)


async def test_an_unfinished_request_is_closed_on_time():
    """Slowloris: a request whose headers never end, one header line every 0.1 s; and a
    connection that sends nothing at all. Both were open at 60 s (aiohttp's default waits an
    hour)."""
    async with Gateway(handshake_timeout_s=0.5) as g:
        loop = asyncio.get_running_loop()
        silent, _ = await g.raw()
        r, w = await g.raw(data=b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n")
        t0 = loop.time()

        async def dribble() -> None:
            for i in range(100):
                w.write(b"X-Slow-%d: 1\r\n" % i)
                await asyncio.sleep(0.1)

        task = asyncio.create_task(dribble())
        try:
            assert await closed_within(r, 3.0) == b""
            assert await closed_within(silent, 3.0) == b""
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert loop.time() - t0 < 3.0
        r, w = await g.raw(data=b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # served
        assert (await r.readline()).startswith(b"HTTP/1.1 200")
        w.close()


async def test_connections_are_capped_per_address_and_in_all():
    async with Gateway(max_connections=4, max_connections_per_address=2,
                       handshake_timeout_s=30.0) as g:
        guard = g.site.guard
        a1 = await g.raw("127.0.0.2", b"GET / HTTP/1.1\r\n")  # unfinished: counted all the same
        a2 = await g.raw("127.0.0.2")
        refused, _ = await g.raw("127.0.0.2", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await closed_within(refused, 2.0)).startswith(b"HTTP/1.1 503")
        b1 = await g.raw("127.0.0.3")  # another address still gets in...
        b2 = await g.raw("127.0.0.3", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await b2[0].readline()).startswith(b"HTTP/1.1 200")
        assert guard.total == 4
        full, _ = await g.raw("127.0.0.4")  # ...until the total is reached
        assert (await closed_within(full, 2.0)).startswith(b"HTTP/1.1 503")
        assert guard.refused == 2
        a1[1].close()  # a slot comes back when a connection goes
        for _ in range(100):
            if guard.per_address["127.0.0.2"] == 1:
                break
            await asyncio.sleep(0.02)
        r, w = await g.raw("127.0.0.2", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await r.readline()).startswith(b"HTTP/1.1 200")
        for _, writer in (a2, b1, b2, (r, w)):
            writer.close()


async def test_a_websocket_outlives_the_handshake_timeout():
    import aiohttp

    async with Gateway(handshake_timeout_s=0.3) as g:
        async with FakeWorker(g.bus), aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{g.settings.port}/v1/stream")
            await ws.send_str(start_msg())
            await receive_json(ws)
            for _ in range(5):  # 1.25 s: four handshake timeouts
                await send_audio(ws, 0.25)
                await asyncio.sleep(0.25)
            await ws.send_str(json.dumps({"type": "stop", "v": 1}))
            msgs, close = await drain(ws)
    assert close == 1000 and msgs[-1]["final"]

