"""Training pairs, objective and validation metric of the seed work (Raffel & Ellis 2015–2016).

- :class:`PairSampler` draws the positives (aligned chunks or shifted windows) and
  :func:`derangement` pairs every item of a batch with another one: the negatives.
- :func:`contrastive_loss` is the seed's loss with the errata sign (``+α``):
  ``L = mean_P ‖f(x) − g(y)‖² + α·mean_N max(0, m − ‖f(a) − g(b)‖)² + β·mean_P(‖f(x)‖² + ‖g(y)‖²)``.
- :func:`bhattacharyya` compares the matching and non-matching distance histograms (lower is
  better separated); model selection and early stopping use it, as in the seed.

The validation half (:func:`evaluate_bc` and its parts) runs the networks over fixed excerpts of
a split, so that BCs of different models, and of successive validations, are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model.encoder import Encoder, WindowSpec

if TYPE_CHECKING:  # the data class is only needed for types
    from model.training.pairs import PairData

EMBED_HIST_BINS = 20
EMBED_MARGIN = 3.0  # default PSE margin (tuned; the thesis had 1.06); sets the histogram range
EMBED_RECALL_KS = (1, 3, 5, 10)  # piece recall@k reported by every embedding validation
EVAL_SEED = 0  # validation excerpts are fixed across runs, so BCs of different models compare


def derangement(n: int, rng: np.random.Generator, groups: np.ndarray | None = None,
                *, max_tries: int = 64) -> np.ndarray:
    """A random permutation of ``range(n)`` with no fixed point (``perm[i] != i`` for all i).

    Parameters
    ----------
    n : int
        Batch size, ≥ 2 (a batch of one has no derangement).
    rng : np.random.Generator
        The only source of randomness, so a seeded run draws the same negatives.
    groups : np.ndarray (n,) int, optional
        Group label of each item (the piece id). The derangement also avoids pairing two items
        of one group when it can find such a pairing in ``max_tries`` draws: a second rendering
        of the same piece, at about the same time, is not a negative. If every draw pairs some
        items of one group (a batch dominated by one piece), the draw with fewest such pairs wins.

    Returns
    -------
    np.ndarray (n,) int64
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    idx = np.arange(n)
    best, best_clash = None, n + 1
    tries = 0
    while True:
        perm = rng.permutation(n)
        if np.any(perm == idx):
            # Rejection keeps the draw uniform over derangements; about e ≈ 2.7 draws each.
            continue
        tries += 1
        clash = 0 if groups is None else int(np.count_nonzero(groups[perm] == groups))
        if clash < best_clash:
            best, best_clash = perm, clash
        if best_clash == 0 or tries >= max_tries:
            return best.astype(np.int64)


