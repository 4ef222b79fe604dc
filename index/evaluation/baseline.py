"""The baseline a user would pick instead of learned hashes: chroma + subsequence DTW, exhaustively.

Both sides become 12-bin chroma: the 48 CQT bins (MIDI 36 = C2 upwards, four whole octaves),
back from log to magnitude, folded onto pitch classes and L2-normalised per frame. The query is
the audio's CQT (:func:`model.features.audio_to_frames`); a reference is its MIDI rendered by
the fast note render the index uses (:func:`model.fastrender.midi_to_frames_fast`). The query
is aligned to **every** reference by subsequence DTW on the cosine distance
(:func:`index.align.cosine_distance`, :func:`index.align.subsequence_dtw`: free start, end past
the gully) and references are ranked by normalised cost, cost / path length (lower is better).
No pruning, no learning: its accuracy is what the learned cascade has to beat, and its time per
query is what pruning saves.

φ (the penalty per non-diagonal move) is Raffel's median distance, taken once per query against
an even sample of the collection's frames rather than per reference (a median per reference
costs more than its DTW).

Reference chroma is computed once and cached in one ``.npz`` keyed by the files' SHA-256 and
:data:`CHROMA_VERSION`
(:meth:`ChromaMatcher.build`), so a second run only reads it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from index.align import DEFAULT_GULLY, cosine_distance, subsequence_dtw
from model.errors import MidimatchError
from model.features import FRAME_RATE, N_BINS

N_CHROMA = 12
CHROMA_VERSION = "mag1"  # part of the cache key: chroma made another way is recomputed
_PENALTY_SAMPLE = 20_000  # reference frames the per-query median penalty is taken over


def frames_to_magnitude(frames: np.ndarray) -> np.ndarray:
    """Undo :func:`model.features.log_normalize` up to a gain per frame.

    A frame holds ``v = dB above a floor 80 dB under its peak``, L2-normalised, so its largest
    bin is the peak: ``|C| / peak = 10 ** (4 (v / v.max() - 1))`` (exact for frames louder than
    the absolute floor). Bins at the floor (``v = 0``) become 0.

    Parameters
    ----------
    frames : np.ndarray, shape (T, 48), float

    Returns
    -------
    np.ndarray, shape (T, 48), float32, in [0, 1]; the peak bin of a non-silent frame is 1.
    """
    frames = np.asarray(frames, dtype=np.float32)
    peak = frames.max(axis=1, keepdims=True, initial=0.0)
    rel = np.divide(frames, peak, out=np.zeros_like(frames), where=peak > 0)
    return np.where(frames > 0, 10.0 ** (4.0 * (rel - 1.0)), 0.0).astype(np.float32)


def frames_to_chroma(frames: np.ndarray) -> np.ndarray:
    """Fold CQT frames onto the 12 pitch classes, in magnitude, and L2-normalise each frame.

    Chroma sums *magnitudes* per pitch class (:func:`frames_to_magnitude` first): folding the
    log frames themselves gives nearly flat vectors (every bin sits up to 80 dB above the
    floor), which on the evaluation set ranked the true piece first for 1 query in 10.

    Parameters
    ----------
    frames : np.ndarray, shape (T, 48), float
        Log-normalised CQT frames, bin b = MIDI note 36 + b (pitch class b mod 12, C = 0).

    Returns
    -------
    np.ndarray, shape (T, 12), float32
        Unit-norm rows; an all-zero input frame (silence) stays all zero.
    """
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 2 or frames.shape[1] != N_BINS:
        raise ValueError(f"frames must have shape (T, {N_BINS}), got {frames.shape}")
    mag = frames_to_magnitude(frames)
    chroma = mag.reshape(frames.shape[0], N_BINS // N_CHROMA, N_CHROMA).sum(axis=1)
    norm = np.linalg.norm(chroma, axis=1, keepdims=True)
    return chroma / np.where(norm > 0, norm, 1.0)


class BaselineMatch(NamedTuple):
    """One ranked reference: its number, normalised DTW cost and the path's end (seconds)."""

    ref: int
    score: float
    end_s: float


