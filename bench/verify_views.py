"""What a second look at the verify's field would buy, per renderer: query phases, a second model.

    python bench/verify_views.py [--eval DIR] [--index DIR] [--weights W] [--second-index DIR]
                                 [--second-weights W] [--renderers a,b] [--rerank 10]
                                 [--cells clean:10,room_noise:10,clean:5] [--max-queries N]
                                 [--json FILE]

The verify ranks the pruned references by hash-DTW of one hash sequence of the query against
theirs. Two cheap second looks, each scored on the same queries, index and prune as the cascade:

* **phases**: the hash network pools four CQT frames into one hash frame, so where the query's
  first frame falls in the reference's grid is chance. The query view is hashed again from its
  2nd, 3rd and 4th frame, each phase verified against the verify's best ``R``, and the mean
  (``phase-mean``) or the least (``phase-min``) of the four costs ranks them.
* **second model** (``--second-index``, an index of the same references built with the other
  weights ``--second-weights``): the hash-DTW costs of both models' hashes are added (the Hamming
  distance of their bits side by side) over the whole verified field (``sum``) or its best
  ``R`` (``sum@R``).

Each row: top-1 of the cascade as shipped, of the verify order, and of each second look, with
the median milliseconds a second look costs per query on one core.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, query_cells, table  # noqa: E402
from model.env import cache_dir  # noqa: E402


def phase_costs(cascade, view: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """(4, R) hash-DTW costs of the query view hashed from each of its first four frames."""
    out = np.empty((4, refs.shape[0]), np.float32)
    out[0] = cascade.verify_scores(cascade.encoder.hashes(view, "audio"), refs)
    for p in range(1, 4):
        out[p] = cascade.verify_scores(cascade.encoder.hashes(view[p:], "audio"), refs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval", type=Path, default=None)
    ap.add_argument("--index", type=Path, default=None)
    ap.add_argument("--weights", type=Path, default=None, help="the index's model (default: "
                    "the shipped one)")
    ap.add_argument("--second-index", type=Path, default=None)
    ap.add_argument("--second-weights", type=Path, default=None)
    ap.add_argument("--renderers", default="")
    ap.add_argument("--rerank", type=int, default=10)
    ap.add_argument("--cells", default="clean:10,room_noise:10,clean:5")
    ap.add_argument("--max-queries", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from bench.engines import query_sets
    from index.search import Cascade

    root = args.eval or cache_dir() / "eval"
    cascade = Cascade.open(args.index or root / "index", weights=args.weights)
    second = (Cascade.open(args.second_index, weights=args.second_weights)
              if args.second_index else None)
    if second is not None:
        where = {r["sha256"]: k for k, r in enumerate(second.index.refs)}
        to_second = np.array([where.get(r["sha256"], -1) for r in cascade.index.refs], np.int64)
        if (to_second < 0).any():
            raise SystemExit(f"{int((to_second < 0).sum())} references of --index are not in "
                             "--second-index: build both from the same files")
    sets = query_sets(root)
    wanted = [r for r in args.renderers.split(",") if r] or list(sets)
    cells = [(c.split(":")[0], float(c.split(":")[1])) for c in args.cells.split(",")]
    R = args.rerank
    cfg = cascade.config
    rows, t_phase, t_second, misses = [], [], [], []
    for name, cond, length, queries, frames, refs_of, sel in query_cells(
            cascade, sets, wanted, cells, args.max_queries):
        hits: dict[str, int] = {"shipped": 0, "verify": 0, "phase-mean": 0, "phase-min": 0}
        if second is not None:
            hits.update({"second": 0, "sum": 0, f"sum@{R}": 0})
        for i in sel:
            f, true = frames[i], refs_of[i]
            code = cascade.encode(f)
            ids, _ = cascade.prune(code.embedding[None], [code.hashes])
            ver = cascade.verify(code.hashes, ids[0])
            # the cascade's answer: confirm on this verify (what search_codes does, without a
            # second verify)
            shipped = cascade.confirm(code.hashes, ids[0], ver, code.n_frames)
            hits["shipped"] += bool(shipped and shipped[0].ref == true)
            hits["verify"] += int(ver.refs[0] == true)
            if ver.refs[0] != true:
                at = np.flatnonzero(ver.refs == true)
                misses.append({
                    "renderer": name, "cell": f"{cond} {length:g} s",
                    "piece": queries[i]["piece"], "start_s": queries[i].get("start_s"),
                    "top1": cascade.title(ver.refs[0]),
                    "true_rank": int(at[0]) + 1 if at.size else None,
                    "gap": (float(ver.scores[at[0]] - ver.scores[0]) if at.size else None)})
            top = ver.refs[:R]
            t0 = time.perf_counter()
            pc = phase_costs(cascade, f[-cfg.query_window_frames:], top)
            t_phase.append(time.perf_counter() - t0)
            hits["phase-mean"] += int(top[int(np.argmin(pc.mean(0)))] == true)
            hits["phase-min"] += int(top[int(np.argmin(pc.min(0)))] == true)
            if second is not None:
                t0 = time.perf_counter()
                q2 = second.encoder.hashes(f[-second.config.query_window_frames:], "audio")
                s2 = second.verify_scores(q2, to_second[ver.refs])
                t_second.append(time.perf_counter() - t0)
                hits["second"] += int(ver.refs[int(np.argmin(s2))] == true)
                fused = ver.scores + s2
                hits["sum"] += int(ver.refs[int(np.argmin(fused))] == true)
                hits[f"sum@{R}"] += int(top[int(np.argmin(fused[:R]))] == true)
        n = max(1, len(sel))
        rows.append({"renderer": name, "cell": f"{cond} {length:g} s", "n": len(sel),
                     **{k: round(100.0 * v / n, 1) for k, v in hits.items()}})
        print(rows[-1], flush=True)
    print(machine())
    print(f"phases at R={R}: {1e3 * np.median(t_phase):.1f} ms per query (median)")
    if t_second:
        print(f"second model over the verified field: {1e3 * np.median(t_second):.1f} ms per "
              "query (median; hashing the query and hash-DTW)")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows, "misses": misses},
                                        indent=1))


if __name__ == "__main__":
    main()
