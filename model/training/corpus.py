"""The music21 corpus as a folder of MIDI files: converted once, in parallel, resumably.

music21 ships ~3,100 public-domain scores (Humdrum, ABC, MusicXML). An ABC "book" holds many
tunes, so the unit of work is a *work*: one file, or one ``X:`` tune of a multi-tune ABC file
(music21 parses a single tune of a book without parsing the rest, via ``number=``). That gives
about 15,000 works. Each work becomes ``<out_dir>/music21/<name>.mid``; a JSON-lines manifest
beside the files records every attempt (``done`` or ``failed`` with a reason), so a second run
skips both and an interrupted run picks up where it stopped.

Conversion runs in worker processes that the parent can kill: a work that runs past
``timeout_s`` (music21 has pathological inputs) costs its worker, never the run.

Layout under ``out_dir``::

    music21/<name>.mid        one file per converted work, written atomically
    music21/manifest.jsonl    one JSON object per attempt, keyed by ``key``
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from model.errors import MidiError, MidimatchError

SUBDIR = "music21"
MANIFEST_NAME = "manifest.jsonl"
# music21 writes 10,080 ticks per quarter; long works then pass pretty_midi's 1e7 "corrupt file"
# guard and its tick→time table costs 8 bytes a tick. 960 keeps sub-millisecond timing.
TARGET_TICKS_PER_BEAT = 960
MAX_TICK = 4_000_000
# Formats music21 can render as notes; .rntxt (roman-numeral analyses) has no voicing.
SOURCE_SUFFIXES = frozenset({".krn", ".abc", ".mxl", ".xml", ".musicxml"})
_X_FIELD = re.compile(r"^\s*X:\s*(\d+)", re.MULTILINE)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

ConvertFn = Callable[[Path, int | None, Path], "dict[str, Any] | None"]
"""``convert_fn(source, number, out_path) -> info``: write one work as MIDI to ``out_path``."""


@dataclass(frozen=True)
class CorpusWork:
    """One unit of conversion.

    Attributes
    ----------
    key : str
        Identity in the manifest: the corpus-relative path, ``#<X number>`` appended for one tune
        of a multi-tune ABC file. Sources outside the corpus use their absolute path.
    path : Path
        The score file.
    number : int or None
        The ABC ``X:`` number to parse, or None for the whole file.
    name : str
        Output file stem, safe for shells (``[A-Za-z0-9._-]``).
    collection : str
        The corpus folder (composer or collection) the work belongs to.
    """

    key: str
    path: Path
    number: int | None
    name: str
    collection: str


def list_corpus_works(sources: Sequence[Path] | None = None, *, seed: int = 0) -> list[CorpusWork]:
    """List the works to convert, in a deterministic, collection-balanced order.

    Parameters
    ----------
    sources : sequence of Path, optional
        Score files; default: every music21 core-corpus path with a suffix in
        ``SOURCE_SUFFIXES``.
    seed : int
        Shuffles works within each collection; collections are then interleaved round-robin, so a
        prefix (``limit``) mixes Bach chorales, Palestrina, folk tunes... rather than being 90 %
        Essen folk songs. The order for one seed never changes, so a larger ``limit`` extends a
        smaller one.

    Returns
    -------
    list of CorpusWork
    """
    if sources is None:
        from music21 import corpus

        sources = corpus.getPaths()
    root = _corpus_root()
    by_collection: dict[str, list[CorpusWork]] = {}
    names: set[str] = set()
    for path in sorted({Path(p).resolve() for p in sources}):
        if path.suffix.lower() not in SOURCE_SUFFIXES:
            continue
        try:
            rel = path.relative_to(root).as_posix()
            collection, stem = rel.split("/", 1)[0], rel
        except ValueError:  # outside the corpus: the absolute path is the identity
            rel, collection = str(path), path.parent.name
            stem = f"{path.parent.name}/{path.name}-{_short_hash(rel)}"
        for number in _abc_tune_numbers(path) if path.suffix.lower() == ".abc" else [None]:
            key = rel if number is None else f"{rel}#{number}"
            name = _UNSAFE.sub("_", stem.replace("/", "__"))
            name = name if number is None else f"{name}__x{number}"
            if name in names:  # two keys that sanitise alike: keep both, deterministically
                name = f"{name}-{_short_hash(key)}"
            names.add(name)
            work = CorpusWork(key, path, number, name, collection)
            by_collection.setdefault(collection, []).append(work)
    rng = random.Random(seed)
    queues = []
    for collection in sorted(by_collection):
        works = by_collection[collection]
        rng.shuffle(works)
        queues.append(deque(works))
    ordered: list[CorpusWork] = []
    while queues:
        ordered.extend(q.popleft() for q in queues)
        queues = [q for q in queues if q]
    return ordered


def music21_to_midi_file(source: Path, number: int | None, out_path: Path) -> dict[str, Any]:
    """Parse one work with music21 and write it as a standard MIDI file.

    Parts without notes are dropped. Repeats are expanded, as a player would perform them
    (music21's MIDI writer does that); where music21 cannot expand them (inconsistent repeat
    marks: ``ExpanderException``) the repeat marks are dropped and the work is written as
    notated; ``repeats`` says which. A time/key signature or tempo object shared by two
    measures (common in the ABC books) makes music21's MIDI writer raise; such objects are
    copied first (``repaired`` counts them).

    Parameters
    ----------
    source : Path
        Score file.
    number : int or None
        ABC ``X:`` number, or None for the whole file (an opus yields its first score).
    out_path : Path
        Where to write the MIDI file.

    Returns
    -------
    dict
        ``{"repeats": "expanded" | "as_written", "repaired": int}``.

    Raises
    ------
    MidimatchError
        ``reason="parse_failed"`` or ``"midi_write_failed"``.
    """
    from music21 import converter, midi, repeat, stream

    try:
        parsed = converter.parse(source, number=number, forceSource=True)
    except Exception as e:
        raise MidimatchError(f"music21 cannot parse {source}: {e}", reason="parse_failed") from e
    score = parsed.scores[0] if isinstance(parsed, stream.Opus) else parsed
    if isinstance(score, stream.Score):
        # Empty parts (some ABC books declare voices they never use) make repeat expansion
        # fail for the whole score.
        for part in list(score.parts):
            if not part.recurse().notes:
                score.remove(part)
    repaired = _unshare_context_objects(score)
    repeats = "expanded"
    try:
        try:
            mf = midi.translate.streamToMidiFile(score)
        except repeat.ExpanderException:
            _strip_repeats(score)
            repeats = "as_written"
            mf = midi.translate.streamToMidiFile(score)
        mf.open(str(out_path), "wb")
        try:
            mf.write()
        finally:
            mf.close()
    except Exception as e:
        raise MidimatchError(
            f"music21 cannot write MIDI for {source}: {e}", reason="midi_write_failed"
        ) from e
    return {"repeats": repeats, "repaired": repaired}


def convert_music21_corpus(
    out_dir: Path,
    *,
    limit: int | None = None,
    workers: int = 2,
    timeout_s: float = 60,
    progress: bool = True,
    seed: int = 0,
    sources: Sequence[Path] | None = None,
    convert_fn: ConvertFn = music21_to_midi_file,
    retry_failed: bool = False,
    max_tasks_per_child: int = 200,
) -> dict[str, Any]:
    """Convert the first ``limit`` works of :func:`list_corpus_works` that are not done yet.

    Parameters
    ----------
    out_dir : Path
        Cache root; files go to ``out_dir/music21``. One run per folder at a time (locked).
    limit : int, optional
        How many works of the ordered list to cover (done, failed or converted now).
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
    t0 = time.perf_counter()
    folder = Path(out_dir) / SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    works = list_corpus_works(sources, seed=seed)
    selected = works if limit is None else works[: max(0, limit)]
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
            for rec in _run_parallel(tasks, convert_fn, workers, timeout_s, max_tasks_per_child):
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