class ChromaMatcher:
    """Exhaustive chroma + subsequence-DTW matching against a fixed set of references.

    Parameters
    ----------
    chroma : np.ndarray, shape (N, 12), float
        All references' chroma frames, concatenated.
    offsets : np.ndarray, shape (K + 1,), int
        Reference k is ``chroma[offsets[k]:offsets[k + 1]]``; every reference non-empty.
    gully : float
        g in [0, 1] (the end of the path lies past ``g * min(M, N)``).
    """

    def __init__(self, chroma: np.ndarray, offsets: np.ndarray, *,
                 gully: float = DEFAULT_GULLY) -> None:
        chroma = np.asarray(chroma, dtype=np.float64)
        offsets = np.asarray(offsets, dtype=np.int64)
        if chroma.ndim != 2 or chroma.shape[1] != N_CHROMA:
            raise ValueError(f"chroma must be (N, {N_CHROMA}), got {chroma.shape}")
        if (offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0
                or offsets[-1] != chroma.shape[0] or np.any(np.diff(offsets) <= 0)):
            raise ValueError("offsets must rise strictly from 0 to len(chroma)")
        self.chroma, self.offsets, self.gully = chroma, offsets, float(gully)
        step = max(1, chroma.shape[0] // _PENALTY_SAMPLE)
        self._sample = chroma[::step]

    def __len__(self) -> int:
        return int(self.offsets.size - 1)

    @classmethod
    def build(cls, paths: Sequence[str | Path], cache: str | Path | None = None,
              **kw) -> ChromaMatcher:
        """Chroma of each MIDI file's fast note render, reading and updating ``cache``.

        Parameters
        ----------
        paths : sequence of Path
            MIDI files, in reference order (reference k = ``paths[k]``).
        cache : Path, optional
            An ``.npz`` holding chroma by file SHA-256; missing entries are computed and the
            file rewritten.

        Raises
        ------
        MidimatchError
            A file that cannot be read (``reason`` from :mod:`model.midi`).
        """
        from model.fastrender import midi_to_frames_fast
        from model.midi import load_notes

        keys = [f"{CHROMA_VERSION}-{hashlib.sha256(Path(p).read_bytes()).hexdigest()}"
                for p in paths]
        known: dict[str, np.ndarray] = {}
        if cache is not None and Path(cache).is_file():
            with np.load(cache) as z:  # each z[...] reads the array again: read each once
                stored, offs, names = z["chroma"], z["offsets"], z["keys"].tolist()
            known = {k: stored[a:b] for k, a, b in zip(names, offs[:-1], offs[1:], strict=True)}
        parts, changed = [], False
        for path, key in zip(paths, keys, strict=True):
            if key not in known:
                frames = midi_to_frames_fast(load_notes(path))
                if frames.shape[0] == 0:
                    raise MidimatchError(f"{path}: no frames to match", reason="too_short")
                known[key] = frames_to_chroma(frames).astype(np.float16)
                changed = True
            parts.append(known[key])
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in parts])]).astype(np.int64)
        chroma = np.concatenate(parts) if parts else np.zeros((0, N_CHROMA), np.float16)
        if cache is not None and changed:
            names = list(known)
            all_off = np.concatenate([[0], np.cumsum([len(known[k]) for k in names])])
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(cache).with_suffix(".tmp.npz")
            np.savez(tmp, keys=np.array(names), offsets=all_off.astype(np.int64),
                     chroma=np.concatenate([known[k] for k in names]))
            tmp.replace(cache)
        return cls(chroma, offsets, **kw)

    def penalty(self, query: np.ndarray) -> float:
        """φ for one query: the median cosine distance from its frames to a sample of the
        collection's frames."""
        return float(np.median(cosine_distance(query, self._sample)))

    def scores(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Align one query to every reference.

        Parameters
        ----------
        frames : np.ndarray, shape (M, 48), float
            Query CQT frames (M >= 1).

        Returns
        -------
        scores : np.ndarray, shape (K,), float64
            Normalised cost (cost / path length) per reference; lower is better.
        end_frames : np.ndarray, shape (K,), int64
            Reference frame where each best path ends.
        """
        query = frames_to_chroma(frames).astype(np.float64)
        if query.shape[0] == 0:
            raise ValueError("empty query")
        phi = self.penalty(query)
        scores = np.empty(len(self))
        ends = np.empty(len(self), np.int64)
        for k in range(len(self)):
            ref = self.chroma[self.offsets[k]: self.offsets[k + 1]]
            cost, length, _, end_j = subsequence_dtw(cosine_distance(query, ref), penalty=phi,
                                                     gully=self.gully)
            scores[k], ends[k] = cost / length, end_j
        return scores, ends

    def search(self, frames: np.ndarray, top_n: int = 5) -> list[BaselineMatch]:
        """The ``top_n`` best references, best first (ties in reference order)."""
        scores, ends = self.scores(frames)
        order = np.argsort(scores, kind="stable")[:top_n]
        return [BaselineMatch(int(k), float(scores[k]), float(ends[k] / FRAME_RATE))
                for k in order]


def rank_of(scores: np.ndarray, true_ref: int) -> int:
    """1-based rank of ``true_ref`` where lower scores win and **every tie counts against it**
    (a reference scoring exactly as well as the true one is ranked ahead of it)."""
    scores = np.asarray(scores)
    return int(np.sum(scores <= scores[true_ref]))
