"""MIDI files → frame-aligned (audio, MIDI) training pairs in shards, split by piece, resumable.

For each piece and each of ``renders_per_piece`` random (renderer, augmentation) draws,
:func:`make_pair` augments the MIDI (tempo, programs, transposition: on the notes, so both sides
move together), cuts a random excerpt, renders it (:mod:`model.training.render`), augments the audio
(``preset("train")``, or another preset given to :func:`prepare`), and takes CQT frames of the
audio and :func:`model.midi.midi_to_frames_fast` frames of the *same* notes. :func:`prepare`
does this for a collection, in worker processes, into ``<out_dir>/<split>/shard-NNNNN.npz``
(:func:`model.training.pairs.write_shard`).

Splits are by piece: a file's content hash decides its split (:func:`split_of`), so a piece and
all its renderings sit in one split, whatever the order of the files or the seed. ``train``,
``valid`` and ``test`` use the training renderers; ``test_heldout`` renders the test pieces once
with the held-out renderer, without any augmentation (evaluation adds its own conditions).

Resumable: ``manifest.json`` records each finished shard with a signature of its settings and
pieces; a rerun with the same settings skips those shards and does no work.

Sizing: the report's ``s_per_music_min`` is worker seconds per minute of a pair. Measured on a
2-core CPU box (2025-11): 0.9 s on one free core, 1.6 s with two workers beside another job;
646 pieces × 2 draws of ≤ 60 s (19 h of audio) took 19 min there.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pretty_midi
from tqdm import tqdm

from model.errors import MidimatchError
from model.features import FRAME_RATE, SAMPLE_RATE, audio_to_frames
from model.midi import load_midi, midi_to_frames_fast
from model.training.augment import augment_audio, preset
from model.training.augment_midi import augment_midi
from model.training.render import (
    HELD_OUT,
    TRAIN_RENDERERS,
    available,
    install_hint,
    render,
    renderable_midi,
    resource,
    sf3_to_sf2,
)

MIN_TRAIN_RENDERERS = 2  # issue #3: at least two renderers; one soundfont is learnt, not music
SPLITS = ("train", "valid", "test")
HELDOUT_SPLIT = "test_heldout"
MANIFEST = "manifest.json"
FORMAT = "midimatch-prepare/1"


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


def excerpt(pm: pretty_midi.PrettyMIDI, start_s: float, length_s: float
            ) -> pretty_midi.PrettyMIDI:
    """Notes starting in ``[start_s, start_s + length_s)``, ends clipped to the window, shifted
    so that the first kept note starts at 0 (no leading silence).

    Controllers and pitch bends in the window move along; the last value of each before the
    first note is set at 0, so a pedal or a volume set earlier still holds. One 120 bpm tempo.
    """
    end_s = start_s + length_s
    notes = [n for inst in pm.instruments for n in inst.notes if start_s <= n.start < end_s]
    t0 = min((n.start for n in notes), default=start_s)
    out = pretty_midi.PrettyMIDI(resolution=960, initial_tempo=120.0)
    for inst in pm.instruments:
        new = pretty_midi.Instrument(inst.program, inst.is_drum, inst.name)
        new.notes = [pretty_midi.Note(n.velocity, n.pitch, n.start - t0, min(n.end, end_s) - t0)
                     for n in inst.notes if t0 <= n.start < end_s]
        if not new.notes:
            continue
        last: dict[int, pretty_midi.ControlChange] = {}
        for c in sorted(inst.control_changes, key=lambda c: c.time):
            if c.time <= t0:
                last[c.number] = c
            elif c.time < end_s:
                cc = pretty_midi.ControlChange(c.number, c.value, c.time - t0)
                new.control_changes.append(cc)
        new.control_changes[:0] = [pretty_midi.ControlChange(c.number, c.value, 0.0)
                                   for c in last.values()]
        bends = sorted(inst.pitch_bends, key=lambda b: b.time)
        before = [b for b in bends if b.time <= t0][-1:]
        new.pitch_bends = ([pretty_midi.PitchBend(b.pitch, 0.0) for b in before]
                           + [pretty_midi.PitchBend(b.pitch, b.time - t0) for b in bends
                              if t0 < b.time < end_s])
        out.instruments.append(new)
    return out


def make_pair(pm: pretty_midi.PrettyMIDI, renderer: str, rng: np.random.Generator, *,
              max_piece_s: float = 120.0, augment: bool = True, min_frames: int = 100,
              timeout_s: float = 60.0, cache_dir: Path | None = None,
              augment_preset: str = "train") -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One training pair from a piece: augment, cut, render, augment audio, frame both sides.

    Parameters
    ----------
    pm : pretty_midi.PrettyMIDI
        Not modified.
    renderer : str
        A name of :data:`model.training.render.RENDERERS`.
    rng : numpy.random.Generator
        Every random choice (MIDI and audio augmentation, excerpt start).
    max_piece_s : float
        Longest excerpt, seconds of the (tempo-changed) piece.
    augment : bool
        False: no MIDI or audio augmentation (the held-out split).
    min_frames : int
        Pairs shorter than this raise ``too_short``.
    timeout_s : float
        Bound on the renderer's process.
    cache_dir : Path, optional
        For :func:`model.training.render.render` (decoded ``.sf3`` soundfonts).
    augment_preset : str
        The :func:`model.training.augment.preset` both augmentations draw from ("train";
        "train_noisy" for more rooms and noise).

    Returns
    -------
    audio, midi : np.ndarray, shape (T, 48), float32
        Frame t of both sounds the same notes; leading and trailing frames where the MIDI is
        silent are dropped.
    info : dict
        ``renderer``, ``music_s`` (seconds of the pair), ``excerpt_start_s``, ``midi_aug``,
        ``audio_aug`` (names of the stages applied).
    """
    midi_aug: dict[str, Any] = {}
    if augment:
        pm, midi_aug = augment_midi(pm, rng, preset(augment_preset))
    start_s = float(rng.uniform(0.0, max(0.0, pm.get_end_time() - max_piece_s)))
    cut = renderable_midi(excerpt(pm, start_s, max_piece_s), renderer)
    if not any(inst.notes for inst in cut.instruments):
        raise MidimatchError("no playable note in the excerpt", reason="no_notes")
    audio = render(cut, renderer, timeout_s=timeout_s, max_duration_s=max_piece_s + 1.0,
                   cache_dir=cache_dir)
    audio_aug: dict[str, Any] = {}
    if augment:
        audio, audio_aug = augment_audio(audio, SAMPLE_RATE, rng, preset(augment_preset))
    midi = midi_to_frames_fast(cut)
    a = audio_to_frames(audio, SAMPLE_RATE)
    active = np.flatnonzero(midi[: len(a)].any(axis=1))
    if active.size == 0 or active[-1] + 1 - active[0] < min_frames:
        raise MidimatchError(f"pair of {active.size} frames, under {min_frames}",
                             reason="too_short")
    span = slice(int(active[0]), int(active[-1]) + 1)
    info = {"renderer": renderer, "music_s": round((span.stop - span.start) / FRAME_RATE, 3),
            "excerpt_start_s": round(start_s, 3), "midi_aug": midi_aug,
            "audio_aug": sorted(audio_aug)}
    return a[span], midi[span], info


