from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from index.evaluation.evaluate import (
    baseline_subset,
    calibrate_halves,
    format_table,
    piece_half,
    rank_in_matches,
    run_cascade,
    summarize,
    true_refs,
)
from model.errors import MidimatchError
from tests.conftest import make_piece


@dataclass(frozen=True)
class M:
    ref: int
    confidence: float
    score: float
    start_s: float = 0.0
    position_s: float = 0.0


@dataclass
class R:
    matches: list
    identified: M | None
    timings_s: dict = field(default_factory=lambda: {"total": 0.01})


def test_rank_counts_exact_ties_against_the_truth():
    a, b, c = M(0, 0.9, 3.0), M(1, 0.9, 3.0), M(2, 0.4, 5.0)
    assert rank_in_matches([a, b, c], 0) == 2  # b ties a exactly: a miss for a...
    assert rank_in_matches([a, b, c], 1) == 2  # ...and for b
    assert rank_in_matches([M(0, 0.9, 2.0), b, c], 0) == 1  # same confidence, better score
    assert rank_in_matches([a, b, c], 2) == 3
    assert rank_in_matches([a, b, c], 7) == math.inf


def test_true_refs_maps_pieces_and_refuses_unindexed(tmp_path):
    refs = [{"path": str(tmp_path / "a.mid")}, {"path": str(tmp_path / "b.mid")}]
    qs = [{"kind": "in", "ref_path": str(tmp_path / "b.mid")}, {"kind": "out", "ref_path": None}]
    assert true_refs(refs, qs) == [1, None]
    with pytest.raises(MidimatchError) as e:
        true_refs(refs, [{"kind": "in", "ref_path": str(tmp_path / "c.mid")}])
    assert e.value.reason == "not_indexed"


class FakeCascade:
    """Answers from a table: query i → (candidate ids, matches, identified)."""

    def __init__(self, answers):
        self.answers = answers

    def encode(self, frames):
        return type("Code", (), {"embedding": np.array([frames[0, 0]], np.float32),
                                 "hashes": np.zeros(3, np.uint32)})()

    def prune(self, emb, hashes):
        assert len(hashes) == len(emb)  # the hash prune's queries go with the embeddings
        return np.stack([self.answers[int(e[0])][0] for e in emb]), None

    def search_codes(self, codes, pruned=None):
        assert pruned is not None and len(pruned[0]) == len(codes)  # the prune is not run twice
        return [R(*self.answers[int(c.embedding[0])][1:]) for c in codes]


def _q(kind, piece, cond="clean", length=10.0, end_s=20.0):
    return {"kind": kind, "piece": piece, "condition": cond, "length_s": length,
            "start_s": end_s - length, "end_s": end_s}


def test_run_cascade_and_summary_figures():
    answers = [
        # in, right and confident, position 0.5 s off, pruned at rank 1
        (np.array([3, 1, 2]), [M(3, 0.9, 1.0, 10.2, 20.5), M(1, 0.2, 4.0)], M(3, 0.9, 1.0)),
        # in, second (rank 2), pruned at rank 3
        (np.array([0, 1, 3]), [M(0, 0.8, 1.0), M(3, 0.7, 2.0)], M(0, 0.8, 1.0)),
        # in, not pruned, not found
        (np.array([0, 1, 2]), [M(0, 0.3, 1.0)], None),
        # out, confidently wrong: a false-confident answer
        (np.array([0, 1, 2]), [M(2, 0.95, 1.0)], M(2, 0.95, 1.0)),
        # out, not confident
        (np.array([0, 1, 2]), [M(1, 0.1, 6.0)], None),
    ]
    queries = [_q("in", "p3"), _q("in", "p3"), _q("in", "p3"), _q("out", "x"), _q("out", "y")]
    frames = [np.full((5, 48), i, np.float32) for i in range(5)]
    out = run_cascade(FakeCascade(answers), queries, frames, [3, 3, 3, None, None],
                      batch_size=2, progress=False)
    assert [o["rank"] for o in out[:3]] == [1, 2, math.inf]
    assert [o["prune_rank"] for o in out[:3]] == [1, 3, math.inf]
    g = summarize(out, top_k=3)["clean/10"]
    assert g["n_in"] == 3 and g["n_out"] == 2
    assert g["top1"] == pytest.approx(1 / 3) and g["top5"] == pytest.approx(2 / 3)
    assert g["median_rank"] == 2
    assert g["identified"] == pytest.approx(1 / 3)
    assert g["confident_wrong"] == pytest.approx(1 / 3)  # query 2: confident, wrong piece
    assert g["position_error_median_s"] == pytest.approx(0.5)
    assert g["start_error_median_s"] == pytest.approx(0.2)
    assert g["prune_recall@3"] == pytest.approx(2 / 3)
    assert g["false_confident"] == pytest.approx(0.5)
    assert "clean/10" in format_table(summarize(out, top_k=3), top_k=3)


