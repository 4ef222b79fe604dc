"""Noticing that the music changed, before the query window says so.

A session's query window (10 s) still holds the previous piece for a while after the music
changes, so the ranking keeps it on top, confidently, for about half the window. The detector
looks at the newest seconds alone (3 s, ``EngineSettings.change_s``) after every result, two
ways:

* against the top reference where it says we are (its part ending at the DP's end, free
  start): they no longer look like it when their score is within a fifth of the gap between the
  top match's score and the field's (the median over all candidates, nearly all non-matches)
  from the field;
* against all candidates: another reference is their confident best (the cascade's margin
  confidence over this field reaches the calibrated threshold) and the top match is not even
  among their best three (so a near-duplicate of it does not count).

3 s are noisy evidence (a clean piece had one such suffix in 12 s), hence two results in a row
for the same top match. Then the session restarts its query from the newest seconds
(:meth:`worker.session.Session.restart_recent`); the evidence rule keeps its evidence through
that restart (it follows a change on its own), so a false alarm — 6–31 % of single-piece
streams raise one (docs/benchmarks.md) — costs a shorter query for a few results, not the
decision. Measured on six A (12 s) → B pairs of
generated songs rendered with FluidSynth (20-song index): B decided 7–11 s after the change
(median 8 s) instead of 10–11 s, A withdrawn after 4–5 s instead of 4–9 s.
"""

from __future__ import annotations

import numpy as np

from index.cascade_types import Match, Verified
from index.confirm import FIELD_SKIP, MIN_FIELD, margin_confidence
from index.hashdtw import hash_dtw
from index.search import Cascade
from worker.candidates import CandidateDTW

__all__ = ["ChangeDetector"]


class ChangeDetector:
    """The state of one session's change check: which top match failed, how many times."""

    def __init__(self) -> None:
        self._ref, self._votes = -1, 0

    def reset(self) -> None:
        self._ref, self._votes = -1, 0

    def update(self, recent: np.ndarray, cascade: Cascade, matches: list[Match],
               verified: Verified, dtw: CandidateDTW) -> bool:
        """Check the newest hash frames ``recent`` (n,) after a result.

        Parameters
        ----------
        recent : np.ndarray, shape (n,), the index's hash dtype
        cascade : Cascade
        matches : list of Match
            The result's ranking, best first.
        verified : Verified
            The hash-DTW of the whole query against the candidates (for the top match's end
            and the field).
        dtw : CandidateDTW
            The session's candidates, to rank ``recent`` alone against.

        Returns
        -------
        bool
            True on the second failing result in a row for the same top match.
        """
        scores = verified.scores[np.isfinite(verified.scores)]
        if not matches or scores.shape[0] < FIELD_SKIP + MIN_FIELD:
            self.reset()
            return False
        top = matches[0]
        n = recent.shape[0]
        field = float(np.median(scores))
        end_j = int(verified.end_j[np.flatnonzero(verified.refs == top.ref)[0]])
        ref = np.asarray(cascade.index.hash_sequence(top.ref))[max(0, end_j - 2 * n):end_j + 1]
        score = hash_dtw(recent, ref, penalty=cascade.penalty, gully=cascade.config.gully).score
        lost = score > top.score + 0.8 * (field - top.score)
        if not lost:
            alone = dtw.score_once(recent)
            order = np.argsort(alone.scores, kind="stable")
            best = dtw.refs[order[:FIELD_SKIP]]
            conf = margin_confidence(alone.scores[order].astype(np.float64), 1)
            lost = (best[0] != top.ref and top.ref not in best and conf is not None
                    and cascade.calibration.is_confident(float(conf[0])))
        if not lost:
            self.reset()
            return False
        self._votes = self._votes + 1 if self._ref == top.ref else 1
        self._ref = top.ref
        return self._votes >= 2
