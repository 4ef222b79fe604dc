"""Protocol v1 over the in-process bus: the happy path, every error case, isolation."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
import pytest

from server.app import METRICS_KEY, TABLE_KEY, create_app
from server.settings import Settings
from server.ws import CLOSE_CODES
from tests.server.conftest import (
    FakeWorker,
    drain,
    pcm_s16,
    receive_json,
    send_audio,
    start_msg,
)
from worker.bus import BusError, InProcessBus

pytestmark = pytest.mark.asyncio


@pytest.fixture
def bus() -> InProcessBus:
    return InProcessBus()


async def client_for(aiohttp_client, bus, **settings):
    return await aiohttp_client(create_app(Settings(**settings), bus, close_bus=False))


async def expect_error(ws, code: str, reason: str | None = None) -> dict:
    msgs, close = await drain(ws)
    errors = [m for m in msgs if m["type"] == "error"]
    assert len(errors) == 1, msgs
    err = errors[0]
    assert err["v"] == 1 and err["code"] == code and err["message"]
    if reason is not None:
        assert err["reason"] == reason, err
    assert close == CLOSE_CODES[code]
    return err


async def test_stream_results_and_final(aiohttp_client, bus):
    client = await client_for(aiohttp_client, bus)
    async with FakeWorker(bus) as worker:
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        ready = await receive_json(ws)
        assert ready["type"] == "ready" and ready["v"] == 1 and ready["resumed"] is False
        sid = ready["session"]
        await send_audio(ws, 3.0, chunk_s=0.25)
        await ws.send_str(json.dumps({"type": "stop", "v": 1}))
        msgs, close = await drain(ws)
    assert close == 1000
    assert all(m["type"] == "result" and m["v"] == 1 and m["session"] == sid for m in msgs)
    assert [m["final"] for m in msgs] == [False] * (len(msgs) - 1) + [True]
    audio = [m["audio_s"] for m in msgs]
    assert audio == sorted(audio) and audio[-1] == pytest.approx(3.0)
    assert len(msgs) >= 6  # a result at least every 0.5 s of audio from the fake worker
    assert msgs[-1]["decision"]["title"] == "Test Piece"
    assert msgs[0]["matches"][0].keys() >= {"id", "title", "confidence", "score", "position_s"}
    assert worker.seqs[sid] == list(range(12))  # 12 chunks of 0.25 s, numbered from 0


@pytest.mark.parametrize("first, reason", [
    (b"\x00\x01", "binary_before_start"),
    ("{not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    (json.dumps({"type": "hello", "v": 1}), "unknown_type"),
    (json.dumps({"type": "start", "sample_rate": 16000}), "bad_version"),
    (json.dumps({"type": "start", "v": 2, "sample_rate": 16000}), "bad_version"),
    (start_msg(sample_rate=4000), "bad_sample_rate"),
    (start_msg(sample_rate="fast"), "bad_sample_rate"),
    (start_msg(channels=3), "bad_channels"),
    (start_msg(encoding="mp3"), "bad_encoding"),
    (json.dumps({"type": "stop", "v": 1}), "stop_before_start"),
    (start_msg(session=""), "bad_session"),
    (start_msg(session="nope"), "unknown_session"),
    (start_msg(session="nope", after="yesterday"), "bad_after"),
    (start_msg(session="nope", after=7), "bad_after"),
    # found by fuzzing (issue #20): each was accepted, or reached `internal` with a traceback
    (json.dumps({"type": "start", "v": True, "sample_rate": 16000}), "bad_version"),
    (json.dumps({"type": "start", "v": 1.0, "sample_rate": 16000}), "bad_version"),
    (json.dumps({"type": "stop", "v": True}), "bad_version"),
    (start_msg(channels=1.0), "bad_channels"),  # stored as "1.0", it poisoned worker claims
    (start_msg(channels=True), "bad_channels"),
    (start_msg(sample_rate=16000.0), "bad_sample_rate"),
    (start_msg(sample_rate=True), "bad_sample_rate"),
    (start_msg(sample_rate=96001), "bad_sample_rate"),
    (start_msg(encoding=["pcm_s16le"]), "bad_encoding"),  # TypeError: unhashable
    (start_msg(encoding={"pcm_s16le": 1}), "bad_encoding"),
    ("[" * 1000 + "]" * 1000, "bad_json"),  # RecursionError in json.loads
    ('{"type": "start", "v": 1, "x": ' + "[" * 1500 + "]" * 1500 + "}", "bad_json"),
    (start_msg(session="nope", after=str(2 ** 64)), "bad_after"),  # Redis ResponseError
    (start_msg(session="nope", after="1_000"), "bad_after"),
    (start_msg(session="nope", after=" 12"), "bad_after"),
    (start_msg(session="a b\u0000"), "bad_session"),
    (start_msg(session=["x"]), "bad_session"),
])
async def test_bad_first_message(aiohttp_client, bus, first, reason, caplog):
    client = await client_for(aiohttp_client, bus)
    async with FakeWorker(bus):
        ws = await client.ws_connect("/v1/stream")
        if isinstance(first, bytes):
            await ws.send_bytes(first)
        else:
            await ws.send_str(first)
        await expect_error(ws, "bad_request", reason)
    assert not [r for r in caplog.records if r.levelno >= 30 or r.exc_info]  # nothing logged
    assert not bus._sessions  # answered before any session (or audio) was taken


async def test_a_deep_or_long_text_message_is_refused_before_parsing(aiohttp_client, bus):
    client = await client_for(aiohttp_client, bus)
    ws = await client.ws_connect("/v1/stream")
    await ws.send_str('{"type": "start", "v": 1, "x": "' + "y" * 5000 + '"}')
    err = await expect_error(ws, "too_large", "message_too_large")
    assert "4096" in err["message"]


async def test_any_integer_rate_in_the_range_is_taken(aiohttp_client, bus):
    """The protocol promises 8000..96000 Hz, every integer: the gateway keeps no list."""
    client = await client_for(aiohttp_client, bus)
    async with FakeWorker(bus) as worker:
        for rate in (8000, 91403, 96000):
            ws = await client.ws_connect("/v1/stream")
            await ws.send_str(start_msg(sample_rate=rate))
            sid = (await receive_json(ws))["session"]
            assert bus._sessions[sid].params.sample_rate == rate
            await ws.close()
    assert worker is not None


async def test_pings_do_not_keep_an_idle_session_open(aiohttp_client, bus):
    """Idle means no audio: a client that answers (or sends) pings is closed all the same."""
    client = await client_for(aiohttp_client, bus, idle_timeout_s=0.5)
    loop = asyncio.get_running_loop()
    async with FakeWorker(bus):
        for started in (False, True):
            ws = await client.ws_connect("/v1/stream")
            if started:
                await ws.send_str(start_msg())
                await receive_json(ws)
                await ws.send_bytes(pcm_s16(0.1))

            async def pinger(ws=ws, started=started):
                while not ws.closed:
                    await ws.ping()
                    if started:
                        await ws.send_bytes(b"")  # an empty message is no audio either
                    await asyncio.sleep(0.05)

            t0 = loop.time()
            task = asyncio.create_task(pinger())
            err = await expect_error(ws, "timeout")
            took = loop.time() - t0
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert "no audio" in err["message"] and took < 3.0, took


async def test_a_trickle_of_audio_does_not_keep_a_session_open(aiohttp_client, bus):
    """One sample every 0.1 s (a slowloris of audio) is idle: it was kept open for ever."""
    client = await client_for(aiohttp_client, bus, idle_timeout_s=1.0)
    loop = asyncio.get_running_loop()
    async with FakeWorker(bus):
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        await receive_json(ws)

        async def trickle():
            while not ws.closed:
                await ws.send_bytes(b"\x00\x00")  # one 16-bit sample
                await asyncio.sleep(0.1)

        t0 = loop.time()
        task = asyncio.create_task(trickle())
        err = await expect_error(ws, "timeout")
        took = loop.time() - t0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert "s of audio received in 1 s" in err["message"] and took < 3.0, (err, took)


async def test_audio_keeps_a_session_open_past_the_idle_timeout(aiohttp_client, bus):
    client = await client_for(aiohttp_client, bus, idle_timeout_s=0.5)
    async with FakeWorker(bus):
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        assert (await receive_json(ws))["limits"]["idle_timeout_s"] == 0.5
        for _ in range(8):  # 1.6 s in all, audio every 0.2 s
            await ws.send_bytes(pcm_s16(0.2))
            await asyncio.sleep(0.2)
        await ws.send_str(json.dumps({"type": "stop", "v": 1}))
        msgs, close = await drain(ws)
    assert close == 1000 and msgs[-1]["final"] and not any(m["type"] == "error" for m in msgs)


@pytest.mark.parametrize("payload, reason", [
    (b"\x00\x01\x02", "odd_length"),  # 3 bytes of 2-byte samples
    ("start-again", "already_started"),
])
async def test_bad_message_after_start_ends_session(aiohttp_client, bus, payload, reason):
    client = await client_for(aiohttp_client, bus)
    async with FakeWorker(bus):
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        sid = (await receive_json(ws))["session"]
        if payload == "start-again":
            await ws.send_str(start_msg())
        else:
            await ws.send_bytes(payload)
        await expect_error(ws, "bad_request", reason)
    assert bus._sessions[sid].ended  # its stream is over: the worker will flush and forget it


async def test_audio_after_stop(aiohttp_client, bus):
    client = await client_for(aiohttp_client, bus)
    ws = await client.ws_connect("/v1/stream")  # no worker: the final result never comes
    async with FakeWorker(bus) as worker:
        await ws.send_str(start_msg())
        await receive_json(ws)
        worker.running = False
    await ws.send_str(json.dumps({"type": "stop", "v": 1}))
    await ws.send_bytes(pcm_s16(0.1))
    await expect_error(ws, "bad_request", "audio_after_stop")


async def test_repeated_stops_do_not_hold_a_session_open(aiohttp_client, bus):
    """Only the first stop restarts the idle wait; later ones are ignored. A stop every 0.3 s
    (no audio, a worker that never finishes) kept a session open for ever."""
    client = await client_for(aiohttp_client, bus, idle_timeout_s=1.0)
    loop = asyncio.get_running_loop()
    ws = await client.ws_connect("/v1/stream")
    async with FakeWorker(bus):
        await ws.send_str(start_msg())
        sid = (await receive_json(ws))["session"]
    # the worker stopped: nobody finishes the session, the final result never comes

    async def stop_spam():
        while not ws.closed:
            await ws.send_str(json.dumps({"type": "stop", "v": 1}))
            await asyncio.sleep(0.3)

    t0 = loop.time()
    task = asyncio.create_task(stop_spam())
    err = await expect_error(ws, "timeout")
    took = loop.time() - t0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert 0.9 < took < 2.0, (err, took)  # timed from the first stop
    assert bus._sessions[sid].ended


async def test_oversized_messages(aiohttp_client, bus):
    client = await client_for(aiohttp_client, bus, max_message_bytes=4096)
    async with FakeWorker(bus):
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        await receive_json(ws)
        await ws.send_bytes(b"\x00" * 8192)
        await expect_error(ws, "too_large", "message_too_large")
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg(pad="x" * 5000))
        await expect_error(ws, "too_large", "message_too_large")
        # past the transport's hard cap aiohttp closes by itself, with the same close code
        ws = await client.ws_connect("/v1/stream")
        await ws.send_bytes(b"\x00" * (2 * 4096 + 65536 + 2))
        _, close = await drain(ws)
        assert close == CLOSE_CODES["too_large"]


async def test_session_too_long(aiohttp_client, bus):
    client = await client_for(aiohttp_client, bus, max_session_s=1.0)
    async with FakeWorker(bus) as worker:
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        sid = (await receive_json(ws))["session"]
        await send_audio(ws, 2.0, chunk_s=0.25)
        err = await expect_error(ws, "too_large", "session_too_long")
    assert "1 s" in err["message"]
    assert len(worker.seqs[sid]) <= 4  # nothing past the limit reached the bus


async def test_too_many_sessions_per_address_spares_the_others(aiohttp_client, bus):
    client = await client_for(aiohttp_client, bus, max_sessions_per_address=2)
    async with FakeWorker(bus):
        first = await client.ws_connect("/v1/stream")
        await first.send_str(start_msg())
        await receive_json(first)
        second = await client.ws_connect("/v1/stream")
        third = await client.ws_connect("/v1/stream")
        await expect_error(third, "busy", "too_many_sessions")
        await second.close()
        await send_audio(first, 1.0)
        await first.send_str(json.dumps({"type": "stop", "v": 1}))
        msgs, close = await drain(first)
        assert close == 1000 and msgs[-1]["final"]
        again = await client.ws_connect("/v1/stream")  # the slots were given back
        await again.send_str(start_msg())
        assert (await receive_json(again))["type"] == "ready"


@pytest.mark.parametrize("how", ["header", "query"])
async def test_token_is_checked_before_the_upgrade(aiohttp_client, bus, how):
    app = create_app(Settings(auth_token="s3cret"), bus, close_bus=False)
    client = await aiohttp_client(app)
    async with FakeWorker(bus):
        for url in ("/v1/stream", "/v1/stream?token=wrong"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await client.ws_connect(url)
            assert e.value.status == 401  # HTTP, before any websocket exists
        reg = app[METRICS_KEY].registry
        assert reg.get_sample_value("midimatch_gateway_errors_total",
                                    {"code": "unauthorized"}) == 2
        assert reg.get_sample_value("midimatch_gateway_connections_active") == 0
        if how == "header":
            ws = await client.ws_connect("/v1/stream",
                                         headers={"Authorization": "Bearer s3cret"})
        else:
            ws = await client.ws_connect("/v1/stream?token=s3cret")
        await ws.send_str(start_msg())
        assert (await receive_json(ws))["type"] == "ready"


async def test_busy_when_saturated_or_no_worker(aiohttp_client, bus):
    # capacity_cache_s=0: each start sees the workers as they are now (tests/server/
    # test_capacity_cache.py checks the cache)
    client = await client_for(aiohttp_client, bus, capacity_cache_s=0)
    ws = await client.ws_connect("/v1/stream")
    await ws.send_str(start_msg())
    await expect_error(ws, "busy", "saturated")  # no worker alive
    async with FakeWorker(bus, max_sessions=1):
        ws1 = await client.ws_connect("/v1/stream")
        await ws1.send_str(start_msg())
        assert (await receive_json(ws1))["type"] == "ready"
        ws2 = await client.ws_connect("/v1/stream")
        await ws2.send_str(start_msg())
        err = await expect_error(ws2, "busy", "saturated")
        assert "try again" in err["message"]
        await send_audio(ws1, 0.5)  # the first session is served as before
        assert (await receive_json(ws1))["type"] == "result"


async def test_idle_timeout(aiohttp_client, bus):
    client = await client_for(aiohttp_client, bus, idle_timeout_s=0.3)
    async with FakeWorker(bus):
        ws = await client.ws_connect("/v1/stream")
        await expect_error(ws, "timeout")  # never started
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        sid = (await receive_json(ws))["session"]
        await ws.send_bytes(pcm_s16(0.1))
        msgs, close = await drain(ws)
    assert close == CLOSE_CODES["timeout"] and msgs[-1]["code"] == "timeout"
    assert bus._sessions[sid].ended


async def test_an_unreachable_bus_is_unavailable_and_retryable(aiohttp_client, bus, monkeypatch,
                                                               caplog):
    client = await client_for(aiohttp_client, bus)
    async with FakeWorker(bus):
        async def broken(*a, **k):
            raise BusError("Redis failed: ConnectionError: Error 111 connecting to "
                           "10.1.2.3:6379", reason="redis_unavailable")
        monkeypatch.setattr(bus, "create_session", broken)
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        err = await expect_error(ws, "unavailable", "bus_unavailable")
    assert err["retry_after_s"] > 0 and "retry" in err["message"]
    assert "10.1.2.3" not in json.dumps(err) and "6379" not in json.dumps(err)
    assert not any(r.exc_info for r in caplog.records)  # an outage is not a traceback


@pytest.mark.parametrize("bug", ["key", "redis_refused"])
async def test_a_bug_is_internal_with_a_reference_to_the_log(aiohttp_client, bus, monkeypatch,
                                                             caplog, bug):
    """A bug, or Redis refusing a command (a ResponseError: Redis answered, so it is not an
    outage), is ``internal``: not retryable, its detail only in the log."""
    from redis.exceptions import ResponseError

    client = await client_for(aiohttp_client, bus)
    async with FakeWorker(bus):
        async def buggy(*a, **k):
            if bug == "key":
                raise KeyError("secret detail")
            try:
                raise ResponseError("ERR secret detail")
            except ResponseError as e:  # as worker/redis_bus.py wraps every RedisError
                raise BusError(f"Redis failed: {e}", reason="redis_unavailable") from e
        monkeypatch.setattr(bus, "create_session", buggy)
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        err = await expect_error(ws, "internal")
    assert "secret detail" not in err["message"] and "retry_after_s" not in err
    ref = err["message"].split("logged as ")[1].rstrip(")")
    logged = [r for r in caplog.records if ref in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info  # the traceback is in the log, found by ref


async def test_bad_clients_do_not_disturb_a_good_one(aiohttp_client, bus):
    client = await client_for(aiohttp_client, bus)
    async with FakeWorker(bus):
        good = await client.ws_connect("/v1/stream")
        await good.send_str(start_msg())
        await receive_json(good)

        async def bad(payload):
            ws = await client.ws_connect("/v1/stream")
            await ws.send_str(start_msg())
            await receive_json(ws)
            await ws.send_bytes(payload)
            await drain(ws)

        feed = asyncio.create_task(send_audio(good, 2.0, chunk_s=0.1))
        await asyncio.gather(*(bad(b"\x01" * n) for n in (1, 3, 5)))
        await feed
        await good.send_str(json.dumps({"type": "stop", "v": 1}))
        msgs, close = await drain(good)
    assert close == 1000
    assert msgs[-1]["final"] and msgs[-1]["audio_s"] == pytest.approx(2.0)
    assert not any(m["type"] == "error" for m in msgs)


async def test_http_endpoints(aiohttp_client, bus):
    client = await client_for(aiohttp_client, bus, capacity_cache_s=0)  # readiness as it is now
    r = await client.get("/healthz")
    assert r.status == 200 and (await r.json())["ok"] is True
    r = await client.get("/readyz")
    assert r.status == 503 and "no worker" in (await r.json())["detail"]
    async with FakeWorker(bus):
        r = await client.get("/readyz")
        assert r.status == 200 and (await r.json())["ready"] is True
        ws = await client.ws_connect("/v1/stream")
        await ws.send_bytes(b"x")
        await drain(ws)
    text = await (await client.get("/metrics")).text()
    assert 'midimatch_gateway_errors_total{code="bad_request"} 1.0' in text
    assert "midimatch_gateway_connections_active 0.0" in text
    labels = {part.split("=")[0] for line in text.splitlines()
              if line.startswith("midimatch_gateway_") and "{" in line
              for part in line[line.index("{") + 1:line.index("}")].split(",")}
    assert labels == {"code", "le"}  # fixed label sets only, nothing per session or address
    page = await client.get("/")
    assert page.status == 200 and "<html" in (await page.text()).lower()
    for asset in ("app.js", "worklet.js", "style.css"):
        assert (await client.get(f"/static/{asset}")).status == 200
    assert (await client.get("/v1/demo")).status == 404


async def test_not_ready_until_the_embedded_worker_loaded(aiohttp_client, bus):
    loaded = {"ok": False}
    client = await aiohttp_client(create_app(Settings(), bus, local_ready=lambda: loaded["ok"],
                                             close_bus=False))
    async with FakeWorker(bus):
        r = await client.get("/readyz")
        assert r.status == 503 and "loading" in (await r.json())["detail"]
        loaded["ok"] = True
        assert (await client.get("/readyz")).status == 200


def f32_start() -> str:
    return start_msg(encoding="pcm_f32le")


def pcm_f32(seconds: float, rate: int = 16000) -> np.ndarray:
    return (0.2 * np.sin(np.arange(int(seconds * rate)) * 0.1)).astype("<f4")


async def settled(app, **gauges: float) -> None:
    """Wait (up to 5 s) until the gateway's gauges read ``gauges`` (the server finishes a
    connection's cleanup a moment after the client sees the close)."""
    reg = app[METRICS_KEY].registry
    for _ in range(500):
        if all(reg.get_sample_value(f"midimatch_gateway_{k}") == v for k, v in gauges.items()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError({k: reg.get_sample_value(f"midimatch_gateway_{k}") for k in gauges})


@pytest.mark.parametrize("bad", [np.nan, np.inf])
async def test_non_finite_float_audio_is_an_error_and_releases_the_session(aiohttp_client, bus,
                                                                           bad):
    app = create_app(Settings(), bus, close_bus=False)
    client = await aiohttp_client(app)
    async with FakeWorker(bus) as worker:
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(f32_start())
        sid = (await receive_json(ws))["session"]
        good = pcm_f32(0.6)
        await ws.send_bytes(good.tobytes())
        bad_chunk = good.copy()
        bad_chunk[100] = bad
        await ws.send_bytes(bad_chunk.tobytes())
        err = await expect_error(ws, "bad_request", "bad_audio")
        assert "NaN" in err["message"]
        await settled(app, connections_active=0, sessions_detached=0)
    assert worker.seqs[sid] == [0]  # the bad message never reached the bus
    assert bus._sessions[sid].ended
    assert app[TABLE_KEY].get(sid) is None  # released, not kept for a resume
    reg = app[METRICS_KEY].registry
    assert reg.get_sample_value("midimatch_gateway_errors_total", {"code": "bad_request"}) == 1


class RejectingWorker(FakeWorker):
    """Gives every session up after its first chunk, as the worker does with audio it cannot
    use: a final result carrying ``error`` (worker/runner.py ``error_result``)."""

    async def step(self) -> None:
        for sid in [s for s in self.params if self.seqs[s]]:
            await self.bus.publish_result(sid, {
                "audio_s": 0.0, "lag_s": 0.0, "final": True, "matches": [], "decision": None,
                "error": {"code": "bad_audio", "message": "PCM contains NaN samples"}})
            await self.bus.finish(self.worker_id, sid)
            del self.params[sid]
        await super().step()


async def test_audio_the_worker_rejects_is_an_error_and_releases_the_session(aiohttp_client,
                                                                             bus):
    app = create_app(Settings(), bus, close_bus=False)
    client = await aiohttp_client(app)
    async with RejectingWorker(bus):
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        sid = (await receive_json(ws))["session"]
        feed = asyncio.create_task(send_audio(ws, 5.0, chunk_s=0.05))  # still sending
        msgs, close = await drain(ws)
        await asyncio.gather(feed, return_exceptions=True)
        await settled(app, connections_active=0, sessions_detached=0)
    assert close == CLOSE_CODES["bad_request"]
    assert [m["type"] for m in msgs[-2:]] == ["result", "error"]
    assert msgs[-2]["final"] and msgs[-2]["error"]["code"] == "bad_audio"
    assert sum(m["type"] == "error" for m in msgs) == 1
    assert msgs[-1]["reason"] == "bad_audio" and "NaN" in msgs[-1]["message"]
    assert app[TABLE_KEY].get(sid) is None


@pytest.mark.parametrize("realtime", [False, True])
async def test_result_lag_is_the_service_delay_not_the_client_backlog(aiohttp_client, bus,
                                                                      monkeypatch, realtime):
    """Every result takes the worker 0.3 s to publish. Sent all at once (faster than real
    time), 3 s of audio queue six results behind each other, and the worker's ``lag_s`` says
    seconds of backlog; the metric must still see 0.3 s per result, as for a real-time
    client."""
    app = create_app(Settings(), bus, close_bus=False)
    client = await aiohttp_client(app)
    publish = bus.publish_result

    async def slow_publish(sid, result):
        await asyncio.sleep(0.3)
        await publish(sid, {**result, "lag_s": 3.0 - result["audio_s"]})

    monkeypatch.setattr(bus, "publish_result", slow_publish)
    async with FakeWorker(bus):
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        await receive_json(ws)
        data = pcm_s16(3.0)
        step = 1600 * 2  # 0.1 s
        for i in range(0, len(data), step):
            await ws.send_bytes(data[i:i + step])
            if realtime:
                await asyncio.sleep(0.1)
        await ws.send_str(json.dumps({"type": "stop", "v": 1}))
        msgs, close = await drain(ws)
    assert close == 1000 and len(msgs) == 7  # 6 results and the final one
    reg = app[METRICS_KEY].registry
    name = "midimatch_gateway_result_lag_seconds"
    assert reg.get_sample_value(f"{name}_count") == 7
    assert reg.get_sample_value(f"{name}_bucket", {"le": "0.25"}) == 0  # ≥ the 0.3 s delay
    assert reg.get_sample_value(f"{name}_bucket", {"le": "0.75"}) == 7  # not the backlog


async def test_metrics_have_no_created_series(aiohttp_client, bus):
    client = await client_for(aiohttp_client, bus)
    async with FakeWorker(bus):
        ws = await client.ws_connect("/v1/stream")
        await ws.send_str(start_msg())
        await receive_json(ws)
        await send_audio(ws, 1.0)
        await ws.send_str(json.dumps({"type": "stop", "v": 1}))
        await drain(ws)
    text = await (await client.get("/metrics")).text()
    assert "midimatch_gateway_results_total 3.0" in text  # counters are there...
    assert "_created" not in text  # ...without a timestamp series each
