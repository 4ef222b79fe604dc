"""The demo collection: reading an index's references, cutting and rendering an excerpt (music
to its end, long enough to be decided), leaving music21's test fixtures out, and the /v1/demo,
/v1/pieces and /favicon.ico routes."""

from __future__ import annotations

import argparse
import io
import json
import random
import wave
from pathlib import Path

import numpy as np
import pretty_midi
import pytest

from server.app import create_app
from server.demo import (
    MIN_MUSIC_S,
    TAIL_S,
    DemoCollection,
    DemoError,
    Piece,
    choose_span,
    crop,
    is_fixture,
    read_pieces,
    trim_tail,
    without_fixtures,
)
from server.settings import Settings
from tests.conftest import make_piece
from worker.bus import InProcessBus


@pytest.fixture
def fake_index(tmp_path: Path) -> Path:
    """An index folder with only what the gateway reads (CURRENT and refs.jsonl)."""
    root, gen = tmp_path / "idx", tmp_path / "idx" / "gen-000001"
    gen.mkdir(parents=True)
    refs = []
    for k in range(2):
        path = tmp_path / f"song{k}.mid"
        make_piece(k, duration_s=12.0).write(str(path))
        refs.append({"path": str(path), "title": f"Song {k}", "duration_s": 12.0,
                     "sha256": f"{k:02d}" * 32})
    refs.append({"path": str(tmp_path / "gone.mid"), "duration_s": 3.0, "sha256": ""})
    (gen / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    (root / "CURRENT").write_text("gen-000001\n")
    return root


def wav_info(data: bytes) -> tuple[int, int, float]:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnchannels(), w.getframerate(), w.getnframes() / w.getframerate()


def test_read_pieces_ids_and_titles(fake_index):
    pieces = read_pieces(fake_index)
    assert [p.id for p in pieces] == ["0" * 16, "01" * 8, "ref2"]  # as index.search names them
    assert [p.title for p in pieces] == ["Song 0", "Song 1", "gone"]
    with pytest.raises(DemoError):
        read_pieces(fake_index / "nope")


def test_crop_shifts_and_cuts_notes():
    pm = make_piece(3, duration_s=10.0, drums=False)
    cut = crop(pm, 4.0, 6.0)
    notes = [n for i in cut.instruments for n in i.notes]
    assert notes and min(n.start for n in notes) >= 0 and max(n.end for n in notes) <= 2.0 + 1e-9
    inside = sum(1 for i in pm.instruments for n in i.notes if n.end > 4.0 and n.start < 6.0)
    assert len(notes) == inside
    with pytest.raises(DemoError):
        crop(pm, 50.0, 60.0)


@pytest.mark.asyncio
async def test_excerpt_renders_the_requested_span(fake_index):
    demo = DemoCollection.from_index(fake_index, seed=1)
    ex = await demo.excerpt(demo.pieces[0], 4.0, start_s=2.0)
    channels, rate, seconds = wav_info(ex.wav)
    assert channels == 1 and rate == 22050
    assert 3.5 <= seconds <= 4.0 + 3.0  # a synthesiser adds the release tail
    assert ex.title == "Song 0" and ex.start_s == 2.0 and ex.renderer in ("fluidsynth", "sine")
    ex = await demo.random_excerpt(3.0)  # never the piece whose file is gone
    assert ex.title in ("Song 0", "Song 1")


@pytest.mark.asyncio
async def test_demo_and_piece_routes(aiohttp_client, fake_index):
    demo = DemoCollection.from_index(fake_index, seed=2)
    client = await aiohttp_client(create_app(Settings(demo_seconds=3.0), InProcessBus(),
                                             demo=demo))
    r = await client.get("/v1/demo")
    assert r.status == 200 and r.content_type == "audio/wav"
    assert r.headers["X-Demo-Title"] in ("Song 0", "Song 1")
    assert wav_info(await r.read())[1] == 22050
    r = await client.get(f"/v1/pieces/{'01' * 8}")
    assert (await r.json()) == {"id": "01" * 8, "title": "Song 1", "duration_s": 12.0}
    assert (await client.get("/v1/pieces/unknown")).status == 404


# --------------------------------------------------------------- the excerpt: music to its end
def samples(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32768.0, w.getframerate()


def test_choose_span_ends_where_the_music_does():
    spans = np.array([[0.0, 10.0], [10.5, 18.0]])  # then silence: the file runs on to 30 s
    for seed in range(50):
        start, end = choose_span(spans, 25.0, random.Random(seed))
        assert end == 18.0 and end - start >= MIN_MUSIC_S  # never into the silence
        assert 0.0 <= start <= 3.0
    # the window stops inside a note: it ends there (the note is cut), not at an earlier note
    start, end = choose_span(np.array([[0.0, 40.0]]), 25.0, random.Random(1), start_s=2.0)
    assert (start, end) == (2.0, 27.0)
    # the window stops in a rest: it ends where the last note before it stopped
    start, end = choose_span(np.array([[0.0, 17.0], [20.0, 40.0]]), 19.0, random.Random(1),
                             start_s=0.5)
    assert (start, end) == (0.5, 17.0)


def test_choose_span_refuses_too_little_music():
    with pytest.raises(DemoError, match="needs 15 s"):
        choose_span(np.array([[0.0, 4.8]]), 25.0, random.Random(0))
    with pytest.raises(DemoError):  # long enough as a file, but mostly rests
        choose_span(np.array([[0.0, 2.0], [14.0, 16.0]]), 25.0, random.Random(0))
    with pytest.raises(DemoError, match="from 30.0 s"):  # a start too near the end
        choose_span(np.array([[0.0, 40.0]]), 25.0, random.Random(0), start_s=30.0)
    assert choose_span(np.array([[0.0, 4.8]]), 3.0, random.Random(0))[1] <= 4.8  # short demos


def test_trim_tail_cuts_silence_and_fades():
    rate = 1000
    x = np.concatenate([np.sin(np.arange(3000) * 0.3), np.zeros(2000), 1e-4 * np.ones(500)])
    y = trim_tail(x, rate)
    assert 2990 <= len(y) <= 3000 and abs(y[-1]) < 1e-9  # the quiet tail is gone, faded out
    assert len(trim_tail(x, rate, length_s=1.0)) <= (1.0 + TAIL_S) * rate
    assert len(trim_tail(np.zeros(100), rate)) == 0


def piece_with_silent_end(path: Path) -> None:
    """18 s of music, then nothing but a controller message at 30 s: the file ends in 12 s of
    silence, as many corpus conversions do."""
    pm = make_piece(7, duration_s=18.0, drums=False)
    pm.instruments[0].control_changes.append(pretty_midi.ControlChange(7, 100, 30.0))
    pm.write(str(path))


def demo_collection(tmp_path: Path, files: dict[str, float], renderer: str,
                    monkeypatch) -> DemoCollection:
    pieces = []
    for k, (name, seconds) in enumerate(files.items()):
        path = tmp_path / name
        if seconds == 30.0:
            piece_with_silent_end(path)
        else:
            make_piece(k, duration_s=seconds, drums=False).write(str(path))
        pieces.append(Piece(k, f"{k:016x}", path.stem, seconds, path))
    if renderer == "fluidsynth":
        demo = DemoCollection(pieces, seed=3)
        if demo.renderer != "fluidsynth":
            pytest.skip("fluidsynth or a GM soundfont is not installed (apt-get install "
                        "fluidsynth fluid-soundfont-gm)")
        return demo
    monkeypatch.setattr("server.demo.shutil.which", lambda name: None)
    demo = DemoCollection(pieces, seed=3)
    assert demo.renderer == "sine"
    return demo


@pytest.mark.asyncio
@pytest.mark.parametrize("renderer", ["sine", "fluidsynth"])
async def test_excerpt_has_music_to_its_end(tmp_path, monkeypatch, renderer):
    demo = demo_collection(tmp_path, {"song.mid": 30.0}, renderer, monkeypatch)
    for _ in range(3):
        ex = await demo.random_excerpt(25.0)
        x, rate = samples(ex.wav)
        assert MIN_MUSIC_S <= len(x) / rate <= 18.0 - ex.start_s + TAIL_S + 1e-3
        assert ex.duration_s == pytest.approx(len(x) / rate, abs=1e-3)
        # no silence at the end: the last half second (the last notes, their release) is loud
        peak, tenth = np.abs(x).max(), rate // 10
        rms = [np.sqrt(np.mean(x[len(x) - (k + 1) * tenth: len(x) - k * tenth] ** 2))
               for k in range(5)]
        assert max(rms) > peak * 10 ** (-30 / 20), (ex.start_s, rms)


@pytest.mark.asyncio
async def test_random_excerpt_skips_short_pieces_and_fixtures(tmp_path, monkeypatch):
    demo = demo_collection(tmp_path, {"short.mid": 4.8, "demos__multiple-verses.xml.mid": 40.0,
                                      "long.mid": 40.0}, "sine", monkeypatch)
    titles = {(await demo.random_excerpt(25.0)).title for _ in range(8)}
    assert titles == {"long"}
    with pytest.raises(DemoError, match="only 4.8 s of music anywhere; a demo needs 15 s"):
        await demo.excerpt(demo.pieces[0], 25.0)


# -------------------------------------------------------- the demo collection: not the fixtures
def test_fixture_filter():
    names = ["demos__multiple-verses.xml.mid", "demos__nested_tuplet_finale_test.xml.mid",
             "bach__bwv66.6.mxl.mid", "airdsAirs__book1.abc__x176.mid",
             "theoryExercises__checker_demo.mxl.mid", "demos.mid"]
    kept, left_out = without_fixtures([Path("/c/music21") / n for n in names])
    assert [p.name for p in left_out] == names[:2]
    assert [p.name for p in kept] == names[2:]
    assert is_fixture("demos__two-parts.xml.mid") and not is_fixture("bach__demos__x.mid")


def test_demo_prepare_leaves_fixtures_out(tmp_path, monkeypatch, capsys, fake_index):
    """``midimatch demo prepare`` indexes the corpus without the fixtures, says so, and rebuilds
    an index that an earlier prepare filled with them."""
    import index.build
    import model.training.corpus as corpus
    from server import serve_cli

    music = [tmp_path / n for n in ("bach__bwv1.mxl.mid", "demos__layoutTest.xml.mid",
                                    "demos__two-voices.xml.mid", "ryansMammoth__x1.abc.mid")]
    built = []
    monkeypatch.setenv("MIDIMATCH_CACHE", str(tmp_path / "cache"))  # never the real cache
    monkeypatch.setattr(corpus, "convert_music21_corpus", lambda *a, **k: None)
    monkeypatch.setattr(corpus, "corpus_midi_files", lambda *a, **k: list(music))
    monkeypatch.setattr(index.build, "build_index", lambda out, files, opts: built.append(
        (files, opts)) or {"n_refs": len(files), "encoded": len(files), "reused": 0})
    args = argparse.Namespace(limit=5, index=tmp_path / "fresh", workers=1)
    assert serve_cli._demo_prepare(args) == 0
    files, opts = built[-1]
    assert files == [music[0], music[3]] and not opts.rebuild
    out = capsys.readouterr()
    assert "leaving out 2 music21 test fixtures" in out.err and "demos__layoutTest" in out.err
    assert "2 test fixtures left out" in out.out

    gen = fake_index / "gen-000001"  # an index made before the filter: it holds a fixture
    refs = gen.joinpath("refs.jsonl").read_text()
    gen.joinpath("refs.jsonl").write_text(refs + json.dumps(
        {"path": str(music[1]), "duration_s": 20.0, "sha256": "ab" * 32}) + "\n")
    assert serve_cli._demo_prepare(argparse.Namespace(limit=5, index=fake_index,
                                                      workers=1)) == 0
    files, opts = built[-1]
    assert files == [music[0], music[3]] and opts.rebuild
    assert "holds 1 test fixtures from an earlier prepare; rebuilding" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_favicon(aiohttp_client):
    client = await aiohttp_client(create_app(Settings(), InProcessBus()))
    r = await client.get("/favicon.ico")
    assert r.status == 200 and r.content_type == "image/svg+xml"
    assert (await r.text()).startswith("<svg")


def test_demo_prepare_says_how_many_works_converted_and_which_failed_why(tmp_path, monkeypatch,
                                                                         capsys):
    import json

    import index.build
    import model.training.corpus as corpus
    from server.cli import main

    monkeypatch.setenv("MIDIMATCH_CACHE", str(tmp_path))
    folder = tmp_path / "corpus" / "music21"
    folder.mkdir(parents=True)
    records = [{"key": "bach/bwv1.mxl", "status": "done", "file": "bach__bwv1.mxl.mid"},
               {"key": "beethoven/opus74.mxl", "status": "failed", "reason": "timeout",
                "error": "killed after 60 s"}]
    (folder / corpus.MANIFEST_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(corpus, "convert_music21_corpus", lambda *a, **k: {})
    monkeypatch.setattr(corpus, "corpus_midi_files", lambda *a, **k: [folder / "a.mid"])
    monkeypatch.setattr(index.build, "build_index", lambda out, files, opts: {
        "n_refs": len(files), "encoded": len(files), "reused": 0})
    assert main(["demo", "prepare", "--index", str(tmp_path / "demo-index")]) == 0
    err = capsys.readouterr().err
    assert "1 of 2 music21 works converted; 1 failed: beethoven/opus74.mxl (timeout: killed " \
           "after 60 s)" in err


def test_demo_prepare_rebuilds_an_index_made_with_another_model(tmp_path, monkeypatch, capsys,
                                                                fake_index):
    """The demo index is a cache: after an upgrade of the shipped model, `make serve` rebuilds it
    instead of stopping on the model mismatch."""
    import index.build
    import model.training.corpus as corpus
    from model.encoder import Encoder
    from server import serve_cli

    music = [tmp_path / "bach__bwv1.mxl.mid"]
    built = []
    monkeypatch.setenv("MIDIMATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpus, "convert_music21_corpus", lambda *a, **k: None)
    monkeypatch.setattr(corpus, "corpus_midi_files", lambda *a, **k: list(music))
    monkeypatch.setattr(index.build, "build_index", lambda out, files, opts: built.append(
        opts) or {"n_refs": len(files), "encoded": len(files), "reused": 0})
    meta = fake_index / "gen-000001" / "meta.json"
    args = argparse.Namespace(limit=5, index=fake_index, workers=1)
    meta.write_text(json.dumps({"model_id": "32bit-an-older-one"}))
    assert serve_cli._demo_prepare(args) == 0
    assert built[-1].rebuild
    assert ("indexed with the model 32bit-an-older-one, the shipped model is "
            f"{Encoder.load().model_id}: rebuilding") in capsys.readouterr().err
    meta.write_text(json.dumps({"model_id": Encoder.load().model_id}))
    assert serve_cli._demo_prepare(args) == 0
    assert not built[-1].rebuild and "rebuilding" not in capsys.readouterr().err
