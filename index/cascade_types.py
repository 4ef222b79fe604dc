"""The cascade's value types: its settings, what passes between its stages, what it answers.

* :class:`CascadeConfig`: how :class:`index.search.Cascade` searches (prune width, matches
  returned, φ and g, the query window), validated when made;
* :class:`QueryCode` (a query, encoded) and :class:`Verified` (its hash-DTW against the
  candidates, ranked): the stages' hand-overs, which the streaming worker makes itself;
* :class:`Match` and :class:`SearchResult`: the answer, with :func:`hash_frame_end_s` for the
  reference time a hash frame ends at.

Times: CQT frame t is centred at ``t / FRAME_RATE_HZ`` (21.53 Hz) s; hash frame j covers CQT
frames 4j..4j+3. How the cascade fills ``start_s``, ``end_s`` and ``position_s`` is in
:mod:`index.search`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from model.encoder import QUERY_PARTS

__all__ = [
    "DEFAULT_HASH_PRUNE",
    "DEFAULT_TOP_K",
    "FRAME_RATE_HZ",
    "CascadeConfig",
    "Match",
    "QueryCode",
    "SearchResult",
    "Verified",
    "hash_frame_end_s",
]

FRAME_RATE_HZ = 22050 / 1024
DEFAULT_TOP_K = 300
DEFAULT_HASH_PRUNE = DEFAULT_TOP_K


@dataclass(frozen=True)
class CascadeConfig:
    """Settings of the cascade.

    Attributes
    ----------
    top_k : int
        References kept by the embedding prune (Raffel's TOP_EMBEDDINGS, scaled down).
        ``DEFAULT_TOP_K`` = 300: on the held-out renderer (2,055 references, `midimatch eval
        --top-k 100|200|300`, docs/evaluation.md) 10 s top-1 rose from 93.1 / 80.6 % (clean /
        room + noise) at 100 to 98.0 / 91.9 % at 200 and 98.4 / 96.0 % at 300; the prune is
        where the right piece was lost, and verifying 300 costs a few ms more per query.
    top_n : int
        Verified references confirmed and returned as matches.
    gully : float
        Hash-DTW and confirm gully g (see the streaming caveat in :mod:`index.hashdtw`).
    penalty : int or None
        φ in Hamming units; None = the index's (see :mod:`index.search`).
    query_window_s : float
        Seconds of the query's end that are hashed and verified.
    prune_parts : int
        Parts of the embedded window pruned beside it (0: the whole window alone). Default
        :data:`model.encoder.QUERY_PARTS` = 2, the halves.
    min_query_s : float
        Shorter queries are refused (``AudioError("too_short")``).
    hash_prune : int
        Of the ``top_k`` verified references, this many come first from the coarse hash-DTW
        prune (:mod:`index.hash_prune`: the query's last ``hash_prune_s`` against every
        reference), the rest from the embedding prune, nearest first, without repeats; 0: the
        embedding prune alone (the seed's cascade). ``DEFAULT_HASH_PRUNE`` = ``top_k``: all of
        them, and the embedding's product is skipped. On the held-out engines (2,154
        references, docs/evaluation.md, "The prune on unheard sound") the embedding's 300
        nearest held the right piece for 68–99 % of 10 s queries (Csound FM to TiMidity), the
        coarse hash-DTW's for 98.6–100 %; 250 from the hash prune and 50 from the embedding
        identified the same clips within one, and at 10,000 references the hash prune alone
        takes about what the embedding prune did (36 ms a query in all, against 55 ms for both;
        docs/evaluation.md, "Speed").
    hash_prune_s : float
        Seconds of the query's end the hash prune compares (the embedding's window, 10 s).
    hash_prune_factor : int
        Hash frames merged into one coarse frame by the hash prune.
    """

    top_k: int = DEFAULT_TOP_K
    top_n: int = 5
    gully: float = 0.9
    penalty: int | None = None
    query_window_s: float = 20.0
    min_query_s: float = 2.0
    prune_parts: int = QUERY_PARTS
    hash_prune: int = DEFAULT_HASH_PRUNE
    hash_prune_s: float = 10.0
    hash_prune_factor: int = 6

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.top_n < 1:
            raise ValueError("top_k and top_n must be >= 1")
        if not 0.0 <= self.gully <= 1.0:
            raise ValueError(f"gully must lie in [0, 1], got {self.gully}")
        if self.penalty is not None and (self.penalty < 0 or int(self.penalty) != self.penalty):
            raise ValueError(f"penalty must be a non-negative integer, got {self.penalty}")
        if not 0.0 < self.min_query_s <= self.query_window_s:
            raise ValueError("need 0 < min_query_s <= query_window_s")
        if self.prune_parts < 0:
            raise ValueError(f"prune_parts must be >= 0, got {self.prune_parts}")
        if self.hash_prune < 0 or self.hash_prune_factor < 1:
            raise ValueError("need hash_prune >= 0 and hash_prune_factor >= 1")
        if not self.hash_prune_s > 0:  # also refuses NaN
            raise ValueError(f"hash_prune_s must be > 0, got {self.hash_prune_s}")

    @property
    def query_window_frames(self) -> int:
        """CQT frames hashed and verified."""
        return int(round(self.query_window_s * FRAME_RATE_HZ))

    @property
    def min_query_frames(self) -> int:
        """Fewest CQT frames searched (at least two hash frames)."""
        return max(8, int(round(self.min_query_s * FRAME_RATE_HZ)))


@dataclass(frozen=True)
class Match:
    """One ranked reference.

    Attributes
    ----------
    ref : int
        Reference number in the index.
    id : str
        Stable identifier: the first 16 hex digits of the MIDI file's SHA-256.
    title : str
    confidence : float
        In [0, 1]; compare with the calibrated threshold (:mod:`index.calibration`).
    score : float
        Hash-DTW score (mean Hamming cost per path cell, penalties included); lower is better.
    start_s, end_s : float
        Matched span in the reference, seconds.
    position_s : float
        Where in the reference the query's last frame is: the live position.
    """

    ref: int
    id: str
    title: str
    confidence: float
    score: float
    start_s: float
    end_s: float
    position_s: float

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class SearchResult:
    """The answer to one query.

    Attributes
    ----------
    matches : list of Match
        Best first, at most ``top_n``.
    identified : Match or None
        ``matches[0]`` when confident (offline rule), else None: not in the collection.
    timings_s : dict
        Seconds per stage: ``encode``, ``prune``, ``verify``, ``confirm``, ``total`` (and
        ``features`` for :meth:`index.search.Cascade.search_audio`). In a batch, ``prune`` is
        the shared matrix product's time, counted in every result.
    n_candidates : int
        References verified (after pruning).
    """

    matches: list[Match]
    identified: Match | None
    timings_s: dict = field(default_factory=dict)
    n_candidates: int = 0

    def to_dict(self) -> dict:
        return {
            "matches": [m.to_dict() for m in self.matches],
            "identified": self.identified.to_dict() if self.identified else None,
            "timings_s": dict(self.timings_s),
            "n_candidates": self.n_candidates,
        }


class QueryCode(NamedTuple):
    """A query, encoded (:meth:`index.search.Cascade.encode`).

    Attributes
    ----------
    embedding : np.ndarray, shape (1 + prune_parts, D), float32
        The query views (:meth:`model.encoder.Encoder.embed_views`), the whole window first.
    hashes : np.ndarray, shape (M,), uint16/uint32
    n_frames : int
        Tq, CQT frames the hashes were computed from (the query view's length).
    """

    embedding: np.ndarray
    hashes: np.ndarray
    n_frames: int


class Verified(NamedTuple):
    """Hash-DTW of one query against its candidates, sorted best first; all shape (K,).

    ``refs`` are reference numbers; ``scores``, ``end_j``, ``end_i``, ``path_length`` as
    :class:`index.hashdtw.HashDTWBatch`. Ties keep the prune order.
    """

    refs: np.ndarray
    scores: np.ndarray
    end_j: np.ndarray
    end_i: np.ndarray
    path_length: np.ndarray


def hash_frame_end_s(j: np.ndarray | int) -> np.ndarray | float:
    """Reference time of the end of hash frame ``j`` (e.g. :class:`Verified` ``end_j``), seconds.

    The centre of its last CQT frame, ``(4 j + 3) / 21.53``; ``Match.end_s`` uses it too.
    """
    return (4 * np.asarray(j) + 3) / FRAME_RATE_HZ
