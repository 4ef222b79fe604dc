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


def test_check_rate_takes_every_integer_rate_of_the_range() -> None:
    from model.audio import MAX_RATE, MIN_RATE, check_rate

    rates = np.arange(MIN_RATE, MAX_RATE + 1)
    assert [check_rate(int(r)) for r in rates] == rates.tolist()
    assert check_rate(np.int64(91403)) == 91403 and check_rate(44100.0) == 44100
    for bad in (MIN_RATE - 1, MAX_RATE + 1, 44100.5, True, "44100", None):
        with pytest.raises(AudioError, match="8000..96000") as e:
            check_rate(bad)
        assert e.value.reason == "unsupported_rate"


def test_load_audio_at_an_odd_rate(tmp_path) -> None:
    # 91,403 Hz: one of the rates the torchaudio resampler refused; read and framed now.
    from model.features import audio_to_frames

    x = _tone(57, 1.0, 91403)
    sf.write(tmp_path / "odd.wav", np.stack([x, x], axis=1), 91403)
    audio, rate = load_audio(tmp_path / "odd.wav")
    assert rate == 91403 and audio.shape == (x.size, 2)
    frames = audio_to_frames(audio, rate)
    assert frames.shape == (1 + round(x.size * 22050 / 91403) // 1024, 48)
    assert set(frames[3:-3].argmax(axis=1)) == {57 - 36}
