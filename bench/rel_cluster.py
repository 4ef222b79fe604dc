"""Real midimatch processes on loopback for the reliability harness and the integration tests.

One ``redis-server`` (without or with persistence), any number of ``midimatch serve --redis``
gateways and ``midimatch worker`` processes, each a subprocess with its own log file, which can
be killed (SIGKILL), stopped (SIGSTOP/SIGCONT), terminated (SIGTERM) and started again on the
same port. Used by ``bench/reliability.py``, ``tests/integration/test_reliability.py`` and
``tests/integration/test_scale_out.py``; never mocks.

The index is a small one built here from generated pieces (:func:`small_collection`): what the
harness measures is the service around the search (protocol, bus, leases, takeover), and a
small collection keeps a session's cost to the networks and the CQT.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIDIMATCH = Path(sys.executable).with_name("midimatch")
RATE = 16000
TRACEBACK = re.compile(r"^Traceback \(most recent call last\)", re.M)
# `midimatch worker`'s one line when its --metrics-port is taken (worker/cli.py)
METRICS_PORT_TAKEN = re.compile(r"cannot serve /metrics on port (\d+): address already in use")


class ClusterError(RuntimeError):
    """A process of the cluster did not start or exited unexpectedly."""


_GIVEN: set[int] = set()  # ports free_port handed out in this process


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it), and not one this process
    was given before. Another process can still take it before the caller binds it:
    :meth:`Cluster.wait_workers` starts a worker whose ``/metrics`` port was taken again."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            break
    _GIVEN.add(port)
    return port


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid``, bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(d.name))
    return sorted(out)


# ------------------------------------------------------------------------------- collection
def small_collection(folder: Path, n_pieces: int = 4, duration_s: float = 30.0
                     ) -> list[Path]:
    """``n_pieces`` generated MIDI files of ``duration_s`` in ``folder`` (deterministic)."""
    from tests.conftest import make_piece  # the pieces every integration test indexes

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_pieces):
        p = folder / f"p{i}.mid"
        if not p.exists():
            make_piece(i, duration_s=duration_s).write(str(p))
        paths.append(p)
    return paths


def build_small_index(out: Path, midi: list[Path]) -> Path:
    """Index ``midi`` into ``out`` in this process (one worker process, no progress bar)."""
    from index.build import BuildOptions, build_index
    from index.store import exists

    if not exists(out):
        build_index(out, [str(p) for p in midi], BuildOptions(workers=1, progress=False))
    return out


def synth_pcm(midi: Path, seconds: float, rate: int = RATE) -> np.ndarray:
    """``seconds`` of ``midi`` synthesised (pretty_midi's sines) as int16 mono, shape (n,)."""
    import pretty_midi

    audio = pretty_midi.PrettyMIDI(str(midi)).synthesize(fs=rate)[: int(seconds * rate)]
    audio = np.pad(audio, (0, max(0, int(seconds * rate) - len(audio))))
    return (audio / max(1e-9, float(np.abs(audio).max())) * 20000).astype(np.int16)


# -------------------------------------------------------------------------------- processes
class Proc:
    """A subprocess with a log file; the base of every process of the cluster."""

    name = "proc"

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen | None = None

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as f:
            f.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            f.flush()
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=ROOT,
                                         env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash, an out-of-memory kill) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process dies at once too
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM and wait; SIGKILL past ``timeout_s``. The exit status (None if killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def pause(self) -> None:
        """SIGSTOP: the process hangs (a GC pause, a stuck disk, a frozen VM)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def rss(self) -> int:
        return rss_bytes(self.pid) if self.alive else 0

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, n: int = 3000) -> str:
        return self.text()[-n:]

    def tracebacks(self) -> list[str]:
        """Every traceback in the log, each with the 1,500 characters from its start."""
        text = self.text()
        return [text[m.start():m.start() + 1500] for m in TRACEBACK.finditer(text)]

    def _check_alive(self) -> None:
        if not self.alive:
            raise ClusterError(f"{self.name} exited ({self.proc.returncode if self.proc else '-'})"
                               f":\n{self.tail()}")


class RedisProc(Proc):
    """``redis-server`` on 127.0.0.1. ``persistence``: ``none`` (``--save "" --appendonly
    no``: a restart loses everything) or ``aof`` (``--appendonly yes --appendfsync
    everysec``: a restart reloads the data, losing at most the last second on a crash)."""

    name = "redis"

    def __init__(self, workdir: Path, port: int | None = None,
                 persistence: str = "none") -> None:
        super().__init__(workdir / "redis.log")
        if persistence not in ("none", "aof"):
            raise ValueError(f"persistence must be none or aof, got {persistence!r}")
        self.workdir, self.persistence = workdir, persistence
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise ClusterError("redis-server is not installed (apt-get install redis-server)")

    def start(self, timeout_s: float = 10.0) -> RedisProc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        keep = (["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
                if self.persistence == "aof" else ["--save", "", "--appendonly", "no"])
        self._spawn([self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                     "--dir", str(self.workdir), "--protected-mode", "no", *keep])
        deadline = time.monotonic() + timeout_s
        while not self.ping():
            self._check_alive()
            if time.monotonic() > deadline:
                raise ClusterError(f"redis-server on {self.port} did not answer PING")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def restart(self, *, crash: bool = True, down_s: float = 0.0) -> RedisProc:
        """SIGKILL (``crash``) or SIGTERM it, stay down ``down_s``, start it on the same port."""
        if crash:
            self.kill()
        else:
            self.terminate()
        time.sleep(down_s)
        return self.start()


class GatewayProc(Proc):
    """``midimatch serve --redis`` on a port of its own; ``options`` are extra flags."""

    name = "gateway"

    def __init__(self, log: Path, redis_url: str, index: Path | None, *,
                 port: int | None = None, options: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        super().__init__(log)
        self.redis_url, self.index, self.options = redis_url, index, options
        self.env = env or {}
        self.port = port or free_port()
        self.url = f"ws://127.0.0.1:{self.port}/v1/stream"
        self.http = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> GatewayProc:
        argv = [str(MIDIMATCH), "serve", "--redis", self.redis_url, "--host", "127.0.0.1",
                "--port", str(self.port), *self.options]
        if self.index is not None:
            argv += ["--index", str(self.index)]
        self._spawn(argv, self.env)
        deadline = time.monotonic() + timeout_s
        while self.get("/healthz")[0] != 200:
            self._check_alive()
            if time.monotonic() > deadline:
                raise ClusterError(f"gateway on {self.port} not healthy:\n{self.tail()}")
            time.sleep(0.1)
        return self

    def get(self, path: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
        """(status, body) of GET ``path``; (0, b"") when nothing answers."""
        try:
            with urllib.request.urlopen(self.http + path, timeout=timeout_s) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def restart(self, *, crash: bool = False) -> GatewayProc:
        """SIGTERM (clients get 1001 and resume elsewhere) or SIGKILL, then start again."""
        if crash:
            self.kill()
        else:
            self.terminate()
        return self.start()


class WorkerProc(Proc):
    """``midimatch worker`` with a ``/metrics`` port; ``env`` sets ``MIDIMATCH_*`` settings."""

    name = "worker"

    def __init__(self, log: Path, redis_url: str, index: Path, worker_id: str, *,
                 lease_ms: int = 2000, max_sessions: int = 64,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(log)
        self.redis_url, self.index, self.worker_id = redis_url, index, worker_id
        self.lease_ms, self.max_sessions, self.env = lease_ms, max_sessions, env or {}
        self.metrics_port, self.port_tries, self._log_from = 0, 0, 0  # set by start()

    def start(self) -> WorkerProc:
        """Start it (returns at once: :meth:`Cluster.wait_workers` waits for its heartbeat)."""
        self.metrics_port = free_port()
        self.port_tries = 0
        return self._start()

    def _start(self) -> WorkerProc:
        self._log_from = self.log.stat().st_size if self.log.exists() else 0
        self._spawn([str(MIDIMATCH), "worker", "--index", str(self.index), "--redis",
                     self.redis_url, "--device", "cpu", "--metrics-port", str(self.metrics_port),
                     "--worker-id", self.worker_id, "--lease-ms", str(self.lease_ms),
                     "--max-sessions", str(self.max_sessions)], self.env)
        return self

    def lost_metrics_port(self) -> bool:
        """Whether its latest start exited because its ``--metrics-port`` was taken (another
        process bound it between :func:`free_port` and the worker)."""
        if self.proc is None or self.proc.poll() != 2:
            return False
        with open(self.log, "rb") as f:
            f.seek(self._log_from)
            m = METRICS_PORT_TAKEN.search(f.read().decode(errors="replace"))
        return m is not None and int(m.group(1)) == self.metrics_port

    def retry_metrics_port(self, attempts: int = 3) -> bool:
        """Start it again on a new ``/metrics`` port if its latest start lost the port, at
        most ``attempts`` times since :meth:`start`; whether it was started again."""
        if self.port_tries >= attempts or not self.lost_metrics_port():
            return False
        self.port_tries += 1
        self.metrics_port = free_port()
        self._start()
        return True

    def metrics(self) -> dict[str, float]:
        """Every sample of its ``/metrics`` (name with labels → value); {} when unreachable."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                        timeout=3) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out


@dataclass
class Cluster:
    """One Redis, gateways and workers under ``workdir`` (logs there too).

    Use as a context manager, or call :meth:`close`: every process it started is killed.
    """

    workdir: Path
    index: Path
    persistence: str = "none"
    lease_ms: int = 2000
    max_sessions: int = 64
    gateway_options: tuple[str, ...] = ()
    gateway_env: dict | None = None
    worker_env: dict | None = None
    retired: set[str] = field(default_factory=set)  # workers killed or scaled in on purpose

    def __post_init__(self) -> None:
        self.redis = RedisProc(self.workdir / "redis", persistence=self.persistence)
        self.gateways: list[GatewayProc] = []
        self.workers: list[WorkerProc] = []

    def start(self, n_gateways: int = 1, n_workers: int = 2, timeout_s: float = 120.0
              ) -> Cluster:
        self.redis.start()
        for _ in range(n_workers):
            self.add_worker()
        for _ in range(n_gateways):
            self.add_gateway()
        self.wait_workers(n_workers, timeout_s)
        return self

    def add_gateway(self, options: tuple[str, ...] = ()) -> GatewayProc:
        g = GatewayProc(self.workdir / f"gateway{len(self.gateways)}.log", self.redis.url,
                        self.index, options=self.gateway_options + options,
                        env=self.gateway_env)
        self.gateways.append(g)
        return g.start()

    def add_worker(self, worker_id: str | None = None) -> WorkerProc:
        wid = worker_id or f"w{len(self.workers) + 1}"
        w = WorkerProc(self.workdir / f"{wid}.log", self.redis.url, self.index, wid,
                       lease_ms=self.lease_ms, max_sessions=self.max_sessions,
                       env={"MIDIMATCH_METRICS_PORT": "0", **(self.worker_env or {})})
        self.workers.append(w)
        return w.start()

    def redis_client(self):
        """A synchronous redis-py client of the cluster's Redis (bytes in, bytes out)."""
        import redis

        return redis.Redis.from_url(self.redis.url, socket_timeout=5)

    def alive_workers(self) -> set[str]:
        """Worker ids with a live heartbeat key (``mm:w:{id}``: worker/redis_bus.py)."""
        from worker.redis_bus import RedisBus

        keys, r = RedisBus(self.redis.url), self.redis_client()  # RedisBus: the key names
        try:
            ids = [w.decode() for w in r.smembers(keys.workers_key)]
            return {w for w in ids if r.exists(keys.worker_key(w))}
        finally:
            r.close()

    def wait_workers(self, n: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None and w.proc.returncode != 0:
                    if w.retry_metrics_port():
                        continue
                    if w.worker_id not in self.retired:
                        raise ClusterError(f"worker {w.worker_id} exited:\n{w.tail()}")
            try:
                if len(self.alive_workers()) >= n:
                    return
            except Exception:  # noqa: BLE001 - Redis down for a moment during a fault
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"{n} workers did not come up in {timeout_s:g} s: "
                                   + "; ".join(f"{w.worker_id}: {w.tail(500)}"
                                               for w in self.workers))
            time.sleep(0.2)

    def retire(self, worker: WorkerProc) -> None:
        """Mark a worker as meant to be gone (killed or scaled in on purpose)."""
        self.retired.add(worker.worker_id)

    def processes(self) -> list[Proc]:
        return [self.redis, *self.gateways, *self.workers]

    def tracebacks(self) -> dict[str, list[str]]:
        """Tracebacks per gateway and worker log (Redis has none)."""
        out = {}
        for p in [*self.gateways, *self.workers]:
            tb = p.tracebacks()
            if tb:
                out[p.log.name] = tb
        return out

    def close(self) -> None:
        for p in [*self.gateways, *self.workers, self.redis]:
            with contextlib.suppress(Exception):
                p.kill()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
