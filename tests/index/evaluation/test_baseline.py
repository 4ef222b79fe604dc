from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.evaluation.baseline import ChromaMatcher, frames_to_chroma, frames_to_magnitude, rank_of
from model.fastrender import midi_to_frames_fast
from model.features import FRAME_RATE
from model.midi import load_notes
from tests.conftest import make_piece


def test_chroma_folds_octaves_onto_pitch_classes():
    frames = np.zeros((3, 48), np.float32)
    frames[0, [0, 12, 36]] = 1.0  # three Cs → pitch class 0 only
    frames[1, 7] = 3.0  # G (MIDI 43)
    frames[1, 7 + 24] = 4.0  # G two octaves up
    chroma = frames_to_chroma(frames)
    assert chroma.shape == (3, 12)
    np.testing.assert_allclose(chroma[0], np.eye(12)[0])
    np.testing.assert_allclose(chroma[1], np.eye(12)[7])
    assert not chroma[2].any()  # silence stays silent (distance 1 to everything)
    # folded in magnitude: a bin 40 dB under the peak (half the 80 dB log range) weighs 1 %
    frames = np.zeros((1, 48), np.float32)
    frames[0, 4] = 1.0  # E, the peak
    frames[0, 9] = 0.5  # A, 40 dB down
    np.testing.assert_allclose(frames_to_magnitude(frames)[0, [4, 9]], [1.0, 0.01], rtol=1e-5)
    chroma = frames_to_chroma(frames)[0]
    assert chroma[9] / chroma[4] == pytest.approx(0.01, rel=1e-4)
    with pytest.raises(ValueError):
        frames_to_chroma(np.zeros((3, 12)))


def test_rank_counts_ties_against_the_true_answer():
    assert rank_of(np.array([0.2, 0.1, 0.3]), 1) == 1
    assert rank_of(np.array([0.1, 0.1, 0.3]), 1) == 2
    assert rank_of(np.array([0.1, 0.1, 0.3]), 0) == 2
    assert rank_of(np.array([0.1, 0.2, 0.3]), 2) == 3


@pytest.fixture
def pieces(tmp_path: Path) -> list[Path]:
    paths = []
    for seed in range(4):
        p = tmp_path / f"p{seed}.mid"
        make_piece(seed + 20, duration_s=25.0, program=0).write(str(p))
        paths.append(p)
    return paths


def test_finds_the_piece_and_where_the_excerpt_ends(pieces):
    matcher = ChromaMatcher.build(pieces)
    assert len(matcher) == 4
    frames = midi_to_frames_fast(load_notes(pieces[2]))
    query = frames[150:300]
    top = matcher.search(query, top_n=4)
    assert [m.ref for m in top][0] == 2
    assert abs(top[0].end_s - 299 / FRAME_RATE) <= 2 / FRAME_RATE
    assert top[0].score < top[1].score
    scores, ends = matcher.scores(query)
    assert rank_of(scores, 2) == 1 and ends[2] == pytest.approx(299, abs=2)


def test_cache_is_reused_and_extended(pieces, tmp_path, monkeypatch):
    cache = tmp_path / "chroma.npz"
    first = ChromaMatcher.build(pieces[:3], cache)
    assert cache.is_file()

    def fail(*_a, **_k):
        raise AssertionError("rendered a cached reference again")

    monkeypatch.setattr("model.fastrender.midi_to_frames_fast", fail)
    again = ChromaMatcher.build(pieces[:3], cache)
    np.testing.assert_array_equal(again.chroma, first.chroma)
    np.testing.assert_array_equal(again.offsets, first.offsets)
    monkeypatch.undo()
    grown = ChromaMatcher.build(pieces, cache)  # one new file: computed and added
    assert len(grown) == 4
    np.testing.assert_array_equal(grown.chroma[: first.chroma.shape[0]], first.chroma)


def test_rejects_bad_layout():
    with pytest.raises(ValueError):
        ChromaMatcher(np.zeros((10, 12)), np.array([0, 5, 5, 10]))
    with pytest.raises(ValueError):
        ChromaMatcher(np.zeros((10, 12)), np.array([0, 11]))