def test_position_errors_at_a_repeat_are_counted_apart(tmp_path):
    import pretty_midi

    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(0)
    for rep in (0.0, 20.0):  # 0..10 s repeated at 20..30 s; 10..20 s is other music
        inst.notes += [pretty_midi.Note(90, 60 + i % 7, rep + i * 0.5, rep + i * 0.5 + 0.4)
                       for i in range(20)]
    inst.notes += [pretty_midi.Note(90, 40 + i % 5, 10 + i * 0.3, 10 + i * 0.3 + 0.2)
                   for i in range(30)]
    pm.instruments.append(inst)
    path = tmp_path / "aba.mid"
    pm.write(str(path))
    q = {"kind": "in", "condition": "clean", "length_s": 5.0, "piece": str(path),
         "ref_path": str(path), "start_s": 2.0, "end_s": 7.0}
    answers = [  # position found: the true 7 s (0.3 s off), its repeat at 27 s, other music
        (np.array([0]), [M(0, 0.9, 1.0, 2.3, 7.3)], None),
        (np.array([0]), [M(0, 0.9, 1.0, 22.0, 27.0)], None),
        (np.array([0]), [M(0, 0.9, 1.0, 12.0, 17.0)], None),
    ]
    frames = [np.full((5, 48), i, np.float32) for i in range(3)]  # frame value: answer row
    out = run_cascade(FakeCascade(answers), [q] * 3, frames, [0, 0, 0], progress=False)
    assert "position_repeat_similarity" not in out[0]
    assert out[1]["position_repeat_similarity"] == pytest.approx(1.0)
    assert out[2]["position_repeat_similarity"] < 0.5
    g = summarize(out)["clean/5"]
    assert g["position_within_1s"] == pytest.approx(1 / 3)
    assert g["position_within_1s_or_repeat"] == pytest.approx(2 / 3)


def test_confident_outsiders_that_are_duplicates_are_counted_apart(tmp_path):
    import pretty_midi

    def write(name, pitches):
        pm = pretty_midi.PrettyMIDI()
        inst = pretty_midi.Instrument(0)
        inst.notes = [pretty_midi.Note(90, p, i * 0.5, i * 0.5 + 0.4)
                      for i, p in enumerate(pitches)]
        pm.instruments.append(inst)
        pm.write(str(tmp_path / name))
        return str(tmp_path / name)

    tune = [60, 62, 64, 65, 67, 65, 64, 62] * 5
    indexed = write("book1_tune.mid", tune)
    copy = write("book2_tune.mid", tune)  # the same tune under another name, not indexed
    other = write("other.mid", [50, 55, 57, 52, 59] * 8)

    class WithIndex(FakeCascade):
        index = type("Idx", (), {"refs": [{"path": indexed}]})()

    answers = [(np.array([0]), [M(0, 0.9, 1.0, 2.0, 12.0)], M(0, 0.9, 1.0, 2.0, 12.0))] * 2
    qs = [{"kind": "out", "condition": "clean", "length_s": 10.0, "piece": p, "start_s": 2.0,
           "end_s": 12.0} for p in (copy, other)]
    frames = [np.full((5, 48), i, np.float32) for i in range(2)]
    out = run_cascade(WithIndex(answers), qs, frames, [None, None], progress=False)
    assert out[0]["duplicate_similarity"] == pytest.approx(1.0)
    assert out[1]["duplicate_similarity"] < 0.5
    g = summarize(out)["clean/10"]
    assert g["false_confident"] == 1.0 and g["false_confident_not_duplicate"] == 0.5


