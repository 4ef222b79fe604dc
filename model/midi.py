"""MIDI files → validated ``PrettyMIDI`` → audio or CQT frames.

Three jobs:

* :func:`load_midi` turns bytes from anywhere into a ``pretty_midi.PrettyMIDI`` or a typed
  :class:`~model.errors.MidiError`, in time and memory bounded by the file size. pretty_midi
  allocates arrays proportional to the largest tick and dies on a zero tempo, so the header,
  the chunk table, the tempo map and the length are checked first, on the cheap.
* :func:`midi_to_audio` renders with the FluidSynth CLI (a subprocess with a timeout and an
  output cap; one render in the corpus once produced gigabytes) or pretty_midi's sine synth.
* :func:`midi_to_frames` gives frames on the grid of :mod:`model.features` (hop 1024 at
  22,050 Hz, 48 bins from MIDI 36): ``"synth"`` renders and runs the CQT (Raffel's better
  side, slow); ``"fast"`` draws notes straight into CQT-bin magnitudes (a numba kernel).
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mido
import numba
import numpy as np
import pretty_midi

from model.errors import MidiError, RenderError
from model.features import (
    BIN_GAIN,
    FRAME_RATE,
    HOP,
    MIDI_LO,
    N_BINS,
    SAMPLE_RATE,
    audio_to_frames,
    log_normalize,
)

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
    except (OSError, ValueError, KeyError, IndexError, TypeError, struct.error) as e:
        raise MidiError(f"malformed MIDI data: {e}", reason="corrupt") from e
    _check_timing(mf, max_duration_s, max_ticks, bpm_range)
    try:
        pm = pretty_midi.PrettyMIDI(mido_object=mf)
    except Exception as e:  # any failure inside pretty_midi is the file's fault here
        raise MidiError(f"pretty_midi cannot read the file: {e!r}", reason="corrupt") from e
    if not any(inst.notes for inst in pm.instruments):
        raise MidiError("the file has no notes", reason="no_notes")
    return pm


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


def _check_chunks(data: bytes, max_tracks: int) -> None:
    """Header and chunk table, without parsing events: O(number of tracks)."""
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
    pos = 8 + hlen
    for i in range(ntrks):
        if pos + 8 > len(data):
            raise MidiError(f"file ends before track {i + 1} of {ntrks}", reason="truncated")
        name, length = data[pos:pos + 4], struct.unpack(">I", data[pos + 4:pos + 8])[0]
        if name != b"MTrk":
            raise MidiError(f"chunk {name!r} where track {i + 1} should be", reason="corrupt")
        if pos + 8 + length > len(data):
            raise MidiError(f"track {i + 1} declares {length} bytes, the file ends first",
                            reason="truncated")
        pos += 8 + length


def _check_timing(mf: mido.MidiFile, max_duration_s: float, max_ticks: int,
                  bpm_range: tuple[float, float]) -> None:
    """Tempo map and length as pretty_midi will see them (tempo events of track 0)."""
    max_tick, tempos = 0, []
    for i, track in enumerate(mf.tracks):
        tick = 0
        for msg in track:
            tick += msg.time
            if i == 0 and msg.type == "set_tempo":
                tempos.append((tick, msg.tempo))
        max_tick = max(max_tick, tick)
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
        seconds += (tick - last_tick) * us_per_beat / 1e6 / mf.ticks_per_beat
        last_tick, us_per_beat = tick, tempo
    seconds += (max_tick - last_tick) * us_per_beat / 1e6 / mf.ticks_per_beat
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
    with tempfile.TemporaryDirectory(prefix="midimatch-render-") as tmp:
        mid, raw = Path(tmp) / "in.mid", Path(tmp) / "out.raw"
        try:
            pm.write(str(mid))
        except Exception as e:
            raise RenderError(f"cannot write the MIDI for fluidsynth: {e!r}",
                              reason="failed") from e
        # Headerless float32 output: readable even when the process is killed mid-write.
        cmd = [exe, "-ni", "-q", "-g", str(gain), "-r", str(sample_rate), "-T", "raw",
               "-O", "float", "-E", "little", "-F", str(raw), str(sf2), str(mid)]
        # stderr to a file, not a pipe: a chatty render must not block on a full pipe while
        # this loop watches the output file.
        with open(Path(tmp) / "stderr.txt", "w+b") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=log)
            deadline = time.monotonic() + timeout_s
            try:
                while proc.poll() is None:
                    if raw.exists() and raw.stat().st_size >= cap_bytes:
                        break  # enough audio: a looping or endless render is cut here
                    if time.monotonic() > deadline:
                        raise RenderError(f"fluidsynth ran past {timeout_s:g} s",
                                          reason="timeout")
                    time.sleep(0.02)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            log.seek(0)
            err = log.read()[-500:].decode(errors="replace")
        if proc.returncode not in (0, -9) or not raw.exists():
            raise RenderError(f"fluidsynth failed ({proc.returncode}): {err}", reason="failed")
        with open(raw, "rb") as f:
            pcm = np.frombuffer(f.read(cap_bytes), dtype="<f4")
    pcm = pcm[: pcm.size // 2 * 2].reshape(-1, 2).mean(axis=1).astype(np.float32)
    if not np.isfinite(pcm).all() or not np.any(pcm):
        raise RenderError(f"fluidsynth rendered no sound: {err}", reason="failed")
    return pcm


def n_frames(pm: pretty_midi.PrettyMIDI) -> int:
    """Frames of a piece on the feature grid: ``1 + int(end_time · 22050) // 1024``."""
    return 1 + int(pm.get_end_time() * SAMPLE_RATE) // HOP


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


