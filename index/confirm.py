"""Confirm hash-DTW winners: the matched span and a confidence, from what the index holds.

Raffel confirms with a DTW on CQT features of the synthesised MIDI; an index keeps only hash
sequences and window embeddings (no MIDI at query time), so confirmation works on the **Hamming
matrix** of the query and a candidate's hash sequence:

1. :func:`index.align.align_cost_matrix` on ``hamming_matrix(q, r)`` with the hash-DTW's φ and g
   — the same DP, so it ends where hash-DTW ended — with a traceback: the span in the reference
   and Raffel's normalised score ``s = cost / path length / mean(submatrix under the path)``.
2. The confidence.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from index.align import align_cost_matrix
from index.bits import hamming_matrix

__all__ = ["ConfirmedMatch", "confirm_candidates"]


class ConfirmedMatch(NamedTuple):
    """One confirmed candidate.

    Attributes
    ----------
    score : float
        Hash-DTW score (cost per path cell).
    norm_score : float
        Raffel's s on the Hamming matrix (lower is better).
    confidence : float
        In [0, 1].
    start_j, end_j, end_i : int
        First and last reference hash frame of the path, and the last query hash frame.
    """

    score: float
    norm_score: float
    confidence: float
    start_j: int
    end_j: int
    end_i: int


def confirm_candidates(
    query: np.ndarray,
    references: list[np.ndarray],
    all_scores: np.ndarray,
    *,
    penalty: int,
    gully: float,
) -> list[ConfirmedMatch]:
    """Align the query on each reference's Hamming matrix and give each a confidence.

    Parameters
    ----------
    query : np.ndarray, shape (M,), uint16/uint32
    references : list of np.ndarray, shapes (N_r,)
        The hash sequences of the best verified candidates, best first.
    all_scores : np.ndarray, shape (K,), float
        Hash-DTW scores of *all* verified candidates, sorted (the field each one beat).
    penalty, gully
        As the hash-DTW.

    Returns
    -------
    list of ConfirmedMatch, in the order of ``references``
    """
    out = []
    for ref in references:
        if ref.shape[0] == 0:
            out.append(ConfirmedMatch(float("inf"), float("inf"), 0.0, -1, -1, -1))
            continue
        cost = hamming_matrix(query, ref).astype(np.float64)
        al = align_cost_matrix(cost, penalty=float(penalty), gully=gully)
        score = al.score / al.query_idx.shape[0]
        out.append(ConfirmedMatch(score, al.norm_score, al.confidence, al.ref_start, al.ref_end,
                                  int(al.query_idx[-1])))
    return out
