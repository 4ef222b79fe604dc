"""The evidence rule on synthetic result sequences: a true piece becoming confident, outsiders
with random or stuck tops, a change of piece, resets and quiet results, and its calibration on
whole streams."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from index.calibration import Calibration
from index.decision import StreamDecision
from index.evidence import (
    DEFAULT_PARAMS,
    MAX_CANDIDATES,
    RESET,
    RESTART,
    EvidenceDecision,
    EvidenceParams,
    RecordedMatch,
    calibrate_evidence,
    event_kind,
    events_to_trace,
    evidence_peak,
    first_decision,
    fit_evidence_shape,
    params_of,
    replay,
    replay_steps,
    stream_decision,
)

CAL = Calibration("m", threshold=0.6)


def ranked(top: str, conf: float, pos: float, rng: np.random.Generator,
           n_others: int = 4) -> list[tuple[str, float, float]]:
    """A ranking with ``top`` first and random others under it."""
    others = [(f"o{rng.integers(10_000)}", conf * float(rng.uniform(0, 0.5)),
               float(rng.uniform(0, 200))) for _ in range(n_others)]
    return [(top, conf, pos), *others]


def outsider(rng: np.random.Generator, n: int = 30) -> list:
    """Events of a stream that is not in the collection: usually a different top every result,
    at any confidence under 0.97, anywhere; a third of the time the previous top again (a
    similar piece), in step with the audio half of those times."""
    out, top, pos = [], "r0", 0.0
    for i in range(n):
        if i and rng.uniform() < 0.33:
            pos = pos + 1.0 if rng.uniform() < 0.5 else float(rng.uniform(0, 200))
        else:
            top, pos = f"r{rng.integers(300)}", float(rng.uniform(0, 200))
        out.append((2.0 + i, ranked(top, float(rng.uniform(0, 0.97)), pos, rng)))
    return out


def insider(rng: np.random.Generator, true: str = "T", n: int = 20, from_s: float = 3.0,
            conf: float = 0.9, start_pos: float = 40.0, tempo: float = 1.0) -> list:
    """Events of an in-collection stream: outsider-like until ``from_s``, then ``true`` on top
    at ``conf``, its position advancing with the audio at ``tempo``."""
    out = []
    for i in range(n):
        t = 2.0 + i
        if t < from_s:
            out.append((t, ranked(f"r{rng.integers(300)}", float(rng.uniform(0, 0.6)),
                                  float(rng.uniform(0, 200)), rng)))
        else:
            out.append((t, ranked(true, conf, start_pos + tempo * (t - from_s), rng)))
    return out


@pytest.fixture(scope="module")
def fitted() -> Calibration:
    rng = np.random.default_rng(0)
    outs = [outsider(rng) for _ in range(1000)]
    ins = [insider(rng) for _ in range(20)]
    return calibrate_evidence(CAL, ins, ["T"] * 20, outs)


def test_a_true_piece_that_becomes_confident_is_decided_within_a_few_results(fitted):
    rng = np.random.default_rng(1)
    assert fitted.evidence_threshold > 0
    for tempo in (0.8, 1.0, 1.2):  # the tempo may differ from the reference's by 25 %
        d = first_decision(insider(rng, from_s=3.0, tempo=tempo), fitted.evidence_threshold)
        assert d is not None and d[1] == "T" and d[0] <= 6.0
    # a middling confidence that keeps step is decided too, later
    d = first_decision(insider(rng, conf=0.7), fitted.evidence_threshold)
    assert d is not None and d[1] == "T" and d[0] <= 12.0
    fig = fitted.stream["evidence"]
    assert fig["identified"] == 1.0 and fig["wrong_first"] == 0.0 and fig["false_rate"] <= 0.01


def test_outsiders_with_random_tops_do_not_decide(fitted):
    rng = np.random.default_rng(2)  # fresh outsiders, not the ones it was fitted on
    decided = [first_decision(outsider(rng, 30), fitted.evidence_threshold) is not None
               for _ in range(1000)]
    assert np.mean(decided) <= 0.02  # 1 % expected


def test_an_outsider_stuck_on_one_reference_never_decides(fitted):
    # the fixed-count rule's objection to a sum: a wrong reference on top for minutes at a
    # middling confidence, its position wandering. The evidence is floored and drifts down.
    rng = np.random.default_rng(3)
    events = [(2.0 + i, ranked("W", 0.6, float(rng.uniform(0, 200)), rng)) for i in range(600)]
    assert evidence_peak(events) < fitted.evidence_threshold
    assert first_decision(events, fitted.evidence_threshold) is None


def test_a_switch_of_piece_is_re_decided_within_six_seconds(fitted):
    th = fitted.evidence_threshold
    rng = np.random.default_rng(4)
    # A from 2 s; at 14 s the music changes: the window still holds A for two results (A on
    # top, lower), then B takes over while A lingers under it
    events = [(t, ranked("A", 0.95, 10.0 + t, rng)) for t in np.arange(2.0, 14.0)]
    events += [(14.0, ranked("A", 0.7, 24.0, rng)), (15.0, ranked("A", 0.5, 25.0, rng))]
    events += [(t, [("B", 0.9, 60.0 + t), ("A", 0.4, 10.0 + t)]) for t in np.arange(16.0, 30.0)]
    got = dict(replay(events, EvidenceDecision(CAL, threshold=th)))
    assert got[13.0] == "A"
    redecided = min(t for t, d in got.items() if t >= 14.0 and d == "B")
    assert redecided - 14.0 <= 6.0
    assert all(d == "B" for t, d in got.items() if t >= redecided)  # and it stays
    assert all(d != "A" for t, d in got.items() if t >= 14.0 + 6.0)  # A withdrawn


def test_one_result_with_another_top_does_not_withdraw_a_decision(fitted):
    th = fitted.evidence_threshold
    rng = np.random.default_rng(5)
    events = [(t, ranked("A", 0.95, 10.0 + t, rng)) for t in np.arange(2.0, 12.0)]
    events.append((12.0, [("X", 0.8, 5.0), ("A", 0.7, 22.0)]))  # a blip: A second
    events.append((13.0, ranked("A", 0.95, 23.0, rng)))
    got = replay(events, EvidenceDecision(CAL, threshold=th))
    assert [d for t, d in got if t >= 11.0] == ["A", "A", "A"]
    # the fixed-count rule drops it at the blip
    old = replay(events, StreamDecision(Calibration("m", stream_threshold=0.8, stable_results=3)))
    assert [d for t, d in old if t >= 11.0] == ["A", None, None]


def test_quiet_and_empty_results_neither_add_nor_subtract(fitted):
    th = fitted.evidence_threshold
    dec = EvidenceDecision(CAL, threshold=th)
    for t in range(2, 12):
        got = dec.update([RecordedMatch("A", 0.95, 10.0 + t)], audio_s=float(t))
    assert got is not None and got.ref == "A"
    before = dec.evidence("A")
    # a quiet period is not fed at all (worker.session); an empty ranking is no evidence
    assert dec.update([], audio_s=12.0) is None
    assert dec.evidence("A") == before
    # after 3 s of silence the music goes on where it was: still decided at once
    got = dec.update([RecordedMatch("A", 0.95, 25.0)], audio_s=15.0)
    assert got is not None and got.ref == "A"
    dec.reset()
    assert dec.evidence("A") == 0.0 and dec.update([RecordedMatch("A", 0.95, 26.0)], 16.0) \
        is None


def test_position_jumps_cost_evidence_and_the_step_allows_tempo():
    p = EvidenceParams()
    steady = [(float(t), [("A", 0.8, 30.0 + 1.2 * t)]) for t in range(2, 12)]  # 20 % fast
    jumpy = [(float(t), [("A", 0.8, 30.0 + 37.0 * (t % 3))]) for t in range(2, 12)]
    assert evidence_peak(steady, p) > evidence_peak(jumpy, p) + 5 * p.step_bonus


def test_memory_is_bounded():
    rng = np.random.default_rng(6)
    dec = EvidenceDecision(CAL, threshold=math.inf)
    for i in range(2000):  # 2,000 results, five new references in each
        dec.update([RecordedMatch(f"r{i}-{k}", 0.99 - 0.1 * k, float(rng.uniform(0, 100)))
                    for k in range(5)], audio_s=float(i))
    assert len(dec._cands) <= MAX_CANDIDATES
    assert dec.nbytes < 20_000


def test_references_may_be_numpy_integers():
    dec = EvidenceDecision(CAL, threshold=0.5)
    dec.update([RecordedMatch(np.int64(4), 0.99, 10.0)], audio_s=2.0)
    assert dec.evidence(4) == dec.evidence(np.int64(4)) > 0


def test_the_calibration_picks_the_rule():
    assert isinstance(stream_decision(Calibration("m")), StreamDecision)  # an old file
    cal = Calibration("m", evidence_threshold=7.5)
    assert isinstance(stream_decision(cal), EvidenceDecision)
    assert stream_decision(cal).threshold == 7.5
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.evidence_threshold == 7.5
    old = {k: v for k, v in cal.to_dict().items() if k != "evidence_threshold"}
    assert Calibration.from_dict(old).evidence_threshold is None
    with pytest.raises(ValueError):
        Calibration("m", evidence_threshold=-1.0)
    with pytest.raises(ValueError):
        EvidenceDecision(Calibration("m"))  # no threshold to decide with


def test_replay_and_trace_of_recorded_events(fitted):
    events = [(2.0, [("a", 0.9, 10.0)]), (3.0, [("a", 0.9, 11.0)]), (3.0, None),
              (4.0, []), (5.0, [("b", 0.95, 1.0), ("a", 0.5, 12.0)])]
    assert events_to_trace(events) == [
        (2.0, "a", 0.9, 10.0), (3.0, "a", 0.9, 11.0), (3.0, None, 0.0, pytest.approx(math.nan,
                                                                                   nan_ok=True)),
        (4.0, None, 0.0, pytest.approx(math.nan, nan_ok=True)), (5.0, "b", 0.95, 1.0)]
    old = StreamDecision(Calibration("m", stream_threshold=0.8, stable_results=2))
    assert replay(events, old) == [(2.0, None), (3.0, "a"), (4.0, None), (5.0, None)]
    # the evidence rule keeps its evidence through the restart (None, as older recordings hold
    # it): "a" is still decided at 5.0 while "b" gathers its own; after a reset "a" would have
    # had nothing left
    cal = Calibration("m", evidence_threshold=5.0)
    assert replay(events, EvidenceDecision(cal)) == [(2.0, None), (3.0, "a"), (4.0, None),
                                                    (5.0, "a")]
    fresh = EvidenceDecision(cal)
    assert replay(events[3:], fresh)[-1] == (5.0, None)


def test_a_replayed_reset_clears_the_evidence_a_restart_keeps_it():
    """A reset after a long quiet (``RESET``) and a restart of the query (``RESTART``) are
    different events: the evidence rule forgets its evidence and decision at the one and keeps
    both through the other; the fixed-count rule starts over at both."""
    cal = Calibration("m", evidence_threshold=5.0)
    head = [(2.0, [("a", 0.9, 10.0)]), (3.0, [("a", 0.9, 11.0)])]
    tail = [(4.0, [("a", 0.9, 12.0)])]
    after = {}
    for kind in (RESTART, RESET, None):  # None: a restart as older recordings hold it
        rule = EvidenceDecision(cal)
        steps = replay_steps([*head, (3.5, kind), *tail], rule)
        upto = [next(steps) for _ in range(3)]  # lazy: the rule is as the marker left it
        after[kind] = (upto, rule.evidence("a"), list(steps))
    assert after[RESTART][0] == [(2.0, None, True), (3.0, "a", True), (3.5, "a", False)]
    assert after[RESTART][1] >= 5.0 and after[RESTART][2] == [(4.0, "a", True)]
    assert after[RESET][0] == [(2.0, None, True), (3.0, "a", True), (3.5, None, False)]
    assert after[RESET][1] == 0.0 and after[RESET][2] == [(4.0, None, True)]
    assert after[None] == after[RESTART]
    assert replay([*head, (3.5, RESET), *tail], EvidenceDecision(cal)) == [
        (2.0, None), (3.0, "a"), (4.0, None)]
    assert replay([*head, (3.5, RESTART), *tail], EvidenceDecision(cal)) == [
        (2.0, None), (3.0, "a"), (4.0, "a")]
    fixed = Calibration("m", stream_threshold=0.8, stable_results=2)
    for kind in (RESTART, RESET):
        got = list(replay_steps([*head, (3.5, kind), *tail], StreamDecision(fixed)))
        assert [d for _, d, _ in got] == [None, "a", None, None]


def test_event_markers_survive_json_and_make_trace_breaks():
    events = [(2.0, [("a", 0.9, 10.0)]), (3.0, RESTART), (4.0, [("a", 0.9, 12.0)]),
              (5.0, RESET), (6.0, [])]
    back = json.loads(json.dumps(events))  # as bench/time_to_identify.py --json stores them
    assert [event_kind(r) for _, r in back] == [None, RESTART, None, RESET, None]
    cal = Calibration("m", evidence_threshold=5.0)
    assert replay(back, EvidenceDecision(cal)) == replay(events, EvidenceDecision(cal))
    nan = pytest.approx(math.nan, nan_ok=True)
    assert events_to_trace(back) == [(2.0, "a", 0.9, 10.0), (3.0, None, 0.0, nan),
                                     (4.0, "a", 0.9, 12.0), (5.0, None, 0.0, nan),
                                     (6.0, None, 0.0, nan)]
    with pytest.raises(ValueError, match="unknown decision event"):
        replay([(2.0, "seek")], EvidenceDecision(cal))


def test_calibrate_evidence_caps_the_outsiders_and_rejects_bad_input():
    rng = np.random.default_rng(7)
    outs = [outsider(rng, 20) for _ in range(100)]
    cal = calibrate_evidence(CAL, [], [], outs, max_false_rate=0.05)
    peaks = np.array([evidence_peak(e) for e in outs])
    assert np.mean(peaks >= cal.evidence_threshold) <= 0.05
    assert np.mean(peaks >= np.nextafter(cal.evidence_threshold, 0)) > 0.05 or \
        cal.evidence_threshold == 0.0
    assert cal.threshold == CAL.threshold  # the single-query threshold is untouched
    with pytest.raises(ValueError, match="out-of-collection"):
        calibrate_evidence(CAL, [], [], [])
    with pytest.raises(ValueError, match="ids"):
        calibrate_evidence(CAL, [outs[0]], [], outs)


def test_the_shape_fitted_with_the_threshold_is_the_one_the_live_rule_uses():
    rng = np.random.default_rng(8)
    outs = [outsider(rng, 20) for _ in range(200)]
    shape = EvidenceParams(conf_clip=3.0, step_bonus=2.0, gap_weight=0.0)
    cal = calibrate_evidence(CAL, [insider(rng)], ["T"], outs, params=shape)
    assert cal.evidence_threshold != calibrate_evidence(CAL, [], [], outs).evidence_threshold
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))  # as saved and loaded
    assert params_of(back) == shape
    live = stream_decision(back)
    assert isinstance(live, EvidenceDecision) and live.params == shape
    assert live.threshold == cal.evidence_threshold
    # a calibration that recorded no shape (written before shapes were fitted) keeps the default
    assert params_of(Calibration("m", evidence_threshold=5.0)) == DEFAULT_PARAMS
    assert stream_decision(Calibration("m", evidence_threshold=5.0)).params == DEFAULT_PARAMS
    # a shape this version does not know, or an impossible one, is an error, not ignored
    odd = {**cal.stream, "evidence": {**cal.stream["evidence"],
                                      "params": {**shape.to_dict(), "tempo_weight": 1.0}}}
    with pytest.raises(ValueError, match="tempo_weight"):
        params_of(Calibration("m", evidence_threshold=5.0, stream=odd))
    with pytest.raises(ValueError, match="conf_floor"):
        EvidenceParams(conf_floor=2.0, conf_clip=1.5)


def fresh_tops(rng: np.random.Generator, n: int = 20) -> list:
    """An outsider whose top is a new reference every result (it never keeps step)."""
    return [(2.0 + i, [(f"x{i}", float(rng.uniform(0, 0.97)), float(rng.uniform(0, 200))),
                       ("y", 0.01, 0.0)]) for i in range(n)]


def stepping(top: str, conf: float, n: int, t0: float = 2.0, pos0: float = 50.0) -> list:
    """``top`` on top at ``conf`` for ``n`` results, keeping step with the audio, a close
    runner-up under it."""
    return [(t0 + i, [(top, conf, pos0 + i), ("y", 0.9 * conf, 0.0)]) for i in range(n)]


def test_fit_evidence_shape_chooses_the_fastest_shape_at_the_same_false_rate():
    rng = np.random.default_rng(9)
    outs = [fresh_tops(rng) for _ in range(300)]
    ins = [stepping("T", 0.6, 20) for _ in range(20)]
    grid = {"step_bonus": (0.0, 1.0, 3.0)}
    shown = []
    best, rows = fit_evidence_shape(ins, ["T"] * 20, outs, grid=grid,
                                    progress=lambda k, n: shown.append((k, n)))
    # outsiders never keep step, so a larger step bonus leaves their peaks (and the threshold)
    # as they are and decides the in-step true piece sooner
    assert best == replace(DEFAULT_PARAMS, step_bonus=3.0)
    assert len(rows) == 3 and shown[-1] == (3, 3)
    by_bonus = {r["step_bonus"]: r for r in rows}
    assert by_bonus[3.0]["median_s"] < by_bonus[0.0]["median_s"]
    assert len({r["threshold"] for r in rows}) == 1
    assert all(r["eligible"] and r["wrong_first"] == 0.0 for r in rows)
    assert rows[0]["step_bonus"] == 3.0


def test_fit_evidence_shape_does_not_buy_speed_with_wrong_decisions():
    rng = np.random.default_rng(10)
    outs = [fresh_tops(rng) for _ in range(300)]
    # most true pieces keep step at a middling confidence; a fifth of the streams first hold
    # a similar wrong piece in step for three results
    ins = [stepping("T", 0.6, 20) for _ in range(16)]
    ins += [stepping("W", 0.6, 3) + stepping("T", 0.6, 17, t0=5.0) for _ in range(4)]
    best, rows = fit_evidence_shape(ins, ["T"] * 20, outs, grid={"step_bonus": (1.0, 6.0)})
    by_bonus = {r["step_bonus"]: r for r in rows}
    # the large bonus is faster on the median but decides W first in those streams
    assert by_bonus[6.0]["median_s"] < by_bonus[1.0]["median_s"]
    assert by_bonus[6.0]["wrong_first"] > by_bonus[1.0]["wrong_first"]
    assert not by_bonus[6.0]["eligible"] and best.step_bonus == 1.0
    # a grid of nothing but such shapes (or of impossible ones) leaves the default shape
    best, rows = fit_evidence_shape(ins, ["T"] * 20, outs, grid={"step_bonus": (6.0,)})
    assert best == DEFAULT_PARAMS and len(rows) == 1 and not rows[0]["eligible"]
    best, rows = fit_evidence_shape(ins, ["T"] * 20, outs, grid={"conf_floor": (2.0,)})
    assert best == DEFAULT_PARAMS and rows == []
    with pytest.raises(ValueError, match="streams"):
        fit_evidence_shape([], [], outs)
