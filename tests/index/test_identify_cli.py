"""``midimatch identify``: output shapes and exit codes."""

from __future__ import annotations

import json

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
    res = json.loads(out)
    assert res["decision"] in ("identified", "not_in_collection")
    assert (res["identified"] is None) == (res["decision"] == "not_in_collection")
    assert len(res["matches"]) == 2
    top = res["matches"][0]
    assert top["title"] == "tune1"
    assert set(top) == {"ref", "id", "title", "confidence", "score", "start_s", "end_s",
                        "position_s"}
    assert abs(top["position_s"] - 20.0) < 0.5
    assert res["query_s"] == pytest.approx(12.0, abs=0.01)
    assert res["model_id"] == Encoder.load().model_id and res["n_candidates"] == 3


def test_table_output_and_excerpt_options(setup, capsys):
    code, out, _ = run(capsys, "--index", setup / "idx", setup / "query.flac",
                       "--start", "2", "--duration", "8")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "confidence", "score", "position", "title"]
    assert lines[1].split()[0] == "1" and lines[1].split()[-1] == "tune1"
    assert lines[1].split()[3].startswith("0:18.")  # 8 s + 2 s + 8 s into the piece
    assert lines[-1].startswith(("identified: tune1", "not in the collection"))


def test_errors_exit_2_with_a_message(setup, capsys, tmp_path):
    idx, query = setup / "idx", setup / "query.flac"
    sf.write(tmp_path / "silent.wav", np.zeros(RATE * 5, np.float32), RATE)
    sf.write(tmp_path / "short.wav", 0.3 * np.sin(np.arange(RATE // 2) * 0.05), RATE)
    (tmp_path / "text.wav").write_text("not audio")
    other = tmp_path / "other.pt"
    Encoder.untrained(seed=3).save(other)
    cases = [
        (("--index", tmp_path / "nothing", query), "not a midimatch index"),
        (("--index", idx, tmp_path / "missing.wav"), "no such audio file"),
        (("--index", idx, tmp_path / "text.wav"), "cannot read audio"),
        (("--index", idx, tmp_path / "silent.wav"), "silent"),
        (("--index", idx, tmp_path / "short.wav"), "too short"),
        (("--index", idx, query, "--start", "100"), "past the end"),
        (("--index", idx, query, "--weights", other), "was built with model"),
        (("--index", idx, query, "--top", "0"), "--top"),
    ]
    for argv, message in cases:
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
