"""The gateway in gateway-only mode over a real redis-server (the ``redis_server`` fixture):
streaming, an error, resume through another gateway, and readiness following Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import struct
import uuid

import pytest
import redis.asyncio

from server.app import METRICS_KEY, TABLE_KEY, create_app
from server.listen import make_runner, start_site
from server.settings import Settings
from server.ws import CLOSE_REPLACED
from tests.redis_server import free_port
from tests.server.conftest import FakeWorker, drain, pcm_s16, receive_json, send_audio, start_msg
from worker.redis_bus import RedisBus

pytestmark = pytest.mark.asyncio
STOP = json.dumps({"type": "stop", "v": 1})


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


async def gateway(aiohttp_client, redis_server, prefix, **kw):
    settings = Settings(redis_url=redis_server.url, **kw)
    return await aiohttp_client(create_app(settings, RedisBus(redis_server.url, prefix=prefix)))


async def test_stream_and_errors_over_redis(aiohttp_client, redis_server, prefix):
    client = await gateway(aiohttp_client, redis_server, prefix)
    worker_bus = RedisBus(redis_server.url, prefix=prefix)  # the worker's own connection
    try:
        async with FakeWorker(worker_bus) as worker:
            assert (await client.get("/readyz")).status == 200
            ws = await client.ws_connect("/v1/stream")
            await ws.send_str(start_msg())
            sid = (await receive_json(ws))["session"]
            bad = await client.ws_connect("/v1/stream")
            await bad.send_str(start_msg())
            await receive_json(bad)
            await bad.send_bytes(b"\x00")
            errs, close = await drain(bad)
            assert errs[-1]["reason"] == "odd_length" and close == 4400
            await send_audio(ws, 2.0)
            await ws.send_str(STOP)
            msgs, close = await drain(ws)
    finally:
        await worker_bus.close()
    assert close == 1000 and msgs[-1]["final"] and msgs[-1]["audio_s"] == pytest.approx(2.0)
    assert worker.seqs[sid] == list(range(8))
    assert len({m["result_id"] for m in msgs}) == len(msgs)


async def test_resume_through_another_gateway_over_redis(aiohttp_client, redis_server, prefix):
    one = await gateway(aiohttp_client, redis_server, prefix)
    two = await gateway(aiohttp_client, redis_server, prefix)
    worker_bus = RedisBus(redis_server.url, prefix=prefix)
    try:
        async with FakeWorker(worker_bus) as worker:
            ws = await one.ws_connect("/v1/stream")
            await ws.send_str(start_msg())
            sid = (await receive_json(ws))["session"]
            await send_audio(ws, 0.75)
            first = await receive_json(ws)
            assert first["type"] == "result"
            await ws.close()
            ws = await two.ws_connect("/v1/stream")
            await ws.send_str(start_msg(session=sid, after=first["result_id"]))
            ready = await receive_json(ws)
            assert ready["resumed"] and ready["audio_bytes"] == 24000  # 0.75 s of 16 kHz s16
            await send_audio(ws, 0.25)
            await ws.send_str(STOP)
            msgs, close = await drain(ws)
    finally:
        await worker_bus.close()
    assert close == 1000 and msgs[-1]["final"] and msgs[-1]["audio_s"] == pytest.approx(1.0)
    assert worker.seqs[sid] == [0, 1, 2, 3]
    assert first["result_id"] not in {m["result_id"] for m in msgs}


async def test_readiness_follows_redis(aiohttp_client, redis_server, prefix):
    client = await gateway(aiohttp_client, redis_server, prefix, capacity_cache_s=0)  # as it is
    r = await client.get("/readyz")
    assert r.status == 503 and "no worker" in (await r.json())["detail"]
    worker_bus = RedisBus(redis_server.url, prefix=prefix)
    try:
        await worker_bus.heartbeat("w1", 4)
        assert (await client.get("/readyz")).status == 200
        assert (await (await client.get("/readyz")).json())["calibrations"] == []
        said = {"model_id": "m", "calibrated": False, "provenance": {"queries": "not fitted"}}
        await worker_bus.heartbeat("w1", 4, ("model m is not calibrated: calibrate it",), said)
        r = await client.get("/readyz")  # ready, but the operator is told
        body = await r.json()
        assert r.status == 200 and body["warnings"] == ["model m is not calibrated: calibrate it"]
        assert "WARNING: model m is not calibrated" in body["detail"]
        assert body["calibrations"] == [said]  # what the worker decides with, and its origin
        redis_server.kill()
        r = await client.get("/readyz")
        assert r.status == 503 and "redis" in (await r.json())["detail"].lower()
        ws = await client.ws_connect("/v1/stream")  # a new session gets a clear error
        await ws.send_str(start_msg())
        msgs, close = await drain(ws)
        # retryable, with a wait, and nothing about where Redis is (it said "Error 111
        # connecting to 127.0.0.1:…" as an internal error)
        assert msgs[-1]["code"] == "unavailable" and close == 1013
        assert msgs[-1]["retry_after_s"] > 0 and "retry" in msgs[-1]["message"]
        assert "127.0.0.1" not in msgs[-1]["message"] and str(redis_server.port) not in \
            json.dumps(msgs)
        assert (await client.get("/healthz")).status == 200  # alive, just not ready
    finally:
        await worker_bus.close()


async def test_a_hostile_after_never_reaches_redis(aiohttp_client, redis_server, prefix, caplog):
    """A resume's ``after`` of 2**64 and more was a Redis ResponseError (internal, 1011, a
    traceback); the largest id the gateway takes is still one Redis reads after."""
    client = await gateway(aiohttp_client, redis_server, prefix)
    worker_bus = RedisBus(redis_server.url, prefix=prefix)
    try:
        async with FakeWorker(worker_bus):
            ws = await client.ws_connect("/v1/stream")
            await ws.send_str(start_msg())
            sid = (await receive_json(ws))["session"]
            await ws.close()
            for after in (str(2 ** 64), f"1-{2 ** 64}", f"{2 ** 64 - 1}-{2 ** 64 - 1}"):
                ws = await client.ws_connect("/v1/stream")
                await ws.send_str(start_msg(session=sid, after=after))
                msgs, close = await drain(ws)
                assert msgs[-1]["reason"] == "bad_after" and close == 4400, msgs
            ws = await client.ws_connect("/v1/stream")
            biggest = f"{2 ** 63 - 1}-{2 ** 63 - 1}"
            await ws.send_str(start_msg(session=sid, after=biggest))
            ready = await receive_json(ws)
            assert ready["resumed"] and ready["after"] == biggest
            await send_audio(ws, 1.0)  # the result pump reads Redis after it: no error (and
            with pytest.raises(asyncio.TimeoutError):  # no result: theirs are all before it)
                await ws.receive(timeout=1.5)
            await ws.close()
    finally:
        await worker_bus.close()
    assert not [r for r in caplog.records if r.levelno >= 30 or r.exc_info]


async def test_the_gateway_bus_keeps_audio_and_sessions_as_the_workers_do(redis_server, prefix):
    """The gateway appends the audio and sets the sessions' expiry: it must use the workers'
    MIDIMATCH_RETAIN_S / MIDIMATCH_SESSION_TTL_S... (it used RedisBus's defaults)."""
    from server.serve_cli import gateway_bus
    from worker.bus import StreamParams

    env = {"MIDIMATCH_RETAIN_S": "3.5", "MIDIMATCH_SESSION_TTL_S": "40",
           "MIDIMATCH_RESULT_TTL_S": "9", "MIDIMATCH_MAX_RESULTS": "17",
           "MIDIMATCH_LEASE_MS": "900",
           "MIDIMATCH_DEVICE": "tpu"}  # a worker-only variable the gateway must not read
    bus = gateway_bus(Settings(redis_url=redis_server.url, redis_prefix=prefix), env)
    assert (bus.retain_s, bus.session_ttl_ms, bus.result_ttl_ms, bus.max_results,
            bus.lease_ms, bus.prefix) == (3.5, 40000, 9000, 17, 900, prefix)

    try:
        sid = await bus.create_session(StreamParams(16000))
        assert 30000 < int(await bus.r.pttl(bus.meta_key(sid))) <= 40000
    finally:
        await bus.close()


async def test_resume_a_b_a_takes_the_bus_position(aiohttp_client, redis_server, prefix):
    """A session served by gateway one, resumed on two, then on one again: one's table still
    held its old position (in the grace period) and kept it, as ``ready.audio_bytes`` too, so a
    client resending from there had its audio dropped as duplicates, silently."""
    one = await gateway(aiohttp_client, redis_server, prefix)
    two = await gateway(aiohttp_client, redis_server, prefix)
    worker_bus = RedisBus(redis_server.url, prefix=prefix)
    audio = pcm_s16(1.5)  # the client's recording; it sends from wherever ready says
    try:
        async with FakeWorker(worker_bus) as worker:
            ws = await one.ws_connect("/v1/stream")
            await ws.send_str(start_msg())
            sid = (await receive_json(ws))["session"]
            await send_pcm(ws, audio[:16000])  # 0.5 s
            seen = await receive_json(ws)
            assert seen["audio_s"] == pytest.approx(0.5)
            await ws.close()
            ws = await two.ws_connect("/v1/stream")
            await ws.send_str(start_msg(session=sid, after=seen["result_id"]))
            assert (await receive_json(ws))["audio_bytes"] == 16000
            await send_pcm(ws, audio[16000:32000])
            seen = await receive_json(ws)
            assert seen["audio_s"] == pytest.approx(1.0)
            await ws.close()
            ws = await one.ws_connect("/v1/stream")
            await ws.send_str(start_msg(session=sid, after=seen["result_id"]))
            ready = await receive_json(ws)
            assert ready["resumed"] and ready["audio_bytes"] == 32000  # the bus's, not one's
            assert ready["audio_s"] == pytest.approx(1.0)
            await ws.send_bytes(audio[ready["audio_bytes"]:])  # the rest, in one message
            await ws.send_str(STOP)
            msgs, close = await drain(ws)
    finally:
        await worker_bus.close()
    assert close == 1000 and msgs[-1]["final"] and msgs[-1]["audio_s"] == pytest.approx(1.5)
    assert worker.seqs[sid] == [0, 1, 2, 3, 4] and worker.audio_s[sid] == pytest.approx(1.5)


async def test_a_connection_left_behind_by_a_resume_elsewhere_is_closed(aiohttp_client,
                                                                        redis_server, prefix):
    """The session is resumed through gateway two while its connection to gateway one is still
    open (two cannot close it). The old connection's next audio is a seq the bus holds already:
    it used to be counted and dropped in silence; now that connection closes with 4409 and
    gateway one forgets the session (a later resume there reads the bus)."""
    one = await gateway(aiohttp_client, redis_server, prefix)
    two = await gateway(aiohttp_client, redis_server, prefix)
    worker_bus = RedisBus(redis_server.url, prefix=prefix)

    async def until_applied(n: int) -> None:
        while len(worker.seqs[sid]) < n:
            await asyncio.sleep(0.01)

    try:
        async with FakeWorker(worker_bus) as worker:
            old = await one.ws_connect("/v1/stream")
            await old.send_str(start_msg())
            sid = (await receive_json(old))["session"]
            await old.send_bytes(pcm_s16(0.25))
            await asyncio.wait_for(until_applied(1), 5)
            new = await two.ws_connect("/v1/stream")
            await new.send_str(start_msg(session=sid))
            assert (await receive_json(new))["audio_bytes"] == 8000
            await new.send_bytes(pcm_s16(0.25))
            await asyncio.wait_for(until_applied(2), 5)
            await old.send_bytes(pcm_s16(0.25))  # seq 1 again: the bus has new's
            msgs, close = await drain(old)
            assert close == CLOSE_REPLACED and not [m for m in msgs if m["type"] == "error"]
            for _ in range(100):  # the handler's cleanup runs after the close
                if one.server.app[TABLE_KEY].get(sid) is None:
                    break
                await asyncio.sleep(0.02)
            assert one.server.app[TABLE_KEY].get(sid) is None
            await new.send_bytes(pcm_s16(0.25))
            await new.send_str(STOP)
            msgs, close = await drain(new)
    finally:
        await worker_bus.close()
    assert close == 1000 and msgs[-1]["final"] and msgs[-1]["audio_s"] == pytest.approx(0.75)
    assert worker.seqs[sid] == [0, 1, 2]


async def test_a_client_that_goes_is_not_a_redis_outage(redis_server, prefix, caplog):
    """A client that sends ``start`` and resets its TCP connection while the gateway waits on
    Redis (held by ``CLIENT PAUSE``): the gateway's ``ready`` then meets a closed transport
    (aiohttp's ClientConnectionResetError, a ConnectionError), which was logged as "the bus is
    unavailable" (a WARNING) and counted as errors_total{code="unavailable"}. Served as in
    production (``make_runner``: aiohttp does not cancel a handler whose client went; its test
    server does)."""
    settings = Settings(redis_url=redis_server.url, port=free_port())
    app = create_app(settings, RedisBus(redis_server.url, prefix=prefix))
    runner = make_runner(app, settings)
    await runner.setup()
    await start_site(runner, settings)
    worker_bus = RedisBus(redis_server.url, prefix=prefix)
    admin = redis.asyncio.from_url(redis_server.url)
    frame = start_msg().encode()
    mask = os.urandom(4)
    frame = (bytes([0x81, 0x80 | len(frame)]) + mask
             + bytes(b ^ mask[i % 4] for i, b in enumerate(frame)))
    metrics = app[METRICS_KEY].registry
    try:
        async with FakeWorker(worker_bus):
            reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(f"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                         "Sec-WebSocket-Version: 13\r\n\r\n".encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
            await admin.execute_command("CLIENT", "PAUSE", 600, "ALL")
            writer.write(frame)
            await writer.drain()
            await asyncio.sleep(0.2)  # the gateway has the start and waits on Redis
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST: the client is gone
            for _ in range(200):
                if (metrics.get_sample_value("midimatch_gateway_connections_active") == 0
                        and metrics.get_sample_value("midimatch_gateway_sessions_started_total")):
                    break
                await asyncio.sleep(0.02)
    finally:
        await admin.aclose()
        await worker_bus.close()
        await runner.cleanup()
    assert metrics.get_sample_value("midimatch_gateway_sessions_started_total") == 1
    assert metrics.get_sample_value("midimatch_gateway_connections_active") == 0
    assert not metrics.get_sample_value("midimatch_gateway_errors_total", {"code": "unavailable"})
    assert not metrics.get_sample_value("midimatch_gateway_errors_total", {"code": "internal"})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def send_pcm(ws, data: bytes, chunk: int = 8000) -> None:
    for i in range(0, len(data), chunk):
        await ws.send_bytes(data[i:i + chunk])


async def test_a_poison_session_is_its_clients_bad_request_not_internal(aiohttp_client,
                                                                        redis_server, prefix,
                                                                        caplog):
    """Issue #20, item 1: a session stored with parameters a worker cannot parse (channels
    ``"1.0"``, as a gateway before the strict checks stored it) is failed alone by the worker
    (``bad_params``). Its client then got ``internal`` (1011), and a resume of it ``internal``
    with a traceback in the log (the bus's ``bad_params`` raised from ``session_params``): it is
    the client's bad request, answered as one, and nothing is logged as a fault."""
    from tests.worker.test_runner import RecordingEngine, Running
    from tests.worker.test_runner import settings as worker_settings
    from worker.runner import Worker

    client = await gateway(aiohttp_client, redis_server, prefix)
    elsewhere = await gateway(aiohttp_client, redis_server, prefix)  # that never served it
    bus = RedisBus(redis_server.url, prefix=prefix)
    worker = None
    try:
        await bus.heartbeat("stand-in", 8)  # a live worker, so the start is not 'busy'
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        sid = (await receive_json(ws))["session"]
        await bus.r.hset(bus.meta_key(sid), "ch", "1.0")  # as the lax gateway stored it
        other = await elsewhere.ws_connect("/v1/stream")  # a resume of it
        await other.send_str(start_msg(session=sid))
        msgs, close = await drain(other)
        assert [m["type"] for m in msgs] == ["error"], msgs
        assert (msgs[0]["code"], msgs[0]["reason"], close) == ("bad_request", "bad_params",
                                                               4400), msgs
        worker = Running(Worker(RedisBus(redis_server.url, prefix=prefix, lease_ms=600),
                                RecordingEngine(), worker_settings()))
        msgs, close = await drain(ws)  # the first client: the worker fails its session
        assert [m["type"] for m in msgs] == ["result", "error"], msgs
        assert msgs[0]["final"] and msgs[0]["error"]["code"] == "bad_params"
        assert (msgs[1]["code"], msgs[1]["reason"], close) == ("bad_request", "bad_params",
                                                               4400), msgs
        assert "channels" in msgs[1]["message"]
    finally:
        if worker is not None:
            await worker.stop()
            await worker.worker.bus.close()
        await bus.close()
    for c in (client, elsewhere):
        metrics = c.app[METRICS_KEY].registry
        assert not metrics.get_sample_value("midimatch_gateway_errors_total",
                                            {"code": "internal"})
    assert not [r for r in caplog.records if r.name.startswith("server") and r.exc_info], \
        caplog.text
