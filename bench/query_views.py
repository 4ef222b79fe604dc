"""How many query views the prune should use: piece recall@k on pairs the evaluation never sees.

    python bench/query_views.py [--data ~/.cache/midimatch/train] [--parts 0,2,3,4]

The collection is every pair of the ``valid`` and ``test`` splits (pieces never trained on,
rendered with the training soundfonts; ``midimatch train prepare``): each pair's MIDI frames are
cut into the index's windows (:meth:`model.encoder.Encoder.window_embeddings`, 10 s every 5 s).
The queries are ``--per-pair`` random 10 s slices of each pair's audio. Each is pruned as the
cascade prunes (:class:`index.prune.EmbeddingPruner`) with its whole window and ``parts`` parts
of it (:meth:`model.encoder.Encoder.embed_views`; 0 = the whole window alone), and the table
gives how often its own piece is among the k nearest. The held-out renderer's evaluation set is
not used, so the choice of ``parts`` is not fitted to the figures of ``midimatch eval``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table  # noqa: E402

KS = (1, 5, 10, 20)


def collection(encoder, splits: list, per_pair: int, seed: int) -> tuple:
    """(window embeddings (E, D), window owners (E,), query frames [(215, 48)], query owners)."""
    rng = np.random.default_rng(seed)
    length = encoder.window.length
    emb, owner, queries, truth = [], [], [], []
    for data in splits:
        for p in range(len(data.piece)):
            a, b = int(data.offsets[p]), int(data.offsets[p + 1])
            if b - a < length + per_pair:  # too short for distinct 10 s slices
                continue
            e, _ = encoder.window_embeddings(data.midi[a:b], "midi")
            piece = owner[-1] + 1 if owner else 0
            emb.append(e)
            owner += [piece] * len(e)
            for s in rng.choice(b - a - length + 1, per_pair, replace=False):
                queries.append(data.audio[a + s:a + s + length])
                truth.append(piece)
    return np.concatenate(emb), np.asarray(owner), queries, np.asarray(truth)


def recall(pruner, views: np.ndarray, truth: np.ndarray) -> dict:
    """Share of queries whose piece is among the k nearest, for each k of KS."""
    d = pruner.reference_distances(views)
    own = d[np.arange(len(truth)), truth]
    rank = 1 + (d < own[:, None]).sum(axis=1)  # ties go to the true piece
    return {f"recall@{k} %": 100 * float(np.mean(rank <= k)) for k in KS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="pairs folder (default: "
                    "$MIDIMATCH_CACHE/train)")
    ap.add_argument("--weights", type=Path, default=None, help="default: the shipped model")
    ap.add_argument("--parts", default="0,2,3,4", help="numbers of parts to compare")
    ap.add_argument("--per-pair", type=int, default=6, help="query slices per pair")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from index.prune import EmbeddingPruner
    from model.encoder import Encoder
    from model.env import cache_dir
    from model.training.pairs import PairData

    torch.set_num_threads(args.threads)
    parts = [int(x) for x in args.parts.split(",")]
    if any(p < 0 for p in parts):
        raise SystemExit("--parts must be >= 0")
    data_dir = args.data or cache_dir() / "train"
    encoder = Encoder.load(args.weights)
    splits = [PairData.load(data_dir, s) for s in ("valid", "test")]
    emb, owner, queries, truth = collection(encoder, splits, args.per_pair, args.seed)
    pruner = EmbeddingPruner(emb, owner, int(owner.max()) + 1)
    rows = []
    for n in parts:
        views = np.stack([encoder.embed_views(q, "audio", n) for q in queries])
        rows.append({"parts": n, **recall(pruner, views, truth)})
    print(f"model {encoder.model_id}, {data_dir}: {int(owner.max()) + 1} pieces, "
          f"{len(emb)} windows, {len(queries)} queries — {machine()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
