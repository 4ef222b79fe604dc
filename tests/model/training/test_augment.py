"""Audio-side augmentation: shapes, determinism, and that each effect does what it claims."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.errors import MidimatchError
from model.training import augment as A
from model.training.lossy import available_codecs

SR = 22_050
HOP = 1024  # one CQT frame: the alignment budget


def _tone(freq_hz: float, seconds: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, sr: int) -> float:
    """Spectral peak with parabolic interpolation on the log magnitude."""
    n = 1 << 22
    s = np.abs(np.fft.rfft(x * np.hanning(len(x)), n))
    k = int(np.argmax(s))
    a, b, c = np.log(s[k - 1: k + 2])
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * sr / n


def _level_db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(x.astype(np.float64) ** 2))


# --------------------------------------------------------------------------- audio side


@pytest.mark.parametrize("cents", [-30.0, 17.0, 30.0])
def test_detune_moves_a_tone_by_the_requested_cents(cents):
    x = _tone(440.0, 2.0)
    y = A.detune(x, SR, cents)
    assert y.shape == x.shape and y.dtype == np.float32
    measured = 1200 * np.log2(_peak_hz(y[SR // 4: -SR // 4], SR) / 440.0)
    assert abs(measured - cents) < 3.0
    np.testing.assert_array_equal(y, A.detune(x, SR, cents))  # no hidden randomness


def test_detune_keeps_timing_over_the_whole_clip():
    x = np.zeros(10 * SR, np.float32)
    x[SR // 2:: SR // 2] = 1.0  # a click every 0.5 s for 10 s
    for cents in (-30.0, 30.0):
        y = A.detune(x, SR, cents)
        for at in range(SR // 2, 10 * SR - SR // 2, SR // 2):
            window = np.abs(y[at - HOP: at + HOP])
            assert abs(int(np.argmax(window)) - HOP) < HOP // 8  # no drift: plain resampling
            # would be 1.8 % × 9.5 s ≈ 3800 samples late by the end


def test_phone_eq_band_limits_like_a_small_microphone():
    tones = {f: _tone(f, 1.0, sr=44_100) for f in (60.0, 1000.0, 10_000.0)}
    for seed in range(8):
        level = {f: _level_db(A.phone_eq(x, 44_100, np.random.default_rng(seed))[22_050:])
                 for f, x in tones.items()}
        assert level[1000.0] - level[60.0] > 12
        assert level[1000.0] - level[10_000.0] > 12
    x = tones[1000.0]
    a = A.phone_eq(x, 44_100, np.random.default_rng(1))
    assert a.shape == x.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, A.phone_eq(x, 44_100, np.random.default_rng(1)))
    assert not np.array_equal(a, A.phone_eq(x, 44_100, np.random.default_rng(2)))


@pytest.mark.parametrize("rt60", [0.4, 1.0])
def test_room_reverb_spreads_an_impulse_with_the_requested_decay(rt60):
    x = np.zeros(2 * SR, np.float32)
    x[100] = 1.0
    y = A.room_reverb(x, SR, np.random.default_rng(0), rt60_s=rt60, wet=0.5)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.max(np.abs(y[:100])) < 1e-6  # nothing before the direct path (FFT noise only)
    assert y[100] == pytest.approx(np.sqrt(0.5), abs=1e-4)
    h = y[101:].astype(np.float64)
    assert np.sum(h[int(0.05 * SR):] ** 2) > 0.1 * np.sum(h**2)  # energy moved later
    # Schroeder integration, slope between -5 and -25 dB, extrapolated to -60 dB.
    edc = 10 * np.log10(np.cumsum(h[::-1] ** 2)[::-1] / np.sum(h**2) + 1e-30)
    i5, i25 = int(np.argmax(edc <= -5)), int(np.argmax(edc <= -25))
    slope = np.polyfit(np.arange(i5, i25) / SR, edc[i5:i25], 1)[0]
    assert -60 / slope == pytest.approx(rt60, rel=0.25)
    again = A.room_reverb(x, SR, np.random.default_rng(0), rt60_s=rt60, wet=0.5)
    np.testing.assert_array_equal(y, again)


@pytest.mark.parametrize("kind", A.NOISE_KINDS)
def test_add_noise_hits_the_snr(kind):
    x = _tone(440.0, 2.0, amp=0.3)
    for snr in (0.0, 10.0, 20.0):
        y = A.add_noise(x, SR, np.random.default_rng(7), snr, kind)
        assert y.shape == x.shape and y.dtype == np.float32
        measured = _level_db(x) - _level_db(y.astype(np.float64) - x)
        assert abs(measured - snr) < 0.5
        np.testing.assert_array_equal(y, A.add_noise(x, SR, np.random.default_rng(7), snr, kind))
    if kind == "hum":
        assert round(_peak_hz(y - x, SR) / 10) in (5, 6, 10, 12)  # mains or its 2nd harmonic
    silent = np.zeros(1000, np.float32)
    np.testing.assert_array_equal(A.add_noise(silent, SR, np.random.default_rng(0), 10, kind),
                                  silent)


def test_gain_scales_and_never_clips():
    x = _tone(440.0, 0.5, amp=0.2)
    np.testing.assert_allclose(A.gain(x, -6.0), x * 10 ** (-6 / 20), rtol=1e-6)
    loud = A.gain(x, 20.0)
    assert np.max(np.abs(loud)) <= 1.0
    np.testing.assert_allclose(loud, x / np.max(np.abs(x)), rtol=1e-5, atol=1e-7)  # no distortion
    assert A.gain(x, 0.0).dtype == np.float32


# --------------------------------------------------------------------------- pipeline


_ALL_ON = replace(A.AugmentConfig(), p_detune=1.0, p_eq=1.0, p_reverb=1.0, p_noise=1.0,
                  p_gain=1.0, p_codec=1.0, gain_db=(0.0, 20.0))


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 6000), sr=st.sampled_from([8000, 16000, 22050, 48000]),
       amp=st.sampled_from([0.0, 1e-4, 0.5, 3.0]), seed=st.integers(0, 2**32 - 1),
       all_on=st.booleans())
def test_augment_audio_is_always_finite_bounded_and_same_length(n, sr, amp, seed, all_on):
    x = (amp * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)
    cfg = _ALL_ON if all_on else A.preset("train")
    y, applied = A.augment_audio(x, sr, np.random.default_rng(seed), cfg)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.isfinite(y).all() and np.max(np.abs(y)) <= 1.0
    json.dumps(applied)


def test_augment_audio_is_reproducible_and_records_the_order():
    x = _tone(330.0, 3.0, amp=0.3)
    a, rec_a = A.augment_audio(x, SR, np.random.default_rng(11), _ALL_ON)
    b, rec_b = A.augment_audio(x, SR, np.random.default_rng(11), _ALL_ON)
    np.testing.assert_array_equal(a, b)
    assert rec_a == rec_b
    stages = [k for k in rec_a if k != "limit"]
    expected = ["detune", "phone_eq", "room_reverb", "noise", "gain"]
    assert stages == expected + (["lossy"] if available_codecs() else [])
    c, _ = A.augment_audio(x, SR, np.random.default_rng(12), _ALL_ON)
    assert not np.array_equal(a, c)
    # Each stage draws from its own stream: switching EQ off leaves the other stages' draws.
    _, rec_d = A.augment_audio(x, SR, np.random.default_rng(11), replace(_ALL_ON, p_eq=0.0))
    assert "phone_eq" not in rec_d
    assert {k: v for k, v in rec_d.items() if k != "gain"} == {
        k: v for k, v in rec_a.items() if k not in ("phone_eq", "gain")}


def test_presets_apply_the_evaluation_conditions():
    x = _tone(330.0, 2.0, amp=0.3)
    clean, rec = A.augment_audio(x, SR, np.random.default_rng(0), A.preset("clean"))
    assert rec == {} and clean is not x
    np.testing.assert_array_equal(clean, x)
    _, rec = A.augment_audio(x, SR, np.random.default_rng(0), A.preset("room_noise"))
    assert set(rec) == {"room_reverb", "noise"} and rec["noise"]["snr_db"] == 10.0
    _, rec = A.augment_audio(x, SR, np.random.default_rng(0), A.preset("phone"))
    assert {"phone_eq", "noise"} <= set(rec)
    assert A.preset("train") == A.AugmentConfig()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("audio,sr,match", [
    (np.array([0.0, np.nan], np.float32), SR, "NaN"),
    (np.zeros((2, 100), np.float32), SR, "mono"),
    (np.zeros(100, np.int16), SR, "floating"),
    (np.zeros(0, np.float32), SR, "empty"),
    (np.zeros(100, np.float32), 7_999, "outside"),
    (np.zeros(100, np.float32), 96_001, "outside"),
    (np.zeros(100, np.float32), 22_050.0, "integer"),
])
def test_bad_audio_is_a_clear_value_error(audio, sr, match):
    rng = np.random.default_rng(0)
    for call in (lambda: A.phone_eq(audio, sr, rng), lambda: A.detune(audio, sr, 10.0),
                 lambda: A.augment_audio(audio, sr, rng)):
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert isinstance(err.value, MidimatchError)


def test_bad_parameters_are_rejected():
    x = _tone(440.0, 0.1)
    with pytest.raises(ValueError, match="cents"):
        A.detune(x, SR, 500.0)
    with pytest.raises(ValueError, match="Generator"):
        A.phone_eq(x, SR, 42)
    with pytest.raises(ValueError, match="unknown noise kind"):
        A.add_noise(x, SR, np.random.default_rng(0), 10.0, "traffic")
    with pytest.raises(ValueError, match="p_noise"):
        A.AugmentConfig(p_noise=1.5)
    with pytest.raises(ValueError, match="snr_db"):
        A.AugmentConfig(snr_db=(20.0, 0.0))
    with pytest.raises(ValueError, match="unknown preset"):
        A.preset("studio")
