"""``midimatch worker`` as a subprocess: a /metrics port it cannot have stops it with one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

MIDIMATCH = Path(sys.executable).with_name("midimatch")


def run_worker(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIDIMATCH_")}
    # An empty index and a Redis nobody listens on: the port must stop it before either is used.
    return subprocess.run([str(MIDIMATCH), "worker", "--index", str(tmp_path), "--redis",
                           "redis://127.0.0.1:1/0", "--device", "cpu", *flags],
                          capture_output=True, text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL)


def test_busy_metrics_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("0.0.0.0", 0))  # the worker's /metrics binds every address
        taken.listen()
        port = taken.getsockname()[1]
        done = run_worker(tmp_path, "--metrics-port", str(port))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(port) in lines[0] and "already in use" in lines[0], lines[0]
    assert "--metrics-port" in lines[0], lines[0]


def test_cluster_harness_starts_a_worker_again_on_a_new_metrics_port(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/rel_cluster.py: a worker whose /metrics port another process took between
    free_port() and the worker's bind is started again on a fresh port; any other exit is not."""
    from bench import rel_cluster

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy])
        real = rel_cluster.free_port
        monkeypatch.setattr(rel_cluster, "free_port", lambda: next(ports, None) or real())
        monkeypatch.delenv("MIDIMATCH_METRICS_PORT", raising=False)
        # an empty index: once it has its port, the worker stops on that (exit 2, another line)
        w = rel_cluster.WorkerProc(tmp_path / "w1.log", "redis://127.0.0.1:1/0", tmp_path, "w1")
        w.start()
        assert w.proc is not None and w.proc.wait(120) == 2
        assert w.metrics_port == busy and w.lost_metrics_port(), w.text()
        assert w.retry_metrics_port()
        assert w.metrics_port != busy and w.port_tries == 1
        assert w.proc.wait(120) == 2
    assert not w.lost_metrics_port(), w.text()  # it lost nothing: the index stopped it
    assert not w.retry_metrics_port()
    assert "not a midimatch index" in w.text() and not w.tracebacks(), w.text()
