"""The gateway's Prometheus metrics: every name in one place (prefix ``midimatch_gateway_``).

No per-session or per-address labels (DESIGN): label values are a fixed set (error codes,
message kinds), so the number of series never grows with traffic.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ERROR_CODES = ("bad_request", "unauthorized", "too_large", "busy", "timeout", "internal")
_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_DECIDE_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0)


class GatewayMetrics:
    """One set of gateway metrics in ``registry`` (fresh per app, so tests can build many)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.connections_active = Gauge(
            "midimatch_gateway_connections_active", "Open websocket connections", registry=r)
        self.sessions_started_total = Counter(
            "midimatch_gateway_sessions_started_total", "Sessions created", registry=r)
        self.sessions_resumed_total = Counter(
            "midimatch_gateway_sessions_resumed_total",
            "Sessions a client reattached to after a dropped connection", registry=r)
        self.sessions_detached = Gauge(
            "midimatch_gateway_sessions_detached",
            "Dropped sessions waiting in their resume grace period", registry=r)
        self.errors_total = Counter(
            "midimatch_gateway_errors_total", "Error messages sent to clients, by code",
            ["code"], registry=r)
        self.audio_bytes_total = Counter(
            "midimatch_gateway_audio_bytes_total", "PCM received from clients", registry=r)
        self.audio_seconds_total = Counter(
            "midimatch_gateway_audio_seconds_total", "Audio received from clients, s",
            registry=r)
        self.results_total = Counter(
            "midimatch_gateway_results_total", "Result messages sent to clients", registry=r)
        self.result_lag_seconds = Histogram(
            "midimatch_gateway_result_lag_seconds",
            "Audio received but not yet reflected in a result, as reported by the worker",
            buckets=_LAG_BUCKETS, registry=r)
        self.decision_audio_seconds = Histogram(
            "midimatch_gateway_decision_audio_seconds",
            "Audio a session needed before its first decision, s", buckets=_DECIDE_BUCKETS,
            registry=r)
        self.demo_renders_total = Counter(
            "midimatch_gateway_demo_renders_total", "Demo excerpts rendered", registry=r)
        for code in ERROR_CODES:
            self.errors_total.labels(code)
