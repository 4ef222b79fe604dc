"""``midimatch eval prepare-external``: pairs made elsewhere, cut and indexed like the eval set.

Everything but the last test runs on generated fixtures (a fake ``mscore3``, sine renders);
the last one runs the Debian packages themselves when they are installed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import mido
import numpy as np
import pretty_midi
import pytest
import soundfile as sf

from index.align import align
from index.evaluation import external as X
from index.evaluation.evalset import QuerySetConfig, load_queries
from model.errors import MidimatchError
from model.fastrender import midi_to_frames_fast
from model.features import FRAME_RATE
from model.midi import load_midi, load_notes
from model.training.render import render
from server.cli import main
from tests.conftest import make_piece

FAKE_MSCORE = """#!{python}
# mscore3 -o OUT IN, faked: IN is a MIDI file; OUT .mid copies it, any other suffix renders it
import shutil, sys
import pretty_midi, soundfile
out, src = sys.argv[2], sys.argv[3]
if open(src, "rb").read(4) != b"MThd":
    sys.exit("Cannot read file " + src)
if out.endswith(".mid"):
    shutil.copyfile(src, out)
else:
    pm = pretty_midi.PrettyMIDI(src)
    soundfile.write(out, 0.3 * pm.synthesize(fs=44100), 44100, format="FLAC")
