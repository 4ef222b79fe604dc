"""Tests of model.attention: the sliding window pools as a softmax over its steps, finitely."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.attention import AttentionWindow
from model.frametail import StreamError
from tests.model.test_streaming import _chunks


def _direct_pool64(h: np.ndarray, s: np.ndarray) -> np.ndarray:
    s = s.astype(np.float64)
    w = np.exp(s - s.max())
    return (w / w.sum()) @ h.astype(np.float64)


def _feed(win: AttentionWindow, h: np.ndarray, s: np.ndarray, seed: int = 0) -> None:
    sizes = _chunks(len(s), "random", seed)
    i = 0
    for c in sizes:
        win.add(h[i:i + c], s[i:i + c])
        i += c


def test_window_pool_equals_torch_softmax_pool_and_slides_by_whole_blocks():
    rng = np.random.default_rng(1)
    h = rng.standard_normal((400, 6)).astype(np.float32)
    s = rng.standard_normal(400).astype(np.float32) * 3
    win = AttentionWindow(6, window_steps=50, block_steps=8)
    i = 0
    for c in _chunks(400, "random", seed=2):
        win.add(h[i:i + c], s[i:i + c])
        i += c
        if i == 0:
            assert win.pooled() is None
            continue
        a, b = win.start, win.end
        assert b == i and a % 8 == 0
        assert b - a <= 50 and (b - a > 50 - 8 or a == 0)
        weights = torch.softmax(torch.from_numpy(s[a:b]), dim=0)
        want = (weights[:, None] * torch.from_numpy(h[a:b])).sum(0).numpy()
        np.testing.assert_allclose(win.pooled(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["pm1e4", "pm80", "equal", "one_huge", "one_tiny", "rising"])
def test_window_pool_is_finite_and_exact_with_extreme_scores(case):
    rng = np.random.default_rng(7)
    n = 120
    h = rng.standard_normal((n, 5))
    s = {
        "pm1e4": np.where(rng.random(n) < 0.5, -1e4, 1e4) + rng.standard_normal(n),
        "pm80": np.where(rng.random(n) < 0.5, -80.0, 80.0) * rng.random(n) * 10,
        "equal": np.full(n, 12345.0),
        "one_huge": np.r_[rng.standard_normal(n - 1), 1e4][rng.permutation(n)],
        "one_tiny": np.r_[np.zeros(n - 1), -1e4],
        "rising": np.linspace(-1e4, 1e4, n),  # the newest block's max rises at every step
    }[case]
    with np.errstate(over="ignore", invalid="ignore"):
        naive = np.exp(s) @ h / np.exp(s).sum()
    if case != "one_tiny":
        assert not np.all(np.isfinite(naive))  # what the running sums must avoid
    win = AttentionWindow(5, window_steps=60, block_steps=7)
    _feed(win, h, s, seed=3)
    got = win.pooled()
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _direct_pool64(h[win.start:win.end], s[win.start:win.end]),
                               rtol=1e-9, atol=1e-12)


def test_window_rejects_bad_arguments():
    with pytest.raises(StreamError):
        AttentionWindow(4, window_steps=5, block_steps=6)
    win = AttentionWindow(4, window_steps=10, block_steps=2)
    with pytest.raises(StreamError, match="NaN"):
        win.add(np.zeros((2, 4)), np.array([0.0, np.inf]))
    with pytest.raises(StreamError, match="need h"):
        win.add(np.zeros((2, 3)), np.zeros(2))
