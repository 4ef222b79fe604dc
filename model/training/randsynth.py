"""A procedural synthesiser whose timbre is drawn at random: training-only domain randomisation.

The sample-based renderers share one idea of what an instrument sounds like (a GM soundfont's
recorded notes). A model that heard only them keys on those spectra and reads 57 % top-1 at
10 s on a synthesiser it never met. This engine plays the same notes with timbres drawn
from a wide space, so the network has to key on pitch and rhythm:

* each track gets its own timbre: a harmonic spectrum (a random slope, a random level per
  partial, sometimes a weak fundamental), a little inharmonicity (stiff strings), partials
  that decay faster the higher they are (plucks) or not (organs, pads), an envelope drawn
  between percussive and sustained, and a slight detune;
* in ``P_SPECTRAL_ENV`` of the timbres the spectrum moves: the note starts bright and its upper
  partials fall towards a darker sustained balance (a time constant of 30 ms to 1 s), darker
  still the softer the note is played. Almost every acoustic instrument and most synthesisers
  do this (a struck string, a blown horn, a filter or a modulation envelope), and a fixed level
  per partial taught the network none of it;
* in ``P_PULSE`` of the timbres the partials follow a pulse wave of a random duty cycle
  (partial k scaled by ``|sin(pi k d)|``: every ``1/d``-th partial missing, odd ones only at
  ``d = 1/2``), the classic oscillator of analogue and chip synthesisers;
* in ``P_DRIVE`` of the pitched tracks (outside ensemble renders) the part is played through
  an overdrive (:func:`model.training.timbre.drive`, 6–30 dB): every note gains harmonics and
  every chord its sum and difference tones, as an electric guitar, an overdriven organ or a
  clipped speaker;
* drums, when the piece has them, are noise bursts and pitch-swept thumps at their keys;
* in ``P_ENSEMBLE`` of the renders the whole ensemble plays **one** bright timbre
  (:func:`draw_ensemble_timbre`: many strong partials, odd ones dominating half the time) at
  flat dynamics, with the low parts as loud as the melody or louder. GM sound sets keep the
  accompaniment soft and dark under the tune; many synthesisers (one patch for every part, an
  organ, chip music) do not, and a model that heard only GM balance reads the bass's upper
  partials as chord tones.

It is **additive synthesis** (no frequency modulation, no filters of a sawtooth, no
Karplus-Strong) with an overdrive on some tracks, written here in numpy: none of the held-out
engines (Csound, adplay's OPL3, TiMidity, WildMIDI, Sonivox) is used, and its draws are not tuned to
any of them. (The moving spectrum, added in the seventh session, is also what a 2-operator FM tone
whose index follows its envelope does — Csound's FM instrument and the OPL chips — so those rows
are less blind to it than before; it is drawn as a generic brightness envelope, with ranges set
before any model heard it.)

Everything random comes from ``seed``: one seed, one sound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pretty_midi

from model.errors import RenderError
from model.training.timbre import draw_drive, drive

MAX_PARTIALS = 24
MAX_NOTE_S = 8.0  # a note's sound is cut this long after its onset (plus its release)
NYQUIST_MARGIN = 0.45  # partials above this fraction of the sample rate are dropped
P_ENSEMBLE = 0.5  # renders where every pitched part plays one bright timbre at flat dynamics
LOW_PART_MIDI = 52  # a part whose median pitch is below this (E3) is a low part
P_SPECTRAL_ENV = 0.5  # timbres whose upper partials fall from a bright attack to a darker sustain
P_PULSE = 0.2  # timbres with a pulse wave's spectrum
P_DRIVE = 0.25  # pitched tracks played through an overdrive


@dataclass(frozen=True)
class Timbre:
    """One track's sound."""

    amps: np.ndarray  # (MAX_PARTIALS,) level of partial k+1, the loudest 1
    inharmonicity: float  # B of f_k = k f0 sqrt(1 + B k^2)
    partial_decay: float  # partial k decays at rate decay_s^-1 * k^partial_decay (0: all alike)
    attack_s: float
    decay_s: float  # time constant of the fall from the attack peak to the sustain level
    sustain: float  # 0 = percussive (the note dies away whatever its length)
    release_s: float
    detune_cents: float  # a second voice this far off (0: one voice)
    # the moving spectrum: partial k is scaled by exp(-(k - 1) b(t)), b rising from 0 at the
    # onset to dark_per_partial * (1 + soft_darker * (1 - velocity / 127)) with time
    # constant dark_s (0: a fixed spectrum)
    dark_per_partial: float = 0.0
    dark_s: float = 0.1
    soft_darker: float = 0.0


