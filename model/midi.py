"""MIDI files → validated ``PrettyMIDI`` or :class:`NoteTable` → audio or CQT frames.

Three jobs:

* :func:`load_midi` turns bytes from anywhere into a ``pretty_midi.PrettyMIDI`` or a typed
  :class:`~model.errors.MidiError`, in time and memory bounded by the file size. pretty_midi
  allocates arrays proportional to the largest tick and dies on a zero tempo, so the header,
  the chunk table, the tempo map and the length are checked first, on the cheap.
  :func:`load_notes` does the same checks but reads with symusic's C++ parser straight into the
  note arrays of the fast render (~8x quicker on most files; the index build reads so).
* :func:`midi_to_audio` renders with the FluidSynth CLI (a subprocess with a timeout and an
  output cap; one render in the corpus once produced gigabytes) or pretty_midi's sine synth.
* :func:`midi_to_frames` gives frames on the grid of :mod:`model.features` (hop 1024 at
  22,050 Hz, 48 bins from MIDI 36): ``"synth"`` renders and runs the CQT (Raffel's better
  side, slow); ``"fast"`` draws notes straight into CQT-bin magnitudes
  (:mod:`model.fastrender`, re-exported here).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mido
import numpy as np
import pretty_midi

from model.errors import MidiError, RenderError
from model.fastrender import (
    BLEED,
    DECAY_DB_S,
    DRUM_DECAY_DB_S,
    DRUM_FRAMES,
    DRUM_GAIN,
    PARTIAL_AMP,
    PARTIALS,
    NoteTable,
    demo_piece,
    midi_to_frames_fast,
    midi_to_magnitude_fast,
    n_frames,
)
from model.features import SAMPLE_RATE, audio_to_frames

__all__ = [
    "BLEED", "BPM_RANGE", "DECAY_DB_S", "DRUM_DECAY_DB_S", "DRUM_FRAMES", "DRUM_GAIN",
    "MAX_BYTES", "MAX_DURATION_S", "MAX_TICKS", "MAX_TRACKS", "PARTIALS", "PARTIAL_AMP",
    "SOUNDFONT_DIRS", "NoteTable", "available_renderers", "default_soundfont", "demo_piece",
    "load_midi", "load_notes", "midi_to_audio", "midi_to_frames", "midi_to_frames_fast",
    "midi_to_frames_synth", "midi_to_magnitude_fast", "n_frames",
]

# mido parses ~0.5 MB of dense events a second here and holds ~300 bytes per event, so the
# byte limit is what bounds time and memory (2 MiB: ~4 s, ~250 MB worst case; a pop song is
# ~50 kB).
MAX_BYTES = 2 << 20
MAX_TRACKS = 512
MAX_DURATION_S = 3600.0
MAX_TICKS = 10_000_000  # pretty_midi's own MAX_TICK: its tick→time array is 8 bytes per tick
BPM_RANGE = (4.0, 1000.0)  # 3.58 bpm is the slowest a tempo event can say
SOUNDFONT_DIRS = (Path("/usr/share/sounds/sf2"), Path("/usr/share/soundfonts"))
_PREFERRED_SOUNDFONTS = ("FluidR3_GM.sf2", "default-GM.sf2", "TimGM6mb.sf2")
# A tempo, time or key signature event (FF 51/58/59) whose length is not 3/4/2 bytes: symusic
# reads on past it (or from stale memory). The bytes can also occur by chance, in a delta-time
# or a text: that only costs a re-read by load_midi (no file of the cached corpus has them).
_ODD_META = re.compile(rb"\xff(?:\x51[^\x03]|\x58[^\x04]|\x59[^\x02])")


def load_midi(source: str | Path | bytes, *, max_bytes: int = MAX_BYTES,
              max_tracks: int = MAX_TRACKS, max_duration_s: float = MAX_DURATION_S,
              max_ticks: int = MAX_TICKS,
              bpm_range: tuple[float, float] = BPM_RANGE) -> pretty_midi.PrettyMIDI:
    """Read and validate a Standard MIDI File.

    Parameters
    ----------
    source : str, Path or bytes
        A path, or the file's bytes.
    max_bytes, max_tracks : int
        Bounds on the file size and on the number of tracks.
    max_duration_s : float
        Longest allowed piece, seconds (to its last event).
    max_ticks : int
        Largest allowed absolute tick (bounds pretty_midi's tick→time table).
    bpm_range : (float, float)
        Allowed tempi in beats per minute, for the tempo map pretty_midi uses (track 0).

    Returns
    -------
    pretty_midi.PrettyMIDI

    Raises
    ------
    MidiError
        ``reason`` is one of ``too_large``, ``unreadable``, ``not_midi``, ``truncated``,
        ``corrupt``, ``unsupported`` (SMPTE time division), ``too_many_tracks``, ``bad_tempo``,
        ``too_long``, ``no_notes``.
    """
    data = _read_bounded(source, max_bytes)
    _check_chunks(data, max_tracks)
    try:
        # clip=True: data bytes > 127 occur in real files; pretty_midi's default would refuse.
        mf = mido.MidiFile(file=io.BytesIO(data), clip=True)
    except EOFError as e:
        raise MidiError("MIDI track ends in the middle of an event", reason="truncated") from e
    except (OSError, ValueError, KeyError, IndexError, TypeError, struct.error,
            mido.KeySignatureError) as e:
        raise MidiError(f"malformed MIDI data: {e}", reason="corrupt") from e
    max_tick, tempos = 0, []
    for i, track in enumerate(mf.tracks):
        tick = 0
        for msg in track:
            tick += msg.time
            if i == 0 and msg.type == "set_tempo":
                tempos.append((tick, msg.tempo))
        max_tick = max(max_tick, tick)
    _check_timing(tempos, max_tick, mf.ticks_per_beat, max_duration_s, max_ticks, bpm_range)
    try:
        pm = pretty_midi.PrettyMIDI(mido_object=mf)
    except Exception as e:  # any failure inside pretty_midi is the file's fault here
        raise MidiError(f"pretty_midi cannot read the file: {e!r}", reason="corrupt") from e
    if not any(inst.notes for inst in pm.instruments):
        raise MidiError("the file has no notes", reason="no_notes")
    return pm


def load_notes(source: str | Path | bytes, *, max_bytes: int = MAX_BYTES,
               max_tracks: int = MAX_TRACKS, max_duration_s: float = MAX_DURATION_S,
               max_ticks: int = MAX_TICKS,
               bpm_range: tuple[float, float] = BPM_RANGE) -> NoteTable:
    """Read and validate a Standard MIDI File straight into the fast render's note arrays.

    Same parameters, checks and ``MidiError`` reasons as :func:`load_midi`, parsed by symusic
    (C++) with no ``PrettyMIDI`` built, and timed as pretty_midi times it (track 0's tempo map,
    float64): the table is ``NoteTable.from_pretty_midi(load_midi(source))`` up to note order,
    except on malformed files: symusic pairs a note-off with the oldest note of its pitch where
    pretty_midi ends them all, so a file with overlapping unisons is re-read by
    :func:`load_midi` (as is one with a tempo or signature event of the wrong length); unseen
    are note-ons that symusic leaves unpaired behind an older one. The tick and duration limits
    count the last event symusic keeps, not a later end-of-track.

    Returns
    -------
    NoteTable
        ``end_s`` as ``PrettyMIDI.get_end_time()`` (text events FF 01 aside).
    """
    data = _read_bounded(source, max_bytes)
    spans = _check_chunks(data, max_tracks)

    def reread() -> NoteTable:
        return NoteTable.from_pretty_midi(load_midi(
            data, max_bytes=max_bytes, max_tracks=max_tracks, max_duration_s=max_duration_s,
            max_ticks=max_ticks, bpm_range=bpm_range))

    if _ODD_META.search(data, spans[0][0], spans[-1][1]):
        return reread()
    # symusic sees only the chunks checked above, behind a canonical 6-byte header; pretty_midi
    # takes tempo and signatures from track 0 alone, so that track is also read on its own.
    head = b"MThd" + struct.pack(">I", 6)
    score = _parse_symusic(head + data[8:14] + data[spans[0][0]:spans[-1][1]])
    track0 = score if len(spans) == 1 else _parse_symusic(
        head + struct.pack(">HH", 0, 1) + data[12:14] + data[spans[0][0]:spans[0][1]])
    for k in score.key_signatures:  # mido refuses a key it cannot name
        if not (-7 <= k.key <= 7 and k.tonality in (0, 1)):
            raise MidiError(f"malformed MIDI data: key signature {k.key}, {k.tonality}",
                            reason="corrupt")
    if score.start() < 0:  # symusic counts ticks in int32
        raise MidiError("tick counts overflow: the file's events run past 2**31 ticks",
                        reason="too_long")
    t0 = track0.tempos.numpy()
    tempos = list(zip(t0["time"].tolist(), t0["mspq"].tolist(), strict=True))
    # score.end(): the last note-off, controller, bend, tempo, signature, lyric or marker
    _check_timing(tempos, score.end(), score.ticks_per_quarter, max_duration_s, max_ticks,
                  bpm_range)
    if any(ts.numerator <= 0 for ts in track0.time_signatures):  # pretty_midi refuses these
        raise MidiError("pretty_midi cannot read the file: time signature numerator 0",
                        reason="corrupt")
    if _overlapping_unisons(score):  # where symusic's note pairing and pretty_midi's can part
        return reread()
    table = NoteTable.from_score(score, track0)
    if table.n_notes == 0:
        raise MidiError("the file has no notes", reason="no_notes")
    return table


def _parse_symusic(smf: bytes) -> Any:
    from symusic.core import ScoreTick  # C++; imported here so that the gateway never loads it

    try:
        # sanitize_data clamps data bytes > 127 to 127, as mido's clip=True does
        return ScoreTick.from_midi(smf, True)
    except Exception as e:  # any failure inside symusic is the file's fault here
        if "EOF" in str(e):
            raise MidiError(f"MIDI track ends in the middle of an event: {e}",
                            reason="truncated") from e
        raise MidiError(f"malformed MIDI data: {e}", reason="corrupt") from e


def _overlapping_unisons(score: Any) -> bool:
    """Whether a track sounds one pitch twice at once, or starts it twice on one tick.

    A note-off ends the oldest sounding note of its pitch in symusic, every one in pretty_midi
    (as a synthesiser's note-off does), so the two read such a track differently (music21 writes
    unisons of two voices on one channel: a quarter of its files have some). Two notes that
    start on one tick are flagged too: after a note-off on that tick pretty_midi drops both.
    """
    for t in score.tracks:
        notes = t.notes.numpy()
        pitch, on = notes["pitch"].astype(np.int64), notes["time"].astype(np.int64)
        order = np.lexsort((on, pitch))
        pitch, on, off = pitch[order], on[order], (on + notes["duration"])[order]
        if np.any((pitch[1:] == pitch[:-1]) & ((on[1:] < off[:-1]) | (on[1:] == on[:-1]))):
            return True
    return False


def _read_bounded(source: str | Path | bytes, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            size = os.stat(source).st_size
            if size > max_bytes:
                raise MidiError(f"{source} is {size} bytes, over the {max_bytes}-byte limit",
                                reason="too_large")
            with open(source, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as e:
            raise MidiError(f"cannot read {source}: {e}", reason="unreadable") from e
    if len(data) > max_bytes:
        raise MidiError(f"MIDI data is {len(data)} bytes, over the {max_bytes}-byte limit",
                        reason="too_large")
    return data


def _check_chunks(data: bytes, max_tracks: int) -> list[tuple[int, int]]:
    """Header and chunk table, without parsing events: O(number of tracks).

    Returns the ``(start, end)`` byte offsets of each track chunk, its 8-byte head included.
    """
    if len(data) < 14 or data[:4] != b"MThd":
        raise MidiError("not a Standard MIDI File (no MThd header)", reason="not_midi")
    hlen, fmt, ntrks, division = struct.unpack(">IHHH", data[4:14])
    if hlen < 6 or fmt > 2:
        raise MidiError(f"bad MThd header (length {hlen}, format {fmt})", reason="not_midi")
    if division & 0x8000:
        raise MidiError("SMPTE time division is not supported", reason="unsupported")
    if division == 0:
        raise MidiError("time division of 0 ticks per beat", reason="corrupt")
    if ntrks > max_tracks:
        raise MidiError(f"{ntrks} tracks, over the limit of {max_tracks}",
                        reason="too_many_tracks")
    if ntrks == 0:
        raise MidiError("the file has no tracks", reason="no_notes")
    pos, spans = 8 + hlen, []
    for i in range(ntrks):
        if pos + 8 > len(data):
            raise MidiError(f"file ends before track {i + 1} of {ntrks}", reason="truncated")
        name, length = data[pos:pos + 4], struct.unpack(">I", data[pos + 4:pos + 8])[0]
        if name != b"MTrk":
            raise MidiError(f"chunk {name!r} where track {i + 1} should be", reason="corrupt")
        if pos + 8 + length > len(data):
            raise MidiError(f"track {i + 1} declares {length} bytes, the file ends first",
                            reason="truncated")
        spans.append((pos, pos + 8 + length))
        pos += 8 + length
    return spans


def _check_timing(tempos: list[tuple[int, int]], max_tick: int, ticks_per_beat: int,
                  max_duration_s: float, max_ticks: int, bpm_range: tuple[float, float]) -> None:
    """Tempo map and length as pretty_midi will see them: track 0's ``(tick, µs per beat)``
    tempo events and the tick of the last event of any track."""
    for tick, tempo in tempos:
        bpm = 6e7 / tempo if tempo > 0 else float("inf")
        if not bpm_range[0] <= bpm <= bpm_range[1]:
            raise MidiError(f"tempo of {bpm:.4g} bpm at tick {tick} is outside "
                            f"{bpm_range[0]:g}..{bpm_range[1]:g} bpm", reason="bad_tempo")
    if max_tick + 1 > max_ticks:  # pretty_midi allocates max_tick + 1 entries
        raise MidiError(f"last event at tick {max_tick}, over the limit of {max_ticks}",
                        reason="too_long")
    seconds, last_tick, us_per_beat = 0.0, 0, 500_000  # 120 bpm until told otherwise
    for tick, tempo in sorted(tempos):
        seconds += (tick - last_tick) * us_per_beat / 1e6 / ticks_per_beat
        last_tick, us_per_beat = tick, tempo
    seconds += (max_tick - last_tick) * us_per_beat / 1e6 / ticks_per_beat
    if seconds > max_duration_s:
        raise MidiError(f"the piece lasts {seconds:.0f} s, over the limit of "
                        f"{max_duration_s:.0f} s", reason="too_long")


def default_soundfont() -> Path | None:
    """The General MIDI soundfont FluidSynth uses by default, or None when none is installed."""
    found = [p for d in SOUNDFONT_DIRS if d.is_dir() for p in sorted(d.glob("*.sf2"))]
    for name in _PREFERRED_SOUNDFONTS:
        for p in found:
            if p.name == name and p.exists():
                return p
    return next((p for p in found if p.exists()), None)


def available_renderers() -> tuple[str, ...]:
    """Renderers usable here, best first: ``"fluidsynth"`` (CLI + soundfont), ``"pretty_midi"``."""
    fs = shutil.which("fluidsynth") is not None and default_soundfont() is not None
    return ("fluidsynth", "pretty_midi") if fs else ("pretty_midi",)


def midi_to_audio(pm: pretty_midi.PrettyMIDI, *, sample_rate: int = SAMPLE_RATE,
                  renderer: str = "auto", soundfont: str | Path | None = None,
                  timeout_s: float = 60.0, max_duration_s: float = 1800.0,
                  tail_s: float = 0.5, gain: float = 0.4) -> np.ndarray:
    """Render MIDI to mono audio.

    Parameters
    ----------
    pm : pretty_midi.PrettyMIDI
    sample_rate : int
        Hz.
    renderer : {"auto", "fluidsynth", "pretty_midi"}
        ``"auto"`` takes the first of :func:`available_renderers`.
    soundfont : str or Path, optional
        For FluidSynth; default :func:`default_soundfont`.
    timeout_s : float
        Wall-clock bound on the FluidSynth process, which is killed past it.
    max_duration_s : float
        Longest piece rendered (``pm.get_end_time()``); longer ones raise ``too_long``.
    tail_s : float
        Audio kept after the last note ends (release and reverb), seconds.
    gain : float
        FluidSynth's master gain (its default, 0.2, is quiet; 0.4 rarely clips).

    Returns
    -------
    np.ndarray, shape (int((end_time + tail_s) * sample_rate),), float32
        Zero-padded if the renderer stopped early.

    Raises
    ------
    RenderError
        ``reason`` ``unavailable``, ``too_long``, ``timeout`` or ``failed``.
    """
    end_s = float(pm.get_end_time())
    if end_s > max_duration_s:
        raise RenderError(f"the piece lasts {end_s:.0f} s, over the render limit of "
                          f"{max_duration_s:.0f} s", reason="too_long")
    n = int((end_s + tail_s) * sample_rate)
    choice = available_renderers()[0] if renderer == "auto" else renderer
    if choice == "fluidsynth":
        audio = _render_fluidsynth(pm, sample_rate, soundfont, timeout_s, n, gain)
    elif choice == "pretty_midi":
        try:
            with np.errstate(invalid="ignore", divide="ignore"):
                audio = pm.synthesize(fs=sample_rate).astype(np.float32)
        except Exception as e:  # pretty_midi's synth has no failure contract
            raise RenderError(f"pretty_midi synthesis failed: {e!r}", reason="failed") from e
        # It skips drums and then normalises by the peak: a drums-only piece comes back 0/0.
        audio = np.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0)
    else:
        raise RenderError(f"unknown renderer {renderer!r}", reason="unavailable")
    out = np.zeros(n, np.float32)
    out[: min(n, audio.size)] = audio[:n]
    return out


def _render_fluidsynth(pm: pretty_midi.PrettyMIDI, sample_rate: int,
                       soundfont: str | Path | None, timeout_s: float, n: int,
                       gain: float) -> np.ndarray:
    exe = shutil.which("fluidsynth")
    sf2 = Path(soundfont) if soundfont is not None else default_soundfont()
    if exe is None or sf2 is None or not sf2.exists():
        raise RenderError("fluidsynth or a soundfont is not installed", reason="unavailable")
    with open(sf2, "rb") as f:
        head = f.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"sfbk":
        # fluidsynth would only warn, then render silence with exit status 0.
        raise RenderError(f"{sf2} is not a SoundFont 2 file", reason="unavailable")
    cap_bytes = n * 2 * 4  # stereo float32: stop as soon as the piece plus its tail is there
    # Headerless float32 output: readable even when the process is killed mid-write.
    pcm, err = run_bounded_render(
        "fluidsynth", pm,
        lambda mid, raw: [exe, "-ni", "-q", "-g", str(gain), "-r", str(sample_rate), "-T", "raw",
                          "-O", "float", "-E", "little", "-F", str(raw), str(sf2), str(mid)],
        cap_bytes=cap_bytes, timeout_s=timeout_s, dtype="<f4")
    pcm = pcm[: pcm.size // 2 * 2].reshape(-1, 2).mean(axis=1).astype(np.float32)
    if not np.isfinite(pcm).all() or not np.any(pcm):
        raise RenderError(f"fluidsynth rendered no sound: {err}", reason="failed")
    return pcm


def midi_to_frames_synth(pm: pretty_midi.PrettyMIDI, *, renderer: str = "auto",
                         soundfont: str | Path | None = None, timeout_s: float = 60.0,
                         max_duration_s: float = 1800.0, device: str | None = None) -> np.ndarray:
    """Render (:func:`midi_to_audio` at 22,050 Hz) and take the CQT frames.

    Returns
    -------
    np.ndarray, shape (n_frames(pm), 48), float32
        Cut to the same frame count as :func:`midi_to_frames_fast`; the render's tail only
        feeds the look-ahead of the last frames.
    """
    audio = midi_to_audio(pm, sample_rate=SAMPLE_RATE, renderer=renderer, soundfont=soundfont,
                          timeout_s=timeout_s, max_duration_s=max_duration_s)
    return audio_to_frames(audio, SAMPLE_RATE, device=device)[: n_frames(pm)]


def midi_to_frames(piece: pretty_midi.PrettyMIDI | NoteTable, *, method: str = "fast",
                   **kwargs: Any) -> np.ndarray:
    """Frames of a piece by ``method``: ``"fast"`` (:func:`midi_to_frames_fast`, which also takes
    a :class:`NoteTable`), ``"synth"`` (:func:`midi_to_frames_synth` with the best renderer
    installed; takes its keyword arguments and needs a ``PrettyMIDI``) or ``"sine"`` (the same
    with pretty_midi's own sine synthesis: no external program, so the same frames on every
    machine)."""
    if method == "fast":
        if kwargs:
            raise TypeError(f"method='fast' takes no options, got {sorted(kwargs)}")
        return midi_to_frames_fast(piece)
    if method in ("synth", "sine"):
        if isinstance(piece, NoteTable):
            raise TypeError(f"method={method!r} renders a PrettyMIDI (load_midi), "
                            "not a NoteTable")
        if method == "sine":
            kwargs = {**kwargs, "renderer": "pretty_midi"}
        return midi_to_frames_synth(piece, **kwargs)
    raise ValueError(f"method must be 'fast', 'synth' or 'sine', got {method!r}")


def run_bounded_render(name: str, pm: pretty_midi.PrettyMIDI,
                       command: Callable[[Path, Path], list[str]], *, cap_bytes: int,
                       timeout_s: float, dtype: str) -> tuple[np.ndarray, str]:
    """Run an external renderer on ``pm`` with a time and an output-size bound.

    ``command(midi_path, raw_out_path)`` builds the command line; the renderer must write
    headerless samples of ``dtype`` to ``raw_out_path`` (readable even when it is killed
    mid-write). The process is killed once ``cap_bytes`` are written (a looping or endless render
    is cut there) or after ``timeout_s``.

    Returns
    -------
    samples : np.ndarray, at most ``cap_bytes`` worth of ``dtype``
    log : str, the end of the renderer's output (for error messages)

    Raises
    ------
    RenderError
        ``timeout`` or ``failed``.
    """
    with tempfile.TemporaryDirectory(prefix=f"midimatch-{name}-") as tmp:
        mid, raw = Path(tmp) / "in.mid", Path(tmp) / "out.raw"
        try:
            pm.write(str(mid))
        except Exception as e:  # pretty_midi's writer has no failure contract
            raise RenderError(f"cannot write the MIDI for {name}: {e!r}", reason="failed") from e
        # Output to a file, not a pipe: a chatty render must not block on a full pipe while
        # this loop watches the output file.
        with open(Path(tmp) / "log.txt", "w+b") as log:
            proc = subprocess.Popen(command(mid, raw), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log)
            deadline = time.monotonic() + timeout_s
            try:
                while proc.poll() is None:
                    if raw.exists() and raw.stat().st_size >= cap_bytes:
                        break
                    if time.monotonic() > deadline:
                        raise RenderError(f"{name} ran past {timeout_s:g} s", reason="timeout")
                    time.sleep(0.02)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            log.seek(0)
            err = log.read()[-500:].decode(errors="replace")
        if proc.returncode not in (0, -9) or not raw.exists():
            raise RenderError(f"{name} failed ({proc.returncode}): {err}", reason="failed")
        with open(raw, "rb") as f:
            return np.frombuffer(f.read(cap_bytes), dtype=dtype), err
