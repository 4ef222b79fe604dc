"""Tests of model.training.pairs: training shards on disk and their loading into one array per
modality."""

from __future__ import annotations

import numpy as np
import pytest

from model.training.pairs import DataError, PairData, write_shard


def test_shards_round_trip_into_one_float32_array_per_modality(tmp_path):
    rng = np.random.default_rng(1)
    a = [rng.random((n, 48)).astype(np.float32) for n in (5, 7, 3)]
    m = [rng.random((n, 48)).astype(np.float32) for n in (5, 7, 3)]
    write_shard(tmp_path / "train" / "x.npz", a[:2], m[:2], [4, 9])
    write_shard(tmp_path / "train" / "y.npz", a[2:], m[2:], [11])
    d = PairData.load(tmp_path, "train")
    assert d.audio.dtype == np.float32 and d.audio.shape == (15, 48)
    assert d.offsets.tolist() == [0, 5, 12, 15] and d.piece.tolist() == [4, 9, 11]
    np.testing.assert_allclose(d.midi[5:12], m[1], atol=1e-3)  # stored as float16
    assert d.summary() == {"pairs": 3, "pieces": 3, "frames": 15}
    mean, std = d.bin_stats()
    both = np.concatenate([d.audio, d.midi]).astype(np.float64)
    np.testing.assert_allclose(mean, both.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, both.std(0), rtol=1e-4)
    assert not list(tmp_path.rglob("*.tmp"))


def test_bad_shards_are_clear_errors(tmp_path):
    f = np.zeros((4, 48), np.float32)
    with pytest.raises(ValueError, match="equal"):
        write_shard(tmp_path / "s.npz", [f], [f[:3]], [0])
    with pytest.raises(ValueError, match="same"):
        write_shard(tmp_path / "s.npz", [f, f], [f, f], [0])
    with pytest.raises(DataError, match="no training shards"):
        PairData.load(tmp_path, "valid")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "x.npz").write_bytes(b"not a shard")
    with pytest.raises(DataError, match="cannot read"):
        PairData.load(tmp_path, "train")


def test_several_pairs_folders_load_as_one_split(tmp_path):
    # `train fit --data A B`: two prepare runs (other seeds or renderers) read together, folder
    # by folder; the same piece in both stays one piece
    rng = np.random.default_rng(2)
    a = [rng.random((n, 48)).astype(np.float32) for n in (4, 6, 5)]
    write_shard(tmp_path / "a" / "train" / "s.npz", a[:2], a[:2], [3, 8])
    write_shard(tmp_path / "b" / "train" / "s.npz", a[2:], a[2:], [8])
    d = PairData.load([tmp_path / "a", tmp_path / "b"], "train")
    assert d.offsets.tolist() == [0, 4, 10, 15] and d.piece.tolist() == [3, 8, 8]
    np.testing.assert_allclose(d.audio[10:], a[2], atol=1e-3)
    assert d.summary() == {"pairs": 3, "pieces": 2, "frames": 15}
    with pytest.raises(DataError, match=r"no training shards in .*b.valid"):
        write_shard(tmp_path / "a" / "valid" / "s.npz", a[:1], a[:1], [3])
        PairData.load([tmp_path / "a", tmp_path / "b"], "valid")
    with pytest.raises(DataError, match="no pairs folder"):
        PairData.load([], "train")
