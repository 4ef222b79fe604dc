"""How many concurrent real-time streams one engine sustains, and what each costs.

    python bench/streams.py [--sessions 1,10,25,50,75,100] [--seconds 20] [--chunk-s 0.1]
                            [--rate 22050] [--index DIR] [--refs 10000] [--json FILE]
                            [--prune-parts N] [--hash-prune N]

One :class:`worker.engine.Engine` (the default settings: 10 s window, a result per 1 s of audio,
top 100 pruned, top 5 confirmed) against an index of ``--refs`` references: by default the one
``bench/cascade.py`` builds (``$MIDIMATCH_CACHE/bench/index``: real MIDI plus transposed and
tempo-varied variants); without it, one built here from ``midimatch data generate`` songs and
their variants (``$MIDIMATCH_CACHE/bench/streams-index``).

Each level runs ``N`` sessions for ``--seconds`` of audio in real time: every session gets a
``--chunk-s`` chunk of its excerpt (from a pool of pre-rendered excerpts of indexed pieces) each
``chunk-s`` of wall time, the sessions' phases spread over one chunk and their start times over
one result period (as independent clients would be); the loop feeds whatever has arrived, then
runs one tick, as the worker's runner does. **Update latency** = the arrival of the chunk that
completes a result → the end of the tick that returns it (the engine's own
``update_seconds`` histogram measures the same, in buckets; here each result is timed exactly).
A level is **sustained** when p99 ≤ 250 ms, no audio is dropped and the lag at the end is under
one chunk. CPU: process CPU time inside ``tick`` (all threads) per second of stream audio, and
the engine's per-stage wall time per second of stream audio (``stage_seconds`` sums). Memory:
process RSS growth per open session at the level's end (everything the sessions allocated:
state, caches, allocator slack) and the engine's own ``nbytes`` per session.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table  # noqa: E402
from model.env import cache_dir

TARGET_P99_S = 0.25


def _cache() -> Path:
    return cache_dir()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_index(path: Path | None, n_refs: int, workers: int = 2) -> Path:
    """The index to run against (see the module docstring), built here when missing.

    The one built here (``$MIDIMATCH_CACHE/bench/streams-index``) starts as a copy of the
    evaluation index (``midimatch eval prepare``: 2,055 real MIDI files, already encoded), adds
    the transposed / tempo-varied variants ``bench/cascade.py`` has written so far (read only),
    and tops up to ``n_refs`` with generated songs of its own (seeds from 100,000, in
    ``$MIDIMATCH_CACHE/bench/streams-songs``). Re-running reuses everything already encoded.
    """
    import json
    import shutil

    from index import store
    from index.build import BuildOptions, build_index
    from model.training.songgen_files import generate_songs

    if path is not None:
        return path
    shared = _cache() / "bench" / "index"
    if store.exists(shared) and len(store.load_index(shared).refs) >= n_refs:
        return shared
    own = _cache() / "bench" / "streams-index"
    if store.exists(own) and len(store.load_index(own).refs) >= n_refs:
        return own
    ev = _cache() / "eval"
    files: list[str] = []
    if (ev / "collection.json").is_file():
        files = json.loads((ev / "collection.json").read_text())["index_files"]
        if not own.exists() and store.exists(ev / "index"):
            shutil.copytree(ev / "index", own)
    variants = sorted(str(p) for p in (_cache() / "bench" / "variants").glob("*.mid"))
    files += variants[: max(0, n_refs - len(files))]
    songs = generate_songs(_cache() / "bench" / "streams-songs", max(0, n_refs - len(files)),
                           start_seed=100_000, workers=workers)
    files += [str(p) for p in songs]
    rep = build_index(own, files, BuildOptions(workers=workers))
    print(f"# built {own}: {rep['n_refs']} references ({rep['encoded']} encoded now, "
          f"{len(variants)} variants available, {len(songs)} own songs, "
          f"{len(rep['skipped'])} skipped)", file=sys.stderr)
    return own


def excerpts(cascade, n: int, seconds: float, rate: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` excerpts of indexed pieces, ``seconds`` long, mono float32 at ``rate``."""
    from model.errors import MidimatchError
    from model.midi import load_midi
    from model.training.render import available, render

    renderer = "fluid-fluidr3" if available("fluid-fluidr3") else "sine"
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for k in rng.permutation(len(cascade.index)):
        ref = cascade.index.refs[int(k)]
        if float(ref.get("duration_s", 0)) < seconds + 10:
            continue
        try:
            audio = render(load_midi(ref["path"]), renderer, sample_rate=rate)
        except (MidimatchError, OSError):
            continue
        start = int(5 * rate)
        clip = audio[start:start + int(seconds * rate)]
        if clip.shape[0] == int(seconds * rate):
            out.append(clip.astype(np.float32))
        if len(out) == n:
            break
    return out


