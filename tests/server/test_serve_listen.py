"""``midimatch serve`` where it cannot listen: a port in use, a port out of range. The real CLI in a
subprocess: a one-line error and a non-zero exit, no traceback, at once; and (in process) the
embedded worker is never started when the port cannot be had."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from server.serve_cli import ListenError, serve
from server.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[2]
PROMPT_S = 60  # "at once": far under this on a loaded 2-core machine; hangs are what it catches


def tiny_index(tmp_path: Path) -> Path:
    """Just what the demo collection reads (CURRENT and refs.jsonl): never loaded as an index,
    since the worker must not start when the gateway cannot listen."""
    root = tmp_path / "index"
    (root / "gen-1").mkdir(parents=True)
    (root / "CURRENT").write_text("gen-1\n")
    (root / "gen-1" / "refs.jsonl").write_text(json.dumps(
        {"path": str(tmp_path / "a.mid"), "title": "A", "duration_s": 30.0}) + "\n")
    return root


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "serve", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=PROMPT_S,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def busy_port():
    """A port this test listens on (as a first ``midimatch serve`` would)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def assert_clean_failure(r: subprocess.CompletedProcess, *expected: str) -> str:
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "Traceback" not in out, out
    lines = r.stderr.strip().splitlines()
    for text in expected:
        assert text in lines[-1], out
    return lines[-1]


def test_a_port_in_use_is_one_clear_line_and_nothing_starts(busy_port, tmp_path):
    """`make serve` twice: the embedded mode (no Redis), the worker is not started."""
    r = run_serve("--index", str(tiny_index(tmp_path)), "--port", str(busy_port))
    line = assert_clean_failure(r, f"cannot listen on 127.0.0.1:{busy_port}",
                                "address already in use", "--port")
    assert line.startswith("midimatch: error:") and r.returncode == 2
    assert "serving on" not in r.stderr


@pytest.mark.parametrize("args, env", [
    (["--port", "99999"], {}),
    (["--port", "0"], {}),
    (["--port", "eighty"], {}),
    ([], {"MIDIMATCH_PORT": "70000"}),
])
def test_a_port_out_of_range_is_refused_before_anything(args, env):
    r = run_serve("--redis", "redis://x", *args, env=env)
    line = assert_clean_failure(r, "port")
    assert "1-65535" in line or "not a port number" in line, line
    assert "OverflowError" not in r.stderr and r.returncode == 2


def test_settings_refuse_a_port_out_of_range():
    for port in (0, -1, 65536, 99999):
        with pytest.raises(SettingsError, match="port must be 1-65535"):
            Settings(port=port)
    assert Settings(port=65535).port == 65535 and Settings(port=1).port == 1


def test_the_embedded_worker_starts_only_once_listening(busy_port, tmp_path, monkeypatch):
    import worker.runner

    started = []

    async def run_embedded(*args, **kw):  # stands for the worker (loads the index and model)
        started.append(args)

    monkeypatch.setattr(worker.runner, "run_embedded", run_embedded)
    settings = Settings(index_dir=tiny_index(tmp_path), port=busy_port)
    with pytest.raises(ListenError, match="address already in use") as e:
        asyncio.run(serve(settings))
    assert e.value.reason == "cannot_listen" and isinstance(e.value.__cause__, OSError)
    assert started == []

    # the same, on a free port: listening, then the worker starts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]

    async def serve_briefly() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(serve(settings.with_(port=free), stop=stop))
        for _ in range(500):
            if started:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(serve_briefly())
    assert len(started) == 1


def test_the_banner_does_not_show_the_redis_password(tmp_path):
    """The gateway's start-up line names the Redis it uses; a password from a Secret in the URL
    must not reach the pods' logs (it did until 2026-12-05)."""
    from tests.redis_server import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port),
         "--redis", f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = ""
        for line in proc.stdout:  # until the banner (the process serves until terminated)
            out += line
            if "serving on" in line:
                break
    finally:
        proc.terminate()
        out += proc.communicate(timeout=PROMPT_S)[0]
    assert "serving on" in out and "workers via redis://:***@127.0.0.1:" in out, out
    assert "s3cret-pw" not in out, out
