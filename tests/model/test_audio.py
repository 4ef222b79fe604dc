"""Tests of model.audio: audio files read or refused with a typed error."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from model.audio import load_audio
from model.errors import AudioError


def _tone(midi: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * 440.0 * 2 ** ((midi - 69) / 12) * t)).astype(np.float32)


def test_load_audio(tmp_path) -> None:
    x = np.stack([_tone(60, 0.5, 44100), _tone(64, 0.5, 44100)], axis=1)
    sf.write(tmp_path / "ok.flac", x, 44100)
    audio, rate = load_audio(tmp_path / "ok.flac")
    assert rate == 44100 and audio.shape == x.shape and audio.dtype == np.float32
    np.testing.assert_allclose(audio, x, atol=1e-4)

    cases = {"missing.wav": "unreadable", "junk.wav": "unreadable", "empty.wav": "empty",
             "slow.wav": "unsupported_rate", "nan.wav": "not_finite"}
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wave file")
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 22050)
    sf.write(tmp_path / "slow.wav", x[:100], 4000)
    sf.write(tmp_path / "nan.wav", np.full((100, 1), np.nan, np.float32), 22050, subtype="FLOAT")
    for name, reason in cases.items():
        with pytest.raises(AudioError) as e:
            load_audio(tmp_path / name)
        assert e.value.reason == reason, name