def test_calibration_is_fitted_on_one_half_and_measured_on_the_other():
    pieces = [f"piece{i}" for i in range(40)]
    assert {piece_half(p) for p in pieces} == {0, 1}
    outcomes = []
    for p in pieces:
        outcomes.append({"kind": "in", "piece": p, "length_s": 10.0, "true_ref": 1,
                         "top1_ref": 1, "top1_confidence": 0.9})
        # outsiders of half 0 stay at 0.5, those of half 1 reach 0.8: thresholds differ
        out = p + "x"
        outcomes.append({"kind": "out", "piece": out, "length_s": 10.0, "true_ref": None,
                         "top1_ref": 0, "top1_confidence": 0.5 if piece_half(out) == 0 else 0.8})
    res = calibrate_halves(outcomes, "m")
    assert res["fit0_test1"]["threshold"] < res["fit1_test0"]["threshold"]
    assert res["fit0_test1"]["test"]["all"]["false_confident"] == 1.0  # 0.8 > threshold of 0
    for name, r in res.items():
        fit = int(name[3])
        fit_out = [o["top1_confidence"] for o in outcomes
                   if o["kind"] == "out" and piece_half(o["piece"]) == fit]
        assert r["threshold"] > max(fit_out)  # ≤ 1 % of 20-odd outsiders: none confident
        test_out = [o["top1_confidence"] for o in outcomes
                    if o["kind"] == "out" and piece_half(o["piece"]) != fit]
        expect = float(np.mean([c >= r["threshold"] for c in test_out]))
        assert r["test"]["all"]["false_confident"] == pytest.approx(expect)
        assert r["test"]["all"]["recall"] == 1.0


def test_baseline_subset_takes_in_collection_queries_of_each_cell():
    qs = [_q("in", "a"), _q("in", "b", length=5.0), _q("out", "c"), _q("in", "d"),
          _q("in", "e", cond="room_noise")]
    chosen = baseline_subset(qs, [("clean", 10.0), ("room_noise", 10.0)], per_cell=5)
    assert chosen == [0, 3, 4]
    assert len(baseline_subset(qs, [("clean", 10.0)], per_cell=1)) == 1


def test_with_the_real_cascade_on_a_tiny_index(tmp_path):
    from index.build import BuildOptions, build_index
    from index.evaluation.evalset import QuerySetConfig, clips_of_piece
    from index.search import Cascade

    files = []
    for seed in range(4):
        p = tmp_path / f"p{seed}.mid"
        make_piece(seed + 30, duration_s=30.0, drums=False).write(str(p))
        files.append(p)
    build_index(tmp_path / "index", files, BuildOptions(workers=1, progress=False))
    cascade = Cascade.open(tmp_path / "index")
    cfg = QuerySetConfig(lengths_s=(10.0,), conditions=("clean",), renderer="sine")
    queries, frames = [], []
    for p in files[:2]:
        recs, fr = clips_of_piece({"path": str(p)}, cfg.conditions, cfg)
        queries += [{**r, "kind": "in", "piece": str(p), "ref_path": str(p)} for r in recs]
        frames += [f.astype(np.float32) for f in fr]
    refs = true_refs(cascade.index.refs, queries)
    out = run_cascade(cascade, queries, frames, refs, progress=False)
    assert [o["true_ref"] for o in out] == refs
    for o in out:
        assert o["prune_rank"] <= 4  # K = 100 keeps all four references
        assert o["rank"] <= 4  # top_n = 5 returns all four: the true one is among them
        assert set(o["stage_s"]) >= {"encode", "prune", "verify", "confirm", "total"}
    g = summarize(out, top_k=100)["clean/10"]
    assert g["n_in"] == 2 and g["prune_recall@100"] == 1.0
