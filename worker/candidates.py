"""A session's candidate set and its incremental hash-DTW state, without copying references.

The offline verify (:meth:`index.search.Cascade.verify`) gathers the candidates' hash sequences
into a new array and runs :func:`index.hashdtw.hash_dtw_batch`; a live session does the same DP
row by row (:mod:`index.hashdtw`: a new query frame costs O(reference length) per candidate), and
keeps, per candidate, only what the DP needs:

* where the reference's hashes are in the index's shared (memory-mapped) array: an offset and a
  length, not a copy;
* the keys of the last DP row (one int64 per reference frame) and the last-column history (one
  int64 per query frame), as ``IncrementalHashDTW`` does.

When the candidate set changes, kept candidates keep their state and newcomers are swept over the
whole retained query at once, in the same kernel call that extends the others by the new rows:
``from_row[k]`` is 0 for a newcomer and the rows already applied for the rest. The kernel calls
``index.hashdtw``'s own row sweep and end selection, so the scores, ends and path lengths are
bit-identical to ``hash_dtw_batch`` on the same query (tested), which is what makes a session
agree with the offline search.

Memory per session: ``8 × Σ N_k`` bytes of last rows (K = 100 three-minute references: 775 kB)
plus ``8 × K × capacity`` of last-column history (``nbytes``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# The row sweep and end selection of the offline hash-DTW, reused so that the live scores are
# the offline ones exactly (index.hashdtw_kernels keeps them private; IncrementalHashDTW cannot
# be used here: it owns a copy of its references and can only restart all of them at once).
from index.hashdtw import HashDTWBatch
from index.hashdtw_kernels import _penalty_keys, _select_end, _sweep

__all__ = ["CandidateDTW"]


def _extend(q, hashes, starts, lengths, top_off, tops, cols, from_row, pu, pl, g,
            scores, end_j, end_i, path_length):
    m = q.shape[0]
    for k in prange(starts.shape[0]):
        n = lengths[k]
        if n == 0:
            scores[k] = np.inf
            end_j[k] = -1
            end_i[k] = -1
            path_length[k] = 0
            continue
        ref = hashes[starts[k]:starts[k] + n]
        top = tops[top_off[k]:top_off[k] + n]
        r0 = from_row[k]
        if r0 < m:
            _sweep(q[r0:], ref, top, cols[k], r0, pu, pl)
        cost, length, ei, ej = _select_end(top, cols[k], m, n, g)
        scores[k] = cost / length
        end_i[k] = ei
        end_j[k] = ej
        path_length[k] = length


# The same loop serial and parallel over candidates: a typical live call (5 new rows against
# 100 references of ~1,000 frames, 0.5 M cells, ~0.25 ms) costs less than waking a thread team,
# which on shared cores took up to ~10 ms; a restart of the whole window is worth splitting.
# nogil: a long extension must not stall the lease timer and the event loop (issue #20)
_extend_serial = njit(cache=True, nogil=True)(_extend)
_extend_parallel = njit(cache=True, parallel=True, nogil=True)(_extend)
PARALLEL_CELLS = 4_000_000


class CandidateDTW:
    """Hash-DTW of one growing query against a changing set of references of a shared index.

    Parameters
    ----------
    hashes : np.ndarray, shape (H,), uint16 or uint32
        The index's concatenated hash sequences (kept by reference; may be memory-mapped).
    hash_offsets : np.ndarray, shape (R + 1,), int64
        Reference r is ``hashes[hash_offsets[r]:hash_offsets[r + 1]]``.
    penalty : int
        φ, Hamming units.
    gully : float
        g in [0, 1].
    """

    def __init__(self, hashes: np.ndarray, hash_offsets: np.ndarray, *, penalty: int,
                 gully: float) -> None:
        self._hashes = np.asarray(hashes)  # a memmap stays a view; numba wants an ndarray
        self._offsets = hash_offsets
        self._penalty, self._gully = int(penalty), float(gully)
        self._n_bits = int(np.dtype(hashes.dtype).itemsize * 8)
        self.refs = np.zeros(0, np.int64)  # reference numbers, in slot order
        self._starts = np.zeros(0, np.int64)
        self._lengths = np.zeros(0, np.int64)
        self._top_off = np.zeros(1, np.int64)
        self._tops = np.zeros(0, np.int64)
        self._cols = np.zeros((0, 64), np.int64)
        self._from_row = np.zeros(0, np.int64)
        self._m = 0  # query rows applied to the kept candidates

    @property
    def hash_offsets(self) -> np.ndarray:
        """The index's (R + 1,) offsets of each reference's hashes."""
        return self._offsets

    @property
    def n_candidates(self) -> int:
        return int(self.refs.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of DP state and bookkeeping held (not the shared hashes)."""
        return int(sum(a.nbytes for a in (self.refs, self._starts, self._lengths, self._top_off,
                                          self._tops, self._cols, self._from_row)))

    def set_candidates(self, refs: np.ndarray) -> None:
        """Make ``refs`` (K,) the candidate set: kept ones keep their state, newcomers start over.

        Newcomers are swept over the whole query at the next :meth:`extend`.
        """
        refs = np.asarray(refs, np.int64).reshape(-1)
        if refs.shape[0] == self.refs.shape[0] and np.array_equal(np.sort(refs),
                                                                  np.sort(self.refs)):
            return
        old_slot = {int(r): s for s, r in enumerate(self.refs)}
        keep_new = np.array([int(r) in old_slot for r in refs], bool)
        lengths = np.asarray(self._offsets[refs + 1] - self._offsets[refs], np.int64)
        top_off = np.zeros(refs.shape[0] + 1, np.int64)
        np.cumsum(lengths, out=top_off[1:])
        tops = np.zeros(int(top_off[-1]), np.int64)
        cols = np.zeros((refs.shape[0], self._cols.shape[1]), np.int64)
        from_row = np.zeros(refs.shape[0], np.int64)
        if keep_new.any():
            new_idx = np.flatnonzero(keep_new)
            old_idx = np.array([old_slot[int(r)] for r in refs[new_idx]], np.int64)
            # one vectorised gather of the kept rows' keys into their new places
            src = np.repeat(self._top_off[old_idx] - top_off[new_idx], lengths[new_idx])
            dst = np.repeat(top_off[new_idx], lengths[new_idx]) + _ranges(lengths[new_idx])
            tops[dst] = self._tops[src + dst]
            cols[new_idx] = self._cols[old_idx]
            from_row[new_idx] = self._from_row[old_idx]
        self.refs, self._lengths, self._top_off = refs, lengths, top_off
        self._starts = np.asarray(self._offsets[refs], np.int64)
        self._tops, self._cols, self._from_row = tops, cols, from_row

    def restart(self) -> None:
        """Forget the query (it slid): every candidate is swept again from row 0 next time."""
        self._tops[:] = 0
        self._from_row[:] = 0
        self._m = 0

    def extend(self, query: np.ndarray) -> HashDTWBatch:
        """Bring every candidate up to ``query`` (M,), the whole query since the last restart.

        Rows ``[from_row[k], M)`` are swept for candidate k (all M for a newcomer, the new ones
        for the rest), in one kernel call (parallel over candidates when there are at least
        ``PARALLEL_CELLS`` DP cells to fill).

        Returns
        -------
        HashDTWBatch
            In slot order (``self.refs``): what ``hash_dtw_batch(query, ...)`` returns for the
            same references.
        """
        q = np.ascontiguousarray(query)
        m = q.shape[0]
        if m == 0:
            raise ValueError("query is empty")
        if q.dtype != self._hashes.dtype:
            raise ValueError(f"query is {q.dtype} but the index hashes are {self._hashes.dtype}")
        if m < int(self._from_row.max(initial=0)):
            raise ValueError("the query shrank: restart() before a shorter query")
        n_max = int(self._lengths.max(initial=0))
        pu, pl = _penalty_keys(self._penalty, self._gully, self._n_bits, m, n_max)
        if m > self._cols.shape[1]:
            grown = np.zeros((self._cols.shape[0], max(m, 2 * self._cols.shape[1])), np.int64)
            grown[:, : self._cols.shape[1]] = self._cols
            self._cols = grown
        k = self.n_candidates
        out = HashDTWBatch(np.empty(k, np.float32), np.empty(k, np.int64),
                           np.empty(k, np.int64), np.empty(k, np.int64))
        if k:
            cells = int(((m - self._from_row) * self._lengths).sum())
            kernel = _extend_parallel if cells >= PARALLEL_CELLS else _extend_serial
            kernel(q, self._hashes, self._starts, self._lengths, self._top_off,
                           self._tops, self._cols, self._from_row, pu, pl, self._gully, *out)
        self._from_row[:] = m
        self._m = m
        return out


    def score_once(self, query: np.ndarray) -> HashDTWBatch:
        """Hash-DTW of a separate ``query`` (M,) against the same candidates, keeping no state
        (e.g. the newest seconds alone); slot order, as :meth:`extend`."""
        q = np.ascontiguousarray(query)
        m, k = q.shape[0], self.n_candidates
        if m == 0 or q.dtype != self._hashes.dtype:
            raise ValueError(f"need a non-empty {self._hashes.dtype} query")
        pu, pl = _penalty_keys(self._penalty, self._gully, self._n_bits, m,
                               int(self._lengths.max(initial=0)))
        out = HashDTWBatch(np.empty(k, np.float32), np.empty(k, np.int64),
                           np.empty(k, np.int64), np.empty(k, np.int64))
        if k:
            _extend_serial(q, self._hashes, self._starts, self._lengths, self._top_off,
                           np.zeros_like(self._tops), np.zeros((k, m), np.int64),
                           np.zeros(k, np.int64), pu, pl, self._gully, *out)
        return out


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(n)`` for each n of ``lengths``."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
