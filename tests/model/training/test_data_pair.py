"""Excerpts and single training pairs."""

from __future__ import annotations

import numpy as np
import pretty_midi
import pytest

from model.training.data_pair import excerpt, make_pair
from tests.conftest import make_piece


def test_excerpt_keeps_the_notes_inside_and_starts_at_zero() -> None:
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(0)
    inst.notes = [pretty_midi.Note(90, 60 + k, float(k), k + 1.5) for k in range(10)]
    inst.control_changes = [pretty_midi.ControlChange(64, 127, 1.0),
                            pretty_midi.ControlChange(64, 0, 4.5)]
    pm.instruments.append(inst)
    cut = excerpt(pm, 2.5, 3.0)  # onsets 3, 4, 5 are inside [2.5, 5.5)
    notes = cut.instruments[0].notes
    assert [n.pitch for n in notes] == [63, 64, 65]
    assert [n.start for n in notes] == pytest.approx([0.0, 1.0, 2.0])
    assert notes[-1].end == pytest.approx(2.5)  # clipped to the window's end
    ccs = [(c.value, round(c.time, 3)) for c in cut.instruments[0].control_changes]
    assert ccs == [(127, 0.0), (0, 1.5)]  # the pedal pressed before the cut still holds
    assert len(pm.instruments[0].notes) == 10  # not modified


def test_the_noisy_preset_adds_rooms_and_noise_to_the_same_draws() -> None:
    """train_noisy only raises the reverb and noise probabilities: with the same generator, a
    draw keeps every stage "train" gave it, and gains a room or noise about half the times it
    had none (gate in [0.5, 0.75))."""
    from model.training.augment import preset

    noisy, train = preset("train_noisy"), preset("train")
    assert (noisy.p_reverb, noisy.p_noise) == (0.75, 0.75)
    assert noisy.snr_db == train.snr_db and noisy.rt60_s == train.rt60_s
    pm = make_piece(7, duration_s=12.0)
    gained = {"room_reverb": 0, "noise": 0}
    for seed in range(24):
        got = {name: make_pair(pm, "sine", np.random.default_rng(seed), max_piece_s=8.0,
                               min_frames=20, augment_preset=name)
               for name in ("train", "train_noisy")}
        (a0, m0, i0), (a1, m1, i1) = got["train"], got["train_noisy"]
        assert i0["midi_aug"] == i1["midi_aug"] and i0["excerpt_start_s"] == i1["excerpt_start_s"]
        np.testing.assert_array_equal(m0, m1)  # the MIDI side is the same draw
        assert set(i0["audio_aug"]) <= set(i1["audio_aug"])
        # each stage draws from its own generator: the same stages give the same audio
        assert np.array_equal(a0, a1) == (i0["audio_aug"] == i1["audio_aug"])
        for stage in gained:
            gained[stage] += stage in i1["audio_aug"] and stage not in i0["audio_aug"]
    assert gained["room_reverb"] > 0 and gained["noise"] > 0
