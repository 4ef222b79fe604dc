"""Tests of model.training.data: prepare's shards, aligned pairs, splits by piece, resumption."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from model.training import data as D
from model.training.data_pieces import SPLITS, piece_id, piece_key, split_of
from model.training.pairs import PairData
from model.training.render import HELD_OUT, available
from tests.conftest import make_piece

SPLIT = (0.5, 0.25, 0.25)


def _write_collection(folder: Path, n: int = 4) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        path = folder / f"piece{i}.mid"
        pm = make_piece(100 + i, duration_s=12.0 + 2 * i, program=[0, 24, 40, 73][i % 4])
        pm.write(str(path))
        files.append(path)
    shutil.copy(files[0], folder / "copy_of_0.mid")  # the same piece under another name
    (folder / "broken.mid").write_bytes(b"MThd but not really a MIDI file")
    return [*files, folder / "copy_of_0.mid", folder / "broken.mid"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], dict]:
    root = tmp_path_factory.mktemp("prepare")
    files = _write_collection(root / "midi")
    report = D.prepare(root / "out", files, renderers=("sine",), heldout="sine", workers=0,
                       split=SPLIT, max_piece_s=10.0, progress=False, pieces_per_shard=2)
    return root / "out", files, report


def _zc(x: np.ndarray) -> np.ndarray:
    """Frames centred per bin over the pair, then unit norm: correlation, not level."""
    x = x.astype(np.float64) - x.mean(axis=0, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-9)


def _corr(a: np.ndarray, m: np.ndarray, shift: int = 0) -> float:
    n = min(len(a), len(m)) - abs(shift)
    a, m = _zc(a), _zc(m)
    a, m = (a[shift:shift + n], m[:n]) if shift >= 0 else (a[:n], m[-shift:-shift + n])
    return float(np.mean(np.sum(a * m, axis=1)))


def test_prepare_writes_aligned_pairs_split_by_piece(prepared: tuple[Path, list, dict]) -> None:
    out, files, report = prepared
    keys = {piece_key(f): f for f in files[:4]}
    manifest = json.loads((out / D.MANIFEST).read_text())["shards"]
    owners: dict[int, set[str]] = {}
    for split in SPLITS:
        if not report["splits"][split]["pairs"]:
            continue
        data = PairData.load(out, split)
        assert len(data) == report["splits"][split]["pairs"]
        for pid in np.unique(data.piece):
            owners.setdefault(int(pid), set()).add(split)
        for p in range(len(data)):
            a = data.audio[data.offsets[p]:data.offsets[p + 1]]
            m = data.midi[data.offsets[p]:data.offsets[p + 1]]
            assert a.shape == m.shape and len(a) >= 100
            assert _corr(a, m) > _corr(a, m, 8) + 0.05 and _corr(a, m) > _corr(a, m, -8) + 0.05
    assert all(len(s) == 1 for s in owners.values())  # no piece in two splits
    assert owners == {piece_id(k): {split_of(k, SPLIT)} for k in keys}  # all 4, by content
    # The same pair against another piece's MIDI correlates less than with its own.
    train = PairData.load(out, "train") if report["splits"]["train"]["pairs"] else None
    if train is not None and len(np.unique(train.piece)) > 1:
        own, other = [], []
        for p in range(len(train)):
            q = next(i for i in range(len(train)) if train.piece[i] != train.piece[p])
            a = train.audio[train.offsets[p]:train.offsets[p + 1]]
            own.append(_corr(a, train.midi[train.offsets[p]:train.offsets[p + 1]]))
            other.append(_corr(a, train.midi[train.offsets[q]:train.offsets[q + 1]]))
        assert min(own) > max(other)
    # Four pieces (the copy is the same piece); the broken file is skipped with its reason.
    assert sum(report["splits"][s]["pieces"] for s in SPLITS) == 5
    assert set(report["skipped"]) == {"not_midi"}  # once per split it was planned for
    assert {Path(s["file"]).name for s in report["skipped_pieces"]} == {"broken.mid"}
    assert all(p["renderer"] == "sine" for s in manifest.values() for p in s["pairs"])
    assert report["s_per_music_min"]["all"] > 0 and report["shards_written"] >= 3


def test_prepare_reruns_do_no_work_and_follow_the_content(prepared: tuple[Path, list, dict],
                                                          tmp_path: Path) -> None:
    out, files, _ = prepared
    before = {f: f.stat().st_mtime_ns for f in out.rglob("shard-*.npz")}
    t = time.perf_counter()
    again = D.prepare(out, list(reversed(files)), renderers=("sine",), heldout="sine",
                      workers=0, split=SPLIT, max_piece_s=10.0, progress=False,
                      pieces_per_shard=2)
    assert time.perf_counter() - t < 2.0
    assert again["shards_written"] == 0 and again["shards_reused"] >= 3
    assert {f: f.stat().st_mtime_ns for f in out.rglob("shard-*.npz")} == before
    # Another seed redraws renders, but every piece stays in its split.
    D.prepare(tmp_path / "other", files[:4], renderers=("sine",), heldout="sine",
                      workers=0, seed=7, split=SPLIT, max_piece_s=10.0, progress=False)
    for split in SPLITS:
        if again["splits"][split]["pairs"]:
            assert (set(PairData.load(out, split).piece)
                    == set(PairData.load(tmp_path / "other", split).piece))
    # Other settings in the same folder: every shard is redone and none of the old ones stays
    # (training reads every shard of a split folder).
    redo = D.prepare(tmp_path / "other", files[:4], renderers=("sine",), heldout="sine",
                     workers=0, seed=7, split=SPLIT, max_piece_s=9.0, progress=False,
                     pieces_per_shard=1)
    assert redo["shards_reused"] == 0
    manifest = json.loads((tmp_path / "other" / D.MANIFEST).read_text())["shards"]
    on_disk = {f"{f.parent.name}/{f.stem}" for f in (tmp_path / "other").rglob("shard-*.npz")}
    assert on_disk == {k for k, v in manifest.items() if v["pairs"]}
    assert len(on_disk) == redo["shards_written"] == 4 + redo["splits"]["test"]["pieces"]


@pytest.mark.skipif(not available(HELD_OUT), reason=f"{HELD_OUT} is not installed")
def test_heldout_split_uses_only_the_held_out_renderer_without_augmentation(
        tmp_path: Path) -> None:
    files = _write_collection(tmp_path / "midi", n=2)[:2]
    report = D.prepare(tmp_path / "out", files, renderers=("sine",), workers=0,
                       split=(0, 0, 1), max_piece_s=8.0, progress=False)
    assert report["heldout"] == HELD_OUT
    assert report["splits"]["test_heldout"]["by_renderer"] == {HELD_OUT: 2}
    assert report["splits"]["test"]["by_renderer"] == {"sine": 4}
    manifest = json.loads((tmp_path / "out" / D.MANIFEST).read_text())["shards"]
    held = [p for s in manifest.values() if s["split"] == "test_heldout" for p in s["pairs"]]
    assert all(p["audio_aug"] == [] and p["midi_aug"] == {} for p in held)
    data = PairData.load(tmp_path / "out", "test_heldout")
    assert set(data.piece) == set(PairData.load(tmp_path / "out", "test").piece)


def test_one_installed_soundfont_is_refused_with_the_packages_to_install(tmp_path, monkeypatch):
    # this machine lacking MuseScore General and TimGM6mb: only FluidR3 "installed"
    monkeypatch.setattr(D, "available", lambda name: name in ("fluid-fluidr3", "sine"))
    files = _write_collection(tmp_path / "midi", n=2)
    with pytest.raises(D.MidimatchError) as e:
        D.prepare(tmp_path / "out", files, heldout="sine", workers=0, progress=False)
    assert e.value.reason == "too_few_renderers"
    msg = str(e.value)
    assert "apt-get install" in msg and "timgm6mb-soundfont" in msg
    assert "musescore-general-soundfont-small" in msg and "fluid-soundfont-gm" not in msg
    assert not (tmp_path / "out" / "train").exists()  # refused before rendering anything
    # an explicit list is the caller's choice (tests, experiments)
    D.prepare(tmp_path / "out1", files, renderers=("fluid-fluidr3",), heldout="sine",
              workers=0, progress=False, min_renderers=1, max_piece_s=5)


def test_prepare_records_the_preset_and_redoes_shards_made_with_another(tmp_path: Path) -> None:
    files = _write_collection(tmp_path / "midi", n=2)[:2]
    kw = dict(renderers=("sine",), heldout="sine", workers=0, split=(1, 0, 0), max_piece_s=6.0,
              progress=False)
    first = D.prepare(tmp_path / "out", files, **kw)
    assert first["augment_preset"] == "train" and first["shards_written"] == 1
    noisy = D.prepare(tmp_path / "out", files, augment_preset="train_noisy", **kw)
    assert noisy["augment_preset"] == "train_noisy"
    assert noisy["shards_written"] == 1 and noisy["shards_reused"] == 0
    assert D.prepare(tmp_path / "out", files, augment_preset="train_noisy",
                     **kw)["shards_reused"] == 1
    with pytest.raises(ValueError, match="unknown preset 'loud'"):
        D.prepare(tmp_path / "bad", files, augment_preset="loud", **kw)
    assert not (tmp_path / "bad").exists()


def test_train_prepare_cli_passes_the_preset_and_refuses_an_unknown_one(tmp_path, capsys,
                                                                       monkeypatch):
    from server.cli import main

    monkeypatch.setenv("MIDIMATCH_CACHE", str(tmp_path / "cache"))

    corpus = tmp_path / "corpus"
    _write_collection(corpus / "generated", n=1)[0].rename(corpus / "generated" / "song_0.mid")
    rc = main(["train", "prepare", "--corpus", str(corpus), "--out", str(tmp_path / "pairs"),
               "--generated", "1", "--augment", "loud"])
    assert rc == 2
    assert "unknown preset 'loud'" in capsys.readouterr().err
    assert not (tmp_path / "pairs").exists()


def test_train_prepare_cli_refuses_a_seed_range_not_generated_or_evaluations(tmp_path, capsys,
                                                                            monkeypatch):
    """`--generated-start` names training-only songs: missing ones are asked for, not skipped
    (a run would silently train on fewer pieces), and evaluation's seeds are refused."""
    from model.training.songgen_files import TRAINING_ONLY_SEED, generate_songs
    from server.cli import main

    monkeypatch.setenv("MIDIMATCH_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    generate_songs(corpus, 2, start_seed=TRAINING_ONLY_SEED, workers=1, progress=False,
                   duration_s=20.0)
    out = tmp_path / "pairs"
    with pytest.raises(SystemExit, match=r"0 of the 250 generated songs from seed 0 "):
        main(["train", "prepare", "--corpus", str(corpus), "--out", str(out)])  # the default
    with pytest.raises(SystemExit, match=r"2 of the 5 generated songs from seed 10000 .*"
                                         r"--start-seed 10000 -n 5"):
        main(["train", "prepare", "--corpus", str(corpus), "--out", str(out), "--works", "0",
              "--generated", "5", "--generated-start", str(TRAINING_ONLY_SEED)])
    rc = main(["train", "prepare", "--corpus", str(corpus), "--out", str(out), "--works", "0",
               "--generated", "5", "--generated-start", "300"])
    assert rc != 0 and "reach into the ones evaluation" in capsys.readouterr().err
    assert not out.exists()