# ------------------------------------------------------------------------- one piece, in a worker
class _PieceTimeout(BaseException):
    """Not an Exception: library code's ``except Exception`` must not swallow the deadline."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _PieceTimeout


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def _run_piece(task: dict[str, Any]) -> dict[str, Any]:
    """All draws of one piece in one split. Never raises: failures become ``skipped`` records."""
    out: dict[str, Any] = {"pairs": [], "skipped": []}
    use_alarm = threading.current_thread() is threading.main_thread()
    k, renderer = -1, None
    started = time.perf_counter()
    try:
        if use_alarm:  # interrupts Python code anywhere; render() kills its process on the way out
            # armed inside the try: an alarm firing before it would escape as an uncaught error
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, task["piece_timeout_s"])
        pm = load_midi(task["file"])
        rng = np.random.default_rng([task["seed"], *divmod(task["id"], 2**32), task["stream"]])
        order = rng.permutation(len(task["renderers"]))
        for k in range(task["draws"]):
            renderer = task["renderers"][order[k % len(order)]]
            t = time.perf_counter()
            try:
                a, m, info = make_pair(pm, renderer, rng, max_piece_s=task["max_piece_s"],
                                       augment=task["augment"], min_frames=task["min_frames"],
                                       timeout_s=task["render_timeout_s"],
                                       cache_dir=task["cache_dir"],
                                       augment_preset=task["augment_preset"])
            except Exception as e:  # one bad draw must not stop the piece (a timeout does)
                out["skipped"].append(_skip(k, renderer, e))
                continue
            info["seconds"] = round(time.perf_counter() - t, 3)
            out["pairs"].append((a.astype(np.float16), m.astype(np.float16), info))
        # The alarm can be lost (a signal handler's exception raised inside a __del__ or a
        # callback is printed and dropped), so the deadline is also checked here.
        if time.perf_counter() - started > task["piece_timeout_s"]:
            out["pairs"] = []
            raise _PieceTimeout
    except _PieceTimeout:
        out["skipped"].append({"draw": k, "renderer": renderer, "reason": "timeout",
                               "error": f"piece ran past {task['piece_timeout_s']:g} s"})
    except Exception as e:  # an unreadable file: its reason goes to the report
        out["skipped"].append(_skip(k, renderer, e))
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return out


def _skip(draw: int, renderer: str | None, e: Exception) -> dict[str, Any]:
    reason = e.reason if isinstance(e, MidimatchError) else type(e).__name__
    return {"draw": draw, "renderer": renderer, "reason": reason, "error": str(e)[:300]}


def _run_tasks(tasks: list[dict[str, Any]], workers: int
               ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(task, result) for every task. A worker that dies costs its tasks one retry, not the run."""
    if workers <= 0:
        for t in tasks:
            yield t, _run_piece(t)
        return
    pending, tries, futile = deque(tasks), Counter(), 0
    while pending:
        # spawn, not fork: the parent holds threads (tqdm's monitor, torch's pools).
        ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker)
        inflight: dict[Any, dict[str, Any]] = {}
        finished = False
        try:
            while pending or inflight:
                while pending and len(inflight) < 2 * workers:
                    inflight[ex.submit(_run_piece, pending[0])] = pending[0]
                    pending.popleft()  # only once submitted: a broken pool refuses submit()
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for f in done:
                    result = f.result()  # a broken pool raises here, f still in flight
                    finished = True
                    yield inflight.pop(f), result
        except BrokenProcessPool:
            futile = 0 if finished else futile + 1
            if futile >= 3:  # e.g. a __main__ without the spawn guard: stop, don't skip all
                raise MidimatchError("worker processes die before finishing any piece",
                                     reason="worker_start") from None
            for t in inflight.values():
                tries[t["stream_key"]] += 1
                if tries[t["stream_key"]] < 2:
                    pending.appendleft(t)
                else:
                    yield t, {"pairs": [], "skipped": [{"draw": -1, "renderer": None,
                              "reason": "worker_died", "error": "the worker process died"}]}
        finally:
            ex.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------ the collection
