"""How many seconds of a live stream the engine needs before it names the right piece.

    python bench/time_to_identify.py [--n-in 150] [--n-out 100] [--seconds 20] [--chunk-s 0.1]
                                     [--conditions clean,room_noise] [--batch 25]
                                     [--index DIR] [--seed 0] [--json FILE]
                                     [--half test|calib|all] [--starts N]
                                     [--calibrate [--fit-shape] [--save-calibration]
                                      [--keep-step]]
                                     [--stable-results K] [--result-every-s S]
                                     [--evidence-threshold E] [--tail-s S] [--switch-s S]

The pieces of the evaluation collection are split in two halves by a hash of their path: the
**calib** half calibrates the stream decision (``--calibrate``: every stream's results, all
conditions pooled, go to :func:`index.decision.calibrate_stream`, which picks the stream threshold
and ``stable_results`` keeping at most 1 % of the out-of-collection streams deciding, and to
:func:`index.evidence.calibrate_evidence`, which does the same for the evidence rule's one
threshold — with ``--fit-shape``, also the shape of its increments
(:func:`index.evidence.fit_evidence_shape`: the fastest at that rate); ``--save-calibration``
stores them in the model's calibration file), the **test**
half (the default) measures the result. ``--starts`` draws that many streams per piece.

Two rules are measured on the same streams in the same run (:mod:`bench.tti_rules`): ``fixed``,
the same confident top-1 in ``stable_results`` results in a row
(:class:`index.decision.StreamDecision`), and ``evidence``, evidence accumulated over the stream
(:class:`index.evidence.EvidenceDecision`; measured when the calibration has its threshold or
``--evidence-threshold`` gives one). The engine runs the calibration's rule live; every
session's decision input is recorded and replayed through each rule, so each gets the
decisions it would have made live (the replay of the live rule is checked against it).
``--tail-s`` appends that much digital silence to every stream (the ``kept at end`` column:
decided right at the last result of music and still at the final result); ``--switch-s``
measures instead in-collection streams that change, at that second, to the next piece's stream
(re-decided within 6 s, the old piece withdrawn).

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

Per condition and rule, the table gives: in-collection streams ``n``; median / p90
time-to-identify over the identified streams (s of audio); identified within the stream % and
within 20 s %; median time until
the true piece first ranks top, and first ranks top with a confidence over the calibrated
threshold (the rest is the decision rule's wait for ``stable_results`` such results); wrong
decision first % (a decision for another piece before the first right one, or with no right one),
wrong decision at all % and first decisions that were right %; out-of-collection streams with
any decision %.

``--stable-results`` and ``--result-every-s`` are what-if settings (the shipped ones: the
calibration's 3 consecutive results, one result per 1 s of audio); the calibrated threshold
stays as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table  # noqa: E402
from bench.tti_streams import (  # noqa: E402
    MIN_START_S,
    SAMPLE_RATE,
    clean_audio,
    condition_audio,
    pick_pieces,
)
from bench.tti_summary import Row, summarise  # noqa: E402
from model.env import cache_dir

TARGET_S = 4.0


def _cache() -> Path:
    return cache_dir()


def stream_all(cascade, clips: list[np.ndarray], chunk_s: float, batch: int,
               result_every_s: float = 1.0,
               change_s: float | None = None) -> tuple[list[list[Row]], list[tuple]]:
    """Stream every clip through one engine, ``batch`` sessions at a time, as fast as it takes
    them; per clip, each result's :data:`Row` in order, and the session's recorded decision
    input (:func:`bench.tti_rules.record`: events, marks)."""
    from bench.tti_rules import record
    from worker.bus import StreamParams
    from worker.engine import Engine
    from worker.engine_settings import EngineSettings

    what_if = {} if change_s is None else {"change_s": change_s}
    eng = Engine(cascade, EngineSettings(max_sessions=max(64, batch), prune_wait_s=0.0,
                                         tick_budget_s=3600.0, result_every_s=result_every_s,
                                         **what_if))
    cut = cascade.calibration.stream_cut
    chunk = int(round(chunk_s * SAMPLE_RATE))
    per_round = max(1, int(round(eng.settings.result_every_s / chunk_s)))
    results: list[list[Row]] = [[] for _ in clips]
    logs: list[tuple] = [([], []) for _ in clips]
    for lo in range(0, len(clips), batch):
        group = range(lo, min(len(clips), lo + batch))
        pos = {i: 0 for i in group}
        for i in group:
            eng.open(f"q{i}", StreamParams(SAMPLE_RATE))
            logs[i] = record(eng._sessions[f"q{i}"])
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
    return results, logs


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
    ap.add_argument("--renderer", default="timidity-freepats", metavar="NAME[,NAME...]",
                    help="render the streams with this renderer (`midimatch data renderers`; "
                    "default the held-out timidity-freepats); several, comma-separated: every "
                    "piece's streams once per renderer, pooled (e.g. a calibration across "
                    "engines)")
    ap.add_argument("--render-threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows and every stream's outcome")
    ap.add_argument("--half", choices=("test", "calib", "all"), default=None,
                    help="pieces of this half (default: test; calib with --calibrate)")
    ap.add_argument("--starts", type=int, default=1, help="streams per piece (default 1)")
    ap.add_argument("--calibrate", action="store_true",
                    help="fit the stream decision on these streams (the calib half)")
    ap.add_argument("--fit-shape", action="store_true",
                    help="with --calibrate: also choose the evidence rule's shape on these "
                         "streams (index.evidence.fit_evidence_shape) and store it with the "
                         "threshold")
    ap.add_argument("--save-calibration", action="store_true",
                    help="with --calibrate: store it in model/weights/default.calibration.json")
    ap.add_argument("--keep-step", action="store_true",
                    help="with --calibrate: also try rules whose run must keep step with the "
                    "stream (index.decision.keeps_step; not adopted: docs/benchmarks.md)")
    ap.add_argument("--stable-results", type=int, help="what-if: consecutive confident results")
    ap.add_argument("--change-s", type=float, metavar="S",
                    help="what-if: seconds the change-of-music check looks at (0: no check)")
    ap.add_argument("--reset-on-restart", action="store_true",
                    help="also measure the evidence rule reset when the query restarts after "
                    "a change of music (rule evidence-reset: the sessions until 2026-12-05)")
    ap.add_argument("--hash-prune", type=int, metavar="N",
                    help="what-if: references from the hash prune (0: the embedding prune alone)")
    ap.add_argument("--result-every-s", type=float, default=1.0, help="what-if: result period")
    ap.add_argument("--stream-threshold", type=float, help="what-if: the stream threshold")
    ap.add_argument("--min-query-s", type=float,
                    help="what-if: shortest query searched (the cascade's default: 2 s)")
    ap.add_argument("--evidence-threshold", type=float,
                    help="what-if: the evidence rule's threshold (default: the calibration's)")
    ap.add_argument("--tail-s", type=float, default=0.0,
                    help="digital silence after each stream, s (the 'kept at end' column)")
    ap.add_argument("--switch-s", type=float,
                    help="instead: in-collection streams that switch, at this many seconds, "
                    "to the next in-collection piece's stream (bench.tti_rules.switch_row)")
    args = ap.parse_args()
    half = args.half or ("calib" if args.calibrate else "test")
    if args.calibrate and half == "test":
        sys.exit("--calibrate on the test half would measure on its own calibration data")
    if args.calibrate and args.switch_s:
        sys.exit("--calibrate fits on whole streams of one piece, not on --switch-s streams")

    from bench.tti_rules import live_rule
    from index.search import Cascade

    ev = _cache() / "eval"
    if not (ev / "collection.json").is_file():
        sys.exit(f"{ev / 'collection.json'} is missing: run `midimatch eval prepare` first")
    collection = json.loads((ev / "collection.json").read_text())
    t = time.perf_counter()
    cascade = Cascade.open(args.index or ev / "index")
    if args.hash_prune is not None:
        cascade = cascade.with_config(hash_prune=args.hash_prune)
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
    renderers = [r for r in args.renderer.split(",") if r]
    # one stream per piece and renderer, the renderer named in the piece (outcomes, provenance)
    pieces = [{**p, "renderer": r} for r in renderers for p in pieces]
    with ThreadPoolExecutor(max(1, args.render_threads)) as pool:
        clips = list(pool.map(lambda p: clean_audio(p, args.seconds, cache_dir, p["renderer"]),
                              pieces))
    kept = [(p, c) for p, c in zip(pieces, clips, strict=True) if c is not None]
    pieces, clean = [p for p, _ in kept], [c for _, c in kept]
    prep_s = time.perf_counter() - t
    print(f"# {len(pieces)} streams ready in {prep_s:.0f} s "
          f"({sum(p['true_id'] is not None for p in pieces)} in collection)", file=sys.stderr)
    stream_all(cascade, clean[:1], args.chunk_s, 1)  # warm-up: numba, torch
    rows, detail = [], {}
    for cond in args.conditions.split(","):
        audio = [condition_audio(c, cond, p["path"], args.seed) for p, c in kept]
        got, detail[cond] = measure(cascade, cond, pieces, audio, path_of_id, args)
        rows += got
    rule = cascade.calibration
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"# Time to identify — {machine()}; load average at the end {' '.join(load)}")
    print(f"# index {args.index or ev / 'index'} ({len(cascade.index)} refs); "
          f"{args.seconds:g} s streams from >= {MIN_START_S:g} s into the piece, rendered by "
          f"{args.renderer}, {SAMPLE_RATE} Hz mono, {args.chunk_s * 1000:.0f} ms chunks, "
          f"{args.batch} sessions at once; a result per {args.result_every_s:g} s; rules: fixed = "
          f"{rule.stable_results} confident results in a row (stream threshold "
          f"{rule.stream_cut:.3f}), evidence = index.evidence (threshold "
          f"{args.evidence_threshold or rule.evidence_threshold}); live: {live_rule(rule)}; "
          f"{half} half, {args.starts} start(s) a piece, {args.tail_s:g} s of silence after each"
          f"{f', switching at {args.switch_s:g} s' if args.switch_s else ''}; TTI in s of audio "
          f"(target <= {TARGET_S:g} s)")
    print(table(rows))
    if args.calibrate:
        calibrate(cascade, pieces, detail, args, half)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "machine": machine(), "load": load,
                                         "outcomes": detail}, indent=1))


def measure(cascade, cond: str, pieces: list[dict[str, Any]], audio: list[np.ndarray],
            path_of_id: dict[str, str], args: argparse.Namespace) -> tuple[list[dict], list]:
    """Stream one condition's audio once and measure every rule on it (:mod:`bench.tti_rules`):
    the table rows (one per rule) and the live rule's per-stream outcomes with the recorded
    decision input (``events``)."""
    from bench.tti_rules import (
        check_live,
        live_rule,
        rule_rows,
        rules,
        switch_audio,
        switch_row,
    )

    t = time.perf_counter()
    if args.switch_s:
        audio, pairs = switch_audio(audio, pieces, args.switch_s)
    tail = np.zeros(int(round(args.tail_s * SAMPLE_RATE)), np.float32)
    results, logs = stream_all(cascade, [np.concatenate([a, tail]) for a in audio],
                               args.chunk_s, args.batch, args.result_every_s, args.change_s)
    wall = time.perf_counter() - t
    live = live_rule(cascade.calibration)
    rows, detail, dups = [], [], None
    for name, make in rules(cascade.calibration, args.evidence_threshold,
                             args.reset_on_restart).items():
        replayed = [rule_rows(r, ev, mk, make()) for r, (ev, mk) in zip(results, logs,
                                                                           strict=True)]
        if args.switch_s:
            rows.append({"rule": name, **switch_row(cond, replayed, pairs, args.switch_s,
                                                    pieces)})
            if name == live:
                detail = [{"a": pieces[a]["true_id"], "b": pieces[b]["true_id"], "rows": r,
                           "events": ev} for (a, b), r, (ev, _) in zip(pairs, results, logs,
                                                                        strict=True)]
            continue
        row, outcomes = summarise(cond, pieces, replayed, path_of_id, dups,
                                  args.seconds if args.tail_s else None)
        dups = [o.get("duplicate") for o in outcomes]
        rows.append({"rule": name, **row, "wall s": wall})
        if name == live:
            off = sum(check_live(a, b) for a, b in zip(results, replayed, strict=True))
            if off:
                print(f"# WARNING: the replayed live rule differs from the live decisions in "
                      f"{off} results", file=sys.stderr)
            for o, (ev, _) in zip(outcomes, logs, strict=True):
                o["events"] = ev
            detail = outcomes
    for r in rows:
        print(json.dumps(r), file=sys.stderr)
    return rows, detail


def calibrate(cascade, pieces: list[dict[str, Any]], detail: dict[str, list[dict]],
              args: argparse.Namespace, half: str) -> None:
    """Fit the stream decision on every stream of every condition and print what each rule
    gives; store it with ``--save-calibration``."""
    from index.calibration import Fit, save_calibration
    from index.decision import calibrate_stream
    from index.evidence import events_to_trace

    ins, ids, outs, dups = [], [], [], 0
    in_events, out_events = [], []
    for outcomes in detail.values():
        for p, o in zip(pieces, outcomes, strict=True):
            # the decision input as recorded (quiet periods left out, resets in), if it was
            trace = events_to_trace(o["events"]) if "events" in o else o["trace"]
            if o["in_collection"]:
                ins.append(trace)
                ids.append(p["true_id"])
                in_events.append(o.get("events"))
            elif o["duplicate"]:
                dups += 1  # indexed under another name: not an outsider
            else:
                outs.append(trace)
                out_events.append(o.get("events"))
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
    if all(e is not None for e in (*in_events, *out_events)):
        from index.evidence import DEFAULT_PARAMS, calibrate_evidence

        params = DEFAULT_PARAMS
        if args.fit_shape:
            from index.evidence import fit_evidence_shape

            def shown(k: int, n: int) -> None:
                if k % 24 == 0 or k == n:
                    print(f"# evidence shapes tried: {k} / {n}", file=sys.stderr, flush=True)

            params, rows = fit_evidence_shape(in_events, ids, out_events, progress=shown)
            print("# evidence shapes (index.evidence.fit_evidence_shape), the best ten:")
            print(table(rows[:10]))
        cal = calibrate_evidence(cal, in_events, ids, out_events, params=params)
        print("# evidence rule (index.evidence), fitted on the same streams:")
        print(table([{k: v for k, v in cal.stream["evidence"].items() if k != "params"}]))
    if args.save_calibration:
        cal = cal.with_fit("streams", Fit.now(
            renderers=args.renderer.split(","), conditions=list(detail), n_in=len(ins),
            n_out=len(outs),
            index_refs=len(cascade.index), command=" ".join(["python", *sys.argv])))
        print(f"# saved to {save_calibration(cal)}")


if __name__ == "__main__":
    main()