# --- one work, inside a worker ------------------------------------------------------------------


def _run_task(convert_fn: ConvertFn, task: dict[str, Any]) -> dict[str, Any]:
    final = Path(task["out_path"])
    tmp = _tmp_path(final, os.getpid())
    t0 = time.perf_counter()
    try:
        info = dict(convert_fn(Path(task["source"]), task["number"], tmp) or {})
        info.update(_finish_midi(tmp))
        os.replace(tmp, final)
        return {**_record(task, "done"), **info, "midi": final.name, "seconds": _since(t0)}
    except Exception as e:
        cause = e.__cause__ or e
        rec = _record(task, "failed", getattr(e, "reason", "convert_failed"))
        rec["error_type"] = type(cause).__name__
        rec["error"] = str(cause)[:300]
        return {**rec, "seconds": _since(t0)}
    finally:
        tmp.unlink(missing_ok=True)


def _finish_midi(path: Path) -> dict[str, Any]:
    """Rescale ticks if needed, then prove pretty_midi loads the file; return its summary."""
    import mido
    import pretty_midi

    try:
        mid = mido.MidiFile(str(path))
    except Exception as e:
        raise MidiError(f"written MIDI is unreadable: {e}", reason="unloadable") from e
    old_tpq = mid.ticks_per_beat
    rescaled = _rescale_ticks(mid)
    if rescaled:
        mid.save(str(path))
    try:
        pm = pretty_midi.PrettyMIDI(str(path))
    except Exception as e:
        raise MidiError(f"pretty_midi cannot load the MIDI: {e}", reason="unloadable") from e
    notes = [n for inst in pm.instruments if not inst.is_drum for n in inst.notes]
    if not notes:
        raise MidiError("the work has no pitched notes", reason="no_notes")
    notes.sort(key=lambda n: (n.start, n.pitch))
    return {
        "n_notes": len(notes),
        "duration_s": round(pm.get_end_time(), 3),
        "ticks_per_beat": mid.ticks_per_beat,
        "rescaled": rescaled,
        "source_ticks_per_beat": old_tpq,
        "fingerprint": hashlib.sha1(bytes(n.pitch for n in notes)).hexdigest()[:16],
    }


