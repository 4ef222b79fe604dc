"""Audio-side augmentation: the pipeline and presets, and input checks across the effects.

Each effect's own tests are in test_augment_pitch, test_augment_room and test_augment_noise,
which share the signal helpers defined here."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.errors import MidimatchError
from model.training import augment as A
from model.training.augment_noise import add_noise
from model.training.augment_pitch import detune
from model.training.augment_room import phone_eq
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
    for call in (lambda: phone_eq(audio, sr, rng), lambda: detune(audio, sr, 10.0),
                 lambda: A.augment_audio(audio, sr, rng)):
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert isinstance(err.value, MidimatchError)


def test_bad_parameters_are_rejected():
    x = _tone(440.0, 0.1)
    with pytest.raises(ValueError, match="cents"):
        detune(x, SR, 500.0)
    with pytest.raises(ValueError, match="Generator"):
        phone_eq(x, SR, 42)
    with pytest.raises(ValueError, match="unknown noise kind"):
        add_noise(x, SR, np.random.default_rng(0), 10.0, "traffic")
    with pytest.raises(ValueError, match="p_noise"):
        A.AugmentConfig(p_noise=1.5)
    with pytest.raises(ValueError, match="snr_db"):
        A.AugmentConfig(snr_db=(20.0, 0.0))
    with pytest.raises(ValueError, match="unknown preset"):
        A.preset("studio")
