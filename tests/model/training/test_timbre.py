"""Timbre randomisation: each transform changes the sound and keeps the notes and the timing."""

from __future__ import annotations

import numpy as np
import pretty_midi
import pytest

from model.training import data_pair
from model.training import timbre as T
from model.training.augment import augment_audio, preset
from model.training.augment_midi import augment_midi
from model.training.lossy import AugmentInputError

SR = 22050


def piece(drums: bool = True) -> pretty_midi.PrettyMIDI:
    pm = pretty_midi.PrettyMIDI(initial_tempo=120.0)
    for program, pitch in ((0, 60), (40, 67), (33, 43)):
        inst = pretty_midi.Instrument(program)
        inst.notes = [pretty_midi.Note(40 + 10 * k, pitch + k % 3, 0.5 * k, 0.5 * k + 0.4)
                      for k in range(8)]
        pm.instruments.append(inst)
    if drums:
        kit = pretty_midi.Instrument(0, is_drum=True)
        kit.notes = [pretty_midi.Note(100, 36, 0.5 * k, 0.5 * k + 0.1) for k in range(8)]
        pm.instruments.append(kit)
    return pm


def times(pm: pretty_midi.PrettyMIDI) -> list[tuple[float, float, int]]:
    return sorted((n.start, n.end, n.pitch) for i in pm.instruments for n in i.notes)


