from __future__ import annotations

from pathlib import Path

import mido
import pretty_midi
import pytest

from model.training.corpus_convert import _finish_midi


def _midi_with_ticks(path: Path, ticks_per_beat: int, last_tick: int) -> None:
    mid = mido.MidiFile(ticks_per_beat=ticks_per_beat)
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=500_000, time=0))  # 120 BPM
    track.append(mido.Message("note_on", note=60, velocity=90, time=0))
    track.append(mido.Message("note_off", note=60, velocity=0, time=ticks_per_beat))
    track.append(mido.Message("note_on", note=64, velocity=90, time=last_tick - ticks_per_beat))
    track.append(mido.Message("note_off", note=64, velocity=0, time=ticks_per_beat // 3))
    mid.tracks.append(track)
    mid.save(str(path))


def test_huge_ticks_are_rescaled_keeping_times(tmp_path: Path) -> None:
    path = tmp_path / "long.mid"
    _midi_with_ticks(path, 10_080, 50_000_000)  # ~41 min at 120 BPM: past pretty_midi's guard
    with pytest.raises(ValueError):
        pretty_midi.PrettyMIDI(str(path))
    info = _finish_midi(path)
    assert info["rescaled"] and info["source_ticks_per_beat"] == 10_080
    assert info["ticks_per_beat"] < 960  # this long a piece needs fewer than the usual 960
    notes = pretty_midi.PrettyMIDI(str(path)).instruments[0].notes
    last_s = 50_000_000 / 10_080 * 0.5
    expected = [(0.0, 0.5), (last_s, last_s + 0.5 / 3)]
    assert mido.MidiFile(str(path)).length == pytest.approx(last_s + 0.5 / 3, abs=1e-2)
    for note, (start, end) in zip(notes, expected, strict=True):
        assert note.start == pytest.approx(start, abs=1e-3)
        assert note.end == pytest.approx(end, abs=1e-3)


def test_short_files_get_960_ticks_and_coarse_ones_are_kept(tmp_path: Path) -> None:
    fine, coarse = tmp_path / "fine.mid", tmp_path / "coarse.mid"
    _midi_with_ticks(fine, 10_080, 10_080 * 8)
    _midi_with_ticks(coarse, 480, 480 * 8)
    assert _finish_midi(fine)["ticks_per_beat"] == 960
    info = _finish_midi(coarse)
    assert not info["rescaled"] and info["ticks_per_beat"] == 480
    assert info["duration_s"] == pytest.approx(4.0 + 0.5 / 3, abs=1e-3)