def training_renderers(renderers: Sequence[str] | None = None,
                       min_renderers: int | None = None) -> list[str]:
    """The installed ones of ``renderers`` (default :data:`model.training.render.TRAIN_RENDERERS`).

    Raises
    ------
    MidimatchError
        ``no_renderer`` when none is installed, ``too_few_renderers`` when fewer than
        ``min_renderers`` are (default: :data:`MIN_TRAIN_RENDERERS` for the default set, 1 for
        an explicit list); the message names the Debian packages to install.
    """
    wanted = list(TRAIN_RENDERERS if renderers is None else renderers)
    use = [r for r in wanted if available(r)]
    if not use:
        raise MidimatchError(f"none of the renderers {wanted} is installed "
                             f"({install_hint(wanted)})", reason="no_renderer")
    need = (MIN_TRAIN_RENDERERS if renderers is None else 1) if min_renderers is None \
        else min_renderers
    if len(use) < need:
        missing = [r for r in wanted if r not in use]
        raise MidimatchError(
            f"only {use} of the training renderers {wanted} are installed; the model must hear "
            f"at least {need} (one soundfont teaches it that soundfont): {install_hint(missing)}",
            reason="too_few_renderers")
    return use


def prepare(out_dir: str | Path, midi_files: Sequence[str | Path], *,
            renderers: Sequence[str] | None = None, heldout: str | None = None,
            min_renderers: int | None = None,
            renders_per_piece: int = 2, max_piece_s: float = 120.0, workers: int = 2,
            seed: int = 0, split: Sequence[float] = (0.8, 0.1, 0.1), progress: bool = True,
            pieces_per_shard: int = 100, min_frames: int = 100,
            piece_timeout_s: float = 300.0, render_timeout_s: float = 60.0,
            augment_preset: str = "train") -> dict[str, Any]:
    """Build ``<out_dir>/{train,valid,test,test_heldout}/shard-*.npz`` from MIDI files.

    Parameters
    ----------
    out_dir : str or Path
        Destination; also holds ``manifest.json`` and ``soundfonts/`` (decoded ``.sf3``).
    midi_files : sequence of paths
        The collection. Files with identical bytes are one piece.
    renderers : sequence of str, optional
        Training renderers (default :data:`model.training.render.TRAIN_RENDERERS`); missing ones are
        left out (listed in the report), none available raises ``no_renderer``.
    min_renderers : int, optional
        Fewer installed training renderers raise ``too_few_renderers`` with the packages to
        install. Default :data:`MIN_TRAIN_RENDERERS` (2) for the default set, 1 for a list
        given explicitly (tests, experiments).
    heldout : str, optional
        Renderer of ``test_heldout`` (default :data:`model.training.render.HELD_OUT`); the split is
        left out, with a note in the report, when it is not installed.
    renders_per_piece : int
        Draws per piece in train/valid/test (renderers without repeats while they last).
    max_piece_s : float
        Longest excerpt, seconds.
    workers : int
        Processes; 0 runs in this process.
    seed : int
        Draws of renderers, augmentations and excerpts (not the split, which is by content).
    split : (float, float, float)
        Fractions of pieces in train, valid, test.
    progress : bool
        Show a progress bar.
    pieces_per_shard : int
        Pieces per shard: the unit of resumption.
    min_frames : int
        Shorter pairs are skipped (``too_short``); training cuts 100-frame chunks.
    piece_timeout_s, render_timeout_s : float
        Bounds on one piece (all its draws) and on one renderer process.
    augment_preset : str
        The :func:`model.training.augment.preset` of train/valid/test ("train"; "train_noisy" draws
        a room and noise more often). ``test_heldout`` is never augmented.

    Returns
    -------
    dict
        ``splits``: per split ``pieces``, ``pairs``, ``frames``, ``hours``, ``by_renderer``;
        ``skipped`` (counts by reason) and ``skipped_pieces`` (records); ``shards_written``,
        ``shards_reused``; ``seconds``; ``s_per_music_min`` (median worker seconds per minute
        of a pair, overall and by renderer), ``renderers``, ``unavailable``.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    preset(augment_preset)  # an unknown name fails here, before any work
    wanted = list(TRAIN_RENDERERS if renderers is None else renderers)
    use = training_renderers(renderers, min_renderers)
    held = HELD_OUT if heldout is None else heldout
    unavailable = [r for r in [*wanted, held] if not available(r)]
    cache_dir = out / "soundfonts"
    for r in sorted({*use, held}):
        sf = resource(r) if available(r) else None
        if sf is not None and sf.suffix == ".sf3":  # once here, not once per worker
            sf3_to_sf2(sf, cache_dir / f"{sf.stem}.sf2")

    pieces: dict[str, Path] = {}
    for f in midi_files:
        pieces.setdefault(piece_key(f), Path(f))
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for key in sorted(pieces):
        by_split[split_of(key, split)].append(key)
    plan = [(s, by_split[s], use, renders_per_piece, True) for s in SPLITS]
    if available(held):
        plan.append((HELDOUT_SPLIT, by_split["test"], [held], 1, False))

    manifest = _read_manifest(out)
    shards: dict[str, dict[str, Any]] = {}
    tasks: list[dict[str, Any]] = []
    for stream, (name, keys, rends, draws, augment) in enumerate(plan):
        for i in range(0, len(keys), pieces_per_shard):
            chunk, shard = keys[i:i + pieces_per_shard], f"{name}/shard-{i // pieces_per_shard:05d}"
            settings = [FORMAT, seed, rends, draws, augment, max_piece_s, min_frames, chunk]
            if augment and augment_preset != "train":  # "train" keeps the older signatures
                settings.append(augment_preset)
            sig = _signature(settings)
            old = manifest.get(shard, {})
            have = not old.get("pairs") or (out / f"{shard}.npz").exists()
            if old.get("signature") == sig and have:
                shards[shard] = {**old, "reused": True}
                continue
            shards[shard] = {"signature": sig, "split": name, "todo": len(chunk), "results": {}}
            tasks += [{"file": str(pieces[k]), "key": k, "id": piece_id(k), "shard": shard,
                       "seed": seed, "stream": stream, "stream_key": f"{shard}:{k}",
                       "renderers": list(rends), "draws": draws, "augment": augment,
                       "augment_preset": augment_preset,
                       "max_piece_s": max_piece_s, "min_frames": min_frames,
                       "piece_timeout_s": piece_timeout_s, "render_timeout_s": render_timeout_s,
                       "cache_dir": cache_dir} for k in chunk]
    for split_dir in (*SPLITS, HELDOUT_SPLIT):
        for f in (out / split_dir).glob("shard-*.npz"):  # training reads every shard there
            if "results" in shards.get(f"{split_dir}/{f.stem}", {"results": 0}):
                f.unlink()  # from other settings, or about to be redone
    manifest = {k: v for k, v in manifest.items() if k in shards and "results" not in v}

    bar = tqdm(total=len(tasks), disable=not progress, unit="piece", desc="prepare",
               smoothing=0.05)
    written = 0
    for task, result in _run_tasks(tasks, workers):
        bar.update(1)
        sh = shards[task["shard"]]
        sh["results"][task["key"]] = (task["file"], result)
        if len(sh["results"]) == sh["todo"]:
            manifest[task["shard"]] = _write(out, task["shard"], sh)
            shards[task["shard"]] = manifest[task["shard"]]
            written += 1
            _write_manifest(out, manifest)
    bar.close()
    report = _report([shards[s] for s in sorted(shards)], [s for s, *_ in plan])
    report.update(shards_written=written, shards_reused=len(shards) - written,
                  seconds=round(time.perf_counter() - t_start, 1), renderers=use,
                  heldout=held if available(held) else None, unavailable=unavailable,
                  workers=workers, out_dir=str(out), augment_preset=augment_preset)
    return report


def _signature(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, default=str).encode()).hexdigest()[:16]


def _write(out: Path, shard: str, sh: dict[str, Any]) -> dict[str, Any]:
    """Write one finished shard; return its manifest record (no arrays)."""
    from model.training.pairs import write_shard

    audio, midi, ids, pairs, skipped = [], [], [], [], []
    for key in sorted(sh["results"]):
        file, result = sh["results"][key]
        for a, m, info in result["pairs"]:
            audio.append(a)
            midi.append(m)
            ids.append(piece_id(key))
            pairs.append({"key": key, "file": file, "frames": len(a), **info})
        skipped += [{"key": key, "file": file, **s} for s in result["skipped"]]
    if audio:
        write_shard(out / f"{shard}.npz", audio, midi, ids)
    return {"signature": sh["signature"], "split": sh["split"], "pieces": len(sh["results"]),
            "pairs": pairs, "skipped": skipped}


def _read_manifest(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):  # none yet, or unreadable: every shard is redone
        return {}
    return data.get("shards", {}) if data.get("format") == FORMAT else {}


def _write_manifest(out: Path, shards: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "shards": shards}, indent=1, default=str))
    tmp.replace(out / MANIFEST)


def _report(shards: list[dict[str, Any]], splits: list[str]) -> dict[str, Any]:
    per: dict[str, Any] = {}
    rates: dict[str, list[float]] = {}
    skipped: list[dict[str, Any]] = []
    for name in splits:
        recs = [s for s in shards if s["split"] == name]
        pairs = [p for s in recs for p in s["pairs"]]
        frames = sum(p["frames"] for p in pairs)
        per[name] = {"pieces": sum(s["pieces"] for s in recs),
                     "pieces_with_pairs": len({p["key"] for p in pairs}), "pairs": len(pairs),
                     "frames": frames, "hours": round(frames / FRAME_RATE / 3600, 3),
                     "by_renderer": dict(Counter(p["renderer"] for p in pairs))}
        skipped += [{"split": name, **k} for s in recs for k in s["skipped"]]
        for p in pairs:
            if p.get("seconds") and p["music_s"] > 0:
                rates.setdefault(p["renderer"], []).append(p["seconds"] / (p["music_s"] / 60))
    every = [r for v in rates.values() for r in v]
    return {"splits": per, "skipped": dict(Counter(s["reason"] for s in skipped)),
            "skipped_pieces": skipped,
            "s_per_music_min": {"all": _median(every),
                                **{k: _median(v) for k, v in sorted(rates.items())}}}


def _median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 3) if values else None


def training_files(corpus_dir: str | Path, *, works: int | None = None,
                   generated: int = 250) -> list[Path]:
    """The MIDI files training uses: converted music21 works (all of them, or only the first
    ``works`` of :func:`model.training.corpus_works.list_corpus_works`' fixed order), then the
    first ``generated`` generated songs (seed order)."""
    from model.training.corpus import corpus_midi_files
    from model.training.corpus_works import list_corpus_works
    from model.training.songgen_files import generated_midi_files

    root = Path(corpus_dir)
    keys = None if works is None else {w.key for w in list_corpus_works()[:works]}
    return corpus_midi_files(root, keys=keys) + generated_midi_files(root)[:generated]


def corpus_files(corpus_dir: str | Path) -> list[Path]:
    """The cached collection: converted music21 works (deduplicated) and generated songs."""
    from model.training.corpus import corpus_midi_files

    root = Path(corpus_dir)
    return corpus_midi_files(root) + sorted((root / "generated").glob("*.mid"))

