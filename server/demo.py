"""The demo collection: the pieces of an index, and rendered excerpts for the "play a demo" button.

Only ``refs.jsonl`` of the index is read (titles, durations, MIDI paths), with the standard
library: the gateway stays free of torch and numba, so this does not use ``model.training.render``
(which imports the torch CQT). An excerpt is cut from the MIDI as :func:`model.midi.load_midi`
reads it (as the index read it: tempo events of every track; no numba) and rendered by the
FluidSynth command line when it is installed, else by pretty_midi's sine synthesiser.

An excerpt has music to its end: its span starts on a note and ends where the last note of the
span stops sounding (:func:`choose_span`), a piece with less than :data:`MIN_MUSIC_S` of music
there is not used, and the renderer's silent tail (FluidSynth writes about 2 s of it) is cut
(:func:`trim_tail`). music21's test fixtures (:func:`is_fixture`) are never drawn, and
``midimatch demo prepare`` leaves them out of the demo index.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import shutil
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.errors import MidimatchError

SAMPLE_RATE = 22_050
RENDER_TIMEOUT_S = 60.0
MAX_RENDERS = 2  # demo renders at once per gateway: the button must not become a CPU hog
MIN_MUSIC_S = 15.0  # a demo shorter than this may never be decided (a median 6-7 s is needed)
TAIL_S = 0.3  # release kept after the last note stops, s
QUIET_DB = -45.0  # the rendered tail below this (re the excerpt's peak) is silence, cut
FADE_S = 0.03  # fade-out over the last samples, so the cut does not click
TRIES = 5  # pieces tried by random_excerpt before it gives up
# music21 corpus folders that hold test fixtures, not music (layout tests, nested tuplets,
# lyrics with verses...): the demo collection leaves them out. Converted files are named
# "<folder>__<rest>.mid" (model.training.corpus_works).
FIXTURE_FOLDERS = frozenset({"demos"})
SOUNDFONTS = (Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"),
              Path("/usr/share/sounds/sf2/default-GM.sf2"),
              Path("/usr/share/sounds/sf2/TimGM6mb.sf2"))


class DemoError(MidimatchError):
    """No demo could be made (no index, unreadable MIDI, renderer failure)."""

    reason = "demo_failed"


@dataclass(frozen=True)
class Piece:
    """One reference of the index as the gateway knows it (``id`` as in ``index.search``)."""

    ref: int
    id: str
    title: str
    duration_s: float
    path: Path


@dataclass(frozen=True)
class Excerpt:
    """A rendered demo: WAV bytes (16-bit mono, :data:`SAMPLE_RATE`) of ``piece`` from
    ``start_s``."""

    wav: bytes
    ref_id: str
    title: str
    start_s: float
    renderer: str
    duration_s: float = 0.0  # of the WAV


def is_fixture(path: str | Path) -> bool:
    """Whether ``path`` is a converted music21 test fixture (its corpus ``demos`` folder), which
    the demo collection leaves out."""
    return Path(path).name.split("__", 1)[0] in FIXTURE_FOLDERS


def without_fixtures(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """``files`` split into (kept, left out as test fixtures: :func:`is_fixture`)."""
    kept = [f for f in files if not is_fixture(f)]
    return kept, [f for f in files if is_fixture(f)]


def sounding_spans(pm, *, pitched_only: bool = False) -> np.ndarray:
    """The times a note of ``pm`` sounds: ``(n, 2)`` sorted, disjoint ``[start, end)`` spans.

    ``pitched_only`` leaves drums out (pretty_midi's sine synthesiser does not play them).
    """
    notes = sorted((n.start, n.end) for i in pm.instruments if not (pitched_only and i.is_drum)
                   for n in i.notes if n.end > n.start)
    spans: list[list[float]] = []
    for a, b in notes:
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    return np.asarray(spans, dtype=np.float64).reshape(-1, 2)


def choose_span(spans: np.ndarray, seconds: float, rng: random.Random, *,
                start_s: float | None = None, min_music_s: float = MIN_MUSIC_S
                ) -> tuple[float, float]:
    """Where to cut a demo of at most ``seconds`` from a piece whose notes sound in ``spans``.

    The span starts on a note (a random one that leaves enough music after it, or ``start_s``)
    and ends where the last note sounding in it stops, so no silence ends it; it must hold at
    least ``min(min_music_s, seconds)`` of music from its first note to its last, 80 % of it
    sounding (rests inside are part of the music).

    Raises
    ------
    DemoError
        No start leaves that much music (``start_s`` given: that start does not).
    """
    need = min(min_music_s, seconds)
    if len(spans) == 0:
        raise DemoError("no notes")
    s, e = spans[:, 0], spans[:, 1]
    cum = np.concatenate([[0.0], np.cumsum(e - s)])

    def sounding_before(x: np.ndarray) -> np.ndarray:  # seconds of notes sounding before x
        k = np.searchsorted(s, x, side="right")
        last = np.maximum(k - 1, 0)
        return cum[last] + np.where(k > 0, np.clip(x - s[last], 0.0, e[last] - s[last]), 0.0)

    def last_sound(t: np.ndarray) -> np.ndarray:  # where the music of [t, t + seconds) stops
        x = t + seconds
        k = np.maximum(np.searchsorted(s, x, side="left") - 1, 0)
        return np.maximum(np.minimum(e[k], x), t)

    if start_s is not None:
        starts = np.array([float(start_s)])
    else:  # every note onset (spans merge notes; an onset inside a span is a start too)
        starts = np.unique(np.round(s, 3))
        starts = np.unique(np.concatenate([starts, np.round(np.arange(s[0], e[-1], 0.5), 3)]))
        inside = np.searchsorted(s, starts, side="right") - 1
        starts = starts[(inside >= 0) & (starts < e[np.maximum(inside, 0)])]
    ends = last_sound(starts)
    music = sounding_before(ends) - sounding_before(starts)
    ok = (ends - starts >= need - 1e-6) & (music >= 0.8 * need - 1e-6)
    if not ok.any():
        longest = float((ends - starts).max())
        where = f"from {start_s:.1f} s" if start_s is not None else "anywhere"
        raise DemoError(f"only {longest:.1f} s of music {where}; a demo needs {need:g} s")
    k = rng.choice(np.flatnonzero(ok).tolist())
    return float(starts[k]), float(ends[k])


def trim_tail(x: np.ndarray, rate: int, length_s: float | None = None) -> np.ndarray:
    """``x`` without its silent end: at most ``length_s`` + :data:`TAIL_S` long, then cut after
    its last sample above :data:`QUIET_DB` of its peak, with a :data:`FADE_S` fade-out."""
    if length_s is not None:
        x = x[: int(round((length_s + TAIL_S) * rate))]
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak == 0.0:
        return x[:0]
    loud = np.flatnonzero(np.abs(x) > peak * 10 ** (QUIET_DB / 20))
    x = np.array(x[: int(loud[-1]) + 1], dtype=np.float64)
    n = min(len(x), int(FADE_S * rate))
    if n:
        x[-n:] *= np.linspace(1.0, 0.0, n)
    return x


def read_pieces(index_dir: str | Path) -> list[Piece]:
    """The references of the live generation of an index.

    Ids follow ``index.search.Cascade``: the first 16 hex digits of the file's SHA-256, else
    ``ref{k}``; titles default to the file name's stem.

    Raises
    ------
    DemoError
        When ``index_dir`` holds no index.
    """
    root = Path(index_dir)
    try:
        gen = root / (root / "CURRENT").read_text().strip()
        lines = (gen / "refs.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DemoError(f"{root} holds no readable index: {e}") from e
    pieces = []
    for k, line in enumerate(x for x in lines if x.strip()):
        r = json.loads(line)
        path = Path(r.get("path", ""))
        pieces.append(Piece(k, str(r.get("sha256", ""))[:16] or f"ref{k}",
                            str(r.get("title") or path.stem), float(r.get("duration_s", 0.0)),
                            path))
    return pieces


class DemoCollection:
    """The pieces a demo may be drawn from.

    Parameters
    ----------
    pieces : list of Piece
    seed : int, optional
        For a reproducible choice of pieces and start times (tests).
    soundfont : Path, optional
        For FluidSynth; the first of :data:`SOUNDFONTS` found when None.
    """

    def __init__(self, pieces: list[Piece], *, seed: int | None = None,
                 soundfont: Path | None = None) -> None:
        self.pieces = pieces
        self.by_id = {p.id: p for p in pieces}
        self._rng = random.Random(seed)
        self.soundfont = soundfont or next((p for p in SOUNDFONTS if p.is_file()), None)
        self._slots: asyncio.Semaphore | None = None  # bounds concurrent renders (CPU)

    @classmethod
    def from_index(cls, index_dir: str | Path, **kw: object) -> DemoCollection:
        return cls(read_pieces(index_dir), **kw)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.pieces)

    @property
    def renderer(self) -> str:
        return "fluidsynth" if shutil.which("fluidsynth") and self.soundfont else "sine"

    async def random_excerpt(self, seconds: float) -> Excerpt:
        """Render at most ``seconds`` of a random piece, off the event loop: music to its end,
        at least ``min(MIN_MUSIC_S, seconds)`` of it (:func:`choose_span`); never a test
        fixture (:func:`is_fixture`) or a piece shorter than that.

        Raises
        ------
        DemoError
            Every piece tried failed to load or render, or had too little music.
        """
        need = min(MIN_MUSIC_S, seconds)
        candidates = [p for p in self.pieces if p.path.is_file() and not is_fixture(p.path)
                      and (p.duration_s <= 0 or p.duration_s >= need)]
        if not candidates:
            raise DemoError(f"none of the collection's MIDI files is readable here and holds "
                            f"{need:g} s of music")
        errors = []
        for piece in self._rng.sample(candidates, min(TRIES, len(candidates))):
            try:
                return await self.excerpt(piece, seconds)
            except DemoError as e:
                errors.append(f"{piece.title}: {e}")
        raise DemoError("; ".join(errors))

    async def excerpt(self, piece: Piece, seconds: float, start_s: float | None = None
                      ) -> Excerpt:
        """Render at most ``seconds`` of ``piece`` from ``start_s`` (a random note when None),
        ending where its last note stops (:func:`choose_span`); at most :data:`MAX_RENDERS` at
        once, the others wait.

        Raises
        ------
        DemoError
            Unreadable MIDI, too little music (from ``start_s``), or the renderer failed.
        """
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_RENDERS)
        async with self._slots:
            return await self._excerpt(piece, seconds, start_s)

    async def _excerpt(self, piece: Piece, seconds: float, start_s: float | None) -> Excerpt:
        pm = await asyncio.to_thread(_load, piece.path)
        renderer = self.renderer
        spans = sounding_spans(pm, pitched_only=renderer == "sine")
        start_s, end_s = choose_span(spans, seconds, self._rng, start_s=start_s)
        cut = crop(pm, start_s, end_s)
        if renderer == "fluidsynth":
            x, rate = await _fluidsynth(cut, self.soundfont)  # type: ignore[arg-type]
        else:
            x, rate = await asyncio.to_thread(_sine, cut), SAMPLE_RATE
        x = trim_tail(x, rate, end_s - start_s)
        return Excerpt(_wav(x, rate), piece.id, piece.title, float(start_s), renderer,
                       round(len(x) / rate, 3))


def _load(path: Path):  # -> pretty_midi.PrettyMIDI
    # model.midi.load_midi, as the index read the piece (tempo events of every track: a
    # position is the index's), without numba or torch
    from model.midi import load_midi

    try:
        return load_midi(path)
    except MidimatchError as e:  # MidiError: the file went bad or away since it was indexed
        raise DemoError(f"cannot read {path.name}: {e}") from e


def crop(pm, start_s: float, end_s: float):  # (PrettyMIDI, float, float) -> PrettyMIDI
    """The notes and pedal moves of ``pm`` sounding in ``[start_s, end_s)``, shifted to 0 s.

    Notes that started before ``start_s`` are cut to start at it (a held chord keeps sounding).
    Tempo changes do not matter after this: times are already in seconds.
    """
    import pretty_midi

    out = pretty_midi.PrettyMIDI(initial_tempo=120.0)
    for inst in pm.instruments:
        new = pretty_midi.Instrument(inst.program, is_drum=inst.is_drum, name=inst.name)
        for n in inst.notes:
            if n.end > start_s and n.start < end_s:
                new.notes.append(pretty_midi.Note(n.velocity, n.pitch, max(n.start, start_s)
                                                  - start_s, min(n.end, end_s) - start_s))
        for c in inst.control_changes:
            if start_s <= c.time < end_s:
                new.control_changes.append(pretty_midi.ControlChange(c.number, c.value,
                                                                     c.time - start_s))
        if new.notes:
            out.instruments.append(new)
    if not out.instruments:
        raise DemoError(f"no notes between {start_s:.1f} s and {end_s:.1f} s")
    return out


async def _fluidsynth(pm, soundfont: Path) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory(prefix="midimatch-demo-") as tmp:
        mid, out = Path(tmp) / "demo.mid", Path(tmp) / "demo.wav"
        pm.write(str(mid))
        proc = await asyncio.create_subprocess_exec(
            "fluidsynth", "-ni", "-g", "0.6", "-r", str(SAMPLE_RATE), "-F", str(out), "-T", "wav",
            "-O", "s16", str(soundfont), str(mid),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), RENDER_TIMEOUT_S)
        except asyncio.TimeoutError as e:
            proc.kill()
            await proc.wait()
            raise DemoError(f"fluidsynth ran past {RENDER_TIMEOUT_S:g} s") from e
        if proc.returncode != 0 or not out.is_file():
            raise DemoError(f"fluidsynth failed ({proc.returncode}): {err.decode()[-300:]}")
        return _to_mono(out.read_bytes())


def _to_mono(data: bytes) -> tuple[np.ndarray, int]:
    """FluidSynth writes stereo; the page and the client stream mono just as well, at half the
    bytes."""
    with wave.open(io.BytesIO(data)) as w:
        ch, rate = w.getnchannels(), w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, ch)
    return x.astype(np.float32).mean(axis=1) / 32768.0, rate


def _sine(pm) -> np.ndarray:
    return pm.synthesize(fs=SAMPLE_RATE)


def _wav(x: np.ndarray, rate: int) -> bytes:
    """float samples (n,) → 16-bit mono WAV, peak-normalised to -6 dBFS."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 0:
        x = x * (0.5 / peak)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()
