"""Softmax-over-time pooling of a sliding window of trunk steps, from per-block running sums.

One job: the pooling half of :class:`model.streaming.StreamingEmbedder`, kept as float64 numpy
running sums per block, so that old steps leave the window a block at a time without a re-sum and
any finite scores give a finite pool. No network here: it is fed the trunk's features and
attention scores.
"""

from __future__ import annotations

import math

import numpy as np

from model.frametail import StreamError


class AttentionWindow:
    """Softmax-over-time pooling of a sliding window, from per-block running sums.

    Steps are grouped in blocks of ``block_steps`` aligned on step 0. Per block ``b`` it keeps
    ``m_b = max s_t``, ``S_b = Σ exp(s_t − m_b)`` and ``V_b = Σ exp(s_t − m_b)·h_t`` (float64);
    the pool is ``Σ_b exp(m_b − M)·V_b / Σ_b exp(m_b − M)·S_b`` with ``M = max_b m_b``, so no
    exponent is ever positive: any finite scores give a finite pool (the arg-max step has weight
    1, the denominator is ≥ 1). The newest block is updated in place, rescaled when its max rises.

    Granularity: old blocks drop off whole, so the window is ``[start, end)`` where ``end`` is
    the number of steps added and ``start`` is the first block boundary ≥ ``end −
    window_steps`` (clamped at 0): its length is in ``(window_steps − block_steps,
    window_steps]`` once the stream is long enough, and it always starts on a block boundary.

    Parameters
    ----------
    dim : int
        Feature width D.
    window_steps, block_steps : int
        Window and block lengths in steps, 1 ≤ block_steps ≤ window_steps.
    """

    def __init__(self, dim: int, window_steps: int, block_steps: int) -> None:
        if not 1 <= block_steps <= window_steps:
            raise StreamError(f"need 1 <= block_steps ({block_steps}) <= window_steps "
                              f"({window_steps})", reason="bad_window")
        self.dim, self.window_steps, self.block_steps = dim, window_steps, block_steps
        cap = window_steps // block_steps + 2  # blocks a window can touch, +1 spare
        self._m = np.full(cap, -np.inf)
        self._s = np.zeros(cap)
        self._v = np.zeros((cap, dim))
        self.end = 0  # steps added

    @property
    def start(self) -> int:
        """First step of the window (a block boundary)."""
        b = self.block_steps
        return max(0, -(-(self.end - self.window_steps) // b) * b)

    @property
    def nbytes(self) -> int:
        return int(self._m.nbytes + self._s.nbytes + self._v.nbytes)

    def add(self, h: np.ndarray, scores: np.ndarray) -> None:
        """Append steps: features ``h`` (n, D) and attention scores ``scores`` (n,), finite."""
        h = np.asarray(h, np.float64)
        scores = np.asarray(scores, np.float64)
        if h.ndim != 2 or h.shape[1] != self.dim or scores.shape != (h.shape[0],):
            raise StreamError(f"need h (n, {self.dim}) and scores (n,), got {h.shape} and "
                              f"{scores.shape}")
        if not (np.all(np.isfinite(h)) and np.all(np.isfinite(scores))):
            raise StreamError("features or scores contain NaN or infinity")
        i, n, bs, cap = 0, len(scores), self.block_steps, len(self._m)
        while i < n:
            block, offset = divmod(self.end, bs)
            j = min(n, i + bs - offset)
            seg_s, seg_h = scores[i:j], h[i:j]
            slot = block % cap
            m_new = seg_s.max()
            if offset == 0:  # a new block: forget what the slot held
                self._m[slot], self._s[slot], self._v[slot] = m_new, 0.0, 0.0
            elif m_new > self._m[slot]:  # rescale the block's sums to the new max
                r = math.exp(self._m[slot] - m_new)
                self._m[slot] = m_new
                self._s[slot] *= r
                self._v[slot] *= r
            w = np.exp(seg_s - self._m[slot])
            self._s[slot] += w.sum()
            self._v[slot] += w @ seg_h
            self.end += j - i
            i = j

    def pooled(self) -> np.ndarray | None:
        """The attention-pooled (D,) float64 vector of the window, or None before any step."""
        if self.end == 0:
            return None
        return self._pool(self._slots())

    def pooled_views(self, parts: int) -> np.ndarray | None:
        """(1 + parts, D) float64: the window pooled whole, then each of ``parts`` consecutive
        groups of its blocks (as equal in blocks as they can be; a group left empty by a window
        of fewer blocks is the whole window), or None before any step. The streaming form of
        :meth:`model.encoder.Encoder.embed_views`, at block granularity."""
        if self.end == 0:
            return None
        slots = self._slots()
        whole = self._pool(slots)
        groups = np.array_split(slots, parts) if parts else []
        return np.stack([whole, *(self._pool(g) if g.size else whole for g in groups)])

    def _slots(self) -> np.ndarray:
        bs, cap = self.block_steps, len(self._m)
        return np.arange(self.start // bs, (self.end - 1) // bs + 1) % cap

    def _pool(self, slots: np.ndarray) -> np.ndarray:
        m = self._m[slots]
        w = np.exp(m - m.max())
        return (w @ self._v[slots]) / (w @ self._s[slots])
