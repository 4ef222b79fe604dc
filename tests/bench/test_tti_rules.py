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
    assert len(events) == len(script) - 1 and events[3] == (5.0, None)
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