def run_level(cascade, n: int, pool: list[np.ndarray], seconds: float, chunk_s: float,
              rate: int) -> dict:
    """Run ``n`` real-time sessions for ``seconds`` of audio; the row of the table."""
    from worker.bus import StreamParams
    from worker.engine import Engine
    from worker.engine_settings import EngineSettings
    from worker.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    eng = Engine(cascade, EngineSettings(max_sessions=max(64, n)), metrics)
    rss0 = rss_bytes()
    chunk = int(chunk_s * rate)
    n_chunks = int(seconds / chunk_s)
    rng = np.random.default_rng(n)
    # session i starts at start[i] (spread over one result period) + phase within a chunk
    start = rng.uniform(0, 1.0, n)
    for i in range(n):
        eng.open(f"s{i}", StreamParams(rate))
    t0 = time.monotonic() + 0.05
    cpu_s = 0.0  # process CPU time inside tick(), all threads
    fed = np.zeros(n, np.int64)  # chunks fed per session
    latencies: list[float] = []
    tick_s: list[float] = []
    results = 0
    end_at = t0 + start.max() + n_chunks * chunk_s
    while True:
        now = time.monotonic()
        due = np.minimum(n_chunks, np.floor((now - t0 - start) / chunk_s).astype(np.int64) + 1)
        for i in np.flatnonzero(due > fed):
            clip = pool[i % len(pool)]
            for c in range(fed[i], due[i]):
                arrived = t0 + start[i] + c * chunk_s
                eng.feed(f"s{i}", clip[c * chunk:(c + 1) * chunk, None], received_at=arrived)
            fed[i] = due[i]
        a, c0 = time.perf_counter(), time.process_time()
        out = eng.tick()
        tick_s.append(time.perf_counter() - a)
        cpu_s += time.process_time() - c0
        done = time.monotonic()
        for sid, r in out:
            i = int(sid[1:])
            # the chunk that completed this result: the one holding its last sample
            c = int(np.ceil(round(r["audio_s"] / chunk_s, 6))) - 1
            latencies.append(done - (t0 + start[i] + c * chunk_s))
        results += len(out)
        if (fed == n_chunks).all() and now > end_at and eng.lag_s() == 0.0:
            break
        if now > end_at + 30:  # hopelessly behind: stop and report it
            break
        if not out and (fed == due).all():
            time.sleep(0.002)
    lag = eng.lag_s()
    per_session = [eng.nbytes(f"s{i}") for i in range(n)]
    rss = rss_bytes() - rss0
    lat = np.asarray(latencies)
    dropped = metrics.errors_total.labels("audio_dropped")._value.get()
    p99 = float(np.percentile(lat, 99)) if lat.size else float("inf")
    ok = p99 <= TARGET_P99_S and dropped == 0 and lag <= chunk_s
    for i in range(n):
        eng.drop(f"s{i}")
    wall = max(1e-9, time.monotonic() - t0)
    audio_s = n * n_chunks * chunk_s
    stage = {k: 1000 * metrics.stage_seconds.labels(k)._sum.get() / audio_s
             for k in ("features", "networks", "prune", "verify", "confirm")}
    return {
        "sessions": n, "results": results,
        "p50 ms": 1000 * float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p95 ms": 1000 * float(np.percentile(lat, 95)) if lat.size else float("nan"),
        "p99 ms": 1000 * p99,
        "tick ms (max)": 1000 * float(np.max(tick_s)),
        "audio s/s": audio_s / wall,
        "CPU ms per stream-s": 1000 * cpu_s / audio_s,
        **{f"{k} ms/s": v for k, v in stage.items()},
        "degraded ticks": int(metrics.degraded_ticks_total._value.get()),
        "lag s (end)": lag, "dropped": int(dropped),
        "RSS MB/session": rss / n / 1e6,
        "nbytes KB/session": float(np.mean(per_session)) / 1e3,
        "sustained": "yes" if ok else "no",
    }


