"""The identification cascade: prune by embedding, verify by hash-DTW, confirm with a confidence.

One query (CQT frames of the last seconds of audio) is searched in four stages:

1. **encode** (:meth:`Cascade.encode`): the *query view* is fixed so that the streaming worker can
   reproduce it exactly —

   * the last ``query_window_s`` seconds (``query_window_frames`` CQT frames, 20 s by default)
     are hashed as one excerpt with the audio hash network: ``(M,)`` packed hashes, M = frames//4;
   * the last ``index.meta["window"]["length"]`` frames (the index's window, 10 s) — or the whole
     query when it is shorter — are embedded with the audio embedding network, whole and in
     ``prune_parts`` parts (:meth:`model.encoder.Encoder.embed_views`).

2. **prune** (:meth:`Cascade.prune`): ``top_k`` references to verify — first the
   ``hash_prune`` nearest by coarse hash-DTW of the query's last ``hash_prune_s`` against every
   reference (:class:`index.hash_prune.HashPruner`: the hash networks carry over to unheard
   sound far better than the embedding network), then the nearest to the embedded views, each
   reference by its nearest window embedding, the whole view's distance plus the parts' mean
   (:class:`index.prune.EmbeddingPruner`; all queries of a batch in one matrix product), until
   ``top_k`` distinct references are kept.
3. **verify** (:meth:`Cascade.verify`): hash-DTW of the query hashes against the candidates'
   whole hash sequences, penalty φ and gully g (:mod:`index.hashdtw`), ranked by score.
4. **confirm** (:meth:`Cascade.confirm`): the best ``top_n`` are aligned again on their Hamming
   matrix with a traceback (:mod:`index.confirm`), which gives the matched span and the
   confidence in [0, 1]; see that module for how the confidence is made.

φ: ``config.penalty`` when given, else ``index.meta["hash_penalty"]`` when the index stores one,
else the lower median Hamming distance between two fixed pseudo-random samples of 2,048 of the
index's hash frames (computed once at load, deterministic). That is Raffel's "median distance we
observed" (15 for his 32-bit hashes), measured on our own hashes.

Positions: hash frame j covers CQT frames 4j..4j+3, frame t is centred at ``t / 21.53`` s.
``start_s`` / ``end_s`` are the centres of the first and last CQT frames of the matched span;
``position_s`` maps the *last frame of the query* into the reference through the end of the path
(``(Tq - 1) + 4 (end_j - end_i)`` frames, clipped to the piece) — it equals ``end_s`` when the
query is a whole number of hash frames and the path ends on its last one.

The decision (identified or not in the collection) is :mod:`index.decision`'s offline rule; a
stream accumulates evidence over its results instead (:class:`index.evidence.EvidenceDecision`,
or :class:`index.decision.StreamDecision` for a calibration without an evidence threshold).

The settings (:class:`~index.cascade_types.CascadeConfig`) and the types the stages hand over
and return are in :mod:`index.cascade_types`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np

from index.calibration import Calibration, load_calibration
from index.cascade_types import (
    FRAME_RATE_HZ,
    CascadeConfig,
    Match,
    QueryCode,
    SearchResult,
    Verified,
    hash_frame_end_s,
)
from index.confirm import ConfirmedMatch, confirm_candidates
from index.decision import decide
from index.hash_prune import HashPruner
from index.hashdtw import HashDTWBatch, hash_dtw_batch
from index.prune import EmbeddingPruner
from index.store import IndexData, load_index
from model.bits import median_hamming
from model.errors import AudioError, ModelMismatchError

__all__ = [
    "Cascade",
    "ModelMismatchError",
    "default_penalty",
]

_PENALTY_SAMPLE = 2048
_DEFAULT_CONFIG = CascadeConfig()  # frozen: one shared default


def default_penalty(index: IndexData) -> int:
    """φ for an index: ``meta["hash_penalty"]``, else the median Hamming distance of a sample.

    Returns ``n_bits // 2`` for an empty index (the median of random bits).
    """
    if "hash_penalty" in index.meta:
        return int(index.meta["hash_penalty"])
    h = index.hashes
    if h.shape[0] < 2:
        return int(index.meta.get("n_bits", 32)) // 2
    rng = np.random.default_rng(0)
    a = np.asarray(h[np.sort(rng.integers(0, h.shape[0], _PENALTY_SAMPLE))])
    b = np.asarray(h[np.sort(rng.integers(0, h.shape[0], _PENALTY_SAMPLE))])
    return median_hamming(a, b)


class Cascade:
    """Identify queries against one index with one model.

    Parameters
    ----------
    index : IndexData
    encoder : model.encoder.Encoder
        Must be the model that built the index.
    config : CascadeConfig
    calibration : Calibration, optional
        Default: :func:`index.calibration.load_calibration` for the encoder's model.

    Raises
    ------
    ModelMismatchError
        ``index.model_id != encoder.model_id``.
    """

    def __init__(self, index: IndexData, encoder, config: CascadeConfig = _DEFAULT_CONFIG,
                 calibration: Calibration | None = None) -> None:
        index.check_model(encoder.model_id)
        self.index = index
        self.encoder = encoder
        self.config = config
        self.calibration = calibration or load_calibration(encoder.model_id)
        self.penalty = int(config.penalty) if config.penalty is not None else default_penalty(
            index)
        self.embed_frames = int(index.meta.get("window", {}).get("length",
                                                                 encoder.window.length))
        self.pruner = EmbeddingPruner(index.embeddings, index.embed_ref, len(index),
                                      device=encoder.device)
        # coarse sequences per factor, shared by with_config copies; made here (at load, not on
        # the first query) when the config prunes with them
        self._hash_pruners: dict[int, HashPruner] = {}
        if config.hash_prune > 0:
            _ = self.hash_pruner
        self._ids = [str(r.get("sha256", ""))[:16] or f"ref{k}" for k, r in enumerate(index.refs)]
        self._titles = [str(r.get("title", Path(r.get("path", "")).stem)) for r in index.refs]
        self._durations = np.array([float(r.get("duration_s", np.inf)) for r in index.refs])

    @classmethod
    def open(cls, index_dir: str | Path, weights: str | Path | None = None,
             device: str = "cpu", **kw) -> Cascade:
        """Load the index at ``index_dir`` and the model ``weights`` (default: the shipped one).

        ``kw`` goes to the constructor (``config``, ``calibration``).
        """
        from model.encoder import Encoder

        encoder = Encoder.load(weights, device=device)
        return cls(load_index(index_dir, expected_model_id=encoder.model_id), encoder, **kw)

    def with_config(self, **changes) -> Cascade:
        """A copy whose config has ``changes`` (``CascadeConfig`` fields); it shares the index,
        the model, the calibration and the pruner, so nothing is re-encoded or copied."""
        out = copy.copy(self)
        out.config = dataclasses.replace(self.config, **changes)
        if "penalty" in changes:
            out.penalty = (int(out.config.penalty) if out.config.penalty is not None
                           else default_penalty(self.index))
        return out

    # ------------------------------------------------------------------ stages
    def encode(self, frames: np.ndarray) -> QueryCode:
        """The query view of ``frames`` (module docstring, stage 1).

        Parameters
        ----------
        frames : np.ndarray, shape (T, 48), float32
            CQT frames of the query, oldest first, T >= ``config.min_query_frames``.

        Raises
        ------
        AudioError
            ``too_short``.
        """
        frames = np.asarray(frames, dtype=np.float32)
        if frames.ndim != 2 or frames.shape[1] != 48:
            raise ValueError(f"frames must have shape (T, 48), got {frames.shape}")
        if frames.shape[0] < self.config.min_query_frames:
            raise AudioError(
                f"query too short: {frames.shape[0] / FRAME_RATE_HZ:.2f} s, need at least "
                f"{self.config.min_query_frames / FRAME_RATE_HZ:.2f} s", reason="too_short")
        view = frames[-self.config.query_window_frames:]
        hashes = self.encoder.hashes(view, "audio")
        emb = self.encoder.embed_views(frames[-self.embed_frames:], "audio",
                                       self.config.prune_parts)
        return QueryCode(np.asarray(emb, np.float32), hashes, int(view.shape[0]))

    def title(self, ref: int) -> str:
        """The display title of reference ``ref`` (its row in the index)."""
        return self._titles[int(ref)]

    @property
    def hash_pruner(self) -> HashPruner:
        """The coarse hash-DTW prune of this index at ``config.hash_prune_factor``."""
        f = self.config.hash_prune_factor
        if f not in self._hash_pruners:
            self._hash_pruners[f] = HashPruner(self.index.hashes, self.index.hash_offsets, f)
        return self._hash_pruners[f]

    def prune(self, embeddings: np.ndarray,
              hashes: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The references to verify for each query, ``top_k`` (or all) of them (stage 2).

        Parameters
        ----------
        embeddings : np.ndarray, shape (Q, V, D) or (Q, D)
            The queries' embedded views.
        hashes : list of Q np.ndarray, optional
            The queries' hashes (their last ``hash_prune_s`` are compared); without them, or
            with ``config.hash_prune`` 0, the embedding prune alone.

        Returns
        -------
        ids : np.ndarray, shape (Q, K), int64
            The hash prune's ``hash_prune`` nearest first, then the embedding's, no repeats.
        dists : np.ndarray, shape (Q, K), float32
            Each one's embedding distance where the embedding prune ranked it, else ``inf``.
        """
        if hashes is None or self.config.hash_prune == 0:
            return self.pruner.search(embeddings, self.config.top_k)
        if len(hashes) != len(embeddings):
            raise ValueError(f"{len(hashes)} hash queries for {len(embeddings)} embeddings")
        return self.prune_with(embeddings, self.hash_prune(hashes))

    def prune_with(self, embeddings: np.ndarray, hash_ids) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`prune` from the hash prune's answers already at hand (``hash_ids``: a row
        of :meth:`hash_prune` per query, perhaps kept from an earlier query of the same
        stream, as a live session does): the embedding prune fills the places left, and is
        skipped when there are none."""
        cfg = self.config
        if cfg.hash_prune >= cfg.top_k:  # the embedding's product would be thrown away
            ids = np.stack([np.asarray(r, np.int64) for r in hash_ids])
            return ids, np.full(ids.shape, np.inf, np.float32)
        ids_e, dists_e = self.pruner.search(embeddings, cfg.top_k)
        return self.merge_prunes(hash_ids, ids_e, dists_e)

    def hash_prune(self, hashes: list[np.ndarray]) -> np.ndarray:
        """The hash prune alone: each query's ``min(hash_prune, top_k)`` nearest references by
        coarse hash-DTW of its last ``hash_prune_s`` (:mod:`index.hash_prune`), (Q, k) int64."""
        cfg = self.config
        n = max(1, int(round(cfg.hash_prune_s * FRAME_RATE_HZ / 4)))
        return self.hash_pruner.search([np.asarray(h)[-n:] for h in hashes],
                                       max(1, min(cfg.hash_prune, cfg.top_k)),
                                       penalty=self.penalty, gully=cfg.gully)

    @staticmethod
    def merge_prunes(ids_h, ids_e: np.ndarray,
                     dists_e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row: the hash prune's references, then the embedding prune's, without repeats,
        as many as the embedding row holds (``top_k``); distances as :meth:`prune` gives."""
        k = ids_e.shape[1]
        ids = np.empty_like(ids_e)
        dists = np.full(ids_e.shape, np.inf, np.float32)
        for q in range(ids.shape[0]):
            both = np.concatenate([np.asarray(ids_h[q], np.int64), ids_e[q]])
            _, first = np.unique(both, return_index=True)
            row = both[np.sort(first)][:k]
            ids[q] = row
            where = {int(r): d for r, d in zip(ids_e[q], dists_e[q], strict=True)}
            dists[q] = [where.get(int(r), np.inf) for r in row]
        return ids, dists

    def verify(self, query_hashes: np.ndarray, candidates: np.ndarray) -> Verified:
        """Hash-DTW of one query against candidate references, best first.

        Parameters
        ----------
        query_hashes : np.ndarray, shape (M,), the index's hash dtype
        candidates : np.ndarray, shape (K,), int
            Reference numbers (e.g. a row of :meth:`prune`'s ids).

        Returns
        -------
        Verified
        """
        cand = np.asarray(candidates, dtype=np.int64).reshape(-1)
        res = self._verify_batch(query_hashes, cand)
        order = np.argsort(res.scores, kind="stable")
        return Verified(cand[order], res.scores[order], res.end_j[order], res.end_i[order],
                        res.path_length[order])

    def verify_scores(self, query_hashes: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """:meth:`verify`'s hash-DTW scores (K,) float32, in the order of ``candidates``."""
        return self._verify_batch(query_hashes,
                                  np.asarray(candidates, dtype=np.int64).reshape(-1)).scores

    def _verify_batch(self, query_hashes: np.ndarray, cand: np.ndarray) -> HashDTWBatch:
        sub, offsets = self._gather(cand)
        return hash_dtw_batch(query_hashes, sub, offsets, penalty=self.penalty,
                              gully=self.config.gully)

    def confirm(self, query_hashes: np.ndarray, candidates: np.ndarray, verified: Verified,
                n_frames: int | None = None) -> list[Match]:
        """Align and score the best ``top_n`` of ``verified``; matches ranked by confidence.

        Parameters
        ----------
        query_hashes : np.ndarray, shape (M,)
        candidates : np.ndarray, shape (K,)
            The references that were verified; must be as many as ``verified`` holds (all K
            scores are the field the confidence is measured against, see :mod:`index.confirm`).
        verified : Verified
        n_frames : int, optional
            Tq, the query view's CQT frames (default ``4 * M``), for ``position_s``.
        """
        if np.shape(candidates)[0] != verified.refs.shape[0]:
            raise ValueError(f"{np.shape(candidates)[0]} candidates but {verified.refs.shape[0]} "
                             "verified: confirm needs the whole verified field")
        q = np.asarray(query_hashes)
        n_frames = 4 * q.shape[0] if n_frames is None else int(n_frames)
        top = min(self.config.top_n, verified.refs.shape[0])
        seqs = [np.asarray(self.index.hash_sequence(int(k))) for k in verified.refs[:top]]
        confirmed = confirm_candidates(q, seqs, verified.scores, penalty=self.penalty,
                                       gully=self.config.gully)
        matches = [self._match(int(verified.refs[r]), c, n_frames)
                   for r, c in enumerate(confirmed)]
        # confidence, then hash-DTW score: the verify order where confidences tie
        order = sorted(range(len(matches)), key=lambda r: (-matches[r].confidence, r))
        return [matches[r] for r in order]

    # ------------------------------------------------------------------ whole searches
    def search_frames(self, frames: np.ndarray) -> SearchResult:
        """Search one query given as (T, 48) CQT frames."""
        return self.search_batch([frames])[0]

    def search_audio(self, audio: np.ndarray, sample_rate: int) -> SearchResult:
        """Search one query given as PCM (n,) or (n, channels), any rate in 8–96 kHz.

        Raises
        ------
        AudioError
            ``silent`` (below -60 dBFS RMS over the part searched, the last
            ``query_window_s``), ``too_short``, or the feature stage's errors.
        """
        from model.features import audio_to_frames, is_silent, music_span

        audio = np.asarray(audio)
        # the part the query view uses (plus a second for the CQT's edge): its end
        tail = audio[-int((self.config.query_window_s + 1.0) * sample_rate):]
        if is_silent(tail):
            raise AudioError("the audio is silent (RMS below -60 dBFS over the last "
                             f"{self.config.query_window_s:g} s): nothing to identify",
                             reason="silent")
        # the quiet before and after the music is not searched (music_span): silence at a
        # query's edges draws it to references with quiet stretches
        start, end = music_span(audio, sample_rate)
        if end == start:
            raise AudioError("the audio is silent (no stretch above -60 dBFS): nothing to "
                             "identify", reason="silent")
        audio = audio[start:end]
        t0 = time.perf_counter()
        frames = audio_to_frames(audio, sample_rate, device=self.encoder.device)
        t_feat = time.perf_counter() - t0
        res = self.search_frames(frames)
        res.timings_s["features"] = t_feat
        res.timings_s["total"] += t_feat
        return res

    def search_batch(self, list_of_frames: list[np.ndarray]) -> list[SearchResult]:
        """Search several queries; their embeddings are pruned in one matrix product."""
        t0 = time.perf_counter()
        codes = [self.encode(f) for f in list_of_frames]
        t_enc = (time.perf_counter() - t0) / max(1, len(codes))
        results = self.search_codes(codes)
        for r in results:
            r.timings_s["encode"] = t_enc
            r.timings_s["total"] += t_enc
        return results

    def search_codes(self, codes: list[QueryCode],
                     pruned: tuple[np.ndarray, float] | None = None) -> list[SearchResult]:
        """Prune, verify and confirm already-encoded queries.

        ``pruned``: the codes' :meth:`prune` ids and the seconds it took, when the caller has
        them already (``midimatch eval`` keeps them for the prune's recall), so as not to prune
        twice.
        """
        if not codes:
            return []
        if len(self.index) == 0:
            return [SearchResult([], None, {"prune": 0.0, "verify": 0.0, "confirm": 0.0,
                                            "total": 0.0}, 0) for _ in codes]
        if pruned is None:
            t0 = time.perf_counter()
            ids, _ = self.prune(np.stack([c.embedding for c in codes]),
                                [c.hashes for c in codes])
            t_prune = time.perf_counter() - t0
        else:
            ids, t_prune = pruned
        out = []
        for code, cand in zip(codes, ids, strict=True):
            t1 = time.perf_counter()
            ver = self.verify(code.hashes, cand)
            t2 = time.perf_counter()
            matches = self.confirm(code.hashes, cand, ver, code.n_frames)
            t3 = time.perf_counter()
            timings = {"prune": t_prune, "verify": t2 - t1, "confirm": t3 - t2,
                       "total": t_prune + (t3 - t1)}
            out.append(SearchResult(matches, decide(matches, self.calibration), timings,
                                    int(cand.shape[0])))
        return out

    # ------------------------------------------------------------------ internals
    def _gather(self, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The candidates' hash sequences, concatenated, and their offsets (K + 1,)."""
        off = self.index.hash_offsets
        starts, ends = np.asarray(off[cand]), np.asarray(off[cand + 1])
        lengths = ends - starts
        offsets = np.zeros(cand.shape[0] + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # one fancy-index read of only the candidates' frames (K x ~1,000 hashes, ~0.4 MB)
        idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return np.asarray(self.index.hashes[idx]), offsets

    def _match(self, k: int, c: ConfirmedMatch, n_frames: int) -> Match:
        dur = self._durations[k]
        pos_frames = (n_frames - 1) + 4 * (c.end_j - c.end_i)
        return Match(
            ref=k, id=self._ids[k], title=self._titles[k], confidence=float(c.confidence),
            score=float(c.score),
            start_s=float(min(4 * c.start_j / FRAME_RATE_HZ, dur)),
            end_s=float(min(hash_frame_end_s(c.end_j), dur)),
            position_s=float(np.clip(pos_frames / FRAME_RATE_HZ, 0.0, dur)),
        )
