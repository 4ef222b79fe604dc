"""The engine's candidate refreshes: the due sessions' prunes batched into one matrix product.

A session whose result is due asks for fresh candidates (stage 3 of :mod:`worker.engine`). Its
embedding is pruned against every window embedding of the index (10,000 references: 240k × 128
float32, 120 MB read), so one query costs about what fifty do: the requests of the last
``prune_wait_s`` share one product, which runs on a thread of its own (the second core) while
ticks go on; meanwhile the sessions verify against their previous candidates. A session that
cannot wait is pruned in the tick instead: one without candidates (its first search), and one
whose candidates come from an embedding ``prune_stale_s`` of audio older than its stream.

The candidates are the cascade's (:meth:`index.search.Cascade.prune`): the coarse hash-DTW
prune's nearest first, then the embedding's. The hash prune cannot share a product (one query
costs what it costs: ~4 ms at 2,000 references, linear in the collection), so a session runs it
only every ``hash_every_s`` of its audio, on its first search and on its final result, and
keeps its answer (``Session.hash_ids``) for the refreshes between; the embedding's part is fresh
at every refresh. A change of music (:meth:`worker.session.Session.restart_recent`) forgets it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from index.search import Cascade
from model.streaming import embeddings
from worker.metrics import WorkerMetrics
from worker.session import Session

logger = logging.getLogger(__name__)

__all__ = ["PruneBatcher"]


class PruneBatcher:
    """Candidate refreshes of one engine's sessions (module docstring).

    Parameters
    ----------
    cascade : Cascade
        Its encoder embeds the sessions' queries, its prune makes the candidates.
    wait_s, stale_s : float
        :class:`~worker.engine_settings.EngineSettings` ``prune_wait_s`` and ``prune_stale_s``.
    metrics : WorkerMetrics
    sessions : dict of str to Session
        The engine's sessions (the same dict, not a copy), read under ``lock`` to find every
        session asking and whether a finished prune's sessions are still held.
    lock : threading.Lock
        The engine's lock over ``sessions``.
    hash_every_s : float
        :class:`~worker.engine_settings.EngineSettings` ``hash_prune_every_s``: audio seconds
        between a session's hash prunes (0: at every refresh).
    """

    def __init__(self, cascade: Cascade, wait_s: float, stale_s: float, metrics: WorkerMetrics,
                 sessions: dict[str, Session], lock: threading.Lock,
                 hash_every_s: float = 0.0) -> None:
        self.cascade = cascade
        self.encoder = cascade.encoder
        self.wait_s = wait_s
        self.stale_s = stale_s
        self.hash_every_s = hash_every_s
        self.metrics = metrics
        self._sessions = sessions
        self._lock = lock
        self._executor: ThreadPoolExecutor | None = None  # the prune thread, made when needed
        # a prune running there: its sessions, their audio_s when it was asked, the future
        self._background: tuple[list[Session], list[float], Future] | None = None

    @property
    def running(self) -> bool:
        """A prune is on the prune thread or finished there and not yet applied."""
        return self._background is not None

    def refresh(self, due: list[Session]) -> None:
        """Refresh candidate sets (module docstring): the due sessions ask.

        ``prune_wait_s == 0``: every asking session is pruned now, in this thread. Otherwise a
        session without candidates is pruned now (its first search cannot wait), and the
        others' requests go, once the oldest is ``prune_wait_s`` old, into one product on the
        engine's prune thread (the second core), applied by the first tick after it finished;
        meanwhile results use the previous candidates.
        """
        now = time.monotonic()
        for s in due:
            if s.prune_asked is None:
                s.prune_asked = now
        self._collect()
        if self.wait_s <= 0:
            with self._lock:
                asking = [s for s in self._sessions.values() if s.prune_asked is not None]
            self._apply(*self._prune_now(asking))
            return
        stale = self.stale_s
        first = [s for s in due
                 if s.candidates.size == 0 or s.audio_s - s.pruned_audio_s >= stale]
        if first:
            self._apply(*self._prune_now(first))
        if self._background is not None:
            return
        with self._lock:
            asking = [s for s in self._sessions.values() if s.prune_asked is not None]
        if asking and now - min(s.prune_asked for s in asking) >= self.wait_s:
            sessions, emb, hashes = self._embed(asking)
            if sessions:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="prune")
                self._background = (sessions, [s.audio_s for s in sessions],
                                    self._executor.submit(self._timed_prune, emb, hashes))

    def _embed(self, sessions: list[Session]) -> tuple[list[Session], np.ndarray, list]:
        """The sessions ready to prune, their embeddings, and per session what its hash prune
        needs: ``(query hashes, None)`` (a copy) when its hash prune is due, ``(None, ids)``
        (the answer it keeps) otherwise, ``None`` when the cascade has no hash prune."""
        embs = embeddings(self.encoder, [s.embedder for s in sessions])
        ready = [(s, e) for s, e in zip(sessions, embs, strict=True) if e is not None]
        use_hashes = self.cascade.config.hash_prune > 0
        hashes = [None if not use_hashes
                  else (s.query[:s.n_query].copy(), None) if self._hash_due(s)
                  else (None, s.hash_ids) for s, _ in ready]
        return ([s for s, _ in ready], np.stack([e for _, e in ready]) if ready else np.zeros(0),
                hashes)

    def _hash_due(self, s: Session) -> bool:
        return (s.hash_ids is None or s.flushed
                or s.audio_s - s.hash_pruned_audio_s >= self.hash_every_s)

    def _prune(self, emb: np.ndarray, hashes: list) -> tuple[np.ndarray, list]:
        """Candidates (Q, K) for these embeddings and hash prunes (see :meth:`_embed`), and
        per session the hash prune's new answer (None where it kept its own)."""
        if not hashes or hashes[0] is None:  # no hash prune in this cascade
            return self.cascade.prune(emb)[0], [None] * len(hashes)
        due = [i for i, (q, _) in enumerate(hashes) if q is not None]
        fresh: list = [None] * len(hashes)
        if due:
            for i, row in zip(due, self.cascade.hash_prune([hashes[i][0] for i in due]),
                              strict=True):
                fresh[i] = row
        rows = [hashes[i][1] if fresh[i] is None else fresh[i] for i in range(len(hashes))]
        return self.cascade.prune_with(emb, rows)[0], fresh

    def _prune_now(self, sessions: list[Session]) -> tuple[list[Session], np.ndarray, list]:
        sessions, emb, hashes = self._embed(sessions)
        if not sessions:
            return sessions, np.zeros((0, 0)), []
        return (sessions, *self._prune(emb, hashes))

    def _timed_prune(self, emb: np.ndarray, hashes: list) -> tuple[np.ndarray, list, float]:
        t = time.perf_counter()
        ids, fresh = self._prune(emb, hashes)
        return ids, fresh, time.perf_counter() - t

    def _collect(self) -> None:
        """Apply the background prune's candidates if it has finished (to sessions still held)."""
        if self._background is None or not self._background[2].done():
            return
        sessions, asked_at, future = self._background
        self._background = None
        try:
            ids, fresh, seconds = future.result()
        except Exception:
            logger.exception("background prune failed")
            self.metrics.errors_total.labels("internal").inc()
            return
        self.metrics.stage_seconds.labels("prune").observe(seconds)
        with self._lock:
            # not to sessions gone, finished, or pruned since on fresher audio (stale rule)
            alive = [(s, row, h, t) for s, t, row, h in zip(sessions, asked_at, ids, fresh,
                                                             strict=True)
                     if self._sessions.get(s.id) is s and not s.finalised
                     and s.pruned_audio_s <= t]
        self._apply([s for s, *_ in alive], np.array([row for _, row, *_ in alive]),
                    [h for _, _, h, _ in alive], [t for *_, t in alive])

    def _apply(self, sessions: list[Session], ids: np.ndarray, fresh: list,
               asked_at: list[float] | None = None) -> None:
        for i, (s, row) in enumerate(zip(sessions, ids, strict=True)):
            s.refresh(row)
            if fresh[i] is not None:  # the hash prune ran on the audio up to asked_at
                s.hash_ids = fresh[i]
                s.hash_pruned_audio_s = s.audio_s if asked_at is None else asked_at[i]
        if sessions:
            self.metrics.prune_batch.observe(len(sessions))
