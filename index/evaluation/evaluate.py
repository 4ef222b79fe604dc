"""Identification accuracy of the cascade (and of the chroma baseline) on a query set.

:func:`run_cascade` searches every query of an :mod:`index.evaluation.evalset` set with
:class:`index.search.Cascade` (in batches, so the embedding prune is one matrix product per
batch) and records one outcome per query; :func:`summarize` turns outcomes into the figures of
``docs/evaluation.md``, per (condition, clip length):

* **top-1 / top-5**: the true piece is ranked first / in the first five. A reference tied with
  the true one (same confidence *and* same hash-DTW score) is ranked ahead of it: a tie is a
  miss (DESIGN's drum/silence pitfall). Rank is ``inf`` beyond the returned ``top_n``;
* **median rank** over in-collection queries (``inf`` when over half miss the top ``top_n``);
* **position error**: ``|position_s - true end|`` (the live "where are we now", seconds of the
  reference) for queries whose top-1 is right; ``start error`` likewise for the matched start.
  An error over 1 s is checked against the reference MIDI (:mod:`index.evaluation.repeats`): when
  the found window plays the same notes as the true one (a repeated section), the query also counts
  in ``position_within_1s_or_repeat`` (``position_within_1s`` stays the plain figure);
* **pruning recall@K**: the true piece among the K references the embedding prune keeps;
* **false-confident rate**: out-of-collection queries that came back *identified* (with the
  cascade's loaded calibration); in the collection, ``confident_wrong`` is the same for a
  confident wrong answer. ``false_confident_not_duplicate`` leaves out the answers whose
  reference plays the query's notes at the found position
  (:func:`index.evaluation.repeats.cross_similarity`: the same tune indexed under another name);
* **time per query**: from the cascade's own ``timings_s``: encode + verify + confirm + the
  query's share of its batch's prune (:func:`query_time`), seconds.

:func:`calibrate_halves` checks the decision rule honestly: it splits the query *pieces* in two
by a hash of their path, calibrates the threshold on one half (:func:`index.calibration.calibrate`,
at most 1 % false-confident) and reports recall and false-confident rate on the other half.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from index.answers import ANSWERS, IDENTIFIED, NOT_IN_COLLECTION
from index.evaluation.repeats import is_repeat
from model.errors import MidimatchError

RECALL_AT = (10, 100)  # embedding-prune recall reported at these K (capped by the cascade's K)


def true_refs(refs: Sequence[dict], queries: Sequence[dict]) -> list[int | None]:
    """Reference number of each query's piece in an index (None when out of the collection).

    Raises
    ------
    MidimatchError
        ``not_indexed``: an in-collection query whose piece the index does not hold (the query
        set and the index were prepared apart).
    """
    by_path = {str(Path(r["path"]).resolve()): k for k, r in enumerate(refs)}
    out: list[int | None] = []
    for q in queries:
        if q["kind"] != "in":
            out.append(None)
            continue
        k = by_path.get(str(Path(q["ref_path"]).resolve()))
        if k is None:
            raise MidimatchError(f"query piece {q['ref_path']} is not in the index; prepare the "
                                 "index and the queries together (midimatch eval prepare)",
                                 reason="not_indexed")
        out.append(k)
    return out


def rank_in_matches(matches: Sequence[Any], true_ref: int) -> float:
    """1-based rank of ``true_ref`` among ranked matches, ties counted against it; ``inf`` when
    absent. A match ties when both its ``confidence`` and its ``score`` equal the true one's."""
    pos = next((i for i, m in enumerate(matches) if m.ref == true_ref), None)
    if pos is None:
        return math.inf
    t = matches[pos]
    ahead = sum(1 for i, m in enumerate(matches) if i != pos and (
        m.confidence > t.confidence or (m.confidence == t.confidence and m.score <= t.score)))
    return float(1 + ahead)


