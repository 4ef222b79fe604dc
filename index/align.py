"""Feature-level DTW alignment and match confidence (Raffel's gold standard, djitw).

A candidate that hash-DTW ranks first is verified on the CQT frames themselves: subsequence DTW
on the cosine distance matrix with the same DP as :mod:`index.hashdtw` (free start on the first
row or column, end past the gully on the last row or column, ties diagonal > up > left), in
float, with a traceback. Defaults follow the thesis: φ = median distance, g = 0.96.

Normalised score ``s = cost / path length / mean(C[submatrix spanned by the path])`` and
confidence ``c = clip(2 (1 - s), 0, 1)``; Raffel calls a match at c >= 0.5. The submatrix here is
inclusive, ``C[p[0]:p[-1] + 1, q[0]:q[-1] + 1]``: the original's ``C[p.min():p.max(), ...]``
drops the last row and column (an off-by-one), which makes it empty, hence NaN, for length-1
paths. Degenerate cases are defined instead of NaN:

* a path of one cell has ``s = 1`` (``c = 0``): one frame is no evidence;
* a submatrix whose mean is 0 (all its frames identical) has ``s = 0`` when the cost is 0 too
  (a perfect match, ``c = 1``) and ``s = inf`` (``c = 0``) when the cost is all penalties.

The kernels release the GIL (``nogil=True``), as :mod:`index.hashdtw_kernels`' do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

__all__ = [
    "Alignment",
    "align",
    "align_cost_matrix",
    "cosine_distance",
    "subsequence_dtw",
]

DEFAULT_GULLY = 0.96
_DIAG, _UP, _LEFT = 0, 1, 2  # traceback codes: from (i-1, j-1), (i-1, j), (i, j-1)


@dataclass(frozen=True)
class Alignment:
    """A DTW alignment of query frames to reference frames.

    Attributes
    ----------
    query_idx, ref_idx : np.ndarray, shape (L,), int64
        The path: query frame ``query_idx[t]`` is aligned to reference frame ``ref_idx[t]``;
        both non-decreasing, L = path length in cells.
    score : float
        Raw path cost: sum of distances on the path plus φ per non-diagonal move.
    norm_score : float
        s (see the module docstring); lower is better, real matches mostly 0.5–0.75.
    confidence : float
        ``clip(2 (1 - s), 0, 1)``; a match when >= 0.5.
    ref_start, ref_end : int
        First and last reference frame of the path (inclusive), in CQT frames.
    """

    query_idx: np.ndarray
    ref_idx: np.ndarray
    score: float
    norm_score: float
    confidence: float
    ref_start: int
    ref_end: int


@njit(cache=True, nogil=True)
def _sdtw_kernel(cost, penalty, traceback, last_row, last_row_len, last_col, last_col_len):
    """Subsequence DTW on a dense cost matrix, keeping two rows of D.

    Parameters
    ----------
    cost : (M, N) float64
    penalty : float
    traceback : (M, N) uint8 filled with _DIAG/_UP/_LEFT, or shape (0, 0) to skip it (the
        loop-invariant test is hoisted by LLVM, so the no-traceback baseline pays nothing)
    last_row, last_row_len : (N,) out: D and path length (cells) of the last row
    last_col, last_col_len : (M,) out: the same for the last column
    """
    m, n = cost.shape
    keep = traceback.shape[0] > 0
    d_prev = np.empty(n)
    l_prev = np.empty(n, np.int64)
    d_cur = np.empty(n)
    l_cur = np.empty(n, np.int64)
    for j in range(n):  # first row: free start, not accumulated
        d_prev[j] = cost[0, j]
        l_prev[j] = 1
    last_col[0] = d_prev[n - 1]
    last_col_len[0] = 1
    for i in range(1, m):
        d_cur[0] = cost[i, 0]  # first column: free start too
        l_cur[0] = 1
        for j in range(1, n):
            diag = d_prev[j - 1]
            up = d_prev[j] + penalty
            left = d_cur[j - 1] + penalty
            # The original's order: diagonal on ties, then up, then left.
            if diag <= up and diag <= left:
                d_cur[j] = cost[i, j] + diag
                l_cur[j] = l_prev[j - 1] + 1
                move = _DIAG
            elif up <= left:
                d_cur[j] = cost[i, j] + up
                l_cur[j] = l_prev[j] + 1
                move = _UP
            else:
                d_cur[j] = cost[i, j] + left
                l_cur[j] = l_cur[j - 1] + 1
                move = _LEFT
            if keep:
                traceback[i, j] = move
        last_col[i] = d_cur[n - 1]
        last_col_len[i] = l_cur[n - 1]
        d_prev, d_cur = d_cur, d_prev
        l_prev, l_cur = l_cur, l_prev
    last_row[:] = d_prev
    last_row_len[:] = l_prev


@njit(cache=True, nogil=True)
def _select_end(last_row, last_col, g):
    """End cell past the gully, as in the original: (end_i, end_j), last row on a tie."""
    m = last_col.shape[0]
    n = last_row.shape[0]
    short = min(m, n)
    gully = min(int(g * short), short - 1)
    bi = gully + np.argmin(last_col[gully:])
    bj = gully + np.argmin(last_row[gully:])
    if last_row[bj] > last_col[bi]:
        return bi, n - 1
    return m - 1, bj


@njit(cache=True, nogil=True)
def _traceback_path(traceback, end_i, end_j):
    p = np.empty(end_i + end_j + 1, np.int64)
    q = np.empty(end_i + end_j + 1, np.int64)
    i, j, n = end_i, end_j, 0
    p[0], q[0] = i, j
    while i > 0 and j > 0:  # free start: stop at the first row or column
        move = traceback[i, j]
        if move == _DIAG:
            i -= 1
            j -= 1
        elif move == _UP:
            i -= 1
        else:
            j -= 1
        n += 1
        p[n], q[n] = i, j
    return p[: n + 1][::-1].copy(), q[: n + 1][::-1].copy()


def cosine_distance(query: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine distance between every query frame and every reference frame.

    Parameters
    ----------
    query, ref : np.ndarray, shape (M, F), (N, F), float
        Feature frames (e.g. L2-normalised CQT frames, F = 48); all-zero frames are allowed.

    Returns
    -------
    np.ndarray, shape (M, N), float64, in [0, 2]
        ``1 - a·b / (|a| |b|)``, which is ``1 - a·b`` for L2-normalised frames; a zero frame is
        at distance 1 from everything (it has no direction).
    """
    query = _check_frames(query, "query")
    ref = _check_frames(ref, "reference")
    if query.shape[1] != ref.shape[1]:
        raise ValueError(f"query has {query.shape[1]} features per frame, reference {ref.shape[1]}")
    qn = np.linalg.norm(query, axis=1, keepdims=True)
    rn = np.linalg.norm(ref, axis=1, keepdims=True)
    # Dividing by 1 leaves zero frames at zero, so their similarity is 0, distance 1.
    dist = (query / np.where(qn > 0, qn, 1.0)) @ (ref / np.where(rn > 0, rn, 1.0)).T
    # In place: for 10 s x 3 min this matrix is 6.7 MB, and fresh temporaries cost page faults.
    np.subtract(1.0, dist, out=dist)
    return np.clip(dist, 0.0, 2.0, out=dist)


