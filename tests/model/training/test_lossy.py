"""Lossy re-encoding: length, alignment, and compensation of the codec delay."""

from __future__ import annotations

import numpy as np
import pytest

from model.training import lossy as C
from tests.model.training.test_augment import HOP, SR, _tone


def _lag(ref: np.ndarray, y: np.ndarray) -> int:
    """Lag (samples) of y behind ref at the cross-correlation maximum."""
    n = 1 << int(np.ceil(np.log2(2 * len(ref))))
    cc = np.fft.irfft(np.fft.rfft(y, n) * np.conj(np.fft.rfft(ref, n)), n)
    k = int(np.argmax(cc))
    return k if k < n // 2 else k - n


def _codec_params():
    cases = [("mp3", 0.5, "VARIABLE"), ("mp3", 0.9, "CONSTANT"), ("ogg", 0.6, None),
             ("opus", 0.8, None)]
    return [pytest.param(*c, marks=pytest.mark.skipif(c[0] not in C.available_codecs(),
                                                      reason=f"{c[0]} not in this libsndfile"))
            for c in cases]


@pytest.mark.parametrize("codec,level,mode", _codec_params())
def test_lossy_keeps_length_and_alignment(codec, level, mode):
    t = np.arange(3 * SR) / SR
    # A gated tone: the gating makes the lag unambiguous (a steady tone repeats every period).
    x = (0.5 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 0.7 * t) > 0)).astype(np.float32)
    y = C.lossy(x, SR, codec, level=level, bitrate_mode=mode)
    assert y.shape == x.shape and y.dtype == np.float32
    assert abs(_lag(x, y)) <= HOP
    assert np.corrcoef(x, y)[0, 1] > 0.9
    r = C.lossy(x, SR, codec, np.random.default_rng(4))
    np.testing.assert_array_equal(r, C.lossy(x, SR, codec, np.random.default_rng(4)))


@pytest.mark.skipif("mp3" not in C.available_codecs(), reason="no mp3 in this libsndfile")
def test_codec_delay_is_measured_and_compensated():
    # Low-bitrate CBR MP3 is decoded 1105 samples late (more than a hop); lossy removes it.
    delay = C.codec_delay("mp3", SR, 0.9, "CONSTANT")
    assert delay > HOP
    x = np.zeros(SR, np.float32)
    x[SR // 3] = 0.9
    y = C.lossy(x, SR, "mp3", level=0.9, bitrate_mode="CONSTANT")
    assert abs(int(np.argmax(np.abs(y))) - SR // 3) <= 4


# --------------------------------------------------------------------------- validation


def test_bad_parameters_are_rejected():
    x = _tone(440.0, 0.1)
    with pytest.raises(ValueError, match="unknown codec"):
        C.lossy(x, SR, "aac")