def query_time(timings_s: dict, batch_n: int) -> float:
    """Seconds one query costs: encode + verify + confirm + its share of the batch's prune.

    (``SearchResult.timings_s["prune"]`` is the whole batch's matrix product, counted in every
    result of the batch; a per-query time divides it by the batch size.)
    """
    t = timings_s
    if not all(k in t for k in ("encode", "prune", "verify", "confirm")):
        return float(t.get("total", math.nan))
    return float(t["encode"] + t["prune"] / max(1, batch_n) + t["verify"] + t["confirm"])


def _outcome(q: dict, true: int | None, res: Any, cand: np.ndarray,
             batch_n: int = 1, ref_paths: Sequence[str] | None = None) -> dict[str, Any]:
    top = res.matches[0] if res.matches else None
    rec: dict[str, Any] = {
        "kind": q["kind"], "condition": q["condition"], "length_s": q["length_s"],
        "piece": q["piece"], "source": q.get("source"), "true_ref": true,
        "top1_ref": None if top is None else top.ref,
        "top1_confidence": 0.0 if top is None else float(top.confidence),
        "identified_ref": None if res.identified is None else res.identified.ref,
        "answer": NOT_IN_COLLECTION if res.identified is None else IDENTIFIED,
        "time_s": query_time(res.timings_s, batch_n),
        "stage_s": {k: float(v) for k, v in res.timings_s.items()},
        "batch_n": batch_n,
    }
    if true is not None:
        rec["rank"] = rank_in_matches(res.matches, true)
        hit = np.flatnonzero(cand == true)
        rec["prune_rank"] = float(hit[0] + 1) if hit.size else math.inf
        if top is not None and rec["rank"] == 1:
            rec["position_error_s"] = abs(top.position_s - q["end_s"])
            rec["start_error_s"] = abs(top.start_s - q["start_s"])
            if rec["position_error_s"] > 1.0:
                rec["position_repeat_similarity"] = _repeat_similarity(q, top.position_s)
    elif res.identified is not None and ref_paths is not None:
        found = res.identified
        rec["duplicate_similarity"] = _repeat_similarity(q, found.position_s,
                                                         ref_paths[found.ref])
    return rec


def _repeat_similarity(q: dict, found_end_s: float, found_path: str | None = None
                       ) -> float | None:
    """Onset similarity (:mod:`index.evaluation.repeats`) of a query's true window and the window
    found, in the same reference or in ``found_path`` (None when a file cannot be read)."""
    from index.evaluation.repeats import cross_similarity

    own = q.get("ref_path") or q["piece"]
    try:
        return round(cross_similarity(own, q["end_s"], found_path or own, found_end_s,
                                      q["end_s"] - q["start_s"]), 4)
    except (MidimatchError, OSError, KeyError):
        return None


def run_cascade(cascade: Any, queries: Sequence[dict], frames: Sequence[np.ndarray],
                refs_of: Sequence[int | None], *, batch_size: int = 64,
                progress: bool = True) -> list[dict[str, Any]]:
    """Search every query; one outcome dict per query, in order (see :func:`summarize`).

    Parameters
    ----------
    cascade : index.search.Cascade
    queries, frames : sequences
        From :func:`index.evaluation.evalset.load_queries`; frames (T, 48) float32.
    refs_of : sequence of int or None
        :func:`true_refs` of the queries in ``cascade.index``.
    batch_size : int
        Queries per :meth:`Cascade.search_codes` call (one prune matrix product each).
    """
    from tqdm import tqdm

    out: list[dict[str, Any]] = []
    refs = getattr(getattr(cascade, "index", None), "refs", None)
    paths = None if refs is None else [r["path"] for r in refs]
    bar = tqdm(total=len(queries), desc="cascade", unit="query", disable=not progress)
    for lo in range(0, len(queries), batch_size):
        hi = min(len(queries), lo + batch_size)
        t0 = time.perf_counter()
        codes = [cascade.encode(f) for f in frames[lo:hi]]
        t_enc = (time.perf_counter() - t0) / (hi - lo)
        # The prune the search runs, kept for recall and handed to the search (not run twice)
        t0 = time.perf_counter()
        ids, _ = cascade.prune(np.stack([c.embedding for c in codes]),
                               [c.hashes for c in codes])
        results = cascade.search_codes(codes, pruned=(ids, time.perf_counter() - t0))
        for j, res in enumerate(results):
            res.timings_s["encode"] = t_enc
            res.timings_s["total"] = res.timings_s.get("total", 0.0) + t_enc
            out.append(_outcome(queries[lo + j], refs_of[lo + j], res, ids[j], hi - lo, paths))
        bar.update(hi - lo)
    bar.close()
    return out


