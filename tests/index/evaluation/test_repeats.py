"""Repeat detection from the MIDI: same notes at two places, or not."""

from __future__ import annotations

import numpy as np
import pretty_midi
import pytest

from index.evaluation.repeats import (
    REPEAT_SIMILARITY,
    is_repeat,
    reference_similarity,
    span_similarity,
)


def _phrase(rng, start, n=24):
    t = start + np.sort(rng.uniform(0, 8, n))
    return t, rng.integers(48, 84, n)


def test_a_repeated_section_is_the_same_music_and_other_music_is_not():
    rng = np.random.default_rng(0)
    a_t, a_p = _phrase(rng, 0.0)
    b_t, b_p = _phrase(rng, 8.0)  # other music in 8..16 s
    onset = np.concatenate([a_t, b_t, a_t + 16.0])  # A B A
    key = np.concatenate([a_p, b_p, a_p])
    assert span_similarity(onset, key, 0.0, 16.0, 8.0) == pytest.approx(1.0)
    assert span_similarity(onset, key, 0.0, 8.0, 8.0) < 0.3
    assert is_repeat(span_similarity(onset, key, 0.0, 16.0, 8.0))
    assert not is_repeat(span_similarity(onset, key, 0.0, 8.0, 8.0))


def test_timing_jitter_within_a_grid_step_still_matches_but_a_shift_does_not():
    rng = np.random.default_rng(1)
    t, p = _phrase(rng, 0.0)
    onset = np.concatenate([t, 20.0 + t + rng.uniform(-0.02, 0.02, t.size)])
    key = np.concatenate([p, p])
    assert span_similarity(onset, key, 0.0, 20.0, 8.0) > REPEAT_SIMILARITY
    # a found position 0.3 s off (a hash step and a bit) is slid into place...
    assert span_similarity(onset, key, 0.0, 20.3, 8.0) > REPEAT_SIMILARITY
    assert span_similarity(onset, key, 0.0, 20.3, 8.0, max_shift_s=0.0) < REPEAT_SIMILARITY
    # ...but a second off is beyond the slide: mostly different onsets
    assert span_similarity(onset, key, 0.0, 21.0, 8.0) < REPEAT_SIMILARITY


def test_silence_and_other_pitches_are_not_repeats():
    t = np.arange(0.0, 8.0, 0.5)
    onset = np.concatenate([t, t + 10.0])
    key = np.concatenate([np.full(t.size, 60), np.full(t.size, 62)])  # same rhythm, other pitch
    assert span_similarity(onset, key, 0.0, 10.0, 8.0) == 0.0
    assert span_similarity(onset, key, 0.0, 30.0, 8.0) == 0.0  # the second window is silent


def test_reference_similarity_reads_the_midi_and_keeps_drums_apart(tmp_path):
    pm = pretty_midi.PrettyMIDI()
    piano, drums = pretty_midi.Instrument(0), pretty_midi.Instrument(0, is_drum=True)
    for rep in (0.0, 10.0):  # the same 5 s of piano twice
        piano.notes += [pretty_midi.Note(90, 60 + i, rep + i * 0.5, rep + i * 0.5 + 0.4)
                        for i in range(10)]
    # 20..25 s: drums on the same note numbers and times as the piano: not the same music
    drums.notes += [pretty_midi.Note(90, 60 + i, 20 + i * 0.5, 20 + i * 0.5 + 0.1)
                    for i in range(10)]
    pm.instruments += [piano, drums]
    path = tmp_path / "ab.mid"
    pm.write(str(path))
    # windows of 5 s ending at 5 s (true) and at 15 s (found): the repeat
    assert reference_similarity(str(path), 5.0, 15.0, 5.0) == pytest.approx(1.0)
    assert reference_similarity(str(path), 5.0, 25.0, 5.0) == 0.0
