"""Phone EQ and room reverb: band limits and decay as claimed, onsets where they were."""

from __future__ import annotations

import numpy as np
import pytest

from model.training.augment_room import phone_eq, room_reverb
from tests.model.training.test_augment import SR, _level_db, _tone


def test_phone_eq_band_limits_like_a_small_microphone():
    tones = {f: _tone(f, 1.0, sr=44_100) for f in (60.0, 1000.0, 10_000.0)}
    for seed in range(8):
        level = {f: _level_db(phone_eq(x, 44_100, np.random.default_rng(seed))[22_050:])
                 for f, x in tones.items()}
        assert level[1000.0] - level[60.0] > 12
        assert level[1000.0] - level[10_000.0] > 12
    x = tones[1000.0]
    a = phone_eq(x, 44_100, np.random.default_rng(1))
    assert a.shape == x.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, phone_eq(x, 44_100, np.random.default_rng(1)))
    assert not np.array_equal(a, phone_eq(x, 44_100, np.random.default_rng(2)))


@pytest.mark.parametrize("rt60", [0.4, 1.0])
def test_room_reverb_spreads_an_impulse_with_the_requested_decay(rt60):
    x = np.zeros(2 * SR, np.float32)
    x[100] = 1.0
    y = room_reverb(x, SR, np.random.default_rng(0), rt60_s=rt60, wet=0.5)
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
    again = room_reverb(x, SR, np.random.default_rng(0), rt60_s=rt60, wet=0.5)
    np.testing.assert_array_equal(y, again)
