"""Procedural pop, game and film-like songs as General MIDI files.

The music21 corpus is classical and folk: few drums, no synthesisers, little verse/chorus
repetition. These songs supply what it lacks, with the traits that make real pop MIDI hard to
match: sections that repeat (verse, chorus...), drum-only intros and breaks, swing, several GM
instruments at once.

A song is fixed by its seed: one style (pop, rock, ballad, funk, game, film, jazz) gives the
tempo range, the instrument pools and the patterns; then a key and mode, a section plan, a chord
progression per section kind, a melody per section kind (rhythm motifs on the scale, chord tones
on strong beats) that comes back whenever that section does, a bass line and a drum kit on
channel 10 with fills and crashes at section boundaries.

Every section start is written as a MIDI text event ``section:<kind>`` (``section:intro-drums``,
``section:chorus``...) so evaluations can tell a repeat from a wrong position.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pretty_midi

from model.errors import MidimatchError

GENERATOR_VERSION = 1  # bump when a seed would produce different music; caches then refuse reuse
SUBDIR = "generated"
TEMPO_RANGE_BPM = (70.0, 160.0)

_SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
}
# Scale degrees, 0-based: (0, 4, 5, 3) is I–V–vi–IV in major.
_MAJOR_PROGRESSIONS = (
    (0, 4, 5, 3), (5, 3, 0, 4), (0, 5, 3, 4), (0, 3, 4, 3), (0, 3, 0, 4),
    (1, 4, 0, 0), (0, 2, 3, 4), (3, 4, 2, 5), (0, 4, 3, 3), (0, 1, 3, 4),
)  # fmt: skip
_MINOR_PROGRESSIONS = (
    (0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 3, 6, 2), (0, 5, 3, 4),
    (5, 6, 0, 0), (0, 2, 5, 4), (0, 3, 0, 6),
)  # fmt: skip
# Melody rhythm cells, (onset, duration) in beats, per beats-per-bar.
_CELLS = {
    4: (
        ((0, 1), (1, 1), (2, 1), (3, 1)),
        ((0, 1.5), (1.5, 0.5), (2, 2)),
        ((0, 0.5), (0.5, 0.5), (1, 1), (2, 0.5), (2.5, 0.5), (3, 1)),
        ((0, 2), (2, 1), (3, 1)),
        ((0.5, 0.5), (1, 0.5), (1.5, 1), (2.5, 0.5), (3, 1)),
        ((0, 0.75), (0.75, 0.75), (1.5, 1), (2.5, 1.5)),
        ((0, 1), (1, 0.5), (1.5, 0.5), (2, 1.5)),
        ((0, 3),),
    ),
    3: (
        ((0, 1), (1, 1), (2, 1)),
        ((0, 2), (2, 1)),
        ((0, 1.5), (1.5, 0.5), (2, 1)),
        ((0, 0.5), (0.5, 0.5), (1, 1), (2, 1)),
        ((0, 2.5),),
    ),
}
_CHORD_RHYTHMS = {  # (onset, duration) in beats within a bar; "arp*" are generated
    "block_whole": ((0, 4),),
    "block_half": ((0, 2), (2, 2)),
    "quarters": ((0, 0.9), (1, 0.9), (2, 0.9), (3, 0.9)),
    "eighths": tuple((i / 2, 0.45) for i in range(8)),
    "pop_sync": ((0, 1.5), (1.5, 1.5), (3, 1)),
    "stabs": ((0.5, 0.25), (1.75, 0.25), (2.5, 0.25), (3.5, 0.25)),
    "waltz": ((1, 0.9), (2, 0.9)),
}
_BASS_RHYTHMS = {  # (onset, duration, tone): R root, 5 fifth, O octave, W walking step
    "root_whole": ((0, 4, "R"),),
    "root_fifth": ((0, 2, "R"), (2, 2, "5")),
    "root_8ths": tuple((i / 2, 0.45, "R") for i in range(8)),
    "octaves": tuple((i / 2, 0.4, "RO"[i % 2]) for i in range(8)),
    "syncop": ((0, 0.75, "R"), (0.75, 0.5, "R"), (1.5, 0.5, "5"), (2.5, 0.5, "R"), (3, 1, "O")),
    "walking": ((0, 0.9, "R"), (1, 0.9, "W"), (2, 0.9, "5"), (3, 0.9, "W")),
}
# GM percussion keys.
KICK, RIM, SNARE, CLAP, HAT, PEDAL_HAT, OPEN_HAT, CRASH, RIDE = 36, 37, 38, 39, 42, 44, 46, 49, 51
_TOMS = (50, 48, 47, 45, 43, 41)
_DRUMS = {  # (onset, key, velocity) per 4/4 bar; 3/4 bars use "waltz"
    "rock": ((0, KICK, 100), (1, SNARE, 95), (2, KICK, 95), (2.5, KICK, 70), (3, SNARE, 95))
    + tuple((i / 2, HAT, 70 if i % 2 else 80) for i in range(8)),
    "pop4": tuple((b, KICK, 100) for b in range(4))
    + ((1, CLAP, 90), (3, CLAP, 90))
    + tuple((b + 0.5, OPEN_HAT, 70) for b in range(4)),
    "halftime": ((0, KICK, 100), (1.5, KICK, 80), (2, SNARE, 100))
    + tuple((i / 2, HAT, 65) for i in range(8)),
    "hiphop": ((0, KICK, 105), (0.75, KICK, 80), (2.5, KICK, 90), (1, SNARE, 100), (3, SNARE, 100))
    + tuple((i / 4, HAT, 75 if i % 2 == 0 else 50) for i in range(16)),
    "ballad": ((0, KICK, 80), (2.5, KICK, 70), (1, RIM, 70), (3, RIM, 70))
    + tuple((i / 2, HAT, 50) for i in range(8)),
    "swing": ((0, RIDE, 75), (1, RIDE, 80), (1.5, RIDE, 60), (2, RIDE, 75), (3, RIDE, 80))
    + ((3.5, RIDE, 60), (1, PEDAL_HAT, 60), (3, PEDAL_HAT, 60), (0, KICK, 55)),
    "film": ((0, KICK, 85), (2, 41, 70), (3, 43, 75), (3.5, 43, 65)),
    "waltz": (
        (0, KICK, 95),
        (1, SNARE, 70),
        (2, SNARE, 70),
        (0, HAT, 70),
        (1, HAT, 55),
        (2, HAT, 55),
    ),
}


@dataclass(frozen=True)
class _Style:
    tempo: tuple[float, float]
    meters: tuple[int, ...]
    modes: tuple[str, ...]
    chords: tuple[int, ...]  # GM programs, 0-based
    leads: tuple[int, ...]
    basses: tuple[int, ...]
    pads: tuple[int, ...]
    chord_rhythms: tuple[str, ...]
    bass_rhythms: tuple[str, ...]
    drums: tuple[str, ...]
    swing_p: float
    weight: int


_STYLES = {
    "pop": _Style((90, 130), (4,), ("major", "major", "minor"), (0, 1, 4, 5, 24, 25),
                  (73, 65, 56, 80, 11, 54), (33, 34, 38), (48, 49, 50, 89, 88),
                  ("block_half", "pop_sync", "arp8", "quarters"), ("root_8ths", "root_fifth",
                  "syncop"), ("pop4", "rock", "halftime"), 0.1, 4),
    "rock": _Style((100, 160), (4,), ("major", "mixolydian", "minor"), (29, 30, 27, 25),
                   (29, 30, 81, 65), (33, 34), (48, 16, 17, 18), ("block_whole", "quarters",
                   "eighths"), ("root_8ths", "root_fifth"), ("rock",), 0.05, 3),
    "ballad": _Style((70, 95), (4, 4, 3), ("major", "minor"), (0, 4, 24, 46), (73, 40, 71, 68, 52),
                     (32, 33, 35), (48, 49, 89, 91), ("arp8", "block_whole", "arp16"),
                     ("root_whole", "root_fifth"), ("ballad",), 0.1, 3),
    "funk": _Style((95, 120), (4,), ("dorian", "minor", "mixolydian"), (7, 27, 4, 16),
                   (61, 65, 66, 56, 81), (36, 37, 33, 38), (61, 62, 50), ("stabs", "pop_sync"),
                   ("syncop", "octaves"), ("hiphop", "pop4"), 0.4, 2),
    "game": _Style((120, 160), (4,), ("major", "minor", "dorian"), (80, 81, 4, 16),
                   (80, 81, 83, 87), (38, 39, 80), (88, 89, 90, 94), ("arp16", "arp8", "quarters"),
                   ("octaves", "root_8ths"), ("rock", "pop4"), 0.05, 3),
    "film": _Style((70, 110), (4, 3), ("minor", "minor", "major"), (48, 49, 46, 0),
                   (60, 56, 40, 73, 71), (42, 43, 32), (48, 49, 52, 89), ("block_whole", "arp8",
                   "block_half"), ("root_whole", "root_fifth"), ("film",), 0.0, 2),
    "jazz": _Style((80, 150), (4,), ("major", "dorian"), (0, 4, 26), (65, 66, 56, 11), (32,),
                   (48, 89), ("pop_sync", "stabs"), ("walking",), ("swing",), 0.9, 1),
}  # fmt: skip


@dataclass
class _Part:
    name: str
    program: int
    is_drum: bool = False
    notes: list[tuple[float, float, int, int]] = field(default_factory=list)  # beats, pitch, vel


def generate_song(
    seed: int, *, duration_s: float | tuple[float, float] = (60.0, 240.0)
) -> pretty_midi.PrettyMIDI:
    """Compose one song; the same seed always gives the same song.

    Parameters
    ----------
    seed : int
        Chooses everything: style, key, tempo, form, instruments, notes.
    duration_s : float or (float, float)
        Exact length in seconds, or a range the length is drawn from. The tempo is nudged so
        that a whole number of bars lasts exactly that long (it stays in 70–160 BPM for lengths
        above ~20 s).

    Returns
    -------
    pretty_midi.PrettyMIDI
        One tempo, one time signature (4/4 or 3/4), one key signature, 4–6 instruments
        including a drum kit (``is_drum``); ``get_end_time()`` equals the drawn duration.
    """
    rng = random.Random(seed)
    lo, hi = (duration_s, duration_s) if np.isscalar(duration_s) else duration_s  # type: ignore[misc]
    if not 0 < lo <= hi:
        raise MidimatchError(f"bad duration_s {duration_s!r}", reason="bad_argument")
    name = rng.choices(list(_STYLES), weights=[s.weight for s in _STYLES.values()])[0]
    style = _STYLES[name]
    mode = rng.choice(style.modes)
    scale = tuple((rng.randrange(12) + d) % 12 for d in _SCALES[mode])  # pitch classes, tonic 1st
    bpb = rng.choice(style.meters)
    target_s = rng.uniform(lo, hi)
    bars = max(2, round(target_s * rng.uniform(*style.tempo) / (60 * bpb)))
    for _ in range(3):  # a whole number of bars must fill target_s exactly; keep tempo in range
        bpm = bars * bpb * 60 / target_s
        if bpm < TEMPO_RANGE_BPM[0]:
            bars += 1
        elif bpm > TEMPO_RANGE_BPM[1] and bars > 2:
            bars -= 1
    bpm = bars * bpb * 60 / target_s
    song = _Composer(rng, style, scale, mode, bpb).compose(bars)
    swing = rng.uniform(0.58, 0.67) if rng.random() < style.swing_p else 0.5
    return _render(
        song,
        bpm=bpm,
        bpb=bpb,
        end_s=target_s,
        swing=swing,
        rng=rng,
        key_number=_key_number(scale[0], mode),
        label=f"song:{name}:{mode}:seed={seed}",
    )


def _key_number(tonic: int, mode: str) -> int:
    """pretty_midi key number (0–11 major, 12–23 minor); modes take their parent major's."""
    shift = {"major": 0, "minor": 0, "dorian": -2, "mixolydian": 5}[mode]
    return (tonic + shift) % 12 + (12 if mode == "minor" else 0)