# Partials of a harmonic tone that land near semitones: harmonics 1, 2, 3, 4, 5, 6 are
# +0, +12, +19.02, +24, +27.86, +31.02 semitones; amplitude 1/h, a generic bright timbre.
PARTIALS = np.array([0, 12, 19, 24, 28, 31], dtype=np.int64)
PARTIAL_AMP = 1.0 / np.arange(1, 7, dtype=np.float64)
# |C| one and two bins away from a pure tone, relative to its own bin: measured on this CQT
# (librosa's filters overlap at -6 dB; tests/model/test_midi.py checks these figures).
BLEED = np.array([1.0, 0.5, 0.02])
# Decay of a held note, dB per second, by GM program: struck and plucked families fade,
# bowed, blown and electronic ones hold (0). Values are rough (a piano's middle register loses
# 60 dB in ~5 s); what matters for matching is that a long piano note fades and an organ's doesn't.
_FAMILY_DECAY_DB_S = (12, 20, 0, 10, 8, 0, 0, 0, 0, 0, 0, 0, 3, 12, 20, 5)
DECAY_DB_S = np.repeat(np.array(_FAMILY_DECAY_DB_S, dtype=np.float64), 8)
DECAY_DB_S[[45, 46, 47, 55]] = (30, 12, 15, 30)  # pizzicato, harp, timpani, orchestra hit
DECAY_DB_S[[109, 110, 111]] = 0  # bagpipe, fiddle, shanai: sustained in an "ethnic" family
DRUM_DECAY_DB_S = 300.0  # a hit is gone (-60 dB) in 0.2 s
DRUM_FRAMES = int(np.ceil(0.2 * FRAME_RATE))
# A drum hit as broadband noise: flat on this CQT (white noise is flat with librosa's
# sqrt(length) scaling), at about a quarter of what a mid-register note of equal velocity gives.
DRUM_GAIN = 0.25 * float(np.median(BIN_GAIN))


