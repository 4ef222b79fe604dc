"""Embedding prune against a brute-force reference implementation."""

from __future__ import annotations

import numpy as np
import pytest

from index.prune import EmbeddingPruner


def brute_force(queries, emb, owner, n_refs, k):
    """Per query, per reference: min over its windows of the squared distance; then sort."""
    ids, dists = [], []
    for q in queries.astype(np.float64):
        best = np.full(n_refs, np.inf)
        for w in range(emb.shape[0]):
            d = float(np.sum((emb[w].astype(np.float64) - q) ** 2))
            best[owner[w]] = min(best[owner[w]], d)
        order = sorted(range(n_refs), key=lambda r: (best[r], r))[:k]
        ids.append(order)
        dists.append(best[order])
    return np.array(ids), np.array(dists)


def random_index(seed, n_refs, dim=16, max_windows=6, shuffle=False):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, max_windows + 1, n_refs)
    owner = np.repeat(np.arange(n_refs), counts).astype(np.int32)
    if shuffle:
        owner = rng.permutation(owner)
    emb = np.tanh(rng.normal(size=(owner.shape[0], dim))).astype(np.float16)
    return emb, owner


@pytest.mark.parametrize("shuffle", [False, True])
def test_matches_brute_force(shuffle):
    emb, owner = random_index(0, n_refs=40, shuffle=shuffle)
    rng = np.random.default_rng(1)
    queries = np.tanh(rng.normal(size=(7, 16))).astype(np.float32)
    pruner = EmbeddingPruner(emb, owner, 40)
    ids, dists = pruner.search(queries, 10)
    ref_ids, ref_d = brute_force(queries, emb, owner, 40, 10)
    assert ids.shape == (7, 10) and ids.dtype == np.int64 and dists.dtype == np.float32
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dists, ref_d, rtol=1e-5, atol=1e-4)
    full = pruner.reference_distances(queries)
    assert full.shape == (7, 40)
    np.testing.assert_allclose(np.sort(full, axis=1)[:, :10], ref_d, rtol=1e-5, atol=1e-4)


def test_the_accelerator_path_gives_the_same_answer():
    emb, owner = random_index(7, n_refs=30, shuffle=True)
    queries = np.tanh(np.random.default_rng(8).normal(size=(5, 16))).astype(np.float32)
    numpy_path = EmbeddingPruner(emb, owner, 30)
    torch_path = EmbeddingPruner(emb, owner, 30)
    torch_path._numpy_reduce = False  # scatter_reduce + topk, as on a GPU, here on the CPU
    a, b = numpy_path.search(queries, 12), torch_path.search(queries, 12)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)
    np.testing.assert_allclose(numpy_path.reference_distances(queries),
                               torch_path.reference_distances(queries), rtol=1e-6)


def test_query_on_a_window_finds_its_reference_at_distance_zero():
    emb, owner = random_index(2, n_refs=25)
    pruner = EmbeddingPruner(emb, owner, 25)
    w = 17
    ids, dists = pruner.search(emb[w:w + 1].astype(np.float32), 3)
    assert ids[0, 0] == owner[w]
    assert dists[0, 0] == pytest.approx(0.0, abs=1e-4)
    assert np.all(np.diff(dists[0]) >= 0)


def test_k_is_clamped_and_references_without_windows_come_last():
    emb, owner = random_index(3, n_refs=5)
    owner = np.where(owner == 2, 4, owner).astype(np.int32)  # reference 2 loses its windows
    pruner = EmbeddingPruner(emb, owner, 5)
    ids, dists = pruner.search(np.zeros((2, 16), np.float32), 100)
    assert ids.shape == (2, 5)
    assert np.all(ids[:, -1] == 2) and np.all(np.isinf(dists[:, -1]))
    assert np.all(np.isfinite(dists[:, :-1]))


def test_empty_collection_gives_no_candidates():
    pruner = EmbeddingPruner(np.zeros((0, 16), np.float16), np.zeros(0, np.int32), 0)
    ids, dists = pruner.search(np.zeros((3, 16), np.float32), 100)
    assert ids.shape == dists.shape == (3, 0)


