"""bench/engines.py: which query sets it finds, and one row per renderer from a summary."""

from __future__ import annotations

from bench.engines import engine_row, query_sets
from model.training.render import HELD_OUT, TRAIN_RENDERERS


def test_query_sets_are_found_per_renderer(tmp_path):
    for d in ("queries", "queries-adplay-opl3", "queries-broken"):
        (tmp_path / d).mkdir()
    (tmp_path / "queries" / "queries.json").write_text("{}")
    (tmp_path / "queries-adplay-opl3" / "queries.json").write_text("{}")
    # queries-broken has no queries.json: an interrupted prepare is not a query set
    assert query_sets(tmp_path) == {HELD_OUT: tmp_path / "queries",
                                    "adplay-opl3": tmp_path / "queries-adplay-opl3"}


def test_a_row_reads_the_cells_and_names_the_role():
    summary = {"clean/5": {"top1": 0.8, "n_in": 10, "n_out": 5},
               "clean/10": {"top1": 0.9, "n_in": 10, "n_out": 5,
                            "position_within_1s_or_repeat": 0.875},
               "room_noise/10": {"top1": 0.5},
               "all/10": {"prune_recall@100": 0.95, "false_confident": 0.02}}
    row = engine_row(HELD_OUT, summary)
    assert row["role"] == "held-out" and (row["n_in"], row["n_out"]) == (10, 5)
    assert (row["top1 clean 5s"], row["top1 clean 10s"], row["top1 room_noise 10s"]) == \
        (80.0, 90.0, 50.0)
    assert row["top1 clean 20s"] == "-"  # not measured is not zero
    assert (row["prune@100 10s"], row["passage 10s"], row["false id 10s"]) == (95.0, 87.5, 2.0)
    assert engine_row(TRAIN_RENDERERS[0], summary)["role"] == "train"
