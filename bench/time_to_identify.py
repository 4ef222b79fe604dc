"""How many seconds of a live stream the engine needs before it names the right piece.

    python bench/time_to_identify.py [--n-in 150] [--n-out 100] [--seconds 20] [--chunk-s 0.1]
                                     [--conditions clean,room_noise] [--batch 25]
                                     [--index DIR] [--seed 0] [--json FILE]
                                     [--half test|calib|all] [--starts N]
                                     [--calibrate [--save-calibration] [--keep-step]]
                                     [--stable-results K] [--result-every-s S]

The pieces of the evaluation collection are split in two halves by a hash of their path: the
**calib** half calibrates the stream decision (``--calibrate``: every stream's results, all
conditions pooled, go to :func:`index.decision.calibrate_stream`, which picks the stream threshold
and ``stable_results`` keeping at most 1 % of the out-of-collection streams deciding;
``--save-calibration`` stores them in the model's calibration file), the **test** half (the
default) measures the result. ``--starts`` draws that many streams per piece.

Query pieces come from the evaluation collection (``midimatch eval prepare``:
``$MIDIMATCH_CACHE/eval/collection.json``): ``--n-in`` in-collection pieces (indexed, never
trained on) and ``--n-out`` out-of-collection pieces, drawn with ``--seed``. Each gets a random
start at least 5 s into the piece; the excerpt from one second before it (so held notes and
reverb are sounding when the stream starts) is rendered with ``--renderer`` (default the held-out
TiMidity + freepats; any of ``HELD_OUT_RENDERERS`` for a row per held-out family), 22,050 Hz
mono, and cached under ``$MIDIMATCH_CACHE/bench/tti``; the
stream is the ``--seconds`` of audio from the start. The room + noise condition is
:func:`model.training.augment.augment_audio` with ``preset("room_noise")`` on the clean render
(seeded per piece), as in :mod:`index.evaluation.evalset`.

All streams of one condition go through ONE :class:`worker.engine.Engine` (default settings
except: ``prune_wait_s = 0``, so every result is pruned with its own audio rather than with
candidates a wall-clock wait left behind, and no tick budget), ``--batch`` sessions at a time,
fed as fast as the engine takes them: each round gives every open session one result period
of audio in ``--chunk-s`` chunks, then runs one tick. Time-to-identify is therefore in **audio
seconds**: the ``audio_s`` of a session's first result whose decision is the true piece. In
real time the background prune (``prune_wait_s`` 0.5 s) can hand a result candidates up to one
result period older, so live figures may be up to one period later.

Per condition, the table gives: in-collection streams ``n``; median / p90 time-to-identify
over the identified streams (s of audio); identified within the stream %; median time until
the true piece first ranks top, and first ranks top with a confidence over the calibrated
threshold (the rest is the decision rule's wait for ``stable_results`` such results); wrong
decision first % (a decision for another piece before the first right one, or with no right one) and
wrong decision at all %; out-of-collection streams with any decision %.

``--stable-results`` and ``--result-every-s`` are what-if settings (the shipped ones: the
calibration's 3 consecutive results, one result per 1 s of audio); the calibrated threshold
stays as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table  # noqa: E402
from model.env import cache_dir

SAMPLE_RATE = 22050
MIN_START_S = 5.0
LEAD_S = 1.0  # rendered before the stream starts (held notes, reverb)
TARGET_S = 4.0
# one result of a stream: audio_s, decided id, confident top id, top id (each None if none),
# top confidence (0 when there is no match), top position_s (0 when none)
Row = tuple[float, str | None, str | None, str | None, float, float]


def _cache() -> Path:
    return cache_dir()


def in_half(path: str, half: str) -> bool:
    """Whether a piece belongs to ``half``: "calib" (:func:`index.evaluation.evaluate.piece_half`
    0, the halves ``midimatch eval`` calibrates on), "test" (1) or "all"."""
    from index.evaluation.evaluate import piece_half

    return half == "all" or piece_half(path) == (0 if half == "calib" else 1)


def pick_pieces(collection: dict[str, Any], id_of_path: dict[str, str], n_in: int, n_out: int,
                seconds: float, seed: int, half: str = "all",
                starts: int = 1) -> list[dict[str, Any]]:
    """Draw the query pieces and their starts.

    Parameters
    ----------
    collection : dict
        ``collection.json`` of the evaluation set (``in_pieces``, ``out_pieces``).
    id_of_path : dict
        Indexed file path → its match id (sha256[:16]); an in-collection piece missing here
        is skipped.
    n_in, n_out : int
        Pieces wanted of each kind.
    seconds : float
        Stream length; a piece must hold ``MIN_START_S + seconds + 1`` s.
    seed : int
    half : str
        Only pieces of this half (:func:`in_half`).
    starts : int
        Streams per piece, each from its own random start.

    Returns
    -------
    list of dict
        ``path``, ``start_s`` (seconds into the MIDI), ``true_id`` (None out of collection).
    """
    from model.midi import load_midi

    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for kind, want in (("in_pieces", n_in), ("out_pieces", n_out)):
        got = 0
        for k in rng.permutation(len(collection[kind])):
            if got == want:
                break
            path = collection[kind][int(k)]["path"]
            if not in_half(path, half):
                continue
            true_id = id_of_path.get(path) if kind == "in_pieces" else None
            if kind == "in_pieces" and true_id is None:
                continue
            try:
                duration = float(load_midi(path).get_end_time())
            except Exception:  # noqa: BLE001 - an unreadable piece is just not drawn
                continue
            latest = duration - seconds - 1.0
            if latest < MIN_START_S:
                continue
            for _ in range(starts):
                out.append({"path": path, "true_id": true_id,
                            "start_s": round(float(rng.uniform(MIN_START_S, latest)), 3)})
            got += 1
    return out


def clean_audio(piece: dict[str, Any], seconds: float, cache_dir: Path,
                renderer: str = "timidity-freepats") -> np.ndarray | None:
    """The clean stream of one piece rendered by ``renderer``, shape (n,), float32 at
    22,050 Hz, cached; None if it cannot be rendered or comes out short."""
    from model.errors import MidimatchError
    from model.midi import load_midi
    from model.training.data_pair import excerpt
    from model.training.render import render

    # TiMidity's streams keep their old cache keys
    tag = "" if renderer == "timidity-freepats" else f"|{renderer}"
    key = hashlib.sha256(f"{piece['path']}|{piece['start_s']}|{seconds}{tag}".encode()
                         ).hexdigest()
    f = cache_dir / f"{key[:24]}.npy"
    if f.is_file():
        return np.load(f)
    pm = load_midi(piece["path"])
    cut_from = piece["start_s"] - LEAD_S
    notes = [n.start for inst in pm.instruments for n in inst.notes if n.start >= cut_from]
    if not notes:
        return None
    first = min(notes)  # excerpt() shifts this note to 0
    try:
        audio = render(excerpt(pm, cut_from, LEAD_S + seconds + 1.0), renderer,
                       sample_rate=SAMPLE_RATE)
    except (MidimatchError, OSError):
        return None
    offset = int(max(0.0, piece["start_s"] - first) * SAMPLE_RATE)
    clip = np.asarray(audio[offset:offset + int(seconds * SAMPLE_RATE)], np.float32)
    if clip.size < int(seconds * SAMPLE_RATE):
        return None
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(f, clip)
    return clip


def condition_audio(clean: np.ndarray, condition: str, path: str, seed: int) -> np.ndarray:
    """``clean`` under ``condition`` ("clean" or an :func:`model.training.augment.preset` name), the
    generator seeded by ``seed`` and the piece's path; shape (n,), float32."""
    from model.training.augment import augment_audio, preset

    if condition == "clean":
        return clean
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    return augment_audio(clean, SAMPLE_RATE, rng, preset(condition))[0].astype(np.float32)


