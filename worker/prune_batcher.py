"""The engine's candidate refreshes: the due sessions' prunes batched into one matrix product.

A session whose result is due asks for fresh candidates (stage 3 of :mod:`worker.engine`). Its
embedding is pruned against every window embedding of the index (10,000 references: 240k × 128
float32, 120 MB read), so one query costs about what fifty do: the requests of the last
``prune_wait_s`` share one product, which runs on a thread of its own (the second core) while
ticks go on; meanwhile the sessions verify against their previous candidates. A session that
cannot wait is pruned in the tick instead: one without candidates (its first search), and one
whose candidates come from an embedding ``prune_stale_s`` of audio older than its stream.
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
    """

    def __init__(self, cascade: Cascade, wait_s: float, stale_s: float, metrics: WorkerMetrics,
                 sessions: dict[str, Session], lock: threading.Lock) -> None:
        self.cascade = cascade
        self.encoder = cascade.encoder
        self.wait_s = wait_s
        self.stale_s = stale_s
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

    def _embed(self, sessions: list[Session]) -> tuple[list[Session], np.ndarray,
                                                        list[np.ndarray]]:
        """The sessions ready to prune, their embeddings and (copies of) their query hashes:
        the two prunes of :meth:`index.search.Cascade.prune`."""
        embs = embeddings(self.encoder, [s.embedder for s in sessions])
        ready = [(s, e) for s, e in zip(sessions, embs, strict=True) if e is not None]
        return ([s for s, _ in ready], np.stack([e for _, e in ready]) if ready else np.zeros(0),
                [s.query[:s.n_query].copy() for s, _ in ready])

    def _prune_now(self, sessions: list[Session]) -> tuple[list[Session], np.ndarray]:
        sessions, emb, hashes = self._embed(sessions)
        return sessions, (self.cascade.prune(emb, hashes)[0] if sessions else np.zeros((0, 0)))

    def _timed_prune(self, emb: np.ndarray, hashes: list[np.ndarray]) -> tuple[np.ndarray,
                                                                                float]:
        t = time.perf_counter()
        ids, _ = self.cascade.prune(emb, hashes)
        return ids, time.perf_counter() - t

    def _collect(self) -> None:
        """Apply the background prune's candidates if it has finished (to sessions still held)."""
        if self._background is None or not self._background[2].done():
            return
        sessions, asked_at, future = self._background
        self._background = None
        try:
            ids, seconds = future.result()
        except Exception:
            logger.exception("background prune failed")
            self.metrics.errors_total.labels("internal").inc()
            return
        self.metrics.stage_seconds.labels("prune").observe(seconds)
        with self._lock:
            # not to sessions gone, finished, or pruned since on fresher audio (stale rule)
            alive = [(s, row) for s, t, row in zip(sessions, asked_at, ids, strict=True)
                     if self._sessions.get(s.id) is s and not s.finalised
                     and s.pruned_audio_s <= t]
        self._apply([s for s, _ in alive], np.array([row for _, row in alive]))

    def _apply(self, sessions: list[Session], ids: np.ndarray) -> None:
        for s, row in zip(sessions, ids, strict=True):
            s.refresh(row)
        if sessions:
            self.metrics.prune_batch.observe(len(sessions))
