"""Whether a reference plays the same music at two positions: position errors that are repeats.

A piece with a repeated section (a chorus, a da capo, a passage written twice) has two or more
places a query matches equally well; the cascade's reported position may be another one than the
clip was cut from, and no audio evidence could tell them apart. :func:`span_similarity` measures
that from the MIDI itself, independent of any model: the note onsets (pitch, time) of two
equally long windows of the reference, matched with a small timing tolerance, as an F1 score in
[0, 1]. :func:`is_repeat` says the two windows play the same music (similarity at least
:data:`REPEAT_SIMILARITY`).

The evaluation (:mod:`index.evaluation.evaluate`) reports position errors both plainly and with
such repeats
counted as right, and says which is which. :func:`cross_similarity` does the same across two
files: an "out-of-collection" query whose confident answer plays the same notes at the found
position is a duplicate of an indexed piece, not a wrong answer; the evaluation counts those
apart too.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

REPEAT_SIMILARITY = 0.8  # onset F1 at which two windows count as the same music
MAX_SHIFT_S = 0.5  # a found position is known to a hash step (186 ms) and the path's end: the
# second window is slid this far either way and the best alignment counts
FRAMES_PER_S = 20.0  # onset grid: 50 ms
TOLERANCE_FRAMES = 1  # an onset may move one grid step (timing jitter, quantisation)


def _onsets(onset_s: np.ndarray, key: np.ndarray, start_s: float, length_s: float
            ) -> np.ndarray:
    """(frame, key) pairs of the onsets in ``[start_s, start_s + length_s)``, unique."""
    sel = (onset_s >= start_s) & (onset_s < start_s + length_s)
    frames = np.floor((onset_s[sel] - start_s) * FRAMES_PER_S).astype(np.int64)
    pairs = np.stack([frames, key[sel]], axis=1) if sel.any() else np.zeros((0, 2), np.int64)
    return np.unique(pairs, axis=0)


def _matched(a: np.ndarray, b: np.ndarray) -> int:
    """Onsets of ``a`` with an onset of the same key in ``b`` within the tolerance."""
    if not len(a) or not len(b):
        return 0
    hit = 0
    for key in np.unique(a[:, 1]):
        fa = a[a[:, 1] == key, 0]
        fb = np.sort(b[b[:, 1] == key, 0])
        if not fb.size:
            continue
        pos = np.searchsorted(fb, fa)
        left = np.abs(fa - fb[np.clip(pos - 1, 0, fb.size - 1)])
        right = np.abs(fa - fb[np.clip(pos, 0, fb.size - 1)])
        hit += int(np.sum(np.minimum(left, right) <= TOLERANCE_FRAMES))
    return hit


def span_similarity(onset_s: np.ndarray, key: np.ndarray, a_start_s: float, b_start_s: float,
                    length_s: float, other: tuple[np.ndarray, np.ndarray] | None = None,
                    max_shift_s: float = MAX_SHIFT_S) -> float:
    """Onset F1 between the windows ``[a, a + length)`` and ``[b, b + length)`` of one piece.

    Parameters
    ----------
    onset_s : np.ndarray, shape (N,)
        Note onsets, seconds.
    key : np.ndarray, shape (N,), int
        What sounds: the pitch, with drums kept apart from pitched notes (e.g. pitch + 128).
    a_start_s, b_start_s, length_s : float
        The two windows.
    other : (onset_s, key), optional
        The piece the second window is taken from, when it is another one.
    max_shift_s : float
        The second window is also tried this far earlier and later, in grid steps; the best
        alignment counts.

    Returns
    -------
    float in [0, 1]: 1 when every onset of each window has its twin in the other; 0 when
    either window is silent.
    """
    a = _onsets(onset_s, key, a_start_s, length_s)
    if not len(a):
        return 0.0
    best = 0.0
    steps = int(round(max_shift_s * FRAMES_PER_S))
    for shift in range(-steps, steps + 1):
        b = _onsets(*(other or (onset_s, key)), b_start_s + shift / FRAMES_PER_S, length_s)
        if not len(b):
            continue
        precision, recall = _matched(a, b) / len(a), _matched(b, a) / len(b)
        if precision + recall:
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


@lru_cache(maxsize=512)
def _notes(path: str) -> tuple[np.ndarray, np.ndarray]:
    from model.midi import load_notes

    t = load_notes(path)
    return t.onset_s, np.where(t.is_drum, t.pitch + 128, t.pitch)


def reference_similarity(path: str, true_end_s: float, found_end_s: float, length_s: float
                         ) -> float:
    """:func:`span_similarity` of the windows of ``length_s`` ending at the true and at the
    found position of a query, in the reference MIDI file ``path``."""
    onset_s, key = _notes(str(path))
    return span_similarity(onset_s, key, true_end_s - length_s, found_end_s - length_s,
                           length_s)


def cross_similarity(path_a: str, end_a_s: float, path_b: str, end_b_s: float, length_s: float
                     ) -> float:
    """:func:`span_similarity` of the window of ``length_s`` ending at ``end_a_s`` in the MIDI
    file ``path_a`` and the one ending at ``end_b_s`` in ``path_b``: whether a query from one
    file matched another file that plays the same notes there (a duplicate in the collection
    under another name, e.g. one tune in two folk-song books)."""
    return span_similarity(*_notes(str(path_a)), end_a_s - length_s, end_b_s - length_s,
                           length_s, other=_notes(str(path_b)))


def is_repeat(similarity: float) -> bool:
    """Whether a similarity means the same music."""
    return similarity >= REPEAT_SIMILARITY


__all__ = ["REPEAT_SIMILARITY", "cross_similarity", "is_repeat", "reference_similarity",
           "span_similarity"]
