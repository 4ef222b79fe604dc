"""Training: the seed's objective and metric, the shard format, and short real training runs.

The training runs use a synthetic data set where a mapping exists by construction: the audio
frames are a fixed random "timbre" (a sparse positive 48×48 mix) of the MIDI piano roll plus
noise, so a few dozen batches of tiny networks already separate matches from non-matches.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.encoder import Encoder
from model.errors import MidimatchError
from model.nets import NetConfig
from model.training.losses import (
    PairSampler,
    batch_nce,
    bhattacharyya,
    contrastive_loss,
    contrastive_terms,
    derangement,
    embed_bin_edges,
    embed_histogram,
    piece_recall,
)
from model.training.train import (
    PairData,
    embed_params,
    evaluate_bc,
    hash_params,
    train,
    write_shard,
)

TINY = NetConfig(n_bits=16, hash_hidden=32, embed_dim=16, embed_hidden=32, conv1_filters=4,
                 conv2_filters=8)
HASH = replace(hash_params(TINY), batch_size=16, validate_every=10, lr=3e-3)
EMBED = replace(embed_params(), batch_size=16, validate_every=10, lr=1e-3, margin=1.5)


# ---------------------------------------------------------------------------- objective
@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 300), seed=st.integers(0, 2**32 - 1))
def test_derangement_is_a_permutation_without_fixed_points(n, seed):
    perm = derangement(n, np.random.default_rng(seed))
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    assert not np.any(perm == np.arange(n))


def test_derangement_avoids_pairing_a_piece_with_itself_when_it_can():
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    for seed in range(20):
        perm = derangement(len(groups), np.random.default_rng(seed), groups)
        assert not np.any(groups[perm] == groups)
    one_piece = np.zeros(5, np.int64)  # impossible: still a derangement
    perm = derangement(5, np.random.default_rng(0), one_piece)
    assert not np.any(perm == np.arange(5))
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, np.random.default_rng(0))


def test_contrastive_loss_matches_a_hand_computed_value():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    perm = torch.tensor([1, 0])
    # positives: ‖x0−y0‖² = 1, ‖x1−y1‖² = 0 → 0.5
    # negatives: ‖x0−y1‖ = 1, ‖x1−y0‖ = √2; margin 2 → ((2−1)² + (2−√2)²)/2 = (7 − 4√2)/2
    # output L2: (0 + 1 + 1 + 1)/2 = 1.5
    got = contrastive_loss(x, y, x, y[perm], alpha=3.0, margin=2.0, beta=0.1)
    assert got.item() == pytest.approx(0.5 + 3.0 * (7 - 4 * math.sqrt(2)) / 2 + 0.1 * 1.5)
    # DHS passes (batch, steps, bits): the mean runs over every leading axis
    x3, y3 = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    flat = contrastive_loss(x3.reshape(15, 4), y3.reshape(15, 4), x3.reshape(15, 4),
                            y3[[2, 0, 1]].reshape(15, 4), alpha=2.0, margin=3.0)
    assert contrastive_loss(x3, y3, x3, y3[[2, 0, 1]], alpha=2.0, margin=3.0).item() == \
        pytest.approx(flat.item())


def test_hinge_is_zero_beyond_the_margin():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    y = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    neg = y[[1, 0]]  # negative distances 1 and √2
    positive, hinge, _ = contrastive_terms(x, y, x, neg, margin=0.99)
    assert hinge.item() == 0.0
    hinge.backward()
    assert torch.all(x.grad == 0)
    _, hinge, _ = contrastive_terms(x, y, x, neg, margin=1.2)  # only the first pair is inside
    assert hinge.item() == pytest.approx(0.2**2 / 2)


def test_batch_nce_matches_a_hand_computed_value_and_ignores_the_same_piece():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    d = torch.cdist(x, y).pow(2)  # [[1, 1, 0], [2, 0, 1], [5, 5, 4]]
    tau = 2.0

    def ce(logits: torch.Tensor, i: int) -> float:
        return float(-(logits[i] - torch.logsumexp(logits, 0)))

    # all pieces different: the mean of row-wise and column-wise cross-entropies
    rows = np.mean([ce(-d[i] / tau, i) for i in range(3)])
    cols = np.mean([ce(-d[:, j] / tau, j) for j in range(3)])
    got = batch_nce(x, y, torch.tensor([0, 1, 2]), tau)
    assert float(got) == pytest.approx(0.5 * (rows + cols), rel=1e-6)
    # items 0 and 2 of one piece: neither is the other's negative any more
    keep = [[0, 1], [0, 1, 2], [1, 2]]  # the columns (or rows) left for each item
    rows = np.mean([ce(-d[i, keep[i]] / tau, keep[i].index(i)) for i in range(3)])
    cols = np.mean([ce(-d[keep[j], j] / tau, keep[j].index(j)) for j in range(3)])
    got = batch_nce(x, y, torch.tensor([7, 1, 7]), tau)
    assert float(got) == pytest.approx(0.5 * (rows + cols), rel=1e-6)
    with pytest.raises(ValueError, match="tau"):
        batch_nce(x, y, torch.tensor([0, 1, 2]), 0.0)


def test_batch_nce_falls_when_the_positive_is_the_nearest():
    rng = torch.Generator().manual_seed(0)
    y = 3.0 * torch.randn(8, 4, generator=rng)  # spread out: every pair far apart
    groups = torch.arange(8)
    near = batch_nce(y + 0.01, y, groups, 1.0)
    far = batch_nce(y[torch.randperm(8, generator=rng)], y, groups, 1.0)
    assert float(near) < 0.1 < float(far)


def test_piece_recall_ranks_pieces_by_their_nearest_window():
    # 4 query windows; pieces a, a, b, c (window i's match is MIDI window i)
    d = np.array([[1.0, 5.0, 0.5, 3.0],   # own piece a at 1.0; b (0.5) nearer: rank 1
                  [2.0, 0.9, 1.0, 3.0],   # own a at min(2.0, 0.9): rank 0
                  [0.1, 0.2, 0.3, 0.05],  # own b at 0.3; a (0.1) and c (0.05) nearer: rank 2
                  [4.0, 4.0, 4.0, 4.0]])  # a tie is not "nearer": rank 0
    got = piece_recall(d, np.array([10, 10, 20, 30]), ks=(1, 2, 3))
    assert got == {"pieces": 3, "recall@1": 0.5, "recall@2": 0.75, "recall@3": 1.0}


def test_bhattacharyya_identical_is_one_and_disjoint_is_zero():
    p = np.array([1, 5, 3, 0, 2])
    assert bhattacharyya(p, p) == pytest.approx(1.0)
    assert bhattacharyya(p, 10 * p) == pytest.approx(1.0)  # counts, not densities
    assert bhattacharyya([3, 2, 0, 0], [0, 0, 1, 7]) == 0.0
    assert 0 < bhattacharyya([1, 1, 0], [0, 1, 1]) < 1
    with pytest.raises(ValueError):
        bhattacharyya([0, 0], [1, 1])
    with pytest.raises(ValueError):
        bhattacharyya([1, 1], [1, 1, 1])


def test_embed_histogram_has_fixed_edges_and_an_open_last_bin():
    edges = embed_bin_edges(1.0)
    assert len(edges) == 21 and edges[0] == 0 and edges[-1] == pytest.approx(4.0)
    h = embed_histogram(np.array([0.0, 0.1, 3.99, 4.0, 50.0]), edges)
    assert h.sum() == 5 and h[0] == 2 and h[-1] == 3


# --------------------------------------------------------------------------------- data
def _piece(rng: np.random.Generator, n: int) -> np.ndarray:
    """A piano roll (n, 48): 1–3 notes held for 4–15 frames at a time, from the piece's own
    set of 6 pitches (a crude key, so that windows of one piece have something in common)."""
    pitches = rng.choice(48, 6, replace=False)
    roll = np.zeros((n, 48), np.float32)
    t = 0
    while t < n:
        d = int(rng.integers(4, 16))
        roll[t:t + d, rng.choice(pitches, int(rng.integers(1, 4)), replace=False)] = \
            rng.uniform(0.5, 1.0)
        t += d
    return roll


def _l2(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)).astype(np.float32)


def _synthetic(root: Path, *, n_train: int = 40, n_valid: int = 8, frames: int = 400,
               seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    timbre = np.eye(48) + np.abs(rng.normal(size=(48, 48))) * (rng.random((48, 48)) < 0.1)
    for split, n, first_id in (("train", n_train, 0), ("valid", n_valid, 1000)):
        audio, midi, ids = [], [], []
        for i in range(n):
            roll = _piece(rng, frames)
            for _ in range(2):  # two "renderings" of each piece: same notes, other noise
                midi.append(_l2(roll + 0.01))
                audio.append(_l2(roll @ timbre + 0.05 * rng.random((frames, 48))))
                ids.append(first_id + i)
        half = len(ids) // 2  # two shards per split: offsets must be rebased when loading
        write_shard(root / split / "a.npz", audio[:half], midi[:half], ids[:half])
        write_shard(root / split / "b.npz", audio[half:], midi[half:], ids[half:])
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return _synthetic(tmp_path_factory.mktemp("pairs"))


def test_sampler_draws_aligned_chunks_and_shifted_windows_and_resumes(data_dir):
    d = PairData.load(data_dir, "train")
    s = PairSampler(d, "hash", 16, 100, 0, np.random.default_rng(0))
    a, m, piece = s.next_batch()
    pair = np.searchsorted(d.offsets, a, side="right") - 1
    assert np.array_equal(a, m) and np.all(a + 100 <= d.offsets[pair + 1])
    assert np.array_equal(piece, d.piece[pair])
    s = PairSampler(d, "embed", 8, 215, 54, np.random.default_rng(0))
    for _ in range(20):
        a, m, _ = s.next_batch()
        pair = np.searchsorted(d.offsets, a, side="right") - 1
        assert np.all(np.abs(m - a) <= 54) and np.all(m >= d.offsets[pair])
        assert np.all(np.maximum(a, m) + 215 <= d.offsets[pair + 1])
    state = s.state()
    after = [s.next_batch() for _ in range(10)]
    s2 = PairSampler(d, "embed", 8, 215, 54, np.random.default_rng(99))
    s2.load_state(state)
    for x, y in zip(after, (s2.next_batch() for _ in range(10)), strict=True):
        np.testing.assert_array_equal(np.stack(x), np.stack(y))


# ----------------------------------------------------------------------------- training
def _train(data_dir: Path, out: Path, **kw) -> dict:
    args = {"config": TINY, "hash_stage": HASH, "embed_stage": EMBED, "max_batches": 60,
            "hash_minutes": 5, "embed_minutes": 5, "max_valid_items": 64, "progress": False,
            "plots": False, "seed": 0, "num_threads": 1, **kw}  # tiny nets: 1 thread is fastest
    return train(data_dir, out, **args)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("model") / "m.pt"
    return _train(data_dir, out, plots=True), out


def test_short_training_lowers_the_validation_bc_and_writes_a_loadable_model(data_dir, trained):
    report, out = trained
    for kind in ("hash", "embed"):
        r = report[kind]
        assert r["batches"] == 60 and r["stop"] == "max_batches"
        assert r["best_bc"] < r["initial_bc"] - 0.05, (kind, r["initial_bc"], r["best_bc"])
        assert r["batches_per_s"] > 0
    assert report["init"] is None  # trained from the untrained nets
    enc = Encoder.load(out)
    assert enc.model_id == report["model_id"] and enc.config == TINY
    np.testing.assert_allclose(enc.mean.numpy(), report["mean"])
    # the shipped file holds the best nets: evaluating it gives the best validation BCs
    bc = evaluate_bc(enc, PairData.load(data_dir, "valid"), max_items=64,
                     embed_margin=EMBED.margin)
    assert bc["hash"]["bc"] == pytest.approx(report["hash"]["best_bc"], abs=1e-6)
    assert bc["embed"]["bc"] == pytest.approx(report["embed"]["best_bc"], abs=1e-6)
    on_disk = json.loads(Path(report["files"]["report"]).read_text())
    assert on_disk["model_id"] == report["model_id"]
    assert len(on_disk["hash"]["histograms"]["trained"]["match"]) == TINY.n_bits + 1
    for key in ("histograms_png", "curves_png", "checkpoint"):
        assert Path(report["files"][key]).stat().st_size > 0


def test_resuming_continues_the_batch_counter_and_the_same_run(data_dir, trained, tmp_path):
    full, _ = trained
    out = tmp_path / "m.pt"
    first = _train(data_dir, out, max_batches=30)
    assert first["hash"]["batches"] == 30 and first["embed"]["batches"] == 30
    again = _train(data_dir, out)  # same out path: picks the checkpoint up
    for kind in ("hash", "embed"):
        assert again[kind]["batches"] == 60
        hist = [(h["batch"], h["bc"], h["loss"]) for h in again[kind]["history"]]
        # same seed → same losses; resumed at 30 → batches 31..60 as if never interrupted
        assert hist == [(h["batch"], h["bc"], h["loss"]) for h in full[kind]["history"]]
    assert again["model_id"] == full["model_id"]


def test_another_seed_gives_another_run_and_a_changed_setup_refuses_to_resume(data_dir,
                                                                               trained, tmp_path):
    full, _ = trained
    other = _train(data_dir, tmp_path / "m.pt", seed=1, max_batches=10, embed_minutes=0)
    assert other["hash"]["history"][1]["loss"] != full["hash"]["history"][1]["loss"]
    assert other["embed"]["batches"] == 0  # a zero budget skips the stage
    with pytest.raises(MidimatchError, match="different seed"):
        _train(data_dir, tmp_path / "m.pt", seed=2)


def test_a_fine_tune_from_a_model_keeps_its_hash_nets_and_statistics(data_dir, trained,
                                                                      tmp_path):
    _, start = trained
    init = Encoder.load(start)
    report = _train(data_dir, tmp_path / "ft.pt", init=start, hash_minutes=0, max_batches=20,
                    embed_stage=replace(EMBED, nce=1.0, tau=0.5, select="recall@3"))
    assert report["hash"]["batches"] == 0 and report["embed"]["batches"] == 20
    assert report["init"] == {"path": str(start), "model_id": init.model_id}
    # the file holds the validation with the best recall@3 (the earliest of equals)
    emb = report["embed"]
    hist = emb["history"]
    best = min(hist, key=lambda h: 1.0 - h["recall@3"])
    assert emb["select"] == "recall@3" and emb["best_batch"] == best["batch"]
    assert emb["best_score"] == pytest.approx(1.0 - best["recall@3"])
    assert emb["best_bc"] == pytest.approx(best["bc"])
    tuned = Encoder.load(tmp_path / "ft.pt")
    np.testing.assert_array_equal(tuned.mean.numpy(), init.mean.numpy())
    np.testing.assert_array_equal(tuned.std.numpy(), init.std.numpy())
    for name in ("hash_audio", "hash_midi"):
        for key, t in init.nets[name].state_dict().items():
            assert torch.equal(tuned.nets[name].state_dict()[key], t), (name, key)
    # the embedding trained (the checkpoint's live nets moved; the file holds the best of
    # them by validation, which may be the init itself)
    live = torch.load(report["files"]["checkpoint"], weights_only=True)["stages"]["embed"]
    assert any(not torch.equal(live["nets"]["audio"][k], t)
               for k, t in init.nets["embed_audio"].state_dict().items())
    # the embedding stage starts from the init's nets, not from untrained ones
    assert report["embed"]["initial_bc"] == pytest.approx(
        evaluate_bc(init, PairData.load(data_dir, "valid"), max_items=64,
                    embed_margin=EMBED.margin)["embed"]["bc"], abs=1e-6)
    first = report["embed"]["history"][0]
    assert {"recall@1", "recall@5"} <= first.keys() and 0.0 <= first["recall@1"] <= 1.0
    with pytest.raises(MidimatchError, match="network config"):
        _train(data_dir, tmp_path / "other.pt", init=start, config=NetConfig())
    with pytest.raises(MidimatchError, match="select must be one of"):
        _train(data_dir, tmp_path / "bad.pt", embed_stage=replace(EMBED, select="recall@2"))
    with pytest.raises(MidimatchError, match="select must be one of"):
        _train(data_dir, tmp_path / "bad.pt", hash_stage=replace(HASH, select="recall@1"))


def test_the_checkpoint_folder_is_created(data_dir, tmp_path):
    # `midimatch train fit --data elsewhere` keeps its checkpoint in a cache folder that need not
    # exist yet; the first checkpoint write crashed there.
    ckpt = tmp_path / "not" / "yet" / "m.ckpt"
    report = _train(data_dir, tmp_path / "m.pt", max_batches=5, embed_minutes=0,
                    checkpoint_path=ckpt)
    assert ckpt.stat().st_size > 0 and report["hash"]["batches"] == 5


def test_train_fit_cli_fine_tunes_the_embedding_of_a_saved_model(data_dir, trained, tmp_path,
                                                                 monkeypatch, capsys):
    from server.cli import main

    _, start = trained
    monkeypatch.setenv("MIDIMATCH_CACHE", str(tmp_path / "cache"))  # the checkpoint goes there
    out = tmp_path / "ft.pt"
    # `train run` left a checkpoint for these weights: the fine-tune must not trip over it
    (tmp_path / "cache" / "train").mkdir(parents=True)
    (tmp_path / "cache" / "train" / "ft.ckpt").write_bytes(b"train run's, another setup")
    # --data takes several folders (read together): the same one twice doubles the pairs
    rc = main(["train", "fit", "--data", str(data_dir), str(data_dir), "--out", str(out),
               "--init", str(start),
               "--hash-minutes", "0", "--embed-minutes", "0.05", "--embed-nce", "1",
               "--embed-tau", "2", "--embed-batch", "8", "--embed-select", "recall@3",
               "--threads", "1"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["init"]["model_id"] == Encoder.load(start).model_id
    report = json.loads((tmp_path / "ft.train.json").read_text())
    assert report["config"] == TINY.to_dict()  # the init's sizes, not --bits' default
    assert report["data"]["train"]["pairs"] == 2 * len(PairData.load(data_dir, "train"))
    assert report["hash"]["batches"] == 0 and report["embed"]["batches"] > 0
    p = report["embed"]["params"]
    assert (p["nce"], p["tau"], p["batch_size"], p["select"]) == (1.0, 2.0, 8, "recall@3")
    assert (tmp_path / "cache" / "train" / "ft.finetune.ckpt").stat().st_size > 0
