"""Lossy re-encoding for augmentation: MP3, Vorbis and Opus round trips that keep alignment.

:func:`lossy` encodes and decodes in memory through libsndfile and removes the codec's measured
delay (:func:`codec_delay`), so the output has the same length and timing as the input.
:func:`available_codecs` says which of :data:`CODECS` this libsndfile can actually use.

This module also holds the input checks that every augmentation module shares
(:class:`AugmentInputError`, ``_check_*``): :mod:`model.training.augment` and
:mod:`model.training.augment_midi`
import this module and it imports neither, so here the checks make no import cycle.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any

import numpy as np
import soundfile as sf
from scipy import signal

from model.errors import MidimatchError

MIN_SR, MAX_SR = 8_000, 96_000
CODECS = ("mp3", "ogg", "opus")
# (soundfile format, subtype, sample rates the encoder accepts; None = any).
_CODEC_SPEC: dict[str, tuple[str, str, tuple[int, ...] | None]] = {
    "mp3": ("MP3", "MPEG_LAYER_III",
            (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)),
    "ogg": ("OGG", "VORBIS", None),
    "opus": ("OGG", "OPUS", (8000, 12000, 16000, 24000, 48000)),
}
_MP3_MAX_LEVEL = 0.95  # LAME refuses compression level 1.0


class AugmentInputError(MidimatchError, ValueError):
    """Bad input to an augmentation (NaN, wrong shape, sample rate or range out of bounds).

    A ``ValueError`` too, so that generic callers can catch it as one.
    """

    reason = "bad_augment_input"


# --------------------------------------------------------------------------- validation


def _check_audio(audio: np.ndarray) -> np.ndarray:
    if not isinstance(audio, np.ndarray):
        raise AugmentInputError(f"audio must be a numpy array, not {type(audio).__name__}")
    if audio.ndim != 1:
        raise AugmentInputError(f"audio must be mono with shape (n,), got shape {audio.shape}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise AugmentInputError(f"audio must be floating point in [-1, 1], got {audio.dtype}")
    if audio.size == 0:
        raise AugmentInputError("audio is empty")
    if not np.isfinite(audio).all():
        raise AugmentInputError("audio contains NaN or infinite samples")
    return audio.astype(np.float32, copy=False)


def _check_sr(sr: int) -> int:
    if isinstance(sr, bool) or not isinstance(sr, int | np.integer):
        raise AugmentInputError(f"sample rate must be an integer in Hz, got {sr!r}")
    if not MIN_SR <= sr <= MAX_SR:
        raise AugmentInputError(f"sample rate {sr} Hz is outside {MIN_SR}..{MAX_SR} Hz")
    return int(sr)


def _check_rng(rng: np.random.Generator) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise AugmentInputError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
            f"got {type(rng).__name__}")
    return rng


def _check_number(name: str, value: float, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise AugmentInputError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise AugmentInputError(f"{name}={value} is outside {lo}..{hi}")
    return float(value)


def _check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise AugmentInputError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    return codec


def _uniform(rng: np.random.Generator, pair: tuple[float, float]) -> float:
    return float(rng.uniform(*pair)) if pair[0] < pair[1] else float(pair[0])


# --------------------------------------------------------------------------- round trip


def _codec_rate(codec: str, sr: int) -> int:
    """The rate to encode at: ``sr`` when the codec takes it, else the nearest rate above
    (or the highest) — MP3 has no 96 kHz, Opus no 22.05 kHz."""
    rates = _CODEC_SPEC[codec][2]
    if rates is None or sr in rates:
        return sr
    above = [r for r in rates if r >= sr]
    return min(above) if above else max(rates)


def _resample(x: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    if sr_from == sr_to:
        return x
    g = math.gcd(sr_from, sr_to)
    # Polyphase FIR, linear phase with its delay removed by resample_poly: no time shift.
    return signal.resample_poly(x, sr_to // g, sr_from // g)


def _round_trip(x: np.ndarray, sr: int, codec: str, level: float, mode: str | None) -> np.ndarray:
    """Encode and decode in memory (at a rate the codec takes); raw decoder output at ``sr``."""
    fmt, subtype, _ = _CODEC_SPEC[codec]
    enc_sr = _codec_rate(codec, sr)
    buf = io.BytesIO()
    # The encoder clips outside ±1 anyway; do it here so the delay probe sees the same thing.
    y = np.clip(_resample(x.astype(np.float64), sr, enc_sr), -1.0, 1.0)
    sf.write(buf, y, enc_sr, format=fmt, subtype=subtype, compression_level=level,
             bitrate_mode=mode)
    buf.seek(0)
    decoded, _ = sf.read(buf, dtype="float64", always_2d=False)
    return _resample(decoded, enc_sr, sr)


@functools.lru_cache(maxsize=512)
def codec_delay(codec: str, sr: int, level: float, mode: str | None = None) -> int:
    """Samples by which a round trip through ``codec`` delays the audio (measured, cached).

    An impulse is encoded and decoded with exactly these settings and the position of the
    decoded peak is read. libsndfile trims the encoder delay itself in most settings (0), but
    not e.g. LAME's low-bitrate CBR, where it measured 1105 samples — more than a CQT hop.

    Parameters
    ----------
    codec : {"mp3", "ogg", "opus"}
    sr : int
        Sample rate of the audio in Hz (any resampling for the codec is part of the trip).
    level : float
        soundfile ``compression_level`` in [0, 1] (0 = best quality).
    mode : {"CONSTANT", "VARIABLE", "AVERAGE"} or None
        soundfile ``bitrate_mode`` (MP3 only).

    Returns
    -------
    int
        Delay in samples at ``sr`` (can be negative if a decoder trims too much).
    """
    _check_codec(codec)
    at = sr // 4
    probe = np.zeros(sr)
    probe[at] = 0.9
    return int(np.argmax(np.abs(_round_trip(probe, sr, codec, level, mode)))) - at


@functools.lru_cache(maxsize=1)
def available_codecs() -> tuple[str, ...]:
    """The codecs of :data:`CODECS` that this libsndfile can encode and decode in memory.

    Returns
    -------
    tuple of str
        A subset of ``("mp3", "ogg", "opus")``, in that order; checked once by a real
        round trip, since a listed format can still fail at run time.
    """
    found = []
    for codec in CODECS:
        try:
            _round_trip(np.zeros(4800), 48_000, codec, 0.5, None)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
            continue
        found.append(codec)
    return tuple(found)


# --------------------------------------------------------------------------- lossy


def _lossy_params(codec: str, level: float, mode: str | None) -> dict[str, Any]:
    """The settings record of one round trip: MP3 capped at its highest level, and only MP3
    has a bitrate mode."""
    if codec != "mp3":
        return {"codec": codec, "level": level, "bitrate_mode": None}
    return {"codec": codec, "level": min(level, _MP3_MAX_LEVEL), "bitrate_mode": mode}


def _draw_lossy(codec: str, rng: np.random.Generator,
                level: tuple[float, float]) -> dict[str, Any]:
    # Levels are quantised to 0.05 so that the per-setting delay cache stays small.
    value = round(_uniform(rng, level) * 20.0) / 20.0
    # CBR at high levels is the low-bitrate stream case.
    mode = str(rng.choice(["CONSTANT", "VARIABLE"])) if codec == "mp3" else None
    return _lossy_params(codec, value, mode)


def lossy(audio: np.ndarray, sr: int, codec: str = "mp3", rng: np.random.Generator | None = None,
          *, level: float | None = None, bitrate_mode: str | None = None) -> np.ndarray:
    """Re-encode through a lossy codec in memory and decode, keeping length and alignment.

    The codec's round-trip delay for these settings (:func:`codec_delay`, measured on an
    impulse) is removed, then the result is trimmed or zero-padded to the input length.

    Parameters
    ----------
    audio : np.ndarray, shape (n,), float
        Samples outside ±1 are clipped before encoding (as any encoder would).
    sr : int
        Sample rate in Hz. Rates the codec lacks are resampled to one it has and back.
    codec : {"mp3", "ogg", "opus"}
        "ogg" is Vorbis. Must be in :func:`available_codecs`.
    rng : numpy.random.Generator or None
        Draws the level in [0.3, 0.9] (and, for MP3, CBR or VBR) where they are not given.
    level : float or None
        soundfile ``compression_level`` in [0, 1] (0 best quality, 1 smallest file; MP3 stops
        at 0.95). Default: drawn with ``rng``, else 0.5.
    bitrate_mode : {"CONSTANT", "VARIABLE", "AVERAGE"} or None
        MP3 only. Default: drawn with ``rng``, else "VARIABLE".

    Returns
    -------
    np.ndarray, shape (n,), float32
        Aligned to the input within a few samples. May slightly exceed ±1 (codec overshoot).
    """
    x = _check_audio(audio)
    sr = _check_sr(sr)
    _check_codec(codec)
    if codec not in available_codecs():
        raise MidimatchError(f"codec {codec!r} is not available in this libsndfile",
                             reason="codec_unavailable")
    if bitrate_mode not in (None, "CONSTANT", "VARIABLE", "AVERAGE"):
        raise AugmentInputError(f"unknown bitrate_mode {bitrate_mode!r}")
    drawn = (_draw_lossy(codec, _check_rng(rng), (0.3, 0.9)) if rng is not None
             else _lossy_params(codec, 0.5, "VARIABLE"))
    if level is not None:
        level = _check_number("level", level, 0.0, 1.0)
    params = _lossy_params(codec, drawn["level"] if level is None else level,
                           drawn["bitrate_mode"] if bitrate_mode is None else bitrate_mode)
    return _apply_lossy(x, sr, params)


def _apply_lossy(x: np.ndarray, sr: int, params: dict[str, Any]) -> np.ndarray:
    codec, level, mode = params["codec"], params["level"], params["bitrate_mode"]
    delay = codec_delay(codec, sr, level, mode)
    # Trailing silence lets the last frame flush through the codec's delay.
    padded = np.concatenate([x, np.zeros(max(delay, 0) + sr // 10)])
    decoded = _round_trip(padded, sr, codec, level, mode)
    out = np.zeros(len(x), dtype=np.float32)
    if delay < 0:  # decoded[k] is the input at k - delay
        chunk = decoded[: len(x) + delay]
        out[-delay: -delay + len(chunk)] = chunk
    else:
        chunk = decoded[delay: delay + len(x)]
        out[: len(chunk)] = chunk
    return out
