"""How the evidence rule's increments were shaped: replay recorded calib-half streams (seconds).

    python bench/evidence_params.py [FILE ...] [--grid] [--max-false-rate 0.01]
                                    [--compare TEST_FILE ...]

Reads ``--json`` outputs of ``bench/time_to_identify.py`` (every stream's recorded decision
input, ``events``; default ``$MIDIMATCH_CACHE/bench/tti-ev-calib.json``), pooled; outsiders
marked ``duplicate`` are left out. Prints

* the per-result ratio the confidence term follows: how much likelier a confidence bin is for
  a true top match than for an outsider's top match (natural log, +0.5 smoothing), and how
  often a repeated top keeps step with the stream (:func:`index.decision.keeps_step`, ±25 %);
* the outsider streams that build the most evidence (what sets the threshold): their piece and
  the reference they hold on top;
* with ``--grid``, the 25 best shapes of :data:`index.evidence.SHAPE_GRID` as
  :func:`index.evidence.fit_evidence_shape` ranks them (what ``bench/time_to_identify.py
  --calibrate --fit-shape`` chooses from): the threshold at ``--max-false-rate`` of the
  outsider streams and what it gives on the in-collection streams (median time to a right
  first decision, share within 20 s), per condition. Fit on calib-half files only: the test
  half measures the choice;
* with ``--compare``, that measure: the default shape and the one ``fit_evidence_shape``
  chooses, each with its threshold fitted on FILE (the calib half), replayed on every
  TEST_FILE (the test half, one ``bench/time_to_identify.py --json`` per renderer) — the same
  recorded streams for both, per file and condition.
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
from index.evidence import (  # noqa: E402
    RESET,
    SHAPE_GRID,
    EvidenceParams,
    event_kind,
    evidence_peak,
    fit_evidence_shape,
    shape_figures,
)
from model.env import cache_dir  # noqa: E402

BINS = (0, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0001)


def load(paths: list[Path]) -> tuple[list, list]:
    """(in-collection (events, true id, condition), outsider (events, condition, (piece file
    name, start s))) of files."""
    ins, outs = [], []
    for path in paths:
        for cond, outcomes in json.loads(path.read_text())["outcomes"].items():
            for o in outcomes:
                if "events" not in o:
                    continue
                # a reset / restart marker (or an old file's None) as it is, a ranking as tuples
                ev = [(t, r if event_kind(r) is not None else [tuple(x) for x in r])
                      for t, r in o["events"]]
                if o["in_collection"]:
                    ins.append((ev, o["true_id"], cond))
                elif not o.get("duplicate"):
                    where = (Path(o["path"]).name if o.get("path") else None, o.get("start_s"))
                    outs.append((ev, cond, where))
    return ins, outs


def ratios(ins: list, outs: list) -> tuple[list[dict], dict]:
    """The confidence bins' log ratio (true top vs outsider top) and the step shares."""
    true_c, out_c, steps = [], [], {"true": [], "outsider": []}
    for kind, streams in (("true", [(e, t) for e, t, _ in ins]),
                          ("outsider", [(e, c) for e, c, _ in outs])):
        for ev, true in streams:
            seen: dict = {}
            for t, ranked in ev:
                kind_of = event_kind(ranked)
                if kind_of is not None:  # a reset forgets what was seen; a restart keeps it,
                    if kind_of == RESET:  # as the rule does (index.evidence.replay_steps)
                        seen = {}
                    continue
                if not ranked:
                    continue
                top, c, pos = ranked[0]
                if kind == "outsider" or top == true:
                    (true_c if kind == "true" else out_c).append(c)
                    if top in seen:
                        steps[kind].append(keeps_step(seen[top], (t, pos), slack=0.25))
                for i, _, p in ranked:
                    seen[i] = (t, p)
    hi, _ = np.histogram(true_c, BINS)
    ho, _ = np.histogram(out_c, BINS)
    rows = [{"confidence": f"[{BINS[k]:g}, {min(BINS[k + 1], 1):g})", "true tops": int(hi[k]),
             "outsider tops": int(ho[k]),
             "log ratio": math.log(((hi[k] + 0.5) / len(true_c)) / ((ho[k] + 0.5) / len(out_c)))}
            for k in range(len(BINS) - 1)]
    return rows, {k: float(np.mean(v)) if v else math.nan for k, v in steps.items()}


