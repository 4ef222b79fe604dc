"""The demo collection: the pieces of an index, and rendered excerpts for the "play a demo" button.

Only ``refs.jsonl`` of the index is read (titles, durations, MIDI paths), with the standard
library: the gateway stays free of torch and numba, so this does not use ``model.training.render``
(which imports the torch CQT). An excerpt is cut from the MIDI with pretty_midi and rendered by the
FluidSynth command line when it is installed, else by pretty_midi's sine synthesiser.
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
        """Render ``seconds`` of a random piece (whole pieces when shorter), off the event loop.

        Raises
        ------
        DemoError
            Every piece tried failed to load or render.
        """
        candidates = [p for p in self.pieces if p.path.is_file()]
        if not candidates:
            raise DemoError("none of the collection's MIDI files is readable here")
        errors = []
        for piece in self._rng.sample(candidates, min(3, len(candidates))):
            try:
                return await self.excerpt(piece, seconds)
            except DemoError as e:
                errors.append(f"{piece.title}: {e}")
        raise DemoError("; ".join(errors))

    async def excerpt(self, piece: Piece, seconds: float, start_s: float | None = None
                      ) -> Excerpt:
        """Render ``seconds`` of ``piece`` from ``start_s`` (random when None); at most
        :data:`MAX_RENDERS` at once, the others wait."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_RENDERS)
        async with self._slots:
            return await self._excerpt(piece, seconds, start_s)

    async def _excerpt(self, piece: Piece, seconds: float, start_s: float | None) -> Excerpt:
        pm = await asyncio.to_thread(_load, piece.path)
        first = min((n.start for i in pm.instruments for n in i.notes), default=0.0)
        end = pm.get_end_time()
        if start_s is None:
            start_s = self._rng.uniform(first, max(first, end - seconds))
        cut = crop(pm, start_s, start_s + seconds)
        if self.renderer == "fluidsynth":
            wav = await _fluidsynth(cut, self.soundfont)  # type: ignore[arg-type]
        else:
            wav = await asyncio.to_thread(_sine, cut)
        return Excerpt(wav, piece.id, piece.title, float(start_s), self.renderer)


def _load(path: Path):  # -> pretty_midi.PrettyMIDI
    import pretty_midi

    try:
        return pretty_midi.PrettyMIDI(str(path))
    except Exception as e:  # pretty_midi raises many kinds on bad files
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


async def _fluidsynth(pm, soundfont: Path) -> bytes:
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
        return _to_mono_wav(out.read_bytes())


def _to_mono_wav(data: bytes) -> bytes:
    """FluidSynth writes stereo; the page and the client stream mono just as well, at half the
    bytes."""
    with wave.open(io.BytesIO(data)) as w:
        ch, rate = w.getnchannels(), w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, ch)
    mono = x.astype(np.float32).mean(axis=1)
    return _wav(mono / 32768.0, rate)


def _sine(pm) -> bytes:
    return _wav(pm.synthesize(fs=SAMPLE_RATE), SAMPLE_RATE)


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
