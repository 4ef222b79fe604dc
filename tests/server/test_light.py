"""The gateway never imports torch or numba, not even transitively (fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
from server.app import create_app
from server.settings import Settings
from worker.redis_bus import RedisBus
import server.client, server.demo, server.serve_cli
from model.midi import load_midi  # what server.demo reads an excerpt's MIDI with, at run time
from server.cli import build_parser
build_parser().parse_args(["serve", "--redis", "redis://127.0.0.1:1/0"])
app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"), RedisBus("redis://127.0.0.1:1/0"))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numba", "torchaudio"))
print("HEAVY", heavy)
"""


def test_gateway_imports_neither_torch_nor_numba():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "HEAVY []" in out, out
