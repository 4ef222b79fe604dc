from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from index import store
from index.build import BuildOptions, build_index, encode_file, find_midi_files
from model.encoder import Encoder
from model.errors import ModelMismatchError
from server.cli import main
from tests.conftest import make_piece

OPTS = BuildOptions(workers=1, progress=False)  # in-process; one test covers the pool


def test_find_midi_files_walks_folders_and_reports_bad_arguments(midi_folder, tmp_path):
    files, problems = find_midi_files([midi_folder, midi_folder / "notes.txt",
                                       tmp_path / "missing"])
    names = sorted(f.name for f in files)
    assert names == ["empty.mid", "fake.mid", "other.midi", "piece0.mid", "piece1.mid",
                     "piece2.mid", "piece3.mid", "truncated.mid"]
    assert {p["reason"] for p in problems} == {"not_midi_suffix", "missing"}


def test_build_encodes_good_files_and_reports_every_bad_one(midi_folder, tmp_path):
    out = tmp_path / "idx"
    report = build_index(out, [midi_folder], BuildOptions(workers=2, progress=False))
    assert report["n_refs"] == 5 and report["encoded"] == 5
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"fake.mid", "truncated.mid", "empty.mid"}
    assert reasons["empty.mid"] == "no_notes" and reasons["fake.mid"] == "not_midi"
    idx = store.load_index(out, expected_model_id=Encoder.load().model_id)
    assert idx.report["skipped"] == report["skipped"]
    enc = Encoder.load()
    for k, ref in enumerate(idx.refs):
        hashes = idx.hash_sequence(k)
        assert hashes.shape == (ref["n_frames"] // 4,)
        emb, starts = idx.windows(k)
        assert emb.shape[1] == 128 and starts[0] == 0
        assert len(ref["sha256"]) == 64 and ref["duration_s"] > 10
    # what the worker processes stored equals encoding the file here
    ref0, h0, e0, s0 = encode_file(midi_folder / "piece0.mid", enc)
    k0 = [r["path"] for r in idx.refs].index(str((midi_folder / "piece0.mid").resolve()))
    np.testing.assert_array_equal(idx.hash_sequence(k0), h0)
    np.testing.assert_allclose(idx.windows(k0)[0].astype(np.float32), e0.astype(np.float32),
                               atol=1e-3)


def test_rebuild_skips_unchanged_adds_new_and_updates_changed(midi_folder, tmp_path):
    out = tmp_path / "idx"
    build_index(out, [midi_folder], OPTS)
    first = store.load_index(out)
    again = build_index(out, [midi_folder], OPTS)
    assert again["encoded"] == 0 and again["reused"] == 5 and again["n_refs"] == 5

    make_piece(99, duration_s=14).write(str(midi_folder / "new.mid"))
    make_piece(98, duration_s=13).write(str(midi_folder / "piece1.mid"))  # changed content
    third = build_index(out, [midi_folder], OPTS)
    assert third["encoded"] == 2 and third["updated"] == 1 and third["n_refs"] == 6
    idx = store.load_index(out)
    paths = [r["path"] for r in idx.refs]
    assert paths[:5] == [r["path"] for r in first.refs]  # reference numbers stay stable
    k1 = paths.index(str((midi_folder / "piece1.mid").resolve()))
    assert idx.refs[k1]["sha256"] != first.refs[k1]["sha256"]

    (midi_folder / "new.mid").unlink()
    kept = build_index(out, [midi_folder], OPTS)
    assert kept["n_refs"] == 6  # missing files are kept unless asked
    pruned = build_index(out, [midi_folder], BuildOptions(workers=1, progress=False,
                                                          prune_missing=True))
    assert pruned["n_refs"] == 5 and pruned["removed_missing"] == 1


def test_other_model_is_refused_unless_rebuild(midi_folder, tmp_path):
    out = tmp_path / "idx"
    build_index(out, [midi_folder / "piece0.mid"], OPTS)
    weights = tmp_path / "other.pt"
    other_id = Encoder.untrained(seed=7).save(weights)
    with pytest.raises(ModelMismatchError, match="--rebuild"):
        build_index(out, [midi_folder / "piece0.mid"], BuildOptions(weights=str(weights),
                                                                    progress=False))
    build_index(out, [midi_folder / "piece0.mid"],
                BuildOptions(weights=str(weights), rebuild=True, progress=False))
    assert store.load_index(out).model_id == other_id


def test_window_hop_makes_more_windows_and_an_index_keeps_its_own(midi_folder, tmp_path):
    from dataclasses import replace

    piece = [midi_folder / "piece0.mid"]
    a = build_index(tmp_path / "a", piece, OPTS)
    b = build_index(tmp_path / "b", piece, replace(OPTS, window_hop=27))
    ia, ib = store.load_index(tmp_path / "a"), store.load_index(tmp_path / "b")
    assert ia.meta["window"]["hop"] == 108 and ib.meta["window"]["hop"] == 27
    assert ib.embeddings.shape[0] > ia.embeddings.shape[0]
    assert a["n_refs"] == b["n_refs"] == 1
    # windows every 27 frames start where the encoder says they do
    starts = np.asarray(ib.embed_start)
    assert starts[0] == 0 and np.all(np.diff(starts[:-1]) == 27)
    with pytest.raises(ModelMismatchError, match="window"):
        build_index(tmp_path / "a", piece, replace(OPTS, window_hop=54))
    with pytest.raises(Exception, match="window hop"):
        build_index(tmp_path / "c", piece, replace(OPTS, window_hop=0))


def test_cli_build_and_info(midi_folder, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", "build", str(out), str(midi_folder), "--no-progress",
                 "--workers", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_refs"] == 5 and report["bytes_per_ref"] > 0
    assert main(["index", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["references"] == 5 and info["last_build"]["skipped"] == 3
    shutil.rmtree(out)
    assert main(["index", "info", str(out)]) == 2
    assert "no CURRENT" in capsys.readouterr().err
