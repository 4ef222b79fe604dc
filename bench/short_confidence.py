"""How well one result's evidence separates right answers from outsiders on short queries.

    python bench/short_confidence.py [--lengths 2,3,4,5,6,8,10] [--index DIR] [--queries DIR]

Takes the 10 s clips of the evaluation set (``midimatch eval prepare``), clean and room + noise,
in and out of the collection, cuts each to its last L seconds (a live stream at L seconds has
exactly these frames), and runs prune + hash-DTW with the shipped cascade. For each evidence
function of the sorted candidate scores, it sets one threshold per length at the 99th percentile
of the outsiders' top-1 evidence (1 % of them confident) and reports the share of in-collection
queries whose top-1 is right *and* over it. ``current`` is :func:`index.confirm.margin_confidence`'s
evidence (:func:`index.confirm.margin_evidence`, before the monotone logistic map, which does not
change the ranking); the others are
alternatives measured against it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table  # noqa: E402
from index.confirm import FIELD_SKIP, margin_evidence  # noqa: E402
from model.env import cache_dir


def _field(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: median and standard deviation of the field (ranks FIELD_SKIP on)."""
    f = s[:, FIELD_SKIP:]
    return np.median(f, axis=1), np.maximum(f.std(axis=1), 1e-9)


def _current(s: np.ndarray) -> np.ndarray:
    return np.array([margin_evidence(row, 1)[0] for row in s])


def _z_field(s: np.ndarray) -> np.ndarray:
    med, sd = _field(s)
    return (med - s[:, 0]) / sd


def _z_both(s: np.ndarray) -> np.ndarray:
    med, sd = _field(s)
    return (med - s[:, 0]) / sd + (s[:, 2] - s[:, 0]) / sd


EVIDENCE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "current (margin ratios)": _current,
    "z vs field": _z_field,
    "z vs field + z vs runner-up": _z_both,
}


def separation(scores: np.ndarray, lengths: np.ndarray, inside: np.ndarray, right: np.ndarray,
               fn: Callable[[np.ndarray], np.ndarray], max_false_rate: float = 0.01
               ) -> dict[float, float]:
    """Per length: share of in-collection queries right and confident at the threshold that
    keeps ``max_false_rate`` of that length's outsiders confident.

    Parameters
    ----------
    scores : (Q, K) sorted hash-DTW scores of every query's candidates (finite, K > FIELD_SKIP)
    lengths : (Q,) query length, s
    inside, right : (Q,) bool — in the collection; top-1 is the true piece
    """
    ev = fn(np.asarray(scores, np.float64))
    out = {}
    for length in sorted(set(lengths.tolist())):
        o = (~inside) & (lengths == length)
        i = inside & (lengths == length)
        if not o.any() or not i.any():
            continue
        th = np.quantile(ev[o], 1.0 - max_false_rate)
        out[float(length)] = float(np.mean(right[i] & (ev[i] > th)))
    return out


def main() -> None:
    cache = cache_dir()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="2,3,4,5,6,8,10")
    ap.add_argument("--index", type=Path, default=cache / "eval" / "index")
    ap.add_argument("--queries", type=Path, default=cache / "eval" / "queries")
    args = ap.parse_args()
    import torch

    from index.evaluation.evalset import load_queries
    from index.evaluation.evaluate import true_refs
    from index.search import Cascade
    from model.features import FRAME_RATE

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cas = Cascade.open(args.index)
    qs, frames = load_queries(args.queries)
    refs = true_refs(cas.index.refs, qs)
    sel = [i for i, q in enumerate(qs) if float(q["length_s"]) == 10.0
           and q["condition"] in ("clean", "room_noise")]
    lengths = [float(x) for x in args.lengths.split(",")]
    rows_s, rows_l, rows_in, rows_right = [], [], [], []
    for length in lengths:
        n = int(round(length * FRAME_RATE))
        codes = [cas.encode(frames[i][-n:]) for i in sel]
        ids, _ = cas.prune(np.stack([c.embedding for c in codes]))
        for j, i in enumerate(sel):
            ver = cas.verify(codes[j].hashes, ids[j])
            s = np.asarray(ver.scores, np.float64)
            s = np.where(np.isfinite(s), s, np.nanmax(s[np.isfinite(s)]))
            rows_s.append(s)
            rows_l.append(length)
            rows_in.append(refs[i] is not None)
            rows_right.append(refs[i] is not None and int(ver.refs[0]) == refs[i])
    width = min(r.shape[0] for r in rows_s)
    scores = np.stack([r[:width] for r in rows_s])
    ls, inside, right = np.asarray(rows_l), np.asarray(rows_in), np.asarray(rows_right)
    table_rows = [{"evidence": "top-1 right (no threshold)",
                   **{f"{g:g} s %": round(100 * float(np.mean(right[inside & (ls == g)])), 1)
                      for g in lengths}}]
    for name, fn in EVIDENCE.items():
        sep = separation(scores, ls, inside, right, fn)
        table_rows.append({"evidence": name, **{f"{g:g} s %": round(100 * v, 1)
                                                for g, v in sep.items()}})
    print(f"# {machine()}; {len(sel)} 10 s clips ({int(np.sum(inside) // len(lengths))} in the "
          f"collection), cut to {args.lengths} s; right and confident at 1 % of outsiders, "
          f"one threshold per length; {time.perf_counter() - t0:.0f} s")
    print(table(table_rows))


if __name__ == "__main__":
    main()
