"""The streaming engine: all of one device's sessions, advanced together, one tick at a time.

A tick processes all pending audio of all sessions, in *rounds*: each round cuts every session's
queue at its next result boundary (results fall every ``result_every_s`` of audio, whatever the
chunking), then

1. **features**: each session's StreamingCQT turns its new audio into CQT frames;
2. **networks**: ONE hash forward pass and ONE embedding-trunk pass for every session with new
   frames (:func:`model.streaming.hash_step`, :func:`model.streaming.embed_step`);
3. **prune**: the sessions whose result is due ask for fresh candidates; their embeddings (one
   head pass) are pruned together, in ONE matrix product (:meth:`index.search.Cascade.prune`),
   with the requests of the last ``prune_wait_s``: the product reads every window embedding of
   the index (10,000 references: 240k × 128 float32, 120 MB), so one query costs about what
   fifty do; that product runs on the engine's prune thread (the second core) while ticks go
   on, and a due session verifies against its previous candidates meanwhile
   (:class:`worker.prune_batcher.PruneBatcher`);
4. **verify**: each due session's candidate hash-DTW is extended by its new hash frames
   (newcomers swept over the retained window; a numba kernel parallel over candidates);
5. **confirm**: the cascade's confirm ranks and scores the best, and the session's
   :class:`index.evidence.EvidenceDecision` (the calibration's rule;
   :class:`index.decision.StreamDecision` for a calibration without an evidence threshold) says
   whether the answer is decided.

The final result of a stream also carries its ``answer`` (:mod:`index.answers`: identified, not
in the collection, or silent), the same kind and words ``midimatch identify`` gives that audio.

With ``defer_audio`` (the default) a session's queued audio is processed only once it completes
a result period (or the stream ends): each session then costs one CQT push and one slot in the
network passes per result instead of one per chunk, which measured 2.1 instead of 5.6 ms of CPU
per second of audio per stream with 100 ms chunks, for bit-identical results (every stage is
chunking-invariant and hash-DTW is only extended when a result is due anyway). The sessions'
periods are not aligned (they start at different times), so the work still spreads over the
ticks. Real-time feeding then needs one round per tick; a large backlog (a takeover rebuilding
from the retained audio) takes several.

Falling behind is visible and bounded, never an unbounded queue:

* when the tick has used ``tick_budget_s``, due sessions still waiting are not verified this
  round (but at least one per tick, so that results never stop): their result is postponed
  (they are served first next time: round-robin by when they were last verified) and the tick
  counts in ``degraded_ticks_total``; a postponed session's next result covers all the audio
  since, and ``lag_s`` grows meanwhile;
* no further round starts past the budget, so audio can stay queued; a session's queue is capped
  at ``max_pending_s``, the oldest audio dropped first and counted in
  ``errors_total{kind="audio_dropped"}``;
* every result carries ``lag_s`` (the audio of complete result periods that no result covers
  yet: :attr:`worker.session.Session.lag_s`), and the ``audio_lag_seconds`` gauge is the
  largest lag over the sessions.

The end-to-end histogram ``update_seconds`` observes, per result, the time from the arrival
(``received_at``, ``time.monotonic()``) of the newest chunk it covers to the end of the tick
that produced it.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch

from index.answers import answer, stream_answer
from index.search import Cascade
from model.features import FRAME_RATE
from model.streaming import embed_step, hash_step
from worker.bus import StreamParams
from worker.engine_settings import EngineSettings
from worker.metrics import WorkerMetrics
from worker.prune_batcher import PruneBatcher
from worker.session import EngineError, Session, SessionConfig

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineError"]

_DEFAULT_SETTINGS = EngineSettings()  # frozen: one shared default


class Engine:
    """Sessions of one device (see the module docstring).

    Parameters
    ----------
    cascade : Cascade
        The index, model, φ, g and calibration; ``settings.top_k``/``top_n`` and a given
        ``prune_parts`` override its config's (:meth:`Cascade.with_config`: the index and the
        pruner are shared).
    settings : EngineSettings
        :mod:`worker.engine_settings`.
    metrics : WorkerMetrics, optional
        Where the engine's metrics go (a private set when omitted).
    """

    def __init__(self, cascade: Cascade, settings: EngineSettings = _DEFAULT_SETTINGS,
                 metrics: WorkerMetrics | None = None) -> None:
        wanted = {"top_k": settings.top_k, "top_n": settings.top_n}
        if settings.prune_parts is not None:
            wanted["prune_parts"] = settings.prune_parts
        if any(getattr(cascade.config, k) != v for k, v in wanted.items()):
            cascade = cascade.with_config(**wanted)
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        self.cascade = cascade
        self.encoder = cascade.encoder
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        self._config = SessionConfig(
            window_hashes=settings.window_hashes,
            slack_hashes=int(round(settings.slack_s * FRAME_RATE)) // 4,
            result_every_s=settings.result_every_s, max_pending_s=settings.max_pending_s,
            change_hashes=int(round(settings.change_s * FRAME_RATE)) // 4,
            max_candidate_frames=settings.max_candidate_frames)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._prunes = PruneBatcher(cascade, settings.prune_wait_s, settings.prune_stale_s,
                                    self.metrics, self._sessions, self._lock,
                                    settings.hash_prune_every_s)
        self._ticks = 0
        self._verified_in_tick = False
        # time.monotonic() when the last round of a tick ended: the runner's watchdog reads it
        # (from another thread) to tell a long tick that progresses from a hung one
        self.progress_at = time.monotonic()

    # ------------------------------------------------------------------ the runner's calls
    @property
    def sessions(self) -> int:
        """Sessions held (opened and not yet finalised or dropped)."""
        return len(self._sessions)

    def open(self, session_id: str, params: StreamParams, t0_s: float = 0.0) -> None:
        """Start a session; ``t0_s`` is the stream time of the first sample that will be fed."""
        session = Session(session_id, params, self.cascade, self._config, t0_s)
        with self._lock:
            if session_id in self._sessions:
                raise EngineError(f"session {session_id!r} is already open",
                                  reason="session_exists")
            if len(self._sessions) >= self.settings.max_sessions:
                raise EngineError(f"engine full ({self.settings.max_sessions} sessions)",
                                  reason="full")
            self._sessions[session_id] = session
            self.metrics.sessions_active.set(len(self._sessions))

    def feed(self, session_id: str, pcm: np.ndarray, received_at: float | None = None) -> None:
        """Queue float32 samples (n, channels) (cheap: the work happens in :meth:`tick`).

        Raises
        ------
        EngineError
            ``unknown_session``, ``ended``, or ``bad_audio`` (wrong shape, not finite); the
            caller counts it (the runner ends the session and counts ``errors_total{kind}``).
            Audio dropped from a full queue is counted here, ``errors_total{"audio_dropped"}``.
        """
        s = self._get(session_id)
        pcm = _check_pcm(pcm, s.params.channels)
        with self._lock:
            dropped = s.enqueue(pcm, received_at)
        if dropped:
            self.metrics.errors_total.labels("audio_dropped").inc()

    def end(self, session_id: str) -> None:
        """The stream is over: the next tick flushes it and returns its ``final`` result, after
        which the session is gone."""
        with self._lock:
            self._get(session_id).ended = True

    def drop(self, session_id: str) -> None:
        """Forget a session at once, without a final result (lease lost, handed back). Called
        while a tick runs, that tick may still return a result of it: discard it."""
        with self._lock:
            self._sessions.pop(session_id, None)
            self.metrics.sessions_active.set(len(self._sessions))

    def lag_s(self) -> float:
        """The largest backlog over the sessions, s (see :attr:`Session.lag_s`)."""
        return max((s.lag_s for s in self._sessions.values()), default=0.0)

    def nbytes(self, session_id: str) -> int:
        """Bytes of one session's own state (queued audio included, shared index excluded)."""
        return self._get(session_id).nbytes

    def tick(self) -> list[tuple[str, dict]]:
        """Process the pending audio (all of it, or with ``defer_audio`` all that completes a
        result period; within the budget) and return every result due, in order.

        Synchronous and CPU-bound; never call it concurrently with itself. The other calls may
        come from another thread meanwhile (they take a lock that the tick holds only while it
        takes the sessions' queued audio).
        """
        t_start = time.perf_counter()
        self._ticks += 1
        self._verified_in_tick = False  # at least one session is verified per tick, however late
        times = {k: 0.0 for k in ("features", "networks", "prune", "verify", "confirm")}
        out: list[tuple[Session, dict]] = []
        degraded = rounds = False
        budget = self.settings.tick_budget_s
        while True:
            defer = self.settings.defer_audio
            with self._lock:
                work = [s for s in self._sessions.values() if s.has_work(defer)]
            if not work:
                break
            if rounds and time.perf_counter() - t_start > budget:
                degraded = True  # audio stays queued (bounded by max_pending_s)
                break
            rounds = True
            degraded |= self._round(work, times, out, t_start)
            self.progress_at = time.monotonic()
        if rounds:
            self._observe(times, out, degraded, time.perf_counter() - t_start)
        min_frames = self.cascade.config.min_query_frames
        for s, r in out:
            self._count_decision(s, r)
            if r.get("final"):
                # too short: less music than a query needs, the quiet before it left out
                # (identify's too_short on the same audio)
                r["answer"] = answer(stream_answer(r.get("decision") is not None,
                                                   s.heard_silent,
                                                   too_short=s.query_frames < min_frames))
        with self._lock:
            for s, _ in out:
                if s.finalised:
                    self._sessions.pop(s.id, None)
            self.metrics.sessions_active.set(len(self._sessions))
        return [(s.id, r) for s, r in out]

    # ------------------------------------------------------------------ internals
    def _get(self, session_id: str) -> Session:
        s = self._sessions.get(session_id)
        if s is None:
            raise EngineError(f"unknown session {session_id!r}", reason="unknown_session")
        return s

    def _round(self, work: list[Session], times: dict[str, float],
               out: list[tuple[Session, dict]], t_start: float) -> bool:
        """One round (module docstring); appends results to ``out``; True if degraded."""
        t = time.perf_counter()
        with self._lock:
            pcms = [s.take_audio() for s in work]
        frames: list[np.ndarray] = []
        alive: list[Session] = []
        for s, pcm in zip(work, pcms, strict=True):
            try:
                frames.append(s.features(pcm))
                alive.append(s)
            except Exception:
                self._fail(s, out)
        self.metrics.audio_seconds_total.inc(sum(p.shape[0] / s.rate
                                                 for s, p in zip(work, pcms, strict=True)))
        t1 = time.perf_counter()
        times["features"] += t1 - t
        batch = [(s, f) for s, f in zip(alive, frames, strict=True) if f.shape[0]]
        if batch:
            hashes = hash_step(self.encoder, [s.hasher for s, _ in batch], [f for _, f in batch])
            embed_step(self.encoder, [s.embedder for s, _ in batch], [f for _, f in batch])
            for (s, _), h in zip(batch, hashes, strict=True):
                s.add_hashes(h)
            self.metrics.batch_size.observe(len(batch))
        for s in alive:
            if s.flushing:  # after the pass above: the hasher's tail follows its last frames
                s.add_hashes(s.hasher.finish())
                s.flushed = True
        times["networks"] += time.perf_counter() - t1
        return self._results([s for s in alive if s.is_due], times, out, t_start)

    def _results(self, due: list[Session], times: dict[str, float],
                 out: list[tuple[Session, dict]], t_start: float) -> bool:
        """Prune, verify and confirm the due sessions within the budget; True if degraded."""
        budget = self.settings.tick_budget_s
        # finals first, then postponed results, then the least recently verified
        due.sort(key=lambda s: (not s.flushed, s.overdue_since is None, s.verified_at))
        min_frames = self.cascade.config.min_query_frames
        search = [s for s in due if s.searchable(min_frames)]
        for s in due:
            if s not in search:
                out.append((s, s.result(None)))
        degraded = False
        if time.perf_counter() - t_start > budget and self._verified_in_tick:
            for s in [s for s in search if not s.flushed]:
                s.postpone()
                search.remove(s)
                degraded = True
        if not search:
            return degraded
        t = time.perf_counter()
        self._prunes.refresh(search)
        times["prune"] += time.perf_counter() - t
        for s in search:
            if (not s.flushed and self._verified_in_tick
                    and time.perf_counter() - t_start > budget):
                s.postpone()
                degraded = True
                continue
            try:
                t2 = time.perf_counter()
                ver = s.verify()
                t3 = time.perf_counter()
                matches = self.cascade.confirm(s.query[:s.n_query], s.candidates, ver,
                                               s.query_frames)
                t4 = time.perf_counter()
            except Exception:
                self._fail(s, out)
                continue
            times["verify"] += t3 - t2
            times["confirm"] += t4 - t3
            s.verified_at = self._ticks
            self._verified_in_tick = True
            # a pause is not a change of music: quiet periods leave the decision alone
            changed = (not s.flushed and not s.period_quiet
                       and s.music_changed(self.cascade, matches, ver))
            out.append((s, s.result(matches)))
            if changed:
                logger.debug("session %s: the music changed at %.1f s", s.id, s.audio_s)
                s.restart_recent()
        return degraded

    def _count_decision(self, s: Session, r: dict) -> None:
        """``decisions_total``: how this result's decision differs from the session's last."""
        now = r["decision"]["id"] if r.get("decision") else None
        if now == s.announced:
            return
        event = ("made" if s.announced is None else "replaced" if now is not None
                 else "dropped_at_end" if r.get("final") else "withdrawn")
        self.metrics.decisions_total.labels(event).inc()
        s.announced = now

    def _fail(self, s: Session, out: list[tuple[Session, dict]]) -> None:
        """A bug hit one session: log it, count it, end that session with an empty final
        result so that the others carry on and the runner finishes it."""
        logger.exception("session %s failed; ending it", s.id)
        self.metrics.errors_total.labels("internal").inc()
        s.flushed = True
        s.decision.reset()
        s.held = None
        out.append((s, s.result(None)))

    def _observe(self, times: dict[str, float], out: list[tuple[Session, dict]],
                 degraded: bool, tick_s: float) -> None:
        m = self.metrics
        for stage, v in times.items():
            m.stage_seconds.labels(stage).observe(v)
        m.stage_seconds.labels("tick").observe(tick_s)
        now = time.monotonic()
        for s, _ in out:
            if s.newest_received is not None:
                m.update_seconds.observe(max(0.0, now - s.newest_received))
                s.newest_received = None
        m.results_total.inc(len(out))
        if degraded:
            m.degraded_ticks_total.inc()
        m.audio_lag_seconds.set(self.lag_s())


def _check_pcm(pcm: np.ndarray, channels: int) -> np.ndarray:
    """Validate one chunk: float32 (n, channels) (or (n,) for mono), finite."""
    a = np.asarray(pcm)
    if a.dtype.kind != "f":
        raise EngineError(f"PCM must be float samples, got {a.dtype}", reason="bad_audio")
    if a.ndim == 1 and channels == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[1] != channels:
        raise EngineError(f"PCM of shape {a.shape} does not match {channels} channel(s)",
                          reason="bad_audio")
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        raise EngineError("PCM contains NaN or infinite samples", reason="bad_audio")
    return a
