"""``midimatch identify``: output shapes and exit codes."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import soundfile as sf

from index.build import BuildOptions, build_index
from model.encoder import Encoder
from model.training.render import render
from server.cli import main
from tests.conftest import make_piece

RATE = 44100  # not the model's rate: the CLI resamples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("identify")
    songs = root / "songs"
    songs.mkdir()
    pieces = [make_piece(200 + i, duration_s=30.0, program=(0, 40, 73)[i], drums=False)
              for i in range(3)]
    for i, pm in enumerate(pieces):
        pm.write(str(songs / f"tune{i}.mid"))
    build_index(root / "idx", [songs], BuildOptions(workers=1, progress=False))
    audio = render(pieces[1], "sine", sample_rate=RATE)
    stereo = np.stack([audio, 0.5 * audio], axis=1)[int(8 * RATE):int(20 * RATE)]
    sf.write(root / "query.flac", stereo, RATE)
    return root


def run(capsys, *argv):
    code = main(["identify", *map(str, argv)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_json_output(setup, capsys):
    code, out, _ = run(capsys, "--index", setup / "idx", setup / "query.flac", "--json",
                       "--top", "2")
    assert code == 0
    assert len(out.splitlines()) == 1  # one object per line
    res = json.loads(out)
    assert res["status"] == "ok" and res["audio"] == str(setup / "query.flac")
    assert res["decision"] in ("identified", "not_in_collection")
    assert (res["identified"] is None) == (res["decision"] == "not_in_collection")
    assert len(res["matches"]) == 2
    top = res["matches"][0]
    assert top["title"] == "tune1"
    assert set(top) == {"ref", "id", "title", "confidence", "score", "start_s", "end_s",
                        "position_s"}
    assert abs(top["position_s"] - 20.0) < 0.5  # seconds stay seconds in JSON
    assert res["query_s"] == pytest.approx(12.0, abs=0.01)
    assert res["model_id"] == Encoder.load().model_id and res["n_candidates"] == 3


def test_one_line_per_file_ranking_and_excerpt_options(setup, capsys):
    code, out, _ = run(capsys, "--index", setup / "idx", setup / "query.flac",
                       "--start", "2", "--duration", "8", "--ranking", "--top", "3")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith((f"{setup / 'query.flac'}: identified: tune1 at 0:18 ",
                                f"{setup / 'query.flac'}: not in the collection (best: tune1,"))
    assert lines[1].split() == ["rank", "confidence", "score", "position", "title"]
    assert lines[2].split()[0] == "1" and lines[2].split()[-1] == "tune1"
    assert lines[2].split()[3] == "0:18"  # 8 s + 2 s + 8 s into the piece, m:ss
    assert len(lines) == 2 + 3


def test_many_files_one_model_load_and_the_exit_status(setup, capsys, tmp_path, monkeypatch):
    from index.search import Cascade

    opened = []
    real_open = Cascade.open.__func__
    monkeypatch.setattr(Cascade, "open", classmethod(
        lambda cls, *a, **k: opened.append(a) or real_open(cls, *a, **k)))
    folder = tmp_path / "takes"
    folder.mkdir()
    x, rate = sf.read(setup / "query.flac", dtype="float32")
    sf.write(folder / "a.wav", x, rate)
    sf.write(folder / "b.ogg", x[: rate * 10], rate)
    (folder / "notes.txt").write_text("not audio: skipped by suffix")
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(RATE * 5, np.float32), RATE)
    missing = tmp_path / "missing.wav"
    argv = ["--index", setup / "idx", setup / "query.flac", folder, silent, missing]

    code, out, err = run(capsys, *argv)
    assert code == 1 and len(opened) == 1  # one failure; the model and index loaded once
    lines = out.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [
        str(missing), str(setup / "query.flac"), str(folder / "a.wav"), str(folder / "b.ogg"),
        str(silent)]  # problems with the arguments first (found before loading the model)
    assert lines[0] == f"{missing}: error: {missing} does not exist"
    assert all("tune1" in line for line in lines[1:4])
    assert lines[4] == f"{silent}: silent: nothing to identify"
    assert "5 files:" in err and "1 silent, 0 too short, 1 failed" in err

    code, out, _ = run(capsys, *argv, "--json")
    assert code == 1
    objs = [json.loads(line) for line in out.splitlines()]
    assert [o["status"] for o in objs] == ["error", "ok", "ok", "ok", "ok"]
    assert objs[0]["error"]["reason"] == "missing"
    assert [o["decision"] for o in objs[1:]][-1] == "silent"
    assert objs[-1]["matches"] == [] and objs[-1]["identified"] is None

    code, out, _ = run(capsys, "--index", setup / "idx", setup / "query.flac", silent)
    assert code == 0  # silence is an answer, not a failure


def test_progress_bar_on_stderr_for_many_files(setup, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    query = setup / "query.flac"
    code = main(["identify", "--index", str(setup / "idx"), str(query), str(query)])
    out = capsys.readouterr().out
    assert code == 0 and len(out.splitlines()) == 2
    assert "identify" in term.getvalue() and "2/2" in term.getvalue()
    term.seek(0)
    term.truncate()
    main(["identify", "--index", str(setup / "idx"), str(query), str(query), "--no-progress"])
    assert "2/2" not in term.getvalue()


def test_help_says_the_defaults_the_answers_and_the_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["identify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for said in ("--top N matches per file in --json and --ranking (default 5)",
                 "--device DEVICE torch device (default cpu)",
                 "--start S ignore the audio before S seconds (default 0.0)",
                 "(default: to the end)", "(default: the shipped model)",
                 "silent: nothing to identify", "exit status: 0 when every file",
                 "1 when at least one file failed", "2 when nothing could run"):
        assert said in text, said


def test_errors(setup, capsys, tmp_path):
    idx, query = setup / "idx", setup / "query.flac"
    sf.write(tmp_path / "short.wav", 0.3 * np.sin(np.arange(RATE // 2) * 0.05), RATE)
    (tmp_path / "text.wav").write_text("not audio")
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other.pt"
    Encoder.untrained(seed=3).save(other)
    per_file = [  # the file's line says why; exit 1
        (("--index", idx, tmp_path / "missing.wav"), "missing.wav does not exist"),
        (("--index", idx, tmp_path / "text.wav"), "cannot read audio"),
        (("--index", idx, query, "--start", "100"), "past the end"),
        (("--index", idx, tmp_path / "empty"), "no audio files"),
    ]
    for argv, message in per_file:
        code, out, err = run(capsys, *argv)
        assert code == 1, argv
        assert ": error: " in out and message in out, (argv, out)
    # under the 2 s a query needs, not silent: an answer (as a stream's final result says it,
    # tests/server/test_answers.py), not a failure
    code, out, _ = run(capsys, "--index", idx, tmp_path / "short.wav")
    assert code == 0 and out.strip() == f"{tmp_path / 'short.wav'}: too short to identify: " \
        "under 2 s of music", out
    code, out, _ = run(capsys, "--index", idx, tmp_path / "short.wav", "--json")
    assert code == 0 and json.loads(out)["answer"] == {
        "kind": "too_short", "text": "too short to identify: under 2 s of music"}
    nothing_runs = [  # exit 2, the message on stderr
        (("--index", tmp_path / "nothing", query), "not a midimatch index"),
        (("--index", idx, query, "--weights", other), "was built with model"),
        (("--index", idx, query, "--top", "0"), "--top"),
    ]
    for argv, message in nothing_runs:
        code, out, err = run(capsys, *argv)
        assert code == 2, argv
        assert message in err, (argv, err)
        assert out == ""
@pytest.mark.parametrize("suffix", [".ogg", ".mp3"])
def test_compressed_mono_audio_at_another_rate(setup, capsys, tmp_path, suffix):
    mono, rate = sf.read(setup / "query.flac", dtype="float32")
    path = tmp_path / f"query{suffix}"
    sf.write(path, mono[:, 0], rate)  # libsndfile writes (and reads) Vorbis and MP3
    code, out, _ = run(capsys, "--index", setup / "idx", path, "--json")
    assert code == 0
    top = json.loads(out)["matches"][0]
    assert top["title"] == "tune1" and abs(top["position_s"] - 20.0) < 0.5


@pytest.fixture(scope="module")
def long_take(setup):
    """Two minutes: 108 s of low noise, then the 12 s query; and a copy of its last 21 s, cut
    on the CQT's frame grid (a multiple of 2,048 samples at 44.1 kHz)."""
    x, rate = sf.read(setup / "query.flac", dtype="float32")
    noise = 0.01 * np.random.default_rng(5).standard_normal((108 * rate, 2)).astype(np.float32)
    sf.write(setup / "long.wav", np.concatenate([noise, x]), rate)
    take, _ = sf.read(setup / "long.wav", dtype="float32")  # as 16-bit PCM holds it
    cut = (take.shape[0] - 21 * rate) // 2048 * 2048
    sf.write(setup / "long_end.wav", take[cut:], rate)
    return setup / "long.wav", setup / "long_end.wav", take


