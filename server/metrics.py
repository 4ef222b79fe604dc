"""The gateway's Prometheus metrics: every name in one place (prefix ``midimatch_gateway_``).

No per-session or per-address labels (DESIGN): label values are a fixed set (error codes,
message kinds), so the number of series never grows with traffic. Counters and histograms do not
export ``_created`` series (a timestamp per series that doubles the output and that no alert
uses): importing this module turns them off for the process (prometheus_client's switch is
process-wide; the worker's metrics module does the same).

``midimatch_gateway_result_lag_seconds`` is the latency the *service* adds to a result: from
the moment this gateway received the audio message that completed the result (the one that
brought the stream to the result's ``audio_s``; for the final result, the ``stop``), or from
when the previous result of the connection was sent if that is later, to the moment the result
was sent to the client. It does not depend on how fast the client sends: a file uploaded faster
than real time queues its results behind each other, and that backlog is the client's, not a
delay of the service. Results whose audio this connection did not receive (replayed after a
resume) and error results are not observed.
The result message's ``lag_s`` field is a different quantity (audio the worker has but has not
yet reflected; docs/protocol.md).
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

ERROR_CODES = ("bad_request", "unauthorized", "too_large", "busy", "timeout", "unavailable",
               "internal")
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
            "Latency the service adds to a result, s: from the gateway receiving the audio "
            "message that completed the result (for the final result: the stop message), or "
            "from the previous result's sending if later, to the result being sent; a client "
            "sending faster than real time does not count its own backlog",
            buckets=_LAG_BUCKETS, registry=r)
        self.decision_audio_seconds = Histogram(
            "midimatch_gateway_decision_audio_seconds",
            "Audio a session needed before its first decision, s", buckets=_DECIDE_BUCKETS,
            registry=r)
        self.demo_renders_total = Counter(
            "midimatch_gateway_demo_renders_total", "Demo excerpts rendered", registry=r)
        for code in ERROR_CODES:
            self.errors_total.labels(code)
