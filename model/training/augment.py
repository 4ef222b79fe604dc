"""Audio-side training-data augmentation: make the model learn music, not one soundfont or room.

The effects (:func:`detune`, :func:`phone_eq`, :func:`room_reverb`, :func:`add_noise`,
:func:`gain`, and :func:`model.training.lossy.lossy`) take float32 mono and return the *same number
of samples* with the *same timing* (every delay a transform introduces is compensated or bounded
far below one CQT hop of 1024 samples at 22.05 kHz), so the MIDI side needs no change.

:func:`augment_audio` draws a random subset from an :class:`AugmentConfig` and returns what it
applied, for logs; :func:`preset` gives the evaluation conditions. The MIDI-side transforms
that share the config are in :mod:`model.training.augment_midi`. Everything random takes a
``numpy.random.Generator``: the same seed gives the same output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from typing import Any

import numpy as np
from scipy import fft as sfft
from scipy import signal

from model.errors import MidimatchError
from model.training.lossy import (
    CODECS,
    AugmentInputError,
    _apply_lossy,
    _check_audio,
    _check_number,
    _check_rng,
    _check_sr,
    _draw_lossy,
    _uniform,
    available_codecs,
)

NOISE_KINDS = ("white", "pink", "brown", "babble", "hum")
_LN1000 = math.log(1000.0)  # an amplitude envelope exp(-ln(1000) t / rt60) is -60 dB at rt60


def _range(name: str, value: float | Sequence[float], lo: float, hi: float) -> tuple[float, float]:
    """A ``(low, high)`` range from a number or a pair, checked against ``[lo, hi]``."""
    pair = (value, value) if isinstance(value, int | float | np.number) else tuple(value)
    if len(pair) != 2:
        raise AugmentInputError(f"{name} must be a number or a (low, high) pair, got {value!r}")
    a, b = (_check_number(name, v, lo, hi) for v in pair)
    if a > b:
        raise AugmentInputError(f"{name}: low {a} is above high {b}")
    return a, b


# --------------------------------------------------------------------------- audio: pitch


def _wsola(x: np.ndarray, n_out: int, frame: int, tol: int) -> np.ndarray:
    """Time-scale ``x`` to ``n_out`` samples without changing pitch (WSOLA).

    Waveform-similarity overlap-add (Verhelst & Roelands, 1993): output frames are laid every
    ``frame // 2`` samples under a Hann window; each one is read from the input near its nominal
    position (output time × n_in / n_out), shifted by at most ``tol`` samples to the offset whose
    waveform best continues the previous frame, so the overlap adds in phase. No phase vocoder:
    transients are not smeared, and timing never drifts by more than ``tol`` samples.
    """
    n_in = len(x)
    hop = frame // 2
    step = hop * n_in / n_out  # input advance per output frame
    win = signal.get_window("hann", frame)  # periodic: 50 %-overlapped copies sum to 1
    n_frames = n_out // hop + 2
    front = frame // 2 + tol
    xp = np.zeros(front + n_in + 2 * frame + 2 * tol + int(step) + 2)
    xp[front: front + n_in] = x
    out = np.zeros(n_frames * hop + frame)
    weight = np.zeros_like(out)
    n_fft = sfft.next_fast_len(2 * frame + 2 * tol)
    prev = -1
    for m in range(n_frames):
        nominal = tol + int(round(m * step))  # xp index of the frame whose centre is m·step
        start = nominal
        if prev >= 0:
            template = xp[prev + hop: prev + hop + frame]
            if template.any():
                region = xp[nominal - tol: nominal + tol + frame]
                spec = np.fft.rfft(region, n_fft) * np.conj(np.fft.rfft(template, n_fft))
                corr = np.fft.irfft(spec, n_fft)[: 2 * tol + 1]
                start = nominal - tol + int(np.argmax(corr))
        out[m * hop: m * hop + frame] += win * xp[start: start + frame]
        weight[m * hop: m * hop + frame] += win
        prev = start
    core = slice(frame // 2, frame // 2 + n_out)
    return out[core] / np.maximum(weight[core], 1e-3)


def detune(audio: np.ndarray, sr: int, cents: float) -> np.ndarray:
    """Shift the pitch by ``cents`` while keeping the length and the timing.

    Resampling alone would shift the pitch but also stretch time by up to 1.8 % at 30 cents
    (≈ 4 CQT frames after 10 s), breaking the audio/MIDI alignment. So: a band-limited polyphase
    resample by the pitch ratio r = 2^(cents/1200) (pitch × r, length / r), then WSOLA stretches
    it back to exactly the input length (pitch kept). The local timing error is bounded by the
    WSOLA search tolerance (a quarter of a ~46 ms frame: ≤ 12 ms, a quarter of a CQT hop) and
    does not accumulate. The ratio is the closest fraction with denominator ≤ 1000: the pitch
    error is below 0.01 cent.

    Parameters
    ----------
    audio : np.ndarray, shape (n,), float
        Mono audio.
    sr : int
        Sample rate in Hz (8–96 kHz).
    cents : float
        Pitch shift in cents (100 per semitone), in -100..100; augmentation uses ±30.

    Returns
    -------
    np.ndarray, shape (n,), float32
    """
    x = _check_audio(audio)
    sr = _check_sr(sr)
    cents = _check_number("cents", cents, -100.0, 100.0)
    if cents == 0.0:
        return x.copy()
    ratio = Fraction(2.0 ** (cents / 1200.0)).limit_denominator(1000)
    # Output sample k reads input position k·ratio: the pitch rises by the ratio.
    shifted = signal.resample_poly(x.astype(np.float64), ratio.denominator, ratio.numerator)
    frame = 2 ** round(math.log2(0.046 * sr))  # ≈ one CQT hop of time at any rate
    return _wsola(shifted, len(x), frame, frame // 4).astype(np.float32)


# --------------------------------------------------------------------------- audio: device, room


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


# --------------------------------------------------------------------------- audio: noise, level


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


# --------------------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of every augmentation; ranges are ``(low, high)``, drawn
    uniformly (tempo log-uniformly, so ×0.8 and ×1.25 are equally likely).

    MIDI side (:func:`model.training.augment_midi.augment_midi`, before rendering): tempo, programs,
    transposition.
    Audio side (:func:`augment_audio`), in this order: detune (the source's tuning), phone EQ,
    room reverb, noise, gain, codec (:func:`model.training.lossy.lossy`). EQ and reverb are both
    linear and time-invariant, so their order does not matter; noise comes after them (hum and mic
    noise are not in the room).
    """

    p_tempo: float = 0.5
    tempo_factor: tuple[float, float] = (0.8, 1.25)
    p_programs: float = 0.5
    program_change_p: float = 0.5
    p_transpose: float = 0.3
    transpose_semitones: tuple[int, int] = (-5, 6)
    p_detune: float = 0.3
    detune_cents: tuple[float, float] = (-30.0, 30.0)
    p_eq: float = 0.3
    p_reverb: float = 0.5
    rt60_s: tuple[float, float] = (0.2, 1.2)
    reverb_wet: tuple[float, float] = (0.2, 0.7)
    p_noise: float = 0.5
    snr_db: tuple[float, float] = (0.0, 20.0)
    noise_kinds: tuple[str, ...] = NOISE_KINDS
    p_gain: float = 0.5
    gain_db: tuple[float, float] = (-18.0, 6.0)
    p_codec: float = 0.3
    codecs: tuple[str, ...] = CODECS
    codec_level: tuple[float, float] = (0.3, 0.9)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.startswith("p_") or f.name == "program_change_p":
                _check_number(f.name, getattr(self, f.name), 0.0, 1.0)
        _range("tempo_factor", self.tempo_factor, 0.25, 4.0)
        _range("transpose_semitones", self.transpose_semitones, -24, 24)
        if not all(isinstance(v, int) for v in self.transpose_semitones):
            raise AugmentInputError("transpose_semitones must be integers")
        _range("detune_cents", self.detune_cents, -100.0, 100.0)
        _range("rt60_s", self.rt60_s, 0.05, 5.0)
        _range("reverb_wet", self.reverb_wet, 0.0, 1.0)
        _range("snr_db", self.snr_db, -20.0, 60.0)
        _range("gain_db", self.gain_db, -60.0, 40.0)
        _range("codec_level", self.codec_level, 0.0, 1.0)
        for name, chosen, known in (("noise_kinds", self.noise_kinds, NOISE_KINDS),
                                    ("codecs", self.codecs, CODECS)):
            if not isinstance(chosen, tuple) or not chosen or not set(chosen) <= set(known):
                raise AugmentInputError(
                    f"{name} must be a non-empty tuple from {known}, got {chosen!r}")


