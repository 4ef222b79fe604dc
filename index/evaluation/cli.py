"""``midimatch eval prepare`` (index + query set) and ``midimatch eval`` (run and report)."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

CONDITIONS = ("clean", "room_noise", "tempo0.9", "tempo1.1")
BASELINE_CELLS = "clean/5,clean/10,room_noise/10"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="identification accuracy on a held-out-renderer query set",
        description="`midimatch eval prepare` builds the evaluation index and renders the "
        "queries into the cache; `midimatch eval prepare-external` makes the set of MIDI/audio "
        "pairs made elsewhere (Debian packages, index/evaluation/external.py) in "
        "$MIDIMATCH_CACHE/external; `midimatch eval [run]` searches them and prints the figures.")
    p.add_argument("action", nargs="?", choices=("run", "prepare", "prepare-external"),
                   default="run")
    p.add_argument("--out", type=Path, help="eval folder (default: $MIDIMATCH_CACHE/eval, "
                   "$MIDIMATCH_CACHE/external for prepare-external)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("prepare")
    g.add_argument("--corpus", type=Path, help="MIDI cache (default: $MIDIMATCH_CACHE/corpus)")
    g.add_argument("--n-in", type=int, default=250, help="in-collection query pieces")
    g.add_argument("--n-out", type=int, default=250, help="out-of-collection query pieces")
    g.add_argument("--n-generated-index", type=int, default=None,
                   help="generated seeds below this are indexed, later ones are not (default "
                   "1000; 1800 for prepare-external's distractors)")
    g.add_argument("--no-distractors", action="store_true",
                   help="prepare-external: index the pairs' MIDI files alone")
    g.add_argument("--untrained", action="store_true",
                   help="also write the untrained model and build its own index")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--renderers", default="",
                   help="render the queries with each of these renderers (comma-separated "
                   "names of `midimatch data renderers`; default: the held-out "
                   "timidity-freepats), one query set per renderer: OUT/queries for "
                   "timidity-freepats, OUT/queries-NAME for the others; prepare-external: "
                   "the renderers of the openmsx files (default timidity-freepats,"
                   "adplay-opl3,csound-fm)")
    r = p.add_argument_group("run")
    r.add_argument("--index", type=Path, help="index folder (default: OUT/index); prepare builds "
                   "or updates this one")
    r.add_argument("--queries", type=Path, help="query set (default: OUT/queries, or the "
                   "--renderer's)")
    r.add_argument("--renderer", metavar="NAME[,NAME...]",
                   help="the query set rendered by this renderer (prepared with `eval prepare "
                   "--renderers`); several, comma-separated: their query sets pooled in one run "
                   "(one table each, then the pooled one; --save-calibration fits on all of "
                   "them)")
    r.add_argument("--weights", help="model weights (default: the shipped model); "
                   "OUT/untrained.pt with an index built from it for the untrained model; "
                   "prepare builds --index with these")
    r.add_argument("--lengths", default="", help="only these clip lengths, e.g. 5,10")
    r.add_argument("--conditions", default="", help=f"only these, from {','.join(CONDITIONS)}")
    r.add_argument("--max-pieces", type=int, help="at most N pieces of each kind (in, out)")
    r.add_argument("--top-k", type=int, default=None,
                   help="references kept by the prune (default: the cascade's, 300)")
    r.add_argument("--prune-parts", type=int, default=None, metavar="N",
                   help="parts of the query window pruned beside it (default: the cascade's, "
                   "2; 0: the whole window alone)")
    r.add_argument("--batch", type=int, default=64, help="queries per prune batch")
    r.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    r.add_argument("--baseline", type=int, default=0, metavar="N",
                   help="also run the chroma + DTW baseline on N queries per baseline cell")
    r.add_argument("--baseline-cells", default=BASELINE_CELLS,
                   help=f"condition/length cells for the baseline (default {BASELINE_CELLS})")
    r.add_argument("--by-source", action="store_true",
                   help="also print the table per query source (music21/generated; "
                   "mscore3, solfege, openmsx/RENDERER of prepare-external)")
    r.add_argument("--json", type=Path, dest="json_out", help="write the report here")
    r.add_argument("--outcomes", type=Path, help="write every query's outcome here (JSON)")
    r.add_argument("--rescore", action="store_true",
                   help="search nothing: recompute the figures of the --json report from its "
                   "--outcomes file (after a change to how figures are computed)")
    r.add_argument("--save-calibration", type=Path, metavar="PATH",
                   help="store a calibration fitted on ALL queries of this run in PATH; refused "
                   "when the run has fewer out-of-collection queries than bound its 1 %% false "
                   "rate (100)")
    r.add_argument("--allow-small-calibration", action="store_true",
                   help="--save-calibration from fewer outsiders than bound the false rate (a "
                   "test's calibration: its threshold only excludes those outsiders), with a "
                   "warning")
    p.set_defaults(func=_eval)


def _root(args: argparse.Namespace) -> Path:
    from model.env import cache_dir

    return args.out or cache_dir() / "eval"


def queries_dir(root: Path, renderer: str | None) -> Path:
    """Where the query set rendered by ``renderer`` lives (None: the held-out default's)."""
    from index.evaluation.evalset import QuerySetConfig

    if renderer is None or renderer == QuerySetConfig.renderer:
        return root / "queries"
    return root / f"queries-{renderer}"


def _eval(args: argparse.Namespace) -> int:
    _check_args(args)  # before anything is loaded: a bad option is a one-line error, exit 2
    if args.top_k is None:
        from index.cascade_types import DEFAULT_TOP_K

        args.top_k = DEFAULT_TOP_K
    if args.action == "prepare-external":
        return _prepare_external(args)
    if args.n_generated_index is None:
        args.n_generated_index = 1000
    return _prepare(args) if args.action == "prepare" else _run(args)


def _check_args(args: argparse.Namespace) -> None:
    """The run's numeric and list options, checked: ``MidimatchError("bad_argument")``."""
    from model.errors import MidimatchError

    at_least = [("--top-k", args.top_k, 1), ("--prune-parts", args.prune_parts, 0),
                ("--batch", args.batch, 1), ("--threads", args.threads, 1),
                ("--max-pieces", args.max_pieces, 1), ("--baseline", args.baseline, 0)]
    for flag, value, low in at_least:
        if value is not None and value < low:
            raise MidimatchError(f"{flag} must be >= {low}, got {value}", reason="bad_argument")
    _lengths(args.lengths)
    _baseline_cells(args.baseline_cells)
    if args.allow_small_calibration and not args.save_calibration:
        raise MidimatchError("--allow-small-calibration goes with --save-calibration PATH",
                             reason="bad_argument")


def _lengths(text: str) -> set[float]:
    """``--lengths 5,10`` → {5.0, 10.0} (empty: every length)."""
    from model.errors import MidimatchError

    out = set()
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise MidimatchError(f"--lengths {text!r}: {item!r} is not a clip length in seconds "
                                 "(e.g. --lengths 5,10)", reason="bad_argument")
        out.add(value)
    return out


def _baseline_cells(text: str) -> list[tuple[str, float]]:
    """``--baseline-cells clean/5,room_noise/10`` → [("clean", 5.0), ("room_noise", 10.0)]."""
    from model.errors import MidimatchError

    cells = []
    for item in (x.strip() for x in text.split(",")):
        condition, _, length = item.partition("/")
        try:
            value = float(length)
        except ValueError:
            value = math.nan
        if not condition or not (math.isfinite(value) and value > 0):
            raise MidimatchError(f"--baseline-cells {text!r}: {item!r} is not CONDITION/LENGTH "
                                 f"(e.g. {BASELINE_CELLS})", reason="bad_argument")
        cells.append((condition, value))
    return cells


def _prepare_external(args: argparse.Namespace) -> int:
    from index.evaluation import external
    from index.evaluation.evalset import plan_collection
    from model.env import cache_dir
    from model.errors import MidimatchError
    from model.training.render import RENDERERS, available, install_hint

    renderers = tuple(x for x in args.renderers.split(",") if x) or external.RENDERERS
    unknown = [x for x in renderers if x not in RENDERERS]
    missing = [x for x in renderers if x in RENDERERS and not available(x)]
    if unknown or missing:
        raise SystemExit(f"midimatch eval prepare-external: unknown renderers {unknown}"
                         if unknown else f"midimatch eval prepare-external: {missing} not "
                         f"installed (sudo {install_hint(missing)})")
    try:
        sources = external.find_sources()
    except MidimatchError as e:
        raise SystemExit(f"midimatch eval prepare-external: {e.message}") from e
    out = args.out or cache_dir() / "external"
    distractors: list[str] = []
    if not args.no_distractors:
        corpus = args.corpus or cache_dir() / "corpus"
        try:
            distractors = plan_collection(corpus, n_generated_index=args.n_generated_index
                                          or 1800, n_in=0, n_out=0).index_files
        except MidimatchError as e:
            print(f"no distractors: {e.message}", file=sys.stderr)
    print(f"{len(sources.scores)} demo scores, the solfege pair, {len(sources.openmsx)} openmsx "
          f"files × {len(renderers)} renderers; {len(distractors)} distractors")
    t0 = time.perf_counter()
    rep = external.prepare(out, sources, renderers=renderers, distractors=distractors,
                           workers=args.workers, seed=args.seed, progress=not args.no_progress)
    print(f"{out}: {rep['n_refs']} references, clips per source {rep['clips_by_source']}, "
          f"{time.perf_counter() - t0:.0f} s {rep['seconds']}")
    for f in rep["failed"]:
        print(f"failed: {f['source']} {f['path']}: {f['error']}", file=sys.stderr)
    print(f"evaluate: midimatch eval --queries {out / 'queries'} --index {out / 'index'} "
          "--by-source")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from index.build import BuildOptions, build_index
    from index.evaluation.evalset import QuerySetConfig, make_queries, plan_collection
    from model.env import cache_dir
    from model.training.render import RENDERERS, available, install_hint

    renderers = [x for x in args.renderers.split(",") if x] or [QuerySetConfig.renderer]
    unknown = [x for x in renderers if x not in RENDERERS]
    if unknown:
        raise SystemExit(f"midimatch eval prepare: unknown renderers {unknown}; known: "
                         f"{', '.join(RENDERERS)}")
    missing = [x for x in renderers if not available(x)]
    if missing:
        raise SystemExit(f"midimatch eval prepare: {missing} not installed "
                         f"({install_hint(missing)})")
    root = _root(args)
    root.mkdir(parents=True, exist_ok=True)
    plan = plan_collection(args.corpus or cache_dir() / "corpus",
                           n_generated_index=args.n_generated_index, n_in=args.n_in,
                           n_out=args.n_out, seed=args.seed)
    (root / "collection.json").write_text(json.dumps(plan.__dict__, indent=1))
    print(f"plan: {len(plan.index_files)} files to index, {len(plan.in_pieces)} in-collection "
          f"and {len(plan.out_pieces)} out-of-collection query pieces; {plan.notes}")
    # --index / --weights: the index to build or bring up to date (default OUT/index with the
    # shipped model); a new shipped model otherwise finds OUT/index built by the old one
    indexes = [(args.index or root / "index", args.weights)]
    if args.untrained:
        from model.encoder import Encoder

        enc = Encoder.untrained()
        weights = root / "untrained.pt"
        enc.save(weights, model_id=enc.model_id)
        indexes.append((root / "index-untrained", str(weights)))
    for out, weights in indexes:
        rep = build_index(out, plan.index_files,
                          BuildOptions(weights=weights, workers=args.workers,
                                       progress=not args.no_progress))
        print(f"index {out}: {rep['n_refs']} references ({rep['encoded']} encoded, "
              f"{len(rep['skipped'])} skipped) in {rep['seconds']:.0f} s")
    for name in renderers:
        out = queries_dir(root, name)
        manifest = make_queries(plan, out, QuerySetConfig(seed=args.seed, renderer=name),
                                workers=args.workers, progress=not args.no_progress)
        print(f"queries {out} ({name}): {len(manifest['queries'])} clips, "
              f"{len(manifest['skipped'])} pieces skipped")
    return 0


def _select(queries: list[dict], args: argparse.Namespace) -> list[int]:
    from index.evaluation.evalset import select_queries

    return select_queries(queries, lengths=_lengths(args.lengths),
                          conditions={x for x in args.conditions.split(",") if x},
                          max_pieces=args.max_pieces or 0)


def _calibrations(report: dict, outcomes: list[dict]) -> None:
    from index.evaluation.evaluate import calibrate_halves
    from model.errors import MidimatchError

    for key, by_length in (("calibration_halves", False), ("calibration_halves_by_length", True)):
        try:
            report[key] = calibrate_halves(outcomes, report["model_id"], by_length=by_length)
        except MidimatchError as e:  # too few pieces for two halves: say so, keep the rest
            report[key + "_skipped"] = e.message
            print(f"{key} skipped: {e.message}", file=sys.stderr)


def _print_calibration(report: dict) -> None:
    for name, r in report.get("calibration_halves", {}).items():
        t = r["test"]["all"]
        print(f"one threshold, {name}: {r['threshold']:.3f} → on the other half "
              f"recall {_p(t['recall'])} %, false-confident {_p(t['false_confident'])} %, "
              f"confident-wrong {_p(t['confident_wrong'])} %")
    for length, halves in report.get("calibration_halves_by_length", {}).items():
        for name, r in halves.items():
            t = r["test"]["all"]
            print(f"{length} threshold, {name}: {r['threshold']:.3f} → other half recall "
                  f"{_p(t['recall'])} %, false-confident {_p(t['false_confident'])} %")


def _baseline(args: argparse.Namespace, report: dict, refs: list[dict], queries: list[dict],
              frames: list, refs_of: list, outcomes: list[dict]) -> dict | None:
    """Run the chroma baseline on ``--baseline`` queries per cell; add it to ``report``."""
    if args.baseline <= 0:
        return None
    from index.evaluation.baseline import ChromaMatcher
    from index.evaluation.evaluate import baseline_subset, run_baseline, summarize

    matcher = ChromaMatcher.build([r["path"] for r in refs], _root(args) / "chroma_cache.npz")
    cells = _baseline_cells(args.baseline_cells)
    chosen = baseline_subset(queries, cells, args.baseline)
    base_out = run_baseline(matcher, queries, frames, refs_of, chosen,
                            progress=not args.no_progress)
    base = summarize(base_out)
    # the cascade on exactly the baseline's queries, for a like-for-like comparison
    report["baseline"] = {"summary": base, "cascade_same_queries":
                          summarize([outcomes[i] for i in chosen], top_k=args.top_k),
                          "outcomes": base_out}
    return base


def _rescore(args: argparse.Namespace) -> int:
    from index.evaluation.evaluate import format_table, query_time, summarize

    if not (args.json_out and args.outcomes):
        raise SystemExit("midimatch eval --rescore needs --json REPORT and --outcomes FILE")
    report = json.loads(args.json_out.read_text())
    outcomes = json.loads(args.outcomes.read_text())
    for o in outcomes:
        if "stage_s" in o:
            o["time_s"] = query_time(o["stage_s"], o.get("batch_n", args.batch))
        for k in ("rank", "prune_rank"):
            if isinstance(o.get(k), str):
                o[k] = float(o[k])
    top_k = report.get("config", {}).get("top_k", args.top_k)
    report["summary"] = summarize(outcomes, top_k=top_k)
    report["rescored_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _calibrations(report, outcomes)
    if args.baseline > 0:  # the baseline on the same queries the saved outcomes came from
        from index.evaluation.evalset import load_queries
        from index.evaluation.evaluate import true_refs
        from index.store import load_index

        queries, frames = load_queries(args.queries or _root(args) / "queries")
        keep = _select(queries, args)
        queries, frames = [queries[i] for i in keep], [frames[i] for i in keep]
        if len(queries) != len(outcomes) or any(
                q["piece"] != o["piece"] or q["length_s"] != o["length_s"]
                for q, o in zip(queries, outcomes, strict=True)):
            raise SystemExit("midimatch eval --rescore: the outcomes are not of these queries "
                             "(give the same --lengths/--conditions/--max-pieces as their run)")
        refs = load_index(report["index"]).refs
        _baseline(args, report, refs, queries, frames, true_refs(refs, queries), outcomes)
        _write(args, report, outcomes)
    base = report.get("baseline", {}).get("summary")
    print(format_table(report["summary"], base, top_k=top_k))
    _print_calibration(report)
    _write(args, report, outcomes)
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.rescore:
        return _rescore(args)
    import torch

    from index.cascade_types import CascadeConfig
    from index.evaluation.evalset import load_queries
    from index.evaluation.evaluate import (
        answer_counts,
        format_table,
        run_cascade,
        summarize,
        true_refs,
    )
    from index.search import Cascade
    from model.errors import MidimatchError

    if args.threads:
        import numba

        # numba's OpenMP layer shares torch's thread pool and resets its size at its first
        # parallel kernel: both must be told, or torch runs on numba's count
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        torch.set_num_threads(args.threads)
    root = _root(args)
    index_dir = args.index or root / "index"
    if args.queries:
        query_dirs = [args.queries]
    else:
        names = [x for x in (args.renderer or "").split(",") if x] or [None]
        query_dirs = [queries_dir(root, name) for name in dict.fromkeys(names)]
    query_dir = ", ".join(str(d) for d in query_dirs)
    parts = {} if args.prune_parts is None else {"prune_parts": args.prune_parts}
    try:
        config = CascadeConfig(top_k=args.top_k, **parts)
    except ValueError as e:
        raise MidimatchError(str(e), reason="bad_argument") from None
    queries, frames = [], []
    for d in query_dirs:  # each set's records name its renderer
        q, f = load_queries(d)
        queries += q
        frames += f
    keep = _select(queries, args)
    queries, frames = [queries[i] for i in keep], [frames[i] for i in keep]
    if not queries:
        raise SystemExit("midimatch eval: no query left after --lengths/--conditions"
                         "/--max-pieces")
    small = _check_calibration_sample(args, queries)  # before the run, not after it
    cascade = Cascade.open(index_dir, weights=args.weights, config=config)
    refs_of = true_refs(cascade.index.refs, queries)
    t0 = time.perf_counter()
    outcomes = run_cascade(cascade, queries, frames, refs_of, batch_size=args.batch,
                           progress=not args.no_progress)
    wall = time.perf_counter() - t0
    summary = summarize(outcomes, top_k=args.top_k)
    report = {
        "command": " ".join(["midimatch", *sys.argv[1:]]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cpus": _cpus(), "torch_threads_at_end": torch.get_num_threads(),
                    "python": platform.python_version()},
        "index": str(index_dir), "n_refs": len(cascade.index), "model_id": cascade.encoder.model_id,
        "calibration": cascade.calibration.to_dict(),
        "config": {k: getattr(cascade.config, k) for k in cascade.config.__dataclass_fields__},
        "n_queries": len(queries), "wall_s": wall,
        "summary": summary,
        "summary_by_source": summarize(outcomes, top_k=args.top_k, by_source=True),
    }
    _calibrations(report, outcomes)
    _write(args, report, outcomes)  # the cascade's figures are safe before the slow baseline
    base = _baseline(args, report, cascade.index.refs, queries, frames, refs_of, outcomes)
    renderers = list(dict.fromkeys(q["renderer"] or "unknown" for q in queries))
    if len(renderers) > 1:  # one table per renderer, then the pooled one
        report["summary_by_renderer"] = {}
        for name in renderers:
            sub = [o for o, q in zip(outcomes, queries, strict=True)
                   if (q["renderer"] or "unknown") == name]
            report["summary_by_renderer"][name] = summarize(sub, top_k=args.top_k)
            print(f"{name} ({len(sub)} queries):")
            print(format_table(report["summary_by_renderer"][name], top_k=args.top_k))
        print(f"pooled, {' + '.join(renderers)} ({len(outcomes)} queries):")
    print(format_table(summary, base, top_k=args.top_k))
    if args.by_source:
        print(format_table(report["summary_by_source"], top_k=args.top_k))
    print(answer_counts(outcomes))
    _print_calibration(report)
    if args.save_calibration:
        from index.calibration import Fit, calibrate, save_calibration

        fit = Fit.now(renderers=[q["renderer"] or "unknown" for q in queries],
                      conditions=[q["condition"] for q in queries],
                      index_refs=len(cascade.index), command=report["command"])

        cal = calibrate([o["top1_confidence"] for o in outcomes if o["kind"] == "in"],
                        [o["top1_confidence"] for o in outcomes if o["kind"] == "out"],
                        model_id=cascade.encoder.model_id,
                        in_correct=[o["top1_ref"] == o["true_ref"] for o in outcomes
                                    if o["kind"] == "in"],
                        source=f"midimatch eval: {len(queries)} queries of {query_dir}"
                        + (f" ({small})" if small else ""), fit=fit)
        print(f"calibration saved to {save_calibration(cal, args.save_calibration)}: "
              f"threshold {cal.threshold:.3f}")
    _write(args, report, outcomes)
    return 0


def _check_calibration_sample(args: argparse.Namespace, queries: list[dict]) -> str | None:
    """For ``--save-calibration``: its file can be written, and the run has outsiders enough to
    bound the false rate (:func:`index.calibration.min_outsiders`), else ``MidimatchError``;
    with ``--allow-small-calibration`` too few are a warning, returned to go in the
    calibration's source. None without ``--save-calibration`` or with outsiders enough."""
    if not args.save_calibration:
        return None
    from index.calibration import (
        DEFAULT_MAX_FALSE_RATE,
        check_calibration_file,
        min_outsiders,
    )
    from model.errors import MidimatchError

    check_calibration_file(args.save_calibration)
    n_out = sum(q["kind"] == "out" for q in queries)
    need = min_outsiders(DEFAULT_MAX_FALSE_RATE)
    if n_out == 0:
        raise MidimatchError(f"--save-calibration: none of the {len(queries)} queries is out of "
                             "the collection, and the threshold is set by outsiders' confidences "
                             "(a set prepared with --n-out N; --conditions, --lengths may leave "
                             "them out)", reason="bad_calibration")
    if n_out >= need:
        return None
    why = (f"{n_out} out-of-collection queries cannot bound a "
           f"{100 * DEFAULT_MAX_FALSE_RATE:g} % false rate: {need} needed; the threshold would "
           "only sit above these outsiders' confidences")
    if not args.allow_small_calibration:
        raise MidimatchError(f"--save-calibration: {why}. Run on more outsiders (a set prepared "
                             "with a larger --n-out, fewer left out by --max-pieces, --lengths, "
                             "--conditions), or pass --allow-small-calibration to save it anyway",
                             reason="bad_calibration")
    print(f"warning: --allow-small-calibration: {why}", file=sys.stderr)
    return f"too few outsiders: {n_out} of the {need} that bound the false rate"


def _write(args: argparse.Namespace, report: dict, outcomes: list[dict]) -> None:
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(_jsonable(report), indent=1))
    if args.outcomes:
        args.outcomes.write_text(json.dumps(_jsonable(outcomes)))


def _p(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _jsonable(x):
    """inf/NaN → strings (JSON has neither)."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x
