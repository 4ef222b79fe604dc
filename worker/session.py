"""One live stream's state, updated incrementally: audio → CQT → hashes + embedding → DTW.

Every stage keeps only what its next step needs, so a chunk costs work proportional to the audio
it brings (DESIGN, "the streaming twist"):

* ``cqt`` (:class:`model.features.StreamingCQT`): resampler and analysis-window state; any
  chunking gives the frames of the whole signal;
* ``hasher`` / ``embedder`` (:mod:`model.streaming`): the frames the networks' receptive fields
  still need, and the embedder's running attention sums over a sliding window of the index's
  window length (10 s); the engine runs them for all sessions in one forward pass;
* ``query``: the hash frames of the retained query window — between ``window`` and ``window +
  slack`` hash frames; past that the window slides: the oldest frames are dropped and every
  candidate's DP restarts from the last ``window`` frames (amortised over ``slack``);
* ``dtw`` (:class:`worker.candidates.CandidateDTW`): per-candidate hash-DTW rows, extended by
  the new hash frames when a result is due; a candidate that enters the set is swept over the
  retained window.

Time: ``t0_s`` is the stream time of the first sample fed (not 0 after a takeover that rebuilds
from the retained audio); ``audio_s`` is the stream time up to which audio has been processed.
Results are due every ``result_every_s`` of audio (the engine cuts each session's pending audio
at those boundaries), and once more, ``final``, when the stream has ended and been flushed.

This module holds state and the per-session steps; the batching across sessions (networks,
prune) and the schedule are :mod:`worker.engine`'s.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from index.cascade_types import Match, Verified
from index.evidence import stream_decision
from index.search import Cascade
from model.errors import MidimatchError
from model.features import (
    FRAME_RATE,
    QUIET_BELOW_LOUDEST_DB,
    SILENCE_DBFS,
    StreamingCQT,
)
from model.streaming import StreamingEmbedder, StreamingHasher
from worker.bus import StreamParams
from worker.candidates import CandidateDTW
from worker.change import ChangeDetector
from worker.onset import SoundBlocks

# A result period under SILENCE_DBFS (as the offline search's is_silent: a silent window is not
# searched), or QUIET_BELOW_LOUDEST_DB below the loudest of the recent ones, or without sustained
# sound (worker.onset: a click, a bump), is quiet: a pause, a fade, the end of a take. Quiet
# periods neither count for nor against the decision; the offline search leaves the same quiet
# out of a query's edges (model.features.music_span).
HOLD_QUIET_S = 30.0  # a decision is held through at most this much quiet audio in a row
_EMPTY = np.zeros((0, 48), np.float32)


def _silent(periods: deque[tuple[int, float]], now: list) -> bool:
    """Whether the audio of ``periods`` ((samples, Σ x²) each) and of the current one ``now`` is
    under ``SILENCE_DBFS`` RMS, or there is none."""
    n = sum(k for k, _ in periods) + now[0]
    sq = sum(q for _, q in periods) + now[1]
    return n == 0 or math.sqrt(sq / n) <= 10.0 ** (SILENCE_DBFS / 20.0)


class EngineError(MidimatchError):
    """A session used wrongly (unknown, duplicate, ended) or audio that cannot be streamed."""

    reason = "engine"


@dataclass(frozen=True)
class SessionConfig:
    """What every session of an engine shares (derived from the engine's settings)."""

    window_hashes: int  # hash frames of the retained query window
    slack_hashes: int  # extra hash frames before the window slides
    result_every_s: float
    max_pending_s: float
    change_hashes: int  # recent hash frames checked against the top match (0: no check)
    max_candidate_frames: int = 150_000  # hash frames of all candidates' DP rows together


class Session:
    """The state of one stream (see the module docstring).

    Parameters
    ----------
    session_id : str
    params : StreamParams
    cascade : Cascade
        Gives the encoder, the index's hashes, φ, g, the calibration and the embedding window.
    config : SessionConfig
    t0_s : float
        Stream time of the first sample that will be fed, s.
    """

    def __init__(self, session_id: str, params: StreamParams, cascade: Cascade,
                 config: SessionConfig, t0_s: float = 0.0) -> None:
        if not math.isfinite(t0_s) or t0_s < 0:
            raise EngineError(f"t0_s must be a finite time >= 0, got {t0_s!r}", reason="bad_t0")
        enc = cascade.encoder
        self.id, self.params, self.config, self.t0_s = session_id, params, config, float(t0_s)
        self.rate = params.sample_rate
        self.cqt = StreamingCQT(params.sample_rate, params.channels, device=enc.device)
        self.hasher = StreamingHasher(enc, "audio")
        self._new_embedder = functools.partial(_embedder, cascade)
        self.embedder = self._new_embedder()
        self.dtw = CandidateDTW(cascade.index.hashes, cascade.index.hash_offsets,
                                penalty=cascade.penalty, gully=cascade.config.gully)
        # the calibration's rule: evidence accumulated over the stream (index.evidence)
        self.decision = stream_decision(cascade.calibration)
        self.held = None  # the decided match, held through quiet periods (see result())
        self.quiet_s = 0.0  # quiet audio since the last period with music, s
        self._last_quiet = False  # whether the previous result's period was quiet
        # whether a period with music was heard since the query was last cleared: until then,
        # every quiet period clears the query (see result(): leading silence is left out)
        self.music_in_query = False
        # stream hash frame where the music starts, found in the audio taken while the query has
        # no music (take_audio, worker.onset): add_hashes keeps the frames before it out; kept
        # until cleared. The blocks also tell whether a period holds sustained sound.
        self._onset_hash: int | None = None
        self.blocks = SoundBlocks(params.sample_rate)
        self.blocks.look()
        cap = config.window_hashes + config.slack_hashes
        self.query = np.zeros(cap, enc.hash_dtype)  # query[:n_query] is the DTW's query
        # the newest CQT frames, to re-seed the embedder when the music changes
        self._recent = np.zeros((4 * config.change_hashes + 8, 48), np.float32)
        self._n_recent = 0
        self.n_query = 0
        self.query_start = 0  # stream hash index of query[0]
        self.n_frames = 0  # CQT frames emitted
        self.n_hashes = 0  # hash frames emitted
        self._pending: deque[tuple[np.ndarray, float | None]] = deque()
        self.pending_samples = 0
        self.consumed = 0  # samples processed
        self.dropped = 0  # samples dropped from a full pending queue
        self.period = max(1, int(round(config.result_every_s * self.rate)))
        self.next_due = self.period  # sample count (consumed + dropped) of the next result
        self.overdue_since: int | None = None  # sample count when a due result was postponed
        self.reported = 0  # sample count covered by the last result
        self.newest_received: float | None = None  # arrival time of the newest chunk processed
        # (samples, Σ x²) per result period, for the silence gate over the query window
        n_periods = int(math.ceil(config.window_hashes * 4 / FRAME_RATE
                                  / config.result_every_s)) + 1
        self._energy: deque[tuple[int, float]] = deque(maxlen=n_periods)
        self._energy_now = [0, 0.0]
        # the same for the stream's audio, never cleared with the query: identify's silence rule
        # on the last query window's length of audio, quiet left out of the query included
        self._heard: deque[tuple[int, float]] = deque(maxlen=n_periods)
        self.ended = False  # end() was called
        self.flushing = False  # this round takes the last audio of an ended stream
        self.flushed = False  # the CQT and hasher were flushed (after end, all audio consumed)
        self.finalised = False  # the final result was produced
        self.verified_at = 0  # engine tick of the last verification (round-robin priority)
        self.change = ChangeDetector()
        self.candidates = np.zeros(0, np.int64)  # the last prune's references, nearest first
        self.prune_asked: float | None = None  # time.monotonic() of a pending refresh request
        self.pruned_audio_s = 0.0  # audio_s of the embedding behind the current candidates
        # the hash prune's last answer and the audio_s it was computed at (worker.prune_batcher)
        self.hash_ids: np.ndarray | None = None
        self.hash_pruned_audio_s = -math.inf
        self.announced: int | None = None  # the piece the last published result decided

    # ------------------------------------------------------------------ audio in
    @property
    def stream_samples(self) -> int:
        """Samples of the stream behind us: processed plus dropped."""
        return self.consumed + self.dropped

    @property
    def audio_s(self) -> float:
        """Stream time up to which audio has been processed, s."""
        return self.t0_s + self.stream_samples / self.rate

    @property
    def pending_s(self) -> float:
        return self.pending_samples / self.rate

    @property
    def lag_s(self) -> float:
        """How far results are behind the received audio, s: the audio of result periods that
        are complete (all their audio received) but not yet covered by a result; after ``end``,
        all audio not yet covered. 0 when every due result is out, whatever is still queued
        for the next period."""
        received = self.stream_samples + self.pending_samples
        upto = received if self.ended else (received // self.period) * self.period
        return max(0, upto - self.reported) / self.rate

    def has_work(self, defer_audio: bool) -> bool:
        """Whether a tick should process this session now: a result or the flush is due, or
        audio is queued (with ``defer_audio``: only once it completes a result period, or
        the stream has ended)."""
        if self.flush_due or self.is_due:
            return True
        if not self.pending_samples:
            return False
        return (not defer_audio or self.ended
                or self.stream_samples + self.pending_samples >= self.next_due)

    def enqueue(self, pcm: np.ndarray, received_at: float | None) -> int:
        """Queue float32 (n, channels) samples; returns samples dropped (oldest first) to keep
        the queue within ``max_pending_s``."""
        if self.ended:
            raise EngineError(f"session {self.id!r} has ended", reason="ended")
        if pcm.shape[0] == 0:
            return 0
        self._pending.append((pcm, received_at))
        self.pending_samples += pcm.shape[0]
        cap = int(self.config.max_pending_s * self.rate)
        dropped = 0
        while self.pending_samples > cap:
            old, t = self._pending[0]
            cut = min(old.shape[0], self.pending_samples - cap)
            if cut == old.shape[0]:
                self._pending.popleft()
            else:
                self._pending[0] = (old[cut:], t)
            self.pending_samples -= cut
            dropped += cut
        self.dropped += dropped
        # Only when audio was dropped: feed() runs on the runner's thread while a tick may hold
        # a result that is due but not yet made, and moving the boundary then lost that result
        # (seen: a stream fed ahead of the ticks lost its 1 s result). Dropping is overload,
        # counted, where skipping the periods dropped is the point.
        if dropped:
            self._advance_due()
        return dropped

    def take_audio(self) -> np.ndarray:
        """Pop the pending samples up to the next result boundary (all channels); when that
        empties the queue of an ended stream, this round flushes it (``flushing``)."""
        want = min(self.pending_samples, self.next_due - self.stream_samples)
        parts = []
        while want > 0:
            pcm, t = self._pending[0]
            n = min(want, pcm.shape[0])
            parts.append(pcm[:n])
            if n == pcm.shape[0]:
                self._pending.popleft()
            else:
                self._pending[0] = (pcm[n:], t)
            if t is not None:
                self.newest_received = t
            want -= n
            self.pending_samples -= n
        self.flushing = self.ended and self.pending_samples == 0 and not self.flushed
        if not parts:
            return np.zeros((0, self.params.channels), np.float32)
        pcm = parts[0] if len(parts) == 1 else np.concatenate(parts)
        power = np.square(pcm.astype(np.float64, copy=False)).mean(axis=1)  # per sample
        self.blocks.push(power)
        if self._onset_hash is None and self.blocks.onset_sample is not None:
            self._onset_hash = int(self.blocks.onset_sample / self.rate * FRAME_RATE) // 4
        self.consumed += pcm.shape[0]
        e = self._energy_now
        e[0] += pcm.size
        e[1] += float(power.sum()) * pcm.shape[1]  # Σ x² over the channels' samples
        return pcm

    def features(self, pcm: np.ndarray) -> np.ndarray:
        """CQT frames (n, 48) completed by ``pcm`` (from :meth:`take_audio`), and the CQT's
        flush when this round is ``flushing``."""
        frames = self.cqt.push(pcm) if pcm.shape[0] else _EMPTY
        if self.flushing:
            tail = self.cqt.finish()
            frames = np.concatenate([frames, tail]) if frames.shape[0] else tail
        self.n_frames += frames.shape[0]
        self._keep_recent(frames)
        return frames

    def _keep_recent(self, frames: np.ndarray) -> None:
        cap = self._recent.shape[0]
        if frames.shape[0] >= cap:
            self._recent[:] = frames[-cap:]
            self._n_recent = cap
            return
        keep = min(self._n_recent, cap - frames.shape[0])
        self._recent[:keep] = self._recent[self._n_recent - keep:self._n_recent]
        self._recent[keep:keep + frames.shape[0]] = frames
        self._n_recent = keep + frames.shape[0]

    @property
    def flush_due(self) -> bool:
        """The stream ended and its audio is all in: the hasher's last frames are due."""
        return self.ended and self.pending_samples == 0 and not self.flushed

    def add_hashes(self, hashes: np.ndarray) -> None:
        """Append new hash frames to the query window (sliding it when it is full)."""
        cfg = self.config
        onset = self._onset_hash
        if onset is not None:  # the quiet before the music stays out of the query
            cut = min(max(0, onset - self.query_start), self.n_query)
            if cut:
                self.query[:self.n_query - cut] = self.query[cut:self.n_query]
                self.n_query -= cut
                self.query_start += cut
                self.dtw.restart()
            skip = min(max(0, onset - self.n_hashes), hashes.shape[0])
            if self.n_query == 0 and skip:
                self.query_start += skip
                self.n_hashes += skip
                hashes = hashes[skip:]
        k = hashes.shape[0]
        if self.n_query + k > self.query.shape[0]:
            keep = min(cfg.window_hashes, self.n_query + k)
            joined = np.concatenate([self.query[:self.n_query], hashes])[-keep:]
            self.query_start += self.n_query + k - keep
            self.query[:keep] = joined
            self.n_query = keep
            self.dtw.restart()
        else:
            self.query[self.n_query:self.n_query + k] = hashes
            self.n_query += k
        self.n_hashes += k

    # ------------------------------------------------------------------ results
    @property
    def is_due(self) -> bool:
        """A result is due: a boundary was reached, a postponed result waits, or the final."""
        if self.finalised:
            return False
        if self.flushed:
            return True
        return self.overdue_since is not None or self.stream_samples >= self.next_due

    def postpone(self) -> None:
        """Skip this result (the engine is behind); the next verification covers the audio."""
        if self.overdue_since is None:
            self.overdue_since = self.stream_samples
        self._advance_due()

    def _advance_due(self) -> None:
        while self.next_due <= self.stream_samples:
            self.next_due += self.period

    @property
    def query_frames(self) -> int:
        """CQT frames since the query window's start (Tq, for positions)."""
        return self.n_frames - 4 * self.query_start

    def searchable(self, min_frames: int) -> bool:
        """Long enough (the offline minimum) and not silent over the query window."""
        if self.n_query == 0 or self.query_frames < min_frames:
            return False
        return not _silent(self._energy, self._energy_now)

    @property
    def heard_silent(self) -> bool:
        """Whether the stream's last query window of audio (the quiet cleared out of the query
        included) is under ``SILENCE_DBFS`` RMS, or there was none: identify's silence rule
        (``Cascade.search_audio``) on the stream, for its final answer. On all the audio, not
        the query: silence with a click in it is cleared out of the query (the click is no
        music) but is not silent, and identify calls it too short, as the stream then does."""
        return _silent(self._heard, self._energy_now)

    @property
    def period_quiet(self) -> bool:
        """Whether the audio since the last result is quiet: under ``SILENCE_DBFS``, or
        ``QUIET_BELOW_LOUDEST_DB`` below the loudest period of the retained window (a fade or a
        reverb tail), or without sustained sound (a click in the quiet:
        :attr:`worker.onset.SoundBlocks.period_sustained`). A period without new samples (the
        final flush of an ended stream) is as the period before it."""
        n, sq = self._energy_now
        if n == 0:
            return self._last_quiet
        if not self.blocks.period_sustained:
            return True
        rms = math.sqrt(sq / n)
        loudest = max((math.sqrt(s / k) for k, s in self._energy if k), default=0.0)
        return rms <= max(10.0 ** (SILENCE_DBFS / 20.0),
                          loudest * 10.0 ** (-QUIET_BELOW_LOUDEST_DB / 20.0))

    def refresh(self, candidates: np.ndarray) -> None:
        """A new candidate set from the prune, (K,) reference numbers nearest first (kept ones
        keep their DP state; newcomers are swept over the window at the next :meth:`verify`).

        The set is cut, in prune order, where the candidates' hash frames reach
        ``max_candidate_frames`` (at least one is kept): their DP rows are 8 bytes a frame, and
        100 candidates of 6-minute pieces would hold 1.6 MB.
        """
        cand = np.asarray(candidates, np.int64)
        offsets = self.dtw.hash_offsets
        total = np.cumsum(np.asarray(offsets[cand + 1] - offsets[cand], np.int64))
        keep = max(1, int(np.searchsorted(total, self.config.max_candidate_frames, "right")))
        self.candidates = cand[:keep]
        self.dtw.set_candidates(self.candidates)
        self.prune_asked = None
        self.pruned_audio_s = self.audio_s

    def verify(self) -> Verified:
        """Extend the candidates' DTW to the whole query; ranked as the offline
        ``Cascade.verify``: by score, ties in prune order."""
        candidates = self.candidates
        res = self.dtw.extend(self.query[:self.n_query])
        refs = self.dtw.refs
        sorter = np.argsort(candidates, kind="stable")
        rank = sorter[np.searchsorted(candidates, refs, sorter=sorter)]
        order = np.lexsort((rank, res.scores))
        return Verified(refs[order], res.scores[order], res.end_j[order], res.end_i[order],
                        res.path_length[order])

    def music_changed(self, cascade: Cascade, matches: list[Match], verified: Verified) -> bool:
        """True when the newest ``change_hashes`` frames say, twice in a row, that something
        other than the top match is playing (:class:`worker.change.ChangeDetector`)."""
        n = self.config.change_hashes
        if n == 0 or self.n_query < 2 * n:
            self.change.reset()
            return False
        return self.change.update(self.query[self.n_query - n:self.n_query], cascade, matches,
                                  verified, self.dtw)

    def restart_recent(self) -> None:
        """Forget all but the newest ``change_hashes`` frames of the query (the music changed):
        the DP restarts from them, the embedding is rebuilt from the newest CQT frames. The
        evidence rule keeps its evidence and its decision (it follows a change on its own, so a
        false alarm costs nothing: :meth:`index.evidence.EvidenceDecision.restart`); the
        fixed-count rule starts over."""
        n = self.config.change_hashes
        self.query[:n] = self.query[self.n_query - n:self.n_query]
        self.query_start += self.n_query - n
        self.n_query = n
        self.dtw.restart()
        if not self.decision.restart():  # True: the rule kept its evidence and decision
            self.held = None
        self.change.reset()
        self.hash_ids = None  # the hash prune's answer was about the old music
        frames = self._recent[:self._n_recent][-4 * n:]
        self.embedder = self._new_embedder()
        self.embedder.push(frames)

    def _clear_query(self) -> None:
        """Forget the query, its DP rows and candidates, the embedding, the hash prune's answer
        and the energy of the periods behind them: what follows starts a new query at stream
        hash frame ``n_hashes`` (the hasher's receptive field may still add a few frames of the
        quiet before the music), pruned afresh."""
        self._energy.clear()
        self._onset_hash = None
        self.blocks.look()
        if self.n_query == 0 and self.embedder.n_frames == 0 and self.candidates.size == 0:
            return
        self.query_start = self.n_hashes
        self.n_query = 0
        self.dtw.restart()
        self.candidates = np.zeros(0, np.int64)
        self.dtw.set_candidates(self.candidates)
        self.change.reset()
        self.hash_ids = None
        self.hash_pruned_audio_s = -math.inf
        self.embedder = self._new_embedder()

    def result(self, matches: list[Match] | None) -> dict:
        """The result message body (see :mod:`worker.bus`) for the ranking ``matches`` (None:
        not searchable, an empty ranking); updates the stream decision (the calibration's rule,
        :func:`index.evidence.stream_decision`).

        A quiet period (:attr:`period_quiet`) does not feed the decision: what was decided stays
        decided (for up to ``HOLD_QUIET_S`` of quiet in a row), and nothing is decided on it.
        Quiet before any music (the start of a stream, or after ``HOLD_QUIET_S`` of quiet) is
        left out of the query: each such period clears it (:meth:`_clear_query`), so the first
        music is matched on its own, not with seconds of silence that the hash nets may liken
        to a quiet intro of another piece (seen: 5 s of silence then a song, decided as another
        song whose drums start softly).
        """
        matches = matches or []
        self._last_quiet = quiet = self.period_quiet
        if quiet:
            self.quiet_s += self._energy_now[0] / self.params.channels / self.rate
            if self.quiet_s > HOLD_QUIET_S:
                self.held = None
                self.decision.reset()
                self.music_in_query = False
        else:
            self.quiet_s = 0.0
            self.music_in_query = True
            self.held = self.decision.update(matches, self.audio_s)
        top = self.held
        self._energy.append((self._energy_now[0], self._energy_now[1]))
        self._heard.append((self._energy_now[0], self._energy_now[1]))
        self._energy_now = [0, 0.0]
        self.blocks.take_period()
        if quiet and not self.music_in_query and not self.flushed:
            self._clear_query()
        self.overdue_since = None
        self.reported = self.stream_samples
        self._advance_due()
        final = self.flushed
        self.finalised = final
        return {
            "audio_s": round(self.audio_s, 4),
            "lag_s": round(self.lag_s, 4),
            "final": final,
            "matches": [{"id": m.id, "title": m.title, "confidence": round(m.confidence, 4),
                         "score": round(m.score, 4), "position_s": round(m.position_s, 3)}
                        for m in matches],
            "decision": None if top is None else {
                "id": top.id, "title": top.title, "confidence": round(top.confidence, 4),
                "position_s": round(top.position_s, 3)},
        }

    # ------------------------------------------------------------------ memory
    @property
    def nbytes(self) -> int:
        """Bytes of this session's own state (queued audio included; the shared index and
        models excluded)."""
        pending = sum(p.nbytes for p, _ in self._pending)
        return int(pending + _cqt_nbytes(self.cqt) + self.hasher.nbytes + self.embedder.nbytes
                   + self.query.nbytes + self._recent.nbytes + self.dtw.nbytes
                   + getattr(self.decision, "nbytes", 0)
                   + (0 if self.hash_ids is None else self.hash_ids.nbytes))


def _cqt_nbytes(cqt: StreamingCQT) -> int:
    """Buffers of a StreamingCQT (it has no ``nbytes`` of its own yet): its sample FIFO and, at
    rates other than 22,050 Hz, the resampler's state (libsoxr's, :mod:`model.resample`)."""
    total = cqt._buf._a.nbytes
    if cqt._rs is not None:
        total += cqt._rs.nbytes
    return int(total)


def _embedder(cascade: Cascade) -> StreamingEmbedder:
    """A fresh streaming embedder of the cascade's window and query views."""
    return StreamingEmbedder(cascade.encoder, window_frames=cascade.embed_frames,
                             parts=cascade.config.prune_parts)