def test_identify_reads_and_analyses_only_the_end_of_a_long_file(setup, capsys, monkeypatch,
                                                                 long_take):
    """The search covers the last 20 s (+ 1 s of CQT edge): a 40-min WAV was read whole (4 GB,
    25 s) and all of it analysed. Now only its end is read, the frames are those of the whole
    file's end, and the answer is the one the whole file gave."""
    from index.cascade_types import CascadeConfig
    from index.search import Cascade

    long, long_end, take = long_take
    reads, analysed = [], []
    real_read = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read",  # sf.read goes through it too
                        lambda f, *a, **k: reads.append(len(out := real_read(f, *a, **k))) or out)
    real_search = Cascade.search_audio
    monkeypatch.setattr(Cascade, "search_audio", lambda self, audio, rate: analysed.append(
        audio.shape[0]) or real_search(self, audio, rate))
    code, out, _ = run(capsys, "--index", setup / "idx", long, "--json", "--top", "3")
    assert code == 0
    res = json.loads(out)
    assert res["query_s"] == pytest.approx(120.0, abs=0.01)  # the whole part's length
    cascade = Cascade.open(setup / "idx", config=CascadeConfig(top_n=3))
    # 20 s searched + 1 s of CQT edge + under 0.05 s to start on the frame grid, of 120 s
    assert 21 * RATE <= sum(reads) <= 21.1 * RATE, sum(reads) / RATE
    assert len(analysed) == 1 and 21 * RATE <= analysed[0] <= sum(reads)
    # the answer of the whole file, searched as identify searched it before
    whole = real_search(cascade, take, RATE)
    assert res["matches"] == [m.to_dict() for m in whole.matches]
    assert res["matches"][0]["title"] == "tune1"
    # ... and the answer of a file of its last 21 s
    code, out, _ = run(capsys, "--index", setup / "idx", long_end, "--json", "--top", "3")
    assert code == 0 and json.loads(out)["matches"] == res["matches"]


