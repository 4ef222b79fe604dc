"""Health checks for the images (Dockerfile HEALTHCHECK) and Kubernetes exec probes.

``python /app/probe.py gateway``       the gateway answers ``/healthz`` on its port
``python /app/probe.py worker-live``   the worker's Prometheus endpoint answers and it does not
                                        report a hung tick (``midimatch_worker_stalled``)
``python /app/probe.py worker-ready``  the worker's heartbeat key is in Redis: it sets the key
                                        once its engine (model + index) is loaded and renews it
                                        every lease/3, so this is "loaded, and its lease task runs"

Settings, ports and key names come from the code itself (``server.settings``,
``worker.settings``, ``worker.redis_bus``), so the probe cannot drift from them. Exit 0: healthy;
1: not. Torch-free and quick (no model is loaded).
"""

from __future__ import annotations

import os
import sys
import urllib.request

STALLED = "midimatch_worker_stalled"


def _get(port: int, path: str) -> bytes | None:
    """The body of a 2xx answer, else None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.read() if 200 <= r.status < 300 else None
    except OSError:
        return None


def gateway() -> bool:
    from server.settings import Settings

    return _get(Settings.from_env().port, "/healthz") is not None


def worker_live() -> bool:
    from worker.settings import WorkerSettings

    port = WorkerSettings.from_env().metrics_port
    if port == 0:
        return True
    body = _get(port, "/metrics")
    if body is None:
        return False
    for line in body.decode(errors="replace").splitlines():
        if line.startswith(STALLED + " ") and float(line.split()[1]) > 0:
            print("the worker reports a hung tick", file=sys.stderr)
            return False
    return True


def worker_ready() -> bool:
    import redis

    from worker.redis_bus import RedisBus
    from worker.settings import WorkerSettings

    if not os.environ.get("MIDIMATCH_WORKER_ID"):
        print("worker-ready needs MIDIMATCH_WORKER_ID (the pod name)", file=sys.stderr)
        return False
    s = WorkerSettings.from_env()
    if not s.redis_url:
        print("no MIDIMATCH_REDIS_URL", file=sys.stderr)
        return False
    key = RedisBus.worker_key(_Prefix(s.redis_prefix), s.worker_id)
    try:
        client = redis.Redis.from_url(s.redis_url, socket_timeout=3, socket_connect_timeout=3)
        return bool(client.exists(key))
    except redis.RedisError as e:
        print(f"redis: {e}", file=sys.stderr)
        return False


class _Prefix:
    """Just enough of a RedisBus for its key-name methods (no connection)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix


CHECKS = {"gateway": gateway, "worker-live": worker_live, "worker-ready": worker_ready}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in CHECKS:
        print(f"usage: probe.py {{{'|'.join(CHECKS)}}}", file=sys.stderr)
        return 2
    return 0 if CHECKS[argv[0]]() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
