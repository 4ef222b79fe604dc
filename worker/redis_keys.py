"""Every Redis key of the bus, named in one place (:class:`RedisKeys`, mixed into ``RedisBus``).

Key layout (``P`` is the prefix, ``mm`` by default; ``{id}`` a session id)
----------------------------------------------------------------------------
``P:sessions``            stream, the hand-out queue; consumer group ``workers``, one consumer
                          per worker id (deleted when the worker shuts down cleanly, or reaped
                          once it is long dead and holds nothing). Entry ``{s: id}``. A session's
                          current entry id is in its meta hash (``x``); while a worker owns the
                          session the entry sits in that worker's pending list (PEL).
``P:s:{id}:meta``         hash: ``sr ch enc`` (stream parameters), ``x`` (hand-out entry),
                          ``n`` (times claimed: > 1 means reclaimed), ``o`` (last owner),
                          ``e`` (ended), ``d`` (done: finished, results kept for resuming),
                          ``f`` (the final result's id: once set, no result is stored),
                          ``a`` (attach generation: bumped by each gateway attach, ``HINCRBY``;
                          a grace expiry ends the session only while its attach is the latest).
``P:s:{id}:audio``        stream of chunks. Entry id ``{t_ms}-{seq + 1}`` (stream time in ms,
                          then the sequence number), fields ``t`` (t_s, exact) and ``p`` (PCM);
                          trimmed with ``MINID ~`` to the last ``retain_s`` of *stream* time,
                          whatever the chunk size. The end marker is one more entry, field ``e``.
``P:s:{id}:results``      stream of results, field ``r`` (JSON), ``MAXLEN ~ max_results``; the
                          Redis entry ids are the result ids a reconnecting client resumes from.
``P:active``              set of session ids created and not finished (pruned of expired ones).
``P:workers``             set of worker ids; ``P:w:{worker}`` their heartbeat, value = capacity,
                          expiring after ``lease_ms`` (Redis's clock, so no skew between hosts);
                          beside it, with the same expiry, ``P:w:{worker}:notes`` (JSON list of
                          notes for the operator) and ``P:w:{worker}:calibration`` (JSON: the
                          calibration it decides with), both read by ``/readyz``.
"""

from __future__ import annotations

GROUP = "workers"  # the consumer group of ``P:sessions``


class RedisKeys:
    """Key names under ``self.prefix`` (layout in the module docstring)."""

    prefix: str

    @property
    def sessions_key(self) -> str:
        return f"{self.prefix}:sessions"

    @property
    def active_key(self) -> str:
        return f"{self.prefix}:active"

    @property
    def workers_key(self) -> str:
        return f"{self.prefix}:workers"

    def worker_key(self, worker_id: str) -> str:
        return f"{self.prefix}:w:{worker_id}"

    def notes_key(self, worker_id: str) -> str:
        return f"{self.prefix}:w:{worker_id}:notes"

    def calibration_key(self, worker_id: str) -> str:
        return f"{self.prefix}:w:{worker_id}:calibration"

    def worker_keys(self, worker_id: str) -> list[str]:
        """Every key of one worker's heartbeat."""
        return [self.worker_key(worker_id), self.notes_key(worker_id),
                self.calibration_key(worker_id)]

    def meta_key(self, sid: str) -> str:
        return f"{self.prefix}:s:{sid}:meta"

    def audio_key(self, sid: str) -> str:
        return f"{self.prefix}:s:{sid}:audio"

    def results_key(self, sid: str) -> str:
        return f"{self.prefix}:s:{sid}:results"

    def session_keys(self, sid: str) -> list[str]:
        """Every key of one session."""
        return [self.meta_key(sid), self.audio_key(sid), self.results_key(sid)]
