"""The room and the device between the music and the microphone: reverb and a phone's EQ.

A live query is heard through a room and a small microphone; the references are dry, full-band
renders. Both effects are linear, time-invariant filters that keep onsets where they were (the
direct path at t = 0; causal IIR filters with a few ms of group delay, far below one CQT hop), so
they change what the model hears without moving the audio against its MIDI frames. Each draws
its parameters (``_draw_*``) apart from applying them (``_apply_*``), so that
:func:`model.training.augment.augment_audio` can record exactly what it drew.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import signal

from model.training.lossy import (
    AugmentInputError,
    _check_audio,
    _check_number,
    _check_rng,
    _check_sr,
    _uniform,
)

_LN1000 = math.log(1000.0)  # an amplitude envelope exp(-ln(1000) t / rt60) is -60 dB at rt60


# Also checks the ranges of model.training.augment.AugmentConfig, which imports it from here.
def _range(name: str, value: float | Sequence[float], lo: float, hi: float) -> tuple[float, float]:
    """A ``(low, high)`` range from a number or a pair, checked against ``[lo, hi]``."""
    pair = (value, value) if isinstance(value, int | float | np.number) else tuple(value)
    if len(pair) != 2:
        raise AugmentInputError(f"{name} must be a number or a (low, high) pair, got {value!r}")
    a, b = (_check_number(name, v, lo, hi) for v in pair)
    if a > b:
        raise AugmentInputError(f"{name}: low {a} is above high {b}")
    return a, b


def _peaking_sos(f0_hz: float, gain_db: float, q: float, sr: int) -> np.ndarray:
    """One RBJ-cookbook peaking biquad as an SOS row (gain_db at f0_hz, bandwidth by q)."""
    a = 10.0 ** (gain_db / 40.0)
    w0 = 2.0 * math.pi * f0_hz / sr
    alpha = math.sin(w0) / (2.0 * q)
    b = [1 + alpha * a, -2 * math.cos(w0), 1 - alpha * a]
    den = [1 + alpha / a, -2 * math.cos(w0), 1 - alpha / a]
    return np.array([*(v / den[0] for v in b), 1.0, den[1] / den[0], den[2] / den[0]])[None]


def _draw_phone_eq(sr: int, rng: np.random.Generator) -> dict[str, Any]:
    # Small-capsule microphones and voice codecs: no bass below ~150–400 Hz, nothing above
    # ~3–8 kHz, and an uneven response in between (enclosure resonances). The filter orders
    # are steep enough that 60 Hz and 10 kHz end > 12 dB under 1 kHz for every draw, bumps
    # included: the bumps stay inside 500 Hz–4 kHz and their |gains| add up to ≤ 6 dB, so
    # they cannot stack into a deep notch at 1 kHz.
    nyq_cap = 0.45 * sr
    n_bumps = int(rng.integers(1, 4))
    gains = rng.uniform(-6.0, 6.0, n_bumps)
    gains *= min(1.0, 6.0 / max(float(np.abs(gains).sum()), 1e-9))
    bumps = [
        {"f0_hz": float(np.exp(rng.uniform(math.log(500.0), math.log(4000.0)))),
         "gain_db": float(g), "q": float(rng.uniform(0.7, 2.5))}
        for g in gains
    ]
    return {"highpass_hz": float(rng.uniform(150.0, 400.0)),
            "lowpass_hz": float(min(rng.uniform(3000.0, 8000.0), nyq_cap)),
            "bumps": [b for b in bumps if b["f0_hz"] < nyq_cap]}


def _apply_phone_eq(x: np.ndarray, sr: int, params: dict[str, Any]) -> np.ndarray:
    sections = [signal.butter(4, params["highpass_hz"], "highpass", fs=sr, output="sos"),
                signal.butter(10, params["lowpass_hz"], "lowpass", fs=sr, output="sos")]
    sections += [_peaking_sos(b["f0_hz"], b["gain_db"], b["q"], sr) for b in params["bumps"]]
    return signal.sosfilt(np.concatenate(sections), x).astype(np.float32)


def phone_eq(audio: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Colour the audio like a phone or laptop microphone.

    A 4th-order Butterworth high-pass at 150–400 Hz, a 10th-order low-pass at 3–8 kHz (capped
    at 0.45·sr) and 1–3 random peaking bumps (±6 dB in all) between 500 Hz and 4 kHz. Causal IIR
    filters, like the real device: their group delay (a few ms, mostly near the band edges)
    is far below one CQT hop, so alignment is kept without compensation.

    Parameters
    ----------
    audio : np.ndarray, shape (n,), float
    sr : int
        Sample rate in Hz.
    rng : numpy.random.Generator

    Returns
    -------
    np.ndarray, shape (n,), float32
    """
    x = _check_audio(audio)
    sr = _check_sr(sr)
    params = _draw_phone_eq(sr, _check_rng(rng))
    return _apply_phone_eq(x, sr, params)


