"""Hash-DTW: subsequence DTW on the Hamming distances of packed hash sequences.

The dynamic programme is Raffel's (``dhs/match.py``): rows are query frames ``i``, columns are
reference frames ``j``, the distance is ``d(i, j) = popcount(q[i] ^ r[j])`` and ::

    D[i, j] = d(i, j) + min(D[i-1, j-1], D[i-1, j] + φ, D[i, j-1] + φ)

with ties preferring the diagonal, then ``D[i-1, j]``, then ``D[i, j-1]`` (the original's order).
The first row and the first column are not accumulated, so a path may start anywhere on the top
or left edge. It ends on the last row at ``j >= gully`` or on the last column at ``i >= gully``,
``gully = int(g * min(M, N))`` (clamped to ``min(M, N) - 1`` so that ``g = 1`` is usable); the
smallest ``D`` there wins (the original's argmin order, last row on a tie) and
``score = D[end] / path_length[end]``.

One deliberate difference from the original: ``path_length`` counts the *cells* of the path,
so a path that starts and ends on the same cell has length 1; the original counts moves
(cells - 1), which divides by zero for length-1 paths and biases short paths.

The kernels that run this DP (one 64-bit key per cell, anti-diagonal sweeps that LLVM
vectorises, a query extended block by block from the row above it) are private, in
:mod:`index.hashdtw_kernels`; this module is their public face: each function validates its
input, allocates the outputs and calls one kernel.

Overflow bound: the cost field has 29 bits, so every public function checks
``(M + N) * (n_bits + φ) < 2**29``: with 32 bits and φ = 16 that allows M + N up to 11 million
hash frames (24 days at the 5.38 Hz hash rate). The length field has 32 bits.

Streaming caveat (inherited from the original's gully): with a live query shorter than the
reference (M < N) the end must lie at reference frame >= g * M. A query that starts with the
piece and plays at ``speed`` times the reference's tempo truly ends near frame ``speed * M``, so
for speed < g the true end is excluded: with a sliding window of M frames, until the stream is
``g * M / speed`` frames in (11 s for a 10 s window at 0.8x and g = 0.9). Callers that need
positions in the opening seconds of a piece should lower g there.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from index.hashdtw_kernels import _append_kernel, _batch_kernel, _pair, _penalty_keys
from model.bits import (
    _check_hashes,
    _check_pair,
    hamming_matrix,
    median_hamming,
    pack_bits,
    unpack_bits,
)

__all__ = [
    "HashDTWBatch",
    "HashDTWResult",
    "IncrementalHashDTW",
    "hamming_matrix",
    "hash_dtw",
    "hash_dtw_batch",
    "median_hamming",
    "pack_bits",
    "unpack_bits",
]


class HashDTWResult(NamedTuple):
    """Hash-DTW of one query against one reference.

    Attributes
    ----------
    score : float
        Path cost (Hamming distances plus penalties) / path length in cells; lower is better.
    end_j : int
        Reference frame where the best path ends: the live position in the reference.
    end_i : int
        Query frame where it ends (``M - 1`` unless it left through the last column).
    path_length : int
        Cells on the path.
    """

    score: float
    end_j: int
    end_i: int
    path_length: int


class HashDTWBatch(NamedTuple):
    """Hash-DTW of one query against K references; fields as :class:`HashDTWResult`, shape (K,).

    ``scores`` is float32 and ``+inf`` for an empty reference (whose ends and length are -1, 0).
    """

    scores: np.ndarray
    end_j: np.ndarray
    end_i: np.ndarray
    path_length: np.ndarray


# ---------------------------------------------------------------- validation and the public calls


def _check_offsets(offsets: np.ndarray, n_total: int) -> np.ndarray:
    offsets = np.ascontiguousarray(offsets)
    if offsets.ndim != 1 or offsets.shape[0] < 1 or offsets.dtype.kind not in "iu":
        raise ValueError("offsets must be a 1-D integer array of K + 1 entries")
    offsets = offsets.astype(np.int64, copy=False)
    if offsets[0] != 0 or offsets[-1] != n_total or np.any(np.diff(offsets) < 0):
        raise ValueError(
            f"offsets must rise monotonically from 0 to len(refs) = {n_total}, "
            f"got {offsets[0]} .. {offsets[-1]}"
        )
    return offsets


def hash_dtw_batch(
    query: np.ndarray,
    refs: np.ndarray,
    offsets: np.ndarray,
    *,
    penalty: int,
    gully: float = 0.9,
) -> HashDTWBatch:
    """Hash-DTW of one query against K references in one call (parallel across references).

    Parameters
    ----------
    query : np.ndarray, shape (M,), uint16 or uint32, M >= 1
        Packed query hashes.
    refs : np.ndarray, shape (H,), same dtype
        All reference hash sequences, concatenated.
    offsets : np.ndarray, shape (K + 1,), integer
        Reference k is ``refs[offsets[k]:offsets[k + 1]]``; rising from 0 to H.
    penalty : int
        φ, added to every non-diagonal move, in Hamming units (see :func:`median_hamming`).
    gully : float
        g in [0, 1]: the path ends on the last row at a column, or on the last column at a row,
        of at least ``int(g * min(M, N))``.

    Returns
    -------
    HashDTWBatch
        ``scores`` (K,) float32, ``end_j``, ``end_i``, ``path_length`` (K,) int64.
        An empty reference scores ``+inf`` with ends -1 so one bad reference cannot fail a batch.

    Raises
    ------
    ValueError
        Empty or mistyped query, bad offsets, penalty or gully, or a possible overflow.
    """
    query, refs = _check_pair(query, refs, allow_empty=True)
    if query.shape[0] == 0:
        raise ValueError("query is empty")
    offsets = _check_offsets(offsets, refs.shape[0])
    n_max = int(np.max(np.diff(offsets))) if offsets.shape[0] > 1 else 0
    pu, pl = _penalty_keys(penalty, gully, refs.dtype.itemsize * 8, query.shape[0], n_max)
    n_refs = offsets.shape[0] - 1
    out = HashDTWBatch(
        np.empty(n_refs, np.float32),
        np.empty(n_refs, np.int64),
        np.empty(n_refs, np.int64),
        np.empty(n_refs, np.int64),
    )
    _batch_kernel(query, refs, offsets, pu, pl, float(gully), *out)
    return out


def hash_dtw(
    query: np.ndarray, reference: np.ndarray, *, penalty: int, gully: float = 0.9
) -> HashDTWResult:
    """Hash-DTW of one query against one reference (see :func:`hash_dtw_batch`).

    Parameters
    ----------
    query, reference : np.ndarray, shape (M,), (N,), same dtype uint16 or uint32, non-empty
    penalty : int
    gully : float

    Returns
    -------
    HashDTWResult

    Raises
    ------
    ValueError
        Either sequence empty, or as :func:`hash_dtw_batch`.
    """
    query, reference = _check_pair(query, reference, allow_empty=False)
    pu, pl = _penalty_keys(
        penalty, gully, query.dtype.itemsize * 8, query.shape[0], reference.shape[0]
    )
    # The serial kernel: a thread-pool launch would cost about as much as the DP itself.
    cost, length, end_i, end_j = _pair(query, reference, pu, pl, float(gully))
    return HashDTWResult(float(cost) / float(length), int(end_j), int(end_i), int(length))


class IncrementalHashDTW:
    """Hash-DTW of a growing query against K references, extended row by row.

    ``append`` costs O(new frames x total reference length) and returns exactly what
    :func:`hash_dtw_batch` returns for the whole query so far (same kernel, tested equal).

    Memory per reference of N frames after M query frames: ``8 * N`` bytes for the last DP row
    (one int64 key per cell) plus ``8 * M`` for the last-column history (capacity grows by
    doubling, so up to ``16 * M``), which the end search needs because the gully
    ``int(g * min(M, N))`` moves as M grows. A 3-minute reference (969 hash frames) with a 10 s
    query (54 frames) holds 8.2 kB; ``nbytes`` reports the total.

    Parameters
    ----------
    refs, offsets, penalty, gully
        As :func:`hash_dtw_batch`; ``refs`` is kept by reference, not copied.
    """

    def __init__(
        self, refs: np.ndarray, offsets: np.ndarray, *, penalty: int, gully: float = 0.9
    ) -> None:
        self._refs = _check_hashes(refs, "refs", allow_empty=True)
        self._offsets = _check_offsets(offsets, self._refs.shape[0])
        self._n_max = int(np.max(np.diff(self._offsets))) if self._offsets.shape[0] > 1 else 0
        _penalty_keys(penalty, gully, self.n_bits, 1, self._n_max)  # fail early on bad values
        self._penalty = penalty
        self._gully = float(gully)
        self._tops = np.zeros(self._refs.shape[0], np.int64)
        self._cols = np.zeros((self.n_refs, 64), np.int64)
        self._m = 0

    @property
    def n_refs(self) -> int:
        """K, the number of references."""
        return self._offsets.shape[0] - 1

    @property
    def n_bits(self) -> int:
        """16 or 32."""
        return self._refs.dtype.itemsize * 8

    @property
    def n_frames(self) -> int:
        """M, the query frames appended since the last reset."""
        return self._m

    @property
    def nbytes(self) -> int:
        """Bytes of DP state held (last rows and last-column histories)."""
        return self._tops.nbytes + self._cols.nbytes

    def reset(self) -> None:
        """Forget the query; the next :meth:`append` starts a new one."""
        self._tops[:] = 0
        self._m = 0

    def rebuild(self, query: np.ndarray) -> HashDTWBatch:
        """Start over from ``query`` (e.g. a sliding window that dropped its oldest frames)."""
        self.reset()
        return self.append(query)

    def append(self, frames: np.ndarray) -> HashDTWBatch:
        """Extend the query by ``frames`` and return the scores of the whole query so far.

        Parameters
        ----------
        frames : np.ndarray, shape (R,), the references' dtype
            New query hashes; R may be 0 once the query is non-empty.

        Returns
        -------
        HashDTWBatch
            As :func:`hash_dtw_batch` for the concatenated query.
        """
        frames = _check_hashes(frames, "frames", allow_empty=True)
        if frames.dtype != self._refs.dtype:
            raise ValueError(f"frames are {frames.dtype} but references are {self._refs.dtype}")
        m = self._m + frames.shape[0]
        if m == 0:
            raise ValueError("query is empty")
        pu, pl = _penalty_keys(self._penalty, self._gully, self.n_bits, m, self._n_max)
        if m > self._cols.shape[1]:  # amortised doubling: O(1) copies per frame
            grown = np.zeros((self.n_refs, max(m, 2 * self._cols.shape[1])), np.int64)
            grown[:, : self._m] = self._cols[:, : self._m]
            self._cols = grown
        k = self.n_refs
        out = HashDTWBatch(
            np.empty(k, np.float32), np.empty(k, np.int64), np.empty(k, np.int64),
            np.empty(k, np.int64),
        )
        _append_kernel(
            frames, self._refs, self._offsets, pu, pl, self._gully, self._tops, self._cols,
            self._m, *out,
        )
        self._m = m
        return out
