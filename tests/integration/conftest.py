"""Fixtures for the integration tests: a small index, real ``midimatch worker`` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_piece

MIDIMATCH = Path(sys.executable).with_name("midimatch")
RATE = 16000


@pytest.fixture(scope="session")
def index_and_audio(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """An index of three 20 s pieces, and 20 s of the first as s16 PCM at 16 kHz, shape (n,)."""
    import pretty_midi

    from index.build import BuildOptions, build_index

    root = tmp_path_factory.mktemp("collection")
    for i in range(3):
        make_piece(i, duration_s=20).write(str(root / f"p{i}.mid"))
    out = tmp_path_factory.mktemp("index")
    build_index(out, [root], BuildOptions(workers=1, progress=False))
    audio = pretty_midi.PrettyMIDI(str(root / "p0.mid")).synthesize(fs=RATE)[: 20 * RATE]
    pcm = (audio / max(1e-9, float(np.abs(audio).max())) * 20000).astype(np.int16)
    return out, pcm


class WorkerProcess:
    """One ``midimatch worker`` subprocess (log in ``log``)."""

    def __init__(self, index: Path, redis_url: str, worker_id: str, log: Path,
                 lease_ms: int = 1000, metrics_port: int = 0) -> None:
        self.worker_id, self.log, self.metrics_port = worker_id, log, metrics_port
        env = {**os.environ, "MIDIMATCH_POLL_S": "0.02", "MIDIMATCH_CLAIM_EVERY_S": "0.1",
               "MIDIMATCH_RETAIN_S": "30"}
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                [str(MIDIMATCH), "-v", "worker", "--index", str(index), "--redis", redis_url,
                 "--device", "cpu", "--metrics-port", str(metrics_port), "--worker-id", worker_id,
                 "--lease-ms", str(lease_ms), "--max-sessions", "8"],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def kill(self) -> None:
        """SIGKILL: a crash (no hand-back)."""
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 15.0) -> int:
        """SIGTERM and wait; the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def metric(self, name: str) -> float:
        """One sample's value from its ``/metrics`` endpoint (a metric without labels)."""
        import urllib.request

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise KeyError(name)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def start_worker(tmp_path: Path, index_and_audio) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes against a Redis URL; all killed at the end of the test."""
    started: list[WorkerProcess] = []

    def start(redis_url: str, worker_id: str, **kw) -> WorkerProcess:
        w = WorkerProcess(index_and_audio[0], redis_url, worker_id,
                          tmp_path / f"{worker_id}-{len(started)}.log", **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.kill()


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            index_and_audio):
    """Real processes on loopback (bench/rel_cluster.py): one redis-server and the gateways and
    workers a module asks for with ``CLUSTER = {"gateways": G, "workers": W, "gateway_env":
    {...}}``, on the integration index, warmed up (each worker's first ticks load numba's
    cached kernels). Killed at the end of the module; on a failure its logs are printed."""
    import asyncio
    import shutil

    from bench.rel_cluster import Cluster
    from bench.rel_scenarios import warm_up

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    spec = getattr(request.module, "CLUSTER", {})
    c = Cluster(tmp_path_factory.mktemp("cluster"), index_and_audio[0], lease_ms=2000,
                gateway_env=spec.get("gateway_env"))
    try:
        c.start(n_gateways=spec.get("gateways", 1), n_workers=spec.get("workers", 2))
        asyncio.run(warm_up(c, index_and_audio[1]))
        yield c
    finally:
        c.close()


def audio_pool(pcm: np.ndarray, n: int, seconds: float) -> list[np.ndarray]:
    """``n`` different ``seconds``-long excerpts of ``pcm`` (int16 at :data:`RATE`)."""
    length = int(seconds * RATE)
    starts = np.linspace(0, len(pcm) - length, n).astype(int)
    return [pcm[s:s + length] for s in starts]


def no_problems(report: dict) -> str:
    """The assertion message of a scenario report: its problems, one a line, and its figures."""
    figures = {k: v for k, v in report.items() if k not in ("problems", "cases")}
    return "\n".join([f"{report['name']}:", *report["problems"], f"figures: {figures}"])
