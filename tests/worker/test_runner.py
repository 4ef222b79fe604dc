"""The worker loop over InProcessBus: with a recording engine (exact bookkeeping of what was
fed: nothing lost, nothing twice) and once with the real Engine on a small index."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from worker.bus import AudioChunk, Bus, StreamParams
from worker.local_bus import InProcessBus
from worker.metrics import WorkerMetrics
from worker.runner import Worker, error_result, run_embedded
from worker.settings import WorkerSettings, WorkerSettingsError

RATE = 8000
P = StreamParams(RATE)
CHUNK_S = 0.1


class RecordingEngine:
    """The Engine contract, with a result every ``every_s`` of audio and a record of the samples
    fed to each session (each chunk's samples all equal its seq, so the record shows order)."""

    def __init__(self, every_s: float = 1.0, tick_sleep_s: float = 0.0,
                 max_sessions: int = 8) -> None:
        self.every_s, self.tick_sleep_s = every_s, tick_sleep_s
        self.s: dict[str, dict] = {}
        self.fed: dict[str, list[int]] = {}
        self.dropped: list[str] = []
        self.opened: list[tuple[str, float]] = []
        self.metrics = WorkerMetrics()
        self.in_tick = threading.Lock()
        self.settings = type("S", (), {"max_sessions": max_sessions})()

    @property
    def sessions(self) -> int:
        return len(self.s)

    def open(self, sid: str, params: StreamParams, t0_s: float = 0.0) -> None:
        assert sid not in self.s
        self.s[sid] = {"t": t0_s, "next": t0_s + self.every_s, "ended": False, "pending": 0}
        self.opened.append((sid, t0_s))

    def feed(self, sid: str, pcm: np.ndarray, received_at: float | None = None) -> None:
        assert pcm.dtype == np.float32 and pcm.shape[1] == 1
        self.fed.setdefault(sid, []).extend(np.unique(np.round(pcm[:, 0] * 32768)).astype(int))
        self.s[sid]["pending"] += len(pcm)

    def end(self, sid: str) -> None:
        self.s[sid]["ended"] = True

    def drop(self, sid: str) -> None:
        self.s.pop(sid, None)
        self.dropped.append(sid)

    def lag_s(self) -> float:
        return 0.0

    def tick(self) -> list[tuple[str, dict]]:
        assert self.in_tick.acquire(blocking=False), "two ticks at once"
        try:
            time.sleep(self.tick_sleep_s)
            out = []
            for sid, st in list(self.s.items()):
                st["t"] += st["pending"] / RATE
                st["pending"] = 0
                while st["t"] >= st["next"] - 1e-9:
                    out.append((sid, {"audio_s": round(st["next"], 4), "final": False}))
                    st["next"] += self.every_s
                if st["ended"]:
                    out.append((sid, {"audio_s": round(st["t"], 4), "final": True}))
                    del self.s[sid]
            return out
        finally:
            self.in_tick.release()


def chunk(seq: int, n: int = int(CHUNK_S * RATE)) -> AudioChunk:
    return AudioChunk(seq, round(seq * CHUNK_S, 6), np.full(n, seq, np.int16).tobytes())


def settings(**kw) -> WorkerSettings:
    base = dict(worker_id="w1", metrics_port=0, lease_ms=600, poll_s=0.01, claim_every_s=0.05)
    base.update(kw)
    return WorkerSettings(**base)


async def send(bus: InProcessBus, sid: str, seqs: range, end: bool = False) -> None:
    for i in seqs:
        await bus.push_audio(sid, chunk(i))
    if end:
        await bus.end_session(sid)


async def final_of(bus: Bus, sid: str, timeout_s: float = 10.0) -> list[dict]:
    """Every result of a session, once its final one is there."""
    got: list[tuple[str, dict]] = []
    deadline = time.monotonic() + timeout_s
    while not (got and got[-1][1]["final"]):
        assert time.monotonic() < deadline, f"no final result for {sid}: {got}"
        got += await bus.read_results(sid, got[-1][0] if got else "0", timeout_s=0.2)
    return [r for _, r in got]


class Running:
    """A Worker running as a task; ``await stop()`` stops it gracefully."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.task = asyncio.create_task(worker.run())

    async def stop(self) -> None:
        self.worker.stop()
        await asyncio.wait_for(self.task, 10)


@pytest.mark.asyncio
async def test_audio_flows_in_order_and_the_session_finishes() -> None:
    bus, engine = InProcessBus(lease_s=0.6), RecordingEngine()
    run = Running(Worker(bus, engine, settings()))
    try:
        sids = [await bus.create_session(P) for _ in range(3)]
        await asyncio.gather(*(send(bus, s, range(25), end=True) for s in sids))
        for sid in sids:
            results = await final_of(bus, sid)
            assert [r["audio_s"] for r in results] == [1.0, 2.0, 2.5]
            assert engine.fed[sid] == list(range(25))
        assert (await bus.capacity()).sessions_active == 0
        assert engine.metrics.sessions_claimed_total._value.get() == 3
    finally:
        await run.stop()


@pytest.mark.asyncio
async def test_bad_pcm_ends_that_session_only() -> None:
    bus, engine = InProcessBus(), RecordingEngine()
    run = Running(Worker(bus, engine, settings()))
    try:
        good, bad = await bus.create_session(P), await bus.create_session(P)
        await send(bus, bad, range(3))
        await bus.push_audio(bad, AudioChunk(3, 0.3, b"\x00\x01\x02"))  # 1.5 samples
        await send(bus, good, range(15), end=True)
        [err] = await final_of(bus, bad)
        assert err["final"] and err["error"]["code"] == "odd_length"
        assert err["audio_s"] == pytest.approx(0.3)
        assert [r["audio_s"] for r in await final_of(bus, good)] == [1.0, 1.5]
        assert engine.metrics.errors_total.labels("bad_audio")._value.get() == 1
        assert bad in engine.dropped
    finally:
        await run.stop()


@pytest.mark.asyncio
async def test_takeover_rebuilds_from_retained_audio_without_replaying_results() -> None:
    bus = InProcessBus(lease_s=0.3, retain_chunks=12)
    sid = await bus.create_session(P)
    await send(bus, sid, range(30))  # 3 s; only the last 12 chunks (1.2 s) are retained
    [c] = await bus.claim("dead", 1)  # a worker that claims, publishes, then dies
    for a in (1.0, 2.0, 3.0):
        await bus.publish_result(sid, {"audio_s": a, "final": False})
    await asyncio.sleep(0.4)
    engine = RecordingEngine(every_s=0.5)
    run = Running(Worker(bus, engine, settings(lease_ms=300)))
    try:
        await asyncio.sleep(0.3)
        await send(bus, sid, range(30, 40), end=True)
        results = await final_of(bus, sid)
        assert engine.opened == [(sid, pytest.approx(1.8))]  # stream time of chunk 18
        assert engine.fed[sid] == list(range(18, 40))
        mine = results[3:]
        assert [r["audio_s"] for r in mine] == [3.3, 3.8, 4.0]  # from t0 = 1.8, none ≤ 3.0
        assert engine.metrics.sessions_reclaimed_total._value.get() == 1
    finally:
        await run.stop()


@pytest.mark.asyncio
async def test_stop_hands_sessions_back_for_another_worker() -> None:
    bus, engine = InProcessBus(lease_s=5.0), RecordingEngine()
    run = Running(Worker(bus, engine, settings(lease_ms=5000)))
    sid = await bus.create_session(P)
    await send(bus, sid, range(5))
    while not engine.fed.get(sid):
        await asyncio.sleep(0.02)
    await run.stop()
    assert run.task.result() is None and engine.dropped == [sid]
    [c] = await bus.claim("other", 4)  # at once, not after the 5 s lease
    assert c.session_id == sid and c.reclaimed


@pytest.mark.asyncio
async def test_a_long_tick_does_not_let_leases_lapse() -> None:
    bus = InProcessBus(lease_s=0.6)
    engine = RecordingEngine(tick_sleep_s=2.0)
    run = Running(Worker(bus, engine, settings(lease_ms=600)))
    try:
        sid = await bus.create_session(P)
        await send(bus, sid, range(3))
        while not engine.in_tick.locked():
            await asyncio.sleep(0.01)
        for _ in range(10):  # the tick takes 2 s, > 3 leases
            assert await bus.claim("thief", 1) == []
            await asyncio.sleep(0.15)
    finally:
        await run.stop()


@pytest.mark.asyncio
async def test_a_lost_lease_drops_the_session_and_publishes_nothing_more() -> None:
    bus, engine = InProcessBus(lease_s=0.6), RecordingEngine()
    run = Running(Worker(bus, engine, settings(lease_ms=600)))
    try:
        sid = await bus.create_session(P)
        await send(bus, sid, range(12))
        await final_of_n(bus, sid, 1)
        bus._sessions[sid].owner = "usurper"  # as if it had been reclaimed elsewhere...

        async def usurp() -> None:  # ...by a live worker that keeps its lease
            while True:
                assert await bus.renew("usurper", [sid]) == []
                await asyncio.sleep(0.1)

        keeper = asyncio.create_task(usurp())
        while sid not in engine.dropped:
            await asyncio.sleep(0.02)
        n = len(await bus.read_results(sid, "0", timeout_s=0))
        await send(bus, sid, range(12, 30), end=True)
        await asyncio.sleep(0.5)
        assert len(await bus.read_results(sid, "0", timeout_s=0)) == n
        assert engine.metrics.errors_total.labels("lease_lost")._value.get() == 1
        assert not keeper.done()
        keeper.cancel()
    finally:
        await run.stop()


async def final_of_n(bus: InProcessBus, sid: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(await bus.read_results(sid, "0", timeout_s=0.1)) < n:
        assert time.monotonic() < deadline


def test_error_result_shape() -> None:
    r = error_result("odd_length", "3 bytes", 1.23456)
    assert r == {"audio_s": 1.2346, "lag_s": 0.0, "final": True, "matches": [],
                 "decision": None, "error": {"code": "odd_length", "message": "3 bytes"}}


def test_settings_from_env_with_overrides() -> None:
    env = {"MIDIMATCH_INDEX_DIR": "/x", "MIDIMATCH_REDIS_URL": "redis://r:1/0",
           "MIDIMATCH_MAX_SESSIONS": "12", "MIDIMATCH_LEASE_MS": "900",
           "MIDIMATCH_RETAIN_S": "20.5", "MIDIMATCH_DEVICE": "cpu"}
    s = WorkerSettings.from_env(env, max_sessions=None, lease_ms=1200)
    assert (s.index, s.redis_url, s.max_sessions, s.lease_ms, s.retain_s, s.device) == (
        Path("/x"), "redis://r:1/0", 12, 1200, 20.5, "cpu")
    assert s.renew_s == pytest.approx(0.4)
    assert WorkerSettings.from_env({"MIDIMATCH_INDEX": "/y"}).index == Path("/y")
    with pytest.raises(WorkerSettingsError):
        WorkerSettings.from_env({"MIDIMATCH_MAX_SESSIONS": "many"})
    with pytest.raises(WorkerSettingsError):
        WorkerSettings.from_env({}, device="tpu")
    with pytest.raises(WorkerSettingsError):
        WorkerSettings.from_env({}, lease_ms=10)
    with pytest.raises(WorkerSettingsError):
        WorkerSettings.from_env({}, colour="blue")
    assert WorkerSettings().worker_id != WorkerSettings().worker_id


def test_prune_parts_reach_the_engine(small_index: tuple[Path, Path]) -> None:
    from model.encoder import QUERY_PARTS
    from worker.startup import build_engine

    # the setting's default is the cascade's (settings.py cannot import the model to share it)
    assert WorkerSettings().prune_parts == QUERY_PARTS
    s = WorkerSettings.from_env({"MIDIMATCH_PRUNE_PARTS": "0", "MIDIMATCH_INDEX": str(
        small_index[0])})
    assert s.prune_parts == 0
    eng = build_engine(s, WorkerMetrics())
    assert eng.cascade.config.prune_parts == 0 and eng.settings.prune_parts == 0
    with pytest.raises(WorkerSettingsError, match="prune_parts"):
        WorkerSettings.from_env({"MIDIMATCH_PRUNE_PARTS": "-1"})


def test_cli_refuses_without_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.cli import main

    monkeypatch.delenv("MIDIMATCH_REDIS_URL", raising=False)
    assert main(["worker", "--index", str(tmp_path)]) == 2


# ---------------------------------------------------------------------- the real engine
@pytest.fixture(scope="module")
def small_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An index of two 12 s pieces, and the first piece's MIDI."""
    from index.build import BuildOptions, build_index
    from tests.conftest import make_piece

    root = tmp_path_factory.mktemp("coll")
    for i in range(2):
        make_piece(i, duration_s=12).write(str(root / f"p{i}.mid"))
    out = tmp_path_factory.mktemp("idx")
    build_index(out, [root], BuildOptions(workers=1, progress=False))
    return out, root / "p0.mid"


@pytest.mark.asyncio
async def test_embedded_worker_with_the_real_engine(small_index: tuple[Path, Path]) -> None:
    import pretty_midi

    index_dir, midi = small_index
    audio = pretty_midi.PrettyMIDI(str(midi)).synthesize(fs=16000)[: 16000 * 6]
    pcm = (np.clip(audio / max(1e-9, np.abs(audio).max()), -1, 1) * 20000).astype(np.int16)
    bus, ready = InProcessBus(), asyncio.Event()
    task = asyncio.create_task(run_embedded(bus, index_dir, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 60)
        assert (await bus.capacity()).workers == 1
        sid = await bus.create_session(StreamParams(16000))
        step = 1600  # 0.1 s
        for k, i in enumerate(range(0, len(pcm), step)):
            await bus.push_audio(sid, AudioChunk(k, i / 16000, pcm[i:i + step].tobytes()))
        await bus.end_session(sid)
        results = await final_of(bus, sid, timeout_s=60)
        assert results[-1]["final"] and results[-1]["audio_s"] == pytest.approx(6.0, abs=1e-3)
        assert [r["audio_s"] for r in results[:-1]] == sorted(r["audio_s"] for r in results[:-1])
        assert len(results) >= 5 and all("matches" in r for r in results)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_an_uncalibrated_model_is_announced_in_the_heartbeat() -> None:
    from types import SimpleNamespace

    from index.calibration import Calibration

    bus = InProcessBus(lease_s=0.6)
    uncalibrated = RecordingEngine()
    uncalibrated.cascade = SimpleNamespace(calibration=Calibration("m-new"))
    run = Running(Worker(bus, uncalibrated, settings()))
    try:
        await asyncio.wait_for(run.worker.ready.wait(), 10)
        notes = (await bus.capacity()).notes
        assert len(notes) == 1 and "m-new is not calibrated" in notes[0]
    finally:
        await run.stop()
    calibrated = RecordingEngine()
    calibrated.cascade = SimpleNamespace(calibration=Calibration("m", n_out=500, n_in=100))
    assert Worker(bus, calibrated, settings()).notes == ()


@pytest.mark.asyncio
async def test_the_heartbeat_carries_the_calibration_and_its_provenance() -> None:
    from types import SimpleNamespace

    from index.calibration import Calibration, Fit, Provenance

    bus = InProcessBus(lease_s=0.6)
    fit = Fit(renderers=("timidity-freepats",), n_in=992, n_out=1100, index_refs=2061)
    engine = RecordingEngine()
    engine.cascade = SimpleNamespace(calibration=Calibration(
        "m", threshold=0.6, n_in=992, n_out=1100, provenance=Provenance(queries=fit)))
    run = Running(Worker(bus, engine, settings()))
    try:
        await asyncio.wait_for(run.worker.ready.wait(), 10)
        (said,) = (await bus.capacity()).calibrations
    finally:
        await run.stop()
    assert said["model_id"] == "m" and said["threshold"] == 0.6 and said["calibrated"]
    assert said["provenance"]["queries"]["renderers"] == ["timidity-freepats"]
    assert said["provenance"]["streams"] == "not fitted"
    assert "992 in / 1100 out-of-collection queries" in said["summary"]


# ---------------------------------------------------------------------- issue #20
class GatedEngine(RecordingEngine):
    """A RecordingEngine whose ticks wait for ``gate`` (a hung engine while it is clear)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.gate, self.waiting = threading.Event(), threading.Event()
        self.gate.set()

    def tick(self) -> list[tuple[str, dict]]:
        self.waiting.set()
        self.gate.wait(20)
        self.waiting.clear()
        return super().tick()


async def wait_for(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_worker_behind_the_retained_window_says_what_it_skipped() -> None:
    """A client sending faster than real time while a tick runs long: the audio after the last
    chunk the worker applied is trimmed before it reads it. It used to read on past the hole
    as if nothing were missing (positions shifted, nobody told); now the session restarts from
    the retained audio, with stream time kept, and every later result says what was skipped."""
    bus, engine = InProcessBus(retain_s=1.0), GatedEngine(every_s=0.5)
    run = Running(Worker(bus, engine, settings()))
    try:
        sid = await bus.create_session(P)
        await send(bus, sid, range(10))  # 1 s
        await wait_for(lambda: engine.fed.get(sid, [])[-1:] == [9])
        engine.gate.clear()
        await wait_for(engine.waiting.is_set)  # the worker is stuck in a tick
        await send(bus, sid, range(10, 50), end=True)  # 4 s more; about 1 s retained
        first = (await bus.read_audio(sid, -1)).chunks[0]
        assert first.seq > 30
        engine.gate.set()
        results = await final_of(bus, sid)
        assert engine.opened == [(sid, 0.0), (sid, first.t_s)]
        assert engine.fed[sid] == list(range(10)) + list(range(first.seq, 50))
        before = [r for r in results if "audio_skipped_s" not in r]
        after = [r for r in results if "audio_skipped_s" in r]
        assert [r["audio_s"] for r in before] == [0.5, 1.0]
        # stream time kept: results every 0.5 s from the retained audio's start, then the final
        assert [r["audio_s"] for r in after[:-1]] == pytest.approx(
            np.arange(first.t_s + 0.5, 5.0 + 1e-9, 0.5))
        assert after[-1]["final"] and after[-1]["audio_s"] == pytest.approx(5.0)
        gap_s = first.t_s - 1.0
        assert all(r["audio_skipped_s"] == pytest.approx(gap_s) for r in after)
        assert engine.metrics.errors_total.labels("audio_gap")._value.get() == 1
        assert engine.metrics.audio_skipped_seconds_total._value.get() == pytest.approx(gap_s)
    finally:
        await run.stop()


@pytest.mark.asyncio
async def test_a_session_trimmed_before_any_worker_took_it_says_so() -> None:
    bus, engine = InProcessBus(retain_s=1.0), RecordingEngine()
    sid = await bus.create_session(P)
    await send(bus, sid, range(30), end=True)  # 3 s while every worker was busy
    first = (await bus.read_audio(sid, -1)).chunks[0]
    run = Running(Worker(bus, engine, settings()))
    try:
        results = await final_of(bus, sid)
        assert engine.opened == [(sid, first.t_s)]  # stream time kept
        assert all(r["audio_skipped_s"] == pytest.approx(first.t_s) for r in results)
        assert engine.metrics.errors_total.labels("audio_gap")._value.get() == 1
    finally:
        await run.stop()


@pytest.mark.asyncio
async def test_a_hung_tick_lets_the_leases_lapse_and_publishes_nothing_after() -> None:
    bus, engine = InProcessBus(lease_s=0.6), GatedEngine()
    sid = await bus.create_session(P)
    await send(bus, sid, range(15))  # 1.5 s: a result is due in the tick that hangs
    engine.gate.clear()
    run = Running(Worker(bus, engine, settings(lease_ms=600, stall_s=0.5)))
    try:
        await wait_for(engine.waiting.is_set)
        t0 = time.monotonic()
        while not (taken := await bus.claim("thief", 1)):
            assert time.monotonic() - t0 < 5, "the hung worker kept its lease"
            await asyncio.sleep(0.05)
        assert taken[0].session_id == sid and taken[0].reclaimed
        assert engine.metrics.stalled._value.get() == 1
        assert engine.metrics.errors_total.labels("stalled")._value.get() == 1
        assert (await bus.capacity()).sessions_max == 0  # it advertises no capacity
        engine.gate.set()  # the tick returns with a result for a session it no longer owns
        await wait_for(lambda: sid in engine.dropped)
        assert await bus.read_results(sid, "0", timeout_s=0.3) == []  # fenced
        assert engine.metrics.errors_total.labels("lease_lost")._value.get() == 1
        await wait_for(lambda: engine.metrics.stalled._value.get() == 0)
        assert (await bus.capacity()).sessions_max == 8
    finally:
        await run.stop()


@pytest.mark.asyncio
async def test_a_long_tick_that_progresses_is_not_a_stall() -> None:
    class Progressing(RecordingEngine):
        """A 2 s tick whose rounds end every 0.1 s (as a loaded engine's)."""

        progress_at = 0.0

        def tick(self) -> list[tuple[str, dict]]:
            for _ in range(20):
                time.sleep(0.1)
                self.progress_at = time.monotonic()
            return super().tick()

    bus, engine = InProcessBus(lease_s=0.6), Progressing()
    run = Running(Worker(bus, engine, settings(lease_ms=600, stall_s=0.5)))
    try:
        sid = await bus.create_session(P)
        await send(bus, sid, range(3))
        await wait_for(lambda: run.worker._tick_started is not None)
        for _ in range(10):  # 1.5 s of a tick, 3 stall_s
            assert await bus.claim("thief", 1) == []
            await asyncio.sleep(0.15)
        assert engine.metrics.errors_total.labels("stalled")._value.get() == 0
    finally:
        await run.stop()


def test_fair_share() -> None:
    from worker.bus import Workload
    from worker.runner import fair_share

    assert fair_share(Workload(20, 3 * 64), 64) == 7  # 7 + 7 + 7 >= 20
    assert fair_share(Workload(20, 2 * 64), 64) == 10
    assert fair_share(Workload(0, 128), 64) == 0
    assert (fair_share(Workload(40, 66), 2), fair_share(Workload(40, 66), 64)) == (2, 39)
    assert fair_share(Workload(100, 16), 8) == 8  # more than everyone can hold
    assert fair_share(Workload(5, 0), 8) == 8  # no capacity advertised: nothing to share
