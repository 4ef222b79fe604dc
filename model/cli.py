"""``midimatch data corpus|generate``: rebuild the MIDI collections kept outside git."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build the MIDI data kept in the cache (not in git)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    c = dsub.add_parser("corpus", help="convert the music21 corpus to MIDI (cached, resumable)")
    c.add_argument("--out", type=Path, help="cache folder (default: $MIDIMATCH_CACHE/corpus)")
    c.add_argument("--limit", type=int, help="convert at most N works")
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per work")
    c.set_defaults(func=_corpus)

    g = dsub.add_parser("generate", help="write procedurally generated pop-like songs")
    g.add_argument("-n", type=int, default=1000, help="number of songs (default 1000)")
    g.add_argument("--out", type=Path, help="cache folder (default: $MIDIMATCH_CACHE/corpus)")
    g.add_argument("--start-seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=2)
    g.set_defaults(func=_generate)


def _default_out(args: argparse.Namespace) -> Path:
    from server.cli import cache_dir

    return args.out or cache_dir() / "corpus"


def _corpus(args: argparse.Namespace) -> int:
    from model.corpus import convert_music21_corpus

    report = convert_music21_corpus(_default_out(args), limit=args.limit, workers=args.workers,
                                    timeout_s=args.timeout)
    print(json.dumps(report, indent=2, default=str))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from model.songgen import generate_songs

    paths = generate_songs(_default_out(args), args.n, start_seed=args.start_seed,
                           workers=args.workers)
    print(f"{len(paths)} songs under {_default_out(args) / 'generated'}")
    return 0