def subsequence_dtw(
    cost: np.ndarray, *, penalty: float, gully: float = DEFAULT_GULLY
) -> tuple[float, int, int, int]:
    """Subsequence DTW on a dense cost matrix, without traceback (the float baseline).

    Parameters
    ----------
    cost : np.ndarray, shape (M, N), float, finite, non-empty
    penalty : float
        φ >= 0 per non-diagonal move.
    gully : float
        g in [0, 1].

    Returns
    -------
    (cost, path_length, end_i, end_j) : (float, int, int, int)
        Raw cost of the best path and its length in cells; ``cost / path_length`` is the
        hash-DTW style score.
    """
    cost = _check_cost(cost, penalty, gully)
    last_row, last_row_len, last_col, last_col_len = _run(cost, penalty, np.empty((0, 0), np.uint8))
    end_i, end_j = _select_end(last_row, last_col, float(gully))
    if end_i == cost.shape[0] - 1:
        return float(last_row[end_j]), int(last_row_len[end_j]), int(end_i), int(end_j)
    return float(last_col[end_i]), int(last_col_len[end_i]), int(end_i), int(end_j)


def align_cost_matrix(
    cost: np.ndarray, *, penalty: float | None = None, gully: float = DEFAULT_GULLY
) -> Alignment:
    """Align on a precomputed distance matrix (rows = query frames, columns = reference frames).

    Parameters
    ----------
    cost : np.ndarray, shape (M, N), float, finite, non-empty
    penalty : float or None
        φ; None takes the median of ``cost`` (Raffel's choice).
    gully : float
        g in [0, 1], 0.96 by default.

    Returns
    -------
    Alignment
    """
    cost = np.asarray(cost, dtype=np.float64)
    if penalty is None and cost.size:
        penalty = float(np.median(cost))
    cost = _check_cost(cost, penalty, gully)
    traceback = np.zeros(cost.shape, np.uint8)
    last_row, _, last_col, _ = _run(cost, float(penalty), traceback)
    end_i, end_j = _select_end(last_row, last_col, float(gully))
    score = float(last_row[end_j] if end_i == cost.shape[0] - 1 else last_col[end_i])
    p, q = _traceback_path(traceback, end_i, end_j)
    s = _normalised_score(cost, p, q, score)
    return Alignment(
        query_idx=p, ref_idx=q, score=score, norm_score=s,
        confidence=float(np.clip(2.0 * (1.0 - s), 0.0, 1.0)),
        ref_start=int(q[0]), ref_end=int(q[-1]),
    )