def traced_per_session(cascade, pool: list[np.ndarray], rate: int, n: int = 10,
                       seconds: float = 15.0) -> tuple[float, float, dict]:
    """Bytes per session that tracemalloc sees (Python and numpy allocations, not torch's),
    the engine's ``nbytes``, and its mean parts, after ``seconds`` of audio through ``n``
    sessions."""
    import tracemalloc

    from worker.bus import StreamParams
    from worker.engine import Engine
    from worker.engine_settings import EngineSettings
    from worker.session import _cqt_nbytes

    eng = Engine(cascade, EngineSettings(tick_budget_s=3600.0))
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(n):
        eng.open(f"t{i}", StreamParams(rate))
    step = int(0.1 * rate)
    for c in range(int(seconds / 0.1)):
        for i in range(n):
            eng.feed(f"t{i}", pool[i % len(pool)][c * step:(c + 1) * step, None])
        eng.tick()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    traced = sum(d.size_diff for d in after.compare_to(before, "filename"))
    sessions = [eng._sessions[f"t{i}"] for i in range(n)]
    parts = {"DP rows": np.mean([s.dtw._tops.nbytes for s in sessions]),
             "column history": np.mean([s.dtw._cols.nbytes for s in sessions]),
             "CQT buffers": np.mean([_cqt_nbytes(s.cqt) for s in sessions]),
             "networks": np.mean([s.hasher.nbytes + s.embedder.nbytes for s in sessions])}
    return traced / n, float(np.mean([s.nbytes for s in sessions])), parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default="1,10,25,50,75,100")
    ap.add_argument("--seconds", type=float, default=20.0, help="audio per session and level")
    ap.add_argument("--chunk-s", type=float, default=0.1)
    ap.add_argument("--rate", type=int, default=22050, help="the clients' sample rate, Hz")
    ap.add_argument("--index", type=Path)
    ap.add_argument("--refs", type=int, default=10_000)
    ap.add_argument("--excerpts", type=int, default=8)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--prepare", action="store_true", help="only build the index, then exit")
    ap.add_argument("--prune-parts", type=int, metavar="N",
                    help="query parts pruned beside the window (default: the cascade's, 2)")
    ap.add_argument("--hash-prune", type=int, metavar="N",
                    help="references from the coarse hash-DTW prune (default: the cascade's, "
                    "all 300; 0: the embedding prune alone, the cascade before 2026-12-04)")
    args = ap.parse_args()

    from index.cascade_types import CascadeConfig
    from index.search import Cascade

    index_dir = bench_index(args.index, args.refs)
    if args.prepare:
        return
    t = time.perf_counter()
    rss_before = rss_bytes()
    config = CascadeConfig(**{k: v for k, v in (("prune_parts", args.prune_parts),
                                                 ("hash_prune", args.hash_prune))
                              if v is not None})
    cascade = Cascade.open(index_dir, config=config)
    load_s = time.perf_counter() - t
    pool = excerpts(cascade, args.excerpts, args.seconds, args.rate)
    if not pool:
        sys.exit("no excerpt could be rendered")
    run_level(cascade, 1, pool, 3.0, args.chunk_s, args.rate)  # warm-up: numba, torch
    shared_mb = (rss_bytes() - rss_before) / 1e6
    rows = []
    for n in (int(x) for x in args.sessions.split(",")):
        rows.append(run_level(cascade, n, pool, args.seconds, args.chunk_s, args.rate))
        print(json.dumps(rows[-1]), file=sys.stderr)
    traced, nbytes, parts = traced_per_session(cascade, pool, args.rate)
    best = max((r["sessions"] for r in rows if r["sustained"] == "yes"), default=0)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"# Streams on one engine — {machine()}; load average at the end {' '.join(load)}")
    print(f"# index {index_dir} ({len(cascade.index)} refs, opened in {load_s:.1f} s; "
          f"index + models + warm-up RSS {shared_mb:.0f} MB); {args.rate} Hz mono, "
          f"{args.chunk_s * 1000:.0f} ms chunks, {args.seconds:.0f} s per session, "
          f"prune_parts {cascade.config.prune_parts}, hash_prune {cascade.config.hash_prune}")
    print(f"# most sessions sustained (p99 <= {TARGET_P99_S * 1000:.0f} ms, no drop, no lag): "
          f"{best}; per session after 15 s: tracemalloc {traced / 1e6:.2f} MB, "
          f"nbytes {nbytes / 1e6:.2f} MB (" + ", ".join(f"{k} {v / 1e6:.2f}"
                                                          for k, v in parts.items()) + ")")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "machine": machine(), "load": load,
                                         "index": str(index_dir), "refs": len(cascade.index),
                                         "best": best, "traced_per_session": traced,
                                         "nbytes_per_session": nbytes}, indent=1))


if __name__ == "__main__":
    main()