"""


def _midi(path: Path, seed: int, duration_s: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_piece(seed, duration_s=duration_s, drums=False).write(str(path))
    return path


def _pair(tmp: Path, seed: int, duration_s: float, tail_s: float = 1.0) -> tuple[Path, Path]:
    """A MIDI file and a 44.1 kHz stereo rendering of it (a pair made 'elsewhere')."""
    mid = _midi(tmp / f"pair{seed}.mid", seed, duration_s)
    audio = render(load_midi(mid), "sine", sample_rate=44100, tail_s=tail_s)
    wav = tmp / f"pair{seed}.wav"
    sf.write(wav, np.stack([audio, audio], axis=1), 44100)
    return mid, wav


def _tempo_moved(src: Path, dst: Path, *, track: int, us_per_beat: int = 600_000) -> Path:
    """``src`` (one tempo, in track 0) with that tempo replaced by ``us_per_beat`` in ``track``."""
    mf = mido.MidiFile(str(src))
    for t in mf.tracks:
        tempos = [k for k, m in enumerate(t) if m.type == "set_tempo"]
        for k in reversed(tempos):
            if k + 1 < len(t):  # keep the following event's time right
                t[k + 1].time += t[k].time
            del t[k]
    mf.tracks[track].insert(0, mido.MetaMessage("set_tempo", tempo=us_per_beat, time=0))
    mf.save(str(dst))
    return dst


def test_a_pair_whose_tempo_is_in_track_1_is_cut_where_the_reference_plays_it(tmp_path):
    # solfege's fanfare keeps its tempo in track 1; a player obeys it, and so does the loader:
    # the audio (played by pretty_midi from the same music with the tempo in track 0, not by
    # our loader) lines up with the reference the index holds
    src = _midi(tmp_path / "src.mid", 7, 30.0)
    in_1 = _tempo_moved(src, tmp_path / "in1.mid", track=1)
    in_0 = _tempo_moved(src, tmp_path / "in0.mid", track=0)
    assert load_notes(in_1).end_s == pytest.approx(1.2 * load_notes(src).end_s)  # 100 bpm
    audio = render(pretty_midi.PrettyMIDI(str(in_0)), "sine", sample_rate=44100)
    wav = tmp_path / "in1.wav"
    sf.write(wav, np.stack([audio, audio], axis=1), 44100)
    cfg = QuerySetConfig(lengths_s=(10.0,), conditions=("clean",), seed=3)
    (rec,), (f,) = X.clips_of_pair(str(in_1), str(wav), cfg)
    a = align(f.astype(np.float32), midi_to_frames_fast(load_notes(in_1)))
    assert a.ref_start / FRAME_RATE == pytest.approx(rec["start_s"], abs=0.25)
    # read at 120 bpm, the clip's end would be (start + 10 s) / 6 >= 1.8 s off
    assert a.ref_end / FRAME_RATE == pytest.approx(rec["end_s"], abs=0.25)


def test_pair_clips_are_where_the_reference_plays_them(tmp_path):
    mid, wav = _pair(tmp_path, 5, 40.0)
    cfg = QuerySetConfig(lengths_s=(5.0, 10.0), conditions=("clean", "room_noise"), seed=2)
    records, frames = X.clips_of_pair(str(mid), str(wav), cfg)
    assert [(r["condition"], r["length_s"]) for r in records] == [
        ("clean", 5.0), ("clean", 10.0), ("room_noise", 5.0), ("room_noise", 10.0)]
    assert records[2]["audio_aug"] and not records[0]["audio_aug"]
    ref = midi_to_frames_fast(load_notes(mid))
    for r, f in zip(records, frames, strict=True):
        assert f.dtype == np.float16 and f.shape == (1 + int(r["length_s"] * 22050) // 1024, 48)
        assert r["end_s"] - r["start_s"] == pytest.approx(r["length_s"], abs=0.01)
        if r["condition"] == "clean":
            a = align(f.astype(np.float32), ref)
            assert a.ref_start / FRAME_RATE == pytest.approx(r["start_s"], abs=0.25)
            assert a.ref_end / FRAME_RATE == pytest.approx(r["end_s"], abs=0.25)
    np.testing.assert_array_equal(frames[0], frames[1][: frames[0].shape[0]])


def test_a_pair_shorter_than_any_clip_gives_its_whole_audio(tmp_path):
    mid, wav = _pair(tmp_path, 6, 3.0, tail_s=1.0)
    cfg = QuerySetConfig(lengths_s=(5.0, 10.0), conditions=("clean",))
    (rec,), (f,) = X.clips_of_pair(str(mid), str(wav), cfg)
    end = load_notes(mid).end_s
    assert rec["start_s"] == 0.0 and rec["end_s"] == pytest.approx(end, abs=1e-3)
    assert rec["length_s"] == pytest.approx(round(sf.info(wav).duration, 1))
    assert f.shape[0] == pytest.approx(sf.info(wav).duration * FRAME_RATE, abs=2)


def test_missing_packages_are_named_with_the_apt_get_command(monkeypatch):
    monkeypatch.setattr(X, "package_files",
                        lambda p: None if p in ("solfege", "musescore3") else [])
    with pytest.raises(MidimatchError) as e:
        X.find_sources()
    assert e.value.reason == "not_installed"
    assert "apt-get install musescore3 solfege" in e.value.message


def test_sources_are_the_fixed_demo_scores_and_the_fanfare_pair(monkeypatch):
    demos = Path("/usr/share/mscore3-3.2/demos")
    share = Path("/usr/share/solfege/lesson-files/share")
    listing = {
        "musescore3": [Path("/usr/bin/mscore3")],
        "musescore3-common": [demos, demos / "Extra.mscz", demos / "Reunion.mscz",
                              demos / "Fugue_1.mscx", Path("/usr/share/x/Fugue_2.mscx")],
        "solfege": [share / "fanfare.midi", share / "fanfare.wav", share / "fanfare.mp3"],
        "openttd-openmsx": [Path("/g/b.mid"), Path("/g/a.mid"), Path("/g/readme.txt")]}
    monkeypatch.setattr(X, "package_files", listing.get)
    monkeypatch.setattr(X.shutil, "which", lambda name: f"/usr/bin/{name}")
    src = X.find_sources()
    assert src.scores == [demos / "Fugue_1.mscx", demos / "Reunion.mscz"]  # DEMO_SCORES' order
    assert src.fanfare == (share / "fanfare.midi", share / "fanfare.wav")  # never the mp3
    assert src.openmsx == [Path("/g/a.mid"), Path("/g/b.mid")]


def test_prepare_exports_indexes_and_cuts_with_failures_recorded(tmp_path, capsys):
    fake = tmp_path / "bin" / "mscore3"
    fake.parent.mkdir()
    fake.write_text(FAKE_MSCORE.format(python=sys.executable))
    fake.chmod(0o755)
    scores = tmp_path / "scores"
    good = _midi(scores / "Good.mscz", 11, 30.0)  # a MIDI file under a score's name
    broken = scores / "Broken.mscx"
    broken.write_text("<museScore/>")
    src = X.Sources(scores=[good, broken], fanfare=_pair(tmp_path / "solfege", 12, 2.0),
                    openmsx=[_midi(tmp_path / "omsx" / f"o{i}.mid", 20 + i, 30.0)
                             for i in range(2)])
    distractor = _midi(tmp_path / "corpus" / "d.mid", 30, 30.0)
    out = tmp_path / "external"
    rep = X.prepare(out, src, renderers=("sine",), distractors=[str(distractor)], workers=0,
                    progress=False, mscore=str(fake), lengths_s=(5.0, 10.0))
    assert rep["n_refs"] == 5 and rep["n_distractors"] == 1  # good, fanfare, 2 openmsx, 1
    assert [(f["source"], Path(f["path"]).name) for f in rep["failed"]] == [
        ("mscore3", "Broken.mscx")]
    assert "Cannot read file" in rep["failed"][0]["error"]
    assert rep["clips_by_source"] == {"mscore3": 4, "solfege": 2, "openmsx/sine": 8}
    assert (out / "pairs" / "Good.flac").is_file() and (out / "external.json").is_file()
    queries, frames = load_queries(out / "queries")
    assert {q["kind"] for q in queries} == {"in"} and len(frames) == 14
    assert {q["renderer"] for q in queries} == {"mscore3", None, "sine"}
    assert main(["eval", "--queries", str(out / "queries"), "--index", str(out / "index"),
                 "--threads", "1", "--no-progress", "--by-source"]) == 0
    table = capsys.readouterr().out
    assert "mscore3:clean/10" in table and "openmsx/sine:room_noise/5" in table
    # a second run makes nothing again
    again = X.prepare(out, src, renderers=("sine",), distractors=[str(distractor)], workers=0,
                      progress=False, mscore=str(fake), lengths_s=(5.0, 10.0))
    assert again["clips_by_source"] == rep["clips_by_source"]


def test_prepare_external_refuses_an_unknown_renderer(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["eval", "prepare-external", "--out", str(tmp_path), "--renderers", "no-synth"])
    assert "unknown renderers ['no-synth']" in str(e.value)


def _installed() -> bool:
    return shutil.which("mscore3") is not None and all(
        X.package_files(p) is not None for pkgs in X.PACKAGES.values() for p in pkgs)


@pytest.mark.skipif(not _installed(), reason="needs the Debian packages: apt-get install "
                    "musescore3 musescore3-common solfege openttd-openmsx")
def test_the_real_packages(tmp_path):
    from model.training.render import available

    src = X.find_sources()
    assert [s.stem for s in src.scores] == list(X.DEMO_SCORES) and len(src.openmsx) == 31
    renderer = "timidity-freepats" if available("timidity-freepats") else "sine"
    small = X.Sources(scores=src.scores[3:], fanfare=src.fanfare, openmsx=src.openmsx[:2])
    rep = X.prepare(tmp_path, small, renderers=(renderer,), workers=0, progress=False)
    assert rep["failed"] == [] and rep["n_refs"] == 5
    for score in small.scores:  # MuseScore's audio is its MIDI played: same length, a tail
        midi_s = load_notes(tmp_path / "midi" / "mscore3" / f"{score.stem}.mid").end_s
        assert 0 <= sf.info(tmp_path / "pairs" / f"{score.stem}.flac").duration - midi_s < 5
    queries, _ = load_queries(tmp_path / "queries")
    fanfare = [q for q in queries if q["source"] == "solfege"]
    # 2.1 s of music at 100 bpm (its tempo is in track 1, which the loader obeys)
    assert [(q["length_s"], q["start_s"], q["end_s"]) for q in fanfare] == [(4.1, 0.0, 2.1)] * 2
    assert rep["clips_by_source"] == {"mscore3": 12, "solfege": 2, f"openmsx/{renderer}": 12}
