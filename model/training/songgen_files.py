"""Procedural songs as a cache folder of MIDI files, made in parallel, never remade.

Training and evaluation ask for "the first N generated songs"; writing them once per cache keeps
those runs from paying the composer again, and seed order keeps "the first N" the same songs. A
folder remembers the generator version and settings that made it (``params.json``) and refuses
others: a file name (``song_<seed>.mid``) must always mean the same music.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

from model.errors import MidimatchError
from model.training.midi_writer import write_midi
from model.training.songgen import GENERATOR_VERSION, generate_song

SUBDIR = "generated"
# Seeds 0..TRAINED_SEEDS-1 are the generated songs training has always used (`train run`,
# `train prepare`'s default); from there up to TRAINING_ONLY_SEED they are evaluation's.
TRAINED_SEEDS = 250
# Seeds from here on are for training only: evaluation (``index.evaluation.evalset``) never
# indexes or queries them, so `train prepare --generated-start 10000` can add thousands of new
# pieces to training without touching the measured collection (seeds 0..2399 today).
TRAINING_ONLY_SEED = 10_000


def generate_songs(
    out_dir: Path,
    n: int,
    *,
    start_seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    duration_s: float | tuple[float, float] = (60.0, 240.0),
) -> list[Path]:
    """Write songs ``start_seed .. start_seed + n - 1`` as ``out_dir/generated/song_<seed>.mid``.

    Parameters
    ----------
    out_dir : Path
        Cache root.
    n : int
        Number of songs.
    start_seed : int
        First seed.
    workers : int
        Processes (1: in this process).
    progress : bool
        Show a tqdm progress bar.
    duration_s : float or (float, float)
        Passed to :func:`model.training.songgen.generate_song`.

    Returns
    -------
    list of Path
        All ``n`` paths in seed order; files already there are kept, not rewritten.

    Raises
    ------
    MidimatchError
        ``reason="stale_cache"`` when the folder holds songs from another generator version or
        other settings (its ``params.json`` differs): the same names would mean other music.
    """
    from tqdm import tqdm

    folder = Path(out_dir) / SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    _check_params(folder, {"version": GENERATOR_VERSION, "duration_s": duration_s})
    seeds = range(start_seed, start_seed + n)
    paths = [folder / f"song_{seed:05d}.mid" for seed in seeds]
    todo = [(s, str(p), duration_s) for s, p in zip(seeds, paths, strict=True) if not p.exists()]
    bar = tqdm(total=len(todo), disable=not progress, unit="song", desc="songs")
    if workers <= 1 or len(todo) < 32:  # a pool costs ~0.5 s to start
        for task in todo:
            _write_song(task)
            bar.update(1)
    else:
        # spawn, not fork: the caller may hold threads (tqdm's monitor) whose locks fork copies.
        with mp.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_song, todo, chunksize=8):
                bar.update(1)
    bar.close()
    return paths


def generated_midi_files(out_dir: Path) -> list[Path]:
    """Songs written by :func:`generate_songs` under ``out_dir/generated``, in seed order."""
    return sorted((Path(out_dir) / SUBDIR).glob("song_*.mid"), key=song_seed)


def song_seed(path: str | Path) -> int:
    """The seed of a generated song's file (``song_<seed>.mid``)."""
    return int(Path(path).stem.rsplit("_", 1)[1])


def _write_song(task: tuple[int, str, float | tuple[float, float]]) -> None:
    seed, path, duration_s = task
    pm = generate_song(seed, duration_s=duration_s)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write_midi(pm, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_params(folder: Path, params: dict[str, object]) -> None:
    path = folder / "params.json"
    want = json.loads(json.dumps(params))  # tuples → lists, as they come back from the file
    if path.exists():
        have = json.loads(path.read_text())
        if have != want:
            raise MidimatchError(
                f"{folder} holds songs made with {have}, not {want}; use another folder",
                reason="stale_cache",
            )
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(want))
    os.replace(tmp, path)
