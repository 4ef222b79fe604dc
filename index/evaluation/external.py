"""A visible validation set of MIDI/audio pairs made elsewhere: ``midimatch eval prepare-external``.

Exactly these sources, all Debian packages (:data:`PACKAGES`), found with ``dpkg -L``:

* ``mscore3``: the five demo scores of ``musescore3-common`` (:data:`DEMO_SCORES`: every demo
  of its 3.2.3 package, four ``.mscx`` and one ``.mscz``), each exported by MuseScore 3
  (``mscore3 -o``) to MIDI and to FLAC. Both come from one playback of the score (checked:
  their onset curves correlate best at lag 0), so second t of the audio is second t of the
  MIDI. MuseScore plays with its own synthesiser and MuseScore General, the sample set of the
  training renderer ``fluid-musescore``: these pairs test MIDI written and played by another
  program (its dynamics, articulation, balance), not an unheard timbre.
* ``solfege``: ``fanfare.midi`` and its rendering ``fanfare.wav``, shipped together: 2.1 s of
  music in 4.1 s of audio, so one clip of the whole audio per condition (its length is its
  own row). Its tempo event (100 bpm) is in track 1, where players obey it and so does
  :mod:`model.midi` (pretty_midi alone would read 120 bpm): the audio's second t is the
  reference's.
* ``openmsx/<renderer>``: the 31 MIDI files of ``openttd-openmsx``, rendered by held-out
  renderers (default :data:`RENDERERS`) exactly as ``eval prepare`` renders its queries
  (:func:`index.evaluation.evalset.clips_of_piece`).

Other packages' pre-rendered audio of their own MIDI files is *not* used here: it is kept for
independent checks.

The index (``OUT/index``) holds the 37 MIDI files (copied to ``OUT/midi/<source>/``) plus, as
distractors, the indexed files of ``eval prepare``'s plan of the cached corpus
(:func:`index.evaluation.evalset.plan_collection`; ``n_generated_index=1800``, the references
of ``bench/engines.py``'s table in docs/evaluation.md), so a top-1 is a choice among ~2,190.
Queries (``OUT/queries``, the :mod:`index.evaluation.evalset` format, ``source`` as above):
clips of 5, 10 and 20 s, ``clean`` and ``room_noise``, from a random start after a 1 s lead-in;
every query is in the collection. ``OUT/external.json`` records what was made and what failed
(a failure skips that file, never the run).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from index.evaluation.evalset import FORMAT, LEAD_S, QuerySetConfig
from model.errors import MidimatchError

PACKAGES = {"mscore3": ("musescore3", "musescore3-common"), "solfege": ("solfege",),
            "openmsx": ("openttd-openmsx",)}
DEMO_SCORES = ("Brassed_Up", "Dynamic_Strings", "Fugue_1", "Reunion", "Unclaimed_Gift")
RENDERERS = ("timidity-freepats", "adplay-opl3", "csound-fm")
CONDITIONS = ("clean", "room_noise")
LENGTHS_S = (5.0, 10.0, 20.0)
EXPORT_TIMEOUT_S = 300.0
# family and role of the pair sources (bench/engines.py's columns): MuseScore plays with a
# sampled GM soundfont (MuseScore General, a training sample set); solfege's renderer is unknown
PAIR_SOURCES = {"mscore3": ("sampled-gm", "pair"), "solfege": ("unknown", "pair")}


@dataclass
class Sources:
    """The input files: demo scores, the solfege pair, the openmsx MIDI files."""

    scores: list[Path] = field(default_factory=list)
    fanfare: tuple[Path, Path] | None = None  # (MIDI, audio)
    openmsx: list[Path] = field(default_factory=list)


def package_files(package: str) -> list[Path] | None:
    """Files of an installed Debian package (``dpkg -L``); None when it is not installed."""
    if shutil.which("dpkg") is None:
        return None
    done = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    return [Path(x) for x in done.stdout.splitlines() if x.strip()] if done.returncode == 0 \
        else None


def find_sources() -> Sources:
    """The sources of the installed packages.

    Raises
    ------
    MidimatchError
        ``not_installed``, naming the ``apt-get install`` command, or ``no_source`` when a
        package lacks the files expected of it.
    """
    listed = {p: package_files(p) for pkgs in PACKAGES.values() for p in pkgs}
    missing = sorted(p for p, files in listed.items() if files is None)
    if missing or shutil.which("mscore3") is None:
        missing = missing or ["musescore3"]
        raise MidimatchError(f"{', '.join(missing)} not installed: sudo apt-get install "
                             f"{' '.join(missing)}", reason="not_installed")
    demos = {f.stem: f for f in listed["musescore3-common"] or []
             if f.parent.name == "demos" and f.suffix in (".mscz", ".mscx")}
    fanfare = {f.suffix: f for f in listed["solfege"] or [] if f.stem == "fanfare"}
    src = Sources(scores=[demos[s] for s in DEMO_SCORES if s in demos],
                  openmsx=sorted(f for f in listed["openttd-openmsx"] or []
                                 if f.suffix == ".mid"))
    if ".midi" in fanfare and ".wav" in fanfare:
        src.fanfare = (fanfare[".midi"], fanfare[".wav"])
    if not src.scores or src.fanfare is None or not src.openmsx:
        raise MidimatchError(f"expected files missing: {len(src.scores)} demo scores, fanfare "
                             f"{'found' if src.fanfare else 'missing'}, {len(src.openmsx)} "
                             "openmsx MIDI files", reason="no_source")
    return src


def export_score(score: Path, out: Path, *, mscore: str = "mscore3",
                 timeout_s: float = EXPORT_TIMEOUT_S) -> None:
    """``mscore3 -o out score``, headless (the format follows ``out``'s suffix).

    Raises
    ------
    MidimatchError
        ``export_failed``: a non-zero exit, a timeout or no output file.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    env.setdefault("XDG_RUNTIME_DIR", str(out.parent))
    try:
        done = subprocess.run([mscore, "-o", str(tmp), str(score)], capture_output=True,
                              text=True, env=env, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MidimatchError(f"{score.name}: {e}", reason="export_failed") from e
    if done.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
        tail = " ".join((done.stderr or done.stdout).split()[-20:])
        tmp.unlink(missing_ok=True)
        raise MidimatchError(f"{score.name} → {out.suffix}: exit {done.returncode}: {tail}",
                             reason="export_failed")
    tmp.replace(out)


def clips_of_pair(midi_path: str, audio_path: str, cfg: QuerySetConfig
                  ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Cut clips of every ``cfg.lengths_s`` (that fits) from audio made from ``midi_path``.

    As :func:`index.evaluation.evalset.clips_of_piece` does for its renders: one random start
    after a lead-in, shorter clips are prefixes of the longest one's frames, ``room_noise`` is
    applied to the audio around the clip. Audio whose music is shorter than the shortest clip
    gives one clip of the whole audio, its length rounded to 0.1 s.
    """
    from scipy.signal import resample_poly

    from model.audio import load_audio
    from model.features import HOP, SAMPLE_RATE, audio_to_frames
    from model.midi import load_notes
    from model.training.augment import augment_audio, preset

    audio, sr = load_audio(audio_path)
    ratio = Fraction(SAMPLE_RATE, sr)
    audio = resample_poly(audio.mean(axis=1), ratio.numerator, ratio.denominator)
    # The audio plays the file as model.midi reads it (the tempo events of every track), so
    # its second t is the reference's.
    music_s = ref_end = float(load_notes(midi_path).end_s)
    rng = np.random.default_rng([cfg.seed, zlib.crc32(str(midi_path).encode())])
    fits = [x for x in cfg.lengths_s if LEAD_S + x + 0.5 <= music_s]
    if fits:
        longest = max(fits)
        start = float(rng.uniform(LEAD_S, max(LEAD_S, music_s - longest - 0.5)))
        lo, hi = start - LEAD_S, start + longest + 1.0
        lengths = fits
    else:
        start, lo, hi = 0.0, 0.0, audio.size / SAMPLE_RATE
        lengths = [round(hi, 1)]
    segment = audio[int(lo * SAMPLE_RATE): int(hi * SAMPLE_RATE)]
    records, frames = [], []
    for cond in cfg.conditions:
        a, aug = segment, {}
        if cond != "clean":
            a, aug = augment_audio(segment, SAMPLE_RATE, rng, preset(cond))
        a = a[int((start - lo) * SAMPLE_RATE): int((start - lo + max(lengths)) * SAMPLE_RATE)]
        full = audio_to_frames(a, SAMPLE_RATE)
        for length in lengths:
            n = min(a.size, int(round(length * SAMPLE_RATE)))
            end = min(ref_end, start + n / SAMPLE_RATE)
            records.append({"condition": cond, "length_s": float(length), "tempo": 1.0,
                            "start_s": round(start, 4),
                            "end_s": round(end, 4), "audio_aug": sorted(aug)})
            frames.append(full[: 1 + n // HOP].astype(np.float16))
    return records, frames


# ---------------------------------------------------------------------------- query set
def _item_task(task: tuple[dict[str, Any], QuerySetConfig, str]
               ) -> tuple[dict[str, Any], str | None]:
    """Clips of one item (a pair, or a MIDI file and a renderer) into ``out_file``."""
    from index.evaluation.evalset import clips_of_piece

    item, cfg, out_file = task
    try:
        if item.get("audio"):
            records, frames = clips_of_pair(item["midi"], item["audio"], cfg)
        else:
            rcfg = QuerySetConfig(lengths_s=cfg.lengths_s, conditions=cfg.conditions,
                                  renderer=item["renderer"], seed=cfg.seed)
            records, frames = clips_of_piece({"path": item["midi"]}, cfg.conditions, rcfg)
    except Exception as e:  # noqa: BLE001 — one file's failure is recorded, never fatal
        return item, f"{getattr(e, 'reason', type(e).__name__)}: {e}"[:300]
    tmp = Path(out_file).with_suffix(".tmp.npz")
    np.savez(tmp, **{f"clip{i}": f for i, f in enumerate(frames)})
    tmp.replace(out_file)
    Path(out_file).with_suffix(".json").write_text(json.dumps(records))
    return item, None


def make_external_queries(items: list[dict[str, Any]], out_dir: Path, cfg: QuerySetConfig, *,
                          workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Clips of every item (``source``, ``midi``, ``audio`` or ``renderer``) into ``out_dir``
    (resumable: an item whose files exist is not made again); returns ``queries.json``."""
    from tqdm import tqdm

    from index.evaluation.evalset import _init_worker

    (out_dir / "pieces").mkdir(parents=True, exist_ok=True)
    for it in items:
        it["file"] = f"{it['source'].replace('/', '-')}__{Path(it['midi']).stem}.npz"
    todo = [(it, cfg, str(out_dir / "pieces" / it["file"])) for it in items
            if not (out_dir / "pieces" / it["file"]).with_suffix(".json").is_file()]
    if workers <= 0 or len(todo) <= 1:
        results = map(_item_task, todo)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                   initializer=_init_worker)
        results = pool.map(_item_task, todo, chunksize=1)
    skipped = []
    try:
        for item, err in tqdm(results, total=len(todo), desc="external queries", unit="item",
                              disable=not progress):
            if err is not None:
                skipped.append({"source": item["source"], "path": item["midi"], "error": err})
    finally:
        if pool is not None:
            pool.shutdown()
    queries = []
    for it in items:
        f = (out_dir / "pieces" / it["file"]).with_suffix(".json")
        if not f.is_file():
            continue
        for i, rec in enumerate(json.loads(f.read_text())):
            queries.append({**rec, "piece": it["midi"], "kind": "in", "ref_path": it["midi"],
                            "source": it["source"], "split": "external",
                            "renderer": it.get("renderer"), "file": it["file"],
                            "key": f"clip{i}"})
    manifest = {"format": FORMAT, "config": asdict(cfg), "plan_notes": {"external": True},
                "queries": queries, "skipped": skipped}
    tmp = out_dir / "queries.json.tmp"
    tmp.write_text(json.dumps(manifest))
    tmp.replace(out_dir / "queries.json")
    return manifest


# ---------------------------------------------------------------------------- the whole build
def prepare(out: Path, sources: Sources, *, renderers: tuple[str, ...] = RENDERERS,
            distractors: list[str] | None = None, workers: int = 2, seed: int = 0,
            progress: bool = True, mscore: str = "mscore3",
            lengths_s: tuple[float, ...] = LENGTHS_S) -> dict[str, Any]:
    """Export the scores, copy the MIDI files, build the index and cut the queries into
    ``out``; returns the report written to ``out/external.json``."""
    from tqdm import tqdm

    from index.build import BuildOptions, build_index

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    midi_dir, failed, items = out / "midi", [], []
    seconds: dict[str, float] = {}
    for score in tqdm(sources.scores, desc="mscore3 export", unit="score", disable=not progress):
        mid = midi_dir / "mscore3" / f"{score.stem}.mid"
        audio = out / "pairs" / f"{score.stem}.flac"
        try:
            for f in (mid, audio):
                if not f.is_file():
                    export_score(score, f, mscore=mscore)
        except MidimatchError as e:
            failed.append({"source": "mscore3", "path": str(score), "error": e.message[:300]})
            mid.unlink(missing_ok=True)
            continue
        items.append({"source": "mscore3", "midi": str(mid), "audio": str(audio),
                      "renderer": "mscore3"})
    if sources.fanfare is not None:
        mid = midi_dir / "solfege" / "fanfare.mid"
        mid.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources.fanfare[0], mid)
        items.append({"source": "solfege", "midi": str(mid), "audio": str(sources.fanfare[1])})
    (midi_dir / "openmsx").mkdir(parents=True, exist_ok=True)
    for f in sources.openmsx:
        mid = midi_dir / "openmsx" / f.name
        shutil.copyfile(f, mid)
        items += [{"source": f"openmsx/{r}", "midi": str(mid), "renderer": r} for r in renderers]
    seconds["export"] = time.perf_counter() - t0
    rep = build_index(out / "index", [str(midi_dir), *(distractors or [])],
                      BuildOptions(workers=workers, progress=progress))
    seconds["index"] = time.perf_counter() - t0 - seconds["export"]
    ours = {str(Path(it["midi"]).resolve()) for it in items}
    unusable = {p for s in rep["skipped"] if (p := str(Path(s["path"]).resolve())) in ours}
    failed += [{"source": "index", "path": s["path"], "error": s.get("message", "")[:300]}
               for s in rep["skipped"] if str(Path(s["path"]).resolve()) in unusable]
    items = [it for it in items if str(Path(it["midi"]).resolve()) not in unusable]
    cfg = QuerySetConfig(lengths_s=lengths_s, conditions=CONDITIONS, out_conditions=(),
                         renderer=renderers[0] if renderers else QuerySetConfig.renderer,
                         seed=seed)
    manifest = make_external_queries(items, out / "queries", cfg, workers=workers,
                                     progress=progress)
    seconds["queries"] = time.perf_counter() - t0 - seconds["export"] - seconds["index"]
    counts: dict[str, int] = {}
    for q in manifest["queries"]:
        counts[q["source"]] = counts.get(q["source"], 0) + 1
    report = {"n_refs": rep["n_refs"], "n_distractors": len(distractors or []),
              "n_items": len(items), "clips_by_source": counts, "renderers": list(renderers),
              "failed": failed + manifest["skipped"],
              "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "external.json").write_text(json.dumps(report, indent=1))
    return report
