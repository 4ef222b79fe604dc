"""CandidateDTW: live hash-DTW over a changing candidate set equals the offline batch DTW."""

from __future__ import annotations

import numpy as np
import pytest

from index.hashdtw import hash_dtw_batch
from worker.candidates import CandidateDTW


def _collection(rng: np.random.Generator, dtype: type, n_refs: int = 40):
    lengths = rng.integers(1, 300, n_refs)
    lengths[3] = 0  # an empty reference scores +inf, as in the batch
    lengths[5] = 2  # shorter than the query: the path leaves through the last column
    offsets = np.zeros(n_refs + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    bits = 8 * np.dtype(dtype).itemsize
    hashes = rng.integers(0, 2 ** bits, offsets[-1], dtype=np.uint64).astype(dtype)
    return hashes, offsets


def _batch(query, hashes, offsets, cand, penalty, gully):
    sub = np.concatenate([hashes[offsets[r]:offsets[r + 1]] for r in cand])
    off = np.zeros(len(cand) + 1, np.int64)
    np.cumsum([offsets[r + 1] - offsets[r] for r in cand], out=off[1:])
    return hash_dtw_batch(query, sub, off, penalty=penalty, gully=gully)


@pytest.mark.parametrize("dtype,penalty", [(np.uint32, 16), (np.uint16, 7)])
def test_equals_batch_through_set_changes_growth_and_restart(dtype: type, penalty: int) -> None:
    rng = np.random.default_rng(0)
    hashes, offsets = _collection(rng, dtype)
    query = rng.integers(0, 2 ** (8 * np.dtype(dtype).itemsize), 200,
                         dtype=np.uint64).astype(dtype)
    dtw = CandidateDTW(hashes, offsets, penalty=penalty, gully=0.9)
    start, end = 0, 0
    for step in range(14):
        # a new candidate set each step: some kept, some new, in a new order
        dtw.set_candidates(rng.choice(40, 15, replace=False))
        end += int(rng.integers(0, 30 if step == 0 else 9)) + 1  # past the 64-row history
        if step == 8:  # the window slides: restart from the newest rows
            start = end - 5
            dtw.restart()
        got = dtw.extend(query[start:end])
        want = _batch(query[start:end], hashes, offsets, dtw.refs, penalty, 0.9)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_score_once_is_stateless_and_equals_batch() -> None:
    rng = np.random.default_rng(3)
    hashes, offsets = _collection(rng, np.uint32)
    dtw = CandidateDTW(hashes, offsets, penalty=16, gully=0.9)
    dtw.set_candidates(np.array([4, 9, 5, 3, 11]))
    query = hashes[offsets[9] + 10:offsets[9] + 30].copy()
    before = dtw.extend(query)
    other = rng.integers(0, 2 ** 32, 12, dtype=np.uint64).astype(np.uint32)
    for g, w in zip(dtw.score_once(other), _batch(other, hashes, offsets, dtw.refs, 16, 0.9),
                    strict=True):
        np.testing.assert_array_equal(g, w)
    for g, w in zip(dtw.extend(query), before, strict=True):  # its own DP is untouched
        np.testing.assert_array_equal(g, w)


def test_shares_the_index_hashes_and_reports_its_state() -> None:
    rng = np.random.default_rng(1)
    hashes, offsets = _collection(rng, np.uint32)
    dtw = CandidateDTW(hashes, offsets, penalty=16, gully=0.9)
    assert np.shares_memory(dtw._hashes, hashes)  # offsets into the shared array, no copy
    cand = np.array([1, 2, 7])
    dtw.set_candidates(cand)
    n_cells = int(sum(offsets[r + 1] - offsets[r] for r in cand))
    # last DP rows (8 B per reference frame) + 64 rows of last-column history per candidate
    assert dtw.nbytes >= 8 * n_cells + 8 * 64 * 3
    assert dtw.nbytes < 8 * n_cells + 8 * 64 * 3 + 1024


def test_refuses_a_shrinking_or_mistyped_query() -> None:
    rng = np.random.default_rng(2)
    hashes, offsets = _collection(rng, np.uint32)
    dtw = CandidateDTW(hashes, offsets, penalty=16, gully=0.9)
    dtw.set_candidates(np.array([0, 1]))
    q = hashes[:10].copy()
    dtw.extend(q)
    with pytest.raises(ValueError, match="shrank"):
        dtw.extend(q[:5])
    with pytest.raises(ValueError, match="uint16"):
        dtw.extend(q.astype(np.uint16))
    with pytest.raises(ValueError, match="empty"):
        dtw.extend(q[:0])