def run_baseline(matcher: Any, queries: Sequence[dict], frames: Sequence[np.ndarray],
                 refs_of: Sequence[int | None], chosen: Iterable[int], *,
                 progress: bool = True) -> list[dict[str, Any]]:
    """Rank the ``chosen`` in-collection queries with
    :class:`index.evaluation.baseline.ChromaMatcher`."""
    from tqdm import tqdm

    from index.evaluation.baseline import rank_of

    out = []
    for i in tqdm(list(chosen), desc="chroma baseline", unit="query", disable=not progress):
        q, true = queries[i], refs_of[i]
        t0 = time.perf_counter()
        scores, ends = matcher.scores(frames[i])
        dt = time.perf_counter() - t0
        rank = rank_of(scores, true)
        rec = {"kind": "in", "condition": q["condition"], "length_s": q["length_s"],
               "piece": q["piece"], "true_ref": true, "rank": float(rank),
               "top1_ref": int(np.argmin(scores)), "time_s": dt}
        if rank == 1:
            from model.features import FRAME_RATE

            rec["position_error_s"] = abs(ends[true] / FRAME_RATE - q["end_s"])
        out.append(rec)
    return out


def baseline_subset(queries: Sequence[dict], cells: Iterable[tuple[str, float]],
                    per_cell: int, seed: int = 0) -> list[int]:
    """Indices of up to ``per_cell`` random in-collection queries of each (condition, length)."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for cond, length in cells:
        pool = [i for i, q in enumerate(queries)
                if q["kind"] == "in" and q["condition"] == cond and q["length_s"] == length]
        chosen += sorted(rng.permutation(pool)[:per_cell].tolist()) if pool else []
    return chosen


def _median(x: list[float]) -> float | None:
    return float(np.median(x)) if x else None


def summarize(outcomes: Sequence[dict], top_k: int | None = None, *,
              by_source: bool = False) -> dict[str, dict]:
    """Figures per ``"condition/length"`` group (plus ``"all/<length>"``); with ``by_source``,
    per ``"<source>:condition/length"`` instead (music21 works and generated songs apart).

    Returns
    -------
    dict
        group → ``n_in``, ``top1``, ``top5``, ``median_rank``, ``confident_wrong``,
        ``identified`` (confident and right), ``position_error_median_s``,
        ``position_within_1s``, ``position_within_1s_or_repeat``, ``start_error_median_s``,
        ``prune_recall@K``, ``n_out``,
        ``false_confident``, ``time_per_query_median_s``, ``time_per_query_mean_s``,
        ``stage_median_s`` (per cascade stage);
        rates are fractions in [0, 1], None where a group has no query of that kind.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for o in outcomes:
        pre = f"{o.get('source')}:" if by_source else ""
        groups[f"{pre}{o['condition']}/{o['length_s']:g}"].append(o)
        groups[f"{pre}all/{o['length_s']:g}"].append(o)
    out = {}
    for name, rows in sorted(groups.items()):
        ins = [r for r in rows if r["kind"] == "in"]
        outs = [r for r in rows if r["kind"] == "out"]
        ranks = [r["rank"] for r in ins]
        pos = [r["position_error_s"] for r in ins if "position_error_s" in r]
        start = [r["start_error_s"] for r in ins if "start_error_s" in r]
        times = [r["time_s"] for r in rows if np.isfinite(r.get("time_s", math.nan))]
        g: dict[str, Any] = {"n_in": len(ins), "n_out": len(outs)}
        if ins:
            g["top1"] = float(np.mean([k == 1 for k in ranks]))
            g["top5"] = float(np.mean([k <= 5 for k in ranks]))
            g["median_rank"] = float(np.median(ranks))
            if "identified_ref" in ins[0]:
                g["identified"] = float(np.mean([r["identified_ref"] == r["true_ref"]
                                                 for r in ins]))
                g["confident_wrong"] = float(np.mean([r["identified_ref"] not in
                                                      (None, r["true_ref"]) for r in ins]))
            g["position_error_median_s"] = _median(pos)
            g["position_within_1s"] = float(np.mean(np.asarray(pos) <= 1.0)) if pos else None
            g["position_within_1s_or_repeat"] = float(np.mean([
                r["position_error_s"] <= 1.0 or is_repeat(r.get("position_repeat_similarity")
                                                          or 0.0)
                for r in ins if "position_error_s" in r])) if pos else None
            g["start_error_median_s"] = _median(start)
            if "prune_rank" in ins[0]:
                for k in sorted({*(kk for kk in RECALL_AT if top_k is None or kk <= top_k),
                                 *([top_k] if top_k else [])}):
                    g[f"prune_recall@{k}"] = float(np.mean([r["prune_rank"] <= k for r in ins]))
        if outs:
            g["false_confident"] = float(np.mean([r["identified_ref"] is not None
                                                  for r in outs]))
            g["false_confident_not_duplicate"] = float(np.mean([
                r["identified_ref"] is not None
                and not is_repeat(r.get("duplicate_similarity") or 0.0) for r in outs]))
        if times:
            g["time_per_query_median_s"] = float(np.median(times))
            g["time_per_query_mean_s"] = float(np.mean(times))
        stages = sorted({k for r in rows for k in r.get("stage_s", {})})
        if stages:
            g["stage_median_s"] = {k: float(np.median([r["stage_s"][k] for r in rows
                                                       if k in r.get("stage_s", {})]))
                                   for k in stages}
        out[name] = g
    return out


