"""One query's cascade time per stage at 10,000 references, on one core, against chroma + DTW.

    python bench/cascade.py [--refs 10000] [--queries 40] [--baseline-queries 3]
                            [--baseline-refs 500] [--eval DIR] [--renderer NAME]
                            [--compare-hash-prune 0 | --compare-parts 0]

Needs ``midimatch eval prepare`` first (its index and queries). The 10,000 references are the
evaluation index's real MIDI files plus **transposed and tempo-varied variants** of them
(:mod:`model.training.augment_midi`; each file gets the first ``ceil(n / files)`` of ``VARIANTS``:
for
10,000 from 2,055 files that is +1 semitone, tempo ×0.92, −1 semitone, ×1.08), written as
MIDI files under ``$MIDIMATCH_CACHE/bench/variants`` and indexed like any file: distinct
references with real musical content, not copies. The bench index starts as a copy of the eval
index, so only the variants are encoded (resumable).

Timed on one core (torch and numba at 1 thread, BLAS at 1): ``Cascade.search_frames`` of
``--queries`` 10 s clean in-collection queries (a held-out renderer's: TiMidity, or
``--renderer``), one at a time, after one warm-up search; the cascade's own per-stage timings
(encode, prune — the hash prune's and the embedding's together —, verify, confirm). The same
queries are then searched with ``--compare-hash-prune`` references from the hash prune (0: the
embedding prune alone, the cascade before the hash prune), or else with ``--compare-parts``
query parts instead of the cascade's ``prune_parts`` (default 0: the whole window alone,
without the halves), as rows marked so.
The baseline (:class:`index.evaluation.baseline.ChromaMatcher`, subsequence DTW against every
reference)
is timed on ``--baseline-refs`` references only and **extrapolated** to the full collection by
its total number of reference frames (its cost is linear in them); the table says so.
Target: cascade ≤ 50 ms per query at 10,000 references.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table  # noqa: E402
from model.env import cache_dir  # noqa: E402

VARIANTS = (("t", 1), ("x", 0.92), ("t", -1), ("x", 1.08), ("t", 2), ("x", 0.85), ("t", -2),
            ("x", 1.15), ("t", 3), ("t", -3))


def _cache() -> Path:
    return cache_dir()


def write_variants(base: list[str], n: int, out: Path) -> list[str]:
    """``n`` variant files of the ``base`` files: the same number of variants of each file
    (the first ``ceil(n / len(base))`` of ``VARIANTS``), existing files reused."""
    from model.errors import MidimatchError
    from model.midi import load_midi
    from model.training.augment_midi import change_tempo, transpose
    from model.training.midi_writer import write_midi  # ~10x faster than PrettyMIDI.write

    out.mkdir(parents=True, exist_ok=True)
    per_file = min(len(VARIANTS), -(-n // max(1, len(base))))
    paths: list[str] = []
    for src in base:
        pm = None
        for kind, amount in VARIANTS[:per_file]:
            if len(paths) >= n:
                return paths
            dst = out / f"{Path(src).parent.name}__{Path(src).stem}__{kind}{amount}.mid"
            if not dst.is_file():
                try:
                    pm = pm or load_midi(src)
                except MidimatchError:
                    break
                var = transpose(pm, amount) if kind == "t" else change_tempo(pm, amount)
                write_midi(var, dst.with_suffix(".tmp"))
                dst.with_suffix(".tmp").replace(dst)
            paths.append(str(dst))
    return paths


def percentile(x: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(x), q))


def time_queries(cascade, frames: list, truth: list) -> tuple[dict, list, int]:
    """Search each query alone after one warm-up search: (per-stage seconds, ranks of the true
    references, how many misses answered a variant of the true piece)."""
    from index.evaluation.evaluate import rank_in_matches

    cascade.search_frames(frames[0])  # warm-up: numba kernels, torch
    stages: dict[str, list[float]] = {k: [] for k in ("encode", "prune", "verify", "confirm",
                                                      "total")}
    ranks, on_variant = [], 0
    for f, t in zip(frames, truth, strict=True):
        res = cascade.search_frames(f)
        for k in stages:
            stages[k].append(res.timings_s[k])
        ranks.append(rank_in_matches(res.matches, t))
        if ranks[-1] != 1 and res.matches:  # wrong: is it a variant of the true piece?
            stem = Path(cascade.index.refs[t]["path"]).stem
            on_variant += f"{stem}__" in Path(cascade.index.refs[res.matches[0].ref]["path"]).stem
    return stages, ranks, on_variant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval", type=Path, help="eval folder (default $MIDIMATCH_CACHE/eval)")
    ap.add_argument("--refs", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--baseline-queries", type=int, default=3)
    ap.add_argument("--baseline-refs", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2, help="index build workers")
    ap.add_argument("--chunk", type=int, default=1000, help="files added per index generation")
    ap.add_argument("--build-only", action="store_true", help="build the bench index and stop")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--renderer", default=None, help="the queries of this renderer's set "
                    "(`eval prepare --renderers`; default the held-out TiMidity set)")
    ap.add_argument("--compare-hash-prune", type=int, default=-1, metavar="N",
                    help="also time the cascade with N references from the hash prune (0: the "
                    "embedding prune alone, the cascade before 2026-12-04; default -1: do not)")
    ap.add_argument("--compare-parts", type=int, default=0, metavar="N",
                    help="also time the cascade with N query parts (default 0; -1: do not)")
    args = ap.parse_args()

    import numba
    import torch

    from index.build import BuildOptions, build_index
    from index.evaluation.baseline import ChromaMatcher
    from index.evaluation.evalset import load_queries
    from index.evaluation.evaluate import true_refs
    from index.search import Cascade

    ev = args.eval or _cache() / "eval"
    base = json.loads((ev / "collection.json").read_text())["index_files"]
    bench = _cache() / "bench"
    index_dir = bench / "index"
    if not index_dir.exists():
        shutil.copytree(ev / "index", index_dir)
    variants = write_variants(base, max(0, args.refs - len(base)), bench / "variants")
    # in chunks: each chunk writes a generation, so an interrupted build keeps its progress
    files = base + variants
    from index.store import exists, load_index

    have = len(load_index(index_dir).refs) if exists(index_dir) else 0
    first = max(len(base), have) + args.chunk  # chunks already built are not redone
    for stop in range(first, len(files) + args.chunk, args.chunk):
        rep = build_index(index_dir, files[:stop], BuildOptions(workers=args.workers))
        print(f"bench index: {rep['n_refs']} references ({rep['encoded']} encoded now, "
              f"{len(rep['skipped'])} skipped)", file=sys.stderr, flush=True)
        if args.build_only and rep["encoded"] == 0 and stop >= len(files):
            break
    if args.build_only:
        return

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    cascade = Cascade.open(index_dir)
    from index.evaluation.cli import queries_dir

    queries, frames = load_queries(queries_dir(ev, args.renderer))
    pick = [i for i, q in enumerate(queries) if q["kind"] == "in" and q["condition"] == "clean"
            and q["length_s"] == 10.0][: args.queries]
    qs, fs = [queries[i] for i in pick], [frames[i] for i in pick]
    truth = true_refs(cascade.index.refs, qs)
    stages, ranks, on_variant = time_queries(cascade, fs, truth)
    compare, label = None, ""
    if args.compare_hash_prune >= 0 and args.compare_hash_prune != cascade.config.hash_prune:
        compare = time_queries(cascade.with_config(hash_prune=args.compare_hash_prune), fs,
                               truth)
        label = f"hash_prune {args.compare_hash_prune}"
    elif args.compare_parts >= 0 and args.compare_parts != cascade.config.prune_parts:
        compare = time_queries(cascade.with_config(prune_parts=args.compare_parts), fs, truth)
        label = f"prune_parts {args.compare_parts}"

    rng = np.random.default_rng(0)
    sub = np.sort(rng.choice(len(cascade.index), size=min(args.baseline_refs,
                                                          len(cascade.index)), replace=False))
    matcher = ChromaMatcher.build([cascade.index.refs[k]["path"] for k in sub],
                                  bench / f"chroma_{len(sub)}.npz")
    matcher.scores(fs[0][:50])  # warm-up
    base_t = []
    for f in fs[: args.baseline_queries]:
        t0 = time.perf_counter()
        matcher.scores(f)
        base_t.append(time.perf_counter() - t0)
    all_frames = sum(int(r["n_frames"]) for r in cascade.index.refs)
    scale = all_frames / float(matcher.chroma.shape[0])
    n = len(cascade.index)
    parts = cascade.config.prune_parts
    mine = f"prune_parts {parts}, hash_prune {cascade.config.hash_prune}"
    rows = [{"stage": k, "cascade": mine, "median ms": 1000 * float(np.median(v)),
             "p90 ms": 1000 * percentile(v, 90), "queries": len(v), "references": n}
            for k, v in stages.items()]
    if compare is not None:
        rows += [{"stage": k, "cascade": label,
                  "median ms": 1000 * float(np.median(v)), "p90 ms": 1000 * percentile(v, 90),
                  "queries": len(v), "references": n} for k, v in compare[0].items()]
    base_med = float(np.median(base_t))
    rows.append({"stage": f"chroma+DTW, measured on {len(sub)} refs",
                 "median ms": 1000 * base_med, "p90 ms": 1000 * percentile(base_t, 90),
                 "queries": len(base_t), "references": len(sub)})
    rows.append({"stage": f"chroma+DTW, EXTRAPOLATED to {n} refs (x{scale:.1f} frames)",
                 "median ms": 1000 * base_med * scale, "p90 ms": 1000 * percentile(base_t, 90)
                 * scale, "queries": len(base_t), "references": n})
    top1 = float(np.mean([r == 1 for r in ranks]))
    top1_compare = None if compare is None else float(np.mean([r == 1 for r in compare[1]]))
    # numba's OpenMP layer resets the thread count torch shares with it: check it held
    threads = f"torch {torch.get_num_threads()} / numba {numba.get_num_threads()} threads"
    print(f"# Cascade vs chroma + DTW, one query on one core ({threads}) — {machine()}")
    print(f"# 10 s clean queries ({args.renderer or 'timidity-freepats'}, held out); "
          f"top-1 at {n} refs ({mine}): {100 * top1:.1f} % "
          f"({len(ranks)} queries; {on_variant} of the misses answered a transposed or "
          f"tempo-varied variant of the true piece); speed-up vs chroma+DTW "
          f"{base_med * scale / np.median(stages['total']):.0f}x (extrapolated)")
    if compare is not None:
        print(f"# with {label}: top-1 {100 * top1_compare:.1f} %")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "top1": top1, "machine": machine(),
                                         "misses_on_variant": on_variant, "n_refs": n,
                                         "prune_parts": parts, "compare": label,
                                         "hash_prune": cascade.config.hash_prune,
                                         "renderer": args.renderer,
                                         "top1_compare": top1_compare}, indent=1))


if __name__ == "__main__":
    main()
