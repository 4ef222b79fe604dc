"""Tests of model.training.randsynth: random timbres that keep the notes' pitch and timing."""

from __future__ import annotations

import numpy as np
import pretty_midi
import pytest

from model.training import randsynth
from model.training import render as R
from model.training.randsynth import (
    MAX_PARTIALS,
    P_ENSEMBLE,
    P_PULSE,
    P_SPECTRAL_ENV,
    Timbre,
    _draw_motion,
    _note,
    draw_ensemble_timbre,
    draw_timbre,
    render_randsynth,
)

SR = 22050


def _piece(pitch: int = 69, start: float = 1.0, dur: float = 0.8, drum: bool = False
           ) -> pretty_midi.PrettyMIDI:
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(0, is_drum=drum)
    inst.notes = [pretty_midi.Note(100, pitch, start, start + dur)]
    pm.instruments.append(inst)
    return pm


def test_one_seed_one_sound_and_other_seeds_other_sounds() -> None:
    pm = _piece()
    a = render_randsynth(pm, 3, SR, 3 * SR)
    assert np.array_equal(a, render_randsynth(pm, 3, SR, 3 * SR))

    def partials(seed: int) -> np.ndarray:  # levels of partials 1-8 of the 440 Hz note
        spec = np.abs(np.fft.rfft(render_randsynth(pm, seed, SR, 3 * SR)))
        hz = np.fft.rfftfreq(3 * SR, 1 / SR)
        levels = np.array([spec[np.abs(hz - 440 * k) < 20].max() for k in range(1, 9)])
        return levels / levels.max()

    levels = [partials(s) for s in range(6)]
    # timbres differ: some partial is at least 10 % of the loudest apart for every two seeds
    assert min(np.abs(levels[i] - levels[j]).max() for i in range(6) for j in range(i)) > 0.1


@pytest.mark.parametrize("seed", range(12))
def test_every_timbre_sounds_the_notes_pitch_and_starts_on_time(seed: int) -> None:
    a = render_randsynth(_piece(pitch=57, start=1.0), seed, SR, 3 * SR).astype(np.float64)
    assert np.all(np.isfinite(a)) and np.abs(a).max() > 0
    assert np.abs(a[: SR - 1]).max() == 0.0  # nothing before the onset at 1.0 s
    # the sound has begun within one CQT hop (46 ms) of the onset
    window = np.abs(a[SR: SR + 1024])
    assert window.max() > 0.05 * np.abs(a).max()
    # every strong spectral peak is a partial of 220 Hz (small inharmonicity allowed)
    spec = np.abs(np.fft.rfft(a * np.hanning(a.size)))
    freqs = np.fft.rfftfreq(a.size, 1 / SR)
    strong = freqs[(spec > 0.3 * spec.max()) & (freqs > 50)]
    harmonic = strong / 220.0
    assert np.all(np.abs(harmonic - np.round(harmonic)) < 0.06 * np.round(harmonic))
    assert strong.max() < 0.45 * SR


def test_timbres_cover_weak_fundamentals_percussive_and_sustained_notes() -> None:
    rng = np.random.default_rng(0)
    draws = [draw_timbre(rng) for _ in range(300)]
    assert all(t.amps.shape == (MAX_PARTIALS,) and t.amps.max() == pytest.approx(1.0)
               for t in draws)
    assert sum(t.amps[0] < 0.5 for t in draws) > 30  # fundamental not the loudest partial
    assert sum(t.sustain == 0.0 for t in draws) > 60  # percussive
    assert sum(t.sustain > 0.5 for t in draws) > 60  # sustained
    assert sum(t.inharmonicity > 0 for t in draws) > 60


def test_drums_sound_and_the_registry_offers_it_for_training_only_as_other() -> None:
    assert np.abs(render_randsynth(_piece(pitch=36, drum=True), 0, SR, 2 * SR)).max() > 0
    assert np.abs(render_randsynth(_piece(pitch=42, drum=True), 0, SR, 2 * SR)).max() > 0
    assert R.available("randsynth") and R.role("randsynth") == "other"
    assert "randsynth" not in R.HELD_OUT_RENDERERS
    a = R.render(_piece(), "randsynth", seed=5)
    assert np.max(np.abs(a)) == pytest.approx(R.PEAK, rel=1e-5)
    assert not np.array_equal(a, R.render(_piece(), "randsynth", seed=6))


