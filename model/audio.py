"""Audio coming in: rates, PCM blocks and audio files checked before anything analyses them.

One job: refuse bad input with a typed :class:`~model.errors.AudioError` and hand on plain
samples. :func:`check_rate` bounds the input rate (8..96 kHz, an integer), :func:`pcm_to_samples`
validates one block of PCM (dtype, layout, finiteness) and downmixes it to mono float64 (what
:class:`model.features.StreamingCQT` takes), :func:`load_audio` reads a file with libsndfile.
No torch here: a process that only reads or checks audio does not load it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from model.errors import AudioError

MIN_RATE, MAX_RATE = 8000, 96000


def check_rate(sample_rate: float) -> int:
    """The input rate as an int, or ``AudioError("unsupported_rate")``: an integer number of Hz
    in ``MIN_RATE..MAX_RATE``."""
    if not (isinstance(sample_rate, (int, float, np.integer, np.floating))
            and float(sample_rate).is_integer() and MIN_RATE <= sample_rate <= MAX_RATE):
        raise AudioError(
            f"sample rate {sample_rate!r} Hz is not supported: use an integer rate in "
            f"{MIN_RATE}..{MAX_RATE} Hz", reason="unsupported_rate")
    return int(sample_rate)


def pcm_to_samples(pcm: np.ndarray, channels: int) -> np.ndarray:
    """Validate one block of PCM and downmix it to mono float64, shape (n,)."""
    a = np.asarray(pcm)
    if a.dtype == np.int16:
        a = a.astype(np.float64) / 32768.0
    elif a.dtype.kind == "f":
        a = a.astype(np.float64, copy=False)
    else:
        raise AudioError(f"PCM must be float or int16, got {a.dtype}", reason="bad_dtype")
    if a.ndim == 1 and channels == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[1] != channels:
        raise AudioError(
            f"PCM of shape {a.shape} does not match {channels} channel(s): expected (n,"
            f" {channels})" + (" or (n,)" if channels == 1 else ""), reason="bad_layout")
    if not np.isfinite(a).all():
        raise AudioError("PCM contains NaN or infinite samples", reason="not_finite")
    return a[:, 0].copy() if channels == 1 else a.mean(axis=1)


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file (wav, flac, ogg... whatever libsndfile reads).

    Returns
    -------
    audio : np.ndarray, shape (n, channels), float32 in [-1, 1]
    sample_rate : int, Hz

    Raises
    ------
    AudioError
        ``unreadable`` (missing, not audio), ``empty`` (no samples), ``unsupported_rate``
        (outside 8..96 kHz), ``not_finite`` (NaN or inf in a float file).
    """
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise AudioError(f"cannot read audio {path}: {e}", reason="unreadable") from e
    if audio.size == 0:
        raise AudioError(f"{path} holds no samples", reason="empty")
    check_rate(rate)
    if not np.isfinite(audio).all():
        raise AudioError(f"{path} contains NaN or infinite samples", reason="not_finite")
    return audio, int(rate)
