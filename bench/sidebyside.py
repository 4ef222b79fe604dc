"""Side by side on the held-out renderer: 16 vs 32 bits, synthesised vs fast-rendered MIDI side.

    python bench/sidebyside.py prepare [--every 4] [--generated 100] [--max-piece-s 30]
    python bench/sidebyside.py fit --bits 32 --max-batches 525 --out FILE
    python bench/sidebyside.py refs --pieces 150 --refs 500 --out FILE
    python bench/sidebyside.py run --pieces 150 --top-k 73 --row NAME=INDEX:WEIGHTS \
        [--row ...] [--json-dir DIR]
    python bench/sidebyside.py table --json-dir DIR

``prepare`` builds the small training set of the comparison (``midimatch train prepare`` on a
quarter of the music21 works, every ``--every``-th, and generated songs 0 … ``--generated``-1,
all within the shipped model's training seeds, 2 renders each, excerpts ≤ ``--max-piece-s``)
into ``$MIDIMATCH_CACHE/train-sbs`` (resumable, like ``prepare``). Train on it with
``midimatch train fit --data ~/.cache/midimatch/train-sbs --bits B --hash-minutes M
--embed-minutes M --out ~/.cache/midimatch/models/NAME.pt`` (same budget), or with ``fit``:
the same training stopped after ``--max-batches`` batches per stage (same work whatever the
machine's load).

``refs`` writes the reference subset used for the synth-vs-fast comparison (synthesis costs
~1 s per file here, too slow for the whole 2,055-file evaluation collection): the first
``--pieces`` in-collection query pieces of ``midimatch eval`` (the ones ``--max-pieces`` keeps)
plus evenly spaced other files of the collection, ``--refs`` in all, one path per line. Build an
index of it with ``midimatch index build OUT $(cat FILE) --method fast|synth``.

``run`` runs ``midimatch eval`` once per row (an index and the weights that built it) on the
same queries (5/10/20 s, clean and room + noise, ``--pieces`` pieces of each kind), writes each
report to ``DIR/NAME.json`` and prints one table: top-1 / top-5 per length and condition,
embedding prune recall@K over all lengths and the median ms per query. ``--top-k`` is the prune's
K: keep it at the same fraction of the references across index sizes (the product's 300 of the
2,055-file collection ≈ 73 of the 498-file subset), or the prune keeps most of a small index. The
false-confident rate is left out: it depends on each model's calibrated threshold, which only the
shipped model has. ``table`` prints that table again from the reports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table  # noqa: E402

LENGTHS = (5.0, 10.0, 20.0)
CONDITIONS = ("clean", "room_noise")
CACHE = Path.home() / ".cache" / "midimatch"
EVAL = CACHE / "eval"


def query_pieces(queries: list[dict], n_pieces: int) -> list[str]:
    """The in-collection pieces ``midimatch eval --max-pieces n_pieces`` keeps for our cells.

    Parameters
    ----------
    queries : the records of ``queries.json``
    n_pieces : how many pieces

    Returns
    -------
    list of str, piece paths in order of first appearance (as ``eval``'s selection does)
    """
    out: list[str] = []
    for q in queries:
        if (q["kind"] == "in" and q["length_s"] in LENGTHS and q["condition"] in CONDITIONS
                and q["piece"] not in out and len(out) < n_pieces):
            out.append(q["piece"])
    return out


def reference_subset(collection: list[str], queries: list[dict], n_pieces: int,
                     n_refs: int) -> list[str]:
    """The query pieces plus ``n_refs - n_pieces`` evenly spaced other files of the collection.

    Parameters
    ----------
    collection : ``index_files`` of ``collection.json``
    queries : the records of ``queries.json``
    n_pieces, n_refs : query pieces kept, references in all (``n_refs >= n_pieces``)

    Returns
    -------
    list of str, sorted paths
    """
    pieces = query_pieces(queries, n_pieces)
    if n_refs < len(pieces):
        raise SystemExit(f"--refs {n_refs} is fewer than the {len(pieces)} query pieces")
    chosen = set(pieces)
    others = sorted(p for p in collection if p not in chosen)
    n_fill = min(n_refs - len(pieces), len(others))
    step = len(others) / n_fill if n_fill else 0.0
    return sorted([*pieces, *(others[int(i * step)] for i in range(n_fill))])


def eval_command(index: str, weights: str, n_pieces: int, top_k: int,
                 json_out: Path) -> list[str]:
    """The ``midimatch eval`` command line of one row."""
    return [str(Path(sys.executable).with_name("midimatch")), "eval", "--index", index,
            "--weights", weights, "--lengths", ",".join(f"{x:g}" for x in LENGTHS),
            "--conditions", ",".join(CONDITIONS), "--max-pieces", str(n_pieces),
            "--top-k", str(top_k), "--threads", "1", "--no-progress", "--json", str(json_out)]


def row_of(name: str, report: dict) -> dict:
    """One table row from a ``midimatch eval --json`` report."""
    s = report["summary"]
    row: dict = {"row": name, "model": report["model_id"], "refs": report["n_refs"],
                 "queries": report["n_queries"]}
    for cond in CONDITIONS:
        for length in LENGTHS:
            g = s[f"{cond}/{length:g}"]
            row[f"{cond} {length:g}s top1/top5 %"] = (
                f"{100 * g['top1']:.1f} / {100 * g['top5']:.1f}")
    ins = [s[f"all/{x:g}"] for x in LENGTHS]
    n_in = sum(g["n_in"] for g in ins)
    k = report["config"]["top_k"]
    row[f"recall@{k} %"] = round(100 * sum(g[f"prune_recall@{k}"] * g["n_in"] for g in ins)
                                 / n_in, 1)
    row["ms/query"] = round(1000 * sum(g["time_per_query_median_s"] for g in ins) / len(ins))
    return row


def _print_table(names: list[str], json_dir: Path) -> None:
    rows = [row_of(n, json.loads((json_dir / f"{n}.json").read_text())) for n in names]
    print(f"{machine()}\n")
    print(table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("refs", help="write the reference subset (one path a line)")
    r.add_argument("--pieces", type=int, default=150)
    r.add_argument("--refs", type=int, default=500)
    r.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("run", help="run midimatch eval per row and print the table")
    e.add_argument("--pieces", type=int, default=150)
    e.add_argument("--top-k", type=int, default=300, help="references kept by the prune")
    e.add_argument("--row", action="append", required=True, metavar="NAME=INDEX:WEIGHTS")
    e.add_argument("--json-dir", type=Path, default=CACHE / "sidebyside")
    t = sub.add_parser("table", help="print the table from the reports of an earlier run")
    t.add_argument("names", nargs="+")
    t.add_argument("--json-dir", type=Path, default=CACHE / "sidebyside")
    p = sub.add_parser("prepare", help="build the comparison's training pairs")
    p.add_argument("--every", type=int, default=4, help="every N-th music21 work")
    p.add_argument("--generated", type=int, default=100)
    p.add_argument("--max-piece-s", type=float, default=30.0)
    p.add_argument("--out", type=Path, default=CACHE / "train-sbs")
    f = sub.add_parser("fit", help="train on the comparison's pairs for a fixed number of batches")
    f.add_argument("--bits", type=int, choices=(16, 32), default=32)
    f.add_argument("--max-batches", type=int, required=True, help="per stage")
    f.add_argument("--data", type=Path, default=CACHE / "train-sbs")
    f.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    if args.cmd == "prepare":
        from model.training.data import prepare
        from model.training.data_pieces import corpus_files

        corpus = CACHE / "corpus"
        works = [f for f in corpus_files(corpus) if "generated" not in f.parts]
        songs = sorted((corpus / "generated").glob("*.mid"))[: args.generated]
        report = prepare(args.out, works[:: args.every] + songs, renders_per_piece=2,
                         max_piece_s=args.max_piece_s, workers=2, seed=0)
        print(json.dumps(report, indent=1, default=str))
    elif args.cmd == "fit":
        from model.nets import NetConfig
        from model.training.train import train

        ckpt = CACHE / "train" / f"{args.out.stem}.ckpt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)  # train() makes only the out folder
        report = train(args.data, args.out, config=NetConfig(n_bits=args.bits),
                       hash_minutes=60.0, embed_minutes=60.0, seed=0, num_threads=1,
                       max_batches=args.max_batches, checkpoint_path=ckpt, progress=False)
        print(json.dumps({k: v for k, v in report.items() if k not in ("hash", "embed")},
                         indent=1, default=str))
    elif args.cmd == "refs":
        collection = json.loads((EVAL / "collection.json").read_text())["index_files"]
        queries = json.loads((EVAL / "queries" / "queries.json").read_text())["queries"]
        paths = reference_subset(collection, queries, args.pieces, args.refs)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(f"{p}\n" for p in paths))
        print(f"{len(paths)} references → {args.out}")
    elif args.cmd == "run":
        args.json_dir.mkdir(parents=True, exist_ok=True)
        names = []
        for spec in args.row:
            name, _, rest = spec.partition("=")
            index, _, weights = rest.partition(":")
            if not (name and index and weights):
                raise SystemExit(f"--row {spec!r}: expected NAME=INDEX:WEIGHTS")
            cmd = eval_command(index, weights, args.pieces, args.top_k,
                               args.json_dir / f"{name}.json")
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            names.append(name)
        _print_table(names, args.json_dir)
    else:
        _print_table(args.names, args.json_dir)


if __name__ == "__main__":
    main()
