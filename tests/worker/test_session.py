"""Session: one stream's queue, result boundaries, query window, ranking and result message."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from index.build import BuildOptions, build_index
from index.search import Cascade
from tests.conftest import make_piece
from worker.bus import StreamParams
from worker.session import EngineError, Session, SessionConfig

SR = 22050
CONFIG = SessionConfig(window_hashes=10, slack_hashes=5, result_every_s=1.0, max_pending_s=2.0,
                       change_hashes=4)


@pytest.fixture(scope="module")
def cascade(tmp_path_factory: pytest.TempPathFactory) -> Cascade:
    root = tmp_path_factory.mktemp("session")
    coll = root / "collection"
    coll.mkdir()
    for i in range(6):
        make_piece(i, duration_s=15.0).write(str(coll / f"piece{i}.mid"))
    shutil.copy(coll / "piece0.mid", coll / "twin.mid")  # same hashes: ties
    build_index(root / "index", [coll], BuildOptions(workers=1, progress=False))
    return Cascade.open(root / "index")


def tone(seconds: float, amplitude: float = 0.3, rate: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)[:, None]


def feed_all(s: Session, pcm: np.ndarray) -> None:
    """Queue ``pcm`` a second at a time (the cap is 2 s) and process it all, frames only (a
    result at each boundary, unranked)."""
    for i in range(0, pcm.shape[0], SR):
        s.enqueue(pcm[i:i + SR], None)
        while s.pending_samples:
            s.features(s.take_audio())
            if s.is_due:
                s.result(None)


def test_audio_is_cut_at_result_boundaries(cascade: Cascade) -> None:
    s = Session("s", StreamParams(SR), cascade, CONFIG, t0_s=5.0)
    cuts = []
    for k in range(8):  # 0.37 s chunks
        s.enqueue(tone(0.37), received_at=float(k))
        while s.pending_samples:
            pcm = s.take_audio()
            cuts.append(s.stream_samples)
            if s.is_due:
                s.result(None)
            assert pcm.shape[1] == 1
    assert SR in cuts and 2 * SR in cuts  # a cut exactly at every whole second
    assert s.consumed == 8 * int(0.37 * SR)
    assert s.audio_s == pytest.approx(5.0 + s.consumed / SR)
    assert s.newest_received == 7.0  # the newest chunk taken


def test_full_queue_drops_the_oldest_audio(cascade: Cascade) -> None:
    s = Session("s", StreamParams(SR), cascade, CONFIG)
    ramp = np.arange(3 * SR, dtype=np.float32)[:, None] / (3 * SR)
    assert s.enqueue(ramp[:SR], None) == 0
    assert s.enqueue(ramp[SR:], None) == SR  # 3 s queued against a 2 s cap: 1 s dropped
    assert s.pending_s == pytest.approx(2.0)
    first = s.take_audio()
    assert first[0, 0] == ramp[SR, 0]  # what is left starts with the newest two seconds
    assert s.stream_samples == 2 * SR  # dropped audio still counts in stream time
    assert s.audio_s == pytest.approx(2.0)


def test_query_window_slides_past_window_plus_slack(cascade: Cascade) -> None:
    s = Session("s", StreamParams(SR), cascade, CONFIG)
    hashes = np.arange(1, 40, dtype=s.query.dtype)
    s.add_hashes(hashes[:12])
    assert s.n_query == 12 and s.query_start == 0
    s.dtw.set_candidates(np.array([0, 1]))
    s.dtw.extend(s.query[:s.n_query])
    s.add_hashes(hashes[12:16])  # 16 > 10 + 5: keep the newest 10
    assert s.n_query == 10 and s.query_start == 6
    np.testing.assert_array_equal(s.query[:10], hashes[6:16])
    assert not s.dtw._from_row.any()  # every candidate starts over from the new window
    s.add_hashes(hashes[16:19])
    assert s.n_query == 13 and s.n_hashes == 19


def feed_hashed(s: Session, pcm: np.ndarray, chunk: int):
    """Queue ``pcm`` ``chunk`` samples at a time and process each: frames, a hash frame of ones
    per 4 frames into the query, a result (unranked) when due; yields each chunk's first
    sample once it is processed."""
    for i in range(0, pcm.shape[0], chunk):
        s.enqueue(pcm[i:i + chunk], None)
        while s.pending_samples:
            frames = s.features(s.take_audio())
            s.add_hashes(np.ones(frames.shape[0] // 4, s.query.dtype))
            if s.is_due:
                s.result(None)
        yield i


def test_silent_or_short_queries_are_not_searched(cascade: Cascade) -> None:
    s = Session("s", StreamParams(SR), cascade, CONFIG)
    min_frames = cascade.config.min_query_frames
    feed_all(s, np.zeros((3 * SR, 1), np.float32))
    s.add_hashes(np.ones(s.n_frames // 4, s.query.dtype))
    assert s.query_frames >= min_frames and not s.searchable(min_frames)  # silent
    for seconds, searchable in ((1.0, False), (3.0, True)):  # too short, then long enough
        loud = Session("l", StreamParams(SR), cascade, CONFIG)
        feed_all(loud, tone(seconds))
        loud.add_hashes(np.ones(loud.n_frames // 4, loud.query.dtype))
        assert loud.searchable(min_frames) is searchable


def test_quiet_before_the_first_music_is_left_out_of_the_query(cascade: Cascade) -> None:
    # 5 s of silence then a song was decided as another song whose drums start softly: the
    # query window held the silence. Quiet before any music now clears the query; a pause
    # after music does not.
    from model.features import FRAME_RATE

    s = Session("s", StreamParams(SR), cascade, CONFIG)
    s.candidates = np.array([0, 1])
    s.dtw.set_candidates(s.candidates)

    def second(pcm: np.ndarray) -> None:
        s.enqueue(pcm, None)
        while s.pending_samples:
            frames = s.features(s.take_audio())
            s.add_hashes(np.ones(frames.shape[0] // 4, s.query.dtype))
            if s.is_due:
                s.result(None)

    for _ in range(3):
        second(np.zeros((SR, 1), np.float32))
    assert s.n_hashes > 0 and s.n_query == 0 and s.query_start == s.n_hashes
    assert s.candidates.size == 0 and s.hash_ids is None  # pruned afresh on the music
    assert s.embedder.n_frames == 0
    for _ in range(2):
        second(tone(1.0))
    start = s.query_start  # where the music started (test_the_query_starts_where_the_music_does)
    assert s.music_in_query and start * 4 / FRAME_RATE == pytest.approx(3.0, abs=0.3)
    assert s.n_query == s.n_hashes - start
    second(np.zeros((SR, 1), np.float32))  # a pause in the music: kept
    assert s.query_start == start and s.n_query == s.n_hashes - start


def test_the_query_starts_where_the_music_does(cascade: Cascade) -> None:
    # within a result period too: 0.25 s of silence before 8 s of music took the offline
    # search's confidence from 0.95 to 0.75 and its position to another bar
    from model.features import FRAME_RATE

    s = Session("s", StreamParams(SR), cascade, CONFIG)
    pcm = np.concatenate([np.zeros((int(3.55 * SR), 1), np.float32), tone(2.0)])
    for _ in feed_hashed(s, pcm, SR // 2):  # 0.5 s chunks, results every 1 s
        pass
    assert s.music_in_query and s.n_query > 0
    assert s.query_start * 4 / FRAME_RATE == pytest.approx(3.55, abs=0.3)
    assert s.n_query == s.n_hashes - s.query_start


def test_a_click_before_the_music_is_not_its_start(cascade: Cascade) -> None:
    # a 10 ms click 5 s before a chorale took the offline search from 1.000 to "not in the
    # collection" (model.features.music_span's click rule); live, the click's second counted
    # as music and kept the silence after it in the query
    from model.features import FRAME_RATE

    s = Session("s", StreamParams(SR), cascade, CONFIG)
    click = np.zeros((SR, 1), np.float32)
    click[int(0.3 * SR):int(0.31 * SR)] = 0.8
    pcm = np.concatenate([np.zeros((SR, 1), np.float32), click,
                          np.zeros((3 * SR, 1), np.float32), tone(3.0)])
    for i in feed_hashed(s, pcm, SR // 2):
        if i < 5 * SR:
            assert not s.music_in_query  # the click's second is quiet: the query is cleared
    assert s.music_in_query and s.quiet_s == 0.0
    assert s.query_start * 4 / FRAME_RATE == pytest.approx(5.0, abs=0.3)


def test_ranking_equals_offline_verify_including_ties(cascade: Cascade) -> None:
    s = Session("s", StreamParams(SR), cascade, CONFIG)
    titles = [r["title"] for r in cascade.index.refs]
    p0, twin = titles.index("piece0"), titles.index("twin")
    query = np.asarray(cascade.index.hash_sequence(p0))[5:15].copy()
    s.add_hashes(query)
    for order in ([twin, p0, 1, 2], [p0, twin, 2, 1]):
        cand = np.array([r for r in order if r < len(titles)])
        s.refresh(cand)
        got, want = s.verify(), cascade.verify(query, cand)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
        assert got.refs[0] == cand[0]  # equal scores keep the prune order


def test_candidates_are_cut_at_the_frame_budget(cascade: Cascade) -> None:
    lengths = np.diff(np.asarray(cascade.index.hash_offsets))
    order = np.argsort(lengths)[::-1]  # longest first, as a prune might rank them
    budget = int(lengths[order[0]] + lengths[order[1]])
    s = Session("s", StreamParams(SR), cascade,
                dataclasses.replace(CONFIG, max_candidate_frames=budget), 0.0)
    s.refresh(order)
    np.testing.assert_array_equal(s.candidates, order[:2])  # the two nearest fill the budget
    np.testing.assert_array_equal(np.sort(s.dtw.refs), np.sort(order[:2]))
    tiny = Session("t", StreamParams(SR), cascade,
                   dataclasses.replace(CONFIG, max_candidate_frames=1), 0.0)
    tiny.refresh(order)
    assert tiny.candidates.tolist() == [order[0]]  # never none


def piece3_session(cascade: Cascade, rule: str, evidence_threshold: float,
                   frames: slice) -> tuple[Session, list]:
    """A session with ``rule``'s decision whose query is ``frames`` of piece3's own hash
    sequence, verified against every reference; and its ranking."""
    from index.decision import StreamDecision
    from index.evidence import EvidenceDecision

    s = Session("s", StreamParams(SR), cascade, CONFIG)
    cal = cascade.calibration
    s.decision = StreamDecision(cal) if rule == "fixed" else EvidenceDecision(
        cal, threshold=evidence_threshold)
    titles = [r["title"] for r in cascade.index.refs]
    query = np.asarray(cascade.index.hash_sequence(titles.index("piece3")))[frames].copy()
    s.add_hashes(query)
    s.n_frames = 4 * query.shape[0]
    cand = np.arange(len(titles))
    s.refresh(cand)
    return s, cascade.confirm(query, cand, s.verify(), s.query_frames)


@pytest.mark.parametrize("rule", ["fixed", "evidence"])
def test_result_message_shape_and_decision(cascade: Cascade, rule: str) -> None:
    s, matches = piece3_session(cascade, rule, cascade.calibration.evidence_threshold or 10.0,
                                slice(10, 20))
    results = [s.result(matches) for _ in range(s.decision.stable_results if rule == "fixed"
                                                 else 12)]
    r = results[-1]
    assert set(r) == {"audio_s", "lag_s", "final", "matches", "decision"}
    assert r["final"] is False and len(r["matches"]) == cascade.config.top_n
    assert set(r["matches"][0]) == {"id", "title", "confidence", "score", "position_s"}
    assert r["matches"][0]["title"] == "piece3"
    if rule == "fixed":  # stable for stable_results results
        confident = cascade.calibration.is_confident(matches[0].confidence)
        assert (r["decision"] is not None) == confident
        assert results[0]["decision"] is None or s.decision.stable_results == 1
    else:  # decided once the evidence reached the threshold, never on one result
        evidence = s.decision.evidence(matches[0].ref)
        assert (r["decision"] is not None) == (evidence >= s.decision.threshold)
        assert results[0]["decision"] is None
    json.dumps(results)  # plain JSON types only
    assert s.result(None)["decision"] is None  # an empty ranking breaks the streak


def test_restart_on_music_change_keeps_the_newest_frames(cascade: Cascade) -> None:
    s = Session("s", StreamParams(SR), cascade, CONFIG)
    feed_all(s, tone(2.0))
    hashes = np.arange(1, 13, dtype=s.query.dtype)
    s.add_hashes(hashes)
    s.restart_recent()
    assert s.n_query == CONFIG.change_hashes and s.query_start == 12 - CONFIG.change_hashes
    np.testing.assert_array_equal(s.query[:s.n_query], hashes[-CONFIG.change_hashes:])
    start, end = s.embedder.window_span  # the embedding restarts from the newest CQT frames
    assert end - start <= 4 * CONFIG.change_hashes
    assert s.embedder.pooled() is not None


@pytest.mark.parametrize("rule", ["fixed", "evidence"])
def test_a_restart_keeps_the_evidence_rule_and_its_decision(cascade: Cascade, rule: str) -> None:
    """A false alarm of the change check used to throw a decided piece away (two EAS streams
    lost their decision at the end of the music, docs/benchmarks.md): the evidence rule keeps
    its evidence through a restart and follows a real change on its own; the fixed-count rule's
    run starts over."""
    s, matches = piece3_session(cascade, rule, 5.0, slice(10, 30))
    for _ in range(12):
        decided = s.result(matches)["decision"]
    assert decided is not None and decided["title"] == "piece3"
    s.restart_recent()
    if rule == "evidence":
        assert s.held is not None and s.decision.evidence(matches[0].ref) >= 5.0
        assert s.result(matches)["decision"]["title"] == "piece3"  # decided from the first result
    else:
        assert s.held is None and s.result(matches)["decision"] is None


def test_memory_and_validation(cascade: Cascade) -> None:
    with pytest.raises(EngineError):
        Session("s", StreamParams(SR), cascade, CONFIG, t0_s=float("nan"))
    s = Session("s", StreamParams(48000, channels=2), cascade, CONFIG)
    empty = s.nbytes
    s.enqueue(np.zeros((48000, 2), np.float32), None)
    assert s.nbytes == empty + 48000 * 2 * 4  # queued audio counts
    s.dtw.set_candidates(np.arange(len(cascade.index)))
    assert s.nbytes > empty + 48000 * 8
    assert s.nbytes < 2_000_000
    s.ended = True
    with pytest.raises(EngineError, match="ended"):
        s.enqueue(np.zeros((10, 2), np.float32), None)


def test_the_evidence_rule_is_live_and_holds_through_quiet_periods(
        cascade: Cascade, monkeypatch: pytest.MonkeyPatch) -> None:
    from index.cascade_types import Match
    from index.evidence import EvidenceDecision

    # the default shape (stream={}: no fitted shape recorded), whatever the shipped one is
    cal = dataclasses.replace(cascade.calibration, evidence_threshold=4.0, stream={})
    monkeypatch.setattr(cascade, "calibration", cal)
    s = Session("s", StreamParams(SR), cascade, CONFIG)
    assert isinstance(s.decision, EvidenceDecision)  # the calibration has its threshold

    refs = {"A": 0, "other": 1, "B": 2}

    def result(top: str, position_s: float, loud: bool) -> dict:
        s._energy_now = [SR, SR * (0.01 if loud else 0.0)]  # a period of music, or silence
        s.blocks.period_run = loud  # (sustained sound, worker.onset)
        ranking = [Match(refs[name], name, name, conf, 1.0, 0.0, 1.0, pos)
                   for name, conf, pos in [(top, 0.95, position_s), ("other", 0.3, 3.0)]]
        return s.result(ranking)

    decided = [result("A", 10.0 + t, True)["decision"] for t in range(6)]
    assert decided[0] is None and decided[-1]["id"] == "A"
    evidence = s.decision.evidence(0)
    # 3 s of silence, ranked or not: the decision is held and the evidence is untouched
    quiet = [result("B", 50.0 + t, False)["decision"] for t in range(3)]
    assert all(d is not None and d["id"] == "A" for d in quiet)
    assert s.decision.evidence(0) == evidence and s.decision.evidence(2) == 0.0
    assert s.nbytes < 2_000_000
