"""Replay saved stream traces under other decision rules (no audio, no engine: seconds).

    python bench/stream_rules.py [--calib FILE] [--test FILE] [--max-false-rate 0.01]

Reads the ``--json`` outputs of ``bench/time_to_identify.py`` (every stream's per-result top-1
id and confidence): ``--calib`` (default ``$MIDIMATCH_CACHE/bench/tti-calib.json``, the calib
half) fits each rule's threshold so that at most ``--max-false-rate`` of its out-of-collection
streams ever decide; ``--test`` (default ``.../tti-test.json``, the other half) measures it.
Out-of-collection streams marked ``duplicate`` (indexed under another name) are left out.

Rules, over the current run of results with the same top-1 (``k`` = how many are needed):
``min`` (the shipped :class:`index.decision.StreamDecision`: the smallest of the last k
confidences), ``mean`` (their mean) and ``sum`` (the sum over the whole run: evidence that
grows while the same piece stays on top), and ``pos`` (``min`` over a run that also moves
forward in the piece as the stream does: :func:`index.decision.keeps_step` between consecutive
results of the run, the shipped decision's ``keep_step``; traces written before positions were
recorded have none, and the rule is skipped for them).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import table  # noqa: E402
from index.decision import keeps_step  # noqa: E402
from model.env import cache_dir

RULES = ("min", "mean", "sum", "pos")


def load(path: Path, id_of_path: dict[str, str]) -> tuple[list, list]:
    """(in-collection (trace, true id) pairs, out-of-collection traces) of one JSON output."""
    d = json.loads(path.read_text())
    ins, outs = [], []
    for outcomes in d["outcomes"].values():
        for o in outcomes:
            trace = [tuple(r) for r in o["trace"]]
            if o["in_collection"]:
                ins.append((trace, id_of_path[o["path"]]))
            elif not o.get("duplicate"):
                outs.append(trace)
    return ins, outs


def scores(trace: list, rule: str, k: int) -> list[tuple[float, str | None, float]]:
    """Per result: (audio_s, top-1 id, score); -1 where the rule cannot decide yet."""
    out, run_top, run, last = [], None, [], None
    for t, top, conf, *rest in trace:
        here = (t, rest[0]) if rest else None
        if top is not None and top == run_top and (rule != "pos" or keeps_step(last, here)):
            run.append(conf)
        else:
            run_top, run = top, ([conf] if top is not None else [])
        last = here
        if top is None or len(run) < k:
            out.append((t, None, -1.0))
            continue
        w = run[-k:]
        s = min(w) if rule in ("min", "pos") else sum(w) / k if rule == "mean" else sum(run)
        out.append((t, top, s))
    return out


def fit(outs: list, rule: str, k: int, max_false_rate: float) -> float:
    peaks = sorted((max([s for *_, s in scores(t, rule, k)] + [-1.0]) for t in outs),
                   reverse=True)
    allowed = int(math.floor(max_false_rate * len(outs) + 1e-9))
    return float(np.nextafter(max(peaks[allowed], 0.0), np.inf)) if allowed < len(peaks) else 0.0


def measure(ins: list, outs: list, rule: str, k: int, th: float) -> dict:
    times, wrong = [], 0
    for trace, true in ins:
        d = next(((t, top) for t, top, s in scores(trace, rule, k) if s >= th), None)
        wrong += d is not None and d[1] != true
        times.append(d[0] if d is not None and d[1] == true else math.inf)
    ts = np.asarray(times)
    return {"median TTI s": float(np.median(ts)), "identified %": 100 * float(np.mean(
        np.isfinite(ts))), "wrong": wrong, "out decision %": 100 * float(np.mean(
            [any(s >= th for *_, s in scores(t, rule, k)) for t in outs]))}


def main() -> None:
    cache = cache_dir()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib", type=Path, default=cache / "bench" / "tti-calib.json")
    ap.add_argument("--test", type=Path, default=cache / "bench" / "tti-test.json")
    ap.add_argument("--index", type=Path, default=cache / "eval" / "index")
    ap.add_argument("--max-false-rate", type=float, default=0.01)
    args = ap.parse_args()
    from index.store import load_index

    id_of_path = {r["path"]: str(r.get("sha256", ""))[:16]
                  for r in load_index(args.index, mmap=True).refs}
    ci, co = load(args.calib, id_of_path)
    ti, to = load(args.test, id_of_path)
    rows = []
    has_pos = all(len(r) > 3 for tr in co for r in tr[:1])
    for rule in RULES if has_pos else RULES[:-1]:
        for k in (2, 3, 4, 5):
            th = fit(co, rule, k, args.max_false_rate)
            a, b = measure(ci, co, rule, k, th), measure(ti, to, rule, k, th)
            rows.append({"rule": rule, "k": k, "threshold": round(th, 3),
                         **{f"calib {n}": v for n, v in a.items()},
                         **{f"test {n}": v for n, v in b.items()}})
    print(f"# {len(ci)} / {len(co)} calib and {len(ti)} / {len(to)} test streams (in / out)")
    print(table(rows))


if __name__ == "__main__":
    main()
