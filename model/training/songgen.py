"""Procedural pop, game and film-like songs as General MIDI files, one per seed.

The music21 corpus is classical and folk: few drums, no synthesisers, little verse/chorus
repetition. These songs supply what it lacks, with the traits that make real pop MIDI hard to
match: sections that repeat (verse, chorus...), drum-only intros and breaks, swing, several GM
instruments at once.

This module makes the choices that fix a whole song and the step from beats to seconds: the seed
draws a style (:mod:`model.training.songgen_styles`: tempo range, instrument pools, patterns),
a key and mode, a meter, and a tempo at which a whole number of bars lasts exactly the asked
length; :class:`~model.training.songgen_composer.Composer` arranges the song in beats; then
swing and a little human timing turn beats into seconds, and every note is clipped into the song.

Every section start is written as a MIDI text event ``section:<kind>`` (``section:intro-drums``,
``section:chorus``...) so evaluations can tell a repeat from a wrong position. Writing many
songs into a cache folder is :mod:`model.training.songgen_files`.
"""

from __future__ import annotations

import random

import numpy as np
import pretty_midi

from model.errors import MidimatchError
from model.training.songgen_composer import Composer, Part
from model.training.songgen_styles import SCALES, STYLES

GENERATOR_VERSION = 1  # bump when a seed would produce different music; caches then refuse reuse
TEMPO_RANGE_BPM = (70.0, 160.0)


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
    name = rng.choices(list(STYLES), weights=[s.weight for s in STYLES.values()])[0]
    style = STYLES[name]
    mode = rng.choice(style.modes)
    scale = tuple((rng.randrange(12) + d) % 12 for d in SCALES[mode])  # pitch classes, tonic 1st
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
    song = Composer(rng, style, scale, mode, bpb).compose(bars)
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


def _render(
    song: tuple[dict[str, Part], list[tuple[float, str]]],
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
