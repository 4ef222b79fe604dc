"""A session that vanishes from Redis under a live connection (FLUSHALL here; a restart without
persistence, an eviction) is answered as docs/protocol.md says, ``bad_request`` /
``unknown_session``, whether the client was idle (the result pump finds it) or sending audio:
never ``internal`` with a traceback logged as a bug (it was, from the pump)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server.app import METRICS_KEY, TABLE_KEY, create_app
from server.settings import Settings
from server.ws import CLOSE_CODES
from tests.server.conftest import drain, pcm_s16, receive_json, start_msg
from worker.redis_bus import RedisBus

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("client_is", ["idle", "sending"])
async def test_a_vanished_session_is_unknown_session_not_internal(aiohttp_client, redis_server,
                                                                  caplog, client_is):
    caplog.set_level(logging.INFO)
    app = create_app(Settings(redis_url=redis_server.url), RedisBus(redis_server.url,
                                                                     prefix="gone"))
    client = await aiohttp_client(app)
    worker_bus = RedisBus(redis_server.url, prefix="gone")
    try:
        await worker_bus.heartbeat("w1", 4)
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        sid = (await receive_json(ws))["session"]
        await ws.send_bytes(pcm_s16(0.25))
        await asyncio.sleep(0.3)  # the pump is waiting for results
        assert await worker_bus.r.exists(worker_bus.meta_key(sid))
        await worker_bus.r.flushall()
        if client_is == "sending":
            await ws.send_bytes(pcm_s16(0.25))
        msgs, close = await drain(ws)
    finally:
        await worker_bus.close()
    errors = [m for m in msgs if m["type"] == "error"]
    assert len(errors) == 1, msgs
    assert (errors[0]["code"], errors[0]["reason"]) == ("bad_request", "unknown_session")
    assert "new session" in errors[0]["message"]
    assert close == CLOSE_CODES["bad_request"]
    reg = app[METRICS_KEY].registry
    for _ in range(200):  # the connection's cleanup runs a moment after the close
        if app[TABLE_KEY].get(sid) is None:
            break
        await asyncio.sleep(0.01)
    assert app[TABLE_KEY].get(sid) is None  # nothing left to resume
    assert reg.get_sample_value("midimatch_gateway_errors_total", {"code": "internal"}) == 0
    assert reg.get_sample_value("midimatch_gateway_errors_total",
                                {"code": "bad_request"}) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