_OFF = AugmentConfig(p_tempo=0.0, p_programs=0.0, p_transpose=0.0, p_detune=0.0, p_eq=0.0,
                     p_reverb=0.0, p_noise=0.0, p_gain=0.0, p_codec=0.0)
_PRESETS = {
    "train": AugmentConfig(),
    # Training pairs for robustness: the "train" ranges with a room and noise three times in
    # four (both together in 56 % of the draws instead of 25 %, neither in 6 %).
    "train_noisy": replace(AugmentConfig(), p_reverb=0.75, p_noise=0.75),
    "clean": _OFF,
    # Evaluation "room + noise": always a moderate room and always 10 dB of room-like noise.
    "room_noise": replace(_OFF, p_reverb=1.0, rt60_s=(0.3, 0.8), reverb_wet=(0.3, 0.5),
                          p_noise=1.0, snr_db=(10.0, 10.0), noise_kinds=("pink", "babble")),
    # A phone held up to a speaker: small mic, self-noise and hum, low-bitrate stream codec.
    "phone": replace(_OFF, p_eq=1.0, p_noise=1.0, snr_db=(20.0, 20.0),
                     noise_kinds=("white", "pink", "hum"), p_codec=1.0,
                     codecs=("opus", "mp3"), codec_level=(0.7, 0.9)),
}