def piece_half(piece: str) -> int:
    """0 or 1: which half of the query pieces a piece is in (a hash of its path)."""
    return zlib.crc32(str(piece).encode()) & 1


def calibrate_halves(outcomes: Sequence[dict], model_id: str, *,
                     max_false_rate: float = 0.01, by_length: bool = False) -> dict[str, Any]:
    """Calibrate on one half of the pieces, measure on the other, both ways round.

    Parameters
    ----------
    by_length : bool
        Fit one threshold per clip length (each on that length's queries of the fitting half)
        instead of one for all lengths together.

    Returns
    -------
    dict
        Per direction ``"fit0_test1"`` / ``"fit1_test0"``: the fitted ``threshold``, its
        ``fit_recall`` / ``fit_false_rate``, and on the other half overall and per length
        ``recall`` (confident and right), ``false_confident`` and ``confident_wrong``. With
        ``by_length``: ``{"<length>s": that dict}`` for each length.
    """
    if by_length:
        lengths = sorted({o["length_s"] for o in outcomes})
        return {f"{x:g}s": calibrate_halves([o for o in outcomes if o["length_s"] == x],
                                            model_id, max_false_rate=max_false_rate)
                for x in lengths}
    from index.calibration import calibrate

    out: dict[str, Any] = {}
    for fit in (0, 1):
        a = [o for o in outcomes if piece_half(o["piece"]) == fit]
        b = [o for o in outcomes if piece_half(o["piece"]) != fit]
        a_in = [o for o in a if o["kind"] == "in"]
        a_out = [o for o in a if o["kind"] == "out"]
        if not a_in or not a_out:
            raise MidimatchError("calibration needs in- and out-of-collection queries in both "
                                 "halves", reason="no_queries")
        cal = calibrate([o["top1_confidence"] for o in a_in],
                        [o["top1_confidence"] for o in a_out], model_id=model_id,
                        in_correct=[o["top1_ref"] == o["true_ref"] for o in a_in],
                        max_false_rate=max_false_rate, source="midimatch eval (one half)")
        res: dict[str, Any] = {"threshold": cal.threshold, "fit_recall": cal.recall,
                               "fit_false_rate": cal.false_rate, "test": {}}
        lengths = sorted({o["length_s"] for o in b})
        for name, rows in [("all", b), *((f"{x:g}s", [o for o in b if o["length_s"] == x])
                                         for x in lengths)]:
            ins = [o for o in rows if o["kind"] == "in"]
            outs = [o for o in rows if o["kind"] == "out"]
            conf = [o for o in ins if o["top1_confidence"] >= cal.threshold]
            res["test"][name] = {
                "n_in": len(ins), "n_out": len(outs),
                "recall": (sum(o["top1_ref"] == o["true_ref"] for o in conf) / len(ins)
                           if ins else None),
                "confident_wrong": (sum(o["top1_ref"] != o["true_ref"] for o in conf) / len(ins)
                                    if ins else None),
                "false_confident": (float(np.mean([o["top1_confidence"] >= cal.threshold
                                                   for o in outs])) if outs else None),
            }
        out[f"fit{fit}_test{1 - fit}"] = res
    return out


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if x is None else ("inf" if x == math.inf else fmt.format(x))


