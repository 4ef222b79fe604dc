"""Tests of model.features: pitch, frame grid, streaming, librosa parity, bad input.

The resampler alone is tested in test_resample.py, audio files in test_audio.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import features as F
from model.errors import AudioError


def _tone(midi: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * 440.0 * 2 ** ((midi - 69) / 12) * t)).astype(np.float32)


def _noisy_music(rate: int, seconds: float, seed: int) -> np.ndarray:
    """Tones + noise with a stretch of digital silence (the hard case for the log)."""
    rng = np.random.default_rng(seed)
    x = _tone(57.3, seconds, rate, 0.3) + 0.05 * rng.standard_normal(int(seconds * rate))
    x[int(0.3 * rate):int(0.7 * rate)] = 0.0
    return x.astype(np.float32)


# --- pitch -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [22050, 44100, 8000, 96000, 91403])
def test_every_note_peaks_at_its_bin(rate: int) -> None:
    # All 48 notes in one signal, 0.5 s each; the frame in the middle of each must peak there.
    seg = 0.5
    x = np.concatenate([_tone(m, seg, rate) for m in range(36, 84)])
    frames = F.audio_to_frames(x, rate)
    mid = ((np.arange(48) + 0.5) * seg * F.FRAME_RATE).round().astype(int)
    assert list(frames[mid].argmax(axis=1)) == list(range(48))


def test_stereo_and_int16_input() -> None:
    rate = 44100
    x = np.concatenate([_tone(m, 0.5, rate) for m in range(36, 84, 5)])
    stereo = np.stack([x, np.zeros_like(x)], axis=1)  # downmix halves it: same log frames
    as_int16 = (x * 32767).astype(np.int16)
    ref = F.audio_to_frames(x, rate)
    np.testing.assert_allclose(F.audio_to_frames(stereo, rate), ref, atol=1e-5)
    # int16 is read as value / 32768 (its own quantisation noise shows in the quiet bins).
    np.testing.assert_allclose(F.audio_to_frames(as_int16, rate),
                               F.audio_to_frames(as_int16 / np.float32(32768), rate), atol=1e-5)
    mid = ((np.arange(len(range(36, 84, 5))) + 0.5) * 0.5 * F.FRAME_RATE).round().astype(int)
    assert list(ref[mid].argmax(axis=1) + F.MIDI_LO) == list(range(36, 84, 5))


def test_tone_magnitude_is_bin_gain_and_log_is_gain_invariant() -> None:
    for m in (36, 59, 83):
        raw = F.audio_to_frames(_tone(m, 1.0, 22050, amp=0.3), 22050, log=False)
        assert raw[10, m - 36] == pytest.approx(0.3 * F.BIN_GAIN[m - 36], rel=1e-2)
    # Exactly gain-invariant wherever the quieter copy's frame peak is above the log's floor.
    x = _noisy_music(22050, 2.0, seed=0)
    quiet = F.audio_to_frames(x * 0.01, 22050, log=False).max(axis=1) > F.LOG_FLOOR
    assert quiet.mean() > 0.7
    np.testing.assert_allclose(F.audio_to_frames(x * 0.01, 22050)[quiet],
                               F.audio_to_frames(x, 22050)[quiet], atol=1e-5)


# --- frame grid and look-ahead -----------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 1025, 22050])
def test_frame_count(n: int) -> None:
    frames = F.audio_to_frames(np.zeros(n, np.float32), 22050)
    assert frames.shape == (1 + n // F.HOP, F.N_BINS) and frames.dtype == np.float32


def test_frame_t_is_centred_on_sample_t_hop() -> None:
    x = np.zeros(40 * F.HOP, np.float32)
    x[17 * F.HOP] = 1.0  # a click: the frame centred on it has the most energy
    raw = F.audio_to_frames(x, 22050, log=False)
    assert int(np.linalg.norm(raw, axis=1).argmax()) == 17


def test_frames_are_emitted_after_exactly_the_lookahead() -> None:
    assert F.LOOKAHEAD_MS == pytest.approx(132.517, abs=1e-3)
    assert F.lookahead_ms(22050) == F.LOOKAHEAD_MS < F.lookahead_ms(8000) < 160.0
    s = F.StreamingCQT(22050)
    s.push(np.zeros(5 * F.HOP + F.HALF_WINDOW - 1, np.float32))
    assert s.frames_emitted == 5  # frame 5 still waits for one sample
    assert s.push(np.zeros(1, np.float32)).shape == (1, F.N_BINS)
    assert s.frames_emitted == 6


def test_a_frame_does_not_depend_on_audio_past_the_lookahead() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(30 * F.HOP).astype(np.float32)
    y = x.copy()
    cut = 10 * F.HOP + F.HALF_WINDOW  # frames 0..10 end before this sample
    y[cut:] = rng.standard_normal(y.size - cut)
    np.testing.assert_array_equal(F.audio_to_frames(x, 22050)[:11],
                                  F.audio_to_frames(y, 22050)[:11])


# --- streaming ---------------------------------------------------------------------------------

def _feed(stream: F.StreamingCQT, x: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, i = [], 0
    for n in sizes:
        out.append(stream.push(x[i:i + n]))
        i += n
    out.append(stream.push(x[i:]))
    out.append(stream.finish())
    return np.concatenate(out)


@settings(max_examples=30, deadline=None)
@given(rate=st.one_of(st.sampled_from([8000, 22050, 44100, 48000, 91403]),
                     st.integers(8000, 96000)), channels=st.sampled_from([1, 2]),
       sizes=st.lists(st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, 6000)),
                      max_size=40),
       seed=st.integers(0, 2**16))
def test_any_chunking_gives_the_whole_signal_frames(rate: int, channels: int, sizes: list[int],
                                                    seed: int) -> None:
    x = _noisy_music(rate, 1.2, seed)
    if channels == 2:
        x = np.stack([x, np.roll(x, 7)], axis=1)
    whole = F.audio_to_frames(x, rate)
    np.testing.assert_allclose(_feed(F.StreamingCQT(rate, channels), x, sizes), whole,
                               atol=1e-4)


def test_one_sample_chunks() -> None:
    x = _noisy_music(44100, 0.06, seed=1)
    s = F.StreamingCQT(44100)
    got = np.concatenate([s.push(x[i:i + 1]) for i in range(x.size)] + [s.finish()])
    np.testing.assert_allclose(got, F.audio_to_frames(x, 44100), atol=1e-4)


def test_push_keeps_only_the_needed_tail() -> None:
    s = F.StreamingCQT(48000)
    chunk = np.zeros(4800, np.float32)
    for _ in range(100):  # 10 s
        s.push(chunk)
    # At most one analysis window plus a hop and one chunk (resampled) is held.
    assert len(s._buf) <= F.WINDOW + F.HOP + 4800
    # The resampler holds back no more than its look-ahead.
    rs = s._rs
    assert rs.n_in / rs.rate - rs.n_out / F.SAMPLE_RATE <= rs.lookahead_s + 1e-9


def test_batched_windows_give_the_same_frames() -> None:
    # The worker may batch analysis windows of many streams into one cqt_magnitude call.
    x = _noisy_music(22050, 1.0, seed=2)
    padded = np.concatenate([np.zeros(F.HALF_WINDOW), x, np.zeros(F.HALF_WINDOW)])
    windows = torch.from_numpy(padded).unfold(0, F.WINDOW, F.HOP)
    want = F.audio_to_frames(x, 22050)
    got = F.log_normalize(F.cqt_magnitude(windows[None].repeat(3, 1, 1)))
    assert got.shape == (3, *want.shape)
    np.testing.assert_allclose(got[2].numpy(), want, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    x = _noisy_music(48000, 2.0, seed=4)
    np.testing.assert_allclose(F.audio_to_frames(x, 48000, device="cuda"),
                               F.audio_to_frames(x, 48000, device="cpu"), atol=1e-4)


def test_push_after_finish_is_an_error() -> None:
    s = F.StreamingCQT(22050)
    s.finish()
    with pytest.raises(RuntimeError):
        s.push(np.zeros(10, np.float32))


# --- librosa reference -------------------------------------------------------------------------

def test_frames_correlate_with_librosa_cqt(capsys: pytest.CaptureFixture[str]) -> None:
    librosa = pytest.importorskip("librosa")
    from model.fastrender import demo_piece
    from model.synth import midi_to_audio

    y = midi_to_audio(demo_piece(20.0, seed=4), sample_rate=22050)  # fluidsynth if installed
    ours = F.audio_to_frames(y, 22050)
    ref = np.abs(librosa.cqt(y, sr=22050, hop_length=1024, fmin=librosa.midi_to_hz(36),
                             n_bins=48)).T
    ref = F.log_normalize(ref)
    assert ref.shape == ours.shape
    live = (np.abs(ours).sum(1) > 0) & (np.abs(ref).sum(1) > 0)
    corr = np.array([np.corrcoef(a, b)[0, 1] for a, b in zip(ours[live], ref[live], strict=True)])
    with capsys.disabled():
        print(f"\n[librosa parity] mean per-frame correlation {corr.mean():.4f}, "
              f"min {corr.min():.4f} over {corr.size} frames")
    assert corr.mean() >= 0.95
    assert np.percentile(corr, 5) >= 0.85


# --- log_normalize -----------------------------------------------------------------------------

def test_log_normalize_numpy_and_torch_agree_and_keep_silence_zero() -> None:
    rng = np.random.default_rng(5)
    mag = np.abs(rng.standard_normal((20, 48))) * 10.0 ** rng.uniform(-9, 1, (20, 1))
    mag[3] = 0.0
    a = F.log_normalize(mag)
    b = F.log_normalize(torch.from_numpy(mag)).numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.dtype == np.float32 and np.isfinite(a).all()
    assert not a[3].any()
    norms = np.linalg.norm(np.delete(a, 3, axis=0), axis=1)
    np.testing.assert_allclose(norms[norms > 0], 1.0, atol=1e-5)


def test_log_normalize_floor_compresses_near_silence() -> None:
    frame = np.linspace(1.0, 1e-3, 48)[None]
    loud = F.log_normalize(frame * 10.0)
    np.testing.assert_allclose(F.log_normalize(frame * 100.0), loud, atol=1e-6)  # gain-free
    quiet = F.log_normalize(frame * 1e-5)  # under the floor: measured against it, fewer bins
    assert 0 < np.count_nonzero(quiet) < np.count_nonzero(loud)
    assert not F.log_normalize(frame * 1e-8).any()  # peak 100 dB under the floor: nothing left


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_audio_is_refused(bad: float) -> None:
    x = np.zeros(1000, np.float32)
    x[500] = bad
    with pytest.raises(AudioError) as e:
        F.audio_to_frames(x, 22050)
    assert e.value.reason == "not_finite"


@pytest.mark.parametrize("rate", [4000, 7999, 96001, 100_000, 44100.5, 0, -22050, "44100"])
def test_unsupported_rates_are_refused(rate: float) -> None:
    with pytest.raises(AudioError) as e:
        F.StreamingCQT(rate)
    assert e.value.reason == "unsupported_rate"


def test_wrong_layout_and_dtype_are_refused() -> None:
    with pytest.raises(AudioError) as e:
        F.StreamingCQT(22050, channels=1).push(np.zeros((100, 2), np.float32))
    assert e.value.reason == "bad_layout"
    with pytest.raises(AudioError) as e:
        F.StreamingCQT(22050, channels=2).push(np.zeros(100, np.float32))
    assert e.value.reason == "bad_layout"
    with pytest.raises(AudioError) as e:
        F.audio_to_frames(np.zeros(100, np.int32), 22050)
    assert e.value.reason == "bad_dtype"


def test_empty_and_silent_audio_give_zero_frames() -> None:
    assert not F.audio_to_frames(np.zeros(0, np.float32), 22050).any()
    silent = F.audio_to_frames(np.zeros((30000, 2), np.float32), 48000)
    assert silent.shape == (1 + 13781 // F.HOP, 48) and not silent.any()
    assert F.is_silent(np.zeros(100, np.float32)) and F.is_silent(np.zeros(0))
    rng = np.random.default_rng(0)
    assert F.is_silent(1e-4 * rng.standard_normal(1000))  # -80 dBFS
    assert not F.is_silent(0.1 * rng.standard_normal(1000))  # -20 dBFS
    assert not F.is_silent((0.1 * 32767 * rng.standard_normal(1000)).astype(np.int16))


def test_music_span_leaves_the_quiet_at_the_edges_out() -> None:
    from model.errors import AudioError
    from model.features import QUIET_BELOW_LOUDEST_DB, music_span

    sr = 8000
    t = np.arange(2 * sr) / sr
    music = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    pause = np.zeros(sr, np.float32)
    hiss = (np.random.default_rng(0).standard_normal(sr) * 1e-4).astype(np.float32)  # -80 dBFS
    x = np.concatenate([pause, music, pause, music, hiss])
    assert music_span(x, sr) == (sr, 6 * sr)  # the pause inside stays
    # relative to the loudest: a hum 35 dB under the music is edge, 25 dB under is music
    for below_db, edge in ((QUIET_BELOW_LOUDEST_DB + 5, True), (QUIET_BELOW_LOUDEST_DB - 5, False)):
        hum = (0.3 * 10 ** (-below_db / 20) * np.sin(2 * np.pi * 60 * t[:sr])).astype(np.float32)
        assert music_span(np.concatenate([hum, music]), sr)[0] == (sr if edge else 0)
    # stereo and int16 read as the same samples; all quiet is (0, 0)
    stereo = np.stack([x, x], axis=1)
    assert music_span(stereo, sr) == music_span((x * 32767).astype(np.int16), sr) == (sr, 6 * sr)
    # a click in the quiet is not the music's start or end (a 10 ms click 5 s before a chorale
    # took identify from confidence 1.0 to "not in the collection"); alone it is all there is
    click = pause.copy()
    click[sr // 2] = 0.9
    assert music_span(np.concatenate([click, pause, music, click]), sr) == (2 * sr, 4 * sr)
    lone = music_span(click, sr)
    assert lone[0] <= sr // 2 < lone[1] and lone[1] - lone[0] <= sr // 50
    assert music_span(np.zeros(sr, np.float32), sr) == (0, 0)
    assert music_span(hiss, sr) == (0, 0)
    assert music_span(np.zeros(0, np.float32), sr) == (0, 0)
    with pytest.raises(AudioError):
        music_span(x, 1000)  # unsupported rate
    with pytest.raises(AudioError):
        music_span(np.array([0.0, np.nan], np.float32), sr)
