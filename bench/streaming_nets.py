"""Benchmark: streaming hasher and embedder, batched over B streams, on this machine.

Feeds every stream ``--tick-frames`` new CQT frames per tick (one ``hash_step`` / ``embed_step``
+ ``embeddings`` call per tick for all streams, as the worker does) and prints the compute per
stream per second of audio, against the whole-sequence pass of the same audio (one stream,
``Encoder.hashes`` / ``Encoder.embed``) measured in the same run.

    .venv/bin/python bench/streaming_nets.py [--seconds 20] [--tick-frames 10] [--batch 1 50]
                                             [--threads 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import best_time, machine, table  # noqa: E402
from model.encoder import Encoder  # noqa: E402
from model.features import FRAME_RATE  # noqa: E402
from model.streaming import (  # noqa: E402
    StreamingEmbedder,
    StreamingHasher,
    embed_step,
    embeddings,
    hash_step,
)


def _frames(b: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(b):
        f = rng.random((n, 48)).astype(np.float32)
        out.append(f / np.linalg.norm(f, axis=1, keepdims=True))
    return out


def _stream_hash(enc: Encoder, frames: list[np.ndarray], tick: int) -> None:
    hashers = [StreamingHasher(enc) for _ in frames]
    for t in range(0, len(frames[0]), tick):
        hash_step(enc, hashers, [f[t:t + tick] for f in frames])


def _stream_embed(enc: Encoder, frames: list[np.ndarray], tick: int) -> None:
    embedders = [StreamingEmbedder(enc) for _ in frames]
    for t in range(0, len(frames[0]), tick):
        embed_step(enc, embedders, [f[t:t + tick] for f in frames])
        embeddings(enc, embedders)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="audio per stream")
    p.add_argument("--tick-frames", type=int, default=10, help="new frames per stream per tick")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 50])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    enc = Encoder.load()
    n = int(round(args.seconds * FRAME_RATE))
    audio_s = n / FRAME_RATE
    one = _frames(1, n)[0]

    def whole_hash() -> None:
        enc.hashes(one, "audio")

    def whole_embed() -> None:  # one embedding per tick over the last window, offline
        for t in range(max(2, args.tick_frames), n + 1, args.tick_frames):
            enc.embed(one[max(0, t - enc.window.length):t], "audio")

    base = {"hash": best_time(whole_hash, args.repeat) / audio_s,
            "embed": best_time(whole_embed, args.repeat) / audio_s}
    rows = []
    for name, fn in (("hash", _stream_hash), ("embed", _stream_embed)):
        rows.append({"net": name, "mode": "whole pass, B=1", "B": 1,
                     "ms per stream per audio s": 1000 * base[name],
                     "streams real-time per core": 1 / base[name] / args.threads,
                     "vs whole pass": 1.0})
        for b in args.batch:
            frames = _frames(b, n)
            per = best_time(lambda fn=fn, frames=frames: fn(enc, frames, args.tick_frames),
                            args.repeat) / (b * audio_s)
            rows.append({"net": name, "mode": f"streaming, tick {args.tick_frames} frames",
                         "B": b, "ms per stream per audio s": 1000 * per,
                         "streams real-time per core": 1 / per / args.threads,
                         "vs whole pass": per / base[name]})
    print(f"# streaming nets — {machine()}, torch threads {args.threads}, model {enc.model_id}, "
          f"{audio_s:.1f} s per stream, tick {args.tick_frames} frames "
          f"({1000 * args.tick_frames / FRAME_RATE:.0f} ms)")
    print("# 'whole pass' embed = Encoder.embed of the last window once per tick")
    print(table(rows))


if __name__ == "__main__":
    main()
