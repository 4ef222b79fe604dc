"""bench/prune_recall.py: a reference's rank is its place in the prunes' own order."""

from __future__ import annotations

import numpy as np

from bench.prune_recall import ranks_of
from index.hash_prune import HashPruner


def test_rank_follows_score_then_reference_number():
    s = np.array([0.5, 0.2, 0.5, 0.9, 0.2])
    order = sorted(range(5), key=lambda r: (s[r], r))  # the prunes' order: score, then id
    assert [ranks_of(s, r) for r in range(5)] == [order.index(r) for r in range(5)]


def test_rank_agrees_with_the_hash_prunes_search():
    rng = np.random.default_rng(2)
    lengths = [30, 45, 12, 60, 30]
    hashes = rng.integers(0, 2**16, sum(lengths)).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    pruner = HashPruner(hashes, offsets, factor=3)
    q = hashes[offsets[3] + 10:offsets[3] + 40]
    ids = pruner.search([q], 5, penalty=8, gully=0.9)[0]
    s = pruner.scores(q, penalty=8, gully=0.9)
    assert [ranks_of(s, int(r)) for r in ids] == list(range(5))
