"""The worker's Prometheus metrics: every name in one place (prefix ``midimatch_``, base units).

No per-session labels (DESIGN): a label value per stream would grow without bound. Stages are a
fixed set, errors a fixed set of kinds. Counters and histograms export no ``_created`` series:
importing this module turns them off for the process (prometheus_client's switch is
process-wide, so it covers the embedded worker's registry and ``midimatch worker``'s own
``/metrics`` alike).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

disable_created_metrics()

# Per-tick stage times, s. From a fraction of a millisecond (prune) to seconds (overload).
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
STAGES = ("features", "networks", "prune", "verify", "confirm", "tick")
# bad_session: a claimed session whose stored parameters do not parse (failed alone);
# audio_gap: audio trimmed from the bus before the worker read it; stalled: a hung tick.
ERROR_KINDS = ("bad_audio", "internal", "bus", "lease_lost", "audio_dropped", "bad_session",
               "audio_gap", "stalled")
# how a session's decision changed from one result to the next (WorkerMetrics.decisions_total)
DECISION_EVENTS = ("made", "replaced", "withdrawn", "dropped_at_end")


class WorkerMetrics:
    """One set of worker metrics, registered in ``registry`` (a fresh one per worker, so tests
    and the embedded mode can run several without clashing).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram(
            "midimatch_worker_stage_seconds", "Time per tick spent in each stage, all sessions",
            ["stage"], buckets=_STAGE_BUCKETS, registry=r)
        self.update_seconds = Histogram(
            "midimatch_worker_update_seconds",
            "End to end: audio chunk received by the worker until the result it completes is "
            "published", buckets=_E2E_BUCKETS, registry=r)
        self.sessions_active = Gauge(
            "midimatch_worker_sessions_active", "Sessions this worker owns", registry=r)
        self.audio_lag_seconds = Gauge(
            "midimatch_worker_audio_lag_seconds",
            "Largest backlog of received but unprocessed audio over the worker's sessions",
            registry=r)
        self.batch_size = Histogram(
            "midimatch_worker_batch_sessions", "Sessions processed together in one tick",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.prune_batch = Histogram(
            "midimatch_worker_prune_batch_sessions",
            "Sessions whose candidates one prune (matrix product) refreshed",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.sessions_claimed_total = Counter(
            "midimatch_worker_sessions_claimed_total", "Sessions taken, new ones", registry=r)
        self.sessions_reclaimed_total = Counter(
            "midimatch_worker_sessions_reclaimed_total",
            "Sessions taken over from another worker (died or handed back)", registry=r)
        self.results_total = Counter(
            "midimatch_worker_results_total", "Results published", registry=r)
        self.audio_seconds_total = Counter(
            "midimatch_worker_audio_seconds_total", "Audio processed, s", registry=r)
        self.degraded_ticks_total = Counter(
            "midimatch_worker_degraded_ticks_total",
            "Ticks that skipped verification for some sessions because the worker fell behind",
            registry=r)
        self.audio_skipped_seconds_total = Counter(
            "midimatch_worker_audio_skipped_seconds_total",
            "Stream time trimmed from the bus before this worker read it (it fell more than the "
            "retained window behind), s", registry=r)
        self.stalled = Gauge(
            "midimatch_worker_stalled",
            "1 while a tick has made no progress for stall_s: leases are left to lapse for "
            "other workers",
            registry=r)
        self.errors_total = Counter(
            "midimatch_worker_errors_total", "Errors by kind", ["kind"], registry=r)
        self.decisions_total = Counter(
            "midimatch_worker_decisions_total",
            "Changes of a session's decision between its results: made (a piece named where "
            "none was), replaced (another piece), withdrawn (none any more, stream going on), "
            "dropped_at_end (a final result without the decision the result before it had)",
            ["event"], registry=r)
        for e in DECISION_EVENTS:
            self.decisions_total.labels(e)
        for s in STAGES:
            self.stage_seconds.labels(s)
        for k in ERROR_KINDS:
            self.errors_total.labels(k)
