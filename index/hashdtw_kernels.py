"""Hash-DTW's numba kernels: the DP of :mod:`index.hashdtw` on packed keys, filling given arrays.

Private to :mod:`index.hashdtw` (its public wrappers validate, allocate and call these) and to
:mod:`worker.candidates`, which reuses the row sweep and the end selection so that live scores
equal the offline ones bit for bit.

How it is fast (``bench/hashdtw.py``): each DP cell is one 64-bit key
``cost << 34 | priority << 32 | path_length``. The minimum of the three candidate keys picks the
smallest cost, breaks ties in the original's order (priority 0 diagonal, 1 up, 2 left) and carries
the winner's path length along, with two integer ``min`` and no branch (int32 cost and length
arrays with selects measured 1.2 G cells/s in a prototype, these keys 2.2). Cells of one
anti-diagonal are independent, so the kernel sweeps anti-diagonals of blocks of up to 128 query
rows and LLVM vectorises the loop over them (popcount is ``llvm.ctpop``, ``vpopcntq`` on
AVX-512 VPOPCNTDQ, ``popcnt`` elsewhere). A block needs only the
row above it, which is also how :class:`index.hashdtw.IncrementalHashDTW` extends a query without
recomputing.

Every kernel that can run long is compiled with ``nogil=True``: a long query against many
references takes hundreds of milliseconds, and holding the GIL that long stalled the worker's
lease timer and, in ``make serve``, the gateway's event loop (tested: a Python thread keeps
ticking while a kernel runs). The kernels touch only the arrays they are given, so threads share
nothing unless a caller shares those (an :class:`index.hashdtw.IncrementalHashDTW` is one
stream's). Two threads may now launch the ``prange`` kernels at once: numba's ``omp`` and ``tbb``
threading layers take that; its ``workqueue`` fallback (no libgomp / tbb installed) does not.

The cost field has 29 bits and the length field 32: :func:`_penalty_keys` refuses a problem
whose cost could overflow (the bound is in :mod:`index.hashdtw`'s docstring).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from model.bits import _popcount

# ---------------------------------------------------------------- the key layout

_SHIFT = 34  # cost field starts here; bits 32-33 hold the tie priority, bits 0-31 the length
_PRIO_UP = np.int64(1) << np.int64(32)
_PRIO_LEFT = np.int64(2) << np.int64(32)
_CLEAR_PRIO = ~(np.int64(3) << np.int64(32))
_LENGTH_MASK = (np.int64(1) << np.int64(32)) - np.int64(1)
_MAX_COST = (1 << 29) - 1  # largest cost that cannot spill into the sign bit, penalty included
_BLOCK_ROWS = 128  # rows per wavefront block: long enough vectors, buffers stay in L1


def _penalty_keys(
    penalty: int, gully: float, n_bits: int, m: int, n: int
) -> tuple[np.int64, np.int64]:
    """Validate φ and g and the overflow bound; return φ shifted into key layout (up, left)."""
    if isinstance(penalty, bool) or not float(penalty).is_integer() or penalty < 0:
        raise ValueError(f"penalty must be a non-negative integer (Hamming units), got {penalty}")
    penalty = int(penalty)
    if not 0.0 <= gully <= 1.0:
        raise ValueError(f"gully must lie in [0, 1], got {gully}")
    if (m + n) * (n_bits + penalty) + penalty > _MAX_COST:
        raise ValueError(
            f"{m} x {n} frames with penalty {penalty} could overflow the 29-bit path cost"
        )
    base = np.int64(penalty) << np.int64(_SHIFT)
    return base + _PRIO_UP, base + _PRIO_LEFT


# ---------------------------------------------------------------- the DP kernel


@njit(inline="always")
def _diagonal(k, q, ref, top, pu, pl, cur, up1, up2):
    """Fill anti-diagonal ``k`` (cells ``(i, k - i)``) of a block of rows into ``cur``.

    Buffers are indexed by block row + 1: index 0 is the row above the block (from ``top``) and
    index ``i + 1`` for ``i > k`` stays 0, which is the free-start column -1. ``up1`` and ``up2``
    hold anti-diagonals ``k - 1`` and ``k - 2``. Unsigned indices stop numba from emitting
    negative-index wraparound, which would keep LLVM from vectorising the loop.
    """
    n_rows = q.shape[0]
    n = ref.shape[0]
    for ii in range(max(0, k - n + 1), min(k, n_rows - 1) + 1):
        i = np.uint64(ii)
        i1 = np.uint64(ii + 1)
        d = np.int64(_popcount(np.uint32(q[i]) ^ np.uint32(ref[np.uint64(k - ii)])))
        best = min(up2[i], min(up1[i] + pu, up1[i1] + pl))
        cur[i1] = (best & _CLEAR_PRIO) + (d << _SHIFT) + 1
    # Row -1 at column k + 1 (read by diagonals k + 1 and k + 2), and the block's last row at
    # column k - n_rows + 1 (the next block's row -1). Clamped instead of branched: past the
    # right edge the value is never read, and top[0] is read before any write can land on it.
    # Measured: the branches cost ~10 % here, per-diagonal stores to a third array ~40 %.
    cur[0] = top[min(k + 1, n - 1)]
    top[max(k - n_rows + 1, 0)] = cur[n_rows]


@njit(cache=True, nogil=True)
def _sweep(q, ref, top, col, row0, pu, pl):
    """Advance the DP of one reference by the query rows ``q``.

    Parameters
    ----------
    q : (R,) uint16|uint32, the new query rows
    ref : (N,) same dtype, N >= 1
    top : (N,) int64 keys of the row above ``q`` (zeros before the first row); overwritten with
        the keys of the last row of ``q``
    col : int64 keys of the last column by query row; rows ``row0 .. row0 + R - 1`` are written
    pu, pl : int64, penalty plus tie priority, pre-shifted into key layout
    """
    n_rows = q.shape[0]
    n = ref.shape[0]
    width = min(n_rows, _BLOCK_ROWS) + 1
    ka = np.empty(width, np.int64)
    kb = np.empty(width, np.int64)
    kc = np.empty(width, np.int64)
    for b0 in range(0, n_rows, _BLOCK_ROWS):
        qb = q[b0:min(b0 + _BLOCK_ROWS, n_rows)]
        ka[:] = 0
        kb[:] = 0
        kc[:] = 0
        kc[0] = top[0]  # diagonal -1: row -1 at column 0; diagonal -2 (kb) is all zero
        n_diag = qb.shape[0] + n - 1
        # Unrolled by three so each buffer keeps its role without swapping array references.
        for k in range(0, n_diag, 3):
            _diagonal(k, qb, ref, top, pu, pl, ka, kc, kb)
            if k + 1 < n_diag:
                _diagonal(k + 1, qb, ref, top, pu, pl, kb, ka, kc)
            if k + 2 < n_diag:
                _diagonal(k + 2, qb, ref, top, pu, pl, kc, kb, ka)
        # Row i meets the last column on diagonal i + n - 1, the first cell of that diagonal;
        # later diagonals in the same buffer start lower, so the value is still there.
        for i in range(qb.shape[0]):
            phase = (i + n - 1) % 3
            src = ka if phase == 0 else (kb if phase == 1 else kc)
            col[row0 + b0 + i] = src[i + 1]


@njit(cache=True, nogil=True)
def _select_end(top, col, m, n, g):
    """Best end on the last row / column past the gully; returns (cost, length, end_i, end_j)."""
    short = min(m, n)
    gully = min(int(g * short), short - 1)
    bi = gully
    for i in range(gully + 1, m):
        if (col[i] >> _SHIFT) < (col[bi] >> _SHIFT):
            bi = i
    bj = gully
    for j in range(gully + 1, n):
        if (top[j] >> _SHIFT) < (top[bj] >> _SHIFT):
            bj = j
    if (top[bj] >> _SHIFT) > (col[bi] >> _SHIFT):
        key = col[bi]
        end_i = bi
        end_j = n - 1
    else:
        key = top[bj]
        end_i = m - 1
        end_j = bj
    return key >> _SHIFT, key & _LENGTH_MASK, end_i, end_j


@njit(cache=True, nogil=True)
def _pair(q, ref, pu, pl, g):
    """Whole DP of one non-empty pair; returns (cost, length, end_i, end_j)."""
    top = np.zeros(ref.shape[0], np.int64)
    col = np.empty(q.shape[0], np.int64)
    _sweep(q, ref, top, col, 0, pu, pl)
    return _select_end(top, col, q.shape[0], ref.shape[0], g)


@njit(cache=True, nogil=True, parallel=True)
def _batch_kernel(q, refs, offsets, pu, pl, g, scores, end_j, end_i, lengths):
    for k in prange(offsets.shape[0] - 1):
        ref = refs[offsets[k]:offsets[k + 1]]
        if ref.shape[0] == 0:
            scores[k] = np.inf
            end_j[k] = -1
            end_i[k] = -1
            lengths[k] = 0
            continue
        cost, length, ei, ej = _pair(q, ref, pu, pl, g)
        scores[k] = cost / length
        end_i[k] = ei
        end_j[k] = ej
        lengths[k] = length


@njit(cache=True, nogil=True, parallel=True)
def _append_kernel(q, refs, offsets, pu, pl, g, tops, cols, m0, scores, end_j, end_i, lengths):
    m = m0 + q.shape[0]
    for k in prange(offsets.shape[0] - 1):
        ref = refs[offsets[k]:offsets[k + 1]]
        n = ref.shape[0]
        if n == 0:
            scores[k] = np.inf
            end_j[k] = -1
            end_i[k] = -1
            lengths[k] = 0
            continue
        top = tops[offsets[k]:offsets[k + 1]]
        if q.shape[0] > 0:
            _sweep(q, ref, top, cols[k], m0, pu, pl)
        cost, length, ei, ej = _select_end(top, cols[k], m, n, g)
        scores[k] = cost / length
        end_i[k] = ei
        end_j[k] = ej
        lengths[k] = length
