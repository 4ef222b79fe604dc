"""Pieces, splits by content, and the files training uses."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from model.training.data_pieces import (
    SPLITS,
    drop_pieces_of,
    piece_id,
    piece_key,
    split_of,
    training_files,
)
from tests.conftest import make_piece


def test_split_is_by_content_and_follows_the_fractions(tmp_path: Path) -> None:
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    counts = {s: sum(split_of(k) == s for k in keys) / len(keys) for s in SPLITS}
    assert counts["train"] == pytest.approx(0.8, abs=0.03)
    assert counts["valid"] == pytest.approx(0.1, abs=0.02)
    assert {split_of(k, (1, 0, 0)) for k in keys} == {"train"}
    assert {split_of(k, (0, 0, 1)) for k in keys} == {"test"}
    assert [split_of(k) for k in keys] == [split_of(k) for k in keys]
    a, b = tmp_path / "a.mid", tmp_path / "b.mid"
    make_piece(1).write(str(a))
    shutil.copy(a, b)
    assert piece_key(a) == piece_key(b)  # a copy is the same piece, hence the same split
    assert 0 <= piece_id(piece_key(a)) < 2**63


def test_training_files_take_the_first_generated_songs_in_seed_order(tmp_path):
    from model.training.songgen_files import generate_songs

    songs = generate_songs(tmp_path, 3, workers=1, progress=False, duration_s=20.0)
    assert training_files(tmp_path, generated=2) == songs[:2]  # no music21 works converted
    assert training_files(tmp_path, works=0, generated=5) == songs


def test_training_files_take_a_seed_range_outside_evaluations(tmp_path):
    from model.errors import MidimatchError
    from model.training.songgen_files import TRAINING_ONLY_SEED, generate_songs

    low = generate_songs(tmp_path, 2, workers=1, progress=False, duration_s=20.0)
    high = generate_songs(tmp_path, 3, start_seed=TRAINING_ONLY_SEED, workers=1, progress=False,
                          duration_s=20.0)
    assert training_files(tmp_path, generated=250) == low  # seeds 0..249: the old two
    assert training_files(tmp_path, generated=2, generated_start=TRAINING_ONLY_SEED) == high[:2]
    assert training_files(tmp_path, generated=9, generated_start=TRAINING_ONLY_SEED + 1) == high[1:]
    for start, n in ((0, 251), (200, 100), (TRAINING_ONLY_SEED - 1, 2), (2000, 10)):
        with pytest.raises(MidimatchError, match="evaluation") as e:
            training_files(tmp_path, generated=n, generated_start=start)
        assert e.value.reason == "bad_range"
    assert training_files(tmp_path, generated=0, generated_start=500) == []  # nothing asked
    # seed order, not name order: song_100000.mid sorts before song_10001.mid by name
    far = generate_songs(tmp_path, 1, start_seed=100_000, workers=1, progress=False,
                         duration_s=20.0)
    assert training_files(tmp_path, generated=200_000, generated_start=TRAINING_ONLY_SEED) == [
        *high, *far]


def test_count_generated_counts_the_cache_s_songs_only(tmp_path):
    from model.training.data_pieces import count_generated

    root = tmp_path / "generated" / "corpus"  # a folder named "generated" above the cache
    files = [root / "music21" / "a.mid", root / "generated" / "song_00001.mid",
             root / "generated" / "sub" / "b.mid"]
    assert count_generated(files, root) == 1


def test_drop_pieces_of_leaves_out_the_other_folder_s_tunes(tmp_path):
    """A training-only folder of works may hold an evaluation tune under another name (the
    corpus repeats tunes across collections): those are left out of training, by notes, or by
    bytes where a record has no fingerprint; generated songs pass through, in order."""
    import json

    from model.errors import MidimatchError
    from model.training.corpus import convert_music21_corpus
    from model.training.songgen_files import generate_songs

    tune = "X:1\nT:{}\nM:4/4\nL:1/4\nK:G\n{}|]\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "eval.abc").write_text(tune.format("measured", "GABc|d2B2|cABG|G4"))
    (tmp_path / "b" / "same.abc").write_text(tune.format("other name", "GABc|d2B2|cABG|G4"))
    (tmp_path / "b" / "new.abc").write_text(tune.format("new", "cBAG|F2E2|DEFG|c4"))
    (tmp_path / "b" / "zz.abc").write_text(tune.format("also new", "DEFG|A2B2|cBAG|D4"))
    evaluation = tmp_path / "eval"
    convert_music21_corpus(evaluation, sources=[tmp_path / "a" / "eval.abc"], workers=1,
                           progress=False)
    extra = tmp_path / "extra"
    convert_music21_corpus(extra, sources=sorted((tmp_path / "b").glob("*.abc")), workers=1,
                           progress=False)
    songs = generate_songs(extra, 1, start_seed=10_000, workers=1, progress=False,
                           duration_s=20.0)
    files = training_files(extra, generated=1, generated_start=10_000)
    assert len(files) == 4 and files[-1] == songs[0]
    kept, dropped = drop_pieces_of(files, extra, evaluation)
    assert dropped == 1 and kept == [f for f in files if "same" not in f.name]
    # spelt another way (relative, through a symlink), the same folder
    (tmp_path / "link").symlink_to(extra)
    assert drop_pieces_of(files, tmp_path / "link", evaluation) == (kept, 1)

    # an older manifest without fingerprints: the same bytes still count (the converter
    # writes no title, so the same notes make the same file here)
    manifest = evaluation / "music21" / "manifest.jsonl"
    rec = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "fingerprint"}
    manifest.write_text(json.dumps(rec) + "\n")
    assert drop_pieces_of(files, extra, evaluation) == (kept, 1)
    shutil.copy(songs[0], evaluation / "music21" / "other.mid")  # bytes no work of extra has
    manifest.write_text(json.dumps({**rec, "midi": "other.mid"}) + "\n")
    assert drop_pieces_of(files, extra, evaluation) == (files, 0)

    with pytest.raises(MidimatchError, match="holds no converted works") as e:
        drop_pieces_of(files, extra, tmp_path / "nothing")
    assert e.value.reason == "no_data"
    with pytest.raises(MidimatchError, match="its own works"):
        drop_pieces_of(files, extra, tmp_path / "link")
