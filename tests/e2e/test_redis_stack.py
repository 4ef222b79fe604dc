"""Gateway-only mode end to end: ``midimatch worker`` and ``midimatch serve --redis`` processes
on one real redis-server, and ``midimatch stream`` naming the piece."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.e2e.conftest import TARGET, running
from tests.redis_server import free_port


def test_worker_gateway_and_stream_over_redis(collection, redis_server):
    index, wav = collection
    port = free_port()
    midimatch = [sys.executable, "-m", "server.cli"]
    with running(midimatch + ["worker", "--index", str(index), "--redis", redis_server.url,
                              "--metrics-port", "0", "--worker-id", "e2e-worker"]), \
            running(midimatch + ["serve", "--redis", redis_server.url, "--port", str(port)],
                    f"http://127.0.0.1:{port}/readyz"):
        out = subprocess.run(midimatch + ["stream", str(wav), "--speed", "max", "--json",
                                          "--url", f"ws://127.0.0.1:{port}/v1/stream"],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    messages = [json.loads(line) for line in out.stdout.splitlines()]
    assert messages[0]["type"] == "ready"
    final = messages[-1]
    assert final["type"] == "result" and final["final"]
    assert final["audio_s"] > 19.0
    assert final["decision"] and final["decision"]["title"] == TARGET, final
