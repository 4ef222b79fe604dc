"""Detuning: the pitch moves by the requested cents, the timing does not."""

from __future__ import annotations

import numpy as np
import pytest

from model.training.augment_pitch import detune
from tests.model.training.test_augment import HOP, SR, _peak_hz, _tone


@pytest.mark.parametrize("cents", [-30.0, 17.0, 30.0])
def test_detune_moves_a_tone_by_the_requested_cents(cents):
    x = _tone(440.0, 2.0)
    y = detune(x, SR, cents)
    assert y.shape == x.shape and y.dtype == np.float32
    measured = 1200 * np.log2(_peak_hz(y[SR // 4: -SR // 4], SR) / 440.0)
    assert abs(measured - cents) < 3.0
    np.testing.assert_array_equal(y, detune(x, SR, cents))  # no hidden randomness


def test_detune_keeps_timing_over_the_whole_clip():
    x = np.zeros(10 * SR, np.float32)
    x[SR // 2:: SR // 2] = 1.0  # a click every 0.5 s for 10 s
    for cents in (-30.0, 30.0):
        y = detune(x, SR, cents)
        for at in range(SR // 2, 10 * SR - SR // 2, SR // 2):
            window = np.abs(y[at - HOP: at + HOP])
            assert abs(int(np.argmax(window)) - HOP) < HOP // 8  # no drift: plain resampling
            # would be 1.8 % × 9.5 s ≈ 3800 samples late by the end
