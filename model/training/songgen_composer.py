"""The arrangement of one song, in beats: form, chords, bass, melody and drums.

This is where a song gets the traits that make real pop MIDI hard to match: a section plan with
repeats (verse, chorus...), drum-only intros and breaks, one melody per section kind that comes
back whenever that section does (rhythm motifs on the scale, chord tones on strong beats), a bass
line, and a drum kit with fills and crashes at section boundaries. Everything is in beats, so
tempo, swing and human timing stay one later step (:func:`model.training.songgen.generate_song`);
every random choice comes from the caller's ``random.Random``, so a seed fixes the song.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from model.training.songgen_styles import (
    BASS_RHYTHMS,
    CELLS,
    CHORD_RHYTHMS,
    CRASH,
    DRUMS,
    KICK,
    MAJOR_PROGRESSIONS,
    MINOR_PROGRESSIONS,
    SNARE,
    STYLES,
    TOMS,
    Style,
)


@dataclass
class Part:
    name: str
    program: int
    is_drum: bool = False
    notes: list[tuple[float, float, int, int]] = field(default_factory=list)  # beats, pitch, vel


class Composer:
    """Writes the parts in beats; :func:`model.training.songgen.generate_song` turns them into
    seconds."""

    def __init__(
        self, rng: random.Random, style: Style, scale: tuple[int, ...], mode: str, bpb: int
    ) -> None:
        self.rng, self.style, self.scale, self.bpb = rng, style, scale, bpb
        progs = MAJOR_PROGRESSIONS if mode in ("major", "mixolydian") else MINOR_PROGRESSIONS
        kinds = ("verse", "pre", "chorus", "bridge")
        # A different progression per section kind, so that a verse does not sound like a chorus.
        self.prog = dict(zip(kinds, rng.sample(progs, 4), strict=True))
        # Chords per bar: two only in 4/4, one per two bars in slow songs.
        self.chord_beats = rng.choice((bpb, bpb, bpb, 2.0 if bpb == 4 else bpb, 2.0 * bpb))
        self.seventh = style is STYLES["jazz"] or rng.random() < 0.2
        self.chord_rhythm = {k: rng.choice(style.chord_rhythms) for k in kinds}
        self.bass_rhythm = rng.choice(style.bass_rhythms)
        self.drum = "waltz" if bpb == 3 else rng.choice(style.drums)
        self.melodies: dict[str, list[tuple[float, float, int]]] = {}
        self.cells = rng.sample(range(len(CELLS[bpb])), 3)  # this song's rhythm motifs
        self.parts = {
            "chords": Part("chords", rng.choice(style.chords)),
            "bass": Part("bass", rng.choice(style.basses)),
            "melody": Part("melody", rng.choice(style.leads)),
            "drums": Part("drums", 0, is_drum=True),
        }
        if rng.random() < 0.6:
            self.parts["pad"] = Part("pad", rng.choice(style.pads))
        if rng.random() < 0.4:
            self.parts["keys2"] = Part("keys2", rng.choice(style.chords + style.pads))
        self.voicing = [self.scale[0] + 60, self.scale[2] + 60, self.scale[4] + 60]

    def compose(self, bars: int) -> tuple[dict[str, Part], list[tuple[float, str]]]:
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
                for on, length in CHORD_RHYTHMS[rhythm]:
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
            for on, length, tone in BASS_RHYTHMS[self.bass_rhythm]:
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
        cells = [CELLS[self.bpb][c] for c in self.cells]
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
        hits = DRUMS[self.drum]
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
                    key = rng.choice((SNARE,) + TOMS[i : i + 2])
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
