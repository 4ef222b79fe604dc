"""The worker's Prometheus metrics: what ``/metrics`` exports."""

from __future__ import annotations

from prometheus_client import generate_latest

from worker.metrics import WorkerMetrics


def test_no_created_series():
    m = WorkerMetrics()
    m.results_total.inc()
    m.update_seconds.observe(0.1)
    m.errors_total.labels("bad_audio").inc()
    text = generate_latest(m.registry).decode()
    assert "midimatch_worker_results_total 1.0" in text
    assert 'midimatch_worker_update_seconds_bucket{le="0.1"} 1.0' in text
    assert "_created" not in text
