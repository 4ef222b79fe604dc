from __future__ import annotations

import os
import time
from pathlib import Path

import pretty_midi
import pytest

from model.errors import MidimatchError
from model.training.corpus import (
    SUBDIR,
    _locked,
    convert_music21_corpus,
    corpus_midi_files,
    read_manifest,
)
from model.training.corpus_convert import music21_to_midi_file

TUNE = "X:1\nT:{title}\nM:4/4\nL:1/4\nK:G\nGABc|d2B2|cABG|G4|]\n"


def _corpus(rel: str) -> Path:
    from music21 import common

    return Path(common.getCorpusFilePath()) / rel


def _scripted(source: Path, number: int | None, out_path: Path) -> dict:
    """A converter whose behaviour the source's name picks (module level: workers import it)."""
    stem = source.stem
    if stem.startswith("sleep"):
        out_path.write_bytes(b"MThd")  # a half-written file the kill must not leave behind
        time.sleep(60)
    if stem.startswith("crash"):
        os._exit(3)
    if stem.startswith("boom"):
        raise RuntimeError("boom")
    if stem.startswith("bad"):
        raise MidimatchError("cannot parse", reason="parse_failed") from ValueError("bad token")
    return music21_to_midi_file(source, number, out_path)


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_converts_real_works_resumes_and_extends(tmp_path: Path) -> None:
    sources = [
        _corpus("bach/bwv66.6.mxl"),
        _corpus("ryansMammoth/WindUpReel.abc"),
        _corpus("essenFolksong/han1.abc"),
    ]
    first = convert_music21_corpus(tmp_path, sources=sources, limit=4, progress=False)
    assert (first["selected"], first["converted"], first["failed"]) == (4, 4, 0)
    assert first["rescaled"] == 4  # music21 writes 10,080 ticks per quarter
    files = corpus_midi_files(tmp_path, unique=False)
    assert len(files) == 4 and sum(".abc__x" in f.name for f in files) == 2
    for f in files:
        pm = pretty_midi.PrettyMIDI(str(f))
        assert pm.resolution == 960 and sum(len(i.notes) for i in pm.instruments) > 10
    stamps = {f: f.stat().st_mtime_ns for f in files}

    manifest = tmp_path / SUBDIR / "manifest.jsonl"
    with open(manifest, "a") as f:
        f.write('{"key": "torn by a cra')  # a run killed mid-write
    second = convert_music21_corpus(tmp_path, sources=sources, limit=4, progress=False)
    assert (second["converted"], second["failed"], second["skipped_done"]) == (0, 0, 4)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps

    third = convert_music21_corpus(tmp_path, sources=sources, limit=5, progress=False)
    assert (third["converted"], third["skipped_done"]) == (1, 4)  # a longer prefix, same order
    records = read_manifest(tmp_path)
    assert len(records) == 5 and all(r["status"] == "done" for r in records.values())
    assert len(corpus_midi_files(tmp_path, unique=False)) == 5

    files[0].unlink()  # a cache cleaned by hand: the manifest alone must not count it as done
    fourth = convert_music21_corpus(tmp_path, sources=sources, limit=5, progress=False)
    assert (fourth["converted"], fourth["skipped_done"]) == (1, 4) and files[0].exists()


def test_bad_sources_are_recorded_not_raised(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sources = [
        _write(src, "ok.abc", TUNE.format(title="one")),
        _write(src, "same.abc", TUNE.format(title="the same notes")),
        _write(src, "broken.xml", "<score-partwise><part id='P1'><measure><note>"),
        _write(src, "empty.abc", "X:1\nT:no notes\nM:4/4\nK:C\n"),
        _write(src, "bad.abc", TUNE.format(title="x")),
        _write(src, "boom.abc", TUNE.format(title="x")),
    ]
    out = tmp_path / "out"
    report = convert_music21_corpus(
        out, sources=sources, workers=1, progress=False, convert_fn=_scripted
    )
    assert (report["converted"], report["failed"]) == (2, 4)
    assert report["failed_by_reason"] == {"parse_failed": 2, "no_notes": 1, "convert_failed": 1}
    by_name = {Path(r["source"]).name: r for r in read_manifest(out).values()}
    assert by_name["broken.xml"]["error_type"] == "ParseError"
    assert by_name["bad.abc"]["error_type"] == "ValueError"  # the cause, not the wrapper
    assert by_name["boom.abc"]["error"] == "boom"
    # Two names, one piece: an identification benchmark must not hold both.
    assert len(corpus_midi_files(out, unique=False)) == 2
    assert len(corpus_midi_files(out)) == 1
    assert corpus_midi_files(out, max_duration_s=5.0) == []  # the tune lasts 8 s

    again = convert_music21_corpus(out, sources=sources, workers=1, progress=False)
    assert (again["converted"], again["failed"], again["skipped_failed"]) == (0, 0, 4)
    retry = convert_music21_corpus(
        out, sources=sources, workers=1, progress=False, retry_failed=True, convert_fn=_scripted
    )
    assert (retry["failed"], retry["skipped_done"]) == (4, 2)


def test_a_second_run_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / SUBDIR
    folder.mkdir()
    with _locked(folder), pytest.raises(MidimatchError) as err:
        convert_music21_corpus(tmp_path, sources=[], progress=False)
    assert err.value.reason == "busy"


def test_start_skips_the_first_works_of_the_list(tmp_path: Path) -> None:
    """A training-only folder (``--start 400``) holds none of the works the evaluation folder
    (``--limit 400``) converted, and both follow one order."""
    from model.training.corpus_works import list_corpus_works

    src = tmp_path / "src"
    src.mkdir()
    sources = [_write(src, f"t{i}.abc", TUNE.replace("GABc", "GAB" + "cdef"[i]).format(
        title=str(i))) for i in range(4)]
    order = [w.key for w in list_corpus_works(sources)]
    first = convert_music21_corpus(tmp_path / "eval", sources=sources, limit=2, workers=1,
                                   progress=False)
    rest = convert_music21_corpus(tmp_path / "extra", sources=sources, start=2, limit=9,
                                  workers=1, progress=False)
    assert (first["selected"], rest["selected"], rest["converted"]) == (2, 2, 2)
    assert sorted(read_manifest(tmp_path / "eval")) == sorted(order[:2])
    assert sorted(read_manifest(tmp_path / "extra")) == sorted(order[2:])
    assert convert_music21_corpus(tmp_path / "none", sources=sources, start=3, limit=2,
                                  workers=1, progress=False)["selected"] == 0
    tail = convert_music21_corpus(tmp_path / "tail", sources=sources, start=1, workers=1,
                                  progress=False)  # no limit: to the end of the list
    assert tail["selected"] == 3
    assert sorted(read_manifest(tmp_path / "tail")) == sorted(order[1:])
    with pytest.raises(MidimatchError, match="start must be >= 0") as e:
        convert_music21_corpus(tmp_path / "bad", sources=sources, start=-1, progress=False)
    assert e.value.reason == "bad_argument"
