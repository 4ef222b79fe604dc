"""How an engine runs its sessions: :class:`EngineSettings`, each default with its reason.

The settings are checked when made (:class:`~worker.session.EngineError`, ``bad_settings``);
:class:`worker.engine.Engine` turns them into the sessions' :class:`~worker.session.SessionConfig`
and its own schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from index.cascade_types import DEFAULT_TOP_K
from model.features import FRAME_RATE
from worker.session import EngineError

__all__ = ["EngineSettings"]


@dataclass(frozen=True)
class EngineSettings:
    """How an engine runs its sessions.

    Attributes
    ----------
    window_s : float
        The query window: hash frames of the last ``window_s`` seconds are matched (10–30 s).
    result_every_s : float
        Audio between two results of a session, s.
    top_k, top_n : int
        References kept by the prune, and confirmed and returned per result.
    max_sessions : int
        Sessions one engine holds; ``open`` refuses more.
    tick_budget_s : float
        Past this much time in one tick, verification is postponed and no new round starts.
    slack_s : float
        The query may grow this far past ``window_s`` before the window slides and every
        candidate's DP restarts from the last ``window_s`` (amortises the restart).
    max_pending_s : float
        Audio queued per session beyond which the oldest is dropped (counted), s.
    change_s : float
        The newest ``change_s`` seconds are checked against the top match each result; when
        they no longer match it, the query restarts from them (0 disables the check; see
        :mod:`worker.change`).
    torch_threads : int or None
        torch's intra-op threads, set **process-wide** when the engine is made (None: leave
        them). One, because a tick is many small operations: on this 2-core machine a 100 ms
        CQT push took 0.27 ms of CPU with one thread and 3.3 ms with two (OpenMP threads
        spinning at every operation, worse when the cores are shared). Hash-DTW still runs on
        numba's threads.
    defer_audio : bool
        Process a session's audio only once it completes a result period (:mod:`worker.engine`);
        False: every tick processes everything queued.
    prune_wait_s : float
        A session's candidate refresh may wait this long (wall time) to share one prune with
        other sessions' (:mod:`worker.prune_batcher`); meanwhile its results use the candidates
        of its previous prune. 0: every due session is pruned in the tick it falls due.
    prune_stale_s : float
        A due session whose candidates come from an embedding this much *audio* older than its
        stream is pruned in the tick instead of waiting for the shared prune. In real time the
        shared prune refreshes every ``prune_wait_s`` of wall time, far more often; this bounds
        audio that comes faster than real time (a file streamed at full speed, a takeover
        rebuilding from its retained window), whose whole backlog a tick can process before
        ``prune_wait_s`` has passed: before this setting such a session was verified, to its
        end, against the candidates of its first 2 s.
    hash_prune_every_s : float
        Audio seconds between a session's coarse hash-DTW prunes (:mod:`index.hash_prune`; the
        cascade's ``hash_prune`` references of its candidates): one costs ~4 ms at 2,000
        references and cannot be batched, so a session keeps its answer in between; its first
        search and its final result always run one. 0: at every refresh.
    prune_parts : int or None
        Parts of the query window pruned beside it; None (the default) keeps the cascade's
        ``prune_parts`` (2, the halves). 0 prunes with the whole window alone: the right piece
        is lost to the prune more often, but the prune costs about half the CPU
        (docs/benchmarks.md, "Streaming worker").
    max_candidate_frames : int
        A session's candidates are cut, in prune order, where their hash frames reach this
        (the DP keeps 8 bytes per reference frame: 150,000 frames = 1.2 MB, the largest part of
        the ≤ 2 MB a session may use; 100 typical candidates hold ~70,000).
    """

    window_s: float = 10.0
    result_every_s: float = 1.0
    top_k: int = DEFAULT_TOP_K
    top_n: int = 5
    max_sessions: int = 64
    tick_budget_s: float = 0.5
    slack_s: float = 5.0
    max_pending_s: float = 30.0
    change_s: float = 3.0
    torch_threads: int | None = 1
    defer_audio: bool = True
    prune_wait_s: float = 0.5
    prune_stale_s: float = 3.0
    max_candidate_frames: int = 150_000
    prune_parts: int | None = None
    hash_prune_every_s: float = 3.0

    def __post_init__(self) -> None:
        checks = {
            "window_s": 1.0 <= self.window_s <= 120.0,
            "result_every_s": 0.05 <= self.result_every_s <= 10.0,
            "top_k": self.top_k >= 1,
            "top_n": 1 <= self.top_n,
            "max_sessions": self.max_sessions >= 1,
            "tick_budget_s": self.tick_budget_s > 0,
            "slack_s": self.slack_s >= 0,
            "max_pending_s": self.max_pending_s >= self.result_every_s,
            "change_s": 0 <= self.change_s <= self.window_s / 2,
            "torch_threads": self.torch_threads is None or self.torch_threads >= 1,
            "prune_wait_s": self.prune_wait_s >= 0,
            "prune_stale_s": self.prune_stale_s > 0,
            "max_candidate_frames": self.max_candidate_frames >= 1,
            "prune_parts": self.prune_parts is None or self.prune_parts >= 0,
            "hash_prune_every_s": self.hash_prune_every_s >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        bad += [f.name for f in fields(self) if f.name not in bad  # nan, inf pass some checks
                and isinstance(getattr(self, f.name), float)
                and not math.isfinite(getattr(self, f.name))]
        if bad:
            shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            raise EngineError(f"bad engine settings: {shown}", reason="bad_settings")

    @property
    def window_hashes(self) -> int:
        """Hash frames of the query window (4 CQT frames each)."""
        return max(2, int(round(self.window_s * FRAME_RATE)) // 4)
