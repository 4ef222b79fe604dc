from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.align import align
from index.evaluation.evalset import (
    Plan,
    QuerySetConfig,
    clips_of_piece,
    load_queries,
    make_queries,
    plan_collection,
)
from model.errors import MidimatchError
from model.fastrender import midi_to_frames_fast
from model.features import FRAME_RATE
from model.midi import load_notes
from tests.conftest import make_piece


def _write(path: Path, seed: int, duration_s: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_piece(seed, duration_s=duration_s, drums=False).write(str(path))
    return path


def test_plan_splits_generated_songs_by_seed(tmp_path):
    gen = tmp_path / "generated"
    for seed in range(248, 254):
        _write(gen / f"song_{seed:05d}.mid", seed, 30.0 if seed != 251 else 10.0)
    plan = plan_collection(tmp_path, n_generated_index=252, n_in=5, n_out=5)
    indexed = sorted(Path(p).stem for p in plan.index_files)
    assert indexed == [f"song_{s:05d}" for s in range(248, 252)]
    # in: indexed and never trained on (seed >= 250), long enough (251 is 10 s: not queried)
    assert [Path(p["path"]).stem for p in plan.in_pieces] == ["song_00250"]
    assert sorted(Path(p["path"]).stem for p in plan.out_pieces) == ["song_00252", "song_00253"]
    assert all(p["split"] == "unseen" for p in plan.in_pieces + plan.out_pieces)
    assert not {p["path"] for p in plan.out_pieces} & set(plan.index_files)


def test_plan_leaves_training_only_seeds_out(tmp_path):
    """Songs of seeds from TRAINING_ONLY_SEED on are training data: neither indexed nor queried
    (as outsiders they would be pieces the model trained on)."""
    from model.training.songgen_files import TRAINING_ONLY_SEED

    gen = tmp_path / "generated"
    for seed in (250, 251, 252, TRAINING_ONLY_SEED, TRAINING_ONLY_SEED + 1):
        _write(gen / f"song_{seed:05d}.mid", seed, 30.0)
    plan = plan_collection(tmp_path, n_generated_index=252, n_in=5, n_out=5)
    every = set(plan.index_files) | {p["path"] for p in plan.in_pieces + plan.out_pieces}
    assert sorted(Path(p).stem for p in every) == ["song_00250", "song_00251", "song_00252"]
    assert plan.notes["generated_out_candidates"] == 1


def test_plan_without_data_says_so(tmp_path):
    with pytest.raises(MidimatchError) as e:
        plan_collection(tmp_path)
    assert e.value.reason == "no_data"


def test_clip_positions_are_where_the_reference_plays_them(tmp_path):
    path = _write(tmp_path / "p.mid", 7, 40.0)
    cfg = QuerySetConfig(lengths_s=(5.0, 10.0), conditions=("clean", "tempo1.1"),
                         renderer="sine", seed=3)
    records, frames = clips_of_piece({"path": str(path)}, cfg.conditions, cfg)
    assert [(r["condition"], r["length_s"]) for r in records] == [
        ("clean", 5.0), ("clean", 10.0), ("tempo1.1", 5.0), ("tempo1.1", 10.0)]
    ref = midi_to_frames_fast(load_notes(path))
    for r, f in zip(records, frames, strict=True):
        assert f.dtype == np.float16 and f.shape[1] == 48
        assert f.shape[0] == pytest.approx(r["length_s"] * FRAME_RATE, abs=1.5)
        span = r["end_s"] - r["start_s"]
        assert span == pytest.approx(r["length_s"] * r["tempo"], abs=0.05)
        if r["tempo"] == 1.0:  # same tempo as the reference: the DTW path is the true span
            a = align(f.astype(np.float32), ref)
            assert a.ref_start / FRAME_RATE == pytest.approx(r["start_s"], abs=0.25)
            assert a.ref_end / FRAME_RATE == pytest.approx(r["end_s"], abs=0.25)
    # shorter clips are prefixes of the longer one (one render, one start per tempo)
    np.testing.assert_array_equal(frames[0], frames[1][: frames[0].shape[0]])
    assert records[0]["start_s"] == records[1]["start_s"]


def test_too_short_piece_is_refused(tmp_path):
    path = _write(tmp_path / "short.mid", 1, 8.0)
    cfg = QuerySetConfig(renderer="sine")
    with pytest.raises(MidimatchError) as e:
        clips_of_piece({"path": str(path)}, cfg.conditions, cfg)
    assert e.value.reason == "too_short"


def test_make_and_load_queries_round_trip(tmp_path, monkeypatch):
    a = _write(tmp_path / "m" / "a.mid", 2, 30.0)
    b = _write(tmp_path / "m" / "b.mid", 3, 30.0)
    plan = Plan(index_files=[str(a)],
                in_pieces=[{"path": str(a), "source": "generated", "split": "unseen"}],
                out_pieces=[{"path": str(b), "source": "generated", "split": "unseen"}])
    cfg = QuerySetConfig(lengths_s=(2.0, 5.0), conditions=("clean", "room_noise"),
                         out_conditions=("clean",), renderer="sine")
    out = tmp_path / "q"
    manifest = make_queries(plan, out, cfg, workers=0, progress=False)
    assert len(manifest["queries"]) == 4 + 2
    queries, frames = load_queries(out)
    assert [q["kind"] for q in queries].count("out") == 2
    assert all(q["ref_path"] is None for q in queries if q["kind"] == "out")
    assert all(q["ref_path"] == str(a) for q in queries if q["kind"] == "in")
    assert len(frames) == 6 and all(f.dtype == np.float32 for f in frames)
    # resumable: a second run renders nothing and returns the same set
    def fail(*_a, **_k):
        raise AssertionError("rendered a finished piece again")

    monkeypatch.setattr("index.evaluation.evalset.clips_of_piece", fail)
    again = make_queries(plan, out, cfg, workers=0, progress=False)
    assert again["queries"] == manifest["queries"]


def test_unknown_condition_is_refused():
    with pytest.raises(MidimatchError):
        QuerySetConfig(conditions=("underwater",))
