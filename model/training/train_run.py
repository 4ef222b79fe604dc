"""``midimatch train run``: the shipped model from a fresh machine in one command, on a deadline.

Four steps, each cached and resumable, so a second run skips what the first finished:

1. convert the first ``works`` music21 works to MIDI
(:func:`model.training.corpus.convert_music21_corpus`);
2. write the first ``generated`` procedural songs
(:func:`model.training.songgen_files.generate_songs`);
3. render and augment them into aligned pairs (:func:`model.training.data.prepare`);
4. train both stages (:func:`model.training.train.train`) with whatever time is left before the
deadline,
   split between the hash and embedding stages by ``hash_share``.

The whole run, data steps included, ends within ``minutes`` (less a small overrun for the last
validation and the plots, which ``reserve_minutes`` sets aside). The report written beside the
weights (``<stem>.train.json``) gains a ``run`` entry: the seconds of every step and the load
average seen while training, so a figure measured on a busy machine says so.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.errors import MidimatchError

MIN_FIT_MINUTES = 4.0  # less than this left for training is a budget error, not a model


class LoadSampler:
    """Samples the 1-minute load average every ``every_s`` seconds on a daemon thread."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), daemon=True)

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float | int | None]:
        s = sorted(self.samples)
        if not s:
            return {"samples": 0, "min": None, "median": None, "max": None}
        return {"samples": len(s), "min": s[0], "median": s[len(s) // 2], "max": s[-1]}


def fit_budget(left_s: float, hash_share: float, reserve_minutes: float) -> tuple[float, float]:
    """Minutes for the (hash, embed) stages out of ``left_s`` seconds before the deadline."""
    if not 0.0 < hash_share < 1.0:
        raise MidimatchError(f"hash_share must be in (0, 1), got {hash_share}",
                             reason="bad_argument")
    fit = left_s / 60.0 - reserve_minutes
    if fit < MIN_FIT_MINUTES:
        raise MidimatchError(
            f"only {left_s / 60:.1f} min were left for training after the data steps "
            f"(at least {MIN_FIT_MINUTES + reserve_minutes:.1f} needed); give a larger --minutes "
            "or run again: the data steps are cached and a second run starts training at once",
            reason="budget")
    return fit * hash_share, fit * (1.0 - hash_share)


def train_run(corpus: Path, pairs: Path, out: Path, checkpoint: Path, *, minutes: float = 60.0,
              works: int = 400, generated: int = 250, renders: int = 2,
              max_piece_s: float = 60.0, hash_share: float = 0.45,
              reserve_minutes: float = 1.5, bits: int = 32, seed: int = 0,
              device: str = "auto", workers: int = 2,
              say: Callable[[str], None] = print,
              clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Run the four steps and return the training report (with its ``run`` entry).

    Parameters
    ----------
    corpus : the MIDI cache (``music21/`` and ``generated/`` under it).
    pairs : the training pairs folder.
    out : the weights file written at the end (default in the CLI: the shipped model).
    checkpoint : the resumable training checkpoint.
    minutes : wall-clock budget of the whole run, data steps included.
    works, generated : how many music21 works (the first of the fixed list) and generated songs.
    renders, max_piece_s : renders per piece and excerpt length cap of
    :func:`model.training.data.prepare`.
    hash_share : the hash stage's share of the training time; the embedding stage gets the rest.
    reserve_minutes : kept back for the last validation, the weights file and the plots.
    """
    from model.nets import NetConfig
    from model.training.corpus import convert_music21_corpus
    from model.training.data import prepare, training_renderers
    from model.training.data_pieces import check_generated_range, count_generated, training_files
    from model.training.songgen_files import generate_songs
    from model.training.train import train

    training_renderers()  # before the first minute is spent: a missing soundfont fails here
    check_generated_range(0, generated)  # and so does a count reaching into evaluation's seeds
    start = clock()
    deadline = start + 60.0 * minutes
    steps: dict[str, float] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        say(f"[{(clock() - start) / 60:5.1f} min] {name} ...")
        t0 = clock()
        result = fn()
        steps[name] = round(clock() - t0, 1)
        return result

    conv = step("corpus", lambda: convert_music21_corpus(corpus, limit=works, workers=workers))
    step("generate", lambda: generate_songs(corpus, generated, workers=workers))
    files = training_files(corpus, works=works, generated=generated)
    n_generated = count_generated(files, corpus)
    if not files:
        raise MidimatchError(f"no MIDI under {corpus} after the data steps", reason="no_data")
    prep = step("prepare", lambda: prepare(pairs, files, renders_per_piece=renders,
                                           max_piece_s=max_piece_s, workers=workers, seed=seed))
    hash_min, embed_min = fit_budget(deadline - clock(), hash_share, reserve_minutes)
    say(f"[{(clock() - start) / 60:5.1f} min] training: hash {hash_min:.1f} min, "
        f"embed {embed_min:.1f} min")
    with LoadSampler() as load:
        report = step("fit", lambda: train(pairs, out, config=NetConfig(n_bits=bits),
                                           hash_minutes=hash_min, embed_minutes=embed_min,
                                           seed=seed, device=device,
                                           checkpoint_path=checkpoint))
    report["run"] = {
        "minutes_budget": minutes, "minutes_total": round((clock() - start) / 60, 2),
        "steps_s": steps, "works": works, "music21_files": len(files) - n_generated,
        "generated_files": n_generated,
        "corpus": {k: conv[k] for k in ("converted", "failed", "skipped_done")},
        "pairs": {k: prep.get(k) for k in ("splits", "shards_written") if k in prep},
        "fit_minutes": {"hash": round(hash_min, 2), "embed": round(embed_min, 2)},
        "load_average_while_training": load.summary(), "cpus": os.cpu_count(),
    }
    _rewrite_report(Path(report["files"]["report"]), report)
    say(f"[{report['run']['minutes_total']:5.1f} min] done: {out} ({report['model_id']}), "
        f"hash BC {report['hash']['initial_bc']:.3f} -> {report['hash']['best_bc']:.3f}, "
        f"embed BC {report['embed']['initial_bc']:.3f} -> {report['embed']['best_bc']:.3f}")
    return report


def _rewrite_report(path: Path, report: dict[str, Any]) -> None:
    import json

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)


__all__ = ["LoadSampler", "fit_budget", "train_run"]
