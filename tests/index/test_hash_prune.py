"""The coarse hash-DTW prune: majority-vote coarsening, and the nearest references first."""

from __future__ import annotations

import numpy as np
import pytest

from index.hash_prune import HashPruner, coarsen
from model.bits import pack_bits, unpack_bits


def _majority(bits: np.ndarray, factor: int) -> np.ndarray:
    """Reference coarsening on unpacked bits (n, B) of one sequence: runs of ``factor``, the
    last one shorter, each bit set where set in at least half the run."""
    runs = [bits[s:s + factor] for s in range(0, bits.shape[0], factor)]
    return np.array([2 * r.sum(0) >= r.shape[0] for r in runs])


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("factor", [1, 2, 6])
def test_coarsen_is_a_majority_vote_per_bit_within_each_sequence(dtype, factor):
    rng = np.random.default_rng(factor)
    bits = 8 * np.dtype(dtype).itemsize
    lengths = [13, 1, 0, 6, 25]  # a short last run, a sequence shorter than a run, an empty one
    seqs = [pack_bits(rng.choice([-1.0, 1.0], (n, bits))).astype(dtype) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    coarse, c_off = coarsen(np.concatenate(seqs), offsets, factor)
    assert coarse.dtype == dtype
    assert list(np.diff(c_off)) == [-(-n // factor) for n in lengths]
    for r, s in enumerate(seqs):
        got = coarse[c_off[r]:c_off[r + 1]]
        if len(s) == 0:
            assert got.size == 0
            continue
        want = _majority(unpack_bits(s) > 0, factor)
        np.testing.assert_array_equal(unpack_bits(got) > 0, want)


def test_coarsen_refuses_bad_input():
    with pytest.raises(ValueError, match="factor"):
        coarsen(np.zeros(4, np.uint32), np.array([0, 4]), 0)
    with pytest.raises(ValueError, match="uint16 or uint32"):
        coarsen(np.zeros(4, np.int64), np.array([0, 4]), 2)


def _collection(n_refs=40, length=400, seed=0):
    """Random pieces whose hashes hold still for 4-10 frames at a time, as music's do (a
    note or chord lasts several hash frames)."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_refs):
        codes = rng.integers(0, 2**32, length, dtype=np.uint64).astype(np.uint32)
        seqs.append(np.repeat(codes, rng.integers(4, 11, length))[:length])
    return seqs, np.concatenate(seqs), np.arange(n_refs + 1) * length


def _noisy(excerpt: np.ndarray, flip: float, seed: int) -> np.ndarray:
    """The excerpt with each bit flipped with probability ``flip`` (another sound's hashes)."""
    bits = unpack_bits(excerpt) > 0
    bits ^= np.random.default_rng(seed).random(bits.shape) < flip
    return pack_bits(np.where(bits, 1.0, -1.0)).astype(np.uint32)


def test_a_noisy_excerpt_finds_its_reference_first():
    seqs, hashes, offsets = _collection()
    pruner = HashPruner(hashes, offsets, factor=6)
    queries = [_noisy(seqs[r][100:160], 0.25, r) for r in (3, 17, 31)]
    ids = pruner.search(queries, 5, penalty=16, gully=0.9)
    assert ids.shape == (3, 5) and list(ids[:, 0]) == [3, 17, 31]
    assert all(len(set(row)) == 5 for row in ids)
    # nearest first: the scores along each row do not decrease
    for q, row in zip(queries, ids, strict=True):
        s = pruner.scores(q, penalty=16, gully=0.9)
        assert np.all(np.diff(s[row]) >= 0) and s[row[0]] == s.min()


def test_search_clamps_k_keeps_ties_in_reference_order_and_handles_empty_references():
    seqs, hashes, offsets = _collection(n_refs=4, length=60)
    # a fifth, empty reference: never nearer than a real one
    pruner = HashPruner(hashes, np.append(offsets, offsets[-1]), factor=3)
    ids = pruner.search([seqs[2][:30]], 100, penalty=16, gully=0.9)
    assert ids.shape == (1, 5) and ids[0, 0] == 2 and ids[0, -1] == 4
    twins = HashPruner(np.concatenate([seqs[0], seqs[0]]), np.array([0, 60, 120]), factor=3)
    assert list(twins.search([seqs[0][:30]], 2, penalty=16, gully=0.9)[0]) == [0, 1]
    with pytest.raises(ValueError, match="k must be"):
        pruner.search([seqs[0]], 0, penalty=16, gully=0.9)
    with pytest.raises(ValueError, match="non-empty"):
        pruner.search([seqs[0][:0]], 2, penalty=16, gully=0.9)
    assert pruner.nbytes == pruner.coarse.nbytes + pruner.offsets.nbytes
