"""bench/short_confidence.py: the separation measure on hand-made score vectors."""

from __future__ import annotations

import numpy as np

from bench.short_confidence import EVIDENCE, separation


def _scores(rng: np.random.Generator, n: int, gap: float) -> np.ndarray:
    s = np.sort(rng.uniform(10.0, 12.0, (n, 50)), axis=1)
    s[:, 0] -= gap  # the top-1 stands out by ``gap``
    return s


def test_separation_counts_right_and_confident_only():
    rng = np.random.default_rng(0)
    outs = _scores(rng, 200, 0.0)
    ins = _scores(rng, 100, 5.0)  # far better than any outsider
    scores = np.vstack([outs, ins])
    lengths = np.full(300, 4.0)
    inside = np.r_[np.zeros(200, bool), np.ones(100, bool)]
    right = inside.copy()
    right[-10:] = False  # ten in-collection queries ranked a wrong piece first
    for fn in EVIDENCE.values():
        assert separation(scores, lengths, inside, right, fn) == {4.0: 0.9}


def test_separation_is_per_length_and_falls_when_ins_look_like_outsiders():
    rng = np.random.default_rng(1)
    scores = np.vstack([_scores(rng, 200, 0.0), _scores(rng, 100, 0.0),
                        _scores(rng, 200, 0.0), _scores(rng, 100, 5.0)])
    lengths = np.r_[np.full(300, 3.0), np.full(300, 5.0)]
    inside = np.r_[np.zeros(200, bool), np.ones(100, bool)]
    inside = np.r_[inside, inside]
    sep = separation(scores, lengths, inside, inside, EVIDENCE["current (margin ratios)"])
    assert sep[5.0] == 1.0
    assert sep[3.0] < 0.1  # indistinguishable: about the 1 % the threshold lets through