@numba.njit(cache=True)
def _render_notes(t_on, t_off, pitch, amp, decay, is_drum, lo, partials, partial_amp, bleed,
                  bin_gain, drum_gain, power):  # pragma: no cover - compiled
    """Add each note's power, (amp·partial·bleed·gain)², into ``power`` (T, 48) in place."""
    n_bins = power.shape[1]
    for i in range(t_on.size):
        env = amp[i]
        for t in range(t_on[i], t_off[i]):
            if is_drum[i]:
                for b in range(n_bins):
                    power[t, b] += (env * drum_gain) ** 2
            else:
                for p in range(partials.size):
                    centre = pitch[i] - lo + partials[p]
                    if centre < 0 or centre >= n_bins:
                        continue
                    a = env * partial_amp[p]
                    for d in range(-2, 3):
                        b = centre + d
                        if 0 <= b < n_bins:
                            power[t, b] += (a * bleed[abs(d)] * bin_gain[b]) ** 2
            env *= decay[i]


def _note_table(pm: pretty_midi.PrettyMIDI, n_total: int) -> tuple[np.ndarray, ...]:
    """Per-note frame span, pitch, amplitude, decay per frame and drum flag, as arrays."""
    notes = [(n.start, n.end, n.pitch, n.velocity, inst.program, inst.is_drum)
             for inst in pm.instruments for n in inst.notes]
    if not notes:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0), np.zeros(0), np.zeros(0, np.bool_)
    start, end, pitch, vel, program, drum = (np.array(c) for c in zip(*notes, strict=True))
    drum = drum.astype(np.bool_)
    # A frame sounds a note when its centre (t / FRAME_RATE s) lies in [start, end); a note
    # shorter than a hop, or a drum hit, still gets the frame nearest its onset (the last frame
    # for one in the piece's final hop: a CQT window there would hear it too).
    t_on = np.ceil(start * FRAME_RATE - 1e-9).astype(np.int64)
    t_off = np.ceil(end * FRAME_RATE - 1e-9).astype(np.int64)
    short = (t_off <= t_on) | drum
    t_on[short] = np.minimum(np.round(start[short] * FRAME_RATE), n_total - 1).astype(np.int64)
    t_off[short] = t_on[short] + np.where(drum[short], DRUM_FRAMES, 1)
    t_on, t_off = np.clip(t_on, 0, n_total), np.clip(t_off, 0, n_total)
    # SF2's default velocity curve is about 40·log10(v/127) dB: amplitude (v/127)².
    amp = (np.clip(vel, 0, 127) / 127.0) ** 2
    db_s = np.where(drum, DRUM_DECAY_DB_S, DECAY_DB_S[np.clip(program, 0, 127)])
    decay = 10.0 ** (-db_s / FRAME_RATE / 20.0)
    return t_on, t_off, pitch.astype(np.int64), amp, decay, drum


def midi_to_magnitude_fast(pm: pretty_midi.PrettyMIDI, n_total: int | None = None
                           ) -> np.ndarray:
    """Notes straight to CQT-bin magnitudes (before :func:`log_normalize`).

    Each note puts energy at its pitch's bin and at the partials in ``PARTIALS`` (amplitudes
    ``PARTIAL_AMP``) that fall inside the 48 bins, with ``BLEED`` into the neighbouring bins,
    scaled by ``BIN_GAIN`` as the CQT scales a sine, by (velocity/127)², and by a per-program
    decay (``DECAY_DB_S``). Drum notes are flat broadband hits of ``DRUM_FRAMES`` frames.
    Sounding notes add in power. Frames where nothing sounds are zero.

    Returns
    -------
    np.ndarray, shape (n_total or n_frames(pm), 48), float64
    """
    total = n_frames(pm) if n_total is None else int(n_total)
    power = np.zeros((total, N_BINS))
    t_on, t_off, pitch, amp, decay, drum = _note_table(pm, total)
    _render_notes(t_on, t_off, pitch, amp, decay, drum, MIDI_LO, PARTIALS, PARTIAL_AMP, BLEED,
                  BIN_GAIN, DRUM_GAIN, power)
    return np.sqrt(power)