def _draw_motion(rng: np.random.Generator, amps: np.ndarray) -> dict:
    """The pulse spectrum (applied to ``amps`` in place, ``P_PULSE`` of the draws) and the
    moving spectrum's fields (``P_SPECTRAL_ENV`` of the draws) of one timbre."""
    if rng.random() < P_PULSE:
        duty = rng.uniform(0.08, 0.5)
        amps *= np.abs(np.sin(np.pi * np.arange(1, MAX_PARTIALS + 1) * duty))
    if rng.random() >= P_SPECTRAL_ENV:
        return {}
    return {"dark_per_partial": float(10 ** rng.uniform(-1.3, -0.3)),
            "dark_s": float(10 ** rng.uniform(-1.5, 0.0)),
            "soft_darker": float(rng.uniform(0.0, 1.5))}


def draw_timbre(rng: np.random.Generator) -> Timbre:
    """A random timbre (see the module's docstring for the space it covers)."""
    k = np.arange(1, MAX_PARTIALS + 1, dtype=np.float64)
    amps = k ** -rng.uniform(0.3, 2.5)
    amps *= np.exp(rng.normal(0.0, rng.uniform(0.2, 1.0), MAX_PARTIALS))  # ±2–9 dB per partial
    amps[rng.integers(4, MAX_PARTIALS + 1):] = 0.0  # a random number of partials
    if rng.random() < 0.3:
        amps[0] *= rng.uniform(0.1, 0.6)  # a weak fundamental
    motion = _draw_motion(rng, amps)
    amps /= amps.max()
    percussive = rng.random() < 0.4
    return Timbre(
        amps=amps,
        inharmonicity=float(rng.choice([0.0, 10 ** rng.uniform(-5, -3.3)])),
        partial_decay=float(rng.uniform(0.3, 1.5) if percussive or rng.random() < 0.3 else 0.0),
        attack_s=float(10 ** rng.uniform(-2.7, -0.9 if not percussive else -2.0)),
        decay_s=float(10 ** rng.uniform(-1.3, 0.3)),
        sustain=0.0 if percussive else float(rng.uniform(0.3, 1.0)),
        release_s=float(10 ** rng.uniform(-1.5, -0.5)),
        detune_cents=float(rng.uniform(3.0, 12.0) if rng.random() < 0.3 else 0.0),
        **motion,
    )


def draw_ensemble_timbre(rng: np.random.Generator) -> Timbre:
    """A bright timbre for a whole ensemble: 8-24 partials falling slowly (slope 0.2-1.0),
    the even ones weakened to 0-40 % half the time (hollow, clarinet- or square-like), sustained
    more often than not."""
    base = draw_timbre(rng)
    k = np.arange(1, MAX_PARTIALS + 1, dtype=np.float64)
    amps = k ** -rng.uniform(0.2, 1.0)
    amps *= np.exp(rng.normal(0.0, rng.uniform(0.1, 0.5), MAX_PARTIALS))
    amps[rng.integers(8, MAX_PARTIALS + 1):] = 0.0
    if rng.random() < 0.5:
        amps[1::2] *= rng.uniform(0.0, 0.4)  # partials 2, 4, 6, ...
    amps /= amps.max()
    percussive = rng.random() < 0.25
    return Timbre(
        amps=amps, inharmonicity=0.0,
        partial_decay=float(rng.uniform(0.3, 1.0)) if percussive else 0.0,
        attack_s=float(10 ** rng.uniform(-2.7, -1.5)), decay_s=base.decay_s,
        sustain=0.0 if percussive else float(rng.uniform(0.6, 1.0)),
        release_s=base.release_s, detune_cents=base.detune_cents,
        dark_per_partial=base.dark_per_partial, dark_s=base.dark_s,
        soft_darker=base.soft_darker)


def _envelope(t: np.ndarray, dur: float, tb: Timbre) -> np.ndarray:
    rise = np.clip(t / tb.attack_s, 0.0, 1.0)
    level = tb.sustain + (1.0 - tb.sustain) * np.exp(-np.maximum(t - tb.attack_s, 0.0)
                                                      / tb.decay_s)
    env = rise * level
    after = t > dur
    if after.any():  # release from the level reached at note-off
        off = int(np.searchsorted(t, dur))
        at_off = float(env[off - 1]) if off else 0.0
        env[after] = at_off * np.exp(-(t[after] - dur) / tb.release_s)
    return env