def align(
    query: np.ndarray,
    ref: np.ndarray,
    *,
    penalty: float | None = None,
    gully: float = DEFAULT_GULLY,
) -> Alignment:
    """Align query frames to reference frames with cosine-distance subsequence DTW.

    Parameters
    ----------
    query : np.ndarray, shape (M, F), float
        Query feature frames (live audio CQT), M >= 1.
    ref : np.ndarray, shape (N, F), float
        Reference feature frames (a MIDI rendering), N >= 1.
    penalty : float or None
        φ; None = median of the distance matrix.
    gully : float
        g in [0, 1].

    Returns
    -------
    Alignment
        Path in frame indices, raw and normalised score, confidence, reference span.
    """
    return align_cost_matrix(cosine_distance(query, ref), penalty=penalty, gully=gully)


def _run(cost: np.ndarray, penalty: float, traceback: np.ndarray) -> tuple[np.ndarray, ...]:
    m, n = cost.shape
    last_row, last_col = np.empty(n), np.empty(m)
    last_row_len, last_col_len = np.empty(n, np.int64), np.empty(m, np.int64)
    _sdtw_kernel(cost, float(penalty), traceback, last_row, last_row_len, last_col, last_col_len)
    return last_row, last_row_len, last_col, last_col_len


def _normalised_score(cost: np.ndarray, p: np.ndarray, q: np.ndarray, score: float) -> float:
    if p.shape[0] == 1:
        return 1.0
    mean = float(cost[p[0]: p[-1] + 1, q[0]: q[-1] + 1].mean())
    if mean > 0.0:
        return score / p.shape[0] / mean
    return 0.0 if score == 0.0 else float("inf")


def _check_frames(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be non-empty (frames, features), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinity")
    return x


def _check_cost(cost: np.ndarray, penalty: float | None, gully: float) -> np.ndarray:
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.size == 0:
        raise ValueError(f"cost must be a non-empty (M, N) matrix, got shape {cost.shape}")
    if not np.all(np.isfinite(cost)):
        raise ValueError("cost contains NaN or infinity")
    if penalty is None or not np.isfinite(penalty) or penalty < 0:
        raise ValueError(f"penalty must be a finite number >= 0, got {penalty}")
    if not 0.0 <= gully <= 1.0:
        raise ValueError(f"gully must lie in [0, 1], got {gully}")
    return cost
