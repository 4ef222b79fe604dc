"""The music21 corpus as a folder of MIDI files: converted once, in parallel, resumably.

Converting the corpus takes minutes to hours (about 15,000 works, some of which music21 cannot
handle), so it is done once into a cache folder that indexing, training and evaluation read.
Each work (:mod:`model.training.corpus_works`) becomes ``<out_dir>/music21/<name>.mid``
(:mod:`model.training.corpus_convert`); a JSON-lines manifest beside the files records every
attempt (``done`` or ``failed`` with a reason), so a second run skips both and an interrupted
run picks up where it stopped. This module runs a conversion over that folder and reads it back.

Conversion runs in worker processes that the parent can kill (:mod:`model.training.corpus_pool`):
a work that runs past ``timeout_s`` (music21 has pathological inputs) costs its worker, never the
run.

Layout under ``out_dir``::

    music21/<name>.mid        one file per converted work, written atomically
    music21/manifest.jsonl    one JSON object per attempt, keyed by ``key``
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from model.errors import MidimatchError
from model.training.corpus_convert import music21_to_midi_file
from model.training.corpus_pool import ConvertFn, run_parallel
from model.training.corpus_works import CorpusWork, list_corpus_works

SUBDIR = "music21"
MANIFEST_NAME = "manifest.jsonl"


def convert_music21_corpus(
    out_dir: Path,
    *,
    limit: int | None = None,
    start: int = 0,
    workers: int = 2,
    timeout_s: float = 60,
    progress: bool = True,
    seed: int = 0,
    sources: Sequence[Path] | None = None,
    convert_fn: ConvertFn = music21_to_midi_file,
    retry_failed: bool = False,
    max_tasks_per_child: int = 200,
) -> dict[str, Any]:
    """Convert works ``start .. limit - 1`` of :func:`list_corpus_works` that are not done yet
    (to the end of the list when ``limit`` is None).

    Parameters
    ----------
    out_dir : Path
        Cache root; files go to ``out_dir/music21``. One run per folder at a time (locked).
    limit : int, optional
        The end of the range, exclusive: with ``start`` 0, how many works of the ordered list to
        cover (done, failed or converted now); none when it is not above ``start``.
    start : int
        Skip the first ``start`` works of the list: a training-only folder of works that the
        evaluation folder (converted with ``limit=start``) does not hold.
    workers : int
        Worker processes (>= 1).
    timeout_s : float
        Wall-clock seconds one work may take in its worker before the worker is killed and the
        work recorded as failed with reason ``timeout``.
    progress : bool
        Show a tqdm progress bar on stderr.
    seed : int
        Order of the works (see :func:`list_corpus_works`).
    sources : sequence of Path, optional
        Score files to convert instead of the music21 corpus.
    convert_fn : callable
        ``(source, number, out_path) -> dict``, a module-level function (it is pickled to the
        workers). Tests inject slow or failing ones.
    retry_failed : bool
        Attempt works the manifest records as failed again.
    max_tasks_per_child : int
        Works per worker process before it is replaced; music21 caches grow without bound.

    Notes
    -----
    Workers are started with ``spawn`` (a fork would copy the locks of the caller's threads), so
    a calling script needs the usual ``if __name__ == "__main__":`` guard.

    Returns
    -------
    dict
        ``listed``, ``selected``, ``converted``, ``failed``, ``skipped_done``,
        ``skipped_failed``, ``failed_by_reason``, ``failed_by_error`` (exception class),
        ``rescaled``, ``repeats_as_written``, ``seconds``, ``files_per_s`` (works attempted per
        second of this run), ``workers``.
    """
    if workers < 1:
        raise MidimatchError(f"workers must be >= 1, got {workers}", reason="bad_argument")
    if start < 0:
        raise MidimatchError(f"start must be >= 0, got {start}", reason="bad_argument")
    t0 = time.perf_counter()
    folder = Path(out_dir) / SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    works = list_corpus_works(sources, seed=seed)
    selected = works[start:] if limit is None else works[start:max(start, limit)]
    with _locked(folder):
        for stale in folder.glob(".*.tmp"):  # left by a run that was killed mid-write
            stale.unlink(missing_ok=True)
        manifest = read_manifest(out_dir)
        # A done work whose file was deleted since is converted again.
        skip_done = [w for w in selected if _is_done(manifest.get(w.key), folder)]
        skip_failed = (
            []
            if retry_failed
            else [w for w in selected if manifest.get(w.key, {}).get("status") == "failed"]
        )
        skipped = {w.key for w in skip_done} | {w.key for w in skip_failed}
        todo = [w for w in selected if w.key not in skipped]
        tasks = [_task(w, folder) for w in todo]
        results: list[dict[str, Any]] = []
        bar = _progress_bar(len(tasks), progress)
        with open(folder / MANIFEST_NAME, "a+", encoding="utf-8") as log:
            _end_with_newline(log)
            for rec in run_parallel(tasks, convert_fn, workers, timeout_s, max_tasks_per_child):
                log.write(json.dumps(rec, sort_keys=True) + "\n")
                log.flush()
                results.append(rec)
                bar.update(1)
                if rec["status"] == "failed":
                    bar.set_postfix(failed=sum(r["status"] == "failed" for r in results))
        bar.close()
    seconds = time.perf_counter() - t0
    failed = [r for r in results if r["status"] == "failed"]
    return {
        "out_dir": str(folder),
        "listed": len(works),
        "selected": len(selected),
        "converted": len(results) - len(failed),
        "failed": len(failed),
        "skipped_done": len(skip_done),
        "skipped_failed": len(skip_failed),
        "failed_by_reason": dict(Counter(r["reason"] for r in failed).most_common()),
        "failed_by_error": dict(Counter(r.get("error_type", "") for r in failed).most_common()),
        "rescaled": sum(bool(r.get("rescaled")) for r in results),
        "repeats_as_written": sum(r.get("repeats") == "as_written" for r in results),
        "seconds": round(seconds, 3),
        "files_per_s": round(len(results) / seconds, 3) if results else 0.0,
        "workers": workers,
    }


def read_manifest(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The latest manifest record per work key (a torn last line is ignored)."""
    path = Path(out_dir) / SUBDIR / MANIFEST_NAME
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # torn by a crash mid-write; that work is redone
                continue
            if isinstance(rec, dict) and "key" in rec:
                records[rec["key"]] = rec
    return records


def corpus_midi_files(
    out_dir: Path, *, unique: bool = True, max_duration_s: float | None = None,
    keys: Collection[str] | None = None,
) -> list[Path]:
    """Converted MIDI files under ``out_dir/music21``, sorted by name.

    Parameters
    ----------
    out_dir : Path
        The ``out_dir`` given to :func:`convert_music21_corpus`.
    unique : bool
        Drop works whose note content (pitch sequence) equals that of an earlier name: the same
        tune appears in several collections, and an identification benchmark cannot tell
        identical pieces apart.
    max_duration_s : float, optional
        Leave out longer works (whole string quartets run past 40 minutes).
    keys : collection of str, optional
        Only these works (``list_corpus_works(...)[i].key``), e.g. the first N of the list.

    Returns
    -------
    list of Path
    """
    folder = Path(out_dir) / SUBDIR
    done = [r for r in read_manifest(out_dir).values() if r.get("status") == "done"
            and (keys is None or r["key"] in keys)]
    files: list[Path] = []
    seen: set[str] = set()
    for rec in sorted(done, key=lambda r: r["midi"]):
        path = folder / rec["midi"]
        if not path.exists():
            continue
        if max_duration_s is not None and rec.get("duration_s", 0.0) > max_duration_s:
            continue
        fingerprint = rec.get("fingerprint")
        if unique and fingerprint:
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
        files.append(path)
    return files


def _is_done(rec: dict[str, Any] | None, folder: Path) -> bool:
    return bool(rec) and rec.get("status") == "done" and (folder / rec["midi"]).exists()


def _task(work: CorpusWork, folder: Path) -> dict[str, Any]:
    return {
        "key": work.key,
        "source": str(work.path),
        "number": work.number,
        "collection": work.collection,
        "out_path": str(folder / f"{work.name}.mid"),
    }


def _end_with_newline(log: Any) -> None:
    """After a torn last line, start the next record on a line of its own."""
    log.seek(0, os.SEEK_END)
    if log.tell() > 0:
        log.seek(log.tell() - 1)
        if log.read(1) != "\n":
            log.write("\n")


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="work", desc="music21→MIDI", smoothing=0.05)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder, so two runs never interleave one manifest."""
    with open(folder / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise MidimatchError(f"another conversion is running in {folder}", reason="busy") from e
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
