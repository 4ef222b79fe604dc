"""The whole stack for end-to-end tests: a small index built here from pieces made in code, a
WAV of one of them, and running ``midimatch`` processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.demo import DemoCollection, read_pieces
from tests.conftest import make_piece

TITLES = ("alpha", "bravo", "charlie", "delta")
TARGET = "charlie"


@pytest.fixture(scope="session")
def collection(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-piece index and a WAV of 20 s of TARGET from 3 s on (rendered like the demo:
    FluidSynth when installed, else a sine synthesiser)."""
    from index.build import BuildOptions, build_index

    root = tmp_path_factory.mktemp("e2e")
    (root / "midi").mkdir()
    for seed, title in enumerate(TITLES):
        make_piece(100 + seed, duration_s=40.0, program=[0, 24, 40, 73][seed]).write(
            str(root / "midi" / f"{title}.mid"))
    build_index(root / "index", [root / "midi"], BuildOptions(workers=1, progress=False))
    demo = DemoCollection(read_pieces(root / "index"))
    piece = next(p for p in demo.pieces if p.title == TARGET)
    wav = asyncio.run(demo.excerpt(piece, 20.0, start_s=3.0)).wav
    (root / "query.wav").write_bytes(wav)
    return root / "index", root / "query.wav"


@contextlib.contextmanager
def running(cmd: list[str], ready_url: str | None = None, timeout_s: float = 180.0
            ) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` (a ``midimatch`` process) until the block ends; with ``ready_url``, first
    wait until it answers ``{"ready": true}``. SIGTERM at the end, SIGKILL if it lingers."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while ready_url is not None:
            if proc.poll() is not None:
                pytest.fail(f"{cmd[3:5]} exited {proc.returncode}: {proc.stdout.read()}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as r:
                    if json.load(r)["ready"]:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{cmd[3:5]} never became ready")
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
