"""Noise at an exact signal-to-noise ratio, and level changes that never clip.

Live audio carries sound the music does not: crowd babble, hiss, mains hum. The SNR is met on
the clip itself rather than on a nominal level, so a condition such as "10 dB" means the same on
a quiet passage and a loud one. Gain scales a whole clip down instead of clipping it, so a level
change never adds distortion the model could learn from. Like the other effects, these keep the
length and the timing of the input.
"""

from __future__ import annotations

import math

import numpy as np

from model.training.lossy import (
    AugmentInputError,
    _check_audio,
    _check_number,
    _check_rng,
    _check_sr,
)

NOISE_KINDS = ("white", "pink", "brown", "babble", "hum")


def _shaped_noise(n: int, sr: int, rng: np.random.Generator, exponent: float) -> np.ndarray:
    """Gaussian noise with power ∝ 1/f^exponent (0 white, 1 pink, 2 brown), no DC."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    # Below 20 Hz the shape is held flat: brown noise would otherwise wander like DC.
    spec *= np.maximum(f, 20.0) ** (-exponent / 2.0)
    spec[0] = 0.0
    return np.fft.irfft(spec, n)


def _babble(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Crowd-like noise: 4–10 'talkers', each noise gated by syllables and talk spurts."""
    t = np.arange(n) / sr
    mix = np.zeros(n)
    for _ in range(int(rng.integers(4, 11))):
        # Syllables at ~4 Hz (control points every 1/16 s, squared for peaky envelopes)
        # inside ~1 s talk spurts that are on 70 % of the time.
        ctrl_t = np.arange(-1, int(t[-1] * 16) + 2) / 16.0
        env = np.interp(t, ctrl_t, rng.random(len(ctrl_t))) ** 2
        spurt_t = np.arange(-1, int(t[-1]) + 2) + rng.random()
        env *= np.interp(t, spurt_t, (rng.random(len(spurt_t)) < 0.7).astype(float))
        mix += env * rng.standard_normal(n)
    # One speech-like spectrum for the sum (the envelopes are slow, so shaping after the gating
    # is the same as shaping each talker): band 100 Hz–4 kHz, peak near 500 Hz.
    spec = np.fft.rfft(mix)
    f = np.maximum(np.fft.rfftfreq(n, 1.0 / sr), 1.0)
    spec *= (f / 500.0) / (1.0 + (f / 500.0) ** 2) / (1.0 + (f / 4000.0) ** 4)
    return np.fft.irfft(spec, n)


def _hum(n: int, sr: int, rng: np.random.Generator, mains_hz: float) -> np.ndarray:
    """Mains hum: the line frequency (±0.2 %) and its harmonics up to 2 kHz, buzz-like."""
    f0 = mains_hz * (1.0 + rng.uniform(-0.002, 0.002))
    slope = rng.uniform(0.5, 1.5)
    # One period in a table, read at the running phase: one interpolation instead of one sine
    # per harmonic over the whole clip.
    table_n = 4096
    phase = np.arange(table_n + 1) / table_n
    table = np.zeros(table_n + 1)
    for k in range(1, int(min(2000.0, 0.45 * sr) // f0) + 1):
        amp = k ** (-slope) * rng.uniform(0.2, 1.0)
        table += amp * np.sin(2.0 * np.pi * k * phase + rng.uniform(0.0, 2.0 * np.pi))
    return np.interp((np.arange(n) * (f0 / sr)) % 1.0, phase, table)


def _make_noise(kind: str, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "white":
        return rng.standard_normal(n)
    if kind == "pink":
        return _shaped_noise(n, sr, rng, 1.0)
    if kind == "brown":
        return _shaped_noise(n, sr, rng, 2.0)
    if kind == "babble":
        return _babble(n, sr, rng)
    if kind == "hum":
        return _hum(n, sr, rng, float(rng.choice([50.0, 60.0])))
    raise AugmentInputError(f"unknown noise kind {kind!r}; known: {', '.join(NOISE_KINDS)}")


def add_noise(audio: np.ndarray, sr: int, rng: np.random.Generator, snr_db: float,
              kind: str | None = None) -> np.ndarray:
    """Add noise at an exact signal-to-noise ratio.

    The noise is scaled so that mean(audio²) / mean(noise²) = 10^(snr_db/10) on *this* clip
    (not on a nominal level), so the SNR is met to float precision.

    Parameters
    ----------
    audio : np.ndarray, shape (n,), float
    sr : int
        Sample rate in Hz.
    rng : numpy.random.Generator
    snr_db : float
        Target SNR in dB, in -20..60 (augmentation uses 0–20).
    kind : {"white", "pink", "brown", "babble", "hum"} or None
        None draws one uniformly. "hum" is 50 or 60 Hz mains with harmonics.

    Returns
    -------
    np.ndarray, shape (n,), float32
        A silent input comes back unchanged (its SNR is undefined). Not clipped: the
        output may exceed ±1; :func:`gain` protects against that.
    """
    x = _check_audio(audio)
    sr = _check_sr(sr)
    rng = _check_rng(rng)
    snr_db = _check_number("snr_db", snr_db, -20.0, 60.0)
    if kind is None:
        kind = str(rng.choice(NOISE_KINDS))
    return _apply_noise(x, sr, rng, snr_db, kind)


def _apply_noise(x: np.ndarray, sr: int, rng: np.random.Generator, snr_db: float,
                 kind: str) -> np.ndarray:
    noise = _make_noise(kind, len(x), sr, rng)
    p_signal = float(np.mean(x.astype(np.float64) ** 2))
    p_noise = float(np.mean(noise**2))
    if p_signal == 0.0 or p_noise == 0.0:
        return x.copy()
    scale = math.sqrt(p_signal / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (x + scale * noise).astype(np.float32)


def gain(audio: np.ndarray, db: float, *, ceiling: float = 1.0) -> np.ndarray:
    """Change the level by ``db`` decibels, never past ``ceiling``.

    Clipping protection scales the whole clip down (no distortion) when the gained peak would
    exceed ``ceiling``: the waveform is kept, only the effective gain is smaller.

    Parameters
    ----------
    audio : np.ndarray, shape (n,), float
    db : float
        Gain in dB, in -60..40.
    ceiling : float
        Largest allowed |sample|, in (0, 1].

    Returns
    -------
    np.ndarray, shape (n,), float32
        max |output| ≤ ceiling.
    """
    return _apply_gain(_check_audio(audio), db, ceiling)[0]


def _apply_gain(x: np.ndarray, db: float, ceiling: float = 1.0) -> tuple[np.ndarray, float]:
    """Gained audio and the gain actually applied, in dB (lower when protection acted)."""
    db = _check_number("gain db", db, -60.0, 40.0)
    ceiling = _check_number("ceiling", ceiling, 1e-6, 1.0)
    factor = 10.0 ** (db / 20.0)
    peak = float(np.max(np.abs(x))) * factor
    if peak > ceiling:
        factor *= ceiling / peak
    y = np.clip(x.astype(np.float64) * factor, -ceiling, ceiling).astype(np.float32)
    return y, 20.0 * math.log10(factor)  # factor > 0: the scale-down is by a finite peak