def answer_counts(outcomes: Sequence[dict]) -> str:
    """The answers the queries got, in :mod:`index.answers`' words: ``answers (N queries):
    A identified, B not in the collection`` (eval searches frames, never silent audio)."""
    n = {k: sum(o.get("answer") == k for o in outcomes) for k in (IDENTIFIED, NOT_IN_COLLECTION)}
    return (f"answers ({len(outcomes)} queries): "
            + ", ".join(f"{c} {ANSWERS[k]}" for k, c in n.items()))


def format_table(summary: dict[str, dict], baseline: dict[str, dict] | None = None,
                 top_k: int | None = None) -> str:
    """A plain-text table of :func:`summarize` output (percentages), one row per group."""
    k = f"prune_recall@{top_k}" if top_k else None
    head = ["group", "n_in", "top1%", "top5%", "med.rank", "pos.err s", "pos<=1s%",
            "pos<=1s|rep%", "recall@K%",
            "n_out", "false-conf%", "not-dup%", "ms/query"]
    if baseline:
        head += ["chroma n", "chroma top1%", "chroma top5%", "chroma ms/q"]
    rows = [head]
    for name, g in summary.items():
        row = [name, str(g["n_in"]), _pct(g.get("top1")), _pct(g.get("top5")),
               _num(g.get("median_rank"), "{:g}"), _num(g.get("position_error_median_s")),
               _pct(g.get("position_within_1s")), _pct(g.get("position_within_1s_or_repeat")),
               _pct(g.get(k)) if k else "—", str(g["n_out"]), _pct(g.get("false_confident")),
               _pct(g.get("false_confident_not_duplicate")),
               _num(1000 * g["time_per_query_median_s"] if "time_per_query_median_s" in g
                    else None, "{:.0f}")]
        if baseline:
            b = baseline.get(name)
            row += (["—"] * 4 if b is None or not b["n_in"] else
                    [str(b["n_in"]), _pct(b.get("top1")), _pct(b.get("top5")),
                     _num(1000 * b["time_per_query_median_s"], "{:.0f}")])
        rows.append(row)
    width = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(r, width, strict=True))) for r in rows)
