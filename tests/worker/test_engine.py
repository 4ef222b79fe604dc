"""The streaming engine against the offline cascade, on a small index built here."""

from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pytest

from index.answers import IDENTIFIED, NOT_IN_COLLECTION, SILENT, TOO_SHORT, answer
from index.build import BuildOptions, build_index
from index.cascade_types import CascadeConfig
from index.search import Cascade
from model.errors import MidimatchError
from model.synth import midi_to_audio
from model.training.songgen import generate_song
from worker.bus import StreamParams
from worker.engine import Engine, EngineError
from worker.engine_settings import EngineSettings
from worker.metrics import WorkerMetrics

SR = 22050
# Results must not depend on how fast this (shared, loaded) machine is: no budget in play
# (except in the test of falling behind) and no waiting to batch prunes.
NO_BUDGET = 3600.0
EXACT = {"tick_budget_s": NO_BUDGET, "prune_wait_s": 0.0}
SONGS = range(20)  # indexed: generate_song(i, 30 s), titled song<i>
UNSEEN = 40  # a song of the same kind that is not in the index
# These tests check the engine, not the model: the references are indexed from the very audio
# the streams play (pretty_midi's sine synthesis, the same on every machine, through the CQT),
# so the right piece wins by a wide margin whatever synthesisers this machine has. (A real
# synth on one side and the note render on the other left near-ties that flipped with the
# installed soundfont: song2 vs song5.) Even so, some of these generated songs stay close to
# another (2 and 5, 6 and 18, 13 and 0: the audio and MIDI networks differ and sine tones were
# never trained on; 7 and 17 with the model 32bit-ccb7db83de57; 9 by 2.3 bits with
# 32bit-1bab13193c0f; 16's first 6 s at confidence 0.74 with 32bit-0cdb36909868; 7's first 6 s
# at 0.63 and 10's last 15 s at 0.71 with 32bit-f5b90afa7a71), so the tests that assert a
# ranking play only songs that the shipped model separates on every window of them, and song10
# only on its first 15 s; test_the_fixture_is_unambiguous checks that they do.
CLEAR = (0, 1, 3, 4, 11, 12, 14, 17, 19)
CLEAR_FIRST_15S = (10,)
WINDOWS = ((0.0, 6.0), (3.0, 15.0), (8.0, 20.0), (15.0, 30.0))


@pytest.fixture(scope="module")
def cascade(tmp_path_factory: pytest.TempPathFactory) -> Cascade:
    root = tmp_path_factory.mktemp("engine")
    coll = root / "collection"
    coll.mkdir()
    for i in SONGS:
        generate_song(i, duration_s=30.0).write(str(coll / f"song{i}.mid"))
    build_index(root / "index", [coll], BuildOptions(workers=1, progress=False, method="sine"))
    return Cascade.open(root / "index", config=CascadeConfig(query_window_s=15.0))


@functools.cache
def _song_audio(seed: int) -> np.ndarray:
    return midi_to_audio(generate_song(seed, duration_s=30.0), sample_rate=SR,
                         renderer="pretty_midi")


def audio_of(seed: int, start_s: float = 0.0, end_s: float = 30.0) -> np.ndarray:
    return _song_audio(seed)[int(start_s * SR):int(end_s * SR)]


@pytest.mark.parametrize("seed,windows", [(s, WINDOWS) for s in CLEAR]
                         + [(s, WINDOWS[:2]) for s in CLEAR_FIRST_15S],
                         ids=[f"song{s}" for s in CLEAR]
                         + [f"song{s}-first15s" for s in CLEAR_FIRST_15S])
def test_the_fixture_is_unambiguous(cascade: Cascade, seed: int,
                                    windows: tuple[tuple[float, float], ...]) -> None:
    # what the ranking assertions below rely on; if a new model breaks it, choose CLEAR again
    for start_s, end_s in windows:
        top = cascade.search_audio(audio_of(seed, start_s, end_s), SR).matches
        assert top[0].title == f"song{seed}" and top[0].confidence >= 0.75
        assert top[1].score - top[0].score >= 2.5  # bits per frame ahead of the runner-up


def stream(engine: Engine, sid: str, audio: np.ndarray, chunk_s: float, *,
           sample_rate: int = SR, end: bool = True) -> list[dict]:
    """Feed ``audio`` in chunks (a tick after each) and return the session's results."""
    out = []
    n = max(1, int(chunk_s * sample_rate))
    for i in range(0, audio.shape[0], n):
        engine.feed(sid, audio[i:i + n].reshape(-1, 1 if audio.ndim == 1 else audio.shape[1]))
        out += [r for s, r in engine.tick() if s == sid]
    if end:
        engine.end(sid)
        for _ in range(100):  # a backlog past the tick budget takes several ticks
            out += [r for s, r in engine.tick() if s == sid]
            if out and out[-1]["final"]:
                break
    return out


