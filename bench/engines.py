"""Identification per renderer: one row per way of making sound, the worst row is the figure.

    python bench/engines.py [--renderers a,b] [--eval DIR] [--index DIR] [--weights W]
                            [--lengths 5,10,20] [--max-pieces N] [--json FILE]

The model is judged by sound it never heard, and one held-out renderer that sounds like the
training ones predicts little (TiMidity + freepats read 98.8 % top-1 at 10 s where real renders
of an unknown synthesiser read 83 %). So every query set ``midimatch eval prepare --renderers``
made (``$MIDIMATCH_CACHE/eval/queries`` for TiMidity, ``queries-NAME`` for the others: the same
pieces, starts and conditions, rendered by another engine) is searched against the same index
with the same cascade, and each renderer gets its own row: its family and role (``train``:
heard in training, ``held-out``: never), top-1 at 5 / 10 / 20 s clean and 10 s room + noise,
the prune's recall@100 at 10 s, the right passage (or an identical repeat) among right 10 s
answers, and the out-of-collection clips that came back identified at 10 s. The last line names
the worst held-out row.

``--queries DIR --index DIR`` reads one query set whose clips come from several sources instead
(``midimatch eval prepare-external``: MuseScore's and solfege's own MIDI/audio pairs and the
openmsx files per renderer, ``index/evaluation/external.py``) and gives each source its row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table  # noqa: E402
from model.env import cache_dir  # noqa: E402

CELLS = (("clean", 5.0), ("clean", 10.0), ("room_noise", 10.0), ("clean", 20.0))


def query_sets(root: Path) -> dict[str, Path]:
    """Renderer name → its prepared query set under ``root`` (the eval folder)."""
    from index.evaluation.evalset import QuerySetConfig

    found = {}
    for d in sorted(root.glob("queries*")):
        if (d / "queries.json").is_file():
            name = QuerySetConfig.renderer if d.name == "queries" else d.name[len("queries-"):]
            found[name] = d
    return found


def engine_row(name: str, summary: dict, renderer: str | None = None) -> dict:
    """One table row from :func:`index.evaluation.evaluate.summarize`'s cells; family and role
    are ``renderer``'s (default ``name``), or a pair source's of prepare-external."""
    from index.evaluation.external import PAIR_SOURCES
    from model.training import render

    renderer = renderer or name
    r = render.RENDERERS.get(renderer)
    family, role = (r.family, render.role(renderer)) if r else PAIR_SOURCES.get(name, ("?", "?"))

    def cell(cond: str, length: float, key: str) -> float | str:
        v = summary.get(f"{cond}/{length:g}", {}).get(key)
        return "-" if v is None else round(100.0 * v, 1)

    row = {"renderer": name, "family": family, "role": role,
           "n_in": summary.get("clean/10", {}).get("n_in", 0),
           "n_out": summary.get("clean/10", {}).get("n_out", 0)}
    for cond, length in CELLS:
        row[f"top1 {cond} {length:g}s"] = cell(cond, length, "top1")
    row["prune@100 10s"] = cell("all", 10.0, "prune_recall@100")
    row["passage 10s"] = cell("clean", 10.0, "position_within_1s_or_repeat")
    row["false id 10s"] = cell("all", 10.0, "false_confident")
    return row


def source_rows(summary_by_source: dict) -> list[dict]:
    """One row per source of ``summarize(..., by_source=True)`` (keys ``source:cond/len``);
    ``openmsx/NAME`` takes renderer NAME's family and role."""
    per: dict[str, dict] = {}
    for key, cell in summary_by_source.items():
        source, group = key.rsplit(":", 1)
        per.setdefault(source, {})[group] = cell
    return [engine_row(s, per[s], s.rsplit("/", 1)[-1]) for s in sorted(per)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval", type=Path, help="eval folder (default $MIDIMATCH_CACHE/eval)")
    ap.add_argument("--renderers", default="", help="only these (default: every query set)")
    ap.add_argument("--queries", type=Path, help="one query set, a row per source of its clips "
                    "(midimatch eval prepare-external's OUT/queries; give --index)")
    ap.add_argument("--index", type=Path, help="index (default: EVAL/index)")
    ap.add_argument("--weights", help="model weights (default: the shipped model)")
    ap.add_argument("--lengths", default="5,10,20")
    ap.add_argument("--conditions", default="clean,room_noise")
    ap.add_argument("--max-pieces", type=int, default=0, help="at most N pieces of each kind")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hash-prune", type=int, default=None, metavar="N",
                    help="references taken from the coarse hash-DTW prune (default: the "
                    "cascade's; 0: the embedding prune alone, the cascade before 2026-12-04)")
    ap.add_argument("--json", type=Path, help="write the rows and summaries here")
    args = ap.parse_args()

    import numba
    import torch

    from index.evaluation.evalset import load_queries, select_queries
    from index.evaluation.evaluate import run_cascade, summarize, true_refs
    from index.search import Cascade

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(args.threads)
    root = args.eval or cache_dir() / "eval"
    sets = {"": args.queries} if args.queries else query_sets(root)
    wanted = [x for x in args.renderers.split(",") if x and not args.queries] or list(sets)
    missing = [x for x in wanted if x not in sets]
    if missing or not wanted:
        sys.exit(f"no query set for {missing or 'any renderer'} under {root}: run `midimatch "
                 f"eval prepare --renderers {','.join(missing) or 'NAME,...'}`")
    cascade = Cascade.open(args.index or root / "index", weights=args.weights)
    if args.hash_prune is not None:
        cascade = cascade.with_config(hash_prune=args.hash_prune)
    lengths = {float(x) for x in args.lengths.split(",") if x}
    conds = {x for x in args.conditions.split(",") if x}
    rows, report = [], {"machine": machine(), "model_id": cascade.encoder.model_id,
                        "n_refs": len(cascade.index), "hash_prune": cascade.config.hash_prune,
                        "top_k": cascade.config.top_k, "renderers": {}}
    for name in wanted:
        queries, frames = load_queries(sets[name])
        keep = select_queries(queries, lengths=lengths, conditions=conds,
                              max_pieces=args.max_pieces)
        queries, frames = [queries[i] for i in keep], [frames[i] for i in keep]
        t0 = time.perf_counter()
        outcomes = run_cascade(cascade, queries, frames, true_refs(cascade.index.refs, queries),
                               progress=False)
        summary = summarize(outcomes, by_source=bool(args.queries))
        if args.queries:
            rows += source_rows(summary)
        else:
            rows.append(engine_row(name, summary))
        report["renderers"][name] = {"summary": summary, "n_queries": len(queries),
                                     "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name or args.queries}: {len(queries)} clips in "
              f"{report['renderers'][name]['seconds']} s", file=sys.stderr)
    print(f"# identification per renderer — {machine()}; model {cascade.encoder.model_id}, "
          f"{len(cascade.index):,} references, {cascade.config.top_k} verified "
          f"({cascade.config.hash_prune} from the hash prune); % of clips")
    print(table(rows))
    held = [r for r in rows if r["role"] == "held-out"
            and isinstance(r["top1 clean 10s"], float)]
    if held:
        worst = min(held, key=lambda r: r["top1 clean 10s"])
        print(f"worst held-out renderer at 10 s clean: {worst['renderer']} "
              f"({worst['top1 clean 10s']} % top-1)")
    if args.json:
        args.json.write_text(json.dumps({**report, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