def midi_to_frames_fast(pm: pretty_midi.PrettyMIDI) -> np.ndarray:
    """Notes straight to frames: :func:`midi_to_magnitude_fast`, then :func:`log_normalize`.

    Returns
    -------
    np.ndarray, shape (n_frames(pm), 48), float32
    """
    return log_normalize(midi_to_magnitude_fast(pm))


def midi_to_frames(pm: pretty_midi.PrettyMIDI, *, method: str = "fast",
                   **kwargs: Any) -> np.ndarray:
    """Frames of a piece by ``method`` ``"fast"`` (:func:`midi_to_frames_fast`) or ``"synth"``
    (:func:`midi_to_frames_synth`, which takes the keyword arguments)."""
    if method == "fast":
        if kwargs:
            raise TypeError(f"method='fast' takes no options, got {sorted(kwargs)}")
        return midi_to_frames_fast(pm)
    if method == "synth":
        return midi_to_frames_synth(pm, **kwargs)
    raise ValueError(f"method must be 'fast' or 'synth', got {method!r}")


def demo_piece(duration_s: float = 60.0, *, seed: int = 0,
               programs: Sequence[int] = (0, 33, 48, 73), drums: bool = True
               ) -> pretty_midi.PrettyMIDI:
    """A procedural multi-instrument piece for tests and benchmarks (no files needed).

    Chords (piano by default), a bass line, a sustained pad, a melody and a drum kit over a
    I-vi-IV-V progression in C at 120 bpm; ``seed`` varies the melody and the voicings.
    ``duration_s`` is rounded up to whole bars (2 s).
    """
    rng = np.random.default_rng(seed)
    beat = 0.5
    roots = [48, 45, 41, 43]  # C, A, F, G
    triads = {48: (0, 4, 7), 45: (0, 3, 7), 41: (0, 4, 7), 43: (0, 4, 7)}
    chords, bass, pad, lead = (pretty_midi.Instrument(p) for p in programs)
    kit = pretty_midi.Instrument(0, is_drum=True)
    n_bars = max(1, int(np.ceil(duration_s / (4 * beat))))
    for bar in range(n_bars):
        t0, root = bar * 4 * beat, roots[bar % 4]
        inversion = int(rng.integers(0, 3))
        for k, step in enumerate(triads[root]):
            pitch = root + 12 + step + (12 if k < inversion else 0)
            for b in (0, 2):
                chords.notes.append(pretty_midi.Note(80, pitch, t0 + b * beat, t0 + (b + 2) * beat))
            pad.notes.append(pretty_midi.Note(60, pitch + 12, t0, t0 + 4 * beat))
        for b in range(4):
            bass.notes.append(pretty_midi.Note(95, root - 12 + (7 if b == 2 else 0),
                                               t0 + b * beat, t0 + (b + 0.9) * beat))
        scale = np.array([0, 2, 4, 5, 7, 9, 11, 12, 14, 16])
        for b in range(8):
            if rng.random() < 0.8:
                pitch = 72 + int(rng.choice(scale))
                lead.notes.append(pretty_midi.Note(int(rng.integers(70, 110)), pitch,
                                                   t0 + b * beat / 2, t0 + (b + 1) * beat / 2))
        if drums:
            for b in range(8):
                t = t0 + b * beat / 2
                kit.notes.append(pretty_midi.Note(70, 42, t, t + 0.1))  # closed hi-hat
                if b % 4 == 0:
                    kit.notes.append(pretty_midi.Note(100, 36, t, t + 0.1))  # kick
                if b % 4 == 2:
                    kit.notes.append(pretty_midi.Note(90, 38, t, t + 0.1))  # snare
    pm = pretty_midi.PrettyMIDI(initial_tempo=120.0)
    pm.instruments.extend([chords, bass, pad, lead] + ([kit] if drums else []))
    return pm
