"""The token: what it protects, what stays open, and that it never reaches the access log."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from server.app import create_app
from server.auth import redact
from server.listen import make_runner, start_site
from server.settings import Settings
from tests.redis_server import free_port
from tests.server.conftest import FakeWorker, receive_json, start_msg
from worker.bus import InProcessBus

TOKEN = "s3cret-Token"
PROTECTED = ("/", "/v1/demo", "/v1/pieces/abc", "/metrics")


@pytest.fixture
def bus() -> InProcessBus:
    return InProcessBus()


@pytest.mark.asyncio
async def test_what_the_token_protects(aiohttp_client, bus):
    client = await aiohttp_client(create_app(Settings(auth_token=TOKEN), bus, close_bus=False))
    async with FakeWorker(bus):
        for path in PROTECTED:
            r = await client.get(path)
            assert r.status == 401, path
            assert TOKEN not in await r.text()
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await client.get(path, params={"token": "wrong"})).status == 401
            for ok in ({"params": {"token": TOKEN}},
                       {"headers": {"Authorization": f"Bearer {TOKEN}"}}):
                r = await client.get(path, **ok)
                assert r.status in (200, 404), (path, r.status)  # 404: no demo collection
        assert "token" in (await (await client.get("/")).text())  # the page says what to do
        # open: liveness, the page's static files
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/static/app.js")).status == 200
        assert (await client.get("/favicon.ico")).status == 200
        # /readyz: the status for probes, the detail (sessions, workers) only with the token
        r = await client.get("/readyz")
        assert r.status == 200 and await r.json() == {"ready": True}
        r = await client.get("/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status == 200 and "sessions" in (await r.json())["detail"]


@pytest.mark.asyncio
async def test_without_a_token_everything_is_open(aiohttp_client, bus):
    client = await aiohttp_client(create_app(Settings(), bus, close_bus=False))
    async with FakeWorker(bus):
        for path in ("/", "/metrics", "/readyz"):
            assert (await client.get(path)).status == 200
        assert "detail" in await (await client.get("/readyz")).json()


@pytest.mark.asyncio
async def test_the_access_log_never_holds_the_token(bus, caplog):
    """The page and browsers send ?token=: the access log writes it redacted (it had the token
    in plain text, one line per request), with no Referer (the page's own address has it)."""
    settings = Settings(auth_token=TOKEN, port=free_port())
    runner = make_runner(create_app(settings, bus, close_bus=False), settings)
    await runner.setup()
    await start_site(runner, settings)
    base = f"http://127.0.0.1:{settings.port}"
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    try:
        async with FakeWorker(bus), aiohttp.ClientSession() as http:
            for path in ("/", "/metrics", "/v1/pieces/x"):
                async with http.get(f"{base}{path}?token={TOKEN}&x=1",
                                    headers={"Referer": f"{base}/?token={TOKEN}"}) as r:
                    await r.read()
            async with http.get(f"{base}/?%74oken={TOKEN}") as r:  # %74 is 't'
                assert r.status == 200  # the decoded name counts, and is redacted too
            async with http.ws_connect(f"{base}/v1/stream?token={TOKEN}") as ws:
                await ws.send_str(start_msg())
                assert (await receive_json(ws))["type"] == "ready"
            await asyncio.sleep(0.1)
    finally:
        await runner.cleanup()
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert len(lines) >= 5, lines
    assert not [line for line in lines if TOKEN in line]
    assert sum("token=REDACTED" in line for line in lines) >= 5
    assert any('"GET /metrics?token=REDACTED&x=1 HTTP/1.1" 200' in line for line in lines)


@pytest.mark.asyncio
async def test_a_malformed_request_line_puts_no_token_and_no_traceback_in_the_log(bus, caplog):
    """aiohttp logs a request it cannot parse ("Error handling request", at ERROR) with the
    exception, whose text quotes the raw request line: ``?token=`` and all, plus a traceback."""
    settings = Settings(auth_token=TOKEN, port=free_port())
    runner = make_runner(create_app(settings, bus, close_bus=False), settings)
    await runner.setup()
    await start_site(runner, settings)
    caplog.set_level(logging.DEBUG)
    try:
        for line in (f"GET /metrics?token={TOKEN} HTTP/9.9",  # BadStatusLine
                     f"GET /metrics?x=1&token={TOKEN}\x01 HTTP/1.1",  # InvalidURLError
                     f"GET /metrics?%74oken={TOKEN}\x01 HTTP/1.1"):  # %74 is 't'
            reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
            writer.write(line.encode("latin-1") + b"\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert (await asyncio.wait_for(reader.read(4096), 5)).startswith(b"HTTP/1.")
            writer.close()
        await asyncio.sleep(0.1)
    finally:
        await runner.cleanup()
    logged = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert sum("Error handling request" in r.getMessage() for r in logged) == 3, logged
    assert any("BadStatusLine" in r.getMessage() for r in logged)
    assert any("InvalidURLError" in r.getMessage() for r in logged)
    assert not [r for r in logged if r.exc_info or r.exc_text]  # a client's error: no traceback
    assert TOKEN not in caplog.text
    assert not [r for r in caplog.records if TOKEN in r.getMessage()]
    assert sum("REDACTED" in r.getMessage() for r in logged) == 3


def test_redact():
    assert redact(f"GET /?a=1&token={TOKEN}&b=2 x") == "GET /?a=1&token=REDACTED&b=2 x"
    assert redact(f"b'GET /?TOKEN={TOKEN}\\x01 HTTP/1.1'") == "b'GET /?TOKEN=REDACTED HTTP/1.1'"
    assert redact(f"/?%74oken%3D{TOKEN}") == "/?%74oken%3DREDACTED"
    assert redact(f"Authorization: Bearer {TOKEN}") == "Authorization: Bearer REDACTED"
    assert redact("tokens: none here") == "tokens: none here"


def test_the_page_forwards_its_token_to_everything_it_asks_for():
    """The page is opened as /?token=…: each fetch, the websocket and the footer's links to
    protected routes must carry it (a browser test runs the page without a token)."""
    import re
    from pathlib import Path

    static = Path(__file__).parents[2] / "server" / "static"
    js = (static / "app.js").read_text()
    asks = re.findall(r"(?:fetch|new WebSocket)\((`[^`]*`)", js)
    assert len(asks) >= 3 and all("${tokenQuery}" in a for a in asks), asks
    html = (static / "index.html").read_text()
    links = re.findall(r'<a href="(/[^"]*)"([^>]*)>', html)
    assert links and all("data-token" in rest for _, rest in links), links
    assert 'querySelectorAll("a[data-token]")' in js
