"""Redis memory per active session: the retained audio window plus the results kept for resuming.

For each configuration, N sessions each receive real-time chunks for 1.5 × the retained window
(so trimming is in its steady state) and a full results stream (``max_results`` results of 5
matches each); the figure is Redis's ``INFO memory`` ``used_memory`` after, minus before, over N.
A fresh ``redis-server`` (no persistence) is started on a free port for the run.

    python bench/bus_memory.py [--sessions 50]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, table  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from worker.bus import AudioChunk, StreamParams  # noqa: E402
from worker.redis_bus import RedisBus  # noqa: E402

# (sample rate Hz, chunk s, retained s, sessions factor, Redis stream-node-max-bytes)
DEFAULT_NODE = 4096  # Redis's default: a 100 ms chunk fills a node, each node rounds up
CONFIGS = [(16000, 0.1, 20.0, 1.0, DEFAULT_NODE), (22050, 0.1, 20.0, 1.0, DEFAULT_NODE),
           (22050, 0.1, 30.0, 1.0, DEFAULT_NODE), (22050, 0.02, 20.0, 0.4, DEFAULT_NODE),
           (44100, 0.1, 20.0, 1.0, DEFAULT_NODE), (48000, 0.1, 20.0, 1.0, DEFAULT_NODE),
           (22050, 0.1, 20.0, 1.0, 65536), (22050, 0.1, 30.0, 1.0, 65536),
           (48000, 0.1, 20.0, 1.0, 65536)]
MAX_RESULTS = 120


def result_body(i: int) -> dict:
    """A typical periodic result: 5 matches, a decision."""
    m = [{"id": f"{k:016x}", "title": f"Some piece title number {k}", "confidence": 0.8123,
          "score": 41.25, "position_s": 12.345} for k in range(5)]
    return {"audio_s": float(i), "lag_s": 0.05, "final": False, "matches": m,
            "decision": {k: m[0][k] for k in ("id", "title", "confidence", "position_s")}}


async def used(bus: RedisBus) -> int:
    return int((await bus.r.info("memory"))["used_memory"])


async def measure(url: str, n: int, rate: int, chunk_s: float, retain_s: float,
                  node_bytes: int) -> dict:
    bus = RedisBus(url, retain_s=retain_s, max_results=MAX_RESULTS)
    try:
        await bus.r.flushall()
        await bus.r.config_set("stream-node-max-bytes", node_bytes)
        await bus.heartbeat("bench", n)
        before = await used(bus)
        params = StreamParams(rate)
        sids = [await bus.create_session(params) for _ in range(n)]
        await bus.claim("bench", n)
        samples = int(round(chunk_s * rate))
        pcm = (np.random.default_rng(0).standard_normal(samples) * 3000).astype("<i2").tobytes()
        n_chunks = int(1.5 * retain_s / chunk_s)
        for k in range(n_chunks):
            await asyncio.gather(*(bus.push_audio(s, AudioChunk(k, k * chunk_s, pcm))
                                   for s in sids))
        for i in range(MAX_RESULTS + 10):
            await asyncio.gather(*(bus.publish_result(s, result_body(i)) for s in sids))
        after = await used(bus)
        kept = await bus.r.xlen(bus.audio_key(sids[0]))
        audio_mem = await bus.r.memory_usage(bus.audio_key(sids[0]), samples=0)
        results_mem = await bus.r.memory_usage(bus.results_key(sids[0]), samples=0)
    finally:
        await bus.close()
    raw = kept * len(pcm)
    return {"rate Hz": rate, "chunk ms": int(chunk_s * 1000), "retain s": retain_s,
            "node max bytes": node_bytes,
            "sessions": n, "chunks kept": kept, "raw PCM kept MB": round(raw / 1e6, 3),
            "audio key MB": round(audio_mem / 1e6, 3),
            "results key MB": round(results_mem / 1e6, 3),
            "used_memory / session MB": round((after - before) / n / 1e6, 3)}


async def main_async(n: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        return [await measure(server.url, max(1, int(n * f)), rate, chunk_s, retain_s, node)
                for rate, chunk_s, retain_s, f, node in CONFIGS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=50, help="sessions per configuration")
    args = ap.parse_args()
    rows = asyncio.run(main_async(args.sessions))
    print(f"# Redis memory per active session (s16 mono, {MAX_RESULTS} results kept) — "
          f"{machine()}")
    print(table(rows))


if __name__ == "__main__":
    main()