def one_stream(cascade: Cascade, audio: np.ndarray, chunk_s: float, **settings) -> list[dict]:
    eng = Engine(cascade, EngineSettings(window_s=15.0, **{**EXACT, **settings}))
    eng.open("s", StreamParams(SR))
    return stream(eng, "s", audio, chunk_s)


@pytest.mark.parametrize("chunk_s", [0.05, 0.37, 1.0, 1000.0])
def test_streaming_agrees_with_offline_search(cascade: Cascade, chunk_s: float) -> None:
    clip = audio_of(3, 5.0, 15.0)  # 10 s: within the 15 s window, so both see the same query
    offline = cascade.search_audio(clip, SR)
    final = one_stream(cascade, clip, chunk_s)[-1]
    assert final["final"]
    assert offline.matches[0].title == "song3"
    assert final["matches"][0]["title"] == "song3"
    got = {m["title"]: m for m in final["matches"]}
    for m in offline.matches:  # same ranking, same scores (the same DP on the same hashes)
        assert got[m.title]["score"] == pytest.approx(m.score, abs=1e-3)
        assert got[m.title]["confidence"] == pytest.approx(m.confidence, abs=1e-3)
        assert got[m.title]["position_s"] == pytest.approx(m.position_s, abs=1e-2)
    assert [m["title"] for m in final["matches"]] == [m.title for m in offline.matches]


def test_prune_parts_setting_reaches_sessions_and_matches_the_offline_cascade(
        cascade: Cascade) -> None:
    clip = audio_of(3, 5.0, 15.0)
    whole = cascade.with_config(prune_parts=0)
    eng = Engine(cascade, EngineSettings(window_s=15.0, prune_parts=0, **EXACT))
    assert eng.cascade.config.prune_parts == 0 and cascade.config.prune_parts == 2
    eng.open("s", StreamParams(SR))
    assert eng._sessions["s"].embedder.parts == 0
    final = stream(eng, "s", clip, 0.37)[-1]
    offline = whole.search_audio(clip, SR)
    assert [m["title"] for m in final["matches"]] == [m.title for m in offline.matches]
    default = Engine(cascade, EngineSettings(window_s=15.0, **EXACT))
    default.open("s", StreamParams(SR))
    assert default._sessions["s"].embedder.parts == 2
    with pytest.raises(EngineError, match="prune_parts"):
        EngineSettings(prune_parts=-1)


