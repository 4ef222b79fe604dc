"""MIDI-side augmentation: tempo, orchestration and transposition, applied before rendering.

These transforms run on the ``PrettyMIDI`` *before* it is rendered, so the audio side and the
MIDI-feature side are computed from the same notes and stay frame-aligned whatever the
transform does. Each returns a new ``PrettyMIDI``; the input is never modified.
:func:`augment_midi` draws a random subset from an :class:`~model.training.augment.AugmentConfig`
and returns what it applied, for logs. Everything random takes a ``numpy.random.Generator``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pretty_midi

from model.training.augment import AugmentConfig, _stage_rngs, preset
from model.training.lossy import AugmentInputError, _check_number, _check_rng


def change_tempo(pm: pretty_midi.PrettyMIDI, factor: float) -> pretty_midi.PrettyMIDI:
    """Play ``pm`` ``factor`` times faster: every time is divided by ``factor``.

    Notes, control changes, pitch bends, signatures, lyrics and text events move together with
    the tempo map (each tempo is multiplied by ``factor``), so the piece keeps its ticks and a
    file written from the result plays with exactly the new timing.

    Parameters
    ----------
    pm : pretty_midi.PrettyMIDI
        Not modified.
    factor : float
        Speed ratio in [0.25, 4]; augmentation uses 0.8–1.25. > 1 is faster.

    Returns
    -------
    pretty_midi.PrettyMIDI
        A new object; its end time is ``pm.get_end_time() / factor``.
    """
    factor = _check_number("tempo factor", factor, 0.25, 4.0)
    # Ticks of the last event, read before the tempo map changes, bound the tick→time table.
    max_tick = pm.time_to_tick(pm.get_end_time()) + 1
    out = copy.deepcopy(pm)
    for inst in out.instruments:
        for note in inst.notes:
            note.start /= factor
            note.end /= factor
        for event in (*inst.control_changes, *inst.pitch_bends):
            event.time /= factor
    for events in (out.time_signature_changes, out.key_signature_changes, out.lyrics,
                   out.text_events):
        for event in events:
            event.time /= factor
    # Seconds per tick shrink by the factor: tempo events and time_to_tick (used by write())
    # stay consistent with the moved events. These two are pretty_midi's own tempo-map hooks.
    out._tick_scales = [(tick, scale / factor) for tick, scale in out._tick_scales]
    out._update_tick_to_time(max_tick)
    return out


def randomize_programs(pm: pretty_midi.PrettyMIDI, rng: np.random.Generator, p: float = 0.5,
                       *, same_family_p: float = 0.5) -> pretty_midi.PrettyMIDI:
    """Re-orchestrate: give some non-drum instruments another General MIDI program.

    Parameters
    ----------
    pm : pretty_midi.PrettyMIDI
        Not modified.
    rng : numpy.random.Generator
    p : float
        Probability that each non-drum instrument changes program.
    same_family_p : float
        Probability that a change stays in the instrument's GM family of 8 (piano → another
        piano); otherwise it goes to another family among programs 0–111 (the percussive and
        sound-effect families 112–127 are not melodic and are never chosen across families).

    Returns
    -------
    pretty_midi.PrettyMIDI
        A new object. A changed instrument always gets a program different from its own; drum
        tracks are never touched (their program selects a kit, not pitched timbre).
    """
    _check_rng(rng)
    p = _check_number("p", p, 0.0, 1.0)
    same_family_p = _check_number("same_family_p", same_family_p, 0.0, 1.0)
    out = copy.deepcopy(pm)
    melodic = np.arange(112)
    for inst in out.instruments:
        if inst.is_drum or rng.random() >= p:
            continue
        family = inst.program // 8
        if rng.random() < same_family_p:
            choices = np.array([q for q in range(family * 8, family * 8 + 8) if q != inst.program])
        else:
            choices = melodic[melodic // 8 != family]
        inst.program = int(rng.choice(choices))
    return out


def transpose(pm: pretty_midi.PrettyMIDI, semitones: int) -> pretty_midi.PrettyMIDI:
    """Transpose every non-drum note by ``semitones``.

    Notes that would leave 0–127 are moved by whole octaves back into range (their pitch
    class, hence the harmony, is kept, and no note is lost). Key signatures move too.
    Drum notes are untouched: their "pitch" selects a drum sound.

    Parameters
    ----------
    pm : pretty_midi.PrettyMIDI
        Not modified.
    semitones : int
        In -24..24.

    Returns
    -------
    pretty_midi.PrettyMIDI
        A new object.
    """
    if isinstance(semitones, bool) or not isinstance(semitones, int | np.integer):
        raise AugmentInputError(f"semitones must be an integer, got {semitones!r}")
    semitones = int(_check_number("semitones", semitones, -24, 24))
    out = copy.deepcopy(pm)
    for inst in out.instruments:
        if inst.is_drum:
            continue
        for note in inst.notes:
            pitch = note.pitch + semitones
            while pitch > 127:
                pitch -= 12
            while pitch < 0:
                pitch += 12
            note.pitch = pitch
    for ks in out.key_signature_changes:  # 0–11 major, 12–23 minor
        ks.key_number = (ks.key_number // 12) * 12 + (ks.key_number + semitones) % 12
    return out


def augment_midi(pm: pretty_midi.PrettyMIDI, rng: np.random.Generator,
                 cfg: AugmentConfig | None = None) -> tuple[pretty_midi.PrettyMIDI, dict[str, Any]]:
    """Apply a random subset of transpose → programs → tempo to a piece, before rendering.

    Parameters
    ----------
    pm : pretty_midi.PrettyMIDI
        Not modified.
    rng : numpy.random.Generator
    cfg : AugmentConfig or None
        None: ``preset("train")``.

    Returns
    -------
    pm : pretty_midi.PrettyMIDI
        A new object (a copy when nothing was applied).
    applied : dict
        ``{"transpose": {"semitones": int}, "programs": {"before": [...], "after": [...]},
        "tempo": {"factor": float}}``, only the keys that were applied.
    """
    cfg = cfg or preset("train")
    gates, rngs = _stage_rngs(_check_rng(rng), 3)
    applied: dict[str, Any] = {}
    out = pm
    if gates[0] < cfg.p_transpose:
        lo, hi = cfg.transpose_semitones
        semitones = int(rngs[0].integers(lo, hi + 1))
        out = transpose(out, semitones)
        applied["transpose"] = {"semitones": semitones}
    if gates[1] < cfg.p_programs:
        before = [int(inst.program) for inst in out.instruments]
        out = randomize_programs(out, rngs[1], cfg.program_change_p)
        applied["programs"] = {"before": before, "after": [int(i.program) for i in out.instruments]}
    if gates[2] < cfg.p_tempo:
        lo, hi = cfg.tempo_factor
        factor = float(np.exp(rngs[2].uniform(math.log(lo), math.log(hi)))) if lo < hi else lo
        out = change_tempo(out, factor)
        applied["tempo"] = {"factor": factor}
    if cfg.timbre_notes:  # drawn after the stages above, so theirs do not change
        out = _timbre_notes(out, rng, cfg, applied)
    return (copy.deepcopy(pm) if out is pm else out), applied


def _timbre_notes(pm: pretty_midi.PrettyMIDI, rng: np.random.Generator, cfg: AugmentConfig,
                  applied: dict[str, Any]) -> pretty_midi.PrettyMIDI:
    """Velocity curve, track balance, drums left out (:mod:`model.training.timbre`)."""
    from model.training import timbre

    gates, rngs = _stage_rngs(rng, 3)
    if gates[0] < cfg.p_velocity:
        lo, hi = cfg.velocity_gamma
        gamma = float(np.exp(rngs[0].uniform(math.log(lo), math.log(hi)))) if lo < hi else lo
        pm = timbre.velocity_curve(pm, gamma)
        applied["velocity_curve"] = {"gamma": gamma}
    if gates[1] < cfg.p_balance:
        pm = timbre.balance_tracks(pm, rngs[1], cfg.balance_db)
        applied["balance"] = True
    if gates[2] < cfg.p_drop_drums and any(i.is_drum for i in pm.instruments):
        pm = timbre.without_drums(pm)
        applied["without_drums"] = True
    return pm

