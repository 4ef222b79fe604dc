"""Where each prune keeps the right piece: the embedding, the coarse hash-DTW, the cascade's mix.

    python bench/prune_recall.py [--renderers a,b] [--lengths 10] [--conditions clean,room_noise]
                                 [--factors 6] [--ks 1,10,100,300] [--json FILE]

For every in-collection query of the prepared evaluation sets (``midimatch eval prepare
--renderers ...``; one set per renderer, the same pieces) the rank of the true reference among
all references of the evaluation index

* by the **embedding prune** (:class:`index.prune.EmbeddingPruner`, the query's views as the
  cascade embeds them),
* by the **coarse hash-DTW prune** (:class:`index.hash_prune.HashPruner`, the query's last
  ``hash_prune_s``, for each ``--factors`` value),

and whether the **cascade's prune** (:meth:`index.search.Cascade.prune`: the hash prune's
``hash_prune`` nearest, then the embedding's, ``top_k`` in all) keeps it. One row per renderer,
condition and length: recall@K of each (% of in-collection queries whose piece is among the K
nearest), and the median milliseconds per query of each prune (one thread, this machine, this
collection; both are linear in the collection). Not a timing benchmark: ``bench/cascade.py``
times the stages at 10,000 references.
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
from bench.engines import query_sets  # noqa: E402
from model.env import cache_dir  # noqa: E402


def ranks_of(scores: np.ndarray, true_ref: int) -> int:
    """0-based rank of ``true_ref`` when references are sorted by (score, reference number)."""
    s = scores[true_ref]
    return int(np.sum(scores < s) + np.sum(scores[:true_ref] == s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval", type=Path, help="eval folder (default $MIDIMATCH_CACHE/eval)")
    ap.add_argument("--renderers", default="", help="only these (default: every query set)")
    ap.add_argument("--lengths", default="10")
    ap.add_argument("--conditions", default="clean,room_noise")
    ap.add_argument("--factors", default="6", help="hash frames per coarse frame, to compare")
    ap.add_argument("--ks", default="1,10,100,300")
    ap.add_argument("--max-pieces", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import numba
    import torch

    from index.cascade_types import FRAME_RATE_HZ
    from index.evaluation.evalset import load_queries, select_queries
    from index.evaluation.evaluate import true_refs
    from index.search import Cascade

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    root = args.eval or cache_dir() / "eval"
    sets = query_sets(root)
    wanted = [x for x in args.renderers.split(",") if x] or list(sets)
    missing = [x for x in wanted if x not in sets]
    if missing:
        sys.exit(f"no query set for {missing} under {root}: run `midimatch eval prepare "
                 f"--renderers {','.join(missing)}`")
    cascade = Cascade.open(root / "index")
    cfg = cascade.config
    factors = [int(x) for x in args.factors.split(",") if x]
    ks = [int(x) for x in args.ks.split(",") if x]
    n_hash = max(1, int(round(cfg.hash_prune_s * FRAME_RATE_HZ / 4)))
    rows = []
    for name in wanted:
        queries, frames = load_queries(sets[name])
        keep = [i for i in select_queries(queries, lengths={float(x) for x in
                                                            args.lengths.split(",") if x},
                                          conditions={x for x in args.conditions.split(",")
                                                      if x}, max_pieces=args.max_pieces)
                if queries[i]["kind"] == "in"]
        truth = true_refs(cascade.index.refs, [queries[i] for i in keep])
        cells: dict[tuple[str, float], dict[str, list]] = {}
        for i, tr in zip(keep, truth, strict=True):
            if tr is None:
                continue
            q = queries[i]
            c = cells.setdefault((q["condition"], q["length_s"]),
                                 {"embed": [], "mix": [], "ms embed": [],
                                  **{f"hash/{f}": [] for f in factors},
                                  **{f"ms hash/{f}": [] for f in factors}})
            code = cascade.encode(frames[i])
            t = time.perf_counter()
            d = cascade.pruner.reference_distances(code.embedding[None])[0]
            c["ms embed"].append(1000 * (time.perf_counter() - t))
            c["embed"].append(ranks_of(d, tr))
            for f in factors:
                pruner = cascade.with_config(hash_prune_factor=f).hash_pruner
                t = time.perf_counter()
                s = pruner.scores(code.hashes[-n_hash:], penalty=cascade.penalty,
                                  gully=cfg.gully)
                c[f"ms hash/{f}"].append(1000 * (time.perf_counter() - t))
                c[f"hash/{f}"].append(ranks_of(s, tr))
            ids, _ = cascade.prune(code.embedding[None], [code.hashes])
            c["mix"].append(0 if tr in ids[0] else 10**9)
        for (cond, length), c in sorted(cells.items()):
            row = {"renderer": name, "condition": cond, "length s": length,
                   "n": len(c["embed"])}
            for k in ks:
                row[f"embed@{k}"] = round(100 * float(np.mean(np.array(c["embed"]) < k)), 1)
                for f in factors:
                    row[f"hash/{f}@{k}"] = round(
                        100 * float(np.mean(np.array(c[f"hash/{f}"]) < k)), 1)
            row[f"cascade ({cfg.hash_prune}+{cfg.top_k - cfg.hash_prune})"] = round(
                100 * float(np.mean(np.array(c["mix"]) == 0)), 1)
            row["ms embed"] = round(float(np.median(c["ms embed"])), 2)
            for f in factors:
                row[f"ms hash/{f}"] = round(float(np.median(c[f"ms hash/{f}"])), 2)
            rows.append(row)
        print(f"{name}: {len(keep)} queries", file=sys.stderr)
    print(f"# prune recall — {machine()}; model {cascade.encoder.model_id}, "
          f"{len(cascade.index):,} references; hash prune on the last {cfg.hash_prune_s:g} s; "
          f"% of in-collection queries whose piece is among the K nearest")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows,
                                         "model_id": cascade.encoder.model_id,
                                         "n_refs": len(cascade.index)}, indent=1))


if __name__ == "__main__":
    main()