def _rescale_ticks(
    mid: Any, *, target: int = TARGET_TICKS_PER_BEAT, max_tick: int = MAX_TICK
) -> bool:
    """Lower ``mid.ticks_per_beat`` in place (to ``target``, less if the piece is very long).

    Absolute times are rounded, not deltas, so rounding error never accumulates.
    """
    old = mid.ticks_per_beat
    end = max((sum(m.time for m in track) for track in mid.tracks), default=0)
    new = min(old, target)
    if end * new / old > max_tick:
        new = max(1, int(max_tick * old // end))
    if new == old:
        return False
    for track in mid.tracks:
        abs_old = prev_new = 0
        for msg in track:
            abs_old += msg.time
            abs_new = (abs_old * new + old // 2) // old
            msg.time, prev_new = abs_new - prev_new, abs_new
    mid.ticks_per_beat = new
    return True


def _unshare_context_objects(score: Any) -> int:
    """Copy time/key signatures and tempo marks that sit in more than one place of the score."""
    seen: set[int] = set()
    shared = []
    classes = ("TimeSignature", "KeySignature", "MetronomeMark")
    for el in score.recurse().getElementsByClass(classes):
        if id(el) in seen:
            shared.append((el.activeSite, el))  # activeSite is only valid while iterating
        seen.add(id(el))
    for site, el in shared:
        site.replace(el, copy.deepcopy(el))
    return len(shared)


def _strip_repeats(score: Any) -> None:
    """Remove repeat barlines, repeat expressions and endings, which music21 cannot expand."""
    from music21 import bar, repeat, spanner

    for m in score.recurse().getElementsByClass("Measure"):
        for side in ("leftBarline", "rightBarline"):
            if isinstance(getattr(m, side), bar.Repeat):
                setattr(m, side, bar.Barline("regular"))
    classes = (repeat.RepeatExpression, spanner.RepeatBracket)
    marks = [(el.activeSite, el) for el in score.recurse().getElementsByClass(classes)]
    for site, el in marks:
        site.remove(el)


def _worker_main(conn: Connection, convert_fn: ConvertFn) -> None:
    # The parent owns Ctrl-C and kills workers itself; music21 prints a warning per odd score,
    # which would shred the progress bar; failures reach the manifest anyway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    import warnings

    warnings.simplefilter("ignore")
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        conn.send(("result", _run_task(convert_fn, task)))


# --- the parent: a pool whose workers can be killed ---------------------------------------------


@dataclass
class _Slot:
    proc: Any
    conn: Connection
    born: float
    task: dict[str, Any] | None = None
    started: float = 0.0
    done: int = 0
    ready: bool = False


def _run_parallel(
    tasks: list[dict[str, Any]],
    convert_fn: ConvertFn,
    workers: int,
    timeout_s: float,
    max_tasks: int,
) -> Iterator[dict[str, Any]]:
    """Yield one record per task. Never hangs: each task and each worker start is bounded."""
    # spawn, not fork: the parent may hold threads (tqdm's monitor) and a fork copies their locks.
    ctx = mp.get_context("spawn")
    startup_s = max(timeout_s, 120.0)
    pending = deque(tasks)
    slots: list[_Slot] = []
    start_failures = 0
    try:
        while pending or any(s.task is not None for s in slots):
            while len(slots) < min(workers, len(pending) + sum(s.task is not None for s in slots)):
                slots.append(_spawn(ctx, convert_fn))
            for s in slots:
                if s.ready and s.task is None and pending:
                    s.task, s.started = pending.popleft(), time.monotonic()
                    s.conn.send(s.task)
            deadlines = [s.started + timeout_s if s.ready else s.born + startup_s for s in slots]
            pause = min(deadlines, default=time.monotonic() + 1) - time.monotonic()
            ready = wait([s.conn for s in slots], timeout=min(max(pause, 0.0), 1.0))
            for s in list(slots):
                if s.conn in ready:
                    try:
                        kind, payload = s.conn.recv()
                    except (EOFError, OSError):  # the worker died (segfault, OOM killer...)
                        start_failures += not s.ready
                        _kill(s)
                        slots.remove(s)
                        if s.task is not None:
                            code = s.proc.exitcode
                            yield _failed(s.task, "worker_died", f"worker exit code {code}")
                        continue
                    if kind == "ready":
                        s.ready, start_failures = True, 0
                        continue
                    yield payload
                    s.task, s.done = None, s.done + 1
                    if s.done >= max_tasks:
                        _kill(s, graceful=True)
                        slots.remove(s)
            now = time.monotonic()
            for s in list(slots):
                if s.task is not None and now - s.started > timeout_s:
                    _kill(s)
                    slots.remove(s)
                    _tmp_path(Path(s.task["out_path"]), s.proc.pid).unlink(missing_ok=True)
                    rec = _failed(s.task, "timeout", f"killed after {timeout_s:g} s")
                    yield {**rec, "seconds": round(now - s.started, 3)}
                elif not s.ready and now - s.born > startup_s:
                    start_failures += 1
                    _kill(s)
                    slots.remove(s)
            if start_failures >= 3:
                raise MidimatchError("conversion workers fail to start", reason="worker_start")
    finally:
        for s in slots:
            _kill(s)


def _spawn(ctx: Any, convert_fn: ConvertFn) -> _Slot:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker_main, args=(child, convert_fn), daemon=True)
    proc.start()
    child.close()  # so that the parent's recv() sees EOF when the worker dies
    return _Slot(proc=proc, conn=parent, born=time.monotonic())


def _kill(slot: _Slot, *, graceful: bool = False) -> None:
    if graceful:
        try:
            slot.conn.send(None)
            slot.proc.join(timeout=5)
        except (OSError, ValueError):
            pass
    if slot.proc.is_alive():
        slot.proc.kill()
    slot.proc.join(timeout=5)
    slot.conn.close()


# --- small helpers ------------------------------------------------------------------------------


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


def _record(task: dict[str, Any], status: str, reason: str | None = None) -> dict[str, Any]:
    rec = {k: task[k] for k in ("key", "source", "number", "collection")}
    rec["status"] = status
    if reason is not None:
        rec["reason"] = reason
    return rec


def _failed(task: dict[str, Any], reason: str, error: str) -> dict[str, Any]:
    return {**_record(task, "failed", reason), "error_type": reason, "error": error}


def _tmp_path(final: Path, pid: int) -> Path:
    return final.with_name(f".{final.name}.{pid}.tmp")


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 4)


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _corpus_root() -> Path:
    from music21 import common

    return Path(common.getCorpusFilePath()).resolve()


def _abc_tune_numbers(path: Path) -> list[int | None]:
    """X: numbers of a multi-tune ABC file, in file order; [None] for a single tune."""
    found = _X_FIELD.findall(path.read_text(errors="replace"))
    numbers: list[int | None] = list(dict.fromkeys(int(x) for x in found))
    return numbers if len(numbers) > 1 else [None]


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