def test_train_prepare_cli_leaves_out_evaluation_tunes_of_another_corpus(tmp_path, capsys,
                                                                       monkeypatch):
    """`--corpus DIR` other than the cache's: works whose notes equal an evaluation work are
    left out by default; `--exclude-corpus` names another folder, and a folder without
    converted works (a wrong path would check nothing) or the corpus itself is refused."""
    import model.training.data as data_mod
    from model.training.corpus import convert_music21_corpus
    from server.cli import main

    tune = "X:1\nT:{}\nM:4/4\nL:1/4\nK:G\n{}|]\n"
    src = tmp_path / "src"
    src.mkdir()
    (src / "eval.abc").write_text(tune.format("measured", "GABc|d2B2|cABG|G4"))
    (src / "same.abc").write_text(tune.format("other name", "GABc|d2B2|cABG|G4"))
    (src / "new.abc").write_text(tune.format("new", "cBAG|F2E2|DEFG|c4"))
    monkeypatch.setenv("MIDIMATCH_CACHE", str(tmp_path / "cache"))
    cache_corpus = tmp_path / "cache" / "corpus"
    convert_music21_corpus(cache_corpus, sources=[src / "eval.abc"], workers=1, progress=False)
    extra = tmp_path / "extra"
    convert_music21_corpus(extra, sources=[src / "same.abc", src / "new.abc"], workers=1,
                           progress=False)
    seen: list[list[str]] = []
    monkeypatch.setattr(data_mod, "prepare",  # the file choice is under test, not rendering
                        lambda out, files, **kw: seen.append([f.name for f in files]) or {})
    args = ["train", "prepare", "--corpus", str(extra), "--out", str(tmp_path / "p"),
            "--generated", "0"]
    assert main(args) == 0
    assert len(seen[-1]) == 1 and "new" in seen[-1][0]
    assert "1 work of" in capsys.readouterr().err
    other = tmp_path / "other"  # a folder of other works: nothing of extra's among them
    convert_music21_corpus(other, sources=[src / "new.abc"], workers=1, progress=False)
    assert main([*args, "--exclude-corpus", str(other)]) == 0
    assert len(seen[-1]) == 1 and "same" in seen[-1][0]
    for bad, why in ((tmp_path / "nowhere", "holds no converted works"),
                     (cache_corpus / "music21", "holds no converted works"),
                     (extra, "cannot leave out its own works")):
        assert main([*args, "--exclude-corpus", str(bad)]) == 2
        assert why in capsys.readouterr().err
    n = len(seen)
    # the cache's own corpus (the evaluation's), however it is spelt: nothing is left out
    (tmp_path / "link").symlink_to(cache_corpus)
    for corpus in (str(tmp_path / "link"), None):
        extra_args = ["--corpus", corpus] if corpus else []
        assert main(["train", "prepare", *extra_args, "--out", str(tmp_path / "p"),
                     "--generated", "0"]) == 0
        assert len(seen[-1]) == 1 and "left out" not in capsys.readouterr().err
    assert len(seen) == n + 2
    # no evaluation corpus at all: another folder trains on all of its works
    monkeypatch.setenv("MIDIMATCH_CACHE", str(tmp_path / "empty-cache"))
    assert main(args) == 0 and len(seen[-1]) == 2


def test_data_corpus_cli_refuses_start_into_the_evaluation_folder(tmp_path, monkeypatch):
    from server.cli import main

    monkeypatch.setenv("MIDIMATCH_CACHE", str(tmp_path))
    with pytest.raises(SystemExit, match="--start writes a training-only folder"):
        main(["data", "corpus", "--start", "400", "--limit", "401"])
    assert not (tmp_path / "corpus").exists()
