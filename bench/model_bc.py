"""Bhattacharyya coefficients of the shipped model vs the untrained one, per split.

    python bench/model_bc.py [--data ~/.cache/midimatch/train] [--weights W ...]
                             [--splits valid,test,test_heldout] [--no-untrained]

Lower is better (1 = matching and non-matching distances indistinguishable). The held-out split
(`test_heldout`) is rendered with TiMidity + freepats, which training and model selection never
saw; `test` uses the training soundfonts on pieces never trained on. ``--splits train,valid``
with the weights fine-tuned on those pairs and the ones they started from says whether the
network can still fit what it is shown (capacity) or fits it without carrying it over to
pieces it never saw (generalisation). ``--data`` takes several folders, read together.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, nargs="+", default=None)
    ap.add_argument("--weights", type=Path, nargs="+", default=[None],
                    help="default: the shipped model")
    ap.add_argument("--splits", default="valid,test,test_heldout")
    ap.add_argument("--no-untrained", action="store_true",
                    help="leave out the untrained network's rows")
    args = ap.parse_args()

    from model.encoder import Encoder
    from model.env import cache_dir
    from model.training.pairs import PairData
    from model.training.train import evaluate_bc

    data_dirs = args.data or [cache_dir() / "train"]
    models = [Encoder.load(w) for w in args.weights]
    named = [(m.model_id, m) for m in models]
    if not args.no_untrained:
        named.insert(0, ("untrained", Encoder.untrained(0, models[0].config)))
    rows = []
    for split in [s for s in args.splits.split(",") if s]:
        data = PairData.load(data_dirs, split)
        for name, enc in named:
            bc = evaluate_bc(enc, data)
            rows.append({"split": split, "model": name, "pairs": len(data.lengths),
                         "hash BC": bc["hash"]["bc"], "embed BC": bc["embed"]["bc"]})
    print(f"models {', '.join(m.model_id for m in models)} — {machine()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
