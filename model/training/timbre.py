"""Timbre randomised on purpose, so the network keys on pitch and rhythm, not on a sound set.

A model trained on three soundfonts reads 98.8 % top-1 on a held-out soundfont-like renderer and
83 % on renders of a synthesiser it never heard: it learnt the sound sets. These transforms make
the same notes sound as differently as the renderers allow, and more:

* on the notes (before rendering, so both sides of a pair keep the same notes and times):
  :func:`velocity_curve` (soft/hard playing), :func:`balance_tracks` (level balance between
  instruments), :func:`without_drums`;
* at render time: :func:`render_mixed` gives each instrument its own renderer (a piano from one
  soundfont, the strings from another engine) and mixes them at random levels;
* on the audio, each keeping the timing (zero-phase filters, delays of a few ms at most, far
  under one 46 ms CQT hop): :func:`tilt` (spectral slope), :func:`resonances` (random peaks and
  notches, a body or a cheap speaker), :func:`compress` (dynamics), :func:`vibrato` and
  :func:`chorus` (modulated delays), :func:`drive` (an overdriven amplifier or speaker: a
  memoryless curve, then a causal 20 Hz high-pass, about 1 ms of delay at the lowest CQT bin).

Everything random takes a ``numpy.random.Generator``; the draws of
:func:`model.training.augment.augment_audio` record what was applied.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import numpy as np
import pretty_midi
from scipy import signal

from model.training.augment_room import _peaking_sos
from model.training.lossy import (
    AugmentInputError,
    _check_audio,
    _check_number,
    _check_sr,
    _uniform,
)

DRIVE_DB = (6.0, 30.0)  # the overdrive's gain range, for the mix and for randsynth's tracks
DRIVE_BIAS = (0.0, 0.5)  # and its asymmetry

# ------------------------------------------------------------------ notes


def velocity_curve(pm: pretty_midi.PrettyMIDI, gamma: float) -> pretty_midi.PrettyMIDI:
    """Velocities through ``127 (v / 127) ** gamma`` (gamma < 1: louder and flatter, > 1:
    softer and more contrasted). Timing untouched; a new object."""
    gamma = _check_number("gamma", gamma, 0.25, 4.0)
    out = copy.deepcopy(pm)
    for inst in out.instruments:
        for n in inst.notes:
            n.velocity = int(np.clip(round(127.0 * (n.velocity / 127.0) ** gamma), 1, 127))
    return out


def balance_tracks(pm: pretty_midi.PrettyMIDI, rng: np.random.Generator,
                   db: tuple[float, float] = (-12.0, 0.0)) -> pretty_midi.PrettyMIDI:
    """Each instrument's velocities scaled by its own random level in ``db`` (velocity is
    roughly amplitude in GM synths: 20 log10 of the ratio). A new object."""
    out = copy.deepcopy(pm)
    for inst in out.instruments:
        scale = 10.0 ** (rng.uniform(*db) / 20.0)
        for n in inst.notes:
            n.velocity = int(np.clip(round(n.velocity * scale), 1, 127))
    return out


def without_drums(pm: pretty_midi.PrettyMIDI) -> pretty_midi.PrettyMIDI:
    """The piece with its drum tracks removed (unchanged when it has only drums)."""
    out = copy.deepcopy(pm)
    pitched = [inst for inst in out.instruments if not inst.is_drum]
    if pitched:
        out.instruments = pitched
    return out


# ------------------------------------------------------------------ rendering


def render_mixed(pm: pretty_midi.PrettyMIDI, renderers: Sequence[str], rng: np.random.Generator,
                 render_fn: Callable[[pretty_midi.PrettyMIDI, str], np.ndarray],
                 db: tuple[float, float] = (-9.0, 0.0)) -> tuple[np.ndarray, dict[str, str]]:
    """Render each instrument with one of ``renderers`` (each used at least once while there
    are instruments enough) and mix the groups at random levels in ``db``.

    Parameters
    ----------
    pm : the piece; not modified. Every sub-render keeps its absolute note times, so the mix is
        aligned with ``pm`` as a whole render would be.
    renderers : names to draw from (at least one).
    render_fn : ``(piece, renderer) -> float32 mono audio`` at one sample rate.

    Returns
    -------
    audio : np.ndarray, (n,), float32, the length of the longest group's render, peak as the
        loudest group's (the caller's renderer normalises).
    assignment : instrument index (as str, for JSON) → renderer.
    """
    if not renderers:
        raise AugmentInputError("render_mixed needs at least one renderer")
    n_inst = len(pm.instruments)
    order = list(rng.permutation(len(renderers)))
    picks = [renderers[order[i % len(order)]] if i < len(order) else
             renderers[int(rng.integers(len(renderers)))] for i in range(n_inst)]
    picks = [picks[i] for i in rng.permutation(n_inst)]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(picks):
        groups.setdefault(name, []).append(i)
    parts = []
    for name, members in groups.items():
        sub = copy.deepcopy(pm)
        sub.instruments = [sub.instruments[i] for i in members]
        if not any(inst.notes for inst in sub.instruments):
            continue
        audio = np.asarray(render_fn(sub, name), np.float32)
        peak = float(np.max(np.abs(audio))) or 1.0
        parts.append(audio / peak * np.float32(10.0 ** (rng.uniform(*db) / 20.0)))
    if not parts:
        raise AugmentInputError("render_mixed: no instrument has a note")
    out = np.zeros(max(p.size for p in parts), np.float32)
    for p in parts:
        out[:p.size] += p
    return out, {str(i): name for i, name in enumerate(picks)}


# ------------------------------------------------------------------ audio


def tilt(audio: np.ndarray, sr: int, db_per_octave: float) -> np.ndarray:
    """A spectral slope of ``db_per_octave`` around 1 kHz (flat outside 50 Hz–10 kHz), applied
    in the frequency domain: zero phase, so no sample moves. Same length, float32."""
    x = _check_audio(audio)
    sr = _check_sr(sr)
    slope = _check_number("db_per_octave", db_per_octave, -12.0, 12.0)
    spec = np.fft.rfft(x.astype(np.float64))
    f = np.clip(np.fft.rfftfreq(x.size, 1.0 / sr), 50.0, 10_000.0)
    spec *= 10.0 ** (slope * np.log2(f / 1000.0) / 20.0)
    return np.fft.irfft(spec, x.size).astype(np.float32)


def resonances(audio: np.ndarray, sr: int, rng: np.random.Generator, n: int = 3,
               gain_db: float = 9.0) -> tuple[np.ndarray, list[dict[str, float]]]:
    """``n`` random peaks or notches (100 Hz–5 kHz, ±``gain_db``, Q 1–6), filtered forwards
    and backwards (zero phase). Returns the audio and the drawn filters."""
    x = _check_audio(audio)
    sr = _check_sr(sr)
    drawn = [{"f0_hz": float(math.exp(rng.uniform(math.log(100.0), math.log(min(5000.0,
                                                                               0.4 * sr))))),
              "gain_db": float(rng.uniform(-gain_db, gain_db)), "q": float(rng.uniform(1, 6))}
             for _ in range(n)]
    sos = np.concatenate([_peaking_sos(d["f0_hz"], d["gain_db"] / 2.0, d["q"], sr)
                          for d in drawn])  # half the gain each way: filtfilt doubles it
    return signal.sosfiltfilt(sos, x).astype(np.float32), drawn


def compress(audio: np.ndarray, sr: int, ratio: float, threshold_db: float,
             window_s: float = 0.01, release_s: float = 0.1) -> np.ndarray:
    """Downward compression: above ``threshold_db`` (relative to the clip's peak RMS over
    ``window_s`` windows), the level rises 1/``ratio`` as fast. The gain follows a smoothed
    envelope (instant attack per window, ``release_s`` release), interpolated per sample."""
    x = _check_audio(audio)
    sr = _check_sr(sr)
    ratio = _check_number("ratio", ratio, 1.0, 20.0)
    hop = max(1, int(window_s * sr))
    n = int(math.ceil(x.size / hop))
    padded = np.zeros(n * hop, np.float64)
    padded[:x.size] = x
    rms = np.sqrt(np.mean(padded.reshape(n, hop) ** 2, axis=1)) + 1e-9
    level = 20.0 * np.log10(rms / rms.max())
    env = np.empty(n)
    decay = math.exp(-hop / (release_s * sr))
    cur = -200.0
    for i, v in enumerate(level):  # n is ~100 per second: a plain loop is fine
        cur = v if v > cur else decay * cur + (1.0 - decay) * v
        env[i] = cur
    over = np.maximum(env - threshold_db, 0.0)
    gain_db = -over * (1.0 - 1.0 / ratio)
    centres = (np.arange(n) + 0.5) * hop
    gain = 10.0 ** (np.interp(np.arange(x.size), centres, gain_db) / 20.0)
    return (x * gain).astype(np.float32)


def _modulated_delay(x: np.ndarray, delay_samples: np.ndarray) -> np.ndarray:
    """``x`` read ``delay_samples`` (per output sample, ≥ 0, fractional) in the past."""
    t = np.arange(x.size, dtype=np.float64) - delay_samples
    return np.interp(t, np.arange(x.size), x, left=0.0).astype(np.float32)


def vibrato(audio: np.ndarray, sr: int, rate_hz: float, depth_cents: float) -> np.ndarray:
    """Pitch wobbling ±``depth_cents`` at ``rate_hz``: a delay modulated around a mean of a
    few samples (at most 2 ms), so onsets stay in place."""
    x = _check_audio(audio)
    sr = _check_sr(sr)
    rate_hz = _check_number("rate_hz", rate_hz, 0.5, 12.0)
    depth_cents = _check_number("depth_cents", depth_cents, 0.0, 100.0)
    # delay d(t) = A (1 + sin 2πft): the read speed 1 - d'(t) peaks at 1 ± 2πfA
    amp_s = (2.0 ** (depth_cents / 1200.0) - 1.0) / (2.0 * math.pi * rate_hz)
    t = np.arange(x.size) / sr
    return _modulated_delay(x, sr * amp_s * (1.0 + np.sin(2.0 * math.pi * rate_hz * t)))


def chorus(audio: np.ndarray, sr: int, rng: np.random.Generator, voices: int = 2,
           wet: float = 0.4) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Add ``voices`` copies delayed 8–20 ms, each slowly modulated (0.2–1.5 Hz, ±2 ms), at
    ``wet`` in all; the dry signal stays, so onsets stay. Returns the audio and the voices."""
    x = _check_audio(audio)
    sr = _check_sr(sr)
    wet = _check_number("wet", wet, 0.0, 1.0)
    t = np.arange(x.size) / sr
    out = x.astype(np.float32).copy()
    drawn = []
    for _ in range(voices):
        d = {"delay_ms": float(rng.uniform(8, 20)), "rate_hz": float(rng.uniform(0.2, 1.5)),
             "depth_ms": float(rng.uniform(0.5, 2.0))}
        delay = 1e-3 * sr * (d["delay_ms"] + d["depth_ms"]
                             * np.sin(2.0 * math.pi * d["rate_hz"] * t + rng.uniform(0, 6.3)))
        out += (wet / voices) * _modulated_delay(x, delay)
        drawn.append(d)
    return out / np.float32(1.0 + wet), drawn


