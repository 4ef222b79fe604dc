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


def _music(seconds: float, rate: int, channels: int = 2) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.concatenate([_tone(rng.integers(40, 80), 0.25, rate) for _ in range(int(seconds * 4))])
    return np.stack([x * (0.5 + 0.5 * c) for c in range(channels)], axis=1)


class _CountingReads:
    """Counts the frames libsndfile hands back (sf.read goes through SoundFile.read too)."""

    def __init__(self, monkeypatch) -> None:
        self.frames = 0
        real = sf.SoundFile.read

        def read(f, *a, **k):
            out = real(f, *a, **k)
            self.frames += len(out)
            return out

        monkeypatch.setattr(sf.SoundFile, "read", read)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_load_audio_end_reads_only_the_end_of_the_part(tmp_path, monkeypatch, fmt) -> None:
    from model.audio import load_audio_end

    rate = 22050
    path = tmp_path / f"long.{fmt}"
    sf.write(path, _music(60, rate), rate)
    whole, _ = load_audio(path)
    counted = _CountingReads(monkeypatch)
    end = load_audio_end(path, 5.0)
    assert (end.sample_rate, end.part_start, end.part_frames) == (rate, 0, whole.shape[0])
    assert end.file_frames == whole.shape[0] and end.offset == whole.shape[0] - 5 * rate
    np.testing.assert_array_equal(end.audio, whole[end.offset:])
    if fmt != "mp3":  # MP3 is decoded in order (its seeks are not sample-exact), the rest seeks
        assert counted.frames == 5 * rate

    # --start/--duration's part: the end of 2.5 .. 32.5 s; a part shorter than asked is whole
    end = load_audio_end(path, 5.0, start_s=2.5, duration_s=30.0)
    a0, a1 = int(2.5 * rate), int(2.5 * rate) + 30 * rate
    assert (end.part_start, end.part_frames, end.offset) == (a0, a1 - a0, a1 - 5 * rate)
    np.testing.assert_array_equal(end.audio, whole[a1 - 5 * rate:a1])
    end = load_audio_end(path, lambda r: 100.0, start_s=50.0)  # seconds: a function of the rate
    np.testing.assert_array_equal(end.audio, whole[50 * rate:])
    assert end.offset == end.part_start == 50 * rate
    past = load_audio_end(path, 5.0, start_s=61.0)  # starts after the end: nothing
    assert past.part_frames == 0 and past.audio.shape == (0, 2)
    assert past.file_frames == whole.shape[0]


def test_load_audio_end_of_a_file_without_samples_is_empty_and_load_audio_refuses_it(
        tmp_path) -> None:
    from model.audio import load_audio_end

    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 22050)
    end = load_audio_end(tmp_path / "empty.wav", 21.0)
    assert end.file_frames == end.part_frames == 0 and end.audio.shape == (0, 1)
    with pytest.raises(AudioError) as e:
        load_audio(tmp_path / "empty.wav")
    assert e.value.reason == "empty"


def test_a_file_that_is_not_audio_is_said_to_be_so_without_the_decoders_noise(
        tmp_path, capfd) -> None:
    """libsndfile said "File does not exist or is not a regular file (possibly a pipe?)" of
    random bytes named .mp3, and its MP3 decoder printed "Note: Illegal Audio-MPEG-Header" notes
    on stderr beside it."""
    path = tmp_path / "random.mp3"
    path.write_bytes(np.random.default_rng(1).bytes(20000))
    (tmp_path / "text.wav").write_text("this is not audio\n" * 100)
    with pytest.raises(AudioError) as e:
        load_audio(path)
    assert e.value.reason == "unreadable"
    assert str(e.value) == f"cannot read audio {path}: not a readable audio file"
    with pytest.raises(AudioError, match="text.wav: not a readable audio file"):
        load_audio(tmp_path / "text.wav")
    cap = capfd.readouterr()
    assert cap.err == "" and cap.out == ""
