"""Notes straight to CQT-bin magnitudes: the ``"fast"`` MIDI → frames path.

No audio is made: each note draws its partials, with the CQT's bleed into neighbouring bins and
a per-program decay, on the frame grid of :mod:`model.features` (hop 1024 at 22,050 Hz, 48 bins
from MIDI 36). A piece comes in as a ``pretty_midi.PrettyMIDI`` or as a :class:`NoteTable`, the
plain arrays the render needs, which :func:`model.midi.load_notes` reads straight from a file
without building a ``PrettyMIDI`` (the index build's fast path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import pretty_midi

from model.features import BIN_GAIN, FRAME_RATE, HOP, MIDI_LO, N_BINS, SAMPLE_RATE, log_normalize

# Partials of a harmonic tone that land near semitones: harmonics 1, 2, 3, 4, 5, 6 are
# +0, +12, +19.02, +24, +27.86, +31.02 semitones; amplitude 1/h, a generic bright timbre.
PARTIALS = np.array([0, 12, 19, 24, 28, 31], dtype=np.int64)
PARTIAL_AMP = 1.0 / np.arange(1, 7, dtype=np.float64)
# |C| one and two bins away from a pure tone, relative to its own bin: measured on this CQT
# (librosa's filters overlap at -6 dB; tests/model/test_fastrender.py checks these figures).
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


@dataclass(frozen=True, eq=False)
class NoteTable:
    """Every note of a piece as parallel arrays, and where the piece ends.

    Attributes
    ----------
    onset_s, offset_s : np.ndarray, shape (N,), float64
        Note on and note off, seconds.
    pitch, velocity, program : np.ndarray, shape (N,), int64
        MIDI note number, velocity (1..127) and the GM program of the note's instrument.
    is_drum : np.ndarray, shape (N,), bool
        Notes on MIDI channel 10.
    end_s : float
        The piece's end, seconds, as ``PrettyMIDI.get_end_time()`` has it: the last note off,
        controller, pitch bend, tempo change, time or key signature, lyric or text event.
    """

    onset_s: np.ndarray
    offset_s: np.ndarray
    pitch: np.ndarray
    velocity: np.ndarray
    program: np.ndarray
    is_drum: np.ndarray
    end_s: float

    @property
    def n_notes(self) -> int:
        return int(self.onset_s.size)

    @classmethod
    def from_pretty_midi(cls, pm: pretty_midi.PrettyMIDI) -> NoteTable:
        """The notes of every instrument (a Python loop over ``Note`` objects: ~3 ms a song)."""
        notes = [(n.start, n.end, n.pitch, n.velocity, inst.program, inst.is_drum)
                 for inst in pm.instruments for n in inst.notes]
        cols = list(zip(*notes, strict=True)) if notes else [()] * 6
        return cls(onset_s=np.asarray(cols[0], np.float64),
                   offset_s=np.asarray(cols[1], np.float64),
                   pitch=np.asarray(cols[2], np.int64), velocity=np.asarray(cols[3], np.int64),
                   program=np.asarray(cols[4], np.int64), is_drum=np.asarray(cols[5], np.bool_),
                   end_s=float(pm.get_end_time()))

    @classmethod
    def from_score(cls, score: Any) -> NoteTable:
        """From a ``symusic.ScoreTick``, timed as :func:`model.midi.load_midi` times the file.

        The tempo map and the time and key signatures are those of every track (symusic
        gathers them; ``load_midi`` moves them into track 0 for pretty_midi). Times come out
        equal to pretty_midi's to the last bit (same float64 arithmetic). The score must have
        passed :func:`model.midi.load_notes`' checks (no zero tempo, no two tempi on one tick,
        no overlap of one pitch in a track), which also lists where symusic and pretty_midi
        part.
        """
        tempo = score.tempos.numpy()
        order = np.argsort(tempo["time"], kind="stable")
        ticks, per_tick, starts = _tick_scales(tempo["time"][order].tolist(),
                                               tempo["mspq"][order].tolist(),
                                               score.ticks_per_quarter)

        def to_s(tick: np.ndarray) -> np.ndarray:  # pretty_midi's tick→time table, as a function
            i = np.searchsorted(ticks, tick, side="right") - 1
            return starts[i] + per_tick[i] * (tick - ticks[i])

        # get_end_time(): instruments (notes, controllers, bends), signatures and tempo
        # changes (all in track 0 by then), lyrics of any track.
        last = [ticks, score.time_signatures.numpy()["time"],
                score.key_signatures.numpy()["time"]]
        tracks = []
        for t in score.tracks:
            last.append([x.time for x in t.lyrics])
            notes = t.notes.numpy()
            if notes["time"].size:  # pretty_midi makes an instrument only for notes
                tracks.append((t, notes))
                last += [t.controls.numpy()["time"], t.pitch_bends.numpy()["time"]]
        count = [n["time"].size for _, n in tracks]
        col = {k: np.concatenate([n[k] for _, n in tracks] or [np.zeros(0, np.int64)])
               for k in ("time", "duration", "pitch", "velocity")}
        col["program"] = np.repeat([t.program for t, _ in tracks], count).astype(np.int64)
        col["is_drum"] = np.repeat([t.is_drum for t, _ in tracks], count).astype(np.bool_)
        on = col["time"].astype(np.int64)
        off = on + col["duration"]
        keep = off > on  # pretty_midi drops a note that starts and ends on one tick
        last.append(off[keep])
        end_tick = max(int(np.max(x)) for x in last if len(x))
        return cls(onset_s=to_s(on[keep]), offset_s=to_s(off[keep]),
                   pitch=col["pitch"][keep].astype(np.int64),
                   velocity=col["velocity"][keep].astype(np.int64),
                   program=col["program"][keep], is_drum=col["is_drum"][keep],
                   end_s=float(to_s(np.array([end_tick]))[0]))


def _tick_scales(tick: list[int], us_per_beat: list[int], tpq: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pretty_midi's tempo map from tempo events in the order they apply (track 0's, as
    :func:`model.midi.load_midi` hands them over).

    Returns the ticks where the tempo changes, seconds per tick from each, and the time of each.
    """
    scales = [(0, 60.0 / (120.0 * tpq))]
    for t, us in zip(tick, us_per_beat, strict=True):
        scale = 60.0 / ((6e7 / us) * tpq)
        if t == 0:
            scales = [(0, scale)]
        elif scale != scales[-1][1]:  # pretty_midi drops repeats
            scales.append((t, scale))
    ticks = np.array([t for t, _ in scales], np.int64)
    per_tick = np.array([s for _, s in scales], np.float64)
    starts = np.zeros(len(scales))
    for i in range(1, len(scales)):
        starts[i] = starts[i - 1] + per_tick[i - 1] * (ticks[i] - ticks[i - 1])
    return ticks, per_tick, starts