def drive(audio: np.ndarray, sr: int, gain_db: float, bias: float = 0.0) -> np.ndarray:
    """Overdrive: ``tanh(g x / peak + bias) - tanh(bias)``, its DC removed, scaled back to the
    input's peak.

    ``gain_db`` (0–40) sets ``g``: at 0 dB a full-scale sine's third harmonic is already about
    −23 dB, at 20–30 dB most of the signal is clipped, so every note gains upper harmonics and
    every two notes sounding together their sum and difference tones (an amplifier, a guitar
    pedal, a speaker pushed too far). ``bias`` (0–1) makes the curve asymmetric, adding even
    harmonics — and a DC offset that follows the notes' envelope, which a 20 Hz high-pass takes
    out (as an amplifier's coupling capacitor does). The curve is memoryless and the high-pass
    causal (nothing sounds before a note; its group delay is 1.2 ms at the lowest CQT bin,
    65 Hz, and 0.1 ms at 200 Hz, far under one 46 ms hop), so the timing stays. Same length,
    float32.
    """
    x = _check_audio(audio)
    sr = _check_sr(sr)
    gain_db = _check_number("gain_db", gain_db, 0.0, 40.0)
    bias = _check_number("bias", bias, 0.0, 1.0)
    peak = float(np.max(np.abs(x)))
    if peak == 0.0:
        return x.astype(np.float32)
    g = 10.0 ** (gain_db / 20.0)
    y = np.tanh(g * (x.astype(np.float64) / peak) + bias) - np.tanh(np.float64(bias))
    if bias > 0.0:
        y = signal.sosfilt(_dc_sos(sr), y)
    out_peak = float(np.max(np.abs(y))) or 1.0
    return (y * (peak / out_peak)).astype(np.float32)


def draw_drive(rng: np.random.Generator,
               gain_db: tuple[float, float] = DRIVE_DB) -> tuple[float, float]:
    """A random overdrive for :func:`drive`: ``(gain_db, bias)``, the gain in ``gain_db``, the
    bias in ``DRIVE_BIAS`` (two draws from ``rng``, in that order)."""
    return _uniform(rng, gain_db), _uniform(rng, DRIVE_BIAS)


def _dc_sos(sr: int) -> np.ndarray:
    """A 2nd-order Butterworth high-pass at 20 Hz, for :func:`drive`'s DC."""
    return signal.butter(2, 20.0, btype="highpass", fs=sr, output="sos")