def contrastive_terms(
    x: torch.Tensor, y: torch.Tensor, x_neg: torch.Tensor, y_neg: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three terms of :func:`contrastive_loss`, each a scalar tensor.

    Parameters
    ----------
    x, y : torch.Tensor (..., D)
        Outputs of the audio net f and the MIDI net g for matching pairs. The mean runs over all
        leading axes, so DHS passes (batch, T', bits) and gets the seed's loss per hash step.
    x_neg, y_neg : torch.Tensor (..., D)
        Outputs for non-matching pairs (typically ``x`` and ``y[derangement]``).
    margin : float
        Hinge margin m on the Euclidean distance (not squared).

    Returns
    -------
    positive : mean ‖x − y‖²
    hinge : mean max(0, m − ‖x_neg − y_neg‖)²
    output_l2 : mean (‖x‖² + ‖y‖²) over the matching pairs (the seed's DHS output penalty)
    """
    positive = (x - y).pow(2).sum(-1).mean()
    # The gradient of sqrt is infinite at 0; a tiny floor keeps identical negatives finite.
    dist_neg = ((x_neg - y_neg).pow(2).sum(-1) + 1e-12).sqrt()
    hinge = torch.relu(margin - dist_neg).pow(2).mean()
    output_l2 = (x.pow(2).sum(-1) + y.pow(2).sum(-1)).mean()
    return positive, hinge, output_l2


def contrastive_loss(
    x: torch.Tensor, y: torch.Tensor, x_neg: torch.Tensor, y_neg: torch.Tensor, *,
    alpha: float, margin: float, beta: float = 0.0,
) -> torch.Tensor:
    """Seed contrastive loss ``positive + α·hinge + β·output_l2`` (see :func:`contrastive_terms`).

    Returns
    -------
    torch.Tensor, scalar
    """
    positive, hinge, output_l2 = contrastive_terms(x, y, x_neg, y_neg, margin)
    loss = positive + alpha * hinge
    if beta:
        loss = loss + beta * output_l2
    return loss


def batch_nce(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, tau: float) -> torch.Tensor:
    """In-batch InfoNCE on squared distances, both ways (audio → MIDI and MIDI → audio).

    Item i's positive is ``y[i]``; its negatives are every ``y[j]`` of another group (piece):
    logits ``-‖x_i − y_j‖² / τ``, cross-entropy of the diagonal, averaged over the rows and over
    the columns. Other items of the same piece are left out (neither positive nor negative): the
    prune wants the right *piece* near, and another window of it is not a mistake.

    Unlike the seed's hinge, whose one deranged negative per item stops pulling once it is past
    the margin, this ranks the positive against all B − 1 items at once and weighs the nearest
    impostors most: what the prune's top-K needs.

    Parameters
    ----------
    x, y : torch.Tensor (B, D)
    groups : torch.Tensor (B,) int, the piece of each item
    tau : float > 0, temperature in squared-distance units

    Returns
    -------
    torch.Tensor, scalar
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    logits = -torch.cdist(x, y).pow(2) / tau  # (B, B)
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    same = (groups[:, None] == groups[None, :]) & ~eye
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(x), device=x.device)
    return 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                  + torch.nn.functional.cross_entropy(logits.T, target))


def bhattacharyya(p: np.ndarray, q: np.ndarray) -> float:
    """Bhattacharyya coefficient Σ √(p̂ q̂) of two histograms over the same bins.

    Parameters
    ----------
    p, q : np.ndarray (n_bins,)
        Counts (or any non-negative weights); each is normalised to sum 1 first.

    Returns
    -------
    float in [0, 1]: 1 for identical distributions, 0 for disjoint supports.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"histograms must be 1-D of equal length, got {p.shape} and {q.shape}")
    if np.any(p < 0) or np.any(q < 0) or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("histograms must be non-negative and not empty")
    return float(np.sqrt((p / p.sum()) * (q / q.sum())).sum())


def hamming_histogram(distances: np.ndarray, n_bits: int) -> np.ndarray:
    """Counts of Hamming distances 0..n_bits: (n_bits + 1,) int64."""
    return np.bincount(np.asarray(distances, dtype=np.int64).ravel(), minlength=n_bits + 1)


def embed_bin_edges(margin: float, n_bins: int = EMBED_HIST_BINS) -> np.ndarray:
    """Fixed bin edges (n_bins + 1,) for squared embedding distances, from 0 to (2m)².

    The seed took min..max of each validation's distances, so one outlier could squeeze all
    the mass into a bin or two and two validations were not on the same scale. The loss gives
    a natural scale instead: positives are pulled to 0, negatives pushed past m² (squared), so
    [0, (2m)²] shows both; farther distances count in the last bin.
    """
    return np.linspace(0.0, (2.0 * margin) ** 2, n_bins + 1)


def embed_histogram(sq_distances: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of squared distances in ``edges``' bins, the last bin open-ended: (n_bins,)."""
    d = np.clip(np.asarray(sq_distances, dtype=np.float64).ravel(), edges[0], edges[-1])
    return np.histogram(d, bins=edges)[0]


# ------------------------------------------------------------------------------ pairs
class PairSampler:
    """Epochs of positive pairs: (audio start, MIDI start, piece) items, checkpointable.

    ``kind="hash"`` (DHS): each epoch cuts every pair into consecutive ``length``-frame chunks
    at a random offset, as the seed did; audio and MIDI chunks start on the same frame.
    ``kind="embed"`` (PSE): each pair appears once per half window it spans (longer pieces
    weigh more, as in the index); the audio window starts anywhere, the MIDI window up to
    ``max_shift`` frames away from it, because live queries never sit on the index's grid.

    Parameters
    ----------
    data : PairData
    kind : "hash" or "embed"
    batch_size, length, max_shift : int, in items and frames
    rng : np.random.Generator, also the source of the negatives' derangements
    """

    def __init__(self, data: PairData, kind: str, batch_size: int, length: int,
                 max_shift: int, rng: np.random.Generator) -> None:
        if kind not in ("hash", "embed"):
            raise ValueError(f"kind must be 'hash' or 'embed', got {kind!r}")
        self.data, self.kind, self.rng = data, kind, rng
        self.batch_size, self.length, self.max_shift = batch_size, length, max_shift
        self.order = np.zeros((0,), np.int64)
        self.pos, self.epoch = 0, 0
        self.usable = np.flatnonzero(np.diff(data.offsets) >= length)

    def epoch_items(self) -> np.ndarray:
        """A new epoch's items (global chunk starts for DHS, pair indices for PSE), shuffled."""
        lengths, L = np.diff(self.data.offsets)[self.usable], self.length
        if self.kind == "hash":
            offs = self.rng.integers(0, np.minimum(L, lengths - L + 1))
            items = [self.data.offsets[i] + o + L * np.arange((n - o) // L)
                     for i, o, n in zip(self.usable, offs, lengths, strict=True)]
        else:
            items = [np.full((n - L) // max(1, L // 2) + 1, i)
                     for i, n in zip(self.usable, lengths, strict=True)]
        return self.rng.permutation(np.concatenate(items or [np.zeros(0, np.int64)]))

    def next_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global start frames of the audio (B,) and MIDI (B,) excerpts, and their pieces (B,)."""
        b = self.batch_size
        if self.pos + b > len(self.order):  # the tail of an epoch is dropped: full batches only
            self.order, self.pos, self.epoch = self.epoch_items(), 0, self.epoch + 1
            if len(self.order) < b:
                raise ValueError(f"an epoch has {len(self.order)} excerpts of {self.length} "
                                 f"frames, fewer than a batch ({b})")
        items = self.order[self.pos:self.pos + b]
        self.pos += b
        if self.kind == "hash":
            pair = np.searchsorted(self.data.offsets, items, side="right") - 1
            return items, items, self.data.piece[pair]
        room = np.diff(self.data.offsets)[items] - self.length  # ≥ 0
        shift = np.clip(self.rng.integers(-self.max_shift, self.max_shift + 1, b), -room, room)
        audio = self.rng.integers(np.maximum(0, -shift), room - np.maximum(0, shift) + 1)
        start = self.data.offsets[items]
        return start + audio, start + audio + shift, self.data.piece[items]

    def gather(self, starts: np.ndarray, modality: str) -> np.ndarray:
        """Excerpts (B, length, 48) float32 of ``modality`` ("audio"/"midi") from start frames."""
        return getattr(self.data, modality)[starts[:, None] + np.arange(self.length)]

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "order": torch.from_numpy(self.order),
                "pos": self.pos, "epoch": self.epoch}

    def load_state(self, s: dict[str, Any]) -> None:
        self.rng.bit_generator.state = s["rng"]
        self.order, self.pos, self.epoch = s["order"].numpy(), s["pos"], s["epoch"]


# ------------------------------------------------------------------------------ validation
@dataclass(frozen=True)
class EvalSet:
    """Fixed validation items: N aligned (audio, MIDI) excerpts and their negatives.

    Attributes
    ----------
    audio, midi : np.ndarray (N, L, 48) float32
    piece : np.ndarray (N,) int64
    perm : np.ndarray (N,) int64, a derangement across pieces: the hash negatives
    """

    audio: np.ndarray
    midi: np.ndarray
    piece: np.ndarray
    perm: np.ndarray


def hash_eval_set(data: PairData, length: int = 100, *, max_items: int = 1024,
                  seed: int = EVAL_SEED) -> EvalSet:
    """Consecutive ``length``-frame chunks of every validation pair (at most ``max_items``)."""
    rng = np.random.default_rng(seed)
    starts, pairs = [], []
    for p, n in enumerate(np.diff(data.offsets)):
        k = np.arange(n // length)
        starts.append(data.offsets[p] + length * k)
        pairs.append(np.full(len(k), p))
    return _eval_set(data, np.concatenate(starts), np.concatenate(starts),
                     np.concatenate(pairs), length, max_items, rng)


def embed_eval_set(data: PairData, window: WindowSpec | None = None, *, max_items: int = 1024,
                   seed: int = EVAL_SEED) -> EvalSet:
    """MIDI windows on the index grid, audio windows shifted by up to ±hop/2 (a live query)."""
    w = window or WindowSpec()
    rng = np.random.default_rng(seed)
    a_starts, m_starts, pairs = [], [], []
    for p, n in enumerate(np.diff(data.offsets)):
        if n < w.length:
            continue
        grid = w.starts(int(n))
        shift = rng.integers(-(w.hop // 2), w.hop // 2 + 1, len(grid))
        a_starts.append(data.offsets[p] + np.clip(grid + shift, 0, n - w.length))
        m_starts.append(data.offsets[p] + grid)
        pairs.append(np.full(len(grid), p))
    if not pairs:
        raise ValueError(f"no validation pair has {w.length} frames")
    return _eval_set(data, np.concatenate(a_starts), np.concatenate(m_starts),
                     np.concatenate(pairs), w.length, max_items, rng)


def _eval_set(data: PairData, a_starts: np.ndarray, m_starts: np.ndarray, pairs: np.ndarray,
              length: int, max_items: int, rng: np.random.Generator) -> EvalSet:
    if len(pairs) < 2:
        raise ValueError(f"validation needs at least 2 excerpts of {length} frames")
    if len(pairs) > max_items:
        keep = np.sort(rng.choice(len(pairs), max_items, replace=False))
        a_starts, m_starts, pairs = a_starts[keep], m_starts[keep], pairs[keep]
    span = np.arange(length)
    piece = data.piece[pairs]
    return EvalSet(data.audio[a_starts[:, None] + span], data.midi[m_starts[:, None] + span],
                   piece, derangement(len(piece), rng, piece))


@torch.inference_mode()
def _outputs(net: torch.nn.Module, x: np.ndarray, mean: torch.Tensor, std: torch.Tensor,
             batch: int = 128) -> torch.Tensor:
    was_training = net.training
    net.eval()
    out = torch.cat([net((torch.from_numpy(x[i:i + batch]).to(mean.device) - mean) / std)
                     for i in range(0, len(x), batch)])
    net.train(was_training)
    return out


def hash_validation(f: torch.nn.Module, g: torch.nn.Module, es: EvalSet, mean: torch.Tensor,
                    std: torch.Tensor, n_bits: int) -> dict[str, Any]:
    """BC of Hamming distances between thresholded outputs, per hash step.

    Matching: audio chunk i vs MIDI chunk i, step t. Non-matching: audio chunk i vs MIDI chunk
    ``perm[i]``, step t. Returns ``{"bc", "edges", "match", "nonmatch"}`` (histograms as lists).
    """
    bits_a = _outputs(f, es.audio, mean, std) > 0  # (N, T', n_bits)
    bits_m = _outputs(g, es.midi, mean, std) > 0
    match = (bits_a != bits_m).sum(-1).cpu().numpy()
    nonmatch = (bits_a != bits_m[torch.as_tensor(es.perm, device=bits_m.device)]).sum(-1)
    hm, hn = hamming_histogram(match, n_bits), hamming_histogram(nonmatch.cpu().numpy(), n_bits)
    return {"bc": bhattacharyya(hm, hn), "edges": np.arange(n_bits + 2).tolist(),
            "match": hm.tolist(), "nonmatch": hn.tolist()}


def embed_validation(f: torch.nn.Module, g: torch.nn.Module, es: EvalSet, mean: torch.Tensor,
                     std: torch.Tensor, edges: np.ndarray) -> dict[str, Any]:
    """BC of squared embedding distances; non-matching = every pair of different pieces.

    All N² cross-piece pairs (not one derangement) because embeddings are cheap to compare and
    the non-matching histogram is then smooth enough for 20 bins.
    """
    ea, em = _outputs(f, es.audio, mean, std), _outputs(g, es.midi, mean, std)
    d = torch.cdist(ea.double(), em.double()).pow(2).cpu().numpy()  # (N, N)
    other = es.piece[:, None] != es.piece[None, :]
    hm, hn = embed_histogram(np.diag(d), edges), embed_histogram(d[other], edges)
    return {"bc": bhattacharyya(hm, hn), "edges": np.asarray(edges).tolist(),
            "match": hm.tolist(), "nonmatch": hn.tolist(),
            **piece_recall(d, es.piece, EMBED_RECALL_KS)}


def piece_recall(d: np.ndarray, piece: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict:
    """How often the prune would keep the right piece: recall@k over pieces.

    ``d[i, j]`` is the squared distance from audio window i to MIDI window j; ``piece`` the piece
    of each (window i's match is MIDI window i). A piece's distance to a query is its nearest
    window's (as in :class:`index.prune.EmbeddingPruner`); the query's rank is the number of
    other pieces strictly nearer than its own. Returns ``{"recall@k": share with rank < k}`` and
    ``"pieces"``, the number of pieces ranked.
    """
    pieces, inv = np.unique(piece, return_inverse=True)
    per_piece = np.full((d.shape[0], len(pieces)), np.inf)
    for j, p in enumerate(inv):  # N is ~1,000: a loop over columns is fast enough
        np.minimum(per_piece[:, p], d[:, j], out=per_piece[:, p])
    own = per_piece[np.arange(d.shape[0]), inv]
    rank = (per_piece < own[:, None]).sum(1)
    return {"pieces": int(len(pieces)), **{f"recall@{k}": float(np.mean(rank < k)) for k in ks}}


def evaluate_bc(encoder: Encoder, data: PairData, *, max_items: int = 1024,
                embed_margin: float = EMBED_MARGIN, hash_length: int = 100,
                seed: int = EVAL_SEED) -> dict[str, dict[str, Any]]:
    """Validation BCs of a whole model (e.g. untrained vs trained) on one split.

    Parameters
    ----------
    encoder : Encoder
        Its nets and its input ``mean``/``std`` are used as the worker would use them.
    data : PairData
        Usually the validation split.
    max_items : int
        Excerpts per stage (fixed subset chosen with ``seed``).
    embed_margin : float
        Sets the fixed embedding histogram range (see :func:`embed_bin_edges`).

    Returns
    -------
    ``{"hash": {...}, "embed": {...}}``, each ``{"bc", "edges", "match", "nonmatch"}``.
    """
    mean, std = encoder.mean, encoder.std
    hs = hash_eval_set(data, hash_length, max_items=max_items, seed=seed)
    es = embed_eval_set(data, encoder.window, max_items=max_items, seed=seed)
    n = encoder.nets
    return {
        "hash": hash_validation(n["hash_audio"], n["hash_midi"], hs, mean, std, encoder.n_bits),
        "embed": embed_validation(n["embed_audio"], n["embed_midi"], es, mean, std,
                                  embed_bin_edges(embed_margin)),
    }
