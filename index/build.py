"""Build or update an index from folders of MIDI files.

``build_index`` walks the given paths for ``.mid``/``.midi``/``.kar`` files, renders and encodes
new or changed ones in parallel worker processes (:mod:`index.build_pool`, which survives a
worker's death), reuses unchanged ones from the existing index, and writes a new generation
atomically (see :mod:`index.store`). Every file that cannot be used is listed in the build report
with its reason; one bad file, even one that kills its worker process, never stops the build.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index import store
from model.errors import MidimatchError, ModelMismatchError

MIDI_SUFFIXES = (".mid", ".midi", ".kar")
MIN_FRAMES = 8  # two hash frames; anything shorter cannot be matched
MAX_FILE_TIMEOUT_S = 1e6  # setitimer overflows past ~1e11 s; no file needs days


@dataclass(frozen=True)
class BuildOptions:
    """What a build uses; one object so that worker processes get exactly the same settings."""

    weights: str | None = None  # None → the shipped default model (or the untrained fallback)
    # MIDI → frames: "fast" note render, "synth" (synthesise + CQT) or "sine" (pretty_midi's
    # sine synthesis + CQT: the same frames on every machine)
    method: str = "fast"
    workers: int = 2
    file_timeout_s: float = 120.0
    rebuild: bool = False  # re-encode everything (needed after changing the model)
    prune_missing: bool = False  # drop references whose file no longer exists
    progress: bool = True
    window_hop: int | None = None  # embedding window hop, CQT frames; None → the model's (108)

    def __post_init__(self) -> None:
        # NaN fails every comparison; 0 would disarm setitimer: no timeout at all, silently
        if not 0 < self.file_timeout_s <= MAX_FILE_TIMEOUT_S:
            raise MidimatchError(f"the per-file timeout must be > 0 and <= "
                                 f"{MAX_FILE_TIMEOUT_S:g} seconds, got {self.file_timeout_s:g}",
                                 reason="bad_argument")


def _load_encoder(opts: BuildOptions):
    """The build's encoder: the model of ``opts.weights`` with ``opts.window_hop`` applied."""
    from dataclasses import replace

    from model.encoder import Encoder

    encoder = Encoder.load(opts.weights)
    if opts.window_hop is not None:
        if not 1 <= opts.window_hop <= encoder.window.length:
            raise MidimatchError(f"window hop must be in 1..{encoder.window.length} frames, got "
                                 f"{opts.window_hop}", reason="bad_argument")
        encoder.window = replace(encoder.window, hop=opts.window_hop)
    return encoder


def find_midi_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[dict]]:
    """Expand files and folders into a sorted, de-duplicated list of MIDI files.

    Returns the files and a list of ``{"path", "reason", "message"}`` for arguments that do not
    exist or are not MIDI files (``missing``, ``not_midi_suffix``) and for folders and files
    found that cannot be read (``unreadable``).
    """
    found: set[Path] = set()
    problems: list[dict] = []

    def unreadable(e: OSError) -> None:
        problems.append({"path": str(e.filename), "reason": "unreadable",
                         "message": f"cannot read {e.filename}: {e.strerror or e}"})

    for p in map(Path, paths):
        if os.path.isdir(p):
            # os.walk, not Path.rglob: rglob skips a folder it cannot list without a word
            for folder, _, names in os.walk(p, onerror=unreadable):
                for name in names:
                    f = Path(folder, name)
                    if f.suffix.lower() not in MIDI_SUFFIXES:
                        continue
                    try:
                        if stat.S_ISREG(f.stat().st_mode):  # not a fifo, socket...
                            found.add(f.resolve())
                    except FileNotFoundError:
                        pass  # a dangling link
                    except OSError as e:
                        unreadable(e)
        elif os.path.isfile(p):
            if p.suffix.lower() in MIDI_SUFFIXES:
                found.add(p.resolve())
            else:
                problems.append({"path": str(p), "reason": "not_midi_suffix",
                                 "message": f"not a .mid/.midi/.kar file: {p}"})
        else:
            problems.append({"path": str(p), "reason": "missing",
                             "message": f"no such file or folder: {p}"})
    return sorted(found), problems


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- one file
def encode_file(path: Path, encoder, method: str = "fast") -> tuple[dict, np.ndarray,
                                                                    np.ndarray, np.ndarray]:
    """Parse, render and encode one MIDI file.

    Returns ``(ref_metadata, hashes (H,), window_embeddings (W, D) float16, starts (W,))``.
    Raises :class:`MidimatchError` subclasses for unusable files.
    """
    from model.fastrender import midi_to_frames_fast
    from model.midi import load_midi, load_notes
    from model.synth import midi_to_frames

    if method == "fast":  # straight to note arrays, no PrettyMIDI: ~3x quicker to frames
        notes = load_notes(path)
        frames, duration_s = midi_to_frames_fast(notes), notes.end_s
    else:
        pm = load_midi(path)
        frames, duration_s = midi_to_frames(pm, method=method), pm.get_end_time()
    if frames.shape[0] < MIN_FRAMES:
        raise MidimatchError(f"{path}: too short to match ({frames.shape[0]} frames)",
                             reason="too_short")
    hashes = encoder.hashes(frames, "midi")
    emb, starts = encoder.window_embeddings(frames, "midi")
    ref = {
        "path": str(path),
        "title": piece_title(path),
        "duration_s": round(float(duration_s), 3),
        "n_frames": int(frames.shape[0]),
    }
    return ref, hashes, emb.astype(np.float16), starts.astype(np.int32)