def click(n: int = SR, at: int = SR // 2) -> np.ndarray:
    x = np.zeros(n, np.float32)
    x[at] = 1.0
    return x


def test_velocity_curve_changes_loudness_not_notes():
    pm = piece()
    soft, same = T.velocity_curve(pm, 2.0), T.velocity_curve(pm, 1.0)
    assert times(soft) == times(pm)
    v = [n.velocity for i in pm.instruments for n in i.notes]
    assert [n.velocity for i in same.instruments for n in i.notes] == v
    assert all(a <= b for a, b in zip([n.velocity for i in soft.instruments for n in i.notes], v,
                                      strict=True))
    with pytest.raises(AugmentInputError):
        T.velocity_curve(pm, 0.0)


def test_balance_scales_each_instrument_as_a_whole_and_drums_can_go():
    pm = piece()
    out = T.balance_tracks(pm, np.random.default_rng(1), db=(-12.0, -6.0))
    assert times(out) == times(pm)
    for a, b in zip(pm.instruments, out.instruments, strict=True):
        ratios = {round(m.velocity / n.velocity, 1) for n, m in zip(a.notes, b.notes,
                                                                     strict=True)}
        assert max(ratios) <= 0.55 and len(ratios) <= 3  # one level per track (rounding aside)
    assert not any(i.is_drum for i in T.without_drums(pm).instruments)
    drums_only = pretty_midi.PrettyMIDI()
    drums_only.instruments = [piece().instruments[-1]]
    assert len(T.without_drums(drums_only).instruments) == 1  # nothing pitched: left as is


def test_audio_transforms_keep_every_onset_in_place():
    rng = np.random.default_rng(0)
    x = click()
    for name, y in (("tilt", T.tilt(x, SR, 6.0)),
                    ("resonances", T.resonances(x, SR, rng)[0]),
                    ("vibrato", T.vibrato(x, SR, 6.0, 30.0)),
                    ("chorus", T.chorus(x, SR, rng)[0]),
                    ("drive", T.drive(x, SR, 20.0, 0.3))):
        assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all(), name
        # within 2 ms of the click (one CQT hop is 46 ms)
        assert abs(int(np.argmax(np.abs(y))) - SR // 2) <= 0.002 * SR, name


def test_tilt_moves_energy_between_low_and_high():
    t = np.arange(SR) / SR
    x = (0.3 * np.sin(2 * np.pi * 200 * t) + 0.3 * np.sin(2 * np.pi * 4000 * t)).astype(np.float32)

    def ratio(y):
        spec = np.abs(np.fft.rfft(y))
        return spec[4000] / spec[200]

    assert ratio(T.tilt(x, SR, 4.0)) > 5 * ratio(x) > 25 * ratio(T.tilt(x, SR, -4.0))


def test_compression_narrows_the_dynamics():
    t = np.arange(2 * SR) / SR
    x = (np.sin(2 * np.pi * 440 * t) * np.where(t < 1.0, 0.9, 0.03)).astype(np.float32)
    y = T.compress(x, SR, ratio=6.0, threshold_db=-20.0)
    loud, quiet = np.abs(y[SR // 4:SR // 2]).max(), np.abs(y[5 * SR // 4:3 * SR // 2]).max()
    assert loud / quiet < 0.5 * (0.9 / 0.03)  # the 30 dB gap shrinks by more than 6 dB
    assert quiet == pytest.approx(0.03, rel=0.05)  # under the threshold: untouched


def test_vibrato_wobbles_the_pitch_by_its_depth():
    t = np.arange(2 * SR) / SR
    x = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    y = T.vibrato(x, SR, 5.0, 30.0)
    phase = np.unwrap(np.angle(__import__("scipy").signal.hilbert(y)))
    freq = np.diff(phase) * SR / (2 * np.pi)
    cents = 1200 * np.log2(freq[SR // 2:-SR // 2] / 440.0)
    assert 20.0 < cents.max() < 40.0 and -40.0 < cents.min() < -20.0


def test_drive_adds_harmonics_and_intermodulation_and_keeps_the_peak():
    t = np.arange(SR) / SR  # 1 s: FFT bin k is k Hz
    x = (0.4 * np.sin(2 * np.pi * 440 * t) + 0.4 * np.sin(2 * np.pi * 550 * t)).astype(np.float32)

    def level(y, hz):  # relative to the 440 Hz partial
        spec = np.abs(np.fft.rfft(y))
        return spec[hz] / spec[440]

    clean, hard = x, T.drive(x, SR, 24.0)
    for y in (hard, T.drive(x, SR, 24.0, 0.4)):
        assert y.dtype == np.float32 and y.shape == x.shape
        assert np.abs(y).max() == pytest.approx(np.abs(x).max(), rel=1e-5)
    # third-order sum and difference tones (2·440 − 550 = 330 Hz) and the third harmonic
    assert level(clean, 330) < 1e-4 and level(hard, 330) > 0.2 and level(hard, 1320) > 0.1
    assert level(T.drive(x, SR, 0.0), 330) < level(hard, 330) / 3  # a light touch clips less
    # at a moderate drive, second order (550 − 440 = 110 Hz, 2·440 = 880 Hz) comes from the
    # asymmetric curve (hard clipping makes them as high-order products too)
    odd, even = T.drive(x, SR, 6.0), T.drive(x, SR, 6.0, 0.4)
    assert level(odd, 110) < 0.01 < 0.1 < level(even, 110)
    assert level(odd, 880) < 0.01 < 0.03 < level(even, 880)
    # the asymmetric curve's DC (it follows the notes' envelope) is taken out
    for bias in (0.2, 0.5, 1.0):
        y = T.drive(x, SR, 30.0, bias).astype(np.float64)
        assert abs(y[SR // 4: 3 * SR // 4].mean()) < 0.01 * np.abs(y).max()
    assert not T.drive(np.zeros(100, np.float32), SR, 20.0).any()
    with pytest.raises(AugmentInputError):
        T.drive(x, SR, 50.0)
    with pytest.raises(AugmentInputError):
        T.drive(x, SR, 10.0, -0.1)


def test_render_mixed_gives_instruments_their_own_renderers():
    calls = []

    def fake(sub, name):  # the length of a render depends on the sub-piece, like a real one
        calls.append((name, len(sub.instruments)))
        return np.full(int((sub.get_end_time() + 0.5) * SR), 0.1 if name == "a" else 0.2,
                       np.float32)

    pm = piece()
    audio, assignment = T.render_mixed(pm, ["a", "b"], np.random.default_rng(3), fake)
    assert set(assignment.values()) == {"a", "b"} and len(assignment) == 4
    assert sorted(n for n, _ in calls) == ["a", "b"] and sum(k for _, k in calls) == 4
    assert audio.shape == (int((pm.get_end_time() + 0.5) * SR),)
    with pytest.raises(AugmentInputError):
        T.render_mixed(pm, [], np.random.default_rng(0), fake)


def test_the_timbre_preset_draws_its_stages_and_the_others_never_do():
    x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(2 * SR) / SR)).astype(np.float32)
    stages = {"tilt", "resonances", "compress", "vibrato", "chorus", "drive"}
    seen: set[str] = set()
    for seed in range(20):
        _, applied = augment_audio(x, SR, np.random.default_rng(seed), preset("timbre"))
        seen |= set(applied) & stages
        _, plain = augment_audio(x, SR, np.random.default_rng(seed), preset("train_noisy"))
        assert not set(plain) & stages
        _, midi = augment_midi(piece(), np.random.default_rng(seed), preset("timbre"))
        seen |= set(midi)
    assert stages | {"velocity_curve", "balance"} <= seen


def test_a_mixed_pair_keeps_its_midi_side_to_what_was_played(monkeypatch):
    rendered = []

    def fake_render(pm, name, **kw):  # sine tones for both "renderers", so the test runs anywhere
        rendered.append((name, [i.is_drum for i in pm.instruments]))
        audio = pm.synthesize(fs=SR).astype(np.float32) if any(
            not i.is_drum for i in pm.instruments) else np.zeros(SR, np.float32)
        return audio / (np.abs(audio).max() or 1.0) * 0.5

    monkeypatch.setattr(data_pair, "render", fake_render)
    for seed in range(20):
        rendered.clear()
        a, m, info = data_pair.make_pair(piece(drums=False), "sine", np.random.default_rng(seed),
                                         augment_preset="timbre", min_frames=10,
                                         mix_pool=["fluid-fluidr3"])
        if "mixed_render" in info["midi_aug"]:
            assert {n for n, _ in rendered} == {"sine", "fluid-fluidr3"}
            assert a.shape == m.shape and a.shape[1] == 48
            return
    pytest.fail("p_mix 0.5 never mixed in 20 draws")
