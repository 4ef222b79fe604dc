"""The decision rule, offline and on streams, and its calibration on whole streams."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest

from index.calibration import Calibration
from index.decision import (
    StreamDecision,
    calibrate_stream,
    decide,
    keeps_step,
    simulate_stream,
)


@dataclass(frozen=True)
class M:
    ref: int
    confidence: float


def test_decide_offline_and_not_in_collection():
    cal = Calibration("m", threshold=0.7)
    assert decide([M(3, 0.9), M(1, 0.8)], cal) == M(3, 0.9)
    assert decide([M(3, 0.6)], cal) is None
    assert decide([], cal) is None


def test_stream_needs_the_same_confident_top1_in_a_row():
    dec = StreamDecision(Calibration("m", threshold=0.5, stable_results=3))
    seq = [M(1, 0.9), M(1, 0.9), M(2, 0.9), M(2, 0.8), M(2, 0.7), M(2, 0.3), M(2, 0.9)]
    got = [dec.update([m]) for m in seq]
    assert got == [None, None, None, None, M(2, 0.7), None, None]
    dec.reset()
    assert [dec.update([M(5, 1.0)]) for _ in range(3)][-1] == M(5, 1.0)
    assert StreamDecision(Calibration("m"), stable_results=1).update([M(4, 0.5)]) == M(4, 0.5)

def _trace(tops, confs, start_s=3.0):
    return [(start_s + i, t, c) for i, (t, c) in enumerate(zip(tops, confs, strict=True))]


def test_simulate_stream_replays_runs_of_confident_results():
    # k = 3 at 0.8: "a" twice, then a gap resets; "b" is interrupted by a 0.5; three more "b"
    trace = [(3.0, "a", 0.9), (4.0, "a", 0.9), (5.0, None, 0.0), (6.0, "b", 0.9),
             (7.0, "b", 0.5), (8.0, "b", 0.85), (9.0, "b", 0.9), (10.0, "b", 0.95)]
    assert simulate_stream(trace, 0.8, 3) == (10.0, "b")
    assert simulate_stream(trace, 0.8, 2) == (4.0, "a")
    assert simulate_stream(trace, 0.8, 4) is None
    assert simulate_stream(trace, 0.95, 1) == (10.0, "b")  # the threshold is inclusive
    assert simulate_stream(trace, 0.96, 1) is None
    # a change of top-1 restarts the run even when both are confident
    assert simulate_stream([(1.0, "a", 0.9), (2.0, "b", 0.9), (3.0, "a", 0.9)], 0.5, 2) is None
    assert simulate_stream([], 0.5, 1) is None


def test_stream_decision_takes_string_and_numpy_references():
    dec = StreamDecision(Calibration("m", threshold=0.5, stable_results=2))
    assert dec.update([M(np.int64(4), 0.9)]) is None
    assert dec.update([M(4, 0.9)]) == M(4, 0.9)  # np.int64(4) and 4 are one run
    dec = StreamDecision(Calibration("m", threshold=0.5, stable_results=2))
    assert dec.update([M("ab", 0.9)]) is None and dec.update([M("ab", 0.9)]) == M("ab", 0.9)


def test_stream_threshold_overrides_the_query_threshold_for_streams_only():
    cal = Calibration("m", threshold=0.5, stream_threshold=0.8, stable_results=1)
    assert decide([M(1, 0.6)], cal) == M(1, 0.6)  # one query: 0.5
    assert StreamDecision(cal).update([M(1, 0.6)]) is None  # a stream: 0.8
    assert StreamDecision(cal).update([M(1, 0.85)]) == M(1, 0.85)
    assert Calibration("m", threshold=0.5).stream_cut == 0.5


def test_calibrate_stream_caps_deciding_outsiders_and_picks_the_fastest_rule():
    rng = np.random.default_rng(0)
    # out-of-collection: a different top-1 every result with confidences up to ~0.7, and a few
    # streams stuck on one wrong reference at 0.6
    outs = [_trace([str(rng.integers(100)) for _ in range(18)], rng.uniform(0, 0.7, 18))
            for _ in range(190)]
    outs += [_trace(["77"] * 18, [0.6] * 18) for _ in range(10)]
    # in-collection: right from the 2nd result on with confidence 0.9
    ins = [_trace(["x"] + ["1"] * 17, [0.3] + [0.9] * 17) for _ in range(50)]
    cal = calibrate_stream(Calibration("m", threshold=0.5), ins, ["1"] * 50, outs,
                           max_false_rate=0.01, source="synthetic")
    assert cal.threshold == 0.5  # the single-query threshold is untouched
    false = np.mean([simulate_stream(t, cal.stream_cut, cal.stable_results) is not None
                     for t in outs])
    assert false <= 0.01
    # k = 1 needs a threshold above ~0.7, under which the ins still decide at 4 s: fastest
    assert cal.stable_results == 1 and 0.6 < cal.stream_cut <= 0.9
    assert {r["stable_results"] for r in cal.stream["tried"]} == {1, 2, 3, 4}
    best = next(r for r in cal.stream["tried"] if r["stable_results"] == 1)
    assert best["median_s"] == 4.0 and best["identified"] == 1.0 and best["false_rate"] <= 0.01
    # and it survives the JSON round trip
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal


def test_calibrate_stream_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one out-of-collection"):
        calibrate_stream(Calibration("m"), [], [], [])
    with pytest.raises(ValueError, match="traces but"):
        calibrate_stream(Calibration("m"), [_trace(["1"], [1.0])], [], [_trace(["1"], [1.0])])


@dataclass(frozen=True)
class MP:
    ref: int
    confidence: float
    position_s: float


def test_keeps_step_allows_tempo_and_jitter_not_jumps():
    assert keeps_step((1.0, 10.0), (2.0, 11.0))
    assert keeps_step((1.0, 10.0), (3.0, 12.9))  # 2 s on, 0.1 s off
    assert keeps_step((1.0, 10.0), (2.0, 11.75))  # 0.3 x 1 s + 0.5 s allowed
    assert not keeps_step((1.0, 10.0), (2.0, 11.9))
    assert not keeps_step((1.0, 10.0), (2.0, 9.0))  # backwards
    assert not keeps_step((1.0, 10.0), (2.0, 40.0))  # another repeat, far away
    assert not keeps_step(None, (2.0, 11.0))
    assert not keeps_step((1.0, math.nan), (2.0, 11.0))


def test_keep_step_restarts_the_run_where_the_position_jumps():
    cal = Calibration("m", threshold=0.0, stream_threshold=0.5, stable_results=3,
                      keep_step=True)
    dec = StreamDecision(cal)
    positions = [20.0, 21.0, 40.0, 41.0, 42.0]  # a jump at the 3rd result
    got = [dec.update([MP(7, 0.9, p)], audio_s=t + 1.0) for t, p in enumerate(positions)]
    assert [g is not None for g in got] == [False, False, False, False, True]
    # the same results without keep_step decide at the 3rd
    dec = StreamDecision(Calibration("m", threshold=0.0, stream_threshold=0.5,
                                     stable_results=3))
    got = [dec.update([MP(7, 0.9, p)], audio_s=t + 1.0) for t, p in enumerate(positions)]
    assert [g is not None for g in got] == [False, False, True, True, True]
    # keep_step without the stream's clock cannot tell, so it never decides
    dec = StreamDecision(cal)
    assert all(dec.update([MP(7, 0.9, 20.0 + t)]) is None for t in range(6))


def test_simulate_stream_with_keep_step_needs_the_position_to_move_with_the_stream():
    # positions advance 1 s a second (rows 1-3), then jump back 10 s (row 4), then advance again
    trace = [(1.0, "a", 0.9, 30.0), (2.0, "a", 0.9, 31.0), (3.0, "a", 0.9, 32.1),
             (4.0, "a", 0.9, 22.0), (5.0, "a", 0.9, 23.0), (6.0, "a", 0.9, 24.0)]
    assert simulate_stream(trace, 0.5, 3, keep_step=True) == (3.0, "a")
    assert simulate_stream(trace, 0.5, 4, keep_step=True) is None  # the jump restarts the run
    assert simulate_stream(trace, 0.5, 4) == (4.0, "a")  # without keep_step it decides
    # no position: keep_step cannot tell, so a run never grows past one
    assert simulate_stream([(t, "a", 0.9) for t in (1.0, 2.0, 3.0)], 0.5, 2, keep_step=True) \
        is None
    assert simulate_stream([(t, "a", 0.9) for t in (1.0, 2.0, 3.0)], 0.5, 1, keep_step=True) \
        == (1.0, "a")


def test_calibrate_stream_chooses_keep_step_when_outsiders_wander():
    rng = np.random.default_rng(1)
    # outsiders stuck on one wrong reference, confident, but their position goes anywhere
    outs = [[(1.0 + i, "77", 0.95, float(rng.uniform(0, 20) + 50 * (i % 4))) for i in range(18)]
            for _ in range(100)]
    # insiders: right and keeping step from the 2nd result, confidence 0.8
    ins = [[(1.0, "x", 0.3, 0.0)] + [(1.0 + i, "1", 0.8, 30.0 + i) for i in range(1, 18)]
           for _ in range(40)]
    assert not calibrate_stream(Calibration("m", threshold=0.5), ins, ["1"] * 40,
                                outs).keep_step  # opt-in
    cal = calibrate_stream(Calibration("m", threshold=0.5), ins, ["1"] * 40, outs,
                           step_choices=(False, True))
    assert cal.keep_step and cal.stable_results == 2 and cal.stream_cut < 0.8
    assert {(r["stable_results"], r["keep_step"]) for r in cal.stream["tried"]} == {
        (k, s) for k in (1, 2, 3, 4) for s in (False, True)}
    # without keep_step no threshold under the outsiders' 0.95 lets an insider decide
    plain = [r for r in cal.stream["tried"] if not r["keep_step"]]
    assert all(r["identified"] == 0.0 for r in plain)
    assert simulate_stream(ins[0], cal.stream_cut, cal.stable_results, cal.keep_step) == (
        3.0, "1")
    # traces without positions cannot try it
    with pytest.raises(ValueError, match="position"):
        calibrate_stream(Calibration("m"), [[r[:3] for r in t] for t in ins], ["1"] * 40,
                         [[r[:3] for r in t] for t in outs], step_choices=(False, True))
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
