"""Detuning that keeps the timing: a recording's tuning is not the reference's.

A performance may sit a few cents off A440 (an old piano, a tape or a stream running fast), and
the model must not care. Resampling alone would shift the pitch but also stretch time (1.8 % at
30 cents), and the training pairs need audio frames that stay on their MIDI frames; so
:func:`detune` resamples and then time-scales back to the input length with WSOLA, whose timing
error is bounded by its search tolerance and does not accumulate.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from scipy import fft as sfft
from scipy import signal

from model.training.lossy import _check_audio, _check_number, _check_sr


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