def _two_parts(low: int = 40, high: int = 76) -> pretty_midi.PrettyMIDI:
    """A low part and a high part, one note each at the same velocity, one after the other."""
    pm = pretty_midi.PrettyMIDI()
    for i, pitch in enumerate((low, high)):
        inst = pretty_midi.Instrument(0)
        inst.notes = [pretty_midi.Note(90, pitch, 0.2 + 1.2 * i, 1.2 + 1.2 * i)]
        pm.instruments.append(inst)
    return pm


def _partial_levels(a: np.ndarray, f0: float, start_s: float) -> np.ndarray:
    seg = a[int(start_s * SR): int((start_s + 0.8) * SR)].astype(np.float64)
    spec = np.abs(np.fft.rfft(seg * np.hanning(seg.size)))
    hz = np.fft.rfftfreq(seg.size, 1 / SR)
    levels = np.array([spec[np.abs(hz - f0 * k) < 8].max() for k in range(1, 7)])
    return levels / levels.max()


def test_ensemble_renders_play_every_part_with_one_bright_timbre_and_the_bass_up() -> None:
    """Half the seeds: one timbre for every part (same partial levels on the low and the high
    note), at flat dynamics with the low part at least as loud; the other half: a timbre per
    part, as before."""
    pm = _two_parts()
    ensemble, compared, per_part = 0, 0, 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        is_ensemble = rng.random() < P_ENSEMBLE  # the first two draws of render_randsynth
        steady = is_ensemble and (tb := draw_ensemble_timbre(rng)).detune_cents == 0 \
            and tb.partial_decay == 0  # (two detuned voices beat; plucks change as they ring)
        a = render_randsynth(pm, seed, SR, 3 * SR)
        low = _partial_levels(a, pretty_midi.note_number_to_hz(40), 0.3)
        high = _partial_levels(a, pretty_midi.note_number_to_hz(76), 1.5)
        same = np.abs(low - high).max() < 0.12
        if is_ensemble:
            ensemble += 1
            if steady:
                compared += 1
                assert same, (seed, low, high)
            rms = [np.sqrt(np.mean(a[int(s * SR): int((s + 0.8) * SR)] ** 2)) for s in (0.3, 1.5)]
            assert rms[0] > 0.8 * rms[1], (seed, rms)  # the bass not under the tune
        else:
            per_part += not same
    assert 10 <= ensemble <= 30 and compared >= 5  # P_ENSEMBLE = 0.5 of 40 seeds
    assert per_part >= 0.8 * (40 - ensemble)  # per-part timbres mostly differ


def test_ensemble_timbres_are_bright_and_half_of_them_hollow() -> None:
    rng = np.random.default_rng(1)
    draws = [draw_ensemble_timbre(rng) for _ in range(200)]
    assert all((t.amps > 0).sum() >= 8 and t.amps.max() == pytest.approx(1.0) for t in draws)
    # bright: the 5th partial at least a tenth of the loudest in most draws
    assert sum(t.amps[4] > 0.1 for t in draws) > 150
    hollow = sum(t.amps[1::2][:4].sum() < 0.5 * t.amps[0::2][:4].sum() for t in draws)
    assert 60 <= hollow <= 140


def _levels_at(a: np.ndarray, f0: float, start_s: float, length_s: float, n: int = 8
               ) -> np.ndarray:
    """Partials 1..n of ``f0`` in ``a[start_s : start_s + length_s]``, absolute levels."""
    seg = a[int(start_s * SR): int((start_s + length_s) * SR)].astype(np.float64)
    spec = np.abs(np.fft.rfft(seg * np.hanning(seg.size)))
    hz = np.fft.rfftfreq(seg.size, 1 / SR)
    return np.array([spec[np.abs(hz - f0 * k) < f0 / 3].max() for k in range(1, n + 1)])


def _steady(**moving) -> Timbre:
    """Eight equal partials, a sustained note, no detune: only the moving spectrum varies."""
    amps = np.zeros(MAX_PARTIALS)
    amps[:8] = 1.0
    return Timbre(amps=amps, inharmonicity=0.0, partial_decay=0.0, attack_s=0.002, decay_s=1.0,
                  sustain=1.0, release_s=0.05, detune_cents=0.0, **moving)


