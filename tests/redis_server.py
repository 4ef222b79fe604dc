"""A real ``redis-server`` for tests: started on a free port in a temporary folder, killable.

Used by the ``redis_server`` fixture (tests/conftest.py) for the bus contract tests, the gateway
tests and the integration tests, including fault tests (``kill()`` is SIGKILL, ``restart()``
starts a fresh, empty server on the same port, as after a crash without persistence).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

REDIS_BINARY = "redis-server"


class RedisServerError(RuntimeError):
    """The test server could not be started."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int, timeout_s: float = 0.2) -> bool:
    """True when a Redis server on ``port`` answers ``PING`` with ``+PONG``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process without persistence (``--save "" --appendonly no``).

    Parameters
    ----------
    workdir : Path
        Its working directory (logs go to ``workdir/redis.log``).
    port : int | None
        TCP port on 127.0.0.1; a free one when None.
    binary : str | None
        Path of ``redis-server``; found on ``PATH`` when None.

    Attributes
    ----------
    port : int
    url : str
        ``redis://127.0.0.1:{port}/0``.
    """

    def __init__(self, workdir: Path, port: int | None = None, binary: str | None = None) -> None:
        found = binary or shutil.which(REDIS_BINARY)
        if found is None:
            raise RedisServerError(f"{REDIS_BINARY} not found on PATH")
        self.binary = found
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self.running:
            return self
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - owned by the process
        try:
            self._proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                 "--protected-mode", "no"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                raise RedisServerError(f"redis-server exited with {self._proc.returncode}:\n"
                                       f"{tail}")
            if _ping(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server on port {self.port} did not answer PING within "
                               f"{timeout_s} s")

    def kill(self) -> None:
        """SIGKILL, as in a crash (no persistence, so its data is gone)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit within 5 s."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def restart(self, timeout_s: float = 10.0) -> RedisServer:
        """Kill it and start a fresh (empty) server on the same port."""
        self.kill()
        return self.start(timeout_s)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
