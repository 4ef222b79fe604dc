"""Index build throughput and size: files/s on this machine's cores and bytes per reference.

    python bench/index_build.py [--files 1000] [--workers 2]

Uses real MIDI: part of the music21 corpus converted to MIDI plus procedurally generated songs
(both cached under $MIDIMATCH_CACHE/corpus and rebuilt when missing). Baselines in the same run:
the same build on one worker (scaling), and the synthesis render path on a subset.
Targets: ≥ 25 files/s on 2 cores, ≤ 40 KB per reference.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table  # noqa: E402


def collect_files(cache: Path, n: int, corpus_limit: int) -> list[Path]:
    from model.training.corpus import convert_music21_corpus, corpus_midi_files
    from model.training.songgen_files import generate_songs

    corpus = corpus_midi_files(cache)
    if len(corpus) < corpus_limit:
        convert_music21_corpus(cache, limit=corpus_limit, workers=2)
        corpus = corpus_midi_files(cache)
    corpus = corpus[: min(len(corpus), corpus_limit, n)]
    generated = generate_songs(cache, max(0, n - len(corpus)), workers=2)
    return [*corpus, *generated][:n]


def link_files(files: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, f in enumerate(files):
        (folder / f"{i:05d}_{f.name}").symlink_to(f)
    return folder


def run(files: list[Path], workers: int, method: str, tmp: Path, label: str) -> dict:
    from index.build import BuildOptions, build_index

    src = link_files(files, tmp / f"src-{label}")
    t0 = time.perf_counter()
    rep = build_index(tmp / f"idx-{label}", [src],
                      BuildOptions(workers=workers, method=method, progress=True))
    wall = time.perf_counter() - t0
    return {
        "build": label,
        "method": method,
        "workers": workers,
        "files": len(files),
        "indexed": rep["n_refs"],
        "skipped": len(rep["skipped"]),
        "wall_s": wall,
        "files_per_s": len(files) / wall,
        "KB_per_ref": (rep["bytes_per_ref"] or 0) / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--corpus", type=int, default=400, help="music21 works among the files")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--subset", type=int, default=100, help="files for the baselines")
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args()

    from model.env import cache_dir

    cache = args.cache or cache_dir() / "corpus"
    files = collect_files(cache, args.files, args.corpus)
    tmp = Path(tempfile.mkdtemp(prefix="mm-bench-"))
    try:
        rows = [run(files, args.workers, "fast", tmp, "all-fast")]
        sub = files[:: max(1, len(files) // args.subset)][: args.subset]
        rows.append(run(sub, 1, "fast", tmp, "subset-fast-1w"))
        rows.append(run(sub, args.workers, "fast", tmp, "subset-fast"))
        rows.append(run(sub, args.workers, "synth", tmp, "subset-synth"))
        from index.store import load_index

        idx = load_index(tmp / "idx-all-fast")
        total_min = sum(r["duration_s"] for r in idx.refs) / 60
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nindex build — {machine()}")
    print(f"{len(files)} MIDI files ({sum('music21' in str(f) for f in files)} music21 corpus, "
          f"rest generated), {total_min:.0f} minutes of music\n")
    print(table(rows, ["build", "method", "workers", "files", "indexed", "skipped", "wall_s",
                       "files_per_s", "KB_per_ref"]))
    fast, one = rows[2]["files_per_s"], rows[1]["files_per_s"]
    print(f"\nscaling 1 → {args.workers} workers: ×{fast / one:.2f}; "
          f"fast render vs synthesis: ×{fast / rows[3]['files_per_s']:.1f}")
    print("targets: ≥ 25 files/s on 2 cores, ≤ 40 KB per reference")


if __name__ == "__main__":
    main()