def test_a_moving_spectrum_starts_bright_darkens_and_is_darker_played_softly() -> None:
    f0 = 220.0
    still = _note(57, 127, 1.5, _steady(), SR)
    moving = _note(57, 127, 1.5, _steady(dark_per_partial=0.4, dark_s=0.05, soft_darker=1.0), SR)
    soft = _note(57, 40, 1.5, _steady(dark_per_partial=0.4, dark_s=0.05, soft_darker=1.0), SR)

    def brightness(a: np.ndarray, start_s: float) -> float:  # partials 5-8 over 1-4
        lv = _levels_at(a, f0, start_s, 0.2)
        return float(lv[4:].sum() / lv[:4].sum())

    # a fixed spectrum stays; the moving one loses its upper partials, towards exp(-0.4 (k-1))
    assert brightness(still, 1.0) == pytest.approx(brightness(still, 0.1), rel=0.05)
    assert brightness(moving, 1.0) < 0.5 * brightness(still, 1.0)
    late = _levels_at(moving, f0, 1.0, 0.4)
    assert late[5] / late[0] == pytest.approx(np.exp(-0.4 * 5), rel=0.25)
    # the onset is brighter than the sustain (the first 20 ms against 1 s later)
    early = _levels_at(moving, f0, 0.0, 0.02, n=4)
    later = _levels_at(moving, f0, 1.0, 0.02, n=4)
    assert early[3] / early[0] > 1.5 * later[3] / later[0]
    # soft playing: darker (depth 0.4 (1 + 1.0 (1 - 40 / 127)))
    assert brightness(soft, 1.0) < 0.7 * brightness(moving, 1.0)


def test_draws_cover_moving_spectra_and_pulse_waves_in_their_shares() -> None:
    rng = np.random.default_rng(4)
    draws = [draw_timbre(rng) for _ in range(400)]
    moving = [t for t in draws if t.dark_per_partial > 0]
    assert abs(len(moving) / 400 - P_SPECTRAL_ENV) < 0.08
    assert all(0.05 <= t.dark_per_partial <= 0.5 and 0.03 <= t.dark_s <= 1.0 for t in moving)
    ens = [draw_ensemble_timbre(rng) for _ in range(200)]
    assert 0.3 < np.mean([t.dark_per_partial > 0 for t in ens]) < 0.7
    # the pulse: partial k scaled by |sin(pi k d)| for the duty d drawn next
    pulses = 0
    for seed in range(200):
        amps = np.ones(MAX_PARTIALS)
        probe = np.random.default_rng(seed)
        if probe.random() < P_PULSE:
            pulses += 1
            d = probe.uniform(0.08, 0.5)
            _draw_motion(np.random.default_rng(seed), amps)
            assert np.allclose(amps, np.abs(np.sin(np.pi * np.arange(1, MAX_PARTIALS + 1) * d)))
        else:
            _draw_motion(np.random.default_rng(seed), amps)
            assert np.all(amps == 1.0)
    assert abs(pulses / 200 - P_PULSE) < 0.07


def test_an_overdriven_track_sounds_its_chords_sum_and_difference_tones(monkeypatch) -> None:
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(0)
    inst.notes = [pretty_midi.Note(100, p, 0.5, 2.5) for p in (57, 64)]  # A3 + E4: 220, 329.6 Hz
    pm.instruments.append(inst)

    def render(p_drive: float, seed: int) -> np.ndarray:
        monkeypatch.setattr(randsynth, "P_DRIVE", p_drive)
        return render_randsynth(pm, seed, SR, 3 * SR).astype(np.float64)

    def level(a: np.ndarray, hz: float) -> float:  # the strongest bin within 3 Hz, vs the peak
        seg = a[SR: 2 * SR] * np.hanning(SR)
        spec = np.abs(np.fft.rfft(seg))
        return float(spec[int(hz) - 3: int(hz) + 4].max() / spec.max())

    below = 329.63 - 220.0  # 109.6 Hz (and 2·220 − 329.6): not a partial of either note
    driven_seeds = 0
    for seed in range(8):
        plain, driven = render(0.0, seed), render(1.0, seed)
        assert np.abs(driven[: SR // 2 - 1]).max() == 0.0  # still silent before the onset
        if np.random.default_rng(seed).random() < P_ENSEMBLE:  # ensemble renders: never driven
            assert np.array_equal(plain, driven)
            continue
        driven_seeds += 1
        assert level(plain, below) < 1e-4 and level(driven, below) > 2e-3
    assert driven_seeds >= 4
    # the overdrive draws from its own generator: an undriven render is the same sound as before
    kinds = set()
    for seed in range(40):
        monkeypatch.setattr(randsynth, "P_DRIVE", 0.0)
        before = render_randsynth(pm, seed, SR, 3 * SR)
        monkeypatch.setattr(randsynth, "P_DRIVE", 0.25)
        drawn = (np.random.default_rng(seed).random() >= P_ENSEMBLE
                 and np.random.default_rng([seed, 1]).random() < 0.25)
        assert np.array_equal(before, render_randsynth(pm, seed, SR, 3 * SR)) != drawn, seed
        kinds.add(drawn)
    assert kinds == {True, False}  # both cases were checked