def _stage_rngs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[np.random.Generator]]:
    """Gate draws and one independent generator per stage, all taken from ``rng`` up front:
    what a stage draws then does not depend on which other stages ran, so changing one
    probability in a config leaves the other stages' draws as they were."""
    gates = rng.random(n)
    return gates, [np.random.default_rng(int(s)) for s in rng.integers(2**63, size=n)]


def preset(name: str) -> AugmentConfig:
    """A named configuration.

    Parameters
    ----------
    name : {"clean", "room_noise", "phone", "train", "train_noisy"}
        "clean": nothing. "room_noise": reverb (RT60 0.3–0.8 s) + pink/babble noise at 10 dB
        SNR, the evaluation condition. "phone": mic EQ + 20 dB noise + Opus/MP3 at low
        bitrate. "train": the defaults of :class:`AugmentConfig`. "train_noisy": those with
        reverb and noise each drawn with probability 0.75 instead of 0.5 (same ranges).

    Returns
    -------
    AugmentConfig
    """
    if name not in _PRESETS:
        raise AugmentInputError(f"unknown preset {name!r}; known: {', '.join(_PRESETS)}")
    return _PRESETS[name]


def augment_audio(audio: np.ndarray, sr: int, rng: np.random.Generator,
                  cfg: AugmentConfig | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply a random subset of detune → EQ → reverb → noise → gain → codec.

    Every stage keeps the length and the timing, so frames computed from the output stay
    aligned with the MIDI the input was rendered from.

    Parameters
    ----------
    audio : np.ndarray, shape (n,), float
    sr : int
        Sample rate in Hz (8–96 kHz).
    rng : numpy.random.Generator
        The only source of randomness: the same seed gives the same output and record.
    cfg : AugmentConfig or None
        None: ``preset("train")``.

    Returns
    -------
    audio : np.ndarray, shape (n,), float32
        Finite, max |x| ≤ 1 (a last limiter scales the clip down if the codec overshot or the
        input was already too loud).
    applied : dict
        Stage name → its parameters, in the order applied (JSON-serialisable), e.g.
        ``{"room_reverb": {"rt60_s": 0.71, ...}, "noise": {"kind": "pink", "snr_db": 8.2}}``.
    """
    x = _check_audio(audio)
    sr = _check_sr(sr)
    cfg = cfg or _PRESETS["train"]
    gates, rngs = _stage_rngs(_check_rng(rng), 6)
    applied: dict[str, Any] = {}
    if gates[0] < cfg.p_detune:
        cents = _uniform(rngs[0], cfg.detune_cents)
        x = detune(x, sr, cents)
        applied["detune"] = {"cents": cents}
    if gates[1] < cfg.p_eq:
        params = _draw_phone_eq(sr, rngs[1])
        x = _apply_phone_eq(x, sr, params)
        applied["phone_eq"] = params
    if gates[2] < cfg.p_reverb:
        params = _draw_reverb(sr, rngs[2], cfg.rt60_s, cfg.reverb_wet)
        x = _apply_reverb(x, sr, params)
        applied["room_reverb"] = params
    if gates[3] < cfg.p_noise:
        kind = str(rngs[3].choice(cfg.noise_kinds))
        snr_db = _uniform(rngs[3], cfg.snr_db)
        x = _apply_noise(x, sr, rngs[3], snr_db, kind)
        applied["noise"] = {"kind": kind, "snr_db": snr_db}
    if gates[4] < cfg.p_gain:
        db = _uniform(rngs[4], cfg.gain_db)
        x, effective_db = _apply_gain(x, db)
        applied["gain"] = {"db": db, "applied_db": effective_db}
    if gates[5] < cfg.p_codec:
        usable = [c for c in cfg.codecs if c in available_codecs()]
        if usable:
            params = _draw_lossy(str(rngs[5].choice(usable)), rngs[5], cfg.codec_level)
            x = _apply_lossy(x, sr, params)
            applied["lossy"] = params
        else:
            applied["lossy"] = {"skipped": "no configured codec is available"}
    peak = float(np.max(np.abs(x)))
    if peak > 1.0:
        x, effective_db = _apply_gain(x, 0.0)
        applied["limit"] = {"applied_db": effective_db}
    if not np.isfinite(x).all():  # a bug, not bad input: every stage above is finite-safe
        raise MidimatchError(f"augmentation produced non-finite audio ({applied})",
                             reason="augment_failed")
    return (x.copy() if x is audio else x), applied
