"""Write dashboard.json, the Grafana dashboard of midimatch (``python make_dashboard.py``).

Panels are (title, unit, [(PromQL, legend)]) below; every metric is one the code exports
(server/metrics.py, worker/metrics.py), which tests/k8s/test_crosscheck.py checks.
"""

from __future__ import annotations

import json
from pathlib import Path


def hq(q: float, metric: str, window: str = "5m") -> str:
    """The q-quantile of a histogram over every pod."""
    return f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket[{window}])))"


def mean(metric: str) -> str:
    """A histogram's mean over every pod."""
    return f"sum(rate({metric}_sum[5m])) / sum(rate({metric}_count[5m]))"


ROWS = [
    ("Traffic", [
        ("Open websocket connections", "short", [
            ("sum(midimatch_gateway_connections_active)", "all gateways"),
            ("midimatch_gateway_connections_active", "{{pod}}")]),
        ("Sessions started / resumed per s", "ops", [
            ("sum(rate(midimatch_gateway_sessions_started_total[5m]))", "started"),
            ("sum(rate(midimatch_gateway_sessions_resumed_total[5m]))", "resumed")]),
        ("Sessions per worker", "short", [
            ("midimatch_worker_sessions_active", "{{pod}}"),
            ("sum(midimatch_gateway_sessions_detached)", "detached (resume grace)")]),
        ("Audio received vs processed, s/s", "short", [
            ("sum(rate(midimatch_gateway_audio_seconds_total[5m]))", "received (gateways)"),
            ("sum(rate(midimatch_worker_audio_seconds_total[5m]))", "processed (workers)")]),
    ]),
    ("Latency", [
        ("Update latency (worker: chunk in → result out)", "s", [
            (hq(0.5, "midimatch_worker_update_seconds"), "p50"),
            (hq(0.99, "midimatch_worker_update_seconds"), "p99")]),
        ("Result lag added by the service (gateway)", "s", [
            (hq(0.5, "midimatch_gateway_result_lag_seconds"), "p50"),
            (hq(0.99, "midimatch_gateway_result_lag_seconds"), "p99")]),
        ("Worker audio backlog, s", "s", [
            ("midimatch_worker_audio_lag_seconds", "{{pod}}")]),
        ("Audio needed for the first decision", "s", [
            (hq(0.5, "midimatch_gateway_decision_audio_seconds", "15m"), "median"),
            (hq(0.9, "midimatch_gateway_decision_audio_seconds", "15m"), "p90")]),
    ]),
    ("Worker internals", [
        ("Stage time per s of wall clock", "percentunit", [
            ("sum by (stage) (rate(midimatch_worker_stage_seconds_sum[5m]))", "{{stage}}")]),
        ("Sessions per tick (batch)", "short", [
            (mean("midimatch_worker_batch_sessions"), "tick"),
            (mean("midimatch_worker_prune_batch_sessions"), "prune")]),
        ("Claims and takeovers per s", "ops", [
            ("sum(rate(midimatch_worker_sessions_claimed_total[5m]))", "claimed (new)"),
            ("sum(rate(midimatch_worker_sessions_reclaimed_total[5m]))", "taken over")]),
        ("Degraded ticks per s, stalled workers", "short", [
            ("sum(rate(midimatch_worker_degraded_ticks_total[5m]))", "degraded ticks/s"),
            ("sum(midimatch_worker_stalled)", "stalled workers"),
            ("sum(rate(midimatch_worker_audio_skipped_seconds_total[5m]))",
             "audio skipped, s/s")]),
    ]),
    ("Errors", [
        ("Gateway errors by code per s", "ops", [
            ("sum by (code) (rate(midimatch_gateway_errors_total[5m]))", "{{code}}")]),
        ("Worker errors by kind per s", "ops", [
            ("sum by (kind) (rate(midimatch_worker_errors_total[5m]))", "{{kind}}")]),
        ("Results per s", "ops", [
            ("sum(rate(midimatch_gateway_results_total[5m]))", "sent (gateways)"),
            ("sum(rate(midimatch_worker_results_total[5m]))", "published (workers)")]),
    ]),
]


def dashboard() -> dict:
    panels, y, pid = [], 0, 1
    for row_title, row in ROWS:
        panels.append({"type": "row", "title": row_title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, (title, unit, queries) in enumerate(row):
            panels.append({
                "type": "timeseries", "title": title, "id": pid,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [{"refId": chr(65 + k), "expr": q, "legendFormat": legend,
                             "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                            for k, (q, legend) in enumerate(queries)],
            })
            pid += 1
        y += 8 * ((len(row) + 1) // 2)
    return {
        "title": "midimatch", "uid": "midimatch", "schemaVersion": 39, "version": 1,
        "tags": ["midimatch"], "timezone": "utc", "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource",
                                 "query": "prometheus", "label": "Prometheus"}]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("dashboard.json")
    out.write_text(json.dumps(dashboard(), indent=1) + "\n")
    print(out)
