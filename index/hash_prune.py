"""Prune by coarse hash-DTW against every reference: the hash networks' view of the collection.

The embedding prune (:mod:`index.prune`) is the cascade's weak stage on sound the model never
heard: on Csound's FM renders (a held-out engine, 2,154 references) it keeps the right piece
among its 300 nearest for 71 % of 10 s queries, while hash-DTW ranks it first among *all*
references for 84 % (docs/evaluation.md, "The prune on unheard sound"). The hash networks carry
over to new sound better than the embedding network does, so the cascade also prunes with them:

* every reference's hash sequence is **coarsened** once, at load: each run of ``factor``
  consecutive hash frames (``factor`` = 6: 1.1 s) becomes one frame, each bit set where it is set
  in at least half of the run (a majority vote; a piece's last run may be shorter);
* the query's last ``window`` hash frames are coarsened the same way and aligned with
  :func:`index.hashdtw.hash_dtw_batch` (the same φ and gully as the verify) against every
  coarse reference in one call — ``factor²`` (36) times fewer DP cells than the full verify
  of the same references;
* the ``k`` references with the lowest coarse score (ties by reference number) are kept.

Cost: about 4 ms per 10 s query at 2,154 references on one core (1.75 M hash frames, 0.29 M
coarse ones), 20 ms at 10,000 (``bench/cascade.py``), linear in the collection's length; the
coarsening at load 0.2 s for 10,000 references. Memory: one coarse frame per ``factor`` hash
frames (uint32: 5.5 MB for the 10,000 references of ``bench/cascade.py``, 8.2 M hash frames).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from index.hashdtw import hash_dtw_batch

__all__ = ["DEFAULT_FACTOR", "HashPruner", "coarsen"]

DEFAULT_FACTOR = 6


@njit(cache=True)
def _coarsen_kernel(hashes, offsets, factor, n_bits, out, out_offsets):
    for r in range(offsets.shape[0] - 1):
        a, b, o = offsets[r], offsets[r + 1], out_offsets[r]
        for s in range(a, b, factor):
            e = min(s + factor, b)
            code = 0
            for bit in range(n_bits):
                ones = 0
                for t in range(s, e):
                    ones += (np.int64(hashes[t]) >> bit) & 1
                if 2 * ones >= e - s:
                    code |= np.int64(1) << bit
            out[o] = code
            o += 1


def coarsen(hashes: np.ndarray, offsets: np.ndarray, factor: int) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """Coarsen concatenated hash sequences (module docstring).

    Parameters
    ----------
    hashes : np.ndarray, shape (H,), uint16 or uint32
    offsets : np.ndarray, shape (R + 1,), int
        Sequence r is ``hashes[offsets[r]:offsets[r + 1]]``.
    factor : int
        Hash frames per coarse frame (>= 1; 1 returns copies).

    Returns
    -------
    coarse : np.ndarray, same dtype, shape (sum of ceil(len_r / factor),)
    coarse_offsets : np.ndarray, shape (R + 1,), int64
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    hashes = np.asarray(hashes)
    if hashes.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"hashes must be uint16 or uint32, got {hashes.dtype}")
    offsets = np.asarray(offsets, np.int64)
    lengths = -(-np.diff(offsets) // factor)
    out_offsets = np.zeros(offsets.shape[0], np.int64)
    np.cumsum(lengths, out=out_offsets[1:])
    out = np.empty(int(out_offsets[-1]), np.int64)
    _coarsen_kernel(hashes, offsets, int(factor), hashes.dtype.itemsize * 8, out, out_offsets)
    return out.astype(hashes.dtype), out_offsets


class HashPruner:
    """The references nearest a query by coarse hash-DTW (module docstring).

    Parameters
    ----------
    hashes, offsets : the index's concatenated hash sequences and their offsets
    factor : int
        Hash frames per coarse frame.
    """

    def __init__(self, hashes: np.ndarray, offsets: np.ndarray,
                 factor: int = DEFAULT_FACTOR) -> None:
        self.factor = int(factor)
        self.coarse, self.offsets = coarsen(hashes, offsets, self.factor)
        self.n_refs = int(self.offsets.shape[0] - 1)

    @property
    def nbytes(self) -> int:
        """Bytes held (the coarse sequences and their offsets)."""
        return int(self.coarse.nbytes + self.offsets.nbytes)

    def scores(self, query: np.ndarray, *, penalty: int, gully: float) -> np.ndarray:
        """Coarse hash-DTW score of one query's hashes against every reference, (R,) float32
        (``inf`` for an empty reference; lower is nearer)."""
        query = np.asarray(query)
        if query.ndim != 1 or query.shape[0] == 0:
            raise ValueError(f"query hashes must be a non-empty (M,) array, got {query.shape}")
        cq, _ = coarsen(query, np.array([0, query.shape[0]]), self.factor)
        if self.n_refs == 0:
            return np.zeros(0, np.float32)
        res = hash_dtw_batch(cq.astype(self.coarse.dtype), self.coarse, self.offsets,
                             penalty=penalty, gully=gully)
        return res.scores

    def search(self, queries: list[np.ndarray], k: int, *, penalty: int,
               gully: float) -> np.ndarray:
        """The ``k`` nearest references of each query (its hashes: pass only the part to be
        compared), nearest first; ties by reference number.

        Returns
        -------
        np.ndarray, shape (Q, min(k, R)), int64
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), self.n_refs)
        ids = np.empty((len(queries), k), np.int64)
        for i, q in enumerate(queries):
            if k == 0:
                continue
            s = self.scores(q, penalty=penalty, gully=gully)
            part = np.argpartition(s, k - 1)[:k] if k < s.shape[0] else np.arange(s.shape[0])
            ids[i] = part[np.lexsort((part, s[part]))]
        return ids
