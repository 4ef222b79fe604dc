"""The per-condition summary of ``bench/time_to_identify.py``: a table row and every stream's
outcome, from each stream's results (one :data:`Row` per result message)."""

from __future__ import annotations

from typing import Any

import numpy as np

WITHIN_S = 20.0  # "decided within" column: in-collection streams decided right by then
# one result of a stream: audio_s, decided id, confident top id, top id (each None if none),
# top confidence (0 when there is no match), top position_s (0 when none)
Row = tuple[float, str | None, str | None, str | None, float, float]


def duplicate_of(piece: dict[str, Any], res: list[Row], path_of_id: dict[str, str]) -> bool:
    """Whether an out-of-collection stream is a duplicate of an indexed piece: at its most
    confident result, the top reference plays the stream's notes at the found position
    (:func:`index.evaluation.repeats.cross_similarity` over the last 10 s)."""
    from index.evaluation.repeats import cross_similarity, is_repeat

    rows = [r for r in res if r[3] is not None]
    if not rows:
        return False
    t, _, _, top, _, pos = max(rows, key=lambda r: r[4])
    length = min(t, 10.0)
    try:
        return is_repeat(cross_similarity(piece["path"], piece["start_s"] + t,
                                          path_of_id[top], pos, length))
    except Exception:  # noqa: BLE001 - an unreadable file is not a duplicate
        return False


def summarise(condition: str, pieces: list[dict[str, Any]], results: list[list[Row]],
              path_of_id: dict[str, str], duplicates: list[bool | None] | None = None,
              music_s: float | None = None) -> tuple[dict, list[dict]]:
    """The table row of one condition and the per-stream outcomes (``tti_s``: first result
    deciding for the true piece; ``top1_s``: first result ranking it first, decided or not;
    ``confident_s``: first ranking it first with a confident score; ``duplicate``: an
    out-of-collection stream whose music is indexed under another name, :func:`duplicate_of`,
    or as given in ``duplicates``; with ``music_s``, the audio before a quiet tail:
    ``kept_at_end``, whether a stream decided right at its last result of music still is at
    its final result)."""
    outcomes = []
    for k, (p, res) in enumerate(zip(pieces, results, strict=True)):
        decided = [(t, d) for t, d, *_ in res if d is not None]
        rec: dict[str, Any] = {"path": p["path"], "start_s": p["start_s"],
                               "true_id": p["true_id"],
                               "in_collection": p["true_id"] is not None,
                               "results": len(res), "any_decision": bool(decided),
                               "trace": [(t, m, round(c, 4), round(q, 2))
                                         for t, _, _, m, c, q in res],
                               "first_decision": list(decided[0]) if decided else None}
        if p["true_id"] is not None:
            right = [t for t, d in decided if d == p["true_id"]]
            first_right = right[0] if right else None
            rec["tti_s"] = first_right
            rec["top1_s"] = next((r[0] for r in res if r[3] == p["true_id"]), None)
            rec["confident_s"] = next((r[0] for r in res if r[2] == p["true_id"]), None)
            rec["wrong_first"] = any(d != p["true_id"] and (first_right is None or t < first_right)
                                     for t, d in decided)
            rec["wrong_any"] = any(d != p["true_id"] for _, d in decided)
            music = [d for t, d, *_ in res if music_s is None or t <= music_s + 1e-6]
            if music_s is not None and music and music[-1] == p["true_id"]:
                rec["kept_at_end"] = res[-1][1] == p["true_id"]
        elif duplicates is not None and duplicates[k] is not None:
            rec["duplicate"] = duplicates[k]
        else:
            rec["duplicate"] = duplicate_of(p, res, path_of_id)
        outcomes.append(rec)
    ins = [o for o in outcomes if o["in_collection"]]
    outs = [o for o in outcomes if not o["in_collection"]]
    tti = np.array([o["tti_s"] for o in ins if o["tti_s"] is not None], float)
    def median(key: str) -> float:
        xs = [o[key] for o in ins if o[key] is not None]
        return float(np.median(xs)) if xs else float("nan")


    def pct(xs: list[bool]) -> float:
        return 100.0 * float(np.mean(xs)) if xs else float("nan")

    row = {"condition": condition, "n": len(ins),
           "median TTI s": float(np.median(tti)) if tti.size else float("nan"),
           "p90 TTI s": float(np.percentile(tti, 90)) if tti.size else float("nan"),
           "identified %": pct([o["tti_s"] is not None for o in ins]),
           f"in {WITHIN_S:g} s %": pct([o["tti_s"] is not None and o["tti_s"] <= WITHIN_S
                                      for o in ins]),
           "median top-1 s": median("top1_s"), "median confident s": median("confident_s"),
           "wrong first %": pct([o["wrong_first"] for o in ins]),
           "wrong at all %": pct([o["wrong_any"] for o in ins]),
           "first right %": pct([o["first_decision"][1] == o["true_id"] for o in ins
                                 if o["first_decision"]]),
           "n out": len(outs), "out decision %": pct([o["any_decision"] for o in outs]),
           "out duplicates": sum(o["duplicate"] for o in outs),
           "out decision, not dup. %": pct([o["any_decision"] for o in outs
                                            if not o["duplicate"]])}
    if music_s is not None:
        row["kept at end %"] = pct([o["kept_at_end"] for o in ins if "kept_at_end" in o])
    return row, outcomes
