"""Noise at an exact SNR, and gain without clipping."""

from __future__ import annotations

import numpy as np
import pytest

from model.training.augment_noise import NOISE_KINDS, add_noise, gain
from tests.model.training.test_augment import SR, _level_db, _peak_hz, _tone


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_add_noise_hits_the_snr(kind):
    x = _tone(440.0, 2.0, amp=0.3)
    for snr in (0.0, 10.0, 20.0):
        y = add_noise(x, SR, np.random.default_rng(7), snr, kind)
        assert y.shape == x.shape and y.dtype == np.float32
        measured = _level_db(x) - _level_db(y.astype(np.float64) - x)
        assert abs(measured - snr) < 0.5
        np.testing.assert_array_equal(y, add_noise(x, SR, np.random.default_rng(7), snr, kind))
    if kind == "hum":
        assert round(_peak_hz(y - x, SR) / 10) in (5, 6, 10, 12)  # mains or its 2nd harmonic
    silent = np.zeros(1000, np.float32)
    np.testing.assert_array_equal(add_noise(silent, SR, np.random.default_rng(0), 10, kind),
                                  silent)


def test_gain_scales_and_never_clips():
    x = _tone(440.0, 0.5, amp=0.2)
    np.testing.assert_allclose(gain(x, -6.0), x * 10 ** (-6 / 20), rtol=1e-6)
    loud = gain(x, 20.0)
    assert np.max(np.abs(loud)) <= 1.0
    np.testing.assert_allclose(loud, x / np.max(np.abs(x)), rtol=1e-5, atol=1e-7)  # no distortion
    assert gain(x, 0.0).dtype == np.float32
