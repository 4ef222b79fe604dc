"""bench/tti_rules.py: a session's recorded decision input replayed through both rules, and the
switching-stream outcome."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bench.tti_rules import (
    decisions_at_results,
    live_rule,
    record,
    rule_rows,
    rules,
    switch_audio,
    switch_outcome,
    switch_row,
)
from index.calibration import Calibration
from index.decision import StreamDecision
from index.evidence import RESET, RESTART, EvidenceDecision, replay


class FakeSession:
    """The two things the recorder touches: ``decision`` and ``result`` (which feeds the
    decision unless the period is quiet, as worker.session does)."""

    def __init__(self, cal: Calibration) -> None:
        self.decision = StreamDecision(cal)
        self.audio_s = 0.0
        self.held = None

    def result(self, matches, quiet: bool = False):
        if not quiet:
            self.held = self.decision.update(matches, self.audio_s)
        return None if self.held is None else self.held.id


def m(ref: str, conf: float, pos: float = 0.0):
    return SimpleNamespace(ref=ref, id=ref, confidence=conf, position_s=pos)


def test_the_replay_of_the_recorded_input_gives_the_live_decisions():
    cal = Calibration("m", threshold=0.5, stream_threshold=0.8, stable_results=2)
    s = FakeSession(cal)
    events, marks = record(s)
    live = []
    script = [([m("a", 0.9)], False), ([m("a", 0.9)], False), ([m("b", 0.2)], True),
              ([m("a", 0.95)], False), ("reset", None), ([m("a", 0.9)], False),
              ([], False)]
    for k, (matches, quiet) in enumerate(script):
        s.audio_s = float(k + 1)
        if matches == "reset":
            s.decision.reset()
            s.held = None
            continue
        live.append(s.result(matches, quiet))
    assert live == [None, "a", "a", "a", None, None]
    rows = [(float(k), d) for k, d in enumerate(live)]
    assert [r[1] for r in rule_rows(rows, events, marks, StreamDecision(cal))] == live
    # the quiet result was not recorded: it neither feeds nor breaks the run
    assert len(events) == len(script) - 1 and events[3] == (5.0, RESET)
    # the evidence rule on the same input
    ev = decisions_at_results(events, marks, rules(cal, evidence_threshold=0.5)["evidence"]())
    assert ev[0] == "a" and ev[-1] is None


def test_rules_and_the_live_one():
    old = Calibration("m")
    assert set(rules(old)) == {"fixed"} and live_rule(old) == "fixed"
    new = Calibration("m", evidence_threshold=6.0)
    assert set(rules(new)) == {"fixed", "evidence"} and live_rule(new) == "evidence"
    assert rules(old, evidence_threshold=3.0)["evidence"]().threshold == 3.0


def test_switching_streams_and_their_outcome():
    pieces = [{"true_id": "a"}, {"true_id": None}, {"true_id": "b"}, {"true_id": "c"}]
    audio = [np.full(10, k, np.float32) for k in range(4)]
    streams, pairs = switch_audio(audio, pieces, 0.4, rate=10)
    assert pairs == [(0, 2), (2, 3), (3, 0)]
    np.testing.assert_array_equal(streams[0], [0] * 4 + [2] * 6)
    rows = [(float(t), d) for t, d in [(2, None), (3, "a"), (4, "a"), (5, "a"), (6, None),
                                       (7, "b"), (8, "b")]]
    o = switch_outcome(rows, "a", "b", 4.0)
    assert o == {"a_decided": True, "b_top_s": None, "redecide_s": 3.0, "withdraw_s": 2.0,
                 "third": False}
    tops = [(t, d, None, "b" if t >= 6 else "a") for t, d in rows]
    assert switch_outcome(tops, "a", "b", 4.0)["b_top_s"] == 2.0
    row = switch_row("clean", [rows, rows, rows], pairs, 4.0, pieces)
    # (a, b): b after 3 s; (b, c): c never; (c, a): a (as the rows say) after 1 s
    assert row["re-decided in 6 s %"] == pytest.approx(200 / 3)
    assert row["median re-decide s"] == 2.0
    assert row["A decided %"] == pytest.approx(100 / 3)


def test_a_restart_keeps_the_evidence_not_the_fixed_run():
    cal = Calibration("m", threshold=0.5, stream_threshold=0.8, stable_results=2,
                      evidence_threshold=4.0)
    assert "evidence-reset" not in rules(cal)
    made = rules(cal, reset_on_restart=True)
    events = [(1.0, [("a", 0.95, 1.0)]), (2.0, [("a", 0.95, 2.0)]), (3.0, [("a", 0.95, 3.0)]),
              (3.5, None), (4.0, [("a", 0.95, 4.0)])]
    marks = [1, 2, 3, 4, 5]  # a result right after the restart, then one more
    kept = decisions_at_results(events, marks, made["evidence"]())
    reset = decisions_at_results(events, marks, made["evidence-reset"]())
    fixed = decisions_at_results(events, marks, made["fixed"]())
    # all decide "a" before the restart; the evidence rule keeps it through the restart
    assert kept[2] == reset[2] == fixed[2] == "a"
    assert kept[3:] == ["a", "a"]
    assert reset[3:] == [None, None] and fixed[3:] == [None, None]


def test_the_recorder_tells_a_reset_from_a_restart():
    cal = Calibration("m", threshold=0.5, stream_threshold=0.8, stable_results=2,
                      evidence_threshold=4.0)
    for inner, kept in ((StreamDecision(cal), False), (EvidenceDecision(cal), True)):
        s = FakeSession(cal)
        s.decision = inner
        events, _ = record(s)
        s.audio_s = 3.0
        assert s.decision.restart() is kept  # the rule's answer is passed on
        s.audio_s = 40.0
        s.decision.reset()
        assert events == [(3.0, RESTART), (40.0, RESET)]


def test_a_reset_drops_the_evidence_that_a_restart_keeps():
    cal = Calibration("m", threshold=0.5, stream_threshold=0.8, stable_results=2,
                      evidence_threshold=4.0)
    head = [(1.0, [("a", 0.95, 1.0)]), (2.0, [("a", 0.95, 2.0)]), (3.0, [("a", 0.95, 3.0)])]
    tail = [(4.0, [("a", 0.95, 4.0)])]
    marks = [1, 2, 3, 4, 5]  # a result right after the marker, then one more
    got = {kind: decisions_at_results([*head, (3.5, kind), *tail], marks,
                                      rules(cal)["evidence"]()) for kind in (RESTART, RESET)}
    assert got[RESTART][2:] == ["a", "a", "a"]
    assert got[RESET][2:] == ["a", None, None]  # one result is not enough evidence again


@pytest.mark.parametrize("name", ["fixed", "evidence", "evidence-reset"])
def test_both_replays_agree_on_restarts_and_resets(name):
    """``decisions_at_results`` with a mark after every update gives what
    ``index.evidence.replay`` gives, on a stream with both kinds of event."""
    cal = Calibration("m", threshold=0.5, stream_threshold=0.8, stable_results=2,
                      evidence_threshold=4.0)
    rng = np.random.default_rng(8)
    events, marks = [], []
    for k in range(200):
        t = 1.0 + 0.5 * k
        u = rng.uniform()
        if u < 0.08:
            events.append((t, RESTART))
        elif u < 0.14:
            events.append((t, RESET))
        else:
            top = "a" if rng.uniform() < 0.7 else f"r{rng.integers(5)}"
            events.append((t, [(top, float(rng.uniform(0.3, 1.0)), t), ("z", 0.1, 0.0)]))
            marks.append(len(events))
    made = rules(cal, reset_on_restart=True)
    held = decisions_at_results(events, marks, made[name]())
    replayed = replay(events, made[name]())
    assert held == [d for _, d in replayed] and len(held) == len(marks)
    assert any(d is not None for d in held)