def test_deferring_audio_changes_nothing_but_when_it_is_processed(cascade: Cascade) -> None:
    clip = audio_of(4, 0.0, 6.0)
    eager = one_stream(cascade, clip, 0.1, defer_audio=False)
    assert one_stream(cascade, clip, 0.1, defer_audio=True) == eager
    eng = Engine(cascade, EngineSettings(**EXACT))
    eng.open("s", StreamParams(SR))
    eng.feed("s", clip[:SR // 2, None])
    assert eng.tick() == [] and eng._sessions["s"].consumed == 0  # half a period: kept queued
    assert eng.lag_s() == 0.0  # waiting for a period to complete is not lag
    eng.feed("s", clip[SR // 2:SR + 100, None])
    (sid, r), = eng.tick()
    assert r["audio_s"] == 1.0 and r["lag_s"] == 0.0 and eng._sessions["s"].pending_samples == 100


def test_results_every_second_final_and_positions_advance(cascade: Cascade) -> None:
    # song11: the one song whose 3-5 s windows ens1 and motion3 place right at every offset
    # (motion6: all but one 3 s window, not the one played here). These generated songs repeat
    # their patterns, and a 3 s query of most of them lands on a similar bar elsewhere in the
    # piece for 2-17 of 27 offsets; song3's first 3 s query did with 32bit-1bab13193c0f.
    clip = audio_of(11, 3.0, 15.0)
    results = one_stream(cascade, clip, 0.37)
    times = [r["audio_s"] for r in results]
    assert times[:-1] == pytest.approx(np.arange(1.0, 13.0), abs=1e-3)  # one per 1 s of audio
    assert results[-1]["final"] and not any(r["final"] for r in results[:-1])
    assert results[-1]["audio_s"] == pytest.approx(clip.shape[0] / SR, abs=1e-3)
    assert all(r["matches"] == [] for r in results[:2])  # up to the 2 s minimum: no ranking
    # from the first ranking (3 s) on, the right piece leads
    top = [(r["audio_s"], r["matches"][0]) for r in results[2:-1]]
    assert len(top) == 10
    assert all(m["title"] == "song11" for _, m in top)
    # the position follows the audio: 3 s into the piece at the start of the clip
    for t, m in top:
        assert m["position_s"] == pytest.approx(3.0 + t, abs=0.5)
    assert results[-1]["decision"]["title"] == "song11"


def test_decision_changes_are_counted_as_the_results_show_them(cascade: Cascade) -> None:
    # midimatch_worker_decisions_total (the alert on decisions dropped, k8s/) against the
    # events read off the published results: piece A decided, then B after a change of music,
    # then the stream goes on into a long silence and ends
    from worker.metrics import DECISION_EVENTS
    from worker.session import HOLD_QUIET_S

    eng = Engine(cascade, EngineSettings(window_s=10.0, change_s=3.0, **EXACT))
    eng.open("s", StreamParams(SR))
    clip = np.concatenate([audio_of(10, 0.0, 12.0), audio_of(3, 5.0, 25.0),
                           np.zeros(int((HOLD_QUIET_S + 3) * SR), np.float32)])
    results = stream(eng, "s", clip, 0.5)
    expected, last = dict.fromkeys(DECISION_EVENTS, 0), None
    for r in results:
        now = r["decision"]["id"] if r["decision"] else None
        if now != last:
            expected["made" if last is None else "replaced" if now is not None
                     else "dropped_at_end" if r["final"] else "withdrawn"] += 1
        last = now
    got = {e: eng.metrics.registry.get_sample_value("midimatch_worker_decisions_total",
                                                    {"event": e}) for e in DECISION_EVENTS}
    assert got == expected
    assert expected["made"] >= 1 and expected["withdrawn"] >= 1  # the silence withdrew it


def test_t0_puts_results_in_stream_time(cascade: Cascade) -> None:
    eng = Engine(cascade, EngineSettings(**EXACT))
    eng.open("late", StreamParams(SR), t0_s=100.0)
    results = stream(eng, "late", audio_of(1, 0.0, 4.0), 0.5)
    assert [r["audio_s"] for r in results] == pytest.approx([101, 102, 103, 104, 104])


def _decisions(cascade: Cascade, clip: np.ndarray, change_s: float) -> tuple[dict, dict]:
    eng = Engine(cascade, EngineSettings(window_s=10.0, change_s=change_s, **EXACT))
    eng.open("s", StreamParams(SR))
    results = stream(eng, "s", clip, 0.5, end=False)
    decided = {r["audio_s"]: (r["decision"] or {}).get("title") for r in results}
    top = {r["audio_s"]: r["matches"][0]["title"] for r in results if r["matches"]}
    return decided, top


def _first(decided: dict, title: str, after_s: float) -> float:
    """First time from which ``title`` is the decision in every later result."""
    times = sorted(t for t in decided if t > after_s)
    ok = [t for i, t in enumerate(times) if all(decided[u] == title for u in times[i:])]
    return ok[0] if ok else np.inf


# Pairs of CLEAR songs where B's confidence crosses the threshold before the window is full of
# B, so the check on the newest seconds has something to show (on 3→12 or 0→7 it does not: B is
# decided at 25 s either way, measured with this fixture). With 32bit-bf4ddae7cb43, whose stream
# threshold is higher (evidence 22.3 against 14.0), 10→3 is decided at 23 s (26 s without the
# check) and is replaced by 10→4; of 11 pairs tried, 5 are decided by 21 s (none sooner). With
# the evidence shape fitted for it (ninth session: threshold 41.2), 10→4 is decided at 22 s and
# 10→3 at 21 s again; of 14 pairs tried, 9 are decided by 21 s (16→0 at 19 s, 3→12 at 20 s),
# 0→7 and 4→16 at 25 s, and in one (17→14) A is still decided at 18 s. With 32bit-f5b90afa7a71
# (eleventh session: threshold 10.8) 14→10 is decided at 25 s (song10's last 15 s are not clear
# for it) and is replaced by 14→1; of 11 pairs tried, 8 are decided at 20 s (10→3, 12→19, 3→14,
# 14→0, 1, 11, 12, 17), 14→19 and 14→3 at 23 and 24 s, 14→4 at 25 s with A still decided at 18 s.
# (That model was not shipped; the shipped 32bit-0cdb36909868 passes these three pairs too.)
@pytest.mark.parametrize("a,b", [(10, 3), (14, 1), (12, 19)])
def test_piece_change_is_followed(cascade: Cascade, a: int, b: int) -> None:
    clip = np.concatenate([audio_of(a, 0.0, 12.0), audio_of(b, 5.0, 25.0)])  # A, B from 12 s
    decided, top = _decisions(cascade, clip, change_s=3.0)
    song_a, song_b = f"song{a}", f"song{b}"
    assert decided[11.0] == song_a
    assert set(decided.values()) <= {song_a, song_b, None}  # never a third piece
    assert all(decided[t] != song_a for t in decided if t >= 18.0)  # A withdrawn within 6 s
    assert _first(decided, song_b, 12.0) <= 21.0  # B decided within 9 s, and it stays
    assert all(top[t] == song_b for t in top if t >= 20.0)
    # the check on the newest seconds is what makes it quicker: without it the window must
    # first fill with B
    slow, _ = _decisions(cascade, clip, change_s=0.0)
    assert _first(decided, song_b, 12.0) < _first(slow, song_b, 12.0)


# (White noise is left out: the offline cascade itself "identifies" 3-10 s of it as a song with
# a noise-like stretch, confidently; the engine only agrees with it.)
@pytest.mark.parametrize("kind", ["unseen", "silence"])
def test_not_in_collection_gives_no_decision(cascade: Cascade, kind: str) -> None:
    clip = audio_of(UNSEEN, 0.0, 15.0) if kind == "unseen" else np.zeros(15 * SR, np.float32)
    results = one_stream(cascade, clip, 0.5)
    assert len(results) == 16 and results[-1]["final"]
    assert all(r["decision"] is None for r in results)
    if kind == "silence":  # silent windows are not searched at all
        assert all(r["matches"] == [] for r in results)
    # the final answer, as `midimatch identify` words it; only the final result has one
    assert results[-1]["answer"] == answer(SILENT if kind == "silence" else NOT_IN_COLLECTION)
    assert not any("answer" in r for r in results[:-1])


@pytest.mark.parametrize("audio,kind", [
    (np.zeros(0, np.float32), SILENT),  # a stream without audio: nothing to identify
    (np.zeros(SR // 10, np.float32), SILENT),  # too short for a hash frame: no audio counted
    (None, TOO_SHORT),  # 0.1 s of music: too short to search, not silent (identify's words)
    (audio_of(3, 5.0, 6.5), TOO_SHORT),  # 1.5 s of music: under the 2 s a query needs
    # the quiet before the music is not part of the query, here or in identify
    (np.concatenate([np.zeros(6 * SR, np.float32), audio_of(3, 5.0, 6.5)]), TOO_SHORT),
    # a click in silence is not music, but the audio is not silent: identify says too short
    # (the stream said "silent" once the click was left out of its query)
    ("click", TOO_SHORT),
    (audio_of(3, 5.0, 7.5), NOT_IN_COLLECTION),  # 2.5 s: searched, not confident yet
    (np.concatenate([audio_of(3, 5.0, 15.0), np.zeros(3 * SR, np.float32)]), IDENTIFIED),
])
def test_the_final_answer(cascade: Cascade, audio: np.ndarray | None | str, kind: str) -> None:
    if audio is None:
        audio = audio_of(3, 5.0, 5.1)
    elif isinstance(audio, str):  # 6 s of silence with a 10 ms click at 2 s
        audio = np.zeros(6 * SR, np.float32)
        audio[2 * SR:2 * SR + SR // 100] = 0.8
    if audio.size:  # what identify says of the same audio
        try:
            offline = IDENTIFIED if cascade.search_audio(audio, SR).matches else None
        except MidimatchError as e:  # model.errors.AudioError: silent, too short
            offline = e.reason
        if kind in (SILENT, TOO_SHORT):
            assert offline == kind
    eng = Engine(cascade, EngineSettings(window_s=15.0, **EXACT))
    eng.open("s", StreamParams(SR))
    final = stream(eng, "s", audio, 0.5)[-1] if audio.size else None
    if final is None:
        eng.end("s")
        final = next(r for s, r in eng.tick() if s == "s")
    assert final["final"] and final["answer"] == answer(kind)


def test_many_sessions_in_one_tick_equal_each_alone(cascade: Cascade) -> None:
    clips = {f"s{i}": audio_of(i, 2.0 * i, 2.0 * i + 8.0) for i in range(4)}
    alone = {sid: one_stream(cascade, a, 0.25) for sid, a in clips.items()}
    metrics = WorkerMetrics()
    eng = Engine(cascade, EngineSettings(window_s=15.0, **EXACT), metrics)
    for sid in clips:
        eng.open(sid, StreamParams(SR))
    together: dict[str, list[dict]] = {sid: [] for sid in clips}
    n = SR // 4
    for i in range(0, 8 * SR, n):
        for sid, a in clips.items():
            eng.feed(sid, a[i:i + n, None])
        for sid, r in eng.tick():
            together[sid].append(r)
    for sid in clips:
        eng.end(sid)
    for sid, r in eng.tick():
        together[sid].append(r)
    assert together == alone
    assert eng.sessions == 0  # finalised sessions are gone
    assert metrics.batch_size.collect()[0].samples  # batches were observed


def test_feeding_from_another_thread_while_ticking(cascade: Cascade) -> None:
    clip = audio_of(11, 0.0, 8.0)
    alone = one_stream(cascade, clip, 0.1)
    eng = Engine(cascade, EngineSettings(window_s=15.0, **EXACT))
    eng.open("s", StreamParams(SR))
    n = SR // 10

    def feeder() -> None:  # the runner's event loop, while the executor ticks
        for i in range(0, clip.shape[0], n):
            eng.feed("s", clip[i:i + n, None])
        eng.end("s")

    thread = threading.Thread(target=feeder)
    thread.start()
    got: list[dict] = []
    while not (got and got[-1]["final"]):
        got += [r for _, r in eng.tick()]
    thread.join()

    def strip(rs: list[dict]) -> dict:  # the lag depends on how far ahead the feeder ran
        return {(r["audio_s"], r["final"]): {k: v for k, v in r.items() if k != "lag_s"}
                for r in rs}

    mine, ref = strip(got), strip(alone)
    assert mine[(8.0, True)] == ref[(8.0, True)]
    # a period that ends with the stream comes out once, as the final result
    assert set(mine) <= set(ref) and len(mine) >= len(ref) - 1
    assert all(mine[k] == ref[k] for k in mine)


def test_prunes_are_batched_across_sessions(cascade: Cascade) -> None:
    clips = {f"s{i}": audio_of(i, 0.0, 5.0) for i in range(3)}
    counts = {}
    for wait in (0.0, NO_BUDGET):
        metrics = WorkerMetrics()
        eng = Engine(cascade, EngineSettings(tick_budget_s=NO_BUDGET, prune_wait_s=wait),
                     metrics)
        for sid in clips:
            eng.open(sid, StreamParams(SR))
        results = []
        for i in range(0, 5 * SR, SR // 2):
            for sid, a in clips.items():
                eng.feed(sid, a[i:i + SR // 2, None])
            results += eng.tick()
        # results at 1, 2 s are under the 2 s minimum (lookahead): searched at 3, 4, 5 s
        assert len(results) == 15 and all(r["matches"] for _, r in results[6:])
        counts[wait] = prunes(metrics)
    # every result pruned afresh, or one prune for all three at their first searchable result
    assert counts[0.0] == (3.0, 9.0)
    assert counts[NO_BUDGET] == (1.0, 3.0)


def prunes(metrics: WorkerMetrics) -> tuple[float, float]:
    """(prunes made, sessions refreshed in all) from the prune-batch histogram."""
    hist = {s.name: s.value for s in metrics.prune_batch.collect()[0].samples}
    return (hist["midimatch_worker_prune_batch_sessions_count"],
            hist["midimatch_worker_prune_batch_sessions_sum"])


def test_background_prune_refreshes_candidates(cascade: Cascade) -> None:
    metrics = WorkerMetrics()
    eng = Engine(cascade, EngineSettings(tick_budget_s=NO_BUDGET, prune_wait_s=1e-6), metrics)
    clip = audio_of(19, 0.0, 14.0)
    eng.open("s", StreamParams(SR))
    results = stream(eng, "s", clip[:6 * SR], 0.5, end=False)
    for _ in range(500):  # let the prune thread finish and a tick collect it
        if not eng._prunes.running and prunes(metrics)[0] >= 2:
            break
        time.sleep(0.01)
        eng.tick()
    assert prunes(metrics)[0] >= 2  # the first (in the tick) and one from the prune thread
    results += stream(eng, "s", clip[6 * SR:], 0.5)
    assert [r["audio_s"] for r in results] == pytest.approx([*range(1, 15), 14])
    assert results[-1]["matches"][0]["title"] == "song19"


def test_falling_behind_is_visible_and_bounded(cascade: Cascade) -> None:
    metrics = WorkerMetrics()
    eng = Engine(cascade, EngineSettings(tick_budget_s=1e-6, max_pending_s=2.0), metrics)
    clips = {f"s{i}": audio_of(i, 0.0, 12.0) for i in range(3)}
    for sid in clips:
        eng.open(sid, StreamParams(SR))
    results = []
    for i in range(0, 12 * SR, 2 * SR):  # 2 s of audio per tick that is always over budget
        for sid, a in clips.items():
            eng.feed(sid, a[i:i + SR, None])
            eng.feed(sid, a[i + SR:i + 2 * SR, None])
            assert eng._sessions[sid].pending_s <= 2.0  # the queue never exceeds the cap
        before = time.monotonic()
        tick = eng.tick()
        assert tick  # verification is cut, not stopped: at least one session per tick
        assert eng.progress_at >= before  # the runner's watchdog sees a working tick
        results += tick
    assert metrics.degraded_ticks_total._value.get() > 0
    assert eng.lag_s() > 0.0
    assert metrics.audio_lag_seconds._value.get() == pytest.approx(eng.lag_s())
    assert metrics.errors_total.labels("audio_dropped")._value.get() > 0
    assert any(r["lag_s"] > 0 for _, r in results)
    # stream time still counts the dropped audio: every session is at 12 s processed + queued
    for sid in clips:
        s = eng._sessions[sid]
        assert s.audio_s + s.pending_s == pytest.approx(12.0)


def test_memory_per_session_is_bounded(cascade: Cascade) -> None:
    eng = Engine(cascade, EngineSettings(window_s=30.0, **EXACT))
    eng.open("s", StreamParams(48000, channels=2))
    clip = audio_of(11, 0.0, 30.0)
    stereo = np.repeat(np.interp(np.arange(30 * 48000) * SR / 48000, np.arange(clip.shape[0]),
                                 clip).astype(np.float32)[:, None], 2, axis=1)
    results = stream(eng, "s", stereo, 0.1, sample_rate=48000, end=False)
    assert results[-1]["matches"][0]["title"] == "song11"  # resampled stereo still matches
    assert 0 < eng.nbytes("s") < 2_000_000


def test_session_api_errors(cascade: Cascade) -> None:
    metrics = WorkerMetrics()
    eng = Engine(cascade, EngineSettings(max_sessions=2), metrics)
    eng.open("a", StreamParams(SR))
    with pytest.raises(EngineError) as e:
        eng.open("a", StreamParams(SR))
    assert e.value.reason == "session_exists"
    eng.open("b", StreamParams(SR))
    with pytest.raises(EngineError) as e:
        eng.open("c", StreamParams(SR))
    assert e.value.reason == "full"
    for bad in (np.full((10, 1), np.nan, np.float32), np.zeros((10, 2), np.float32),
                np.zeros(10, np.int16)):
        with pytest.raises(EngineError) as e:
            eng.feed("a", bad)
        assert e.value.reason == "bad_audio"
    assert metrics.errors_total.labels("bad_audio")._value.get() == 0  # the caller counts it
    with pytest.raises(EngineError) as e:
        eng.feed("nope", np.zeros((10, 1), np.float32))
    assert e.value.reason == "unknown_session"
    eng.end("a")
    with pytest.raises(EngineError) as e:
        eng.feed("a", np.zeros((10, 1), np.float32))
    assert e.value.reason == "ended"
    eng.drop("b")
    assert eng.sessions == 1
    (sid, final), = eng.tick()  # a session ended without audio still gets its final result
    assert sid == "a" and final["final"] and final["matches"] == []
    assert eng.sessions == 0


@pytest.mark.parametrize("seed", [3, 14, 12])
def test_audio_faster_than_real_time_is_not_verified_against_stale_candidates(
        cascade: Cascade, seed: int) -> None:
    # A file streamed at full speed (or a takeover's retained window) arrives in one tick, well
    # before the shared prune's wall-clock wait: the candidates must still follow the audio (the
    # bug: a whole 28 s demo verified against the candidates of its first 2 s, never decided,
    # while `midimatch identify` named it at confidence 1.0). top_k 3 of 20 so that stale
    # candidates miss the piece.
    clip = audio_of(seed, 8.0, 20.0)
    narrow = cascade.with_config(top_k=3)
    offline = narrow.search_audio(clip, SR)
    metrics = WorkerMetrics()
    eng = Engine(narrow, EngineSettings(window_s=15.0, top_k=3, tick_budget_s=NO_BUDGET,
                                        prune_wait_s=60.0), metrics)
    eng.open("s", StreamParams(SR))
    final = stream(eng, "s", clip, 1000.0)[-1]
    assert prunes(metrics)[0] >= 3  # 12 s of audio, a prune at least every 3 s of it
    assert offline.matches[0].title == f"song{seed}"
    assert final["matches"][0]["title"] == offline.matches[0].title


def _quiet_tail(seconds: float, dbfs: float | None) -> np.ndarray:
    n = int(seconds * SR)
    if dbfs is None:
        return np.zeros(n, np.float32)
    noise = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    return noise * np.float32(10.0 ** (dbfs / 20.0))


@pytest.mark.parametrize("tail_s", [3.0, 8.0])
@pytest.mark.parametrize("tail_dbfs", [None, -65.0, -45.0])
def test_a_decision_survives_the_silence_at_the_end_of_a_take(cascade: Cascade,
                                                               tail_dbfs: float | None,
                                                               tail_s: float) -> None:
    # the demo excerpts end with ~2 s of silence: their final result said "no confident match"
    # after 6 s of "identified" (None: digital silence; -65 dBFS: a quiet room; -45 dBFS: hiss
    # 30+ dB under the music). This fixture's song is so clearly right that 3 s of silence did
    # not drop it before quiet periods were held; 8 s did (checked on the old rule).
    music = audio_of(10, 0.0, 14.0)
    results = one_stream(cascade, np.concatenate([music, _quiet_tail(tail_s, tail_dbfs)]), 0.5)
    decided = [r for r in results if r["audio_s"] <= 14.0 and r["decision"]]
    assert decided and decided[-1]["decision"]["title"] == "song10"
    after = [r for r in results if r["audio_s"] > 14.0]
    assert after[-1]["final"]
    assert all(r["decision"] and r["decision"]["title"] == "song10" for r in after)


def test_a_decision_is_not_held_through_a_long_silence(cascade: Cascade) -> None:
    from worker.session import HOLD_QUIET_S

    music = audio_of(10, 0.0, 14.0)
    results = one_stream(cascade, np.concatenate([music, _quiet_tail(HOLD_QUIET_S + 4, None)]),
                         1.0)
    assert any(r["decision"] for r in results if r["audio_s"] <= 14.0)
    assert results[-1]["final"] and results[-1]["decision"] is None
    held = [r["audio_s"] for r in results if r["audio_s"] > 14.0 and r["decision"]]
    assert held and max(held) <= 14.0 + HOLD_QUIET_S + 1.0


def test_silence_alone_decides_nothing_and_music_after_a_pause_is_decided(
        cascade: Cascade) -> None:
    # quiet periods count neither for nor against: a pause before the music changes nothing
    # (with the candidate motion3 this stream was decided as song5 at 11 s: the query window
    # held the silence; now the silence before the music is left out of the query)
    pause_then_music = np.concatenate([np.zeros(5 * SR, np.float32), audio_of(12, 0.0, 12.0)])
    results = one_stream(cascade, pause_then_music, 0.5)
    assert all(r["decision"] is None for r in results if r["audio_s"] <= 5.0)
    assert results[-1]["decision"] and results[-1]["decision"]["title"] == "song12"
    decided = [r["decision"] for r in results if r["decision"]]
    assert all(d["title"] == "song12" for d in decided)
    # positions in the piece, not in the stream: the music started 5 s in
    last = results[-1]
    assert last["decision"]["position_s"] == pytest.approx(last["audio_s"] - 5.0, abs=1.0)


@pytest.mark.parametrize("click_s", [1.0, 3.5])
def test_a_click_in_the_pause_before_the_music_changes_nothing(cascade: Cascade,
                                                              click_s: float) -> None:
    # a click (a bump of the microphone) in the 5 s before the music counted as music, so the
    # silence after it stayed in the query: song5 (a soft start) was the top match at
    # confidence 1.0 for 3-4 results and song12 was decided 3-5 s later than without the click
    # (song0 not at all). worker.onset: a period needs sustained sound, and the query starts
    # where the sound is sustained, as the offline model.features.music_span does.
    lead = np.zeros(5 * SR, np.float32)
    plain = one_stream(cascade, np.concatenate([lead, audio_of(12, 0.0, 12.0)]), 0.5)
    lead[int(click_s * SR):int(click_s * SR) + SR // 100] = 0.8
    clicked = one_stream(cascade, np.concatenate([lead, audio_of(12, 0.0, 12.0)]), 0.5)

    def said(results: list[dict]) -> list[tuple]:
        return [(r["audio_s"], [m["title"] for m in r["matches"][:1]],
                 r["decision"] and r["decision"]["title"]) for r in results]

    assert said(clicked) == said(plain)
    assert all(r["decision"] is None for r in clicked if r["audio_s"] <= 5.0)
    assert clicked[-1]["decision"]["title"] == "song12"


def test_sessions_prune_with_the_hashes_too_as_the_offline_cascade_does(cascade: Cascade) -> None:
    """The live candidate refresh passes the session's query hashes to the cascade's prune
    (the coarse hash-DTW prune, index.hash_prune): the same candidates, so the same matches,
    as the offline search, when only some references are verified."""
    # song0: with 32bit-bf4ddae7cb43, song1's clip (used before) leaves the last place to the
    # embedding prune, and the two references nearest for it (index 7 and 2) swap places between
    # the streaming and the whole-clip embedding; the other CLEAR songs' clips agree
    clip = audio_of(0, 4.0, 14.0)
    narrow = cascade.with_config(top_k=4, top_n=5, hash_prune=3)
    code = narrow.encode(narrow_frames := _frames(clip))
    with_hashes = narrow.prune(code.embedding[None], [code.hashes])[0][0]
    embedding_only = narrow.prune(code.embedding[None])[0][0]
    # what makes this test mean something: the two prunes keep different references here
    assert set(with_hashes) != set(embedding_only) and len(set(with_hashes)) == 4
    offline = narrow.search_frames(narrow_frames)
    assert {m.ref for m in offline.matches} == set(with_hashes)
    eng = Engine(narrow, EngineSettings(window_s=15.0, top_k=4, top_n=5, **EXACT))
    eng.open("s", StreamParams(SR))
    final = stream(eng, "s", clip, 0.37)[-1]
    assert final["final"]
    assert [m["title"] for m in final["matches"]] == [m.title for m in offline.matches]
    for got, m in zip(final["matches"], offline.matches, strict=True):
        assert got["score"] == pytest.approx(m.score, abs=1e-3)


def _frames(audio: np.ndarray) -> np.ndarray:
    from model.features import audio_to_frames

    return audio_to_frames(audio, SR)


@pytest.mark.parametrize("every_s", [0.0, 4.0])
def test_a_session_runs_the_hash_prune_every_few_seconds_of_audio_and_for_its_final(
        cascade: Cascade, every_s: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hash prune cannot be batched, so a session keeps its answer for ``every_s`` of
    audio (the embedding part of its candidates is fresh at every refresh); its first search
    and its final result run it."""
    narrow = cascade.with_config(top_k=4, hash_prune=3)
    ran: list[float] = []
    eng = Engine(narrow, EngineSettings(window_s=15.0, top_k=4, hash_prune_every_s=every_s,
                                        **EXACT))
    real = eng._prunes.cascade.hash_prune

    def counted(hashes):
        ran.append(eng._sessions["s"].audio_s)
        return real(hashes)

    monkeypatch.setattr(eng._prunes.cascade, "hash_prune", counted)
    eng.open("s", StreamParams(SR))
    results = stream(eng, "s", audio_of(3, 2.0, 14.5), 0.5)
    searched = [r["audio_s"] for r in results if r["matches"]]
    assert results[-1]["final"] and searched[-1] == pytest.approx(12.5)
    if every_s == 0:
        assert ran == pytest.approx(searched)  # at every refresh
    else:  # the first search, every 4 s of audio after it, the final
        first = searched[0]
        assert ran == pytest.approx([first, first + 4.0, first + 8.0, 12.5])
        assert len(searched) > len(ran) + 5
    s = eng._sessions.get("s")
    assert s is None or s.hash_ids is not None


def test_a_change_of_music_forgets_the_hash_prunes_answer(cascade: Cascade) -> None:
    from worker.session import Session

    narrow = cascade.with_config(top_k=4, hash_prune=3)
    s = Session("s", StreamParams(SR), narrow, Engine(narrow)._config)
    s.hash_ids = np.arange(3)
    s.n_query = s.config.change_hashes + 4  # enough query for a restart
    s.restart_recent()
    assert s.hash_ids is None


def test_sessions_of_a_hash_only_cascade_match_the_offline_search(cascade: Cascade) -> None:
    clip = audio_of(1, 4.0, 14.0)
    narrow = cascade.with_config(top_k=4, top_n=5, hash_prune=4)
    offline = narrow.search_frames(_frames(clip))
    eng = Engine(narrow, EngineSettings(window_s=15.0, top_k=4, top_n=5, **EXACT))
    eng.open("s", StreamParams(SR))
    final = stream(eng, "s", clip, 0.37)[-1]
    assert [m["title"] for m in final["matches"]] == [m.title for m in offline.matches]
    assert len(offline.matches) == 4
