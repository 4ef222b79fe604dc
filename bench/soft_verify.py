"""What a soft (asymmetric) rerank of the verify's best would buy, per renderer.

    python bench/soft_verify.py [--renderers a,b] [--eval DIR] [--index DIR] [--rerank 5,10,30]
                                [--cells clean:10,room_noise:10,clean:5] [--max-queries N]

The verify compares the query's *bits* with the reference's bits (Hamming). The query side is
computed at search time, so its network outputs (tanh units in (-1, 1)) are at hand: a unit
near 0 is a bit the network is unsure of, and on sound it never heard there are more of those.
The asymmetric distance keeps that: ``d(i, j) = sum_k (1 - a_ik s_jk) / 2`` with ``s = ±1`` the
reference's bits (the Hamming distance when every ``|a| = 1``). Float DTW costs ~150x hash-DTW,
so it reranks only the verify's best ``R``. Each row: top-1 of the cascade as shipped, of the
verify order, and of the rerank at each R — same queries, same index, same prune.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, query_cells, table  # noqa: E402
from model.env import cache_dir  # noqa: E402


def soft_cost(act: np.ndarray, ref_hashes: np.ndarray) -> np.ndarray:
    """(M, B) tanh outputs and (N,) packed reference hashes → (M, N) asymmetric distances."""
    from model.bits import unpack_bits

    s = unpack_bits(np.asarray(ref_hashes)).astype(np.float32) * 2.0 - 1.0  # (N, B)
    return (act.shape[1] - act @ s.T) / 2.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval", type=Path, default=None)
    ap.add_argument("--index", type=Path, default=None)
    ap.add_argument("--renderers", default="")
    ap.add_argument("--rerank", default="5,10,30")
    ap.add_argument("--cells", default="clean:10,room_noise:10,clean:5")
    ap.add_argument("--max-queries", type=int, default=0)
    ap.add_argument("--power", type=float, default=1.0,
                    help="a -> sign(a) |a|^p before the distance (p=0: Hamming)")
    args = ap.parse_args()

    from bench.engines import query_sets
    from index.align import align_cost_matrix
    from index.search import Cascade

    root = args.eval or cache_dir() / "eval"
    cascade = Cascade.open(args.index or root / "index")
    sets = query_sets(root)
    wanted = [r for r in args.renderers.split(",") if r] or list(sets)
    cells = [(c.split(":")[0], float(c.split(":")[1])) for c in args.cells.split(",")]
    ranks = [int(r) for r in args.rerank.split(",")]
    cfg = cascade.config
    rows = []
    t_soft = []
    for name, cond, length, _queries, frames, refs_of, sel in query_cells(
            cascade, sets, wanted, cells, args.max_queries):
        hits = {"shipped": 0, "verify": 0, **{f"R={r}": 0 for r in ranks}}
        for i in sel:
            f = frames[i]
            code = cascade.encode(f)
            view = f[-cfg.query_window_frames:]
            act = cascade.encoder.hash_activations(view, "audio")
            if args.power != 1.0:
                act = np.sign(act) * np.abs(act) ** args.power
            ids, _ = cascade.prune(code.embedding[None], [code.hashes])
            ver = cascade.verify(code.hashes, ids[0])
            # the cascade's answer: confirm on this verify (what search_codes does, without a
            # second verify)
            shipped = cascade.confirm(code.hashes, ids[0], ver, code.n_frames)
            true = refs_of[i]
            hits["shipped"] += bool(shipped and shipped[0].ref == true)
            hits["verify"] += int(ver.refs[0] == true)
            t0 = time.perf_counter()
            soft = []
            for k in ver.refs[: max(ranks)]:
                cost = soft_cost(act, cascade.index.hash_sequence(int(k)))
                al = align_cost_matrix(cost, penalty=float(cascade.penalty), gully=cfg.gully)
                soft.append(al.score / al.query_idx.shape[0])
            t_soft.append(time.perf_counter() - t0)
            soft = np.asarray(soft)
            for r in ranks:
                best = int(ver.refs[int(np.argmin(soft[:r]))])
                hits[f"R={r}"] += int(best == true)
        n = max(1, len(sel))
        rows.append({"renderer": name, "cell": f"{cond} {length:g} s", "n": len(sel),
                     **{k: round(100.0 * v / n, 1) for k, v in hits.items()}})
        print(rows[-1], flush=True)
    print(machine())
    print(f"soft rerank of the best {max(ranks)}: {1e3 * np.median(t_soft):.1f} ms per query "
          "(median, one core, align_cost_matrix)")
    print(table(rows))


if __name__ == "__main__":
    main()
