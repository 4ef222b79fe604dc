"""``midimatch serve`` without Redis: the in-process bus follows the same bus settings as the
embedded worker (it used its own defaults: with ``MIDIMATCH_LEASE_MS`` above 5 s the worker's
heartbeat lapsed between beats and every start was answered busy)."""

from __future__ import annotations

from server.serve_cli import embedded_bus


def test_the_embedded_bus_takes_the_workers_bus_settings():
    env = {"MIDIMATCH_LEASE_MS": "18000", "MIDIMATCH_RETAIN_S": "7.5",
           "MIDIMATCH_SESSION_TTL_S": "40", "MIDIMATCH_MAX_RESULTS": "17"}
    bus, worker = embedded_bus(env)
    assert worker.lease_ms == 18000 and worker.worker_id == "embedded"
    assert bus.lease_s == 18.0  # the heartbeat (every lease / 3) now stays alive between beats
    assert (bus.retain_s, bus.session_ttl_s, bus.max_results) == (7.5, 40.0, 17)