def stream_all(cascade, clips: list[np.ndarray], chunk_s: float, batch: int,
               result_every_s: float = 1.0) -> list[list[Row]]:
    """Stream every clip through one engine, ``batch`` sessions at a time, as fast as it takes
    them; per clip, each result's :data:`Row` in order."""
    from worker.bus import StreamParams
    from worker.engine import Engine
    from worker.engine_settings import EngineSettings

    eng = Engine(cascade, EngineSettings(max_sessions=max(64, batch), prune_wait_s=0.0,
                                         tick_budget_s=3600.0, result_every_s=result_every_s))
    cut = cascade.calibration.stream_cut
    chunk = int(round(chunk_s * SAMPLE_RATE))
    per_round = max(1, int(round(eng.settings.result_every_s / chunk_s)))
    results: list[list[Row]] = [[] for _ in clips]
    for lo in range(0, len(clips), batch):
        group = range(lo, min(len(clips), lo + batch))
        pos = {i: 0 for i in group}
        for i in group:
            eng.open(f"q{i}", StreamParams(SAMPLE_RATE))
        while eng.sessions:
            for i in list(pos):
                clip = clips[i]
                for _ in range(per_round):
                    if pos[i] >= clip.size:
                        break
                    eng.feed(f"q{i}", clip[pos[i]:pos[i] + chunk, None])
                    pos[i] += chunk
                if pos[i] >= clip.size:
                    eng.end(f"q{i}")
                    del pos[i]
            for sid, r in eng.tick():
                d, m = r.get("decision"), r.get("matches") or []
                top = m[0]["id"] if m else None
                conf = float(m[0]["confidence"]) if m else 0.0
                sure = top if m and conf >= cut else None
                top_pos = float(m[0]["position_s"]) if m else 0.0
                results[int(sid[1:])].append((float(r["audio_s"]), d["id"] if d else None,
                                              sure, top, conf, top_pos))
    return results


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
              path_of_id: dict[str, str]) -> tuple[dict, list[dict]]:
    """The table row of one condition and the per-stream outcomes (``tti_s``: first result
    deciding for the true piece; ``top1_s``: first result ranking it first, decided or not;
    ``confident_s``: first ranking it first with a confident score; ``duplicate``: an
    out-of-collection stream whose music is indexed under another name, :func:`duplicate_of`)."""
    outcomes = []
    for p, res in zip(pieces, results, strict=True):
        decided = [(t, d) for t, d, *_ in res if d is not None]
        rec: dict[str, Any] = {"path": p["path"], "start_s": p["start_s"],
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
           "median top-1 s": median("top1_s"), "median confident s": median("confident_s"),
           "wrong first %": pct([o["wrong_first"] for o in ins]),
           "wrong at all %": pct([o["wrong_any"] for o in ins]),
           "n out": len(outs), "out decision %": pct([o["any_decision"] for o in outs]),
           "out duplicates": sum(o["duplicate"] for o in outs),
           "out decision, not dup. %": pct([o["any_decision"] for o in outs
                                            if not o["duplicate"]])}
    return row, outcomes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-in", type=int, default=150)
    ap.add_argument("--n-out", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20.0, help="audio per stream")
    ap.add_argument("--chunk-s", type=float, default=0.1)
    ap.add_argument("--conditions", default="clean,room_noise")
    ap.add_argument("--batch", type=int, default=25, help="sessions open at once")
    ap.add_argument("--index", type=Path, help="default: $MIDIMATCH_CACHE/eval/index")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--renderer", default="timidity-freepats",
                    help="render the streams with this renderer (`midimatch data renderers`; "
                    "default the held-out timidity-freepats)")
    ap.add_argument("--render-threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows and every stream's outcome")
    ap.add_argument("--half", choices=("test", "calib", "all"), default=None,
                    help="pieces of this half (default: test; calib with --calibrate)")
    ap.add_argument("--starts", type=int, default=1, help="streams per piece (default 1)")
    ap.add_argument("--calibrate", action="store_true",
                    help="fit the stream decision on these streams (the calib half)")
    ap.add_argument("--save-calibration", action="store_true",
                    help="with --calibrate: store it in model/weights/default.calibration.json")
    ap.add_argument("--keep-step", action="store_true",
                    help="with --calibrate: also try rules whose run must keep step with the "
                    "stream (index.decision.keeps_step; not adopted: docs/benchmarks.md)")
    ap.add_argument("--stable-results", type=int, help="what-if: consecutive confident results")
    ap.add_argument("--result-every-s", type=float, default=1.0, help="what-if: result period")
    ap.add_argument("--stream-threshold", type=float, help="what-if: the stream threshold")
    ap.add_argument("--min-query-s", type=float,
                    help="what-if: shortest query searched (the cascade's default: 2 s)")
    args = ap.parse_args()
    half = args.half or ("calib" if args.calibrate else "test")
    if args.calibrate and half == "test":
        sys.exit("--calibrate on the test half would measure on its own calibration data")

    from index.search import Cascade

    ev = _cache() / "eval"
    if not (ev / "collection.json").is_file():
        sys.exit(f"{ev / 'collection.json'} is missing: run `midimatch eval prepare` first")
    collection = json.loads((ev / "collection.json").read_text())
    t = time.perf_counter()
    cascade = Cascade.open(args.index or ev / "index")
    if args.min_query_s:
        cascade = cascade.with_config(min_query_s=args.min_query_s)
    if args.stable_results:
        cascade.calibration = dataclasses.replace(cascade.calibration,
                                                  stable_results=args.stable_results)
    if args.stream_threshold is not None:
        cascade.calibration = dataclasses.replace(cascade.calibration,
                                                  stream_threshold=args.stream_threshold)
    id_of_path = {r["path"]: str(r.get("sha256", ""))[:16] for r in cascade.index.refs}
    path_of_id = {v: k for k, v in id_of_path.items()}
    pieces = pick_pieces(collection, id_of_path, args.n_in, args.n_out, args.seconds, args.seed,
                         half=half, starts=args.starts)
    cache_dir = _cache() / "bench" / "tti"
    with ThreadPoolExecutor(max(1, args.render_threads)) as pool:
        clips = list(pool.map(lambda p: clean_audio(p, args.seconds, cache_dir, args.renderer),
                              pieces))
    kept = [(p, c) for p, c in zip(pieces, clips, strict=True) if c is not None]
    pieces, clean = [p for p, _ in kept], [c for _, c in kept]
    prep_s = time.perf_counter() - t
    print(f"# {len(pieces)} streams ready in {prep_s:.0f} s "
          f"({sum(p['true_id'] is not None for p in pieces)} in collection)", file=sys.stderr)
    stream_all(cascade, clean[:1], args.chunk_s, 1)  # warm-up: numba, torch
    rows, detail = [], {}
    for cond in args.conditions.split(","):
        t = time.perf_counter()
        audio = [condition_audio(c, cond, p["path"], args.seed) for p, c in kept]
        results = stream_all(cascade, audio, args.chunk_s, args.batch, args.result_every_s)
        row, detail[cond] = summarise(cond, pieces, results, path_of_id)
        row["wall s"] = time.perf_counter() - t
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"# Time to identify — {machine()}; load average at the end {' '.join(load)}")
    print(f"# index {args.index or ev / 'index'} ({len(cascade.index)} refs); "
          f"{args.seconds:g} s streams from >= {MIN_START_S:g} s into the piece, rendered by "
          f"{args.renderer}, {SAMPLE_RATE} Hz mono, {args.chunk_s * 1000:.0f} ms chunks, "
          f"{args.batch} sessions at once; a result per {args.result_every_s:g} s, decided after "
          f"{cascade.calibration.stable_results} confident (stream threshold "
          f"{cascade.calibration.stream_cut:.3f}); {half} half, "
          f"{args.starts} start(s) a piece; TTI in s of audio (target <= {TARGET_S:g} s)")
    print(table(rows))
    if args.calibrate:
        calibrate(cascade, pieces, detail, args, half)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "machine": machine(), "load": load,
                                         "outcomes": detail}, indent=1))


