"""One frame-aligned (audio, MIDI) training pair from one piece.

The model learns to match audio frames to the MIDI frames of the same notes, so both sides of a
pair must come from the same notes at the same times: the MIDI augmentations act on the notes
(tempo, programs, transposition: both sides move together), the excerpt is cut before rendering,
every audio augmentation keeps the timing, and the MIDI frames are computed from the very excerpt
that was rendered. Anything random draws from the caller's generator, so a seed fixes the pair.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pretty_midi

from model.errors import MidimatchError
from model.fastrender import midi_to_frames_fast
from model.features import FRAME_RATE, SAMPLE_RATE, audio_to_frames
from model.training.augment import augment_audio, preset
from model.training.augment_midi import augment_midi
from model.training.render import PEAK, RENDERERS, render, renderable_midi
from model.training.timbre import render_mixed


def excerpt(pm: pretty_midi.PrettyMIDI, start_s: float, length_s: float
            ) -> pretty_midi.PrettyMIDI:
    """Notes starting in ``[start_s, start_s + length_s)``, ends clipped to the window, shifted
    so that the first kept note starts at 0 (no leading silence).

    Controllers and pitch bends in the window move along; the last value of each before the
    first note is set at 0, so a pedal or a volume set earlier still holds. One 120 bpm tempo.
    """
    end_s = start_s + length_s
    notes = [n for inst in pm.instruments for n in inst.notes if start_s <= n.start < end_s]
    t0 = min((n.start for n in notes), default=start_s)
    out = pretty_midi.PrettyMIDI(resolution=960, initial_tempo=120.0)
    for inst in pm.instruments:
        new = pretty_midi.Instrument(inst.program, inst.is_drum, inst.name)
        new.notes = [pretty_midi.Note(n.velocity, n.pitch, n.start - t0, min(n.end, end_s) - t0)
                     for n in inst.notes if t0 <= n.start < end_s]
        if not new.notes:
            continue
        last: dict[int, pretty_midi.ControlChange] = {}
        for c in sorted(inst.control_changes, key=lambda c: c.time):
            if c.time <= t0:
                last[c.number] = c
            elif c.time < end_s:
                cc = pretty_midi.ControlChange(c.number, c.value, c.time - t0)
                new.control_changes.append(cc)
        new.control_changes[:0] = [pretty_midi.ControlChange(c.number, c.value, 0.0)
                                   for c in last.values()]
        bends = sorted(inst.pitch_bends, key=lambda b: b.time)
        before = [b for b in bends if b.time <= t0][-1:]
        new.pitch_bends = ([pretty_midi.PitchBend(b.pitch, 0.0) for b in before]
                           + [pretty_midi.PitchBend(b.pitch, b.time - t0) for b in bends
                              if t0 < b.time < end_s])
        out.instruments.append(new)
    return out


def make_pair(pm: pretty_midi.PrettyMIDI, renderer: str, rng: np.random.Generator, *,
              max_piece_s: float = 120.0, augment: bool = True, min_frames: int = 100,
              timeout_s: float = 60.0, cache_dir: Path | None = None,
              augment_preset: str = "train", mix_pool: Sequence[str] = ()
              ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One training pair from a piece: augment, cut, render, augment audio, frame both sides.

    Parameters
    ----------
    pm : pretty_midi.PrettyMIDI
        Not modified.
    renderer : str
        A name of :data:`model.training.render.RENDERERS`.
    rng : numpy.random.Generator
        Every random choice (MIDI and audio augmentation, excerpt start).
    max_piece_s : float
        Longest excerpt, seconds of the (tempo-changed) piece.
    augment : bool
        False: no MIDI or audio augmentation (the held-out split).
    min_frames : int
        Pairs shorter than this raise ``too_short``.
    timeout_s : float
        Bound on the renderer's process.
    cache_dir : Path, optional
        For :func:`model.training.render.render` (decoded ``.sf3`` soundfonts).
    augment_preset : str
        The :func:`model.training.augment.preset` both augmentations draw from ("train";
        "train_noisy" for more rooms and noise; "timbre" for timbre randomised on purpose).
    mix_pool : sequence of str
        Renderers an instrument may be given instead of ``renderer`` when the preset's
        ``p_mix`` draws a mixed render (:func:`model.training.timbre.render_mixed`).

    Returns
    -------
    audio, midi : np.ndarray, shape (T, 48), float32
        Frame t of both sounds the same notes; leading and trailing frames where the MIDI is
        silent are dropped.
    info : dict
        ``renderer``, ``music_s`` (seconds of the pair), ``excerpt_start_s``, ``midi_aug``,
        ``audio_aug`` (names of the stages applied).
    """
    midi_aug: dict[str, Any] = {}
    cfg = preset(augment_preset)
    if augment:
        pm, midi_aug = augment_midi(pm, rng, cfg)
    start_s = float(rng.uniform(0.0, max(0.0, pm.get_end_time() - max_piece_s)))
    piece = excerpt(pm, start_s, max_piece_s)
    pool = sorted({renderer, *mix_pool})
    # drawn only when the preset mixes, so the other presets' draws stay as they were
    mixed = augment and cfg.p_mix > 0.0 and len(pool) > 1 and rng.random() < cfg.p_mix

    def render_one(sub: pretty_midi.PrettyMIDI, name: str) -> np.ndarray:
        # drawn only for the engine that uses it, so the other renderers' draws stay as they were
        seed = int(rng.integers(2**31)) if RENDERERS[name].engine == "randsynth" else 0
        return render(sub, name, timeout_s=timeout_s, max_duration_s=max_piece_s + 1.0,
                      cache_dir=cache_dir, seed=seed)

    if mixed:
        others = [r for r in pool if r != renderer]
        chosen = [renderer, *rng.choice(others, size=min(len(others), int(rng.integers(1, 3))),
                                        replace=False).tolist()]
        played: list[pretty_midi.Instrument] = []

        def render_played(sub: pretty_midi.PrettyMIDI, name: str) -> np.ndarray:
            sub = renderable_midi(sub, name)  # what this renderer really plays of its part
            played.extend(sub.instruments)
            return render_one(sub, name)

        if not any(inst.notes for inst in piece.instruments):
            raise MidimatchError("no playable note in the excerpt", reason="no_notes")
        audio, assignment = render_mixed(piece, chosen, rng, render_played)
        audio *= np.float32(PEAK / (float(np.max(np.abs(audio))) or 1.0))
        cut = copy.copy(piece)
        cut.instruments = played
        midi_aug["mixed_render"] = assignment
    else:
        cut = renderable_midi(piece, renderer)
        if not any(inst.notes for inst in cut.instruments):
            raise MidimatchError("no playable note in the excerpt", reason="no_notes")
        audio = render_one(cut, renderer)
    audio_aug: dict[str, Any] = {}
    if augment:
        audio, audio_aug = augment_audio(audio, SAMPLE_RATE, rng, preset(augment_preset))
    midi = midi_to_frames_fast(cut)
    a = audio_to_frames(audio, SAMPLE_RATE)
    active = np.flatnonzero(midi[: len(a)].any(axis=1))
    if active.size == 0 or active[-1] + 1 - active[0] < min_frames:
        raise MidimatchError(f"pair of {active.size} frames, under {min_frames}",
                             reason="too_short")
    span = slice(int(active[0]), int(active[-1]) + 1)
    info = {"renderer": renderer, "music_s": round((span.stop - span.start) / FRAME_RATE, 3),
            "excerpt_start_s": round(start_s, 3), "midi_aug": midi_aug,
            "audio_aug": sorted(audio_aug)}
    return a[span], midi[span], info
