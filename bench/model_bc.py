"""Bhattacharyya coefficients of the shipped model vs the untrained one, per split.

    python bench/model_bc.py [--data ~/.cache/midimatch/train]

Lower is better (1 = matching and non-matching distances indistinguishable). The held-out split
(`test_heldout`) is rendered with TiMidity + freepats, which training and model selection never
saw; `test` uses the training soundfonts on pieces never trained on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--weights", type=Path, default=None, help="default: the shipped model")
    args = ap.parse_args()

    from model.encoder import Encoder
    from model.env import cache_dir
    from model.training.pairs import PairData
    from model.training.train import evaluate_bc

    data_dir = args.data or cache_dir() / "train"
    trained = Encoder.load(args.weights)
    untrained = Encoder.untrained(0, trained.config)
    rows = []
    for split in ("valid", "test", "test_heldout"):
        data = PairData.load(data_dir, split)
        for name, enc in (("untrained", untrained), ("trained", trained)):
            bc = evaluate_bc(enc, data)
            rows.append({"split": split, "model": name, "pairs": len(data.lengths),
                         "hash BC": bc["hash"]["bc"], "embed BC": bc["embed"]["bc"]})
    print(f"model {trained.model_id} — {machine()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
