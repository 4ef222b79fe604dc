"""Confirmation: the matched span on the Hamming matrix and the margin confidence."""

from __future__ import annotations

import numpy as np
import pytest

from index.align import align_cost_matrix
from index.confirm import (
    CENTRE,
    MIN_DISTINCT,
    WIDTH,
    confirm_candidates,
    distinct_ratio,
    margin_confidence,
)
from index.hashdtw import hash_dtw
from model.bits import hamming_matrix


def logistic(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-(x - CENTRE) / WIDTH))


def test_margin_confidence_by_hand():
    scores = np.array([1.0, 4.0, 5.0, 6.0, 6.0, 8.0])
    conf = margin_confidence(scores, 4)
    # field = median(6, 6, 8) = 6; runner-up = second best of the others
    expected = [
        logistic((1 - 1 / 6) + (1 - 1 / 5)),
        logistic((1 - 4 / 6) + (1 - 4 / 5)),
        logistic((1 - 5 / 6) + (1 - 5 / 4)),
        logistic((1 - 6 / 6) + (1 - 6 / 4)),
    ]
    np.testing.assert_allclose(conf, expected)
    assert conf[0] > 0.99 and conf[2] < 0.01


def test_margin_confidence_is_monotone_and_bounded():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scores = np.sort(rng.uniform(0.5, 12.0, rng.integers(5, 120)))
        conf = margin_confidence(scores, min(5, scores.shape[0]))
        assert np.all((conf >= 0) & (conf <= 1))
        assert np.all(np.diff(conf) <= 1e-12)


def test_a_duplicate_keeps_both_copies_confident_and_a_flat_field_is_not():
    dup = margin_confidence(np.array([2.0, 2.1, 7.0, 7.5, 8.0, 8.0, 8.5]), 3)
    assert dup[0] > 0.9 and dup[1] > 0.9 and dup[2] < 0.01
    flat = margin_confidence(np.linspace(7.0, 8.0, 100), 2)
    assert np.all(flat < 0.05)


def test_too_few_candidates_fall_back_to_the_alignment_confidence():
    assert margin_confidence(np.array([1.0, 2.0, 3.0, 4.0]), 2) is None
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 2**32, 120, dtype=np.uint32)
    q = ref[30:70].copy()
    (got,) = confirm_candidates(q, [ref], np.array([0.0]), penalty=16, gully=0.9)
    al = align_cost_matrix(hamming_matrix(q, ref).astype(float), penalty=16.0, gully=0.9)
    assert got.confidence == al.confidence == 1.0


def test_empty_references_and_infinite_scores_get_zero():
    conf = margin_confidence(np.array([1.0, 3.0, 5.0, 6.0, np.inf, np.inf]), 6)
    assert conf[0] > 0.9 and conf[4] == 0.0 and conf[5] == 0.0
    rng = np.random.default_rng(2)
    q = rng.integers(0, 2**32, 10, dtype=np.uint32)
    out = confirm_candidates(q, [np.zeros(0, np.uint32)], np.array([np.inf] * 5), penalty=16,
                             gully=0.9)
    assert out[0].confidence == 0.0 and out[0].end_j == -1


def test_planted_excerpt_is_found_with_its_span():
    rng = np.random.default_rng(3)
    refs = [rng.integers(0, 2**32, n, dtype=np.uint32) for n in (300, 250, 400, 280, 320, 310)]
    q = refs[2][100:160].copy()
    flips = rng.integers(0, 32, q.shape[0]).astype(np.uint32)
    q ^= np.left_shift(np.uint32(1), flips)  # one wrong bit per frame
    scores = np.array([hash_dtw(q, r, penalty=16, gully=0.9).score for r in refs])
    order = np.argsort(scores)
    assert order[0] == 2
    out = confirm_candidates(q, [refs[k] for k in order[:3]], scores[order], penalty=16,
                             gully=0.9)
    best = out[0]
    assert (best.start_j, best.end_j, best.end_i) == (100, 159, 59)
    assert best.score == pytest.approx(1.0)  # one bit per cell on the diagonal
    assert best.confidence > 0.99 and out[1].confidence < 0.01
    assert best.norm_score < 0.2


def test_a_query_that_hardly_changes_is_never_confident():
    # A held tone hashes to a few values; it aligns at zero cost with any reference holding a
    # similar held stretch, and the margins alone would read that as certainty.
    rng = np.random.default_rng(4)
    refs = [rng.integers(0, 2**32, 300, dtype=np.uint32) for _ in range(6)]
    tone = np.array([0x0F0F0F0F] * 20 + [0x0F0F0F1F] * 34, np.uint32)
    refs[1][50:104] = tone  # one reference holds the same stretch
    assert distinct_ratio(tone) < MIN_DISTINCT
    scores = np.array([hash_dtw(tone, r, penalty=16, gully=0.9).score for r in refs])
    order = np.argsort(scores)
    assert order[0] == 1 and scores[1] == 0.0
    assert margin_confidence(scores[order], 1)[0] > 0.99  # what the margins alone would say
    out = confirm_candidates(tone, [refs[k] for k in order[:3]], scores[order], penalty=16,
                             gully=0.9)
    assert [m.confidence for m in out] == [0.0, 0.0, 0.0]
    assert (out[0].start_j, out[0].end_j) == (50, 103)  # the span is still reported
    # and a query of ordinary variety is unaffected
    varied = refs[1][150:204].copy()
    assert distinct_ratio(varied) > 0.9


def test_distinct_ratio():
    assert distinct_ratio(np.zeros(0, np.uint32)) == 0.0
    assert distinct_ratio(np.array([1, 1, 2, 3], np.uint32)) == 0.75


def test_a_reference_that_explains_only_part_of_the_query_is_not_confident():
    # A 12-frame reference planted inside a 54-frame query aligns at zero cost (its path spans
    # the whole reference but under a quarter of the query): evidence for a few seconds only.
    rng = np.random.default_rng(5)
    query = rng.integers(0, 2**32, 54, dtype=np.uint32)
    short = query[20:32].copy()
    refs = [short] + [rng.integers(0, 2**32, 300, dtype=np.uint32) for _ in range(5)]
    scores = np.array([hash_dtw(query, r, penalty=16, gully=0.9).score for r in refs])
    order = np.argsort(scores)
    assert order[0] == 0 and margin_confidence(scores[order], 1)[0] > 0.99
    (best, *_rest) = confirm_candidates(query, [refs[k] for k in order[:2]], scores[order],
                                        penalty=16, gully=0.9)
    assert (best.start_j, best.end_j) == (0, 11)
    assert best.confidence == 0.0
    # the same stretch inside a longer reference that covers the whole query stays confident
    long = np.concatenate([rng.integers(0, 2**32, 40, dtype=np.uint32), query,
                           rng.integers(0, 2**32, 40, dtype=np.uint32)])
    refs[0] = long
    scores = np.array([hash_dtw(query, r, penalty=16, gully=0.9).score for r in refs])
    order = np.argsort(scores)
    (best, *_rest) = confirm_candidates(query, [refs[k] for k in order[:2]], scores[order],
                                        penalty=16, gully=0.9)
    assert order[0] == 0 and best.confidence > 0.99