def test_chunked_queries_equal_one_at_a_time(monkeypatch):
    import index.prune as prune

    emb, owner = random_index(4, n_refs=30)
    queries = np.tanh(np.random.default_rng(5).normal(size=(9, 16))).astype(np.float32)
    pruner = EmbeddingPruner(emb, owner, 30)
    whole = pruner.search(queries, 8)
    monkeypatch.setattr(prune, "_BLOCK_ELEMENTS", 2 * pruner.n_windows)  # 2 queries per chunk
    chunked = pruner.search(queries, 8)
    one = [pruner.search(q[None], 8) for q in queries]
    # ids exactly; distances to BLAS rounding, which depends on the block shape
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[0], np.concatenate([o[0] for o in one]))
    np.testing.assert_allclose(whole[1], chunked[1], rtol=1e-6)


def test_bad_inputs_are_refused():
    emb, owner = random_index(6, n_refs=4)
    with pytest.raises(ValueError, match="embed_ref"):
        EmbeddingPruner(emb, owner[:-1], 4)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        EmbeddingPruner(emb, owner, 3)
    pruner = EmbeddingPruner(emb, owner, 4)
    with pytest.raises(ValueError, match="shape"):
        pruner.search(np.zeros((1, 15), np.float32), 2)
    with pytest.raises(ValueError, match="NaN"):
        pruner.search(np.full((1, 16), np.nan, np.float32), 2)
    with pytest.raises(ValueError, match="k must"):
        pruner.search(np.zeros((1, 16), np.float32), 0)


def test_query_views_score_the_whole_view_plus_the_parts_mean():
    emb, owner = random_index(11, n_refs=25, shuffle=True)
    rng = np.random.default_rng(12)
    views = np.tanh(rng.normal(size=(6, 3, 16))).astype(np.float32)  # whole, half 1, half 2
    pruner = EmbeddingPruner(emb, owner, 25)
    per_view = [brute_force(views[:, v], emb, owner, 25, 25) for v in range(3)]
    # brute_force sorts; put each view's distances back in reference order
    dist = np.zeros((3, 6, 25))
    for v, (ids, d) in enumerate(per_view):
        np.put_along_axis(dist[v], ids, d, axis=1)
    want = dist[0] + (dist[1] + dist[2]) / 2
    np.testing.assert_allclose(pruner.reference_distances(views), want, rtol=1e-5, atol=1e-4)
    ids, d = pruner.search(views, 8)
    np.testing.assert_array_equal(ids, np.argsort(want, axis=1, kind="stable")[:, :8])
    np.testing.assert_allclose(d, np.sort(want, axis=1)[:, :8], rtol=1e-5, atol=1e-4)
    # the combination differs from the whole view alone, and one view is the plain search
    assert not np.array_equal(ids, pruner.search(views[:, 0], 8)[0])
    np.testing.assert_array_equal(pruner.search(views[:, :1], 8)[0],
                                  pruner.search(views[:, 0], 8)[0])
    torch_path = EmbeddingPruner(emb, owner, 25)
    torch_path._numpy_reduce = False
    np.testing.assert_array_equal(torch_path.search(views, 8)[0], ids)


def test_query_views_are_chunked_by_whole_queries(monkeypatch):
    import index.prune as prune

    emb, owner = random_index(13, n_refs=30)
    views = np.tanh(np.random.default_rng(14).normal(size=(9, 3, 16))).astype(np.float32)
    pruner = EmbeddingPruner(emb, owner, 30)
    whole = pruner.search(views, 5)
    # a block of 2 queries' views: 5 chunks, none splitting a query's views
    monkeypatch.setattr(prune, "_BLOCK_ELEMENTS", 6 * pruner.n_windows)
    assert pruner._chunks(9, 3) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    chunked = pruner.search(views, 5)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_allclose(whole[1], chunked[1], rtol=1e-6)


def test_bad_view_shapes_are_refused():
    emb, owner = random_index(15, n_refs=4)
    pruner = EmbeddingPruner(emb, owner, 4)
    for bad in (np.zeros((1, 0, 16)), np.zeros((1, 2, 15)), np.zeros((2, 2, 2, 16)),
                np.zeros(16)):
        with pytest.raises(ValueError, match="shape"):
            pruner.search(bad.astype(np.float32), 2)
