"""Audio-side training-data augmentation: make the model learn music, not one soundfont or room.

The effects (:func:`~model.training.augment_pitch.detune`,
:func:`~model.training.augment_room.phone_eq`, :func:`~model.training.augment_room.room_reverb`,
:func:`~model.training.augment_noise.add_noise`, :func:`~model.training.augment_noise.gain`, and
:func:`model.training.lossy.lossy`) take float32 mono and return the *same number of samples*
with the *same timing* (every delay a transform introduces is compensated or bounded far below
one CQT hop of 1024 samples at 22.05 kHz), so the MIDI side needs no change.

This module ties them into one reproducible draw: :func:`augment_audio` draws a random subset
from an :class:`AugmentConfig` and returns what it applied, for logs; :func:`preset` gives the
training and evaluation conditions. The MIDI-side transforms that share the config are in
:mod:`model.training.augment_midi`. Everything random takes a ``numpy.random.Generator``: the
same seed gives the same output.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from model.errors import MidimatchError
from model.training.augment_noise import NOISE_KINDS, _apply_gain, _apply_noise
from model.training.augment_pitch import detune
from model.training.augment_room import (
    _apply_phone_eq,
    _apply_reverb,
    _draw_phone_eq,
    _draw_reverb,
    _range,
)
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
from model.training.timbre import DRIVE_DB


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
    # Timbre randomised on purpose (model.training.timbre), all off unless a preset turns them
    # on; when all are off nothing is drawn for them, so the other presets' pairs are unchanged.
    p_velocity: float = 0.0  # notes: velocity curve 127 (v/127) ** gamma
    velocity_gamma: tuple[float, float] = (0.5, 2.0)
    p_balance: float = 0.0  # notes: each instrument at its own level
    balance_db: tuple[float, float] = (-12.0, 0.0)
    p_drop_drums: float = 0.0  # notes: the drum tracks left out
    p_mix: float = 0.0  # render: each instrument by its own renderer of the training pool
    p_tilt: float = 0.0  # audio: spectral slope
    tilt_db_per_octave: tuple[float, float] = (-4.0, 4.0)
    p_resonance: float = 0.0  # audio: random peaks and notches
    p_compress: float = 0.0  # audio: dynamics compression
    compress_ratio: tuple[float, float] = (2.0, 8.0)
    compress_threshold_db: tuple[float, float] = (-30.0, -10.0)
    p_vibrato: float = 0.0  # audio: pitch vibrato
    vibrato_cents: tuple[float, float] = (5.0, 30.0)
    p_chorus: float = 0.0  # audio: chorus
    p_drive: float = 0.0  # audio: overdrive (a clipped amplifier or speaker)
    drive_db: tuple[float, float] = DRIVE_DB

    @property
    def timbre_notes(self) -> bool:
        return max(self.p_velocity, self.p_balance, self.p_drop_drums) > 0.0

    @property
    def timbre_audio(self) -> bool:
        return max(self.p_tilt, self.p_resonance, self.p_compress, self.p_vibrato,
                   self.p_chorus, self.p_drive) > 0.0

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
        _range("velocity_gamma", self.velocity_gamma, 0.25, 4.0)
        _range("balance_db", self.balance_db, -40.0, 0.0)
        _range("tilt_db_per_octave", self.tilt_db_per_octave, -12.0, 12.0)
        _range("compress_ratio", self.compress_ratio, 1.0, 20.0)
        _range("compress_threshold_db", self.compress_threshold_db, -60.0, 0.0)
        _range("vibrato_cents", self.vibrato_cents, 0.0, 100.0)
        _range("drive_db", self.drive_db, 0.0, 40.0)
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
    # Sound sets the model must not learn: train_noisy plus every timbre randomisation
    # (model.training.timbre), each instrument by its own renderer half the time.
    "timbre": replace(AugmentConfig(), p_reverb=0.75, p_noise=0.75, p_velocity=0.5,
                      p_balance=0.5, p_drop_drums=0.2, p_mix=0.5, p_tilt=0.5, p_resonance=0.4,
                      p_compress=0.3, p_vibrato=0.2, p_chorus=0.2, p_drive=0.2),
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


def _timbre_audio(x: np.ndarray, sr: int, rng: np.random.Generator, cfg: AugmentConfig,
                  applied: dict[str, Any]) -> np.ndarray:
    """The instrument's own sound, before the room: tilt, resonances, compression, vibrato,
    chorus, overdrive (:mod:`model.training.timbre`), each with its probability. Overdrive
    (added later) draws after the other five and only where ``p_drive`` is on, so their draws
    are as they were."""
    from model.training import timbre

    gates, rngs = _stage_rngs(rng, 5)
    if gates[0] < cfg.p_tilt:
        slope = _uniform(rngs[0], cfg.tilt_db_per_octave)
        x = timbre.tilt(x, sr, slope)
        applied["tilt"] = {"db_per_octave": slope}
    if gates[1] < cfg.p_resonance:
        x, drawn = timbre.resonances(x, sr, rngs[1], n=int(rngs[1].integers(1, 4)))
        applied["resonances"] = drawn
    if gates[2] < cfg.p_compress:
        ratio = _uniform(rngs[2], cfg.compress_ratio)
        threshold = _uniform(rngs[2], cfg.compress_threshold_db)
        x = timbre.compress(x, sr, ratio, threshold)
        applied["compress"] = {"ratio": ratio, "threshold_db": threshold}
    if gates[3] < cfg.p_vibrato:
        rate, cents = float(rngs[3].uniform(4.0, 7.0)), _uniform(rngs[3], cfg.vibrato_cents)
        x = timbre.vibrato(x, sr, rate, cents)
        applied["vibrato"] = {"rate_hz": rate, "depth_cents": cents}
    if gates[4] < cfg.p_chorus:
        x, drawn = timbre.chorus(x, sr, rngs[4])
        applied["chorus"] = drawn
    if cfg.p_drive > 0.0:
        gate, (sub,) = _stage_rngs(rng, 1)
        if gate[0] < cfg.p_drive:
            gain_db, bias = timbre.draw_drive(sub, cfg.drive_db)
            x = timbre.drive(x, sr, gain_db, bias)
            applied["drive"] = {"gain_db": gain_db, "bias": bias}
    return x


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
    if cfg.timbre_audio:  # drawn after the stages above, so theirs do not change
        x = _timbre_audio(x, sr, rng, cfg, applied)
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