def grid_rows(ins: list, outs: list, max_false_rate: float) -> list[dict]:
    """Every shape of :data:`index.evidence.SHAPE_GRID` as :func:`fit_evidence_shape` ranks
    it, with the median and share within 20 s per condition."""
    ids, conds = [t for _, t, _ in ins], np.array([c for *_, c in ins])
    out_ev = [e for e, *_ in outs]
    _, ranked = fit_evidence_shape([e for e, _, _ in ins], ids, out_ev,
                                   max_false_rate=max_false_rate)
    rows = []
    for r in ranked:
        p = EvidenceParams.from_dict({k: r[k] for k in EvidenceParams.__dataclass_fields__})
        ts = shape_figures(p, [e for e, _, _ in ins], ids, out_ev, max_false_rate)["times"]
        row = {k: r[k] for k in SHAPE_GRID} | {"threshold": r["threshold"]}
        for cond in sorted(set(conds)):
            row[f"{cond} median s"] = float(np.median(ts[conds == cond]))
            row[f"{cond} in 20 s %"] = 100 * float(np.mean(ts[conds == cond] <= 20))
        rows.append(row | {"median s": r["median_s"], "in 20 s %": 100 * r["in_20s"],
                           "wrong first %": 100 * r["wrong_first"],
                           "eligible": r["eligible"]})
        if len(rows) == 25:
            break
    return rows


def compare_rows(ins: list, outs: list, tests: list[Path], max_false_rate: float) -> list[dict]:
    """The default shape and the fitted one (thresholds fitted on ``ins``/``outs``), replayed
    on each test file's streams: one row per file, condition and shape."""
    ids, in_ev, out_ev = [t for _, t, _ in ins], [e for e, _, _ in ins], [e for e, *_ in outs]
    fitted, _ = fit_evidence_shape(in_ev, ids, out_ev, max_false_rate=max_false_rate)
    shapes = {"default": EvidenceParams(), "fitted": fitted}
    thresholds = {k: shape_figures(p, in_ev, ids, out_ev, max_false_rate)["threshold"]
                  for k, p in shapes.items()}
    rows = []
    for path in tests:
        t_in, t_out = load([path])
        for cond in sorted({c for *_, c in t_in} | {c for _, c, _ in t_out}):
            ev_in = [(e, t) for e, t, c in t_in if c == cond]
            ev_out = [e for e, c, _ in t_out if c == cond]
            for name, p in shapes.items():
                th = thresholds[name]
                f = shape_figures(p, [e for e, _ in ev_in], [t for _, t in ev_in], ev_out,
                                  threshold=th)
                ts, wrong = f["times"], f["wrong"]
                right = ts[np.isfinite(ts)]
                decided_out = int(np.sum(f["peaks"] >= th))
                rows.append({"file": path.stem, "condition": cond, "shape": name,
                             "threshold": round(th, 2), "n": len(ev_in),
                             "median s": float(np.median(right)) if right.size else math.inf,
                             "p90 s": float(np.percentile(right, 90)) if right.size else math.inf,
                             "in 20 s %": 100 * float(np.mean(ts <= 20)) if ts.size else 0.0,
                             "identified %": 100 * float(np.mean(np.isfinite(ts)))
                             if ts.size else 0.0,
                             "wrong first": wrong, "out decided": f"{decided_out} / {len(ev_out)}"})
    print(f"# fitted shape: {fitted}")
    return rows


def outsider_tail(outs: list, params: EvidenceParams, n: int = 10) -> list[dict]:
    """The ``n`` outsider streams (as :func:`load` gives them) whose top match builds the most
    evidence under ``params`` (what sets the threshold): their piece, start and condition, and
    the reference they hold on top most often (a piece that shares material with an indexed
    one shows up again and again, across starts and conditions)."""
    rows = []
    for ev, cond, (piece, start_s) in outs:
        tops = [r[0][0] for _, r in ev if event_kind(r) is None and r]
        held = max(set(tops), key=tops.count) if tops else None
        rows.append({"peak": evidence_peak(ev, params), "piece": piece, "start s": start_s,
                     "condition": cond, "top most often": held,
                     "results on top": tops.count(held) if held else 0})
    return sorted(rows, key=lambda r: -r["peak"])[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path,
                    default=[cache_dir() / "bench" / "tti-ev-calib.json"])
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--max-false-rate", type=float, default=0.01)
    ap.add_argument("--compare", nargs="+", type=Path, metavar="TEST_FILE",
                    help="replay the default and the fitted shape on these test-half files")
    args = ap.parse_args()
    ins, outs = load(args.files)
    print(f"# {len(ins)} in-collection and {len(outs)} outsider streams from "
          f"{', '.join(str(f) for f in args.files)}")
    rows, steps = ratios(ins, outs)
    print(table(rows))
    print(f"# repeated tops keeping step (±25 % + 0.5 s): true {100 * steps['true']:.0f} %, "
          f"outsider {100 * steps['outsider']:.0f} %")
    p = EvidenceParams()
    peaks = [evidence_peak(e, p) for e, *_ in outs]
    print(f"# default shape {p}: outsider peaks, highest five {sorted(peaks)[-5:]}")
    print("# the outsider streams with the highest peaks (default shape):")
    print(table(outsider_tail(outs, p)))
    if args.grid:
        print(table(grid_rows(ins, outs, args.max_false_rate)))
    if args.compare:
        print(table(compare_rows(ins, outs, args.compare, args.max_false_rate)))


if __name__ == "__main__":
    main()