def _draw_reverb(sr: int, rng: np.random.Generator, rt60_s: tuple[float, float],
                 wet: tuple[float, float]) -> dict[str, Any]:
    return {"rt60_s": _uniform(rng, rt60_s), "wet": _uniform(rng, wet),
            "predelay_ms": float(rng.uniform(3.0, 20.0)),
            "damping_hz": float(min(rng.uniform(3000.0, 9000.0), 0.45 * sr)),
            "early_ratio": float(rng.uniform(0.1, 0.5)),
            "ir_seed": int(rng.integers(2**63))}


def _reverb_ir(sr: int, params: dict[str, Any]) -> np.ndarray:
    """Impulse response: direct path at t = 0, sparse early reflections, diffuse tail."""
    rng = np.random.default_rng(params["ir_seed"])
    rt60 = params["rt60_s"]
    n = max(int(rt60 * sr), 16)  # the tail is at -60 dB by then
    t = np.arange(n) / sr
    decay = np.exp(-_LN1000 * t / rt60)
    pre = params["predelay_ms"] / 1000.0
    # The diffuse field builds up over ~20 ms after the pre-delay (it is born from reflections).
    onset = np.clip((t - pre) / 0.02, 0.0, 1.0)
    tail = rng.standard_normal(n) * decay * onset
    # Air and wall absorption: high frequencies die first; one pole is enough for a 1–2 s tail.
    tail = signal.sosfilt(signal.butter(1, params["damping_hz"], fs=sr, output="sos"), tail)
    # Early reflections: a few discrete echoes (walls, desk) in the first 50 ms.
    early = np.zeros(n)
    for _ in range(int(rng.integers(4, 11))):
        k = min(int(rng.uniform(0.002, min(0.05, rt60)) * sr), n - 1)
        early[k] += rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.9) * decay[k]
    # Early echoes carry a fraction of the tail's energy: most reverberant energy comes late.
    early *= math.sqrt(params["early_ratio"]) / max(np.sqrt(np.sum(early**2)), 1e-12)
    wet_ir = tail / max(np.sqrt(np.sum(tail**2)), 1e-12) + early
    wet_ir /= max(np.sqrt(np.sum(wet_ir**2)), 1e-12)
    # Energy mix: for a noise-like input the output level is the input level, whatever `wet`.
    ir = math.sqrt(params["wet"]) * wet_ir
    ir[0] += math.sqrt(1.0 - params["wet"])
    return ir


def room_reverb(audio: np.ndarray, sr: int, rng: np.random.Generator,
                rt60_s: float | tuple[float, float] = (0.2, 1.2),
                wet: float | tuple[float, float] = (0.2, 0.7)) -> np.ndarray:
    """Play the audio in a synthetic room.

    The impulse response is exponentially decaying Gaussian noise (−60 dB at RT60, built up
    over 20 ms after a 3–20 ms pre-delay, low-passed at 3–9 kHz for absorption) plus 4–10
    early reflections in the first 50 ms, and the direct path at t = 0 — so onsets stay where
    they were and alignment is kept; only energy is smeared later. FFT convolution, truncated
    to the input length (the tail past the end is dropped, as in a live window).

    Parameters
    ----------
    audio : np.ndarray, shape (n,), float
    sr : int
        Sample rate in Hz.
    rng : numpy.random.Generator
    rt60_s : float or (float, float)
        Reverberation time in seconds (0.05–5), or a range drawn uniformly.
    wet : float or (float, float)
        Share of the output energy in the reverberant part (0–1), or a range.

    Returns
    -------
    np.ndarray, shape (n,), float32
        Not renormalised: the level of a noise-like input is kept; tonal inputs may get louder.
    """
    x = _check_audio(audio)
    sr = _check_sr(sr)
    params = _draw_reverb(sr, _check_rng(rng), _range("rt60_s", rt60_s, 0.05, 5.0),
                          _range("wet", wet, 0.0, 1.0))
    return _apply_reverb(x, sr, params)


def _apply_reverb(x: np.ndarray, sr: int, params: dict[str, Any]) -> np.ndarray:
    ir = _reverb_ir(sr, params)
    return signal.oaconvolve(x.astype(np.float64), ir)[: len(x)].astype(np.float32)