Piece = pretty_midi.PrettyMIDI | NoteTable


def _as_table(piece: Piece) -> NoteTable:
    return piece if isinstance(piece, NoteTable) else NoteTable.from_pretty_midi(piece)


def n_frames(piece: Piece) -> int:
    """Frames of a piece on the feature grid: ``1 + int(end_time · 22050) // 1024``."""
    end_s = piece.end_s if isinstance(piece, NoteTable) else piece.get_end_time()
    return 1 + int(end_s * SAMPLE_RATE) // HOP


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


def _note_spans(notes: NoteTable, n_total: int) -> tuple[np.ndarray, ...]:
    """Per-note frame span, pitch, amplitude, decay per frame and drum flag: the kernel's input."""
    start, end, drum = notes.onset_s, notes.offset_s, notes.is_drum
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
    amp = (np.clip(notes.velocity, 0, 127) / 127.0) ** 2
    db_s = np.where(drum, DRUM_DECAY_DB_S, DECAY_DB_S[np.clip(notes.program, 0, 127)])
    decay = 10.0 ** (-db_s / FRAME_RATE / 20.0)
    return t_on, t_off, notes.pitch.astype(np.int64), amp, decay, drum


def midi_to_magnitude_fast(piece: Piece, n_total: int | None = None) -> np.ndarray:
    """Notes straight to CQT-bin magnitudes (before :func:`log_normalize`).

    Each note puts energy at its pitch's bin and at the partials in ``PARTIALS`` (amplitudes
    ``PARTIAL_AMP``) that fall inside the 48 bins, with ``BLEED`` into the neighbouring bins,
    scaled by ``BIN_GAIN`` as the CQT scales a sine, by (velocity/127)², and by a per-program
    decay (``DECAY_DB_S``). Drum notes are flat broadband hits of ``DRUM_FRAMES`` frames.
    Sounding notes add in power. Frames where nothing sounds are zero.

    Parameters
    ----------
    piece : pretty_midi.PrettyMIDI or NoteTable
        The same file gives the same magnitudes either way.
    n_total : int, optional
        Frames to render; default :func:`n_frames`.

    Returns
    -------
    np.ndarray, shape (n_total or n_frames(piece), 48), float64
    """
    notes = _as_table(piece)
    total = n_frames(notes) if n_total is None else int(n_total)
    power = np.zeros((total, N_BINS))
    t_on, t_off, pitch, amp, decay, drum = _note_spans(notes, total)
    _render_notes(t_on, t_off, pitch, amp, decay, drum, MIDI_LO, PARTIALS, PARTIAL_AMP, BLEED,
                  BIN_GAIN, DRUM_GAIN, power)
    return np.sqrt(power)


def midi_to_frames_fast(piece: Piece) -> np.ndarray:
    """Notes straight to frames: :func:`midi_to_magnitude_fast`, then :func:`log_normalize`.

    Returns
    -------
    np.ndarray, shape (n_frames(piece), 48), float32
    """
    return log_normalize(midi_to_magnitude_fast(piece))


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
