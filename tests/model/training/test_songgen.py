from __future__ import annotations

import itertools

import numpy as np
import pretty_midi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.errors import MidimatchError
from model.training.songgen import TEMPO_RANGE_BPM, _swing, generate_song

SHORT = (20.0, 40.0)  # keeps the tests fast; the structure is the same at any length


def _notes(pm: pretty_midi.PrettyMIDI) -> list[tuple]:
    return [
        (i.program, i.is_drum, n.pitch, n.velocity, n.start, n.end)
        for i in pm.instruments
        for n in i.notes
    ]


def _sections(pm: pretty_midi.PrettyMIDI) -> list[tuple[str, float, float]]:
    """(kind, start_s, end_s) from the ``section:`` text events."""
    marks = [(e.time, e.text.split(":", 1)[1]) for e in pm.text_events if e.text.startswith("sec")]
    ends = [t for t, _ in marks[1:]] + [pm.get_end_time()]
    return [(k, t, e) for (t, k), e in zip(marks, ends, strict=True)]


def _pitch_class_histogram(pm: pretty_midi.PrettyMIDI) -> np.ndarray:
    h = np.zeros(12)
    for inst in pm.instruments:
        if not inst.is_drum:
            for n in inst.notes:
                h[n.pitch % 12] += n.end - n.start
    return h / h.sum()


def test_same_seed_gives_the_same_song() -> None:
    a, b = generate_song(7, duration_s=SHORT), generate_song(7, duration_s=SHORT)
    assert _notes(a) == _notes(b)
    assert [(e.time, e.text) for e in a.text_events] == [(e.time, e.text) for e in b.text_events]
    assert a.get_tempo_changes()[1].tolist() == b.get_tempo_changes()[1].tolist()


def test_different_seeds_give_different_songs() -> None:
    songs = [generate_song(s, duration_s=SHORT) for s in range(30)]
    histograms = [_pitch_class_histogram(pm) for pm in songs]
    melodies = [
        tuple(round(n.start, 2) for n in pm.instruments[2].notes[:40])
        for pm in songs
        if pm.instruments[2].name == "melody"
    ]
    assert len(melodies) == 30
    for (a, b), (ma, mb) in zip(
        itertools.combinations(histograms, 2), itertools.combinations(melodies, 2), strict=True
    ):
        assert np.abs(a - b).sum() > 0.1  # measured minimum over these seeds: 0.59
        assert ma != mb
    # The seed reaches every choice, not only the notes.
    assert len({pm.text_events[0].text.split(":")[1] for pm in songs}) >= 5  # styles
    assert len({int(np.argmax(h)) for h in histograms}) >= 6  # tonal centres


@pytest.mark.parametrize("seed", range(0, 40, 3))
def test_song_is_valid_general_midi(seed: int) -> None:
    pm = generate_song(seed)
    end = pm.get_end_time()
    assert 60.0 <= end <= 240.0
    tempi = pm.get_tempo_changes()[1]
    assert len(tempi) == 1 and TEMPO_RANGE_BPM[0] <= tempi[0] <= TEMPO_RANGE_BPM[1]
    assert pm.time_signature_changes[0].numerator in (3, 4)
    assert 4 <= len(pm.instruments) <= 6
    drums = [i for i in pm.instruments if i.is_drum]
    assert len(drums) == 1 and len(drums[0].notes) > 20
    assert all(35 <= n.pitch <= 81 for n in drums[0].notes)  # the GM percussion map
    for inst in pm.instruments:
        assert 0 <= inst.program <= 127
        assert inst.notes, inst.name
        for n in inst.notes:
            assert 0 <= n.pitch <= 127 and 1 <= n.velocity <= 127
            assert 0.0 <= n.start < n.end <= end + 1e-9
        if not inst.is_drum:
            assert all(24 <= n.pitch <= 96 for n in inst.notes), inst.name


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), duration=st.floats(30.0, 300.0))
def test_fixed_duration_is_exact_and_notes_stay_inside(seed: int, duration: float) -> None:
    pm = generate_song(seed, duration_s=duration)
    assert pm.get_end_time() == pytest.approx(duration, abs=1e-6)
    starts = np.array([n.start for i in pm.instruments for n in i.notes])
    ends = np.array([n.end for i in pm.instruments for n in i.notes])
    assert starts.min() >= 0.0 and ends.max() <= duration + 1e-9
    assert TEMPO_RANGE_BPM[0] <= pm.get_tempo_changes()[1][0] <= TEMPO_RANGE_BPM[1]


def test_duration_range_is_respected() -> None:
    ends = [generate_song(s, duration_s=(45.0, 50.0)).get_end_time() for s in range(10)]
    assert all(45.0 <= e <= 50.0 for e in ends)
    assert len({round(e, 3) for e in ends}) > 5


def test_bad_duration_is_refused() -> None:
    with pytest.raises(MidimatchError) as err:
        generate_song(0, duration_s=(50.0, 40.0))
    assert err.value.reason == "bad_argument"


def test_drum_only_sections_hold_no_pitched_notes() -> None:
    found = 0
    for seed in range(30):
        pm = generate_song(seed, duration_s=SHORT)
        for kind, t0, t1 in _sections(pm):
            if kind.endswith("-drums"):
                found += 1
                # 50 ms margins: human timing may pull the next section's first note earlier
                pitched = [
                    n
                    for i in pm.instruments
                    if not i.is_drum
                    for n in i.notes
                    if t0 + 0.05 < n.start < t1 - 0.05 or n.start < t0 < n.end - 0.05
                ]
                drums = [
                    n for i in pm.instruments if i.is_drum for n in i.notes if t0 <= n.start < t1
                ]
                assert not pitched, (seed, kind)
                assert drums, (seed, kind)
    assert found >= 5  # the pitfall the matcher must survive is really in the data


def test_sections_repeat_their_melody() -> None:
    checked = 0
    for seed in range(20):
        pm = generate_song(seed)
        choruses = [(t0, t1) for kind, t0, t1 in _sections(pm) if kind == "chorus"]
        melody = next(i for i in pm.instruments if i.name == "melody")
        if len(choruses) < 2 or choruses[0][1] - choruses[0][0] != pytest.approx(
            choruses[1][1] - choruses[1][0]
        ):
            continue

        def rel(t0: float, t1: float, m: pretty_midi.Instrument = melody) -> list[tuple]:
            return [(n.start - t0, n.pitch) for n in m.notes if t0 <= n.start < t1]

        a, b = rel(*choruses[0]), rel(*choruses[1])
        # 50 ms: human timing moves each note a little, differently on each repeat
        same = sum(any(abs(ta - tb) < 0.05 and pa == pb for tb, pb in b) for ta, pa in a)
        assert same >= 0.8 * max(len(a), len(b)), seed
        checked += 1
    assert checked >= 5


def test_swing_delays_the_off_beat_only() -> None:
    beats = np.array([0.0, 0.5, 1.0, 1.25, 2.75])
    np.testing.assert_allclose(_swing(beats, 0.6), [0.0, 0.6, 1.0, 1.3, 2.8])
    np.testing.assert_array_equal(_swing(beats, 0.5), beats)