def calibrate(cascade, pieces: list[dict[str, Any]], detail: dict[str, list[dict]],
              args: argparse.Namespace, half: str) -> None:
    """Fit the stream decision on every stream of every condition and print what each rule
    gives; store it with ``--save-calibration``."""
    from index.calibration import Fit, save_calibration
    from index.decision import calibrate_stream

    ins, ids, outs, dups = [], [], [], 0
    for outcomes in detail.values():
        for p, o in zip(pieces, outcomes, strict=True):
            if o["in_collection"]:
                ins.append(o["trace"])
                ids.append(p["true_id"])
            elif o["duplicate"]:
                dups += 1  # indexed under another name: not an outsider
            else:
                outs.append(o["trace"])
    conds = ", ".join(detail)
    source = (f"bench/time_to_identify.py --calibrate --half {half} --starts {args.starts} "
              f"--seconds {args.seconds:g} --conditions {conds}: {len(ins)} in-collection and "
              f"{len(outs)} out-of-collection streams ({dups} duplicates of indexed pieces left "
              f"out), rendered by {args.renderer}, "
              f"{len(cascade.index)}-reference eval index")
    cal = calibrate_stream(cascade.calibration, ins, ids, outs, source=source,
                           step_choices=(False, True) if args.keep_step else (False,))
    print(f"# stream calibration on the {half} half: {source}")
    print(table(cal.stream["tried"]))
    print(f"# chosen: stream threshold {cal.stream_cut:.3f}, stable_results {cal.stable_results}")
    if args.save_calibration:
        cal = cal.with_fit("streams", Fit.now(
            renderers=[args.renderer], conditions=list(detail), n_in=len(ins), n_out=len(outs),
            index_refs=len(cascade.index), command=" ".join(["python", *sys.argv])))
        print(f"# saved to {save_calibration(cal)}")


if __name__ == "__main__":
    main()