def _note(pitch: int, velocity: int, dur: float, tb: Timbre, sr: int,
          velocity_power: float = 1.5) -> np.ndarray:
    f0 = 440.0 * 2.0 ** ((pitch - 69) / 12.0)
    dur = min(dur, MAX_NOTE_S)
    n = int((dur + 4.0 * tb.release_s) * sr)
    t = np.arange(n) / sr
    k = np.arange(1, MAX_PARTIALS + 1)
    freqs = k * f0 * np.sqrt(1.0 + tb.inharmonicity * k ** 2)
    keep = (tb.amps > 0) & (freqs < NYQUIST_MARGIN * sr)
    out = np.zeros(n)
    darker = None  # per sample, the factor one partial higher is scaled by
    if tb.dark_per_partial:
        depth = tb.dark_per_partial * (1.0 + tb.soft_darker * (1.0 - velocity / 127.0))
        darker = np.exp(-depth * (1.0 - np.exp(-t / tb.dark_s)))
    voices = [0.0] if tb.detune_cents == 0 else [-tb.detune_cents / 2, tb.detune_cents / 2]
    for cents in voices:
        ratio = 2.0 ** (cents / 1200.0)
        motion = None if darker is None else np.ones(n)  # darker ** (kk - 1)
        for kk in range(1, int(np.flatnonzero(keep).max(initial=-1)) + 2):
            if kk > 1 and motion is not None:
                motion *= darker
            if not keep[kk - 1]:
                continue
            f, a = freqs[kk - 1], tb.amps[kk - 1]
            part = a * np.sin(2 * np.pi * f * ratio * t + kk)  # fixed phases: no random peaks
            if tb.partial_decay:
                part *= np.exp(-t * kk ** tb.partial_decay / (4.0 * tb.decay_s))
            if motion is not None:
                part *= motion
            out += part
    out *= _envelope(t, dur, tb) * (velocity / 127.0) ** velocity_power / len(voices)
    return out


def _drum(key: int, velocity: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    if key in (35, 36):  # kick: a sine swept down
        n = int(0.35 * sr)
        t = np.arange(n) / sr
        f = 50.0 + 90.0 * np.exp(-t / 0.03)
        x = np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-t / 0.12)
    else:  # everything else: a noise burst, brighter and shorter the higher the key
        length = 0.08 if key >= 42 else 0.2
        n = int(length * 3 * sr)
        t = np.arange(n) / sr
        noise = rng.standard_normal(n)
        if key >= 42:  # hats and cymbals: high-passed by a first difference
            noise = np.diff(noise, prepend=0.0)
        x = noise * np.exp(-t / length) * 0.4
    return x * (velocity / 127.0)


def render_randsynth(pm: pretty_midi.PrettyMIDI, seed: int, sample_rate: int, n: int,
                     timeout_s: float = 60.0) -> np.ndarray:
    """``pm`` played with a random timbre per track, or one bright timbre for every track
    (``P_ENSEMBLE`` of the seeds; see the module's docstring), ``n`` samples.

    Sample ``i`` is time ``i / sample_rate`` of the MIDI: notes start at their onsets.
    Not normalised (the caller scales the peak).

    Raises
    ------
    RenderError
        ``failed`` for a note outside MIDI's 0–127 (as the engines that read a written file),
        ``timeout`` past ``timeout_s`` of wall-clock time (checked between notes).
    """
    deadline = time.monotonic() + timeout_s
    bad = [nt.pitch for inst in pm.instruments for nt in inst.notes if not 0 <= nt.pitch <= 127]
    if bad:
        raise RenderError(f"randsynth: note pitch {bad[0]} is outside MIDI's 0-127",
                          reason="failed")
    rng = np.random.default_rng(seed)
    ensemble = draw_ensemble_timbre(rng) if rng.random() < P_ENSEMBLE else None
    # flat dynamics in an ensemble: velocity ** 0-0.5 instead of ** 1.5
    power = float(rng.uniform(0.0, 0.5)) if ensemble is not None else 1.5
    # the overdrive's draws come from their own generator, so each seed's other draws (and so
    # its sound where no track is driven) are what they were before it was added
    drive_rng = np.random.default_rng([seed, 1])
    out = np.zeros(n)
    for inst in pm.instruments:
        timbre = None if inst.is_drum else (ensemble if ensemble is not None else draw_timbre(rng))
        # (never in an ensemble render: its parts share one timbre)
        driven = timbre is not None and ensemble is None and drive_rng.random() < P_DRIVE
        track = np.zeros(n) if driven else out
        gain = 1.0
        if ensemble is not None and not inst.is_drum and inst.notes and \
                np.median([nt.pitch for nt in inst.notes]) < LOW_PART_MIDI:
            gain = 10.0 ** (rng.uniform(0.0, 6.0) / 20.0)  # the bass as loud as the tune, or more
        for note in inst.notes:
            if time.monotonic() > deadline:
                raise RenderError(f"randsynth took over {timeout_s:g} s", reason="timeout")
            start = int(round(note.start * sample_rate))
            if start >= n:
                continue
            if timbre is None:
                x = _drum(note.pitch, note.velocity, sample_rate, rng)
            else:
                x = gain * _note(note.pitch, note.velocity, note.end - note.start, timbre,
                                 sample_rate, power)
            stop = min(n, start + x.size)
            track[start:stop] += x[: stop - start]
        if driven:
            out += drive(track, sample_rate, *draw_drive(drive_rng))
    return out.astype(np.float32)
