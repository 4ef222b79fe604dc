"""bench/query_views.py: the collection it cuts and the recall it counts, on small made-up data."""

from __future__ import annotations

import numpy as np
import pytest

from bench.query_views import collection, recall
from index.prune import EmbeddingPruner
from model.encoder import Encoder
from model.training.pairs import PairData


def _pairs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    n = int(sum(lengths))
    audio = rng.normal(size=(n, 48)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return PairData(audio, audio.copy(), offsets, np.arange(len(lengths)))


def test_collection_windows_every_long_pair_and_slices_its_audio():
    enc = Encoder.untrained(0)
    data = _pairs([400, 100, 300])  # the 100-frame pair is shorter than one 10 s query
    emb, owner, queries, truth = collection(enc, [data, _pairs([250], seed=1)], per_pair=3,
                                            seed=0)
    n_windows = [len(enc.window.starts(n)) for n in (400, 300, 250)]
    assert emb.shape == (sum(n_windows), 128)
    assert owner.tolist() == [p for p, n in enumerate(n_windows) for _ in range(n)]
    assert truth.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(q.shape == (enc.window.length, 48) for q in queries)
    # each query is a slice of its own pair's audio, three distinct ones per pair
    first = data.audio[:400]
    starts = [int(np.flatnonzero(first[:, 0] == q[0, 0])[0]) for q in queries[:3]]
    assert len(set(starts)) == 3
    for s, q in zip(starts, queries[:3], strict=True):
        np.testing.assert_array_equal(first[s:s + enc.window.length], q)


def test_recall_counts_the_true_piece_among_the_k_nearest():
    # pieces 0-15 have one window e_i, pieces 16-29 one window at the origin
    emb = np.eye(30, 16, dtype=np.float32)
    pruner = EmbeddingPruner(emb, np.arange(30), 30)
    views = np.zeros((3, 1, 16), np.float32)
    views[0, 0, 2] = 1.0  # on piece 2, its truth: rank 1
    views[1, 0, 5] = 1.0  # truth 7 at distance 2: piece 5 (0) and the 14 at the origin (1)
    #                       are nearer, the other e_i tie with it: rank 16
    # views[2] is the origin, truth 3 at distance 1: the 14 origin windows are nearer: rank 15
    r = recall(pruner, views, np.array([2, 7, 3]))
    assert r == pytest.approx({"recall@1 %": 100 / 3, "recall@5 %": 100 / 3,
                               "recall@10 %": 100 / 3, "recall@20 %": 100.0})
    views[1, 0] = 0.0  # now at the origin too, truth 7 at distance 1: rank 15
    r = recall(pruner, views, np.array([2, 7, 16]))  # truth 16 is at the origin: rank 1
    assert r == pytest.approx({"recall@1 %": 200 / 3, "recall@5 %": 200 / 3,
                               "recall@10 %": 200 / 3, "recall@20 %": 100.0})