# --------------------------------------------------------------------------- titles
# Names that tools write into the first track when nobody gave the piece one.
_GENERIC_NAME = re.compile(
    r"(untitled|no ?name|title|new song|song|sequence|seq|track|tempo|tempo track|conductor"
    r"|conductor track|control track|midi|piano|acoustic grand piano|melody|part|staff"
    r"|instrument|voice|music21|(track|seq|sequence|part|staff|song|untitled)[ _-]*\d+)",
    re.IGNORECASE)
# A text meta event that says what the piece is called ("Title: ...", "T: ...").
_TITLE_TEXT = re.compile(r"\s*(?:title|t)\s*[:=]\s*(\S.*)", re.IGNORECASE | re.DOTALL)
# The sources the music21 corpus converter names its files after (model/training/corpus_works.py)
# and MIDI's own suffixes, left inside stems like ``bach__bwv379.mxl`` or ``x.mid.mid``.
_SOURCE_SUFFIX = re.compile(
    r"\.(mid|midi|kar|smf|xml|mxl|musicxml|krn|abc|mei|md|rntxt|capx|nwc|mus|json)$",
    re.IGNORECASE)
_MAX_TITLE = 200


def piece_title(path: Path) -> str:
    """A reference's title: the file's own (:func:`midi_title`) when it has one, else its
    file name tidied (:func:`tidy_stem`). Never fails: a file that cannot be read for its
    title gets the tidied name."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)  # the first track's first events are near the start
    except OSError:
        data = b""
    return midi_title(data) or tidy_stem(path.stem)


def midi_title(data: bytes) -> str | None:
    """The title a Standard MIDI File gives itself, or None.

    Read from the first track's events at tick 0 (where tools put it): its track-name meta
    event (by the standard, the sequence's name in a format 0 file or the first track of a
    format 1 file), else a text meta event of the form ``Title: ...`` / ``T: ...``. Names that
    tools write when nobody named the piece (``Untitled``, ``Track 1``, ``Tempo Track``,
    ``Piano``...) and other text events (lyrics, markers, copyright, tool notes) are not
    titles. Malformed data gives None.
    """
    names, texts = _first_track_texts(data)
    for name in names:
        t = _clean_text(name)
        if t and not _GENERIC_NAME.fullmatch(t):
            return t
    for text in texts:
        m = _TITLE_TEXT.fullmatch(_clean_text(text) or "")
        if m and not _GENERIC_NAME.fullmatch(m.group(1).strip()):
            return m.group(1).strip()
    return None


def tidy_stem(stem: str) -> str:
    """A readable name from a file stem: ``trecento__PMFC_06_Piero_1-All_onbra_d_un_perlato.xml``
    → ``PMFC 06 Piero 1-All onbra d un perlato (trecento)``, ``bach__bwv379.mxl`` →
    ``bwv379 (bach)``, ``airdsAirs__book1.abc__x176`` → ``book1 #176 (airdsAirs)``,
    ``song_00042`` → ``song 00042``.

    The corpus prefix before the first ``__`` (the music21 collection a converted work comes
    from: often its composer, which the rest of the name lacks) moves to the end in brackets,
    source suffixes (``.xml``, ``.mxl``, ``.krn``, ``.abc``, ``.mid``...) go, an ABC tune number
    ``__xN`` becomes ``#N``, underscores become spaces.
    """
    parts = [p for p in stem.split("__") if p]
    collection = ""
    if len(parts) > 1:
        collection, parts = parts[0], parts[1:]
    tidy = []
    for part in parts:
        while _SOURCE_SUFFIX.search(part):
            part = _SOURCE_SUFFIX.sub("", part)
        if re.fullmatch(r"x\d+", part) and tidy:
            part = "#" + part[1:]
        tidy.append(part)
    title = " ".join(" ".join(tidy).replace("_", " ").split())
    if title and collection:
        title = f"{title} ({collection})"
    return title[:_MAX_TITLE] or stem


def _clean_text(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text[:_MAX_TITLE] or None


def _first_track_texts(data: bytes) -> tuple[list[bytes], list[bytes]]:
    """The track-name (FF 03) and text (FF 01) meta events at tick 0 of the first track."""
    names: list[bytes] = []
    texts: list[bytes] = []
    if len(data) < 14 or data[:4] != b"MThd":
        return names, texts
    pos = 8 + struct.unpack(">I", data[4:8])[0]
    if data[pos:pos + 4] != b"MTrk" or pos + 8 > len(data):
        return names, texts
    end = min(len(data), pos + 8 + struct.unpack(">I", data[pos + 4:pos + 8])[0])
    pos += 8
    status = 0
    try:
        while pos < end:
            delta, pos = _varlen(data, pos)
            if delta:
                break  # past tick 0
            if data[pos] & 0x80:
                status, pos = data[pos], pos + 1
            if status == 0xFF:
                kind = data[pos]
                length, pos = _varlen(data, pos + 1)
                if kind == 0x03:
                    names.append(data[pos:pos + length])
                elif kind == 0x01:
                    texts.append(data[pos:pos + length])
                elif kind == 0x2F:
                    break  # end of track
                pos += length
            elif status in (0xF0, 0xF7):
                length, pos = _varlen(data, pos)
                pos += length
            elif 0x80 <= status < 0xF0:
                pos += 1 if 0xC0 <= status < 0xE0 else 2
            else:
                break  # no running status to go on with: malformed
    except IndexError:
        pass
    return names, texts


def _varlen(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for _ in range(4):
        b = data[pos]
        pos += 1
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            break
    return value, pos


# --------------------------------------------------------------------------- the build
def build_index(out: str | Path, paths: Sequence[str | Path], opts: BuildOptions | None = None
                ) -> dict:
    """Build (or update) the index at ``out`` from the MIDI files under ``paths``.

    Returns the build report (also stored in the new generation as ``build_report.json``).

    Raises
    ------
    ModelMismatchError
        The existing index was built with another model and ``opts.rebuild`` is false.
    MidimatchError
        ``no_midi_files``: ``paths`` hold no MIDI file (a missing path, a typo, OUT and PATH
        swapped); nothing is written. Only a ``prune_missing`` update of an existing index may
        run without one.
    store.IndexWriteError
        ``out`` cannot be written: found before any file is encoded.
    """
    opts = opts or BuildOptions()
    t0 = time.perf_counter()
    files, skipped = find_midi_files(paths)
    if not files and not (opts.prune_missing and store.exists(out) and not opts.rebuild):
        raise _nothing_to_index(out, paths, skipped)
    encoder = _load_encoder(opts)
    meta = {
        "model_id": encoder.model_id,
        "n_bits": encoder.n_bits,
        "hash_dtype": encoder.hash_dtype.name,
        "embed_dim": encoder.config.embed_dim,
        "frame_rate_hz": 22050 / 1024,
        "hash_downsample": 4,
        "window": {"length": encoder.window.length, "hop": encoder.window.hop},
        "render_method": opts.method,
    }
    old = None
    if store.exists(out) and not opts.rebuild:
        old = store.load_index(out, mmap=True)
        if (old.model_id != encoder.model_id or old.meta.get("render_method") != opts.method
                or old.meta.get("window", meta["window"]) != meta["window"]):
            raise ModelMismatchError(
                f"index {out} was built with model {old.model_id!r} "
                f"(render {old.meta.get('render_method')!r}, window {old.meta.get('window')}); "
                f"this build uses {encoder.model_id!r} (render {opts.method!r}, window "
                f"{meta['window']}). Pass --rebuild to re-encode every reference."
            )

    store.check_writable(out)  # now, not after minutes of encoding
    kept: dict[str, tuple] = {}  # path → part, in the old order
    if old is not None:
        for part in store.iter_parts(old):
            kept[part[0]["path"]] = part
    todo: list[tuple[str, str, int, float]] = []
    reused = updated = 0
    for f in files:
        prev = kept.get(str(f))
        try:
            st = f.stat()
            # size + mtime unchanged → trust the stored content hash without re-reading the file
            if prev is not None and prev[0].get("size_bytes") == st.st_size and \
                    prev[0].get("mtime") == st.st_mtime:
                reused += 1
                continue
            sha = file_sha256(f)
        except OSError as e:  # unreadable, or gone since it was found: skipped, not kept stale
            skipped.append({"path": str(f), "reason": "unreadable",
                            "message": f"cannot read {f}: {e.strerror or e}"})
            kept.pop(str(f), None)
            continue
        if prev is not None and prev[0].get("sha256") == sha:
            reused += 1
            continue
        updated += prev is not None
        todo.append((str(f), sha, st.st_size, st.st_mtime))

    removed = 0
    if opts.prune_missing:
        for p in [p for p in kept if not Path(p).exists()]:
            del kept[p]
            removed += 1

    new_parts: dict[str, tuple] = {}
    deaths = 0
    if todo:
        new_parts, failed, deaths = _run_pool(todo, opts)
        skipped.extend(failed)
        for p in (t[0] for t in todo):  # a changed file that now fails is dropped, not kept stale
            if p in kept and p not in new_parts:
                del kept[p]

    n_encoded = len(new_parts)  # before the merge below consumes it
    parts = [new_parts.pop(p, part) for p, part in kept.items()] + list(new_parts.values())
    data = store.concat(meta, parts, encoder.hash_dtype)
    elapsed = time.perf_counter() - t0
    report = {
        "model_id": encoder.model_id,
        "render_method": opts.method,
        "inputs": [str(p) for p in paths],
        "files_found": len(files),
        "encoded": n_encoded,
        "reused": reused,
        "updated": updated,
        "removed_missing": removed,
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "n_refs": len(parts),
        "seconds": round(elapsed, 3),
        "files_per_s": round(len(todo) / elapsed, 2) if todo else None,
        "workers": opts.workers,
        "worker_deaths": deaths,
    }
    report["bytes_per_ref"] = round(data.nbytes() / len(parts)) if parts else None
    store.write_index(out, data, report)
    return report


def _nothing_to_index(out: str | Path, paths: Sequence[str | Path], problems: list[dict]
                      ) -> MidimatchError:
    """The error of a build that found no MIDI file: each argument's problem, or that none
    was found."""
    why = [p["message"] for p in problems] or [
        f"no .mid/.midi/.kar file in {', '.join(map(str, paths)) or 'no path given'}"]
    more = f" (and {len(why) - 3} more)" if len(why) > 3 else ""
    return MidimatchError(f"nothing to index: {'; '.join(why[:3])}{more}; {out} not written",
                          reason="no_midi_files")


def _run_pool(todo: list[tuple[str, str, int, float]], opts: BuildOptions
              ) -> tuple[dict[str, tuple], list[dict], int]:
    """Encode ``todo`` (see :mod:`index.build_pool`): (parts by path in input order, skipped
    files, worker deaths survived)."""
    from tqdm import tqdm

    from index.build_pool import run_tasks

    done: dict[str, tuple] = {}
    failed: list[dict] = []
    bar = tqdm(total=len(todo), unit="file", desc="indexing", disable=not opts.progress)

    def collect(res) -> None:
        if res[0] == "ok":
            done[res[1]["path"]] = res[1:]
        else:
            failed.append(res[1])
        bar.update()
        bar.set_postfix(skipped=len(failed), refresh=False)

    try:
        deaths = run_tasks(todo, opts, collect)
    finally:
        bar.close()
    # keep the input order so that reference numbers do not depend on scheduling
    order = {t[0]: i for i, t in enumerate(todo)}
    return dict(sorted(done.items(), key=lambda kv: order[kv[0]])), failed, deaths
