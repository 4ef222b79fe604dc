"""bench/stream_rules.py: the replayed decision rules, on hand-made traces."""

from __future__ import annotations

import pytest

from bench.stream_rules import fit, measure, scores


def steady(top: str, conf: float, n: int = 8, start_pos: float = 30.0, step: float = 1.0,
           jump_at: int | None = None) -> list[tuple]:
    """A trace whose top-1 stays ``top``; its position advances ``step`` per result, except for
    a 20 s jump at result ``jump_at``."""
    out, pos = [], start_pos
    for i in range(n):
        pos += step if i else 0.0
        if jump_at is not None and i == jump_at:
            pos += 20.0
        out.append((float(i + 1), top, conf, pos))
    return out


def test_min_ignores_positions_pos_breaks_the_run_at_a_jump():
    trace = steady("a", 0.9, n=6, jump_at=3)
    ready_min = [t for t, top, s in scores(trace, "min", 3) if top is not None]
    ready_pos = [t for t, top, s in scores(trace, "pos", 3) if top is not None]
    assert ready_min == [3.0, 4.0, 5.0, 6.0]
    # the run restarts at result 4 (the jump), so k = 3 is reached again only at result 6
    assert ready_pos == [3.0, 6.0]


def test_scores_accept_traces_without_positions():
    trace = [(1.0, "a", 0.5), (2.0, "a", 0.7), (3.0, "b", 0.9)]
    assert [s for *_, s in scores(trace, "min", 2)] == [-1.0, 0.5, -1.0]
    assert [s for *_, s in scores(trace, "sum", 2)] == [-1.0, pytest.approx(1.2), -1.0]
    assert all(top is None for _, top, _ in scores(trace, "pos", 2))


def test_fit_and_measure_keep_outsiders_out():
    # outsiders: a confident top-1 whose position wanders; insiders keep step
    outs = [[(float(i + 1), "x", 0.95, 50.0 * ((i * 7) % 3)) for i in range(8)]
            for _ in range(10)]
    ins = [(steady("a", 0.9), "a") for _ in range(5)]
    th_min = fit(outs, "min", 3, 0.0)
    th_pos = fit(outs, "pos", 3, 0.0)
    assert th_min > 0.95  # min has to rise above the outsiders' confidence...
    assert th_pos < 1e-9  # ...pos never lets them decide at all
    m_min, m_pos = measure(ins, outs, "min", 3, th_min), measure(ins, outs, "pos", 3, th_pos)
    assert m_min["identified %"] == 0.0 and m_min["out decision %"] == 0.0
    assert m_pos["identified %"] == 100.0 and m_pos["median TTI s"] == 3.0
    assert m_pos["out decision %"] == 0.0
