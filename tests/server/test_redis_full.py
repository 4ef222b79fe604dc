"""Redis full under a live session: at ``maxmemory`` with ``noeviction`` (docs/deploy.md's setup)
Redis refuses writes. On a real redis-server whose maxmemory is set below what it uses, clients
get ``unavailable``/``bus_full`` (retryable; not ``internal``), the gateway logs one warning line
per failure (no traceback), and the session stays resumable: once memory is freed it goes on,
the stop sent while Redis was full included."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest

from server.app import create_app
from server.protocol import CLOSE_CODES
from server.settings import Settings
from tests.server.conftest import drain, receive_json, send_audio, start_msg
from tests.server.test_redis_restart import SteadyWorker
from worker.redis_bus import RedisBus

pytestmark = pytest.mark.asyncio
STOP = json.dumps({"type": "stop", "v": 1})


async def bus_full_error(ws) -> dict:
    msgs, close = await drain(ws)
    err = msgs[-1]
    assert err["type"] == "error" and err["code"] == "unavailable", msgs
    assert err["reason"] == "bus_full" and err["retry_after_s"] > 0, err
    assert close == CLOSE_CODES["unavailable"]
    return err


async def test_a_full_redis_is_unavailable_and_the_session_goes_on_after(aiohttp_client,
                                                                        redis_server, caplog):
    """Review (/tmp/review/oom.sh): every client got ``internal`` ("a bug") and the gateway
    logged a traceback per request."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    bus = RedisBus(redis_server.url, prefix=prefix)
    client = await aiohttp_client(create_app(
        Settings(redis_url=redis_server.url, capacity_cache_s=0.0), bus))
    worker = SteadyWorker(RedisBus(redis_server.url, prefix=prefix))
    await worker.__aenter__()
    try:
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        sid = (await receive_json(ws))["session"]
        await send_audio(ws, 1.0)  # 4 chunks
        for _ in range(250):
            if len(worker.seqs[sid]) == 4:
                break
            await asyncio.sleep(0.02)
        assert worker.seqs[sid] == [0, 1, 2, 3]

        await bus.r.config_set("maxmemory-policy", "noeviction")
        await bus.r.config_set("maxmemory", 1)  # full: below what Redis uses
        await send_audio(ws, 0.25)  # audio refused
        err = await bus_full_error(ws)
        assert "maxmemory" not in err["message"] and "6379" not in err["message"]
        ws = await client.ws_connect("/v1/stream")  # a new session refused (not "busy":
        await ws.send_str(start_msg())  # the worker's heartbeat is kept alive meanwhile)
        await bus_full_error(ws)
        ws = await client.ws_connect("/v1/stream")  # a resume works (it only reads)...
        await ws.send_str(start_msg(session=sid))
        ready = await receive_json(ws)
        assert ready["type"] == "ready" and ready["resumed"] and ready["audio_bytes"] == 32000
        await ws.send_str(STOP)  # ...but its stop is refused
        await bus_full_error(ws)

        warned = [r for r in caplog.records if r.name == "server.ws"
                  and r.levelno >= logging.WARNING]
        assert len(warned) == 3, [r.getMessage() for r in warned]  # one line per failure
        assert all(r.levelno == logging.WARNING and "full" in r.getMessage() for r in warned)
        assert not any(r.exc_info for r in caplog.records)  # no traceback

        await bus.r.config_set("maxmemory", 0)  # memory freed: the session goes on
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg(session=sid))
        ready = await receive_json(ws)
        assert ready["resumed"] and ready["audio_bytes"] == 32000
        await send_audio(ws, 0.5)
        await ws.send_str(STOP)
        msgs, close = await drain(ws)
        assert close == 1000 and msgs[-1]["final"], msgs
        assert msgs[-1]["audio_s"] == pytest.approx(1.5)
        assert worker.seqs[sid] == list(range(6))  # every chunk once, in order
        results = await bus.read_results(sid, "0", timeout_s=0)
        assert [r["final"] for _, r in results].count(True) == 1
    finally:
        await bus.r.config_set("maxmemory", 0)
        await worker.__aexit__()
        await worker.bus.close()
