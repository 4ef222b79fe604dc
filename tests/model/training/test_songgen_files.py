from __future__ import annotations

import os

import numpy as np
import pretty_midi
import pytest

from model.errors import MidimatchError
from model.training.songgen import generate_song
from model.training.songgen_files import generate_songs, generated_midi_files
from tests.model.training.test_songgen import SHORT, _notes


def test_generate_songs_writes_loadable_files_and_skips_existing(tmp_path) -> None:
    paths = generate_songs(tmp_path, 3, start_seed=5, workers=1, progress=False, duration_s=SHORT)
    assert [p.name for p in paths] == ["song_00005.mid", "song_00006.mid", "song_00007.mid"]
    for seed, path in zip(range(5, 8), paths, strict=True):
        loaded, made = pretty_midi.PrettyMIDI(str(path)), generate_song(seed, duration_s=SHORT)
        a = sorted((p, v, s, e) for *_, p, v, s, e in _notes(loaded))
        b = sorted((p, v, s, e) for *_, p, v, s, e in _notes(made))
        assert len(a) == len(b)
        assert np.abs(np.array(a) - np.array(b)).max() < 2e-3  # one tick at 480 tpq
        assert loaded.get_end_time() == pytest.approx(made.get_end_time(), abs=2e-3)
    stamps = [os.stat(p).st_mtime_ns for p in paths]
    again = generate_songs(tmp_path, 4, start_seed=5, workers=1, progress=False, duration_s=SHORT)
    assert [os.stat(p).st_mtime_ns for p in again[:3]] == stamps
    assert again[3].exists()
    assert generated_midi_files(tmp_path) == again
    assert not list((tmp_path / "generated").glob("*.tmp"))


def test_generate_songs_in_parallel(tmp_path) -> None:
    paths = generate_songs(tmp_path, 40, workers=2, progress=False, duration_s=SHORT)
    assert len(paths) == 40 and all(p.exists() for p in paths)
    one = pretty_midi.PrettyMIDI(str(paths[-1]))
    assert any(i.is_drum for i in one.instruments)


def test_generate_songs_refuses_a_folder_made_with_other_settings(tmp_path) -> None:
    generate_songs(tmp_path, 1, workers=1, progress=False, duration_s=SHORT)
    with pytest.raises(MidimatchError) as err:
        generate_songs(tmp_path, 1, workers=1, progress=False, duration_s=(60.0, 240.0))
    assert err.value.reason == "stale_cache"
