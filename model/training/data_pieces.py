"""Which MIDI files training uses, what a piece is, and which split each piece belongs to.

A piece is its file's bytes (copies under other names are one piece), and its split follows from
its content hash alone, so a piece and all its renderings stay in one split whatever the order
of the files, the seed or the machine. Evaluation relies on that to keep training pieces out of
its queries (``index.evaluation.evalset``); the file lists here fix which works and generated
songs a training run sees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")


def piece_key(path: str | Path) -> str:
    """SHA-256 of the file's bytes: the identity of a piece (copies of a file are one piece)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def piece_id(key: str) -> int:
    """The int64 piece id stored in shards: the first 60 bits of the key."""
    return int(key[:15], 16)


def split_of(key: str, split: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """``train``, ``valid`` or ``test`` for a piece key, by where its hash falls in ``split``."""
    u = int(key[-16:], 16) / 2.0**64  # other bits than piece_id's: independent of it
    bounds = np.cumsum(split) / float(np.sum(split))
    return SPLITS[min(int(np.searchsorted(bounds, u, side="right")), len(SPLITS) - 1)]


def training_files(corpus_dir: str | Path, *, works: int | None = None,
                   generated: int = 250, generated_start: int = 0) -> list[Path]:
    """The MIDI files training uses: converted music21 works (all of them, or only the first
    ``works`` of :func:`model.training.corpus_works.list_corpus_works`' fixed order), then the
    generated songs of seeds ``generated_start .. generated_start + generated - 1`` that are
    cached (seed order).

    Raises
    ------
    MidimatchError
        ``reason="bad_range"`` from :func:`check_generated_range`.
    """
    from model.training.corpus import corpus_midi_files
    from model.training.corpus_works import list_corpus_works
    from model.training.songgen_files import generated_midi_files, song_seed

    check_generated_range(generated_start, generated)
    stop = generated_start + generated
    root = Path(corpus_dir)
    keys = None if works is None else {w.key for w in list_corpus_works()[:works]}
    songs = [p for p in generated_midi_files(root) if generated_start <= song_seed(p) < stop]
    return corpus_midi_files(root, keys=keys) + songs


def drop_pieces_of(files: Sequence[Path], corpus_dir: str | Path,
                   other_dir: str | Path) -> tuple[list[Path], int]:
    """Leave out the music21 works of ``corpus_dir`` among ``files`` whose notes equal those of
    a work of ``other_dir``: the same pitch-sequence fingerprint in the conversion manifests (as
    :func:`~model.training.corpus.corpus_midi_files` deduplicates within one folder), or the
    same bytes (:func:`piece_key`, for records without a fingerprint). Other files (generated
    songs) pass through.

    A training-only folder of works (``midimatch data corpus --out DIR --start 400``) can hold
    a work of the evaluation folder under another name (the corpus repeats tunes across
    collections); training on it would train on a measured piece. Near-duplicates (a transposed
    or ornamented variant) are not caught.

    Raises
    ------
    MidimatchError
        ``reason="no_data"`` when ``other_dir`` has no conversion manifest (a wrong path would
        otherwise check nothing), ``reason="bad_argument"`` when it is ``corpus_dir`` itself.

    Returns
    -------
    (list of Path, int)
        The files kept, in order, and how many were left out.
    """
    from model.errors import MidimatchError
    from model.training.corpus import MANIFEST_NAME, SUBDIR, read_manifest

    other, own = Path(other_dir), Path(corpus_dir)
    if not (other / SUBDIR / MANIFEST_NAME).is_file():
        raise MidimatchError(f"{other} holds no converted works ({SUBDIR}/{MANIFEST_NAME}): "
                             "name the folder `midimatch data corpus --out` wrote",
                             reason="no_data")
    if other.resolve() == own.resolve():
        raise MidimatchError(f"{own} cannot leave out its own works", reason="bad_argument")
    done = [r for r in read_manifest(other).values() if r.get("status") == "done"]
    prints = {r["fingerprint"] for r in done if r.get("fingerprint")}
    keys = {piece_key(other / SUBDIR / r["midi"]) for r in done
            if (other / SUBDIR / r["midi"]).exists()}
    folder = (own / SUBDIR).resolve()
    by_name = {r["midi"]: r for r in read_manifest(own).values() if r.get("status") == "done"}

    def clashes(f: Path) -> bool:
        f = Path(f)
        rec = by_name.get(f.name) if f.parent.resolve() == folder else None
        if rec is None:
            return False
        return rec.get("fingerprint") in prints or piece_key(f) in keys

    kept = [f for f in files if not clashes(f)]
    return kept, len(files) - len(kept)


def count_generated(files: Sequence[Path], corpus_dir: str | Path) -> int:
    """How many of ``files`` are generated songs of the cache ``corpus_dir`` (its ``generated/``
    folder; a folder of that name higher up the path does not count)."""
    from model.training.songgen_files import SUBDIR

    folder = Path(corpus_dir) / SUBDIR
    return sum(Path(f).parent == folder for f in files)


def check_generated_range(start: int, n: int) -> None:
    """Refuse generated seeds ``start .. start + n - 1`` that reach into evaluation's (from
    :data:`~model.training.songgen_files.TRAINED_SEEDS` up to
    :data:`~model.training.songgen_files.TRAINING_ONLY_SEED`): training on them would put the
    measured pieces into training.

    Raises
    ------
    MidimatchError
        ``reason="bad_range"``.
    """
    from model.errors import MidimatchError
    from model.training.songgen_files import TRAINED_SEEDS, TRAINING_ONLY_SEED

    stop = start + n
    if n > 0 and not (stop <= TRAINED_SEEDS or start >= TRAINING_ONLY_SEED):
        raise MidimatchError(
            f"generated seeds {start}..{stop - 1} reach into the ones evaluation indexes and "
            f"queries ({TRAINED_SEEDS}..{TRAINING_ONLY_SEED - 1}): train on seeds "
            f"0..{TRAINED_SEEDS - 1} or from {TRAINING_ONLY_SEED} on", reason="bad_range")


def corpus_files(corpus_dir: str | Path) -> list[Path]:
    """The cached collection: converted music21 works (deduplicated) and generated songs."""
    from model.training.corpus import corpus_midi_files

    root = Path(corpus_dir)
    return corpus_midi_files(root) + sorted((root / "generated").glob("*.mid"))