def test_a_file_without_samples_is_silent_as_its_stream_is(setup, capsys, tmp_path):
    """`midimatch stream` of a WAV with no samples ends "silent: nothing to identify" (exit 0);
    identify said "error: ... holds no samples" (exit 1)."""
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 2), np.float32), RATE)
    code, out, _ = run(capsys, "--index", setup / "idx", empty)
    assert code == 0 and out == f"{empty}: silent: nothing to identify\n"
    code, out, _ = run(capsys, "--index", setup / "idx", empty, "--json")
    res = json.loads(out)
    assert code == 0 and res["decision"] == "silent" and res["query_s"] == 0.0


def test_random_bytes_are_not_a_readable_audio_file(setup, capfd, tmp_path):
    """libsndfile said "File does not exist or is not a regular file (possibly a pipe?)" of a
    .mp3 of random bytes, and its MP3 decoder printed notes on stderr."""
    path = tmp_path / "random.mp3"
    path.write_bytes(np.random.default_rng(1).bytes(20000))
    code = main(["identify", "--index", str(setup / "idx"), str(path)])
    cap = capfd.readouterr()
    assert code == 1
    assert cap.out == f"{path}: error: cannot read audio {path}: not a readable audio file\n"
    assert "Note:" not in cap.err and "does not exist" not in cap.out + cap.err


def test_bad_device_weights_start_and_duration_are_one_line_errors_before_any_work(
        setup, capsys, tmp_path):
    idx, query = setup / "idx", setup / "query.flac"
    wav = tmp_path / "take.wav"
    sf.write(wav, np.zeros((RATE, 1), np.float32), RATE)
    cases = [
        (("--device", "bogus"), "unknown torch device 'bogus'"),
        (("--device", "cuda:99"), "cuda:99"),
        (("--weights", wav), f"cannot load model weights {wav}"),
        (("--weights", tmp_path), "is a folder"),
        (("--start", "nan"), "--start must be a finite number"),
        (("--start", "inf"), "--start must be a finite number"),
        (("--duration", "inf"), "--duration must be a finite number"),
        (("--duration", "nan"), "--duration must be a finite number"),
    ]
    for extra, said in cases:
        code, out, err = run(capsys, "--index", idx, query, *extra)
        assert code == 2, extra
        assert out == "" and len(err.splitlines()) == 1 and said in err, (extra, err)
    # index build reads its --weights the same way
    code = main(["index", "build", str(tmp_path / "new"), str(setup / "songs"), "--weights",
                 str(wav)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "cannot load model weights" in err
    assert not (tmp_path / "new").exists()