class _Composer:
    """Writes the parts in beats; :func:`_render` turns them into seconds."""

    def __init__(
        self, rng: random.Random, style: _Style, scale: tuple[int, ...], mode: str, bpb: int
    ) -> None:
        self.rng, self.style, self.scale, self.bpb = rng, style, scale, bpb
        progs = _MAJOR_PROGRESSIONS if mode in ("major", "mixolydian") else _MINOR_PROGRESSIONS
        kinds = ("verse", "pre", "chorus", "bridge")
        # A different progression per section kind, so that a verse does not sound like a chorus.
        self.prog = dict(zip(kinds, rng.sample(progs, 4), strict=True))
        # Chords per bar: two only in 4/4, one per two bars in slow songs.
        self.chord_beats = rng.choice((bpb, bpb, bpb, 2.0 if bpb == 4 else bpb, 2.0 * bpb))
        self.seventh = style is _STYLES["jazz"] or rng.random() < 0.2
        self.chord_rhythm = {k: rng.choice(style.chord_rhythms) for k in kinds}
        self.bass_rhythm = rng.choice(style.bass_rhythms)
        self.drum = "waltz" if bpb == 3 else rng.choice(style.drums)
        self.melodies: dict[str, list[tuple[float, float, int]]] = {}
        self.cells = rng.sample(range(len(_CELLS[bpb])), 3)  # this song's rhythm motifs
        self.parts = {
            "chords": _Part("chords", rng.choice(style.chords)),
            "bass": _Part("bass", rng.choice(style.basses)),
            "melody": _Part("melody", rng.choice(style.leads)),
            "drums": _Part("drums", 0, is_drum=True),
        }
        if rng.random() < 0.6:
            self.parts["pad"] = _Part("pad", rng.choice(style.pads))
        if rng.random() < 0.4:
            self.parts["keys2"] = _Part("keys2", rng.choice(style.chords + style.pads))
        self.voicing = [self.scale[0] + 60, self.scale[2] + 60, self.scale[4] + 60]

    def compose(self, bars: int) -> tuple[dict[str, _Part], list[tuple[float, str]]]:
        plan = self._plan(bars)
        sections, beat = [], 0.0
        for i, (kind, n_bars) in enumerate(plan):
            sections.append((beat, kind))
            self._section(kind, beat, n_bars, last=i == len(plan) - 1)
            beat += n_bars * self.bpb
        return self.parts, sections

    def _plan(self, bars: int) -> list[tuple[str, int]]:
        rng = self.rng
        intro = min(rng.choice((2, 4, 4, 8)), max(0, bars - 1))
        sizes = {
            "verse": rng.choice((8, 8, 16)),
            "pre": 4,
            "chorus": rng.choice((8, 8, 16)),
            "bridge": rng.choice((4, 8, 8)),
            "break": rng.choice((2, 4)),
        }
        body = ["verse", "pre", "chorus", "verse", "pre", "chorus", "break", "bridge", "chorus"]
        body = [k for k in body if not (k == "pre" and sizes["verse"] == 16)]
        if rng.random() < 0.6:
            body.remove("break")
        intro_kind = rng.choices(("intro-drums", "intro-keys", "intro-band"), (3, 4, 3))[0]
        plan = [(intro_kind, intro)] if intro else []
        left, i = bars - intro - 1, 0  # at least one bar of outro
        while left >= 4 or (left > 0 and i == 0):
            kind = body[i % len(body)]
            n = min(sizes[kind], left if left < 4 else left - left % 4)
            kind = "break-drums" if kind == "break" and rng.random() < 0.6 else kind
            plan.append((kind, n))
            left, i = left - n, i + 1
        return plan + [("outro", left + 1)]

    def _section(self, kind: str, start: float, n_bars: int, *, last: bool) -> None:
        base = kind.split("-")[0]
        prog_kind = {"intro": "chorus", "break": "verse", "outro": "chorus"}.get(base, base)
        prog = self.prog[prog_kind]
        level = {
            "intro": 0.75,
            "verse": 0.8,
            "pre": 0.9,
            "chorus": 1.0,
            "bridge": 0.85,
            "break": 0.9,
            "outro": 0.8,
        }[base]
        pitched = kind != "intro-drums" and kind != "break-drums"
        drums = kind not in ("intro-keys", "break")
        span = n_bars * self.bpb - (self.bpb if last else 0)  # the last bar is a held chord
        for b0 in np.arange(0.0, span, self.chord_beats):
            dur = min(self.chord_beats, span - b0)
            degree = prog[int(b0 // self.chord_beats) % len(prog)]
            if pitched:
                self._chords(start + b0, dur, degree, self.chord_rhythm[prog_kind], level, base)
                if (kind != "break" and base != "intro") or kind == "intro-band":
                    self._bass(start + b0, dur, degree, prog, b0, level)
        if pitched and base in ("verse", "pre", "chorus", "bridge", "break"):
            self._melody(prog_kind, prog, start, span, level)
        if drums:
            self._drums(start, n_bars - int(last), level, fill=n_bars >= 4 and not last)
        if last:
            self._ending(start + span)

    def _chord(self, degree: int) -> list[int]:
        s = self.scale
        tones = [s[degree % 7], s[(degree + 2) % 7], s[(degree + 4) % 7]]
        return tones + [s[(degree + 6) % 7]] if self.seventh else tones

    def _voice(self, pcs: list[int], low: int = 52) -> list[int]:
        """The voicing of ``pcs`` nearest the previous one: smooth voice leading."""
        options = []
        for inv in range(len(pcs)):
            rot = pcs[inv:] + pcs[:inv]
            notes = [low + (rot[0] - low) % 12]
            for pc in rot[1:]:
                notes.append(notes[-1] + (pc - notes[-1]) % 12)
            options.append(notes)
        prev = sum(self.voicing) / len(self.voicing)
        self.voicing = min(options, key=lambda v: abs(sum(v) / len(v) - prev))
        return self.voicing

    def _chords(
        self, t0: float, dur: float, degree: int, rhythm: str, level: float, base: str
    ) -> None:
        rng, notes = self.rng, self.parts["chords"].notes
        voicing = self._voice(self._chord(degree))
        vel = int(72 * level)
        if rhythm.startswith("arp"):
            step = 0.5 if rhythm == "arp8" else 0.25
            seq = voicing + [voicing[0] + 12]
            for i, t in enumerate(np.arange(0.0, dur, step)):
                accent = 10 if t % 1 == 0 else 0
                pitch = seq[i % len(seq)] if (i // len(seq)) % 2 == 0 else seq[-1 - i % len(seq)]
                notes.append((t0 + t, t0 + min(t + 2 * step, dur), pitch, vel + accent))
        else:
            strum = 0.02 if 24 <= self.parts["chords"].program <= 31 else 0.0
            for bar in np.arange(0.0, dur, self.bpb):
                for on, length in _CHORD_RHYTHMS[rhythm]:
                    if bar + on < dur and on < self.bpb:
                        end = t0 + min(bar + on + length, dur)
                        v = vel + (8 if on == 0 else 0) + rng.randint(-5, 5)
                        for i, p in enumerate(voicing):
                            notes.append((t0 + bar + on + i * strum, end, p, v))
        for name, low, vel2 in (("pad", 60, 55), ("keys2", 64, 60)):
            if name in self.parts and (
                base in ("chorus", "bridge", "outro") or name == "keys2" and base == "pre"
            ):
                pad = self._voice_at(self._chord(degree), low)
                self.parts[name].notes.extend((t0, t0 + dur, p, int(vel2 * level)) for p in pad)

    def _voice_at(self, pcs: list[int], low: int) -> list[int]:
        return [low + (pc - low) % 12 for pc in pcs]

    def _bass(
        self, t0: float, dur: float, degree: int, prog: tuple[int, ...], b0: float, level: float
    ) -> None:
        root = 31 + (self.scale[degree % 7] - 31) % 12  # G1..F#2
        third = (self._chord(degree)[1] - root) % 12
        nxt = prog[(int(b0 // self.chord_beats) + 1) % len(prog)]
        nxt_root = 31 + (self.scale[nxt % 7] - 31) % 12
        notes, rng = self.parts["bass"].notes, self.rng
        for bar in np.arange(0.0, dur, self.bpb):
            for on, length, tone in _BASS_RHYTHMS[self.bass_rhythm]:
                if bar + on >= dur or on >= self.bpb:
                    continue
                if tone == "W":  # walking: the chord's third, or a step towards the next root
                    pitch = nxt_root + rng.choice((-1, 1)) if on == 3 else root + third
                else:
                    pitch = root + {"R": 0, "5": 7, "O": 12}[tone]
                end = t0 + min(bar + on + length, dur)
                notes.append((t0 + bar + on, end, pitch, int(90 * level) + rng.randint(-6, 6)))

    def _melody(
        self, kind: str, prog: tuple[int, ...], start: float, span: float, level: float
    ) -> None:
        if kind not in self.melodies:
            self.melodies[kind] = self._phrase(prog, 4 * self.bpb)
        phrase = self.melodies[kind]
        rng, notes = self.rng, self.parts["melody"].notes
        length = 4 * self.bpb
        for rep in np.arange(0.0, span, length):
            for on, dur, pitch in phrase:
                if rep + on >= span:
                    break
                if rng.random() < 0.05:  # light variation between repeats: a neighbour note
                    pitch += rng.choice((-2, -1, 1, 2))
                end = start + min(rep + on + dur, span)
                notes.append((start + rep + on, end, pitch, int(96 * level) + rng.randint(-8, 8)))

    def _phrase(self, prog: tuple[int, ...], beats: float) -> list[tuple[float, float, int]]:
        """Four bars of melody: rhythm motifs A A B A, a walk on the scale, chord tones on beats."""
        rng, scale = self.rng, self.scale
        cells = [_CELLS[self.bpb][c] for c in self.cells]
        pattern = (cells[0], cells[0], cells[1], cells[rng.choice((0, 2))])
        pitches = [p for p in range(60, 85) if p % 12 in scale]
        idx = rng.randrange(len(pitches) // 3, 2 * len(pitches) // 3)
        out = []
        for bar, cell in enumerate(pattern):
            for on, dur in cell:
                t = bar * self.bpb + on
                idx = min(
                    max(idx + rng.choice((-2, -1, -1, 0, 1, 1, 2, 3, -3)), 0), len(pitches) - 1
                )
                if on % 1 == 0:  # strong beat: snap to the nearest tone of the sounding chord
                    degree = prog[int(t // self.chord_beats) % len(prog)]
                    tones = {pc % 12 for pc in self._chord(degree)}
                    near = [i for i in range(len(pitches)) if pitches[i] % 12 in tones]
                    idx = min(near, key=lambda i: abs(i - idx))
                out.append((t, min(dur, beats - t), pitches[idx]))
        return out

    def _drums(self, start: float, n_bars: int, level: float, *, fill: bool) -> None:
        rng, notes = self.rng, self.parts["drums"].notes
        hits = _DRUMS[self.drum]
        for bar in range(n_bars):
            t0 = start + bar * self.bpb
            in_fill = fill and bar == n_bars - 1
            for on, key, vel in hits:
                if in_fill and on >= self.bpb - 1:
                    continue
                v = int(vel * level) + rng.randint(-7, 7)
                notes.append((t0 + on, t0 + on + 0.1, key, v))
            if bar == 0:
                notes.append((t0, t0 + 0.5, CRASH, int(100 * level)))
            if in_fill:  # a fill into the next section: 16ths down the toms
                for i in range(4):
                    key = rng.choice((SNARE,) + _TOMS[i : i + 2])
                    notes.append(
                        (t0 + self.bpb - 1 + i / 4, t0 + self.bpb - 0.8 + i / 4, key, 70 + 10 * i)
                    )

    def _ending(self, t0: float) -> None:
        end = t0 + self.bpb
        tonic = self._voice(self._chord(0))
        self.parts["chords"].notes.extend((t0, end, p, 70) for p in tonic)
        self.parts["bass"].notes.append((t0, end, 31 + (self.scale[0] - 31) % 12, 85))
        self.parts["melody"].notes.append((t0, end, 72 + (self.scale[0] - 72) % 12, 85))
        self.parts["drums"].notes.extend([(t0, t0 + 0.5, CRASH, 100), (t0, t0 + 0.1, KICK, 100)])


def _render(
    song: tuple[dict[str, _Part], list[tuple[float, str]]],
    *,
    bpm: float,
    bpb: int,
    end_s: float,
    swing: float,
    rng: random.Random,
    key_number: int,
    label: str,
) -> pretty_midi.PrettyMIDI:
    """Beats → seconds with swing and a little human timing; clip every note into the song."""
    parts, sections = song
    s_per_beat = 60.0 / bpm
    jitter_s = rng.choice((0.0, 0.004, 0.008, 0.012))
    pm = pretty_midi.PrettyMIDI(resolution=480, initial_tempo=bpm)
    pm.time_signature_changes.append(pretty_midi.TimeSignature(bpb, 4, 0.0))
    pm.key_signature_changes.append(pretty_midi.KeySignature(key_number, 0.0))
    pm.text_events.append(pretty_midi.Text(label, 0.0))
    pm.text_events.extend(pretty_midi.Text(f"section:{k}", b * s_per_beat) for b, k in sections)
    for part in parts.values():
        if not part.notes:
            continue
        arr = np.array(part.notes, dtype=np.float64)
        on, off = _swing(arr[:, 0], swing) * s_per_beat, _swing(arr[:, 1], swing) * s_per_beat
        if jitter_s:
            seeds = np.random.default_rng(rng.getrandbits(64))
            on = on + np.clip(seeds.normal(0.0, jitter_s, len(on)), -3 * jitter_s, 3 * jitter_s)
        on, off = np.clip(on, 0.0, end_s), np.minimum(off, end_s)
        off = _trim_overlaps(on, off, arr[:, 2])
        keep = off - on >= 0.02  # clipping can squeeze a note to nothing
        pitch = np.clip(arr[:, 2], 0, 127).astype(int)
        vel = np.clip(arr[:, 3], 1, 127).astype(int)
        inst = pretty_midi.Instrument(part.program, is_drum=part.is_drum, name=part.name)
        inst.notes = [
            pretty_midi.Note(int(v), int(p), float(a), float(b))
            for a, b, p, v in zip(on[keep], off[keep], pitch[keep], vel[keep], strict=True)
        ]
        pm.instruments.append(inst)
    return pm


def _trim_overlaps(on: np.ndarray, off: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """End each note where the next one of the same pitch starts.

    MIDI cannot hold two overlapping notes of one pitch on one channel: the first note-off
    would silence both, so a reader would see other notes than the ones generated.
    """
    order = np.lexsort((on, pitch))
    nxt = np.full(len(on), np.inf)
    same = pitch[order][1:] == pitch[order][:-1]
    nxt[order[:-1][same]] = on[order][1:][same]
    return np.minimum(off, nxt)


def _swing(beats: np.ndarray, ratio: float) -> np.ndarray:
    """Delay the off-beat eighth to ``ratio`` of the beat, warping the beat piecewise-linearly."""
    if ratio == 0.5:
        return beats
    whole = np.floor(beats)
    f = beats - whole
    return whole + np.where(f < 0.5, f * (ratio / 0.5), ratio + (f - 0.5) * ((1 - ratio) / 0.5))


def generate_songs(
    out_dir: Path,
    n: int,
    *,
    start_seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    duration_s: float | tuple[float, float] = (60.0, 240.0),
) -> list[Path]:
    """Write songs ``start_seed .. start_seed + n - 1`` as ``out_dir/generated/song_<seed>.mid``.

    Parameters
    ----------
    out_dir : Path
        Cache root.
    n : int
        Number of songs.
    start_seed : int
        First seed.
    workers : int
        Processes (1: in this process).
    progress : bool
        Show a tqdm progress bar.
    duration_s : float or (float, float)
        Passed to :func:`generate_song`.

    Returns
    -------
    list of Path
        All ``n`` paths in seed order; files already there are kept, not rewritten.

    Raises
    ------
    MidimatchError
        ``reason="stale_cache"`` when the folder holds songs from another generator version or
        other settings (its ``params.json`` differs): the same names would mean other music.
    """
    from tqdm import tqdm

    folder = Path(out_dir) / SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    _check_params(folder, {"version": GENERATOR_VERSION, "duration_s": duration_s})
    seeds = range(start_seed, start_seed + n)
    paths = [folder / f"song_{seed:05d}.mid" for seed in seeds]
    todo = [(s, str(p), duration_s) for s, p in zip(seeds, paths, strict=True) if not p.exists()]
    bar = tqdm(total=len(todo), disable=not progress, unit="song", desc="songs")
    if workers <= 1 or len(todo) < 32:  # a pool costs ~0.5 s to start
        for task in todo:
            _write_song(task)
            bar.update(1)
    else:
        # spawn, not fork: the caller may hold threads (tqdm's monitor) whose locks fork copies.
        with mp.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_song, todo, chunksize=8):
                bar.update(1)
    bar.close()
    return paths


def generated_midi_files(out_dir: Path) -> list[Path]:
    """Songs written by :func:`generate_songs` under ``out_dir/generated``, in seed order."""
    return sorted((Path(out_dir) / SUBDIR).glob("song_*.mid"))


def _write_song(task: tuple[int, str, float | tuple[float, float]]) -> None:
    seed, path, duration_s = task
    pm = generate_song(seed, duration_s=duration_s)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write_midi(pm, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_midi(pm: pretty_midi.PrettyMIDI, path: str | Path) -> None:
    """Write a one-tempo PrettyMIDI as a standard MIDI file, ~10x faster than ``pm.write``.

    ``pm.write`` converts every event with a tempo-map search and builds a mido message per
    event; with one tempo a tick is a multiplication. Same layout as ``pm.write``: a conductor
    track (tempo, time and key signatures, text events), then one track per instrument with
    its name and program, drums on channel 10, note-offs before note-ons at equal ticks.
    Several tempi fall back to ``pm.write``.
    """
    times, bpms = pm.get_tempo_changes()
    if len(bpms) != 1:
        pm.write(str(path))
        return
    ticks_per_s = pm.resolution * float(bpms[0]) / 60.0

    def tick(t: float) -> int:
        return int(round(t * ticks_per_s))

    usec = int(round(60_000_000 / float(bpms[0])))
    meta = [(0, b"\xff\x51\x03" + usec.to_bytes(3, "big"))]
    for ts in pm.time_signature_changes:
        dd = int(ts.denominator).bit_length() - 1
        meta.append((tick(ts.time), bytes([0xFF, 0x58, 4, ts.numerator, dd, 24, 8])))
    for ks in pm.key_signature_changes:
        mode, accidentals = pretty_midi.key_number_to_mode_accidentals(ks.key_number)
        meta.append((tick(ks.time), bytes([0xFF, 0x59, 2, accidentals & 0xFF, mode])))
    for te in pm.text_events:
        meta.append((tick(te.time), _meta_text(0x01, te.text)))
    tracks = [_track(sorted(meta, key=lambda e: e[0]))]
    channels = [c for c in range(16) if c != 9]
    for i, inst in enumerate(pm.instruments):
        ch = 9 if inst.is_drum else channels[i % len(channels)]
        head = [(0, _meta_text(0x03, inst.name)), (0, bytes([0xC0 | ch, inst.program]))]
        n = len(inst.notes)
        if n == 0:
            tracks.append(_track(head))
            continue
        on = np.array([x.start for x in inst.notes]) * ticks_per_s
        off = np.array([x.end for x in inst.notes]) * ticks_per_s
        pitch = np.array([x.pitch for x in inst.notes])
        vel = np.array([x.velocity for x in inst.notes])
        t = np.rint(np.concatenate([off, on])).astype(np.int64)
        is_on = np.repeat([0, 1], n)
        p2, v2 = np.concatenate([pitch, pitch]), np.concatenate([np.zeros(n, int), vel])
        order = np.lexsort((p2, is_on, t))
        status = np.where(is_on[order] == 1, 0x90 | ch, 0x80 | ch)
        notes = list(
            zip(
                t[order].tolist(),
                status.tolist(),
                p2[order].tolist(),
                v2[order].tolist(),
                strict=True,
            )
        )
        tracks.append(_track(head, notes))
    data = b"MThd" + (6).to_bytes(4, "big") + bytes([0, 1]) + len(tracks).to_bytes(2, "big")
    data += pm.resolution.to_bytes(2, "big") + b"".join(tracks)
    with open(path, "wb") as f:
        f.write(data)


def _meta_text(kind: int, text: str) -> bytes:
    raw = text.encode("latin-1", "replace")
    return bytes([0xFF, kind]) + _vlq(len(raw)) + raw


def _vlq(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def _track(
    events: list[tuple[int, bytes]], notes: Sequence[tuple[int, int, int, int]] = ()
) -> bytes:
    """Encode one MTrk chunk: ``events`` (tick, raw bytes) first, then ``notes``
    (tick, status, pitch, velocity), both in tick order, then end-of-track."""
    body = bytearray()
    now = 0
    for t, raw in events:
        body += _vlq(t - now) + raw
        now = t
    for t, status, pitch, vel in notes:
        d = t - now
        body += (bytes([d]) if d < 0x80 else _vlq(d)) + bytes([status, pitch, vel])
        now = t
    body += b"\x00\xff\x2f\x00"
    return b"MTrk" + len(body).to_bytes(4, "big") + bytes(body)


def _check_params(folder: Path, params: dict[str, object]) -> None:
    path = folder / "params.json"
    want = json.loads(json.dumps(params))  # tuples → lists, as they come back from the file
    if path.exists():
        have = json.loads(path.read_text())
        if have != want:
            raise MidimatchError(
                f"{folder} holds songs made with {have}, not {want}; use another folder",
                reason="stale_cache",
            )
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(want))
    os.replace(tmp, path)
