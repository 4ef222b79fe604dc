"""Quiet at a query's edges: identification of clips that start or end with silence.

    python bench/edges.py [--renderers a,b] [--eval DIR] [--index DIR] [--max-pieces N]
                          [--length S] [--lead-s S] [--tail-s S] [--json FILE]

A recording starts before the music and goes on after it; a piece starts and ends with a rest.
The evaluation's clips (``midimatch eval prepare``) start and end inside the music, so they do
not show what the quiet at the edges does. Here each in-collection piece of the evaluation
collection is rendered by each engine twice, its first ``--length`` seconds (from its first
note) and its last, and searched four ways: the opening as rendered and after ``--lead-s`` of
digital silence, the ending as rendered (the release of its last notes) and followed by
``--tail-s`` of silence. Each clip is searched as ``midimatch identify`` does
(:meth:`index.search.Cascade.search_audio`: the quiet at the edges left out,
:func:`model.features.music_span`) and, as the baseline in the same run, whole (the whole
clip's frames, which is what the search did before). Rows: top-1 %, the share
decided (confidence over the loaded calibration's threshold, right or wrong) and the median
confidence of right answers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table  # noqa: E402
from model.env import cache_dir  # noqa: E402


def clips_of(path: str, renderer: str, length_s: float, lead_s: float, tail_s: float
             ) -> dict[str, np.ndarray]:
    """The four clips of one piece (module docstring), at the model's sample rate."""
    from model.features import SAMPLE_RATE
    from model.midi import load_midi
    from model.training.data_pair import excerpt
    from model.training.render import render

    pm = load_midi(path)
    end = float(pm.get_end_time())
    first = min(n.start for inst in pm.instruments for n in inst.notes)
    opening = render(excerpt(pm, first, length_s), renderer)
    ending = render(excerpt(pm, max(first, end - length_s), length_s), renderer)
    lead = np.zeros(int(lead_s * SAMPLE_RATE), np.float32)
    tail = np.zeros(int(tail_s * SAMPLE_RATE), np.float32)
    return {"opening": opening, f"{lead_s:g} s silence + opening": np.concatenate([lead, opening]),
            "ending": ending, f"ending + {tail_s:g} s silence": np.concatenate([ending, tail])}


def search(cascade, audio: np.ndarray, whole: bool):
    """``cascade.search_audio`` (the quiet at the edges left out), or with ``whole`` what it did
    before: the whole clip's frames searched (the silence check never refuses these clips)."""
    from model.features import SAMPLE_RATE, audio_to_frames

    if whole:
        return cascade.search_frames(audio_to_frames(audio, SAMPLE_RATE))
    return cascade.search_audio(audio, SAMPLE_RATE)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--renderers", default="timidity-freepats,csound-fm")
    ap.add_argument("--eval", type=Path, default=None, help="the evaluation folder "
                    "(default $MIDIMATCH_CACHE/eval, made by `midimatch eval prepare`)")
    ap.add_argument("--index", type=Path, default=None, help="default: the eval folder's index")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--max-pieces", type=int, default=100)
    ap.add_argument("--length", type=float, default=10.0)
    ap.add_argument("--lead-s", type=float, default=2.0)
    ap.add_argument("--tail-s", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from index.search import Cascade
    from model.errors import MidimatchError

    torch.set_num_threads(args.threads)
    root = args.eval or cache_dir() / "eval"
    coll_file = root / "collection.json"
    if not coll_file.is_file():
        print(f"no evaluation collection at {coll_file}: run `midimatch eval prepare` first",
              file=sys.stderr)
        return 2
    pieces = json.loads(coll_file.read_text())["in_pieces"][:args.max_pieces]
    cascade = Cascade.open(args.index or root / "index", args.weights)
    by_path = {r["path"]: i for i, r in enumerate(cascade.index.refs)}
    threshold = cascade.calibration.threshold
    rows, t0 = [], time.perf_counter()
    for renderer in args.renderers.split(","):
        tally: dict[tuple[str, str], list[tuple[bool, float]]] = {}
        errors = 0
        for k, piece in enumerate(pieces):
            try:
                clips = clips_of(piece["path"], renderer, args.length, args.lead_s, args.tail_s)
            except MidimatchError as e:
                errors += 1
                print(f"  {piece['path']}: {e.reason}", file=sys.stderr)
                continue
            truth = by_path.get(piece["path"])
            for name, audio in clips.items():
                for mode in ("edges left out", "whole (before)"):
                    try:
                        m = search(cascade, audio, mode.startswith("whole")).matches
                    except MidimatchError:
                        m = []
                    right = bool(m) and m[0].ref == truth
                    tally.setdefault((name, mode), []).append(
                        (right, m[0].confidence if m else 0.0))
            print(f"\r{renderer}: {k + 1}/{len(pieces)} pieces", end="", file=sys.stderr)
        print(file=sys.stderr)
        for (name, mode), got in tally.items():
            conf_right = [c for r, c in got if r]
            rows.append({"renderer": renderer, "clip": name, "search": mode, "n": len(got),
                         "top-1 %": round(100 * np.mean([r for r, _ in got]), 1),
                         "decided %": round(100 * np.mean([c >= threshold for _, c in got]), 1),
                         "median conf (right)": round(statistics.median(conf_right), 3)
                         if conf_right else None,
                         "render errors": errors})
    print(f"# bench/edges.py — {machine()}, {len(cascade.index)} references, model "
          f"{cascade.encoder.model_id}, threshold {threshold:.3f}, {args.length:g} s clips, "
          f"{time.perf_counter() - t0:.0f} s")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows,
                                         "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
