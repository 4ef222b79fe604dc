"""Packed hash frames and their Hamming distances.

A hash frame is one integer per network output frame: bit i is set when output unit i is
positive (LSB first), B = 16 bits in uint16 or B = 32 bits in uint32, as in Raffel's DHS code.
The distance between two frames is ``popcount(x ^ y)``, compiled to one ``popcnt`` instruction.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

HASH_DTYPES = {16: np.uint16, 32: np.uint32}


@intrinsic
def _popcount(typingctx, x):
    """``llvm.ctpop``: one ``popcnt`` (``vpopcntq`` when vectorised), not a bit trick or a table."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return x(x), codegen


def pack_bits(outputs: np.ndarray) -> np.ndarray:
    """Pack network outputs into one integer per frame: bit i = ``outputs[:, i] > 0``, LSB first.

    Parameters
    ----------
    outputs : np.ndarray, shape (T, B), float
        Hash network outputs (tanh units), B = 16 or 32.

    Returns
    -------
    np.ndarray, shape (T,), uint16 (B = 16) or uint32 (B = 32)
    """
    outputs = np.asarray(outputs)
    if outputs.ndim != 2 or outputs.shape[1] not in HASH_DTYPES:
        raise ValueError(f"outputs must have shape (T, 16) or (T, 32), got {outputs.shape}")
    if not np.all(np.isfinite(outputs)):
        raise ValueError("outputs contain NaN or infinity")
    n_bits = outputs.shape[1]
    weights = np.left_shift(np.uint64(1), np.arange(n_bits, dtype=np.uint64))
    return ((outputs > 0).astype(np.uint64) @ weights).astype(HASH_DTYPES[n_bits])


def unpack_bits(hashes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_bits`: (T,) uint16/uint32 -> (T, 16/32) bool, bit i in column i."""
    hashes = _check_hashes(hashes, "hashes", allow_empty=True)
    n_bits = hashes.dtype.itemsize * 8
    return (hashes[:, None] >> np.arange(n_bits, dtype=hashes.dtype)) & 1 == 1


@njit(cache=True, nogil=True)
def _hamming_kernel(q, r, out):
    for i in range(q.shape[0]):
        qi = np.uint32(q[i])
        for j in range(r.shape[0]):
            out[i, j] = _popcount(qi ^ np.uint32(r[j]))


@njit(cache=True, nogil=True)
def _hamming_histogram_kernel(q, r, counts):
    for i in range(q.shape[0]):
        qi = np.uint32(q[i])
        for j in range(r.shape[0]):
            counts[_popcount(qi ^ np.uint32(r[j]))] += 1


def hamming_matrix(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """All pairwise Hamming distances, for tests and inspection (the DTW never builds it).

    Parameters
    ----------
    q, r : np.ndarray, shape (M,), (N,), same dtype uint16 or uint32
        Packed hash sequences.

    Returns
    -------
    np.ndarray, shape (M, N), int32
        ``popcount(q[i] ^ r[j])``.
    """
    q, r = _check_pair(q, r, allow_empty=True)
    out = np.empty((q.shape[0], r.shape[0]), dtype=np.int32)
    _hamming_kernel(q, r, out)
    return out


def median_hamming(q: np.ndarray, r: np.ndarray) -> int:
    """Lower median of the Hamming distances between all frames of ``q`` and ``r``.

    This is the penalty φ Raffel recommends ("the median distance we observed"); the lower median
    is an observed distance, so it is always an integer. Uses a histogram, not an (M, N) matrix,
    so ``r`` may be a whole concatenated collection.

    Parameters
    ----------
    q, r : np.ndarray, shape (M,), (N,), same dtype uint16 or uint32, both non-empty

    Returns
    -------
    int
    """
    q, r = _check_pair(q, r, allow_empty=False)
    counts = np.zeros(33, dtype=np.int64)
    _hamming_histogram_kernel(q, r, counts)
    half = (q.shape[0] * r.shape[0] - 1) // 2  # index of the lower median in sorted order
    return int(np.searchsorted(np.cumsum(counts), half, side="right"))


def _check_hashes(x: np.ndarray, name: str, *, allow_empty: bool) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D packed hashes, got shape {x.shape}")
    if x.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"{name} must be uint16 or uint32 packed hashes, got {x.dtype}")
    if not allow_empty and x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return np.ascontiguousarray(x)


def _check_pair(q: np.ndarray, r: np.ndarray, *, allow_empty: bool) -> tuple[np.ndarray, ...]:
    q = _check_hashes(q, "query", allow_empty=allow_empty)
    r = _check_hashes(r, "reference", allow_empty=allow_empty)
    if q.dtype != r.dtype:
        raise ValueError(f"query is {q.dtype} but reference is {r.dtype}: different bit widths")
    return q, r
