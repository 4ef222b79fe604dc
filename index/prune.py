"""Prune the collection with window embeddings: the K nearest references to each query.

Every reference is indexed as window embeddings (10 s windows every 5 s, see
:class:`model.encoder.WindowSpec`); a reference's distance to a query embedding is the smallest
squared Euclidean distance between the query and any of its windows (the query is a *part* of a
piece, so it should be near the window it overlaps most). The K references with the smallest
distance go on to hash-DTW.

A query may come as several *views* (:meth:`model.encoder.Encoder.embed_views`: its whole window,
then its parts). Each view is ranked against the windows on its own, and a reference's distance
is then the whole view's plus the mean of the parts': ``d_0 + mean(d_1 .. d_{V-1})``. With the
halves, more queries keep their piece among the nearest (measured, and why not: docs/evaluation.md,
"Query views").

How it is fast: all Q queries against all E windows is one matrix product,
``|q|² - 2 q·e + |e|²`` with the window norms precomputed, on the encoder's torch device; the
windows are stored grouped by reference, so the window → reference minimum is one segmented
reduction (``np.minimum.reduceat`` on the CPU, ``scatter_reduce(amin)`` on a GPU), and the top K
is an ``argpartition`` / ``topk`` over references. No Python loop over references or windows.

Memory: a float32 copy of the embeddings (E x D x 4 bytes: 10,000 references x 40 windows x 128
dimensions = 205 MB) plus, per call, a (Q, E) float32 distance block; queries are processed in
chunks so that block stays under about 64 MB.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["EmbeddingPruner"]

_BLOCK_ELEMENTS = 1 << 24  # (queries x windows) distances per chunk: 64 MB of float32


class EmbeddingPruner:
    """Nearest references by their nearest window embedding.

    Parameters
    ----------
    embeddings : np.ndarray, shape (E, D), float (float16 in an index)
        Window embeddings of all references.
    embed_ref : np.ndarray, shape (E,), integer
        Reference number of each window, in ``[0, n_refs)``.
    n_refs : int
        Number of references; a reference without windows is never returned before one with
        windows (its distance is ``+inf``).
    device : str or torch.device
        Where the distances are computed (the encoder's device).
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        embed_ref: np.ndarray,
        n_refs: int,
        device: str | torch.device = "cpu",
    ) -> None:
        embeddings = np.asarray(embeddings)
        embed_ref = np.asarray(embed_ref)
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (E, D), got shape {embeddings.shape}")
        if embed_ref.shape != (embeddings.shape[0],):
            raise ValueError(
                f"embed_ref must have shape ({embeddings.shape[0]},), got {embed_ref.shape}"
            )
        if embed_ref.size and (embed_ref.min() < 0 or embed_ref.max() >= n_refs):
            raise ValueError(f"embed_ref must lie in [0, {n_refs})")
        self.n_refs = int(n_refs)
        self.dim = int(embeddings.shape[1])
        self.device = torch.device(device)
        # Group windows by reference (an index already stores them so; stable keeps the order).
        order = np.argsort(embed_ref, kind="stable")
        ref_sorted = embed_ref[order].astype(np.int64)
        counts = np.bincount(ref_sorted, minlength=self.n_refs)
        self._has_windows = counts > 0
        # reduceat needs the first window of each reference that has windows.
        self._seg_starts = (np.cumsum(counts) - counts)[self._has_windows]
        self._seg_refs = np.flatnonzero(self._has_windows)
        emb = torch.from_numpy(np.ascontiguousarray(embeddings[order], dtype=np.float32))
        self._emb = emb.to(self.device)
        self._norms = (self._emb * self._emb).sum(dim=1)
        self._ref_of_window = torch.from_numpy(ref_sorted).to(self.device)
        # numpy's reduceat / argpartition on the CPU; scatter_reduce / topk stay on an
        # accelerator (tests run the torch path on the CPU by clearing this flag)
        self._numpy_reduce = self.device.type == "cpu"

    @property
    def n_windows(self) -> int:
        """E, the number of window embeddings."""
        return int(self._emb.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held for the search (the float32 embeddings, norms and window owners)."""
        return int(self._emb.nelement() * 4 + self._norms.nelement() * 4
                   + self._ref_of_window.nelement() * 8)

    def reference_distances(self, queries: np.ndarray) -> np.ndarray:
        """Squared Euclidean distance from each query to each reference's nearest window (for
        views: the combination of the module docstring).

        Parameters
        ----------
        queries : np.ndarray, shape (Q, D) or (Q, V, D), float

        Returns
        -------
        np.ndarray, shape (Q, n_refs), float32
            ``+inf`` for references without windows.
        """
        q = self._check(queries)
        out = np.full((q.shape[0], self.n_refs), np.inf, np.float32)
        for q0, q1 in self._chunks(q.shape[0], q.shape[1]):
            out[q0:q1] = self._ref_dist(q[q0:q1]).cpu().numpy()
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest references of each query, nearest first.

        Parameters
        ----------
        queries : np.ndarray, shape (Q, D) or (Q, V, D), float
            Query embeddings, or V views of each (the whole window first).
        k : int
            References to keep; clamped to ``n_refs`` (none for an empty collection).

        Returns
        -------
        ids : np.ndarray, shape (Q, min(k, n_refs)), int64
            Reference numbers, by increasing distance (ties by reference number).
        dists : np.ndarray, shape (Q, min(k, n_refs)), float32
            Their squared Euclidean distances (for views: the combination).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = self._check(queries)
        k = min(int(k), self.n_refs)
        ids = np.empty((q.shape[0], k), np.int64)
        dists = np.empty((q.shape[0], k), np.float32)
        if k == 0:  # an empty collection
            return ids, dists
        for q0, q1 in self._chunks(q.shape[0], q.shape[1]):
            d = self._ref_dist(q[q0:q1])
            if self._numpy_reduce:
                ids[q0:q1], dists[q0:q1] = _top_k_numpy(d.numpy(), k)
            else:
                # topk is not stable on ties; adding a tiny rank-preserving key would cost a
                # copy, and ties at float32 are measure-zero for real embeddings.
                val, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
                ids[q0:q1], dists[q0:q1] = idx.cpu().numpy(), val.cpu().numpy()
        return ids, dists

    # ------------------------------------------------------------------ internals
    def _check(self, queries: np.ndarray) -> torch.Tensor:
        """(Q, D) or (Q, V, D) → a (Q, V, D) float32 tensor on the device."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 2:
            q = q[:, None, :]
        if q.ndim != 3 or q.shape[2] != self.dim or q.shape[1] < 1:
            raise ValueError(f"queries must have shape (Q, {self.dim}) or (Q, V, {self.dim}), "
                             f"got {np.shape(queries)}")
        if not np.all(np.isfinite(q)):
            raise ValueError("queries contain NaN or infinity")
        return torch.from_numpy(np.ascontiguousarray(q)).to(self.device)

    def _chunks(self, n: int, views: int = 1) -> list[tuple[int, int]]:
        step = max(1, _BLOCK_ELEMENTS // max(1, self.n_windows * views))
        return [(i, min(n, i + step)) for i in range(0, n, step)]

    @torch.inference_mode()
    def _ref_dist(self, q: torch.Tensor) -> torch.Tensor:
        """(Q, V, D) query views on the device → (Q, n_refs) float32 distances (on the device):
        view 0's plus the mean of the others' (module docstring)."""
        n, views = q.shape[0], q.shape[1]
        d = self._view_dist(q.reshape(n * views, self.dim)).reshape(n, views, -1)
        if views == 1:
            return d[:, 0]
        return d[:, 0] + d[:, 1:].mean(dim=1)

    def _view_dist(self, q: torch.Tensor) -> torch.Tensor:
        """(N, D) embeddings → (N, n_refs) distance to each reference's nearest window."""
        if self.n_windows == 0:
            return torch.full((q.shape[0], self.n_refs), float("inf"), device=self.device)
        win = torch.addmm(self._norms[None, :], q, self._emb.T, alpha=-2.0)
        win += (q * q).sum(dim=1, keepdim=True)
        win.clamp_(min=0.0)  # rounding can dip below 0 for a query on top of a window
        if self._numpy_reduce:
            seg = np.minimum.reduceat(win.numpy(), self._seg_starts, axis=1)
            if self._seg_refs.shape[0] == self.n_refs:
                return torch.from_numpy(seg)
            out = np.full((q.shape[0], self.n_refs), np.inf, np.float32)
            out[:, self._seg_refs] = seg
            return torch.from_numpy(out)
        out = torch.full((q.shape[0], self.n_refs), float("inf"), device=self.device)
        idx = self._ref_of_window[None, :].expand(q.shape[0], -1)
        return out.scatter_reduce_(1, idx, win, reduce="amin", include_self=True)


def _top_k_numpy(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise k smallest of (Q, R), sorted by (distance, reference number)."""
    if k < d.shape[1]:
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(d.shape[1]), d.shape).copy()
    vals = np.take_along_axis(d, part, axis=1)
    # lexsort by (value, id): deterministic order on ties
    order = np.lexsort((part, vals), axis=1)
    ids = np.take_along_axis(part, order, axis=1)
    return ids.astype(np.int64), np.take_along_axis(vals, order, axis=1)
